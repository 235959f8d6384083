//! What every virtio device model implements, and what it is given when
//! the driver starts it.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use devices::interrupt::InterruptLine;
use ram::GuestRam;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit 32: the device follows virtio 1.0 or later (mandatory for
/// the modern virtio-mmio transport vessel implements).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Descriptors may point at tables of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Notification suppression by ring index (fewer exits and interrupts).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// The features every vessel device offers besides its own.
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// A device's interrupt: the transport's interrupt status register (which
/// the driver reads and acknowledges) and the line that raises it.
pub struct Interrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl Interrupt {
    pub fn new(line: Arc<dyn InterruptLine>) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Used buffers are waiting in a queue.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// The device's configuration (or its status, such as NEEDS_RESET)
    /// changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the bits the driver has handled.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// One queue as the driver set it up, with the eventfd its notifications
/// arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub memory: GuestRam,
    /// The queues the driver enabled, by index (`None`: left disabled).
    pub queues: Vec<Option<ActiveQueue>>,
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
    /// Set by the device when it meets an error it cannot report in a
    /// request (a malformed queue): the transport then shows
    /// DEVICE_NEEDS_RESET to the driver.
    pub needs_reset: Arc<std::sync::atomic::AtomicBool>,
}

/// A virtio device model behind a transport.
///
/// Configuration accesses come from the vCPU threads, through the
/// transport; queue work happens on the device's own I/O thread, which
/// [`VirtioDevice::activate`] starts and [`VirtioDevice::reset`] stops.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 block, 4 entropy, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; their number is the device's
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (including [`COMMON_FEATURES`]).
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`. Bytes past its
    /// end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> io::Result<()>;
    /// Stops serving the queues and forgets the driver's state; the
    /// device can be activated again.
    fn reset(&mut self);
}

/// Copies `offset..offset + data.len()` of `config` into `data`, zeros
/// past its end (config space reads are guest input: any offset and width).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut b = [9u8; 4];
        read_config_bytes(&config, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
