//! The `vessel` command's answers to the host and to bad input.

use std::io::Write;
use std::process::{Command, Output};

fn vessel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(args)
        .output()
        .expect("run vessel")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failed command prints exactly one line, naming the problem.
fn assert_one_clear_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("warning:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err:?}");
    assert!(lines[0].starts_with("vessel: "), "{err:?}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err:?}");
}

#[test]
fn doctor_json_reports_this_host() {
    let out = vessel(&["doctor", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let kvm_device = std::path::Path::new("/dev/kvm").exists();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(v["kvm"]["device"], kvm_device);
    assert_eq!(v["kvm"]["pvm"], pvm);
    assert!(v["kvm"]["usable"].is_boolean());
    assert!(v["hardware_virtualization"].is_boolean());
    assert!(v["tun"].is_boolean());
    let namespaces = v["namespaces"].as_array().expect("namespaces list");
    assert!(namespaces.iter().any(|n| n == "mnt"), "{namespaces:?}");
    assert!(
        ["v1", "v2", "hybrid", "none"].contains(&v["cgroups"].as_str().expect("cgroups string"))
    );
    let auto = v["auto_accel"].as_str().expect("auto_accel");
    if pvm {
        assert_eq!(auto, "emu", "a PVM host cannot run stock kernels on KVM");
    }
    // This project's development machines: nested PVM with hybrid cgroups.
    if pvm && std::path::Path::new("/sys/fs/cgroup/unified").exists() {
        assert_eq!(v["cgroups"], "hybrid");
    }
}

#[test]
fn doctor_table_explains_each_item() {
    let out = vessel(&["doctor"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for item in [
        "kvm device",
        "kvm pvm",
        "hardware virtualization",
        "auto accelerator",
        "cgroups",
        "namespaces",
        "tun",
    ] {
        assert!(text.contains(item), "missing {item} in {text}");
    }
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f
}

#[test]
fn non_kernel_files_are_refused() {
    let out = vessel(&["run", "--accel", "kvm", "--kernel", "/etc/hostname"]);
    assert_one_clear_error(&out, "is not a Linux kernel");
    let out = vessel(&["run", "--accel", "kvm", "--kernel", "/nonexistent/vmlinuz"]);
    assert_one_clear_error(&out, "/nonexistent/vmlinuz");
    let empty = temp_file(b"");
    let out = vessel(&[
        "run",
        "--accel",
        "kvm",
        "--kernel",
        empty.path().to_str().unwrap(),
    ]);
    assert_one_clear_error(&out, "is empty");
    let out = vessel(&["run", "--accel", "kvm", "--kernel", "/etc"]);
    assert_one_clear_error(&out, "/etc");
}

#[test]
fn truncated_kernel_is_refused() {
    // A bzImage header that promises far more than the file holds.
    let mut image = vec![0u8; 0x1000];
    image[0x1f1] = 4;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1;
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    image[0x236] = 1;
    image[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let kernel = temp_file(&image[..0x300]);
    let out = vessel(&[
        "run",
        "--accel",
        "kvm",
        "--memory",
        "32M",
        "--kernel",
        kernel.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out)
            .lines()
            .filter(|l| !l.contains("warning:"))
            .count(),
        1,
        "{}",
        stderr(&out)
    );
}

#[test]
fn sizes_and_counts_are_checked() {
    for (args, needle) in [
        (vec!["--memory", "0"], "--memory 0"),
        (vec!["--memory", "1T"], "--memory 1T"),
        (vec!["--memory", "lots"], "invalid size"),
        (vec!["--cpus", "0"], "--cpus 0"),
        (vec!["--cpus", "1000"], "--cpus 1000"),
    ] {
        let mut full = vec!["run", "--accel", "kvm", "--kernel", "/etc/hostname"];
        full.extend(args);
        let out = vessel(&full);
        assert_one_clear_error(&out, needle);
    }
}

#[test]
fn emu_is_available_and_checks_the_kernel_first() {
    // The software vCPU needs nothing from the host: the run gets as far
    // as the kernel check.
    let out = vessel(&["run", "--accel", "emu", "--kernel", "/etc/hostname"]);
    assert_one_clear_error(&out, "is not a Linux kernel");
    // A missing kernel is reported on emu as on KVM.
    let out = vessel(&[
        "run",
        "--accel",
        "emu",
        "--cpus",
        "2",
        "--kernel",
        "/nonexistent/vmlinuz",
    ]);
    assert!(!out.status.success());
}

#[test]
fn too_long_command_line_and_oversized_initrd_are_refused() {
    if !hypervisor::host::kvm_support().usable {
        testkit::not_run(
            testkit::prereq::KVM,
            "/dev/kvm is missing or not usable on this host",
        );
        return;
    }
    // A minimal 64-bit ELF "kernel" is enough to reach these checks.
    let elf = tiny_elf_kernel();
    let kernel = temp_file(&elf);
    let path = kernel.path().to_str().unwrap();
    let long = "x".repeat(5000);
    let out = vessel(&[
        "run",
        "--accel",
        "kvm",
        "--memory",
        "32M",
        "--kernel",
        path,
        "--cmdline",
        &long,
    ]);
    assert_one_clear_error(&out, "kernel command line is 5000 bytes");
    let initrd = temp_file(&vec![0u8; 40 << 20]);
    let out = vessel(&[
        "run",
        "--accel",
        "kvm",
        "--memory",
        "32M",
        "--kernel",
        path,
        "--initrd",
        initrd.path().to_str().unwrap(),
    ]);
    assert_one_clear_error(&out, "does not fit");
}

/// A minimal 64-bit ELF "kernel": enough to pass the kernel checks and
/// reach the ones after them.
fn tiny_elf_kernel() -> Vec<u8> {
    let mut elf = vec![0u8; 0x1001];
    elf[0..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[16] = 2;
    elf[18] = 62;
    elf[20] = 1;
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[32] = 64;
    elf[52] = 64;
    elf[54] = 56;
    elf[56] = 1;
    elf[64] = 1;
    elf[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
    elf[80..88].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[88..96].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[96] = 1;
    elf[104] = 1;
    elf
}

/// `--disk` input vessel refuses before the VM starts, each with one line
/// naming the image: a missing file, a directory, an image another VM
/// holds, a qcow2 image given as raw, malformed options, and disks with
/// --container.
#[test]
fn bad_disks_are_refused_with_one_clear_line() {
    let kernel = temp_file(&tiny_elf_kernel());
    let kernel = kernel.path().to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let run_with = |disk: &str| {
        vessel(&[
            "run", "--accel", "emu", "--memory", "32M", "--kernel", &kernel, "--disk", disk,
        ])
    };
    let missing = dir.path().join("missing.img");
    assert_one_clear_error(
        &run_with(missing.to_str().unwrap()),
        "missing.img: No such file",
    );
    assert_one_clear_error(&run_with(dir.path().to_str().unwrap()), "is a directory");

    let image = dir.path().join("busy.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let held = std::fs::File::open(&image).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
        0
    );
    assert_one_clear_error(&run_with(image.to_str().unwrap()), "in use by another VM");
    // A shared (reader's) lock keeps writers out but lets readers in;
    // the reader then fails later, on the tiny kernel, not on the image.
    drop(held);

    let qcow = dir.path().join("disk.qcow2");
    let mut header = b"QFI\xfb".to_vec();
    header.resize(1 << 20, 0);
    std::fs::write(&qcow, header).unwrap();
    assert_one_clear_error(&run_with(qcow.to_str().unwrap()), "is a qcow2 image");
    // Said to be qcow2, but not one: the header is refused.
    assert_one_clear_error(
        &run_with(&format!("{},format=qcow2", image.display())),
        "no qcow2 magic",
    );

    assert_one_clear_error(
        &run_with("x.img,cache=none"),
        "--disk x.img,cache=none: unknown option",
    );
    assert_one_clear_error(&run_with("x.img,format=vmdk"), "format=vmdk");
    assert_one_clear_error(
        &vessel(&["run", "--container", "--disk", "x.img", "--", "true"]),
        "--disk applies to VMs only",
    );
}

/// `--net` input vessel refuses before the VM starts: container modes for
/// a VM, tap for a container, a bad MAC, and a tap vessel may not create
/// (without CAP_NET_ADMIN, by dropping it from the bounding set with
/// util-linux's setpriv).
#[test]
fn bad_nics_are_refused_with_one_clear_line() {
    let kernel = temp_file(&tiny_elf_kernel());
    let kernel = kernel.path().to_str().unwrap().to_owned();
    let vm = |net: &str| {
        vessel(&[
            "run", "--accel", "emu", "--memory", "32M", "--kernel", &kernel, "--net", net,
        ])
    };
    assert_one_clear_error(&vm("host"), "a VM's network is tap");
    assert_one_clear_error(&vm("tap,mac=01:00:5e:00:00:01"), "multicast");
    assert_one_clear_error(&vm("tap,mac=52:54"), "six hex bytes");
    assert_one_clear_error(&vm("tap=this-name-is-too-long"), "longer than 15 bytes");
    assert_one_clear_error(
        &vessel(&["run", "--container", "--net", "tap", "--", "true"]),
        "a container's network is none or host",
    );
    if !testkit::is_root() {
        testkit::not_run(
            testkit::prereq::ROOT,
            "dropping CAP_NET_ADMIN needs it first",
        );
        return;
    }
    let out = Command::new("setpriv")
        .arg("--bounding-set=-net_admin")
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args([
            "run",
            "--accel",
            "emu",
            "--memory",
            "32M",
            "--kernel",
            &kernel,
            "--net",
            "tap=vtnope0",
        ])
        .output()
        .expect("setpriv (util-linux)");
    assert_one_clear_error(&out, "needs CAP_NET_ADMIN");
}

/// `--vsock` refuses a path another program accepts connections on, and
/// a path that is not a socket, before the VM starts.
#[test]
fn a_vsock_path_in_use_is_refused() {
    let kernel = temp_file(&tiny_elf_kernel());
    let kernel = kernel.path().to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let run = |path: &std::path::Path| {
        vessel(&[
            "run",
            "--accel",
            "emu",
            "--memory",
            "32M",
            "--kernel",
            &kernel,
            "--vsock",
            path.to_str().unwrap(),
        ])
    };
    assert_one_clear_error(&run(&busy), "is in use by another program");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert_one_clear_error(&run(&file), "exists and is not a socket");
    assert!(busy.exists(), "the other program's socket is left alone");
}
