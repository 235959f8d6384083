//! `vessel run --accel emu` end to end with the tiny test kernels of
//! `run_kvm.rs` (64-bit ELF programs built here with iced-x86): the zero
//! page, the serial port in both directions, the exit-status port, ACPI S5,
//! a triple fault, SIGTERM, the emu platform's PIC + PIT waking a halted
//! vCPU with timer interrupts, and a second vCPU started with INIT/SIPI. These need no KVM and run everywhere.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

fn run_kernel(kernel: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    run_kernel_on("emu", kernel, extra, stdin)
}

#[test]
fn kernel_sees_its_command_line_and_its_exit_status_is_vessels() {
    check_command_line_and_exit_status("emu");
}

#[test]
fn auto_on_a_host_without_usable_kvm_runs_emu_and_more_cpus_are_accepted() {
    let kernel = hello_kernel();
    if !hypervisor::host::kvm_support().usable || hypervisor::host::kvm_support().pvm {
        let mut cmd = vessel();
        cmd.args(["run", "--memory", "64M", "--cmdline", "auto", "--kernel"])
            .arg(kernel.path());
        let out = run_with_timeout(cmd, b"", Duration::from_secs(60));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "auto\n");
        assert_eq!(out.status.code(), Some(7));
    }
    // The second vCPU waits for a start-up IPI that never comes; the VM
    // still stops when the boot vCPU powers off.
    let out = run_kernel(
        kernel.path(),
        &["--cpus", "2", "--cmdline", "two vCPUs"],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two vCPUs\n");
    assert_eq!(out.status.code(), Some(7), "stderr: {stderr}");
}

/// The boot vCPU starts the second one the way an OS does: INIT and a
/// start-up IPI through its local APIC's ICR, with a real-mode trampoline
/// at 0x10000 (vector 0x10) that it copied there itself. The application
/// processor prints `A` and sets a marker; the boot vCPU waits for the
/// marker, prints `B`, reports status 3 and powers off.
#[test]
fn boot_vcpu_starts_an_application_processor_with_init_and_sipi() {
    const TRAMPOLINE: u32 = 0x1_0000;
    const MARKER: u32 = TRAMPOLINE + 0x100;
    const APIC: u32 = 0xfee0_0000;

    // 16-bit code at CS = 0x1000, IP = 0.
    let mut t = CodeAssembler::new(16).expect("assembler");
    t.mov(ax, cs).unwrap();
    t.mov(ds, ax).unwrap();
    t.mov(dx, COM1 as u32).unwrap();
    t.mov(al, b'A' as u32).unwrap();
    t.out(dx, al).unwrap();
    t.mov(byte_ptr(0x100), 1u32).unwrap();
    let mut idle = t.create_label();
    t.sti().unwrap();
    t.set_label(&mut idle).unwrap();
    t.hlt().unwrap();
    t.jmp(idle).unwrap();
    let trampoline = t.assemble(0).expect("assemble trampoline");

    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut code = a.create_label();
    let mut wait = a.create_label();
    a.lea(rsi, ptr(code)).unwrap();
    a.mov(edi, TRAMPOLINE).unwrap();
    a.mov(ecx, trampoline.len() as u32).unwrap();
    a.rep().movsb().unwrap();
    a.mov(ebx, APIC).unwrap();
    // Software-enable the local APIC (spurious vector 0xff).
    a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap();
    // ICR high: destination APIC ID 1; ICR low: INIT, then SIPI.
    a.mov(dword_ptr(rbx + 0x310), 1u32 << 24).unwrap();
    a.mov(dword_ptr(rbx + 0x300), 0x4500u32).unwrap();
    a.mov(dword_ptr(rbx + 0x310), 1u32 << 24).unwrap();
    a.mov(dword_ptr(rbx + 0x300), 0x4600u32 | (TRAMPOLINE >> 12))
        .unwrap();
    a.mov(ecx, MARKER).unwrap();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.cmp(byte_ptr(rcx), 1).unwrap();
    a.jne(wait).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'B' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    report_status(&mut a, 3);
    power_off(&mut a);
    a.set_label(&mut code).unwrap();
    a.db(&trampoline).unwrap();

    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel(kernel.path(), &["--cpus", "2"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "AB\n",
        "stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
}

/// Echoes serial input back, upper-cased, until a newline; then powers off.
/// The input reaches the UART from the VMM's main loop and the guest polls
/// the line status register (no interrupts).
#[test]
fn serial_input_reaches_the_guest() {
    check_serial_input_reaches_the_guest("emu");
}

/// A virtio-blk request from a tiny guest driver: the emulator's
/// ioeventfd, the device's I/O thread, the image.
#[test]
fn a_guest_driver_reads_and_writes_a_virtio_disk() {
    check_virtio_block_through_a_virtqueue("emu");
}

#[test]
fn triple_fault_stops_the_vm_and_says_so() {
    check_triple_fault_is_reported("emu");
}

/// `cli; hlt` can never wake (the platform has no NMI source): the VM
/// ends as a halted one — with a command, without its exit status.
#[test]
fn halt_with_interrupts_off_stops_the_vm() {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.cli().unwrap();
    a.hlt().unwrap();
    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel(kernel.path(), &["--", "true"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped (halted)"), "stderr: {stderr}");
}

/// Programs the 8259A pair (IRQ0 only, vectors 0x20-0x2f) and the PIT
/// (channel 0, rate generator, 10 ms), then halts with interrupts on.
/// The IRQ0 handler prints 't' and sends EOI; after three ticks the guest
/// reports status 5 and powers off. This needs the emu platform: PIT
/// edges into the PIC, the PIC's output through the BSP's LINT0 in
/// virtual-wire mode, and HLT woken at the PIT's deadline.
#[test]
fn pit_interrupts_wake_a_halted_guest_through_the_pic() {
    const VECTOR: i32 = 0x20;
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut idt = a.create_label();
    let mut idtr = a.create_label();
    let mut handler = a.create_label();
    let mut ticks = a.create_label();
    let mut stack_top = a.create_label();
    let mut idle = a.create_label();

    a.lea(rsp, ptr(stack_top)).unwrap();
    // The interrupt gate for VECTOR: 64-bit interrupt gate, present, DPL 0.
    a.lea(rdi, ptr(idt)).unwrap();
    a.lea(rax, ptr(handler)).unwrap();
    a.mov(word_ptr(rdi + VECTOR * 16), ax).unwrap();
    a.mov(cx, cs).unwrap();
    a.mov(word_ptr(rdi + VECTOR * 16 + 2), cx).unwrap();
    a.mov(word_ptr(rdi + VECTOR * 16 + 4), 0x8e00u32).unwrap();
    a.shr(rax, 16).unwrap();
    a.mov(word_ptr(rdi + VECTOR * 16 + 6), ax).unwrap();
    a.shr(rax, 16).unwrap();
    a.mov(dword_ptr(rdi + VECTOR * 16 + 8), eax).unwrap();
    a.lea(rax, ptr(idtr)).unwrap();
    a.mov(word_ptr(rax), 0xfffu32).unwrap();
    a.mov(qword_ptr(rax + 2), rdi).unwrap();
    a.lidt(ptr(rax)).unwrap();
    // 8259A pair: edge triggered, cascade, vectors 0x20/0x28, 8086 mode.
    for (port, value) in [
        (0x20u32, 0x11u32),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfe), // only IRQ0
        (0xa1, 0xff),
        // PIT channel 0: lobyte/hibyte, mode 2, 11932 ticks = 10 ms.
        (0x43, 0x34),
        (0x40, 11932 & 0xff),
        (0x40, 11932 >> 8),
    ] {
        a.mov(al, value).unwrap();
        a.out(port, al).unwrap();
    }
    a.sti().unwrap();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();

    a.set_label(&mut handler).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b't' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, 0x20).unwrap();
    a.out(0x20, al).unwrap(); // non-specific EOI
    a.lea(rbx, ptr(ticks)).unwrap();
    a.inc(dword_ptr(rbx)).unwrap();
    a.cmp(dword_ptr(rbx), 3).unwrap();
    let mut more = a.create_label();
    a.jb(more).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    report_status(&mut a, 5);
    power_off(&mut a);
    a.set_label(&mut more).unwrap();
    a.iretq().unwrap();

    a.set_label(&mut ticks).unwrap();
    a.dd(&[0]).unwrap();
    a.set_label(&mut idtr).unwrap();
    a.db(&[0u8; 16]).unwrap();
    a.set_label(&mut idt).unwrap();
    a.db(&[0u8; 4096]).unwrap();
    a.db(&[0u8; 4096]).unwrap();
    a.set_label(&mut stack_top).unwrap();
    a.db(&[0u8; 16]).unwrap();

    let kernel = elf_kernel(&assemble(&mut a));
    let start = Instant::now();
    let out = run_kernel(kernel.path(), &[], b"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ttt\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5));
    // Three 10 ms ticks: well under a second even on a loaded host, and
    // not instantly (the PIT runs on the virtual clock).
    assert!(start.elapsed() >= Duration::from_millis(30));
}

#[test]
fn sigterm_tears_down_a_spinning_guest() {
    check_sigterm_tears_down_a_spinning_guest("emu", &["1", "2"]);
}

/// Installs 64-bit interrupt gates for `gates` (vector, handler) in the
/// 4 KiB `idt` and loads it; sets RSP to `stack_top`.
fn install_idt(
    a: &mut CodeAssembler,
    idt: CodeLabel,
    idtr: CodeLabel,
    stack_top: CodeLabel,
    gates: &[(i32, CodeLabel)],
) {
    a.lea(rsp, ptr(stack_top)).unwrap();
    a.lea(rdi, ptr(idt)).unwrap();
    a.mov(cx, cs).unwrap();
    for &(vector, handler) in gates {
        a.lea(rax, ptr(handler)).unwrap();
        a.mov(word_ptr(rdi + vector * 16), ax).unwrap();
        a.mov(word_ptr(rdi + vector * 16 + 2), cx).unwrap();
        a.mov(word_ptr(rdi + vector * 16 + 4), 0x8e00u32).unwrap();
        a.shr(rax, 16).unwrap();
        a.mov(word_ptr(rdi + vector * 16 + 6), ax).unwrap();
        a.shr(rax, 16).unwrap();
        a.mov(dword_ptr(rdi + vector * 16 + 8), eax).unwrap();
    }
    a.lea(rax, ptr(idtr)).unwrap();
    a.mov(word_ptr(rax), 0xfffu32).unwrap();
    a.mov(qword_ptr(rax + 2), rdi).unwrap();
    a.lidt(ptr(rax)).unwrap();
}

/// The data the IDT helpers use, placed after the code.
fn idt_data(
    a: &mut CodeAssembler,
    idt: &mut CodeLabel,
    idtr: &mut CodeLabel,
    stack_top: &mut CodeLabel,
) {
    a.set_label(idtr).unwrap();
    a.db(&[0u8; 16]).unwrap();
    a.set_label(idt).unwrap();
    a.db(&[0u8; 4096]).unwrap();
    a.db(&[0u8; 4096]).unwrap();
    a.set_label(stack_top).unwrap();
    a.db(&[0u8; 16]).unwrap();
}

const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;

/// The local APIC timer in periodic mode (vector 0x40, 5 ms at the 1 GHz
/// bus clock with divide-by-1) wakes `hlt` three times; each handler run
/// prints 'a' and EOIs at the APIC. Then status 6 and power-off.
#[test]
fn local_apic_timer_interrupts_a_halted_guest() {
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut idt = a.create_label();
    let mut idtr = a.create_label();
    let mut stack_top = a.create_label();
    let mut handler = a.create_label();
    let mut ticks = a.create_label();
    let mut idle = a.create_label();
    let mut more = a.create_label();
    install_idt(&mut a, idt, idtr, stack_top, &[(0x40, handler)]);
    a.mov(rbx, LAPIC).unwrap();
    a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap(); // SVR: enabled
    a.mov(dword_ptr(rbx + 0x3e0), 0xbu32).unwrap(); // divide by 1
    a.mov(dword_ptr(rbx + 0x320), 0x2_0040u32).unwrap(); // periodic, vector 0x40
    a.mov(dword_ptr(rbx + 0x380), 5_000_000u32).unwrap(); // initial count
    a.sti().unwrap();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();

    a.set_label(&mut handler).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'a' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(rbx, LAPIC).unwrap();
    a.mov(dword_ptr(rbx + 0xb0), 0u32).unwrap(); // EOI
    a.lea(rbx, ptr(ticks)).unwrap();
    a.inc(dword_ptr(rbx)).unwrap();
    a.cmp(dword_ptr(rbx), 3).unwrap();
    a.jb(more).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    report_status(&mut a, 6);
    power_off(&mut a);
    a.set_label(&mut more).unwrap();
    a.iretq().unwrap();
    a.set_label(&mut ticks).unwrap();
    a.dd(&[0]).unwrap();
    idt_data(&mut a, &mut idt, &mut idtr, &mut stack_top);

    let kernel = elf_kernel(&assemble(&mut a));
    let start = Instant::now();
    let out = run_kernel(kernel.path(), &[], b"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "aaa\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(6));
    assert!(start.elapsed() >= Duration::from_millis(15));
}

/// COM1's receive interrupt through the whole path a Linux guest uses:
/// the UART raises its irqfd, emu's platform pulses GSI 4, the IOAPIC
/// (pin 4 programmed to vector 0x41, physical destination APIC 0) sends it
/// to the local APIC, and `hlt` wakes into the handler, which echoes the
/// bytes upper-cased and EOIs. A newline ends the guest.
#[test]
fn serial_interrupts_arrive_through_the_ioapic() {
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut idt = a.create_label();
    let mut idtr = a.create_label();
    let mut stack_top = a.create_label();
    let mut handler = a.create_label();
    let mut idle = a.create_label();
    let mut plain = a.create_label();
    let mut done = a.create_label();
    install_idt(&mut a, idt, idtr, stack_top, &[(0x41, handler)]);
    a.mov(rbx, LAPIC).unwrap();
    a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap(); // SVR: enabled
    a.mov(rbx, IOAPIC).unwrap();
    a.mov(dword_ptr(rbx), 0x10u32 + 2 * 4).unwrap(); // IOREGSEL: RTE 4 low
    a.mov(dword_ptr(rbx + 0x10), 0x41u32).unwrap(); // edge, fixed, vector 0x41
    a.mov(dword_ptr(rbx), 0x10u32 + 2 * 4 + 1).unwrap(); // RTE 4 high
    a.mov(dword_ptr(rbx + 0x10), 0u32).unwrap(); // destination APIC 0
    a.mov(dx, (COM1 + 1) as u32).unwrap();
    a.mov(al, 1).unwrap(); // IER: received data available
    a.out(dx, al).unwrap();
    a.mov(dx, (COM1 + 4) as u32).unwrap();
    a.mov(al, 0x08).unwrap(); // MCR: OUT2 gates the IRQ
    a.out(dx, al).unwrap();
    // The prompt: the host sends its input only once it sees this, so
    // every byte arrives with the interrupt enabled.
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'>' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.sti().unwrap();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();

    a.set_label(&mut handler).unwrap();
    a.mov(dx, (COM1 + 5) as u32).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap();
    let mut eoi = a.create_label();
    a.jz(eoi).unwrap();
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
    a.jmp(handler).unwrap();
    a.set_label(&mut eoi).unwrap();
    a.mov(rbx, LAPIC).unwrap();
    a.mov(dword_ptr(rbx + 0xb0), 0u32).unwrap();
    a.iretq().unwrap();
    a.set_label(&mut done).unwrap();
    power_off(&mut a);
    idt_data(&mut a, &mut idt, &mut idtr, &mut stack_top);

    let kernel = elf_kernel(&assemble(&mut a));
    let mut child = vessel()
        .args(["run", "--accel", "emu", "--memory", "64M", "--kernel"])
        .arg(kernel.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut prompt = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut prompt).expect("the guest's prompt");
    assert_eq!(&prompt, b">");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"by interrupt\n").expect("write stdin");
    drop(stdin);
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the guest did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("stdout");
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        rest,
        "BY INTERRUPT\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}
