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

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::flags::{add, condition, logic, mask, sext, sub};
use super::{Core, OpResult};
use crate::block::{Handler, Op};
use crate::state::rflags::{CF, OF, STATUS};

type R = OpResult;

/// Maps a condition code to `$f::<CC, ...>` for its low opcode nibble.
macro_rules! by_cc {
    ($cc:expr, $f:ident $(, $rest:expr)*) => {
        match $cc {
            ConditionCode::o => $f::<0 $(, $rest)*> as Handler,
            ConditionCode::no => $f::<1 $(, $rest)*>,
            ConditionCode::b => $f::<2 $(, $rest)*>,
            ConditionCode::ae => $f::<3 $(, $rest)*>,
            ConditionCode::e => $f::<4 $(, $rest)*>,
            ConditionCode::ne => $f::<5 $(, $rest)*>,
            ConditionCode::be => $f::<6 $(, $rest)*>,
            ConditionCode::a => $f::<7 $(, $rest)*>,
            ConditionCode::s => $f::<8 $(, $rest)*>,
            ConditionCode::ns => $f::<9 $(, $rest)*>,
            ConditionCode::p => $f::<10 $(, $rest)*>,
            ConditionCode::np => $f::<11 $(, $rest)*>,
            ConditionCode::l => $f::<12 $(, $rest)*>,
            ConditionCode::ge => $f::<13 $(, $rest)*>,
            ConditionCode::le => $f::<14 $(, $rest)*>,
            ConditionCode::g | ConditionCode::None => $f::<15 $(, $rest)*>,
        }
    };
}

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

/// The result of an ALU operation without its flags (for instructions
/// whose flags nothing reads: see [`dead_flags`]).
#[inline(always)]
fn value<const K: u8, const S: usize>(c: &Core, a: u64, b: u64) -> u64 {
    match K {
        ADD => a.wrapping_add(b),
        ADC => a.wrapping_add(b).wrapping_add(c.cpu.rflags & CF),
        SUB | CMP => a.wrapping_sub(b),
        SBB => a.wrapping_sub(b).wrapping_sub(c.cpu.rflags & CF),
        AND | TEST => a & b,
        OR => a | b,
        _ => a ^ b,
    }
}

/// `alu r, r`; `F`: the flags are live and computed.
fn alu_rr<const K: u8, const S: usize, const F: bool>(c: &mut Core, op: &Op) -> R {
    let (a, b) = (rd::<S>(c, op.regs[0]), rd::<S>(c, op.regs[1]));
    if !F {
        wr::<S>(c, op.regs[0], value::<K, S>(c, a, b));
        return Ok(());
    }
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn alu_ri<const K: u8, const S: usize, const F: bool>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    if !F {
        wr::<S>(c, op.regs[0], value::<K, S>(c, a, op.imm));
        return Ok(());
    }
    let (res, f) = calc::<K, S>(c, a, op.imm);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn alu_rm<const K: u8, const S: usize, const F: bool>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    let lin = c.mem_linear(op);
    let b = c.read(lin, S)?;
    if !F {
        if writes(K) {
            wr::<S>(c, op.regs[0], value::<K, S>(c, a, b));
        }
        return Ok(());
    }
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    Ok(())
}

/// CMP or TEST of registers or an immediate whose flags nothing reads.
fn nop(_: &mut Core, _: &Op) -> R {
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
fn incdec_r<const DEC: bool, const S: usize, const F: bool>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    if !F {
        let res = if DEC {
            a.wrapping_sub(1)
        } else {
            a.wrapping_add(1)
        };
        wr::<S>(c, op.regs[0], res);
        return Ok(());
    }
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

/// Jcc with the condition fixed at decode time and the target in
/// `op.imm` (`CC` is the low nibble of the opcode).
fn jcc<const CC: u8>(c: &mut Core, op: &Op) -> R {
    if condition(CC, c.cpu.rflags) {
        c.cpu.rip = op.imm;
    }
    Ok(())
}

fn jcc_handler(cc: ConditionCode) -> Handler {
    use ConditionCode as C;
    match cc {
        C::o => jcc::<0>,
        C::no => jcc::<1>,
        C::b => jcc::<2>,
        C::ae => jcc::<3>,
        C::e => jcc::<4>,
        C::ne => jcc::<5>,
        C::be => jcc::<6>,
        C::a => jcc::<7>,
        C::s => jcc::<8>,
        C::ns => jcc::<9>,
        C::p => jcc::<10>,
        C::np => jcc::<11>,
        C::l => jcc::<12>,
        C::ge => jcc::<13>,
        C::le => jcc::<14>,
        // Every Jcc has a condition; `None` cannot come from the decoder.
        C::g | C::None => jcc::<15>,
    }
}

/// Status flags in iced's [`iced_x86::RflagsBits`] (OF SF ZF AF CF PF).
const STATUS_BITS: u32 = 0x3f;

/// Specializes the handlers of a block's instructions, in place.
///
/// A backward pass finds the instructions whose status flags are dead:
/// overwritten by a later instruction of the block before anything reads
/// them. Those get handlers that skip computing flags. Flags are live at
/// the block's end and before any instruction that may stop the block
/// (a fault, an exit, an MMIO replay), because whoever sees the state
/// then (an exception handler pushing RFLAGS, the VMM) must see it exact;
/// interrupts are taken only between blocks.
///
/// A block ending in a register-form CMP, TEST, ADD, SUB or AND followed
/// by its Jcc then has the pair fused into one operation (one dispatch
/// instead of two); it counts as one instruction retired.
///
/// With an arena, the block is first cut where native code starts or
/// stops (`native::plan_block`; `spans` gives each op's bytes in
/// `bytes`). A block whose every instruction the host can execute keeps
/// one op per instruction, unfused, for the block loop to compile once it
/// runs often: returns `None`. Otherwise runs of such instructions become
/// native runs, and the interpreted forms of the runs that access memory are
/// returned, which the block keeps for them.
pub(crate) fn specialize_block(
    ops: &mut Vec<Op>,
    spans: &[(usize, usize)],
    bytes: &[u8],
    arena: &mut Option<super::native::Arena>,
    target: super::native::Target,
) -> Option<Vec<Op>> {
    // Cut first: which flags an op must compute depends on what follows
    // it in its block.
    let (keep, whole) = super::native::plan_block(arena, ops, spans, bytes, target);
    ops.truncate(keep);
    specialize_all(ops);
    if whole {
        return None;
    }
    let fused = fuse_branch(ops);
    // The fused op (the last) stands for two instructions: never part of
    // a run. `spans` still matches every op before it.
    let plain = ops.len() - usize::from(fused);
    Some(super::native::compile_runs(
        arena, ops, plain, spans, bytes, target,
    ))
}

fn specialize_all(ops: &mut [Op]) {
    let mut live = STATUS_BITS;
    for op in ops.iter_mut().rev() {
        let i = op.instr;
        let modified = i.rflags_modified() & STATUS_BITS;
        specialize(op, modified == 0 || modified & live != 0);
        live = (live & !overwrites(&i, modified)) | (i.rflags_read() & STATUS_BITS);
        if !never_stops(&i) {
            live = STATUS_BITS;
        }
    }
}

/// ALU operation `K` of `S`-byte registers (IMM = false) or a register
/// and an immediate, then Jcc `CC`: the fused pair. The Jcc's target is in
/// `op.ea.disp` (a register form has no memory operand) and `op.next_ip`
/// is the Jcc's.
fn alu_jcc<const CC: u8, const K: u8, const S: usize, const IMM: bool>(c: &mut Core, op: &Op) -> R {
    let a = rd::<S>(c, op.regs[0]);
    let b = if IMM { op.imm } else { rd::<S>(c, op.regs[1]) };
    let (res, f) = calc::<K, S>(c, a, b);
    if writes(K) {
        wr::<S>(c, op.regs[0], res);
    }
    c.set_status(STATUS, f);
    if condition(CC, c.cpu.rflags) {
        c.cpu.rip = op.ea.disp;
    }
    Ok(())
}

fn alu_jcc_handler(k: u8, s: usize, imm: bool, cc: ConditionCode) -> Option<Handler> {
    macro_rules! k {
        ($k:expr) => {
            match (s, imm) {
                (4, false) => by_cc!(cc, alu_jcc, $k, 4, false),
                (4, true) => by_cc!(cc, alu_jcc, $k, 4, true),
                (8, false) => by_cc!(cc, alu_jcc, $k, 8, false),
                (8, true) => by_cc!(cc, alu_jcc, $k, 8, true),
                _ => return None,
            }
        };
    }
    Some(match k {
        CMP => k!(CMP),
        TEST => k!(TEST),
        ADD => k!(ADD),
        SUB => k!(SUB),
        AND => k!(AND),
        _ => return None,
    })
}

/// Fuses a block's final ALU-and-Jcc pair (see [`specialize_block`]);
/// whether it did.
fn fuse_branch(ops: &mut Vec<Op>) -> bool {
    let n = ops.len();
    if n < 2 || !ops[n - 1].instr.is_jcc_short_or_near() {
        return false;
    }
    let (alu, jcc) = (&ops[n - 2], &ops[n - 1]);
    let i = &alu.instr;
    let s = alu.osize as usize;
    if i.has_lock_prefix() || i.op_count() != 2 || i.op_kind(0) != OpKind::Register {
        return false;
    }
    let Some(k) = alu_kind(i.mnemonic()) else {
        return false;
    };
    let Some((form, regs, imm)) = form2(i) else {
        return false;
    };
    let is_imm = match form {
        Form::RR => false,
        Form::RI => true,
        _ => return false,
    };
    let Some(handler) = alu_jcc_handler(k, s, is_imm, jcc.instr.condition_code()) else {
        return false;
    };
    let (target, next_ip) = (jcc.imm, jcc.next_ip);
    let fused = &mut ops[n - 2];
    fused.handler = handler;
    fused.regs = regs;
    fused.imm = imm & mask(s);
    fused.ea.disp = target;
    fused.next_ip = next_ip;
    ops.pop();
    true
}

/// The flags `i` certainly overwrites (of `modified`, those it may). A
/// shift or rotate by a count that masks to zero leaves the flags alone,
/// so it overwrites only with a nonzero immediate count.
fn overwrites(i: &Instruction, modified: u32) -> u32 {
    use Mnemonic as M;
    match i.mnemonic() {
        M::Shl
        | M::Sal
        | M::Shr
        | M::Sar
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr
        | M::Shld
        | M::Shrd => {
            let last = i.op_count().saturating_sub(1);
            if !is_imm(i.op_kind(last)) {
                return 0;
            }
            let count_mask = if i.op0_register().size() == 8 || i.memory_size().size() == 8 {
                0x3f
            } else {
                0x1f
            };
            if i.immediate(last) & count_mask == 0 {
                0
            } else {
                modified
            }
        }
        _ => modified,
    }
}

/// Whether `i` always completes without stopping the block: a register or
/// immediate form of an instruction that raises nothing.
fn never_stops(i: &Instruction) -> bool {
    use Mnemonic as M;
    if i.has_lock_prefix() {
        return false;
    }
    let m = i.mnemonic();
    let known = super::forms::is_register_alu(m)
        || m == M::Bswap
        || (i.condition_code() != ConditionCode::None
            && matches!(i.flow_control(), iced_x86::FlowControl::Next));
    if !known || (m == M::Imul && i.op_count() < 2) {
        return false;
    }
    (0..i.op_count()).all(|n| match i.op_kind(n) {
        OpKind::Register => i.op_register(n).is_gpr(),
        OpKind::Memory => m == M::Lea || m == M::Nop,
        k => is_imm(k),
    })
}

// ---- 64-bit mode stack, calls and returns ---------------------------------
//
// In 64-bit mode the stack is flat and 8 bytes wide whatever SS holds, so
// these skip the segment and width logic of `Core::push`/`peek_pop`.

fn push_r64_flat(c: &mut Core, op: &Op) -> R {
    let v = rd::<8>(c, op.regs[0]);
    let rsp = c.cpu.gpr[4].wrapping_sub(8);
    c.write(rsp, 8, v)?;
    c.cpu.gpr[4] = rsp;
    Ok(())
}

fn pop_r64_flat(c: &mut Core, op: &Op) -> R {
    let rsp = c.cpu.gpr[4];
    let v = c.read(rsp, 8)?;
    // POP RSP loads the popped value, so RSP moves first.
    c.cpu.gpr[4] = rsp.wrapping_add(8);
    wr::<8>(c, op.regs[0], v);
    Ok(())
}

/// CALL rel32 in 64-bit mode: the target is in `op.imm`.
fn call_rel_flat(c: &mut Core, op: &Op) -> R {
    let rsp = c.cpu.gpr[4].wrapping_sub(8);
    c.write(rsp, 8, op.next_ip)?;
    c.cpu.gpr[4] = rsp;
    c.cpu.rip = op.imm;
    Ok(())
}

/// RET (no immediate) in 64-bit mode.
fn ret_flat(c: &mut Core, _: &Op) -> R {
    let rsp = c.cpu.gpr[4];
    let target = c.read(rsp, 8)?;
    c.cpu.gpr[4] = rsp.wrapping_add(8);
    c.cpu.rip = target;
    Ok(())
}

/// JMP rel8/rel32 (any mode): the target, already truncated to the
/// operand size by the decoder, is in `op.imm`.
fn jmp_rel(c: &mut Core, op: &Op) -> R {
    c.cpu.rip = op.imm;
    Ok(())
}

/// CMOVcc r, r (`MEM` = false) or r, m of `S` bytes.
fn cmov<const CC: u8, const S: usize, const MEM: bool>(c: &mut Core, op: &Op) -> R {
    // The source is read whatever the condition (it can fault).
    let v = if MEM {
        let lin = c.mem_linear(op);
        c.read(lin, S)?
    } else {
        rd::<S>(c, op.regs[1])
    };
    if condition(CC, c.cpu.rflags) {
        wr::<S>(c, op.regs[0], v);
    } else if S == 4 {
        // A 32-bit CMOV clears the upper half even when it does not move.
        let keep = rd::<4>(c, op.regs[0]);
        wr::<4>(c, op.regs[0], keep);
    }
    Ok(())
}

/// SETcc of a low-byte register.
fn setcc_r<const CC: u8>(c: &mut Core, op: &Op) -> R {
    let v = u64::from(condition(CC, c.cpu.rflags));
    wr::<1>(c, op.regs[0], v);
    Ok(())
}

fn cmov_handler(cc: ConditionCode, s: usize, mem: bool) -> Handler {
    match (s, mem) {
        (2, false) => by_cc!(cc, cmov, 2, false),
        (2, true) => by_cc!(cc, cmov, 2, true),
        (4, false) => by_cc!(cc, cmov, 4, false),
        (4, true) => by_cc!(cc, cmov, 4, true),
        (_, false) => by_cc!(cc, cmov, 8, false),
        (_, true) => by_cc!(cc, cmov, 8, true),
    }
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

/// Picks `$f::<K, S, F>` for the operand size `$s`.
macro_rules! by_size_f {
    ($s:expr, $f:ident, $k:expr, $flags:expr) => {
        match ($s, $flags) {
            (1, true) => $f::<$k, 1, true> as Handler,
            (2, true) => $f::<$k, 2, true> as Handler,
            (4, true) => $f::<$k, 4, true> as Handler,
            (_, true) => $f::<$k, 8, true> as Handler,
            (1, false) => $f::<$k, 1, false> as Handler,
            (2, false) => $f::<$k, 2, false> as Handler,
            (4, false) => $f::<$k, 4, false> as Handler,
            (_, false) => $f::<$k, 8, false> as Handler,
        }
    };
}

fn alu_handler<const K: u8>(form: Form, s: usize, flags: bool) -> Handler {
    if !flags && !writes(K) && matches!(form, Form::RR | Form::RI) {
        return nop;
    }
    match form {
        Form::RR => by_size_f!(s, alu_rr, K, flags),
        Form::RI => by_size_f!(s, alu_ri, K, flags),
        Form::RM => by_size_f!(s, alu_rm, K, flags),
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
    super::forms::is_immediate(k)
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
///
/// `flags_live`: whether anything may read the status flags it writes
/// (see [`dead_flags`]); when not, a variant that skips them is picked.
pub(crate) fn specialize(op: &mut Op, flags_live: bool) {
    if let Some((h, regs, imm)) = pick(&op.instr, op.osize as usize, flags_live) {
        op.handler = h;
        op.regs = regs;
        op.imm = imm;
    }
}

fn pick(i: &Instruction, s: usize, flags: bool) -> Option<(Handler, [u8; 2], u64)> {
    use Mnemonic as M;
    if i.is_jcc_short_or_near() {
        return Some((
            jcc_handler(i.condition_code()),
            [0; 2],
            i.near_branch_target(),
        ));
    }
    if i.is_jmp_short_or_near() {
        return Some((jmp_rel, [0; 2], i.near_branch_target()));
    }
    let flat = i.code_size() == iced_x86::CodeSize::Code64;
    if flat && i.is_call_near() && s == 8 {
        return Some((call_rel_flat, [0; 2], i.near_branch_target()));
    }
    if flat && i.code() == iced_x86::Code::Retnq {
        return Some((ret_flat, [0; 2], 0));
    }
    if i.is_invalid() || i.has_lock_prefix() || !matches!(s, 1 | 2 | 4 | 8) {
        return None;
    }
    let m = i.mnemonic();
    if let Some(k) = alu_kind(m) {
        let (form, regs, imm) = form2(i)?;
        let h = match k {
            ADD => alu_handler::<ADD>(form, s, flags),
            OR => alu_handler::<OR>(form, s, flags),
            ADC => alu_handler::<ADC>(form, s, flags),
            SBB => alu_handler::<SBB>(form, s, flags),
            AND => alu_handler::<AND>(form, s, flags),
            SUB => alu_handler::<SUB>(form, s, flags),
            XOR => alu_handler::<XOR>(form, s, flags),
            CMP => alu_handler::<CMP>(form, s, flags),
            _ => alu_handler::<TEST>(form, s, flags),
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
                by_size_f!(s, incdec_r, true, flags)
            } else {
                by_size_f!(s, incdec_r, false, flags)
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
            let h: Handler = match (m == M::Push, flat) {
                (true, true) => push_r64_flat,
                (true, false) => push_r64,
                (false, true) => pop_r64_flat,
                (false, false) => pop_r64,
            };
            Some((h, [r, 0], 0))
        }
        _ => pick_more(i, s, flags),
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
fn shift_r<const K: u8, const S: usize, const CL: bool, const F: bool>(c: &mut Core, op: &Op) -> R {
    let raw = if CL { c.cpu.gpr[1] } else { op.imm };
    let cnt = (raw & if S == 8 { 0x3f } else { 0x1f }) as u32;
    let a = rd::<S>(c, op.regs[0]);
    if cnt == 0 {
        wr::<S>(c, op.regs[0], a);
        return Ok(());
    }
    if !F {
        let res = match K {
            SHL => (u128::from(a) << cnt) as u64,
            SHR => a >> cnt,
            _ => (sext(a, S) as i64 >> cnt) as u64,
        };
        wr::<S>(c, op.regs[0], res & mask(S));
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

fn pick_more(i: &Instruction, s: usize, flags: bool) -> Option<(Handler, [u8; 2], u64)> {
    use Mnemonic as M;
    let m = i.mnemonic();
    match m {
        m if super::forms::is_cmovcc(m)
            && i.op_count() == 2
            && matches!(s, 2 | 4 | 8)
            && i.op_kind(0) == OpKind::Register =>
        {
            let r0 = gpr_index(i.op0_register())?;
            let mem = i.op_kind(1) == OpKind::Memory;
            let r1 = if mem { 0 } else { gpr_index(i.op1_register())? };
            Some((cmov_handler(i.condition_code(), s, mem), [r0, r1], 0))
        }
        m if super::forms::is_setcc(m)
            && i.op_count() == 1
            && i.op_kind(0) == OpKind::Register
            && i.op0_register().size() == 1 =>
        {
            let r0 = gpr_index(i.op0_register())?;
            Some((by_cc!(i.condition_code(), setcc_r), [r0, 0], 0))
        }
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
            macro_rules! sh_f {
                ($k:expr, $f:expr) => {
                    match (s, cl) {
                        (1, false) => shift_r::<$k, 1, false, $f> as Handler,
                        (1, true) => shift_r::<$k, 1, true, $f>,
                        (2, false) => shift_r::<$k, 2, false, $f>,
                        (2, true) => shift_r::<$k, 2, true, $f>,
                        (4, false) => shift_r::<$k, 4, false, $f>,
                        (4, true) => shift_r::<$k, 4, true, $f>,
                        (_, false) => shift_r::<$k, 8, false, $f>,
                        (_, true) => shift_r::<$k, 8, true, $f>,
                    }
                };
            }
            macro_rules! sh {
                ($k:expr) => {
                    if flags {
                        sh_f!($k, true)
                    } else {
                        sh_f!($k, false)
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
