//! Everything the child needs, computed by the parent before the clone: C strings, the
//! list of mount-namespace operations, argv and envp. The child only walks this plan with
//! system calls, so it never allocates (see [`crate::child`]).

use std::ffi::{CString, NulError};
use std::fmt;
use std::os::raw::{c_char, c_int, c_ulong};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::RawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::{Config, Net, DEFAULT_PATH};

/// Files the container must not read: bind-mounted over with /dev/null (files) or a
/// read-only empty tmpfs (directories). The OCI/runc defaults.
pub(crate) const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths the container may read but not write (OCI/runc defaults).
pub(crate) const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The OCI default capability set (as runc and Docker grant).
pub(crate) const DEFAULT_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];
pub(crate) const CAP_MKNOD: u32 = 27;

/// Device nodes in the container's /dev: (name, major, minor).
pub(crate) const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// One mount-namespace operation.
#[derive(Debug)]
pub(crate) enum Op {
    /// mkdir; an existing entry is fine.
    Mkdir {
        path: CString,
        mode: u32,
    },
    /// mount(2). With `no_symlink`, a symlink at `target` is refused: the target lies in
    /// the (untrusted) root, and following a link there could mount over a host path.
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: c_ulong,
        data: Option<CString>,
        no_symlink: bool,
    },
    Mknod {
        path: CString,
        major: u32,
        minor: u32,
    },
    /// An OCI `linux.devices` node: `kind` is S_IFCHR, S_IFBLK or S_IFIFO. A node
    /// already there of the same kind and number is kept (and gets the mode and owner);
    /// anything else there is an error.
    Device {
        path: CString,
        kind: libc::mode_t,
        mode: libc::mode_t,
        major: u32,
        minor: u32,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// Hide a path (after pivot_root): /dev/null over a file, read-only tmpfs over a dir.
    Mask {
        path: CString,
    },
    /// Bind a path onto itself read-only (after pivot_root); absent paths are skipped.
    ReadOnly {
        path: CString,
    },
    /// `mkdir -p` (mount points of OCI mounts, which may be nested).
    MkdirAll {
        path: CString,
    },
    /// Creates an empty file if nothing is there (the mount point of a file bind mount).
    Touch {
        path: CString,
    },
    /// Changes a mount's propagation (MS_PRIVATE, MS_SLAVE, ... possibly with MS_REC).
    Propagate {
        target: CString,
        flags: c_ulong,
    },
    /// Remounts an existing mount (a bind mount) with `flags` (MS_RDONLY, MS_NOSUID, ...).
    Remount {
        target: CString,
        flags: c_ulong,
    },
    /// Writes `data` to an existing file (sysctls, oom_score_adj).
    WriteFile {
        path: CString,
        data: CString,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mkdir { path, .. } => write!(f, "creating directory {}", s(path)),
            Op::Mount { fstype, target, .. } => {
                write!(f, "mounting {} on {}", s(fstype), s(target))
            }
            Op::Mknod { path, .. } | Op::Device { path, .. } => {
                write!(f, "creating device node {}", s(path))
            }
            Op::Symlink { link, .. } => write!(f, "creating symlink {}", s(link)),
            Op::Mask { path } => write!(f, "masking {}", s(path)),
            Op::ReadOnly { path } => write!(f, "making {} read-only", s(path)),
            Op::MkdirAll { path } => write!(f, "creating directory {}", s(path)),
            Op::Touch { path } => write!(f, "creating mount point {}", s(path)),
            Op::Propagate { target, .. } => {
                write!(f, "setting the propagation of {}", s(target))
            }
            Op::Remount { target, .. } => write!(f, "remounting {}", s(target)),
            Op::WriteFile { path, .. } => write!(f, "writing {}", s(path)),
        }
    }
}

/// A NULL-terminated array of C strings (argv, envp) that owns its strings.
#[derive(Debug)]
pub(crate) struct CStringArray {
    // Owns the strings `ptrs` points into; read only by tests.
    #[cfg_attr(not(test), allow(dead_code))]
    strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStringArray {
    pub(crate) fn new(strings: Vec<CString>) -> Self {
        // The pointers stay valid when `strings` moves: each CString's bytes are on the heap.
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray { strings, ptrs }
    }

    pub(crate) fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }

    #[cfg(test)]
    pub(crate) fn strings(&self) -> &[CString] {
        &self.strings
    }
}

/// The five capability sets of the command, as bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

impl CapSets {
    /// The same mask in the bounding, effective and permitted sets; none inheritable or
    /// ambient (what a root process gets from an exec with that bounding set).
    pub fn uniform(mask: u64) -> Self {
        CapSets {
            bounding: mask,
            effective: mask,
            permitted: mask,
            inheritable: 0,
            ambient: 0,
        }
    }
}

/// The identity the command runs as.
#[derive(Debug, Clone, Default)]
pub(crate) struct UserIds {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// The child's instructions.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Whether to build a root and pivot into it (a new container); `false` for a process
    /// joining an existing container, which skips every mount step.
    pub pivot: bool,
    /// Propagation for `/` before anything is mounted (MS_PRIVATE or MS_SLAVE, with MS_REC).
    pub root_propagation: c_ulong,
    /// Before pivot_root, with host paths.
    pub pre_pivot: Vec<Op>,
    /// The mount point that becomes `/`.
    pub new_root: CString,
    /// Report [`crate::child::Step::BeforePivot`] and wait for the parent before
    /// pivot_root (an OCI create with hooks to run there).
    pub pause_before_pivot: bool,
    /// After pivot_root, with container paths.
    pub post_pivot: Vec<Op>,
    /// Namespaces to join (descriptors opened by the parent) before anything else.
    pub join: Vec<(RawFd, c_int)>,
    /// Unshare a cgroup namespace once in the cgroups.
    pub cgroup_ns: bool,
    /// In a user namespace: become its root (ids 0) right after joining.
    pub userns_root: bool,
    /// The user namespace denies setgroups (its group map was written unprivileged).
    pub setgroups_denied: bool,
    /// personality(2) to set before exec (OCI `linux.personality`).
    pub personality: Option<libc::c_ulong>,
    /// A descriptor of the creator's that the clone copied and must not keep (the
    /// lock marking a create in progress, which must end with the creator).
    pub creator_only: Option<RawFd>,
    /// Die with the parent (a supervised run); not for OCI containers, whose creator exits.
    pub pdeathsig: bool,
    pub hostname: Option<Vec<u8>>,
    pub loopback_up: bool,
    pub tty: bool,
    pub cwd: CString,
    /// Where to look for the command, in order (its `PATH` search done in advance).
    pub candidates: Vec<CString>,
    pub argv: CStringArray,
    pub envp: CStringArray,
    pub caps: CapSets,
    /// The highest capability number this kernel knows.
    pub cap_last: u32,
    pub rlimits: Vec<(c_int, libc::rlimit)>,
    /// `None`: stay root with no supplementary groups changed.
    pub user: Option<UserIds>,
    pub umask: libc::mode_t,
    pub no_new_privs: bool,
    /// Installed last before exec (or before dropping privileges without no_new_privs).
    pub seccomp: crate::seccomp::Programs,
    /// OCI create: the exec FIFO, a descriptor opened with O_PATH by the parent (the
    /// clone has a copy); the child reports ready, then blocks reopening it for writing
    /// until `start` opens it for reading.
    pub exec_fifo: Option<RawFd>,
}

pub(crate) fn cstr(s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|e: NulError| {
        Error::Invalid(format!(
            "{:?} contains a NUL byte",
            String::from_utf8_lossy(&e.into_vec())
        ))
    })
}

pub(crate) fn path_cstr(p: &Path) -> Result<CString> {
    cstr(p.as_os_str().as_bytes())
}

/// The container's environment: the defaults, then `-e` pairs (a repeated name replaces
/// the earlier value in place).
pub(crate) fn environment(config: &Config, hostname: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), hostname.into()),
    ];
    if config.tty {
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "xterm".into());
        env.push(("TERM".into(), term));
    }
    for (key, value) in &config.env {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

/// The paths `execvp` would try for `command` with this `PATH`.
pub(crate) fn exec_candidates(command: &str, path: &str) -> Vec<String> {
    if command.contains('/') {
        return vec![command.to_owned()];
    }
    path.split(':')
        .map(|dir| {
            // An empty PATH entry means the working directory, as for execvp.
            if dir.is_empty() {
                format!("./{command}")
            } else {
                format!("{}/{command}", dir.trim_end_matches('/'))
            }
        })
        .collect()
}

/// The capability mask to keep.
pub(crate) fn caps_mask(devices_restricted: bool) -> u64 {
    DEFAULT_CAPS
        .iter()
        // Without a devices controller nothing stops a node made with CAP_MKNOD from
        // opening a host disk, so the capability goes.
        .filter(|&&c| devices_restricted || c != CAP_MKNOD)
        .fold(0u64, |mask, &c| mask | (1u64 << c))
}

pub(crate) fn cap_last() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Builds the plan for `config`, with the overlay's directories under `state`.
pub(crate) fn build(
    config: &Config,
    rootfs: &Path,
    state: &Path,
    hostname: &str,
    devices_restricted: bool,
    rootless: bool,
) -> Result<Plan> {
    let merged = state.join("merged");
    let upper = state.join("upper");
    let work = state.join("work");
    for p in [rootfs, state] {
        let s = p.to_string_lossy();
        // overlayfs splits its options on ',' and lowerdir on ':'.
        if s.contains(',') || s.contains(':') {
            return Err(Error::Invalid(format!(
                "{}: overlayfs cannot use a path with ',' or ':'",
                p.display()
            )));
        }
    }
    let in_root = |rel: &str| path_cstr(&merged.join(rel));
    let mut pre = vec![Op::Mount {
        source: cstr("overlay")?,
        target: path_cstr(&merged)?,
        fstype: cstr("overlay")?,
        flags: 0,
        // In a user namespace overlayfs keeps its metadata in user.* xattrs, the
        // trusted.* ones being the host root's.
        data: Some(cstr(format!(
            "lowerdir={},upperdir={},workdir={}{}",
            rootfs.display(),
            upper.display(),
            work.display(),
            if rootless { ",userxattr" } else { "" }
        ))?),
        no_symlink: false,
    }];
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mount = |pre: &mut Vec<Op>,
                 rel: &str,
                 fstype: &str,
                 flags: c_ulong,
                 data: Option<&str>,
                 mode: u32| {
        pre.push(Op::Mkdir {
            path: in_root(rel)?,
            mode,
        });
        pre.push(Op::Mount {
            source: cstr(fstype)?,
            target: in_root(rel)?,
            fstype: cstr(fstype)?,
            flags,
            data: data.map(cstr).transpose()?,
            // proc, sys and dev are directories of the (untrusted) root; the rest are
            // inside the fresh /dev tmpfs.
            no_symlink: !rel.starts_with("dev/"),
        });
        Ok::<(), Error>(())
    };
    mount(&mut pre, "proc", "proc", nosuid_nodev_noexec, None, 0o555)?;
    if rootless && config.net == Net::Host {
        // sysfs may be mounted only from a network namespace of the user namespace's
        // own; with the host's network the host's /sys is bound instead (read-only
        // below, with the masked paths).
        pre.push(Op::Mkdir {
            path: in_root("sys")?,
            mode: 0o555,
        });
        pre.push(Op::Mount {
            source: cstr("/sys")?,
            target: in_root("sys")?,
            fstype: cstr("")?,
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
            no_symlink: true,
        });
    } else {
        mount(
            &mut pre,
            "sys",
            "sysfs",
            nosuid_nodev_noexec | libc::MS_RDONLY,
            None,
            0o555,
        )?;
    }
    mount(
        &mut pre,
        "dev",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        0o755,
    )?;
    mount(
        &mut pre,
        "dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        // A rootless container maps one group, so the tty group (5) is not there.
        Some(if rootless {
            "newinstance,ptmxmode=0666,mode=0620"
        } else {
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        }),
        0o755,
    )?;
    mount(
        &mut pre,
        "dev/shm",
        "tmpfs",
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
        0o1777,
    )?;
    mount(
        &mut pre,
        "dev/mqueue",
        "mqueue",
        nosuid_nodev_noexec,
        None,
        0o755,
    )?;
    for (name, major, minor) in DEVICES {
        let path = in_root(&format!("dev/{name}"))?;
        if rootless {
            // mknod is not allowed in a user namespace: the host's node is bound.
            pre.push(Op::Touch { path: path.clone() });
            pre.push(Op::Mount {
                source: cstr(format!("/dev/{name}"))?,
                target: path,
                fstype: cstr("")?,
                flags: libc::MS_BIND,
                data: None,
                no_symlink: false,
            });
            continue;
        }
        pre.push(Op::Mknod {
            path,
            major: *major,
            minor: *minor,
        });
    }
    for (link, target) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
        ("dev/core", "/proc/kcore"),
    ] {
        pre.push(Op::Symlink {
            target: cstr(target)?,
            link: in_root(link)?,
        });
    }

    let mut post = Vec::new();
    for path in MASKED_PATHS {
        post.push(Op::Mask { path: cstr(*path)? });
    }
    for path in READONLY_PATHS {
        post.push(Op::ReadOnly { path: cstr(*path)? });
    }

    if !config.cwd.starts_with('/') {
        return Err(Error::Invalid(format!(
            "-w {}: the working directory must be an absolute path",
            config.cwd
        )));
    }
    let env = environment(config, hostname);
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let Some(command) = config.command.first() else {
        return Err(Error::Invalid("no command given".into()));
    };
    if command.is_empty() {
        return Err(Error::Invalid("the command is empty".into()));
    }
    let candidates = exec_candidates(command, path)
        .into_iter()
        .map(cstr)
        .collect::<Result<Vec<_>>>()?;
    let argv = config
        .command
        .iter()
        .map(|a| cstr(a.as_str()))
        .collect::<Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<Result<Vec<_>>>()?;

    Ok(Plan {
        pivot: true,
        root_propagation: libc::MS_REC | libc::MS_PRIVATE,
        pre_pivot: pre,
        new_root: path_cstr(&merged)?,
        pause_before_pivot: false,
        post_pivot: post,
        join: Vec::new(),
        cgroup_ns: true,
        userns_root: rootless,
        setgroups_denied: false,
        personality: None,
        creator_only: None,
        pdeathsig: true,
        hostname: Some(hostname.as_bytes().to_vec()),
        loopback_up: config.net == Net::None,
        tty: config.tty,
        cwd: cstr(config.cwd.as_str())?,
        candidates,
        argv: CStringArray::new(argv),
        envp: CStringArray::new(envp),
        caps: CapSets::uniform(caps_mask(devices_restricted)),
        cap_last: cap_last(),
        rlimits: vec![(
            libc::RLIMIT_NOFILE as c_int,
            libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            },
        )],
        user: None,
        umask: 0o022,
        no_new_privs: true,
        seccomp: crate::seccomp::default_filter()?.unwrap_or_default(),
        exec_fifo: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates() {
        assert_eq!(exec_candidates("/bin/sh", "/x"), vec!["/bin/sh"]);
        assert_eq!(exec_candidates("./run", "/x"), vec!["./run"]);
        assert_eq!(
            exec_candidates("ls", "/usr/bin:/bin/::"),
            vec!["/usr/bin/ls", "/bin/ls", "./ls", "./ls"]
        );
    }

    #[test]
    fn env_defaults_and_overrides() {
        let mut config = Config::new("/", vec!["sh".into()]);
        config.env = vec![
            ("PATH".into(), "/bin".into()),
            ("A".into(), "1".into()),
            ("A".into(), "2".into()),
        ];
        let env = environment(&config, "h");
        assert_eq!(env[0], ("PATH".into(), "/bin".into()));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
        assert!(env.contains(&("A".into(), "2".into())));
        assert!(!env.iter().any(|(k, _)| k == "TERM"));
        config.tty = true;
        assert!(environment(&config, "h").iter().any(|(k, _)| k == "TERM"));
    }

    #[test]
    fn caps() {
        let all = caps_mask(true);
        assert_eq!(all.count_ones() as usize, DEFAULT_CAPS.len());
        assert_eq!(all & (1 << 21), 0, "no CAP_SYS_ADMIN");
        assert_eq!(caps_mask(false) & (1 << CAP_MKNOD), 0);
    }

    #[test]
    fn plan_refuses_overlay_separators_and_relative_cwd() {
        let config = Config::new("/a,b", vec!["sh".into()]);
        assert!(build(
            &config,
            Path::new("/a,b"),
            Path::new("/s"),
            "h",
            true,
            false
        )
        .is_err());
        let mut config = Config::new("/r", vec!["sh".into()]);
        config.cwd = "rel".into();
        assert!(build(&config, Path::new("/r"), Path::new("/s"), "h", true, false).is_err());
        config.cwd = "/".into();
        let plan = build(&config, Path::new("/r"), Path::new("/s"), "h", true, false).unwrap();
        assert_eq!(plan.argv.strings().len(), 1);
        assert!(plan.loopback_up);
        assert_eq!(plan.new_root.to_str().unwrap(), "/s/merged");
    }
}
