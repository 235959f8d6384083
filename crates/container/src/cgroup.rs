//! Per-container cgroups on cgroup v1, v2 and hybrid hosts.
//!
//! Each controller the container needs is looked up where the host has it: a v1
//! hierarchy that has it bound wins (that is where a hybrid host runs it), else the v2
//! (unified) hierarchy if the controller is available there. The container's group is a
//! child `vessel-<id>` of *this process's own* group in that hierarchy, so whatever
//! supervises vessel (and limits it) keeps accounting for its containers.
//!
//! [`Cgroups`] removes every group it created when dropped, killing any task left in one
//! first, so no path (errors included) leaks a group.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::resources::Setting;
use crate::Limits;

/// Devices a container may use (runc's default allow list); everything else is denied.
/// `m` on all lets it mknod nodes it cannot open, as runc allows.
const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",    // null
    "c 1:5 rwm",    // zero
    "c 1:7 rwm",    // full
    "c 1:8 rwm",    // random
    "c 1:9 rwm",    // urandom
    "c 5:0 rwm",    // tty
    "c 5:2 rwm",    // ptmx
    "c 10:200 rwm", // tun
    "c 136:* rwm",  // pts
];

/// A cgroup filesystem mount from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    pub mountpoint: PathBuf,
    /// The path inside the hierarchy that is mounted there (usually `/`).
    pub root: String,
    pub v2: bool,
    /// v1: the controllers bound to this hierarchy (from the super options).
    pub controllers: Vec<String>,
}

/// One line of /proc/self/cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    /// Empty for the v2 line (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts in a mountinfo text.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mountpoint), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let super_opts = right.get(2).copied().unwrap_or("");
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            // Named hierarchies (`name=systemd`) count as controllers of that name,
            // as /proc/self/cgroup lists them.
            super_opts
                .split(',')
                .filter(|o| {
                    (!o.contains('=') || o.starts_with("name=")) && *o != "rw" && *o != "ro"
                })
                .map(str::to_owned)
                .collect()
        };
        mounts.push(CgroupMount {
            mountpoint: PathBuf::from(unescape(mountpoint)),
            root: unescape(root),
            v2,
            controllers,
        });
    }
    mounts
}

/// The lines of a /proc/PID/cgroup text.
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// The directory of the group `path` (as /proc/self/cgroup names it) under `mount`.
fn group_dir(mount: &CgroupMount, path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    // A group outside what is mounted (another cgroup namespace) cannot be reached by
    // path; the mount's top is the nearest place we can use.
    let relative = path.strip_prefix(root).unwrap_or("");
    let relative = relative.trim_start_matches('/');
    if relative.is_empty() {
        mount.mountpoint.clone()
    } else {
        mount.mountpoint.join(relative)
    }
}

/// Where each needed controller lives: (parent group dir, v2?, controllers there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub parent: PathBuf,
    pub v2: bool,
    pub controllers: Vec<&'static str>,
}

/// Decides, for each controller in `needed`, which hierarchy and parent group to use.
/// `v2_available` lists the controllers this process's v2 group offers (its
/// `cgroup.controllers`). Controllers found nowhere come back in the second list.
pub(crate) fn place(
    mounts: &[CgroupMount],
    memberships: &[Membership],
    v2_available: &[String],
    needed: &[&'static str],
) -> (Vec<Placement>, Vec<&'static str>) {
    let mut placements: Vec<Placement> = Vec::new();
    let mut missing = Vec::new();
    for &controller in needed {
        let v1 = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller));
        let target = if let Some(mount) = v1 {
            let path = memberships
                .iter()
                .find(|m| m.controllers.iter().any(|c| c == controller))
                .map_or("/", |m| m.path.as_str());
            Some((group_dir(mount, path), false))
        } else {
            let v2 = mounts.iter().find(|m| m.v2);
            match v2 {
                Some(mount) if v2_available.iter().any(|c| c == v2_name(controller)) => {
                    let path = memberships
                        .iter()
                        .find(|m| m.controllers.is_empty())
                        .map_or("/", |m| m.path.as_str());
                    Some((group_dir(mount, path), true))
                }
                _ => None,
            }
        };
        match target {
            Some((parent, v2)) => {
                if let Some(p) = placements.iter_mut().find(|p| p.parent == parent) {
                    p.controllers.push(controller);
                } else {
                    placements.push(Placement {
                        parent,
                        v2,
                        controllers: vec![controller],
                    });
                }
            }
            None => missing.push(controller),
        }
    }
    (placements, missing)
}

/// The v2 group of this process and the controllers it offers, if cgroup2 is mounted.
fn v2_controllers(mounts: &[CgroupMount], memberships: &[Membership]) -> Vec<String> {
    let Some(mount) = mounts.iter().find(|m| m.v2) else {
        return Vec::new();
    };
    let path = memberships
        .iter()
        .find(|m| m.controllers.is_empty())
        .map_or("/", |m| m.path.as_str());
    fs::read_to_string(group_dir(mount, path).join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[derive(Debug)]
struct Group {
    dir: PathBuf,
    v2: bool,
    controllers: Vec<&'static str>,
}

/// The container's cgroups; removed (after killing anything left in them) when dropped.
#[derive(Debug, Default)]
pub(crate) struct Cgroups {
    groups: Vec<Group>,
    /// Parent groups created for an OCI `cgroupsPath`, top first; removed (if empty) after.
    parents: Vec<PathBuf>,
    /// Whether the devices controller restricts the container (v1 only).
    pub devices_restricted: bool,
    /// An OCI container's: the kernel's swap defaults stay, as under runc.
    oci: bool,
    /// Groups that existed before (an OCI cgroupsPath may name one): joined, and
    /// never removed, as they are not the container's own.
    joined: Vec<PathBuf>,
    /// The groups with their hierarchies, noted as they are made.
    known: Vec<Known>,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

fn write_ctx(path: &Path, value: &str) -> Result<()> {
    write(path, value).map_err(|e| Error::io(format!("writing {value:?} to {}", path.display()), e))
}

/// Writes "a" to a v1 devices group's `devices.deny`, the reset every rule list starts
/// from. The kernel refuses it with EINVAL while the group has a child that is still
/// online, and a child goes offline some milliseconds after its rmdir returns (after an
/// RCU grace period): a container started in a group right after another one's child
/// group was deleted would otherwise fail. So the write is retried for up to two seconds
/// while the group has no child directory left; a live child fails at once.
fn deny_all_devices(dir: &Path) -> Result<()> {
    let path = dir.join("devices.deny");
    let mut attempt = 0u32;
    loop {
        match write(&path, "a") {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && attempt < 400 => {
                let has_child = fs::read_dir(dir)
                    .map_err(|e| Error::path("listing cgroup", dir, e))?
                    .flatten()
                    .any(|entry| entry.file_type().is_ok_and(|t| t.is_dir()));
                if has_child {
                    return Err(Error::io(
                        format!(
                            "writing \"a\" to {} (cgroup v1 refuses it while the group has a child group)",
                            path.display()
                        ),
                        e,
                    ));
                }
                attempt += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(Error::io(format!("writing \"a\" to {}", path.display()), e)),
        }
    }
}

impl Cgroups {
    /// Creates the groups `limits` needs (plus the v1 devices group, where there is one)
    /// and writes the limits into them.
    pub(crate) fn create(id: &str, limits: &Limits) -> Result<Cgroups> {
        Self::create_in(
            &Location::Child(format!("vessel-{id}")),
            limits,
            false,
            true,
        )
    }

    /// A rootless container's groups for its limits, without the devices controller
    /// (a user namespace makes no device nodes).
    pub(crate) fn create_unconfined(id: &str, limits: &Limits) -> Result<Cgroups> {
        Self::create_in(
            &Location::Child(format!("vessel-{id}")),
            limits,
            false,
            false,
        )
    }

    /// An OCI container's groups at `linux.cgroupsPath` in every hierarchy the host has,
    /// whether a limit is set there or not, so that `kill --all` and `ps` find every
    /// process and the container sees its own group everywhere (as under runc). An
    /// absolute path is taken from each hierarchy's root; a relative one from this
    /// process's own group, as runc takes it.
    pub(crate) fn create_at(path: &str, limits: &Limits) -> Result<Cgroups> {
        let location = if path.starts_with('/') {
            Location::Absolute(path.to_owned())
        } else {
            Location::Child(path.to_owned())
        };
        Self::create_in(&location, limits, true, true)
    }

    /// Groups at `path` for a process that is not a container (a VM's
    /// VMM): every controller `create_at` takes but devices, since the
    /// process opens host devices (/dev/kvm, taps) and has no container
    /// root to police.
    pub(crate) fn create_unconfined_at(path: &str, limits: &Limits) -> Result<Cgroups> {
        Self::create_in(&Location::Absolute(path.to_owned()), limits, true, false)
    }

    fn create_in(
        location: &Location,
        limits: &Limits,
        all: bool,
        devices: bool,
    ) -> Result<Cgroups> {
        let mut needed: Vec<&'static str> = Vec::new();
        if devices {
            needed.push("devices");
        }
        if all || limits.memory.is_some() {
            needed.push("memory");
        }
        if all || limits.cpu.is_some() || limits.cpu_shares.is_some() {
            needed.push("cpu");
        }
        if all || limits.pids.is_some() {
            needed.push("pids");
        }
        if all {
            needed.extend(OTHER_HIERARCHIES);
        }
        for setting in &limits.settings {
            setting.validate()?;
            if !needed.contains(&setting.controller()) {
                needed.push(setting.controller());
            }
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| Error::io("reading /proc/self/cgroup", e))?;
        let mounts = parse_mountinfo(&mountinfo);
        let memberships = parse_proc_cgroup(&proc_cgroup);
        let has_v1_controllers = mounts
            .iter()
            .any(|m| !m.v2 && m.controllers.iter().any(|c| !c.starts_with("name=")));
        // An OCI container on a v1 or hybrid host uses the v1 hierarchies alone, as
        // runc does there; its v2 group (below) only holds the processes.
        let v2_available = if all && has_v1_controllers {
            Vec::new()
        } else {
            v2_controllers(&mounts, &memberships)
        };
        let (placements, missing) = place(&mounts, &memberships, &v2_available, &needed);
        for controller in missing {
            // On v2, devices are policed by eBPF programs, which this increment does not
            // load; the container then gets no CAP_MKNOD instead (see plan).
            let requested = match controller {
                "memory" => limits.memory.is_some().then_some("--memory"),
                "cpu" => limits.cpu.is_some().then_some("--cpus"),
                "pids" => limits.pids.is_some().then_some("--pids"),
                _ => None,
            };
            if let Some(flag) = requested {
                return Err(Error::Invalid(format!(
                    "{flag}: this host has no usable {controller} cgroup controller"
                )));
            }
            // runc fails the same way.
            if let Some(setting) = limits
                .settings
                .iter()
                .find(|s| s.controller() == controller)
            {
                return Err(Error::Invalid(format!(
                    "{}: cannot set it: this host has no {controller} cgroup controller",
                    setting.field()
                )));
            }
        }
        let mut placements = placements;
        if all && !placements.iter().any(|p| p.v2) {
            // A v2 hierarchy without the controllers (a hybrid host's, or a pure v2
            // host's without delegation): a plain group there still holds the
            // processes.
            if let Some(mount) = mounts.iter().find(|m| m.v2) {
                let own = memberships
                    .iter()
                    .find(|m| m.controllers.is_empty())
                    .map_or("/", |m| m.path.as_str());
                placements.push(Placement {
                    parent: group_dir(mount, own),
                    v2: true,
                    controllers: Vec::new(),
                });
            }
        }

        let mut cgroups = Cgroups::default();
        cgroups.oci = all;
        for placement in placements {
            let (dir, v2_root) = match location {
                Location::Child(name) => (
                    placement.parent.join(name.trim_start_matches('/')),
                    Some(placement.parent.clone()),
                ),
                Location::Absolute(path) => {
                    let mount = mounts
                        .iter()
                        .find(|m| {
                            placement.parent.starts_with(&m.mountpoint) && m.v2 == placement.v2
                        })
                        .map(|m| m.mountpoint.clone())
                        .unwrap_or_else(|| placement.parent.clone());
                    (mount.join(path.trim_start_matches('/')), Some(mount))
                }
            };
            if placement.v2 {
                // A v2 group's controllers must be enabled in the subtree of every group
                // above it first.
                let mut ancestors: Vec<&Path> = dir
                    .ancestors()
                    .skip(1)
                    .take_while(|a| v2_root.as_ref().is_some_and(|root| a.starts_with(root)))
                    .collect();
                ancestors.reverse();
                for ancestor in ancestors {
                    if !ancestor.exists() {
                        fs::create_dir(ancestor)
                            .map_err(|e| Error::path("creating cgroup", ancestor, e))?;
                        cgroups.parents.push(ancestor.to_path_buf());
                    }
                    let control = ancestor.join("cgroup.subtree_control");
                    for controller in &placement.controllers {
                        let controller = v2_name(controller);
                        write(&control, &format!("+{controller}")).map_err(|e| {
                            Error::io(
                                format!(
                                    "enabling the {controller} controller in {} (cgroup v2 allows it only in a group without processes of its own)",
                                    control.display()
                                ),
                                e,
                            )
                        })?;
                    }
                }
            } else if let Some(parent) = dir.parent() {
                // Missing groups above the container's (`/default` of `/default/ID`).
                let missing: Vec<PathBuf> = parent
                    .ancestors()
                    .take_while(|a| !a.exists())
                    .map(Path::to_path_buf)
                    .collect();
                for ancestor in missing.into_iter().rev() {
                    fs::create_dir(&ancestor)
                        .map_err(|e| Error::path("creating cgroup", &ancestor, e))?;
                    if placement.controllers.contains(&"cpuset") {
                        inherit_cpuset(&ancestor)?;
                    }
                    cgroups.parents.push(ancestor);
                }
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && all => {
                    // runc joins an existing group too; it must hold no processes yet.
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    if !procs.trim().is_empty() {
                        return Err(Error::Invalid(format!(
                            "cgroup {} already holds processes",
                            dir.display()
                        )));
                    }
                    cgroups.joined.push(dir.clone());
                }
                Err(e) => return Err(Error::path("creating cgroup", &dir, e)),
            }
            if !placement.v2 && placement.controllers.contains(&"cpuset") {
                inherit_cpuset(&dir)?;
            }
            cgroups
                .known
                .extend(identify_in(&mounts, std::slice::from_ref(&dir)));
            cgroups.groups.push(Group {
                dir,
                v2: placement.v2,
                controllers: placement.controllers,
            });
        }
        cgroups.apply(limits)?;
        Ok(cgroups)
    }

    /// Leaves the groups in place (an OCI container outlives its creator); returns the
    /// container's groups and the parent groups created for them.
    pub(crate) fn keep(mut self) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
        let dirs = self.groups.drain(..).map(|g| g.dir).collect();
        (
            dirs,
            std::mem::take(&mut self.parents),
            std::mem::take(&mut self.joined),
        )
    }

    fn apply(&mut self, limits: &Limits) -> Result<()> {
        for group in &self.groups {
            let file = |name: &str| group.dir.join(name);
            for controller in &group.controllers {
                match (*controller, group.v2) {
                    ("devices", false) => {
                        deny_all_devices(&group.dir)?;
                        for rule in &limits.device_rules {
                            let name = if rule.allow {
                                "devices.allow"
                            } else {
                                "devices.deny"
                            };
                            write_ctx(&file(name), &rule.line()?)?;
                        }
                        for rule in DEVICE_ALLOW {
                            write_ctx(&file("devices.allow"), rule)?;
                        }
                    }
                    ("memory", v2) => {
                        let Some(bytes) = limits.memory else { continue };
                        let name = if v2 {
                            "memory.max"
                        } else {
                            "memory.limit_in_bytes"
                        };
                        // v1 keeps memory+swap at least the memory limit: a limit raised
                        // above the current memsw needs the new memsw written first.
                        let memsw = limits.settings.iter().find_map(|s| match s {
                            Setting::MemorySwap { total, .. } => Some(*total),
                            _ => None,
                        });
                        if let (Some(total), false) = (memsw, v2) {
                            let current = number(&group.dir, "memory.memsw.limit_in_bytes");
                            if bytes > current {
                                write_ctx(
                                    &file("memory.memsw.limit_in_bytes"),
                                    &total.to_string(),
                                )?;
                            }
                        }
                        write(&file(name), &bytes.to_string()).map_err(|e| {
                            Error::Invalid(format!(
                                "--memory: the kernel refused a limit of {bytes} bytes ({e})"
                            ))
                        })?;
                        if self.oci {
                            continue;
                        }
                        // No swapping past the limit: the container is held to it. Best
                        // effort, as either file may be absent or read-only.
                        let (swap_file, swap_value) = if v2 {
                            ("memory.swap.max", "0")
                        } else {
                            ("memory.swappiness", "0")
                        };
                        if let Err(e) = write(&file(swap_file), swap_value) {
                            tracing::debug!("cannot write {swap_file}: {e}");
                        }
                    }
                    ("cpu", v2) => {
                        if let Some(shares) = limits.cpu_shares {
                            let (name, value) = if v2 {
                                ("cpu.weight", shares_to_weight(shares))
                            } else {
                                ("cpu.shares", shares)
                            };
                            write_ctx(&file(name), &value.to_string())?;
                        }
                        let Some(cpu) = limits.cpu else { continue };
                        if v2 {
                            write_ctx(
                                &file("cpu.max"),
                                &format!("{} {}", cpu.quota_us, cpu.period_us),
                            )?;
                        } else {
                            write_ctx(&file("cpu.cfs_period_us"), &cpu.period_us.to_string())?;
                            write_ctx(&file("cpu.cfs_quota_us"), &cpu.quota_us.to_string())?;
                        }
                    }
                    ("pids", _) => {
                        let Some(max) = limits.pids else { continue };
                        write(&file("pids.max"), &max.to_string()).map_err(|e| {
                            Error::Invalid(format!("--pids {max}: the kernel refused it ({e})"))
                        })?;
                    }
                    _ => {}
                }
            }
            if group.controllers.contains(&"devices") && !group.v2 {
                self.devices_restricted = true;
            }
        }
        for setting in &limits.settings {
            let controller = setting.controller();
            // Placed by create_in, or it failed there.
            let Some(group) = self
                .groups
                .iter()
                .find(|g| g.controllers.contains(&controller))
            else {
                continue;
            };
            let Some(w) = setting.write_for(&group.dir, group.v2)? else {
                continue;
            };
            let path = group.dir.join(&w.file);
            write(&path, &w.value).map_err(|e| {
                Error::Invalid(format!(
                    "{}: writing {:?} to {}: {e}",
                    setting.field(),
                    w.value,
                    path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Moves `pid` into every group.
    pub(crate) fn add(&self, pid: libc::pid_t) -> Result<()> {
        for group in &self.groups {
            write_ctx(&group.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// How many processes the OOM killer killed in the memory group.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some(group) = self
            .groups
            .iter()
            .find(|g| g.controllers.contains(&"memory"))
        else {
            return 0;
        };
        let name = if group.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = fs::read_to_string(group.dir.join(name)).unwrap_or_default();
        oom_kill_count(&text)
    }

    /// The groups with their hierarchies, for the container's /sys/fs/cgroup.
    pub(crate) fn hierarchies(&self) -> Vec<Known> {
        self.known.clone()
    }
}

/// The `oom_kill N` counter in memory.oom_control (v1) or memory.events (v2).
pub(crate) fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Kills what is left in `dir` and removes it, retrying while the kernel finishes tearing
/// exited tasks down (rmdir says EBUSY until then).
pub(crate) fn remove_group(dir: &Path) {
    for attempt in 0..500 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_micros(if attempt < 20 { 200 } else { 2000 }));
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
    tracing::warn!("cannot remove cgroup {}: it stays busy", dir.display());
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for group in self.groups.iter().rev() {
            if !self.joined.contains(&group.dir) {
                remove_group(&group.dir);
            }
        }
        remove_parents(&self.parents);
    }
}

/// Removes parent groups created for a container, deepest first, where they are empty
/// (other containers may share them).
pub(crate) fn remove_parents(parents: &[PathBuf]) {
    for dir in parents.iter().rev() {
        let _ = fs::remove_dir(dir);
    }
}

/// The v1 hierarchies an OCI container joins besides those of its limits (runc's list),
/// where the host has them.
const OTHER_HIERARCHIES: &[&str] = &[
    "freezer",
    "cpuset",
    "cpuacct",
    "blkio",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
    "name=systemd",
];

/// A new v1 cpuset group has no CPUs and no memory nodes, and takes no task until it
/// has: it gets its parent's, as under runc.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = fs::read_to_string(dir.join(file)).unwrap_or_default();
        if own.trim().is_empty() {
            let inherited = fs::read_to_string(parent.join(file))
                .map_err(|e| Error::path("reading", &parent.join(file), e))?;
            write_ctx(&dir.join(file), inherited.trim())?;
        }
    }
    Ok(())
}

/// Where a container's group goes in each hierarchy.
enum Location {
    /// A path below this process's own group.
    Child(String),
    /// A path from the hierarchy's root (OCI `cgroupsPath`).
    Absolute(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
9:name=systemd:/
8:pids:/
5:devices:/
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn hybrid_uses_v1() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[1].controllers, vec!["memory"]);
        let memberships = parse_proc_cgroup(HYBRID_SELF);
        let (placements, missing) = place(
            &mounts,
            &memberships,
            &[],
            &["devices", "memory", "cpu", "pids"],
        );
        assert!(missing.is_empty());
        assert_eq!(placements.len(), 4);
        assert!(placements.iter().all(|p| !p.v2));
        assert_eq!(
            placements[1].parent,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(placements[2].parent, PathBuf::from("/sys/fs/cgroup/cpu"));
    }

    #[test]
    fn pure_v2() {
        let mounts = parse_mountinfo(
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let memberships = parse_proc_cgroup("0::/user.slice/vessel\n");
        let available: Vec<String> = ["cpu", "memory", "pids"].map(String::from).to_vec();
        let (placements, missing) = place(
            &mounts,
            &memberships,
            &available,
            &["devices", "memory", "pids"],
        );
        assert_eq!(missing, vec!["devices"]);
        assert_eq!(placements.len(), 1, "one v2 group holds every controller");
        assert!(placements[0].v2);
        assert_eq!(placements[0].controllers, vec!["memory", "pids"]);
        assert_eq!(
            placements[0].parent,
            PathBuf::from("/sys/fs/cgroup/user.slice/vessel")
        );
    }

    #[test]
    fn combined_v1_and_namespaced_root() {
        let mounts = parse_mountinfo(
            "1 2 0:1 /docker/x /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n",
        );
        let memberships = parse_proc_cgroup("3:cpu,cpuacct:/docker/x/sub\n");
        let (placements, _) = place(&mounts, &memberships, &[], &["cpu"]);
        assert_eq!(
            placements[0].parent,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/sub")
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/a\\"), "/a\\");
    }

    #[test]
    fn oom_counter() {
        assert_eq!(
            oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            2
        );
        assert_eq!(
            oom_kill_count("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
            1
        );
        assert_eq!(oom_kill_count(""), 0);
    }
}

/// cgroup v1's CPU shares (2 to 262144, 1024 the default) as v2's weight
/// (1 to 10000, 100 the default), by the conversion runc and crun use.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + (shares - 2) * 9999 / 262_142
}

#[cfg(test)]
mod weight_tests {
    use super::shares_to_weight;

    #[test]
    fn shares_map_onto_weights_as_runc_maps_them() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1, "clamped");
    }
}

/// An existing group and what its hierarchy holds (for groups known only by path).
#[derive(Debug, Clone)]
pub(crate) struct Known {
    pub dir: PathBuf,
    pub v2: bool,
    pub controllers: Vec<String>,
    /// Where the host mounts the hierarchy.
    pub mountpoint: PathBuf,
}

/// What each of `dirs` is: the cgroup mount holding it (the longest mount point that
/// is a prefix) tells its version and controllers. Dirs under no cgroup mount are left
/// out.
pub(crate) fn identify(dirs: &[PathBuf]) -> Vec<Known> {
    let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    identify_in(&mounts, dirs)
}

/// [`identify`] with the cgroup mounts already read.
fn identify_in(mounts: &[CgroupMount], dirs: &[PathBuf]) -> Vec<Known> {
    dirs.iter()
        .filter_map(|dir| {
            let mount = mounts
                .iter()
                .filter(|m| dir.starts_with(&m.mountpoint))
                .max_by_key(|m| m.mountpoint.as_os_str().len())?;
            let controllers = if mount.v2 {
                fs::read_to_string(dir.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            } else {
                mount.controllers.clone()
            };
            Some(Known {
                dir: dir.clone(),
                v2: mount.v2,
                controllers,
                mountpoint: mount.mountpoint.clone(),
            })
        })
        .collect()
}

/// Writes `limits` into existing groups (`runc update`); device rules are left alone,
/// as runc's update leaves them.
pub(crate) fn update(dirs: &[PathBuf], limits: &Limits) -> Result<()> {
    let mut cgroups = Cgroups::default();
    cgroups.oci = true;
    for known in identify(dirs) {
        let controllers = ALL_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| {
                let name = if known.v2 { v2_name(c) } else { c };
                *c != "devices" && known.controllers.iter().any(|k| k == name)
            })
            .collect();
        cgroups.groups.push(Group {
            dir: known.dir,
            v2: known.v2,
            controllers,
        });
    }
    let missing = limits.settings.iter().find(|s| {
        !cgroups
            .groups
            .iter()
            .any(|g| g.controllers.contains(&s.controller()))
    });
    let applied = match missing {
        Some(setting) => Err(Error::Invalid(format!(
            "{}: the container has no {} cgroup",
            setting.field(),
            setting.controller()
        ))),
        None => cgroups.apply(limits),
    };
    // The groups are the container's: they stay.
    cgroups.keep();
    applied
}

/// Every controller name this module writes to, for [`update`].
const ALL_CONTROLLERS: &[&str] = &[
    "devices", "memory", "cpu", "pids", "freezer", "cpuset", "cpuacct", "blkio", "hugetlb",
    "net_cls", "net_prio",
];

/// A controller's name on cgroup v2, where blkio became io.
fn v2_name(controller: &str) -> &str {
    match controller {
        "blkio" => "io",
        other => other,
    }
}

/// Freezes (or thaws) the container's processes and waits until the kernel says so.
pub(crate) fn freeze(dirs: &[PathBuf], frozen: bool) -> Result<()> {
    let known = identify(dirs);
    let group = known
        .iter()
        .find(|k| !k.v2 && k.controllers.iter().any(|c| c == "freezer"))
        .map(|k| {
            (
                k.dir.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            )
        })
        .or_else(|| {
            known
                .iter()
                .find(|k| k.v2 && k.dir.join("cgroup.freeze").exists())
                .map(|k| (k.dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }))
        });
    let Some((file, value)) = group else {
        return Err(Error::Invalid(
            "the container has no freezer cgroup (v1 freezer or v2 cgroup.freeze)".into(),
        ));
    };
    for _ in 0..1000 {
        write_ctx(&file, value)?;
        if is_frozen_file(&file) == frozen {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(Error::Invalid(format!(
        "{} did not become {value}",
        file.display()
    )))
}

/// Whether the container's processes are frozen.
pub(crate) fn is_frozen(dirs: &[PathBuf]) -> bool {
    identify(dirs).iter().any(|k| {
        (!k.v2 && is_frozen_file(&k.dir.join("freezer.state")))
            || (k.v2 && is_frozen_file(&k.dir.join("cgroup.events")))
    })
}

fn is_frozen_file(file: &Path) -> bool {
    let text = fs::read_to_string(file).unwrap_or_default();
    match file.file_name().and_then(|n| n.to_str()) {
        Some("freezer.state") => text.trim() == "FROZEN",
        Some("cgroup.freeze") => text.trim() == "1",
        Some("cgroup.events") => text.lines().any(|l| l.trim() == "frozen 1"),
        _ => false,
    }
}

/// Usage figures of a container's groups, as runc's `events` reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_total_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_kernel_ns: u64,
    pub cpu_percpu_ns: Vec<u64>,
    pub throttle_periods: u64,
    pub throttled_periods: u64,
    pub throttled_time_ns: u64,
    pub memory_usage: u64,
    pub memory_max_usage: u64,
    /// 0: no limit.
    pub memory_limit: u64,
    pub memory_failcnt: u64,
    /// Processes the memory limit's OOM killer has killed.
    pub oom_kills: u64,
    /// memory.stat's counters.
    pub memory_raw: Vec<(String, u64)>,
    pub pids_current: u64,
    /// 0: no limit.
    pub pids_limit: u64,
}

/// `key value` lines as pairs.
fn pairs(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The value of `key` among `pairs`, 0 if absent.
fn value(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// A file of `dir` as text, empty if unreadable.
fn text_of(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// A file of `dir` holding one number (0 if absent or not a number, as `max` is).
fn number(dir: &Path, file: &str) -> u64 {
    text_of(dir, file).trim().parse().unwrap_or(0)
}

/// Reads the figures of the groups `dirs` (v1 or v2).
pub(crate) fn stats(dirs: &[PathBuf]) -> Stats {
    let mut s = Stats::default();
    for known in identify(dirs) {
        let has = |c: &str| known.controllers.iter().any(|k| k == c);
        let dir = &known.dir;
        if known.v2 {
            // A hybrid host's plain v2 group has neither controller.
            v2_stats(&mut s, dir, has("cpu"), has("memory"));
        } else {
            v1_stats(&mut s, dir, has);
        }
        // The same files on both versions.
        if has("pids") {
            s.pids_current = number(dir, "pids.current");
            s.pids_limit = number(dir, "pids.max");
        }
    }
    s
}

fn v2_stats(s: &mut Stats, dir: &Path, cpu: bool, memory: bool) {
    if cpu {
        let cpu = pairs(&text_of(dir, "cpu.stat"));
        s.cpu_total_ns = value(&cpu, "usage_usec") * 1000;
        s.cpu_user_ns = value(&cpu, "user_usec") * 1000;
        s.cpu_kernel_ns = value(&cpu, "system_usec") * 1000;
        s.throttle_periods = value(&cpu, "nr_periods");
        s.throttled_periods = value(&cpu, "nr_throttled");
        s.throttled_time_ns = value(&cpu, "throttled_usec") * 1000;
    }
    if memory {
        s.memory_usage = number(dir, "memory.current");
        s.memory_max_usage = number(dir, "memory.peak");
        s.memory_limit = number(dir, "memory.max");
        s.oom_kills = oom_kill_count(&text_of(dir, "memory.events"));
        s.memory_raw = pairs(&text_of(dir, "memory.stat"));
    }
}

/// The figures of one v1 hierarchy's group, whose controllers `has` tells.
fn v1_stats(s: &mut Stats, dir: &Path, has: impl Fn(&str) -> bool) {
    if has("cpuacct") {
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|t| *t > 0)
            .unwrap_or(100);
        s.cpu_total_ns = number(dir, "cpuacct.usage");
        s.cpu_percpu_ns = text_of(dir, "cpuacct.usage_percpu")
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let acct = pairs(&text_of(dir, "cpuacct.stat"));
        s.cpu_user_ns = value(&acct, "user") * 1_000_000_000 / ticks;
        s.cpu_kernel_ns = value(&acct, "system") * 1_000_000_000 / ticks;
    }
    if has("cpu") {
        let cpu = pairs(&text_of(dir, "cpu.stat"));
        s.throttle_periods = value(&cpu, "nr_periods");
        s.throttled_periods = value(&cpu, "nr_throttled");
        s.throttled_time_ns = value(&cpu, "throttled_time");
    }
    if has("memory") {
        s.memory_usage = number(dir, "memory.usage_in_bytes");
        s.memory_max_usage = number(dir, "memory.max_usage_in_bytes");
        s.memory_limit = number(dir, "memory.limit_in_bytes");
        s.memory_failcnt = number(dir, "memory.failcnt");
        s.oom_kills = oom_kill_count(&text_of(dir, "memory.oom_control"));
        s.memory_raw = pairs(&text_of(dir, "memory.stat"));
    }
}

/// This process's own group in each hierarchy mounted here, with the mount.
fn own_groups() -> Vec<(CgroupMount, PathBuf)> {
    let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let memberships =
        parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    mounts
        .into_iter()
        .filter_map(|mount| {
            let membership = memberships.iter().find(|m| {
                if mount.v2 {
                    m.controllers.is_empty()
                } else {
                    m.controllers.iter().any(|c| mount.controllers.contains(c))
                }
            })?;
            let dir = group_dir(&mount, &membership.path);
            Some((mount, dir))
        })
        .collect()
}

/// This process's own groups as [`Known`] hierarchies: what a rootless container
/// without cgroups of its own sees of cgroups (as under runc).
pub(crate) fn own_hierarchies() -> Vec<Known> {
    own_groups()
        .into_iter()
        .map(|(mount, dir)| Known {
            dir,
            v2: mount.v2,
            controllers: mount.controllers,
            mountpoint: mount.mountpoint,
        })
        .collect()
}

/// Removes the group `name` below this process's own group in every hierarchy, where
/// it exists (a run that died left it).
pub(crate) fn remove_own_children(name: &str) {
    for (_, own) in own_groups() {
        let dir = own.join(name);
        if dir.is_dir() {
            remove_group(&dir);
        }
    }
}

/// Where an OCI container with `linux.cgroupsPath` `path` has its group in each
/// hierarchy, as [`Cgroups::create_at`] places it; only those that exist.
pub(crate) fn dirs_at(path: &str) -> Vec<PathBuf> {
    let relative = path.trim_start_matches('/');
    if relative.is_empty()
        || Path::new(relative)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Vec::new();
    }
    own_groups()
        .into_iter()
        .map(|(mount, own)| {
            if path.starts_with('/') {
                mount.mountpoint.join(relative)
            } else {
                own.join(relative)
            }
        })
        .filter(|dir| dir.is_dir())
        .collect()
}

#[cfg(test)]
mod devices_reset_tests {
    use super::deny_all_devices;
    use std::fs;
    use std::path::Path;

    /// A v1 devices group whose child was just removed takes the reset once the child
    /// has gone offline; one with a live child is refused at once, with the reason.
    #[test]
    fn reset_waits_out_a_removed_child_and_refuses_a_live_one() {
        let root = Path::new("/sys/fs/cgroup/devices");
        if !testkit::is_root() || !root.join("devices.deny").exists() {
            testkit::not_run(
                testkit::prereq::CGROUP,
                "needs root and a v1 devices hierarchy",
            );
            return;
        }
        let group = root.join(format!("vessel-devreset-{}", std::process::id()));
        let child = group.join("c");
        fs::create_dir_all(&child).unwrap();
        let live = deny_all_devices(&group).map_err(|e| e.to_string());
        fs::remove_dir(&child).unwrap();
        let after_rmdir = deny_all_devices(&group).map_err(|e| e.to_string());
        let list = fs::read_to_string(group.join("devices.list")).unwrap();
        fs::remove_dir(&group).unwrap();
        let live = live.expect_err("a live child makes the reset fail");
        assert!(live.contains("child group"), "{live}");
        after_rmdir.expect("the reset after the child's rmdir");
        assert_eq!(list, "", "nothing allowed after the reset");
    }
}
