//! Entry points for fuzzing what the guest controls: the rings, the
//! descriptor chains and the requests in them. Each takes arbitrary bytes
//! as a guest's memory and runs a device's own queue code on them, on the
//! calling thread, then checks what must hold whatever the guest wrote.
//! The cargo-fuzz targets in `fuzz/` call them, and this crate's tests
//! replay the kept corpus and mutations of [`block_seeds`] and
//! [`vsock_seeds`] through them.
//!
//! An input is two bytes of set-up, then guest RAM from address 0:
//! - byte 0: the queue size, `1 << (byte % 9)` (1 to 256);
//! - byte 1: bit 0 VIRTIO_F_EVENT_IDX negotiated, bit 1 a read-only disk;
//! - the rest: the first [`RAM_BYTES`] of guest memory (zeros past the
//!   input). Queue `q`'s descriptor table is at `q * 0x400`, its
//!   available ring at `+ 0x100` and its used ring at `+ 0x200` (rings of
//!   more than 16 entries overlap the next ones, as a hostile driver's
//!   may); every available index, descriptor address, length and flag is
//!   the input's.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::interrupt::EventFdLine;
use disk::DiskImage;
use ram::GuestRam;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{BlockRequests, ID_BYTES};
use crate::device::{Activation, ActiveQueue, Interrupt};

/// Guest RAM the input fills.
pub const RAM_BYTES: usize = 64 << 10;
/// The disk behind the fuzzed block device.
const DISK_BYTES: usize = 16 * 512;
const RING_STRIDE: u64 = 0x400;
const SETUP_BYTES: usize = 2;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;

/// A disk in memory that fails the fuzz run (panics) on any access
/// outside it: the device must have refused such a request itself.
struct MemoryDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemoryDisk {
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).expect("offset past usize");
        let end = start.checked_add(len).expect("range overflows");
        assert!(
            end <= DISK_BYTES,
            "the device accessed {start}..{end} of a {DISK_BYTES}-byte disk"
        );
        start..end
    }
}

impl DiskImage for MemoryDisk {
    fn len(&self) -> u64 {
        DISK_BYTES as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len());
        buf.copy_from_slice(&self.bytes.lock().expect("disk lock")[range]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len());
        self.bytes.lock().expect("disk lock")[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).expect("length past usize");
        let range = self.range(offset, len);
        self.bytes.lock().expect("disk lock")[range].fill(0);
        Ok(())
    }
}

/// The guest memory, queues and interrupt an input describes, for a
/// device of `queues` queues.
fn activation(input: &[u8], queues: usize) -> Option<Activation> {
    let (setup, ram) = input.split_at_checked(SETUP_BYTES)?;
    let memory = GuestRam::from_ranges(&[(GuestAddress(0), RAM_BYTES)]).ok()?;
    let ram = &ram[..ram.len().min(RAM_BYTES)];
    memory.write_slice(ram, GuestAddress(0)).ok()?;
    let size = 1u16 << (setup[0] % 9);
    let event_idx = setup[1] & 1 != 0;
    let mut active = Vec::new();
    for q in 0..queues as u64 {
        let mut queue = Queue::new(256).ok()?;
        queue.set_size(size);
        let base = q * RING_STRIDE;
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&memory) {
            return None;
        }
        active.push(Some(ActiveQueue {
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).ok()?,
        }));
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    Some(Activation {
        memory,
        queues: active,
        interrupt: Arc::new(Interrupt::new(Arc::new(EventFdLine(irq)))),
        features: F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 },
        needs_reset: Arc::new(AtomicBool::new(false)),
    })
}

/// The disk's bytes before the guest's requests: sector `n` holds `n`.
fn disk_contents() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i / 512) as u8).collect()
}

/// Serves the input's block requests (queue 0) against a 16-sector disk
/// in memory, which copies through a buffer, and again against a raw
/// image in a memory file, whose data moves by vectored I/O on the
/// guest's buffers: both must leave the same disk and the same guest
/// memory. Panics only on a bug: an access outside the disk (the memory
/// disk's check, or the file growing), a write to a read-only disk, or
/// the two paths differing.
pub fn block_queue(input: &[u8]) {
    let readonly = input.get(1).is_some_and(|flags| flags & 2 != 0);
    let Some(copied) = serve_block_requests(input, readonly, false) else {
        return;
    };
    if readonly {
        assert!(copied.0 == disk_contents(), "a read-only disk changed");
    }
    if let Some(vectored) = serve_block_requests(input, readonly, true) {
        assert!(
            vectored.0 == copied.0,
            "the raw image and the memory disk differ"
        );
        assert!(
            vectored.1 == copied.1,
            "guest memory differs between the raw image and the memory disk"
        );
    }
}

/// Serves the input's block requests against a memory disk, or (`raw`) a
/// raw image in a memory file; the disk's bytes and guest RAM afterwards.
fn serve_block_requests(input: &[u8], readonly: bool, raw: bool) -> Option<(Vec<u8>, Vec<u8>)> {
    let activation = activation(input, 1)?;
    let memory = activation.memory.clone();
    let mut disk = vec![0u8; DISK_BYTES];
    if raw {
        let file = memory_file(&disk_contents())?;
        let copy = file.try_clone().ok()?;
        let image = disk::RawImage::new(file, std::path::Path::new("memfd")).ok()?;
        let handler = BlockRequests::new(
            Arc::new(Mutex::new(Box::new(image))),
            readonly,
            [b'f'; ID_BYTES],
        );
        // An I/O error (no eventfd) is the host's, not a finding.
        let _ = crate::worker::serve_each_queue_once(activation, handler);
        let size = copy.metadata().expect("the memory file's size").len();
        assert_eq!(size, DISK_BYTES as u64, "the raw image changed size");
        std::os::unix::fs::FileExt::read_exact_at(&copy, &mut disk, 0)
            .expect("reading the memory file");
    } else {
        let bytes = Arc::new(Mutex::new(disk_contents()));
        let image: Box<dyn DiskImage> = Box::new(MemoryDisk {
            bytes: bytes.clone(),
        });
        let handler = BlockRequests::new(Arc::new(Mutex::new(image)), readonly, [b'f'; ID_BYTES]);
        let _ = crate::worker::serve_each_queue_once(activation, handler);
        disk.copy_from_slice(&bytes.lock().expect("disk lock"));
    }
    let mut ram = vec![0u8; RAM_BYTES];
    memory.read_slice(&mut ram, GuestAddress(0)).ok()?;
    Some((disk, ram))
}

/// A memory file holding `bytes` (None where the host refuses one).
fn memory_file(bytes: &[u8]) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: creates a new file descriptor, checked before use.
    let fd = unsafe { libc::memfd_create(c"vessel-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0).ok()?;
    Some(file)
}

/// Serves the input's vsock packets (transmit queue 1, then receive queue
/// 0) against a device whose host side is a fresh directory holding the
/// device's socket and a listener at `PATH_1024`, so guest connections
/// to host port 1024 are accepted (by the kernel's backlog) and carry
/// data. Panics only on a bug.
pub fn vsock_queues(input: &[u8]) {
    let Some(activation) = activation(input, 3) else {
        return;
    };
    let Ok(dir) = ScratchDir::new() else {
        return;
    };
    let path = dir.0.join("v.sock");
    let Ok(_host_listener) = std::os::unix::net::UnixListener::bind(dir.0.join("v.sock_1024"))
    else {
        return;
    };
    let Ok(device) = crate::vsock::Vsock::new(3, &path, "fuzz-vsock") else {
        return;
    };
    let _ = device.serve_once(activation);
}

/// A directory removed when dropped (tempfile is only a dev-dependency).
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> io::Result<ScratchDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vessel-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds inputs: well-formed guest memory a fuzzer starts from.
struct InputBuilder {
    setup: [u8; SETUP_BYTES],
    ram: Vec<u8>,
    /// Per queue: next free descriptor, available index.
    next: Vec<(u16, u16)>,
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Where request buffers go (past the rings of three queues).
const BUFFERS: u64 = 0xc00;

impl InputBuilder {
    fn new(queues: usize, flags: u8) -> InputBuilder {
        InputBuilder {
            setup: [4, flags], // 16 entries
            ram: vec![0; BUFFERS as usize],
            next: vec![(0, 0); queues],
        }
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = addr as usize;
        if self.ram.len() < at + bytes.len() {
            self.ram.resize(at + bytes.len(), 0);
        }
        self.ram[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Adds a chain of (address, length, device-writable) buffers to
    /// queue `q` and makes it available.
    fn chain(&mut self, q: usize, buffers: &[(u64, u32, bool)]) {
        let base = q as u64 * RING_STRIDE;
        let (mut desc, avail) = self.next[q];
        let head = desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = if writable { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            let next = (desc + 1) % 16;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.put(base + u64::from(desc) * 16, &d);
            desc = next;
        }
        self.put(
            base + 0x100 + 4 + u64::from(avail % 16) * 2,
            &head.to_le_bytes(),
        );
        self.put(base + 0x100 + 2, &(avail + 1).to_le_bytes());
        self.next[q] = (desc, avail + 1);
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = self.setup.to_vec();
        v.extend_from_slice(&self.ram);
        v
    }
}

/// Well-formed block inputs: a read, a write, a flush, an ID request, a
/// discard and write-zeroes, and a write to a read-only disk.
pub fn block_seeds() -> Vec<Vec<u8>> {
    let request = |kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let header = BUFFERS;
    let data = BUFFERS + 0x100;
    let status = BUFFERS + 0x500;
    let mut seeds = Vec::new();
    for (kind, flags, len, writable) in [
        (0u32, 0u8, 1024u32, true), // read
        (1, 0, 1024, false),        // write
        (4, 1, 0, false),           // flush, with EVENT_IDX
        (8, 0, 20, true),           // get id
        (1, 2, 512, false),         // write to a read-only disk
    ] {
        let mut b = InputBuilder::new(1, flags);
        b.put(header, &request(kind, 3));
        let mut chain = vec![(header, 16, false)];
        if len > 0 {
            chain.push((data, len, writable));
        }
        chain.push((status, 1, true));
        b.chain(0, &chain);
        seeds.push(b.bytes());
    }
    for kind in [11u32, 13] {
        // discard, write zeroes: one segment of 2 sectors at sector 4
        let mut b = InputBuilder::new(1, 0);
        b.put(header, &request(kind, 0));
        let mut segment = [0u8; 16];
        segment[0..8].copy_from_slice(&4u64.to_le_bytes());
        segment[8..12].copy_from_slice(&2u32.to_le_bytes());
        b.put(data, &segment);
        b.chain(
            0,
            &[(header, 16, false), (data, 16, false), (status, 1, true)],
        );
        seeds.push(b.bytes());
    }
    seeds
}

/// Well-formed vsock inputs: a connection to host port 1024 with data,
/// credit and shutdown packets, and a connection to a port with no
/// listener; receive buffers for the replies.
pub fn vsock_seeds() -> Vec<Vec<u8>> {
    use crate::vsock::packet::{Header, HEADER_LEN};
    let packet = |op: u16, len: u32, flags: u32, port: u32| {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 50000,
            dst_port: port,
            len,
            kind: 1,
            op,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
        .bytes()
    };
    let mut seeds = Vec::new();
    for port in [1024u32, 7] {
        let mut b = InputBuilder::new(3, 0);
        // Receive buffers for the device's replies.
        for i in 0..4u64 {
            b.chain(0, &[(BUFFERS + 0x400 + i * 0x100, 0x100, true)]);
        }
        let ops: [(u16, u32, u32); 5] = [(1, 0, 0), (5, 32, 0), (7, 0, 0), (6, 0, 0), (4, 0, 3)];
        for (i, &(op, len, flags)) in ops.iter().enumerate() {
            let at = BUFFERS + i as u64 * 0x80;
            b.put(at, &packet(op, len, flags, port));
            if len > 0 {
                b.put(at + HEADER_LEN as u64, &[0x5a; 32]);
            }
            b.chain(1, &[(at, HEADER_LEN as u32 + len, false)]);
        }
        seeds.push(b.bytes());
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::Rng;

    /// Every file of the corpus that `cargo fuzz` keeps for `target`.
    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut inputs = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
        assert!(!inputs.is_empty(), "{}: an empty corpus", dir.display());
        inputs
    }

    /// A few random byte flips, insertions and truncations of `input`.
    fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..1 + rng.below(8) {
            if v.is_empty() {
                break;
            }
            let at = rng.below(v.len() as u64) as usize;
            match rng.below(4) {
                0 => v[at] = rng.next() as u8,
                1 => v[at] ^= 1 << rng.below(8),
                2 => v.truncate(at),
                _ => v[at] = [0, 1, 0xff, 0x80, 16][rng.below(5) as usize],
            }
        }
        v
    }

    #[test]
    fn seeds_are_served_as_requests() {
        // The seeds reach the request code: a read-write disk takes the
        // write seed (sector 3 changes), so the fuzzer starts from inputs
        // that get past the ring checks.
        let seeds = block_seeds();
        let activation = activation(&seeds[1], 1).expect("a valid queue");
        let bytes = Arc::new(Mutex::new(disk_contents()));
        let image: Box<dyn DiskImage> = Box::new(MemoryDisk {
            bytes: bytes.clone(),
        });
        let handler = BlockRequests::new(Arc::new(Mutex::new(image)), false, [0; ID_BYTES]);
        let reset = crate::worker::serve_each_queue_once(activation, handler).unwrap();
        assert!(!reset);
        assert_ne!(*bytes.lock().unwrap(), disk_contents(), "the write landed");
    }

    #[test]
    fn block_corpus_and_mutations_are_survived() {
        let mut rng = Rng::derived(testkit::seed(), "block_queue");
        let mut inputs = corpus("block_queue");
        inputs.extend(block_seeds());
        for input in &inputs {
            block_queue(input);
        }
        for _ in 0..3000 {
            let base = &inputs[rng.below(inputs.len() as u64) as usize];
            block_queue(&mutate(&mut rng, base));
        }
    }

    #[test]
    fn vsock_corpus_and_mutations_are_survived() {
        let mut rng = Rng::derived(testkit::seed(), "vsock_queues");
        let mut inputs = corpus("vsock_queues");
        inputs.extend(vsock_seeds());
        for input in &inputs {
            vsock_queues(input);
        }
        for _ in 0..1000 {
            let base = &inputs[rng.below(inputs.len() as u64) as usize];
            vsock_queues(&mutate(&mut rng, base));
        }
    }
}
