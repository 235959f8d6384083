//! `vessel run` end to end on KVM with tiny test kernels: 64-bit ELF
//! programs built here with iced-x86 that use the machine the way a kernel
//! does (the zero page, the serial port, the exit-status port, ACPI S5, the
//! i8042 reset, a triple fault), so the whole path from the command line to
//! the vCPU threads and back is exercised without a real kernel, which
//! cannot run accelerated on a nested-PVM host.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

fn kvm_usable() -> bool {
    let usable = hypervisor::host::kvm_support().usable;
    if !usable {
        eprintln!("NOT RUN: /dev/kvm is missing or not usable on this host");
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
    let kernel = hello_kernel();
    let out = run_kernel(
        kernel.path(),
        &["--cmdline", "hello from the zero page"],
        b"",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the zero page\n"
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut wait = a.create_label();
    let mut plain = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.mov(dx, (COM1 + 5) as u32).unwrap(); // line status register
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap(); // data ready
    a.jz(wait).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.in_(al, dx).unwrap();
    a.cmp(al, b'a' as u32).unwrap();
    a.jb(plain).unwrap();
    a.cmp(al, b'z' as u32).unwrap();
    a.ja(plain).unwrap();
    a.sub(al, 0x20).unwrap();
    a.set_label(&mut plain).unwrap();
    a.out(dx, al).unwrap();
    a.cmp(al, b'\n' as u32).unwrap();
    a.je(done).unwrap();
    a.jmp(wait).unwrap();
    a.set_label(&mut done).unwrap();
    power_off(&mut a);
    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel(kernel.path(), &[], b"piped input\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED INPUT\n");
    assert_eq!(out.status.code(), Some(0));
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
    // The boot IDT is empty, so #UD escalates to a triple fault.
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.ud2().unwrap();
    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel(kernel.path(), &[], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("triple-fault"), "stderr: {stderr}");
}

#[test]
fn sigterm_tears_down_a_spinning_guest() {
    if !kvm_usable() {
        return;
    }
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.out(dx, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    let kernel = elf_kernel(&assemble(&mut a));
    for cpus in ["1", "2"] {
        let mut child = vessel()
            .args([
                "run", "--accel", "kvm", "--memory", "64M", "--cpus", cpus, "--kernel",
            ])
            .arg(kernel.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Wait until the guest runs (it prints '!').
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut stdout, &mut first).expect("guest output");
        assert_eq!(&first, b"!");
        // SAFETY-free: kill(2) through the libc crate on our own child.
        let pid = child.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "vessel ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{cpus} vCPUs");
    }
}
