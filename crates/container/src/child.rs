//! The cloned child: builds the container from a [`Plan`] and execs the command.
//!
//! The child is created by a raw `clone` (fork-like, without glibc's fork handlers), so if
//! the parent had other threads, any lock they held (malloc's included) stays locked here.
//! The child therefore never allocates: every string is a C string from the plan, errors
//! are a step number and an errno written to a pipe, and it ends in `execve` or `_exit`.

use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::io::RawFd;

use crate::plan::{Op, Plan};

/// Where the child failed; the parent turns it into a message with the plan's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    WaitParent = 1,
    DeathSignal,
    CgroupNamespace,
    MakePrivate,
    PrePivot,
    PivotRoot,
    PostPivot,
    Hostname,
    Loopback,
    Pty,
    Workdir,
    Rlimit,
    ControllingTty,
    Capabilities,
    NoNewPrivs,
    /// execve failed with the errno given (candidate `index`).
    Exec,
    /// Every candidate was missing.
    NotFound,
    /// The command exists but execve said ENOENT: its ELF or `#!` interpreter is missing.
    Interpreter,
    Panic,
    /// Joining namespace `index` of the plan's list.
    JoinNamespace,
    /// Changing to the process's user and groups.
    User,
    /// Installing seccomp program `index`.
    Seccomp,
    /// Opening the exec FIFO.
    ExecFifo,
    /// Not a failure: an OCI init is set up and waits for `start` on its exec FIFO.
    Ready,
    /// Not a failure: the root is mounted and the child waits, before pivot_root, for
    /// the creator to run its hooks and send one more byte.
    BeforePivot,
}

impl Step {
    pub(crate) fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        const ALL: [Step; 25] = [
            WaitParent,
            DeathSignal,
            CgroupNamespace,
            MakePrivate,
            PrePivot,
            PivotRoot,
            PostPivot,
            Hostname,
            Loopback,
            Pty,
            Workdir,
            Rlimit,
            ControllingTty,
            Capabilities,
            NoNewPrivs,
            Exec,
            NotFound,
            Interpreter,
            Panic,
            JoinNamespace,
            User,
            Seccomp,
            ExecFifo,
            Ready,
            BeforePivot,
        ];
        ALL.into_iter().find(|s| *s as u32 == v)
    }
}

/// What the child writes to the error pipe when it fails: 12 bytes, native endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub step: Step,
    pub index: u32,
    pub errno: i32,
}

impl Failure {
    pub(crate) const SIZE: usize = 12;

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&(self.step as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&self.index.to_ne_bytes());
        out[8..].copy_from_slice(&self.errno.to_ne_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8; Self::SIZE]) -> Option<Failure> {
        let word = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        Some(Failure {
            step: Step::from_u32(u32::from_ne_bytes(word(0)))?,
            index: u32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
        })
    }
}

/// The child's ends of the channels to the parent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    /// The parent writes one byte once the child is in its cgroups.
    pub sync_read: RawFd,
    /// Close-on-exec; carries a [`Failure`], or reads as EOF after a successful exec.
    pub error_write: RawFd,
    /// With a tty: a unix socket the pty master is sent over; else -1.
    pub tty_socket: RawFd,
    /// The parent's ends of the two pipes, which the clone copied: closed first, so
    /// that the parent's death reads as end-of-file here, and ours there.
    pub parent_ends: [RawFd; 2],
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(step: Step, index: usize) -> Failure {
    Failure {
        step,
        index: index as u32,
        errno: errno(),
    }
}

/// `Err` with the current errno when `ret` is -1.
fn check(ret: c_int, step: Step, index: usize) -> Result<c_int, Failure> {
    if ret == -1 {
        Err(fail(step, index))
    } else {
        Ok(ret)
    }
}

/// Runs in the child right after clone; never returns.
pub(crate) fn main(plan: &Plan, fds: ChildFds) -> ! {
    let report = std::cell::Cell::new(fds.error_write);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        setup_and_exec(plan, fds, &report)
    }));
    let failure = match result {
        Ok(failure) => failure,
        Err(_) => Failure {
            step: Step::Panic,
            index: 0,
            errno: 0,
        },
    };
    let fd = report.get();
    if fd < 0 {
        // After Ready the creator is gone: say it on the container's stderr instead.
        late_failure(failure);
    }
    let bytes = failure.encode();
    // SAFETY: writing a stack buffer to a descriptor we own, then leaving without running
    // any of the parent's destructors or atexit handlers (which belong to the parent).
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(1)
    }
}

/// Reports a failure after Ready on stderr, without allocating, and exits 127.
fn late_failure(failure: Failure) -> ! {
    let mut buf = [0u8; 96];
    let prefix = b"vessel-runc: starting the container process failed: step ";
    let mut n = 0;
    let mut put = |bytes: &[u8], n: &mut usize| {
        for &b in bytes {
            if *n < buf.len() {
                buf[*n] = b;
                *n += 1;
            }
        }
    };
    put(prefix, &mut n);
    let mut digits = [0u8; 10];
    for (value, sep) in [
        (failure.step as u32, b" errno "),
        (failure.errno as u32, b"\n\0\0\0\0\0\0"),
    ] {
        let len = decimal(value, &mut digits);
        put(&digits[..len], &mut n);
        put(
            &sep[..sep.iter().position(|&b| b == 0).unwrap_or(sep.len())],
            &mut n,
        );
    }
    // SAFETY: writing a stack buffer to stderr, then leaving without running destructors.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(127)
    }
}

/// Returns only on failure.
fn setup_and_exec(plan: &Plan, fds: ChildFds, report: &std::cell::Cell<RawFd>) -> Failure {
    match setup(plan, fds, report) {
        Ok(()) => exec(plan),
        Err(failure) => failure,
    }
}

/// Blocks until the parent writes one byte on the sync pipe (`index` tells the waits
/// apart in a failure).
fn wait_parent(sync_read: RawFd, index: u32) -> Result<(), Failure> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reading one byte into a stack variable.
        let n = unsafe { libc::read(sync_read, (&mut byte as *mut u8).cast(), 1) };
        match n {
            1 => return Ok(()),
            0 => {
                return Err(Failure {
                    step: Step::WaitParent,
                    index,
                    errno: libc::EPIPE,
                })
            }
            _ if errno() == libc::EINTR => continue,
            _ => return Err(fail(Step::WaitParent, index as usize)),
        }
    }
}

fn setup(plan: &Plan, fds: ChildFds, report: &std::cell::Cell<RawFd>) -> Result<(), Failure> {
    for fd in fds.parent_ends.into_iter().chain(plan.creator_only) {
        // SAFETY: closing this process's copies of the parent's descriptors.
        unsafe { libc::close(fd) };
    }
    // Wait until the parent has moved us into the cgroups, so that everything from here
    // on (including the cgroup namespace's root) is the container's.
    wait_parent(fds.sync_read, 0)?;
    // SAFETY: plain syscalls on integers.
    unsafe {
        if !plan.pause_before_pivot {
            libc::close(fds.sync_read);
        }
        if plan.pdeathsig {
            // If vessel dies (even by SIGKILL), PID 1 dies, and with it the whole namespace.
            check(
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ),
                Step::DeathSignal,
                0,
            )?;
        }
        for (i, &(fd, nstype)) in plan.join.iter().enumerate() {
            check(libc::setns(fd, nstype), Step::JoinNamespace, i)?;
            libc::close(fd);
        }
        if plan.userns_root {
            // In a user namespace (new, with its maps written by now, or joined) this
            // process still has the host's ids, which it may not map: it becomes the
            // namespace's root before it makes a file.
            check(libc::setresgid(0, 0, 0), Step::User, 10)?;
            check(libc::setresuid(0, 0, 0), Step::User, 11)?;
        }
        if plan.cgroup_ns {
            check(
                libc::unshare(libc::CLONE_NEWCGROUP),
                Step::CgroupNamespace,
                0,
            )?;
        }
    }
    // The exec FIFO, opened as a path only by the parent (a host path the container's
    // user might not be allowed to reach): this process's copy of that descriptor.
    let mut fifo = -1;
    if plan.pivot {
        // SAFETY: plain syscalls on C strings from the plan and literals.
        unsafe {
            // Nothing mounted from here on may reach the host's mount namespace.
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    plan.root_propagation,
                    std::ptr::null(),
                ),
                Step::MakePrivate,
                0,
            )?;
            // Device nodes and mount points get exactly the modes in the plan.
            libc::umask(0);
            if let Some(fd) = plan.exec_fifo {
                fifo = fd;
            }
        }
        for (i, op) in plan.pre_pivot.iter().enumerate() {
            apply(op).map_err(|e| Failure {
                step: Step::PrePivot,
                index: i as u32,
                errno: e,
            })?;
        }
        if plan.pause_before_pivot {
            let paused = Failure {
                step: Step::BeforePivot,
                index: 0,
                errno: 0,
            }
            .encode();
            // SAFETY: writing a stack buffer to our end of the error pipe.
            let n = unsafe { libc::write(fds.error_write, paused.as_ptr().cast(), paused.len()) };
            if n != paused.len() as isize {
                return Err(fail(Step::WaitParent, 1));
            }
            wait_parent(fds.sync_read, 1)?;
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fds.sync_read) };
        }
        pivot(plan)?;
        for (i, op) in plan.post_pivot.iter().enumerate() {
            apply(op).map_err(|e| Failure {
                step: Step::PostPivot,
                index: i as u32,
                errno: e,
            })?;
        }
    }
    if let Some(hostname) = &plan.hostname {
        // SAFETY: the hostname buffer is valid for its length.
        check(
            unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) },
            Step::Hostname,
            0,
        )?;
    }
    if plan.loopback_up {
        loopback_up()?;
    }
    let slave = if plan.tty {
        let slave = open_pty(fds.tty_socket)?;
        if plan.pivot {
            mount_console(slave)?;
        }
        Some(slave)
    } else {
        None
    };
    make_workdir(plan)?;
    for (i, (resource, limit)) in plan.rlimits.iter().enumerate() {
        // SAFETY: `limit` is a valid rlimit.
        check(
            unsafe { libc::setrlimit(*resource as _, limit) },
            Step::Rlimit,
            i,
        )?;
    }
    if let Some(slave) = slave {
        // SAFETY: syscalls on descriptors we own; the slave becomes stdin/out/err.
        unsafe {
            check(libc::setsid(), Step::ControllingTty, 0)?;
            check(
                libc::ioctl(slave, libc::TIOCSCTTY, 0),
                Step::ControllingTty,
                1,
            )?;
            for fd in 0..3 {
                check(libc::dup2(slave, fd), Step::ControllingTty, 2)?;
            }
            if slave > 2 {
                libc::close(slave);
            }
        }
    }
    // Without no_new_privs the kernel takes a filter only from a process holding
    // CAP_SYS_ADMIN, so it goes in before the capabilities go (as runc does).
    if !plan.no_new_privs {
        install_seccomp(plan)?;
    }
    drop_capabilities(plan)?;
    if plan.no_new_privs {
        // SAFETY: plain prctl.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            Step::NoNewPrivs,
            0,
        )?;
    }
    reset_process_state(plan.umask);
    if let Some(persona) = plan.personality {
        // SAFETY: personality takes an integer; it fails only for values it rejects.
        if unsafe { libc::personality(persona) } == -1 {
            return Err(fail(Step::Exec, 100));
        }
    }
    if fifo >= 0 {
        wait_for_start(plan, fifo, fds.error_write, report)?;
    }
    if plan.no_new_privs {
        install_seccomp(plan)?;
    }
    Ok(())
}

/// Writes `value` in decimal into `out`, most significant digit first, without
/// allocating; the number of digits.
fn decimal(value: u32, out: &mut [u8; 10]) -> usize {
    let mut v = value;
    let mut len = 0;
    loop {
        out[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out[..len].reverse();
    len
}

/// `/proc/self/fd/N` for descriptor `fd`, NUL-terminated, without allocating.
fn fd_path(fd: RawFd) -> [u8; 25] {
    let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let len = decimal(fd as u32, &mut digits);
    path[14..14 + len].copy_from_slice(&digits[..len]);
    path
}

/// Binds the terminal `slave` onto /dev/console, as runc does for a container with
/// a terminal (made first if missing; an existing node is covered).
fn mount_console(slave: RawFd) -> Result<(), Failure> {
    let source = fd_path(slave);
    // SAFETY: NUL-terminated literals and a NUL-terminated stack buffer.
    unsafe {
        let fd = libc::open(
            c"/dev/console".as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            libc::close(fd);
        } else if errno() != libc::EEXIST {
            return Err(fail(Step::Pty, 5));
        }
        check(
            libc::mount(
                source.as_ptr().cast(),
                c"/dev/console".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ),
            Step::Pty,
            6,
        )?;
    }
    Ok(())
}

/// OCI create: reports Ready to the creator, then blocks until `start` opens the exec
/// FIFO for reading, and writes it one byte. The command is looked up first, so that a
/// missing command fails `create` (as with runc) rather than the started container.
fn wait_for_start(
    plan: &Plan,
    fifo: RawFd,
    error_write: RawFd,
    report: &std::cell::Cell<RawFd>,
) -> Result<(), Failure> {
    find_command(plan)?;
    let ready = Failure {
        step: Step::Ready,
        index: 0,
        errno: 0,
    }
    .encode();
    // SAFETY: writing a stack buffer to our end of the error pipe, then closing it: from
    // here on failures go to stderr (see main), as nobody reads the pipe any more.
    unsafe {
        if libc::write(error_write, ready.as_ptr().cast(), ready.len()) != ready.len() as isize {
            return Err(fail(Step::ExecFifo, 1));
        }
        report.set(-1);
        libc::close(error_write);
    }
    // Reopening the O_PATH descriptor for writing blocks until a reader (`start`)
    // opens the FIFO.
    let path = fd_path(fifo);
    // SAFETY: `path` is NUL-terminated (zero-filled past the digits).
    unsafe {
        let fd = loop {
            let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd == -1 && errno() == libc::EINTR {
                continue;
            }
            break fd;
        };
        if fd == -1 {
            return Err(fail(Step::ExecFifo, 2));
        }
        let byte = [b'0'];
        libc::write(fd, byte.as_ptr().cast(), 1);
        libc::close(fd);
        libc::close(fifo);
    }
    Ok(())
}

/// Whether some candidate exists as an executable file (the lookup `exec` will repeat).
fn find_command(plan: &Plan) -> Result<(), Failure> {
    for path in &plan.candidates {
        // SAFETY: a C string from the plan and a valid stat buffer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(path.as_ptr(), &mut st) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFREG
                && st.st_mode & 0o111 != 0
            {
                return Ok(());
            }
        }
    }
    Err(Failure {
        step: Step::NotFound,
        index: 0,
        errno: libc::ENOENT,
    })
}

fn install_seccomp(plan: &Plan) -> Result<(), Failure> {
    for (i, program) in plan.seccomp.iter().enumerate() {
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at a valid BPF program owned by the plan; the kernel
        // copies it.
        check(
            unsafe {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog as libc::c_ulong,
                    0,
                    0,
                )
            },
            Step::Seccomp,
            i,
        )?;
    }
    Ok(())
}

fn pivot(plan: &Plan) -> Result<(), Failure> {
    // SAFETY: C strings from the plan and literals; plain syscalls.
    unsafe {
        check(libc::chdir(plan.new_root.as_ptr()), Step::PivotRoot, 0)?;
        // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "."
        // then detaches the old root without needing a directory for it (as runc does).
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as c_int,
            Step::PivotRoot,
            1,
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            Step::PivotRoot,
            2,
        )?;
        check(libc::chdir(c"/".as_ptr()), Step::PivotRoot, 3)?;
    }
    Ok(())
}

fn opt_ptr(s: &Option<std::ffi::CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Applies one operation; `Err(errno)` on failure.
fn apply(op: &Op) -> Result<(), i32> {
    let ok = |ret: c_int| if ret == -1 { Err(errno()) } else { Ok(()) };
    // SAFETY (whole block): every pointer is a NUL-terminated C string owned by the plan
    // (or null where the syscall accepts it), and `st` is a valid stat buffer.
    unsafe {
        match op {
            Op::Mkdir { path, mode } => {
                if libc::mkdir(path.as_ptr(), *mode) == -1 && errno() != libc::EEXIST {
                    return Err(errno());
                }
                Ok(())
            }
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
                no_symlink,
            } => {
                if *no_symlink {
                    let mut st: libc::stat = std::mem::zeroed();
                    ok(libc::lstat(target.as_ptr(), &mut st))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        return Err(libc::ENOTDIR);
                    }
                }
                ok(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    *flags,
                    opt_ptr(data).cast::<c_void>(),
                ))
            }
            Op::Mknod { path, major, minor } => ok(libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(*major, *minor),
            )),
            Op::Device {
                path,
                kind,
                mode,
                major,
                minor,
                uid,
                gid,
            } => {
                let rdev = libc::makedev(*major, *minor);
                if libc::mknod(path.as_ptr(), *kind | *mode, rdev) == -1 {
                    if errno() != libc::EEXIST {
                        return Err(errno());
                    }
                    let mut st: libc::stat = std::mem::zeroed();
                    if libc::lstat(path.as_ptr(), &mut st) == -1 {
                        return Err(errno());
                    }
                    let same_node = st.st_mode & libc::S_IFMT == *kind
                        && (*kind == libc::S_IFIFO || st.st_rdev == rdev);
                    if !same_node {
                        return Err(libc::EEXIST);
                    }
                    if libc::chmod(path.as_ptr(), *mode) == -1 {
                        return Err(errno());
                    }
                }
                ok(libc::lchown(path.as_ptr(), *uid, *gid))
            }
            Op::Symlink { target, link } => ok(libc::symlink(target.as_ptr(), link.as_ptr())),
            Op::Mask { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(path.as_ptr(), &mut st) == -1 {
                    return if errno() == libc::ENOENT {
                        Ok(())
                    } else {
                        Err(errno())
                    };
                }
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    ok(libc::mount(
                        c"tmpfs".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY,
                        std::ptr::null(),
                    ))
                } else {
                    ok(libc::mount(
                        c"/dev/null".as_ptr(),
                        path.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))
                }
            }
            Op::MkdirAll { path } => mkdir_all(path.as_bytes()),
            Op::Touch { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                );
                if fd == -1 {
                    // A directory (or anything but a symlink) already there is the
                    // mount's problem, reported by mount itself.
                    return if errno() == libc::EISDIR {
                        Ok(())
                    } else {
                        Err(errno())
                    };
                }
                libc::close(fd);
                Ok(())
            }
            Op::Propagate { target, flags } => ok(libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                *flags,
                std::ptr::null(),
            )),
            Op::Remount { target, flags } => ok(libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | *flags,
                std::ptr::null(),
            )),
            Op::WriteFile { path, data } => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd == -1 {
                    return Err(errno());
                }
                let bytes = data.as_bytes();
                let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                let e = errno();
                libc::close(fd);
                if n != bytes.len() as isize {
                    return Err(if n == -1 { e } else { libc::EIO });
                }
                Ok(())
            }
            Op::ReadOnly { path } => {
                if libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == -1
                {
                    return if errno() == libc::ENOENT {
                        Ok(())
                    } else {
                        Err(errno())
                    };
                }
                ok(libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))
            }
        }
    }
}

/// `struct ifreq` with the flags member of its union (40 bytes on Linux).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Brings `lo` up in the new network namespace.
fn loopback_up() -> Result<(), Failure> {
    let mut req = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: a socket only for the ioctls; `req` is a valid ifreq for both.
    unsafe {
        let sock = check(
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0),
            Step::Loopback,
            0,
        )?;
        let result = (|| {
            check(
                libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req),
                Step::Loopback,
                1,
            )?;
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(
                libc::ioctl(sock, libc::SIOCSIFFLAGS, &req),
                Step::Loopback,
                2,
            )
        })();
        libc::close(sock);
        result.map(|_| ())
    }
}

/// Opens a pty in the container's own devpts, sends the master to the parent and returns
/// the slave.
fn open_pty(socket: RawFd) -> Result<RawFd, Failure> {
    // SAFETY: syscalls on descriptors we own with valid stack buffers; the cmsg buffer is
    // aligned for cmsghdr and large enough for one descriptor (checked by CMSG_SPACE).
    unsafe {
        let master = check(
            libc::open(
                c"/dev/pts/ptmx".as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            ),
            Step::Pty,
            0,
        )?;
        let unlock: c_int = 0;
        check(libc::ioctl(master, libc::TIOCSPTLCK, &unlock), Step::Pty, 1)?;
        let slave = check(
            libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY),
            Step::Pty,
            2,
        )?;

        #[repr(C, align(8))]
        struct CmsgBuf([u8; 64]);
        let mut cmsg_buf = CmsgBuf([0; 64]);
        let space = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
        if space > cmsg_buf.0.len() {
            return Err(Failure {
                step: Step::Pty,
                index: 3,
                errno: libc::ENOBUFS,
            });
        }
        let mut payload = [b'T'];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(Failure {
                step: Step::Pty,
                index: 3,
                errno: libc::EINVAL,
            });
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), master);
        if libc::sendmsg(socket, &msg, 0) == -1 {
            return Err(fail(Step::Pty, 4));
        }
        libc::close(master);
        libc::close(socket);
        Ok(slave)
    }
}

/// `mkdir -p` of a path without allocating; `Err(errno)` on failure.
fn mkdir_all(bytes: &[u8]) -> Result<(), i32> {
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for end in 1..=bytes.len() {
        if end == bytes.len() || bytes[end] == b'/' {
            buf[..end].copy_from_slice(&bytes[..end]);
            buf[end] = 0;
            // SAFETY: `buf` holds a NUL-terminated prefix of the path.
            if unsafe { libc::mkdir(buf.as_ptr().cast(), 0o755) } == -1 && errno() != libc::EEXIST {
                return Err(errno());
            }
        }
    }
    Ok(())
}

/// `mkdir -p` of the working directory (runc creates it too), then chdir into it.
fn make_workdir(plan: &Plan) -> Result<(), Failure> {
    mkdir_all(plan.cwd.as_bytes()).map_err(|errno| Failure {
        step: Step::Workdir,
        index: 0,
        errno,
    })?;
    // SAFETY: a C string from the plan.
    check(unsafe { libc::chdir(plan.cwd.as_ptr()) }, Step::Workdir, 1)?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Shrinks the bounding set to the plan's, changes to the plan's user (keeping the
/// capabilities across the change), sets effective, permitted and inheritable, and
/// raises the ambient ones (after clearing any inherited).
fn drop_capabilities(plan: &Plan) -> Result<(), Failure> {
    let caps = plan.caps;
    for cap in 0..=plan.cap_last.min(63) {
        if caps.bounding & (1u64 << cap) == 0 {
            // SAFETY: plain prctl.
            let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            // EINVAL: a capability this kernel does not have.
            if ret == -1 && errno() != libc::EINVAL {
                return Err(fail(Step::Capabilities, cap as usize));
            }
        }
    }
    if let Some(user) = &plan.user {
        // SAFETY: plain syscalls; the group list is a valid slice.
        unsafe {
            // Keep the permitted set when the uid leaves 0; capset below restores the
            // effective set, which the change always clears.
            check(
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
                Step::User,
                0,
            )?;
            // A user namespace whose groups were mapped without privileges denies
            // setgroups: with no supplementary groups asked for, there is nothing to
            // set (as under runc).
            if !(plan.setgroups_denied && user.groups.is_empty()) {
                check(
                    libc::setgroups(user.groups.len(), user.groups.as_ptr()),
                    Step::User,
                    1,
                )?;
            }
            check(libc::setresgid(user.gid, user.gid, user.gid), Step::User, 2)?;
            check(libc::setresuid(user.uid, user.uid, user.uid), Step::User, 3)?;
            check(
                libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0),
                Step::User,
                4,
            )?;
        }
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |mask: u64, high: bool| {
        if high {
            (mask >> 32) as u32
        } else {
            mask as u32
        }
    };
    let data = [false, true].map(|high| CapData {
        effective: half(caps.effective, high),
        permitted: half(caps.permitted, high),
        inheritable: half(caps.inheritable, high),
    });
    // SAFETY: header and the two data structs have the kernel's v3 layout.
    unsafe {
        check(
            libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as c_int,
            Step::Capabilities,
            100,
        )?;
        let ret = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        // EINVAL: a kernel without ambient capabilities, so none to clear.
        if ret == -1 && errno() != libc::EINVAL {
            return Err(fail(Step::Capabilities, 101));
        }
        for cap in 0..=plan.cap_last.min(63) {
            // The kernel raises an ambient capability only if it is permitted and
            // inheritable; runc's default spec lists ambient ones that are not
            // inheritable, and, as runc does, those are skipped rather than fatal.
            let usable = caps.permitted & caps.inheritable;
            if caps.ambient & usable & (1u64 << cap) != 0 {
                check(
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    ),
                    Step::Capabilities,
                    200 + cap as usize,
                )?;
            }
        }
    }
    Ok(())
}

/// Gives the command a clean process: no blocked signals, default dispositions (Rust
/// ignores SIGPIPE, and an ignored signal stays ignored across exec), the plan's umask and no
/// descriptors but 0-2.
fn reset_process_state(umask: libc::mode_t) {
    // SAFETY: signal-mask and disposition syscalls on valid structures; close_range only
    // flags descriptors close-on-exec.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::umask(umask);
        // Failure (a kernel before 5.11) only means descriptors the parent forgot to mark
        // close-on-exec would leak into the container; std marks all of its own.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Tries each candidate like execvp; returns only on failure.
fn exec(plan: &Plan) -> Failure {
    let mut missing_interpreter = None;
    let mut denied = None;
    for (i, path) in plan.candidates.iter().enumerate() {
        // SAFETY: argv and envp are NULL-terminated arrays of C strings owned by the plan.
        unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        let e = errno();
        match e {
            libc::ENOENT | libc::ENOTDIR => {
                // SAFETY: a C string from the plan.
                if e == libc::ENOENT && unsafe { libc::access(path.as_ptr(), libc::F_OK) } == 0 {
                    missing_interpreter.get_or_insert(i);
                }
            }
            libc::EACCES => {
                denied.get_or_insert(i);
            }
            _ => {
                return Failure {
                    step: Step::Exec,
                    index: i as u32,
                    errno: e,
                }
            }
        }
    }
    if let Some(i) = missing_interpreter {
        return Failure {
            step: Step::Interpreter,
            index: i as u32,
            errno: libc::ENOENT,
        };
    }
    if let Some(i) = denied {
        return Failure {
            step: Step::Exec,
            index: i as u32,
            errno: libc::EACCES,
        };
    }
    Failure {
        step: Step::NotFound,
        index: 0,
        errno: libc::ENOENT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_descriptor_paths_without_allocating() {
        let mut digits = [0u8; 10];
        let len = decimal(4_294_967_295, &mut digits);
        assert_eq!(&digits[..len], b"4294967295");
        let len = decimal(0, &mut digits);
        assert_eq!(&digits[..len], b"0");
        assert_eq!(&fd_path(17)[..17], b"/proc/self/fd/17\0");
    }

    #[test]
    fn failure_roundtrip() {
        let f = Failure {
            step: Step::PrePivot,
            index: 7,
            errno: libc::EPERM,
        };
        assert_eq!(Failure::decode(&f.encode()), Some(f));
        assert_eq!(Failure::decode(&[0xff; Failure::SIZE]), None);
        for v in 1..=24 {
            assert_eq!(Step::from_u32(v).map(|s| s as u32), Some(v));
        }
    }
}
