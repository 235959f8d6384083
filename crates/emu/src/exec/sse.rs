//! SSE/SSE2 instructions: data movement, packed integer operations,
//! shuffles, and (through [`super::hostfp`]) floating-point arithmetic,
//! comparisons and conversions with exact MXCSR semantics.
//!
//! Availability follows the SDM: #UD when CR0.EM is set or CR4.OSFXSR is
//! clear, #NM when CR0.TS is set. Legacy-encoded 16-byte memory operands
//! must be 16-byte aligned (#GP(0)) except for the unaligned moves.
//! Masked floating-point exceptions set the sticky MXCSR flags; an
//! unmasked one raises #XM (or #UD with CR4.OSXMMEXCPT clear) and leaves
//! the destination unchanged. Forms with an MMX register are `super::mmx`'s.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::{fault, Core, Exception, OpResult, Stop};
use crate::block::{Handler, Op};
use crate::mem::{Access, PAGE_MASK};
use crate::state::bits::{CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT};

type R = OpResult;

fn gp0() -> Stop {
    Stop::Fault(Exception::with_code(Exception::GP, 0))
}

/// #UD/#NM checks shared by every SSE instruction.
#[inline(always)]
pub(crate) fn sse_check(c: &Core) -> R {
    if c.cpu.cr0 & (CR0_EM | CR0_TS) == 0 && c.cpu.cr4 & CR4_OSFXSR != 0 {
        return Ok(());
    }
    if c.cpu.cr0 & CR0_EM != 0 || c.cpu.cr4 & CR4_OSFXSR == 0 {
        Err(fault(Exception::UD))
    } else {
        Err(fault(Exception::NM))
    }
}

// ---- 128-bit memory access ----------------------------------------------------

impl Core {
    /// Reads `size` (1..=16) bytes at `lin`.
    pub(crate) fn read_n(&mut self, lin: u64, size: usize) -> Result<u128, Stop> {
        if size <= 8 {
            return Ok(u128::from(self.read(lin, size)?));
        }
        let lo = self.read(lin, 8)?;
        let hi = self.read(lin.wrapping_add(8), size - 8)?;
        Ok(u128::from(lo) | (u128::from(hi) << 64))
    }

    /// Writes the low `size` (1..=16) bytes of `v` at `lin`; both ends
    /// are checked for writability first so a fault writes nothing.
    pub(crate) fn write_n(&mut self, lin: u64, size: usize, v: u128) -> R {
        if size <= 8 {
            return self.write(lin, size, v as u64);
        }
        let last = lin.wrapping_add(size as u64 - 1);
        if (lin & !PAGE_MASK) != (last & !PAGE_MASK) {
            self.translate(last, Access::Write)?;
        }
        self.write(lin, 8, v as u64)?;
        self.write(lin.wrapping_add(8), size - 8, (v >> 64) as u64)
    }
}

// ---- operands ---------------------------------------------------------------

#[inline(always)]
fn xi(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::XMM0 as usize) & 15
}

#[inline(always)]
fn xmm(c: &Core, op: &Op, n: u32) -> u128 {
    c.cpu.fpu.xmm[xi(op.instr.op_register(n))]
}

#[inline(always)]
fn set_xmm(c: &mut Core, op: &Op, n: u32, v: u128) {
    c.cpu.fpu.xmm[xi(op.instr.op_register(n))] = v;
}

/// Whether a 16-byte memory operand of this instruction may be unaligned.
pub(crate) fn unaligned_ok(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Maskmovdqu
    )
}

/// Linear address of the memory operand, with the alignment check.
#[inline(always)]
fn mem_addr(c: &Core, op: &Op) -> Result<(u64, usize), Stop> {
    let lin = c.mem_linear(op);
    let size = op.instr.memory_size().size();
    if size == 16 && lin & 15 != 0 && !unaligned_ok(&op.instr) {
        return Err(gp0());
    }
    Ok((lin, size))
}

/// Operand `n` as a 128-bit value: an XMM register, a GPR (zero-extended),
/// or memory of the instruction's memory size (zero-extended).
#[inline(always)]
fn src(c: &mut Core, op: &Op, n: u32) -> Result<u128, Stop> {
    match op.instr.op_kind(n) {
        OpKind::Register => {
            let r = op.instr.op_register(n);
            if r.is_xmm() {
                Ok(c.cpu.fpu.xmm[xi(r)])
            } else {
                Ok(u128::from(c.reg(r)))
            }
        }
        OpKind::Memory => {
            let (lin, size) = mem_addr(c, op)?;
            c.read_n(lin, size)
        }
        _ => Err(fault(Exception::UD)),
    }
}

/// Writes operand `n`: a whole XMM register, a GPR (32-bit writes
/// zero-extend), or memory of the instruction's memory size.
#[inline(always)]
fn set_dst(c: &mut Core, op: &Op, n: u32, v: u128) -> R {
    match op.instr.op_kind(n) {
        OpKind::Register => {
            let r = op.instr.op_register(n);
            if r.is_xmm() {
                c.cpu.fpu.xmm[xi(r)] = v;
            } else {
                c.set_reg(r, v as u64);
            }
            Ok(())
        }
        OpKind::Memory => {
            let (lin, size) = mem_addr(c, op)?;
            c.write_n(lin, size, v)
        }
        _ => Err(fault(Exception::UD)),
    }
}

// ---- lane helpers -------------------------------------------------------------

macro_rules! lanes {
    ($name:ident, $t:ty, $n:expr) => {
        #[inline(always)]
        fn $name(a: u128, b: u128, f: impl Fn($t, $t) -> $t) -> u128 {
            const W: usize = 128 / $n;
            let mut r = 0u128;
            for k in 0..$n {
                let x = (a >> (k * W)) as $t;
                let y = (b >> (k * W)) as $t;
                let z = f(x, y) as u128 & ((1u128 << W) - 1);
                r |= z << (k * W);
            }
            r
        }
    };
}
lanes!(l8, u8, 16);
lanes!(l16, u16, 8);
lanes!(l32, u32, 4);

#[inline(always)]
fn l64(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    u128::from(f(a as u64, b as u64)) | (u128::from(f((a >> 64) as u64, (b >> 64) as u64)) << 64)
}

#[inline(always)]
pub(super) fn lane(v: u128, k: usize, w: usize) -> u128 {
    (v >> (k * w)) & ((1u128 << w) - 1)
}

pub(super) fn mask_eq(c: bool) -> u64 {
    if c {
        u64::MAX
    } else {
        0
    }
}

pub(super) fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
pub(super) fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
pub(super) fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}
pub(super) fn sat_u16(v: i32) -> u16 {
    v.clamp(0, 65535) as u16
}

fn unpack(a: u128, b: u128, w: usize, high: bool) -> u128 {
    let n = 64 / w;
    let base = if high { n } else { 0 };
    let mut r = 0u128;
    for k in 0..n {
        r |= lane(a, base + k, w) << (2 * k * w);
        r |= lane(b, base + k, w) << ((2 * k + 1) * w);
    }
    r
}

fn pack<const W: usize>(a: u128, b: u128, sat: fn(i32) -> u32) -> u128 {
    // W = width of the source lanes (16 or 32); results are W/2 wide.
    let n = 128 / W;
    let mut r = 0u128;
    for k in 0..2 * n {
        let (v, j) = if k < n { (a, k) } else { (b, k - n) };
        let raw = lane(v, j, W) as u64;
        let s = if W == 16 {
            i32::from(raw as u16 as i16)
        } else {
            raw as u32 as i32
        };
        r |= u128::from(sat(s)) << (k * W / 2);
    }
    r
}

fn shift_count(b: u128) -> u64 {
    b as u64
}

pub(super) fn psll(a: u128, cnt: u64, w: u32) -> u128 {
    if cnt >= u64::from(w) {
        return 0;
    }
    let c = cnt as u32;
    match w {
        16 => l16(a, 0, |x, _| x << c),
        32 => l32(a, 0, |x, _| x << c),
        _ => l64(a, 0, |x, _| x << c),
    }
}

pub(super) fn psrl(a: u128, cnt: u64, w: u32) -> u128 {
    if cnt >= u64::from(w) {
        return 0;
    }
    let c = cnt as u32;
    match w {
        16 => l16(a, 0, |x, _| x >> c),
        32 => l32(a, 0, |x, _| x >> c),
        _ => l64(a, 0, |x, _| x >> c),
    }
}

pub(super) fn psra(a: u128, cnt: u64, w: u32) -> u128 {
    let c = cnt.min(u64::from(w) - 1) as u32;
    match w {
        16 => l16(a, 0, |x, _| ((x as i16) >> c) as u16),
        _ => l32(a, 0, |x, _| ((x as i32) >> c) as u32),
    }
}

// ---- integer handlers ------------------------------------------------------------

/// `dst = f(dst, src, imm8)` on XMM registers.
#[inline(always)]
fn binop(c: &mut Core, op: &Op, f: impl Fn(u128, u128, u8) -> u128) -> R {
    sse_check(c)?;
    let b = src(c, op, 1)?;
    let a = xmm(c, op, 0);
    let imm = if op.instr.op_count() > 2 {
        op.instr.immediate8()
    } else {
        0
    };
    set_xmm(c, op, 0, f(a, b, imm));
    Ok(())
}

/// A packed operation on 128 bits: `f(dst, src, imm8)`.
pub(super) type LaneOp = fn(u128, u128, u8) -> u128;

macro_rules! int_ops {
    ($($name:ident => $f:expr;)*) => {
        /// The packed operations as values: the MMX forms (`super::mmx`)
        /// run the lane-local ones on 64-bit operands.
        #[allow(non_upper_case_globals)]
        pub(super) mod lane_ops {
            use super::*;
            $(pub(in crate::exec) const $name: LaneOp = $f;)*
        }
        $(
            fn $name(c: &mut Core, op: &Op) -> R {
                binop(c, op, lane_ops::$name)
            }
        )*
    };
}

int_ops! {
    pxor => |a, b, _| a ^ b;
    por => |a, b, _| a | b;
    pand => |a, b, _| a & b;
    pandn => |a, b, _| !a & b;
    pcmpeqb => |a, b, _| l8(a, b, |x, y| mask_eq(x == y) as u8);
    pcmpeqw => |a, b, _| l16(a, b, |x, y| mask_eq(x == y) as u16);
    pcmpeqd => |a, b, _| l32(a, b, |x, y| mask_eq(x == y) as u32);
    pcmpgtb => |a, b, _| l8(a, b, |x, y| mask_eq(x as i8 > y as i8) as u8);
    pcmpgtw => |a, b, _| l16(a, b, |x, y| mask_eq(x as i16 > y as i16) as u16);
    pcmpgtd => |a, b, _| l32(a, b, |x, y| mask_eq(x as i32 > y as i32) as u32);
    pminub => |a, b, _| l8(a, b, |x, y| x.min(y));
    pmaxub => |a, b, _| l8(a, b, |x, y| x.max(y));
    pminsw => |a, b, _| l16(a, b, |x, y| (x as i16).min(y as i16) as u16);
    pmaxsw => |a, b, _| l16(a, b, |x, y| (x as i16).max(y as i16) as u16);
    paddb => |a, b, _| l8(a, b, u8::wrapping_add);
    paddw => |a, b, _| l16(a, b, u16::wrapping_add);
    paddd => |a, b, _| l32(a, b, u32::wrapping_add);
    paddq => |a, b, _| l64(a, b, u64::wrapping_add);
    psubb => |a, b, _| l8(a, b, u8::wrapping_sub);
    psubw => |a, b, _| l16(a, b, u16::wrapping_sub);
    psubd => |a, b, _| l32(a, b, u32::wrapping_sub);
    psubq => |a, b, _| l64(a, b, u64::wrapping_sub);
    paddsb => |a, b, _| l8(a, b, |x, y| sat_i8(i32::from(x as i8) + i32::from(y as i8)));
    paddsw => |a, b, _| l16(a, b, |x, y| sat_i16(i32::from(x as i16) + i32::from(y as i16)));
    psubsb => |a, b, _| l8(a, b, |x, y| sat_i8(i32::from(x as i8) - i32::from(y as i8)));
    psubsw => |a, b, _| l16(a, b, |x, y| sat_i16(i32::from(x as i16) - i32::from(y as i16)));
    paddusb => |a, b, _| l8(a, b, |x, y| sat_u8(i32::from(x) + i32::from(y)));
    paddusw => |a, b, _| l16(a, b, |x, y| sat_u16(i32::from(x) + i32::from(y)));
    psubusb => |a, b, _| l8(a, b, |x, y| sat_u8(i32::from(x) - i32::from(y)));
    psubusw => |a, b, _| l16(a, b, |x, y| sat_u16(i32::from(x) - i32::from(y)));
    pavgb => |a, b, _| l8(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8);
    pavgw => |a, b, _| l16(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16);
    pmullw => |a, b, _| l16(a, b, u16::wrapping_mul);
    pmulhw => |a, b, _| l16(a, b, |x, y| ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16);
    pmulhuw => |a, b, _| l16(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16);
    pmuludq => |a, b, _| l64(a, b, |x, y| u64::from(x as u32) * u64::from(y as u32));
    pmaddwd => |a, b, _| l32(a, b, |x, y| {
        let p0 = i32::from(x as u16 as i16) * i32::from(y as u16 as i16);
        let p1 = i32::from((x >> 16) as u16 as i16) * i32::from((y >> 16) as u16 as i16);
        p0.wrapping_add(p1) as u32
    });
    psadbw => |a, b, _| l64(a, b, |x, y| {
        (0..8).map(|k| u64::from(((x >> (8 * k)) as u8).abs_diff((y >> (8 * k)) as u8))).sum()
    });
    psllw => |a, b, _| psll(a, shift_count(b), 16);
    pslld => |a, b, _| psll(a, shift_count(b), 32);
    psllq => |a, b, _| psll(a, shift_count(b), 64);
    psrlw => |a, b, _| psrl(a, shift_count(b), 16);
    psrld => |a, b, _| psrl(a, shift_count(b), 32);
    psrlq => |a, b, _| psrl(a, shift_count(b), 64);
    psraw => |a, b, _| psra(a, shift_count(b), 16);
    psrad => |a, b, _| psra(a, shift_count(b), 32);
    punpcklbw => |a, b, _| unpack(a, b, 8, false);
    punpcklwd => |a, b, _| unpack(a, b, 16, false);
    punpckldq => |a, b, _| unpack(a, b, 32, false);
    punpcklqdq => |a, b, _| unpack(a, b, 64, false);
    punpckhbw => |a, b, _| unpack(a, b, 8, true);
    punpckhwd => |a, b, _| unpack(a, b, 16, true);
    punpckhdq => |a, b, _| unpack(a, b, 32, true);
    punpckhqdq => |a, b, _| unpack(a, b, 64, true);
    packsswb => |a, b, _| pack::<16>(a, b, |v| u32::from(sat_i8(v)));
    packssdw => |a, b, _| pack::<32>(a, b, |v| u32::from(sat_i16(v)));
    packuswb => |a, b, _| pack::<16>(a, b, |v| u32::from(sat_u8(v)));
    pshufd => |_, b, i| {
        (0..4).fold(0, |r, k| r | (lane(b, usize::from((i >> (2 * k)) & 3), 32) << (32 * k)))
    };
    pshuflw => |_, b, i| {
        (0..4).fold(b & !0xffff_ffff_ffff_ffffu128, |r, k| {
            r | (lane(b, usize::from((i >> (2 * k)) & 3), 16) << (16 * k))
        })
    };
    pshufhw => |_, b, i| {
        (0..4).fold(b & 0xffff_ffff_ffff_ffffu128, |r, k| {
            r | (lane(b, 4 + usize::from((i >> (2 * k)) & 3), 16) << (64 + 16 * k))
        })
    };
    shufps => |a, b, i| {
        lane(a, usize::from(i & 3), 32)
            | (lane(a, usize::from((i >> 2) & 3), 32) << 32)
            | (lane(b, usize::from((i >> 4) & 3), 32) << 64)
            | (lane(b, usize::from((i >> 6) & 3), 32) << 96)
    };
    shufpd => |a, b, i| {
        lane(a, usize::from(i & 1), 64) | (lane(b, usize::from((i >> 1) & 1), 64) << 64)
    };
    unpcklps => |a, b, _| unpack(a, b, 32, false);
    unpckhps => |a, b, _| unpack(a, b, 32, true);
    unpcklpd => |a, b, _| unpack(a, b, 64, false);
    unpckhpd => |a, b, _| unpack(a, b, 64, true);
    // Register-only forms: dst = src (op 1) combined with dst.
    movhlps => |a, b, _| (a & !0xffff_ffff_ffff_ffffu128) | (b >> 64);
    movlhps => |a, b, _| (a & 0xffff_ffff_ffff_ffffu128) | (b << 64);
}

/// Shifts by an immediate (the 0F 71/72/73 groups): op 0 is the XMM
/// register, op 1 the count.
fn shift_imm(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let a = xmm(c, op, 0);
    let n = u64::from(op.instr.immediate8());
    let r = match op.instr.mnemonic() {
        Mnemonic::Psllw => psll(a, n, 16),
        Mnemonic::Pslld => psll(a, n, 32),
        Mnemonic::Psllq => psll(a, n, 64),
        Mnemonic::Psrlw => psrl(a, n, 16),
        Mnemonic::Psrld => psrl(a, n, 32),
        Mnemonic::Psrlq => psrl(a, n, 64),
        Mnemonic::Psraw => psra(a, n, 16),
        Mnemonic::Psrad => psra(a, n, 32),
        Mnemonic::Pslldq => {
            if n > 15 {
                0
            } else {
                a << (8 * n)
            }
        }
        Mnemonic::Psrldq => {
            if n > 15 {
                0
            } else {
                a >> (8 * n)
            }
        }
        _ => return Err(fault(Exception::UD)),
    };
    set_xmm(c, op, 0, r);
    Ok(())
}

// ---- moves ----------------------------------------------------------------------

/// MOVAPS/MOVUPS/MOVAPD/MOVUPD/MOVDQA/MOVDQU/MOVNTxx: a whole 128 bits.
fn mov128(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let v = src(c, op, 1)?;
    set_dst(c, op, 0, v)
}

/// MOVD/MOVQ in all their SSE forms: the low 4 or 8 bytes of the source;
/// an XMM destination is zero-extended.
fn movdq(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let size = if op.instr.mnemonic() == Mnemonic::Movd {
        4
    } else {
        8
    };
    let m = if size == 4 {
        0xffff_ffffu128
    } else {
        0xffff_ffff_ffff_ffffu128
    };
    let v = src(c, op, 1)? & m;
    set_dst(c, op, 0, v)
}

/// MOVSS/MOVSD: loads zero-extend; register moves and stores touch only
/// the low element.
fn movs_scalar(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let m: u128 = if op.instr.mnemonic() == Mnemonic::Movss {
        0xffff_ffff
    } else {
        0xffff_ffff_ffff_ffff
    };
    let v = src(c, op, 1)? & m;
    match (op.instr.op_kind(0), op.instr.op_kind(1)) {
        (OpKind::Register, OpKind::Register) => {
            let a = xmm(c, op, 0);
            set_xmm(c, op, 0, (a & !m) | v);
            Ok(())
        }
        _ => set_dst(c, op, 0, v),
    }
}

/// MOVLPS/MOVLPD/MOVHPS/MOVHPD with a memory operand.
fn mov_half(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    const LO: u128 = 0xffff_ffff_ffff_ffff;
    let high = matches!(op.instr.mnemonic(), Mnemonic::Movhps | Mnemonic::Movhpd);
    if op.instr.op_kind(0) == OpKind::Memory {
        let v = xmm(c, op, 1);
        let v = if high { v >> 64 } else { v & LO };
        set_dst(c, op, 0, v)
    } else {
        let m = src(c, op, 1)?;
        let a = xmm(c, op, 0);
        let r = if high {
            (a & LO) | (m << 64)
        } else {
            (a & !LO) | m
        };
        set_xmm(c, op, 0, r);
        Ok(())
    }
}

/// PMOVMSKB/MOVMSKPS/MOVMSKPD: sign bits into a GPR.
fn movmsk(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let v = xmm(c, op, 1);
    let w = match op.instr.mnemonic() {
        Mnemonic::Pmovmskb => 8,
        Mnemonic::Movmskps => 32,
        _ => 64,
    };
    let mut r = 0u64;
    for k in 0..128 / w {
        r |= (((v >> (k * w + w - 1)) & 1) as u64) << k;
    }
    c.set_reg(op.instr.op0_register(), r);
    Ok(())
}

fn pinsrw(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let v = src(c, op, 1)? & 0xffff;
    let k = u32::from(op.instr.immediate8() & 7) * 16;
    let a = xmm(c, op, 0);
    set_xmm(c, op, 0, (a & !(0xffffu128 << k)) | (v << k));
    Ok(())
}

fn pextrw(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let v = xmm(c, op, 1);
    let k = u32::from(op.instr.immediate8() & 7) * 16;
    c.set_reg(op.instr.op0_register(), ((v >> k) & 0xffff) as u64);
    Ok(())
}

/// MASKMOVDQU: byte-masked store to DS:rDI (segment overridable).
fn maskmovdqu(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let data = xmm(c, op, 1);
    let m = xmm(c, op, 2);
    let amask = super::flags::mask(op.asize as usize);
    let off = c.cpu.gpr[7] & amask;
    let lin = c.linear(op, op.instr.memory_segment(), off);
    if m & 0x8080_8080_8080_8080_8080_8080_8080_8080 == 0 {
        return Ok(());
    }
    // Check both ends first so a fault stores nothing.
    c.translate(lin, Access::Write)?;
    c.translate(lin.wrapping_add(15), Access::Write)?;
    for k in 0..16 {
        if (m >> (8 * k + 7)) & 1 != 0 {
            c.write(lin.wrapping_add(k), 1, (data >> (8 * k)) as u64)?;
        }
    }
    Ok(())
}

fn ldmxcsr(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let lin = c.mem_linear(op);
    let v = c.read(lin, 4)? as u32;
    if v & !crate::state::Fpu::MXCSR_MASK != 0 {
        return Err(gp0());
    }
    c.cpu.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(c: &mut Core, op: &Op) -> R {
    sse_check(c)?;
    let lin = c.mem_linear(op);
    c.write(lin, 4, u64::from(c.cpu.fpu.mxcsr))
}

/// CLFLUSH: the address must be accessible (faults as a byte read);
/// caches are not modelled.
fn clflush(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    c.translate(lin, Access::Read)?;
    Ok(())
}

fn nop(_: &mut Core, _: &Op) -> R {
    Ok(())
}

// ---- floating point ----------------------------------------------------------------

/// Merges the flags a host operation raised into MXCSR; raises #XM (#UD
/// without CR4.OSXMMEXCPT) if one of them is unmasked.
#[inline(always)]
pub(crate) fn mxcsr_flags(c: &mut Core, flags: u32) -> R {
    let mx = c.cpu.fpu.mxcsr;
    let unmasked = flags & !(mx >> 7) & 0x3f;
    if unmasked != 0 {
        // Invalid, denormal and divide-by-zero are detected before the
        // computation and suppress the others.
        let pre = flags & 0x7;
        c.cpu.fpu.mxcsr |= if unmasked & 0x7 != 0 { pre } else { flags };
        return Err(if c.cpu.cr4 & CR4_OSXMMEXCPT != 0 {
            fault(Exception::XM)
        } else {
            fault(Exception::UD)
        });
    }
    c.cpu.fpu.mxcsr |= flags;
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod float {
    use super::*;
    use crate::exec::hostfp as h;

    type F2 = fn(u128, u128, u32) -> (u128, u32);

    #[inline(always)]
    fn fbin(c: &mut Core, op: &Op, f: F2) -> R {
        sse_check(c)?;
        let b = src(c, op, 1)?;
        let a = xmm(c, op, 0);
        let (r, fl) = f(a, b, c.cpu.fpu.mxcsr);
        mxcsr_flags(c, fl)?;
        set_xmm(c, op, 0, r);
        Ok(())
    }

    macro_rules! float_ops {
        ($($name:ident),*) => {$(
            pub(super) fn $name(c: &mut Core, op: &Op) -> R {
                fbin(c, op, h::$name)
            }
        )*};
    }

    float_ops!(
        addps, addpd, addss, addsd, subps, subpd, subss, subsd, mulps, mulpd, mulss, mulsd, divps,
        divpd, divss, divsd, minps, minpd, minss, minsd, maxps, maxpd, maxss, maxsd, sqrtps,
        sqrtpd, sqrtss, sqrtsd, rcpps, rcpss, rsqrtps, rsqrtss, cvtss2sd, cvtsd2ss, cvtps2pd,
        cvtpd2ps, cvtdq2ps, cvtps2dq, cvttps2dq, cvtdq2pd, cvtpd2dq, cvttpd2dq
    );

    fn cmp<const P: u8>(c: &mut Core, op: &Op) -> R {
        let f: F2 = match op.instr.mnemonic() {
            Mnemonic::Cmpps => h::cmpps::<P>,
            Mnemonic::Cmppd => h::cmppd::<P>,
            Mnemonic::Cmpss => h::cmpss::<P>,
            _ => h::cmpsd::<P>,
        };
        fbin(c, op, f)
    }

    pub(super) fn cmp_handler(imm: u8) -> Handler {
        match imm & 7 {
            0 => cmp::<0>,
            1 => cmp::<1>,
            2 => cmp::<2>,
            3 => cmp::<3>,
            4 => cmp::<4>,
            5 => cmp::<5>,
            6 => cmp::<6>,
            _ => cmp::<7>,
        }
    }

    pub(super) fn comi(c: &mut Core, op: &Op) -> R {
        sse_check(c)?;
        let b = src(c, op, 1)?;
        let a = xmm(c, op, 0);
        let mx = c.cpu.fpu.mxcsr;
        let (f, fl) = match op.instr.mnemonic() {
            Mnemonic::Comiss => h::comiss(a, b, mx),
            Mnemonic::Ucomiss => h::ucomiss(a, b, mx),
            Mnemonic::Comisd => h::comisd(a, b, mx),
            _ => h::ucomisd(a, b, mx),
        };
        mxcsr_flags(c, fl)?;
        c.set_status(crate::state::rflags::STATUS, f);
        Ok(())
    }

    /// CVT(T)SS2SI / CVT(T)SD2SI.
    pub(super) fn cvt_to_int(c: &mut Core, op: &Op) -> R {
        sse_check(c)?;
        let b = src(c, op, 1)?;
        let wide = op.instr.op0_register().size() == 8;
        let mx = c.cpu.fpu.mxcsr;
        let (v, fl) = match (op.instr.mnemonic(), wide) {
            (Mnemonic::Cvtss2si, false) => h::cvtss2si32(b, mx),
            (Mnemonic::Cvtss2si, true) => h::cvtss2si64(b, mx),
            (Mnemonic::Cvttss2si, false) => h::cvttss2si32(b, mx),
            (Mnemonic::Cvttss2si, true) => h::cvttss2si64(b, mx),
            (Mnemonic::Cvtsd2si, false) => h::cvtsd2si32(b, mx),
            (Mnemonic::Cvtsd2si, true) => h::cvtsd2si64(b, mx),
            (Mnemonic::Cvttsd2si, false) => h::cvttsd2si32(b, mx),
            _ => h::cvttsd2si64(b, mx),
        };
        mxcsr_flags(c, fl)?;
        c.set_reg(op.instr.op0_register(), v);
        Ok(())
    }

    /// CVTSI2SS / CVTSI2SD from a 32- or 64-bit GPR or memory.
    pub(super) fn cvt_from_int(c: &mut Core, op: &Op) -> R {
        sse_check(c)?;
        let wide = match op.instr.op_kind(1) {
            OpKind::Register => op.instr.op1_register().size() == 8,
            _ => op.instr.memory_size().size() == 8,
        };
        let g = src(c, op, 1)? as u64;
        let a = xmm(c, op, 0);
        let mx = c.cpu.fpu.mxcsr;
        let (r, fl) = match (op.instr.mnemonic(), wide) {
            (Mnemonic::Cvtsi2ss, false) => h::cvtsi2ss32(a, g, mx),
            (Mnemonic::Cvtsi2ss, true) => h::cvtsi2ss64(a, g, mx),
            (_, false) => h::cvtsi2sd32(a, g, mx),
            _ => h::cvtsi2sd64(a, g, mx),
        };
        mxcsr_flags(c, fl)?;
        set_xmm(c, op, 0, r);
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
fn float_handler(i: &Instruction) -> Option<Handler> {
    use float as f;
    use Mnemonic as M;
    Some(match i.mnemonic() {
        M::Addps => f::addps,
        M::Addpd => f::addpd,
        M::Addss => f::addss,
        M::Addsd => f::addsd,
        M::Subps => f::subps,
        M::Subpd => f::subpd,
        M::Subss => f::subss,
        M::Subsd => f::subsd,
        M::Mulps => f::mulps,
        M::Mulpd => f::mulpd,
        M::Mulss => f::mulss,
        M::Mulsd => f::mulsd,
        M::Divps => f::divps,
        M::Divpd => f::divpd,
        M::Divss => f::divss,
        M::Divsd => f::divsd,
        M::Minps => f::minps,
        M::Minpd => f::minpd,
        M::Minss => f::minss,
        M::Minsd => f::minsd,
        M::Maxps => f::maxps,
        M::Maxpd => f::maxpd,
        M::Maxss => f::maxss,
        M::Maxsd => f::maxsd,
        M::Sqrtps => f::sqrtps,
        M::Sqrtpd => f::sqrtpd,
        M::Sqrtss => f::sqrtss,
        M::Sqrtsd => f::sqrtsd,
        M::Rcpps => f::rcpps,
        M::Rcpss => f::rcpss,
        M::Rsqrtps => f::rsqrtps,
        M::Rsqrtss => f::rsqrtss,
        M::Cvtss2sd => f::cvtss2sd,
        M::Cvtsd2ss => f::cvtsd2ss,
        M::Cvtps2pd => f::cvtps2pd,
        M::Cvtpd2ps => f::cvtpd2ps,
        M::Cvtdq2ps => f::cvtdq2ps,
        M::Cvtps2dq => f::cvtps2dq,
        M::Cvttps2dq => f::cvttps2dq,
        M::Cvtdq2pd => f::cvtdq2pd,
        M::Cvtpd2dq => f::cvtpd2dq,
        M::Cvttpd2dq => f::cvttpd2dq,
        M::Cmpps | M::Cmppd | M::Cmpss | M::Cmpsd => f::cmp_handler(i.immediate8()),
        M::Comiss | M::Ucomiss | M::Comisd | M::Ucomisd => f::comi,
        M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si => f::cvt_to_int,
        M::Cvtsi2ss | M::Cvtsi2sd => f::cvt_from_int,
        _ => return None,
    })
}

/// Whether `i` is an SSE or SSE2 floating-point instruction (computed by
/// the host's FPU under the guest's MXCSR).
pub(crate) fn is_float(i: &Instruction) -> bool {
    float_handler(i).is_some()
}

/// Without an x86-64 host there is no host FPU to compute with yet.
#[cfg(not(target_arch = "x86_64"))]
fn float_handler(_: &Instruction) -> Option<Handler> {
    None
}

/// The handler for an SSE/SSE2 (or fence/prefetch) instruction, `None`
/// if `i` is not one.
pub(crate) fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic as M;
    if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm())
        || matches!(i.mnemonic(), M::Emms | M::Movntq)
    {
        return super::mmx::handler(i);
    }
    let h: Handler = match i.mnemonic() {
        M::Movaps
        | M::Movups
        | M::Movapd
        | M::Movupd
        | M::Movdqa
        | M::Movdqu
        | M::Movntdq
        | M::Movntps
        | M::Movntpd => mov128,
        M::Movd | M::Movq => movdq,
        M::Movss => movs_scalar,
        M::Movsd if i.code() != Code::Movsd_m32_m32 => movs_scalar,
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => mov_half,
        M::Movhlps => movhlps,
        M::Movlhps => movlhps,
        M::Pmovmskb | M::Movmskps | M::Movmskpd => movmsk,
        M::Maskmovdqu => maskmovdqu,
        M::Pxor | M::Xorps | M::Xorpd => pxor,
        M::Por | M::Orps | M::Orpd => por,
        M::Pand | M::Andps | M::Andpd => pand,
        M::Pandn | M::Andnps | M::Andnpd => pandn,
        M::Pcmpeqb => pcmpeqb,
        M::Pcmpeqw => pcmpeqw,
        M::Pcmpeqd => pcmpeqd,
        M::Pcmpgtb => pcmpgtb,
        M::Pcmpgtw => pcmpgtw,
        M::Pcmpgtd => pcmpgtd,
        M::Pminub => pminub,
        M::Pmaxub => pmaxub,
        M::Pminsw => pminsw,
        M::Pmaxsw => pmaxsw,
        M::Paddb => paddb,
        M::Paddw => paddw,
        M::Paddd => paddd,
        M::Paddq => paddq,
        M::Psubb => psubb,
        M::Psubw => psubw,
        M::Psubd => psubd,
        M::Psubq => psubq,
        M::Paddsb => paddsb,
        M::Paddsw => paddsw,
        M::Psubsb => psubsb,
        M::Psubsw => psubsw,
        M::Paddusb => paddusb,
        M::Paddusw => paddusw,
        M::Psubusb => psubusb,
        M::Psubusw => psubusw,
        M::Pavgb => pavgb,
        M::Pavgw => pavgw,
        M::Pmullw => pmullw,
        M::Pmulhw => pmulhw,
        M::Pmulhuw => pmulhuw,
        M::Pmuludq => pmuludq,
        M::Pmaddwd => pmaddwd,
        M::Psadbw => psadbw,
        M::Psllw
        | M::Pslld
        | M::Psllq
        | M::Psrlw
        | M::Psrld
        | M::Psrlq
        | M::Psraw
        | M::Psrad
        | M::Pslldq
        | M::Psrldq
            if i.op_count() == 2 && i.op_kind(1) == OpKind::Immediate8 =>
        {
            shift_imm
        }
        M::Psllw => psllw,
        M::Pslld => pslld,
        M::Psllq => psllq,
        M::Psrlw => psrlw,
        M::Psrld => psrld,
        M::Psrlq => psrlq,
        M::Psraw => psraw,
        M::Psrad => psrad,
        M::Pshufd => pshufd,
        M::Pshuflw => pshuflw,
        M::Pshufhw => pshufhw,
        M::Punpcklbw => punpcklbw,
        M::Punpcklwd => punpcklwd,
        M::Punpckldq => punpckldq,
        M::Punpcklqdq => punpcklqdq,
        M::Punpckhbw => punpckhbw,
        M::Punpckhwd => punpckhwd,
        M::Punpckhdq => punpckhdq,
        M::Punpckhqdq => punpckhqdq,
        M::Packsswb => packsswb,
        M::Packssdw => packssdw,
        M::Packuswb => packuswb,
        M::Pinsrw => pinsrw,
        M::Pextrw
            if matches!(
                i.code(),
                Code::Pextrw_r32_xmm_imm8 | Code::Pextrw_r64_xmm_imm8
            ) =>
        {
            pextrw
        }
        M::Shufps => shufps,
        M::Shufpd => shufpd,
        M::Unpcklps => unpcklps,
        M::Unpckhps => unpckhps,
        M::Unpcklpd => unpcklpd,
        M::Unpckhpd => unpckhpd,
        M::Ldmxcsr => ldmxcsr,
        M::Stmxcsr => stmxcsr,
        M::Clflush => clflush,
        M::Prefetchnta | M::Prefetcht0 | M::Prefetcht1 | M::Prefetcht2 => nop,
        _ => return float_handler(i),
    };
    Some(h)
}
