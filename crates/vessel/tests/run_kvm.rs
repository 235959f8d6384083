//! `vessel run` end to end on KVM with tiny test kernels: 64-bit ELF
//! programs built here with iced-x86 that use the machine the way a kernel
//! does (the zero page, the serial port, the exit-status port, ACPI S5, the
//! i8042 reset, a triple fault), so the whole path from the command line to
//! the vCPU threads and back is exercised without a real kernel, which
//! cannot run accelerated on a nested-PVM host.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use iced_x86::code_asm::*;

fn kvm_usable() -> bool {
    let usable = hypervisor::host::kvm_support().usable;
    if !usable {
        testkit::not_run(
            testkit::prereq::KVM,
            "/dev/kvm is missing or not usable on this host",
        );
    }
    usable
}

fn run_kernel(kernel: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    run_kernel_on("kvm", kernel, extra, stdin)
}

#[test]
fn kernel_sees_its_command_line_and_its_exit_status_is_vessels() {
    if !kvm_usable() {
        return;
    }
    check_command_line_and_exit_status("kvm");
}

#[test]
fn two_vcpus_boot_and_stop_together() {
    if !kvm_usable() {
        return;
    }
    let kernel = hello_kernel();
    let out = run_kernel(kernel.path(), &["--cpus", "2", "--cmdline", "two"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n");
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn command_is_encoded_on_the_kernel_command_line() {
    if !kvm_usable() {
        return;
    }
    let kernel = hello_kernel();
    let out = run_kernel(
        kernel.path(),
        &["--cmdline", "base", "--", "sh", "-c", "exit 7"],
        b"",
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    let expected = format!(
        "base {}",
        guest::command_line_for(&["sh".into(), "-c".into(), "exit 7".into()]).unwrap()
    );
    assert_eq!(printed, expected);
}

/// Echoes serial input back, upper-cased, until a newline; then powers off.
#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_usable() {
        return;
    }
    check_serial_input_reaches_the_guest("kvm");
}

/// A virtio-blk request from a tiny guest driver: ioeventfd in KVM, the
/// device's I/O thread, the image.
#[test]
fn a_guest_driver_reads_and_writes_a_virtio_disk() {
    if !kvm_usable() {
        return;
    }
    check_virtio_block_through_a_virtqueue("kvm");
}

#[test]
fn i8042_reset_ends_the_vm() {
    if !kvm_usable() {
        return;
    }
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(al, 0xfe).unwrap();
    a.out(0x64, al).unwrap();
    halt_forever(&mut a);
    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel(kernel.path(), &[], b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn triple_fault_stops_the_vm_and_says_so() {
    if !kvm_usable() {
        return;
    }
    check_triple_fault_is_reported("kvm");
}

#[test]
fn sigterm_tears_down_a_spinning_guest() {
    if !kvm_usable() {
        return;
    }
    check_sigterm_tears_down_a_spinning_guest("kvm", &["1", "2"]);
}
