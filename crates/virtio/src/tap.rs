//! A host tap device for virtio-net: frames with a virtio-net header in
//! front, so checksum and segmentation offloads pass between the guest and
//! the host kernel unchanged.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the
/// flags (the rest of the union is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Bytes of the virtio-net header in front of every frame (the virtio 1.0
/// layout with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// The offloads the guest may receive, as TUNSETOFFLOAD names them.
pub const OFFLOAD_CSUM: u32 = libc::TUN_F_CSUM;
pub const OFFLOAD_TSO4: u32 = libc::TUN_F_TSO4;
pub const OFFLOAD_TSO6: u32 = libc::TUN_F_TSO6;

/// Why a tap could not be opened, in one line.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--net tap: /dev/net/tun: {0}")]
    Tun(io::Error),
    #[error("--net tap: tap name {0:?} is longer than 15 bytes or not printable")]
    BadName(String),
    #[error(
        "--net tap{}: cannot create or attach the tap device: {error}{hint}",
        name.as_deref().map(|n| format!("={n}")).unwrap_or_default(),
        hint = if error.raw_os_error() == Some(libc::EPERM) {
            " (needs CAP_NET_ADMIN, or a tap created for your user with `ip tuntap add ... user`)"
        } else {
            ""
        }
    )]
    Attach {
        name: Option<String>,
        error: io::Error,
    },
    #[error("--net tap: the tap does not take virtio-net headers: {0}")]
    VnetHdr(io::Error),
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
    offloads: u32,
}

impl Tap {
    /// Opens tap `name` (creating it when it does not exist), or a new tap
    /// named by the kernel (`vessel0`, ...) when `name` is `None`; frames
    /// carry 12-byte virtio-net headers, and the guest may receive what the
    /// tap accepts of checksum offload and TSO.
    pub fn open(name: Option<&str>) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let wanted = name.unwrap_or("vessel%d");
        if wanted.len() >= libc::IFNAMSIZ
            || wanted.is_empty()
            || !wanted.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(TapError::BadName(wanted.to_owned()));
        }
        req.name[..wanted.len()].copy_from_slice(wanted.as_bytes());
        // SAFETY: a plain open of a path given as a NUL-terminated literal;
        // the result is checked before use.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Tun(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // is laid out as (repr(C), 40 bytes) and outlives the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(TapError::Attach {
                name: name.map(str::to_owned),
                error: io::Error::last_os_error(),
            });
        }
        let len = req
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at `hdr_len` for the duration of the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            return Err(TapError::VnetHdr(io::Error::last_os_error()));
        }
        let mut tap = Tap {
            file,
            name,
            offloads: 0,
        };
        // What the tap takes decides what virtio-net offers the guest.
        let all = OFFLOAD_CSUM | OFFLOAD_TSO4 | OFFLOAD_TSO6;
        if tap.set_offloads(all).is_ok() {
            tap.offloads = all;
        } else if tap.set_offloads(OFFLOAD_CSUM).is_ok() {
            tap.offloads = OFFLOAD_CSUM;
        }
        // Until the guest negotiates, it takes none.
        let _ = tap.set_offloads(0);
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads the tap supports (a mask of `OFFLOAD_*`).
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    /// Tells the tap which offloads the guest takes on received frames.
    pub fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A stand-in for a tap in tests: one end of a non-blocking datagram
    /// socket pair, which reads and writes whole frames as a tap does and
    /// takes no offloads.
    #[cfg(test)]
    pub(crate) fn from_datagram_socket(socket: std::os::unix::net::UnixDatagram) -> Tap {
        Tap {
            file: File::from(std::os::fd::OwnedFd::from(socket)),
            name: "test".to_owned(),
            offloads: 0,
        }
    }

    /// Reads one frame (header included); `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        (&self.file).read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for bad in ["", "a-name-that-is-too-long", "has space"] {
            assert!(
                matches!(Tap::open(Some(bad)), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
