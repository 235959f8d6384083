//! Native runs against the interpreter (`emu::fuzzing` compares them):
//! random straight-line programs of register and memory instructions, and
//! the corpus of the cargo-fuzz target `native_runs` with mutations.
//!
//! The memory operands cover what the native lookup must get right or
//! hand back: plain and indexed addresses, RSP-based (and PUSH, POP and
//! instructions moving RSP, which a run holds in a scratch register),
//! RIP-relative, FS and GS overrides, accesses crossing into the next page, a page that is not
//! present (#PF mid-run), a read-only page (#PF on write), MMIO beyond RAM,
//! and writes to the code page the program runs from.

mod common;

use common::Rng;
use emu::fuzzing::{assert_same, run, Trace, CODE, DATA, DATA_END, POINTERS, STACK};
use emu::Emulator;
use iced_x86::code_asm::*;

/// Value registers the random instructions compute in. RBP and R11-R15
/// stay free, so most runs have their scratch registers.
const VALUES: [AsmRegister64; 6] = [rax, rcx, rdx, rdi, r8, r9];
const VALUES32: [AsmRegister32; 6] = [eax, ecx, edx, edi, r8d, r9d];
const VECTORS: [AsmRegisterXmm; 4] = [xmm0, xmm1, xmm7, xmm12];

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
    random_instruction(a, rng, data, true)
}

/// One random instruction; with `stack`, possibly one that moves RSP.
fn random_instruction(
    a: &mut CodeAssembler,
    rng: &mut Rng,
    data: CodeLabel,
    stack: bool,
) -> Result<(), IcedError> {
    let k = rng.below(VALUES.len() as u64) as usize;
    let (v, v32) = (VALUES[k], VALUES32[k]);
    let w = rng.pick(&VALUES);
    let m = operand(rng, data);
    let imm = rng.next() as i32 >> rng.below(32);
    let step = 8 * (1 + rng.below(4) as i32);
    let x = rng.pick(&VECTORS);
    let y = rng.pick(&VECTORS);
    match rng.below(if stack { 50 } else { 42 }) {
        42 => a.push(v),
        43 => a.pop(v),
        44 => a.push(imm),
        45 => a.sub(rsp, step),
        46 => a.add(rsp, step),
        47 => a.mov(v, rsp),
        48 => a.lea(v, ptr(rsp + imm)),
        49 => a.push(v).and_then(|()| a.pop(w)),
        // REP STOS or REP MOVS of up to 40 elements, or now and then up to
        // 1200 (several pages, a page at a time in blocks' code), at an
        // operand's address (crossing into the next page, or not mapped,
        // for some; elements straddling two pages from RSI's, 4 bytes
        // before a page end) or up to 320 bytes before the unmapped page
        // (R11 points 16 bytes into it), MOVS from another operand's
        // address (overlapping some), now and then with DF set (the
        // elements go down).
        40 if rng.below(4) == 0 => {
            let down = rng.below(4) == 0;
            let moves = rng.below(2) == 0;
            let near_unmapped = rng.below(2) == 0;
            if near_unmapped {
                // A store to that page first, in a block of its own, so
                // the lookups hit the TLB (its entry allows writes once the
                // page is dirty).
                let mut next = a.create_label();
                a.mov(dword_ptr(r11 - 0x20), eax)?;
                a.jmp(next)?;
                a.set_label(&mut next)?;
                a.lea(rdi, ptr(r11 - 0x10 - rng.below(0x140) as i32))?;
            } else {
                a.lea(rdi, m)?;
            }
            if moves && near_unmapped && rng.below(2) == 0 {
                a.lea(rsi, ptr(r11 - 0x10 - rng.below(0x140) as i32))?;
            } else if moves {
                let from = operand(rng, data);
                a.lea(rsi, from)?;
            }
            let count = if rng.below(4) == 0 { 1200 } else { 40 };
            a.mov(ecx, rng.below(count) as u32)?;
            if down {
                a.std()?;
            }
            match (moves, rng.below(3)) {
                (false, 0) => a.rep().stosb()?,
                (false, 1) => a.rep().stosd()?,
                (false, _) => a.rep().stosq()?,
                (true, 0) => a.rep().movsb()?,
                (true, 1) => a.rep().movsw()?,
                (true, _) => a.rep().movsq()?,
            }
            if down {
                a.cld()?;
            }
            Ok(())
        }
        // FNSTCW, the guest's x87 control word.
        40 if rng.below(8) == 0 => a.fnstcw(word_ptr(m)),
        // BSWAP of 32- and 64-bit registers.
        40 if rng.below(4) == 0 => a.bswap(v32).and_then(|()| a.bswap(w)),
        // Shifts and rotates by CL (zero every other time: the flags stay,
        // here the ones before a lookup) and by immediates of one and zero.
        41 => match rng.below(4) {
            0 => a
                .mov(ecx, rng.below(2) as u32)
                .and_then(|()| a.mov(v, qword_ptr(m)))
                .and_then(|()| a.shl(w, cl))
                .and_then(|()| a.sbb(v, w)),
            1 => a.rol(v32, 1),
            2 => a.rcr(v, 1),
            _ => a.ror(v, 0),
        },
        // Floating point under the guest's MXCSR (its sticky flags
        // compared): NaNs, infinities and denormals come from random bits.
        40 => match rng.below(8) {
            0 => a.addsd(x, y),
            1 => a.mulsd(x, qword_ptr(m)),
            2 => a.divsd(x, y),
            3 => a.comisd(x, qword_ptr(m)),
            4 => a.ucomisd(x, y),
            5 => a.cvtsi2sd(x, v),
            6 => a.cvttsd2si(v, x),
            _ => a.sqrtpd(x, xmmword_ptr(m)),
        },
        // SSE data movement and integer operations: unaligned and aligned
        // 16-byte operands (#GP when misaligned), 8- and 4-byte ones, XMM
        // to and from general registers.
        38 => match rng.below(8) {
            0 => a.movdqu(x, xmmword_ptr(m)),
            1 => a.movdqa(x, xmmword_ptr(m)),
            2 => a.movups(xmmword_ptr(m), x),
            3 => a.pcmpeqb(x, xmmword_ptr(m)),
            4 => a.movsd_2(x, qword_ptr(m)),
            5 => a.movsd_2(qword_ptr(m), x),
            6 => a.movd(dword_ptr(m), x),
            _ => a.punpcklbw(x, xmmword_ptr(m)),
        },
        39 => match rng.below(8) {
            0 => a.pxor(x, y),
            1 => a.pcmpeqb(x, y),
            2 => a.pmovmskb(v32, x),
            3 => a.movq(v, x),
            4 => a.movq(x, v),
            5 => a.pshufd(x, y, imm as u8 as u32),
            6 => a.psubb(x, y),
            _ => a.pminub(x, y),
        },
        // DIV leaves every flag undefined; a zero divisor (RDX, a zero in
        // the data) or a quotient too large (the high half not cleared)
        // is #DE.
        36 => a
            .xor(edx, edx)
            .and_then(|()| a.div(v))
            .and_then(|()| a.cmp(v, w)),
        37 => {
            if rng.below(4) != 0 {
                a.xor(edx, edx)?;
            }
            a.div(dword_ptr(m)).and_then(|()| a.cmp(v, w))
        }
        // Bit scans leave CF, OF, SF, AF and PF undefined (and BSF or BSR
        // of zero its destination as it was): a CMP defines the flags
        // again before anything can stop. TZCNT and LZCNT are BSF and BSR
        // on this vCPU.
        30 => a.bsf(v, w).and_then(|()| a.cmp(v, w)),
        31 => a.bsr(v32, dword_ptr(m)).and_then(|()| a.cmp(v, w)),
        32 => a.tzcnt(v, qword_ptr(m)).and_then(|()| a.cmp(v, w)),
        33 => a.lzcnt(v32, v32).and_then(|()| a.cmp(v, w)),
        34 => a.lock().xadd(qword_ptr(m), v),
        35 => match rng.below(3) {
            0 => a.lock().cmpxchg(dword_ptr(m), v32),
            1 => a.cmpxchg(qword_ptr(m), v),
            _ => a.lock().add(qword_ptr(m), v),
        },
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

/// Runs `code` natively and interpreted from one random state (the
/// registers of [`POINTERS`] aimed, RBX moved within the data, R10 a small
/// index, random data) and asserts they end alike; the native run's trace
/// and emulator.
fn compare_from_random_state(rng: &mut Rng, code: &[u8], round: usize) -> (Trace, Emulator) {
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = rng.value();
    }
    for (n, value) in POINTERS {
        regs[n] = value;
    }
    regs[3] += rng.below(0x100);
    regs[10] = rng.below(16);
    let flags = rng.next();
    let ram: Vec<u8> = (DATA..DATA_END).map(|_| rng.next() as u8).collect();
    let (native, e) = run(code, &regs, flags, &ram, 1, true);
    let (interpreted, _) = run(code, &regs, flags, &ram, 1, false);
    assert_same(
        &format!("round {round}, code {code:02x?}"),
        &native,
        &interpreted,
    );
    (native, e)
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
        let (_, e) = compare_from_random_state(&mut rng, &code, round);
        runs += e.native_runs_executed();
        exits += e.native_run_exits();
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

/// A loop of five laps around `len` random instructions (R15 counts), a
/// call to a function of random instructions, a branch over more of
/// them, taken every other lap, a second call (through memory), and a
/// jump through memory; the function
/// ends in a jump through a register to its RET, and it and the call
/// leave RSP as they found them. Most blocks are compiled whole, and
/// their code goes on from block to block. Some laps name every register
/// (more than the code has left for its lookups: the block is cut short)
/// or hold CLD, which has no native form (the block ends before it).
fn looping_program(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut data = a.create_label();
    let mut labels: Vec<CodeLabel> = (0..5).map(|_| a.create_label()).collect();
    let [top, skip, function, back, leave] = labels.as_mut_slice() else {
        unreachable!()
    };
    a.mov(r15, 5u64).unwrap();
    a.set_label(top).unwrap();
    for _ in 0..len / 3 {
        let _ = random_instruction(&mut a, rng, data, true);
        match rng.below(20) {
            0 => a.cld().unwrap(),
            1 => {
                // Every register named: R11 to R15 read, RBP written.
                a.lea(rbp, ptr(r11 + r12)).unwrap();
                a.lea(rbp, ptr(rbp + r13 * 2)).unwrap();
                a.lea(rbp, ptr(rbp + r14 * 4 + 8)).unwrap();
                a.add(rbp, r15).unwrap();
                a.xor(rax, rbp).unwrap();
            }
            _ => {}
        }
    }
    a.lea(rbp, ptr(*function)).unwrap();
    a.call(rbp).unwrap();
    a.test(r15, 1).unwrap();
    a.jz(*skip).unwrap();
    for _ in 0..len / 3 {
        let _ = random_instruction(&mut a, rng, data, true);
    }
    a.set_label(skip).unwrap();
    // A second caller, through memory: the function's RET alternates
    // between two return addresses (the jump cache has both).
    a.lea(rbp, ptr(*function)).unwrap();
    a.push(rbp).unwrap();
    a.call(qword_ptr(rsp)).unwrap();
    a.add(rsp, 8).unwrap();
    a.lea(rbp, ptr(*back)).unwrap();
    a.push(rbp).unwrap();
    a.jmp(qword_ptr(rsp)).unwrap();
    a.set_label(back).unwrap();
    a.add(rsp, 8).unwrap();
    a.dec(r15).unwrap();
    a.jne(*top).unwrap();
    a.hlt().unwrap();
    a.set_label(function).unwrap();
    for _ in 0..len / 3 {
        let _ = random_instruction(&mut a, rng, data, false);
    }
    a.lea(rbp, ptr(*leave)).unwrap();
    a.jmp(rbp).unwrap();
    a.set_label(leave).unwrap();
    a.ret().unwrap();
    a.set_label(&mut data).unwrap();
    let bytes: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
    a.db(&bytes).unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn loops_of_calls_returns_and_branches_chained_in_native_code_match_the_interpreter() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
        return;
    }
    let mut rng = Rng::seeded(("native chains", testkit::seed()));
    let (mut chained, mut entries, mut exits, mut halted) = (0, 0, 0, 0);
    for round in 0..500 {
        let len = 3 + rng.below(30) as usize;
        let code = looping_program(&mut rng, len);
        let (native, e) = compare_from_random_state(&mut rng, &code, round);
        chained += e.native_instructions();
        entries += e.native_runs_executed();
        exits += e.native_run_exits();
        halted += u64::from(native.exits.is_empty());
    }
    // Otherwise chains were never made, never stopped at a miss, or every
    // program faulted before its loop came round.
    eprintln!(
        "{chained} instructions in blocks' code in {entries} entries, {exits} misses, \
         {halted} programs ran to HLT"
    );
    // Misses and faults end most entries early here; the system tests
    // show chains going on from block to block.
    assert!(
        chained > 10_000,
        "only {chained} instructions in blocks' code"
    );
    assert!(exits > 100, "only {exits} misses");
    assert!(halted > 50, "only {halted} programs ran to their end");
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
    let (native, e) = run(&code, &regs, 0, &ram, 1, true);
    let (interpreted, _) = run(&code, &regs, 0, &ram, 1, false);
    assert!(e.native_runs_executed() > 0, "no native run");
    assert_eq!(native.gpr[0], 1 + 2 + 3 + 0x100 + 0x70 + 7);
    assert_eq!(native, interpreted);
}

/// A page written by blocks' code through a TLB entry filled while the
/// page held no code, then decoded from, then written again: the second
/// write must leave for the interpreter (the entry loses its write bit
/// when the page is decoded from), which drops the stale block. Each
/// round writes `mov eax, ECX; ret` and calls it. Fails with the first
/// routine's result over and over where decoding leaves the write bit.
#[test]
fn blocks_code_writing_a_page_decoded_since_its_tlb_entry_was_filled_runs_the_new_code() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(byte_ptr(rbx + 0x700), 0xb8).unwrap();
    a.mov(dword_ptr(rbx + 0x701), ecx).unwrap();
    a.mov(byte_ptr(rbx + 0x705), 0xc3).unwrap();
    a.lea(rdx, ptr(rbx + 0x700)).unwrap();
    a.call(rdx).unwrap();
    a.add(r8d, eax).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 21).unwrap();
    a.jb(again).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut regs = [0u64; 16];
    regs[1] = 1;
    regs[3] = DATA + 0x100;
    regs[4] = STACK;
    let ram = vec![0; (DATA_END - DATA) as usize];
    let (native, e) = run(&code, &regs, 0, &ram, 1, true);
    let (interpreted, _) = run(&code, &regs, 0, &ram, 1, false);
    assert!(
        e.native_instructions() > 100,
        "the loop ran in blocks' code"
    );
    assert_eq!(native.gpr[8], (1..=20).sum::<u64>(), "{:?}", native.exits);
    assert_same("rewritten routine", &native, &interpreted);
}

/// Two vCPUs sharing code-page marks: one writes `mov eax, ECX; ret` at
/// `DATA + 0x800` from blocks' code (RBX is `DATA + 0x100`), through a
/// TLB entry it filled before the other decoded the routine. Its next
/// write must still drop the other's block: it takes the page as written
/// when it sees the new mark (before its code runs again). Fails with the
/// caller running the old routine where marks by other vCPUs go unseen.
#[test]
fn blocks_code_writing_code_another_vcpu_decoded_drops_its_block() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
        return;
    }
    // With R15 = 0 the writer's loop, with R15 = 1 the caller's; each
    // round ends at a HLT, and the next `run` goes on after it.
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut write, mut call) = (a.create_label(), a.create_label());
    a.test(r15, r15).unwrap();
    a.jnz(call).unwrap();
    a.set_label(&mut write).unwrap();
    a.mov(byte_ptr(rbx + 0x700), 0xb8).unwrap();
    a.mov(dword_ptr(rbx + 0x701), ecx).unwrap();
    a.mov(byte_ptr(rbx + 0x705), 0xc3).unwrap();
    a.inc(ecx).unwrap();
    a.hlt().unwrap();
    a.jmp(write).unwrap();
    a.set_label(&mut call).unwrap();
    a.lea(rdx, ptr(rbx + 0x700)).unwrap();
    a.call(rdx).unwrap();
    a.hlt().unwrap();
    a.jmp(call).unwrap();
    let code = a.assemble(CODE).unwrap();
    let mem = emu::fuzzing::memory(&code, &[]);
    let mut regs = [0u64; 16];
    regs[1] = 1;
    regs[3] = DATA + 0x100;
    regs[4] = STACK;
    let mut writer = emu::fuzzing::emulator(&mem, None, &regs, 0);
    regs[15] = 1;
    let mut caller = emu::fuzzing::emulator(&mem, Some(writer.code_pages()), &regs, 0);
    // Twice, so that the second write runs in blocks' code.
    for _ in 0..2 {
        assert_eq!(writer.run(100_000, None), emu::Exit::Halt);
    }
    for value in 2..8u64 {
        assert_eq!(caller.run(100_000, None), emu::Exit::Halt);
        assert_eq!(
            caller.cpu().gpr[0],
            value,
            "the caller ran the routine of ECX = {value}"
        );
        assert_eq!(writer.run(100_000, None), emu::Exit::Halt);
    }
    assert!(
        writer.native_instructions() > 10,
        "the writer ran in blocks' code"
    );
}

/// Blocks' code keeps the guest's status flags in the host's RFLAGS,
/// stores them to a stack slot before a memory lookup (which changes the
/// host's) and loads them back for an instruction that reads them. Here an
/// ADD or SUB sets all six; then, for some programs, a load stores them
/// and a DEC, INC or CMC changes some (the store merges those with the
/// slot's); then a load follows, SETO and LAHF read the flags (AF and PF
/// included), and the flags are stored again at the block's end. Each
/// value pair, at the edges of signed and unsigned overflow and random,
/// must leave what the interpreter leaves.
#[test]
fn status_flags_survive_the_store_and_reload_around_a_lookup() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
        return;
    }
    let mut rng = Rng::seeded(("flags around a lookup", testkit::seed()));
    let mut pairs: Vec<(u32, u32)> = vec![
        (0x7fff_ffff, 1),
        (0xffff_ffff, 1),
        (0, 0),
        (0x8000_0000, 0x8000_0000),
        (0x0f, 1),
        (0x8000_0000, 1),
        (1, 2),
        (0x8000_0001, 1),
    ];
    pairs.extend((0..60).map(|_| (rng.next() as u32, rng.next() as u32)));
    let mut compiled = 0;
    for (round, (x, y)) in pairs.into_iter().enumerate() {
        for (variant, what) in ["add", "sub", "add, dec", "sub, inc", "add, cmc"]
            .iter()
            .enumerate()
        {
            let mut a = CodeAssembler::new(64).unwrap();
            a.mov(eax, x).unwrap();
            if variant % 2 == 1 {
                a.sub(eax, y).unwrap();
            } else {
                a.add(eax, y).unwrap();
            }
            if variant >= 2 {
                a.mov(rdx, qword_ptr(r14)).unwrap();
                match variant {
                    2 => a.dec(eax).unwrap(),
                    3 => a.inc(eax).unwrap(),
                    _ => a.cmc().unwrap(),
                }
            }
            a.mov(rdx, qword_ptr(r14)).unwrap();
            a.seto(cl).unwrap();
            a.lahf().unwrap();
            a.mov(ebx, eax).unwrap();
            a.hlt().unwrap();
            let code = a.assemble(CODE).unwrap();
            let mut regs = [0u64; 16];
            for (n, value) in POINTERS {
                regs[n] = value;
            }
            let ram = vec![0x5a; (DATA_END - DATA) as usize];
            // Flags going in opposite to what the ADD or SUB leaves.
            let (native, e) = run(&code, &regs, 0x8d5, &ram, 2, true);
            let (interpreted, _) = run(&code, &regs, 0x8d5, &ram, 2, false);
            assert_same(
                &format!("round {round}: {x:#x}, {y:#x}, {what}"),
                &native,
                &interpreted,
            );
            compiled += e.native_instructions();
        }
    }
    assert!(compiled > 0, "no block was compiled whole");
}

#[test]
fn the_fuzz_corpus_and_mutations_of_it_match_the_interpreter() {
    if !cfg!(target_arch = "x86_64") {
        testkit::not_run(testkit::prereq::X86_64, "native runs need an x86-64 host");
        return;
    }
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/native_runs");
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(!inputs.is_empty(), "{}: an empty corpus", dir.display());
    for input in &inputs {
        // Seeds are written to be comparable: none may be skipped.
        assert!(
            emu::fuzzing::native_runs(input),
            "a corpus input was not compared"
        );
    }
    let mut rng = Rng::seeded("native_runs corpus");
    for _ in 0..300 {
        let mut v = inputs[rng.below(inputs.len() as u64) as usize].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(v.len() as u64) as usize;
            v[at] = match rng.below(3) {
                0 => rng.next() as u8,
                1 => v[at] ^ 1 << rng.below(8),
                _ => rng.pick(&[0, 1, 0xff, 0x80]),
            };
        }
        let _compared_or_skipped = emu::fuzzing::native_runs(&v);
    }
}

/// Writes the corpus's seeds: random programs as fuzz inputs (run by
/// hand: `cargo test -p emu --test native -- --ignored write_corpus`).
#[test]
#[ignore]
fn write_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/native_runs");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::seeded("native_runs seeds");
    let mut n = 0;
    while n < 16 {
        let len = 4 + rng.below(24) as usize;
        let code = program(&mut rng, len);
        // The target skips code it cannot compare (see `native_runs`).
        if !emu::fuzzing::comparable(&code) {
            continue;
        }
        let mut input: Vec<u8> = (0..emu::fuzzing::INPUT_HEADER)
            .map(|_| rng.next() as u8)
            .collect();
        input.extend(code);
        std::fs::write(dir.join(format!("seed-{n:02}")), input).unwrap();
        n += 1;
    }
}

#[test]
fn an_instruction_running_past_the_end_of_fuzz_code_counts_for_comparability() {
    // The fuzzer's input ended in `6b 35`: with the zeros after it on the
    // code page, IMUL ESI, [RIP], 0, whose SF, ZF and PF are undefined
    // (native and interpreted runs differ there, legitimately).
    assert!(!emu::fuzzing::comparable(&[0x24, 0x2b, 0x6b, 0x35]));
    assert!(emu::fuzzing::comparable(&[0x24, 0x2b, 0x48, 0xff, 0xc0]));
}
