//! virtio devices in the real default guest on the software vCPU: a disk
//! made on the host with `mkfs.ext4 -d` is mounted and read back; data the
//! guest synced survives a SIGKILL of vessel right after the sync and the
//! file system checks clean; a read-only disk refuses writes and stays
//! byte-for-byte the same; the guest's hwrng is virtio-rng, its clock
//! kvm-clock; and the kernel log stays clean. Needs the cached default guest and e2fsprogs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

fn ready() -> bool {
    if !matches!(guest::cached(&guest::default_data_dir()), Ok(Some(_))) {
        testkit::not_run(
            testkit::prereq::GUEST,
            "the default guest is not cached (run `vessel guest fetch`)",
        );
        return false;
    }
    for tool in ["mkfs.ext4", "e2fsck", "debugfs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            testkit::not_run(
                testkit::prereq::PROGRAM,
                format!("{tool} is not installed (apt-get install e2fsprogs)"),
            );
            return false;
        }
    }
    true
}

/// A 64 MiB ext4 image holding `files` (name, contents).
fn ext4_image(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(64 << 20).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Lines of the kernel log that report a problem (as boot_emu.rs reads
/// them; the PCI line is informational).
fn bad_log_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            [
                "oops",
                "bug",
                "warning",
                "call trace",
                "error",
                "fatal",
                "fail",
                "virtio",
            ]
            .iter()
            .any(|w| lower.contains(w))
                && !lower.contains("host bridge windows from acpi")
                && !lower.contains("virtio_blk virtio0: 1/0/0")
                && !lower.contains("virtio_blk virtio0: [vda]")
        })
        .collect()
}

#[test]
fn a_host_made_disk_is_mounted_the_hwrng_is_virtio_and_the_clock_kvmclock() {
    if !ready() {
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let image = ext4_image(dir.path(), &[("hello.txt", b"made on the host\n")]);
    let script = "mount /dev/vda /mnt && cat /mnt/hello.txt; \
                  echo serial=$(cat /sys/block/vda/serial); \
                  echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
                  echo clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); \
                  echo random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); \
                  echo ==dmesg==; dmesg; echo ==end==";
    let out = vessel()
        .arg("run")
        .arg("--disk")
        .arg(format!("{},serial=test-disk-1", image.display()))
        .args(["--rng", "--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{context}");
    assert!(stdout.contains("made on the host"), "{context}");
    assert!(stdout.contains("serial=test-disk-1"), "{context}");
    assert!(stdout.contains("rng=virtio_rng.0"), "{context}");
    assert!(stdout.contains("clocksource=kvm-clock"), "{context}");
    let random = stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("random="))
        .unwrap_or_default();
    assert_eq!(random.len(), 64, "32 bytes from /dev/hwrng\n{context}");
    let log = stdout
        .split("==dmesg==")
        .nth(1)
        .and_then(|r| r.split("==end==").next())
        .unwrap_or_default();
    assert!(log.contains("virtio_blk"), "{context}");
    let bad = bad_log_lines(log);
    assert!(bad.is_empty(), "kernel log problems: {bad:#?}");
}

#[test]
fn synced_data_survives_a_sigkill_and_the_file_system_checks_clean() {
    if !ready() {
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let image = ext4_image(dir.path(), &[("old.txt", b"old\n")]);
    // 1 MiB of a known pattern, synced, then the marker; then the guest
    // idles until it is killed.
    let script = "mount /dev/vda /mnt && \
                  yes vessel-data | head -c 1048576 > /mnt/new.dat && sync && \
                  echo synced && sleep 600";
    let mut child = vessel()
        .arg("run")
        .arg("--disk")
        .arg(&image)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let start = Instant::now();
    let mut seen = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        seen.push_str(&line);
        seen.push('\n');
        if line.trim_end() == "synced" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{seen}");
    }
    child.kill().unwrap(); // SIGKILL, right after the guest's sync
    child.wait().unwrap();
    assert!(seen.contains("synced"), "the guest never synced: {seen}");
    // The lock went with the process: the image opens again at once.
    // Replay the journal on a copy, then a forced check must find nothing.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&image, &copy).unwrap();
    let replay = Command::new("e2fsck")
        .arg("-fy")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        matches!(replay.status.code(), Some(0) | Some(1)),
        "e2fsck -fy: {}",
        String::from_utf8_lossy(&replay.stdout)
    );
    let check = Command::new("e2fsck")
        .arg("-fn")
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "not clean: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let dumped = dir.path().join("new.dat");
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /new.dat {}", dumped.display()))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success());
    let data = std::fs::read(&dumped).expect("new.dat in the image");
    let want: Vec<u8> = b"vessel-data\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    assert!(
        data == want,
        "new.dat has {} bytes, not the pattern",
        data.len()
    );
}

#[test]
fn a_readonly_disk_refuses_writes_and_is_unchanged() {
    if !ready() {
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let image = ext4_image(dir.path(), &[("keep.txt", b"keep me\n")]);
    let before = sha256(&image);
    let script = "echo ro=$(cat /sys/block/vda/ro); \
                  mount /dev/vda /mnt 2>/dev/null; cat /mnt/keep.txt; \
                  touch /mnt/new 2>/dev/null && echo TOUCHED; \
                  dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null && echo WROTE; \
                  echo done";
    let out = vessel()
        .arg("run")
        .arg("--disk")
        .arg(format!("{},readonly", image.display()))
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ro=1"), "{stdout}");
    assert!(stdout.contains("keep me"), "mounted read-only: {stdout}");
    assert!(
        !stdout.contains("TOUCHED") && !stdout.contains("WROTE"),
        "{stdout}"
    );
    assert!(stdout.contains("done"), "{stdout}");
    assert_eq!(sha256(&image), before, "the image changed");
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img")
}

/// qcow2 disks from the guest's side: a plain qcow2 image and a qcow2
/// overlay on a raw backing file; files the guest writes there pass
/// `qemu-img check` and show up in `qemu-img convert`'s raw output, and
/// the backing file stays as it was.
#[test]
fn qcow2_images_and_overlays_take_the_guests_writes() {
    if !ready() {
        return;
    }
    if qemu_img(&["--version"]).status.code().is_none() {
        testkit::not_run(testkit::prereq::PROGRAM, "qemu-img is not installed");
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let base = ext4_image(dir.path(), &[("base.txt", b"from the base\n")]);
    let base_sum = sha256(&base);
    let plain = dir.path().join("plain.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    assert!(qemu_img(&["convert", "-O", "qcow2", &s(&base), &s(&plain)])
        .status
        .success());
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&base),
        "-F",
        "raw",
        &s(&overlay)
    ])
    .status
    .success());
    let script = "for d in vda vdb; do mkdir /mnt/$d && mount /dev/$d /mnt/$d && \
                  cat /mnt/$d/base.txt && yes $d | head -c 300000 > /mnt/$d/new.txt; done; \
                  sync; umount /mnt/vda /mnt/vdb; echo done";
    let out = vessel()
        .arg("run")
        .arg("--disk")
        .arg(format!("{},format=qcow2", plain.display()))
        .arg("--disk")
        .arg(format!("{},format=qcow2", overlay.display()))
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("from the base").count(), 2, "{stdout}");
    assert!(stdout.contains("done"), "{stdout}");
    assert_eq!(sha256(&base), base_sum, "the backing file is untouched");
    for (image, name) in [(&plain, "vda"), (&overlay, "vdb")] {
        let check = qemu_img(&["check", "-f", "qcow2", &s(image)]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let raw = dir.path().join(format!("{name}.raw"));
        assert!(qemu_img(&["convert", "-O", "raw", &s(image), &s(&raw)])
            .status
            .success());
        let dumped = dir.path().join(format!("{name}.txt"));
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /new.txt {}", dumped.display()))
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success());
        let want: Vec<u8> = format!("{name}\n").bytes().cycle().take(300_000).collect();
        assert!(
            std::fs::read(&dumped).unwrap() == want,
            "{name}: new.txt differs"
        );
    }
}
