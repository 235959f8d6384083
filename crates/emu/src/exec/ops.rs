//! Instruction handlers, and the decode-time choice of handler.
//!
//! Each handler executes one instruction: it reads every operand first,
//! then writes results (memory before registers and flags), so a fault or
//! an MMIO replay in the middle leaves the architectural state as before.
//! Semantics follow the Intel SDM Vol. 2 pseudo-code; where the SDM leaves
//! a flag undefined the comment says what is produced.

use iced_x86::{Code, Instruction, MemorySize, Mnemonic, OpKind, Register};

use super::flags::{add, condition, logic, mask, sext, sign_bit, sub, szp};
use super::{fault, Core, Exception, Exit, OpResult, PendingInKind, Stop};
use crate::block::{Handler, Op};
use crate::state::rflags::{
    AF, CF, DF, FIXED1, IF, IOPL, OF, PF, POPF_WRITABLE, RF, SF, STATUS, VM, ZF,
};
use crate::state::{bits, seg};

/// Picks the handler for a decoded instruction (once, at decode time).
pub(crate) fn handler_for(i: &Instruction) -> Handler {
    use Mnemonic as M;
    if i.is_invalid() {
        return ud;
    }
    if let Some(h) = string_handler(i.code()) {
        return h;
    }
    if let Some(h) = super::sse::handler(i) {
        return h;
    }
    if let Some(h) = super::fpu::handler(i) {
        return h;
    }
    if i.op_count() > 0 && i.op_kind(0) == OpKind::Memory {
        if let Some(h) = locked_handler(i) {
            return h;
        }
    }
    match i.mnemonic() {
        M::Mov => {
            let r0 = if i.op_kind(0) == OpKind::Register {
                i.op0_register()
            } else {
                Register::None
            };
            let r1 = if i.op_kind(1) == OpKind::Register {
                i.op1_register()
            } else {
                Register::None
            };
            if r0.is_segment_register() {
                mov_to_sreg
            } else if r1.is_segment_register() {
                mov_from_sreg
            } else if r0.is_cr() {
                mov_to_cr
            } else if r1.is_cr() {
                mov_from_cr
            } else if r0.is_dr() {
                super::sysops::mov_to_dr
            } else if r1.is_dr() {
                super::sysops::mov_from_dr
            } else if r0.is_tr() || r1.is_tr() {
                ud
            } else {
                mov
            }
        }
        M::Movnti => mov,
        M::Movzx => movzx,
        M::Movsx | M::Movsxd => movsx,
        M::Lea => lea,
        M::Xchg => xchg,
        M::Cmpxchg => cmpxchg,
        M::Xadd => xadd,
        M::Bswap => bswap,
        M::Push => push,
        M::Pop => pop,
        M::Pushf | M::Pushfd | M::Pushfq => pushf,
        M::Popf | M::Popfd | M::Popfq => popf,
        M::Add => alu::<ADD>,
        M::Or => alu::<OR>,
        M::Adc => alu::<ADC>,
        M::Sbb => alu::<SBB>,
        M::And => alu::<AND>,
        M::Sub => alu::<SUB>,
        M::Xor => alu::<XOR>,
        M::Cmp => alu::<CMP>,
        M::Test => alu::<TEST>,
        M::Inc => inc,
        M::Dec => dec,
        M::Neg => neg,
        M::Not => not,
        M::Rol => shift::<ROL>,
        M::Ror => shift::<ROR>,
        M::Rcl => shift::<RCL>,
        M::Rcr => shift::<RCR>,
        M::Shl | M::Sal => shift::<SHL>,
        M::Shr => shift::<SHR>,
        M::Sar => shift::<SAR>,
        M::Shld => shld,
        M::Shrd => shrd,
        M::Mul => mul,
        M::Imul => match i.op_count() {
            1 => imul1,
            _ => imul_n,
        },
        M::Div => div,
        M::Idiv => idiv,
        M::Bt => bt::<BT>,
        M::Bts => bt::<BTS>,
        M::Btr => bt::<BTR>,
        M::Btc => bt::<BTC>,
        M::Bsf => bsf,
        M::Bsr => bsr,
        // `F3 0F BC`/`F3 0F BD` are TZCNT/LZCNT only on CPUs with BMI1/ABM;
        // the CPUID model has neither, and such CPUs ignore the REP prefix
        // and run BSF/BSR (Linux's `__ffs()` is `rep; bsf` for this reason).
        M::Tzcnt => bsf,
        M::Lzcnt => bsr,
        m if super::forms::is_setcc(m) => setcc,
        m if super::forms::is_cmovcc(m) => cmovcc,
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => jcc,
        M::Jmp if is_far(i) => super::sysops::far_jmp,
        M::Call if is_far(i) => super::sysops::far_call,
        M::Jmp => jmp,
        M::Call => call,
        M::Ret => ret,
        M::Retf => super::sysops::retf,
        M::Iret | M::Iretd | M::Iretq => super::sysops::iret,
        M::Int | M::Int3 | M::Into | M::Int1 => super::sysops::int_n,
        M::Syscall => super::sysops::syscall,
        M::Sysret | M::Sysretq => super::sysops::sysret,
        M::Swapgs => super::sysops::swapgs,
        M::Ltr => super::sysops::ltr,
        M::Lldt => super::sysops::lldt,
        M::Str => super::sysops::str_,
        M::Sldt => super::sysops::sldt,
        M::Clts => super::sysops::clts,
        M::Invlpg => super::sysops::invlpg,
        M::Wbinvd | M::Invd => super::sysops::privileged_nop,
        M::Mfence | M::Lfence | M::Sfence => nop,
        M::Rdtscp => super::sysops::rdtscp,
        M::Enter => super::sysops::enter,
        M::Leave => super::sysops::leave,
        M::Xlatb => super::sysops::xlat,
        M::Cmpxchg8b | M::Cmpxchg16b => super::sysops::cmpxchg_wide,
        M::Loop => loop_::<LOOP>,
        M::Loope => loop_::<LOOPE>,
        M::Loopne => loop_::<LOOPNE>,
        M::Jcxz | M::Jecxz | M::Jrcxz => jcxz,
        M::Cbw | M::Cwde | M::Cdqe => cbw,
        M::Cwd | M::Cdq | M::Cqo => cwd,
        M::Clc => clc,
        M::Stc => stc,
        M::Cmc => cmc,
        M::Cld => cld,
        M::Std => std_,
        M::Cli => cli,
        M::Sti => sti,
        M::Lahf => lahf,
        M::Sahf => sahf,
        M::Nop | M::Pause | M::Endbr32 | M::Endbr64 => nop,
        // The reserved-NOP space (0F 18-0F 1F): instructions of extensions
        // this CPU model lacks execute as NOPs there, which software relies
        // on (libgcc's unwinder runs RDSSP to find a CET shadow stack;
        // without one the register keeps its 0). MPX's are NOPs too with
        // MPX absent.
        M::Rdsspd
        | M::Rdsspq
        | M::Cldemote
        | M::Bndcl
        | M::Bndcu
        | M::Bndcn
        | M::Bndmk
        | M::Bndmov
        | M::Bndldx
        | M::Bndstx => nop,
        M::In => in_,
        M::Out => out,
        M::Hlt => hlt,
        M::Cpuid => cpuid,
        M::Rdtsc => rdtsc,
        M::Lgdt | M::Lidt => lgdt_lidt,
        M::Sgdt | M::Sidt => super::sysops::sgdt_sidt,
        M::Verr | M::Verw => super::sysops::verr_verw,
        M::Rdmsr => rdmsr,
        M::Wrmsr => wrmsr,
        _ => ud,
    }
}

/// Whether the interpreter runs `i` as an atomic read-modify-write of
/// guest RAM (see [`locked_handler`]).
pub(crate) fn runs_atomically(i: &Instruction) -> bool {
    locked_handler(i).is_some()
}

/// Read-modify-write instructions with a memory destination that must be
/// atomic: with a LOCK prefix, and XCHG always. They update guest RAM
/// with a compare-exchange loop ([`Core::rmw`]).
fn locked_handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic as M;
    let locked = i.has_lock_prefix();
    Some(match i.mnemonic() {
        M::Xchg => locked_xchg,
        _ if !locked => return None,
        M::Add => locked_alu::<ADD>,
        M::Or => locked_alu::<OR>,
        M::Adc => locked_alu::<ADC>,
        M::Sbb => locked_alu::<SBB>,
        M::And => locked_alu::<AND>,
        M::Sub => locked_alu::<SUB>,
        M::Xor => locked_alu::<XOR>,
        M::Inc => locked_unary::<0>,
        M::Dec => locked_unary::<1>,
        M::Neg => locked_unary::<2>,
        M::Not => locked_unary::<3>,
        M::Xadd => locked_xadd,
        M::Cmpxchg => locked_cmpxchg,
        _ => return None,
    })
}

fn alu_calc(k: u8, a: u64, b: u64, cf: u64, s: usize) -> (u64, u64) {
    match k {
        ADD => add(a, b, 0, s),
        ADC => add(a, b, cf, s),
        SUB => sub(a, b, 0, s),
        SBB => sub(a, b, cf, s),
        AND => (a & b, logic(a & b, s)),
        OR => (a | b, logic(a | b, s)),
        _ => (a ^ b, logic(a ^ b, s)),
    }
}

fn locked_alu<const K: u8>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let b = c.operand(op, 1, s)?;
    let cf = c.cpu.rflags & CF;
    let lin = c.mem_linear(op);
    let old = c.rmw(lin, s, &mut |a| alu_calc(K, a, b, cf, s).0)?;
    let (_, f) = alu_calc(K, old, b, cf, s);
    c.set_status(STATUS, f);
    Ok(())
}

fn locked_unary<const K: u8>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let lin = c.mem_linear(op);
    let calc = |a: u64| match K {
        0 => add(a, 1, 0, s),
        1 => sub(a, 1, 0, s),
        2 => sub(0, a, 0, s),
        _ => (!a & mask(s), 0),
    };
    let old = c.rmw(lin, s, &mut |a| calc(a).0)?;
    let (_, f) = calc(old);
    match K {
        0 | 1 => c.set_status(STATUS & !CF, f),
        2 => c.set_status(STATUS, f),
        _ => {}
    }
    Ok(())
}

fn locked_xchg(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let r = op.instr.op1_register();
    let v = c.reg(r);
    let lin = c.mem_linear(op);
    let old = c.rmw(lin, s, &mut |_| v)?;
    c.set_reg(r, old);
    Ok(())
}

fn locked_xadd(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let r = op.instr.op1_register();
    let src = c.reg(r);
    let lin = c.mem_linear(op);
    let old = c.rmw(lin, s, &mut |a| add(a, src, 0, s).0)?;
    let (_, f) = add(old, src, 0, s);
    c.set_reg(r, old);
    c.set_status(STATUS, f);
    Ok(())
}

fn locked_cmpxchg(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let src = c.reg(op.instr.op1_register());
    let acc = c.cpu.gpr[0] & mask(s);
    let lin = c.mem_linear(op);
    let old = c.rmw(lin, s, &mut |a| if a == acc { src } else { a })?;
    let (_, f) = sub(acc, old, 0, s);
    if old != acc {
        c.set_gpr(0, s, old);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn is_far(i: &Instruction) -> bool {
    matches!(i.op_kind(0), OpKind::FarBranch16 | OpKind::FarBranch32)
        || matches!(
            i.memory_size(),
            MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
        )
}

fn string_handler(code: Code) -> Option<Handler> {
    use Code as C;
    Some(match code {
        C::Movsb_m8_m8 | C::Movsw_m16_m16 | C::Movsd_m32_m32 | C::Movsq_m64_m64 => string::<MOVS>,
        C::Stosb_m8_AL | C::Stosw_m16_AX | C::Stosd_m32_EAX | C::Stosq_m64_RAX => string::<STOS>,
        C::Lodsb_AL_m8 | C::Lodsw_AX_m16 | C::Lodsd_EAX_m32 | C::Lodsq_RAX_m64 => string::<LODS>,
        C::Cmpsb_m8_m8 | C::Cmpsw_m16_m16 | C::Cmpsd_m32_m32 | C::Cmpsq_m64_m64 => string::<CMPS>,
        C::Scasb_AL_m8 | C::Scasw_AX_m16 | C::Scasd_EAX_m32 | C::Scasq_RAX_m64 => string::<SCAS>,
        C::Insb_m8_DX | C::Insw_m16_DX | C::Insd_m32_DX => ins,
        C::Outsb_DX_m8 | C::Outsw_DX_m16 | C::Outsd_DX_m32 => outs,
        _ => return None,
    })
}

type R = OpResult;

fn ud(_: &mut Core, _: &Op) -> R {
    Err(fault(Exception::UD))
}

pub(crate) fn gp0() -> Stop {
    Stop::Fault(Exception::with_code(Exception::GP, 0))
}

fn nop(_: &mut Core, _: &Op) -> R {
    Ok(())
}

/// Size in bytes of operand `n` (register or memory).
#[inline(always)]
fn operand_size(op: &Op, n: u32) -> usize {
    let i = &op.instr;
    if i.op_kind(n) == OpKind::Register {
        i.op_register(n).size()
    } else {
        i.memory_size().size()
    }
}

#[inline(always)]
fn op0_is_reg(op: &Op) -> bool {
    op.instr.op_kind(0) == OpKind::Register
}

/// The condition nibble (0 = O .. 15 = G) of a Jcc/SETcc/CMOVcc.
#[inline(always)]
fn cc(op: &Op) -> u8 {
    (op.instr.condition_code() as u8).wrapping_sub(1)
}

// ---- data movement ----------------------------------------------------------

fn mov(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let v = c.operand(op, 1, s)?;
    c.set_operand(op, 0, s, v)
}

fn movzx(c: &mut Core, op: &Op) -> R {
    let v = c.operand(op, 1, operand_size(op, 1))?;
    c.set_operand(op, 0, op.osize as usize, v)
}

fn movsx(c: &mut Core, op: &Op) -> R {
    let ss = operand_size(op, 1);
    let v = c.operand(op, 1, ss)?;
    c.set_operand(op, 0, op.osize as usize, sext(v, ss))
}

fn lea(c: &mut Core, op: &Op) -> R {
    let ea = c.ea(op);
    c.set_operand(op, 0, op.osize as usize, ea)
}

fn xchg(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    let b = c.operand(op, 1, s)?;
    // Memory (if any) first, so a fault changes nothing.
    if op0_is_reg(op) {
        c.set_operand(op, 1, s, a)?;
        c.set_operand(op, 0, s, b)
    } else {
        c.set_operand(op, 0, s, b)?;
        c.set_operand(op, 1, s, a)
    }
}

fn cmpxchg(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let d = c.operand(op, 0, s)?;
    let src = c.operand(op, 1, s)?;
    let acc = c.cpu.gpr[0] & mask(s);
    let (_, f) = sub(acc, d, 0, s);
    if acc == d {
        c.set_operand(op, 0, s, src)?;
    } else {
        // The processor writes the destination back even when the
        // comparison fails (a locked read-modify-write); a register
        // destination is left alone.
        if !op0_is_reg(op) {
            c.set_operand(op, 0, s, d)?;
        }
        c.set_gpr(0, s, d);
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn xadd(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let d = c.operand(op, 0, s)?;
    let src = c.operand(op, 1, s)?;
    let (sum, f) = add(d, src, 0, s);
    // SRC <- DEST then DEST <- SUM: with the same register twice the sum
    // wins. A memory destination is written first so a fault changes
    // nothing.
    if op0_is_reg(op) {
        c.set_operand(op, 1, s, d)?;
        c.set_operand(op, 0, s, sum)?;
    } else {
        c.set_operand(op, 0, s, sum)?;
        c.set_operand(op, 1, s, d)?;
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn bswap(c: &mut Core, op: &Op) -> R {
    let r = op.instr.op0_register();
    let v = c.reg(r);
    let out = match op.osize {
        8 => v.swap_bytes(),
        4 => u64::from((v as u32).swap_bytes()),
        // BSWAP r16 is undefined; processors clear the register.
        _ => 0,
    };
    c.set_reg(r, out);
    Ok(())
}

// ---- stack ------------------------------------------------------------------

fn push(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let i = &op.instr;
    let v = if i.op_kind(0) == OpKind::Register && i.op0_register().is_segment_register() {
        u64::from(c.cpu.segs[seg_index(i.op0_register())].selector)
    } else {
        c.operand(op, 0, s)?
    };
    c.push(op, s, v)
}

fn pop(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let i = &op.instr;
    let old_rsp = c.cpu.gpr[4];
    let (v, new_rsp) = c.peek_pop(op, s, 0)?;
    if i.op_kind(0) == OpKind::Register && i.op0_register().is_segment_register() {
        load_segment(c, i.op0_register(), v as u16)?;
        c.commit_pop(op, new_rsp);
        return Ok(());
    }
    // A memory destination addressed through RSP sees the popped RSP.
    c.commit_pop(op, new_rsp);
    if let Err(e) = c.set_operand(op, 0, s, v) {
        c.cpu.gpr[4] = old_rsp;
        return Err(e);
    }
    Ok(())
}

fn pushf(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    // The image never has VM or RF set.
    let v = c.cpu.rflags & !(VM | RF);
    c.push(op, s, v)
}

fn popf(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let (v, new_rsp) = c.peek_pop(op, s, 0)?;
    let mut writable = POPF_WRITABLE & mask(s);
    let cpl = c.cpu.cpl();
    let iopl = ((c.cpu.rflags & IOPL) >> 12) as u8;
    if cpl > 0 {
        writable &= !IOPL;
    }
    if cpl > iopl {
        writable &= !IF;
    }
    c.cpu.rflags = (c.cpu.rflags & !writable) | (v & writable) | FIXED1;
    c.commit_pop(op, new_rsp);
    Ok(())
}

// ---- arithmetic ---------------------------------------------------------------

const ADD: u8 = 0;
const OR: u8 = 1;
const ADC: u8 = 2;
const SBB: u8 = 3;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;

fn alu<const K: u8>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    let b = c.operand(op, 1, s)?;
    let cf = c.cpu.rflags & CF;
    let (res, f) = match K {
        ADD => add(a, b, 0, s),
        ADC => add(a, b, cf, s),
        SUB | CMP => sub(a, b, 0, s),
        SBB => sub(a, b, cf, s),
        AND | TEST => (a & b, logic(a & b, s)),
        OR => (a | b, logic(a | b, s)),
        _ => (a ^ b, logic(a ^ b, s)),
    };
    if K != CMP && K != TEST {
        c.set_operand(op, 0, s, res)?;
    }
    c.set_status(STATUS, f);
    Ok(())
}

fn inc(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    let (res, f) = add(a, 1, 0, s);
    c.set_operand(op, 0, s, res)?;
    c.set_status(STATUS & !CF, f);
    Ok(())
}

fn dec(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    let (res, f) = sub(a, 1, 0, s);
    c.set_operand(op, 0, s, res)?;
    c.set_status(STATUS & !CF, f);
    Ok(())
}

fn neg(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    let (res, f) = sub(0, a, 0, s);
    c.set_operand(op, 0, s, res)?;
    c.set_status(STATUS, f);
    Ok(())
}

fn not(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let a = c.operand(op, 0, s)?;
    c.set_operand(op, 0, s, !a & mask(s))
}

// ---- shifts and rotates -----------------------------------------------------

const ROL: u8 = 0;
const ROR: u8 = 1;
const RCL: u8 = 2;
const RCR: u8 = 3;
const SHL: u8 = 4;
const SHR: u8 = 5;
const SAR: u8 = 7;

#[inline(always)]
fn bit(cond: bool, flag: u64) -> u64 {
    if cond {
        flag
    } else {
        0
    }
}

/// A zero count changes nothing, except that a 32-bit register
/// destination is still written (its upper half cleared), as on hardware.
fn zero_count(c: &mut Core, op: &Op, s: usize, a: u64) -> R {
    if op0_is_reg(op) {
        c.set_operand(op, 0, s, a)?;
    }
    Ok(())
}

/// Result, new flags and the flags defined by a shift or rotate of the
/// `s`-byte value `a` by the masked, non-zero count `cnt`.
///
/// Undefined by the SDM and produced here as on count 1: OF for counts
/// other than 1; AF (left 0) for shifts; CF for SHL/SHR of 8/16-bit
/// operands by at least the operand width (computed as the bit shifted
/// out, which is 0 past the width).
#[inline(always)]
fn shift_calc(k: u8, a: u64, cnt: u32, cf_in: u64, s: usize) -> Option<(u64, u64, u64)> {
    let bits = s as u32 * 8;
    let m = mask(s);
    let msb = |v: u64| v & sign_bit(s) != 0;
    Some(match k {
        SHL => {
            let full = u128::from(a) << cnt;
            let res = full as u64 & m;
            let cf = (full >> bits) & 1 != 0;
            let f = szp(res, s) | bit(cf, CF) | bit(msb(res) != cf, OF);
            (res, f, STATUS)
        }
        SHR => {
            let res = if cnt >= 64 { 0 } else { a >> cnt };
            let cf = (a >> (cnt - 1).min(63)) & 1 != 0 && cnt <= 64;
            let f = szp(res, s) | bit(cf, CF) | bit(msb(a), OF);
            (res, f, STATUS)
        }
        SAR => {
            let sa = sext(a, s) as i64;
            let res = (sa >> cnt.min(63)) as u64 & m;
            let cf = (sa >> (cnt - 1).min(63)) & 1 != 0;
            (res, szp(res, s) | bit(cf, CF), STATUS)
        }
        ROL => {
            let t = cnt % bits;
            let res = if t == 0 {
                a
            } else {
                ((a << t) | (a >> (bits - t))) & m
            };
            let cf = res & 1 != 0;
            (res, bit(cf, CF) | bit(msb(res) != cf, OF), CF | OF)
        }
        ROR => {
            let t = cnt % bits;
            let res = if t == 0 {
                a
            } else {
                ((a >> t) | (a << (bits - t))) & m
            };
            let cf = msb(res);
            let second = res & (sign_bit(s) >> 1) != 0;
            (res, bit(cf, CF) | bit(cf != second, OF), CF | OF)
        }
        RCL | RCR => {
            // Rotate the (bits + 1)-bit value CF:a.
            let t = if s <= 2 { cnt % (bits + 1) } else { cnt };
            if t == 0 {
                return None;
            }
            let w = bits + 1;
            let wm = (1u128 << w) - 1;
            let v = (u128::from(cf_in & 1) << bits) | u128::from(a);
            let r = if k == RCL {
                ((v << t) | (v >> (w - t))) & wm
            } else {
                ((v >> t) | (v << (w - t))) & wm
            };
            let res = r as u64 & m;
            let cf = (r >> bits) & 1 != 0;
            let of = if k == RCL {
                msb(res) != cf
            } else {
                msb(res) != (res & (sign_bit(s) >> 1) != 0)
            };
            (res, bit(cf, CF) | bit(of, OF), CF | OF)
        }
        _ => return None,
    })
}

fn shift<const K: u8>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let raw = c.operand(op, 1, 1)?;
    let cnt = (raw & if s == 8 { 0x3f } else { 0x1f }) as u32;
    let a = c.operand(op, 0, s)?;
    if cnt == 0 {
        return zero_count(c, op, s, a);
    }
    match shift_calc(K, a, cnt, c.cpu.rflags & CF, s) {
        Some((res, f, m)) => {
            c.set_operand(op, 0, s, res)?;
            c.set_status(m, f);
            Ok(())
        }
        None => zero_count(c, op, s, a),
    }
}

/// SHLD/SHRD. Undefined and not matched to hardware: the result and
/// flags for 16-bit counts above 16 (computed from the 32-bit
/// concatenation), OF for counts other than 1, AF (left 0).
fn double_shift<const LEFT: bool>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let bits = s as u32 * 8;
    let raw = c.operand(op, 2, 1)?;
    let cnt = (raw & if s == 8 { 0x3f } else { 0x1f }) as u32;
    let a = c.operand(op, 0, s)?;
    let b = c.operand(op, 1, s)?;
    if cnt == 0 {
        return zero_count(c, op, s, a);
    }
    let m = mask(s);
    let (res, cf) = if LEFT {
        let v = (u128::from(a) << bits) | u128::from(b);
        // The last bit shifted out of the destination is bit (bits - cnt).
        let cf = cnt <= bits && (a >> (bits - cnt)) & 1 != 0;
        (((v << cnt) >> bits) as u64 & m, cf)
    } else {
        let v = (u128::from(b) << bits) | u128::from(a);
        ((v >> cnt) as u64 & m, (v >> (cnt - 1)) & 1 != 0)
    };
    let sb = sign_bit(s);
    let f = szp(res, s) | bit(cf, CF) | bit((res ^ a) & sb != 0, OF);
    c.set_operand(op, 0, s, res)?;
    c.set_status(STATUS, f);
    Ok(())
}

fn shld(c: &mut Core, op: &Op) -> R {
    double_shift::<true>(c, op)
}

fn shrd(c: &mut Core, op: &Op) -> R {
    double_shift::<false>(c, op)
}

// ---- multiply and divide ------------------------------------------------------

/// Writes a double-width result to AX (8-bit) or rDX:rAX.
fn write_wide(c: &mut Core, s: usize, lo: u64, hi: u64) {
    if s == 1 {
        c.set_gpr(0, 2, (lo & 0xff) | ((hi & 0xff) << 8));
    } else {
        c.set_gpr(0, s, lo);
        c.set_gpr(2, s, hi);
    }
}

/// The double-width dividend AX or rDX:rAX.
fn read_wide(c: &Core, s: usize) -> u128 {
    if s == 1 {
        u128::from(c.cpu.gpr[0] & 0xffff)
    } else {
        let bits = s * 8;
        (u128::from(c.cpu.gpr[2] & mask(s)) << bits) | u128::from(c.cpu.gpr[0] & mask(s))
    }
}

/// MUL/IMUL flags: CF = OF = `overflow`. SF, ZF, AF and PF are undefined;
/// SF/ZF/PF are produced from the low half, AF as 0.
fn mul_flags(c: &mut Core, lo: u64, s: usize, overflow: bool) {
    let f = szp(lo, s) | bit(overflow, CF | OF);
    c.set_status(STATUS, f);
}

fn mul(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let bits = s * 8;
    let src = c.operand(op, 0, s)?;
    let acc = c.cpu.gpr[0] & mask(s);
    let p = u128::from(acc) * u128::from(src);
    let lo = p as u64 & mask(s);
    let hi = (p >> bits) as u64 & mask(s);
    write_wide(c, s, lo, hi);
    mul_flags(c, lo, s, hi != 0);
    Ok(())
}

fn imul1(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let bits = s * 8;
    let src = c.operand(op, 0, s)?;
    let acc = c.cpu.gpr[0] & mask(s);
    let p = i128::from(sext(acc, s) as i64) * i128::from(sext(src, s) as i64);
    let lo = p as u64 & mask(s);
    let hi = (p >> bits) as u64 & mask(s);
    write_wide(c, s, lo, hi);
    mul_flags(c, lo, s, p != i128::from(sext(lo, s) as i64));
    Ok(())
}

fn imul_n(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let (a, b) = if op.instr.op_count() == 2 {
        (c.operand(op, 0, s)?, c.operand(op, 1, s)?)
    } else {
        (c.operand(op, 1, s)?, c.operand(op, 2, s)?)
    };
    let p = i128::from(sext(a, s) as i64) * i128::from(sext(b, s) as i64);
    let lo = p as u64 & mask(s);
    c.set_operand(op, 0, s, lo)?;
    mul_flags(c, lo, s, p != i128::from(sext(lo, s) as i64));
    Ok(())
}

/// DIV: #DE on a zero divisor or a quotient too wide. Flags are undefined
/// and left unchanged.
fn div(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let d = u128::from(c.operand(op, 0, s)?);
    if d == 0 {
        return Err(fault(Exception::DE));
    }
    let n = read_wide(c, s);
    let q = n / d;
    if q > u128::from(mask(s)) {
        return Err(fault(Exception::DE));
    }
    write_wide(c, s, q as u64, (n % d) as u64);
    Ok(())
}

fn idiv(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let bits = s * 8;
    let d = i128::from(sext(c.operand(op, 0, s)?, s) as i64);
    if d == 0 {
        return Err(fault(Exception::DE));
    }
    // Sign-extend the 2*bits-wide dividend to 128 bits.
    let raw = read_wide(c, s);
    let shift = 128 - 2 * bits as u32;
    let n = ((raw << shift) as i128) >> shift;
    let (Some(q), Some(r)) = (n.checked_div(d), n.checked_rem(d)) else {
        return Err(fault(Exception::DE));
    };
    let lim = 1i128 << (bits - 1);
    if q < -lim || q >= lim {
        return Err(fault(Exception::DE));
    }
    write_wide(c, s, q as u64 & mask(s), r as u64 & mask(s));
    Ok(())
}

// ---- bit operations -----------------------------------------------------------

const BT: u8 = 0;
const BTS: u8 = 1;
const BTR: u8 = 2;
const BTC: u8 = 3;

/// BT/BTS/BTR/BTC. A register bit offset with a memory operand addresses
/// the bit string around the operand (signed, in operand-size units).
/// CF is the bit; OF, SF, AF and PF are undefined and left unchanged.
fn bt<const K: u8>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let bits = s as u64 * 8;
    let i = &op.instr;
    let offset_is_reg = i.op_kind(1) == OpKind::Register;
    let raw = c.operand(op, 1, s)?;
    let (v, bitno, lin) = if op0_is_reg(op) {
        (c.reg(i.op0_register()), raw & (bits - 1), None)
    } else {
        let mut ea = c.ea(op);
        let bitno = if offset_is_reg {
            let soff = sext(raw, s) as i64;
            let units = soff >> bits.trailing_zeros();
            ea = ea.wrapping_add((units as u64).wrapping_mul(s as u64)) & mask(op.asize as usize);
            (soff as u64) & (bits - 1)
        } else {
            raw & (bits - 1)
        };
        let lin = c.linear(op, i.memory_segment(), ea);
        if K != BT && i.has_lock_prefix() {
            let old = c.rmw(lin, s, &mut |v| match K {
                BTS => v | (1 << bitno),
                BTR => v & !(1 << bitno),
                _ => v ^ (1 << bitno),
            })?;
            c.set_status(CF, bit((old >> bitno) & 1 != 0, CF));
            return Ok(());
        }
        (c.read(lin, s)?, bitno, Some(lin))
    };
    let old = (v >> bitno) & 1 != 0;
    let new = match K {
        BTS => v | (1 << bitno),
        BTR => v & !(1 << bitno),
        BTC => v ^ (1 << bitno),
        _ => v,
    };
    if K != BT {
        match lin {
            Some(lin) => c.write(lin, s, new)?,
            None => c.set_reg(i.op0_register(), new),
        }
    }
    c.set_status(CF, bit(old, CF));
    Ok(())
}

/// BSF/BSR: ZF = (source == 0), and then the destination is left
/// unchanged (AMD documents this; Intel processors do the same). CF, OF,
/// SF, AF and PF are undefined and left unchanged.
fn bit_scan<const FORWARD: bool>(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    let src = c.operand(op, 1, s)?;
    if src == 0 {
        c.set_status(ZF, ZF);
        return Ok(());
    }
    let idx = if FORWARD {
        src.trailing_zeros()
    } else {
        63 - src.leading_zeros()
    };
    c.set_operand(op, 0, s, u64::from(idx))?;
    c.set_status(ZF, 0);
    Ok(())
}

fn bsf(c: &mut Core, op: &Op) -> R {
    bit_scan::<true>(c, op)
}

fn bsr(c: &mut Core, op: &Op) -> R {
    bit_scan::<false>(c, op)
}

// ---- conditions and control transfer -------------------------------------------

fn setcc(c: &mut Core, op: &Op) -> R {
    let v = u64::from(condition(cc(op), c.cpu.rflags));
    c.set_operand(op, 0, 1, v)
}

fn cmovcc(c: &mut Core, op: &Op) -> R {
    let s = op.osize as usize;
    // The source is read whatever the condition (it can fault).
    let v = c.operand(op, 1, s)?;
    let dst = op.instr.op0_register();
    if condition(cc(op), c.cpu.rflags) {
        c.set_reg(dst, v);
    } else if s == 4 {
        // A 32-bit CMOV clears the upper half even when it does not move.
        let keep = c.reg(dst);
        c.set_reg(dst, keep);
    }
    Ok(())
}

fn jcc(c: &mut Core, op: &Op) -> R {
    if condition(cc(op), c.cpu.rflags) {
        c.cpu.rip = op.instr.near_branch_target();
    }
    Ok(())
}

/// Target of a near JMP/CALL: direct, or read from a register or memory.
#[inline(always)]
fn branch_target(c: &mut Core, op: &Op) -> Result<u64, Stop> {
    match op.instr.op_kind(0) {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Ok(op.instr.near_branch_target())
        }
        _ => c.operand(op, 0, op.osize as usize),
    }
}

fn jmp(c: &mut Core, op: &Op) -> R {
    c.cpu.rip = branch_target(c, op)?;
    Ok(())
}

fn call(c: &mut Core, op: &Op) -> R {
    let target = branch_target(c, op)?;
    let s = op.osize as usize;
    c.push(op, s, op.next_ip)?;
    c.cpu.rip = target & mask(s);
    Ok(())
}

fn ret(c: &mut Core, op: &Op) -> R {
    use Code as C;
    let s = match op.instr.code() {
        C::Retnw | C::Retnw_imm16 => 2,
        C::Retnd | C::Retnd_imm16 => 4,
        C::Retnq | C::Retnq_imm16 => 8,
        // RETF: far returns come with the system instructions.
        _ => return Err(fault(Exception::UD)),
    };
    let extra = if op.instr.op_count() == 1 {
        u64::from(op.instr.immediate16())
    } else {
        0
    };
    let (v, new_rsp) = c.peek_pop(op, s, extra)?;
    c.commit_pop(op, new_rsp);
    c.cpu.rip = v & mask(s);
    Ok(())
}

const LOOP: u8 = 0;
const LOOPE: u8 = 1;
const LOOPNE: u8 = 2;

/// LOOP/LOOPE/LOOPNE: the count register's width is the address size.
fn loop_<const K: u8>(c: &mut Core, op: &Op) -> R {
    let a = op.asize as usize;
    let n = c.cpu.gpr[1].wrapping_sub(1) & mask(a);
    c.set_gpr(1, a, n);
    let zf = c.cpu.rflags & ZF != 0;
    let take = n != 0
        && match K {
            LOOPE => zf,
            LOOPNE => !zf,
            _ => true,
        };
    if take {
        c.cpu.rip = op.instr.near_branch_target();
    }
    Ok(())
}

fn jcxz(c: &mut Core, op: &Op) -> R {
    let w = match op.instr.mnemonic() {
        Mnemonic::Jcxz => 2,
        Mnemonic::Jecxz => 4,
        _ => 8,
    };
    if c.cpu.gpr[1] & mask(w) == 0 {
        c.cpu.rip = op.instr.near_branch_target();
    }
    Ok(())
}

// ---- conversions and flag instructions -----------------------------------------

/// Operand size of CBW/CWDE/CDQE and CWD/CDQ/CQO, which have no explicit
/// operand to take it from.
fn conversion_size(op: &Op) -> usize {
    match op.instr.mnemonic() {
        Mnemonic::Cbw | Mnemonic::Cwd => 2,
        Mnemonic::Cwde | Mnemonic::Cdq => 4,
        _ => 8,
    }
}

fn cbw(c: &mut Core, op: &Op) -> R {
    let s = conversion_size(op);
    let v = sext(c.cpu.gpr[0], s / 2);
    c.set_gpr(0, s, v);
    Ok(())
}

fn cwd(c: &mut Core, op: &Op) -> R {
    let s = conversion_size(op);
    let neg = c.cpu.gpr[0] & sign_bit(s) != 0;
    c.set_gpr(2, s, if neg { u64::MAX } else { 0 });
    Ok(())
}

fn clc(c: &mut Core, _: &Op) -> R {
    c.cpu.rflags &= !CF;
    Ok(())
}

fn stc(c: &mut Core, _: &Op) -> R {
    c.cpu.rflags |= CF;
    Ok(())
}

fn cmc(c: &mut Core, _: &Op) -> R {
    c.cpu.rflags ^= CF;
    Ok(())
}

fn cld(c: &mut Core, _: &Op) -> R {
    c.cpu.rflags &= !DF;
    Ok(())
}

fn std_(c: &mut Core, _: &Op) -> R {
    c.cpu.rflags |= DF;
    Ok(())
}

/// CLI/STI at CPL > IOPL fault. The STI interrupt shadow comes with
/// interrupt delivery.
fn cli(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() > ((c.cpu.rflags & IOPL) >> 12) as u8 {
        return Err(gp0());
    }
    c.cpu.rflags &= !IF;
    Ok(())
}

fn sti(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() > ((c.cpu.rflags & IOPL) >> 12) as u8 {
        return Err(gp0());
    }
    if c.cpu.rflags & IF == 0 {
        c.shadow_rip = c.cpu.rip;
    }
    c.cpu.rflags |= IF;
    Ok(())
}

const LAHF_MASK: u64 = SF | ZF | AF | PF | CF;

fn lahf(c: &mut Core, _: &Op) -> R {
    let v = (c.cpu.rflags & LAHF_MASK) | FIXED1;
    c.set_reg(Register::AH, v);
    Ok(())
}

fn sahf(c: &mut Core, _: &Op) -> R {
    let ah = c.reg(Register::AH);
    c.set_status(LAHF_MASK, ah);
    Ok(())
}

// ---- string instructions ----------------------------------------------------------

const MOVS: u8 = 0;
const STOS: u8 = 1;
const LODS: u8 = 2;
const CMPS: u8 = 3;
const SCAS: u8 = 4;

/// Most iterations of a REP string instruction per execution; the
/// instruction then restarts (RIP stays on it) so the block loop can
/// check for interrupts between chunks.
const REP_CHUNK: u64 = 4096;

/// MOVS/STOS/LODS/CMPS/SCAS with optional REP/REPE/REPNE. Every iteration
/// commits rSI/rDI/rCX, so an exit or fault in the middle resumes at the
/// right element.
fn string<const K: u8>(c: &mut Core, op: &Op) -> R {
    let i = &op.instr;
    let s = op.osize as usize;
    let a = op.asize as usize;
    let am = mask(a);
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let repne = i.has_repne_prefix();
    let step = if c.cpu.rflags & DF != 0 {
        (s as u64).wrapping_neg()
    } else {
        s as u64
    };
    let src_seg = i.memory_segment();
    let mut n = c.cpu.gpr[1] & am;
    if rep && n == 0 {
        return Ok(());
    }
    if rep && (K == MOVS || K == STOS) && super::bulk::rep_movs_stos(c, op, K == MOVS, s)? {
        return Ok(());
    }
    n = c.cpu.gpr[1] & am;
    let mut done = 0u64;
    loop {
        let rsi = c.cpu.gpr[6] & am;
        let rdi = c.cpu.gpr[7] & am;
        match K {
            MOVS => {
                let lin = c.linear(op, src_seg, rsi);
                let v = c.read(lin, s)?;
                let dst = c.linear(op, Register::ES, rdi);
                c.write(dst, s, v)?;
                c.set_gpr(6, a, rsi.wrapping_add(step));
                c.set_gpr(7, a, rdi.wrapping_add(step));
            }
            STOS => {
                let dst = c.linear(op, Register::ES, rdi);
                let v = c.cpu.gpr[0];
                c.write(dst, s, v)?;
                c.set_gpr(7, a, rdi.wrapping_add(step));
            }
            LODS => {
                let lin = c.linear(op, src_seg, rsi);
                let v = c.read(lin, s)?;
                c.set_gpr(0, s, v);
                c.set_gpr(6, a, rsi.wrapping_add(step));
            }
            CMPS => {
                let lin = c.linear(op, src_seg, rsi);
                let x = c.read(lin, s)?;
                let dst = c.linear(op, Register::ES, rdi);
                let y = c.read(dst, s)?;
                let (_, f) = sub(x, y, 0, s);
                c.set_status(STATUS, f);
                c.set_gpr(6, a, rsi.wrapping_add(step));
                c.set_gpr(7, a, rdi.wrapping_add(step));
            }
            _ => {
                let dst = c.linear(op, Register::ES, rdi);
                let y = c.read(dst, s)?;
                let (_, f) = sub(c.cpu.gpr[0], y, 0, s);
                c.set_status(STATUS, f);
                c.set_gpr(7, a, rdi.wrapping_add(step));
            }
        }
        if !rep {
            return Ok(());
        }
        n = n.wrapping_sub(1) & am;
        c.set_gpr(1, a, n);
        if n == 0 {
            return Ok(());
        }
        if K == CMPS || K == SCAS {
            let zf = c.cpu.rflags & ZF != 0;
            if zf == repne {
                return Ok(());
            }
        }
        done += 1;
        if done >= REP_CHUNK || c.attention {
            c.cpu.rip = i.ip();
            return Ok(());
        }
    }
}

// ---- port I/O (exits) ---------------------------------------------------------------

/// The port of IN/OUT: an 8-bit immediate or DX.
fn port(c: &Core, op: &Op, n: u32) -> u16 {
    if op.instr.op_kind(n) == OpKind::Immediate8 {
        u16::from(op.instr.immediate8())
    } else {
        c.cpu.gpr[2] as u16
    }
}

/// The I/O permission check of IN/OUT/INS/OUTS (SDM Vol. 1 19.5): when
/// CPL exceeds IOPL in protected mode (and always in virtual-8086 mode),
/// every bit of the TSS I/O permission bitmap covering `size` bytes at
/// `port` must be clear and inside the TSS limit, else #GP(0). Linux's
/// `ioperm(2)` hands user programs ports this way.
fn io_allowed(c: &mut Core, port: u16, size: usize) -> R {
    let v86 = c.cpu.cr0 & bits::CR0_PE != 0 && c.cpu.rflags & VM != 0;
    if !v86 && (!c.protected() || c.cpu.cpl() <= ((c.cpu.rflags & IOPL) >> 12) as u8) {
        return Ok(());
    }
    // Only a 32/64-bit TSS (available 9 or busy 11) has a bitmap.
    let tr = c.cpu.tr;
    let limit = u64::from(tr.limit);
    if tr.unusable || tr.s || tr.type_ & !2 != 9 || limit < 0x67 {
        return Err(gp0());
    }
    let base = tr.base;
    let map = c.read_as(c.sys_addr(base.wrapping_add(0x66)), 2, false)?;
    // Two bytes: the access may straddle a byte of the bitmap, and the
    // processor always reads both.
    let first = map + u64::from(port / 8);
    if first + 1 > limit {
        return Err(gp0());
    }
    let bits = c.read_as(c.sys_addr(base.wrapping_add(first)), 2, false)?;
    // One bit per port: `size` bits from the port's.
    let want = ((1u64 << size.clamp(1, 4)) - 1) << (port % 8);
    if bits & want != 0 {
        return Err(gp0());
    }
    Ok(())
}

fn in_(c: &mut Core, op: &Op) -> R {
    let size = operand_size(op, 0) as u8;
    let port = port(c, op, 1);
    io_allowed(c, port, size as usize)?;
    c.begin_in(PendingInKind::Acc, size);
    Err(Stop::Exit(Exit::IoIn { port, size }))
}

fn out(c: &mut Core, op: &Op) -> R {
    let size = operand_size(op, 1);
    let port = port(c, op, 0);
    io_allowed(c, port, size)?;
    let data = (c.cpu.gpr[0] & mask(size)) as u32;
    Err(Stop::Exit(Exit::IoOut {
        port,
        size: size as u8,
        data,
    }))
}

/// INS: one element per exit; with REP, RIP stays on the instruction
/// until rCX reaches zero.
fn ins(c: &mut Core, op: &Op) -> R {
    io_allowed(c, c.cpu.gpr[2] as u16, op.osize as usize)?;
    let i = &op.instr;
    let a = op.asize as usize;
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let n = c.cpu.gpr[1] & mask(a);
    if rep && n == 0 {
        return Ok(());
    }
    if rep && n != 1 {
        c.cpu.rip = i.ip();
    }
    let size = op.osize;
    c.begin_in(
        PendingInKind::Ins {
            asize: op.asize,
            rep,
        },
        size,
    );
    Err(Stop::Exit(Exit::IoIn {
        port: c.cpu.gpr[2] as u16,
        size,
    }))
}

fn outs(c: &mut Core, op: &Op) -> R {
    io_allowed(c, c.cpu.gpr[2] as u16, op.osize as usize)?;
    let i = &op.instr;
    let a = op.asize as usize;
    let am = mask(a);
    let s = op.osize as usize;
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let n = c.cpu.gpr[1] & am;
    if rep && n == 0 {
        return Ok(());
    }
    let rsi = c.cpu.gpr[6] & am;
    let lin = c.linear(op, i.memory_segment(), rsi);
    let data = c.read(lin, s)? as u32;
    let step = if c.cpu.rflags & DF != 0 {
        (s as u64).wrapping_neg()
    } else {
        s as u64
    };
    c.set_gpr(6, a, rsi.wrapping_add(step));
    if rep {
        c.set_gpr(1, a, n.wrapping_sub(1));
        if n != 1 {
            c.cpu.rip = i.ip();
        }
    }
    Err(Stop::Exit(Exit::IoOut {
        port: c.cpu.gpr[2] as u16,
        size: s as u8,
        data,
    }))
}

// ---- system -----------------------------------------------------------------------------

fn hlt(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    Err(Stop::Exit(Exit::Halt))
}

/// CPUID from the vCPU's table; leaves it does not list read as zeros.
fn cpuid(c: &mut Core, _: &Op) -> R {
    let leaf = c.cpu.gpr[0] as u32;
    let sub = c.cpu.gpr[1] as u32;
    let e = c
        .cpuid
        .iter()
        .find(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == sub))
        .copied()
        .unwrap_or_default();
    c.set_gpr(0, 4, u64::from(e.eax));
    c.set_gpr(3, 4, u64::from(e.ebx));
    c.set_gpr(1, 4, u64::from(e.ecx));
    c.set_gpr(2, 4, u64::from(e.edx));
    Ok(())
}

fn rdtsc(c: &mut Core, _: &Op) -> R {
    let t = c.tsc();
    c.set_gpr(0, 4, t);
    c.set_gpr(2, 4, t >> 32);
    Ok(())
}

fn lgdt_lidt(c: &mut Core, op: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let lin = c.mem_linear(op);
    let limit = c.read(lin, 2)? as u16;
    let base_lin = lin.wrapping_add(2);
    let base = if op.bitness == 64 {
        c.read(base_lin, 8)?
    } else {
        let b = c.read(base_lin, 4)?;
        // With a 16-bit operand size only 24 bits of base are loaded.
        if matches!(op.instr.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
            b & 0xff_ffff
        } else {
            b
        }
    };
    let table = hypervisor::x86::DescriptorTable { base, limit };
    if op.instr.mnemonic() == Mnemonic::Lgdt {
        c.cpu.gdt = table;
    } else {
        c.cpu.idt = table;
    }
    Ok(())
}

fn mov_from_cr(c: &mut Core, op: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let v = match op.instr.op1_register() {
        Register::CR0 => c.cpu.cr0,
        Register::CR2 => c.cpu.cr2,
        Register::CR3 => c.cpu.cr3,
        Register::CR4 => c.cpu.cr4,
        Register::CR8 => c.cpu.cr8,
        _ => return Err(fault(Exception::UD)),
    };
    c.set_reg(op.instr.op0_register(), v);
    Ok(())
}

/// MOV to CR0/2/3/4/8 with the reserved-bit and consistency checks
/// Linux can trip (#GP(0)), and the TLB flushes the SDM requires.
fn mov_to_cr(c: &mut Core, op: &Op) -> R {
    use super::paging::{CR4_PAE, CR4_PGE, CR4_PSE};
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let v = c.reg(op.instr.op1_register());
    const EFER_LME: u64 = 1 << 8;
    match op.instr.op0_register() {
        Register::CR0 => {
            let v = v | (1 << 4);
            if v >> 32 != 0 && op.bitness == 64 {
                return Err(gp0());
            }
            let v = v & 0xffff_ffff;
            // PG without PE, or NW without CD.
            if (v & bits::CR0_PG != 0 && v & bits::CR0_PE == 0)
                || (v & (1 << 29) != 0 && v & (1 << 30) == 0)
            {
                return Err(gp0());
            }
            let enabling_long = v & bits::CR0_PG != 0
                && c.cpu.cr0 & bits::CR0_PG == 0
                && c.cpu.efer & EFER_LME != 0;
            if enabling_long && c.cpu.cr4 & CR4_PAE == 0 {
                return Err(gp0());
            }
            if c.long_mode() && v & bits::CR0_PG == 0 && op.bitness == 64 {
                return Err(gp0());
            }
            let old = c.cpu.cr0;
            c.cpu.cr0 = v;
            if c.cpu.cr0 & bits::CR0_PG != 0 && c.cpu.efer & EFER_LME != 0 {
                c.cpu.efer |= bits::EFER_LMA;
            } else {
                c.cpu.efer &= !bits::EFER_LMA;
            }
            const PAGING_BITS: u64 = bits::CR0_PG | bits::CR0_PE | (1 << 16);
            if (old ^ v) & PAGING_BITS != 0 {
                c.sync_paging();
            }
        }
        Register::CR2 => c.cpu.cr2 = v,
        Register::CR3 => {
            c.cpu.cr3 = v;
            let keep = c.cpu.cr4 & CR4_PGE != 0;
            c.mmu.flush_non_global(keep);
        }
        Register::CR4 => {
            // VME..OSXMMEXCPT, FSGSBASE etc. not advertised: reserved.
            const CR4_OK: u64 =
                0x1 | 0x2 | 0x4 | 0x8 | CR4_PSE | CR4_PAE | 0x40 | CR4_PGE | 0x100 | 0x200 | 0x400;
            if v & !CR4_OK != 0 {
                return Err(gp0());
            }
            if c.long_mode() && v & CR4_PAE == 0 {
                return Err(gp0());
            }
            let old = c.cpu.cr4;
            c.cpu.cr4 = v;
            if (old ^ v) & (CR4_PAE | CR4_PGE | CR4_PSE) != 0 {
                c.sync_paging();
            }
        }
        Register::CR8 => c.cpu.cr8 = v & 0xf,
        _ => return Err(fault(Exception::UD)),
    }
    Ok(())
}

fn seg_index(r: Register) -> usize {
    ((r as usize).wrapping_sub(Register::ES as usize)).min(5)
}

/// Loads a data segment register or SS the way MOV/POP do (CS cannot
/// be loaded this way: #UD). Loading SS starts an interrupt shadow.
pub(crate) fn load_segment(c: &mut Core, r: Register, sel: u16) -> R {
    let idx = seg_index(r);
    if idx == seg::CS {
        return Err(fault(Exception::UD));
    }
    c.load_data_segment(idx, sel)?;
    if idx == seg::SS {
        c.shadow_rip = c.cpu.rip;
    }
    Ok(())
}

fn mov_to_sreg(c: &mut Core, op: &Op) -> R {
    let sel = c.operand(op, 1, 2)? as u16;
    load_segment(c, op.instr.op0_register(), sel)
}

fn mov_from_sreg(c: &mut Core, op: &Op) -> R {
    let sel = u64::from(c.cpu.segs[seg_index(op.instr.op1_register())].selector);
    // To memory it is always a 16-bit store; to a register it is
    // zero-extended to the operand size.
    if op0_is_reg(op) {
        let r = op.instr.op0_register();
        c.set_reg(r, sel);
        Ok(())
    } else {
        c.set_operand(op, 0, 2, sel)
    }
}

/// MSRs this vCPU implements. EFER.LMA is read-only (set by CR0.PG).
pub(crate) fn read_msr(c: &Core, index: u32) -> Option<u64> {
    let m = &c.cpu.msrs;
    Some(match index {
        0x10 => c.tsc(),
        0x1b => c.cpu.apic_base,
        // IA32_BIOS_SIGN_ID: the loaded microcode revision. There is none;
        // Linux writes 0 and reads it back after CPUID(1) (early_init_intel).
        0x8b => 0,
        // IA32_ARCH_CAPABILITIES (read-only; writes raise #GP).
        0x10a => crate::cpuid::ARCH_CAPABILITIES,
        0x174 => m.sysenter_cs,
        0x175 => m.sysenter_esp,
        0x176 => m.sysenter_eip,
        0x1a0 => m.misc_enable,
        0x277 => m.pat,
        0xc000_0080 => c.cpu.efer,
        0xc000_0081 => m.star,
        0xc000_0082 => m.lstar,
        0xc000_0083 => m.cstar,
        0xc000_0084 => m.sfmask,
        0xc000_0100 => c.cpu.segs[seg::FS].base,
        0xc000_0101 => c.cpu.segs[seg::GS].base,
        0xc000_0102 => m.kernel_gs_base,
        0xc000_0103 => c.tsc_aux,
        crate::pvclock::MSR_KVM_SYSTEM_TIME_NEW => c.kvmclock,
        crate::pvclock::MSR_KVM_WALL_CLOCK_NEW => c.wall_clock,
        MSR_TSC_DEADLINE if c.has_tsc_deadline() => c.tsc_deadline,
        _ => return None,
    })
}

pub(crate) fn write_msr(c: &mut Core, index: u32, v: u64) -> bool {
    match index {
        0x10 => {
            let host = c.tsc().wrapping_sub(c.cpu.msrs.tsc_offset);
            c.cpu.msrs.tsc_offset = v.wrapping_sub(host);
            // kvmclock relates TSC to system time: tell the guest anew.
            c.publish_kvmclock();
        }
        // As in KVM, an address that is not RAM is accepted and nothing is
        // written there (no #GP).
        crate::pvclock::MSR_KVM_SYSTEM_TIME_NEW => {
            c.kvmclock = v;
            c.publish_kvmclock();
        }
        crate::pvclock::MSR_KVM_WALL_CLOCK_NEW => {
            c.wall_clock = v;
            c.publish_wall_clock();
        }
        0x1b => c.cpu.apic_base = v,
        // IA32_BIOS_SIGN_ID: writing it only arms the next CPUID(1) to
        // latch the microcode revision, which stays 0 here.
        0x8b => {}
        0x174 => c.cpu.msrs.sysenter_cs = v,
        0x175 => c.cpu.msrs.sysenter_esp = v,
        0x176 => c.cpu.msrs.sysenter_eip = v,
        0x1a0 => c.cpu.msrs.misc_enable = v,
        0x277 => c.cpu.msrs.pat = v,
        0xc000_0080 => {
            // SCE, LME, NXE writable; LMA follows CR0.PG.
            if v & !(1 | (1 << 8) | bits::EFER_LMA | (1 << 11)) != 0 {
                return false;
            }
            let old = c.cpu.efer;
            c.cpu.efer = (v & !bits::EFER_LMA) | (c.cpu.efer & bits::EFER_LMA);
            if old != c.cpu.efer {
                c.sync_paging();
            }
        }
        0xc000_0103 => c.tsc_aux = v & 0xffff_ffff,
        0xc000_0081 => c.cpu.msrs.star = v,
        0xc000_0082 => c.cpu.msrs.lstar = v,
        0xc000_0083 => c.cpu.msrs.cstar = v,
        0xc000_0084 => c.cpu.msrs.sfmask = v,
        0xc000_0100 => c.cpu.segs[seg::FS].base = v,
        0xc000_0101 => c.cpu.segs[seg::GS].base = v,
        0xc000_0102 => c.cpu.msrs.kernel_gs_base = v,
        MSR_TSC_DEADLINE if c.has_tsc_deadline() => {
            c.tsc_deadline = v;
            c.tsc_deadline_write = Some(v);
        }
        _ => return false,
    }
    true
}

/// IA32_TSC_DEADLINE, where CPUID offers TSC-deadline mode.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

fn rdmsr(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let v = read_msr(c, c.cpu.gpr[1] as u32).ok_or_else(gp0)?;
    c.set_gpr(0, 4, v);
    c.set_gpr(2, 4, v >> 32);
    Ok(())
}

fn wrmsr(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let v = (c.cpu.gpr[0] & 0xffff_ffff) | (c.cpu.gpr[2] << 32);
    let index = c.cpu.gpr[1] as u32;
    if !write_msr(c, index, v) {
        return Err(gp0());
    }
    if index == MSR_TSC_DEADLINE {
        // The timer is the platform's: hand the deadline over now.
        return Err(Stop::Exit(Exit::PlatformUpdate));
    }
    Ok(())
}
