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

/// Sends `signal` to process `pid` (a negative pid: its group).
pub fn send_signal(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes no pointers.
    check(unsafe { kill(pid, signal) }).map(|_| ())
}
