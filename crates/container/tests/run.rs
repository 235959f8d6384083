//! In-process tests of `container::run`. The container inherits this process's stdout,
//! so checks go through exit statuses (and `test` inside the container).
//!
//! Needs root and a static busybox (Debian's busybox-static at /usr/bin/busybox or
//! /bin/busybox); otherwise each test prints `NOT RUN` (a failure under CI).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use container::{Config, Error, Net, Status};

static SERIAL: Mutex<()> = Mutex::new(());

/// Test root (built once per target dir) and a state root private to this test binary,
/// so the leftover check sees only our containers.
struct Env {
    rootfs: PathBuf,
    state_root: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

fn env() -> Option<Env> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !testkit::is_root() {
        testkit::not_run(testkit::prereq::ROOT, "containers need root");
        return None;
    }
    let Some(busybox) = testkit::static_busybox(&[]) else {
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
        state_root: tempfile::tempdir().unwrap(),
        _serial: serial,
    })
}

fn config(env: &Env, script: &str) -> Config {
    let mut config = Config::new(&env.rootfs, vec!["sh".into(), "-c".into(), script.into()]);
    config.state_root = env.state_root.path().to_owned();
    config
}

fn vessel_mounts() -> usize {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("overlay") || l.contains("vessel"))
        .count()
}

fn assert_clean(env: &Env, mounts_before: usize) {
    assert_eq!(
        fs::read_dir(env.state_root.path()).unwrap().count(),
        0,
        "state directory left behind"
    );
    assert_eq!(vessel_mounts(), mounts_before, "mount left behind");
}

#[test]
fn pid_1_hostname_and_exit_status() {
    let Some(env) = env() else { return };
    let mounts = vessel_mounts();
    let mut c = config(
        &env,
        r#"test $$ = 1 && test "$(hostname)" = inproc && test "$FOO" = 1 && exit 9"#,
    );
    c.hostname = Some("inproc".into());
    c.env = vec![("FOO".into(), "1".into())];
    let outcome = container::run(&c).unwrap();
    assert_eq!(outcome.status, Status::Exited(9));
    assert_eq!(outcome.exit_code(), 9);
    assert_eq!(outcome.oom_kills, 0);
    assert_clean(&env, mounts);
}

#[test]
fn network_host_keeps_the_host_interfaces() {
    let Some(env) = env() else { return };
    let host_ifaces = fs::read_to_string("/proc/net/dev").unwrap().lines().count();
    let mut c = config(
        &env,
        &format!("test $(cat /proc/net/dev | wc -l) = {host_ifaces}"),
    );
    c.net = Net::Host;
    assert_eq!(container::run(&c).unwrap().status, Status::Exited(0));
    c.net = Net::None;
    assert_eq!(container::run(&c).unwrap().status, Status::Exited(1));
}

#[test]
fn setup_failures_leave_nothing_behind() {
    let Some(env) = env() else { return };
    let mounts = vessel_mounts();
    let mut c = config(&env, "true");
    c.command = vec!["definitely-missing".into()];
    c.limits.memory = Some(64 << 20);
    c.limits.pids = Some(10);
    let err = container::run(&c).unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref cmd) if cmd == "definitely-missing"),
        "{err}"
    );
    assert_clean(&env, mounts);

    // A working directory that cannot be created (a file is in the way) fails in the
    // child after every mount is made.
    let mut c = config(&env, "true");
    c.cwd = "/etc/passwd/sub".into();
    let err = container::run(&c).unwrap_err();
    assert!(err.to_string().contains("/etc/passwd/sub"), "{err}");
    assert_clean(&env, mounts);

    let mut c = config(&env, "true");
    c.rootfs = env.rootfs.join("etc/passwd");
    assert!(matches!(container::run(&c), Err(Error::Invalid(_))));
    assert_clean(&env, mounts);
}

#[test]
fn memory_limit_oom_is_counted() {
    let Some(env) = env() else { return };
    if !Path::new("/sys/fs/cgroup/memory").exists()
        && !fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.contains("memory"))
    {
        testkit::not_run(testkit::prereq::CGROUP, "no memory cgroup controller");
        return;
    }
    let mut c = config(
        &env,
        r#"a=$(head -c 67108864 /dev/zero | tr "\0" x); echo survived"#,
    );
    c.limits.memory = Some(32 << 20);
    let outcome = container::run(&c).unwrap();
    assert!(outcome.killed_by_memory_limit(), "{outcome:?}");
    assert_eq!(outcome.exit_code(), 137);
}
