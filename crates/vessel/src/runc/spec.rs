//! OCI config.json and process.json, turned into `container::runtime` specs.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use container::resources::{DeviceRule, Setting, Throttle};
use container::runtime::{
    capability_number, is_clean_container_path, DeviceSpec, IdMapping, InitSpec, MountSpec,
    NamespaceSpec, ProcessSpec,
};
use container::seccomp::{Action, ArgCmp, ArgOp, Profile, Programs, SyscallRule};
use container::CapSets;
use oci_spec::runtime::{
    Arch, LinuxNamespaceType, LinuxResources, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompOperator, PosixRlimitType, Process, Spec,
};

/// Reads and parses `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid OCI config: {e}", path.display()))
}

/// Reads and parses an OCI process (`exec --process`).
pub fn load_process(path: &Path) -> Result<Process> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid OCI process: {e}", path.display()))
}

fn cap_mask(set: Option<&std::collections::HashSet<oci_spec::runtime::Capability>>) -> Result<u64> {
    let mut mask = 0u64;
    for cap in set.into_iter().flatten() {
        let name = cap.to_string();
        let bit =
            capability_number(&name).ok_or_else(|| anyhow!("unknown capability CAP_{name}"))?;
        mask |= 1 << bit;
    }
    Ok(mask)
}

/// process.rlimits; the spec makes a repeated type an error.
fn rlimits(p: &Process) -> Result<Vec<(libc::c_int, u64, u64)>> {
    let mut out: Vec<(libc::c_int, u64, u64)> = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let number = rlimit_number(r.typ());
        if out.iter().any(|(n, _, _)| *n == number) {
            bail!("process.rlimits: {:?} is listed twice", r.typ());
        }
        out.push((number, r.soft(), r.hard()));
    }
    Ok(out)
}

fn rlimit_number(typ: PosixRlimitType) -> libc::c_int {
    (match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

/// An OCI process as a runtime-neutral one.
pub fn process(p: &Process) -> Result<ProcessSpec> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        bail!("process.args must name a command");
    }
    let caps = match p.capabilities() {
        Some(c) => CapSets {
            bounding: cap_mask(c.bounding().as_ref())?,
            effective: cap_mask(c.effective().as_ref())?,
            permitted: cap_mask(c.permitted().as_ref())?,
            inheritable: cap_mask(c.inheritable().as_ref())?,
            ambient: cap_mask(c.ambient().as_ref())?,
        },
        None => CapSets::default(),
    };
    let cwd = p.cwd().to_string_lossy().into_owned();
    if !cwd.starts_with('/') {
        bail!("process.cwd {cwd:?} must be an absolute path");
    }
    Ok(ProcessSpec {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd,
        uid: p.user().uid(),
        gid: p.user().gid(),
        additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
        umask: p.user().umask(),
        caps,
        rlimits: rlimits(p)?,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        terminal: p.terminal().unwrap_or(false),
        oom_score_adj: p.oom_score_adj(),
    })
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Action> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => Action::Allow,
        LinuxSeccompAction::ScmpActErrno => Action::Errno(errno.unwrap_or(libc::EPERM as u32)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            Action::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => Action::KillProcess,
        LinuxSeccompAction::ScmpActTrap => Action::Trap,
        LinuxSeccompAction::ScmpActLog => Action::Log,
        other => bail!("linux.seccomp: action {other:?} is not supported"),
    })
}

/// OCI `linux.seccomp` compiled to BPF (x86-64 only).
pub fn seccomp(s: &LinuxSeccomp) -> Result<Programs> {
    if let Some(arches) = s.architectures() {
        if !arches.is_empty() && !arches.contains(&Arch::ScmpArchX86_64) {
            bail!("linux.seccomp: only SCMP_ARCH_X86_64 is supported");
        }
    }
    if s.listener_path().is_some() {
        bail!("linux.seccomp: listenerPath (user notification) is not supported");
    }
    let mut syscalls = Vec::new();
    for rule in s.syscalls().iter().flatten() {
        let mut args = Vec::new();
        for a in rule.args().iter().flatten() {
            let op = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => ArgOp::Ne,
                LinuxSeccompOperator::ScmpCmpLt => ArgOp::Lt,
                LinuxSeccompOperator::ScmpCmpLe => ArgOp::Le,
                LinuxSeccompOperator::ScmpCmpEq => ArgOp::Eq,
                LinuxSeccompOperator::ScmpCmpGe => ArgOp::Ge,
                LinuxSeccompOperator::ScmpCmpGt => ArgOp::Gt,
                LinuxSeccompOperator::ScmpCmpMaskedEq => ArgOp::MaskedEq(a.value()),
            };
            let value = match op {
                ArgOp::MaskedEq(_) => a.value_two().unwrap_or(0),
                _ => a.value(),
            };
            let index = u8::try_from(a.index())
                .ok()
                .filter(|i| *i < 6)
                .ok_or_else(|| {
                    anyhow!(
                        "linux.seccomp: argument index {} is out of range",
                        a.index()
                    )
                })?;
            args.push(ArgCmp { index, op, value });
        }
        syscalls.push(SyscallRule {
            names: rule.names().clone(),
            action: action(rule.action(), rule.errno_ret().or(s.default_errno_ret()))?,
            args,
        });
    }
    let profile = Profile {
        default_action: action(s.default_action(), s.default_errno_ret())?,
        syscalls,
    };
    Ok(container::seccomp::compile_profile(&profile)?)
}

/// Refuses what this runtime cannot apply: the spec wants an error, not a container
/// without it.
fn refuse_unsupported(process: &Process, linux: &oci_spec::runtime::Linux) -> Result<()> {
    let set = |v: &Option<String>| v.as_ref().is_some_and(|s| !s.is_empty());
    if set(process.apparmor_profile()) {
        bail!("process.apparmorProfile: AppArmor profiles are not supported by vessel-runc");
    }
    if set(process.selinux_label()) || set(linux.mount_label()) {
        bail!("process.selinuxLabel / linux.mountLabel: SELinux labels are not supported by vessel-runc");
    }
    if linux.intel_rdt().is_some() {
        bail!("linux.intelRdt: Intel RDT is not supported by vessel-runc");
    }
    if let Some(res) = linux.resources() {
        if res.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
            bail!("linux.resources.rdma: the rdma controller is not supported by vessel-runc");
        }
        if res.memory().as_ref().and_then(|m| m.use_hierarchy()) == Some(false) {
            bail!("linux.resources.memory.useHierarchy false: the kernel's memory cgroup is always hierarchical");
        }
    }
    if let Some(seccomp) = linux.seccomp() {
        // TSYNC: the init is single-threaded, so there is nothing to synchronize.
        if let Some(flag) = seccomp
            .flags()
            .iter()
            .flatten()
            .find(|f| **f != oci_spec::runtime::LinuxSeccompFilterFlag::SeccompFilterFlagTsync)
        {
            bail!("linux.seccomp.flags: {flag:?} is not supported by vessel-runc");
        }
    }
    if let Some(personality) = linux.personality() {
        if personality.flags().as_ref().is_some_and(|f| !f.is_empty()) {
            bail!("linux.personality.flags are not supported by vessel-runc");
        }
    }
    Ok(())
}

/// config.json as a runtime-neutral init spec.
pub fn init_spec(spec: &Spec, bundle: &Path, id: &str) -> Result<InitSpec> {
    let Some(root) = spec.root() else {
        bail!("config.json has no root");
    };
    let root_path = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    let Some(process_oci) = spec.process() else {
        bail!("config.json has no process");
    };
    let process = process(process_oci)?;
    let linux = spec.linux().clone().unwrap_or_default();
    refuse_unsupported(process_oci, &linux)?;
    let mappings = |list: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        list.iter()
            .flatten()
            .map(|m| IdMapping {
                container_id: m.container_id(),
                host_id: m.host_id(),
                size: m.size(),
            })
            .collect::<Vec<_>>()
    };
    let mut namespaces = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        let kind = match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            LinuxNamespaceType::User => libc::CLONE_NEWUSER,
            LinuxNamespaceType::Time => bail!("time namespaces are not supported"),
        };
        if namespaces.iter().any(|n: &NamespaceSpec| n.kind == kind) {
            bail!("namespace {} is listed twice", ns.typ());
        }
        namespaces.push(NamespaceSpec {
            kind,
            path: ns.path().clone(),
        });
    }
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| MountSpec {
            destination: m.destination().to_string_lossy().into_owned(),
            kind: m.typ().clone().unwrap_or_default(),
            source: m.source().clone(),
            options: m.options().clone().unwrap_or_default(),
        })
        .collect();
    let devices = linux
        .devices()
        .iter()
        .flatten()
        .map(|d| DeviceSpec {
            path: d.path().to_string_lossy().into_owned(),
            kind: d.typ().as_str().to_owned(),
            major: d.major(),
            minor: d.minor(),
            file_mode: d.file_mode(),
            uid: d.uid(),
            gid: d.gid(),
        })
        .collect();
    let check_paths = |what: &str, paths: &Option<Vec<String>>| -> Result<Vec<String>> {
        let paths = paths.clone().unwrap_or_default();
        if let Some(bad) = paths.iter().find(|p| !is_clean_container_path(p)) {
            bail!("{what}: {bad:?} is not an absolute path without '..'");
        }
        Ok(paths)
    };
    let limits = match linux.resources() {
        Some(res) => limits(res)?,
        None => container::Limits::default(),
    };
    let cgroups_path = match linux.cgroups_path() {
        Some(p) => {
            let s = p.to_string_lossy().into_owned();
            if s.contains(':') {
                bail!("linux.cgroupsPath {s:?} looks like a systemd slice:name:id; systemd cgroups are not supported");
            }
            if Path::new(&s)
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                bail!("linux.cgroupsPath {s:?} must not contain '..'");
            }
            s
        }
        // A group named after the container at each hierarchy's top. (runc's
        // default is below its own group, which on cgroup v2 holds processes and
        // so cannot delegate controllers.)
        None => format!("/{id}"),
    };
    let seccomp = match linux.seccomp() {
        Some(s) => seccomp(s)?,
        None => Vec::new(),
    };
    let mut sysctl: Vec<(String, String)> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctl.sort();
    Ok(InitSpec {
        bundle: bundle.to_path_buf(),
        root: root_path,
        readonly_root: root.readonly().unwrap_or(false),
        mounts,
        devices,
        console: None,
        namespaces,
        personality32: linux
            .personality()
            .as_ref()
            .is_some_and(|p| p.domain() == oci_spec::runtime::LinuxPersonalityDomain::PerLinux32),
        uid_mappings: mappings(linux.uid_mappings()),
        gid_mappings: mappings(linux.gid_mappings()),
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        masked_paths: check_paths("linux.maskedPaths", linux.masked_paths())?,
        readonly_paths: check_paths("linux.readonlyPaths", linux.readonly_paths())?,
        sysctl,
        rootfs_propagation: linux.rootfs_propagation().clone().filter(|p| !p.is_empty()),
        process,
        cgroups_path,
        limits,
        seccomp,
    })
}

/// The root path as state reports it (absolute).
pub fn rootfs_path(spec: &Spec, bundle: &Path) -> PathBuf {
    spec.root()
        .as_ref()
        .map(|r| {
            if r.path().is_absolute() {
                r.path().clone()
            } else {
                bundle.join(r.path())
            }
        })
        .unwrap_or_default()
}

/// `linux.resources` as cgroup limits and settings. Kernel memory limits are ignored
/// with a warning, as runc 1.1 does: the kernel deprecated them.
pub fn limits(res: &LinuxResources) -> Result<container::Limits> {
    let mut limits = container::Limits::default();
    let mut settings = Vec::new();
    if let Some(memory) = res.memory() {
        let limit = memory.limit().filter(|l| *l > 0);
        limits.memory = limit.map(|l| l as u64);
        if let Some(bytes) = memory.reservation() {
            settings.push(Setting::MemoryReservation(bytes));
        }
        if let Some(total) = memory.swap() {
            if total != 0 {
                settings.push(Setting::MemorySwap {
                    total,
                    memory: limit,
                });
            }
        }
        if memory.kernel().is_some() || memory.kernel_tcp().is_some() {
            eprintln!("vessel-runc: warning: kernel memory settings are ignored (the kernel deprecated them)");
        }
        if let Some(value) = memory.swappiness() {
            settings.push(Setting::MemorySwappiness(value));
        }
        if memory.disable_oom_killer() == Some(true) {
            settings.push(Setting::DisableOomKiller);
        }
    }
    if let Some(cpu) = res.cpu() {
        if let Some(quota) = cpu.quota().filter(|q| *q > 0) {
            limits.cpu = Some(container::CpuLimit {
                quota_us: quota as u64,
                period_us: cpu.period().unwrap_or(container::CPU_PERIOD_US),
            });
        }
        limits.cpu_shares = cpu.shares().filter(|s| *s > 0);
        if let Some(cpus) = cpu.cpus().as_ref().filter(|c| !c.is_empty()) {
            settings.push(Setting::CpusetCpus(cpus.clone()));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|m| !m.is_empty()) {
            settings.push(Setting::CpusetMems(mems.clone()));
        }
        if let Some(idle) = cpu.idle() {
            settings.push(Setting::CpuIdle(idle));
        }
        if let Some(us) = cpu.realtime_period().filter(|p| *p > 0) {
            settings.push(Setting::CpuRealtimePeriod(us));
        }
        if let Some(us) = cpu.realtime_runtime().filter(|r| *r != 0) {
            settings.push(Setting::CpuRealtimeRuntime(us));
        }
    }
    if let Some(pids) = res.pids() {
        if pids.limit() > 0 {
            limits.pids = Some(pids.limit() as u64);
        }
    }
    if let Some(blkio) = res.block_io() {
        if let Some(weight) = blkio.weight().filter(|w| *w > 0) {
            settings.push(Setting::BlkioWeight(weight));
        }
        if let Some(weight) = blkio.leaf_weight().filter(|w| *w > 0) {
            settings.push(Setting::BlkioLeafWeight(weight));
        }
        for device in blkio.weight_device().iter().flatten() {
            let (major, minor) = (device.major(), device.minor());
            if let Some(weight) = device.weight() {
                settings.push(Setting::BlkioWeightDevice {
                    major,
                    minor,
                    weight,
                });
            }
            if let Some(weight) = device.leaf_weight() {
                settings.push(Setting::BlkioLeafWeightDevice {
                    major,
                    minor,
                    weight,
                });
            }
        }
        for (throttle, devices) in [
            (Throttle::ReadBps, blkio.throttle_read_bps_device()),
            (Throttle::WriteBps, blkio.throttle_write_bps_device()),
            (Throttle::ReadIops, blkio.throttle_read_iops_device()),
            (Throttle::WriteIops, blkio.throttle_write_iops_device()),
        ] {
            for device in devices.iter().flatten() {
                settings.push(Setting::BlkioThrottle {
                    throttle,
                    major: device.major(),
                    minor: device.minor(),
                    rate: device.rate(),
                });
            }
        }
    }
    if let Some(network) = res.network() {
        if let Some(id) = network.class_id().filter(|id| *id != 0) {
            settings.push(Setting::NetClsClassid(id));
        }
        for prio in network.priorities().iter().flatten() {
            settings.push(Setting::NetPrio {
                interface: prio.name().clone(),
                priority: prio.priority(),
            });
        }
    }
    for page in res.hugepage_limits().iter().flatten() {
        settings.push(Setting::Hugetlb {
            page_size: page.page_size().clone(),
            limit: page.limit(),
        });
    }
    for setting in &settings {
        setting.validate()?;
    }
    limits.settings = settings;
    for rule in res.devices().iter().flatten() {
        let rule = DeviceRule {
            allow: rule.allow(),
            kind: rule
                .typ()
                .map_or('a', |t| t.as_str().chars().next().unwrap_or('a')),
            major: rule.major(),
            minor: rule.minor(),
            access: rule.access().clone().unwrap_or_else(|| "rwm".into()),
        };
        rule.line()?;
        limits.device_rules.push(rule);
    }
    Ok(limits)
}
