//! The KVM backend running small guest programs built with iced-x86's
//! code assembler: real mode and 64-bit long mode, port I/O, MMIO reads and
//! writes, HLT, one vCPU and two, and a vCPU interrupted from another
//! thread.
//!
//! On hosts without a usable /dev/kvm these tests print that they were not
//! run and return. On nested-PVM hosts ring-0 guest code is emulated one
//! instruction at a time by the host kernel, so the programs are short.

use hypervisor::GuestRam;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::kvm::KvmHypervisor;
use hypervisor::x86::bits::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED};
use hypervisor::{
    DescriptorTable, Hypervisor, Segment, StandardRegisters, Vcpu, VcpuExit, Vm, VmConfig,
};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

/// Where test programs are loaded.
const CODE: u64 = 0x1000;
/// A guest-physical address with no RAM behind it.
const MMIO_REAL_MODE: u64 = 0x8_0000;
const MMIO_LONG_MODE: u64 = 0x1000_0000;
const MEMORY_SIZE: usize = 0x4_0000;

fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            testkit::not_run(
                testkit::prereq::KVM,
                format!("KVM is not usable on this host ({e})"),
            );
            None
        }
    }
}

fn vm_with_code(kvm: &KvmHypervisor, num_cpus: u32, irqchip: bool, code: &[u8]) -> Arc<dyn Vm> {
    let vm = kvm
        .create_vm(&VmConfig { num_cpus, irqchip })
        .expect("create VM");
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("memory");
    mem.write_slice(code, GuestAddress(CODE))
        .expect("load code");
    vm.set_memory(&mem).expect("set memory");
    vm
}

/// What a guest did, in order, until it halted.
#[derive(Debug, PartialEq)]
enum Event {
    Out(u16, Vec<u8>),
    In(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    Halt,
}

/// Runs a vCPU to its HLT, answering `IN` with `in_value` and MMIO reads
/// with `mmio_value`, and records every exit.
fn run_to_halt(vcpu: &mut dyn Vcpu, in_value: u8, mmio_value: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "guest did not halt; so far: {events:?}"
        );
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut { port, data } => events.push(Event::Out(port, data.to_vec())),
            VcpuExit::IoIn { port, data } => {
                events.push(Event::In(port, data.len()));
                data.fill(in_value);
            }
            VcpuExit::MmioWrite { addr, data } => {
                events.push(Event::MmioWrite(addr, data.to_vec()))
            }
            VcpuExit::MmioRead { addr, data } => {
                events.push(Event::MmioRead(addr, data.len()));
                let bytes = mmio_value.to_le_bytes();
                let n = data.len();
                data.copy_from_slice(&bytes[..n]);
            }
            VcpuExit::Halt => {
                events.push(Event::Halt);
                return events;
            }
            other => panic!("unexpected exit {other:?} after {events:?}"),
        }
    }
}

fn real_mode_segment(selector: u16, code: bool) -> Segment {
    Segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        s: true,
        ..Default::default()
    }
}

fn enter_real_mode(vcpu: &mut dyn Vcpu) {
    let mut sregs = vcpu.sregs().expect("get sregs");
    sregs.cs = real_mode_segment(0, true);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        *seg = real_mode_segment(0, false);
    }
    sregs.cr0 = CR0_ET;
    vcpu.set_sregs(&sregs).expect("set sregs");
}

/// vCPU 0 in real mode at `CODE`, with the stack at `stack_top`.
fn start_real_mode_vcpu(vm: &dyn Vm, stack_top: u64) -> Box<dyn Vcpu> {
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    enter_real_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rsp: stack_top,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .expect("set regs");
    vcpu
}

/// A real-mode program: OUT, IN, an MMIO write and read through ES, and
/// the value read reported with OUT.
fn real_mode_program() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).expect("assembler");
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'K' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.in_(al, dx).unwrap();
    a.out(0x10, al).unwrap();
    a.mov(ax, (MMIO_REAL_MODE >> 4) as u32).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(byte_ptr(0).es(), 0x5a).unwrap();
    a.mov(ax, word_ptr(2).es()).unwrap();
    a.out(0x11, ax).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).expect("assemble")
}

#[test]
fn real_mode_port_io_mmio_and_halt() {
    let Some(kvm) = kvm() else { return };
    let vm = vm_with_code(&kvm, 1, false, &real_mode_program());
    let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0);
    let events = run_to_halt(vcpu.as_mut(), 0x7e, 0xbeef);
    assert_eq!(
        events,
        vec![
            Event::Out(0x3f8, vec![b'K']),
            Event::In(0x3f8, 1),
            Event::Out(0x10, vec![0x7e]),
            Event::MmioWrite(MMIO_REAL_MODE, vec![0x5a]),
            Event::MmioRead(MMIO_REAL_MODE + 2, 2),
            Event::Out(0x11, vec![0xef, 0xbe]),
            Event::Halt,
        ]
    );
    let regs = vcpu.regs().expect("regs");
    assert_eq!(regs.rax & 0xffff, 0xbeef);
}

// Long-mode scaffolding: a GDT, and page tables that identity-map the first
// GiB with 2 MiB pages (so the MMIO address is mapped but has no RAM).
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CODE64_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
const DATA64_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;

fn build_long_mode_tables(mem: &GuestRam) {
    mem.write_obj(0u64, GuestAddress(GDT)).unwrap();
    mem.write_obj(CODE64_DESCRIPTOR, GuestAddress(GDT + 8))
        .unwrap();
    mem.write_obj(DATA64_DESCRIPTOR, GuestAddress(GDT + 16))
        .unwrap();
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | 0x3, GuestAddress(PDPT)).unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .unwrap();
    }
}

fn enter_long_mode(vcpu: &mut dyn Vcpu) {
    let mut sregs = vcpu.sregs().expect("get sregs");
    sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 23,
    };
    sregs.cs = Segment::from_descriptor(8, CODE64_DESCRIPTOR);
    let data = Segment::from_descriptor(16, DATA64_DESCRIPTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_PG | CR0_ET;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).expect("set sregs");
}

/// A 64-bit program for vCPU `rdi`: reports its id on port 0x10, writes it
/// to MMIO at `MMIO_LONG_MODE + 8 * id`, reads a 64-bit MMIO word back,
/// reports it on port 0x12 (32 bits), and halts.
fn long_mode_program() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(eax, edi).unwrap();
    a.out(0x10, al).unwrap();
    a.mov(rbx, MMIO_LONG_MODE).unwrap();
    a.mov(qword_ptr(rbx + rdi * 8), rdi).unwrap();
    a.mov(rax, qword_ptr(rbx + 0x100)).unwrap();
    a.out(0x12, eax).unwrap();
    a.shr(rax, 32).unwrap();
    a.out(0x12, eax).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).expect("assemble")
}

fn long_mode_vm(kvm: &KvmHypervisor, num_cpus: u32) -> Arc<dyn Vm> {
    let vm = kvm
        .create_vm(&VmConfig {
            num_cpus,
            irqchip: false,
        })
        .expect("create VM");
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("memory");
    build_long_mode_tables(&mem);
    mem.write_slice(&long_mode_program(), GuestAddress(CODE))
        .expect("load code");
    vm.set_memory(&mem).expect("set memory");
    vm
}

fn start_long_mode_vcpu(vm: &Arc<dyn Vm>, id: u32) -> Box<dyn Vcpu> {
    let mut vcpu = vm.create_vcpu(id).expect("vCPU");
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rdi: u64::from(id),
        rsp: 0x8000,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .expect("set regs");
    vcpu
}

fn long_mode_expected(id: u8, mmio_value: u64) -> Vec<Event> {
    vec![
        Event::Out(0x10, vec![id]),
        Event::MmioWrite(
            MMIO_LONG_MODE + 8 * u64::from(id),
            u64::from(id).to_le_bytes().to_vec(),
        ),
        Event::MmioRead(MMIO_LONG_MODE + 0x100, 8),
        Event::Out(0x12, (mmio_value as u32).to_le_bytes().to_vec()),
        Event::Out(0x12, ((mmio_value >> 32) as u32).to_le_bytes().to_vec()),
        Event::Halt,
    ]
}

#[test]
fn long_mode_one_vcpu() {
    let Some(kvm) = kvm() else { return };
    let vm = long_mode_vm(&kvm, 1);
    let mut vcpu = start_long_mode_vcpu(&vm, 0);
    let value = 0x1122_3344_5566_7788;
    assert_eq!(
        run_to_halt(vcpu.as_mut(), 0, value),
        long_mode_expected(0, value)
    );
}

#[test]
fn long_mode_two_vcpus_on_two_threads() {
    let Some(kvm) = kvm() else { return };
    let vm = long_mode_vm(&kvm, 2);
    let threads: Vec<_> = (0..2u32)
        .map(|id| {
            let mut vcpu = start_long_mode_vcpu(&vm, id);
            std::thread::spawn(move || {
                let value = 0xa5a5_0000_0000_0000 | u64::from(id);
                (id, value, run_to_halt(vcpu.as_mut(), 0, value))
            })
        })
        .collect();
    for thread in threads {
        let (id, value, events) = thread.join().expect("vCPU thread");
        assert_eq!(events, long_mode_expected(id as u8, value), "vCPU {id}");
    }
}

#[test]
fn vcpu_out_of_range_is_refused() {
    let Some(kvm) = kvm() else { return };
    let vm = long_mode_vm(&kvm, 1);
    assert!(vm.create_vcpu(1).is_err());
}

/// With the in-kernel irqchip, HLT with interrupts off never exits to the
/// VMM; the interrupter must still bring the thread back.
#[test]
fn halted_vcpu_with_irqchip_is_interrupted() {
    let Some(kvm) = kvm() else { return };
    let mut a = CodeAssembler::new(16).expect("assembler");
    a.cli().unwrap();
    a.out(0x10, al).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.hlt().unwrap();
    a.jmp(again).unwrap();
    let code = a.assemble(CODE).expect("assemble");
    let vm = vm_with_code(&kvm, 1, true, &code);
    let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0);
    let interrupter = vcpu.interrupter();
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut exits = Vec::new();
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut { port, .. } => {
                    exits.push(format!("out {port:#x}"));
                    tx.send(()).expect("notify");
                }
                VcpuExit::Interrupted => {
                    exits.push("interrupted".to_string());
                    return exits;
                }
                other => exits.push(format!("{other:?}")),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("guest reached its OUT");
    // Give the guest time to reach HLT and block in the kernel.
    std::thread::sleep(Duration::from_millis(50));
    interrupter.interrupt();
    let exits = runner.join().expect("vCPU thread");
    assert_eq!(
        exits,
        vec!["out 0x10".to_string(), "interrupted".to_string()]
    );
}

/// An interrupt asked for before the thread enters the guest is not lost.
#[test]
fn interrupt_before_run_is_reported() {
    let Some(kvm) = kvm() else { return };
    let vm = vm_with_code(&kvm, 1, false, &real_mode_program());
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    vcpu.interrupter().interrupt();
    assert!(matches!(vcpu.run().expect("run"), VcpuExit::Interrupted));
}

/// A write to an address with an ioeventfd signals the eventfd inside the
/// kernel instead of exiting: the path virtio queue notifications take.
#[test]
fn ioeventfd_turns_guest_writes_into_events() {
    let Some(kvm) = kvm() else { return };
    let mut a = CodeAssembler::new(16).expect("assembler");
    a.mov(ax, (MMIO_REAL_MODE >> 4) as u32).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(byte_ptr(0x10).es(), 1).unwrap(); // MMIO with an ioeventfd
    a.mov(dx, 0x470u32).unwrap();
    a.mov(al, 2).unwrap();
    a.out(dx, al).unwrap(); // port with an ioeventfd
    a.out(0x10, al).unwrap(); // an ordinary exit, to show the guest went on
    a.hlt().unwrap();
    let code = a.assemble(CODE).expect("assemble");
    let vm = vm_with_code(&kvm, 1, false, &code);
    let mmio_event = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()).expect("eventfd");
    let pio_event = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()).expect("eventfd");
    vm.register_ioevent(&mmio_event, MMIO_REAL_MODE + 0x10, false, None)
        .expect("MMIO ioeventfd");
    vm.register_ioevent(&pio_event, 0x470, true, None)
        .expect("PIO ioeventfd");
    assert!(
        vm.register_ioevent(&pio_event, 0x1_0000, true, None)
            .is_err(),
        "ports are 16-bit"
    );
    let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0);
    let events = run_to_halt(vcpu.as_mut(), 0, 0);
    assert_eq!(events, vec![Event::Out(0x10, vec![2]), Event::Halt]);
    assert_eq!(mmio_event.read().expect("MMIO event signalled"), 1);
    assert_eq!(pio_event.read().expect("PIO event signalled"), 1);
}

/// EFD_NONBLOCK, so a missing event fails the read instead of blocking.
fn libc_nonblock() -> i32 {
    libc::EFD_NONBLOCK
}

/// An irqfd raises its GSI in the in-kernel interrupt controllers: the
/// guest programs the 8259 PIC, waits in HLT with interrupts on, and its
/// handler for IRQ 4 (the serial port's line) runs when the host writes the
/// eventfd.
#[test]
fn irqfd_interrupt_reaches_a_real_mode_handler() {
    let Some(kvm) = kvm() else { return };
    const VECTOR_BASE: u32 = 0x20;
    const IRQ: u32 = 4;
    let mut a = CodeAssembler::new(16).expect("assembler");
    let mut handler = a.create_label();
    let mut idle = a.create_label();
    a.cli().unwrap();
    // Interrupt vector table entry (offset, segment 0) for the IRQ's vector.
    a.mov(word_ptr((VECTOR_BASE + IRQ) * 4), 0).unwrap(); // patched below
    a.mov(word_ptr((VECTOR_BASE + IRQ) * 4 + 2), 0).unwrap();
    for (port, value) in [
        (0x20u32, 0x11u32),
        (0x21, VECTOR_BASE),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, !(1u32 << IRQ) & 0xff),
    ] {
        a.mov(al, value).unwrap();
        a.out(port, al).unwrap();
    }
    a.out(0x10, al).unwrap(); // ready
    a.sti().unwrap();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.set_label(&mut handler).unwrap();
    a.mov(al, 0x44).unwrap();
    a.out(0x11, al).unwrap();
    a.mov(al, 0x20).unwrap();
    a.out(0x20, al).unwrap(); // end of interrupt
    a.cli().unwrap();
    a.hlt().unwrap();
    let result = a
        .assemble_options(
            CODE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .expect("assemble");
    let handler_ip = result.label_ip(&handler).expect("handler address");
    let mut code = result.inner.code_buffer;
    // Patch the IVT store's immediate: `mov word [disp16], imm16` ends with
    // the immediate, and it is the second instruction (after CLI).
    let first_store_end = 1 + 6;
    code[first_store_end - 2..first_store_end].copy_from_slice(&(handler_ip as u16).to_le_bytes());

    let vm = vm_with_code(&kvm, 1, true, &code);
    let irq_event = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()).expect("eventfd");
    vm.register_irqfd(&irq_event, IRQ).expect("irqfd");
    let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x7000);
    let interrupter = vcpu.interrupter();
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut outs = Vec::new();
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut { port, data } => {
                    outs.push((port, data[0]));
                    tx.send(port).expect("notify");
                }
                VcpuExit::Interrupted => return outs,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)),
        Ok(0x10),
        "guest programmed the PIC"
    );
    irq_event.write(1).expect("raise IRQ 4");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)),
        Ok(0x11),
        "the handler ran"
    );
    interrupter.interrupt();
    let outs = runner.join().expect("vCPU thread");
    assert_eq!(outs.last(), Some(&(0x11, 0x44)));
}

/// The paravirtual interface passes through: a vCPU's CPUID carries KVM's
/// signature leaf and its feature leaf with the kvmclock MSRs.
#[test]
fn vcpus_see_kvms_paravirtual_interface() {
    let Some(kvm) = kvm() else { return };
    let vm = vm_with_code(&kvm, 1, true, &[0xf4]);
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = vcpu.cpuid().unwrap();
    let leaf = |f: u32| cpuid.iter().find(|e| e.function == f).copied();
    let sig = leaf(0x4000_0000).expect("hypervisor signature leaf");
    let mut name = Vec::new();
    for w in [sig.ebx, sig.ecx, sig.edx] {
        name.extend_from_slice(&w.to_le_bytes());
    }
    assert_eq!(&name, b"KVMKVMKVM\0\0\0");
    let features = leaf(0x4000_0001).expect("KVM feature leaf");
    assert_ne!(features.eax & (1 << 3), 0, "KVM_FEATURE_CLOCKSOURCE2");
}
