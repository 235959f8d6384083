//! The system calls the supervisor needs that std does not wrap.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// Runs `f` with this process's stdout and stderr pointing at `fd`, then
/// restores them (children started inside inherit `fd`).
pub fn with_stdio<T>(fd: RawFd, f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: dup of the process's own standard descriptors.
    let saved_out = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    if saved_out < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; `saved_out` is ours to close.
    let saved_out = unsafe { OwnedFd::from_raw_fd(saved_out) };
    // SAFETY: as above.
    let saved_err = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    if saved_err < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let saved_err = unsafe { OwnedFd::from_raw_fd(saved_err) };
    // SAFETY: dup2 onto the standard descriptors from valid ones; on a
    // failure the saved ones are put back.
    unsafe {
        if libc::dup2(fd, 1) < 0 || libc::dup2(fd, 2) < 0 {
            let e = io::Error::last_os_error();
            libc::dup2(saved_out.as_raw_fd(), 1);
            libc::dup2(saved_err.as_raw_fd(), 2);
            return Err(e);
        }
    }
    let result = f();
    // SAFETY: restoring the saved descriptors, which are valid.
    unsafe {
        libc::dup2(saved_out.as_raw_fd(), 1);
        libc::dup2(saved_err.as_raw_fd(), 2);
    }
    Ok(result)
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
