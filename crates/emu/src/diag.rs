//! Diagnostics for a guest the emulator had to stop: where it was and
//! which instruction it was looking at, read from guest memory without
//! touching the emulator's TLB or block cache.

use hypervisor::GuestRam;
use iced_x86::{Decoder, DecoderOptions};
use vm_memory::{Bytes, GuestAddress};

use crate::state::{seg, CpuState};

/// Longest x86 instruction.
const MAX_INSN: usize = 15;

const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates linear `lin` with the guest's page tables (4-level long mode,
/// or no paging). `None` when unmapped or in a mode not handled here.
pub(crate) fn translate(cpu: &CpuState, memory: &GuestRam, lin: u64) -> Option<u64> {
    const CR0_PG: u64 = 1 << 31;
    const EFER_LMA: u64 = 1 << 10;
    if cpu.cr0 & CR0_PG == 0 {
        return Some(lin & 0xffff_ffff);
    }
    if cpu.efer & EFER_LMA == 0 {
        return None;
    }
    let mut table = cpu.cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (lin >> shift) & 0x1ff;
        let entry: u64 = memory.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        if level == 0 || (level <= 2 && entry & PTE_LARGE != 0) {
            let page_mask = (1u64 << shift) - 1;
            let frame = entry & ADDR_MASK & !page_mask;
            return Some(frame | (lin & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Reads up to 15 bytes of code at the current CS:RIP (fewer where the
/// next page is unmapped).
pub fn code_bytes(cpu: &CpuState, memory: &GuestRam) -> Vec<u8> {
    let lin = if cpu.bitness() == 64 {
        cpu.rip
    } else {
        cpu.segs[seg::CS].base.wrapping_add(cpu.rip) & 0xffff_ffff
    };
    let mut bytes = Vec::with_capacity(MAX_INSN);
    for i in 0..MAX_INSN as u64 {
        let Some(pa) = translate(cpu, memory, lin.wrapping_add(i)) else {
            break;
        };
        match memory.read_obj::<u8>(GuestAddress(pa)) {
            Ok(b) => bytes.push(b),
            Err(_) => break,
        }
    }
    bytes
}

/// "rip 0x… (cs 0x10, 64-bit): 0f ae 00 = Fxsave_m512byte" — the place
/// and instruction the vCPU stopped at.
pub fn describe(cpu: &CpuState, memory: Option<&GuestRam>) -> String {
    let mut s = format!(
        "rip {:#x} (cs {:#x}, {}-bit, cpl {})",
        cpu.rip,
        cpu.segs[seg::CS].selector,
        cpu.bitness(),
        cpu.cpl()
    );
    let Some(memory) = memory else {
        return s;
    };
    let bytes = code_bytes(cpu, memory);
    if bytes.is_empty() {
        s.push_str(": code not readable");
        return s;
    }
    let mut decoder = Decoder::with_ip(cpu.bitness(), &bytes, cpu.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let len = if insn.is_invalid() {
        bytes.len().min(8)
    } else {
        insn.len().min(bytes.len())
    };
    let hex: Vec<String> = bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
    s.push_str(&format!(": {}", hex.join(" ")));
    if insn.is_invalid() {
        s.push_str(" (undecodable)");
    } else {
        s.push_str(&format!(" = {:?}", insn.code()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_real_mode_code() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // cpuid at 0x1000.
        memory
            .write_slice(&[0x0f, 0xa2], GuestAddress(0x1000))
            .unwrap();
        let mut cpu = CpuState::reset();
        cpu.segs[seg::CS].base = 0;
        cpu.segs[seg::CS].selector = 0;
        cpu.rip = 0x1000;
        let d = describe(&cpu, Some(&memory));
        assert!(d.contains("0f a2"), "{d}");
        assert!(d.contains("Cpuid"), "{d}");
        // Outside RAM: no bytes, no panic.
        cpu.rip = 0xffff;
        cpu.segs[seg::CS].base = 0xfff0_0000;
        assert!(describe(&cpu, Some(&memory)).contains("not readable"));
    }
}
