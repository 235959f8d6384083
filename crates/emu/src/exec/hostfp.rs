//! Floating-point arithmetic computed by the host processor.
//!
//! SSE/SSE2 results (rounding, NaN propagation, DAZ/FTZ, the sticky
//! exception flags, RCPPS/RSQRTPS approximations) are produced by running
//! the very instruction on the host with the guest's MXCSR loaded, all
//! exceptions masked. Each helper is one `asm!` block that saves the host
//! MXCSR, loads the guest's, executes, stores the resulting MXCSR and
//! restores the host's, so the compiler never sees a non-default
//! floating-point environment around its own code.
//!
//! x87 arithmetic works the same way on 80-bit values in memory: the
//! guest FCW (exceptions masked) is loaded, operands pushed with `fld
//! tbyte`, the operation executed, the result popped with `fstp` and FSW
//! read; the host x87 stack is empty before and after (the ABI's state).

use core::arch::asm;
use core::arch::x86_64::__m128i;

#[inline(always)]
fn to_m(v: u128) -> __m128i {
    // SAFETY: both types are 16 bytes of plain data with no invalid bit
    // patterns.
    unsafe { core::mem::transmute::<u128, __m128i>(v) }
}

#[inline(always)]
fn from_m(v: __m128i) -> u128 {
    // SAFETY: as in `to_m`.
    unsafe { core::mem::transmute::<__m128i, u128>(v) }
}

/// The MXCSR the host runs a guest instruction under: the guest's
/// control bits with every exception masked and the flags clear.
#[inline(always)]
fn host_mxcsr(guest: u32) -> u32 {
    (guest | 0x1f80) & 0xffc0
}

/// `insn dst, src` on XMM registers: returns the new destination and the
/// exception flags raised (MXCSR bits 5:0).
macro_rules! xmm2 {
    ($($name:ident => $insn:literal,)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
            let mut a = to_m(a);
            let b = to_m(b);
            let mut m = host_mxcsr(mxcsr);
            let mut save = 0u32;
            // SAFETY: the block only reads/writes the two u32 locals
            // through the pointers given and the named XMM registers; the
            // host MXCSR is restored before it ends.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    concat!($insn, " {a}, {b}"),
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    a = inout(xmm_reg) a,
                    b = in(xmm_reg) b,
                    m = in(reg) &mut m as *mut u32,
                    s = in(reg) &mut save as *mut u32,
                    options(nostack),
                );
            }
            (from_m(a), m & 0x3f)
        }
    )*};
}

xmm2! {
    addps => "addps", addpd => "addpd", addss => "addss", addsd => "addsd",
    subps => "subps", subpd => "subpd", subss => "subss", subsd => "subsd",
    mulps => "mulps", mulpd => "mulpd", mulss => "mulss", mulsd => "mulsd",
    divps => "divps", divpd => "divpd", divss => "divss", divsd => "divsd",
    minps => "minps", minpd => "minpd", minss => "minss", minsd => "minsd",
    maxps => "maxps", maxpd => "maxpd", maxss => "maxss", maxsd => "maxsd",
    sqrtps => "sqrtps", sqrtpd => "sqrtpd", sqrtss => "sqrtss", sqrtsd => "sqrtsd",
    rcpps => "rcpps", rcpss => "rcpss", rsqrtps => "rsqrtps", rsqrtss => "rsqrtss",
    cvtss2sd => "cvtss2sd", cvtsd2ss => "cvtsd2ss",
    cvtps2pd => "cvtps2pd", cvtpd2ps => "cvtpd2ps",
    cvtdq2ps => "cvtdq2ps", cvtps2dq => "cvtps2dq", cvttps2dq => "cvttps2dq",
    cvtdq2pd => "cvtdq2pd", cvtpd2dq => "cvtpd2dq", cvttpd2dq => "cvttpd2dq",
}

/// `cmpXX dst, src, P`.
macro_rules! xmm_cmp {
    ($($name:ident => $insn:literal,)*) => {$(
        #[inline(never)]
        pub(crate) fn $name<const P: u8>(a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
            let mut a = to_m(a);
            let b = to_m(b);
            let mut m = host_mxcsr(mxcsr);
            let mut save = 0u32;
            // SAFETY: as in `xmm2!`.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    concat!($insn, " {a}, {b}, {p}"),
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    a = inout(xmm_reg) a,
                    b = in(xmm_reg) b,
                    m = in(reg) &mut m as *mut u32,
                    s = in(reg) &mut save as *mut u32,
                    p = const P,
                    options(nostack),
                );
            }
            (from_m(a), m & 0x3f)
        }
    )*};
}

xmm_cmp! {
    cmpps => "cmpps", cmppd => "cmppd", cmpss => "cmpss", cmpsd => "cmpsd",
}

/// `(u)comis[sd] a, b`: returns (RFLAGS with ZF/PF/CF as produced, the
/// others clear as the instruction leaves them) and the exception flags.
macro_rules! xmm_comi {
    ($($name:ident => $insn:literal,)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(a: u128, b: u128, mxcsr: u32) -> (u64, u32) {
            let a = to_m(a);
            let b = to_m(b);
            let mut m = host_mxcsr(mxcsr);
            let mut save = 0u32;
            let f: u64;
            // SAFETY: as in `xmm2!`; the push/pop pair leaves RSP as it
            // was.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    concat!($insn, " {a}, {b}"),
                    "pushfq",
                    "pop {f}",
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    a = in(xmm_reg) a,
                    b = in(xmm_reg) b,
                    m = in(reg) &mut m as *mut u32,
                    s = in(reg) &mut save as *mut u32,
                    f = out(reg) f,
                );
            }
            (f & 0x8d5, m & 0x3f)
        }
    )*};
}

xmm_comi! {
    comiss => "comiss", ucomiss => "ucomiss", comisd => "comisd", ucomisd => "ucomisd",
}

/// `cvt(t)s[sd]2si r, xmm` in 32- and 64-bit forms.
macro_rules! xmm_to_gpr {
    ($($name:ident => $insn:literal, $reg:literal;)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(b: u128, mxcsr: u32) -> (u64, u32) {
            let b = to_m(b);
            let mut m = host_mxcsr(mxcsr);
            let mut save = 0u32;
            let mut g: u64 = 0;
            // SAFETY: as in `xmm2!`.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    concat!($insn, " ", $reg, ", {b}"),
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    g = inout(reg) g,
                    b = in(xmm_reg) b,
                    m = in(reg) &mut m as *mut u32,
                    s = in(reg) &mut save as *mut u32,
                    options(nostack),
                );
            }
            (g, m & 0x3f)
        }
    )*};
}

xmm_to_gpr! {
    cvtss2si32 => "cvtss2si", "{g:e}";
    cvtss2si64 => "cvtss2si", "{g}";
    cvttss2si32 => "cvttss2si", "{g:e}";
    cvttss2si64 => "cvttss2si", "{g}";
    cvtsd2si32 => "cvtsd2si", "{g:e}";
    cvtsd2si64 => "cvtsd2si", "{g}";
    cvttsd2si32 => "cvttsd2si", "{g:e}";
    cvttsd2si64 => "cvttsd2si", "{g}";
}

/// `cvtsi2s[sd] xmm, r32/r64`.
macro_rules! gpr_to_xmm {
    ($($name:ident => $insn:literal, $reg:literal;)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(a: u128, g: u64, mxcsr: u32) -> (u128, u32) {
            let mut a = to_m(a);
            let mut m = host_mxcsr(mxcsr);
            let mut save = 0u32;
            // SAFETY: as in `xmm2!`.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    concat!($insn, " {a}, ", $reg),
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    a = inout(xmm_reg) a,
                    g = in(reg) g,
                    m = in(reg) &mut m as *mut u32,
                    s = in(reg) &mut save as *mut u32,
                    options(nostack),
                );
            }
            (from_m(a), m & 0x3f)
        }
    )*};
}

gpr_to_xmm! {
    cvtsi2ss32 => "cvtsi2ss", "{g:e}";
    cvtsi2ss64 => "cvtsi2ss", "{g}";
    cvtsi2sd32 => "cvtsi2sd", "{g:e}";
    cvtsi2sd64 => "cvtsi2sd", "{g}";
}

// ---- x87 ------------------------------------------------------------------

/// The FCW the host runs a guest x87 operation under: the guest's
/// precision and rounding control with every exception masked.
#[inline(always)]
fn host_fcw(guest: u16) -> u16 {
    (guest & 0x0f00) | 0x037f
}

/// An x87 operation on up to two 80-bit operands held in a 10-byte
/// buffer each; `$body` is the instruction sequence, which finds ST(0) =
/// `a` and ST(1) = `b` (both pushed, b first), leaves exactly one value
/// on the stack, which is stored back into `a`. Returns the FSW
/// exception bits (5:0) and C1 (bit 9).
macro_rules! x87_op {
    ($($name:ident => $body:literal,)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(a: &mut [u8; 16], b: &[u8; 16], fcw: u16) -> u16 {
            let cw = host_fcw(fcw);
            let mut save = 0u16;
            let sw: u16;
            // SAFETY: the block reads `b` and `cw`, writes `a` and `save`
            // (all live locals of the right size) and leaves the x87 stack
            // empty with the host FCW restored; the x87 registers are
            // declared clobbered.
            unsafe {
                asm!(
                    "fnstcw [{s}]",
                    "fnclex",
                    "fldcw [{c}]",
                    "fld tbyte ptr [{b}]",
                    "fld tbyte ptr [{a}]",
                    $body,
                    "fstp tbyte ptr [{a}]",
                    "fnstsw ax",
                    "fnclex",
                    "fldcw [{s}]",
                    a = in(reg) a.as_mut_ptr(),
                    b = in(reg) b.as_ptr(),
                    c = in(reg) &cw as *const u16,
                    s = in(reg) &mut save as *mut u16,
                    out("ax") sw,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(nostack),
                );
            }
            sw & 0x023f
        }
    )*};
}

x87_op! {
    fadd => "faddp st(1), st",
    fmul => "fmulp st(1), st",
    // ST(1) - ST(0) in Intel terms for fsubp is ST(1) := ST(1) - ST(0)
    // (GNU swaps the R forms): compute a - b and a / b explicitly.
    fsub => "fsubrp st(1), st",
    fdiv => "fdivrp st(1), st",
    fsqrt => "fsqrt\nfstp st(1)",
    frndint => "frndint\nfstp st(1)",
    fscale => "fscale\nfstp st(1)",
}

/// `fld`+`fstp` through memory of `$w` bytes, to convert between the
/// 80-bit format and float/double/integers with the guest's rounding.
macro_rules! x87_conv {
    ($($name:ident => $ld:literal, $st:literal;)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(src: &[u8; 16], dst: &mut [u8; 16], fcw: u16) -> u16 {
            let cw = host_fcw(fcw);
            let mut save = 0u16;
            let sw: u16;
            // SAFETY: as in `x87_op!`: reads `src`, writes `dst` (16-byte
            // buffers, larger than any x87 memory format used), leaves the
            // stack empty and the host FCW restored.
            unsafe {
                asm!(
                    "fnstcw [{s}]",
                    "fnclex",
                    "fldcw [{c}]",
                    concat!($ld, " [{a}]"),
                    concat!($st, " [{b}]"),
                    "fnstsw ax",
                    "fnclex",
                    "fldcw [{s}]",
                    a = in(reg) src.as_ptr(),
                    b = in(reg) dst.as_mut_ptr(),
                    c = in(reg) &cw as *const u16,
                    s = in(reg) &mut save as *mut u16,
                    out("ax") sw,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(nostack),
                );
            }
            sw & 0x023f
        }
    )*};
}

x87_conv! {
    ld32 => "fld dword ptr", "fstp tbyte ptr";
    ld64 => "fld qword ptr", "fstp tbyte ptr";
    ild16 => "fild word ptr", "fstp tbyte ptr";
    ild32 => "fild dword ptr", "fstp tbyte ptr";
    ild64 => "fild qword ptr", "fstp tbyte ptr";
    st32 => "fld tbyte ptr", "fstp dword ptr";
    st64 => "fld tbyte ptr", "fstp qword ptr";
    ist16 => "fld tbyte ptr", "fistp word ptr";
    ist32 => "fld tbyte ptr", "fistp dword ptr";
    ist64 => "fld tbyte ptr", "fistp qword ptr";
    istt16 => "fld tbyte ptr", "fisttp word ptr";
    istt32 => "fld tbyte ptr", "fisttp dword ptr";
    istt64 => "fld tbyte ptr", "fisttp qword ptr";
}

/// FUCOMI/FCOMI of a (ST(0)) with b: returns ZF|PF|CF and the FSW
/// exception bits.
macro_rules! x87_cmp {
    ($($name:ident => $insn:literal,)*) => {$(
        #[inline(never)]
        pub(crate) fn $name(a: &[u8; 16], b: &[u8; 16]) -> (u64, u16) {
            let cw = 0x037fu16;
            let mut save = 0u16;
            let sw: u16;
            let f: u64;
            // SAFETY: as in `x87_op!`; pushfq/pop leave RSP balanced.
            unsafe {
                asm!(
                    "fnstcw [{s}]",
                    "fnclex",
                    "fldcw [{c}]",
                    "fld tbyte ptr [{b}]",
                    "fld tbyte ptr [{a}]",
                    $insn,
                    "pushfq",
                    "pop {f}",
                    "fstp st(0)",
                    "fnstsw ax",
                    "fnclex",
                    "fldcw [{s}]",
                    a = in(reg) a.as_ptr(),
                    b = in(reg) b.as_ptr(),
                    c = in(reg) &cw as *const u16,
                    s = in(reg) &mut save as *mut u16,
                    f = out(reg) f,
                    out("ax") sw,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                );
            }
            (f & 0x45, sw & 0x3f)
        }
    )*};
}

x87_cmp! {
    fcomi => "fcomip st, st(1)",
    fucomi => "fucomip st, st(1)",
}
