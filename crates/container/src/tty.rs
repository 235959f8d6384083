//! The host side of `-t`: the user's terminal in raw mode, the pty master the container
//! sends back, and window-size copying.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::c_int;
use std::os::unix::io::RawFd;

/// Restores a terminal's settings when dropped.
pub(crate) struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

pub(crate) fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawMode {
    /// Puts the terminal on `fd` in raw mode so keys (Ctrl-C included) reach the
    /// container's terminal as typed; the container's own pty does the line discipline.
    pub(crate) fn enter(fd: RawFd) -> io::Result<RawMode> {
        // SAFETY: termios is plain data, filled in by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring settings read from this same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved) };
    }
}

/// Copies the window size of terminal `from` to pty `to` (which signals SIGWINCH to the
/// container's foreground process group when it changes). Not a terminal: nothing.
pub(crate) fn copy_window_size(from: RawFd, to: RawFd) {
    // SAFETY: winsize is plain data; both ioctls take a pointer to one.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        if libc::ioctl(from, libc::TIOCGWINSZ, &mut size) == 0 {
            libc::ioctl(to, libc::TIOCSWINSZ, &size);
        }
    }
}

/// Receives the pty master the child sends over `socket`. `Ok(None)`: the child closed
/// the socket without sending (it failed first; its error pipe says why).
pub(crate) fn receive_master(socket: RawFd) -> io::Result<Option<OwnedFd>> {
    #[repr(C, align(8))]
    struct CmsgBuf([u8; 64]);
    let mut cmsg_buf = CmsgBuf([0; 64]);
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the recvmsg call,
    // and the control buffer is aligned for cmsghdr.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_buf.0.len();
        let n = loop {
            let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break n;
        };
        if n == -1 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the container sent no pty descriptor",
            ));
        }
        let fd: c_int = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>());
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}
