//! Shared-kernel containers: a command run as PID 1 of fresh namespaces, on a private
//! overlay root, under cgroup limits and with reduced privileges.
//!
//! [`run`] is the whole lifecycle, in the style of `runc run`:
//!
//! 1. The parent (the caller) validates the [`Config`], makes a per-container state
//!    directory (overlay upper and work dirs, the merged mount point) and the cgroups,
//!    and turns everything the child will need into a precomputed [`plan`].
//! 2. It clones the child into new mount, PID, UTS, IPC and network namespaces. The child
//!    waits on a pipe until the parent has put it in the cgroups, then enters a new cgroup
//!    namespace, builds its root (overlay, `/proc`, `/sys`, `/dev`, masked and read-only
//!    paths), pivots into it, drops privileges and execs the command, which thereby is
//!    PID 1. The child allocates nothing (see [`child`]); a failure goes back to the
//!    parent as a step and an errno on a close-on-exec pipe, so a successful exec reads as
//!    end-of-file.
//! 3. The parent forwards signals (and, with a terminal, copies between the user's
//!    terminal and the container's pty) until PID 1 exits, then reports its status and
//!    whether the memory limit killed it.
//!
//! Every mount lives in the child's mount namespace, so the host's mount table never sees
//! one and they all vanish with the namespace. Guards remove the cgroups and the state
//! directory and kill the child on every path, errors included.

mod cgroup;
mod child;
mod error;
pub mod lasting;
pub mod leftovers;
mod plan;
pub mod resources;
pub mod rootfs;
mod rootless;
mod run;
pub mod runtime;
pub mod seccomp;
mod syscalls_x86_64;
mod tty;

use std::path::PathBuf;

pub use cgroup::Stats;
pub use error::{Error, Result};
pub use plan::CapSets;
pub use run::run;

/// `PATH` in the container unless `-e PATH=...` replaces it (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where per-container state directories go by default.
pub const DEFAULT_STATE_ROOT: &str = "/run/vessel";

/// The smallest memory limit accepted: below this even a shell cannot start (Docker's
/// floor too), and the kernel turns tiny limits into an immediate OOM kill at set-up.
pub const MIN_MEMORY: u64 = 6 << 20;

/// The CFS period used for `--cpus` (100 ms, as runc and Docker use).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Network namespace choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Net {
    /// A new network namespace with only the loopback interface, up.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

/// A CPU limit as a CFS quota per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: u64,
    pub period_us: u64,
}

/// Resource limits; `None` leaves a resource unlimited (and its controller unused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (swap disabled where the kernel lets us).
    pub memory: Option<u64>,
    pub cpu: Option<CpuLimit>,
    /// CPU weight against other groups when the CPUs are contended, in
    /// cgroup v1's shares (1024 is the default; v2 gets the equivalent
    /// `cpu.weight`).
    pub cpu_shares: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
    /// The rest of an OCI `linux.resources`, written after the above.
    pub settings: Vec<resources::Setting>,
    /// OCI `linux.resources.devices`: device cgroup rules applied, in order, before
    /// the default allow list (v1's devices controller).
    pub device_rules: Vec<resources::DeviceRule>,
}

/// One container run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The root filesystem (read-only lower layer of the overlay); never modified.
    pub rootfs: PathBuf,
    /// The command and its arguments; a name without `/` is looked up on the container's `PATH`.
    pub command: Vec<String>,
    /// Extra environment (`-e`), applied over the defaults in order.
    pub env: Vec<(String, String)>,
    /// Working directory inside the container (created if missing, as runc does).
    pub cwd: String,
    /// Hostname; `None`: the container id.
    pub hostname: Option<String>,
    pub net: Net,
    /// Allocate a pseudo-terminal for the command.
    pub tty: bool,
    pub limits: Limits,
    /// Parent of the per-container state directories.
    pub state_root: PathBuf,
}

impl Config {
    /// A configuration with the defaults: no limits, `--net none`, cwd `/`.
    pub fn new(rootfs: impl Into<PathBuf>, command: Vec<String>) -> Self {
        Config {
            rootfs: rootfs.into(),
            command,
            env: Vec::new(),
            cwd: "/".to_owned(),
            hostname: None,
            net: Net::None,
            tty: false,
            limits: Limits::default(),
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
        }
    }
}

/// How the container's PID 1 ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

/// What [`run`] reports once the container is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Processes the kernel's OOM killer killed at the memory limit (0 without `--memory`).
    pub oom_kills: u64,
    /// The container's id (also its default hostname).
    pub id: [u8; ID_LEN],
}

/// Length of a container id in hex digits.
pub const ID_LEN: usize = 12;

impl Outcome {
    /// The exit status a shell would report: the code, or 128+N for signal N.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            Status::Exited(code) => (code & 0xff) as u8,
            Status::Signaled(sig) => 128u8.saturating_add((sig & 0x7f) as u8),
        }
    }

    /// Whether PID 1 was killed by the OOM killer at the memory limit.
    pub fn killed_by_memory_limit(&self) -> bool {
        self.status == Status::Signaled(libc::SIGKILL) && self.oom_kills > 0
    }

    pub fn id(&self) -> &str {
        // The id is generated as ASCII hex digits.
        std::str::from_utf8(&self.id).unwrap_or("?")
    }
}

/// Parses `--cpus`: a positive decimal number of CPUs such as `2` or `0.5`, at least 0.01
/// (the kernel's 1 ms minimum quota) and at most `host_cpus`.
pub fn parse_cpus(value: &str, host_cpus: usize) -> Result<CpuLimit> {
    let bad = |why: &str| Error::Invalid(format!("--cpus {value}: {why}"));
    let trimmed = value.trim();
    if trimmed.is_empty()
        || !trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || trimmed.bytes().filter(|&b| b == b'.').count() > 1
    {
        return Err(bad("expected a number of CPUs such as 2 or 0.5"));
    }
    let cpus: f64 = trimmed
        .parse()
        .map_err(|_| bad("expected a number of CPUs such as 2 or 0.5"))?;
    if cpus <= 0.0 {
        return Err(bad("must be more than 0"));
    }
    if cpus > host_cpus as f64 {
        return Err(bad(&format!("this host has {host_cpus} CPUs")));
    }
    let quota_us = (cpus * CPU_PERIOD_US as f64).round() as u64;
    if quota_us < 1000 {
        return Err(bad("must be at least 0.01"));
    }
    Ok(CpuLimit {
        quota_us,
        period_us: CPU_PERIOD_US,
    })
}

/// Parses one `-e KEY=VALUE`.
pub fn parse_env(pair: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::Invalid(format!("-e {pair:?}: {why}"));
    let Some((key, value)) = pair.split_once('=') else {
        return Err(bad("expected KEY=VALUE"));
    };
    if key.is_empty() {
        return Err(bad("the name is empty"));
    }
    if pair.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Checks a memory limit against [`MIN_MEMORY`].
pub fn check_memory(bytes: u64, as_given: &str) -> Result<u64> {
    if bytes < MIN_MEMORY {
        return Err(Error::Invalid(format!(
            "--memory {as_given}: a container needs at least {} MiB",
            MIN_MEMORY >> 20
        )));
    }
    Ok(bytes)
}

/// Checks a hostname: 1 to 64 bytes of letters, digits, `-` and `.`.
pub fn check_hostname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(Error::Invalid(format!(
            "--hostname {name:?}: expected 1 to 64 letters, digits, '-' or '.'"
        )));
    }
    Ok(())
}

/// The number of CPUs this process may run on.
pub fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus() {
        assert_eq!(
            parse_cpus("0.5", 2).unwrap(),
            CpuLimit {
                quota_us: 50_000,
                period_us: 100_000
            }
        );
        assert_eq!(parse_cpus("2", 2).unwrap().quota_us, 200_000);
        assert_eq!(parse_cpus("0.01", 2).unwrap().quota_us, 1000);
        for bad in [
            "0", "0.0", "", "-1", "1e3", "abc", "0.001", "3", "1..2", "nan",
        ] {
            assert!(parse_cpus(bad, 2).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A=\0").is_err());
    }

    #[test]
    fn memory_and_hostname() {
        assert!(check_memory(1 << 20, "1M").is_err());
        assert_eq!(check_memory(32 << 20, "32M").unwrap(), 32 << 20);
        assert!(check_hostname("box-1.local").is_ok());
        assert!(check_hostname("").is_err());
        assert!(check_hostname("a b").is_err());
        assert!(check_hostname(&"a".repeat(65)).is_err());
    }

    #[test]
    fn exit_codes() {
        let o = |status, oom_kills| Outcome {
            status,
            oom_kills,
            id: *b"0123456789ab",
        };
        assert_eq!(o(Status::Exited(7), 0).exit_code(), 7);
        assert_eq!(o(Status::Signaled(15), 0).exit_code(), 143);
        assert!(o(Status::Signaled(9), 1).killed_by_memory_limit());
        assert!(!o(Status::Signaled(9), 0).killed_by_memory_limit());
        assert!(!o(Status::Exited(0), 1).killed_by_memory_limit());
        assert_eq!(o(Status::Exited(0), 0).id(), "0123456789ab");
    }
}
