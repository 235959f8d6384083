//! Several vCPUs of one VM: decoded code stays coherent when another vCPU
//! (or a device) rewrites it, and an application processor parked in
//! wait-for-SIPI gives its thread back to the VMM's interrupter.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use emu::{EmuHypervisor, Emulator, Exit};
use hypervisor::{Hypervisor, VcpuExit, VmConfig};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

const VICTIM: u64 = 0x1000;
const WRITER: u64 = 0x3000;

/// A second emulator sharing `first`'s code-page map (as the vCPUs of one
/// VM do).
fn sibling(first: &Emulator, mem: &hypervisor::GuestRam) -> Emulator {
    let cpuid: Arc<[hypervisor::x86::CpuidEntry]> = emu::cpuid::table(1, 2).into();
    let mut e = Emulator::with_code_pages(mem, cpuid, Some(first.code_pages()));
    common::long_mode(e.cpu_mut());
    e.cpu_mut().cr3 = common::TABLES;
    e.set_exception_exits(u32::MAX);
    e
}

/// `mov eax, imm32; out 0x80, al` at VICTIM; the writer vCPU patches the
/// immediate.
fn setup() -> (hypervisor::GuestRam, Emulator) {
    let mem = common::memory(0x10_0000);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 1u32).unwrap();
    a.out(0x80, al).unwrap();
    mem.write_slice(&a.assemble(VICTIM).unwrap(), GuestAddress(VICTIM))
        .unwrap();
    let mut w = CodeAssembler::new(64).unwrap();
    // The imm32 of `mov eax, imm32` (opcode b8) is at VICTIM + 1.
    w.mov(dword_ptr(VICTIM + 1), 2u32).unwrap();
    w.out(0x80, al).unwrap();
    mem.write_slice(&w.assemble(WRITER).unwrap(), GuestAddress(WRITER))
        .unwrap();
    let e = common::emulator(&mem);
    (mem, e)
}

fn run_victim(e: &mut Emulator) -> u64 {
    e.cpu_mut().rip = VICTIM;
    let exit = e.run(1 << 20, None);
    assert!(matches!(exit, Exit::IoOut { port: 0x80, .. }), "{exit:?}");
    e.cpu().gpr[0]
}

#[test]
fn a_write_by_another_vcpu_invalidates_decoded_code() {
    let (mem, mut a) = setup();
    let mut b = sibling(&a, &mem);
    assert_eq!(run_victim(&mut a), 1);
    assert!(a.cached_blocks() > 0);
    b.cpu_mut().rip = WRITER;
    let exit = b.run(1 << 20, None);
    assert!(matches!(exit, Exit::IoOut { port: 0x80, .. }), "{exit:?}");
    assert_eq!(run_victim(&mut a), 2, "the patched immediate is seen");
}

#[test]
fn invalidate_code_reaches_every_vcpu_sharing_the_map() {
    let (mem, mut a) = setup();
    let mut b = sibling(&a, &mem);
    assert_eq!(run_victim(&mut a), 1);
    assert_eq!(run_victim(&mut b), 1);
    // A device writes the immediate behind both vCPUs' backs and the VMM
    // tells one of them.
    mem.write_obj(3u32, GuestAddress(VICTIM + 1)).unwrap();
    b.invalidate_code(VICTIM + 1, 4);
    assert_eq!(run_victim(&mut a), 3);
    assert_eq!(run_victim(&mut b), 3);
}

#[test]
fn an_application_processor_waits_for_sipi_until_interrupted() {
    let hv = EmuHypervisor::new();
    assert!(hv.max_vcpus() >= 2);
    let vm = hv
        .create_vm(&VmConfig {
            num_cpus: 2,
            irqchip: true,
        })
        .unwrap();
    vm.set_memory(&common::memory(0x10_0000)).unwrap();
    let _bsp = vm.create_vcpu(0).unwrap();
    let mut ap = vm.create_vcpu(1).unwrap();
    let interrupter = ap.interrupter();
    let kick = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        interrupter.interrupt();
    });
    let start = Instant::now();
    let exit = ap.run().unwrap();
    assert!(matches!(exit, VcpuExit::Interrupted), "{exit:?}");
    assert!(start.elapsed() >= Duration::from_millis(100));
    kick.join().unwrap();
}
