//! The building blocks of an OCI runtime (`vessel-runc`): create a container's init
//! process and leave it waiting on an exec FIFO, start another process inside a running
//! container, and the cgroup bookkeeping that outlives both.
//!
//! Unlike [`crate::run`], nothing here supervises: `create` returns once the init process
//! is fully set up and blocked just before exec, and the caller exits, leaving the init to
//! its subreaper (containerd's shim). The same [`Plan`] and child code do the work; the
//! spec types here are runtime-neutral (the OCI JSON is parsed by the caller).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::raw::{c_int, c_ulong};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::cgroup::{self, Cgroups};
use crate::child::{ChildFds, Step};
use crate::error::{Error, Result};
use crate::plan::{self, cstr, path_cstr, CStringArray, CapSets, Op, Plan, UserIds};
use crate::run::{self, pipe, read_failure, write_all};
use crate::seccomp::Programs;
use crate::Limits;

/// One entry of OCI `mounts`.
#[derive(Debug, Clone, Default)]
pub struct MountSpec {
    /// Absolute path in the container.
    pub destination: String,
    /// Filesystem type; `bind` (or a `bind`/`rbind` option) makes a bind mount.
    pub kind: String,
    /// Host path of a bind mount (relative: to the bundle), or the filesystem's source.
    pub source: Option<PathBuf>,
    pub options: Vec<String>,
}

/// A device node of OCI `linux.devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Absolute path in the container.
    pub path: String,
    /// `c`, `b`, `u` (a character device too) or `p` (a FIFO).
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    /// Permission bits; runc's default is 0666.
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// personality(2)'s PER_LINUX32 (uname reports i686).
const PER_LINUX32: libc::c_ulong = 0x0008;

/// One line of a user namespace's uid_map or gid_map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// The text of a uid_map or gid_map.
fn map_text(mappings: &[IdMapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect()
}

/// Whether `mappings` map just `own`, the one id a process may map without help.
fn maps_only_own(mappings: &[IdMapping], own: u32) -> bool {
    matches!(mappings, [m] if m.host_id == own && m.size == 1)
}

/// Whether this process runs without root's privileges.
fn rootless() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

/// Writes a new user namespace's maps for process `pid` (before it goes on). Without
/// root's privileges a process may map only its own id (giving up setgroups first for
/// groups); other mappings go through newuidmap and newgidmap, as runc does.
pub(crate) fn write_id_maps(
    pid: libc::pid_t,
    uids: &[IdMapping],
    gids: &[IdMapping],
) -> Result<()> {
    if rootless() {
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        for (helper, file, mappings, own) in [
            ("newuidmap", "uid_map", uids, uid),
            ("newgidmap", "gid_map", gids, gid),
        ] {
            if maps_only_own(mappings, own) {
                if file == "gid_map" {
                    let setgroups = format!("/proc/{pid}/setgroups");
                    fs::write(&setgroups, "deny")
                        .map_err(|e| Error::io(format!("writing {setgroups}"), e))?;
                }
                let path = format!("/proc/{pid}/{file}");
                fs::write(&path, map_text(mappings))
                    .map_err(|e| Error::io(format!("writing {path}"), e))?;
                continue;
            }
            let mut args = vec![pid.to_string()];
            for m in mappings {
                args.extend([m.container_id, m.host_id, m.size].map(|n| n.to_string()));
            }
            let out = std::process::Command::new(helper)
                .args(&args)
                .output()
                .map_err(|e| {
                    Error::io(
                        format!("running {helper} (needed for mappings beyond the user's own id)"),
                        e,
                    )
                })?;
            if !out.status.success() {
                return Err(Error::Invalid(format!(
                    "{helper} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        return Ok(());
    }
    for (file, mappings) in [("uid_map", uids), ("gid_map", gids)] {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        fs::write(&path, map_text(mappings)).map_err(|e| {
            Error::Invalid(format!(
                "linux.{}Mappings: the kernel refused {:?} in {} ({e})",
                &file[..3],
                map_text(mappings),
                path.display()
            ))
        })?;
    }
    Ok(())
}

/// A namespace of the container: new, or joined from `path`.
#[derive(Debug, Clone)]
pub struct NamespaceSpec {
    /// A CLONE_NEW* flag.
    pub kind: c_int,
    pub path: Option<PathBuf>,
}

/// The process to run (OCI `process`).
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    /// `KEY=VALUE` strings, passed as they are.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub caps: CapSets,
    /// (RLIMIT_*, soft, hard)
    pub rlimits: Vec<(c_int, u64, u64)>,
    pub no_new_privs: bool,
    pub terminal: bool,
    pub oom_score_adj: Option<i32>,
}

/// Everything `create` needs (an OCI config.json, reduced).
#[derive(Debug, Clone, Default)]
pub struct InitSpec {
    /// The bundle directory (base of relative paths).
    pub bundle: PathBuf,
    /// The container's root directory (`root.path`, made absolute).
    pub root: PathBuf,
    pub readonly_root: bool,
    pub mounts: Vec<MountSpec>,
    /// Device nodes made in the container after its mounts.
    pub devices: Vec<DeviceSpec>,
    /// A host terminal to bind at /dev/console (a lasting container's console).
    pub console: Option<PathBuf>,
    pub namespaces: Vec<NamespaceSpec>,
    /// `linux.personality` LINUX32: the process reports a 32-bit machine (uname).
    pub personality32: bool,
    /// A new user namespace's mappings: (id inside, id on the host, count).
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
    pub hostname: Option<String>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    /// `linux.rootfsPropagation`: private (default here), slave, shared, ...
    pub rootfs_propagation: Option<String>,
    pub process: ProcessSpec,
    /// `linux.cgroupsPath`, from each hierarchy's root.
    pub cgroups_path: String,
    pub limits: Limits,
    pub seccomp: Programs,
}

/// The cgroups a container lives in, for `kill --all`, `ps`, `exec` and `delete`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupPaths {
    /// The container's own groups, one per hierarchy.
    pub groups: Vec<PathBuf>,
    /// Parent groups created for them (removed at delete when empty).
    pub parents: Vec<PathBuf>,
    /// Groups among `groups` that existed before the container: never removed.
    pub joined: Vec<PathBuf>,
}

impl CgroupPaths {
    /// Every process in the container's groups (the union over hierarchies).
    pub fn pids(&self) -> Vec<libc::pid_t> {
        let mut pids: Vec<libc::pid_t> = Vec::new();
        for dir in &self.groups {
            let text = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in text.lines().filter_map(|l| l.trim().parse().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids.sort_unstable();
        pids
    }

    /// Moves `pid` into every group.
    pub fn add(&self, pid: libc::pid_t) -> Result<()> {
        for dir in &self.groups {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string())
                .map_err(|e| Error::path("joining cgroup", &procs, e))?;
        }
        Ok(())
    }

    /// Writes new limits into the groups (`update`); device rules stay as they are.
    pub fn update(&self, limits: &Limits) -> Result<()> {
        cgroup::update(&self.groups, limits)
    }

    /// Freezes or thaws every process of the container (`pause`, `resume`).
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        cgroup::freeze(&self.groups, frozen)
    }

    /// Whether the container is paused.
    pub fn is_frozen(&self) -> bool {
        cgroup::is_frozen(&self.groups)
    }

    /// The groups' usage figures.
    pub fn stats(&self) -> cgroup::Stats {
        cgroup::stats(&self.groups)
    }

    /// Kills anything left in the groups and removes them (and empty created parents).
    pub fn remove(&self) {
        for dir in self
            .groups
            .iter()
            .rev()
            .filter(|d| !self.joined.contains(d))
        {
            cgroup::remove_group(dir);
        }
        cgroup::remove_parents(&self.parents);
    }
}

/// Runs in the creator while the init waits before pivot_root, given the init's pid:
/// its namespaces exist and its root is mounted. An error fails the create.
pub type BeforePivot<'a> = &'a mut dyn FnMut(libc::pid_t) -> Result<()>;

/// How to create: where the exec FIFO is, and the console socket (a connected unix
/// socket the pty master goes to, runc's `--console-socket` protocol).
pub struct CreateOptions<'a> {
    pub exec_fifo: PathBuf,
    pub console_socket: Option<OwnedFd>,
    /// Kill the init if the creating process dies (`run` without `--detach`).
    pub die_with_parent: bool,
    /// The OCI hooks of the create, where the spec puts them.
    pub before_pivot: Option<BeforePivot<'a>>,
    /// The creator's lock on the container's state directory: the init must not
    /// hold it, so that it is free once the creator is gone.
    pub creator_lock: Option<RawFd>,
}

/// The result of `create`.
#[derive(Debug)]
pub struct Created {
    pub pid: libc::pid_t,
    pub cgroups: CgroupPaths,
}

/// The capabilities this runtime knows, without `CAP_`, by number.
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The bit of each capability name (`CAP_` optional, any case).
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITY_NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| i as u32)
}

/// Mount flags and the filesystem data of OCI mount options.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct MountOptions {
    pub flags: c_ulong,
    /// Flags a bind mount needs a remount for (ro, nosuid, ...).
    pub remount_flags: c_ulong,
    pub propagation: c_ulong,
    pub bind: bool,
    pub recursive: bool,
    pub data: Vec<String>,
}

pub(crate) fn parse_mount_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    for option in options {
        let (set, clear): (c_ulong, c_ulong) = match option.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "bind" => {
                out.bind = true;
                continue;
            }
            "rbind" => {
                out.bind = true;
                out.recursive = true;
                continue;
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let base = match option.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                };
                let rec = if option.starts_with('r') {
                    libc::MS_REC
                } else {
                    0
                };
                out.propagation = base | rec;
                continue;
            }
            _ => {
                out.data.push(option.clone());
                continue;
            }
        };
        out.flags = (out.flags | set) & !clear;
    }
    out.remount_flags = out.flags
        & (libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | libc::MS_NOATIME
            | libc::MS_NODIRATIME
            | libc::MS_RELATIME
            | libc::MS_STRICTATIME);
    out
}

/// `root` joined with the container path `path`, following symlinks as the container
/// would see them (clamped to `root`), so that a link in the root cannot send a mount
/// to a host path. Missing components are appended as they are.
pub fn secure_join(root: &Path, path: &str) -> PathBuf {
    let mut pending: Vec<String> = path
        .split('/')
        .rev()
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(component) = pending.pop() {
        match component.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&component);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && links < 255 => {
                links += 1;
                let Ok(target) = fs::read_link(&candidate) else {
                    resolved.push(component);
                    continue;
                };
                if target.is_absolute() {
                    resolved.clear();
                }
                for part in target.components().rev() {
                    if let Component::Normal(p) = part {
                        pending.push(p.to_string_lossy().into_owned());
                    } else if part == Component::ParentDir {
                        pending.push("..".into());
                    }
                }
            }
            _ => resolved.push(component),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    out
}

fn is_cgroup2_host() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A bind mount of `source` at `target` (never through a symlink), then
/// remounted with `flags`: the bind itself ignores them.
fn bind_remounted(
    ops: &mut Vec<Op>,
    source: CString,
    target: CString,
    flags: libc::c_ulong,
) -> Result<()> {
    ops.push(Op::Mount {
        source,
        target: target.clone(),
        fstype: cstr("")?,
        flags: libc::MS_BIND,
        data: None,
        no_symlink: true,
    });
    ops.push(Op::Remount { target, flags });
    Ok(())
}

/// A v1 or hybrid host's cgroup mount, as runc makes it: a tmpfs at `target` holding
/// one mount per v1 hierarchy of the container, named as on the host (`memory`,
/// `systemd`), with a link per controller of a shared hierarchy
/// (`cpu` -> `cpu,cpuacct`). Each shows the container's own group: a cgroup mount in
/// the container's cgroup namespace, or a bind mount of the group without one. `flags`
/// (the config's: read-only, ...) apply to each and, last, to the tmpfs.
fn v1_cgroup_ops(
    target: &Path,
    hierarchies: &[cgroup::Known],
    cgroup_ns: bool,
    flags: c_ulong,
) -> Result<Vec<Op>> {
    let target_c = path_cstr(target)?;
    let safe = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut ops = vec![
        Op::MkdirAll {
            path: target_c.clone(),
        },
        Op::Mount {
            source: cstr("tmpfs")?,
            target: target_c.clone(),
            fstype: cstr("tmpfs")?,
            flags: safe,
            data: Some(cstr("mode=755")?),
            no_symlink: true,
        },
    ];
    let mut sorted: Vec<&cgroup::Known> = hierarchies.iter().collect();
    sorted.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    // A hybrid host's v2 hierarchy is left out, as runc leaves it.
    for known in sorted.into_iter().filter(|k| !k.v2) {
        let Some(name) = known.mountpoint.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let sub = target.join(name);
        let sub_c = path_cstr(&sub)?;
        ops.push(Op::MkdirAll {
            path: sub_c.clone(),
        });
        if cgroup_ns {
            ops.push(Op::Mount {
                source: cstr("cgroup")?,
                target: sub_c.clone(),
                fstype: cstr("cgroup")?,
                flags: flags | safe,
                data: Some(cstr(known.controllers.join(","))?),
                no_symlink: true,
            });
        } else {
            bind_remounted(
                &mut ops,
                path_cstr(&known.dir)?,
                sub_c.clone(),
                (flags & libc::MS_RDONLY) | safe,
            )?;
        }
        if name.contains(',') {
            for controller in known.controllers.iter().filter(|c| !c.contains('=')) {
                ops.push(Op::Symlink {
                    target: cstr(name)?,
                    link: path_cstr(&target.join(controller))?,
                });
            }
        }
    }
    if flags & libc::MS_RDONLY != 0 {
        ops.push(Op::Remount {
            target: target_c,
            flags: libc::MS_RDONLY | safe,
        });
    }
    Ok(ops)
}

/// The mount operations of an OCI spec, before pivot_root (host paths under `root`).
fn mount_ops(
    spec: &InitSpec,
    root: &Path,
    hierarchies: &[cgroup::Known],
    cgroup_ns: bool,
) -> Result<(Vec<Op>, bool)> {
    let root_c = path_cstr(root)?;
    // pivot_root needs the new root to be a mount point: bind it onto itself.
    let mut ops = vec![Op::Mount {
        source: root_c.clone(),
        target: root_c,
        fstype: cstr("")?,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
        no_symlink: false,
    }];
    let mut dev_is_tmpfs = false;
    for mount in &spec.mounts {
        if !mount.destination.starts_with('/') {
            return Err(Error::Invalid(format!(
                "mount destination {:?} is not an absolute path",
                mount.destination
            )));
        }
        let target = secure_join(root, &mount.destination);
        let target_c = path_cstr(&target)?;
        let opts = parse_mount_options(&mount.options);
        let bind = opts.bind || mount.kind == "bind";
        if bind {
            let Some(source) = &mount.source else {
                return Err(Error::Invalid(format!(
                    "bind mount on {} has no source",
                    mount.destination
                )));
            };
            let source = if source.is_absolute() {
                source.clone()
            } else {
                spec.bundle.join(source)
            };
            let meta = fs::metadata(&source).map_err(|e| {
                Error::path(
                    &format!("bind mount on {}: source", mount.destination),
                    &source,
                    e,
                )
            })?;
            if meta.is_dir() {
                ops.push(Op::MkdirAll {
                    path: target_c.clone(),
                });
            } else {
                if let Some(parent) = target.parent() {
                    ops.push(Op::MkdirAll {
                        path: path_cstr(parent)?,
                    });
                }
                ops.push(Op::Touch {
                    path: target_c.clone(),
                });
            }
            ops.push(Op::Mount {
                source: path_cstr(&source)?,
                target: target_c.clone(),
                fstype: cstr("")?,
                flags: libc::MS_BIND | if opts.recursive { libc::MS_REC } else { 0 },
                data: None,
                no_symlink: false,
            });
            if opts.remount_flags != 0 {
                ops.push(Op::Remount {
                    target: target_c.clone(),
                    flags: opts.remount_flags,
                });
            }
        } else {
            let mut fstype = mount.kind.clone();
            let mut data = opts.data.join(",");
            let flags = opts.flags;
            if fstype == "cgroup" || fstype == "cgroup2" {
                if is_cgroup2_host() && !cgroup_ns {
                    // cgroup2 may be mounted only from a cgroup namespace of the
                    // container's own: its group is bound instead, as runc does.
                    if let Some(group) = hierarchies.iter().find(|k| k.v2) {
                        ops.push(Op::MkdirAll {
                            path: target_c.clone(),
                        });
                        bind_remounted(
                            &mut ops,
                            path_cstr(&group.dir)?,
                            target_c.clone(),
                            (opts.flags & libc::MS_RDONLY)
                                | libc::MS_NOSUID
                                | libc::MS_NODEV
                                | libc::MS_NOEXEC,
                        )?;
                    }
                    continue;
                } else if is_cgroup2_host() {
                    // The container's own group, as it is in a cgroup namespace.
                    fstype = "cgroup2".into();
                    data.clear();
                } else {
                    ops.extend(v1_cgroup_ops(&target, hierarchies, cgroup_ns, opts.flags)?);
                    continue;
                }
            }
            if mount.destination == "/dev" && fstype == "tmpfs" {
                dev_is_tmpfs = true;
            }
            let source = match &mount.source {
                Some(s) => path_cstr(s)?,
                None => cstr(fstype.as_str())?,
            };
            ops.push(Op::MkdirAll {
                path: target_c.clone(),
            });
            ops.push(Op::Mount {
                source,
                target: target_c.clone(),
                fstype: cstr(fstype.as_str())?,
                flags,
                data: if data.is_empty() {
                    None
                } else {
                    Some(cstr(data)?)
                },
                no_symlink: true,
            });
        }
        if opts.propagation != 0 {
            ops.push(Op::Propagate {
                target: target_c,
                flags: opts.propagation,
            });
        }
    }
    Ok((ops, dev_is_tmpfs))
}

/// Checks that the host's node at `host`, bound in a user namespace in place of a
/// `linux.devices` entry, is the device asked for.
fn check_host_node(host: &Path, kind: libc::mode_t, major: u32, minor: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(host) else {
        return Ok(()); // bind_device says the host has none
    };
    let same = meta.mode() & libc::S_IFMT == kind
        && (kind == libc::S_IFIFO || meta.rdev() == libc::makedev(major, minor));
    if same {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "linux.devices: {}: the host's node is not the device asked for ({major}:{minor}), and in a user namespace a device is bound from the host's",
            host.display()
        )))
    }
}

/// A bind mount of the host's node at `host` onto `target` (inside a user namespace,
/// where mknod is not allowed, as runc does).
fn bind_device(host: &Path, target: &Path) -> Result<Vec<Op>> {
    if !host.exists() {
        return Err(Error::Invalid(format!(
            "{}: the host has no such node to bind (in a user namespace, devices are bound from the host's)",
            host.display()
        )));
    }
    let target_c = path_cstr(target)?;
    Ok(vec![
        Op::Touch {
            path: target_c.clone(),
        },
        // Touch refuses a symlink at the target (O_NOFOLLOW), so this binds onto the
        // file it made or found.
        Op::Mount {
            source: path_cstr(host)?,
            target: target_c,
            fstype: cstr("")?,
            flags: libc::MS_BIND,
            data: None,
            no_symlink: false,
        },
    ])
}

/// The device nodes and links runc creates in a tmpfs `/dev` (bound from the host's in
/// a user namespace).
fn device_ops(root: &Path, userns: bool) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    let in_root = |rel: &str| path_cstr(&root.join(rel));
    for (name, major, minor) in plan::DEVICES {
        if userns {
            ops.extend(bind_device(
                &Path::new("/dev").join(name),
                &root.join("dev").join(name),
            )?);
            continue;
        }
        ops.push(Op::Mknod {
            path: in_root(&format!("dev/{name}"))?,
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
        ops.push(Op::Symlink {
            target: cstr(target)?,
            link: in_root(link)?,
        });
    }
    Ok(ops)
}

/// The nodes of `linux.devices`, under `root`, each with its missing parents (in a user
/// namespace, bind mounts of the host's nodes at the same paths).
fn oci_device_ops(root: &Path, devices: &[DeviceSpec], userns: bool) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    for device in devices {
        if !is_clean_container_path(&device.path) || device.path.trim_end_matches('/').is_empty() {
            return Err(Error::Invalid(format!(
                "linux.devices: {:?} is not an absolute path without '..'",
                device.path
            )));
        }
        let kind = match device.kind.as_str() {
            "c" | "u" => libc::S_IFCHR,
            "b" => libc::S_IFBLK,
            "p" => libc::S_IFIFO,
            other => {
                return Err(Error::Invalid(format!(
                    "linux.devices: {}: type {other:?} is not c, b, u or p",
                    device.path
                )))
            }
        };
        let number = |n: i64, what: &str| {
            u32::try_from(n).map_err(|_| {
                Error::Invalid(format!(
                    "linux.devices: {}: {what} number {n} is out of range",
                    device.path
                ))
            })
        };
        let mode = device.file_mode.unwrap_or(0o666);
        if mode & !0o7777 != 0 {
            return Err(Error::Invalid(format!(
                "linux.devices: {}: fileMode {mode:#o} has bits beyond the permissions",
                device.path
            )));
        }
        let target = secure_join(root, &device.path);
        if let Some(parent) = target.parent() {
            ops.push(Op::MkdirAll {
                path: path_cstr(parent)?,
            });
        }
        if userns {
            let host = Path::new(&device.path);
            check_host_node(
                host,
                kind,
                number(device.major, "major")?,
                number(device.minor, "minor")?,
            )?;
            ops.extend(bind_device(host, &target)?);
            continue;
        }
        ops.push(Op::Device {
            path: path_cstr(&target)?,
            kind,
            mode,
            major: number(device.major, "major")?,
            minor: number(device.minor, "minor")?,
            uid: device.uid.unwrap_or(0),
            gid: device.gid.unwrap_or(0),
        });
    }
    Ok(ops)
}

/// argv, envp and the exec candidates of a process.
fn command_parts(process: &ProcessSpec) -> Result<(Vec<CString>, CStringArray, CStringArray)> {
    let Some(command) = process.args.first().filter(|c| !c.is_empty()) else {
        return Err(Error::Invalid("process.args is empty: no command".into()));
    };
    let path = process
        .env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::DEFAULT_PATH);
    let candidates = plan::exec_candidates(command, path)
        .into_iter()
        .map(cstr)
        .collect::<Result<Vec<_>>>()?;
    let argv = process
        .args
        .iter()
        .map(|a| cstr(a.as_str()))
        .collect::<Result<Vec<_>>>()?;
    let envp = process
        .env
        .iter()
        .map(|e| cstr(e.as_str()))
        .collect::<Result<Vec<_>>>()?;
    Ok((candidates, CStringArray::new(argv), CStringArray::new(envp)))
}

fn process_plan(process: &ProcessSpec, seccomp: &Programs) -> Result<Plan> {
    if !process.cwd.starts_with('/') {
        return Err(Error::Invalid(format!(
            "process.cwd {:?} must be an absolute path",
            process.cwd
        )));
    }
    let (candidates, argv, envp) = command_parts(process)?;
    Ok(Plan {
        pivot: false,
        root_propagation: libc::MS_REC | libc::MS_PRIVATE,
        pre_pivot: Vec::new(),
        new_root: cstr("/")?,
        pause_before_pivot: false,
        post_pivot: Vec::new(),
        join: Vec::new(),
        cgroup_ns: false,
        userns_root: false,
        setgroups_denied: false,
        personality: None,
        creator_only: None,
        pdeathsig: false,
        hostname: None,
        loopback_up: false,
        tty: process.terminal,
        cwd: cstr(process.cwd.as_str())?,
        candidates,
        argv,
        envp,
        caps: process.caps,
        cap_last: plan::cap_last(),
        rlimits: process
            .rlimits
            .iter()
            .map(|&(resource, soft, hard)| {
                (
                    resource,
                    libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    },
                )
            })
            .collect(),
        user: Some(UserIds {
            uid: process.uid,
            gid: process.gid,
            groups: process.additional_gids.clone(),
        }),
        umask: process.umask.unwrap_or(0o022),
        no_new_privs: process.no_new_privs,
        seccomp: seccomp.clone(),
        exec_fifo: None,
    })
}

fn propagation_flags(name: Option<&str>) -> Result<c_ulong> {
    Ok(match name.unwrap_or("") {
        "" | "rprivate" => libc::MS_REC | libc::MS_PRIVATE,
        "private" => libc::MS_PRIVATE,
        "rslave" => libc::MS_REC | libc::MS_SLAVE,
        "slave" => libc::MS_SLAVE,
        "rshared" => libc::MS_REC | libc::MS_SHARED,
        "shared" => libc::MS_SHARED,
        "runbindable" => libc::MS_REC | libc::MS_UNBINDABLE,
        "unbindable" => libc::MS_UNBINDABLE,
        other => {
            return Err(Error::Invalid(format!(
                "linux.rootfsPropagation {other:?}: expected private, slave, shared or unbindable (r-prefixed for recursive)"
            )))
        }
    })
}

fn open_namespace(path: &Path) -> Result<OwnedFd> {
    fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| Error::path("opening namespace", path, e))
}

/// Creates the container: its cgroups, then its init process in new namespaces, set up
/// and blocked on the exec FIFO. On error nothing is left behind.
pub fn create(spec: &InitSpec, options: CreateOptions<'_>) -> Result<Created> {
    let root = fs::canonicalize(&spec.root).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Invalid(format!(
                "root.path {}: no such directory",
                spec.root.display()
            ))
        } else {
            Error::path("resolving root.path", &spec.root, e)
        }
    })?;
    if !root.is_dir() {
        return Err(Error::Invalid(format!(
            "root.path {}: not a directory",
            root.display()
        )));
    }
    if let Some(name) = &spec.hostname {
        if !spec.namespaces.iter().any(|n| n.kind == libc::CLONE_NEWUTS) {
            return Err(Error::Invalid(
                "hostname is set but the container has no UTS namespace".into(),
            ));
        }
        crate::check_hostname(name)?;
    }
    if let Some(bytes) = spec.limits.memory {
        crate::check_memory(bytes, &format!("{bytes}"))?;
    }
    let mut new_flags: c_int = 0;
    let mut join: Vec<(OwnedFd, c_int)> = Vec::new();
    // A PID namespace is entered at birth: the creator enters it (for its children)
    // around the clone.
    let mut pid_ns: Option<OwnedFd> = None;
    for ns in &spec.namespaces {
        match &ns.path {
            None => new_flags |= ns.kind,
            Some(path) if ns.kind == libc::CLONE_NEWPID => pid_ns = Some(open_namespace(path)?),
            Some(path) => join.push((open_namespace(path)?, ns.kind)),
        }
    }
    // Joined in this order: the mount namespace last, as it changes root and cwd.
    let rank = |kind: c_int| {
        [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWNS,
        ]
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0)
    };
    join.sort_by_key(|(_, kind)| rank(*kind));
    if new_flags & libc::CLONE_NEWNS == 0 && !join.iter().any(|(_, k)| *k == libc::CLONE_NEWNS) {
        return Err(Error::Invalid(
            "the container needs a mount namespace of its own or joined (linux.namespaces has no \"mount\")".into(),
        ));
    }
    let cgroup_ns = new_flags & libc::CLONE_NEWCGROUP != 0;
    let clone_flags = new_flags & !libc::CLONE_NEWCGROUP;
    let new_userns = new_flags & libc::CLONE_NEWUSER != 0;
    let in_userns = new_userns || join.iter().any(|(_, k)| *k == libc::CLONE_NEWUSER);
    if new_userns && (spec.uid_mappings.is_empty() || spec.gid_mappings.is_empty()) {
        return Err(Error::Invalid(
            "a new user namespace needs linux.uidMappings and linux.gidMappings".into(),
        ));
    }
    let has_mappings = !spec.uid_mappings.is_empty() || !spec.gid_mappings.is_empty();
    if has_mappings && !new_userns {
        return Err(Error::Invalid(
            "linux.uidMappings and gidMappings need a new user namespace in linux.namespaces"
                .into(),
        ));
    }
    let id_maps = new_userns.then_some((&spec.uid_mappings[..], &spec.gid_mappings[..]));

    let cgroups = match Cgroups::create_at(&spec.cgroups_path, &spec.limits) {
        Ok(cgroups) => cgroups,
        // A rootless container without limits goes without cgroups (runc's rule too);
        // with limits it needs groups its user may write.
        Err(e) if rootless() && spec.limits == Limits::default() => {
            tracing::debug!("rootless, without cgroups: {e}");
            Cgroups::default()
        }
        Err(e) if rootless() => {
            return Err(Error::Invalid(format!(
                "limits in a rootless container need a cgroup this user may write (a delegated cgroup v2 subtree): {e}"
            )))
        }
        Err(e) => return Err(e),
    };
    // In a user namespace cgroup v1 cannot be mounted: the groups are bound instead.
    // A rootless container without groups of its own sees its creator's.
    let mut hierarchies = cgroups.hierarchies();
    if hierarchies.is_empty() && rootless() {
        hierarchies = cgroup::own_hierarchies();
    }
    let (mut pre, dev_is_tmpfs) = mount_ops(spec, &root, &hierarchies, cgroup_ns && !in_userns)?;
    if dev_is_tmpfs {
        pre.extend(device_ops(&root, in_userns)?);
    }
    pre.extend(oci_device_ops(&root, &spec.devices, in_userns)?);
    if let Some(console) = &spec.console {
        pre.extend(bind_device(console, &secure_join(&root, "/dev/console"))?);
    }
    let mut post = Vec::new();
    if let Some(adj) = spec.process.oom_score_adj {
        post.push(Op::WriteFile {
            path: cstr("/proc/self/oom_score_adj")?,
            data: cstr(adj.to_string())?,
        });
    }
    for (key, value) in &spec.sysctl {
        if key.contains('/') || key.contains("..") {
            return Err(Error::Invalid(format!("sysctl {key:?}: not a sysctl name")));
        }
        post.push(Op::WriteFile {
            path: cstr(format!("/proc/sys/{}", key.replace('.', "/")))?,
            data: cstr(value.as_str())?,
        });
    }
    if spec.readonly_root {
        post.push(Op::Remount {
            target: cstr("/")?,
            flags: libc::MS_RDONLY,
        });
    }
    for path in &spec.masked_paths {
        post.push(Op::Mask {
            path: cstr(path.as_str())?,
        });
    }
    for path in &spec.readonly_paths {
        post.push(Op::ReadOnly {
            path: cstr(path.as_str())?,
        });
    }

    let mut plan = process_plan(&spec.process, &spec.seccomp)?;
    plan.pivot = true;
    plan.root_propagation = propagation_flags(spec.rootfs_propagation.as_deref())?;
    plan.pre_pivot = pre;
    plan.new_root = path_cstr(&root)?;
    plan.post_pivot = post;
    plan.join = join
        .iter()
        .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
        .collect();
    plan.cgroup_ns = cgroup_ns;
    plan.userns_root = in_userns;
    plan.personality = spec.personality32.then_some(PER_LINUX32);
    // Written by write_id_maps when it maps a rootless user's own group.
    // SAFETY: getgid has no preconditions.
    plan.setgroups_denied =
        new_userns && rootless() && maps_only_own(&spec.gid_mappings, unsafe { libc::getgid() });
    plan.pdeathsig = options.die_with_parent;
    plan.hostname = spec.hostname.as_ref().map(|h| h.as_bytes().to_vec());
    plan.loopback_up = clone_flags & libc::CLONE_NEWNET != 0
        && !join.iter().any(|(_, k)| *k == libc::CLONE_NEWNET);
    let fifo = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&options.exec_fifo)
        .map_err(|e| Error::path("opening the exec FIFO", &options.exec_fifo, e))?;
    plan.exec_fifo = Some(fifo.as_raw_fd());
    plan.pause_before_pivot = options.before_pivot.is_some();
    plan.creator_only = options.creator_lock;
    if spec.process.terminal && options.console_socket.is_none() {
        return Err(Error::Invalid(
            "process.terminal is true but no --console-socket was given".into(),
        ));
    }

    let pid = start_child(
        &plan,
        clone_flags,
        id_maps,
        pid_ns.as_ref(),
        &cgroups,
        options.console_socket,
        options.before_pivot,
        spec,
    )?;
    drop(join);
    let (groups, parents, joined) = cgroups.keep();
    Ok(Created {
        pid,
        cgroups: CgroupPaths {
            groups,
            parents,
            joined,
        },
    })
}

/// Clones the child, puts it in the cgroups and waits for its report: Ready (OCI init)
/// or a successful exec (EOF). On failure the child is killed and reaped.
#[allow(clippy::too_many_arguments)]
fn start_child(
    plan: &Plan,
    clone_flags: c_int,
    id_maps: Option<(&[IdMapping], &[IdMapping])>,
    pid_ns: Option<&OwnedFd>,
    cgroups: &Cgroups,
    console_socket: Option<OwnedFd>,
    before_pivot: Option<BeforePivot<'_>>,
    spec: &InitSpec,
) -> Result<libc::pid_t> {
    let (sync_read, sync_write) = pipe()?;
    let (error_read, error_write) = pipe()?;
    let fds = ChildFds {
        sync_read: sync_read.as_raw_fd(),
        error_write: error_write.as_raw_fd(),
        tty_socket: console_socket.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        parent_ends: [sync_write.as_raw_fd(), error_read.as_raw_fd()],
    };
    let child = match pid_ns {
        Some(target) => {
            let own = open_namespace(Path::new("/proc/self/ns/pid"))?;
            // SAFETY: setns on descriptors we own; it changes only the namespace this
            // thread's children are born in, and it is set back right after the clone,
            // so that the hooks and every later child are the runtime's.
            unsafe {
                if libc::setns(target.as_raw_fd(), libc::CLONE_NEWPID) == -1 {
                    return Err(Error::last_os(
                        "joining the PID namespace of linux.namespaces",
                    ));
                }
                let child = run::spawn_with(plan, clone_flags, fds);
                if libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) == -1 {
                    // The child (if any) is killed by its guard.
                    return Err(Error::last_os("returning to the runtime's PID namespace"));
                }
                child?
            }
        }
        None => run::spawn_with(plan, clone_flags, fds)?,
    };
    drop((sync_read, error_write, console_socket));
    if let Some((uids, gids)) = id_maps {
        // The child waits on the sync pipe until its ids are mapped.
        write_id_maps(child.pid, uids, gids)?;
    }
    cgroups.add(child.pid)?;
    start_and_report(
        child,
        sync_write,
        error_read,
        plan,
        Role::Init(before_pivot),
        &spec.process,
    )
}

/// What a started child is: an OCI init, which reports Ready, with what to run when it
/// pauses before pivot_root; or a process exec'd into a running container.
enum Role<'a> {
    Init(Option<BeforePivot<'a>>),
    Exec,
}

/// Lets the child go on and reads its report (after the hooks, for an init that pauses
/// before pivot_root).
fn start_and_report(
    mut child: run::Child,
    sync_write: OwnedFd,
    error_read: OwnedFd,
    plan: &Plan,
    role: Role<'_>,
    process: &ProcessSpec,
) -> Result<libc::pid_t> {
    write_all(sync_write.as_raw_fd(), &[1]).map_err(|e| Error::io("starting the container", e))?;
    let mut report = read_failure(error_read.as_raw_fd())?;
    let init = matches!(role, Role::Init(_));
    if let (Some(paused), Role::Init(Some(before_pivot))) = (report, role) {
        if paused.step == Step::BeforePivot {
            if let Err(e) = before_pivot(child.pid) {
                // SAFETY: kill on our own child, which is waiting and not yet reaped.
                unsafe { libc::kill(child.pid, libc::SIGKILL) };
                child.wait()?;
                return Err(e);
            }
            write_all(sync_write.as_raw_fd(), &[1])
                .map_err(|e| Error::io("resuming the container's set-up", e))?;
            report = read_failure(error_read.as_raw_fd())?;
        }
    }
    drop(sync_write);
    let cmd = process.args.first().map_or("", |c| c.as_str());
    match report {
        Some(f) if f.step == Step::Ready && init => Ok(child.release()),
        None if !init => Ok(child.release()),
        None => {
            child.wait()?;
            Err(Error::Invalid(
                "the container's init process exited during set-up".into(),
            ))
        }
        Some(failure) => {
            child.wait()?;
            Err(run::describe_failure(failure, plan, cmd, &process.cwd))
        }
    }
}

/// Runs `process` inside the running container whose init is `pid`: in its namespaces
/// and cgroups. Returns the new process's pid once it has exec'd.
pub fn exec(
    pid: libc::pid_t,
    cgroups: &CgroupPaths,
    process: &ProcessSpec,
    seccomp: &Programs,
    console_socket: Option<OwnedFd>,
) -> Result<libc::pid_t> {
    if process.terminal && console_socket.is_none() {
        return Err(Error::Invalid(
            "process.terminal is true but no --console-socket was given".into(),
        ));
    }
    let mut plan = process_plan(process, seccomp)?;
    // The order matters: the user namespace first, as the others belong to it; mount
    // last, as it changes root and cwd.
    let kinds = [
        ("user", libc::CLONE_NEWUSER),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ];
    let own = |name: &str| fs::read_link(format!("/proc/self/ns/{name}")).ok();
    let mut join = Vec::new();
    for (name, kind) in kinds {
        let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
        let theirs = fs::read_link(&path).map_err(|e| Error::path("reading", &path, e))?;
        // Joining one's own namespace is harmless but needs privileges for nothing.
        if Some(&theirs) != own(name).as_ref() {
            join.push((open_namespace(&path)?, kind));
        }
    }
    plan.join = join
        .iter()
        .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
        .collect();
    // A process enters a PID namespace only at its creation: set this process's
    // namespace for children, then clone.
    let pid_ns = PathBuf::from(format!("/proc/{pid}/ns/pid"));
    let theirs = fs::read_link(&pid_ns).map_err(|e| Error::path("reading", &pid_ns, e))?;
    if Some(&theirs) != own("pid").as_ref() {
        let fd = open_namespace(&pid_ns)?;
        // SAFETY: setns on a descriptor we own.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) } == -1 {
            return Err(Error::last_os("joining the container's PID namespace"));
        }
    }
    let (sync_read, sync_write) = pipe()?;
    let (error_read, error_write) = pipe()?;
    let fds = ChildFds {
        sync_read: sync_read.as_raw_fd(),
        error_write: error_write.as_raw_fd(),
        tty_socket: console_socket.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        parent_ends: [sync_write.as_raw_fd(), error_read.as_raw_fd()],
    };
    let child = run::spawn_with(&plan, 0, fds)?;
    drop((sync_read, error_write, console_socket, join));
    for dir in &cgroups.groups {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, child.pid.to_string())
            .map_err(|e| Error::path("joining cgroup", &procs, e))?;
    }
    start_and_report(child, sync_write, error_read, &plan, Role::Exec, process)
}

/// Makes `command` start in the namespaces of process `pid` (a container's init): its
/// user namespace first (the others belong to it), then its IPC, UTS, network, PID
/// (for the command's children), cgroup and mount namespaces,
/// those that differ from this process's. With the mount namespace comes that
/// namespace's root: after the init's pivot_root, the container's. For the OCI hooks
/// that run in the container's namespaces.
pub fn in_namespaces_of(pid: libc::pid_t, command: &mut std::process::Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let own = |name: &str| fs::read_link(format!("/proc/self/ns/{name}")).ok();
    let mut fds: Vec<(OwnedFd, c_int)> = Vec::new();
    for (name, kind) in [
        ("user", libc::CLONE_NEWUSER),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
        let theirs = fs::read_link(&path).map_err(|e| Error::path("reading", &path, e))?;
        if Some(&theirs) != own(name).as_ref() {
            fds.push((open_namespace(&path)?, kind));
        }
    }
    let joins: Vec<(c_int, c_int)> = fds.iter().map(|(fd, k)| (fd.as_raw_fd(), *k)).collect();
    // SAFETY: the closure runs in the forked child before exec and makes only setns
    // calls (async-signal-safe) on descriptors that stay open until the command is
    // spawned: `fds` moves into the closure, which the Command keeps.
    unsafe {
        command.pre_exec(move || {
            let _keep = &fds;
            for &(fd, kind) in &joins {
                if libc::setns(fd, kind) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Whether `path` names an absolute container path without `..` (masked paths, ...).
pub fn is_clean_container_path(path: &str) -> bool {
    path.starts_with('/')
        && !Path::new(path)
            .components()
            .any(|c| c == Component::ParentDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = parse_mount_options(&[
            "nosuid".into(),
            "ro".into(),
            "rbind".into(),
            "rprivate".into(),
            "mode=755".into(),
        ]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_RDONLY);
        assert_eq!(o.remount_flags, o.flags);
        assert_eq!(o.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(o.data, vec!["mode=755".to_string()]);
        assert_eq!(parse_mount_options(&["ro".into(), "rw".into()]).flags, 0);
    }

    #[test]
    fn caps_by_name() {
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("sys_admin"), Some(21));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_NOPE"), None);
    }

    #[test]
    fn secure_join_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
        assert_eq!(secure_join(root, "/abs/x"), root.join("etc/x"));
        assert_eq!(secure_join(root, "/up/x"), root.join("x"));
        assert_eq!(secure_join(root, "/rel/y"), root.join("real/y"));
        assert_eq!(secure_join(root, "/../../z"), root.join("z"));
        assert!(is_clean_container_path("/proc/kcore"));
        assert!(!is_clean_container_path("/proc/../etc"));
        assert!(!is_clean_container_path("proc"));
    }
}
