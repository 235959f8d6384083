//! End-to-end tests of `vessel run --container`.
//!
//! They need root (namespaces, mounts, cgroups) and a static busybox to build a test root
//! from: the host's (`/usr/bin/busybox` or `/bin/busybox`, e.g. Debian's busybox-static)
//! or the one `vessel` cached in its data dir. Without them each test prints `NOT RUN`.
//! The tests run one at a time so that the host-state snapshots taken around each one
//! (mounts, cgroups, state directories) see only that test's container.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

/// Whether the ELF file at `path` is statically linked (has no PT_INTERP).
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

fn static_busybox() -> Option<PathBuf> {
    let cached = guest::default_data_dir().join("busybox/busybox");
    [
        PathBuf::from("/usr/bin/busybox"),
        PathBuf::from("/bin/busybox"),
        cached,
    ]
    .into_iter()
    .find(|p| is_static_elf(p))
}

struct Env {
    rootfs: PathBuf,
    busybox: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

/// The test root, or why the test cannot run.
fn env() -> Option<Env> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("NOT RUN: containers need root");
        return None;
    }
    if !Path::new("/proc/self/ns/pid").exists() || !Path::new("/proc/self/ns/cgroup").exists() {
        println!("NOT RUN: this kernel lacks PID or cgroup namespaces");
        return None;
    }
    let Some(busybox) = static_busybox() else {
        println!("NOT RUN: no static busybox (install Debian's busybox-static)");
        return None;
    };
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("container-busybox-root");
    container::rootfs::build_busybox_root(&busybox, &rootfs).expect("building the test root");
    Some(Env {
        rootfs,
        busybox,
        _serial: serial,
    })
}

/// What vessel leaves on the host: mounts that mention vessel or overlay, vessel cgroups,
/// and state directories.
fn host_state() -> BTreeSet<String> {
    let mut state = BTreeSet::new();
    for line in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if line.contains("vessel") || line.contains("overlay") {
            state.insert(format!("mount {}", line.split(' ').nth(4).unwrap_or("")));
        }
    }
    fn walk(dir: &Path, depth: usize, out: &mut BTreeSet<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with("vessel-") {
                    out.insert(format!("cgroup {}", path.display()));
                }
                if depth > 0 {
                    walk(&path, depth - 1, out);
                }
            }
        }
    }
    walk(Path::new("/sys/fs/cgroup"), 4, &mut state);
    if let Ok(entries) = fs::read_dir("/run/vessel") {
        for entry in entries.flatten() {
            state.insert(format!("state {}", entry.path().display()));
        }
    }
    state
}

/// Runs `vessel run --container --rootfs ROOT ARGS...` and checks it left nothing behind.
fn vessel(env: &Env, args: &[&str]) -> Output {
    vessel_with(env, args, None, true)
}

fn vessel_with(env: &Env, args: &[&str], stdin: Option<&[u8]>, rootfs: bool) -> Output {
    let before = host_state();
    let mut cmd = Command::new(VESSEL);
    cmd.args(["run", "--container"]);
    if rootfs {
        cmd.arg("--rootfs").arg(&env.rootfs);
    }
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting vessel");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        host_state(),
        before,
        "vessel left state behind; stderr: {}",
        stderr(&out)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
}

#[test]
fn command_is_pid_1() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "sh", "-c", "echo $$"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "1\n");
}

#[test]
fn exit_status_is_the_commands() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = vessel(&env, &["--", "false"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn hostname_defaults_to_the_id_and_can_be_set() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "hostname"]);
    assert_ok(&out);
    let name = stdout(&out);
    let name = name.trim();
    assert_eq!(name.len(), 12, "{name:?}");
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{name:?}");
    let out = vessel(&env, &["--hostname", "box1", "--", "hostname"]);
    assert_eq!(stdout(&out), "box1\n");
}

#[test]
fn host_processes_are_invisible() {
    let Some(env) = env() else { return };
    // `ls` is PID 1 itself, so it should see exactly one process: itself.
    let out = vessel(&env, &["--", "ls", "/proc"]);
    assert_ok(&out);
    let pids: Vec<String> = stdout(&out)
        .split_whitespace()
        .filter(|e| e.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
        .collect();
    assert_eq!(pids, vec!["1"]);
}

#[test]
fn host_mounts_are_invisible() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "cat", "/proc/self/mounts"]);
    assert_ok(&out);
    let mounts = stdout(&out);
    let targets: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    assert_eq!(targets.first(), Some(&"/"), "{mounts}");
    assert!(mounts.starts_with("overlay / overlay "), "{mounts}");
    for host in ["/sys/fs/cgroup", "/work", "/run/vessel"] {
        assert!(
            !targets.iter().any(|t| t.starts_with(host)),
            "{host} visible: {mounts}"
        );
    }
    for wanted in ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/proc/sys"] {
        assert!(targets.contains(&wanted), "{wanted} missing: {mounts}");
    }
}

#[test]
fn sys_and_proc_sys_are_read_only_and_paths_masked() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "sh", "-c", "mkdir /sys/x"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("Read-only"), "{}", stderr(&out));
    let out = vessel(
        &env,
        &["--", "sh", "-c", "echo 1 > /proc/sys/kernel/domainname"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("Read-only"), "{}", stderr(&out));
    // Masked: /proc/timer_list (where the kernel has it) reads as /dev/null, empty.
    let out = vessel(
        &env,
        &["--", "sh", "-c", "cat /proc/timer_list 2>/dev/null | wc -c"],
    );
    assert_eq!(stdout(&out).trim(), "0");
}

#[test]
fn memory_limit_kills_and_is_reported() {
    let Some(env) = env() else { return };
    if !Path::new("/sys/fs/cgroup/memory").exists()
        && !fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.contains("memory"))
    {
        println!("NOT RUN: no memory cgroup controller");
        return;
    }
    let out = vessel(
        &env,
        &[
            "--memory",
            "32M",
            "--",
            "sh",
            "-c",
            r#"a=$(head -c 67108864 /dev/zero | tr "\0" x); echo survived"#,
        ],
    );
    assert_eq!(out.status.code(), Some(137), "stderr: {}", stderr(&out));
    assert!(!stdout(&out).contains("survived"));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("memory limit"), "{err}");
    // Within the limit, the same kind of work succeeds.
    let out = vessel(
        &env,
        &[
            "--memory",
            "64M",
            "--",
            "sh",
            "-c",
            r#"a=$(head -c 1048576 /dev/zero | tr "\0" x); echo ${#a}"#,
        ],
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), "1048576\n");
}

#[test]
fn pids_limit_contains_a_fork_loop() {
    let Some(env) = env() else { return };
    let started = Instant::now();
    // The inner shell dies when fork fails; PID 1 (the outer shell) survives to report.
    let out = vessel(
        &env,
        &[
            "--pids",
            "16",
            "--",
            "sh",
            "-c",
            r#"sh -c 'for i in $(seq 30); do sleep 5 & done'; echo inner=$?"#,
        ],
    );
    assert_ok(&out);
    assert!(!stdout(&out).contains("inner=0"), "{}", stdout(&out));
    assert!(stderr(&out).contains("can't fork"), "{}", stderr(&out));
    // PID 1's exit took the sleeps with it.
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn cpu_limit_is_accepted() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--cpus", "0.5", "--", "true"]);
    assert_ok(&out);
}

#[test]
fn overlay_is_discarded_and_rootfs_untouched() {
    let Some(env) = env() else { return };
    let listing = |root: &Path| {
        let mut names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let etc: Vec<String> = fs::read_dir(root.join("etc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        (
            names,
            etc.len(),
            fs::metadata(root.join("etc")).unwrap().modified().unwrap(),
        )
    };
    let before = listing(&env.rootfs);
    let out = vessel(
        &env,
        &[
            "--",
            "sh",
            "-c",
            "echo data > /etc/newfile && rm /bin/cat && test ! -e /bin/cat && read x < /etc/newfile && echo $x",
        ],
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), "data\n");
    let out = vessel(
        &env,
        &[
            "--",
            "sh",
            "-c",
            "test ! -e /etc/newfile && test -e /bin/cat",
        ],
    );
    assert_ok(&out);
    assert_eq!(listing(&env.rootfs), before);
    assert!(!env.rootfs.join("etc/newfile").exists());
}

#[test]
fn sigterm_stops_the_container() {
    let Some(env) = env() else { return };
    let before = host_state();
    let mut child = Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "sleep", "100"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "vessel ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143));
    assert_eq!(host_state(), before);
}

#[test]
fn signal_handled_by_pid_1_is_forwarded() {
    let Some(env) = env() else { return };
    let mut child = Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(&env.rootfs)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(3));
    assert!(rest.contains("got-term"), "{rest}");
}

#[test]
fn environment_workdir_and_limits() {
    let Some(env) = env() else { return };
    let out = vessel(
        &env,
        &[
            "-e",
            "FOO=bar baz",
            "-e",
            "HOME=/tmp",
            "-w",
            "/srv/work",
            "--",
            "sh",
            "-c",
            "echo \"$FOO|$HOME|$PATH|$TERM\"; pwd; ulimit -n; grep CapEff /proc/self/status",
        ],
    );
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "bar baz|/tmp|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|"
    );
    assert_eq!(lines[1], "/srv/work");
    assert_eq!(lines[2], "1024");
    let eff = u64::from_str_radix(lines[3].trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert_eq!(eff & (1 << 21), 0, "CAP_SYS_ADMIN dropped");
    assert_eq!(eff & (1 << 12), 0, "CAP_NET_ADMIN dropped");
    assert_ne!(eff & 1, 0, "CAP_CHOWN kept");
}

#[test]
fn network_none_has_only_loopback() {
    let Some(env) = env() else { return };
    let out = vessel(&env, &["--", "cat", "/proc/net/dev"]);
    assert_ok(&out);
    let ifaces: Vec<String> = stdout(&out)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
        .collect();
    assert_eq!(ifaces, vec!["lo"]);
    let out = vessel(&env, &["--", "ip", "link", "show", "lo"]);
    assert!(stdout(&out).contains(",UP"), "{}", stdout(&out));
}

#[test]
fn stdin_is_passed_through() {
    let Some(env) = env() else { return };
    let out = vessel_with(&env, &["--", "tr", "a-z", "A-Z"], Some(b"hello\n"), true);
    assert_ok(&out);
    assert_eq!(stdout(&out), "HELLO\n");
}

#[test]
fn default_root_is_built_from_the_cached_busybox() {
    let Some(env) = env() else { return };
    let data = tempfile::tempdir().unwrap();
    fs::create_dir_all(data.path().join("busybox")).unwrap();
    fs::copy(&env.busybox, data.path().join("busybox/busybox")).unwrap();
    let before = host_state();
    let out = Command::new(VESSEL)
        .args([
            "run",
            "--container",
            "--",
            "sh",
            "-c",
            "echo $$; ls /bin/busybox",
        ])
        .env("VESSEL_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(stdout(&out), "1\n/bin/busybox\n");
    assert!(container::rootfs::is_busybox_root(
        &container::rootfs::busybox_root_dir(data.path())
    ));
    assert_eq!(host_state(), before);
}

#[test]
fn errors_are_one_clear_line() {
    let Some(env) = env() else { return };
    let file = env.rootfs.join("etc/passwd");
    let file = file.to_str().unwrap();
    for (args, code, needle) in [
        (
            vec!["--", "no-such-cmd"],
            127,
            "no-such-cmd: not found in the container's root",
        ),
        (
            vec!["--", "/bin/nope"],
            127,
            "not found in the container's root",
        ),
        (vec!["-e", "NOEQUALS", "--", "true"], 1, "KEY=VALUE"),
        (vec!["--cpus", "0", "--", "true"], 1, "--cpus 0"),
        (vec!["--cpus", "abc", "--", "true"], 1, "--cpus abc"),
        (vec!["--memory", "1M", "--", "true"], 1, "--memory 1M"),
        (vec!["--memory", "lots", "--", "true"], 1, "invalid size"),
        (vec!["--pids", "0", "--", "true"], 1, "--pids 0"),
        (
            vec!["--hostname", "bad name", "--", "true"],
            1,
            "--hostname",
        ),
        (vec!["-w", "relative", "--", "true"], 1, "absolute"),
    ] {
        let out = vessel(&env, &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    for (rootfs, needle) in [
        ("/nonexistent-root", "no such directory"),
        (file, "not a directory"),
    ] {
        let before = host_state();
        let out = Command::new(VESSEL)
            .args(["run", "--container", "--rootfs", rootfs, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stderr(&out).lines().count(), 1);
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
        assert_eq!(host_state(), before);
    }
    // An empty root: the command is not there.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(empty.path())
        .args(["--", "sh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("sh: not found in the container's root"));
    assert_eq!(
        fs::read_dir(empty.path()).unwrap().count(),
        0,
        "root untouched"
    );
    // Container flags without --container, VM flags with it.
    let out = Command::new(VESSEL)
        .args(["run", "--rootfs", "/", "--", "true"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("--container"), "{}", stderr(&out));
    let out = Command::new(VESSEL)
        .args(["run", "--container", "--kernel", "/x", "--", "true"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("VMs only"), "{}", stderr(&out));
}

/// `-t` gives the command a terminal of its own (the container's /dev/pts/0) with the
/// host terminal's window size; `script` provides the host-side terminal.
#[test]
fn tty_flag_gives_a_pseudo_terminal_with_the_window_size() {
    let Some(env) = env() else { return };
    if Command::new("script").arg("--version").output().is_err() {
        println!("NOT RUN: util-linux `script` is not installed");
        return;
    }
    let before = host_state();
    let inner = format!(
        "stty rows 33 cols 101; {VESSEL} run --container -t --rootfs {} -- sh -c 'tty; stty size; test -t 0 && echo stdin-is-a-tty'",
        env.rootfs.display()
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("running script");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "output: {text} stderr: {}",
        stderr(&out)
    );
    assert!(text.contains("/dev/pts/0"), "{text:?}");
    assert!(text.contains("33 101"), "{text:?}");
    assert!(text.contains("stdin-is-a-tty"), "{text:?}");
    assert_eq!(host_state(), before, "vessel left state behind");
}
