//! The emu accelerator with its platform (`VmConfig::irqchip`) and the
//! block-level behaviours the Linux boot depends on.

mod common;

use emu::{Emulator, Exit};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;

fn run_code(a: &mut CodeAssembler, mem_size: usize) -> (Emulator, Exit, hypervisor::GuestRam) {
    let code = a.assemble(CODE).expect("assemble");
    let mem = common::memory(mem_size);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut e = common::emulator(&mem);
    e.cpu_mut().rip = CODE;
    e.cpu_mut().gpr[4] = 0x8000;
    let exit = e.run(1 << 24, None);
    (e, exit, mem)
}

/// A REP string instruction long enough to run in several chunks, in the
/// middle of a block: the rest of the block must wait until it is done
/// (Linux's decompressor copies itself with `std; rep movsq; cld; ...;
/// jmp *%rax` in one block).
#[test]
fn long_rep_string_in_mid_block_completes_before_the_next_instruction() {
    const DST: u64 = 0x10_0000;
    const QWORDS: u32 = 50_000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rdi, DST).unwrap();
    a.mov(ecx, QWORDS).unwrap();
    a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
    a.rep().stosq().unwrap();
    a.mov(rbx, rcx).unwrap();
    a.out(0x80, al).unwrap();
    let (e, exit, mem) = run_code(&mut a, 0x20_0000);
    assert!(matches!(exit, Exit::IoOut { port: 0x80, .. }), "{exit:?}");
    assert_eq!(e.cpu().gpr[3], 0, "RCX seen by the next instruction");
    let last: u64 = mem
        .read_obj(GuestAddress(DST + 8 * u64::from(QWORDS - 1)))
        .unwrap();
    assert_eq!(last, 0x1122_3344_5566_7788);
}

/// The same going down (DF=1), as the decompressor does.
#[test]
fn long_backward_rep_movsq_completes() {
    const SRC: u64 = 0x10_0000;
    const DST: u64 = 0x18_0000;
    const QWORDS: u64 = 10_000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rsi, SRC + 8 * (QWORDS - 1)).unwrap();
    a.mov(rdi, DST + 8 * (QWORDS - 1)).unwrap();
    a.mov(ecx, QWORDS as u32).unwrap();
    a.std().unwrap();
    a.rep().movsq().unwrap();
    a.cld().unwrap();
    a.mov(rbx, rcx).unwrap();
    a.out(0x80, al).unwrap();
    let code = a.assemble(CODE).expect("assemble");
    let mem = common::memory(0x20_0000);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    for i in 0..QWORDS {
        mem.write_obj(i + 1, GuestAddress(SRC + 8 * i)).unwrap();
    }
    let mut e = common::emulator(&mem);
    e.cpu_mut().rip = CODE;
    let exit = e.run(1 << 24, None);
    assert!(matches!(exit, Exit::IoOut { port: 0x80, .. }), "{exit:?}");
    assert_eq!(e.cpu().gpr[3], 0);
    for i in [0, 1, QWORDS / 2, QWORDS - 1] {
        let v: u64 = mem.read_obj(GuestAddress(DST + 8 * i)).unwrap();
        assert_eq!(v, i + 1, "qword {i}");
    }
}

/// REP MOVSQ from a source 2 bytes into a page (as Linux copies received
/// packets), so that an element straddles every page boundary, and REP
/// STOSQ likewise: each straddling element moves on its own and the rest
/// in bulk, with the result of an element-by-element copy, including
/// where the destination overlaps the source just above it.
#[test]
fn rep_string_elements_straddling_pages_move_exactly() {
    const SRC: u64 = 0x10_0ffe;
    const QWORDS: u64 = 2000;
    let source: Vec<u8> = (0..QWORDS * 8 + 64).map(|i| (i * 13 + 5) as u8).collect();
    for (dst, stos) in [
        (0x18_0020u64, false),
        (0x18_0ffau64, false),
        (SRC + 24, false), // overlapping, 24 bytes above the source
        (0x18_0ffcu64, true),
    ] {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.mov(rdi, dst).unwrap();
        a.mov(ecx, QWORDS as u32).unwrap();
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        if stos {
            a.rep().stosq().unwrap();
        } else {
            a.rep().movsq().unwrap();
        }
        a.out(0x80, al).unwrap();
        let code = a.assemble(CODE).expect("assemble");
        let mem = common::memory(0x20_0000);
        mem.write_slice(&code, GuestAddress(CODE)).unwrap();
        mem.write_slice(&source, GuestAddress(SRC)).unwrap();
        let mut e = common::emulator(&mem);
        // What an element-by-element copy leaves, over the same bytes.
        let mut expected = vec![0u8; 0x20_0000];
        mem.read_slice(&mut expected, GuestAddress(0)).unwrap();
        for k in 0..QWORDS as usize {
            let to = dst as usize + 8 * k;
            let element: [u8; 8] = if stos {
                0x0102_0304_0506_0708u64.to_le_bytes()
            } else {
                let from = SRC as usize + 8 * k;
                expected[from..from + 8].try_into().unwrap()
            };
            expected[to..to + 8].copy_from_slice(&element);
        }
        e.cpu_mut().rip = CODE;
        let exit = e.run(1 << 24, None);
        assert!(matches!(exit, Exit::IoOut { port: 0x80, .. }), "{exit:?}");
        assert_eq!(e.cpu().gpr[1], 0, "RCX");
        assert_eq!(e.cpu().gpr[7], dst + 8 * QWORDS, "RDI");
        if !stos {
            assert_eq!(e.cpu().gpr[6], SRC + 8 * QWORDS, "RSI");
        }
        let mut got = vec![0u8; 0x20_0000];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        // The data half (the page tables below gain accessed bits).
        let first_difference = got[0x10_0000..]
            .iter()
            .zip(&expected[0x10_0000..])
            .position(|(g, x)| g != x);
        assert_eq!(
            first_difference, None,
            "destination {dst:#x}, stos {stos}: memory differs"
        );
    }
}

/// A one-vCPU emu VM with its platform over `mem`, identity-mapped by the
/// page tables at [`common::TABLES`].
fn one_cpu_vm_with_platform(mem: &hypervisor::GuestRam) -> std::sync::Arc<dyn hypervisor::Vm> {
    use hypervisor::{Hypervisor, VmConfig};
    common::identity_tables(mem, common::TABLES);
    let vm = emu::EmuHypervisor::new()
        .create_vm(&VmConfig {
            num_cpus: 1,
            irqchip: true,
        })
        .unwrap();
    vm.set_memory(mem).unwrap();
    vm
}

/// With the platform, ioeventfd writes signal the eventfd instead of
/// exiting, PIC/PIT ports never reach the VMM, and GSIs outside the
/// IOAPIC are refused; without it, the interrupt calls are unsupported.
#[test]
fn vm_interrupt_wiring_through_the_traits() {
    use emu::EmuHypervisor;
    use hypervisor::{Hypervisor, VcpuExit, VmConfig};
    use vmm_sys_util::eventfd::EventFd;

    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(al, 0xff).unwrap();
    a.out(0x21, al).unwrap(); // PIC mask: the platform's
    a.mov(dx, 0x600u32).unwrap();
    a.out(dx, al).unwrap(); // ioeventfd
    a.in_(al, 0x21).unwrap(); // PIC mask read back
    a.out(0x80, al).unwrap(); // the VMM's
                              // A virtio-style notify register with one eventfd per queue index.
    a.mov(rax, 0xd000_0050u64).unwrap();
    a.mov(word_ptr(rax), 1u32).unwrap(); // 2 bytes: no datamatch, an exit
    a.mov(dword_ptr(rax), 1u32).unwrap(); // queue 1's eventfd
    a.mov(dword_ptr(rax), 0u32).unwrap(); // queue 0's eventfd
    a.mov(dword_ptr(rax), 2u32).unwrap(); // nobody's: an exit
    let code = a.assemble(CODE).expect("assemble");
    let mem = common::memory(0x10_0000);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let vm = one_cpu_vm_with_platform(&mem);
    let doorbell = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_ioevent(&doorbell, 0x600, true, None).unwrap();
    let queue0 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let queue1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_ioevent(&queue0, 0xd000_0050, false, Some(0))
        .unwrap();
    vm.register_ioevent(&queue1, 0xd000_0050, false, Some(1))
        .unwrap();
    assert!(vm.set_irq_line(24, true).is_err());
    vm.set_irq_line(4, true).unwrap();
    vm.set_irq_line(4, false).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut regs = vcpu.regs().unwrap();
    let mut cpu = emu::CpuState::reset();
    common::long_mode(&mut cpu);
    cpu.cr3 = common::TABLES;
    // apic_base 0: keep the platform's.
    let sregs = hypervisor::SpecialRegisters {
        apic_base: 0,
        ..cpu.special()
    };
    vcpu.set_sregs(&sregs).unwrap();
    regs.rip = CODE;
    regs.rsp = 0x8000;
    vcpu.set_regs(&regs).unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x80);
            assert_eq!(data, &[0xff]);
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert_eq!(doorbell.read().unwrap(), 1);
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!((addr, data), (0xd000_0050, &[1u8, 0][..]));
        }
        other => panic!("unexpected exit {other:?}"),
    }
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!((addr, data), (0xd000_0050, &[2u8, 0, 0, 0][..]));
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert_eq!(queue0.read().unwrap(), 1);
    assert_eq!(queue1.read().unwrap(), 1);

    let plain = EmuHypervisor::new()
        .create_vm(&VmConfig {
            num_cpus: 1,
            irqchip: false,
        })
        .unwrap();
    assert!(plain.set_irq_line(4, true).is_err());
    assert!(plain.register_irqfd(&doorbell, 4).is_err());
}

const GDT: u64 = 0x2000;
const IDT: u64 = 0x3000;
const HANDLER: u64 = 0x4000;

/// A one-vCPU VM with its platform running `code` at [`CODE`] in 64-bit
/// mode, IF clear, with an IDT whose gate for `vector` leads to a handler
/// that writes the vector to port 0x60, signals EOI and returns.
fn vcpu_with_interrupt_handler(
    code: &[u8],
    vector: u32,
) -> (
    std::sync::Arc<dyn hypervisor::Vm>,
    Box<dyn hypervisor::Vcpu>,
) {
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(eax, vector).unwrap();
    h.out(0x60, al).unwrap();
    h.mov(rax, 0xfee0_00b0u64).unwrap();
    h.mov(dword_ptr(rax), 0u32).unwrap(); // EOI
    h.iretq().unwrap();
    let handler = h.assemble(HANDLER).expect("assemble");
    let mem = common::memory(0x10_0000);
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&handler, GuestAddress(HANDLER)).unwrap();
    let gate = (HANDLER & 0xffff) | (8 << 16) | (0x8e << 40) | ((HANDLER >> 16 & 0xffff) << 48);
    mem.write_obj(gate, GuestAddress(IDT + 16 * u64::from(vector)))
        .unwrap();
    mem.write_obj(
        HANDLER >> 32,
        GuestAddress(IDT + 16 * u64::from(vector) + 8),
    )
    .unwrap();
    for (i, d) in [0, common::CODE64_DESCRIPTOR, common::DATA64_DESCRIPTOR]
        .into_iter()
        .enumerate()
    {
        mem.write_obj(d, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    let vm = one_cpu_vm_with_platform(&mem);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut cpu = emu::CpuState::reset();
    common::long_mode(&mut cpu);
    cpu.cr3 = common::TABLES;
    let mut sregs = hypervisor::SpecialRegisters {
        apic_base: 0,
        ..cpu.special()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT;
    sregs.idt.limit = 0xfff;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = CODE;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    (vm, vcpu)
}

/// `Vm::edge_trigger` raises its GSI from another thread while the vCPU
/// sleeps in `HLT`: the IOAPIC routes it to the local APIC, and the vCPU
/// wakes and takes the vector (no irqfd, no helper thread in between).
#[test]
fn edge_trigger_from_another_thread_wakes_a_halted_vcpu() {
    use hypervisor::VcpuExit;

    const GSI: u32 = 5;
    const VECTOR: u32 = 0x40;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ffu32).unwrap(); // local APIC software-enabled
    a.mov(rax, 0xfec0_0000u64).unwrap();
    a.mov(dword_ptr(rax), 0x10 + 2 * GSI).unwrap();
    a.mov(dword_ptr(rax + 0x10), VECTOR).unwrap(); // fixed, edge, unmasked
    a.mov(dword_ptr(rax), 0x11 + 2 * GSI).unwrap();
    a.mov(dword_ptr(rax + 0x10), 0u32).unwrap(); // to APIC 0
    a.out(0x80, al).unwrap(); // the test arms the trigger now
    a.sti().unwrap();
    a.hlt().unwrap();
    a.out(0x81, al).unwrap();
    let code = a.assemble(CODE).expect("assemble");
    let (vm, mut vcpu) = vcpu_with_interrupt_handler(&code, VECTOR);
    assert!(vm.edge_trigger(24).is_err(), "GSI 24 is past the IOAPIC");
    let trigger = vm.edge_trigger(GSI).unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::IoOut { port: 0x80, .. } => {}
        other => panic!("unexpected exit {other:?}"),
    }
    let raiser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        trigger.trigger().unwrap();
    });
    let mut ports = Vec::new();
    for _ in 0..2 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { port, data } => ports.push((port, data.first().copied())),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    raiser.join().unwrap();
    // The handler reports the vector; the code after HLT runs after it.
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0], (0x60, Some(VECTOR as u8)));
    assert_eq!(ports[1].0, 0x81);
}

/// The platform's CPU model offers the APIC timer's TSC-deadline mode:
/// a deadline 2 ms ahead, written to IA32_TSC_DEADLINE just before `sti;
/// hlt`, wakes the vCPU with the timer's vector no earlier than that; the
/// MSR reads back the deadline while armed and 0 once it fired.
#[test]
fn tsc_deadline_timer_wakes_a_halted_vcpu() {
    use hypervisor::VcpuExit;

    const VECTOR: u32 = 0x41;
    const AHEAD: u32 = 2_000_000; // TSC cycles at 1 GHz: 2 ms
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 1u32).unwrap();
    a.cpuid().unwrap();
    a.mov(eax, ecx).unwrap();
    a.shr(eax, 24).unwrap();
    a.and(eax, 1).unwrap();
    a.out(0x82, al).unwrap(); // CPUID.1:ECX[24]
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ffu32).unwrap(); // local APIC software-enabled
    a.mov(rax, 0xfee0_0320u64).unwrap();
    a.mov(dword_ptr(rax), VECTOR | (2 << 17)).unwrap(); // LVT timer: TSC-deadline
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(rbx, rax).unwrap(); // when it was armed
    a.add(rax, AHEAD as i32).unwrap();
    a.mov(rdx, rax).unwrap();
    a.shr(rdx, 32).unwrap();
    a.mov(ecx, 0x6e0u32).unwrap();
    a.wrmsr().unwrap();
    a.rdmsr().unwrap(); // the deadline back
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.sub(rax, rbx).unwrap();
    a.mov(r8, rax).unwrap();
    // No exit between the write and HLT: the write itself must reach the
    // timer.
    a.sti().unwrap();
    a.hlt().unwrap();
    a.cli().unwrap();
    a.mov(rax, r8).unwrap();
    a.out(0x83, eax).unwrap(); // AHEAD
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.sub(rax, rbx).unwrap();
    a.mov(rsi, rax).unwrap();
    a.mov(ecx, 0x6e0u32).unwrap();
    a.rdmsr().unwrap();
    a.out(0x84, eax).unwrap(); // 0: fired
    a.mov(rax, rsi).unwrap();
    a.out(0x85, eax).unwrap(); // cycles from arming to after the wake-up
    let code = a.assemble(CODE).expect("assemble");
    let (_vm, mut vcpu) = vcpu_with_interrupt_handler(&code, VECTOR);
    // A deadline the timer never heard of would leave the vCPU asleep:
    // the watchdog wakes it after 10 s, and the test fails.
    let kick = vcpu.interrupter();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .is_err()
        {
            kick.interrupt();
        }
    });
    let mut ports = Vec::new();
    for _ in 0..5 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { port, data } => {
                let mut v = [0u8; 4];
                v[..data.len()].copy_from_slice(data);
                ports.push((port, u32::from_le_bytes(v)));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    drop(done);
    watchdog.join().unwrap();
    assert_eq!(ports[0], (0x82, 1), "CPUID offers TSC-deadline mode");
    assert_eq!(ports[1], (0x60, VECTOR), "the timer's interrupt");
    assert_eq!(ports[2], (0x83, AHEAD), "IA32_TSC_DEADLINE read back");
    assert_eq!(ports[3], (0x84, 0), "IA32_TSC_DEADLINE reads 0 once fired");
    assert_eq!(ports[4].0, 0x85);
    assert!(ports[4].1 >= AHEAD, "woken after {} cycles", ports[4].1);
}
