//! Native runs against the interpreter: random straight-line programs of
//! register and memory instructions run once with native runs on and once
//! with the interpreter alone, from the same state, and must end in the
//! same state: general-purpose registers, status flags (but AF, which
//! logical instructions leave undefined), RIP and CR2, every exit on the
//! way (MMIO reads and writes, the exception that ended the program) and
//! every byte of guest RAM, page tables (accessed and dirty bits) and code
//! included.
//!
//! The memory operands cover what the native lookup must get right or
//! hand back: plain and indexed addresses, RSP-based (and PUSH, POP and
//! instructions moving RSP, which a run holds in a scratch register),
//! RIP-relative, FS and
//! GS overrides, accesses crossing into the next page, a page that is not
//! present (#PF mid-run), a read-only page (#PF on write), MMIO beyond RAM,
//! and writes to the code page the program runs from.

mod common;

use common::Rng;
use emu::{Emulator, Exit};
use hypervisor::GuestRam;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 0x10_0000;
const PML4: u64 = 0x70000;
const CODE: u64 = 0x4000;
const DATA: u64 = 0x20000;
const DATA_END: u64 = 0x30000;
/// Not present in the page tables.
const UNMAPPED: u64 = 0x30000;
/// Present, not writable.
const READ_ONLY: u64 = 0x31000;
/// Mapped, beyond RAM: MMIO.
const MMIO: u64 = 0x1ff000;
const FS_BASE: u64 = 0x24000;
const GS_BASE: u64 = 0x26000;
const STACK: u64 = 0x28000;
/// The status flags compared: CF PF ZF SF OF (AF is left undefined by
/// AND, OR, XOR and TEST, and hosts differ there).
const COMPARED_FLAGS: u64 = 0x8c5;

/// 4-level tables mapping the low 2 MiB with 4 KiB pages (user,
/// writable), but for [`UNMAPPED`] and [`READ_ONLY`].
fn memory() -> GuestRam {
    let mem = common::memory(RAM);
    let (pdpt, pd, pt) = (PML4 + 0x1000, PML4 + 0x2000, PML4 + 0x3000);
    mem.write_obj(pdpt | 7, GuestAddress(PML4)).unwrap();
    mem.write_obj(pd | 7, GuestAddress(pdpt)).unwrap();
    mem.write_obj(pt | 7, GuestAddress(pd)).unwrap();
    for page in 0..512u64 {
        let entry = match page << 12 {
            UNMAPPED => 0,
            READ_ONLY => READ_ONLY | 5,
            addr => addr | 7,
        };
        mem.write_obj(entry, GuestAddress(pt + page * 8)).unwrap();
    }
    mem
}

/// Value registers the random instructions compute in. RBP and R11-R15
/// stay free, so most runs have their scratch registers.
const VALUES: [AsmRegister64; 6] = [rax, rcx, rdx, rdi, r8, r9];
const VALUES32: [AsmRegister32; 6] = [eax, ecx, edx, edi, r8d, r9d];

/// Registers holding addresses (never written by the programs): RBX in
/// the data, RSI 4 bytes before a page end, R10 a small index, R11 the
/// unmapped page, R12 MMIO, R13 the read-only page, R14 the code page.
fn pointers(rng: &mut Rng) -> [(AsmRegister64, u64); 7] {
    [
        (rbx, DATA + 0x100 + rng.below(0x100)),
        (rsi, DATA + 0x2000 - 4),
        (r10, rng.below(16)),
        (r11, UNMAPPED + 0x10),
        (r12, MMIO + 0x20),
        (r13, READ_ONLY + 0x40),
        (r14, CODE + 0xc00),
    ]
}

/// A random memory operand of `size` bytes.
fn operand(rng: &mut Rng, data: CodeLabel) -> AsmMemoryOperand {
    let disp = rng.below(0x40) as i32;
    match rng.below(100) {
        0..=44 => ptr(rbx + disp),
        45..=54 => ptr(rbx + r10 * 8 + disp),
        55..=62 => ptr(rsp + disp),
        // Crossing into the next page for some sizes.
        63..=70 => ptr(rsi + (disp & 7)),
        71..=74 => ptr(data),
        75..=79 => ptr(rbx + disp).fs(),
        80..=83 => ptr(rbx + disp).gs(),
        84..=86 => ptr(r11 + disp),
        87..=91 => ptr(r12 + disp),
        92..=95 => ptr(r13 + disp),
        _ => ptr(r14 + disp),
    }
}

/// One random instruction: register-only or with a memory operand.
fn instruction(a: &mut CodeAssembler, rng: &mut Rng, data: CodeLabel) -> Result<(), IcedError> {
    let k = rng.below(VALUES.len() as u64) as usize;
    let (v, v32) = (VALUES[k], VALUES32[k]);
    let w = rng.pick(&VALUES);
    let m = operand(rng, data);
    let imm = rng.next() as i32 >> rng.below(32);
    let step = 8 * (1 + rng.below(4) as i32);
    match rng.below(38) {
        30 => a.push(v),
        31 => a.pop(v),
        32 => a.push(imm),
        33 => a.sub(rsp, step),
        34 => a.add(rsp, step),
        35 => a.mov(v, rsp),
        36 => a.lea(v, ptr(rsp + imm)),
        37 => a.push(v).and_then(|()| a.pop(w)),
        0 => a.add(v, w),
        1 => a.sub(v, imm),
        2 => a.adc(v, w),
        3 => a.xor(v32, imm),
        4 => a.lea(v, ptr(w + v * 2 + imm)),
        5 => a.inc(v),
        6 => a.mov(v, qword_ptr(m)),
        7 => a.mov(qword_ptr(m), v),
        8 => a.mov(dword_ptr(m), imm),
        9 => a.add(v, qword_ptr(m)),
        10 => a.sub(qword_ptr(m), v),
        11 => a.adc(dword_ptr(m), imm),
        12 => a.cmp(qword_ptr(m), v),
        13 => a.and(v32, dword_ptr(m)),
        14 => a.or(word_ptr(m), imm as i16 as i32),
        15 => a.test(byte_ptr(m), imm as i8 as i32),
        16 => a.movzx(v, byte_ptr(m)),
        17 => a.movsx(v, word_ptr(m)),
        18 => a.movsxd(v, dword_ptr(m)),
        19 => a.inc(qword_ptr(m)),
        20 => a.neg(dword_ptr(m)),
        21 => a.not(byte_ptr(m)),
        22 => a.shl(qword_ptr(m), 1),
        23 => a.sete(byte_ptr(m)),
        24 => a.cmovb(v, qword_ptr(m)),
        25 => a.xchg(qword_ptr(m), v),
        // IMUL leaves SF, ZF, AF and PF undefined: a CMP defines them
        // again before anything can stop.
        26 => a.imul_3(v, qword_ptr(m), 3).and_then(|()| a.cmp(v, w)),
        27 => a.sbb(v, qword_ptr(m)),
        28 => a.cmp(byte_ptr(m), imm as i8 as i32),
        _ => a.dec(word_ptr(m)),
    }
}

/// A program of `len` random instructions run three times (R15 counts:
/// the first time fills the TLB, the others hit it), HLT, then 32 bytes
/// of data for RIP-relative operands (on the code page).
fn program(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut data = a.create_label();
    let mut top = a.create_label();
    a.mov(r15, 3u64).unwrap();
    a.set_label(&mut top).unwrap();
    for _ in 0..len {
        // An instruction iced refuses (an immediate out of range) is
        // simply not part of the program.
        let _ = instruction(&mut a, rng, data);
    }
    a.dec(r15).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut data).unwrap();
    let bytes: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
    a.db(&bytes).unwrap();
    a.assemble(CODE).unwrap()
}

/// What a run did and where it ended.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    exits: Vec<String>,
    gpr: [u64; 16],
    flags: u64,
    rip: u64,
    cr2: u64,
    ram: Vec<u8>,
}

fn run(code: &[u8], regs: &[u64; 16], flags: u64, ram: &[u8], native: bool) -> (Trace, Emulator) {
    let mem = memory();
    mem.write_slice(ram, GuestAddress(DATA)).unwrap();
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let mut e = common::emulator(&mem);
    e.set_native_runs(native);
    let cpu = e.cpu_mut();
    cpu.cr3 = PML4;
    cpu.cr0 |= 1 << 16; // WP: supervisor writes honour read-only pages.
    cpu.gpr = *regs;
    cpu.rflags = 2 | flags;
    cpu.rip = CODE;
    cpu.segs[4].base = FS_BASE;
    cpu.segs[5].base = GS_BASE;
    let mut exits = Vec::new();
    for _ in 0..1000 {
        match e.run(100_000, None) {
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
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let mut all = vec![0; RAM];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    let cpu = e.cpu();
    let trace = Trace {
        exits,
        gpr: cpu.gpr,
        flags: cpu.rflags & COMPARED_FLAGS,
        rip: cpu.rip,
        cr2: cpu.cr2,
        ram: all,
    };
    (trace, e)
}

#[test]
fn random_programs_with_memory_operands_match_the_interpreter() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native runs need an x86-64 host");
        return;
    }
    let mut rng = Rng::seeded(("native memory runs", testkit::seed()));
    let (mut runs, mut exits) = (0, 0);
    for round in 0..1000 {
        let len = 4 + rng.below(40) as usize;
        let code = program(&mut rng, len);
        let mut regs = [0u64; 16];
        for r in regs.iter_mut() {
            *r = rng.value();
        }
        for (reg, value) in pointers(&mut rng) {
            regs[reg_index(reg)] = value;
        }
        regs[4] = STACK;
        let flags = rng.next() & 0x8d5;
        let ram: Vec<u8> = (DATA..DATA_END).map(|_| rng.next() as u8).collect();
        let (native, e) = run(&code, &regs, flags, &ram, true);
        let (interpreted, _) = run(&code, &regs, flags, &ram, false);
        runs += e.native_runs_executed();
        exits += e.native_run_exits();
        if native != interpreted {
            let first_ram = native
                .ram
                .iter()
                .zip(&interpreted.ram)
                .position(|(a, b)| a != b);
            panic!(
                "round {round}: native vs interpreted\nexits {:?}\n   vs {:?}\ngpr {:x?}\n vs {:x?}\n\
                 flags {:#x} vs {:#x}, rip {:#x} vs {:#x}, cr2 {:#x} vs {:#x}, first RAM difference at {first_ram:x?}\n\
                 code {code:02x?}",
                native.exits,
                interpreted.exits,
                native.gpr,
                interpreted.gpr,
                native.flags,
                interpreted.flags,
                native.rip,
                interpreted.rip,
                native.cr2,
                interpreted.cr2
            );
        }
    }
    // Otherwise the interpreter was compared with itself, or the lookup's
    // misses were never taken.
    eprintln!("{runs} native runs, {exits} left early");
    assert!(runs > 2000, "only {runs} native runs executed");
    assert!(exits > 500, "only {exits} native runs left early");
    assert!(
        runs - exits > 300,
        "only {} native runs ran to their end",
        runs - exits
    );
}

fn reg_index(r: AsmRegister64) -> usize {
    let r: iced_x86::Register = r.into();
    r as usize - iced_x86::Register::RAX as usize
}

#[test]
fn a_run_that_rewrites_a_later_instruction_of_its_block_runs_the_new_one() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native runs need an x86-64 host");
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut imm = a.create_label();
    a.mov(eax, 1).unwrap();
    a.add(eax, 2).unwrap();
    a.mov(rcx, rbx).unwrap();
    a.mov(byte_ptr(imm), 0x70).unwrap();
    a.add(eax, 3).unwrap();
    a.add(eax, ecx).unwrap();
    // `add eax, 5`, whose immediate the store above makes 0x70.
    a.db(&[0x83, 0xc0]).unwrap();
    a.set_label(&mut imm).unwrap();
    a.db(&[5]).unwrap();
    a.add(eax, 7).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut regs = [0u64; 16];
    regs[3] = 0x100;
    regs[4] = STACK;
    let ram = vec![0; (DATA_END - DATA) as usize];
    let (native, e) = run(&code, &regs, 0, &ram, true);
    let (interpreted, _) = run(&code, &regs, 0, &ram, false);
    assert!(e.native_runs_executed() > 0, "no native run");
    assert_eq!(native.gpr[0], 1 + 2 + 3 + 0x100 + 0x70 + 7);
    assert_eq!(native, interpreted);
}
