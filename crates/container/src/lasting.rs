//! Lasting containers: the pieces a supervising process (one per
//! instance of the vessel daemon) needs to keep a container across stops
//! and starts. Its root is an overlay whose upper layer is kept, its PID 1
//! is a small init (the vessel agent), and commands enter it later through
//! [`crate::runtime::exec`].
//!
//! The container gets what runc's default spec gives: new PID, network
//! (loopback only), IPC, UTS, mount and cgroup namespaces; /proc, a tmpfs
//! /dev with the standard nodes, devpts, /dev/shm, mqueue, a read-only
//! /sys and cgroup view; the default capability set, the masked and
//! read-only /proc and /sys paths, and vessel's default seccomp filter.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::plan::CapSets;
use crate::runtime::{
    self, CgroupPaths, CreateOptions, InitSpec, MountSpec, NamespaceSpec, ProcessSpec,
};
use crate::Limits;

/// Where the init and exec'd commands find the agent: a bind mount of a
/// host file on the container's /dev tmpfs, so nothing lands in its root.
pub const AGENT_PATH: &str = "/dev/.vessel-agent";

/// Makes this thread's mount namespace its own, with every mount private,
/// so that the overlay it mounts next is seen by it and its containers
/// only, and goes away with them. Call it before starting threads.
pub fn private_mount_namespace() -> Result<()> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(Error::last_os("unsharing the mount namespace"));
    }
    let root = c"/";
    // SAFETY: a valid NUL-terminated path; null source, type and data are
    // allowed for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::last_os("making mounts private"));
    }
    Ok(())
}

/// The directories of a lasting root: the image's root (read-only), the
/// kept upper layer and overlayfs's work directory, and where the merged
/// root is mounted.
#[derive(Debug, Clone)]
pub struct OverlayRoot {
    pub image: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl OverlayRoot {
    /// Creates the upper, work and merged directories if missing and
    /// mounts the overlay (in this thread's mount namespace).
    pub fn mount(&self) -> Result<()> {
        for dir in [&self.upper, &self.work, &self.merged] {
            fs::create_dir_all(dir).map_err(|e| Error::path("creating", dir, e))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.image.display(),
            self.upper.display(),
            self.work.display()
        );
        let cstr =
            |s: &str| CString::new(s).map_err(|_| Error::Invalid(format!("a NUL byte in {s:?}")));
        let target = cstr(&self.merged.to_string_lossy())?;
        let data = cstr(&data)?;
        let overlay = c"overlay";
        // SAFETY: every pointer is a valid NUL-terminated string that
        // lives across the call.
        let r = unsafe {
            libc::mount(
                overlay.as_ptr(),
                target.as_ptr(),
                overlay.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(Error::path(
                "mounting the overlay root on",
                &self.merged,
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// One lasting container to create.
#[derive(Debug, Clone)]
pub struct LastingSpec {
    /// The instance name: the hostname, and the cgroup `vessel/<name>`.
    pub name: String,
    /// The mounted root (see [`OverlayRoot`]).
    pub root: PathBuf,
    /// The agent binary on the host, bind-mounted at [`AGENT_PATH`].
    pub agent: PathBuf,
    pub limits: Limits,
    /// Where the exec FIFO goes while the init waits to start.
    pub exec_fifo: PathBuf,
    /// The terminal the init has as its stdio (a host pty's slave), bound at
    /// /dev/console.
    pub console: Option<PathBuf>,
}

fn mount(destination: &str, kind: &str, options: &[&str]) -> MountSpec {
    MountSpec {
        destination: destination.into(),
        kind: kind.into(),
        source: Some(PathBuf::from(kind)),
        options: options.iter().map(|o| (*o).to_owned()).collect(),
    }
}

/// The environment every process in a lasting container starts with.
fn base_env() -> Vec<String> {
    vec![
        format!("PATH={}", crate::DEFAULT_PATH),
        "HOME=/root".into(),
        "container=vessel".into(),
    ]
}

/// The process the agent runs as: root with the default capabilities.
fn agent_process(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: base_env(),
        cwd: "/".into(),
        caps: CapSets::uniform(crate::plan::caps_mask(false)),
        ..ProcessSpec::default()
    }
}

/// The init spec runc's defaults would give this container.
fn init_spec(spec: &LastingSpec) -> Result<InitSpec> {
    let namespaces = [
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWCGROUP,
    ]
    .into_iter()
    .map(|kind| NamespaceSpec { kind, path: None })
    .collect();
    let agent = MountSpec {
        destination: AGENT_PATH.into(),
        kind: "bind".into(),
        source: Some(spec.agent.clone()),
        options: vec!["bind".into(), "ro".into(), "nosuid".into()],
    };
    let mounts = vec![
        mount("/proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount("/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        agent,
    ];
    let strings = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect();
    Ok(InitSpec {
        bundle: spec.root.clone(),
        root: spec.root.clone(),
        readonly_root: false,
        mounts,
        devices: Vec::new(),
        console: spec.console.clone(),
        personality32: false,
        uid_mappings: Vec::new(),
        gid_mappings: Vec::new(),
        namespaces,
        hostname: Some(spec.name.clone()),
        masked_paths: strings(crate::plan::MASKED_PATHS),
        readonly_paths: strings(crate::plan::READONLY_PATHS),
        sysctl: Vec::new(),
        rootfs_propagation: None,
        process: agent_process(&[AGENT_PATH, "init"]),
        cgroups_path: format!("vessel/{}", spec.name),
        limits: spec.limits.clone(),
        seccomp: crate::seccomp::default_filter()?.unwrap_or_default(),
    })
}

/// Creates the container and starts its init. The init inherits this
/// process's standard output and error (its console). It is killed if
/// the calling thread ends, so call this from the thread that lives as
/// long as the container's supervision.
pub fn start(spec: &LastingSpec) -> Result<runtime::Created> {
    let init = init_spec(spec)?;
    let _ = fs::remove_file(&spec.exec_fifo);
    let fifo = CString::new(spec.exec_fifo.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid("a NUL byte in the exec FIFO's path".into()))?;
    // SAFETY: mkfifo on a NUL-terminated path.
    if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
        return Err(Error::path(
            "creating",
            &spec.exec_fifo,
            io::Error::last_os_error(),
        ));
    }
    let created = runtime::create(
        &init,
        CreateOptions {
            before_pivot: None,
            creator_lock: None,
            exec_fifo: spec.exec_fifo.clone(),
            console_socket: None,
            die_with_parent: true,
        },
    )?;
    if let Err(e) = release(&spec.exec_fifo, created.pid) {
        // SAFETY: kill takes no pointers; the pid is our child.
        unsafe { libc::kill(created.pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: reaping our own child into a local.
        unsafe { libc::waitpid(created.pid, &mut status, 0) };
        created.cgroups.remove();
        return Err(e);
    }
    Ok(created)
}

/// Lets the init waiting on the exec FIFO go on to exec.
fn release(fifo: &Path, pid: libc::pid_t) -> Result<()> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| Error::path("opening", fifo, e))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut byte = [0u8; 1];
        // SAFETY: one byte into a stack buffer from a descriptor we own.
        if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } == 1 {
            break;
        }
        let mut status = 0;
        // SAFETY: polling our own child's status into a local.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return Err(Error::Invalid(
                "the container's init exited before it started".into(),
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(
                "the container's init did not take the start signal".into(),
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
    }
    let _ = fs::remove_file(fifo);
    Ok(())
}

/// Starts `vessel-agent --stdio` in the running container whose init is
/// `pid`: its stdin and stdout are this process's (a connection the
/// caller set up). Joins the container's PID namespace for its children,
/// so call it in a process of its own. Returns the agent's pid.
pub fn exec_agent(pid: libc::pid_t, cgroups: &CgroupPaths) -> Result<libc::pid_t> {
    let seccomp = crate::seccomp::default_filter()?.unwrap_or_default();
    runtime::exec(
        pid,
        cgroups,
        &agent_process(&[AGENT_PATH, "--stdio"]),
        &seccomp,
        None,
    )
}

/// Cgroups `vessel/<name>` with `limits` for a process that is not a
/// container (a VM instance's VMM), as a lasting container's: its
/// supervisor removes them when the instance ends.
pub fn cgroups_for_process(name: &str, limits: &Limits) -> Result<CgroupPaths> {
    let cgroups = crate::cgroup::Cgroups::create_unconfined_at(&format!("vessel/{name}"), limits)?;
    let (groups, parents, joined) = cgroups.keep();
    Ok(CgroupPaths {
        groups,
        parents,
        joined,
    })
}
