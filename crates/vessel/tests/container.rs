//! End-to-end tests of `vessel run --container`.
//!
//! They need root (namespaces, mounts, cgroups) and a static busybox to build a test root
//! from: the host's (`/usr/bin/busybox` or `/bin/busybox`, e.g. Debian's busybox-static)
//! or the one `vessel` cached in its data dir. Without them each test prints `NOT RUN`
//! (a failure under CI, see `testkit::not_run`).
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

fn static_busybox() -> Option<PathBuf> {
    testkit::static_busybox(&[guest::default_data_dir().join("busybox/busybox")])
}

struct Env {
    rootfs: PathBuf,
    busybox: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

/// The test root, or why the test cannot run.
fn env() -> Option<Env> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !testkit::is_root() {
        testkit::not_run(testkit::prereq::ROOT, "containers need root");
        return None;
    }
    if !Path::new("/proc/self/ns/pid").exists() || !Path::new("/proc/self/ns/cgroup").exists() {
        testkit::not_run(
            testkit::prereq::NAMESPACES,
            "this kernel lacks PID or cgroup namespaces",
        );
        return None;
    }
    let Some(busybox) = static_busybox() else {
        testkit::not_run(
            testkit::prereq::BUSYBOX,
            "no static busybox (install Debian's busybox-static)",
        );
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
        testkit::not_run(testkit::prereq::CGROUP, "no memory cgroup controller");
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

/// Starts `vessel run --container -- sleep 100` in the background.
fn start_sleeping(env: &Env, stderr: Stdio) -> std::process::Child {
    Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "sleep", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_stops_the_container() {
    let Some(env) = env() else { return };
    let before = host_state();
    let mut child = start_sleeping(&env, Stdio::piped());
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

/// `-t` gives the command a terminal of its own (the container's /dev/pts/0, also its
/// /dev/console) with the host terminal's window size; `script` provides the host-side
/// terminal.
#[test]
fn tty_flag_gives_a_pseudo_terminal_with_the_window_size() {
    let Some(env) = env() else { return };
    if Command::new("script").arg("--version").output().is_err() {
        testkit::not_run(
            testkit::prereq::PROGRAM,
            "util-linux `script` is not installed",
        );
        return;
    }
    let before = host_state();
    let inner = format!(
        "stty rows 33 cols 101; {VESSEL} run --container -t --rootfs {} -- sh -c 'tty; stty size; test -t 0 && echo stdin-is-a-tty; stat -c console=%t:%T /dev/console'",
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
    // /dev/console is the terminal too (pts 0: major 136, 0x88), as runc makes it.
    assert!(text.contains("console=88:0"), "{text:?}");
    assert_eq!(host_state(), before, "vessel left state behind");
}

/// The CPU time (user + system) of every process in the cgroup directory
/// `group`, in seconds, read from /proc (works on cgroup v1 and v2).
fn group_cpu_seconds(group: &Path) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let procs = fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
    let mut ticks = 0u64;
    for pid in procs.lines() {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // exited since the listing
        };
        // Fields after the parenthesized command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks as f64 / ticks_per_second
}

/// The cpu-controller cgroup directory of process `pid`, as the host sees it.
fn cpu_group_of(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let candidates: Vec<PathBuf> = if controllers.split(',').any(|c| c == "cpu") {
            ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
                .iter()
                .map(|m| Path::new("/sys/fs/cgroup").join(m).join(path))
                .collect()
        } else if controllers.is_empty() {
            // cgroup v2: only where the cpu controller is enabled there.
            vec![Path::new("/sys/fs/cgroup").join(path)]
        } else {
            continue;
        };
        if let Some(dir) = candidates
            .into_iter()
            .find(|d| d.join("cpu.cfs_quota_us").exists() || d.join("cpu.max").exists())
        {
            return Some(dir);
        }
    }
    None
}

/// `--cpus 0.25`: the container's cgroup carries a quota of a quarter of
/// one CPU per period, and a busy loop inside gets that much CPU time and
/// no more (measured from the group's processes over three seconds).
#[test]
fn cpu_limit_holds_a_busy_loop_to_its_quota() {
    let Some(env) = env() else { return };
    let before = host_state();
    let mut child = Command::new(VESSEL)
        .args(["run", "--container", "--cpus", "0.25", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "sh", "-c", "echo ready; while :; do :; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting vessel");
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    // The container's init is vessel's child.
    let children =
        fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap_or_default();
    let group = children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find_map(cpu_group_of);
    let result = std::panic::catch_unwind(|| {
        let group = group.expect("the container's cpu cgroup");
        assert!(
            group.to_string_lossy().contains("vessel-"),
            "not a vessel group: {}",
            group.display()
        );
        let read = |f: &str| fs::read_to_string(group.join(f)).unwrap_or_default();
        let quota = if group.join("cpu.max").exists() {
            let max = read("cpu.max");
            let mut it = max
                .split_whitespace()
                .map(|v| v.parse::<f64>().unwrap_or(0.0));
            it.next().unwrap_or(0.0) / it.next().unwrap_or(1.0)
        } else {
            read("cpu.cfs_quota_us")
                .trim()
                .parse::<f64>()
                .unwrap_or(0.0)
                / read("cpu.cfs_period_us")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(1.0)
        };
        assert!(
            (quota - 0.25).abs() < 1e-9,
            "quota/period in the cgroup is {quota}"
        );
        let (cpu0, t0) = (group_cpu_seconds(&group), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let (cpu1, t1) = (group_cpu_seconds(&group), Instant::now());
        let share = (cpu1 - cpu0) / (t1 - t0).as_secs_f64();
        eprintln!("busy loop under --cpus 0.25 used {share:.3} of a CPU");
        // The loop runs (it gets most of its quarter on this host, busy or
        // not) and is held to its quota (a loop left alone takes a whole
        // CPU); the margin covers clock-tick accounting.
        assert!(share > 0.15, "the busy loop got only {share:.3} of a CPU");
        assert!(
            share < 0.32,
            "the busy loop got {share:.3} of a CPU, over its 0.25"
        );
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(status.code(), Some(143));
    assert_eq!(host_state(), before, "vessel left state behind");
}

#[test]
fn a_run_killed_by_sigkill_is_cleaned_up_by_the_next() {
    let Some(env) = env() else { return };
    let before = host_state();
    let mut child = start_sleeping(&env, Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_state() == before {
        assert!(Instant::now() < deadline, "the run made no state");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The container's PID 1 dies with vessel (its parent-death signal); the state
    // directory and the cgroups stay.
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = host_state();
    assert!(
        left.iter().any(|s| s.starts_with("state "))
            && left.iter().any(|s| s.starts_with("cgroup ")),
        "a SIGKILL leaves state and cgroups: {left:?}"
    );
    // The next run finds them (their lock is free) and removes them.
    let out = Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(host_state(), before, "the next run removed the leftovers");
}

/// The id of the unprivileged user the rootless test runs as (nobody).
const NOBODY: u32 = 65534;

/// Changes the owner of everything under `dir` (no symlink followed).
fn chown_tree(dir: &Path, id: u32) {
    std::os::unix::fs::lchown(dir, Some(id), Some(id)).unwrap();
    if fs::symlink_metadata(dir).unwrap().is_dir() {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            chown_tree(&entry.path(), id);
        }
    }
}

#[test]
fn a_rootless_run_is_root_inside_and_the_user_outside() {
    let Some(env) = env() else { return };
    let userns_max = fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if userns_max.trim() == "0" {
        testkit::not_run(testkit::prereq::NAMESPACES, "user namespaces are disabled");
        return;
    }
    // The user's own root, as a rootless user builds one: files it owns are root's
    // inside, so it can write (through the overlay).
    let home = tempfile::tempdir().unwrap();
    let rootfs = home.path().join("rootfs");
    container::rootfs::build_busybox_root(&env.busybox, &rootfs).unwrap();
    chown_tree(home.path(), NOBODY);
    let state_root = PathBuf::from(format!("/tmp/vessel-{NOBODY}"));
    let before = host_state();
    use std::os::unix::process::CommandExt;
    let child = Command::new(VESSEL)
        .uid(NOBODY)
        .gid(NOBODY)
        .env_remove("XDG_RUNTIME_DIR")
        .args(["run", "--container", "--rootfs"])
        .arg(&rootfs)
        .args([
            "--",
            "sh",
            "-c",
            "id; echo written > /tmp/f && cat /tmp/f; sleep 2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The container's PID 1 is vessel's child: from the host it is the user.
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let text = fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            break pid.to_owned();
        }
        assert!(Instant::now() < deadline, "no container process");
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    let uids: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .collect();
    assert_eq!(
        uids, ["65534"; 4],
        "outside, the container runs as the user"
    );
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    let stdout = stdout(&out);
    assert!(
        stdout.starts_with("uid=0(root) gid=0(root)"),
        "inside, it is root: {stdout}"
    );
    assert!(stdout.ends_with("written\n"), "{stdout}");
    assert_eq!(host_state(), before, "no root-owned state or cgroups");
    let left = testkit::entries(&state_root);
    assert!(
        left.is_empty(),
        "the user's state directory is cleaned: {left:?}"
    );
}

#[test]
fn a_rootless_run_with_limits_says_what_it_needs() {
    let Some(env) = env() else { return };
    use std::os::unix::process::CommandExt;
    let out = Command::new(VESSEL)
        .uid(NOBODY)
        .gid(NOBODY)
        .env_remove("XDG_RUNTIME_DIR")
        .args(["run", "--container", "--memory", "64m", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("rootless container need a cgroup this user may write"),
        "{}",
        stderr(&out)
    );
}
