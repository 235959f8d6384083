//! `vessel run --accel emu` with the real default guest (Debian's cloud
//! kernel and the busybox initramfs) from the local cache: the release,
//! exit-status propagation, a byte-exact pipe through the guest, and a
//! clean kernel log. One boot runs a script printing every result, since
//! each boot of the software vCPU takes seconds; a second boot brings up
//! two vCPUs. Never downloads: without a cached guest the test reports NOT
//! RUN (and fails under CI, which fetches the guest first).

use std::process::Command;
use std::time::Instant;

fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

fn cached_guest() -> bool {
    match guest::cached(&guest::default_data_dir()) {
        Ok(Some(_)) => true,
        _ => {
            testkit::not_run(
                testkit::prereq::GUEST,
                "the default guest is not cached (run `vessel guest fetch`)",
            );
            false
        }
    }
}

/// Lines of the kernel log that report a kernel problem. The PCI line is
/// informational: it names `pci=nocrs` and asks to "report a bug" if host
/// bridge windows were wrong, on every ACPI machine.
fn bad_log_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            let bad = [
                "oops",
                "bug",
                "warning",
                "call trace",
                "unchecked msr",
                "error",
                "fatal",
                "fail",
            ]
            .iter()
            .any(|w| lower.contains(w))
                || (lower.contains("probe of") && lower.contains("failed"));
            bad && !lower.contains("host bridge windows from acpi")
        })
        .collect()
}

fn host_md5_of_zeros() -> String {
    let out = Command::new("sh")
        .args(["-c", "dd if=/dev/zero bs=1M count=16 2>/dev/null | md5sum"])
        .output()
        .expect("host md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn default_guest_boots_and_runs_commands() {
    if !cached_guest() {
        return;
    }
    let script = "echo release=$(uname -r); \
                  echo md5=$(dd if=/dev/zero bs=1M count=16 2>/dev/null | md5sum); \
                  echo ==dmesg==; dmesg; echo ==end==; exit 7";
    let _timed = testkit::timed();
    let start = Instant::now();
    let out = vessel()
        .args(["run", "--accel", "emu", "--", "sh", "-c", script])
        .output()
        .expect("run vessel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("boot took {:?}", start.elapsed());
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(7), "exit status\n{context}");

    let release = stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("release="))
        .unwrap_or_else(|| panic!("no release line\n{context}"));
    assert!(release.ends_with("-cloud-amd64"), "release {release:?}");

    let md5 = stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("md5="))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no md5 line\n{context}"));
    assert_eq!(md5, host_md5_of_zeros(), "digest of 16 MiB of zeros");

    let log = stdout
        .split("==dmesg==")
        .nth(1)
        .and_then(|rest| rest.split("==end==").next())
        .unwrap_or_else(|| panic!("no dmesg\n{context}"));
    assert!(log.contains("Linux version"), "dmesg is empty\n{context}");
    let bad = bad_log_lines(log);
    assert!(bad.is_empty(), "kernel log problems: {bad:#?}");
}

/// Two vCPUs: the boot vCPU starts the second with INIT/SIPI, and the
/// guest sees and uses both.
#[test]
fn default_guest_brings_up_two_vcpus() {
    if !cached_guest() {
        return;
    }
    let script = "echo nproc=$(nproc); echo cpus=$(grep -c ^processor /proc/cpuinfo); \
                  echo ==dmesg==; dmesg; echo ==end==";
    let _timed = testkit::timed();
    let start = Instant::now();
    let out = vessel()
        .args([
            "run", "--accel", "emu", "--cpus", "2", "--", "sh", "-c", script,
        ])
        .output()
        .expect("run vessel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("boot with 2 vCPUs took {:?}", start.elapsed());
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "exit status\n{context}");
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {key} line\n{context}"))
    };
    assert_eq!(value("nproc="), "2", "{context}");
    assert_eq!(value("cpus="), "2", "{context}");
    let log = stdout
        .split("==dmesg==")
        .nth(1)
        .and_then(|rest| rest.split("==end==").next())
        .unwrap_or_else(|| panic!("no dmesg\n{context}"));
    assert!(log.contains("Brought up 1 node, 2 CPUs"), "{context}");
    let bad = bad_log_lines(log);
    assert!(bad.is_empty(), "kernel log problems: {bad:#?}");
}

#[test]
fn bad_log_lines_finds_problems() {
    let log = "[0.1] unchecked MSR access error: WRMSR to 0x8b\n\
               [0.2] PCI: Using host bridge windows from ACPI; if necessary, use \"pci=nocrs\" and report a bug\n\
               [0.3] i8042: probe of i8042 failed with error -22\n\
               [0.4] fine\n";
    assert_eq!(bad_log_lines(log).len(), 2);
}
