//! The few system calls std has no wrapper for: vsock sockets, pseudo-
//! terminals, sessions, signals. Declared here against the C library
//! (the agent has no dependencies, so that it builds with bare rustc).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int, c_ulong, c_ushort, c_void};

const AF_VSOCK: c_int = 40;
const SOCK_STREAM: c_int = 1;
const SOCK_CLOEXEC: c_int = 0o2_000_000;
const VMADDR_CID_ANY: u32 = u32::MAX;
const TIOCSCTTY: c_ulong = 0x540e;
const TIOCSWINSZ: c_ulong = 0x5414;

#[repr(C)]
struct SockaddrVm {
    family: c_ushort,
    reserved: c_ushort,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

#[repr(C)]
pub struct Winsize {
    pub rows: c_ushort,
    pub cols: c_ushort,
    pub xpixel: c_ushort,
    pub ypixel: c_ushort,
}

extern "C" {
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn bind(fd: c_int, addr: *const SockaddrVm, len: u32) -> c_int;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn accept4(fd: c_int, addr: *mut c_void, len: *mut u32, flags: c_int) -> c_int;
    fn openpty(
        master: *mut c_int,
        slave: *mut c_int,
        name: *mut c_char,
        termios: *const c_void,
        winsize: *const Winsize,
    ) -> c_int;
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    fn setsid() -> c_int;
    fn kill(pid: c_int, signal: c_int) -> c_int;
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigaddset(set: *mut SigSet, signal: c_int) -> c_int;
    fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigwaitinfo(set: *const SigSet, info: *mut SigInfo) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn sync();
    fn reboot(cmd: c_int) -> c_int;
    fn isatty(fd: c_int) -> c_int;
}

pub const SIGHUP: c_int = 1;
pub const SIGINT: c_int = 2;
pub const SIGTERM: c_int = 15;
pub const SIGCHLD: c_int = 17;
const SIG_BLOCK: c_int = 0;
const WNOHANG: c_int = 1;
const ECHILD: i32 = 10;

/// glibc's sigset_t: 1024 bits.
#[repr(C)]
struct SigSet([u64; 16]);

/// siginfo_t: 128 bytes; only the signal number (first) is read.
#[repr(C)]
struct SigInfo([i32; 32]);

fn signal_set(signals: &[c_int]) -> io::Result<SigSet> {
    let mut set = SigSet([0; 16]);
    // SAFETY: `set` is a valid sigset_t the calls write in place.
    unsafe {
        check(sigemptyset(&mut set))?;
        for &s in signals {
            check(sigaddset(&mut set, s))?;
        }
    }
    Ok(set)
}

/// Blocks `signals` in this (single-threaded) process, so that they are
/// only taken by [`wait_signal`].
pub fn block_signals(signals: &[c_int]) -> io::Result<()> {
    let set = signal_set(signals)?;
    // SAFETY: `set` is a valid sigset_t; the old mask is not wanted.
    check(unsafe { sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) }).map(|_| ())
}

/// Waits for one of `signals` (blocked); its number.
pub fn wait_signal(signals: &[c_int]) -> io::Result<c_int> {
    let set = signal_set(signals)?;
    let mut info = SigInfo([0; 32]);
    // SAFETY: both pointers are valid for the call; `info` is as large
    // as siginfo_t.
    check(unsafe { sigwaitinfo(&set, &mut info) })
}

/// Reaps every exited child, telling `exited` each pid; whether none is left
/// at all.
pub fn reap_all(mut exited: impl FnMut(c_int)) -> bool {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid int for waitpid to write.
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid > 0 {
            exited(pid);
            continue;
        }
        return pid < 0 && io::Error::last_os_error().raw_os_error() == Some(ECHILD);
    }
}

fn check(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A listening vsock stream socket on `port` (any CID).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = check(unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just created and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = SockaddrVm {
        family: AF_VSOCK as c_ushort,
        reserved: 0,
        port,
        cid: VMADDR_CID_ANY,
        flags: 0,
        zero: [0; 3],
    };
    let len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `addr` is a sockaddr_vm that lives across the call; `len`
    // is its size.
    check(unsafe { bind(fd, &addr, len) })?;
    // SAFETY: listen(2) on the socket owned above.
    check(unsafe { listen(fd, 16) })?;
    Ok(owned)
}

/// The next connection on a listening socket.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: accept4(2) without an address buffer (both pointers null is
    // allowed); the result is checked.
    let fd = check(unsafe {
        accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pseudo-terminal of `rows` x `cols`: (master, slave).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let size = Winsize {
        rows,
        cols,
        xpixel: 0,
        ypixel: 0,
    };
    // SAFETY: openpty(3) writes the two descriptors; the name and termios
    // pointers may be null; `size` lives across the call.
    check(unsafe {
        openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    })?;
    // SAFETY: two new descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// Sets a terminal's window size.
pub fn set_window_size(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize {
        rows,
        cols,
        xpixel: 0,
        ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a struct winsize, which `size` is.
    check(unsafe { ioctl(fd, TIOCSWINSZ, &size as *const Winsize) }).map(|_| ())
}

/// In a child before exec: a new session whose controlling terminal is
/// its stdin (a pty slave). Only async-signal-safe calls.
pub fn become_session_leader_on_stdin() -> io::Result<()> {
    // SAFETY: setsid(2) and ioctl(2) are async-signal-safe and take no
    // pointers here.
    unsafe {
        check(setsid())?;
        check(ioctl(0, TIOCSCTTY, 0 as c_int))?;
    }
    Ok(())
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty(3) takes no pointers.
    unsafe { isatty(fd) == 1 }
}

/// Sends `signal` to process `pid` (a negative pid: its group).
pub fn send_signal(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes no pointers.
    check(unsafe { kill(pid, signal) }).map(|_| ())
}

/// Flushes every file system and powers the machine off (the agent as a
/// guest's last resort when there is no service manager to ask). Returns
/// only if the kernel refused.
pub fn sync_and_power_off() {
    const RB_POWER_OFF: c_int = 0x4321_fedc;
    // SAFETY: sync(2) and reboot(2) take no pointers.
    let refused = unsafe {
        sync();
        reboot(RB_POWER_OFF)
    };
    if refused != 0 {
        eprintln!("vessel-agent: powering off: {}", io::Error::last_os_error());
    }
}
