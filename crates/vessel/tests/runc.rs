//! End-to-end tests of `vessel-runc` (the OCI runtime) and of the default seccomp filter.
//!
//! They need root, a static busybox (Debian's busybox-static) and, for the containerd
//! test, `containerd` and `ctr` (Debian's containerd package). Without them each test
//! prints `NOT RUN` with the reason (a failure under CI). Tests run one at a time (the
//! leftover checks look at the whole host).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const RUNC: &str = env!("CARGO_BIN_EXE_vessel-runc");
const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

struct Env {
    rootfs: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

fn env() -> Option<Env> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !testkit::is_root() {
        testkit::not_run(testkit::prereq::ROOT, "containers need root");
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
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runc-busybox-root");
    container::rootfs::build_busybox_root(&busybox, &rootfs).expect("building the test root");
    Some(Env {
        rootfs,
        _serial: serial,
    })
}

/// Mounts, vessel-runc state and test cgroups present on the host.
fn host_state(root: &Path) -> BTreeSet<String> {
    let mut state = BTreeSet::new();
    for line in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if line.contains("runc-busybox-root") || line.contains("vessel-runc-test") {
            state.insert(format!("mount {line}"));
        }
    }
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        state.insert(format!("state {}", entry.path().display()));
    }
    for entry in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = entry.path().join("vessel-runc-test");
        if dir.exists() {
            state.insert(format!("cgroup {}", dir.display()));
        }
    }
    state
}

/// A bundle whose config.json is runc's default spec, edited by the test, and the
/// runtime that runs it.
struct Bundle {
    dir: tempfile::TempDir,
    root: PathBuf,
    runtime: &'static str,
}

impl Bundle {
    fn new(env: &Env, args: &[&str]) -> Bundle {
        Bundle::for_runtime(env, args, RUNC)
    }

    fn for_runtime(env: &Env, args: &[&str], runtime: &'static str) -> Bundle {
        let dir = tempfile::Builder::new()
            .prefix("vessel-runc-test")
            .tempdir()
            .unwrap();
        let root = dir.path().join("state");
        let b = Bundle { dir, root, runtime };
        b.write_config(&default_config(&env.rootfs, args));
        b
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write_config(&self, config: &serde_json::Value) {
        fs::write(
            self.path().join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
    }

    fn runc(&self, args: &[&str]) -> Output {
        let log = self.path().join("log.json");
        let out_path = self.path().join("stdout");
        let err_path = self.path().join("stderr");
        let status = Command::new(self.runtime)
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            // Files, not pipes: a created container keeps its stdio open, and a pipe would
            // not reach EOF until the container exits (containerd passes FIFOs).
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap())
            .status()
            .unwrap();
        Output {
            status,
            stdout: fs::read(&out_path).unwrap(),
            stderr: fs::read(&err_path).unwrap(),
        }
    }

    fn log_errors(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.path().join("log.json"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON log line"))
            .filter(|v| v["level"] == "error")
            .collect()
    }

    fn state(&self, id: &str) -> serde_json::Value {
        let out = self.runc(&["state", id]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Bundle {
    /// `run --detach` of this bundle as container `id`.
    fn run_detached(&self, id: &str) -> Output {
        self.runc(&[
            "run",
            "--detach",
            "--bundle",
            self.path().to_str().unwrap(),
            id,
        ])
    }

    /// Writes `config`, and checks that create fails with one error that names
    /// `needle` and leaves the host as it was (`before`).
    fn assert_create_refused(
        &self,
        config: &serde_json::Value,
        needle: &str,
        before: &BTreeSet<String>,
        what: &str,
    ) {
        self.write_config(config);
        let out = self.runc(&[
            "create",
            "--bundle",
            self.path().to_str().unwrap(),
            "refused",
        ]);
        assert!(!out.status.success(), "{what}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{what}: {}",
            text(&out)
        );
        assert_eq!(&host_state(&self.root), before, "{what}: nothing left");
    }
}

impl Drop for Bundle {
    /// A test that failed half-way leaves no container behind for the next.
    fn drop(&mut self) {
        let out = self.runc(&["list", "--quiet"]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self.runc(&["delete", "--force", id]);
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// runc's `runc spec` defaults (the fields that matter), with `args` and a test cgroup.
fn default_config(rootfs: &Path, args: &[&str]) -> serde_json::Value {
    let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "runc-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 64}, "cpu": {"quota": 50000, "period": 100000}},
            "cgroupsPath": "/vessel-runc-test/c",
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_prints_and_exits_with_status() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["sh", "-c", "echo hi from $(hostname); exit 3"]);
    let before = host_state(&b.root);
    let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "r1"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from runc-test\n");
    assert_eq!(host_state(&b.root), before);
}

#[test]
fn lifecycle_create_start_state_exec_ps_kill_delete() {
    let Some(env) = env() else { return };
    let b = Bundle::new(
        &env,
        &["sh", "-c", "echo started > /tmp/x; exec sleep 1000"],
    );
    let before = host_state(&b.root);
    let bundle = b.path().to_str().unwrap().to_owned();
    let pid_file = b.path().join("init.pid");
    let out = b.runc(&[
        "create",
        "--bundle",
        &bundle,
        "--pid-file",
        pid_file.to_str().unwrap(),
        "c1",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let pid: i32 = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let state = b.state("c1");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], "c1");
    assert_eq!(state["bundle"], bundle.as_str());
    assert!(state["created"].as_str().unwrap().ends_with('Z'));

    let dup = b.runc(&["create", "--bundle", &bundle, "c1"]);
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("container with id c1 exists"),
        "{}",
        text(&dup)
    );
    assert_eq!(
        b.state("c1")["status"],
        "created",
        "a duplicate leaves the first alone"
    );

    let out = b.runc(&["start", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.state("c1")["status"], "running");

    let list = b.runc(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");
    assert_eq!(list[0]["status"], "running");

    // exec as the containerd shim does: --process FILE, detached, with a pid file.
    let process = serde_json::json!({
        "args": ["sh", "-c", "cat /tmp/x; hostname; echo $FOO"],
        "env": ["PATH=/bin:/usr/bin", "FOO=bar"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0}
    });
    let process_file = b.path().join("process.json");
    fs::write(&process_file, process.to_string()).unwrap();
    let out = b.runc(&["exec", "--process", process_file.to_str().unwrap(), "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "started\nrunc-test\nbar\n"
    );

    let ps = b.runc(&["ps", "--format", "json", "c1"]);
    let pids: Vec<i32> = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(pids, vec![pid], "{}", text(&ps));

    let refused = b.runc(&["delete", "c1"]);
    assert!(
        !refused.status.success(),
        "a running container is not deleted"
    );
    let out = b.runc(&["kill", "c1", "KILL"]);
    assert!(out.status.success(), "{}", text(&out));
    // The init is our grandchild, reparented to init(1) or a subreaper: not ours to reap.
    wait_until("the container to stop", || {
        b.state("c1")["status"] == "stopped"
    });
    let out = b.runc(&["delete", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    let gone = b.runc(&["state", "c1"]);
    assert!(!gone.status.success());
    assert!(b.log_errors().iter().any(|e| e["msg"]
        .as_str()
        .unwrap()
        .contains("container c1 does not exist")));
    assert_eq!(host_state(&b.root), before);
}

#[test]
fn kill_all_and_force_delete_of_created() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["sleep", "1000"]);
    let before = host_state(&b.root);
    let bundle = b.path().to_str().unwrap().to_owned();
    assert!(b
        .runc(&["create", "--bundle", &bundle, "k1"])
        .status
        .success());
    // A created container may be deleted (its init never ran the command).
    let out = b.runc(&["delete", "k1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(host_state(&b.root), before);

    assert!(b
        .runc(&["run", "--detach", "--bundle", &bundle, "k2"])
        .status
        .success());
    assert_eq!(b.state("k2")["status"], "running");
    let out = b.runc(&["kill", "--all", "k2", "9"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the container to stop", || {
        b.state("k2")["status"] == "stopped"
    });
    assert!(b.runc(&["delete", "--force", "k2"]).status.success());
    assert!(b
        .runc(&["delete", "--force", "never-existed"])
        .status
        .success());
    assert_eq!(host_state(&b.root), before);
}

#[test]
fn bad_bundles_fail_cleanly() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    let bundle = b.path().to_str().unwrap().to_owned();
    let mut cases: Vec<(&str, serde_json::Value, &str)> = Vec::new();
    let mut unknown_ns = default_config(&env.rootfs, &["true"]);
    unknown_ns["linux"]["namespaces"][0]["type"] = "bogus".into();
    cases.push(("unknown namespace", unknown_ns, "bogus"));
    let mut missing_root = default_config(&env.rootfs, &["true"]);
    missing_root["root"]["path"] = "/nonexistent/root".into();
    cases.push(("missing root", missing_root, "/nonexistent/root"));
    let mut no_cmd = default_config(&env.rootfs, &["/no/such/command"]);
    no_cmd["process"]["args"] = serde_json::json!(["/no/such/command"]);
    cases.push(("missing command", no_cmd, "/no/such/command"));
    for (what, config, needle) in cases {
        b.write_config(&config);
        let _ = fs::remove_file(b.path().join("log.json"));
        let out = b.runc(&["create", "--bundle", &bundle, "bad"]);
        assert!(!out.status.success(), "{what}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        let errors = b.log_errors();
        assert_eq!(errors.len(), 1, "{what}");
        assert!(
            errors[0]["msg"].as_str().unwrap().contains(needle),
            "{what}"
        );
        assert!(errors[0]["time"].is_string());
        assert_eq!(host_state(&b.root), before, "{what}: nothing left");
    }
    fs::write(b.path().join("config.json"), "{ not json").unwrap();
    let out = b.runc(&["create", "--bundle", &bundle, "bad"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid OCI config"));
    assert!(b.runc(&["--systemd-cgroup", "list"]).status.code() == Some(1));
    assert_eq!(host_state(&b.root), before);
}

#[test]
fn oci_seccomp_profile_is_honoured() {
    let Some(env) = env() else { return };
    let b = Bundle::new(
        &env,
        &[
            "sh",
            "-c",
            "mkdir /tmp/d && echo made; hostname x || echo denied",
        ],
    );
    let mut config = default_config(
        &env.rootfs,
        &[
            "sh",
            "-c",
            "mkdir /tmp/d && echo made; hostname x || echo denied",
        ],
    );
    config["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    // CAP_SYS_ADMIN, so that only seccomp stands between the command and sethostname.
    config["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_SYS_ADMIN"]);
    config["process"]["capabilities"]["effective"] = serde_json::json!(["CAP_SYS_ADMIN"]);
    config["process"]["capabilities"]["permitted"] = serde_json::json!(["CAP_SYS_ADMIN"]);
    b.write_config(&config);
    let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "s1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "made\ndenied\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
}

#[test]
fn default_seccomp_filter_in_vessel_run_container() {
    let Some(env) = env() else { return };
    // Without CAP_SYS_ADMIN mount and unshare -m fail anyway; a user namespace needs no
    // privilege at all, so `unshare -U` shows the filter itself at work.
    let script = "unshare -m true; unshare -U true; mount -t tmpfs none /mnt; \
                  swapoff /bin/busybox; echo ok; ls / >/dev/null && echo ls-ok; \
                  sh -c 'exit 0' && echo fork-ok; grep Seccomp_filters /proc/self/status";
    let out = Command::new(VESSEL)
        .args(["run", "--container", "--rootfs"])
        .arg(&env.rootfs)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "unshare(0x20000): Operation not permitted",
        "unshare(0x10000000): Operation not permitted",
        "mount: permission denied",
        "swapoff: /bin/busybox: Operation not permitted",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\nls-ok\nfork-ok\nSeccomp_filters:\t2\n"
    );
}

/// containerd on private paths, stopped (and its leftovers checked) when dropped.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn ctr_run_with_vessel_runc() {
    let Some(env) = env() else { return };
    if !have("containerd") || !have("ctr") {
        testkit::not_run(
            testkit::prereq::PROGRAM,
            "containerd and ctr are not installed (apt-get install containerd)",
        );
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("vessel-runc-test-ctrd")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("containerd.sock");
    let config = format!(
        "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = {sock:?}\n",
        root = dir.path().join("root"),
        state = dir.path().join("state"),
    );
    fs::write(dir.path().join("config.toml"), config).unwrap();
    let log = fs::File::create(dir.path().join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--address")
        .arg(&sock)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let ctrd = Containerd { child, dir };
    wait_until("containerd's socket", || ctrd.socket().exists());
    let id = format!("vessel-runc-test-{}", std::process::id());
    let out = Command::new("ctr")
        .arg("--address")
        .arg(ctrd.socket())
        .args(["run", "--rm", "--runc-binary", RUNC, "--rootfs"])
        .arg(&env.rootfs)
        .args([id.as_str(), "/bin/sh", "-c", "echo ok"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    // A detached task paused, resumed and measured through containerd's shim.
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(ctrd.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let task = format!("{id}-task");
    let rootfs = env.rootfs.to_str().unwrap();
    ctr(&[
        "run",
        "-d",
        "--runc-binary",
        RUNC,
        "--rootfs",
        rootfs,
        &task,
        "sleep",
        "1000",
    ]);
    let status = |ctr_out: String| {
        ctr_out
            .lines()
            .find(|l| l.starts_with(task.as_str()))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
    };
    ctr(&["task", "pause", &task]);
    assert_eq!(status(ctr(&["task", "ls"])).as_deref(), Some("PAUSED"));
    ctr(&["task", "resume", &task]);
    assert_eq!(status(ctr(&["task", "ls"])).as_deref(), Some("RUNNING"));
    let metrics = ctr(&["task", "metrics", "--format", "json", &task]);
    let metrics: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert_eq!(
        metrics["pids"]["current"], 1,
        "the task's cgroups: {metrics}"
    );
    assert!(
        metrics["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    ctr(&["task", "kill", "-s", "SIGKILL", &task]);
    wait_until("the task to stop", || {
        status(ctr(&["task", "ls"])).as_deref() == Some("STOPPED")
    });
    ctr(&["task", "rm", &task]);
    ctr(&["container", "rm", &task]);
    drop(ctrd);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("vessel-runc-test"), "nothing left mounted");
    assert!(
        !Path::new("/run/containerd/runc/default").join(&id).exists(),
        "no state left"
    );
    for entry in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        assert!(
            !entry.path().join("default").join(&id).exists(),
            "no cgroup left"
        );
    }
}

// The OCI features below run under vessel-runc and, as the reference, under runc where
// it is installed: each check holds for both, or the test says where vessel-runc
// deliberately differs.

/// vessel-runc, then runc where it is installed (Debian's runc package).
fn runtimes() -> Vec<&'static str> {
    let mut list = vec![RUNC];
    if have("runc") {
        list.push("runc");
    } else {
        testkit::not_run(
            testkit::prereq::PROGRAM,
            "runc is not installed (apt-get install runc): the reference half is not run",
        );
    }
    list
}

/// What a test saw under each of [`runtimes`]: the same under runc as under
/// vessel-runc (where runc ran).
fn same_as_runc<T: PartialEq + std::fmt::Debug>(seen: &[T]) {
    if let [vessel, runc] = seen {
        assert_eq!(vessel, runc, "vessel-runc against runc");
    }
}

/// The runtime's name for messages.
fn name(runtime: &str) -> &str {
    if runtime == RUNC {
        "vessel-runc"
    } else {
        runtime
    }
}

/// The whole disk holding `/` as major:minor (a throttle needs a whole disk).
fn root_disk() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata("/").ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let disk = if sys.join("partition").exists() {
        sys.join("..")
    } else {
        sys
    };
    let text = fs::read_to_string(disk.join("dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The group of `pid` in each hierarchy, from the host's view: (controllers, path).
fn groups_of(pid: i32) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _ = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

#[test]
fn cgroup_resources_are_written_as_runc_writes_them() {
    let Some(env) = env() else { return };
    let bps = root_disk().map(
        |(major, minor)| serde_json::json!([{"major": major, "minor": minor, "rate": 1048576}]),
    );
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sleep", "1000"], runtime);
        let before = host_state(&b.root);
        let mut config = default_config(&env.rootfs, &["sleep", "1000"]);
        config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
        config["linux"]["resources"] = serde_json::json!({
            "cpu": {"cpus": "0", "mems": "0", "shares": 512},
            "memory": {"limit": 67108864, "reservation": 33554432, "swap": 134217728,
                       "swappiness": 10, "disableOOMKiller": true},
            "pids": {"limit": 50},
            "blockIO": {"weight": 300, "throttleReadBpsDevice": bps.clone().unwrap_or_default()}
        });
        b.write_config(&config);
        let out = b.runc(&["create", "--bundle", b.path().to_str().unwrap(), "res"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let pid = b.state("res")["pid"].as_i64().unwrap() as i32;
        let read = |hierarchy: &str, file: &str| {
            let path = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join("vessel-runc-test")
                .join(file);
            fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{who}: {}: {e}", path.display()))
                .trim()
                .to_owned()
        };
        let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        if v1 {
            assert_eq!(read("cpuset", "cpuset.cpus"), "0", "{who}");
            assert_eq!(read("cpuset", "cpuset.mems"), "0", "{who}");
            assert_eq!(read("cpu", "cpu.shares"), "512", "{who}");
            assert_eq!(read("memory", "memory.limit_in_bytes"), "67108864", "{who}");
            assert_eq!(
                read("memory", "memory.soft_limit_in_bytes"),
                "33554432",
                "{who}"
            );
            if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
                assert_eq!(
                    read("memory", "memory.memsw.limit_in_bytes"),
                    "134217728",
                    "{who}"
                );
            }
            assert_eq!(read("memory", "memory.swappiness"), "10", "{who}");
            assert!(
                read("memory", "memory.oom_control").contains("oom_kill_disable 1"),
                "{who}"
            );
            assert_eq!(read("pids", "pids.max"), "50", "{who}");
            let weight = ["blkio.bfq.weight", "blkio.weight"]
                .iter()
                .map(|f| Path::new("/sys/fs/cgroup/blkio/vessel-runc-test").join(f))
                .find(|p| p.exists())
                .map(|p| fs::read_to_string(p).unwrap());
            if let Some(weight) = weight {
                // BFQ's file lists the default weight first.
                assert!(
                    weight
                        .lines()
                        .any(|l| l.split_whitespace().last() == Some("300")),
                    "{who}: {weight}"
                );
            }
            if let Some((major, minor)) = root_disk() {
                assert_eq!(
                    read("blkio", "blkio.throttle.read_bps_device"),
                    format!("{major}:{minor} 1048576"),
                    "{who}"
                );
            }
        } else {
            testkit::not_run(
                testkit::prereq::CGROUP,
                "the host has no cgroup v1 memory hierarchy: the v1 files are not checked",
            );
        }
        // The init joined a group at the path in every hierarchy the host has.
        for (controllers, path) in groups_of(pid) {
            assert_eq!(path, "/vessel-runc-test", "{who}: {controllers}");
        }
        // Seen from inside: the CPUs the container may use.
        let out = b.runc(&[
            "exec",
            "res",
            "grep",
            "Cpus_allowed_list",
            "/proc/self/status",
        ]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .last(),
            Some("0"),
            "{who}"
        );
        let out = b.runc(&["delete", "--force", "res"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        assert_eq!(host_state(&b.root), before, "{who}: nothing left");
    }
}

#[test]
fn a_relative_cgroups_path_is_below_the_runtimes_own_group() {
    let Some(env) = env() else { return };
    let own = groups_of(std::process::id() as i32);
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sleep", "1000"], runtime);
        let mut config = default_config(&env.rootfs, &["sleep", "1000"]);
        config["linux"]["cgroupsPath"] = "vessel-runc-test-rel".into();
        b.write_config(&config);
        let out = b.runc(&["create", "--bundle", b.path().to_str().unwrap(), "rel"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let pid = b.state("rel")["pid"].as_i64().unwrap() as i32;
        let theirs = groups_of(pid);
        for (controllers, path) in &theirs {
            let base = &own.iter().find(|(c, _)| c == controllers).unwrap().1;
            assert_eq!(
                Path::new(path),
                Path::new(base).join("vessel-runc-test-rel"),
                "{who}: {controllers}"
            );
        }
        let out = b.runc(&["delete", "--force", "rel"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for (controllers, path) in theirs {
            let Some(mount) = mounts.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mountpoint = left.split(' ').nth(4)?;
                let opts = right.split(' ').nth(2)?;
                let matches = if controllers.is_empty() {
                    right.starts_with("cgroup2 ")
                } else {
                    right.starts_with("cgroup ")
                        && controllers
                            .split(',')
                            .all(|c| opts.split(',').any(|o| o == c))
                };
                matches.then(|| mountpoint.to_owned())
            }) else {
                continue;
            };
            let dir = Path::new(&mount).join(path.trim_start_matches('/'));
            assert!(!dir.exists(), "{who}: {} is left", dir.display());
        }
    }
}

/// Checks that vessel-runc left nothing on the host. runc 1.1 leaves the parents of its
/// groups, and the groups of a create that failed: their empty test groups are removed.
fn nothing_left(runtime: &str, root: &Path, before: &BTreeSet<String>, what: &str) {
    if runtime == RUNC {
        assert_eq!(&host_state(root), before, "{what}: nothing left");
        return;
    }
    for entry in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_dir(entry.path().join("vessel-runc-test"));
    }
}

#[test]
fn settings_for_controllers_the_host_lacks_fail_as_under_runc() {
    let Some(env) = env() else { return };
    let cases = [
        (
            "net_cls",
            serde_json::json!({"network": {"classID": 1048577}}),
        ),
        (
            "hugetlb",
            serde_json::json!({"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]}),
        ),
    ];
    for (controller, resources) in cases {
        if Path::new("/sys/fs/cgroup").join(controller).exists() {
            eprintln!("the host has {controller}: its failure case is not run");
            continue;
        }
        for runtime in runtimes() {
            let who = name(runtime);
            let b = Bundle::for_runtime(&env, &["true"], runtime);
            let before = host_state(&b.root);
            let mut config = default_config(&env.rootfs, &["true"]);
            config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
            config["linux"]["resources"] = resources.clone();
            b.write_config(&config);
            let out = b.runc(&["create", "--bundle", b.path().to_str().unwrap(), "lack"]);
            assert!(!out.status.success(), "{who}: {}", text(&out));
            let errors = b.log_errors();
            assert!(
                errors
                    .iter()
                    .any(|e| e["msg"].as_str().unwrap_or("").contains(controller)),
                "{who}: {errors:?}"
            );
            let _ = b.runc(&["delete", "--force", "lack"]);
            nothing_left(runtime, &b.root, &before, who);
        }
    }
}

#[test]
fn bad_resource_values_are_refused() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    for (resources, needle) in [
        (
            serde_json::json!({"cpu": {"cpus": "0\n1"}}),
            "linux.resources.cpu.cpus",
        ),
        (
            serde_json::json!({"hugepageLimits": [{"pageSize": "../../x", "limit": 1}]}),
            "hugepageLimits",
        ),
        (
            serde_json::json!({"network": {"priorities": [{"name": "lo 1\neth0", "priority": 2}]}}),
            "network.priorities",
        ),
        (
            serde_json::json!({"memory": {"swappiness": 200}}),
            "swappiness",
        ),
    ] {
        let mut config = default_config(&env.rootfs, &["true"]);
        config["linux"]["resources"] = resources;
        b.assert_create_refused(&config, needle, &before, needle);
    }
}

#[test]
fn an_unknown_capability_is_an_error() {
    // runc 1.1 ignores it with a warning; the runtime spec says a value that cannot be
    // mapped to the kernel MUST be an error, and vessel-runc follows the spec.
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let mut config = default_config(&env.rootfs, &["true"]);
    config["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_KILL", "CAP_NOPE"]);
    b.write_config(&config);
    let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "cap"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_NOPE"),
        "{}",
        text(&out)
    );
}

/// A hook that appends its name to `dir/order` and keeps its stdin and its mount
/// namespace in `dir/NAME.json` and `dir/NAME.mnt`, then runs `then`.
fn recording_hook(dir: &Path, name: &str, then: &str) -> serde_json::Value {
    let d = dir.display();
    serde_json::json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!(
            "cat > {d}/{name}.json; readlink /proc/self/ns/mnt > {d}/{name}.mnt; \
             echo {name} >> {d}/order; {then}"
        )]
    })
}

/// A bundle whose config has `hooks` and the directory they record into, mounted at
/// the same path in the container (for the hooks that run there).
fn hooked_bundle(
    env: &Env,
    runtime: &'static str,
    args: &[&str],
) -> (Bundle, PathBuf, serde_json::Value) {
    let b = Bundle::for_runtime(env, args, runtime);
    let dir = b.path().join("hooks");
    fs::create_dir(&dir).unwrap();
    let mut config = default_config(&env.rootfs, args);
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": dir, "type": "bind", "source": dir, "options": ["rbind", "rw"]}));
    (b, dir, config)
}

fn order(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("order"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn hooks_run_in_order_with_the_state_where_the_spec_says() {
    let Some(env) = env() else { return };
    let host_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    for runtime in runtimes() {
        let who = name(runtime);
        let (b, dir, mut config) = hooked_bundle(&env, runtime, &["sleep", "1000"]);
        let before = host_state(&b.root);
        let mut hooks = serde_json::Map::new();
        for kind in [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ] {
            hooks.insert(
                kind.into(),
                serde_json::json!([recording_hook(&dir, kind, "")]),
            );
        }
        // env replaces the runtime's; args[0] is the hook's argv[0].
        hooks["poststart"].as_array_mut().unwrap().push(serde_json::json!({
            "path": "/bin/sh",
            "args": ["hook-argv0", "-c", format!("echo \"$0 $HOOKVAR ${{HOME:-none}}\" > {}/env", dir.display())],
            "env": ["HOOKVAR=set"],
            "timeout": 10
        }));
        config["hooks"] = serde_json::Value::Object(hooks);
        config["annotations"] = serde_json::json!({"org.example.key": "value"});
        b.write_config(&config);
        let bundle = b.path().to_str().unwrap().to_owned();
        let out = b.runc(&["create", "--bundle", &bundle, "hk"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        // runc 1.1 runs the poststart hooks at create already (fixed in runc 1.2), and
        // gives the hooks in the container the init's pid there (1): vessel-runc runs
        // them after start and gives the host's pid, as the spec says.
        let vessel = runtime == RUNC;
        if vessel {
            assert_eq!(
                order(&dir),
                ["prestart", "createRuntime", "createContainer"],
                "{who}"
            );
        }
        let pid = b.state("hk")["pid"].as_i64().unwrap();
        let container_mnt = fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        let out = b.runc(&["start", "hk"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let out = b.runc(&["delete", "--force", "hk"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let mut all = vec![
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ];
        if !vessel {
            all.swap(3, 4);
        }
        assert_eq!(order(&dir), all, "{who}");
        let read = |name: &str| -> serde_json::Value {
            let text = fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{who}: {name}: {e}: {text}"))
        };
        for (kind, status) in [
            ("prestart", "creating"),
            ("createRuntime", "creating"),
            ("createContainer", "creating"),
            ("startContainer", "created"),
            ("poststart", "running"),
            ("poststop", "stopped"),
        ] {
            let state = read(kind);
            assert_eq!(state["id"], "hk", "{who}: {kind}");
            if vessel || kind != "poststart" {
                assert_eq!(state["status"], status, "{who}: {kind}");
            }
            assert_eq!(state["bundle"], bundle.as_str(), "{who}: {kind}");
            assert_eq!(
                state["annotations"]["org.example.key"], "value",
                "{who}: {kind}"
            );
            let in_container = kind == "createContainer" || kind == "startContainer";
            if kind != "poststop" && (vessel || !in_container) {
                assert_eq!(state["pid"], pid, "{who}: {kind}");
            }
            let mnt = fs::read_to_string(dir.join(format!("{kind}.mnt"))).unwrap();
            let expected = if kind == "createContainer" || kind == "startContainer" {
                &container_mnt
            } else {
                &host_mnt
            };
            assert_eq!(
                Path::new(mnt.trim()),
                expected,
                "{who}: {kind}'s mount namespace"
            );
        }
        assert_eq!(
            fs::read_to_string(dir.join("env")).unwrap(),
            "hook-argv0 set none\n",
            "{who}"
        );
        assert_eq!(host_state(&b.root), before, "{who}: nothing left");
    }
}

#[test]
fn a_failing_or_late_create_hook_fails_the_create_and_leaves_nothing() {
    let Some(env) = env() else { return };
    for runtime in runtimes() {
        let who = name(runtime);
        for (case, hook, needle) in [
            ("failing", "exit 3", "exit status"),
            ("late", "exec sleep 30", "time"),
        ] {
            let (b, dir, mut config) = hooked_bundle(&env, runtime, &["true"]);
            let before = host_state(&b.root);
            let mut failing = recording_hook(&dir, "createRuntime", hook);
            failing["timeout"] = 1.into();
            config["hooks"] = serde_json::json!({
                "createRuntime": [failing],
                "startContainer": [recording_hook(&dir, "startContainer", "")],
                "poststop": [recording_hook(&dir, "poststop", "")]
            });
            b.write_config(&config);
            let started = Instant::now();
            let out = b.runc(&["create", "--bundle", b.path().to_str().unwrap(), "hf"]);
            assert!(!out.status.success(), "{who}: {case}: {}", text(&out));
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{who}: {case}: the timeout ended it"
            );
            let said = format!(
                "{}{:?}",
                String::from_utf8_lossy(&out.stderr),
                b.log_errors()
            );
            assert!(said.contains(needle), "{who}: {case}: {said}");
            assert_eq!(order(&dir)[0], "createRuntime", "{who}: {case}");
            assert!(
                !order(&dir).contains(&"startContainer".to_owned()),
                "{who}: {case}"
            );
            nothing_left(runtime, &b.root, &before, &format!("{who}: {case}"));
        }
    }
}

#[test]
fn a_failing_poststart_hook_is_a_warning() {
    // The spec: "If any poststart hook fails, the runtime MUST log a warning, but the
    // remaining hooks and lifecycle continue as if the hook had succeeded." runc 1.1
    // fails the start instead; vessel-runc follows the spec.
    let Some(env) = env() else { return };
    let (b, dir, mut config) = hooked_bundle(&env, RUNC, &["sleep", "1000"]);
    config["hooks"] = serde_json::json!({
        "poststart": [recording_hook(&dir, "poststart", "exit 1"), recording_hook(&dir, "poststart2", "")]
    });
    b.write_config(&config);
    let out = b.run_detached("pw");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: poststart hook"),
        "{}",
        text(&out)
    );
    assert_eq!(order(&dir), ["poststart", "poststart2"]);
    assert_eq!(b.state("pw")["status"], "running");
}

#[test]
fn edits_of_config_json_after_create_do_not_change_the_container() {
    let Some(env) = env() else { return };
    for runtime in runtimes() {
        let who = name(runtime);
        let (b, dir, mut config) = hooked_bundle(&env, runtime, &["sleep", "1000"]);
        b.write_config(&config);
        let bundle = b.path().to_str().unwrap().to_owned();
        let out = b.runc(&["create", "--bundle", &bundle, "snap"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        config["process"]["args"] = serde_json::json!(["sleep", "2000"]);
        config["hooks"] =
            serde_json::json!({"startContainer": [recording_hook(&dir, "startContainer", "")]});
        b.write_config(&config);
        let out = b.runc(&["start", "snap"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let pid = b.state("snap")["pid"].as_i64().unwrap();
        wait_until("the command to run", || {
            fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default() == b"sleep\x001000\x00"
        });
        assert!(
            order(&dir).is_empty(),
            "{who}: a hook added after create ran"
        );
        let out = b.runc(&["delete", "--force", "snap"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
    }
}

#[test]
fn bad_hooks_are_refused_before_anything_runs() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    for (hook, needle) in [
        (
            serde_json::json!({"path": "relative/hook"}),
            "must be absolute",
        ),
        (
            serde_json::json!({"path": "/bin/true", "timeout": 0}),
            "greater than zero",
        ),
        (
            serde_json::json!({"path": "/bin/true", "env": ["NOEQUALS"]}),
            "KEY=VALUE",
        ),
    ] {
        let mut config = default_config(&env.rootfs, &["true"]);
        config["hooks"] = serde_json::json!({"prestart": [hook]});
        b.assert_create_refused(&config, needle, &before, needle);
    }
}

#[test]
fn linux_devices_are_made_and_device_rules_applied() {
    let Some(env) = env() else { return };
    let script = "ls -ln /dev/vt-null /dev/sub/vt-loopctl /dev/vt-fifo; \
                  (: < /dev/sub/vt-loopctl) 2>&1 && echo opened; \
                  (: < /dev/vt-denied) 2>&1; true";
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sh", "-c", script], runtime);
        let before = host_state(&b.root);
        let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
        config["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/vt-null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640, "uid": 1000, "gid": 1001},
            {"path": "/dev/sub/vt-loopctl", "type": "c", "major": 10, "minor": 237},
            {"path": "/dev/vt-denied", "type": "c", "major": 10, "minor": 236},
            {"path": "/dev/vt-fifo", "type": "p"}
        ]);
        // Everything denied but reading loop-control (10:237).
        config["linux"]["resources"]["devices"] = serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 237, "access": "r"}
        ]);
        b.write_config(&config);
        let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "dev"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Vec<&str>> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let node = |name: &str| {
            lines
                .iter()
                .find(|l| l.last() == Some(&name))
                .unwrap_or_else(|| panic!("{who}: no {name} in {stdout}"))
                .clone()
        };
        // ls -ln: mode, links, uid, gid, major, minor, ...
        let null = node("/dev/vt-null");
        assert_eq!(
            &null[..6],
            ["crw-r-----", "1", "1000", "1001", "1,", "3"],
            "{who}"
        );
        let loopctl = node("/dev/sub/vt-loopctl");
        assert_eq!(
            &loopctl[..6],
            ["crw-rw-rw-", "1", "0", "0", "10,", "237"],
            "{who}"
        );
        assert!(node("/dev/vt-fifo")[0].starts_with('p'), "{who}");
        assert!(
            stdout.contains("opened"),
            "{who}: the allowed device opens: {stdout}"
        );
        assert!(
            stdout.contains("/dev/vt-denied: Operation not permitted"),
            "{who}: {stdout}"
        );
        assert_eq!(host_state(&b.root), before, "{who}: nothing left");
    }
}

#[test]
fn a_device_path_that_holds_another_file_or_leaves_the_root_is_refused() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    for (device, needle) in [
        (
            serde_json::json!({"path": "/dev/../../etc/x", "type": "c", "major": 1, "minor": 3}),
            "without '..'",
        ),
        (
            serde_json::json!({"path": "/dev/null", "type": "c", "major": 1, "minor": 5}),
            "/dev/null",
        ),
        (
            serde_json::json!({"path": "/dev/big", "type": "c", "major": 1, "minor": 5, "fileMode": 0o100644}),
            "fileMode",
        ),
    ] {
        let mut config = default_config(&env.rootfs, &["true"]);
        config["linux"]["devices"] = serde_json::json!([device]);
        b.assert_create_refused(&config, needle, &before, needle);
    }
}

/// Runs a host command that must succeed.
fn host(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", text(&out));
}

/// A network namespace with a veth pair, and a persistent mount namespace in which a
/// tmpfs with a marker file covers `<rootfs>/home`: namespaces for a container to join.
/// Removed when dropped.
struct HostNamespaces {
    netns: String,
    mntdir: tempfile::TempDir,
}

impl HostNamespaces {
    fn new(rootfs: &Path) -> HostNamespaces {
        let mntdir = tempfile::Builder::new()
            .prefix("vessel-runc-test-mntns")
            .tempdir()
            .unwrap();
        let ns = HostNamespaces {
            netns: format!("vessel-runc-test-{}", std::process::id()),
            mntdir,
        };
        host("ip", &["netns", "add", &ns.netns]);
        host(
            "ip",
            &[
                "-n", &ns.netns, "link", "add", "vt-veth0", "type", "veth", "peer", "name",
                "vt-veth1",
            ],
        );
        let dir = ns.mntdir.path().to_str().unwrap();
        // unshare keeps a namespace by binding it onto a file of a private mount.
        host("mount", &["-t", "tmpfs", "tmpfs", dir]);
        host("mount", &["--make-private", dir]);
        fs::write(ns.mnt(), "").unwrap();
        let home = rootfs.join("home");
        let script = format!(
            "mount -t tmpfs tmpfs {0} && touch {0}/marker",
            home.display()
        );
        host(
            "unshare",
            &[
                &format!("--mount={}", ns.mnt().display()),
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
        );
        ns
    }

    fn mnt(&self) -> PathBuf {
        self.mntdir.path().join("mnt")
    }
}

impl Drop for HostNamespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("umount").arg(self.mnt()).status();
        let _ = Command::new("umount").arg(self.mntdir.path()).status();
    }
}

#[test]
fn namespaces_given_by_path_are_joined() {
    let Some(env) = env() else { return };
    if !testkit::programs_present(&["ip", "unshare", "mount", "umount"]) {
        return;
    }
    let script =
        "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; grep -c vt-veth0 /proc/net/dev; ls /home";
    for runtime in runtimes() {
        let who = name(runtime);
        // A container whose PID and UTS namespaces the next one joins.
        let a = Bundle::for_runtime(&env, &["sleep", "1000"], runtime);
        let before = host_state(&a.root);
        let ns = HostNamespaces::new(&env.rootfs);
        let out = a.run_detached("nsa");
        assert!(out.status.success(), "{who}: {}", text(&out));
        let pid_a = a.state("nsa")["pid"].as_i64().unwrap();

        let b = Bundle::for_runtime(&env, &["sh", "-c", script], runtime);
        let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
        config["linux"]["cgroupsPath"] = "/vessel-runc-test/b".into();
        config.as_object_mut().unwrap().remove("hostname");
        config["linux"]["namespaces"] = serde_json::json!([
            {"type": "pid", "path": format!("/proc/{pid_a}/ns/pid")},
            {"type": "uts", "path": format!("/proc/{pid_a}/ns/uts")},
            {"type": "network", "path": format!("/run/netns/{}", ns.netns)},
            {"type": "mount", "path": ns.mnt()},
            {"type": "ipc"},
            {"type": "cgroup"}
        ]);
        b.write_config(&config);
        let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "nsb"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "sleep 1000 \nrunc-test\n1\nmarker\n",
            "{who}: A's processes and hostname, the named network, the mount namespace's marker"
        );
        drop(b);
        let out = a.runc(&["delete", "--force", "nsa"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        drop(ns);
        nothing_left(runtime, &a.root, &before, who);
    }
}

#[test]
fn pause_resume_update_and_events() {
    let Some(env) = env() else { return };
    let v1 = Path::new("/sys/fs/cgroup/freezer").exists();
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sleep", "1000"], runtime);
        let before = host_state(&b.root);
        let mut config = default_config(&env.rootfs, &["sleep", "1000"]);
        config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
        b.write_config(&config);
        let ok = |args: &[&str]| {
            let out = b.runc(args);
            assert!(out.status.success(), "{who}: {args:?}: {}", text(&out));
            out
        };
        ok(&[
            "run",
            "--detach",
            "--bundle",
            b.path().to_str().unwrap(),
            "pr",
        ]);
        let group = |hierarchy: &str, file: &str| {
            fs::read_to_string(
                Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join("vessel-runc-test")
                    .join(file),
            )
            .unwrap_or_default()
            .trim()
            .to_owned()
        };
        ok(&["pause", "pr"]);
        assert_eq!(b.state("pr")["status"], "paused", "{who}");
        if v1 {
            assert_eq!(group("freezer", "freezer.state"), "FROZEN", "{who}");
        }
        let refused = b.runc(&["exec", "pr", "true"]);
        assert!(
            !refused.status.success(),
            "{who}: exec into a paused container"
        );
        ok(&["resume", "pr"]);
        assert_eq!(b.state("pr")["status"], "running", "{who}");
        if v1 {
            assert_eq!(group("freezer", "freezer.state"), "THAWED", "{who}");
        }

        ok(&["update", "--memory", "128m", "--pids-limit", "80", "pr"]);
        let resources = b.path().join("resources.json");
        fs::write(&resources, r#"{"cpu": {"shares": 256}}"#).unwrap();
        ok(&["update", "--resources", resources.to_str().unwrap(), "pr"]);
        if v1 {
            assert_eq!(
                group("memory", "memory.limit_in_bytes"),
                "134217728",
                "{who}"
            );
            assert_eq!(group("pids", "pids.max"), "80", "{who}");
            assert_eq!(group("cpu", "cpu.shares"), "256", "{who}");
        }

        let out = ok(&["events", "--stats", "pr"]);
        let event: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{who}: {e}: {}", text(&out)));
        assert_eq!(event["type"], "stats", "{who}");
        assert_eq!(event["id"], "pr", "{who}");
        assert!(
            event["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
            "{who}: {event}"
        );
        assert_eq!(
            event["data"]["memory"]["usage"]["limit"], 134217728,
            "{who}"
        );
        assert!(
            event["data"]["pids"]["current"].as_u64().unwrap() >= 1,
            "{who}: {event}"
        );
        assert_eq!(event["data"]["pids"]["limit"], 80, "{who}");

        ok(&["pause", "pr"]);
        // A paused container is deleted by force: its processes die once thawed.
        ok(&["delete", "--force", "pr"]);
        nothing_left(runtime, &b.root, &before, who);
    }
}

#[test]
fn features_says_what_is_implemented() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let out = b.runc(&["features"]);
    assert!(out.status.success(), "{}", text(&out));
    let features: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(features["hooks"].as_array().unwrap().len(), 6);
    for ns in ["pid", "user", "mount", "network"] {
        assert!(
            features["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .contains(&ns.into()),
            "{ns}"
        );
    }
    assert!(features["linux"]["capabilities"]
        .as_array()
        .unwrap()
        .contains(&"CAP_SYS_ADMIN".into()));
    assert_eq!(features["linux"]["seccomp"]["enabled"], true);
    if have("runc") {
        // The same document's shape as runc's.
        let theirs = Command::new("runc").arg("features").output().unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
        for key in [
            "ociVersionMin",
            "ociVersionMax",
            "hooks",
            "mountOptions",
            "linux",
        ] {
            assert!(
                theirs.get(key).is_some() && features.get(key).is_some(),
                "{key}"
            );
        }
    }
}

#[test]
fn the_cgroup_mount_shows_the_containers_own_groups() {
    let Some(env) = env() else { return };
    let script = "ls /sys/fs/cgroup; cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
                  /sys/fs/cgroup/pids/pids.max; grep -c ' /sys/fs/cgroup/' /proc/self/mountinfo; \
                  (echo 1 > /sys/fs/cgroup/pids/pids.max) 2>&1; true";
    if !Path::new("/sys/fs/cgroup/memory").exists() {
        testkit::not_run(
            testkit::prereq::CGROUP,
            "the host has no cgroup v1 memory hierarchy",
        );
        return;
    }
    let mut seen = Vec::new();
    for runtime in runtimes() {
        let who = name(runtime);
        for cgroup_ns in [true, false] {
            let b = Bundle::for_runtime(&env, &["sh", "-c", script], runtime);
            let before = host_state(&b.root);
            let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
            config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
            config["linux"]["resources"]["pids"]["limit"] = 50.into();
            if !cgroup_ns {
                config["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|n| n["type"] != "cgroup");
            }
            b.write_config(&config);
            let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "cg"]);
            assert!(out.status.success(), "{who}: {}", text(&out));
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                stdout.contains("67108864\n50\n"),
                "{who}: the container's own limits: {stdout}"
            );
            assert!(
                stdout.contains("Read-only file system"),
                "{who}: read-only: {stdout}"
            );
            seen.push((who.to_owned(), cgroup_ns, stdout));
            nothing_left(runtime, &b.root, &before, who);
        }
    }
    // The same hierarchies, limits and read-only mounts under both runtimes, with
    // and without a cgroup namespace.
    for (who, cgroup_ns, stdout) in seen.iter().filter(|(who, _, _)| who != "vessel-runc") {
        let (_, _, vessel) = seen
            .iter()
            .find(|(w, ns, _)| w == "vessel-runc" && ns == cgroup_ns)
            .unwrap();
        assert_eq!(
            stdout, vessel,
            "{who} (cgroup namespace: {cgroup_ns}) against vessel-runc"
        );
    }
}

#[test]
fn podman_sees_the_same_cgroups_as_under_runc() {
    let Some(env) = env() else { return };
    if !testkit::programs_present(&["podman"]) {
        return;
    }
    let script = "ls /sys/fs/cgroup; cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
                  /sys/fs/cgroup/pids/pids.max; cat /proc/self/cgroup";
    let dir = tempfile::Builder::new()
        .prefix("vessel-runc-test-podman")
        .tempdir()
        .unwrap();
    let mut seen = Vec::new();
    for runtime in runtimes() {
        let runtime_path = if runtime == RUNC {
            PathBuf::from(RUNC)
        } else {
            PathBuf::from("/usr/sbin/runc")
        };
        // Podman's own storage and state in the test's directory; this host's hard
        // limits are below Podman's defaults, hence the ulimits.
        let out = Command::new("podman")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args([
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
                "--runtime",
            ])
            .arg(&runtime_path)
            .args([
                "run",
                "--rm",
                "--memory",
                "64m",
                "--pids-limit",
                "50",
                "--net",
                "none",
            ])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--rootfs",
            ])
            .arg(&env.rootfs)
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", name(runtime), text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The container's id differs between the runs.
        let normalized: Vec<String> = stdout
            .lines()
            .map(|l| match l.split_once("/libpod-") {
                Some((head, _)) => format!("{head}/libpod-ID"),
                None => l.to_owned(),
            })
            .collect();
        assert!(
            normalized.contains(&"67108864".to_owned()),
            "{}: {stdout}",
            name(runtime)
        );
        assert!(
            normalized.contains(&"50".to_owned()),
            "{}: {stdout}",
            name(runtime)
        );
        seen.push(normalized);
    }
    same_as_runc(&seen);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.path().to_str().unwrap()),
        "nothing left mounted"
    );
}

#[test]
fn a_create_killed_by_sigkill_is_cleaned_up_by_the_next_command() {
    let Some(env) = env() else { return };
    for (case, next) in [
        ("delete", &["delete", "half"][..]),
        ("any command", &["list"][..]),
    ] {
        let (b, dir, mut config) = hooked_bundle(&env, RUNC, &["true"]);
        let before = host_state(&b.root);
        config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
        // A hook that waits, so the create can be killed half-way.
        let then = format!(
            "echo $$ > {0}/hook.tmp && mv {0}/hook.tmp {0}/hook.pid; exec sleep 30",
            dir.display()
        );
        config["hooks"] =
            serde_json::json!({"createRuntime": [recording_hook(&dir, "createRuntime", &then)]});
        b.write_config(&config);
        let mut create = Command::new(RUNC)
            .arg("--root")
            .arg(&b.root)
            .args(["create", "--bundle", b.path().to_str().unwrap(), "half"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the hook to run", || dir.join("hook.pid").exists());
        create.kill().unwrap();
        create.wait().unwrap();
        // The hook was the runtime's child, not the container's: the test ends it.
        let hook = fs::read_to_string(dir.join("hook.pid")).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the hook still sleeps, so
        // its pid is its own.
        unsafe { libc::kill(hook.trim().parse().unwrap(), libc::SIGKILL) };
        let left = host_state(&b.root);
        assert!(
            left.iter().any(|s| s.starts_with("state "))
                && left.iter().any(|s| s.starts_with("cgroup ")),
            "{case}: a SIGKILL leaves state and cgroups: {left:?}"
        );
        let out = b.runc(next);
        assert!(out.status.success(), "{case}: {}", text(&out));
        assert_eq!(
            host_state(&b.root),
            before,
            "{case}: the leftovers are gone"
        );
    }
}

#[test]
fn a_user_namespace_maps_the_containers_root_to_another_host_user() {
    let Some(env) = env() else { return };
    let script = "id; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%u %g' /bin/busybox; \
                  ls -ln /dev/null; cat /sys/fs/cgroup/pids/pids.max; exec sleep 1000";
    let mut seen = Vec::new();
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sh", "-c", script], runtime);
        let before = host_state(&b.root);
        let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
        config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
        config["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        config["linux"]["uidMappings"] = map.clone();
        config["linux"]["gidMappings"] = map;
        b.write_config(&config);
        let out_path = b.path().join("container.out");
        let out = Command::new(runtime)
            .arg("--root")
            .arg(&b.root)
            .args([
                "run",
                "--detach",
                "--bundle",
                b.path().to_str().unwrap(),
                "us",
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            // Not a pipe: the container keeps the runtime's stderr.
            .stderr(fs::File::create(b.path().join("container.err")).unwrap())
            .status()
            .unwrap();
        let err = fs::read_to_string(b.path().join("container.err")).unwrap();
        assert!(out.success(), "{who}: {out}: {err}");
        let pid = b.state("us")["pid"].as_i64().unwrap();
        wait_until("the container's output", || {
            fs::read_to_string(&out_path)
                .unwrap_or_default()
                .lines()
                .count()
                >= 6
        });
        // From the host: the container's root is host user 100000.
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uid_line.split_whitespace().nth(1),
            Some("100000"),
            "{who}: {uid_line}"
        );
        // exec joins the user namespace too.
        let exec = b.runc(&["exec", "us", "id", "-u"]);
        assert!(exec.status.success(), "{who}: {}", text(&exec));
        assert_eq!(String::from_utf8_lossy(&exec.stdout), "0\n", "{who}");
        let out = b.runc(&["delete", "--force", "us"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let inside = fs::read_to_string(&out_path).unwrap();
        let lines: Vec<&str> = inside.lines().collect();
        assert!(
            lines[0].starts_with("uid=0(root) gid=0(root)"),
            "{who}: {inside}"
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["0", "100000", "65536"],
            "{who}"
        );
        assert_eq!(
            lines[3], "65534 65534",
            "{who}: host root's files belong to nobody inside"
        );
        seen.push(inside);
        nothing_left(runtime, &b.root, &before, who);
    }
    same_as_runc(&seen);
}

#[test]
fn user_namespace_configs_that_cannot_work_are_refused() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let mut no_maps = default_config(&env.rootfs, &["true"]);
    no_maps["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user"}));
    let mut maps_without_ns = default_config(&env.rootfs, &["true"]);
    maps_without_ns["linux"]["uidMappings"] = map.clone();
    maps_without_ns["linux"]["gidMappings"] = map;
    let mut overlapping = no_maps.clone();
    overlapping["linux"]["uidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 10}, {"containerID": 5, "hostID": 200000, "size": 10}]);
    overlapping["linux"]["gidMappings"] = overlapping["linux"]["uidMappings"].clone();
    for (config, needle) in [
        (no_maps, "needs linux.uidMappings"),
        (maps_without_ns, "need a new user namespace"),
        (overlapping, "uidMappings"),
    ] {
        b.assert_create_refused(&config, needle, &before, needle);
    }
}

#[test]
fn a_rootless_user_runs_a_container_as_under_runc() {
    let Some(env) = env() else { return };
    const NOBODY: u32 = 65534;
    use std::os::unix::process::CommandExt;
    // The bundle and the runtimes' state belong to the user.
    let dir = tempfile::Builder::new()
        .prefix("vessel-runc-test-rootless")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let script = "id; cat /proc/self/uid_map /proc/self/gid_map; ls /sys/fs/cgroup | head -2";
    // runc spec --rootless: no network or cgroup namespace, the user's own ids, the
    // host's /sys bound.
    let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
    let linux = &mut config["linux"];
    linux.as_object_mut().unwrap().remove("resources");
    linux.as_object_mut().unwrap().remove("cgroupsPath");
    linux["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}]);
    let own = serde_json::json!([{"containerID": 0, "hostID": NOBODY, "size": 1}]);
    linux["uidMappings"] = own.clone();
    linux["gidMappings"] = own;
    for mount in config["mounts"].as_array_mut().unwrap() {
        if mount["destination"] == "/sys" {
            *mount = serde_json::json!({"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]});
        }
        if mount["destination"] == "/dev/pts" {
            mount["options"] = serde_json::json!([
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620"
            ]);
        }
    }
    fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut seen = Vec::new();
    for runtime in runtimes() {
        let who = name(runtime);
        let state = dir.path().join(format!("state-{who}"));
        let out = Command::new(runtime)
            .uid(NOBODY)
            .gid(NOBODY)
            .env_remove("XDG_RUNTIME_DIR")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle", dir.path().to_str().unwrap(), "rl"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{who}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            stdout.starts_with("uid=0(root) gid=0(root)"),
            "{who}: {stdout}"
        );
        let uid_map: Vec<&str> = stdout
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(uid_map, ["0", "65534", "1"], "{who}: {stdout}");
        let left = testkit::entries(&state);
        assert!(
            left.is_empty(),
            "{who}: nothing left in the user's state: {left:?}"
        );
        seen.push(stdout);
    }
    same_as_runc(&seen);
}

#[test]
fn fields_that_cannot_be_applied_are_errors() {
    // The spec: a property that cannot be applied MUST be an error, not a container
    // without it.
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["true"]);
    let before = host_state(&b.root);
    // (what, the parent object's JSON pointer, key, value, what the error names)
    let cases = [
        (
            "apparmor",
            "/process",
            "apparmorProfile",
            serde_json::json!("docker-default"),
            "apparmorProfile",
        ),
        (
            "selinux",
            "/process",
            "selinuxLabel",
            serde_json::json!("system_u:system_r:container_t:s0"),
            "selinuxLabel",
        ),
        (
            "intel rdt",
            "/linux",
            "intelRdt",
            serde_json::json!({"closID": "x"}),
            "intelRdt",
        ),
        (
            "seccomp flags",
            "/linux",
            "seccomp",
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}),
            "seccomp.flags",
        ),
        (
            "rlimits twice",
            "/process",
            "rlimits",
            serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 10}, {"type": "RLIMIT_NOFILE", "hard": 20, "soft": 20}]),
            "listed twice",
        ),
    ];
    for (what, parent, key, value, needle) in cases {
        let mut config = default_config(&env.rootfs, &["true"]);
        config.pointer_mut(parent).unwrap()[key] = value;
        b.assert_create_refused(&config, needle, &before, what);
    }
}

#[test]
fn a_linux32_personality_reports_a_32_bit_machine() {
    let Some(env) = env() else { return };
    let b = Bundle::new(&env, &["uname", "-m"]);
    let mut config = default_config(&env.rootfs, &["uname", "-m"]);
    config["linux"]["personality"] = serde_json::json!({"domain": "LINUX32"});
    b.write_config(&config);
    let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "p32"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "i686\n");
}

#[test]
fn a_cgroup_that_existed_before_is_joined_and_kept() {
    // The spec: resources not created by the container MUST NOT be deleted (runc 1.1
    // removes such a group at delete; vessel-runc keeps it).
    let Some(env) = env() else { return };
    let pids = Path::new("/sys/fs/cgroup/pids");
    if !pids.exists() {
        testkit::not_run(
            testkit::prereq::CGROUP,
            "the host has no cgroup v1 pids hierarchy",
        );
        return;
    }
    let existing = pids.join("vessel-runc-test");
    fs::create_dir(&existing).unwrap();
    let b = Bundle::new(&env, &["true"]);
    let mut config = default_config(&env.rootfs, &["true"]);
    config["linux"]["cgroupsPath"] = "/vessel-runc-test".into();
    b.write_config(&config);
    let out = b.runc(&["run", "--bundle", b.path().to_str().unwrap(), "jg"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(existing.exists(), "the group that was there stays");
    assert!(
        !Path::new("/sys/fs/cgroup/memory/vessel-runc-test").exists(),
        "the group the container made goes"
    );
    fs::remove_dir(&existing).unwrap();
}

/// Receives one descriptor sent with SCM_RIGHTS on `stream` (runc's console socket
/// protocol).
fn receive_fd(stream: &std::os::unix::net::UnixStream) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    // SAFETY: a zeroed msghdr is valid; it points at the stack buffers above, which
    // outlive the call, and the control buffer is aligned for cmsghdr.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len();
        assert!(
            libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) > 0,
            "recvmsg"
        );
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS);
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

#[test]
fn a_terminal_comes_through_the_console_socket_and_is_dev_console() {
    let Some(env) = env() else { return };
    let script = "tty; stat -c console=%t:%T /dev/console";
    let mut seen = Vec::new();
    for runtime in runtimes() {
        let who = name(runtime);
        let b = Bundle::for_runtime(&env, &["sh", "-c", script], runtime);
        let mut config = default_config(&env.rootfs, &["sh", "-c", script]);
        config["process"]["terminal"] = true.into();
        b.write_config(&config);
        let socket = b.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Detached: runc takes a console socket only then.
        let mut run = Command::new(runtime)
            .arg("--root")
            .arg(&b.root)
            .args([
                "run",
                "--detach",
                "--console-socket",
                socket.to_str().unwrap(),
            ])
            .args(["--bundle", b.path().to_str().unwrap(), "tty"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut accepted = None;
        wait_until("the runtime to connect to the console socket", || {
            if let Ok(Some(status)) = run.try_wait() {
                assert!(status.success(), "{who}: the runtime failed: {status}");
            }
            accepted = listener.accept().ok();
            accepted.is_some()
        });
        let (stream, _) = accepted.unwrap();
        stream.set_nonblocking(false).unwrap();
        let master = fs::File::from(receive_fd(&stream));
        assert!(run.wait().unwrap().success(), "{who}");
        // Read until the terminal's last user is gone (EIO).
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &master, &mut output);
        let out = b.runc(&["delete", "--force", "tty"]);
        assert!(out.status.success(), "{who}: {}", text(&out));
        let text = String::from_utf8_lossy(&output).replace('\r', "");
        assert!(text.contains("/dev/pts/0\n"), "{who}: {text:?}");
        assert!(
            text.contains("console=88:0\n"),
            "{who}: the terminal is /dev/console: {text:?}"
        );
        seen.push(text);
    }
    same_as_runc(&seen);
}
