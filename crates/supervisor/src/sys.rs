//! The system calls the supervisor needs that std does not wrap.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// An exclusive, non-blocking flock on `path` (created if missing):
/// `None` if another process holds it.
pub fn try_lock(path: &Path) -> io::Result<Option<fs::File>> {
    container::leftovers::try_lock(path)
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are new descriptors only we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs `f` with this process's stdin, stdout and stderr set to `fd`, then
/// puts them back (a child created in `f` keeps `fd` as its stdio).
pub fn with_stdio<T>(fd: RawFd, f: impl FnOnce() -> T) -> io::Result<T> {
    let mut saved = Vec::new();
    for std_fd in 0..3 {
        // SAFETY: dup of the process's own standard descriptor.
        let copy = unsafe { libc::fcntl(std_fd, libc::F_DUPFD_CLOEXEC, 3) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor fcntl just returned, ours to close.
        saved.push(unsafe { OwnedFd::from_raw_fd(copy) });
    }
    let restore = |saved: &[OwnedFd]| {
        for (std_fd, copy) in saved.iter().enumerate() {
            // SAFETY: dup2 from a valid saved descriptor onto a standard one.
            unsafe { libc::dup2(copy.as_raw_fd(), std_fd as RawFd) };
        }
    };
    for std_fd in 0..3 {
        // SAFETY: dup2 onto a standard descriptor from a valid one.
        if unsafe { libc::dup2(fd, std_fd) } < 0 {
            let e = io::Error::last_os_error();
            restore(&saved);
            return Err(e);
        }
    }
    let result = f();
    restore(&saved);
    Ok(result)
}

/// A pseudo-terminal: the master this process keeps, the slave it hands
/// on, and the slave's path.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub slave_path: std::path::PathBuf,
}

/// A new pseudo-terminal of 24 rows and 80 columns, both ends
/// close-on-exec and neither this process's controlling terminal.
pub fn open_pty() -> io::Result<Pty> {
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor posix_openpt just returned, ours to close.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: grantpt/unlockpt take the master; ptsname_r writes at most
    // `name.len()` bytes, NUL-terminated, into `name`.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave_path = std::path::PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path.to_bytes()),
    );
    let slave = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&slave_path)?;
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Ok(Pty {
        master,
        slave: OwnedFd::from(slave),
        slave_path,
    })
}

/// Reaps every child (exec helpers too) until `pid` ends. `pid` is only
/// reaped after `ended` ran: until then it is a zombie, so its number
/// cannot be reused by another process. Its wait status.
pub fn reap_until(pid: libc::pid_t, ended: impl Fn()) -> i32 {
    loop {
        // SAFETY: siginfo_t is plain data, filled by waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t for waitid to write;
        // WNOWAIT leaves the child to be reaped below.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                ended();
                return -1;
            }
            continue;
        }
        // SAFETY: waitid filled `info` for an exited child.
        let child = unsafe { info.si_pid() };
        if child == pid {
            ended();
        }
        let mut status = 0;
        // SAFETY: `status` is a valid int for waitpid to write.
        unsafe { libc::waitpid(child, &mut status, 0) };
        if child == pid {
            return status;
        }
    }
}

/// Sends `signal` to `pid`.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(pid, signal) };
}

/// Orphaned descendants become this process's children, not init's.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag, no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for both calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks `signals` in the calling thread (and the threads it starts).
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: a valid set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of `signals` (blocked in every thread); its number.
pub fn wait_signal(signals: &[libc::c_int]) -> Option<libc::c_int> {
    let set = signal_set(signals);
    let mut sig = 0;
    // SAFETY: a valid set and a valid int to write the signal into.
    (unsafe { libc::sigwait(&set, &mut sig) } == 0).then_some(sig)
}

/// Makes `command`'s child, between fork and exec, die with this process
/// (`PR_SET_PDEATHSIG`: a VMM must not run on unsupervised) and join the
/// cgroups whose `cgroup.procs` files are `procs`, so that everything it
/// ever allocates is charged to them. The child fails to start if it
/// cannot. Call from the thread that lives as long as the child should
/// (the parent-death signal follows the forking thread).
pub fn confine_before_exec(command: &mut std::process::Command, procs: Vec<CString>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and
    // makes only async-signal-safe calls (prctl, getppid, open, write,
    // close) on C strings made before the fork, and builds its errors
    // from error numbers (no allocation); "0" names the writing process.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor died before the signal was armed.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            Ok(())
        });
    }
}

/// Reaps child `pid` (after it was killed).
pub fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: `status` is a valid int for waitpid to write.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Sends what of `bytes` the socket `fd` takes now, without blocking
/// (only this call: the socket stays blocking for its other users).
pub fn send_now(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length; send only reads it.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
