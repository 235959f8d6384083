//! A test driver for virtio-mmio devices: it programs the transport's
//! registers the way Linux's virtio_mmio driver does and lays out a split
//! virtqueue in guest memory, so tests can send requests (well-formed or
//! hostile) and read what the device returned.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::interrupt::EventFdLine;
use ram::GuestRam;
use virtio::device::Interrupt;
use virtio::{MmioTransport, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const RAM: usize = 4 << 20;
/// Queue 0's rings; queue `q` has its own at `q * QUEUE_STRIDE` above.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const QUEUE_STRIDE: u64 = 0x4000;
/// Where tests put request buffers.
pub const BUFFERS: u64 = 0x10_0000;
pub const QUEUE_SIZE: u16 = 16;

pub const F_WRITE: u16 = 2;
pub const F_NEXT: u16 = 1;
pub const F_INDIRECT: u16 = 4;

pub const STATUS_ACK: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;

/// The driver's side of one queue.
#[derive(Default, Clone, Copy)]
struct DriverQueue {
    /// Next free descriptor and the driver's avail index.
    next_desc: u16,
    avail_idx: u16,
    /// The used index seen last.
    used_seen: u16,
}

fn rings(q: usize) -> (u64, u64, u64) {
    let off = q as u64 * QUEUE_STRIDE;
    (DESC + off, AVAIL + off, USED + off)
}

pub struct Driver {
    pub memory: GuestRam,
    pub transport: MmioTransport,
    pub irq: Arc<EventFd>,
    pub notify: Vec<Arc<EventFd>>,
    queues: Vec<DriverQueue>,
}

impl Driver {
    /// `device` behind a transport on fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Driver {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let line = Arc::new(EventFdLine(irq.try_clone().unwrap()));
        let interrupt = Arc::new(Interrupt::new(line));
        let count = device.queue_max_sizes().len();
        let notify: Vec<Arc<EventFd>> = (0..count)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        let transport =
            MmioTransport::new(device, memory.clone(), interrupt, notify.clone()).unwrap();
        Driver {
            memory,
            transport,
            irq,
            notify,
            queues: vec![DriverQueue::default(); count],
        }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(0x14, 0);
        let low = self.read(0x10);
        self.write(0x14, 1);
        let high = self.read(0x10);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Negotiates `features`; whether the device accepted them.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(0x70, 0);
        self.write(0x70, STATUS_ACK);
        self.write(0x70, STATUS_ACK | STATUS_DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.read(0x70) & STATUS_FEATURES_OK != 0
    }

    /// Sets up queue `index` at the given rings with `size` entries;
    /// whether the device took it (QueueReady reads back 1).
    pub fn setup_queue(&mut self, index: u32, desc: u64, avail: u64, used: u64, size: u16) -> bool {
        self.write(0x30, index);
        self.write(0x38, u32::from(size));
        self.write(0x80, desc as u32);
        self.write(0x84, (desc >> 32) as u32);
        self.write(0x90, avail as u32);
        self.write(0x94, (avail >> 32) as u32);
        self.write(0xa0, used as u32);
        self.write(0xa4, (used >> 32) as u32);
        self.write(0x44, 1);
        self.read(0x44) == 1
    }

    /// The whole start-up with VERSION_1 only and every queue.
    pub fn start(&mut self) {
        assert!(self.negotiate(1 << 32));
        for q in 0..self.queues.len() {
            let (desc, avail, used) = rings(q);
            assert!(self.setup_queue(q as u32, desc, avail, used, QUEUE_SIZE));
        }
        self.write(
            0x70,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// The driver's reset and a fresh start: rings cleared, indexes at 0.
    pub fn restart(&mut self) {
        self.write(0x70, 0);
        assert_eq!(self.read(0x70), 0, "status after reset");
        let len = self.queues.len() as u64 * QUEUE_STRIDE;
        self.memory
            .write_slice(&vec![0u8; len as usize], GuestAddress(DESC))
            .unwrap();
        for q in &mut self.queues {
            *q = DriverQueue::default();
        }
        self.start();
    }

    /// Writes descriptor `index` of queue 0's table.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc_on(0, index, addr, len, flags, next);
    }

    pub fn set_desc_on(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = rings(q).0 + u64::from(index) * 16;
        self.memory.write_obj(addr, GuestAddress(at)).unwrap();
        self.memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers to queue 0;
    /// its head.
    pub fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        self.add_chain_on(0, buffers)
    }

    pub fn add_chain_on(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.queues[q].next_desc;
        for (i, (addr, len, write)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let last = i + 1 == buffers.len();
            let flags = if *write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.set_desc_on(q, index, *addr, *len, flags, (index + 1) % QUEUE_SIZE);
        }
        self.queues[q].next_desc = (head + buffers.len() as u16) % QUEUE_SIZE;
        self.publish_on(q, head);
        head
    }

    /// Puts `head` in queue 0's available ring (without notifying).
    pub fn publish(&mut self, head: u16) {
        self.publish_on(0, head);
    }

    pub fn publish_on(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.queues[q].avail_idx % QUEUE_SIZE);
        let avail = rings(q).1;
        self.memory
            .write_obj(head, GuestAddress(avail + 4 + slot * 2))
            .unwrap();
        self.queues[q].avail_idx = self.queues[q].avail_idx.wrapping_add(1);
        self.set_avail_idx_on(q, self.queues[q].avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.set_avail_idx_on(0, idx);
    }

    pub fn set_avail_idx_on(&self, q: usize, idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.memory
            .write_obj(idx, GuestAddress(rings(q).1 + 2))
            .unwrap();
    }

    /// The driver's QueueNotify write (what the ioeventfd turns into an
    /// eventfd signal; here the transport forwards it).
    pub fn kick(&mut self, queue: u32) {
        self.write(0x50, queue);
    }

    pub fn used_idx_on(&self, q: usize) -> u16 {
        self.memory.read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Waits (at most 5 s) for queue 0's next used element; (head, len).
    pub fn wait_used(&mut self) -> (u32, u32) {
        self.wait_used_on(0)
    }

    pub fn wait_used_on(&mut self, q: usize) -> (u32, u32) {
        let start = Instant::now();
        while self.used_idx_on(q) == self.queues[q].used_seen {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the device returned nothing on queue {q} (status {:#x})",
                self.read(0x70)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let used = rings(q).2;
        let slot = u64::from(self.queues[q].used_seen % QUEUE_SIZE);
        let id: u32 = self
            .memory
            .read_obj(GuestAddress(used + 4 + slot * 8))
            .unwrap();
        let len: u32 = self
            .memory
            .read_obj(GuestAddress(used + 8 + slot * 8))
            .unwrap();
        self.queues[q].used_seen = self.queues[q].used_seen.wrapping_add(1);
        (id, len)
    }

    /// Waits (at most 5 s) until the device shows DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) {
        let start = Instant::now();
        while self.read(0x70) & STATUS_NEEDS_RESET == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the device never asked for a reset"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the interrupt line fired since the last call.
    pub fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }
}
