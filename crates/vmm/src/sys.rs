//! The few raw system calls the machine loop needs: blocking signals into
//! a signalfd, and poll. Each unsafe block is small and explained.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Signals that stop a VM: Ctrl-C, `kill`, a closed terminal.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// While alive, the stop signals are blocked in this thread (and every
/// thread it starts) and delivered through a signalfd instead.
pub struct SignalFd {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl SignalFd {
    pub fn block_stop_signals() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t we own; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in STOP_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
        }
        // SAFETY: both pointers are to valid sigset_t values we own.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if raw < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: restoring the mask we saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(err);
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(SignalFd { fd, old_mask })
    }

    /// The next pending stop signal, if any.
    pub fn read_signal(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved when the signals were blocked.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns,
/// for each fd, whether it is readable (or hung up).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries.
    let rc = unsafe {
        libc::poll(
            pollfds.as_mut_ptr(),
            pollfds.len() as libc::nfds_t,
            timeout_ms,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pollfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// Reads what is available from `fd` (one read call).
pub fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Asks the host kernel to back guest RAM with transparent huge pages, as
/// QEMU does (this host's THP setting is `madvise`, so without the advice
/// guest RAM is in 4 KiB pages). The software vCPU reaches guest pages all
/// over RAM; with 4 KiB host pages each costs the host's TLB an entry.
/// Advice only: where the kernel has no THP (EINVAL) the pages stay small
/// and nothing else changes, so a failure is not an error.
pub fn advise_huge_pages(memory: &hypervisor::GuestRam) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for region in memory.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        // SAFETY: `[host, host + len)` is the region's own mapping, alive
        // while `memory` is; MADV_HUGEPAGE changes how the kernel backs it,
        // never its contents.
        unsafe {
            libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE);
        }
    }
}
