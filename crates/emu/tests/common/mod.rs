//! Test scaffolding shared by the emulator's integration tests: a 64-bit
//! guest (flat, identity-mapped with 1 GiB pages), and random values
//! shaped for instruction inputs (from `testkit`'s seeded generator).

#![allow(dead_code)]

use hypervisor::GuestRam;
use std::sync::Arc;

use emu::{CpuState, Emulator};
use hypervisor::x86::Segment;
use vm_memory::GuestAddress;

pub const CODE64_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
pub const DATA64_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;

/// `testkit`'s generator, plus values shaped for instruction inputs.
pub struct Rng(testkit::Rng);

impl Rng {
    /// The stream named `stream` of the running test's seed
    /// (`testkit::seed`, which prints it for replay).
    pub fn seeded(stream: impl std::hash::Hash) -> Self {
        Rng(testkit::Rng::derived(testkit::seed(), stream))
    }

    pub fn next(&mut self) -> u64 {
        self.0.next()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        self.0.pick(items)
    }

    /// A register value biased towards the edges where flags change:
    /// zero, one, all-ones, sign boundaries at every width, small numbers.
    pub fn value(&mut self) -> u64 {
        const EDGES: [u64; 14] = [
            0,
            1,
            2,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
        ];
        match self.below(8) {
            0 => self.pick(&EDGES),
            1 => self.pick(&EDGES).wrapping_neg(),
            2 => self.below(64),
            3 => self.pick(&EDGES) ^ (self.next() & 0xffff_ffff_0000_0000),
            4 => self.next() & 0xff,
            5 => self.next() & 0xffff,
            _ => self.next(),
        }
    }
}

/// Long-mode CPU state: 64-bit CS, flat data segments, CR0.PE|PG and
/// EFER.LME|LMA (CR3 is left to the caller).
pub fn long_mode(cpu: &mut CpuState) {
    cpu.segs[1] = Segment::from_descriptor(8, CODE64_DESCRIPTOR);
    let data = Segment::from_descriptor(16, DATA64_DESCRIPTOR);
    for i in [0, 2, 3, 4, 5] {
        cpu.segs[i] = data;
    }
    cpu.cr0 = 0x8000_0011;
    cpu.cr4 = 1 << 5;
    cpu.efer = (1 << 8) | (1 << 10);
}

pub fn memory(size: usize) -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Where [`emulator`] puts its identity-mapping page tables.
pub const TABLES: u64 = 0xe000;

/// Writes a PML4 at `pml4` and a PDPT right after it identity-mapping the
/// low 4 GiB with 1 GiB pages (writable, user, executable).
pub fn identity_tables(mem: &GuestRam, pml4: u64) {
    use vm_memory::Bytes;
    let pdpt = pml4 + 0x1000;
    mem.write_obj(pdpt | 0x7, GuestAddress(pml4)).expect("pml4");
    for i in 0..4u64 {
        mem.write_obj((i << 30) | 0x87, GuestAddress(pdpt + i * 8))
            .expect("pdpt");
    }
}

/// A 64-bit emulator with identity paging (tables at [`TABLES`]) that
/// reports every exception as an exit instead of delivering it.
pub fn emulator(mem: &GuestRam) -> Emulator {
    let cpuid: Arc<[hypervisor::x86::CpuidEntry]> = emu::cpuid::table(0, 1).into();
    let mut e = Emulator::new(mem, cpuid);
    identity_tables(mem, TABLES);
    long_mode(e.cpu_mut());
    e.cpu_mut().cr3 = TABLES;
    e.set_exception_exits(u32::MAX);
    e
}
