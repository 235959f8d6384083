//! Stand-ins, run from the vCPU loop, for instructions the executor does
//! not implement yet but Linux executes on every CPU. Each is a #UD the
//! loop intercepted; if it is not one of these, the loop lets the guest
//! see the #UD after all.
//!
//! - `TZCNT` (`F3 0F BC`) / `LZCNT` (`F3 0F BD`): Linux's `__ffs()` is
//!   `rep; bsf`, which CPUs without BMI1/ABM (like the CPUID model here)
//!   execute as plain `BSF`/`BSR`. iced-x86 decodes the encoding as
//!   TZCNT/LZCNT and the executor has no handler, so these run here as
//!   BSF/BSR. Remove once exec/ maps them to its BSF/BSR handlers.
//! - `SGDT`/`SIDT` (`0F 01 /0`, `/1`, memory form): Linux's
//!   `native_load_tr_desc()` and `store_idt()`.
//! - `MOV r64, DRn` / `MOV DRn, r64` (`0F 21`, `0F 23`): Linux's
//!   `pv_native_get_debugreg()`/`set_debugreg()` in `cpu_init()` and on
//!   every context switch of a ptraced task. The debug registers are kept
//!   (no breakpoints fire).
//! - `VERW` (`0F 00 /5`): Linux's MDS mitigation (`CLEAR_CPU_BUFFERS`,
//!   chosen for this CPU model) runs `verw` on every return to user mode,
//!   after SWAPGS — a #UD there is fatal.
//!
//! And one #GP: `IN`/`OUT` at CPL > IOPL is allowed by the TSS I/O
//! permission bitmap (`ioperm(2)`), which the executor does not consult
//! yet ([`port_io_at`]); vessel's guest exit-status helper relies on it.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::state::{rflags, seg, CpuState};

/// GPR number of a 16/32/64-bit general register.
fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    let n = (full as u32).checked_sub(Register::RAX as u32)?;
    (n < 16).then_some(n as usize)
}

fn read_gpr(cpu: &CpuState, r: Register) -> Option<u64> {
    let v = cpu.gpr[gpr_index(r)?];
    Some(match r.size() {
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    })
}

fn write_gpr(cpu: &mut CpuState, r: Register, v: u64) -> Option<()> {
    let i = gpr_index(r)?;
    cpu.gpr[i] = match r.size() {
        2 => (cpu.gpr[i] & !0xffff) | (v & 0xffff),
        // 32-bit writes zero-extend.
        4 => v & 0xffff_ffff,
        _ => v,
    };
    Some(())
}

/// Reads the memory operand of `insn` (64-bit mode only, RAM only).
fn read_mem(cpu: &CpuState, memory: &GuestMemoryMmap, insn: &Instruction) -> Option<u64> {
    let ea = mem_address(cpu, insn)?;
    let size = insn.memory_size().size();
    let mut v = 0u64;
    for k in 0..size.min(8) as u64 {
        let pa = crate::diag::translate(cpu, memory, ea.wrapping_add(k))?;
        let b: u8 = memory.read_obj(GuestAddress(pa)).ok()?;
        v |= u64::from(b) << (8 * k);
    }
    Some(v)
}

/// State the stand-ins keep per vCPU.
#[derive(Debug, Clone)]
pub struct CompatState {
    /// DR0-DR7 (DR4/DR5 alias DR6/DR7 with CR4.DE clear).
    pub dr: [u64; 8],
    /// Guest-physical bytes written by the last stand-in (for code
    /// invalidation by the caller).
    pub written: Vec<(u64, u64)>,
}

impl Default for CompatState {
    fn default() -> Self {
        let mut dr = [0; 8];
        dr[6] = 0xffff_0ff0;
        dr[7] = 0x400;
        CompatState {
            dr,
            written: Vec::new(),
        }
    }
}

/// The linear address of `insn`'s memory operand (64-bit mode only).
fn mem_address(cpu: &CpuState, insn: &Instruction) -> Option<u64> {
    if cpu.bitness() != 64 {
        return None;
    }
    insn.virtual_address(0, 0, |reg, _, _| match reg {
        Register::FS => Some(cpu.segs[seg::FS].base),
        Register::GS => Some(cpu.segs[seg::GS].base),
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::RIP => Some(insn.next_ip()),
        r => read_gpr(cpu, r),
    })
}

/// Writes `bytes` at linear `lin`; all-or-nothing per byte translation.
fn write_linear(
    cpu: &CpuState,
    memory: &GuestMemoryMmap,
    lin: u64,
    bytes: &[u8],
    state: &mut CompatState,
) -> Option<()> {
    let mut pas = Vec::with_capacity(bytes.len());
    for k in 0..bytes.len() as u64 {
        pas.push(crate::diag::translate(cpu, memory, lin.wrapping_add(k))?);
    }
    for (pa, b) in pas.iter().zip(bytes) {
        memory.write_obj(*b, GuestAddress(*pa)).ok()?;
        state.written.push((*pa, 1));
    }
    Some(())
}

/// Executes the instruction at RIP if it is one this module stands in
/// for; true if it did (RIP then points past it). Guest-physical bytes it
/// wrote are listed in `state.written`.
pub fn emulate_ud(cpu: &mut CpuState, memory: &GuestMemoryMmap, state: &mut CompatState) -> bool {
    state.written.clear();
    let bytes = crate::diag::code_bytes(cpu, memory);
    let mut decoder = Decoder::with_ip(cpu.bitness(), &bytes, cpu.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if cpu.cpl() == 0 {
        if let Some(done) = system(cpu, memory, state, &insn) {
            if done {
                cpu.rip = insn.next_ip();
            }
            return done;
        }
    }
    let forward = match insn.code() {
        Code::Tzcnt_r16_rm16 | Code::Tzcnt_r32_rm32 | Code::Tzcnt_r64_rm64 => true,
        Code::Lzcnt_r16_rm16 | Code::Lzcnt_r32_rm32 | Code::Lzcnt_r64_rm64 => false,
        _ => return false,
    };
    let dst = insn.op0_register();
    let src = match insn.op1_kind() {
        OpKind::Register => read_gpr(cpu, insn.op1_register()),
        OpKind::Memory => read_mem(cpu, memory, &insn),
        _ => None,
    };
    // (The system stand-ins above are CPL 0 only; at CPL 3 they stay #UD
    // rather than the #GP hardware gives, which a user program survives
    // the same way.)
    let Some(src) = src else {
        return false;
    };
    if src == 0 {
        // BSF/BSR of zero: ZF set, destination unchanged.
        cpu.rflags |= rflags::ZF;
    } else {
        cpu.rflags &= !rflags::ZF;
        let index = if forward {
            src.trailing_zeros()
        } else {
            63 - src.leading_zeros()
        };
        if write_gpr(cpu, dst, u64::from(index)).is_none() {
            return false;
        }
    }
    cpu.rip = insn.next_ip();
    true
}

/// The CPL-0 system instructions: `None` if `insn` is not one of them,
/// `Some(done)` otherwise.
fn system(
    cpu: &mut CpuState,
    memory: &GuestMemoryMmap,
    state: &mut CompatState,
    insn: &Instruction,
) -> Option<bool> {
    match insn.code() {
        Code::Sgdt_m1664 | Code::Sidt_m1664 => {
            let table = if insn.code() == Code::Sgdt_m1664 {
                cpu.gdt
            } else {
                cpu.idt
            };
            let mut bytes = [0u8; 10];
            bytes[..2].copy_from_slice(&table.limit.to_le_bytes());
            bytes[2..].copy_from_slice(&table.base.to_le_bytes());
            let Some(lin) = mem_address(cpu, insn) else {
                return Some(false);
            };
            Some(write_linear(cpu, memory, lin, &bytes, state).is_some())
        }
        Code::Mov_r64_dr => {
            let n = dr_index(insn.op1_register())?;
            let v = state.dr[n];
            Some(write_gpr(cpu, insn.op0_register(), v).is_some())
        }
        Code::Mov_dr_r64 => {
            let n = dr_index(insn.op0_register())?;
            let Some(v) = read_gpr(cpu, insn.op1_register()) else {
                return Some(false);
            };
            state.dr[n] = match n {
                6 => (v & 0xf00f) | 0xffff_0ff0,
                7 => (v & 0xffff_2bff) | 0x400,
                _ => v,
            };
            Some(true)
        }
        _ if matches!(insn.mnemonic(), Mnemonic::Verw | Mnemonic::Verr) => {
            let selector = match insn.op0_kind() {
                OpKind::Register => read_gpr(cpu, insn.op0_register()),
                OpKind::Memory => read_mem(cpu, memory, insn),
                _ => None,
            };
            let Some(selector) = selector else {
                return Some(false);
            };
            let ok = verify_segment(
                cpu,
                memory,
                selector as u16,
                insn.mnemonic() == Mnemonic::Verw,
            );
            if ok {
                cpu.rflags |= rflags::ZF;
            } else {
                cpu.rflags &= !rflags::ZF;
            }
            Some(true)
        }
        _ => None,
    }
}

/// VERR/VERW: whether `selector` names a GDT code/data segment readable
/// (`write`: writable data) at the current privilege. LDT selectors are
/// reported unusable.
fn verify_segment(cpu: &CpuState, memory: &GuestMemoryMmap, selector: u16, write: bool) -> bool {
    let index = u64::from(selector >> 3);
    if index == 0 || selector & 4 != 0 || index * 8 + 7 > u64::from(cpu.gdt.limit) {
        return false;
    }
    let mut raw = 0u64;
    for k in 0..8u64 {
        let Some(pa) =
            crate::diag::translate(cpu, memory, cpu.gdt.base.wrapping_add(index * 8 + k))
        else {
            return false;
        };
        let Ok(b) = memory.read_obj::<u8>(GuestAddress(pa)) else {
            return false;
        };
        raw |= u64::from(b) << (8 * k);
    }
    let access = (raw >> 40) & 0xff;
    let present = access & 0x80 != 0;
    let code_or_data = access & 0x10 != 0;
    let code = access & 0x08 != 0;
    let conforming_or_writable = access & 0x04 != 0;
    let readable_or_writable = access & 0x02 != 0;
    let dpl = ((access >> 5) & 3) as u8;
    let rpl = (selector & 3) as u8;
    if !present || !code_or_data {
        return false;
    }
    let conforming_code = code && conforming_or_writable;
    if !conforming_code && dpl < cpu.cpl().max(rpl) {
        return false;
    }
    if write {
        !code && readable_or_writable
    } else {
        !code || readable_or_writable
    }
}

/// A port access [`port_io_at`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortIo {
    In { port: u16, size: u8 },
    Out { port: u16, size: u8, data: u32 },
}

/// Reads `len` bytes at linear `lin` (RAM only).
fn read_linear(cpu: &CpuState, memory: &GuestMemoryMmap, lin: u64, len: u64) -> Option<u64> {
    let mut v = 0u64;
    for k in 0..len.min(8) {
        let pa = crate::diag::translate(cpu, memory, lin.wrapping_add(k))?;
        let b: u8 = memory.read_obj(GuestAddress(pa)).ok()?;
        v |= u64::from(b) << (8 * k);
    }
    Some(v)
}

/// Whether the TSS I/O permission bitmap allows `size` bytes at `port`
/// (SDM 19.5.2): all their bits clear, and inside the TSS limit.
fn tss_allows(cpu: &CpuState, memory: &GuestMemoryMmap, port: u16, size: u8) -> bool {
    let tss = cpu.tr.base;
    let limit = u64::from(cpu.tr.limit);
    if limit < 0x67 {
        return false;
    }
    let Some(map) = read_linear(cpu, memory, tss + 0x66, 2) else {
        return false;
    };
    let first = map + u64::from(port / 8);
    // Two bytes: the access may straddle a byte of the bitmap.
    if first + 1 > limit {
        return false;
    }
    let Some(bits) = read_linear(cpu, memory, tss + first, 2) else {
        return false;
    };
    let mask = ((1u64 << size) - 1) << (port % 8);
    bits & mask == 0
}

/// The `IN`/`OUT` (accumulator forms) at RIP, if it is one the TSS I/O
/// bitmap allows at the current CPL > IOPL; with the RIP after it.
pub fn port_io_at(cpu: &CpuState, memory: &GuestMemoryMmap) -> Option<(PortIo, u64)> {
    let bytes = crate::diag::code_bytes(cpu, memory);
    let mut decoder = Decoder::with_ip(cpu.bitness(), &bytes, cpu.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let dx = (cpu.gpr[2] & 0xffff) as u16;
    let (io, acc) = match insn.mnemonic() {
        Mnemonic::In => {
            let port = match insn.op1_kind() {
                OpKind::Immediate8 => u16::from(insn.immediate8()),
                _ => dx,
            };
            (PortIo::In { port, size: 0 }, insn.op0_register())
        }
        Mnemonic::Out => {
            let port = match insn.op0_kind() {
                OpKind::Immediate8 => u16::from(insn.immediate8()),
                _ => dx,
            };
            (
                PortIo::Out {
                    port,
                    size: 0,
                    data: 0,
                },
                insn.op1_register(),
            )
        }
        _ => return None,
    };
    let size = match acc {
        Register::AL => 1u8,
        Register::AX => 2,
        Register::EAX => 4,
        _ => return None,
    };
    let iopl = ((cpu.rflags >> 12) & 3) as u8;
    if cpu.cpl() <= iopl {
        // The executor allows these itself; a #GP here is something else.
        return None;
    }
    let io = match io {
        PortIo::In { port, .. } => PortIo::In { port, size },
        PortIo::Out { port, .. } => PortIo::Out {
            port,
            size,
            // Truncation keeps the accumulator's low 32 bits.
            data: cpu.gpr[0] as u32,
        },
    };
    let port = match io {
        PortIo::In { port, .. } | PortIo::Out { port, .. } => port,
    };
    tss_allows(cpu, memory, port, size).then_some((io, insn.next_ip()))
}

/// DR0-DR7 as an index (DR4/DR5 alias DR6/DR7: CR4.DE is not supported).
fn dr_index(r: Register) -> Option<usize> {
    let n = (r as u32).checked_sub(Register::DR0 as u32)? as usize;
    match n {
        0..=3 | 6 | 7 => Some(n),
        4 | 5 => Some(n + 2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &[u8], setup: impl FnOnce(&mut CpuState)) -> (bool, CpuState) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        memory.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut cpu = CpuState::reset();
        // Flat 32-bit protected mode without paging is enough here.
        cpu.cr0 |= 1;
        cpu.segs[seg::CS].base = 0;
        cpu.segs[seg::CS].db = true;
        cpu.rip = 0x1000;
        setup(&mut cpu);
        let done = emulate_ud(&mut cpu, &memory, &mut CompatState::default());
        (done, cpu)
    }

    #[test]
    fn tzcnt_runs_as_bsf() {
        // tzcnt ecx, eax
        let (done, cpu) = run(&[0xf3, 0x0f, 0xbc, 0xc8], |c| c.gpr[0] = 0x50);
        assert!(done);
        assert_eq!(cpu.gpr[1], 4);
        assert_eq!(cpu.rip, 0x1004);
        assert_eq!(cpu.rflags & rflags::ZF, 0);
        // Zero source: ZF, destination kept.
        let (done, cpu) = run(&[0xf3, 0x0f, 0xbc, 0xc8], |c| c.gpr[1] = 77);
        assert!(done);
        assert_eq!(cpu.gpr[1], 77);
        assert_ne!(cpu.rflags & rflags::ZF, 0);
    }

    #[test]
    fn verw_checks_the_selector() {
        // verw ax, with ZF clear before: selector 0 is never writable.
        let (done, cpu) = run(&[0x0f, 0x00, 0xe8], |c| {
            c.gpr[0] = 0;
            c.rflags |= rflags::ZF;
        });
        assert!(done);
        assert_eq!(cpu.rflags & rflags::ZF, 0);
        assert_eq!(cpu.rip, 0x1003);
    }

    #[test]
    fn port_io_follows_the_tss_bitmap() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // out dx, al at 0x1000.
        memory.write_slice(&[0xee], GuestAddress(0x1000)).unwrap();
        // TSS at 0x2000, bitmap at +0x68: all denied but port 0x501.
        memory.write_obj(0x68u16, GuestAddress(0x2066)).unwrap();
        memory
            .write_slice(&[0xff; 0x102], GuestAddress(0x2068))
            .unwrap();
        memory
            .write_obj(0xfdu8, GuestAddress(0x2068 + 0x501 / 8))
            .unwrap();
        let mut cpu = CpuState::reset();
        cpu.cr0 |= 1;
        cpu.segs[seg::CS].base = 0;
        cpu.segs[seg::CS].db = true;
        cpu.segs[seg::CS].selector = 0x1b;
        cpu.segs[seg::CS].dpl = 3;
        cpu.segs[seg::SS].dpl = 3;
        cpu.segs[seg::SS].selector = 0x23;
        cpu.rip = 0x1000;
        cpu.tr.base = 0x2000;
        cpu.tr.limit = 0x68 + 0x101;
        cpu.gpr[0] = 7;
        cpu.gpr[2] = 0x501;
        assert_eq!(cpu.cpl(), 3);
        assert_eq!(
            port_io_at(&cpu, &memory),
            Some((
                PortIo::Out {
                    port: 0x501,
                    size: 1,
                    data: 7
                },
                0x1001
            ))
        );
        cpu.gpr[2] = 0x500;
        assert_eq!(port_io_at(&cpu, &memory), None);
        // Beyond the TSS limit: denied.
        cpu.gpr[2] = 0xffff;
        assert_eq!(port_io_at(&cpu, &memory), None);
    }

    #[test]
    fn lzcnt_runs_as_bsr_and_others_are_left_alone() {
        let (done, cpu) = run(&[0xf3, 0x0f, 0xbd, 0xc8], |c| c.gpr[0] = 0x50);
        assert!(done);
        assert_eq!(cpu.gpr[1], 6);
        // ud2 stays a #UD.
        let (done, cpu) = run(&[0x0f, 0x0b], |_| {});
        assert!(!done);
        assert_eq!(cpu.rip, 0x1000);
    }
}
