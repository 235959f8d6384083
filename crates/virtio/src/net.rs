//! virtio-net (virtio 1.2, section 5.1) on a host tap device: one receive
//! and one transmit queue, served by an I/O thread that moves frames
//! between them and the tap.
//!
//! Frames keep their virtio-net header on the way through: the tap is
//! opened with 12-byte virtio-net headers, so checksum offload and TSO
//! negotiated with the guest become the tap's offloads, and segmentation
//! and checksumming happen once, in the host kernel, or not at all.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ram::GuestRam;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{read_config_bytes, Activation, Interrupt, VirtioDevice, COMMON_FEATURES};
use crate::tap::{Tap, OFFLOAD_CSUM, OFFLOAD_TSO4, OFFLOAD_TSO6, VNET_HDR_LEN};
use crate::vectored;
use crate::worker::{DeviceThread, StopSignal};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// The largest frame with its header: a 64 KiB TSO frame, its Ethernet
/// and VLAN headers, and the virtio-net header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65536 + 18;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const STATUS_LINK_UP: u16 = 1;

/// One network device.
pub struct Net {
    tap: Arc<Tap>,
    features: u64,
    config: [u8; 8],
    queue_sizes: [u16; 2],
    thread: Option<DeviceThread>,
    name: String,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6], name: &str) -> Net {
        let offloads = tap.supported_offloads();
        let mut features = COMMON_FEATURES
            | F_MAC
            | F_STATUS
            // The tap takes checksum-offloaded and GSO frames from the
            // guest whatever it can receive.
            | F_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            // Small receive buffers a frame may span: the driver needs no
            // 64 KiB chains of pages for TSO frames.
            | F_MRG_RXBUF;
        if offloads & OFFLOAD_CSUM != 0 {
            features |= F_GUEST_CSUM;
            if offloads & OFFLOAD_TSO4 != 0 {
                features |= F_GUEST_TSO4;
            }
            if offloads & OFFLOAD_TSO6 != 0 {
                features |= F_GUEST_TSO6;
            }
        }
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        Net {
            tap: Arc::new(tap),
            features,
            config,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            thread: None,
            name: name.to_owned(),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> io::Result<()> {
        let f = activation.features;
        let mut offloads = 0;
        if f & F_GUEST_CSUM != 0 {
            offloads |= OFFLOAD_CSUM;
            if f & F_GUEST_TSO4 != 0 {
                offloads |= OFFLOAD_TSO4;
            }
            if f & F_GUEST_TSO6 != 0 {
                offloads |= OFFLOAD_TSO6;
            }
        }
        self.tap.set_offloads(offloads)?;
        // Frames the tap queued while the device was stopped were shaped
        // for the offloads of before: drop them.
        let mut scratch = vec![0u8; MAX_FRAME];
        while self.tap.read_frame(&mut scratch).is_ok() {}
        self.thread = Some(spawn_thread(&self.name, self.tap.clone(), activation)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.thread = None;
        // Until the next driver negotiates, it takes no offloads.
        let _ = self.tap.set_offloads(0);
    }
}

const STOP: u64 = 100;
const TAP: u64 = 101;

fn spawn_thread(name: &str, tap: Arc<Tap>, mut activation: Activation) -> io::Result<DeviceThread> {
    let (Some(Some(rx)), Some(Some(tx))) = (
        activation.queues.get_mut(RX).map(Option::take),
        activation.queues.get_mut(TX).map(Option::take),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "virtio-net: the driver did not enable both queues",
        ));
    };
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (rx.notify.as_raw_fd(), RX as u64),
        (tx.notify.as_raw_fd(), TX as u64),
        (tap.as_raw_fd(), TAP),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let mut frames = Frames {
        memory: activation.memory,
        rx: rx.queue,
        tx: tx.queue,
        rx_notify: rx.notify,
        tx_notify: tx.notify,
        interrupt: activation.interrupt,
        needs_reset: activation.needs_reset,
        tap,
        rx_frame: vec![0; MAX_FRAME],
        rx_pending: 0,
        tap_armed: true,
        epoll,
        mergeable: activation.features & F_MRG_RXBUF != 0,
    };
    DeviceThread::spawn(name, move |stop| frames.run(&stop))
}

/// The I/O thread's state.
struct Frames {
    memory: GuestRam,
    rx: Queue,
    tx: Queue,
    rx_notify: EventFd,
    tx_notify: EventFd,
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<AtomicBool>,
    tap: Arc<Tap>,
    /// A frame read from the tap that waits for a receive buffer
    /// (`rx_pending` bytes of `rx_frame`).
    rx_frame: Vec<u8>,
    rx_pending: usize,
    /// Whether the tap is watched (not while no receive buffer is free).
    tap_armed: bool,
    epoll: Epoll,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive buffers.
    mergeable: bool,
}

/// A broken queue: the device stops until the driver resets it.
struct QueueBroken(String);

impl Frames {
    fn run(&mut self, stop: &StopSignal) {
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                stop.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .is_err()
        {
            tracing::error!("virtio-net: cannot watch the stop event");
            return;
        }
        let mut events = vec![EpollEvent::default(); 8];
        self.step(TX as u64, stop);
        self.step(TAP, stop);
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: waiting for events: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == STOP || stop.requested() {
                    return;
                }
                self.step(event.data(), stop);
            }
        }
    }

    fn step(&mut self, token: u64, stop: &StopSignal) {
        // Consume the notification first: a level-triggered eventfd left
        // set would wake the thread forever.
        if token == TX as u64 {
            let _ = self.tx_notify.read();
        } else if token == RX as u64 {
            let _ = self.rx_notify.read();
        }
        if self.needs_reset.load(Ordering::SeqCst) {
            return;
        }
        let result = if token == TX as u64 {
            self.transmit(stop)
        } else {
            self.receive(stop)
        };
        if let Err(QueueBroken(why)) = result {
            tracing::warn!("virtio-net: {why}; the device needs a reset");
            self.needs_reset.store(true, Ordering::SeqCst);
            // Nothing is served until the driver resets the device: stop
            // watching the queues and the tap, or their events would spin.
            for fd in [
                self.rx_notify.as_raw_fd(),
                self.tx_notify.as_raw_fd(),
                self.tap.as_raw_fd(),
            ] {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            let _ = self.interrupt.signal_config_change();
        }
    }

    /// Sends every frame the guest queued to the tap.
    fn transmit(&mut self, stop: &StopSignal) -> Result<(), QueueBroken> {
        let bad = |what: &str, e: virtio_queue::Error| QueueBroken(format!("{what}: {e}"));
        let memory = &self.memory;
        let mut sent = 0;
        loop {
            self.tx
                .disable_notification(memory)
                .map_err(|e| bad("transmit queue", e))?;
            loop {
                if stop.requested() {
                    return Ok(());
                }
                let chain = self
                    .tx
                    .iter(memory)
                    .map_err(|e| bad("transmit ring", e))?
                    .next();
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let reader =
                    Reader::new(memory, chain.clone()).map_err(|e| bad("transmit buffer", e))?;
                let len = reader.available_bytes();
                if (VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    // The frame goes from guest memory to the tap in one
                    // writev.
                    match vectored::chain_slices(memory, chain, false, 0, len) {
                        Ok(slices) => {
                            if let Err(e) = vectored::write_packet(&*self.tap, &slices) {
                                // The host dropped it (queue full, link
                                // down): as a NIC would, so does the guest.
                                tracing::debug!("virtio-net: tap write: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("virtio-net: reading a frame: {e}"),
                    }
                } else {
                    tracing::debug!("virtio-net: dropped a transmit chain of {len} bytes");
                }
                self.tx
                    .add_used(memory, head, 0)
                    .map_err(|e| bad("transmit used ring", e))?;
                sent += 1;
            }
            if !self
                .tx
                .enable_notification(memory)
                .map_err(|e| bad("transmit queue", e))?
            {
                break;
            }
        }
        if sent > 0
            && self
                .tx
                .needs_notification(memory)
                .map_err(|e| bad("transmit queue", e))?
        {
            let _ = self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Moves frames from the tap into receive buffers while both last.
    fn receive(&mut self, stop: &StopSignal) -> Result<(), QueueBroken> {
        let mut delivered = 0;
        loop {
            if stop.requested() {
                return Ok(());
            }
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue, // a runt: nothing to deliver
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The tap is gone (deleted on the host): no more
                        // frames will come, and its error would wake us
                        // forever. The link stays down for this VM.
                        tracing::warn!("virtio-net: reading the tap: {e}; no more frames");
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            self.tap.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        self.tap_armed = false;
                        return self.announce_received(delivered);
                    }
                }
            }
            let n = self.rx_pending;
            match self.deliver(n)? {
                Delivery::Delivered => {
                    self.rx_pending = 0;
                    delivered += 1;
                }
                Delivery::Dropped => self.rx_pending = 0,
                Delivery::NoBuffers { seen } => {
                    // Keep the frame and stop watching the tap until the
                    // driver adds buffers (its notification re-arms it).
                    arm_tap(&mut self.tap_armed, &self.tap, &self.epoll, false);
                    if self.wait_for_buffers(seen)? {
                        continue; // buffers arrived meanwhile
                    }
                    break;
                }
            }
        }
        if self.rx_pending == 0 {
            arm_tap(&mut self.tap_armed, &self.tap, &self.epoll, true);
        }
        self.announce_received(delivered)
    }

    /// Interrupts the driver for the `delivered` frames put in the used
    /// ring, where it asked to hear of them.
    fn announce_received(&mut self, delivered: usize) -> Result<(), QueueBroken> {
        if delivered == 0 {
            return Ok(());
        }
        if self
            .rx
            .needs_notification(&self.memory)
            .map_err(|e| QueueBroken(format!("receive queue: {e}")))?
        {
            let _ = self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Asks the driver to notify the receive queue when it adds the buffer
    /// at available index `seen` (the first one not yet looked at), and
    /// tells whether it already has. The buffers before `seen` were taken
    /// back unused (too few for the frame): counting from them, as
    /// [`QueueT::enable_notification`] does from the next available
    /// buffer, would find buffers "arrived" at once, and the I/O thread
    /// would spin there without ever announcing the frames it delivered
    /// before, which the driver must take before it refills the ring.
    /// (With VIRTIO_F_EVENT_IDX, a notification asked for at an index the
    /// driver has passed would also never come.)
    fn wait_for_buffers(&mut self, seen: u16) -> Result<bool, QueueBroken> {
        let bad = |e: virtio_queue::Error| QueueBroken(format!("receive queue: {e}"));
        let next = self.rx.next_avail();
        // enable_notification asks for the next available index, which is
        // `seen` for this call; the index of the buffers taken back is
        // restored afterwards.
        self.rx.set_next_avail(seen);
        let arrived = self.rx.enable_notification(&self.memory).map_err(bad);
        self.rx.set_next_avail(next);
        arrived
    }
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    Delivered,
    /// It fits no buffer: dropped (the buffers stay for the next one).
    Dropped,
    /// Not enough buffers now: nothing was taken. `seen` is the available
    /// index the driver had reached (every buffer before it was tried).
    NoBuffers {
        seen: u16,
    },
}

impl Frames {
    /// Puts the `n`-byte frame (header included) in `rx_frame` into receive
    /// buffers: one chain, or with mergeable buffers as many as it takes
    /// (their count in the header's `num_buffers`).
    fn deliver(&mut self, n: usize) -> Result<Delivery, QueueBroken> {
        let bad = |what: &str, e: virtio_queue::Error| QueueBroken(format!("{what}: {e}"));
        let memory = &self.memory;
        let mut writers = Vec::new();
        let mut room = 0usize;
        while room < n {
            let Some(chain) = self
                .rx
                .iter(memory)
                .map_err(|e| bad("receive ring", e))?
                .next()
            else {
                // Give back what was taken for this frame.
                let seen = self.rx.next_avail();
                let taken = writers.len() as u16;
                self.rx.set_next_avail(seen.wrapping_sub(taken));
                return Ok(Delivery::NoBuffers { seen });
            };
            let head = chain.head_index();
            let writer = Writer::new(memory, chain).map_err(|e| bad("receive buffer", e))?;
            room += writer.available_bytes();
            writers.push((head, writer));
            if !self.mergeable {
                break;
            }
        }
        if room < n || writers.len() > usize::from(u16::MAX) {
            // One buffer too small for the frame (no mergeable buffers):
            // drop the frame and keep the buffer.
            tracing::debug!("virtio-net: a {n}-byte frame does not fit the receive buffers");
            let taken = writers.len() as u16;
            self.rx
                .set_next_avail(self.rx.next_avail().wrapping_sub(taken));
            return Ok(Delivery::Dropped);
        }
        // num_buffers: how many buffers the frame spans.
        self.rx_frame[10..12].copy_from_slice(&(writers.len() as u16).to_le_bytes());
        let mut done = 0;
        for (head, mut writer) in writers {
            let part = writer.available_bytes().min(n - done);
            writer
                .write_all(&self.rx_frame[done..done + part])
                .map_err(|e| QueueBroken(format!("writing a received frame: {e}")))?;
            self.rx
                .add_used(memory, head, part as u32)
                .map_err(|e| bad("receive used ring", e))?;
            done += part;
        }
        Ok(Delivery::Delivered)
    }
}

/// Watches the tap for frames, or stops (`armed` false), unless it already does.
fn arm_tap(tap_armed: &mut bool, tap: &Tap, epoll: &Epoll, armed: bool) {
    if *tap_armed == armed {
        return;
    }
    let events = if armed {
        EventSet::IN
    } else {
        EventSet::empty()
    };
    if epoll
        .ctl(
            ControlOperation::Modify,
            tap.as_raw_fd(),
            EpollEvent::new(events, TAP),
        )
        .is_ok()
    {
        *tap_armed = armed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::interrupt::EventFdLine;
    use std::os::unix::net::UnixDatagram;
    use std::sync::mpsc;
    use std::time::Duration;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use vm_memory::{Bytes, GuestAddress};

    const RING: u16 = 16;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x100;
    const USED: u64 = 0x200;
    const BUFFERS: u64 = 0x1000;
    const BUFFER_LEN: u32 = 1024;

    /// A receive queue of 16 entries with EVENT_IDX, its 16 descriptors
    /// each a 1 KiB device-writable buffer; a transmit queue with nothing.
    fn frames(tap: Tap) -> Frames {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for d in 0..u64::from(RING) {
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&(BUFFERS + d * u64::from(BUFFER_LEN)).to_le_bytes());
            desc[8..12].copy_from_slice(&BUFFER_LEN.to_le_bytes());
            desc[12..14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
            memory
                .write_slice(&desc, GuestAddress(DESC + d * 16))
                .unwrap();
        }
        let queue = |base: u64| {
            let mut q = Queue::new(RING).unwrap();
            q.set_desc_table_address(Some((base + DESC) as u32), Some(0));
            q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
            q.set_used_ring_address(Some((base + USED) as u32), Some(0));
            q.set_event_idx(true);
            q.set_ready(true);
            assert!(q.is_valid(&memory));
            q
        };
        let (rx, tx) = (queue(0), queue(0x400));
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TAP),
            )
            .unwrap();
        Frames {
            memory,
            rx,
            tx,
            rx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(Interrupt::new(Arc::new(EventFdLine(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )))),
            needs_reset: Arc::new(AtomicBool::new(false)),
            tap: Arc::new(tap),
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: 0,
            tap_armed: true,
            epoll,
            mergeable: true,
        }
    }

    /// The driver makes descriptors `from..to` available.
    fn make_available(f: &Frames, from: u16, to: u16) {
        for i in from..to {
            let slot = AVAIL + 4 + u64::from(i % RING) * 2;
            f.memory.write_obj(i % RING, GuestAddress(slot)).unwrap();
        }
        f.memory.write_obj(to, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Serves the receive queue once on another thread; `None` when it
    /// has not returned within 10 s (the stop then ends it).
    fn receive_once(f: Frames) -> Option<Frames> {
        let (done, finished) = mpsc::channel();
        let thread = DeviceThread::spawn("rx-test", move |stop| {
            let mut f = f;
            let result = f.receive(&stop);
            let _ = done.send((result.is_ok(), f));
        })
        .unwrap();
        let outcome = finished.recv_timeout(Duration::from_secs(10));
        drop(thread);
        match outcome {
            Ok((ok, f)) => {
                assert!(ok, "the queue broke");
                Some(f)
            }
            Err(_) => None,
        }
    }

    /// A frame that needs more buffers than the driver has made available
    /// waits without spinning: the frames already delivered are
    /// announced, the driver is asked to notify on its next buffer (with
    /// EVENT_IDX, at the index it has reached, not at the buffers taken
    /// back), and the frame goes out over three buffers once they are
    /// there.
    #[test]
    fn a_frame_short_of_buffers_waits_for_them_after_announcing_the_rest() {
        let (host, guest_side) = UnixDatagram::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let small: Vec<u8> = (0..VNET_HDR_LEN + 500).map(|i| i as u8).collect();
        let large: Vec<u8> = (0..VNET_HDR_LEN + 2500)
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        host.send(&small).unwrap();
        host.send(&large).unwrap();
        let f = frames(Tap::from_datagram_socket(guest_side));
        make_available(&f, 0, 2);

        let f = receive_once(f).expect("receive spun instead of waiting for buffers");
        let used_idx: u16 = f.memory.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 1, "the small frame was delivered");
        let used_len: u32 = f.memory.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(used_len as usize, small.len());
        assert_ne!(
            f.interrupt.status() & VIRTIO_MMIO_INT_VRING,
            0,
            "the small frame was announced"
        );
        let avail_event: u16 = f
            .memory
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(RING)))
            .unwrap();
        assert_eq!(avail_event, 2, "notify when descriptor index 2 is added");
        assert_eq!(f.rx.next_avail(), 1, "the one buffer left is taken back");
        assert_eq!(f.rx_pending, large.len(), "the large frame is kept");
        assert!(!f.tap_armed, "the tap is not watched without buffers");

        // The driver takes the small frame and asks to hear of the next
        // (used_event), then adds two buffers.
        f.interrupt.acknowledge(VIRTIO_MMIO_INT_VRING);
        f.memory
            .write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * u64::from(RING)))
            .unwrap();
        make_available(&f, 2, 4);
        let f = receive_once(f).expect("the second pass returns");
        let used_idx: u16 = f.memory.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 4, "the large frame took three buffers");
        let mut got = vec![0u8; large.len()];
        f.memory
            .read_slice(&mut got, GuestAddress(BUFFERS + u64::from(BUFFER_LEN)))
            .unwrap();
        let mut expected = large.clone();
        expected[10..12].copy_from_slice(&3u16.to_le_bytes()); // num_buffers
        assert_eq!(got, expected);
        assert_ne!(
            f.interrupt.status() & VIRTIO_MMIO_INT_VRING,
            0,
            "the large frame was announced"
        );
        assert!(f.tap_armed, "the tap is watched again");
        assert_eq!(f.rx_pending, 0);
    }
}
