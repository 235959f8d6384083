//! A full Debian system on a virtio disk boots to systemd's multi-user
//! target on the software vCPU and powers off cleanly: the default guest's
//! init mounts `root=/dev/vda` and hands over to the disk's systemd.
//!
//! The system is built here with mmdebstrap from Debian's mirror (minbase
//! with systemd, about 230 MB), so the test needs root, mmdebstrap and the
//! network; `cargo test` leaves it out and CI runs it with `--ignored`.

use std::process::Command;

#[test]
#[ignore = "builds a Debian system with mmdebstrap from the network (about a minute)"]
fn a_debian_system_on_a_disk_boots_to_multi_user_and_powers_off() {
    if !testkit::is_root() {
        testkit::not_run(testkit::prereq::ROOT, "mmdebstrap needs root here");
        return;
    }
    if !testkit::programs_present(&["mmdebstrap", "mkfs.ext4"]) {
        return;
    }
    if !matches!(guest::cached(&guest::default_data_dir()), Ok(Some(_))) {
        testkit::not_run(testkit::prereq::GUEST, "the default guest is not cached");
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            "--include=systemd-sysv,udev",
            "bookworm",
        ])
        .arg(&root)
        .output()
        .expect("mmdebstrap");
    assert!(
        out.status.success(),
        "mmdebstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A unit that says the system got there, then powers it off.
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("multi-user.target.wants")).unwrap();
    std::fs::write(
        units.join("vessel-check.service"),
        "[Unit]\nDescription=vessel check\nAfter=multi-user.target\n\n\
         [Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"vessel-check: \
         $(systemctl is-active multi-user.target) \
         $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\" \
         >/dev/console; systemctl poweroff'\n\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/vessel-check.service",
        units.join("multi-user.target.wants/vessel-check.service"),
    )
    .unwrap();
    std::fs::write(root.join("etc/fstab"), "/dev/vda / ext4 defaults 0 1\n").unwrap();
    let image = dir.path().join("debian.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
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

    let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("run")
        .arg("--disk")
        .arg(&image)
        .args([
            "--cmdline",
            "console=ttyS0 panic=-1 tsc=reliable root=/dev/vda rw",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "console (last 3000 bytes):\n{}\nstderr:\n{}",
        &console[console.len().saturating_sub(3000)..],
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(console.contains("Reached target"), "{context}");
    assert!(
        console.contains("vessel-check: active kvm-clock"),
        "multi-user.target active, kvm-clock the clocksource\n{context}"
    );
    assert!(console.contains("reboot: Power down"), "{context}");
}
