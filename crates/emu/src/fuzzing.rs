//! Native runs against the interpreter, for the cargo-fuzz target
//! `native_runs` in `fuzz/` and the emulator's tests (`tests/native.rs`,
//! which also replays the target's corpus): guest code runs once with
//! native runs on and once with the interpreter alone, from the same
//! state, and must end in the same state: general-purpose registers,
//! status flags but AF, RIP and CR2, every exit on the way (MMIO reads
//! and writes, the exception that ended it) and every byte of guest RAM,
//! page tables (accessed and dirty bits) and code included.
//!
//! The guest: 1 MiB of RAM, 64-bit code at [`CODE`] on 4 KiB pages mapping
//! the low 2 MiB, but for a page that is not present ([`UNMAPPED`]), one
//! that is read-only ([`READ_ONLY`], with CR0.WP) and MMIO beyond RAM
//! ([`MMIO`]); exceptions are reported as exits.

use std::sync::Arc;

use hypervisor::x86::Segment;
use hypervisor::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::{Emulator, Exit};

pub const RAM: usize = 0x10_0000;
pub const PML4: u64 = 0x70000;
pub const CODE: u64 = 0x4000;
pub const DATA: u64 = 0x20000;
pub const DATA_END: u64 = 0x30000;
/// Not present in the page tables.
pub const UNMAPPED: u64 = 0x30000;
/// Present, not writable.
pub const READ_ONLY: u64 = 0x31000;
/// Mapped, beyond RAM: MMIO.
pub const MMIO: u64 = 0x1ff000;
pub const FS_BASE: u64 = 0x24000;
pub const GS_BASE: u64 = 0x26000;
pub const STACK: u64 = 0x28000;
/// The status flags compared: CF PF ZF SF OF (AF is left undefined by
/// AND, OR, XOR and TEST, and hosts differ there).
pub const COMPARED_FLAGS: u64 = 0x8c5;

/// Registers aimed at the interesting places (register number, value):
/// RBX into the data, RSI 4 bytes before a page end, R11 the unmapped
/// page, R12 MMIO, R13 the read-only page, R14 the code page, RSP the
/// stack. R10 is left to the caller (a small index in the tests).
pub const POINTERS: [(usize, u64); 7] = [
    (3, DATA + 0x100),
    (6, DATA + 0x2000 - 4),
    (11, UNMAPPED + 0x10),
    (12, MMIO + 0x20),
    (13, READ_ONLY + 0x40),
    (14, CODE + 0xc00),
    (4, STACK),
];

/// What a run did and where it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Trace {
    pub exits: Vec<String>,
    pub gpr: [u64; 16],
    pub flags: u64,
    pub rip: u64,
    pub cr2: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub ram: Vec<u8>,
}

/// The guest's memory: its page tables, `data` at [`DATA`], `code` at
/// [`CODE`].
pub fn memory(code: &[u8], data: &[u8]) -> GuestRam {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest memory");
    let (pdpt, pd, pt) = (PML4 + 0x1000, PML4 + 0x2000, PML4 + 0x3000);
    let mut tables = vec![(PML4, pdpt | 7), (pdpt, pd | 7), (pd, pt | 7)];
    for page in 0..512u64 {
        let entry = match page << 12 {
            UNMAPPED => 0,
            READ_ONLY => READ_ONLY | 5,
            addr => addr | 7,
        };
        tables.push((pt + page * 8, entry));
    }
    for (at, entry) in tables {
        mem.write_obj(entry, GuestAddress(at)).expect("page tables");
    }
    let data = &data[..data.len().min((DATA_END - DATA) as usize)];
    mem.write_slice(data, GuestAddress(DATA)).expect("data");
    let code = &code[..code.len().min(0x1000)];
    mem.write_slice(code, GuestAddress(CODE)).expect("code");
    mem
}

/// An emulator over `mem` (made by [`memory`]) with its code-page map
/// `code` (shared with other vCPUs of `mem`, or its own with `None`):
/// 64-bit mode with the page tables of [`memory`], registers `regs` and
/// status flags `flags`, at [`CODE`], native code from a block's first
/// run, every exception an exit.
pub fn emulator(
    mem: &GuestRam,
    code: Option<crate::mem::CodePages>,
    regs: &[u64; 16],
    flags: u64,
) -> Emulator {
    let cpuid: Arc<[hypervisor::x86::CpuidEntry]> = crate::cpuid::table(0, 1).into();
    let mut e = Emulator::with_code_pages(mem, cpuid, code);
    // Native code from a block's first run: these programs are short.
    e.compile_after(1);
    e.set_exception_exits(u32::MAX);
    let cpu = e.cpu_mut();
    cpu.segs[1] = Segment::from_descriptor(8, 0x00af_9b00_0000_ffff);
    let flat = Segment::from_descriptor(16, 0x00cf_9300_0000_ffff);
    for s in [0, 2, 3, 4, 5] {
        cpu.segs[s] = flat;
    }
    cpu.segs[4].base = FS_BASE;
    cpu.segs[5].base = GS_BASE;
    // PE, PG and WP (supervisor writes honour read-only pages); PAE and
    // OSFXSR (SSE instructions run); EFER.LME and LMA.
    cpu.cr0 = 0x8001_0011;
    cpu.cr4 = (1 << 5) | (1 << 9);
    cpu.efer = (1 << 8) | (1 << 10);
    cpu.cr3 = PML4;
    cpu.gpr = *regs;
    for (n, x) in cpu.fpu.xmm.iter_mut().enumerate() {
        *x = (u128::from(regs[n]) << 64) | u128::from(regs[15 - n].rotate_left(7));
    }
    cpu.rflags = 2 | (flags & 0x8d5);
    cpu.rip = CODE;
    e
}

/// Runs `code` (at most a page) from [`CODE`] with registers `regs` and
/// status flags `flags`, `data` at [`DATA`], `passes` times (each pass
/// starts at [`CODE`] again after a HLT, from the state the last one left:
/// later passes find the TLB filled), until an exception, 1000 exits or
/// an instruction budget (recorded as the last exit) ends it. Returns what
/// it did, and the emulator.
pub fn run(
    code: &[u8],
    regs: &[u64; 16],
    flags: u64,
    data: &[u8],
    passes: usize,
    native: bool,
) -> (Trace, Emulator) {
    let mem = memory(code, data);
    let mut e = emulator(&mem, None, regs, flags);
    e.set_native_runs(native);
    let mut exits = Vec::new();
    let mut pass = 1;
    for _ in 0..1000 {
        match e.run(100_000, None) {
            Exit::Halt if pass < passes => {
                pass += 1;
                e.cpu_mut().rip = CODE;
            }
            Exit::Halt => break,
            Exit::MmioRead { addr, size } => {
                exits.push(format!("read {addr:#x}/{size}"));
                e.set_mmio_read_data(addr.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            Exit::MmioWrite { addr, size, data } => {
                exits.push(format!("write {addr:#x}/{size} {data:#x}"));
            }
            Exit::Exception(x) => {
                exits.push(format!("exception {} {:?}", x.vector, x.error_code));
                break;
            }
            other => {
                exits.push(format!("{other:?}"));
                break;
            }
        }
    }
    let mut ram = vec![0; RAM];
    mem.read_slice(&mut ram, GuestAddress(0))
        .expect("guest RAM");
    let cpu = e.cpu();
    let trace = Trace {
        exits,
        gpr: cpu.gpr,
        flags: cpu.rflags & COMPARED_FLAGS,
        rip: cpu.rip,
        cr2: cpu.cr2,
        xmm: cpu.fpu.xmm,
        mxcsr: cpu.fpu.mxcsr,
        ram,
    };
    (trace, e)
}

/// Panics with both states unless native runs and the interpreter agree.
pub fn assert_same(what: &str, native: &Trace, interpreted: &Trace) {
    if native == interpreted {
        return;
    }
    let ram = native
        .ram
        .iter()
        .zip(&interpreted.ram)
        .position(|(a, b)| a != b);
    panic!(
        "{what}: native vs interpreted\nexits {:?}\n   vs {:?}\ngpr {:x?}\n vs {:x?}\n\
         flags {:#x} vs {:#x}, rip {:#x} vs {:#x}, cr2 {:#x} vs {:#x}, mxcsr {:#x} vs {:#x}\n\
         xmm {:x?}\n vs {:x?}\n\
         first RAM difference at {ram:x?}",
        native.exits,
        interpreted.exits,
        native.gpr,
        interpreted.gpr,
        native.flags,
        interpreted.flags,
        native.rip,
        interpreted.rip,
        native.cr2,
        interpreted.cr2,
        native.mxcsr,
        interpreted.mxcsr,
        native.xmm,
        interpreted.xmm
    );
}

/// Bytes of an input before its code: 8 per register, then the flags.
pub const INPUT_HEADER: usize = 16 * 8 + 1;

/// The fuzz target: `input` is the 16 registers (8 bytes each, little
/// endian; those of [`POINTERS`] replaced), one byte of status flags,
/// then the code, run three times with the data page filled with a
/// pattern. Inputs whose code (decoded straight through) holds an
/// instruction that leaves a flag other than AF undefined, or that reads
/// AF into a register or memory, are skipped: there native runs give the
/// host's answer and the interpreter its own, both right. Returns whether
/// the input was compared.
pub fn native_runs(input: &[u8]) -> bool {
    if input.len() <= INPUT_HEADER {
        return false;
    }
    let (header, code) = input.split_at(INPUT_HEADER);
    let code = &code[..code.len().min(0x1000)];
    if !comparable(code) {
        return false;
    }
    let mut regs = [0u64; 16];
    for (n, r) in regs.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[n * 8..n * 8 + 8]);
        *r = u64::from_le_bytes(b);
    }
    for (n, v) in POINTERS {
        regs[n] = v;
    }
    let flags = (u64::from(header[128]) * 0x1111) & 0x8d5;
    let data: Vec<u8> = (0..DATA_END - DATA)
        .map(|n| (n * 7 + (n >> 8)) as u8)
        .collect();
    let (native, _) = run(code, &regs, flags, &data, 3, true);
    let (interpreted, _) = run(code, &regs, flags, &data, 3, false);
    // The instruction budget counts a native run once: code still running
    // when it is spent stopped at different places.
    let spent = |t: &Trace| t.exits.last().is_some_and(|e| e == "BudgetExhausted");
    if spent(&native) || spent(&interpreted) {
        return false;
    }
    assert_same("fuzz input", &native, &interpreted);
    true
}

/// Whether `code` holds no instruction whose result the two may
/// legitimately differ on (see [`native_runs`]).
pub fn comparable(code: &[u8]) -> bool {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, RflagsBits};
    // The code page holds zeros after the code: its last instruction may
    // run on into them (found by the fuzzer: `6b 35` ended an input, and
    // ran as IMUL, which leaves SF, ZF and PF undefined).
    let mut padded = code.to_vec();
    padded.extend_from_slice(&[0; 15]);
    let mut decoder = Decoder::with_ip(64, &padded, CODE, DecoderOptions::NONE);
    while decoder.position() < code.len() {
        let i = decoder.decode();
        if i.rflags_undefined() & !RflagsBits::AF != 0
            || matches!(
                i.mnemonic(),
                Mnemonic::Lahf
                    | Mnemonic::Pushf
                    | Mnemonic::Pushfq
                    | Mnemonic::Pushfd
                    | Mnemonic::Syscall
                    // The time and random numbers differ run to run
                    // (found by the corpus test's mutations: `48 0f 31`).
                    | Mnemonic::Rdtsc
                    | Mnemonic::Rdtscp
                    | Mnemonic::Rdrand
                    | Mnemonic::Rdseed
            )
        {
            return false;
        }
    }
    true
}
