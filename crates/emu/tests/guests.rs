//! The emu accelerator behind the hypervisor traits, running the same
//! kind of small guest programs as the KVM backend's tests: real mode and
//! 64-bit mode, port I/O, MMIO reads and writes, HLT, interruption from
//! another thread, self-modifying code.
//!
//! The 64-bit programs run on identity-mapping page tables at 0x9000.

mod common;

use hypervisor::GuestRam;
use std::sync::Arc;
use std::time::Duration;

use emu::EmuHypervisor;
use hypervisor::x86::bits::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED};
use hypervisor::{
    DescriptorTable, Hypervisor, Segment, StandardRegisters, Vcpu, VcpuExit, Vm, VmConfig,
};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;
const MMIO_REAL_MODE: u64 = 0x8_0000;
const MMIO_LONG_MODE: u64 = 0x1000_0000;
const MEMORY_SIZE: usize = 0x4_0000;
const GDT: u64 = 0x500;

#[derive(Debug, PartialEq)]
enum Event {
    Out(u16, Vec<u8>),
    In(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    Halt,
}

fn vm_with_code(code: &[u8]) -> (Arc<dyn Vm>, GuestRam) {
    let vm = EmuHypervisor::new()
        .create_vm(&VmConfig {
            num_cpus: 1,
            irqchip: false,
        })
        .expect("create VM");
    let mem = common::memory(MEMORY_SIZE);
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    mem.write_obj(0u64, GuestAddress(GDT)).unwrap();
    mem.write_obj(common::CODE64_DESCRIPTOR, GuestAddress(GDT + 8))
        .unwrap();
    mem.write_obj(common::DATA64_DESCRIPTOR, GuestAddress(GDT + 16))
        .unwrap();
    common::identity_tables(&mem, 0x9000);
    vm.set_memory(&mem).expect("set memory");
    (vm, mem)
}

fn run_to_halt(vcpu: &mut dyn Vcpu, in_value: u8, mmio_value: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..1000 {
        match vcpu.run().expect("run") {
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
                let n = data.len();
                data.copy_from_slice(&mmio_value.to_le_bytes()[..n]);
            }
            VcpuExit::Halt => {
                events.push(Event::Halt);
                return events;
            }
            other => panic!("unexpected exit {other:?} after {events:?}"),
        }
    }
    panic!("guest did not halt: {events:?}");
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
    let mut sregs = vcpu.sregs().unwrap();
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
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).unwrap();
}

fn enter_long_mode(vcpu: &mut dyn Vcpu) {
    let mut sregs = vcpu.sregs().unwrap();
    sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 23,
    };
    sregs.cs = Segment::from_descriptor(8, common::CODE64_DESCRIPTOR);
    let data = Segment::from_descriptor(16, common::DATA64_DESCRIPTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.cr3 = 0x9000;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_PG | CR0_ET;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).unwrap();
}

#[test]
fn real_mode_port_io_mmio_and_halt() {
    let mut a = CodeAssembler::new(16).unwrap();
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
    let code = a.assemble(CODE).unwrap();
    let (vm, _mem) = vm_with_code(&code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_real_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
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
    assert_eq!(vcpu.regs().unwrap().rax & 0xffff, 0xbeef);
}

#[test]
fn long_mode_port_io_mmio_stack_and_halt() {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut func = a.create_label();
    let mut top = a.create_label();
    a.mov(eax, edi).unwrap();
    a.out(0x10, al).unwrap();
    a.mov(rbx, MMIO_LONG_MODE).unwrap();
    a.mov(qword_ptr(rbx + rdi * 8), rdi).unwrap();
    a.mov(rax, qword_ptr(rbx + 0x100)).unwrap();
    a.out(0x12, eax).unwrap();
    a.shr(rax, 32).unwrap();
    a.out(0x12, eax).unwrap();
    // A loop, a call and the stack: sum 1..=10 into ecx via a function.
    a.xor(ecx, ecx).unwrap();
    a.mov(edx, 10u32).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(func).unwrap();
    a.dec(edx).unwrap();
    a.jnz(top).unwrap();
    a.mov(eax, ecx).unwrap();
    a.out(0x13, al).unwrap();
    // REP STOSB to MMIO: one write exit per byte.
    a.mov(rdi, MMIO_LONG_MODE + 0x200).unwrap();
    a.mov(ecx, 3u32).unwrap();
    a.mov(al, 0x77u32).unwrap();
    a.rep().stosb().unwrap();
    a.hlt().unwrap();
    a.set_label(&mut func).unwrap();
    a.push(rdx).unwrap();
    a.add(ecx, dword_ptr(rsp)).unwrap();
    a.pop(rdx).unwrap();
    a.ret().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (vm, _mem) = vm_with_code(&code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rdi: 0,
        rsp: 0x8000,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
    let value = 0x1122_3344_5566_7788u64;
    let events = run_to_halt(vcpu.as_mut(), 0, value);
    assert_eq!(
        events,
        vec![
            Event::Out(0x10, vec![0]),
            Event::MmioWrite(MMIO_LONG_MODE, 0u64.to_le_bytes().to_vec()),
            Event::MmioRead(MMIO_LONG_MODE + 0x100, 8),
            Event::Out(0x12, (value as u32).to_le_bytes().to_vec()),
            Event::Out(0x12, ((value >> 32) as u32).to_le_bytes().to_vec()),
            Event::Out(0x13, vec![55]),
            Event::MmioWrite(MMIO_LONG_MODE + 0x200, vec![0x77]),
            Event::MmioWrite(MMIO_LONG_MODE + 0x201, vec![0x77]),
            Event::MmioWrite(MMIO_LONG_MODE + 0x202, vec![0x77]),
            Event::Halt,
        ]
    );
    let regs = vcpu.regs().unwrap();
    assert_eq!(regs.rsp, 0x8000);
    assert_eq!(regs.rcx, 0);
}

/// A store into the next instruction must be seen: the block holding it
/// is dropped and re-decoded.
#[test]
fn self_modifying_code() {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut patch = a.create_label();
    a.lea(rbx, ptr(patch)).unwrap();
    // Turn "mov al, 1" into "mov al, 2" by rewriting its immediate.
    a.mov(byte_ptr(rbx + 1), 2).unwrap();
    a.set_label(&mut patch).unwrap();
    a.mov(al, 1u32).unwrap();
    a.out(0x10, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (vm, _mem) = vm_with_code(&code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rsp: 0x8000,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        run_to_halt(vcpu.as_mut(), 0, 0),
        vec![Event::Out(0x10, vec![2]), Event::Halt]
    );
}

#[test]
fn spinning_guest_is_interrupted() {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut again = a.create_label();
    a.out(0x10, al).unwrap();
    a.set_label(&mut again).unwrap();
    a.inc(rcx).unwrap();
    a.jmp(again).unwrap();
    let code = a.assemble(CODE).unwrap();
    let (vm, _mem) = vm_with_code(&code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
    let interrupter = vcpu.interrupter();
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut exits = Vec::new();
        loop {
            match vcpu.run().expect("run") {
                VcpuExit::IoOut { port, .. } => {
                    exits.push(format!("out {port:#x}"));
                    tx.send(()).unwrap();
                }
                VcpuExit::Interrupted => {
                    exits.push("interrupted".to_string());
                    let spins = vcpu.regs().unwrap().rcx;
                    return (exits, spins);
                }
                other => exits.push(format!("{other:?}")),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    interrupter.interrupt();
    let (exits, spins) = runner.join().unwrap();
    assert_eq!(
        exits,
        vec!["out 0x10".to_string(), "interrupted".to_string()]
    );
    assert!(spins > 0);
}

#[test]
fn interrupt_before_run_is_reported() {
    let (vm, _mem) = vm_with_code(&[0xf4]);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.interrupter().interrupt();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
}

#[test]
fn undefined_instruction_without_idt_is_a_triple_fault() {
    let (vm, _mem) = vm_with_code(&[0x90, 0x0f, 0x0b]); // nop; ud2
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
    // #UD, then #NP for its missing gate, then #DF, whose gate is
    // missing too: shutdown, with RIP still at the UD2.
    match vcpu.run().unwrap() {
        VcpuExit::Shutdown => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(vcpu.regs().unwrap().rip, CODE + 1);
}

#[test]
fn cpuid_and_msrs() {
    let mut a = CodeAssembler::new(64).unwrap();
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    a.mov(ecx, 0xc000_0100u32).unwrap(); // FS.base
    a.mov(eax, 0x1234u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(rax, qword_ptr(0x100).fs()).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (vm, mem) = vm_with_code(&code);
    mem.write_obj(0xfeed_f00du64, GuestAddress(0x1334)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut());
    vcpu.set_regs(&StandardRegisters {
        rip: CODE,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Halt));
    let regs = vcpu.regs().unwrap();
    assert_eq!(regs.rax, 0xfeed_f00d);
    assert_eq!(vcpu.msr(0xc000_0100).unwrap(), 0x1234);
    let leaf0 = vcpu.cpuid().unwrap()[0];
    assert_eq!(regs.rbx as u32, leaf0.ebx);
    assert!(vcpu.msr(0xdead).is_err());
    let hv = EmuHypervisor::new();
    assert!(hv
        .create_vm(&VmConfig {
            num_cpus: hv.max_vcpus() + 1,
            irqchip: false
        })
        .is_err());
    assert!(hv
        .create_vm(&VmConfig {
            num_cpus: 0,
            irqchip: false
        })
        .is_err());
}
