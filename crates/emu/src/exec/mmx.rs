//! MMX: the 64-bit packed-integer instructions on MM0-MM7, with the SSE
//! additions that use MMX registers (PSHUFW, PINSRW, PEXTRW, PMOVMSKB,
//! MASKMOVQ, MOVNTQ, the SSE2 64-bit forms) and the MM/XMM moves and
//! conversions.
//!
//! MMi is the significand of x87 physical register i: writing it sets that
//! register's sign and exponent to all ones. Every MMX instruction but
//! EMMS puts the x87 unit in MMX state (TOP = 0, every register valid);
//! EMMS marks them all empty. Availability follows the SDM: #UD with
//! CR0.EM, #NM with CR0.TS, #MF with an unmasked x87 exception pending.
//!
//! The lane-local operations are SSE's own (`sse::lane_ops`) on 64-bit
//! values; packs, high unpacks, shuffles and word inserts/extracts, whose
//! lanes depend on the register width, have 64-bit definitions here.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::sse::{lane_ops as ops, LaneOp};
use super::{fault, Core, Exception, OpResult, Stop};
use crate::block::{Handler, Op};
use crate::state::bits::{CR0_EM, CR0_TS};
use crate::state::F80;

type R = OpResult;

const LOW64: u128 = 0xffff_ffff_ffff_ffff;

/// #UD/#NM/#MF: the checks of an instruction touching MMX state.
#[inline(always)]
fn check(c: &Core) -> R {
    if c.cpu.cr0 & CR0_EM != 0 {
        return Err(fault(Exception::UD));
    }
    if c.cpu.cr0 & CR0_TS != 0 {
        return Err(fault(Exception::NM));
    }
    if c.cpu.fpu.fsw & 0x80 != 0 {
        return Err(fault(Exception::MF));
    }
    Ok(())
}

/// The x87 unit in MMX state: TOP = 0, every register valid.
#[inline(always)]
fn enter(c: &mut Core) {
    c.cpu.fpu.fsw &= !0x3800;
    c.cpu.fpu.ftw = 0xff;
}

fn mm_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::MM0 as usize) & 7
}

fn get_mm(c: &Core, r: Register) -> u64 {
    c.cpu.fpu.regs[mm_index(r)].mant
}

fn set_mm(c: &mut Core, r: Register, v: u64) {
    c.cpu.fpu.regs[mm_index(r)] = F80 {
        mant: v,
        se: 0xffff,
    };
}

/// Operand `n` as 64 bits: an MM register, the low half of an XMM
/// register, a GPR, or memory of the instruction's memory size.
fn src(c: &mut Core, op: &Op, n: u32) -> Result<u64, Stop> {
    match op.instr.op_kind(n) {
        OpKind::Register => {
            let r = op.instr.op_register(n);
            Ok(if r.is_mm() {
                get_mm(c, r)
            } else if r.is_xmm() {
                c.cpu.fpu.xmm[(r as usize - Register::XMM0 as usize) & 15] as u64
            } else {
                c.reg(r)
            })
        }
        OpKind::Memory => {
            let lin = c.mem_linear(op);
            let size = op.instr.memory_size().size().min(8);
            c.read(lin, size)
        }
        OpKind::Immediate8 => Ok(u64::from(op.instr.immediate8())),
        _ => Err(fault(Exception::UD)),
    }
}

/// `dst = f(dst, src)` on MM registers, with a lane operation of SSE's.
#[inline(always)]
fn binop(c: &mut Core, op: &Op, f: impl Fn(u64, u64, u8) -> u64) -> R {
    check(c)?;
    let b = src(c, op, 1)?;
    let dst = op.instr.op0_register();
    let a = get_mm(c, dst);
    let imm = if op.instr.op_count() > 2 {
        op.instr.immediate8()
    } else {
        0
    };
    enter(c);
    set_mm(c, dst, f(a, b, imm));
    Ok(())
}

/// A lane-local SSE operation on 64-bit operands.
fn lanes(f: LaneOp) -> impl Fn(u64, u64, u8) -> u64 {
    move |a, b, imm| f(u128::from(a), u128::from(b), imm) as u64
}

macro_rules! mmx_ops {
    ($($name:ident),* $(,)?) => {$(
        fn $name(c: &mut Core, op: &Op) -> R {
            binop(c, op, lanes(ops::$name))
        }
    )*};
}

mmx_ops!(
    pxor, por, pand, pandn, pcmpeqb, pcmpeqw, pcmpeqd, pcmpgtb, pcmpgtw, pcmpgtd, pminub, pmaxub,
    pminsw, pmaxsw, paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq, paddsb, paddsw, psubsb,
    psubsw, paddusb, paddusw, psubusb, psubusw, pavgb, pavgw, pmullw, pmulhw, pmulhuw, pmuludq,
    pmaddwd, psadbw, psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad, punpcklbw, punpcklwd,
    punpckldq,
);

/// The high unpacks: the low unpack of the high halves.
fn unpack_high(f: LaneOp) -> impl Fn(u64, u64, u8) -> u64 {
    move |a, b, imm| f(u128::from(a >> 32), u128::from(b >> 32), imm) as u64
}

fn punpckhbw(c: &mut Core, op: &Op) -> R {
    binop(c, op, unpack_high(ops::punpcklbw))
}
fn punpckhwd(c: &mut Core, op: &Op) -> R {
    binop(c, op, unpack_high(ops::punpcklwd))
}
fn punpckhdq(c: &mut Core, op: &Op) -> R {
    binop(c, op, unpack_high(ops::punpckldq))
}

/// The packs: SSE's pack of the two operands side by side in one
/// register gives exactly the MMX result in its low half.
fn pack(f: LaneOp) -> impl Fn(u64, u64, u8) -> u64 {
    move |a, b, imm| f(u128::from(a) | (u128::from(b) << 64), 0, imm) as u64
}

fn packsswb(c: &mut Core, op: &Op) -> R {
    binop(c, op, pack(ops::packsswb))
}
fn packssdw(c: &mut Core, op: &Op) -> R {
    binop(c, op, pack(ops::packssdw))
}
fn packuswb(c: &mut Core, op: &Op) -> R {
    binop(c, op, pack(ops::packuswb))
}

fn pshufw(c: &mut Core, op: &Op) -> R {
    binop(c, op, |_, b, imm| {
        (0..4).fold(0, |r, k| {
            let from = u32::from((imm >> (2 * k)) & 3);
            r | (((b >> (16 * from)) & 0xffff) << (16 * k))
        })
    })
}

/// The shifts by an immediate (0F 71/72/73 groups).
fn shift_imm(c: &mut Core, op: &Op) -> R {
    let count = u64::from(op.instr.immediate8());
    let f = match op.instr.mnemonic() {
        Mnemonic::Psllw => |a: u128, n| super::sse::psll(a, n, 16),
        Mnemonic::Pslld => |a: u128, n| super::sse::psll(a, n, 32),
        Mnemonic::Psllq => |a: u128, n| super::sse::psll(a, n, 64),
        Mnemonic::Psrlw => |a: u128, n| super::sse::psrl(a, n, 16),
        Mnemonic::Psrld => |a: u128, n| super::sse::psrl(a, n, 32),
        Mnemonic::Psrlq => |a: u128, n| super::sse::psrl(a, n, 64),
        Mnemonic::Psraw => |a: u128, n| super::sse::psra(a, n, 16),
        Mnemonic::Psrad => |a: u128, n| super::sse::psra(a, n, 32),
        _ => return Err(fault(Exception::UD)),
    };
    check(c)?;
    let dst = op.instr.op0_register();
    let a = u128::from(get_mm(c, dst));
    enter(c);
    set_mm(c, dst, (f(a, count) & LOW64) as u64);
    Ok(())
}

/// MOVD/MOVQ with an MM register on either side, MOVNTQ, MOVDQ2Q and
/// MOVQ2DQ: the low 4 or 8 bytes; an MM or XMM destination is
/// zero-extended.
fn mov(c: &mut Core, op: &Op) -> R {
    check(c)?;
    let size = if op.instr.mnemonic() == Mnemonic::Movd {
        4
    } else {
        8
    };
    let v = src(c, op, 1)? & if size == 4 { 0xffff_ffff } else { u64::MAX };
    match op.instr.op_kind(0) {
        OpKind::Register => {
            let r = op.instr.op0_register();
            enter(c);
            if r.is_mm() {
                set_mm(c, r, v);
            } else if r.is_xmm() {
                c.cpu.fpu.xmm[(r as usize - Register::XMM0 as usize) & 15] = u128::from(v);
            } else if size == 4 {
                c.set_reg(r.full_register32(), v);
            } else {
                c.set_reg(r, v);
            }
            Ok(())
        }
        OpKind::Memory => {
            let lin = c.mem_linear(op);
            c.write(lin, size, v)?;
            enter(c);
            Ok(())
        }
        _ => Err(fault(Exception::UD)),
    }
}

/// PINSRW mm, r32/m16, imm8: word `imm & 3`.
fn pinsrw(c: &mut Core, op: &Op) -> R {
    binop(c, op, |a, b, imm| {
        let k = u32::from(imm & 3) * 16;
        (a & !(0xffff << k)) | ((b & 0xffff) << k)
    })
}

/// PEXTRW r32, mm, imm8: word `imm & 3`, zero-extended.
fn pextrw(c: &mut Core, op: &Op) -> R {
    check(c)?;
    let v = get_mm(c, op.instr.op1_register());
    let k = u32::from(op.instr.immediate8() & 3) * 16;
    enter(c);
    c.set_reg(op.instr.op0_register().full_register32(), (v >> k) & 0xffff);
    Ok(())
}

/// PMOVMSKB r32, mm: the top bit of each byte.
fn pmovmskb(c: &mut Core, op: &Op) -> R {
    check(c)?;
    let v = get_mm(c, op.instr.op1_register());
    let mask = (0..8).fold(0u64, |m, k| m | (((v >> (8 * k + 7)) & 1) << k));
    enter(c);
    c.set_reg(op.instr.op0_register().full_register32(), mask);
    Ok(())
}

/// MASKMOVQ mm1, mm2: the bytes of mm1 whose mask byte in mm2 has its top
/// bit set go to [rDI] (in DS, or the segment override). iced gives the
/// implicit memory operand as operand 0.
fn maskmovq(c: &mut Core, op: &Op) -> R {
    check(c)?;
    let data = get_mm(c, op.instr.op1_register());
    let mask = get_mm(c, op.instr.op2_register());
    let amask = super::flags::mask(op.asize as usize);
    let off = c.cpu.gpr[7] & amask;
    let lin = c.linear(op, op.instr.memory_segment(), off);
    if mask & 0x8080_8080_8080_8080 != 0 {
        // Both ends first, so that a fault stores nothing.
        c.translate(lin, crate::mem::Access::Write)?;
        c.translate(lin.wrapping_add(7), crate::mem::Access::Write)?;
        for k in 0..8u64 {
            if (mask >> (8 * k + 7)) & 1 != 0 {
                c.write(lin.wrapping_add(k), 1, (data >> (8 * k)) & 0xff)?;
            }
        }
    }
    enter(c);
    Ok(())
}

fn emms(c: &mut Core, _: &Op) -> R {
    check(c)?;
    c.cpu.fpu.ftw = 0;
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod convert {
    //! The MM/XMM conversions, computed by the host's SSE2 unit under the
    //! guest's MXCSR (two lanes of the packed forms; the others are zero
    //! and convert exactly, raising nothing).

    use super::*;
    use crate::exec::hostfp as h;
    use crate::exec::sse::{mxcsr_flags, sse_check};

    fn xmm_index(r: Register) -> usize {
        (r as usize).wrapping_sub(Register::XMM0 as usize) & 15
    }

    /// CVTPI2PS xmm, mm/m64 (the high half of xmm kept) and CVTPI2PD
    /// xmm, mm/m64.
    pub(super) fn from_mm(c: &mut Core, op: &Op) -> R {
        sse_check(c)?;
        let from_register = op.instr.op_kind(1) == OpKind::Register;
        if from_register {
            check(c)?;
        }
        let v = u128::from(src(c, op, 1)?);
        let x = xmm_index(op.instr.op0_register());
        let (r, flags) = if op.instr.mnemonic() == Mnemonic::Cvtpi2ps {
            let (r, flags) = h::cvtdq2ps(0, v, c.cpu.fpu.mxcsr);
            ((c.cpu.fpu.xmm[x] & !LOW64) | (r & LOW64), flags)
        } else {
            h::cvtdq2pd(0, v, c.cpu.fpu.mxcsr)
        };
        mxcsr_flags(c, flags)?;
        if from_register {
            enter(c);
        }
        c.cpu.fpu.xmm[x] = r;
        Ok(())
    }

    /// CVT(T)PS2PI mm, xmm/m64 and CVT(T)PD2PI mm, xmm/m128.
    pub(super) fn to_mm(c: &mut Core, op: &Op) -> R {
        sse_check(c)?;
        check(c)?;
        let v = match op.instr.op_kind(1) {
            OpKind::Register => c.cpu.fpu.xmm[xmm_index(op.instr.op1_register())],
            OpKind::Memory => {
                let lin = c.mem_linear(op);
                let size = op.instr.memory_size().size();
                if size == 16 && lin & 15 != 0 {
                    return Err(Stop::Fault(Exception::with_code(Exception::GP, 0)));
                }
                c.read_n(lin, size)?
            }
            _ => return Err(fault(Exception::UD)),
        };
        let m = c.cpu.fpu.mxcsr;
        let (r, flags) = match op.instr.mnemonic() {
            Mnemonic::Cvtps2pi => h::cvtps2dq(0, v & LOW64, m),
            Mnemonic::Cvttps2pi => h::cvttps2dq(0, v & LOW64, m),
            Mnemonic::Cvtpd2pi => h::cvtpd2dq(0, v, m),
            _ => h::cvttpd2dq(0, v, m),
        };
        mxcsr_flags(c, flags)?;
        enter(c);
        set_mm(c, op.instr.op0_register(), r as u64);
        Ok(())
    }
}

/// The handler for an instruction with an MMX register operand (or EMMS,
/// MOVNTQ), `None` when it is not one this vCPU implements (#UD then).
pub(crate) fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic as M;
    let h: Handler = match i.mnemonic() {
        M::Emms => emms,
        M::Movd | M::Movq | M::Movntq | M::Movdq2q | M::Movq2dq => mov,
        M::Pxor => pxor,
        M::Por => por,
        M::Pand => pand,
        M::Pandn => pandn,
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
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
            if i.op_kind(1) == OpKind::Immediate8 =>
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
        M::Punpcklbw => punpcklbw,
        M::Punpcklwd => punpcklwd,
        M::Punpckldq => punpckldq,
        M::Punpckhbw => punpckhbw,
        M::Punpckhwd => punpckhwd,
        M::Punpckhdq => punpckhdq,
        M::Packsswb => packsswb,
        M::Packssdw => packssdw,
        M::Packuswb => packuswb,
        M::Pshufw => pshufw,
        M::Pinsrw => pinsrw,
        M::Pextrw => pextrw,
        M::Pmovmskb => pmovmskb,
        M::Maskmovq => maskmovq,
        #[cfg(target_arch = "x86_64")]
        M::Cvtpi2ps | M::Cvtpi2pd => convert::from_mm,
        #[cfg(target_arch = "x86_64")]
        M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => convert::to_mm,
        // SSSE3 and later forms on MMX registers: not in the CPU model.
        _ => return None,
    };
    Some(h)
}
