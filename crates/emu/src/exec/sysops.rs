//! Handlers for system and far-transfer instructions: far JMP/CALL/RET,
//! IRET, INT n, SYSCALL/SYSRET, SWAPGS, LTR/LLDT/STR/SLDT, CLTS, INVLPG,
//! RDTSCP, ENTER/LEAVE, XLAT, CMPXCHG8B/16B. The protection logic lives in
//! `system.rs`; these decode operands and call it.

use hypervisor::x86::Segment;
use iced_x86::{Code, MemorySize, Mnemonic, OpKind, Register};

use super::flags::mask;
use super::ops::gp0;
use super::system::{exc, gp, EventKind};
use super::{fault, Core, Exception, OpResult, Stop};
use crate::block::Op;
use crate::mem::Access;
use crate::state::rflags::{FIXED1, IF, OF, RF, VM, ZF};
use crate::state::{bits, seg};

type R = OpResult;

const EFER_SCE: u64 = 1;

/// Selector and offset of a far JMP/CALL operand, and its offset size.
fn far_operand(c: &mut Core, op: &Op) -> Result<(u16, u64, usize), Stop> {
    let i = &op.instr;
    match i.op_kind(0) {
        OpKind::FarBranch16 => Ok((i.far_branch_selector(), u64::from(i.far_branch16()), 2)),
        OpKind::FarBranch32 => Ok((i.far_branch_selector(), u64::from(i.far_branch32()), 4)),
        OpKind::Memory => {
            let size = match i.memory_size() {
                MemorySize::SegPtr16 => 2,
                MemorySize::SegPtr32 => 4,
                _ => 8,
            };
            let lin = c.mem_linear(op);
            let off = c.read(lin, size)?;
            let sel = c.read(lin.wrapping_add(size as u64), 2)? as u16;
            Ok((sel, off, size))
        }
        // JMP FAR with a register operand is not encodable.
        _ => Err(fault(Exception::UD)),
    }
}

pub(crate) fn far_jmp(c: &mut Core, op: &Op) -> R {
    let (sel, off, size) = far_operand(c, op)?;
    c.far_jump(sel, off, size)
}

pub(crate) fn far_call(c: &mut Core, op: &Op) -> R {
    let (sel, off, size) = far_operand(c, op)?;
    let sw = c.stack_width(op);
    c.far_call(sel, off, size, op.next_ip, sw)
}

pub(crate) fn retf(c: &mut Core, op: &Op) -> R {
    use Code as C;
    let size = match op.instr.code() {
        C::Retfw | C::Retfw_imm16 => 2,
        C::Retfd | C::Retfd_imm16 => 4,
        _ => 8,
    };
    let extra = if op.instr.op_count() == 1 {
        u64::from(op.instr.immediate16())
    } else {
        0
    };
    let sw = c.stack_width(op);
    c.far_return(size, extra, sw)
}

pub(crate) fn iret(c: &mut Core, op: &Op) -> R {
    let size = match op.instr.mnemonic() {
        Mnemonic::Iret => 2,
        Mnemonic::Iretd => 4,
        _ => 8,
    };
    let sw = c.stack_width(op);
    c.iret(size, sw)
}

/// INT n, INT3, INTO (software interrupts: the gate DPL is checked) and
/// INT1 (delivered like a debug trap). RIP already points past it, which
/// is the return address the frame needs.
pub(crate) fn int_n(c: &mut Core, op: &Op) -> R {
    let (vector, kind) = match op.instr.mnemonic() {
        Mnemonic::Int3 => (Exception::BP, EventKind::Soft),
        Mnemonic::Into => {
            if c.cpu.rflags & OF == 0 {
                return Ok(());
            }
            (Exception::OF, EventKind::Soft)
        }
        Mnemonic::Int1 => (Exception::DB, EventKind::Exception),
        _ => (op.instr.immediate8(), EventKind::Soft),
    };
    c.deliver(vector, None, kind)
}

fn flat(selector: u16, code: bool, long: bool, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !(code && long),
        s: true,
        l: code && long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// SYSCALL (AMD64 / Intel 64 semantics; legacy-mode SYSCALL as AMD).
pub(crate) fn syscall(c: &mut Core, op: &Op) -> R {
    if c.cpu.efer & EFER_SCE == 0 || !c.protected() {
        return Err(fault(Exception::UD));
    }
    let star = c.cpu.msrs.star;
    let sel = ((star >> 32) as u16) & 0xfffc;
    let long = c.long_mode();
    if long {
        c.cpu.gpr[1] = op.next_ip;
        c.cpu.gpr[11] = c.cpu.rflags & !RF;
        c.cpu.rip = if op.bitness == 64 {
            c.cpu.msrs.lstar
        } else {
            c.cpu.msrs.cstar
        };
        c.cpu.rflags = (c.cpu.rflags & !c.cpu.msrs.sfmask & !RF) | FIXED1;
    } else {
        c.cpu.gpr[1] = op.next_ip & 0xffff_ffff;
        c.cpu.rip = star & 0xffff_ffff;
        c.cpu.rflags &= !(VM | IF | RF);
    }
    c.cpu.segs[seg::CS] = flat(sel, true, long, 0);
    c.cpu.segs[seg::SS] = flat(sel.wrapping_add(8), false, false, 0);
    Ok(())
}

pub(crate) fn sysret(c: &mut Core, op: &Op) -> R {
    if c.cpu.efer & EFER_SCE == 0 {
        return Err(fault(Exception::UD));
    }
    if !c.protected() || c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let base = (c.cpu.msrs.star >> 48) as u16;
    let long = c.long_mode();
    let to64 = op.instr.code() == Code::Sysretq;
    let rcx = c.cpu.gpr[1];
    if to64 {
        if ((rcx as i64) << 16 >> 16) as u64 != rcx {
            return Err(gp0());
        }
        c.cpu.segs[seg::CS] = flat(base.wrapping_add(16) | 3, true, true, 3);
        c.cpu.rip = rcx;
    } else {
        c.cpu.segs[seg::CS] = flat(base | 3, true, false, 3);
        c.cpu.rip = rcx & 0xffff_ffff;
    }
    if long {
        c.cpu.rflags = (c.cpu.gpr[11] & 0x3c_7fd7) | FIXED1;
    } else {
        c.cpu.rflags |= IF;
    }
    // SS's selector changes; its cached attributes are the flat ones.
    let mut ss = flat(base.wrapping_add(8) | 3, false, false, 3);
    ss.selector = base.wrapping_add(8) | 3;
    c.cpu.segs[seg::SS] = ss;
    Ok(())
}

pub(crate) fn swapgs(c: &mut Core, op: &Op) -> R {
    if op.bitness != 64 {
        return Err(fault(Exception::UD));
    }
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    std::mem::swap(
        &mut c.cpu.segs[seg::GS].base,
        &mut c.cpu.msrs.kernel_gs_base,
    );
    Ok(())
}

/// Reads a system descriptor (TSS or LDT): 16 bytes in long mode.
fn system_descriptor(c: &mut Core, sel: u16) -> Result<(Segment, u64), Stop> {
    if sel & 4 != 0 {
        return Err(gp(sel & 0xfffc));
    }
    let raw = c.descriptor(sel, Exception::GP)?;
    let mut d = Segment::from_descriptor(sel, raw);
    if c.long_mode() {
        let off = u64::from(sel & !7) + 8;
        if off + 7 > u64::from(c.cpu.gdt.limit) {
            return Err(gp(sel & 0xfffc));
        }
        let a = c.cpu.gdt.base.wrapping_add(off);
        let hi = c.read_as(a, 8, false)?;
        d.base |= (hi & 0xffff_ffff) << 32;
    }
    Ok((d, raw))
}

fn system_prologue(c: &Core) -> R {
    if !c.protected() {
        return Err(fault(Exception::UD));
    }
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    Ok(())
}

pub(crate) fn ltr(c: &mut Core, op: &Op) -> R {
    system_prologue(c)?;
    let sel = c.operand(op, 0, 2)? as u16;
    if sel & !3 == 0 {
        return Err(gp0());
    }
    let (d, raw) = system_descriptor(c, sel)?;
    // Available 16-bit (1) or 32/64-bit (9) TSS only.
    let ok = !d.s && (d.type_ == 9 || (d.type_ == 1 && !c.long_mode()));
    if !ok {
        return Err(gp(sel & 0xfffc));
    }
    if !d.present {
        return Err(exc(Exception::NP, sel & 0xfffc));
    }
    // Mark it busy in the GDT.
    let a = c.cpu.gdt.base.wrapping_add(u64::from(sel & !7));
    let a = c.sys_addr(a);
    c.write_as(a, 8, raw | (2 << 40), false)?;
    let mut d = d;
    d.type_ |= 2;
    c.cpu.tr = d;
    Ok(())
}

pub(crate) fn lldt(c: &mut Core, op: &Op) -> R {
    system_prologue(c)?;
    let sel = c.operand(op, 0, 2)? as u16;
    if sel & !3 == 0 {
        c.cpu.ldt = Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        return Ok(());
    }
    let (d, _) = system_descriptor(c, sel)?;
    if d.s || d.type_ != 2 {
        return Err(gp(sel & 0xfffc));
    }
    if !d.present {
        return Err(exc(Exception::NP, sel & 0xfffc));
    }
    c.cpu.ldt = d;
    Ok(())
}

fn store_selector(c: &mut Core, op: &Op, sel: u16) -> R {
    if !c.protected() {
        return Err(fault(Exception::UD));
    }
    if op.instr.op_kind(0) == OpKind::Register {
        let r = op.instr.op0_register();
        c.set_reg(r, u64::from(sel));
        Ok(())
    } else {
        c.set_operand(op, 0, 2, u64::from(sel))
    }
}

pub(crate) fn str_(c: &mut Core, op: &Op) -> R {
    let sel = c.cpu.tr.selector;
    store_selector(c, op, sel)
}

pub(crate) fn sldt(c: &mut Core, op: &Op) -> R {
    let sel = c.cpu.ldt.selector;
    store_selector(c, op, sel)
}

pub(crate) fn clts(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    c.cpu.cr0 &= !(1 << 3);
    Ok(())
}

pub(crate) fn invlpg(c: &mut Core, op: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    let lin = c.mem_linear(op);
    c.mmu.invalidate(lin);
    Ok(())
}

/// WBINVD/INVD: no caches to write back.
pub(crate) fn privileged_nop(c: &mut Core, _: &Op) -> R {
    if c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    Ok(())
}

pub(crate) fn rdtscp(c: &mut Core, _: &Op) -> R {
    let t = c.tsc();
    c.set_gpr(0, 4, t);
    c.set_gpr(2, 4, t >> 32);
    let aux = c.tsc_aux;
    c.set_gpr(1, 4, aux);
    Ok(())
}

fn frame_size(op: &Op) -> usize {
    use Code as C;
    match op.instr.code() {
        C::Enterw_imm16_imm8 | C::Leavew => 2,
        C::Enterd_imm16_imm8 | C::Leaved => 4,
        _ => 8,
    }
}

/// ENTER alloc, level. All stack writes happen before any register
/// changes, so a fault leaves the state as before.
pub(crate) fn enter(c: &mut Core, op: &Op) -> R {
    let size = frame_size(op);
    let sw = c.stack_width(op);
    let m = mask(sw);
    let alloc = u64::from(op.instr.immediate16());
    let level = op.instr.immediate8_2nd() % 32;
    let mut rsp = c.cpu.gpr[4] & m;
    let mut rbp = c.cpu.gpr[5];
    let push = |c: &mut Core, rsp: &mut u64, v: u64| -> R {
        *rsp = rsp.wrapping_sub(size as u64) & m;
        let a = c.stack_linear(*rsp, sw);
        c.write(a, size, v)
    };
    push(c, &mut rsp, rbp)?;
    let frame = rsp;
    if level > 0 {
        for _ in 1..level {
            rbp = rbp.wrapping_sub(size as u64);
            let a = c.stack_linear(rbp & m, sw);
            let v = c.read(a, size)?;
            push(c, &mut rsp, v)?;
        }
        push(c, &mut rsp, frame)?;
    }
    let new_rsp = rsp.wrapping_sub(alloc) & m;
    // The last byte of the allocation must be writable (#PF/#SS now).
    if alloc > 0 {
        let a = c.stack_linear(new_rsp, sw);
        c.translate(a, Access::Write)?;
    }
    c.set_gpr(5, size, frame);
    c.set_gpr(4, sw, new_rsp);
    Ok(())
}

pub(crate) fn leave(c: &mut Core, op: &Op) -> R {
    let size = frame_size(op);
    let sw = c.stack_width(op);
    let m = mask(sw);
    let rsp = c.cpu.gpr[5] & m;
    let a = c.stack_linear(rsp, sw);
    let v = c.read(a, size)?;
    c.set_gpr(4, sw, rsp.wrapping_add(size as u64));
    c.set_gpr(5, size, v);
    Ok(())
}

pub(crate) fn xlat(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    let v = c.read(lin, 1)?;
    c.set_reg(Register::AL, v);
    Ok(())
}

/// CMPXCHG8B/16B, atomic on RAM. The memory operand is always written
/// (with its old value on a mismatch), as on hardware.
pub(crate) fn cmpxchg_wide(c: &mut Core, op: &Op) -> R {
    let lin = c.mem_linear(op);
    let g = c.cpu.gpr;
    if op.instr.mnemonic() == Mnemonic::Cmpxchg8b {
        let expect = (g[0] & 0xffff_ffff) | (g[2] << 32);
        let new = (g[3] & 0xffff_ffff) | (g[1] << 32);
        let old = c.rmw(lin, 8, &mut |cur| if cur == expect { new } else { cur })?;
        if old == expect {
            c.cpu.rflags |= ZF;
        } else {
            c.cpu.rflags &= !ZF;
            c.set_gpr(0, 4, old);
            c.set_gpr(2, 4, old >> 32);
        }
        return Ok(());
    }
    if lin & 15 != 0 {
        return Err(gp0());
    }
    let expect = u128::from(g[0]) | (u128::from(g[2]) << 64);
    let new = u128::from(g[3]) | (u128::from(g[1]) << 64);
    let pa = c.translate(lin, Access::Write)?;
    let old = match c.ram.cmpxchg_u128(pa, expect, new) {
        Some(Ok(v)) => {
            c.note_write(pa);
            v
        }
        Some(Err(v)) => v,
        None => {
            // MMIO: two plain accesses.
            let lo = c.read(lin, 8)?;
            let hi = c.read(lin.wrapping_add(8), 8)?;
            let cur = u128::from(lo) | (u128::from(hi) << 64);
            let w = if cur == expect { new } else { cur };
            c.write(lin, 8, w as u64)?;
            c.write(lin.wrapping_add(8), 8, (w >> 64) as u64)?;
            cur
        }
    };
    if old == expect {
        c.cpu.rflags |= ZF;
    } else {
        c.cpu.rflags &= !ZF;
        c.cpu.gpr[0] = old as u64;
        c.cpu.gpr[2] = (old >> 64) as u64;
    }
    let _ = bits::CR0_PE;
    Ok(())
}

/// SGDT/SIDT (memory operand only; the register form is #UD at decode):
/// the 16-bit limit, then the base — 8 bytes in 64-bit mode, else 4 (the
/// full 32 bits whatever the operand size, as on every CPU since the
/// 386). Not privileged unless CR4.UMIP is set. Linux's
/// `native_load_tr_desc()` and `store_idt()` use them.
pub(crate) fn sgdt_sidt(c: &mut Core, op: &Op) -> R {
    if c.cpu.cr4 & bits::CR4_UMIP != 0 && c.cpu.cpl() != 0 {
        return Err(gp0());
    }
    if op.instr.op_kind(0) != OpKind::Memory {
        return Err(fault(Exception::UD));
    }
    let table = if op.instr.mnemonic() == Mnemonic::Sgdt {
        c.cpu.gdt
    } else {
        c.cpu.idt
    };
    let lin = c.mem_linear(op);
    let base_size = if op.bitness == 64 { 8 } else { 4 };
    let wrap = if op.bitness == 64 {
        u64::MAX
    } else {
        0xffff_ffff
    };
    let base_lin = lin.wrapping_add(2) & wrap;
    // Translate both ends first so a fault on the second part leaves
    // memory as it was.
    let user = c.user();
    c.translate_as(lin, Access::Write, user)?;
    c.translate_as(
        base_lin.wrapping_add(base_size as u64 - 1) & wrap,
        Access::Write,
        user,
    )?;
    c.write(lin, 2, u64::from(table.limit))?;
    c.write(base_lin, base_size, table.base)
}

/// Which debug register a MOV names: DR4/DR5 alias DR6/DR7 unless CR4.DE
/// is set, when they are #UD (SDM Vol. 3B 18.2.2).
fn dr_index(c: &Core, r: Register) -> Result<usize, Stop> {
    let n = (r as usize).wrapping_sub(Register::DR0 as usize);
    match n {
        0..=3 | 6 | 7 => Ok(n),
        4 | 5 if c.cpu.cr4 & bits::CR4_DE == 0 => Ok(n + 2),
        _ => Err(fault(Exception::UD)),
    }
}

/// MOV r, DRn: CPL 0 only. The debug registers are stored, not acted on
/// (no breakpoint fires); Linux reads and writes them in `cpu_init()`
/// and when switching to a ptraced task.
pub(crate) fn mov_from_dr(c: &mut Core, op: &Op) -> R {
    if c.protected() && c.cpu.cpl() != 0 || c.cpu.rflags & VM != 0 {
        return Err(gp0());
    }
    let n = dr_index(c, op.instr.op1_register())?;
    let v = c.cpu.dr[n];
    // The GPR is 32 or 64 bits; 32-bit writes zero-extend.
    c.set_reg(op.instr.op0_register(), v);
    Ok(())
}

/// MOV DRn, r: CPL 0 only; DR6/DR7 keep their fixed bits, and in 64-bit
/// mode their upper 32 bits must be zero (#GP otherwise).
pub(crate) fn mov_to_dr(c: &mut Core, op: &Op) -> R {
    if c.protected() && c.cpu.cpl() != 0 || c.cpu.rflags & VM != 0 {
        return Err(gp0());
    }
    let n = dr_index(c, op.instr.op0_register())?;
    let v = c.reg(op.instr.op1_register());
    c.cpu.dr[n] = match n {
        6 | 7 if v >> 32 != 0 => return Err(gp0()),
        6 => (v & 0xf00f) | crate::state::DR6_RESET,
        7 => (v & 0xffff_2bff) | crate::state::DR7_RESET,
        _ => v,
    };
    Ok(())
}

/// VERR/VERW: ZF = 1 if the selector names a code/data segment that is
/// readable (VERR) or writable (VERW) at the current privilege — present,
/// inside its table, and DPL >= max(CPL, RPL) unless it is conforming
/// code — else ZF = 0; never a fault for a bad selector (SDM Vol. 2B).
/// Linux's MDS mitigation runs `verw` on every return to user mode.
pub(crate) fn verr_verw(c: &mut Core, op: &Op) -> R {
    if !c.protected() {
        return Err(fault(Exception::UD));
    }
    let sel = c.operand(op, 0, 2)? as u16;
    let write = op.instr.mnemonic() == Mnemonic::Verw;
    let ok = segment_verifies(c, sel, write)?;
    c.cpu.rflags = if ok {
        c.cpu.rflags | ZF
    } else {
        c.cpu.rflags & !ZF
    };
    Ok(())
}

fn segment_verifies(c: &mut Core, sel: u16, write: bool) -> Result<bool, Stop> {
    if sel & !3 == 0 {
        return Ok(false);
    }
    let limit = if sel & 4 != 0 {
        if c.cpu.ldt.unusable || c.cpu.ldt.selector & !3 == 0 {
            return Ok(false);
        }
        u64::from(c.cpu.ldt.limit)
    } else {
        u64::from(c.cpu.gdt.limit)
    };
    if u64::from(sel & !7) + 7 > limit {
        return Ok(false);
    }
    // Inside the table: reading it may still page-fault, as on hardware.
    let raw = c.descriptor(sel, Exception::GP)?;
    let access = (raw >> 40) & 0xff;
    let present = access & 0x80 != 0;
    let code_or_data = access & 0x10 != 0;
    let code = access & 0x08 != 0;
    let conforming_or_writable = access & 0x04 != 0;
    let readable_or_writable = access & 0x02 != 0;
    let dpl = ((access >> 5) & 3) as u8;
    let rpl = (sel & 3) as u8;
    if !present || !code_or_data {
        return Ok(false);
    }
    let conforming_code = code && conforming_or_writable;
    if !conforming_code && dpl < c.cpu.cpl().max(rpl) {
        return Ok(false);
    }
    Ok(if write {
        !code && readable_or_writable
    } else {
        !code || readable_or_writable
    })
}
