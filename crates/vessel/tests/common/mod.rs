//! Tiny test kernels for `vessel run` end-to-end tests: 64-bit ELF
//! programs built with iced-x86 that use the machine the way a kernel does
//! (the zero page, COM1, the exit-status port, ACPI S5), shared by the KVM
//! and the emu tests so both accelerators run the same programs.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

pub const LOAD_ADDR: u64 = 0x10_0000;
pub const COM1: u16 = 0x3f8;
/// `cmd_line_ptr` in the zero page.
pub const ZERO_PAGE_CMDLINE_PTR: i32 = 0x228;

pub fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

/// Wraps 64-bit code in a minimal ELF executable loaded at 1 MiB.
pub fn elf_kernel(code: &[u8]) -> tempfile::NamedTempFile {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let offset = 0x1000u64;
    let mut elf = vec![0u8; offset as usize];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut elf[EHDR..EHDR + PHDR];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&offset.to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    let mut file = tempfile::NamedTempFile::new().expect("temp kernel");
    file.write_all(&elf).expect("write kernel");
    file
}

/// Emits code that writes the NUL-terminated string at `rbx` to COM1.
pub fn print_string_at_rbx(a: &mut CodeAssembler) {
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, COM1 as u32).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(al, byte_ptr(rbx)).unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rbx).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut done).unwrap();
}

pub fn power_off(a: &mut CodeAssembler) {
    let slp = (u32::from(devices::acpi_pm::S5_SLP_TYP) << 2) | (1 << 5);
    a.mov(al, slp).unwrap();
    a.mov(dx, u32::from(devices::acpi_pm::SLEEP_CONTROL_PORT))
        .unwrap();
    a.out(dx, al).unwrap();
    halt_forever(a);
}

pub fn halt_forever(a: &mut CodeAssembler) {
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.hlt().unwrap();
    a.jmp(again).unwrap();
}

pub fn report_status(a: &mut CodeAssembler, status: u8) {
    a.mov(al, u32::from(status)).unwrap();
    a.mov(dx, u32::from(guest::EXIT_STATUS_PORT)).unwrap();
    a.out(dx, al).unwrap();
}

pub fn assemble(a: &mut CodeAssembler) -> Vec<u8> {
    a.assemble(LOAD_ADDR).expect("assemble")
}

pub fn run_with_timeout(mut cmd: Command, stdin: &[u8], limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "vessel did not finish in {limit:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `vessel run --accel ACCEL --memory 64M --kernel KERNEL EXTRA...`.
pub fn run_kernel_on(accel: &str, kernel: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = vessel();
    cmd.args(["run", "--accel", accel, "--memory", "64M", "--kernel"])
        .arg(kernel)
        .args(extra);
    run_with_timeout(cmd, stdin, Duration::from_secs(60))
}

/// Prints the command line it was booted with (read through the zero page),
/// reports status 7, and powers off through ACPI S5.
pub fn hello_kernel() -> tempfile::NamedTempFile {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(ebx, dword_ptr(rsi + ZERO_PAGE_CMDLINE_PTR)).unwrap();
    print_string_at_rbx(&mut a);
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    report_status(&mut a, 7);
    power_off(&mut a);
    elf_kernel(&assemble(&mut a))
}

/// Echoes serial input back, upper-cased, until a newline, polling the line
/// status register; then powers off. Checks that piped stdin reaches the
/// guest on `accel`.
pub fn check_serial_input_reaches_the_guest(accel: &str) {
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
    let out = run_kernel_on(accel, kernel.path(), &[], b"piped input\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED INPUT\n");
    assert_eq!(out.status.code(), Some(0));
}

/// The boot IDT is empty, so #UD escalates to a triple fault: vessel must
/// stop the VM, say so, and exit 1.
pub fn check_triple_fault_is_reported(accel: &str) {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.ud2().unwrap();
    let kernel = elf_kernel(&assemble(&mut a));
    let out = run_kernel_on(accel, kernel.path(), &[], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("triple-fault"), "stderr: {stderr}");
}

/// A guest that prints '!' and spins forever is torn down by SIGTERM with
/// exit status 128 + SIGTERM, for each vCPU count in `cpus`.
pub fn check_sigterm_tears_down_a_spinning_guest(accel: &str, cpus: &[&str]) {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.out(dx, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    let kernel = elf_kernel(&assemble(&mut a));
    for &count in cpus {
        let mut child = vessel()
            .args([
                "run", "--accel", accel, "--memory", "64M", "--cpus", count, "--kernel",
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
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
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
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{count} vCPUs");
    }
}

/// The hello kernel prints the command line it finds through the zero page
/// and reports status 7, which must become vessel's exit status.
pub fn check_command_line_and_exit_status(accel: &str) {
    let kernel = hello_kernel();
    let out = run_kernel_on(
        accel,
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

/// A tiny kernel that drives the first virtio-mmio device, a disk, the way
/// a driver does: checks the magic and device ID, negotiates VERSION_1,
/// sets up queue 0, reads sector 1 through a three-descriptor chain,
/// compares its first 8 bytes with `VESSELOK`, writes them to sector 2 and
/// checks the used ring, the status bytes and the interrupt status. Its
/// exit status says which step failed (0: none); then vessel must find
/// `VESSELOK` in the image's sector 2. The queue notification goes through
/// the ioeventfd and the request through the device's I/O thread, on
/// either accelerator.
pub fn check_virtio_block_through_a_virtqueue(accel: &str) {
    const DESC: u64 = 0x20_0000;
    const AVAIL: u64 = 0x20_1000;
    const USED: u64 = 0x20_2000;
    const HEADER: u64 = 0x20_3000;
    const DATA: u64 = 0x20_4000;
    const STATUS: u64 = 0x20_5000;
    let base = vmm::layout::VIRTIO_MMIO_START;
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut fail = a.create_label();
    let reg = |off: u64| base + off;
    // r15 holds the step number; a failure reports it.
    let step = |a: &mut CodeAssembler, n: u32| a.mov(r15d, n).unwrap();
    let write_reg = |a: &mut CodeAssembler, off: u64, value: u32| {
        a.mov(rax, reg(off)).unwrap();
        a.mov(dword_ptr(rax), value).unwrap();
    };
    let expect_reg = |a: &mut CodeAssembler, off: u64, value: u32, fail: CodeLabel| {
        a.mov(rax, reg(off)).unwrap();
        a.mov(eax, dword_ptr(rax)).unwrap();
        a.cmp(eax, value).unwrap();
        a.jne(fail).unwrap();
    };
    let desc = |a: &mut CodeAssembler, i: u64, addr: u64, len: u32, flags: u32, next: u32| {
        a.mov(rdi, DESC + i * 16).unwrap();
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(rdi), rax).unwrap();
        a.mov(dword_ptr(rdi + 8), len).unwrap();
        a.mov(word_ptr(rdi + 12), flags).unwrap();
        a.mov(word_ptr(rdi + 14), next).unwrap();
    };
    // One request: header (type, sector), then wait until the used index
    // reaches `used`, then the status byte must be 0.
    let request = |a: &mut CodeAssembler,
                   kind: u32,
                   sector: u32,
                   data_flags: u32,
                   used: u32,
                   fail: CodeLabel| {
        a.mov(rdi, HEADER).unwrap();
        a.mov(dword_ptr(rdi), kind).unwrap();
        a.mov(dword_ptr(rdi + 4), 0u32).unwrap();
        a.mov(qword_ptr(rdi + 8), sector as i32).unwrap();
        a.mov(rdi, STATUS).unwrap();
        a.mov(byte_ptr(rdi), 0xffu32).unwrap();
        desc(a, 0, HEADER, 16, 1, 1);
        desc(a, 1, DATA, 512, 1 | data_flags, 2);
        desc(a, 2, STATUS, 1, 2, 0);
        // avail.ring[used - 1] = 0; avail.idx = used
        a.mov(rdi, AVAIL).unwrap();
        a.mov(word_ptr(rdi + 4 + (used as i32 - 1) * 2), 0u32)
            .unwrap();
        a.mfence().unwrap();
        a.mov(word_ptr(rdi + 2), used).unwrap();
        a.mfence().unwrap();
        write_reg(a, 0x50, 0); // QueueNotify
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 2_000_000u32).unwrap();
        a.set_label(&mut wait).unwrap();
        a.mov(rdi, USED).unwrap();
        a.movzx(eax, word_ptr(rdi + 2)).unwrap();
        a.cmp(eax, used).unwrap();
        a.je(done).unwrap();
        a.pause().unwrap();
        a.dec(ecx).unwrap();
        a.jnz(wait).unwrap();
        a.jmp(fail).unwrap();
        a.set_label(&mut done).unwrap();
        a.mov(rdi, STATUS).unwrap();
        a.cmp(byte_ptr(rdi), 0).unwrap();
        a.jne(fail).unwrap();
    };
    step(&mut a, 10);
    expect_reg(&mut a, 0x00, 0x7472_6976, fail); // magic
    expect_reg(&mut a, 0x04, 2, fail); // version
    expect_reg(&mut a, 0x08, 2, fail); // block device
    step(&mut a, 11);
    write_reg(&mut a, 0x70, 0);
    write_reg(&mut a, 0x70, 1);
    write_reg(&mut a, 0x70, 3);
    write_reg(&mut a, 0x24, 1);
    write_reg(&mut a, 0x20, 1); // VERSION_1
    write_reg(&mut a, 0x24, 0);
    write_reg(&mut a, 0x20, 0);
    write_reg(&mut a, 0x70, 0xb);
    expect_reg(&mut a, 0x70, 0xb, fail); // FEATURES_OK kept
    step(&mut a, 12);
    write_reg(&mut a, 0x30, 0);
    write_reg(&mut a, 0x38, 8);
    write_reg(&mut a, 0x80, DESC as u32);
    write_reg(&mut a, 0x84, 0);
    write_reg(&mut a, 0x90, AVAIL as u32);
    write_reg(&mut a, 0x94, 0);
    write_reg(&mut a, 0xa0, USED as u32);
    write_reg(&mut a, 0xa4, 0);
    write_reg(&mut a, 0x44, 1);
    expect_reg(&mut a, 0x44, 1, fail); // queue accepted
    write_reg(&mut a, 0x70, 0xf); // DRIVER_OK
    step(&mut a, 13);
    request(&mut a, 0, 1, 2, 1, fail); // read sector 1
    step(&mut a, 14);
    a.mov(rdi, DATA).unwrap();
    a.mov(rax, qword_ptr(rdi)).unwrap();
    a.mov(rdx, u64::from_le_bytes(*b"VESSELOK")).unwrap();
    a.cmp(rax, rdx).unwrap();
    a.jne(fail).unwrap();
    step(&mut a, 15);
    request(&mut a, 1, 2, 0, 2, fail); // write it to sector 2
    step(&mut a, 16);
    expect_reg(&mut a, 0x60, 1, fail); // interrupt status: used buffer
    write_reg(&mut a, 0x64, 1); // acknowledge
    expect_reg(&mut a, 0x60, 0, fail);
    report_status(&mut a, 0);
    power_off(&mut a);
    a.set_label(&mut fail).unwrap();
    a.mov(eax, r15d).unwrap();
    a.mov(dx, u32::from(guest::EXIT_STATUS_PORT)).unwrap();
    a.out(dx, al).unwrap();
    power_off(&mut a);
    let kernel = elf_kernel(&assemble(&mut a));

    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let mut bytes = vec![0u8; 16 * 512];
    bytes[512..520].copy_from_slice(b"VESSELOK");
    std::fs::write(&image, &bytes).expect("image");
    let disk = image.to_str().expect("utf-8 path");
    let out = run_kernel_on(accel, kernel.path(), &["--disk", disk], b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "the guest failed at step {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read(&image).expect("image");
    assert_eq!(
        &after[1024..1032],
        b"VESSELOK",
        "the guest's write reached the image"
    );
}
