//! System-level guests: paging (#PF error codes, A/D bits, TLB flushes),
//! exception and interrupt delivery through the IDT (IST stacks, INT n,
//! IRETQ), SYSCALL/SYSRET to ring 3, the switch from 32-bit protected
//! mode to 64-bit code by a far jump, external interrupts from another
//! thread, LOCK XADD from two vCPU threads, and a native run decoded at
//! CPL 0 honouring user permissions when ring 3 runs it.

mod common;

use hypervisor::GuestRam;
use std::sync::Arc;

use emu::exec::InterruptLines;
use emu::{Emulator, Exception, Exit};
use hypervisor::x86::{DescriptorTable, Segment};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const PML4: u64 = 0x10000;
const PDPT: u64 = 0x11000;
const PD: u64 = 0x12000;
const PT: u64 = 0x13000;
const GDT: u64 = 0x500;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const CODE: u64 = 0x4000;
const HANDLERS: u64 = 0x6000;
const STACK: u64 = 0x8000;
const IST1: u64 = 0x9000;
const USER_STACK: u64 = 0xa000;
const MEM: usize = 0x4_0000;

const USER_DATA: u64 = 0x00cf_f300_0000_ffff;
const USER_CODE64: u64 = 0x00af_fb00_0000_ffff;
const CODE32: u64 = 0x00cf_9b00_0000_ffff;

fn pte_addr(lin: u64) -> u64 {
    PT + (lin >> 12) * 8
}

/// Memory with 4-level tables mapping the low 2 MiB with 4 KiB user,
/// writable pages (identity), a GDT, a 64-bit TSS with RSP0 = STACK and
/// IST1 = IST1, and an empty IDT.
fn setup() -> GuestRam {
    let mem = common::memory(MEM);
    mem.write_obj(PDPT | 7, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | 7, GuestAddress(PDPT)).unwrap();
    mem.write_obj(PT | 7, GuestAddress(PD)).unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 12) | 7, GuestAddress(PT + i * 8))
            .unwrap();
    }
    let tss_desc_lo: u64 = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40);
    let gdt = [
        0,
        common::CODE64_DESCRIPTOR,
        common::DATA64_DESCRIPTOR,
        USER_DATA,
        USER_CODE64,
        tss_desc_lo,
        0,
        CODE32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + i as u64 * 8)).unwrap();
    }
    mem.write_obj(STACK, GuestAddress(TSS + 4)).unwrap();
    mem.write_obj(IST1, GuestAddress(TSS + 0x24)).unwrap();
    mem
}

fn set_gate(mem: &GuestRam, vector: u8, handler: u64, ist: u64, dpl: u64, trap: bool) {
    let typ: u64 = if trap { 0xf } else { 0xe };
    let lo = (handler & 0xffff)
        | (0x08 << 16)
        | (ist << 32)
        | (typ << 40)
        | (dpl << 45)
        | (1 << 47)
        | ((handler >> 16) & 0xffff) << 48;
    let a = IDT + u64::from(vector) * 16;
    mem.write_obj(lo, GuestAddress(a)).unwrap();
    mem.write_obj(handler >> 32, GuestAddress(a + 8)).unwrap();
}

fn emulator(mem: &GuestRam) -> Emulator {
    let mut e = common::emulator(mem);
    // Native code from a block's first run: these programs are short.
    e.compile_after(1);
    let cpu = e.cpu_mut();
    cpu.cr3 = PML4;
    cpu.gdt = DescriptorTable {
        base: GDT,
        limit: 0x3f,
    };
    cpu.idt = DescriptorTable {
        base: IDT,
        limit: 0xfff,
    };
    let mut tr = Segment::from_descriptor(0x28, 0x0000_8b00_0000_0067 | ((TSS & 0xff_ffff) << 16));
    tr.base = TSS;
    cpu.tr = tr;
    cpu.rip = CODE;
    cpu.gpr[4] = STACK;
    cpu.rflags = 2;
    e.set_exception_exits(0);
    e
}

fn load(mem: &GuestRam, at: u64, a: &mut CodeAssembler) {
    let code = a.assemble(at).unwrap();
    mem.write_slice(&code, GuestAddress(at)).unwrap();
}

/// IRETQ to 64-bit ring 3 at `rip` with `rflags`, on USER_STACK.
fn to_ring_3(a: &mut CodeAssembler, rip: u64, rflags: u64) {
    for v in [0x1b, USER_STACK, rflags, 0x23, rip] {
        a.mov(rax, v).unwrap();
        a.push(rax).unwrap();
    }
    a.iretq().unwrap();
}

/// Runs to HLT collecting OUT exits as (port, value).
fn run_outs(e: &mut Emulator) -> Vec<(u16, u32)> {
    let mut outs = Vec::new();
    for _ in 0..100 {
        match e.run(1_000_000, None) {
            Exit::IoOut { port, data, .. } => outs.push((port, data)),
            Exit::Halt => return outs,
            other => panic!("unexpected {other:?} after {outs:x?} at {:#x}", e.cpu().rip),
        }
    }
    panic!("no halt: {outs:x?}");
}

fn expect_pf(e: &mut Emulator, fault_addr: u64, code: u32) {
    e.set_exception_exits(1 << 14);
    match e.run(10_000, None) {
        Exit::Exception(x) => {
            assert_eq!(x.vector, Exception::PF);
            assert_eq!(x.error_code, Some(code), "error code");
        }
        other => panic!("expected #PF, got {other:?}"),
    }
    assert_eq!(e.cpu().cr2, fault_addr, "cr2");
}

#[test]
fn page_fault_error_codes() {
    // Not present, read.
    let mem = setup();
    mem.write_obj(0u64, GuestAddress(pte_addr(0x20000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, qword_ptr(0x20008)).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    expect_pf(&mut e, 0x20008, 0);
    assert_eq!(e.cpu().rip, CODE);

    // Write to a read-only page with CR0.WP; allowed without WP.
    let mem = setup();
    mem.write_obj(0x21000u64 | 5, GuestAddress(pte_addr(0x21000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dword_ptr(0x21010), eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().cr0 |= 1 << 16;
    expect_pf(&mut e, 0x21010, 0x3);
    e.cpu_mut().cr0 &= !(1 << 16);
    assert_eq!(e.run(100, None), Exit::Halt);

    // User read of a supervisor page.
    let mem = setup();
    mem.write_obj(0x22000u64 | 3, GuestAddress(pte_addr(0x22000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, qword_ptr(0x22000)).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().segs[1] = Segment::from_descriptor(0x23, USER_CODE64);
    e.cpu_mut().segs[2] = Segment::from_descriptor(0x1b, USER_DATA);
    expect_pf(&mut e, 0x22000, 0x5);

    // NX fetch with EFER.NXE.
    let mem = setup();
    mem.write_obj(0x23000u64 | 7 | (1 << 63), GuestAddress(pte_addr(0x23000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x23000u64).unwrap();
    a.jmp(rax).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().efer |= 1 << 11;
    expect_pf(&mut e, 0x23000, 0x11);

    // A reserved bit (51) in a PTE.
    let mem = setup();
    mem.write_obj(0x24000u64 | 7 | (1 << 51), GuestAddress(pte_addr(0x24000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dword_ptr(0x24000), eax).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    expect_pf(&mut e, 0x24000, 0xb);
}

#[test]
fn accessed_dirty_remap_and_tlb_flushes() {
    let mem = setup();
    const V: u64 = 0x25000;
    mem.write_obj(0x30000u64 | 7, GuestAddress(pte_addr(V)))
        .unwrap();
    mem.write_obj(0x1111u64, GuestAddress(0x30000)).unwrap();
    mem.write_obj(0x2222u64, GuestAddress(0x31000)).unwrap();
    mem.write_obj(0x26000u64 | 7, GuestAddress(pte_addr(0x26000)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, qword_ptr(V)).unwrap();
    a.out(0x10, eax).unwrap();
    // Remap V to 0x31000: the TLB still has the old translation.
    a.mov(rbx, 0x31007u64).unwrap();
    a.mov(qword_ptr(pte_addr(V)), rbx).unwrap();
    a.mov(rax, qword_ptr(V)).unwrap();
    a.out(0x11, eax).unwrap();
    a.invlpg(qword_ptr(V)).unwrap();
    a.mov(rax, qword_ptr(V)).unwrap();
    a.out(0x12, eax).unwrap();
    // Back to 0x30000, flushed by a CR3 reload.
    a.mov(rbx, 0x30007u64).unwrap();
    a.mov(qword_ptr(pte_addr(V)), rbx).unwrap();
    a.mov(rax, qword_ptr(V)).unwrap();
    a.out(0x13, eax).unwrap();
    a.mov(rax, cr3).unwrap();
    a.mov(cr3, rax).unwrap();
    a.mov(rax, qword_ptr(V)).unwrap();
    a.out(0x14, eax).unwrap();
    // A read sets A only; a write sets D.
    a.mov(rax, qword_ptr(0x26000)).unwrap();
    a.out(0x15, eax).unwrap();
    a.mov(qword_ptr(0x26000), rax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    assert_eq!(
        outs[..5],
        [
            (0x10, 0x1111),
            (0x11, 0x1111),
            (0x12, 0x2222),
            (0x13, 0x2222),
            (0x14, 0x1111)
        ]
    );
    let pte: u64 = mem.read_obj(GuestAddress(pte_addr(0x26000))).unwrap();
    assert_eq!(pte & 0x60, 0x60, "A and D after the write");
    let pde: u64 = mem.read_obj(GuestAddress(PD)).unwrap();
    assert_eq!(pde & 0x60, 0x20, "A set on the PDE, D not");
    let pte_v: u64 = mem.read_obj(GuestAddress(pte_addr(V))).unwrap();
    assert_eq!(pte_v & 0x60, 0x20, "A only after reads");
}

/// The page the remap tests map to one frame or the other.
const F: u64 = 0x27000;
const FRAME_A: u64 = 0x32000;
const FRAME_B: u64 = 0x33000;

/// [`setup`]'s memory with F mapped to FRAME_A.
fn setup_remappable() -> GuestRam {
    let mem = setup();
    mem.write_obj(FRAME_A | 7, GuestAddress(pte_addr(F)))
        .unwrap();
    mem
}

/// Where [`caller_of_f`] puts the code that calls F.
const CALLER: u64 = 0x5000;

/// Code at frame A that returns 1 in EAX, at frame B 2, and at [`CALLER`]
/// code that calls F and writes EAX to port 0x20.
fn caller_of_f(mem: &GuestRam) {
    // mov eax, imm32; ret
    mem.write_slice(&[0xb8, 1, 0, 0, 0, 0xc3], GuestAddress(FRAME_A))
        .unwrap();
    mem.write_slice(&[0xb8, 2, 0, 0, 0, 0xc3], GuestAddress(FRAME_B))
        .unwrap();
    let mut c = CodeAssembler::new(64).unwrap();
    c.call(F).unwrap();
    c.out(0x20, eax).unwrap();
    c.ret().unwrap();
    load(mem, CALLER, &mut c);
}

/// Blocks are linked to the block that ran after them; a link must not
/// outlive a remap of the successor's page (INVLPG) or a write to its
/// bytes through another mapping.
#[test]
fn linked_blocks_follow_remaps_and_rewrites() {
    let mem = setup_remappable();
    caller_of_f(&mem);
    let mut a = CodeAssembler::new(64).unwrap();
    a.call(CALLER).unwrap();
    a.call(CALLER).unwrap();
    a.mov(rbx, FRAME_B | 7).unwrap();
    a.mov(qword_ptr(pte_addr(F)), rbx).unwrap();
    a.invlpg(qword_ptr(F)).unwrap();
    a.call(CALLER).unwrap();
    a.mov(byte_ptr(FRAME_B + 1), 3u32).unwrap();
    a.call(CALLER).unwrap();
    a.call(CALLER).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    assert_eq!(
        outs,
        [(0x20, 1), (0x20, 1), (0x20, 2), (0x20, 3), (0x20, 3)],
        "each call runs the code F maps to now"
    );
}

/// A link into a global page (PTE.G with CR4.PGE) is made under the
/// global link stamp, which CR3 writes that keep global translations do
/// not move; an INVLPG of the page and a CR4.PGE toggle (which drops
/// global translations) must still cut it, and a link into a page that is
/// not global must not outlive a CR3 write. After the CR3 write either
/// frame's code is right for a global page (the old translation may stay
/// cached).
#[test]
fn links_follow_invlpg_cr3_writes_and_global_flushes() {
    for global in [false, true] {
        let outs = remaps_of_a_linked_page(global);
        assert_eq!(outs.len(), 7, "{outs:?}");
        assert_eq!(outs[..4], [(0x20, 1), (0x20, 1), (0x20, 2), (0x20, 2)]);
        if global {
            assert!(matches!(outs[4], (0x20, 1 | 2)), "{outs:?}");
        } else {
            assert_eq!(outs[4], (0x20, 1), "after the CR3 write");
        }
        assert_eq!(outs[5..], [(0x20, 1), (0x20, 1)], "after the global flush");
    }
}

/// Calls code at F through a caller (linked to F) twice, remaps F from
/// frame A to B by INVLPG and calls twice, back to A by a CR3 write and
/// calls once, toggles CR4.PGE and calls twice; F's PTE global or not.
fn remaps_of_a_linked_page(global: bool) -> Vec<(u16, u32)> {
    const PGE: u64 = 1 << 7;
    let g = if global { 1 << 8 } else { 0 };
    let mem = setup();
    mem.write_obj(FRAME_A | 7 | g, GuestAddress(pte_addr(F)))
        .unwrap();
    caller_of_f(&mem);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, cr4).unwrap();
    a.or(rax, PGE as i32).unwrap();
    a.mov(cr4, rax).unwrap();
    a.call(CALLER).unwrap();
    a.call(CALLER).unwrap();
    // To frame B, by INVLPG.
    a.mov(rbx, FRAME_B | 7 | g).unwrap();
    a.mov(qword_ptr(pte_addr(F)), rbx).unwrap();
    a.invlpg(qword_ptr(F)).unwrap();
    a.call(CALLER).unwrap();
    a.call(CALLER).unwrap();
    // Back to frame A, by a CR3 write.
    a.mov(rbx, FRAME_A | 7 | g).unwrap();
    a.mov(qword_ptr(pte_addr(F)), rbx).unwrap();
    a.mov(rax, cr3).unwrap();
    a.mov(cr3, rax).unwrap();
    a.call(CALLER).unwrap();
    // A CR4.PGE toggle drops global translations too.
    a.mov(rax, cr4).unwrap();
    a.and(rax, !(PGE as i32)).unwrap();
    a.mov(cr4, rax).unwrap();
    a.or(rax, PGE as i32).unwrap();
    a.mov(cr4, rax).unwrap();
    a.call(CALLER).unwrap();
    a.call(CALLER).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    run_outs(&mut e)
}

#[test]
fn a_block_that_remaps_its_own_page_goes_on_in_the_new_mapping() {
    // F's page holds the same PTE store and INVLPG in frames A and B, then
    // code that outputs 1 (A) or 2 (B). The first two calls remap F to A
    // (as it was), the third to B: the instruction after that INVLPG must
    // come from B, though it follows in the same page, where links hold
    // across TLB flushes (a block that flushes is never linked from).
    let mem = setup_remappable();
    for (frame, value) in [(FRAME_A, 1u32), (FRAME_B, 2)] {
        let mut f = CodeAssembler::new(64).unwrap();
        f.mov(qword_ptr(pte_addr(F)), rbx).unwrap();
        f.invlpg(qword_ptr(F)).unwrap();
        f.mov(eax, value).unwrap();
        f.out(0x20, eax).unwrap();
        f.ret().unwrap();
        load(&mem, frame, &mut f);
    }
    let mut a = CodeAssembler::new(64).unwrap();
    for frame in [FRAME_A, FRAME_A, FRAME_B] {
        a.mov(rbx, frame | 7).unwrap();
        a.call(F).unwrap();
    }
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    assert_eq!(
        outs,
        [(0x20, 1), (0x20, 1), (0x20, 2)],
        "after the INVLPG, the code F maps to now"
    );
}

/// Within a block, flags that a later instruction overwrites before
/// anything reads them are not computed; they must still be exact where
/// they are read, survive instructions that leave them alone, and be
/// exact when a later instruction faults.
#[test]
fn flags_are_exact_wherever_they_can_be_seen() {
    let mem = setup();
    const UNMAPPED: u64 = 0x28000;
    mem.write_obj(0u64, GuestAddress(pte_addr(UNMAPPED)))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ebx, 1u32).unwrap();
    a.mov(ecx, 0u32).unwrap();
    // CF from ADD survives INC (which keeps CF) and a shift by CL = 0.
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.add(eax, ebx).unwrap();
    a.inc(edx).unwrap();
    a.shl(esi, cl).unwrap();
    a.setc(al).unwrap();
    a.out(0x30, eax).unwrap();
    // ADD's flags are dead here: XOR overwrites them.
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.add(eax, ebx).unwrap();
    a.xor(edx, edx).unwrap();
    a.setc(al).unwrap();
    a.out(0x31, eax).unwrap();
    // ADD's flags are live at the faulting load (the handler would see
    // them), though the SUB after it would overwrite them.
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.add(eax, ebx).unwrap();
    a.mov(ecx, dword_ptr(UNMAPPED)).unwrap();
    a.sub(eax, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.set_exception_exits(1 << Exception::PF);
    let mut outs = Vec::new();
    loop {
        match e.run(10_000, None) {
            Exit::IoOut { port, data, .. } => outs.push((port, data & 0xff)),
            Exit::Exception(x) => {
                assert_eq!(x.vector, Exception::PF);
                break;
            }
            other => panic!("unexpected {other:?} after {outs:x?}"),
        }
    }
    assert_eq!(outs, [(0x30, 1), (0x31, 0)]);
    let cpu = e.cpu();
    assert_eq!(cpu.cr2, UNMAPPED);
    assert_eq!(
        cpu.rflags & 0x45,
        0x45,
        "CF, ZF and PF of the ADD at the fault"
    );
}

/// Memory operands in their pre-decoded 64-bit forms: base, index and
/// scale, displacement, RIP-relative, FS and GS bases, LEA, and a 32-bit
/// address size (0x67), which wraps and so takes the generic path.
#[test]
fn effective_addresses_in_every_form() {
    let mem = setup();
    const DATA: u64 = 0x30000;
    for k in 0..64u64 {
        mem.write_obj(0x1000 + k, GuestAddress(DATA + k * 8))
            .unwrap();
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut data = a.create_label();
    // FS base = DATA + 0x100, GS base = DATA + 0x180.
    a.mov(ecx, 0xc000_0100u32).unwrap();
    a.mov(eax, (DATA + 0x100) as u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0xc000_0101u32).unwrap();
    a.mov(eax, (DATA + 0x180) as u32).unwrap();
    a.wrmsr().unwrap();
    a.mov(rbx, DATA).unwrap();
    a.mov(rcx, 3u64).unwrap();
    a.mov(rax, qword_ptr(rbx + rcx * 8 + 0x10)).unwrap(); // slot 5
    a.out(0x40, eax).unwrap();
    a.mov(rax, qword_ptr(rcx * 8 + DATA as i32)).unwrap(); // slot 3
    a.out(0x41, eax).unwrap();
    a.mov(rax, qword_ptr(DATA + 0x38)).unwrap(); // slot 7
    a.out(0x42, eax).unwrap();
    a.mov(rax, qword_ptr(data)).unwrap(); // RIP-relative
    a.out(0x43, eax).unwrap();
    a.mov(rax, qword_ptr(rcx * 8 + 8).fs()).unwrap(); // slot 0x24
    a.out(0x44, eax).unwrap();
    a.mov(rax, qword_ptr(rcx * 2 + 2).gs()).unwrap(); // slot 0x31
    a.out(0x45, eax).unwrap();
    a.lea(rax, qword_ptr(rbx + rcx * 4 - 8)).unwrap();
    a.out(0x46, eax).unwrap();
    // 32-bit address size: rbx's upper half is dropped.
    a.mov(rdx, 0x1234_5678_0000_0000u64 | DATA).unwrap();
    a.mov(eax, dword_ptr(edx + ecx * 8)).unwrap(); // slot 3
    a.out(0x47, eax).unwrap();
    a.mov(qword_ptr(rbx + rcx * 8 + 0x100), rcx).unwrap(); // slot 0x23
    a.mov(rax, qword_ptr(DATA + 0x118)).unwrap();
    a.out(0x48, eax).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut data).unwrap();
    a.dq(&[0xabcd]).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    assert_eq!(
        outs,
        [
            (0x40, 0x1005),
            (0x41, 0x1003),
            (0x42, 0x1007),
            (0x43, 0xabcd),
            (0x44, 0x1024),
            (0x45, 0x1031),
            (0x46, (DATA + 4) as u32),
            (0x47, 0x1003),
            (0x48, 3),
        ]
    );
}

/// A block's final CMP/TEST/ADD/SUB/AND and Jcc run as one fused
/// operation: the branch goes both ways and the flags stay as the ALU
/// instruction left them.
#[test]
fn fused_compare_and_branch() {
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut again = a.create_label();
    let mut skip = a.create_label();
    let mut taken = a.create_label();
    a.xor(eax, eax).unwrap();
    a.mov(ecx, 5u32).unwrap();
    a.set_label(&mut again).unwrap();
    a.add(eax, 2u32).unwrap();
    a.sub(ecx, 1u32).unwrap();
    a.jnz(again).unwrap(); // SUB + JNZ, taken four times
    a.out(0x50, eax).unwrap(); // 10
    a.mov(rbx, 10u64).unwrap();
    a.cmp(rax, rbx).unwrap();
    a.jne(skip).unwrap(); // CMP + JNE, not taken
    a.mov(edx, 1u32).unwrap();
    a.set_label(&mut skip).unwrap();
    a.mov(eax, edx).unwrap();
    a.out(0x51, eax).unwrap(); // 1
    a.mov(eax, 3u32).unwrap();
    a.cmp(eax, 4u32).unwrap();
    a.jb(taken).unwrap(); // CMP imm + JB, taken, CF set
    a.mov(edx, 0xdeadu32).unwrap();
    a.set_label(&mut taken).unwrap();
    a.setc(al).unwrap();
    a.out(0x52, eax).unwrap(); // 1 in the low byte
    let mut end = a.create_label();
    a.test(ebx, ebx).unwrap();
    a.js(end).unwrap(); // TEST + JS, not taken; ZF clear
    a.setz(al).unwrap();
    a.out(0x53, eax).unwrap();
    a.set_label(&mut end).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs: Vec<(u16, u32)> = run_outs(&mut e)
        .into_iter()
        .map(|(p, v)| (p, v & 0xff))
        .collect();
    assert_eq!(outs, [(0x50, 10), (0x51, 1), (0x52, 1), (0x53, 0)]);
}

/// REP STOS and REP MOVS across pages in bulk: the results, a forward
/// overlapping MOVSB that repeats its first byte, and a fault on the
/// second page that leaves RCX/RSI/RDI at the first element not moved.
#[test]
fn rep_string_bulk_runs_across_pages() {
    let mem = setup();
    const BUF: u64 = 0x20000;
    const GUARD: u64 = 0x24000;
    mem.write_obj(0u64, GuestAddress(pte_addr(GUARD))).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.cld().unwrap();
    // Fill 3 pages with a qword pattern, then copy them one page up.
    a.mov(rdi, BUF).unwrap();
    a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
    a.mov(ecx, 3 * 512u32).unwrap();
    a.rep().stosq().unwrap();
    a.mov(rsi, BUF + 8).unwrap();
    a.mov(rdi, BUF + 0x1000 + 3).unwrap();
    a.mov(ecx, 0x1800u32).unwrap();
    a.rep().movsb().unwrap();
    // Forward overlap by one byte: every byte becomes the first one.
    a.mov(byte_ptr(BUF), 0x5au32).unwrap();
    a.mov(rsi, BUF).unwrap();
    a.mov(rdi, BUF + 1).unwrap();
    a.mov(ecx, 100u32).unwrap();
    a.rep().movsb().unwrap();
    // Runs into the unmapped guard page.
    a.mov(rdi, GUARD - 16).unwrap();
    a.mov(ecx, 8u32).unwrap();
    a.rep().stosd().unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.set_exception_exits(1 << Exception::PF);
    match e.run(1_000_000, None) {
        Exit::Exception(x) => assert_eq!(x.vector, Exception::PF),
        other => panic!("expected #PF, got {other:?}"),
    }
    let cpu = e.cpu();
    assert_eq!(cpu.cr2, GUARD);
    assert_eq!(
        (cpu.gpr[1], cpu.gpr[7]),
        (4, GUARD),
        "RCX and RDI at the fault"
    );
    // The same steps, byte by byte, as the SDM defines them.
    let mut want = vec![0u8; (GUARD - BUF) as usize];
    for (k, b) in want[..3 * 4096].iter_mut().enumerate() {
        *b = 0x1122_3344_5566_7788u64.to_le_bytes()[k % 8];
    }
    let movsb = |m: &mut Vec<u8>, src: usize, dst: usize, n: usize| {
        for k in 0..n {
            m[dst + k] = m[src + k];
        }
    };
    movsb(&mut want, 8, 0x1003, 0x1800);
    want[0] = 0x5a;
    movsb(&mut want, 0, 1, 100);
    for k in 0..16 {
        want[0x3ff0 + k] = 0x5566_7788u32.to_le_bytes()[k % 4];
    }
    let mut got = vec![0u8; want.len()];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    let first_diff = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(
        first_diff, None,
        "memory differs from the element-wise result"
    );
    assert!(
        got[..101].iter().all(|b| *b == 0x5a),
        "overlapping MOVSB fills"
    );
}

/// Register-only stretches run natively on the host (`exec::native`):
/// from the same random registers and flags, the result must equal the
/// interpreter's in every register and in the flags the last instruction
/// defines.
#[test]
fn native_runs_match_the_interpreter() {
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rax, rbx).unwrap();
    a.adc(rcx, rdx).unwrap();
    a.setc(r8b).unwrap();
    a.sub(rsi, rdi).unwrap();
    a.sbb(r9, r10).unwrap();
    a.cmovb(r11, r12).unwrap();
    a.imul_2(r13, r14).unwrap();
    a.seto(al).unwrap();
    a.shl(r15, cl).unwrap();
    a.mov(ah, bl).unwrap();
    a.xor(bh, ch).unwrap();
    a.lea(rbp, qword_ptr(rax + rbx * 4 + 0x10)).unwrap();
    a.mul(rcx).unwrap();
    a.setb(dl).unwrap();
    a.neg(rdx).unwrap();
    a.not(rsi).unwrap();
    a.movzx(eax, r8b).unwrap();
    a.movsx(rbx, cx).unwrap();
    a.movsxd(rdi, esi).unwrap();
    a.rol(r10, 7u32).unwrap();
    a.ror(r11d, cl).unwrap();
    a.bt(rax, 5u32).unwrap();
    a.setc(dl).unwrap();
    a.cmp(r9d, r10d).unwrap();
    a.cmovg(r12d, r13d).unwrap();
    a.inc(r14w).unwrap();
    a.sar(r15d, 3u32).unwrap();
    a.add(r8, r9).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    // A run that writes only some flags: INC keeps CF, the rest none.
    const PARTIAL: u64 = CODE + 0x800;
    let mut b = CodeAssembler::new(64).unwrap();
    b.inc(rax).unwrap();
    b.mov(rbx, rcx).unwrap();
    b.not(rdx).unwrap();
    b.hlt().unwrap();
    load(&mem, PARTIAL, &mut b);
    if !native_code_runs_here() {
        return;
    }
    let mut rng = testkit::Rng::new(testkit::seed());
    let mut next = || rng.next();
    const STATUS: u64 = 0x8d5;
    for round in 0..200 {
        let regs: Vec<u64> = (0..16).map(|_| next()).collect();
        let flags = next() & STATUS;
        let mut results = Vec::new();
        for (native, start) in [
            (true, CODE),
            (false, CODE),
            (true, PARTIAL),
            (false, PARTIAL),
        ] {
            let mut e = emulator(&mem);
            e.set_native_runs(native);
            let cpu = e.cpu_mut();
            cpu.rip = start;
            for (n, v) in regs.iter().enumerate() {
                if n != 4 {
                    cpu.gpr[n] = *v;
                }
            }
            cpu.rflags = 2 | flags;
            match e.run(10_000, None) {
                Exit::Halt => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
            // Otherwise the interpreter would be compared with itself.
            if native {
                assert!(
                    e.native_runs_executed() > 0,
                    "round {round}: no native stub ran (arena refused or full?)"
                );
            } else {
                assert_eq!(e.native_runs_executed(), 0, "round {round}");
            }
            let cpu = e.cpu();
            results.push((cpu.gpr, cpu.rflags & STATUS));
        }
        assert_eq!(
            results[0], results[1],
            "round {round}: native vs interpreted"
        );
        assert_eq!(results[2], results[3], "round {round}: partial flags");
        assert_eq!(
            results[2].1 & 1,
            flags & 1,
            "round {round}: CF kept through INC"
        );
    }
}

#[test]
fn page_fault_delivered_on_ist_stack() {
    let mem = setup();
    mem.write_obj(0u64, GuestAddress(pte_addr(0x27000)))
        .unwrap();
    set_gate(&mem, 14, HANDLERS, 1, 0, false);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(rax, cr2).unwrap();
    h.out(0x20, eax).unwrap();
    h.mov(rax, rsp).unwrap();
    h.out(0x21, eax).unwrap();
    h.hlt().unwrap();
    load(&mem, HANDLERS, &mut h);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dword_ptr(0x27004), eax).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().rflags = 0x202;
    e.cpu_mut().gpr[4] = STACK - 0x18;
    let outs = run_outs(&mut e);
    assert_eq!(outs, vec![(0x20, 0x27004), (0x21, (IST1 - 48) as u32)]);
    let frame: [u64; 6] = mem.read_obj(GuestAddress(IST1 - 48)).unwrap();
    assert_eq!(frame, [0x2, CODE, 0x08, 0x202, STACK - 0x18, 0x10]);
    assert_eq!(e.cpu().rflags & 0x200, 0, "interrupt gate clears IF");
}

#[test]
fn int3_and_int_n_round_trip_with_iretq() {
    let mem = setup();
    set_gate(&mem, 3, HANDLERS, 0, 3, true);
    set_gate(&mem, 0x80, HANDLERS + 0x100, 0, 0, false);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(eax, 3u32).unwrap();
    h.out(0x30, eax).unwrap();
    h.iretq().unwrap();
    load(&mem, HANDLERS, &mut h);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(rax, qword_ptr(rsp)).unwrap();
    h.out(0x31, eax).unwrap();
    h.iretq().unwrap();
    load(&mem, HANDLERS + 0x100, &mut h);
    let mut a = CodeAssembler::new(64).unwrap();
    a.int3().unwrap();
    a.int(0x80).unwrap();
    a.mov(rax, rsp).unwrap();
    a.out(0x32, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    // INT 0x80's frame holds the address after it (CODE + 1 + 2).
    assert_eq!(
        outs,
        vec![(0x30, 3), (0x31, (CODE + 3) as u32), (0x32, STACK as u32)]
    );
}

#[test]
fn syscall_sysret_round_trip_through_ring_3() {
    let mem = setup();
    let user = CODE + 0x800;
    let entry = HANDLERS;
    let mut k = CodeAssembler::new(64).unwrap();
    let mut done = k.create_label();
    k.cmp(rax, 2).unwrap();
    k.je(done).unwrap();
    k.mov(rax, rsp).unwrap();
    k.out(0x40, eax).unwrap();
    k.db(&[0x48, 0x0f, 0x07]).unwrap(); // SYSRETQ
    k.set_label(&mut done).unwrap();
    k.hlt().unwrap();
    load(&mem, entry, &mut k);
    let mut u = CodeAssembler::new(64).unwrap();
    u.mov(eax, 1u32).unwrap();
    u.syscall().unwrap();
    u.mov(rax, rsp).unwrap();
    u.out(0x41, eax).unwrap();
    u.mov(eax, 2u32).unwrap();
    u.syscall().unwrap();
    load(&mem, user, &mut u);
    let mut a = CodeAssembler::new(64).unwrap();
    // MSRs: EFER.SCE, STAR, LSTAR, FMASK.
    a.mov(ecx, 0xc000_0080u32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 1).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0xc000_0081u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(edx, 0x0010_0008u32).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0xc000_0082u32).unwrap();
    a.mov(eax, entry as u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0xc000_0084u32).unwrap();
    a.mov(eax, 0x200u32).unwrap();
    a.wrmsr().unwrap();
    // IOPL 3 so the user code may OUT.
    to_ring_3(&mut a, user, 0x3202);
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    // SYSCALL does not switch stacks: the kernel sees the user RSP.
    assert_eq!(
        outs,
        vec![(0x40, USER_STACK as u32), (0x41, USER_STACK as u32)]
    );
    assert_eq!(e.cpu().segs[1].selector, 0x08);
    assert_eq!(e.cpu().cpl(), 0);
    assert_eq!(e.cpu().gpr[11] & 0x3200, 0x3200, "R11 holds user RFLAGS");
}

#[test]
fn far_jump_from_protected_mode_into_long_mode() {
    let mem = setup();
    mem.write_obj(PDPT | 7, GuestAddress(PML4)).unwrap();
    let target = CODE + 0x800;
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, cr4).unwrap();
    a.or(eax, 0x20).unwrap();
    a.mov(cr4, eax).unwrap();
    a.mov(eax, PML4 as u32).unwrap();
    a.mov(cr3, eax).unwrap();
    a.mov(ecx, 0xc000_0080u32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 0x100).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 0x8000_0000u32 as i32).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut code = a.assemble(CODE).unwrap();
    // JMP FAR 0x08:target
    code.push(0xea);
    code.extend_from_slice(&(target as u32).to_le_bytes());
    code.extend_from_slice(&0x08u16.to_le_bytes());
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut b = CodeAssembler::new(64).unwrap();
    b.mov(rax, 0x1_2345_6789u64).unwrap();
    b.shr(rax, 4).unwrap();
    b.out(0x50, eax).unwrap();
    b.hlt().unwrap();
    load(&mem, target, &mut b);
    let mut e = emulator(&mem);
    let cpu = e.cpu_mut();
    cpu.efer = 0;
    cpu.cr0 = 0x11;
    cpu.cr4 = 0;
    cpu.segs[1] = Segment::from_descriptor(0x38, CODE32);
    let outs = run_outs(&mut e);
    assert_eq!(outs, vec![(0x50, 0x1234_5678)]);
    assert_eq!(e.cpu().bitness(), 64);
    assert_ne!(e.cpu().efer & (1 << 10), 0);
}

#[test]
fn external_interrupt_wakes_sti_hlt_loop() {
    let mem = setup();
    set_gate(&mem, 0x40, HANDLERS, 0, 0, false);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(eax, 0x40u32).unwrap();
    h.out(0x60, eax).unwrap();
    h.iretq().unwrap();
    load(&mem, HANDLERS, &mut h);
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.out(0x61, eax).unwrap();
    a.jmp(top).unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let lines = Arc::new(InterruptLines::new());
    e.attach_interrupts(lines.clone());
    let injector = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            lines.request(0x40);
        })
    };
    let first = e.run(u64::MAX, None);
    let second = e.run(u64::MAX, None);
    injector.join().unwrap();
    assert!(
        matches!(
            first,
            Exit::IoOut {
                port: 0x60,
                data: 0x40,
                ..
            }
        ),
        "{first:?}"
    );
    assert!(
        matches!(second, Exit::IoOut { port: 0x61, .. }),
        "{second:?}"
    );
}

#[test]
fn lock_xadd_from_two_threads_is_exact() {
    let mem = setup();
    const COUNTER: u64 = 0x28000;
    const N: u32 = 50_000;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(ecx, N).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(eax, 1u32).unwrap();
    a.lock().xadd(dword_ptr(COUNTER), eax).unwrap();
    a.lock().inc(dword_ptr(COUNTER + 4)).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut e = emulator(&mem);
            std::thread::spawn(move || e.run(u64::MAX, None))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Exit::Halt);
    }
    let v: [u32; 2] = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(v, [2 * N, 2 * N]);
}

/// Instructions Linux runs on every CPU that used to be #UD stand-ins:
/// SGDT/SIDT, MOV to/from debug registers (with their reset values),
/// VERR/VERW, TZCNT/LZCNT executed as BSF/BSR (no BMI1/ABM), and
/// IA32_BIOS_SIGN_ID (MSR 0x8b) reading 0 after a write.
#[test]
fn sgdt_sidt_debug_registers_verw_and_microcode_msr() {
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    a.sgdt(ptr(0x7000u64)).unwrap();
    a.sidt(ptr(0x7010u64)).unwrap();
    // DR6/DR7 reset values, then a stored DR0 and a masked DR7.
    a.db(&[0x0f, 0x21, 0xf0]).unwrap(); // mov rax, dr6
    a.out(0x40, eax).unwrap();
    a.db(&[0x0f, 0x21, 0xf8]).unwrap(); // mov rax, dr7
    a.out(0x41, eax).unwrap();
    a.mov(rbx, 0x1234_5678u64).unwrap();
    a.db(&[0x0f, 0x23, 0xc3]).unwrap(); // mov dr0, rbx
    a.db(&[0x0f, 0x21, 0xc0]).unwrap(); // mov rax, dr0
    a.out(0x42, eax).unwrap();
    a.mov(rbx, 0x1u64).unwrap();
    a.db(&[0x0f, 0x23, 0xfb]).unwrap(); // mov dr7, rbx
    a.db(&[0x0f, 0x21, 0xf8]).unwrap(); // mov rax, dr7
    a.out(0x43, eax).unwrap();
    // VERW: kernel data (0x10) yes, kernel code (0x08) no, null no;
    // VERR: kernel code (readable) yes.
    for (sel, port) in [(0x10u32, 0x44i32), (0x08, 0x45), (0, 0x46)] {
        a.mov(ecx, sel).unwrap();
        a.verw(cx).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(port, eax).unwrap();
    }
    a.mov(ecx, 0x08u32).unwrap();
    a.verr(cx).unwrap();
    a.setz(al).unwrap();
    a.movzx(eax, al).unwrap();
    a.out(0x47, eax).unwrap();
    // MSR 0x8b: the write is accepted, the read gives 0.
    a.mov(ecx, 0x8bu32).unwrap();
    a.xor(eax, eax).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.mov(edx, 0xffff_ffffu32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, edx).unwrap();
    a.out(0x48, eax).unwrap();
    // rep bsf = tzcnt encoding: BSF on this CPU model (0x50 -> 4).
    a.mov(edx, 0x50u32).unwrap();
    a.db(&[0xf3, 0x0f, 0xbc, 0xc2]).unwrap(); // tzcnt eax, edx
    a.out(0x49, eax).unwrap();
    a.db(&[0xf3, 0x0f, 0xbd, 0xc2]).unwrap(); // lzcnt eax, edx -> bsr = 6
    a.out(0x4a, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let outs = run_outs(&mut e);
    assert_eq!(
        outs,
        vec![
            (0x40, 0xffff_0ff0),
            (0x41, 0x400),
            (0x42, 0x1234_5678),
            (0x43, 0x401),
            (0x44, 1),
            (0x45, 0),
            (0x46, 0),
            (0x47, 1),
            (0x48, 0),
            (0x49, 4),
            (0x4a, 6),
        ]
    );
    let gdtr: [u8; 10] = mem.read_obj(GuestAddress(0x7000)).unwrap();
    assert_eq!(u16::from_le_bytes([gdtr[0], gdtr[1]]), 0x3f);
    assert_eq!(u64::from_le_bytes(gdtr[2..].try_into().unwrap()), GDT);
    let idtr: [u8; 10] = mem.read_obj(GuestAddress(0x7010)).unwrap();
    assert_eq!(u16::from_le_bytes([idtr[0], idtr[1]]), 0xfff);
    assert_eq!(u64::from_le_bytes(idtr[2..].try_into().unwrap()), IDT);
}

/// IN/OUT at CPL 3 > IOPL 0 go through the TSS I/O permission bitmap:
/// a port whose bit is clear works, one whose bit is set (or beyond the
/// TSS limit) is #GP(0).
#[test]
fn port_io_at_cpl3_follows_the_tss_bitmap() {
    let mem = setup();
    // I/O map base 0x68; every port denied but 0x501 (and the map ends
    // at the TSS limit, so ports past it are denied too).
    mem.write_obj(0x68u16, GuestAddress(TSS + 0x66)).unwrap();
    mem.write_slice(&[0xff; 0xa2], GuestAddress(TSS + 0x68))
        .unwrap();
    mem.write_obj(0xfdu8, GuestAddress(TSS + 0x68 + 0x501 / 8))
        .unwrap();
    let user = CODE + 0x800;
    let mut u = CodeAssembler::new(64).unwrap();
    u.mov(edx, 0x501u32).unwrap();
    u.mov(eax, 7u32).unwrap();
    u.out(dx, al).unwrap();
    u.mov(edx, 0x500u32).unwrap();
    u.out(dx, al).unwrap();
    load(&mem, user, &mut u);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x1bu64).unwrap();
    a.push(rax).unwrap();
    a.mov(rax, USER_STACK).unwrap();
    a.push(rax).unwrap();
    a.mov(rax, 0x202u64).unwrap(); // IOPL 0
    a.push(rax).unwrap();
    a.mov(rax, 0x23u64).unwrap();
    a.push(rax).unwrap();
    a.mov(rax, user).unwrap();
    a.push(rax).unwrap();
    a.iretq().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().tr.limit = 0x68 + 0xa1;
    e.set_exception_exits(1 << Exception::GP);
    assert_eq!(
        e.run(1_000_000, None),
        Exit::IoOut {
            port: 0x501,
            size: 1,
            data: 7
        }
    );
    match e.run(1_000_000, None) {
        Exit::Exception(x) => {
            assert_eq!(x.vector, Exception::GP);
            assert_eq!(x.error_code, Some(0));
        }
        other => panic!("expected #GP, got {other:?}"),
    }
    assert_eq!(e.cpu().cpl(), 3);
    // Beyond the TSS limit: denied as well.
    e.cpu_mut().tr.limit = 0x68 + 0x9f;
    e.cpu_mut().rip = user;
    match e.run(1_000_000, None) {
        Exit::Exception(x) => assert_eq!(x.vector, Exception::GP),
        other => panic!("expected #GP, got {other:?}"),
    }
}

/// kvmclock: CPUID names KVM, and enabling MSR_KVM_SYSTEM_TIME_NEW writes
/// a structure from which the guest's reading of its TSC gives the system
/// time (the TSC without the guest's offset), even after the guest moved
/// its TSC (which takes back the TSC-stable flag); the wall clock lands
/// where asked; an address outside RAM is taken without a fault, as KVM
/// takes it.
#[test]
fn kvmclock_structures_tell_the_guest_the_time() {
    const CLOCK: u64 = 0x1_0800;
    const WALL: u64 = 0x1_0900;
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 0x4000_0000u32).unwrap();
    a.cpuid().unwrap();
    a.out(0x10, eax).unwrap();
    a.mov(eax, ebx).unwrap();
    a.out(0x11, eax).unwrap();
    // Move the TSC first: kvmclock must hide the offset.
    a.mov(ecx, 0x10u32).unwrap();
    a.mov(eax, 0u32).unwrap();
    a.mov(edx, 0x100u32).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0x4b56_4d01u32).unwrap();
    a.mov(eax, (CLOCK | 1) as u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0x4b56_4d00u32).unwrap();
    a.mov(eax, WALL as u32).unwrap();
    a.wrmsr().unwrap();
    a.rdtsc().unwrap();
    a.out(0x12, eax).unwrap();
    a.mov(eax, edx).unwrap();
    a.out(0x13, eax).unwrap();
    // Outside RAM: no fault.
    a.mov(ecx, 0x4b56_4d01u32).unwrap();
    a.mov(eax, 0xf000_0001u32).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, 1u32).unwrap();
    a.out(0x14, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.set_exception_exits(1 << 13);
    let outs = run_outs(&mut e);
    assert_eq!(outs.last(), Some(&(0x14, 1)), "no #GP: {outs:x?}");
    assert_eq!(outs[0], (0x10, 0x4000_0001));
    assert_eq!(outs[1], (0x11, u32::from_le_bytes(*b"KVMK")));
    let tsc = u64::from(outs[2].1) | (u64::from(outs[3].1) << 32);
    let info: [u8; 32] = mem.read_obj(GuestAddress(CLOCK)).unwrap();
    assert_eq!(info[0] % 2, 0, "version even: not being updated");
    assert_eq!(info[29] & 1, 0, "the guest moved its TSC: not stable");
    let system = emu::pvclock::guest_reading(&info, tsc);
    // The guest set its TSC to 0x100 << 32 a moment before reading it.
    let offset_free = tsc - (0x100u64 << 32);
    assert!(
        system.abs_diff(offset_free) < 50_000_000,
        "system time {system} vs TSC less its jump {offset_free}"
    );
    let wall: [u8; 12] = mem.read_obj(GuestAddress(WALL)).unwrap();
    let sec = u32::from_le_bytes(wall[4..8].try_into().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        u64::from(sec).abs_diff(now) < 60,
        "wall clock {sec} vs {now}"
    );
}

/// Instructions of absent extensions in the reserved-NOP space run as
/// NOPs: RDSSP leaves its register alone (libgcc's unwinder relies on
/// it) and CLDEMOTE does nothing.
#[test]
fn the_reserved_nop_space_is_nops() {
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x1234u64).unwrap();
    a.rdsspq(rax).unwrap();
    a.rdsspd(eax).unwrap();
    a.cldemote(byte_ptr(rax)).unwrap();
    a.out(0x10, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.set_exception_exits(1 << 6);
    assert_eq!(run_outs(&mut e), vec![(0x10, 0x1234)]);
}

/// The privilege tests' guest: F at CODE + 0x400 loads through R9 (`mov
/// rax, [r9]; add rax, [r9 + 8]; ret`); the kernel at CODE calls it twice
/// with R9 in a supervisor-only page (so F's block is decoded, and its
/// native code made, at CPL 0, and the TLB keeps the page), then IRETQ
/// to ring 3 at CODE + 0x800. Returns the page, F and the ring-3 entry.
fn privilege_test(mem: &GuestRam) -> (u64, u64, u64) {
    let data = 0x2_0000u64;
    mem.write_obj(data | 3, GuestAddress(pte_addr(data)))
        .unwrap();
    let f = CODE + 0x400;
    let user = CODE + 0x800;
    let mut b = CodeAssembler::new(64).unwrap();
    b.mov(rax, qword_ptr(r9)).unwrap();
    b.add(rax, qword_ptr(r9 + 8)).unwrap();
    b.ret().unwrap();
    load(mem, f, &mut b);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(r9, data + 0x100).unwrap();
    a.mov(rax, f).unwrap();
    a.call(rax).unwrap();
    a.mov(rax, f).unwrap();
    a.call(rax).unwrap();
    to_ring_3(&mut a, user, 0x202);
    load(mem, CODE, &mut a);
    (data, f, user)
}

#[test]
fn a_native_run_decoded_at_cpl_0_checks_user_permissions_at_cpl_3() {
    // F (see `privilege_test`) loads from a supervisor-only page, and its
    // native code, made at CPL 0, hits the TLB entry the kernel's calls
    // filled. Ring 3 calls the same block: that must be a #PF (present,
    // user, read), not a native load with the supervisor's permission.
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    let (data, f, user) = privilege_test(&mem);
    let mut u = CodeAssembler::new(64).unwrap();
    u.mov(rax, f).unwrap();
    u.call(rax).unwrap();
    u.hlt().unwrap();
    load(&mem, user, &mut u);
    let mut e = emulator(&mem);
    expect_pf(&mut e, data + 0x100, 5);
    assert_eq!(e.cpu().cpl(), 3);
    assert_eq!(e.cpu().rip, f, "the fault is at F's first load");
    assert!(
        e.native_runs_executed() >= 2,
        "F's native run did not run at CPL 0"
    );
}

/// Whether native code can run on this host (x86-64); says so when not.
fn native_code_runs_here() -> bool {
    let here = cfg!(target_arch = "x86_64");
    if !here {
        testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
    }
    here
}

/// `top: add rax, 1; add rcx, rax; jmp top` at CODE, after `prefix`: a
/// block whose native code goes on into itself for ever.
fn endless_loop(mem: &GuestRam, prefix: impl FnOnce(&mut CodeAssembler)) {
    let mut a = CodeAssembler::new(64).unwrap();
    prefix(&mut a);
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.add(rax, 1).unwrap();
    a.add(rcx, rax).unwrap();
    a.jmp(top).unwrap();
    load(mem, CODE, &mut a);
}

/// Asserts that blocks' code went on from block to block: a hundred
/// instructions and more per entry from the block loop, where the loops
/// here have blocks of three or four.
fn assert_chained(e: &Emulator) {
    let (entries, instructions) = (e.native_runs_executed(), e.native_instructions());
    assert!(
        entries > 0 && instructions / entries >= 100,
        "the loop did not chain: {instructions} instructions in {entries} entries"
    );
}

/// A bound on a run that should end long before it: at about a
/// nanosecond per instruction, several seconds.
const GUARD: u64 = 4_000_000_000;

#[test]
fn a_chain_of_native_blocks_ends_with_the_instruction_budget() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    endless_loop(&mem, |_| {});
    let mut e = emulator(&mem);
    assert_eq!(e.run(100_000, None), Exit::BudgetExhausted);
    // The chain stops after the block that reaches the budget.
    let retired = e.instructions_retired();
    assert!((100_000..100_003).contains(&retired), "{retired}");
    assert_chained(&e);
    // The loop's jump was linked to its own code: the block loop entered
    // the chain again only where its instruction limit ended it.
    let entries = e.native_runs_executed();
    assert!(
        entries <= 100_000 / emu::exec::CHAIN_LIMIT + 3,
        "{entries} entries"
    );
    // Exact: the interpreter would have run the same instructions.
    assert_eq!(e.cpu().rip, CODE);
    let laps = e.cpu().gpr[0];
    assert_eq!(laps, retired / 3);
    assert_eq!(e.cpu().gpr[1], laps * (laps + 1) / 2);
}

#[test]
fn a_chain_of_native_blocks_is_cut_by_an_interrupt_request() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    endless_loop(&mem, |a| a.sti().unwrap());
    assert_takes_an_interrupt_requested_while_it_runs(&mem);
}

/// Vector 0x40's handler: `out 0x60, 0x40; iretq`.
fn interrupt_handler(mem: &GuestRam) {
    set_gate(mem, 0x40, HANDLERS, 0, 0, false);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(eax, 0x40u32).unwrap();
    h.out(0x60, eax).unwrap();
    h.iretq().unwrap();
    load(mem, HANDLERS, &mut h);
}

/// Runs the endless code at CODE, chained in blocks' code, with vector
/// 0x40 requested 50 ms in: its handler must run.
fn assert_takes_an_interrupt_requested_while_it_runs(mem: &GuestRam) {
    interrupt_handler(mem);
    let mut e = emulator(mem);
    let lines = Arc::new(InterruptLines::new());
    e.attach_interrupts(lines.clone());
    let injector = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        lines.request(0x40);
    });
    let exit = e.run(GUARD, None);
    injector.join().unwrap();
    assert!(
        matches!(
            exit,
            Exit::IoOut {
                port: 0x60,
                data: 0x40,
                ..
            }
        ),
        "{exit:?}"
    );
    assert_chained(&e);
}

#[test]
fn a_chain_of_native_blocks_stops_when_asked() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    endless_loop(&mem, |_| {});
    let mut e = emulator(&mem);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let exit = e.run(GUARD, Some(&stop));
    stopper.join().unwrap();
    assert_eq!(exit, Exit::Interrupted);
    assert_chained(&e);
}

#[test]
fn native_code_decoded_at_cpl_0_is_not_chained_to_from_ring_3() {
    // F (see `privilege_test`) is compiled at CPL 0, with supervisor
    // permissions, and the TLB keeps the supervisor-only page it reads. In
    // ring 3 a loop calls F three times from one block: the first two
    // through R9 on a user page, the third on the supervisor-only page.
    // By the third call the caller's code has a link to F; following it
    // into F's supervisor code would read the page natively. It must be
    // a #PF.
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    let (data, f, user) = privilege_test(&mem);
    let user_data = 0x2_1000u64;
    let mut u = CodeAssembler::new(64).unwrap();
    let mut top = u.create_label();
    u.mov(ecx, 3u32).unwrap();
    u.set_label(&mut top).unwrap();
    u.mov(r9, user_data).unwrap();
    u.mov(rdx, data + 0x100).unwrap();
    u.cmp(ecx, 1).unwrap();
    u.cmove(r9, rdx).unwrap();
    u.call(f).unwrap();
    u.dec(ecx).unwrap();
    u.jnz(top).unwrap();
    u.hlt().unwrap();
    load(&mem, user, &mut u);
    let mut e = emulator(&mem);
    expect_pf(&mut e, data + 0x100, 5);
    assert_eq!(e.cpu().cpl(), 3);
    assert_eq!(e.cpu().rip, f, "the fault is at F's first load");
    assert_eq!(e.cpu().gpr[1], 1, "on the third call");
}

#[test]
fn a_block_is_compiled_to_native_code_once_it_has_run_often() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    endless_loop(&mem, |_| {});
    let mut e = emulator(&mem);
    let hot = emu::block::HOT_AFTER;
    e.compile_after(hot);
    // Three instructions a lap: the loop's block runs `hot - 1` times
    // interpreted.
    let cold = 3 * u64::from(hot - 1);
    assert_eq!(e.run(cold, None), Exit::BudgetExhausted);
    assert_eq!(e.native_runs_executed(), 0, "compiled before its time");
    assert_eq!(e.run(10_000, None), Exit::BudgetExhausted);
    assert!(e.native_runs_executed() > 0, "never compiled");
    assert_chained(&e);
    // Exact across the switch: one lap per three instructions.
    assert_eq!(e.cpu().gpr[0], e.instructions_retired() / 3);
}

#[test]
fn sse_and_x87_in_native_code_are_device_not_available_faults_with_cr0_ts_set() {
    // A loop's block with FNSTCW and PADDQ is compiled and chained to
    // itself; with CR0.TS set, the same code must leave before FNSTCW for
    // the interpreter to raise #NM there, as the OS expects for lazy FPU
    // switching.
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.add(rax, 1).unwrap();
    // At CODE + 6: `add rax, imm32` first.
    a.fnstcw(word_ptr(STACK - 16)).unwrap();
    a.paddq(xmm0, xmm1).unwrap();
    a.cmp(rax, 1000).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().cr4 |= 1 << 9;
    e.cpu_mut().fpu.xmm[1] = 3;
    assert_eq!(e.run(GUARD, None), Exit::Halt);
    assert_eq!(e.cpu().fpu.xmm[0], 3000, "PADDQ in native code");
    let fcw: u16 = mem.read_obj(GuestAddress(STACK - 16)).unwrap();
    assert_eq!(fcw, e.cpu().fpu.fcw, "FNSTCW in native code");
    assert_chained(&e);
    let cpu = e.cpu_mut();
    cpu.rip = CODE;
    cpu.gpr[0] = 0;
    cpu.cr0 |= 1 << 3;
    e.set_exception_exits(1 << 7);
    match e.run(10_000, None) {
        Exit::Exception(x) => assert_eq!(x.vector, 7, "#NM"),
        other => panic!("expected #NM, got {other:?}"),
    }
    assert_eq!(e.cpu().gpr[0], 1, "the ADD before it ran");
    assert_eq!(e.cpu().rip, CODE + 6, "at FNSTCW");
    assert_eq!(e.cpu().fpu.xmm[0], 3000, "PADDQ did not run");
}

#[test]
fn floating_point_in_native_code_raises_the_exceptions_the_guest_unmasked() {
    // DIVSD in a compiled loop, the guest's MXCSR unmasking divide by
    // zero: on the 100th lap the divisor is zero, and the guest must get
    // #XM at that DIVSD (the host processor, running it natively under
    // that MXCSR, would raise SIGFPE in vessel instead).
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut top, mut over) = (a.create_label(), a.create_label());
    a.set_label(&mut top).unwrap();
    a.add(rax, 1).unwrap();
    a.cmp(rax, 100).unwrap();
    a.jne(over).unwrap();
    a.pxor(xmm1, xmm1).unwrap();
    a.set_label(&mut over).unwrap();
    a.divsd(xmm0, xmm1).unwrap();
    a.jmp(top).unwrap();
    let code = a.assemble(CODE).unwrap();
    let divsd = code
        .windows(4)
        .position(|w| w == [0xf2, 0x0f, 0x5e, 0xc1])
        .expect("divsd xmm0, xmm1") as u64;
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut e = emulator(&mem);
    let cpu = e.cpu_mut();
    // OSFXSR and OSXMMEXCPT; ZM clear.
    cpu.cr4 |= (1 << 9) | (1 << 10);
    cpu.fpu.mxcsr = 0x1f80 & !(1 << 9);
    cpu.fpu.xmm[0] = u128::from(1.0f64.to_bits());
    cpu.fpu.xmm[1] = u128::from(1.0f64.to_bits());
    e.set_exception_exits(1 << 19);
    match e.run(GUARD, None) {
        Exit::Exception(x) => assert_eq!(x.vector, 19, "#XM"),
        other => panic!("expected #XM, got {other:?}"),
    }
    assert_eq!(e.cpu().gpr[0], 100, "on the 100th lap");
    assert_eq!(e.cpu().rip, CODE + divsd, "at DIVSD");
    assert_eq!(e.cpu().fpu.xmm[0], u128::from(1.0f64.to_bits()));
    assert!(e.native_runs_executed() > 0, "no native code ran");
}

/// A loop whose block reads two linear pages that share a TLB entry (16
/// MiB apart, the second mapped through a second page directory entry to
/// the same table), so that every lap misses twice, while the guest's
/// XMM registers are in the host's: the walks are made from the block's
/// code, which goes on, with every register as it was, instead of
/// leaving the chain for the interpreter at each miss.
#[test]
fn tlb_misses_in_blocks_code_are_refilled_without_leaving_it() {
    if !native_code_runs_here() {
        return;
    }
    const DATA: u64 = 0x20000;
    const ALIAS: u64 = DATA + (16 << 20);
    const LAPS: u32 = 300;
    let mem = setup();
    // The page directory's entry 8 (linear 16 MiB) uses the same table.
    mem.write_obj(PT | 7, GuestAddress(PD + 8 * 8)).unwrap();
    mem.write_obj(5u64, GuestAddress(DATA)).unwrap();
    mem.write_obj(7u64, GuestAddress(DATA + 8)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, LAPS).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.mov(eax, 1).unwrap();
    a.movq(xmm1, rax).unwrap();
    a.pxor(xmm0, xmm0).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.mov(rdi, ALIAS).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.paddq(xmm0, xmm1).unwrap();
    a.mov(rax, qword_ptr(rsi)).unwrap();
    a.add(rbx, rax).unwrap();
    a.mov(rax, qword_ptr(rdi + 8)).unwrap();
    a.add(rbx, rax).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.mov(eax, ebx).unwrap();
    a.out(0x20, eax).unwrap();
    a.movq(rax, xmm0).unwrap();
    a.out(0x20, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    // SSE allowed: CR4.OSFXSR set, CR0.EM and CR0.TS clear.
    e.cpu_mut().cr4 |= 1 << 9;
    e.cpu_mut().cr0 &= !(1 << 2 | 1 << 3);
    let outs = run_outs(&mut e);
    assert_eq!(outs, [(0x20, 12 * LAPS), (0x20, LAPS)]);
    let refills = e.native_refills();
    assert!(
        refills >= 2 * u64::from(LAPS) - 10,
        "{refills} misses refilled in {LAPS} laps"
    );
    assert!(
        e.native_run_exits() < 5,
        "{} exits for the interpreter",
        e.native_run_exits()
    );
    assert_chained(&e);
}

/// CLI (at CPL 0), CLD, STD and PREFETCHh have forms in blocks' code, so
/// that a loop of them goes on from block to block: IF and DF come out as
/// the interpreter would leave them, and a REP STOSB after an STD (left
/// to the interpreter, DF being set) stores downwards.
#[test]
fn cli_cld_std_and_prefetch_run_in_blocks_code() {
    if !native_code_runs_here() {
        return;
    }
    const DATA: u64 = 0x20000;
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, 300u32).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.xor(eax, eax).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.cli().unwrap();
    a.prefetcht0(byte_ptr(rsi)).unwrap();
    a.std().unwrap();
    a.add(rax, 1).unwrap();
    a.cld().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.out(0x20, eax).unwrap();
    a.pushfq().unwrap();
    a.pop(rax).unwrap();
    a.out(0x20, eax).unwrap();
    a.std().unwrap();
    a.mov(rdi, DATA + 15).unwrap();
    a.mov(ecx, 4u32).unwrap();
    a.mov(al, 0xabu32).unwrap();
    a.rep().stosb().unwrap();
    a.cld().unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    e.cpu_mut().rflags = 0x202;
    let outs = run_outs(&mut e);
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(outs[0], (0x20, 300));
    assert_eq!(outs[1].1 & 0x600, 0, "IF and DF clear: {:#x}", outs[1].1);
    assert_chained(&e);
    let mut stored = [0u8; 6];
    mem.read_slice(&mut stored, GuestAddress(DATA + 11))
        .unwrap();
    assert_eq!(stored, [0, 0xab, 0xab, 0xab, 0xab, 0]);
    assert_eq!(e.cpu().rflags & 0x600, 0);
}

/// A loop that masks and unmasks interrupts (`cli; ...; sti; ...`), as
/// Linux's `local_irq_save` and `local_irq_restore` do, runs in blocks'
/// code from block to block, and an interrupt requested meanwhile is
/// delivered (the STI's code leaves the chain while one is pending).
#[test]
fn a_chain_of_native_blocks_with_cli_and_sti_takes_an_interrupt() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.cli().unwrap();
    a.add(rax, 1).unwrap();
    a.sti().unwrap();
    a.add(rcx, rax).unwrap();
    a.jmp(top).unwrap();
    load(&mem, CODE, &mut a);
    assert_takes_an_interrupt_requested_while_it_runs(&mem);
}

/// `sti; hlt` with an interrupt already requested (and masked) when a
/// chain of blocks' code reaches the STI: the interrupt comes after the
/// HLT, which then ends, not before it (which would leave the vCPU halted
/// with nothing more to wake it).
#[test]
fn sti_in_blocks_code_keeps_its_shadow_over_hlt() {
    if !native_code_runs_here() {
        return;
    }
    let mem = setup();
    interrupt_handler(&mem);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, 200u32).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.add(rax, 1).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.mov(eax, 0x61u32).unwrap();
    a.out(0x61, eax).unwrap();
    a.hlt().unwrap();
    load(&mem, CODE, &mut a);
    let mut e = emulator(&mem);
    let lines = Arc::new(InterruptLines::new());
    e.attach_interrupts(lines.clone());
    lines.request(0x40);
    // A guard: a vCPU halted for good is stopped after 5 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..500 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut outs = Vec::new();
    while outs.len() < 2 {
        match e.run(GUARD, Some(&stop)) {
            Exit::IoOut { port, .. } => outs.push(port),
            other => panic!("{other:?} after {outs:x?}"),
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    stopper.join().unwrap();
    assert_eq!(outs, [0x60, 0x61]);
}
