//! Raw mode for the host terminal while a guest's serial console is on it.

use std::os::fd::RawFd;

/// Restores the terminal's settings when dropped.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawModeGuard {
    /// Puts the terminal on `fd` in raw mode: bytes pass to the guest as
    /// typed, unechoed. With `keep_signals`, Ctrl-C and Ctrl-\ still signal
    /// vessel (used when running one command, where Ctrl-C stops the VM).
    pub fn enter(fd: RawFd, keep_signals: bool) -> std::io::Result<Self> {
        // SAFETY: termios is plain data, filled by tcgetattr below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at
        // column 0; the guest's own tty already sends CR LF.
        raw.c_oflag = saved.c_oflag;
        if keep_signals {
            raw.c_lflag |= libc::ISIG;
        }
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawModeGuard { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restoring settings read from this same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The window size (rows, columns) of the terminal on `fd`.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data, filled by the ioctl.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a struct winsize, which `size` is.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } != 0 || size.ws_row == 0 {
        return None;
    }
    Some((size.ws_row, size.ws_col))
}
