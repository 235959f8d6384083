//! Specialized handlers for the most frequent instruction forms.
//!
//! The generic handlers in `ops` re-derive every operand's kind (register,
//! memory, immediate) and width from iced's `Instruction` on each
//! execution. For the forms that dominate kernel and user code (MOV, the
//! ALU group, LEA, MOVZX/MOVSX, INC/DEC, PUSH/POP of a register) this
//! module picks, once at decode time, a handler monomorphized on the
//! operation, the operand form and the size, with the register numbers
//! and the immediate pre-extracted into [`Op::regs`] and [`Op::imm`].
//! Everything else (LOCK, segment/control registers, high-byte registers,
//! other sizes) keeps its generic handler. Semantics are those of the
//! generic handlers: operands read first, memory written before
//! registers and flags, so faults and MMIO replays stay exact.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::flags::{add, logic, mask, sext, sub};
use super::{Core, OpResult};
use crate::block::{Handler, Op};
use crate::state::rflags::{CF, OF, STATUS};

type R = OpResult;

const ADD: u8 = 0;
const OR: u8 = 1;
const ADC: u8 = 2;
const SBB: u8 = 3;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;

/// Index (0..16) of a general-purpose register usable with the width
/// rules of [`wr`]: every GPR except AH, CH, DH and BH.
fn gpr_index(r: Register) -> Option<u8> {
    let n = r as usize;
    let i = match n {
        1..=4 => n - 1,
        9..=20 => n - 5,
        21..=36 => n - 21,
        37..=52 => n - 37,
        53..=68 => n - 53,
        _ => return None,
    };
    Some(i as u8)
}

#[inline(always)]
fn rd<const S: usize>(c: &Core, n: u8) -> u64 {
    c.cpu.gpr[usize::from(n & 15)] & mask(S)
}

/// Writes GPR `n` with the architectural width rules: 8/16-bit writes
/// merge, 32-bit writes zero-extend.
#[inline(always)]
fn wr<const S: usize>(c: &mut Core, n: u8, v: u64) {
    let g = &mut c.cpu.gpr[usize::from(n & 15)];
    *g = match S {
        8 => v,
        4 => v & 0xffff_ffff,
        _ => (*g & !mask(S)) | (v & mask(S)),
    };
}

#[inline(always)]
fn calc<const K: u8, const S: usize>(c: &Core, a: u64, b: u64) -> (u64, u64) {
    match K {
        ADD => add(a, b, 0, S),
        ADC => add(a, b, c.cpu.rflags & CF, S),
        SUB | CMP => sub(a, b, 0, S),
        SBB => sub(a, b, c.cpu.rflags & CF, S),
        AND | TEST => (a & b, logic(a & b, S)),
        OR => (a | b, logic(a | b, S)),
        _ => (a ^ b, logic(a ^ b, S)),
    }
}

#[inline(always)]
fn writes(k: u8) -> bool {
    k != CMP && k != TEST
}

fn alu_rr<const K: u8, const S: usize>(c: &mut Core, op: &Op) -> R {
    let (a, b) = (rd::<S>(c, op.regs[0]), rd::<S>(c, op.regs[1]));
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn alu_ri<const K: u8, const S: usize>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    let (res, f) = calc::<K, S>(c, a, op.imm);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn alu_rm<const K: u8, const S: usize>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    let lin = c.mem_linear(op);
    let b = c.read(lin, S)?;
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

/// `alu [m], r` (IMM = false) and `alu [m], imm` (IMM = true).
fn alu_m<const K: u8, const S: usize, const IMM: bool>(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    let a = c.read(lin, S)?;
    let b = if IMM { op.imm } else { rd::<S>(c, op.regs[1]) };
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        c.write(lin, S, res)?;
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn mov_rr<const S: usize>(c: &mut Core, op: &Op) -> R {
    let v = rd::<S>(c, op.regs[1]);
    wr::<S>(c, op.regs[0], v);
    Ok(())
}

fn mov_ri<const S: usize>(c: &mut Core, op: &Op) -> R {
    wr::<S>(c, op.regs[0], op.imm);
    Ok(())
}

fn mov_rm<const S: usize>(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    let v = c.read(lin, S)?;
    wr::<S>(c, op.regs[0], v);
    Ok(())
}

fn mov_mr<const S: usize>(c: &mut Core, op: &Op) -> R {
    let v = rd::<S>(c, op.regs[1]);
    let lin = c.mem_linear(op);
    c.write(lin, S, v)
}

fn mov_mi<const S: usize>(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    c.write(lin, S, op.imm)
}

fn lea<const S: usize>(c: &mut Core, op: &Op) -> R {
    let ea = c.ea(op);
    wr::<S>(c, op.regs[0], ea);
    Ok(())
}

/// MOVZX/MOVSX/MOVSXD from a register (`regs[1]`) of `SS` bytes.
fn movx_r<const S: usize, const SS: usize, const SIGNED: bool>(c: &mut Core, op: &Op) -> R {
    let v = rd::<SS>(c, op.regs[1]);
    wr::<S>(c, op.regs[0], if SIGNED { sext(v, SS) } else { v });
    Ok(())
}

/// MOVZX/MOVSX/MOVSXD from memory of `SS` bytes.
fn movx_m<const S: usize, const SS: usize, const SIGNED: bool>(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    let v = c.read(lin, SS)?;
    wr::<S>(c, op.regs[0], if SIGNED { sext(v, SS) } else { v });
    Ok(())
}

/// INC (DEC = false) / DEC of a register: CF is left alone.
fn incdec_r<const DEC: bool, const S: usize>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    let (res, f) = if DEC {
        sub(a, 1, 0, S)
    } else {
        add(a, 1, 0, S)
    };
    wr::<S>(c, op.regs[0], res);
    c.set_status(STATUS & !CF, f);
    Ok(())
}

fn push_r64(c: &mut Core, op: &Op) -> R {
    let v = rd::<8>(c, op.regs[0]);
    c.push(op, 8, v)
}

fn pop_r64(c: &mut Core, op: &Op) -> R {
    let (v, new_rsp) = c.peek_pop(op, 8, 0)?;
    // POP RSP loads the popped value, so RSP moves first.
    c.commit_pop(op, new_rsp);
    wr::<8>(c, op.regs[0], v);
    Ok(())
}

/// Picks `$f::<.., S>` for the operand size `$s` (1, 2, 4 or 8).
macro_rules! by_size {
    ($s:expr, $f:ident $(, $k:expr)?) => {
        match $s {
            1 => $f::<$($k,)? 1> as Handler,
            2 => $f::<$($k,)? 2> as Handler,
            4 => $f::<$($k,)? 4> as Handler,
            _ => $f::<$($k,)? 8> as Handler,
        }
    };
}

fn alu_kind(m: Mnemonic) -> Option<u8> {
    use Mnemonic as M;
    Some(match m {
        M::Add => ADD,
        M::Or => OR,
        M::Adc => ADC,
        M::Sbb => SBB,
        M::And => AND,
        M::Sub => SUB,
        M::Xor => XOR,
        M::Cmp => CMP,
        M::Test => TEST,
        _ => return None,
    })
}

fn alu_handler<const K: u8>(form: Form, s: usize) -> Handler {
    match form {
        Form::RR => by_size!(s, alu_rr, K),
        Form::RI => by_size!(s, alu_ri, K),
        Form::RM => by_size!(s, alu_rm, K),
        Form::MR => match s {
            1 => alu_m::<K, 1, false>,
            2 => alu_m::<K, 2, false>,
            4 => alu_m::<K, 4, false>,
            _ => alu_m::<K, 8, false>,
        },
        Form::MI => match s {
            1 => alu_m::<K, 1, true>,
            2 => alu_m::<K, 2, true>,
            4 => alu_m::<K, 4, true>,
            _ => alu_m::<K, 8, true>,
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    RR,
    RI,
    RM,
    MR,
    MI,
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// The two-operand form of `i`, with its register indices and immediate.
fn form2(i: &Instruction) -> Option<(Form, [u8; 2], u64)> {
    if i.op_count() != 2 {
        return None;
    }
    let (k0, k1) = (i.op_kind(0), i.op_kind(1));
    let reg = |n: u32| gpr_index(i.op_register(n));
    Some(match (k0, k1) {
        (OpKind::Register, OpKind::Register) => (Form::RR, [reg(0)?, reg(1)?], 0),
        (OpKind::Register, OpKind::Memory) => (Form::RM, [reg(0)?, 0], 0),
        (OpKind::Memory, OpKind::Register) => (Form::MR, [0, reg(1)?], 0),
        (OpKind::Register, k) if is_imm(k) => (Form::RI, [reg(0)?, 0], i.immediate(1)),
        (OpKind::Memory, k) if is_imm(k) => (Form::MI, [0, 0], i.immediate(1)),
        _ => return None,
    })
}

/// Replaces `op`'s generic handler with a specialized one when its form is
/// one this module covers.
pub(crate) fn specialize(op: &mut Op) {
    if let Some((h, regs, imm)) = pick(&op.instr, op.osize as usize) {
        op.handler = h;
        op.regs = regs;
        op.imm = imm;
    }
}

fn pick(i: &Instruction, s: usize) -> Option<(Handler, [u8; 2], u64)> {
    use Mnemonic as M;
    if i.is_invalid() || i.has_lock_prefix() || !matches!(s, 1 | 2 | 4 | 8) {
        return None;
    }
    let m = i.mnemonic();
    if let Some(k) = alu_kind(m) {
        let (form, regs, imm) = form2(i)?;
        let h = match k {
            ADD => alu_handler::<ADD>(form, s),
            OR => alu_handler::<OR>(form, s),
            ADC => alu_handler::<ADC>(form, s),
            SBB => alu_handler::<SBB>(form, s),
            AND => alu_handler::<AND>(form, s),
            SUB => alu_handler::<SUB>(form, s),
            XOR => alu_handler::<XOR>(form, s),
            CMP => alu_handler::<CMP>(form, s),
            _ => alu_handler::<TEST>(form, s),
        };
        return Some((h, regs, imm & mask(s)));
    }
    match m {
        M::Mov => {
            let (form, regs, imm) = form2(i)?;
            let h = match form {
                Form::RR => by_size!(s, mov_rr),
                Form::RI => by_size!(s, mov_ri),
                Form::RM => by_size!(s, mov_rm),
                Form::MR => by_size!(s, mov_mr),
                Form::MI => by_size!(s, mov_mi),
            };
            Some((h, regs, imm & mask(s)))
        }
        M::Lea if s >= 2 => {
            let (form, regs, _) = form2(i)?;
            (form == Form::RM).then_some((by_size!(s, lea), regs, 0))
        }
        M::Movzx | M::Movsx | M::Movsxd => {
            let (form, regs, _) = form2(i)?;
            let signed = m != M::Movzx;
            let ss = if form == Form::RR {
                i.op_register(1).size()
            } else {
                i.memory_size().size()
            };
            let h: Handler = match (form, signed, s, ss) {
                (Form::RR, false, 2, 1) => movx_r::<2, 1, false>,
                (Form::RR, false, 4, 1) => movx_r::<4, 1, false>,
                (Form::RR, false, 4, 2) => movx_r::<4, 2, false>,
                (Form::RR, false, 8, 1) => movx_r::<8, 1, false>,
                (Form::RR, false, 8, 2) => movx_r::<8, 2, false>,
                (Form::RR, true, 2, 1) => movx_r::<2, 1, true>,
                (Form::RR, true, 4, 1) => movx_r::<4, 1, true>,
                (Form::RR, true, 4, 2) => movx_r::<4, 2, true>,
                (Form::RR, true, 8, 1) => movx_r::<8, 1, true>,
                (Form::RR, true, 8, 2) => movx_r::<8, 2, true>,
                (Form::RR, true, 8, 4) => movx_r::<8, 4, true>,
                (Form::RM, false, 2, 1) => movx_m::<2, 1, false>,
                (Form::RM, false, 4, 1) => movx_m::<4, 1, false>,
                (Form::RM, false, 4, 2) => movx_m::<4, 2, false>,
                (Form::RM, false, 8, 1) => movx_m::<8, 1, false>,
                (Form::RM, false, 8, 2) => movx_m::<8, 2, false>,
                (Form::RM, true, 2, 1) => movx_m::<2, 1, true>,
                (Form::RM, true, 4, 1) => movx_m::<4, 1, true>,
                (Form::RM, true, 4, 2) => movx_m::<4, 2, true>,
                (Form::RM, true, 8, 1) => movx_m::<8, 1, true>,
                (Form::RM, true, 8, 2) => movx_m::<8, 2, true>,
                (Form::RM, true, 8, 4) => movx_m::<8, 4, true>,
                _ => return None,
            };
            Some((h, regs, 0))
        }
        M::Inc | M::Dec if i.op_count() == 1 && i.op_kind(0) == OpKind::Register => {
            let r = gpr_index(i.op0_register())?;
            let h = if m == M::Dec {
                by_size!(s, incdec_r, true)
            } else {
                by_size!(s, incdec_r, false)
            };
            Some((h, [r, 0], 0))
        }
        M::Push | M::Pop
            if i.op_count() == 1
                && i.op_kind(0) == OpKind::Register
                && i.op0_register().size() == 8
                && s == 8 =>
        {
            let r = gpr_index(i.op0_register())?;
            let h: Handler = if m == M::Push { push_r64 } else { pop_r64 };
            Some((h, [r, 0], 0))
        }
        _ => pick_more(i, s),
    }
}

/// IMUL r, r/m (two operands) or IMUL r, r/m, imm (three): `MEM` says
/// whether the r/m source is memory; `IMM` whether an immediate is the
/// second factor. CF = OF = the product did not fit; SF/ZF/PF from the
/// low half, AF 0 (as the generic handler).
fn imul<const S: usize, const MEM: bool, const IMM: bool>(c: &mut Core, op: &Op) -> R {
    let rm = if MEM {
        let lin = c.mem_linear(op);
        c.read(lin, S)?
    } else {
        rd::<S>(c, op.regs[1])
    };
    let (a, b) = if IMM {
        (rm, op.imm)
    } else {
        (rd::<S>(c, op.regs[0]), rm)
    };
    let p = i128::from(sext(a, S) as i64) * i128::from(sext(b, S) as i64);
    let lo = p as u64 & mask(S);
    wr::<S>(c, op.regs[0], lo);
    let over = p != i128::from(sext(lo, S) as i64);
    let f = super::flags::szp(lo, S) | if over { CF | OF } else { 0 };
    c.set_status(STATUS, f);
    Ok(())
}

const SHL: u8 = 0;
const SHR: u8 = 1;
const SAR: u8 = 2;

/// SHL/SHR/SAR of a register by an immediate (`CL` = false) or by CL.
/// A zero count only rewrites the register (clearing the upper half of a
/// 32-bit one); flags as the generic `ops::shift`.
fn shift_r<const K: u8, const S: usize, const CL: bool>(c: &mut Core, op: &Op) -> R {
    let raw = if CL { c.cpu.gpr[1] } else { op.imm };
    let cnt = (raw & if S == 8 { 0x3f } else { 0x1f }) as u32;
    let a = rd::<S>(c, op.regs[0]);
    if cnt == 0 {
        wr::<S>(c, op.regs[0], a);
        return Ok(());
    }
    let bits = S as u32 * 8;
    let sb = super::flags::sign_bit(S);
    let (res, cf, of) = match K {
        SHL => {
            let full = u128::from(a) << cnt;
            let res = full as u64 & mask(S);
            let cf = (full >> bits) & 1 != 0;
            (res, cf, (res & sb != 0) != cf)
        }
        SHR => (a >> cnt, (a >> (cnt - 1)) & 1 != 0, a & sb != 0),
        _ => {
            let sa = sext(a, S) as i64;
            (
                (sa >> cnt) as u64 & mask(S),
                (sa >> (cnt - 1)) & 1 != 0,
                false,
            )
        }
    };
    wr::<S>(c, op.regs[0], res);
    let f = super::flags::szp(res, S) | if cf { CF } else { 0 } | if of { OF } else { 0 };
    c.set_status(STATUS, f);
    Ok(())
}

fn pick_more(i: &Instruction, s: usize) -> Option<(Handler, [u8; 2], u64)> {
    use Mnemonic as M;
    let m = i.mnemonic();
    match m {
        M::Imul if s >= 2 && (i.op_count() == 2 || i.op_count() == 3) => {
            let imm3 = i.op_count() == 3;
            if i.op_kind(0) != OpKind::Register || (imm3 && !is_imm(i.op_kind(2))) {
                return None;
            }
            let r0 = gpr_index(i.op0_register())?;
            let mem = i.op_kind(1) == OpKind::Memory;
            let r1 = if mem { 0 } else { gpr_index(i.op1_register())? };
            let imm = if imm3 { i.immediate(2) & mask(s) } else { 0 };
            let h: Handler = match (s, mem, imm3) {
                (2, false, false) => imul::<2, false, false>,
                (2, false, true) => imul::<2, false, true>,
                (2, true, false) => imul::<2, true, false>,
                (2, true, true) => imul::<2, true, true>,
                (4, false, false) => imul::<4, false, false>,
                (4, false, true) => imul::<4, false, true>,
                (4, true, false) => imul::<4, true, false>,
                (4, true, true) => imul::<4, true, true>,
                (_, false, false) => imul::<8, false, false>,
                (_, false, true) => imul::<8, false, true>,
                (_, true, false) => imul::<8, true, false>,
                (_, true, true) => imul::<8, true, true>,
            };
            Some((h, [r0, r1], imm))
        }
        M::Shl | M::Sal | M::Shr | M::Sar
            if i.op_count() == 2 && i.op_kind(0) == OpKind::Register =>
        {
            let r0 = gpr_index(i.op0_register())?;
            let cl = match i.op_kind(1) {
                OpKind::Register if i.op1_register() == Register::CL => true,
                OpKind::Immediate8 => false,
                _ => return None,
            };
            let imm = if cl { 0 } else { i.immediate(1) };
            macro_rules! sh {
                ($k:expr) => {
                    match (s, cl) {
                        (1, false) => shift_r::<$k, 1, false> as Handler,
                        (1, true) => shift_r::<$k, 1, true>,
                        (2, false) => shift_r::<$k, 2, false>,
                        (2, true) => shift_r::<$k, 2, true>,
                        (4, false) => shift_r::<$k, 4, false>,
                        (4, true) => shift_r::<$k, 4, true>,
                        (_, false) => shift_r::<$k, 8, false>,
                        (_, true) => shift_r::<$k, 8, true>,
                    }
                };
            }
            let h = match m {
                M::Shr => sh!(SHR),
                M::Sar => sh!(SAR),
                _ => sh!(SHL),
            };
            Some((h, [r0, 0], imm))
        }
        _ => None,
    }
}
