//! End-to-end tests of `vessel daemon` and the instance verbs: each test
//! runs its own daemon (its own socket, state directory and image cache,
//! the busybox image built from a static busybox) and drives it with the
//! `vessel` command as a user would, or with raw HTTP for the API's bad
//! input. They need root (containers) and a static busybox; without them
//! each test prints `NOT RUN` (a failure under CI).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

/// One daemon at a time: the tests look at host-wide cgroups and mounts.
static SERIAL: Mutex<()> = Mutex::new(());

struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    _serial: MutexGuard<'static, ()>,
}

impl Daemon {
    /// A daemon on a fresh state directory, or why it cannot run.
    fn start() -> Option<Daemon> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if !testkit::is_root() {
            testkit::not_run(testkit::prereq::ROOT, "instances need root");
            return None;
        }
        let Some(busybox) =
            testkit::static_busybox(&[guest::default_data_dir().join("busybox/busybox")])
        else {
            testkit::not_run(
                testkit::prereq::BUSYBOX,
                "no static busybox (install Debian's busybox-static)",
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        container::rootfs::build_busybox_root(
            &busybox,
            &container::rootfs::busybox_root_dir(&data),
        )
        .expect("building the busybox image");
        let mut d = Daemon {
            dir,
            child: None,
            _serial: serial,
        };
        d.spawn(&[]);
        Some(d)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("vessel.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `vessel daemon` and waits for its socket.
    fn spawn(&mut self, extra: &[&str]) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(VESSEL)
            .arg("daemon")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state())
            .args(extra)
            .env("VESSEL_DATA_DIR", self.dir.path().join("data"))
            .env("VESSEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILLs the daemon (not its instances).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn vessel(&self, args: &[&str]) -> Output {
        Command::new(VESSEL)
            .args(args)
            .env("VESSEL_SOCKET", self.socket())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Attaches `vessel console NAME`, types `input`, waits (up to 60 s)
    /// until the output holds `expect`, then detaches with Ctrl-a q, which
    /// must end it with status 0. The output.
    fn console(&self, name: &str, input: &[u8], expect: &str) -> String {
        let mut child = Command::new(VESSEL)
            .args(["console", name])
            .env("VESSEL_SOCKET", self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let output = std::sync::Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        // Type the input every few seconds until the expected text shows
        // (the first may come before the attachment).
        let deadline = Instant::now() + Duration::from_secs(60);
        'typing: loop {
            stdin.write_all(input).unwrap();
            let retype = Instant::now() + Duration::from_secs(3);
            while Instant::now() < retype {
                if String::from_utf8_lossy(&output.lock().unwrap()).contains(expect) {
                    break 'typing;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                Instant::now() < deadline,
                "{expect:?} never showed on {name}'s console"
            );
        }
        stdin.write_all(b"\x01q").unwrap();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        let out = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
        assert!(status.success(), "vessel console {name}: {status}\n{out}");
        out
    }

    /// Leaves `sh -c "{prelude}; {work}"` running in the background in
    /// `name` (output discarded), and returns once its prelude (a trap,
    /// say) is in effect: exec returns before a background shell has run
    /// anything, and on a loaded host it can take a while.
    fn background(&self, name: &str, prelude: &str, work: &str) {
        const STARTED: &str = "/root/.background-started";
        self.ok(&["exec", name, "--", "rm", "-f", STARTED]);
        let script = format!("({prelude}; touch {STARTED}; {work}) >/dev/null 2>&1 & echo");
        self.ok(&["exec", name, "--", "sh", "-c", &script]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .vessel(&["exec", name, "--", "test", "-e", STARTED])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "the background shell in {name} never started"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `vessel ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.vessel(args);
        assert!(
            out.status.success(),
            "vessel {args:?}: {}\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `vessel ARGS`, which must fail with one line that contains
    /// `expected`.
    fn fails(&self, args: &[&str], expected: &str) {
        let out = self.vessel(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "vessel {args:?} succeeded");
        assert!(err.contains(expected), "vessel {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }

    fn instances(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--format", "json"])).unwrap()
    }

    fn instance(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["info", name])).unwrap()
    }

    /// Sends raw bytes to the API; the status code and body.
    fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Instances go with the test: stop them through their
        // supervisors (the daemon may be dead), then the daemon.
        let instances = self.state().join("instances");
        if let Ok(entries) = std::fs::read_dir(&instances) {
            for e in entries.flatten() {
                let layout = supervisor::Layout::new(e.path());
                let _ = supervisor::Control::stop(&layout, 0, true);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: v\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Mounts and cgroups that mention the instance's directory or name.
fn leftovers(state: &Path, name: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()))
        .map(str::to_owned)
        .collect();
    for hierarchy in ["memory", "cpu", "cpu,cpuacct", "pids", "unified"] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join("vessel")
            .join(name);
        if dir.exists() {
            found.push(dir.display().to_string());
        }
    }
    found
}

#[test]
fn a_container_lasts_through_stop_start_and_a_daemon_kill() {
    let Some(mut d) = Daemon::start() else { return };
    let _t = testkit::timed();
    d.ok(&["launch", "web", "--container"]);
    let info = d.instance("web");
    assert_eq!(info["status"], "running", "{info}");
    let pid = info["pid"].as_i64().unwrap();

    // exec: output, the exit status, stdin, the working directory, env.
    assert_eq!(d.ok(&["exec", "web", "--", "hostname"]).trim(), "web");
    let out = d.vessel(&["exec", "web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = d.ok(&[
        "exec",
        "web",
        "-w",
        "/tmp",
        "-e",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        "echo $GREETING $(pwd)",
    ]);
    assert_eq!(out.trim(), "hi /tmp");
    let out = d.vessel(&["exec", "web", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));

    d.ok(&["exec", "web", "--", "sh", "-c", "echo kept > /root/file"]);
    let started = Instant::now();
    d.ok(&["stop", "web"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a graceful stop of an idle container"
    );
    assert_eq!(d.instance("web")["status"], "stopped");
    assert!(
        leftovers(&d.state(), "web").is_empty(),
        "{:?}",
        leftovers(&d.state(), "web")
    );
    d.ok(&["start", "web"]);
    assert_eq!(
        d.ok(&["exec", "web", "--", "cat", "/root/file"]).trim(),
        "kept"
    );

    // The daemon dies; the instance does not, and is adopted unrestarted.
    let pid = {
        let now = d.instance("web")["pid"].as_i64().unwrap();
        assert_ne!(now, pid, "a new init after stop and start");
        now
    };
    d.kill();
    d.fails(&["list"], "start it with `vessel daemon`");
    d.spawn(&[]);
    let info = d.instance("web");
    assert_eq!(info["status"], "running", "{info}");
    assert_eq!(
        info["pid"].as_i64(),
        Some(pid),
        "the same init: not restarted"
    );
    assert_eq!(
        d.ok(&["exec", "web", "--", "cat", "/root/file"]).trim(),
        "kept"
    );

    // The console is a terminal with a root shell on it (as a getty keeps
    // one): typed input is run, and the log keeps what it showed.
    let out = d.console("web", b"echo console-$((6*7))\n", "console-42");
    assert!(
        out.contains("console-$((6*7))"),
        "the terminal echoes: {out}"
    );
    let logs = d.ok(&["logs", "web"]);
    assert!(logs.contains("console-42"), "{logs}");

    // A container that stops by itself is seen as stopped.
    let _ = d.vessel(&["exec", "web", "--", "kill", "-TERM", "1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.instance("web")["status"] != "stopped" {
        assert!(
            Instant::now() < deadline,
            "the daemon never saw the init end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.ok(&["restart", "web"]);
    assert_eq!(d.instance("web")["status"], "running");
    d.fails(&["rm", "web"], "is running");
    d.ok(&["rm", "--force", "web"]);
    assert!(d.instances().is_empty());
    assert!(!d.state().join("instances/web").exists());
    assert!(leftovers(&d.state(), "web").is_empty());
}

#[test]
fn a_stop_that_is_ignored_is_forced_after_the_timeout() {
    let Some(d) = Daemon::start() else { return };
    d.ok(&["launch", "stubborn"]);
    // A process that ignores SIGTERM, left running in the background.
    d.background("stubborn", "trap '' TERM HUP", "while :; do sleep 1; done");
    let started = Instant::now();
    d.ok(&["stop", "--timeout", "2", "stubborn"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
    d.ok(&["start", "stubborn"]);
    let started = Instant::now();
    d.ok(&["stop", "--force", "stubborn"]);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(leftovers(&d.state(), "stubborn").is_empty());

    // A forced stop does not wait behind a long graceful one.
    d.ok(&["start", "stubborn"]);
    d.background("stubborn", "trap '' TERM HUP", "while :; do sleep 1; done");
    let graceful = Command::new(VESSEL)
        .args(["stop", "--timeout", "600", "stubborn"])
        .env("VESSEL_SOCKET", d.socket())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    d.ok(&["stop", "--force", "stubborn"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let out = graceful.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.instance("stubborn")["status"], "stopped");
    d.fails(&["stop", "--timeout", "99999", "stubborn"], "at most 3600");
}

#[test]
fn every_verb_refuses_bad_input_with_one_line() {
    let Some(d) = Daemon::start() else { return };
    for verb in [
        &["info", "ghost"][..],
        &["start", "ghost"],
        &["stop", "ghost"],
        &["restart", "ghost"],
        &["rm", "ghost"],
        &["logs", "ghost"],
        &["exec", "ghost", "--", "true"],
    ] {
        d.fails(verb, "no instance named \"ghost\"");
    }
    d.fails(&["launch", "Bad_Name"], "invalid instance name");
    d.fails(&["launch", "9lives"], "must start with a letter");
    d.fails(&["launch", "web", "--image", "nosuch"], "unknown image");
    d.fails(&["launch", "web", "--cpus", "0"], "--cpus");
    d.fails(&["launch", "web", "--memory", "1K"], "memory");
    d.fails(
        &["launch", "web", "--disk", "4G"],
        "--disk applies to VMs only",
    );
    // VMs: an image without an init system, bad vCPUs, memory, accelerator.
    d.fails(
        &["launch", "web", "--vm"],
        "image busybox has no init system",
    );
    let vm = ["launch", "web", "--vm", "--image", "debian/bookworm"];
    d.fails(&[&vm[..], &["--cpus", "0.5"]].concat(), "a whole number");
    d.fails(&[&vm[..], &["--cpus", "999"]].concat(), "a whole number");
    d.fails(&[&vm[..], &["--memory", "16M"]].concat(), "at least 96 MiB");
    d.fails(
        &[&vm[..], &["--memory", "100000G"]].concat(),
        "more than this host's",
    );
    d.fails(
        &[&vm[..], &["--accel", "fast"]].concat(),
        "one of auto, kvm, emu",
    );
    d.fails(
        &["launch", "web", "--accel", "emu"],
        "--accel applies to VMs only",
    );
    // Admission: more memory than the host has.
    d.fails(&["launch", "huge", "--memory", "100000G"], "over the limit");
    assert!(
        d.instance("huge")["status"] == "stopped",
        "refused to start, kept created"
    );
    d.ok(&["rm", "huge"]);

    // Two creates of one name at once: one wins, the other is refused,
    // and the winner is intact.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(VESSEL)
                .args(["launch", "dup"])
                .env("VESSEL_SOCKET", d.socket())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<Output> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| o.status.success()).count(),
        1,
        "one create wins"
    );
    assert!(outcomes
        .iter()
        .any(|o| String::from_utf8_lossy(&o.stderr).contains("already exists")));
    assert_eq!(
        d.ok(&["exec", "dup", "--", "echo", "intact"]).trim(),
        "intact"
    );
    d.ok(&["rm", "--force", "dup"]);

    d.fails(&["image", "build", "nosuch"], "unknown image");
    d.fails(&["image", "rm", "nosuch"], "unknown image");
    d.ok(&["create", "web"]);
    d.fails(&["image", "rm", "busybox"], "is used by web");
    let images: Vec<api::Image> =
        serde_json::from_str(&d.ok(&["image", "list", "--format", "json"])).unwrap();
    assert!(
        images.iter().any(|i| i.name == "busybox" && i.built),
        "{images:?}"
    );
    d.fails(&["create", "web"], "already exists");
    d.fails(&["stop", "web"], "is not running");
    d.fails(&["exec", "web", "--", "true"], "is not running");
    d.ok(&["start", "web"]);
    d.fails(&["start", "web"], "already running");
    d.fails(&["rm", "web"], "is running");
    assert_eq!(d.instances().len(), 1, "nothing half-made");
    assert_eq!(d.instance("web")["status"], "running");

    // Requests that are not what the API takes.
    let (status, body) = d.raw(&post("/1.0/instances", "{not json"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = d.raw(&post(
        "/1.0/instances",
        r#"{"name":"x","config":{"kind":"container","image":"busybox","colour":"red"}}"#,
    ));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(200_000));
    let (status, _) = d.raw(&post("/1.0/instances", &big));
    assert_eq!(status, 413);
    let (status, _) = d.raw(b"GET /1.0/nowhere HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 404);
    let (status, _) =
        d.raw(b"PATCH /1.0/instances HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 405);
    let (status, body) = d.raw(
        b"DELETE /1.0/instances/web?force=maybe HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{body}");
    // A client that goes away mid-request changes nothing.
    {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        s.write_all(b"POST /1.0/instances HTTP/1.1\r\nHost: v\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"name\":\"half\"")
            .unwrap();
    }
    assert_eq!(d.instances().len(), 1);
    assert_eq!(d.instance("web")["status"], "running");

    // Concurrent changes to one instance are serialized: each either
    // succeeds or is refused for the state it found; none breaks it.
    let children: Vec<_> = (0..6)
        .map(|i| {
            let verb = if i % 2 == 0 { "restart" } else { "stop" };
            Command::new(VESSEL)
                .args([verb, "web"])
                .env("VESSEL_SOCKET", d.socket())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("is not running"),
            "{err}"
        );
    }
    let status = d.instance("web")["status"].clone();
    assert!(status == "running" || status == "stopped", "{status}");
    if status == "running" {
        assert_eq!(d.ok(&["exec", "web", "--", "echo", "fine"]).trim(), "fine");
    }
    d.ok(&["rm", "--force", "web"]);
    assert!(leftovers(&d.state(), "web").is_empty());
}

#[test]
fn a_socket_of_another_user_is_refused() {
    let Some(d) = Daemon::start() else { return };
    let socket = d.socket();
    let c = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: lchown on a NUL-terminated path.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), 4242, 4242) }, 0);
    d.fails(&["list"], "belongs to uid 4242");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), 0, 0) }, 0);
    d.ok(&["list"]);
}

#[test]
fn two_busy_containers_keep_to_their_cpu_quota() {
    let Some(d) = Daemon::start() else { return };
    let _t = testkit::timed();
    // The cpu controller's group of each instance (v1: cpu or cpu,cpuacct).
    let group = |name: &str| -> Option<PathBuf> {
        ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
            .iter()
            .map(|h| {
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join("vessel")
                    .join(name)
            })
            .find(|d| d.join("cpu.cfs_quota_us").exists())
    };
    for name in ["busy1", "busy2"] {
        d.ok(&["launch", name, "--cpus", "0.5"]);
        d.background(name, ":", "while :; do :; done");
    }
    let Some(groups) = ["busy1", "busy2"]
        .iter()
        .map(|n| group(n))
        .collect::<Option<Vec<_>>>()
    else {
        testkit::not_run(testkit::prereq::CGROUP, "no cgroup v1 cpu hierarchy here");
        return;
    };
    // The weight follows the quota: half a CPU, half the default shares.
    for dir in &groups {
        let shares = std::fs::read_to_string(dir.join("cpu.shares")).unwrap();
        assert_eq!(shares.trim(), "512", "{}", dir.display());
    }
    // CPU time of the group's processes, in clock ticks (100 per second).
    let usage = |name: &str| -> u64 {
        let dir = &groups[if name == "busy1" { 0 } else { 1 }];
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        procs
            .split_whitespace()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                let after = &stat[stat.rfind(')').unwrap() + 2..];
                let f: Vec<&str> = after.split_whitespace().collect();
                f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
            })
            .sum::<u64>()
            * 10_000_000
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = [usage("busy1"), usage("busy2")];
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let wall = started.elapsed().as_nanos() as f64;
    for (i, name) in ["busy1", "busy2"].iter().enumerate() {
        let share = (usage(name) - before[i]) as f64 / wall;
        println!("{name}: {share:.3} CPUs over 10 s");
        // The quota is 0.5 per period; allow a period's slack.
        assert!(share <= 0.55, "{name} used {share:.3} CPUs with --cpus 0.5");
        assert!(
            share >= 0.30,
            "{name} only got {share:.3} CPUs: was it busy?"
        );
    }
}

#[test]
fn events_and_operations_report_changes() {
    let Some(d) = Daemon::start() else { return };
    let mut events = UnixStream::connect(d.socket()).unwrap();
    events
        .write_all(b"GET /1.0/events HTTP/1.1\r\nHost: v\r\n\r\n")
        .unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (status, body) = d.raw(&post(
        "/1.0/instances",
        r#"{"name":"ev","config":{"kind":"container","image":"busybox"},"start":true}"#,
    ));
    assert_eq!(status, 202, "{body}");
    let op: api::Operation = serde_json::from_str(&body).unwrap();
    let wait = format!(
        "GET /1.0/operations/{}/wait?timeout=30 HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n",
        op.id
    );
    let (status, body) = d.raw(wait.as_bytes());
    assert_eq!(status, 200);
    let done: api::Operation = serde_json::from_str(&body).unwrap();
    assert_eq!(done.status, api::OperationStatus::Success, "{done:?}");
    // The stream saw the instance created (stopped), then running.
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(r#""instance":"ev","status":"running""#) {
        assert!(Instant::now() < deadline, "events: {seen}");
        let mut buf = [0u8; 4096];
        let n = events.read(&mut buf).unwrap();
        assert!(n > 0, "the event stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains(r#""instance":"ev","status":"stopped""#),
        "{seen}"
    );
    d.ok(&["rm", "--force", "ev"]);
}

#[test]
fn autostart_instances_start_again_after_a_host_reboot() {
    // The daemon in this process, with a boot id file the test changes
    // to stand for a reboot (the instances are stopped in between, as a
    // reboot would).
    let Some(mut d) = Daemon::start() else { return };
    d.ok(&["launch", "auto", "--autostart"]);
    d.ok(&["launch", "manual"]);
    d.kill();
    for name in ["auto", "manual"] {
        let layout = supervisor::Layout::new(d.state().join("instances").join(name));
        supervisor::Control::stop(&layout, 0, true).unwrap();
    }
    let boot_id = d.dir.path().join("boot_id");
    let run = |id: &str| {
        std::fs::write(&boot_id, id).unwrap();
        let config = daemon::Config {
            socket: d.socket(),
            state_dir: d.state(),
            supervisor_program: PathBuf::from(VESSEL),
            data_dir: d.dir.path().join("data"),
            overcommit: 1.0,
            boot_id_file: boot_id.clone(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.spawn(daemon::serve(config));
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(d.socket()).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        // The autostart's operation runs in the background: wait for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses: Vec<String> = ["auto", "manual"]
                .iter()
                .map(|n| d.instance(n)["status"].as_str().unwrap().to_owned())
                .collect();
            if statuses.iter().all(|s| s != "starting") || Instant::now() > deadline {
                server.abort();
                drop(rt);
                return statuses;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A boot id other than the one the database has: a reboot.
    assert_eq!(
        run("boot-a"),
        ["running", "stopped"],
        "autostart after a reboot"
    );
    let layout = supervisor::Layout::new(d.state().join("instances/auto"));
    supervisor::Control::stop(&layout, 0, true).unwrap();
    // The same boot again (a daemon restart): nothing starts.
    assert_eq!(
        run("boot-a"),
        ["stopped", "stopped"],
        "no reboot, no autostart"
    );
}

/// Acceptance 1 to 3 of the daemon's issue on one Debian image: a
/// container and a VM (on the software vCPU here) made from it, exec in
/// both, files that survive stop, start and a daemon SIGKILL (with the
/// instances running on, unrestarted), a graceful ACPI stop of the VM in
/// under 30 s and a forced one at once.
#[test]
#[ignore = "builds a Debian root with mmdebstrap from the network, boots it"]
fn a_container_and_a_vm_run_from_the_debian_image() {
    let Some(mut d) = Daemon::start() else { return };
    if !testkit::programs_present(&["mmdebstrap", "mkfs.ext4", "debugfs"]) {
        return;
    }
    if !matches!(guest::cached(&guest::default_data_dir()), Ok(Some(_))) {
        testkit::not_run(testkit::prereq::GUEST, "the default guest is not cached");
        return;
    }
    // The daemon's data directory gets the cached default guest.
    std::os::unix::fs::symlink(
        guest::default_data_dir().join("guest"),
        d.dir.path().join("data/guest"),
    )
    .unwrap();
    let _t = testkit::timed();
    d.ok(&["launch", "web", "--container", "--image", "debian/bookworm"]);
    d.ok(&[
        "launch",
        "vm1",
        "--vm",
        "--accel",
        "emu",
        "--image",
        "debian/bookworm",
        "--memory",
        "256M",
    ]);
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&d.ok(&["list", "--format", "json"])).unwrap();
    let status = |name: &str| {
        list.iter()
            .find(|i| i["name"] == name)
            .map(|i| i["status"].clone())
    };
    assert_eq!(status("web"), Some("running".into()), "{list:?}");
    assert_eq!(status("vm1"), Some("running".into()), "{list:?}");
    for name in ["web", "vm1"] {
        // The VM's first exec waits for its guest agent (the boot).
        let version = d.ok(&["exec", name, "--", "cat", "/etc/debian_version"]);
        assert!(version.starts_with("12."), "{name}: {version}");
        d.ok(&["exec", name, "--", "sh", "-c", "echo kept > /root/file"]);
    }
    // The console: the VM's serial getty answers a typed Enter; Ctrl-a q
    // detaches. A container's console attaches and detaches too.
    let out = d.console("vm1", b"\r", "login:");
    assert!(out.contains("vm1 login:"), "{out}");
    d.console("web", b"", "");
    d.fails(&["console", "ghost"], "no instance named");

    // The VM is a VM: its own kernel, its own hostname, systemd as PID 1.
    let uname = d.ok(&["exec", "vm1", "--", "uname", "-r"]);
    assert!(uname.trim().ends_with("-cloud-amd64"), "{uname}");
    assert_eq!(d.ok(&["exec", "vm1", "--", "hostname"]).trim(), "vm1");
    assert_eq!(
        d.ok(&["exec", "vm1", "--", "cat", "/proc/1/comm"]).trim(),
        "systemd"
    );
    let out = d.vessel(&["exec", "vm1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));

    // The daemon dies; the instances do not, and are adopted unrestarted.
    let pids: Vec<i64> = ["web", "vm1"]
        .iter()
        .map(|n| d.instance(n)["pid"].as_i64().unwrap())
        .collect();
    d.kill();
    d.spawn(&[]);
    for (name, pid) in ["web", "vm1"].iter().zip(&pids) {
        let info = d.instance(name);
        assert_eq!(info["status"], "running", "{info}");
        assert_eq!(info["pid"].as_i64(), Some(*pid), "{name} unrestarted");
        assert_eq!(
            d.ok(&["exec", name, "--", "cat", "/root/file"]).trim(),
            "kept"
        );
    }

    // A graceful stop: the ACPI power button, and systemd powers off.
    let started = Instant::now();
    d.ok(&["stop", "vm1"]);
    let took = started.elapsed();
    let log = d.ok(&["logs", "vm1"]);
    assert!(
        log.contains("reboot: Power down"),
        "the guest powered itself off (took {took:?}):\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(
        took < Duration::from_secs(30),
        "a graceful stop took {took:?}"
    );
    d.ok(&["restart", "web"]);
    d.ok(&["start", "vm1"]);
    for name in ["web", "vm1"] {
        assert_eq!(
            d.ok(&["exec", name, "--", "cat", "/root/file"]).trim(),
            "kept",
            "{name}'s file after stop and start"
        );
    }
    let started = Instant::now();
    d.ok(&["stop", "--force", "vm1"]);
    assert!(started.elapsed() < Duration::from_secs(5), "a forced stop");
    assert!(leftovers(&d.state(), "vm1").is_empty());

    d.fails(&["image", "rm", "debian/bookworm"], "is used by");
    d.ok(&["rm", "--force", "web"]);
    d.ok(&["rm", "--force", "vm1"]);
    d.ok(&["image", "rm", "debian/bookworm"]);
    let images: Vec<api::Image> =
        serde_json::from_str(&d.ok(&["image", "list", "--format", "json"])).unwrap();
    assert!(images
        .iter()
        .any(|i| i.name == "debian/bookworm" && !i.built));
}

/// The pid of the supervisor of instance directory `dir`.
fn supervisor_of(dir: &Path) -> Option<i32> {
    let wanted = format!("supervise\0{}\0", dir.display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&wanted)
            .then_some(pid)
    })
}

#[test]
fn a_supervisor_sent_sigterm_stops_its_instance_gracefully() {
    let Some(d) = Daemon::start() else { return };
    d.ok(&["launch", "polite"]);
    // A process that records the SIGTERM it gets (as a service would
    // shut down cleanly when the host does).
    d.background(
        "polite",
        "trap 'echo graceful > /root/marker; exit 0' TERM",
        "while :; do sleep 1; done",
    );
    let dir = d.state().join("instances/polite");
    let pid = supervisor_of(&dir).expect("the supervisor's pid");
    // SAFETY: kill takes no pointers.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.instance("polite")["status"] != "stopped" {
        assert!(Instant::now() < deadline, "the instance did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(leftovers(&d.state(), "polite").is_empty());
    d.ok(&["start", "polite"]);
    assert_eq!(
        d.ok(&["exec", "polite", "--", "cat", "/root/marker"])
            .trim(),
        "graceful"
    );
}
