//! virtio-vsock (virtio 1.2, section 5.10) with Firecracker's host side:
//! stream sockets between the guest (CID 3 by default) and programs on
//! the host, carried over Unix sockets.
//!
//! - The host connects to the Unix socket at PATH and writes
//!   `CONNECT <port>\n`; once a guest program listening on that vsock port
//!   accepts, vessel answers `OK <host port>\n` and the stream carries the
//!   connection's bytes both ways.
//! - A guest program connecting to the host (CID 2) on port P reaches the
//!   Unix socket at `PATH_P`, which a host program listens on.
//!
//! One I/O thread ([`muxer`]) serves the three queues, the listening
//! socket and every connection's Unix stream. Flow control follows the
//! spec's credit scheme: each side announces its buffer space and how much
//! it has consumed, and neither sends more than the other can hold. Every
//! packet the guest sends is checked; a packet that breaks the protocol
//! resets its connection.

mod muxer;
pub mod packet;

use crate::device::{read_config_bytes, Activation, VirtioDevice, COMMON_FEATURES};
use crate::worker::DeviceThread;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The guest's address unless configured otherwise (as Firecracker's).
pub const DEFAULT_GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;

/// Why the vsock device cannot be set up, in one line.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("--vsock {}: is in use by another program (something accepts connections there)", .0.display())]
    InUse(PathBuf),
    #[error("--vsock {}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("--vsock {}: {error}", path.display())]
    Bind { path: PathBuf, error: io::Error },
}

/// The vsock device and its listening socket (removed when the device
/// goes).
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    config: [u8; 8],
    queue_sizes: [u16; 3],
    thread: Option<DeviceThread>,
    name: String,
}

impl Vsock {
    /// Binds the host side at `path`. A socket file left behind by a VM
    /// that is gone is replaced; one that still accepts is in use.
    pub fn new(cid: u64, path: &Path, name: &str) -> Result<Vsock, VsockError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(VsockError::NotASocket(path.to_owned()));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(VsockError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(|error| VsockError::Bind {
                    path: path.to_owned(),
                    error,
                })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(VsockError::Bind {
                    path: path.to_owned(),
                    error,
                })
            }
        }
        let listener = UnixListener::bind(path).map_err(|error| VsockError::Bind {
            path: path.to_owned(),
            error,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|error| VsockError::Bind {
                path: path.to_owned(),
                error,
            })?;
        Ok(Vsock {
            cid,
            path: path.to_owned(),
            listener,
            config: cid.to_le_bytes(),
            queue_sizes: [QUEUE_SIZE; 3],
            thread: None,
            name: name.to_owned(),
        })
    }
}

impl Vsock {
    /// Activates the device and serves its transmit then its receive
    /// queue once, on the calling thread (as the I/O thread would after a
    /// notification of each); whether the device then needs a reset.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn serve_once(&self, activation: Activation) -> io::Result<bool> {
        let needs_reset = activation.needs_reset.clone();
        let listener = self.listener.try_clone()?;
        let mut muxer = muxer::Muxer::new(activation, self.cid, listener, self.path.clone())?;
        let stop = crate::worker::StopSignal::never()?;
        muxer.serve_notified_queues(&stop);
        Ok(needs_reset.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.thread = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let mut muxer = muxer::Muxer::new(activation, self.cid, listener, self.path.clone())?;
        self.thread = Some(DeviceThread::spawn(&self.name, move |stop| {
            muxer.run(&stop)
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        // Every connection goes with the thread; the listener stays.
        self.thread = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_path_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let first = Vsock::new(3, &path, "vsock").unwrap();
        assert!(matches!(
            Vsock::new(3, &path, "vsock"),
            Err(VsockError::InUse(_))
        ));
        drop(first);
        assert!(!path.exists(), "the socket goes with the device");
        // A stale socket (nobody accepts) is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let _again = Vsock::new(3, &path, "vsock").unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Vsock::new(3, &file, "vsock"),
            Err(VsockError::NotASocket(_))
        ));
    }
}
