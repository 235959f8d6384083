//! The commands that manage a running container: `pause`, `resume`, `update` and
//! `events`, and `features`, which says what this runtime implements.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::LinuxResources;
use serde_json::{json, Value};

use super::spec;
use super::state::{State, Status};

pub fn pause(root: &Path, id: &str) -> Result<()> {
    let state = State::load(root, id)?;
    match state.status() {
        Status::Running | Status::Created => {}
        Status::Paused => bail!("container {id} is already paused"),
        Status::Stopped => bail!("container {id} is not running"),
    }
    state.cgroups().freeze(true)?;
    Ok(())
}

pub fn resume(root: &Path, id: &str) -> Result<()> {
    let state = State::load(root, id)?;
    if state.status() != Status::Paused {
        bail!("container {id} is not paused");
    }
    state.cgroups().freeze(false)?;
    Ok(())
}

/// `update`'s resource flags (runc's names); each, when given, overrides the same field
/// of `--resources`.
#[derive(clap::Args, Debug, Default)]
pub struct UpdateFlags {
    /// Resources as OCI linux.resources JSON: a file, or - for stdin.
    #[arg(short, long, value_name = "FILE")]
    pub resources: Option<String>,
    /// Memory limit (bytes, or with a k, m or g suffix).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Memory plus swap limit (-1: unlimited).
    #[arg(long = "memory-swap", value_name = "SIZE")]
    pub memory_swap: Option<String>,
    #[arg(long = "memory-reservation", value_name = "SIZE")]
    pub memory_reservation: Option<String>,
    #[arg(long = "cpu-period", value_name = "US")]
    pub cpu_period: Option<u64>,
    #[arg(long = "cpu-quota", value_name = "US")]
    pub cpu_quota: Option<i64>,
    #[arg(long = "cpu-share", value_name = "SHARES")]
    pub cpu_share: Option<u64>,
    #[arg(long = "cpuset-cpus", value_name = "LIST")]
    pub cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems", value_name = "LIST")]
    pub cpuset_mems: Option<String>,
    #[arg(long = "pids-limit", value_name = "N")]
    pub pids_limit: Option<i64>,
    #[arg(long = "blkio-weight", value_name = "WEIGHT")]
    pub blkio_weight: Option<u16>,
}

/// A size in bytes: a number with an optional k, m or g suffix (binary), or -1.
fn parse_size(flag: &str, text: &str) -> Result<i64> {
    if text == "-1" {
        return Ok(-1);
    }
    let lower = text.to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        _ => (lower, 0),
    };
    digits
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n >= 0)
        .ok_or_else(|| anyhow!("--{flag} {text}: expected a size such as 64m"))
}

/// The resources an update asks for, as OCI JSON.
fn requested(flags: &UpdateFlags) -> Result<Value> {
    let mut res: Value = match flags.resources.as_deref() {
        None => json!({}),
        Some(source) => {
            let mut text = String::new();
            if source == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the resources from stdin")?;
            } else {
                text =
                    std::fs::read_to_string(source).with_context(|| format!("reading {source}"))?;
            }
            serde_json::from_str(&text).map_err(|e| anyhow!("--resources: invalid JSON: {e}"))?
        }
    };
    if !res.is_object() {
        bail!("--resources: expected a JSON object (OCI linux.resources)");
    }
    let mut set = |section: &str, key: &str, value: Value| {
        if res.get(section).is_none() {
            res[section] = json!({});
        }
        res[section][key] = value;
    };
    if let Some(v) = &flags.memory {
        set("memory", "limit", parse_size("memory", v)?.into());
    }
    if let Some(v) = &flags.memory_swap {
        set("memory", "swap", parse_size("memory-swap", v)?.into());
    }
    if let Some(v) = &flags.memory_reservation {
        set(
            "memory",
            "reservation",
            parse_size("memory-reservation", v)?.into(),
        );
    }
    if let Some(v) = flags.cpu_period {
        set("cpu", "period", v.into());
    }
    if let Some(v) = flags.cpu_quota {
        set("cpu", "quota", v.into());
    }
    if let Some(v) = flags.cpu_share {
        set("cpu", "shares", v.into());
    }
    if let Some(v) = &flags.cpuset_cpus {
        set("cpu", "cpus", v.clone().into());
    }
    if let Some(v) = &flags.cpuset_mems {
        set("cpu", "mems", v.clone().into());
    }
    if let Some(v) = flags.pids_limit {
        set("pids", "limit", v.into());
    }
    if let Some(v) = flags.blkio_weight {
        set("blockIO", "weight", v.into());
    }
    Ok(res)
}

pub fn update(root: &Path, id: &str, flags: &UpdateFlags) -> Result<()> {
    let state = State::load(root, id)?;
    if state.status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    let res: LinuxResources = serde_json::from_value(requested(flags)?)
        .map_err(|e| anyhow!("--resources: not OCI linux.resources: {e}"))?;
    // Lifting a CPU quota or a pids limit is not written yet: say so rather than
    // keep the old limit silently.
    if res.cpu().as_ref().and_then(|c| c.quota()) == Some(-1)
        || res.pids().as_ref().is_some_and(|p| p.limit() == -1)
    {
        bail!("update: -1 (no limit) for the CPU quota or the pids limit is not supported; give a value");
    }
    let mut limits = spec::limits(&res)?;
    // A memory limit of -1 lifts the limit, as under runc.
    if res.memory().as_ref().and_then(|m| m.limit()) == Some(-1) {
        limits.memory = Some(u64::MAX >> 1);
    }
    if res.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        bail!("--resources: devices cannot be updated (as with runc)");
    }
    state.cgroups().update(&limits)?;
    Ok(())
}

/// runc's `events` stats object for `state`'s container.
fn stats_event(state: &State) -> Value {
    let s = state.cgroups().stats();
    let raw: serde_json::Map<String, Value> = s
        .memory_raw
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    json!({
        "type": "stats",
        "id": state.id,
        "data": {
            "cpu": {
                "usage": {
                    "total": s.cpu_total_ns,
                    "percpu": s.cpu_percpu_ns,
                    "kernel": s.cpu_kernel_ns,
                    "user": s.cpu_user_ns
                },
                "throttling": {
                    "periods": s.throttle_periods,
                    "throttledPeriods": s.throttled_periods,
                    "throttledTime": s.throttled_time_ns
                }
            },
            "memory": {
                "usage": {
                    "limit": s.memory_limit,
                    "usage": s.memory_usage,
                    "max": s.memory_max_usage,
                    "failcnt": s.memory_failcnt
                },
                "raw": raw
            },
            "pids": {"current": s.pids_current, "limit": s.pids_limit}
        }
    })
}

/// A duration such as 5s, 500ms or 1m.
fn parse_interval(text: &str) -> Result<Duration> {
    let bad = || anyhow!("--interval {text}: expected a duration such as 5s or 500ms");
    let (digits, unit_ms) = if let Some(d) = text.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = text.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = text.strip_suffix('m') {
        (d, 60_000)
    } else {
        return Err(bad());
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = n
        .checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

/// `events --stats`: one stats object. Otherwise a stats object every interval, and
/// an `oom` event when the memory limit kills a process, until the container stops.
pub fn events(root: &Path, id: &str, stats_once: bool, interval: &str) -> Result<ExitCode> {
    let state = State::load(root, id)?;
    if state.status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    if stats_once {
        println!("{}", stats_event(&state));
        return Ok(ExitCode::SUCCESS);
    }
    let interval = parse_interval(interval)?;
    let mut kills = state.cgroups().stats().oom_kills;
    let mut next = Instant::now();
    while state.status() != Status::Stopped {
        let now_kills = state.cgroups().stats().oom_kills;
        if now_kills > kills {
            println!("{}", json!({"type": "oom", "id": state.id}));
            kills = now_kills;
        }
        if Instant::now() >= next {
            println!("{}", stats_event(&state));
            next = Instant::now() + interval;
        }
        std::thread::sleep(Duration::from_millis(100).min(interval));
    }
    Ok(ExitCode::SUCCESS)
}

/// What `features` reports (the runtime spec's features.md): what this runtime
/// implements, no more.
pub fn features() -> Value {
    let caps: Vec<String> = container::runtime::CAPABILITY_NAMES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "dev", "diratime", "dirsync", "exec", "mand", "noatime",
            "nodev", "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime", "nosuid",
            "private", "rbind", "relatime", "remount", "ro", "rprivate", "rshared", "rslave",
            "runbindable", "rw", "shared", "slave", "strictatime", "suid", "sync", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps,
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                            "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                              "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        }
    })
}
