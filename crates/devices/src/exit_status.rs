//! A one-byte port where the guest reports its exit status.
//!
//! The guest's init writes the exit status of the command it ran to this
//! port just before powering off; the VMM reads it afterwards through the
//! [`ExitStatus`] handle to return it as its own exit code.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::bus::BusDevice;

/// A suggested port (clear of the PC legacy devices); the VMM may choose
/// another as long as the guest init agrees.
pub const DEFAULT_EXIT_STATUS_PORT: u16 = 0x501;
/// Bus length of the device.
pub const EXIT_STATUS_LEN: u64 = 1;

/// Set in the shared value once the guest has written a status.
const WRITTEN: u16 = 0x100;

/// The VMM's view of the last status the guest wrote.
#[derive(Debug, Clone, Default)]
pub struct ExitStatus(Arc<AtomicU16>);

impl ExitStatus {
    /// The last byte the guest wrote, or None if it never wrote one.
    pub fn get(&self) -> Option<u8> {
        let v = self.0.load(Ordering::Acquire);
        (v & WRITTEN != 0).then_some(v as u8)
    }
}

/// The guest-facing port. Accepts one-byte writes at offset 0; reads return
/// the last status written (0 before any).
#[derive(Debug)]
pub struct ExitStatusPort {
    status: ExitStatus,
}

impl ExitStatusPort {
    /// The port and the handle the VMM keeps.
    pub fn new() -> (Self, ExitStatus) {
        let status = ExitStatus::default();
        (
            Self {
                status: status.clone(),
            },
            status,
        )
    }
}

impl BusDevice for ExitStatusPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (0, 1) => self.status.get().unwrap_or(0),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [v]) => self
                .status
                .0
                .store(WRITTEN | u16::from(*v), Ordering::Release),
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "exit status: ignoring non-byte write"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_last_byte() {
        let (mut port, status) = ExitStatusPort::new();
        assert_eq!(status.get(), None);
        port.write(0, &[0]);
        assert_eq!(status.get(), Some(0));
        port.write(0, &[3]);
        port.write(0, &[255]);
        assert_eq!(status.get(), Some(255));
        let mut b = [0];
        port.read(0, &mut b);
        assert_eq!(b, [255]);
        let clone = status.clone();
        port.write(0, &[42]);
        assert_eq!(clone.get(), Some(42));
    }

    #[test]
    fn ignores_other_widths_and_offsets() {
        let (mut port, status) = ExitStatusPort::new();
        port.write(0, &[1, 2]);
        port.write(1, &[1]);
        port.write(0, &[]);
        assert_eq!(status.get(), None);
        let mut w = [0u8; 2];
        port.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
