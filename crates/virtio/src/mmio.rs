//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2
//! register layout): a 4 KiB window of registers per device that the
//! guest's `virtio_mmio` driver finds through the ACPI DSDT.
//!
//! Register accesses arrive from vCPU threads as MMIO exits. Queue
//! notifications normally do not: the VMM registers each queue's eventfd
//! for the QueueNotify register (with the queue index as datamatch), so
//! they go straight to the device's I/O thread; a notify write that does
//! reach the transport signals the same eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use ram::GuestRam;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::device::VIRTIO_RING_F_EVENT_IDX;
use crate::device::{Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Bytes of guest-physical address space each device's window takes.
pub const MMIO_WINDOW: u64 = 0x1000;
/// The register block's size as the DSDT describes it (registers and
/// configuration space).
pub const MMIO_REGISTERS: u64 = 0x200;
/// Offset of QueueNotify in the window: the VMM registers each queue's
/// ioeventfd here, with the queue index as datamatch.
pub const QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID: "VSSL" would not fit the spec's PCI-style meaning; 0 is
/// what an unregistered vendor reports in practice (Firecracker too).
const VENDOR_ID: u32 = 0;

/// The driver's view of one queue before the device runs it.
struct QueueSetup {
    queue: Queue,
    notify: Arc<EventFd>,
    /// The driver wrote a size or ring address the queue cannot take
    /// (virtio-queue keeps the old value): enabling it must fail.
    invalid: bool,
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestRam,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueSetup>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
    active: bool,
    needs_reset: Arc<AtomicBool>,
}

impl MmioTransport {
    /// `device` on `memory`, interrupting through `interrupt`. `notifiers`
    /// holds one eventfd per queue, which the VMM registers as the
    /// queue's ioeventfd; they must be non-blocking (EFD_NONBLOCK), since
    /// a reset drains them from a vCPU thread.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestRam,
        interrupt: Arc<Interrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<MmioTransport, String> {
        let sizes = device.queue_max_sizes().to_vec();
        if notifiers.len() != sizes.len() {
            return Err(format!(
                "{} queue notifiers for {} queues",
                notifiers.len(),
                sizes.len()
            ));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (max, notify) in sizes.into_iter().zip(notifiers) {
            let queue = Queue::new(max).map_err(|e| format!("queue of {max}: {e}"))?;
            queues.push(QueueSetup {
                queue,
                notify,
                invalid: false,
            });
        }
        Ok(MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            active: false,
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Wraps the transport for the bus.
    pub fn into_bus_device(self) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(self))
    }

    fn selected(&mut self) -> Option<&mut QueueSetup> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn status(&self) -> u32 {
        if self.needs_reset.load(Ordering::SeqCst) {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        let features = self.device.features();
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.queue.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.queue.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: a length of all ones says so.
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    /// Queue registers may change only while the driver sets the device
    /// up (before DRIVER_OK) and while the queue is not enabled.
    fn queue_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self
                .queues
                .get(self.queue_select as usize)
                .is_some_and(|q| !q.queue.ready())
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    return; // fixed once FEATURES_OK is set
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if self.queue_writable() {
                    if let Some(q) = self.selected() {
                        let max = u32::from(q.queue.max_size());
                        if value == 0 || value > max || !value.is_power_of_two() {
                            // Remembered, and refused when the queue is
                            // enabled (the queue keeps its old size).
                            q.invalid = true;
                        } else {
                            q.queue.set_size(value as u16);
                        }
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value == 1),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !self.queue_writable() {
                    return;
                }
                let Some(q) = self.selected() else { return };
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                // The rings' alignment (2.7): descriptors 16, available 2,
                // used 4 bytes; virtio-queue would ignore a misaligned one.
                let align = match offset {
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW => 16,
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => 2,
                    reg::VIRTIO_MMIO_QUEUE_USED_LOW => 4,
                    _ => 1,
                };
                if !value.is_multiple_of(align) {
                    q.invalid = true;
                    return;
                }
                match offset {
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        q.queue.set_desc_table_address(low, high)
                    }
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        q.queue.set_avail_ring_address(low, high)
                    }
                    _ => q.queue.set_used_ring_address(low, high),
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd before it gets here.
                if let Some(q) = self.queues.get(value as usize) {
                    let _ = q.notify.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {
                tracing::trace!(
                    offset,
                    value,
                    "virtio-mmio: write to a read-only or unknown register"
                );
            }
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return;
        }
        let memory = self.memory.clone();
        let Some(q) = self.selected() else { return };
        q.queue.set_ready(ready);
        if ready && (q.invalid || !q.queue.is_valid(&memory)) {
            // A bad size, misaligned rings or rings outside guest RAM: the
            // queue stays disabled (QueueReady reads 0) and, since Linux
            // does not read it back, the device asks for a reset.
            tracing::debug!("virtio-mmio: the driver enabled an invalid queue");
            q.queue.set_ready(false);
            self.needs_reset.store(true, Ordering::SeqCst);
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        // Status bits only ever get set, one step at a time (3.1.1).
        if value & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = value,
                "virtio-mmio: the driver cleared status bits without a reset"
            );
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let accepted = self.driver_features & offered == self.driver_features
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !accepted {
                // FEATURES_OK stays clear: the driver sees the device
                // refused (a legacy driver, or features never offered). A
                // DRIVER_OK in the same write cannot start it either.
                self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
                if value & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    self.needs_reset.store(true, Ordering::SeqCst);
                }
                return;
            }
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 && self.active {
            self.device.reset();
            self.active = false;
        }
    }

    fn activate(&mut self) {
        let need =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        if self.status & need != need {
            tracing::debug!("virtio-mmio: DRIVER_OK before feature negotiation finished");
            self.needs_reset.store(true, Ordering::SeqCst);
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            if !q.queue.ready() {
                queues.push(None);
                continue;
            }
            let notify = match q.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!("virtio-mmio: cloning a queue eventfd: {e}");
                    self.needs_reset.store(true, Ordering::SeqCst);
                    return;
                }
            };
            // The device gets a copy; the transport's stays as the driver
            // set it up, for the next activation after a reset.
            let mut queue = match Queue::try_from(q.queue.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    tracing::warn!("virtio-mmio: queue refused at DRIVER_OK: {e}");
                    self.needs_reset.store(true, Ordering::SeqCst);
                    return;
                }
            };
            queue.set_event_idx(event_idx);
            queues.push(Some(ActiveQueue { queue, notify }));
        }
        let activation = Activation {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
            needs_reset: self.needs_reset.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!("virtio-mmio: starting the device: {e}");
                self.needs_reset.store(true, Ordering::SeqCst);
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.queue.reset();
            q.invalid = false;
            // A notification left pending from before the reset must not
            // wake the next activation's thread for nothing.
            let _ = q.notify.read();
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.clear();
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            let config = offset - u64::from(reg::VIRTIO_MMIO_CONFIG);
            self.device.read_config(config, data);
            return;
        }
        // Registers are 32 bits wide and read whole (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            let config = offset - u64::from(reg::VIRTIO_MMIO_CONFIG);
            self.device.write_config(config, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset as u32, value);
    }
}
