//! The parent side of a container run: set-up, the clone, supervision and teardown.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_int;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cgroup::Cgroups;
use crate::child::{self, ChildFds, Failure, Step};
use crate::error::{Error, Result};
use crate::leftovers;
use crate::plan::{self, Plan};
use crate::tty;
use crate::{Config, Net, Outcome, Status, ID_LEN};

/// Signals vessel handles through a signalfd while a container runs.
const HANDLED: [c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGWINCH,
    libc::SIGCHLD,
];

/// Runs `config`'s command in a new container and waits for it. Returns how PID 1 ended;
/// errors mean the command never started. Either way, the container's processes, mounts,
/// cgroups and state directory are gone when this returns.
pub fn run(config: &Config) -> Result<Outcome> {
    let rootfs = check_rootfs(&config.rootfs)?;
    if let Some(name) = &config.hostname {
        crate::check_hostname(name)?;
    }
    if let Some(bytes) = config.limits.memory {
        crate::check_memory(bytes, &format!("{bytes}"))?;
    }
    if config.command.is_empty() {
        return Err(Error::Invalid("no command given".into()));
    }
    // Blocked before anything exists to clean up, and so unblocked only after all of it
    // is gone (guards drop in reverse order): a SIGTERM during set-up is queued and
    // forwarded, never allowed to kill vessel half-way through teardown.
    let signals = SignalGuard::block()?;
    let id = new_id()?;
    let id_str = std::str::from_utf8(&id).unwrap_or("container");
    let hostname = config.hostname.clone().unwrap_or_else(|| id_str.to_owned());
    // SAFETY: geteuid has no preconditions.
    let rootless = unsafe { libc::geteuid() } != 0;
    let state_root = if rootless && config.state_root == Path::new(crate::DEFAULT_STATE_ROOT) {
        rootless_state_root()
    } else {
        config.state_root.clone()
    };
    let state = StateDir::create(&state_root, id_str)?;
    let cgroups = if rootless {
        rootless_cgroups(id_str, &config.limits)?
    } else {
        Cgroups::create(id_str, &config.limits)?
    };
    let plan = plan::build(
        config,
        &rootfs,
        state.path(),
        &hostname,
        cgroups.devices_restricted,
        rootless,
    )?;

    let (sync_read, sync_write) = pipe()?;
    let (error_read, error_write) = pipe()?;
    let (tty_parent, tty_child) = if config.tty {
        let (a, b) = socketpair()?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let fds = ChildFds {
        sync_read: sync_read.as_raw_fd(),
        error_write: error_write.as_raw_fd(),
        tty_socket: tty_child.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        parent_ends: [sync_write.as_raw_fd(), error_read.as_raw_fd()],
    };
    let mut child = spawn(&plan, config.net, rootless, fds)?;
    // Only the child may hold these ends, so that its exit reads as EOF here.
    drop((sync_read, error_write, tty_child));
    if rootless {
        crate::rootless::map_ids(child.pid)?;
    }

    cgroups.add(child.pid)?;
    write_all(sync_write.as_raw_fd(), &[1]).map_err(|e| Error::io("starting the container", e))?;
    drop(sync_write);

    let master = match &tty_parent {
        Some(socket) => tty::receive_master(socket.as_raw_fd())
            .map_err(|e| Error::io("receiving the container's terminal", e))?,
        None => None,
    };
    drop(tty_parent);
    if let Some(failure) = read_failure(error_read.as_raw_fd())? {
        child.wait()?;
        return Err(describe(failure, &plan, config));
    }
    drop(error_read);

    let _raw = match &master {
        Some(_) if tty::is_terminal(libc::STDIN_FILENO) => Some(
            tty::RawMode::enter(libc::STDIN_FILENO)
                .map_err(|e| Error::io("putting the terminal in raw mode", e))?,
        ),
        _ => None,
    };
    if let Some(master) = &master {
        tty::copy_window_size(libc::STDIN_FILENO, master.as_raw_fd());
    }
    let status = supervise(&mut child, &signals, master.as_ref())?;
    drop(_raw);
    let oom_kills = cgroups.oom_kills();
    // Teardown in order: the (reaped) child, then the cgroups, the state directory, and
    // last the signal mask.
    drop(child);
    drop(cgroups);
    drop(state);
    drop(signals);
    Ok(Outcome {
        status,
        oom_kills,
        id,
    })
}

fn check_rootfs(rootfs: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(rootfs).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Invalid(format!("--rootfs {}: no such directory", rootfs.display()))
        } else {
            Error::path("--rootfs", rootfs, e)
        }
    })?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "--rootfs {}: not a directory",
            rootfs.display()
        )));
    }
    fs::canonicalize(rootfs).map_err(|e| Error::path("resolving --rootfs", rootfs, e))
}

/// Where an unprivileged user's runs keep their state: `$XDG_RUNTIME_DIR/vessel`, or
/// `/tmp/vessel-UID`.
fn rootless_state_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("vessel"),
        // SAFETY: getuid has no preconditions.
        None => PathBuf::from(format!("/tmp/vessel-{}", unsafe { libc::getuid() })),
    }
}

/// An unprivileged user's container has no cgroups of its own unless it asks for
/// limits, which need groups that user may write (a delegated subtree).
fn rootless_cgroups(id: &str, limits: &crate::Limits) -> Result<Cgroups> {
    if limits.memory.is_none() && limits.cpu.is_none() && limits.pids.is_none() {
        return Ok(Cgroups::default());
    }
    Cgroups::create_unconfined(id, limits).map_err(|e| {
        Error::Invalid(format!(
            "limits in a rootless container need a cgroup this user may write (a delegated cgroup v2 subtree): {e}"
        ))
    })
}

/// 12 random hex digits.
fn new_id() -> Result<[u8; ID_LEN]> {
    let mut raw = [0u8; ID_LEN / 2];
    // SAFETY: getrandom writes at most `raw.len()` bytes into `raw`.
    let n = unsafe { libc::getrandom(raw.as_mut_ptr().cast(), raw.len(), 0) };
    if n != raw.len() as isize {
        return Err(Error::last_os("generating a container id"));
    }
    let mut id = [0u8; ID_LEN];
    for (i, b) in raw.iter().enumerate() {
        id[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
        id[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 15)];
    }
    Ok(id)
}

/// The per-container state directory (overlay upper, work and mount point); removed with
/// everything in it when dropped. Its lock file is held while it lives, so that a run
/// killed by SIGKILL leaves a directory the next run recognizes and removes.
struct StateDir {
    path: PathBuf,
    _lock: fs::File,
}

impl StateDir {
    fn create(root: &Path, id: &str) -> Result<StateDir> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| Error::path("creating state directory", root, e))?;
        leftovers::sweep_runs(root);
        let path = root.join(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::path("creating state directory", &path, e))?;
        let lock_path = path.join(leftovers::LOCK_FILE);
        let lock = match leftovers::try_lock(&lock_path) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                return Err(Error::Invalid(format!(
                    "{} is locked by another process",
                    lock_path.display()
                )))
            }
            Err(e) => return Err(Error::path("locking", &lock_path, e)),
        };
        let state = StateDir { path, _lock: lock };
        for sub in ["upper", "work", "merged"] {
            let dir = state.path.join(sub);
            fs::create_dir(&dir).map_err(|e| Error::path("creating", &dir, e))?;
        }
        Ok(state)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        // The mounts live in the container's mount namespace, which is gone by now; but
        // if one were visible here, deleting through it could reach the root's files.
        if leftovers::has_mounts_below(&self.path) {
            tracing::warn!(
                "not removing {}: something is mounted in it",
                self.path.display()
            );
            return;
        }
        if let Err(e) = remove_state_dir(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes a state directory. Overlayfs leaves its work directory with mode 0, which
/// a rootless owner (without CAP_DAC_OVERRIDE) cannot list: directories are opened up
/// first where the removal is refused.
pub(crate) fn remove_state_dir(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            fn open_up(dir: &Path) {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
                for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        open_up(&entry.path());
                    }
                }
            }
            open_up(path);
            fs::remove_dir_all(path)
        }
        other => other,
    }
}

/// Blocks [`HANDLED`] and reads them from a signalfd; restores the old mask when dropped.
struct SignalGuard {
    fd: OwnedFd,
    old: libc::sigset_t,
}

impl SignalGuard {
    fn block() -> Result<SignalGuard> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset; the masks
        // passed to pthread_sigmask and signalfd are valid.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in HANDLED {
                libc::sigaddset(&mut set, sig);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            if rc != 0 {
                return Err(Error::io(
                    "blocking signals",
                    io::Error::from_raw_os_error(rc),
                ));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd == -1 {
                let e = io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(Error::io("creating a signalfd", e));
            }
            Ok(SignalGuard {
                fd: OwnedFd::from_raw_fd(fd),
                old,
            })
        }
    }

    /// The signals waiting on the signalfd.
    fn drain(&self) -> Vec<c_int> {
        let mut out = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading into `info`, which is `size` bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                return out;
            }
            out.push(info.ssi_signo as c_int);
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in block().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// The container's PID 1 as seen from the host. Dropping it unreaped kills it (and with
/// it the whole PID namespace) and reaps it.
pub(crate) struct Child {
    pub(crate) pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    reaped: bool,
    /// A signal vessel delivered as SIGKILL because PID 1 does not handle it (see `forward`).
    emulated: Option<c_int>,
}

impl Child {
    /// Reaps the child if it has exited.
    fn try_wait(&mut self) -> Result<Option<Status>> {
        self.wait_with(libc::WNOHANG)
    }

    pub(crate) fn wait(&mut self) -> Result<Option<Status>> {
        self.wait_with(0)
    }

    fn wait_with(&mut self, flags: c_int) -> Result<Option<Status>> {
        if self.reaped {
            return Ok(None);
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid writes the status into `raw`.
            let ret = unsafe { libc::waitpid(self.pid, &mut raw, flags | libc::__WALL) };
            if ret == -1 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(Error::io("waiting for the container", e));
            }
            if ret == 0 {
                return Ok(None);
            }
            break;
        }
        self.reaped = true;
        let status = if libc::WIFSIGNALED(raw) {
            let sig = libc::WTERMSIG(raw);
            match self.emulated {
                Some(forwarded) if sig == libc::SIGKILL => Status::Signaled(forwarded),
                _ => Status::Signaled(sig),
            }
        } else {
            Status::Exited(libc::WEXITSTATUS(raw))
        };
        Ok(Some(status))
    }

    /// Passes `sig` to PID 1. The kernel drops signals that a PID namespace's init does
    /// not handle, so a `sleep` as PID 1 would never see SIGTERM; where PID 1 neither
    /// catches nor ignores the signal, vessel carries out its default action (terminate)
    /// with SIGKILL and reports the original signal, as if no namespace were in the way.
    fn forward(&mut self, sig: c_int) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let mask = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0)
        };
        let bit = 1u64 << (sig - 1);
        let target = if mask("SigCgt:") & bit != 0 {
            sig
        } else if mask("SigIgn:") & bit != 0 {
            return;
        } else {
            self.emulated = Some(sig);
            libc::SIGKILL
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid, target) };
    }
}

impl Child {
    /// Lets the child live on past this guard (an OCI container's init or exec'd
    /// process, which the caller's subreaper reaps); returns its pid.
    pub(crate) fn release(mut self) -> libc::pid_t {
        self.reaped = true;
        self.pid
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: our own unreaped child, so the pid cannot have been reused.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            if let Err(e) = self.wait() {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Clones the child into its namespaces (the cgroup namespace comes later, once it is in
/// its cgroups). Like fork: the child runs on a copy of this stack.
fn spawn(plan: &Plan, net: Net, rootless: bool, fds: ChildFds) -> Result<Child> {
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if net == Net::None {
        flags |= libc::CLONE_NEWNET;
    }
    if rootless {
        flags |= libc::CLONE_NEWUSER;
    }
    spawn_with(plan, flags, fds)
}

/// Clones the child with namespace flags `ns_flags` (CLONE_NEW*).
pub(crate) fn spawn_with(plan: &Plan, ns_flags: c_int, fds: ChildFds) -> Result<Child> {
    let flags = ns_flags | libc::SIGCHLD;
    // SAFETY: a fork-like clone (no new stack, no shared memory). The child only runs
    // child::main, which does not allocate or return (see the child module).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if ret == 0 {
        child::main(plan, fds);
    }
    if ret < 0 {
        return Err(Error::last_os("creating the container process (clone)"));
    }
    let pid = ret as libc::pid_t;
    // SAFETY: pidfd_open on our own child; the result is a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: a descriptor pidfd_open just returned, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }
    });
    Ok(Child {
        pid,
        pidfd,
        reaped: false,
        emulated: None,
    })
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(Error::last_os("creating a pipe"));
    }
    // SAFETY: fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } == -1
    {
        return Err(Error::last_os("creating a socket pair"));
    }
    // SAFETY: fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writing from a valid slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads what the child left on the error pipe: nothing (EOF) once its exec succeeded.
pub(crate) fn read_failure(fd: RawFd) -> Result<Option<Failure>> {
    let mut buf = [0u8; Failure::SIZE];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io("waiting for the container to start", e));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    match got {
        0 => Ok(None),
        Failure::SIZE => Ok(Some(Failure::decode(&buf).unwrap_or(Failure {
            step: Step::Panic,
            index: 0,
            errno: 0,
        }))),
        _ => Err(Error::Invalid(
            "the container's set-up process sent a truncated report".into(),
        )),
    }
}

/// Turns a child's failure report into an error with the plan's context.
fn describe(failure: Failure, plan: &Plan, config: &Config) -> Error {
    describe_failure(
        failure,
        plan,
        config.command.first().map_or("", |c| c.as_str()),
        &config.cwd,
    )
}

/// Turns a child's failure report into an error, given the command and working directory.
pub(crate) fn describe_failure(failure: Failure, plan: &Plan, cmd: &str, cwd: &str) -> Error {
    let cmd = cmd.to_owned();
    let os = io::Error::from_raw_os_error(failure.errno);
    let i = failure.index as usize;
    let candidate = || {
        plan.candidates
            .get(i)
            .map_or(cmd.clone(), |c| c.to_string_lossy().into_owned())
    };
    match failure.step {
        Step::NotFound => Error::NotFound(cmd),
        Step::Interpreter => Error::Invalid(format!(
            "{}: cannot be executed: its interpreter (ELF loader or #! program) is not in the container's root",
            candidate()
        )),
        Step::Exec => Error::io(format!("executing {} in the container", candidate()), os),
        Step::PrePivot => Error::io(
            format!(
                "setting up the container's root: {}",
                plan.pre_pivot
                    .get(i)
                    .map_or_else(|| "?".to_owned(), |op| op.to_string())
            ),
            os,
        ),
        Step::PostPivot => Error::io(
            format!(
                "setting up the container's root: {}",
                plan.post_pivot
                    .get(i)
                    .map_or_else(|| "?".to_owned(), |op| op.to_string())
            ),
            os,
        ),
        step => {
            let what = match step {
                Step::WaitParent => "waiting for vessel",
                Step::DeathSignal => "setting the parent-death signal",
                Step::CgroupNamespace => "creating the cgroup namespace",
                Step::MakePrivate => "making the mount namespace private",
                Step::PivotRoot => "switching to the container's root (pivot_root)",
                Step::Hostname => "setting the hostname",
                Step::Loopback => "bringing up the loopback interface",
                Step::Pty => "allocating the container's terminal",
                Step::Workdir => "entering the working directory",
                Step::Rlimit => "setting resource limits",
                Step::ControllingTty => "attaching the container's terminal",
                Step::Capabilities => "dropping capabilities",
                Step::NoNewPrivs => "setting no_new_privs",
                Step::JoinNamespace => "joining the container's namespaces",
                Step::User => "changing to the process's user and groups",
                Step::Seccomp => "installing the seccomp filter",
                Step::ExecFifo => "waiting on the exec FIFO",
                _ => "setting up the container (internal error)",
            };
            let what = if step == Step::Workdir {
                format!("{what} {cwd}")
            } else {
                what.to_owned()
            };
            Error::io(what, os)
        }
    }
}

/// Waits for PID 1 to exit, forwarding signals and (with a pty) copying the terminal.
fn supervise(child: &mut Child, signals: &SignalGuard, master: Option<&OwnedFd>) -> Result<Status> {
    let mut stdin_open = master.is_some();
    let mut master_open = master.is_some();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(status) = child.try_wait()? {
            if let Some(master) = master.filter(|_| master_open) {
                drain(master.as_raw_fd(), &mut buf);
            }
            return Ok(status);
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let pollfd = |fd: RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        fds.push(pollfd(signals.fd.as_raw_fd()));
        fds.push(pollfd(child.pidfd.as_ref().map_or(-1, |fd| fd.as_raw_fd())));
        fds.push(pollfd(if stdin_open { libc::STDIN_FILENO } else { -1 }));
        fds.push(pollfd(match master {
            Some(m) if master_open => m.as_raw_fd(),
            _ => -1,
        }));
        // Without a pidfd (kernels before 5.3) SIGCHLD still wakes us; the timeout covers
        // a SIGCHLD that went to another thread of the caller.
        let timeout = if child.pidfd.is_some() { -1 } else { 100 };
        // SAFETY: `fds` is a valid array of pollfd; negative fds are ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io("waiting for the container", e));
        }
        if fds[0].revents != 0 {
            for sig in signals.drain() {
                match sig {
                    libc::SIGWINCH => {
                        if let Some(master) = master {
                            tty::copy_window_size(libc::STDIN_FILENO, master.as_raw_fd());
                        }
                    }
                    libc::SIGCHLD => {}
                    sig => child.forward(sig),
                }
            }
        }
        if let Some(master) = master {
            if fds[2].revents != 0 {
                // SAFETY: reading into a valid buffer.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                // EOF, an error, or a pty that no longer takes input: stop copying.
                if n <= 0 || write_all(master.as_raw_fd(), &buf[..n as usize]).is_err() {
                    stdin_open = false;
                }
            }
            if fds[3].revents != 0 {
                // SAFETY: reading into a valid buffer.
                let n =
                    unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // EIO: every slave is closed; the exit follows.
                    master_open = false;
                } else {
                    let _ = write_all(libc::STDOUT_FILENO, &buf[..n as usize]);
                }
            }
        }
    }
}

/// Copies what is still buffered in the pty to stdout after the container exited.
fn drain(master: RawFd, buf: &mut [u8]) {
    loop {
        let mut pfd = libc::pollfd {
            fd: master,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } != 1 || pfd.revents & libc::POLLIN == 0 {
            return;
        }
        // SAFETY: reading into a valid buffer.
        let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let _ = write_all(libc::STDOUT_FILENO, &buf[..n as usize]);
    }
}
