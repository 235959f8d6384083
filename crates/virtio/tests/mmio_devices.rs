//! The virtio-mmio transport, virtio-blk and virtio-rng driven as a guest
//! driver would: registers through the transport, requests through split
//! virtqueues in guest memory, served by each device's I/O thread. Then
//! the hostile cases: requests past the disk, broken chains, descriptor
//! loops, rings outside RAM, a runaway available index.

mod common;

use std::path::Path;

use common::*;
use devices::bus::BusDevice;
use disk::{open_locked, RawImage};
use virtio::block::Block;
use virtio::Rng;
use vm_memory::{Bytes, GuestAddress};

const HEADER: u64 = BUFFERS;
const DATA: u64 = BUFFERS + 0x1000;
const STATUS: u64 = BUFFERS + 0x20_000;

fn disk(dir: &Path, sectors: usize) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn block_driver(path: &Path, readonly: bool) -> Driver {
    let file = open_locked(path, readonly).unwrap();
    let image = RawImage::new(file, path).unwrap();
    let mut d = Driver::new(Box::new(Block::new(
        Box::new(image),
        readonly,
        "test-serial",
        "blk",
    )));
    d.start();
    d
}

/// Sends one block request; its status byte and used length.
fn request(d: &mut Driver, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    d.memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![(HEADER, 16, false)];
    if let Some((len, writable)) = data {
        chain.push((DATA, len, writable));
    }
    chain.push((STATUS, 1, true));
    d.add_chain(&chain);
    d.kick(0);
    let (_, len) = d.wait_used();
    (d.memory.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

#[test]
fn transport_identifies_the_device_and_negotiates() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let file = open_locked(&path, false).unwrap();
    let image = RawImage::new(file, &path).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(image), false, "s", "blk")));
    assert_eq!(d.read(0x00), 0x7472_6976, "magic");
    assert_eq!(d.read(0x04), 2, "version");
    assert_eq!(d.read(0x08), 2, "block device");
    assert_eq!(d.read(0x34), 256, "queue size max");
    let features = d.device_features();
    assert_ne!(features & (1 << 32), 0, "VERSION_1");
    assert_ne!(features & (1 << 9), 0, "FLUSH");
    assert_eq!(features & (1 << 5), 0, "not read-only");
    // A driver without VERSION_1 (legacy) is refused; so is a feature never offered.
    assert!(!d.negotiate(1 << 9));
    assert!(!d.negotiate((1 << 32) | (1 << 40)));
    assert!(d.negotiate((1 << 32) | (1 << 9)));
    // Capacity in the config space, read in pieces of any width.
    let mut cap = [0u8; 8];
    d.transport.read(0x100, &mut cap[..4]);
    d.transport.read(0x104, &mut cap[4..]);
    assert_eq!(u64::from_le_bytes(cap), 8);
    // Past the config space, and odd register widths, read as zero.
    let mut b = [0xffu8; 4];
    d.transport.read(0xff0, &mut b);
    assert_eq!(b, [0; 4]);
    let mut b = [0xffu8; 2];
    d.transport.read(0x00, &mut b);
    assert_eq!(b, [0; 2]);
    // Queue 7 does not exist: its size max is 0 and it cannot be enabled.
    assert!(!d.setup_queue(7, DESC, AVAIL, USED, 16));
    // A queue whose rings lie outside guest RAM is not enabled, and the
    // device asks for a reset (Linux never reads QueueReady back).
    assert!(!d.setup_queue(0, DESC, AVAIL, RAM as u64 + 0x1000, 16));
    assert_ne!(d.read(0x70) & STATUS_NEEDS_RESET, 0);
    // Nor one whose size is no power of two, or whose rings are misaligned.
    assert!(d.negotiate(1 << 32));
    assert_eq!(d.read(0x70) & STATUS_NEEDS_RESET, 0, "a reset clears it");
    assert!(!d.setup_queue(0, DESC, AVAIL, USED, 12));
    assert_ne!(d.read(0x70) & STATUS_NEEDS_RESET, 0);
    assert!(d.negotiate(1 << 32));
    assert!(!d.setup_queue(0, DESC + 8, AVAIL, USED, 16));
    assert_ne!(d.read(0x70) & STATUS_NEEDS_RESET, 0);
    // FEATURES_OK refused in the same write as DRIVER_OK: not started.
    d.write(0x70, 0);
    d.write(0x70, STATUS_ACK | STATUS_DRIVER);
    d.write(0x24, 1);
    d.write(0x20, 1 << 8); // bit 40: never offered
    d.write(
        0x70,
        STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    let status = d.read(0x70);
    assert_eq!(
        status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        0,
        "{status:#x}"
    );
    assert_ne!(status & STATUS_NEEDS_RESET, 0, "{status:#x}");
}

#[test]
fn block_reads_writes_flushes_and_reports_its_serial() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 64);
    let mut d = block_driver(&path, false);
    // Read sectors 3 and 4.
    let (status, len) = request(&mut d, T_IN, 3, Some((1024, true)));
    assert_eq!((status, len), (0, 1025));
    let mut got = vec![0u8; 1024];
    d.memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
    assert!(d.interrupted(), "the used buffer was signalled");
    // Write sector 10, flush, and find it in the file.
    d.memory
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&mut d, T_OUT, 10, Some((512, false))), (0, 1));
    assert_eq!(request(&mut d, T_FLUSH, 0, None), (0, 1));
    let file = std::fs::read(&path).unwrap();
    assert!(file[10 * 512..11 * 512].iter().all(|b| *b == 0x5a));
    assert!(file[11 * 512..12 * 512].iter().all(|b| *b == 11));
    // GET_ID: 20 bytes, zero-padded.
    let (status, len) = request(&mut d, T_GET_ID, 0, Some((20, true)));
    assert_eq!((status, len), (0, 21));
    let mut id = [0u8; 20];
    d.memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"test-serial");
    assert!(id[11..].iter().all(|b| *b == 0));
    // Discard and write-zeroes of sectors 20..22.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&20u64.to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    d.memory.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut d, T_WRITE_ZEROES, 0, Some((16, false))).0, 0);
    let file = std::fs::read(&path).unwrap();
    assert!(file[20 * 512..22 * 512].iter().all(|b| *b == 0));
    assert!(file[22 * 512..23 * 512].iter().all(|b| *b == 22));
    assert_eq!(request(&mut d, T_DISCARD, 0, Some((16, false))).0, 0);
    // An unknown request type is unsupported.
    assert_eq!(request(&mut d, 99, 0, None).0, 2);
}

#[test]
fn block_refuses_requests_past_the_end_and_writes_to_a_readonly_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let before = std::fs::read(&path).unwrap();
    {
        let mut d = block_driver(&path, false);
        // The last sector is fine, one more is not; a sector whose byte
        // offset overflows is not either.
        assert_eq!(request(&mut d, T_IN, 15, Some((512, true))).0, 0);
        assert_eq!(request(&mut d, T_IN, 15, Some((1024, true))).0, 1);
        assert_eq!(request(&mut d, T_OUT, 16, Some((512, false))).0, 1);
        assert_eq!(
            request(&mut d, T_IN, u64::MAX / 256, Some((512, true))).0,
            1
        );
        // A header cut short.
        d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        d.add_chain(&[(HEADER, 8, false), (STATUS, 1, true)]);
        d.kick(0);
        d.wait_used();
        assert_eq!(d.memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
        // Discard segments past the end, and too many of them.
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&15u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        d.memory.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut d, T_DISCARD, 0, Some((16, false))).0, 1);
        assert_eq!(request(&mut d, T_DISCARD, 0, Some((16 * 33, false))).0, 1);
    }
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing was written");
    let mut d = block_driver(&path, true);
    assert_ne!(d.device_features() & (1 << 5), 0, "RO offered");
    assert_eq!(request(&mut d, T_IN, 1, Some((512, true))).0, 0);
    assert_eq!(request(&mut d, T_OUT, 1, Some((512, false))).0, 1);
    assert_eq!(request(&mut d, T_WRITE_ZEROES, 0, Some((16, false))).0, 1);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the read-only disk is unchanged"
    );
}

#[test]
fn a_descriptor_loop_ends_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let mut d = block_driver(&path, false);
    // Descriptor 0 -> 1 -> 0 -> ...: readable only, so no status byte can
    // be found: the device stops the queue and asks for a reset.
    d.set_desc(0, HEADER, 16, F_NEXT, 1);
    d.set_desc(1, DATA, 512, F_NEXT, 0);
    d.publish(0);
    d.kick(0);
    d.wait_needs_reset();
    // After the driver's reset, the device works again.
    d.restart();
    assert_eq!(request(&mut d, T_IN, 2, Some((512, true))).0, 0);
}

#[test]
fn rings_and_buffers_outside_ram_need_a_reset_and_nothing_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let mut d = block_driver(&path, false);
    // A data buffer outside guest RAM.
    d.memory.write_obj(0u32, GuestAddress(HEADER)).unwrap();
    d.add_chain(&[
        (HEADER, 16, false),
        (RAM as u64 + 0x1000, 512, true),
        (STATUS, 1, true),
    ]);
    d.kick(0);
    d.wait_needs_reset();
    // Reset, then an available index that runs far ahead of the queue.
    d.restart();
    d.set_avail_idx(1000);
    d.kick(0);
    d.wait_needs_reset();
    // A descriptor head out of range.
    d.restart();
    d.memory.write_obj(200u16, GuestAddress(AVAIL + 4)).unwrap();
    d.set_avail_idx(1);
    d.kick(0);
    d.wait_needs_reset();
    // And after all that, a good request is served.
    d.restart();
    assert_eq!(request(&mut d, T_IN, 2, Some((512, true))).0, 0);
}

#[test]
fn an_indirect_table_and_a_huge_length_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let mut d = block_driver(&path, false);
    // An IN request whose data descriptor claims 2 MiB of a 8 KiB disk:
    // refused before any copy.
    assert_eq!(request(&mut d, T_IN, 0, Some((2 << 20, true))).0, 1);
    // An indirect table at 0x8000 with the three buffers of a read.
    let table = 0x8000u64;
    let entries = [
        (HEADER, 16u32, 1u16, 1u16),
        (DATA, 512, 1 | 2, 2),
        (STATUS, 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.iter().enumerate() {
        let at = table + i as u64 * 16;
        d.memory.write_obj(*addr, GuestAddress(at)).unwrap();
        d.memory.write_obj(*len, GuestAddress(at + 8)).unwrap();
        d.memory.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        d.memory.write_obj(*next, GuestAddress(at + 14)).unwrap();
    }
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&5u64.to_le_bytes());
    d.memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    d.set_desc(5, table, 48, F_INDIRECT, 0);
    d.publish(5);
    d.kick(0);
    let (head, len) = d.wait_used();
    assert_eq!((head, len), (5, 513));
    assert_eq!(d.memory.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
}

#[test]
fn rng_fills_the_buffers_it_is_given() {
    let mut d = Driver::new(Box::new(Rng::new("rng")));
    assert_eq!(d.read(0x08), 4, "entropy device");
    d.start();
    d.memory
        .write_slice(&[0u8; 256], GuestAddress(DATA))
        .unwrap();
    d.add_chain(&[(DATA, 128, true), (DATA + 128, 128, true)]);
    d.kick(0);
    let (_, len) = d.wait_used();
    assert_eq!(len, 256);
    let mut got = [0u8; 256];
    d.memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().filter(|b| **b == 0).count() < 16, "{got:?}");
    // A readable-only buffer gets nothing; a huge one at most 64 KiB.
    d.add_chain(&[(DATA, 64, false)]);
    d.kick(0);
    assert_eq!(d.wait_used().1, 0);
    d.add_chain(&[(DATA, 1 << 20, true)]);
    d.kick(0);
    assert_eq!(d.wait_used().1, 64 << 10);
}

/// Data spread over descriptors of odd sizes, sharing one with the header
/// and another with the status byte, moves between a raw image and
/// exactly those bytes (the vectored path), and the write watch hears of
/// every byte a read stores into guest memory.
#[test]
fn scattered_buffers_move_exactly_their_bytes() {
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let before = std::fs::read(&path).unwrap();
    let mut d = block_driver(&path, false);
    let stored: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let log = stored.clone();
    assert!(ram::watch_writes(
        &d.memory,
        Arc::new(move |addr, len| log.lock().unwrap().push((addr, len)))
    ));
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();

    // Write sectors 4 and 5: header and 100 data bytes in one descriptor,
    // then 300 and 624 bytes elsewhere.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    header[8..16].copy_from_slice(&4u64.to_le_bytes());
    d.memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    d.memory
        .write_slice(&data[..100], GuestAddress(HEADER + 16))
        .unwrap();
    d.memory
        .write_slice(&data[100..400], GuestAddress(DATA + 0x800))
        .unwrap();
    d.memory
        .write_slice(&data[400..], GuestAddress(DATA + 0x3000))
        .unwrap();
    d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add_chain(&[
        (HEADER, 116, false),
        (DATA + 0x800, 300, false),
        (DATA + 0x3000, 624, false),
        (STATUS, 1, true),
    ]);
    d.kick(0);
    assert_eq!(d.wait_used().1, 1);
    assert_eq!(d.memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4 * 512..6 * 512], &data[..]);
    assert_eq!(&file[..4 * 512], &before[..4 * 512]);
    assert_eq!(&file[6 * 512..], &before[6 * 512..]);

    // Read them back: 700 bytes, then 324 bytes and the status byte in
    // one descriptor, between guard bytes that must stay as they are.
    const FIRST: u64 = DATA + 0x5000;
    const SECOND: u64 = DATA + 0x7000;
    d.memory
        .write_slice(&[0xee; 0x4000], GuestAddress(FIRST - 0x100))
        .unwrap();
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    d.memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    stored.lock().unwrap().clear();
    d.add_chain(&[(HEADER, 16, false), (FIRST, 700, true), (SECOND, 325, true)]);
    d.kick(0);
    assert_eq!(d.wait_used().1, 1025);
    let mut got = vec![0u8; 1024];
    d.memory
        .read_slice(&mut got[..700], GuestAddress(FIRST))
        .unwrap();
    d.memory
        .read_slice(&mut got[700..], GuestAddress(SECOND))
        .unwrap();
    assert_eq!(got, data);
    assert_eq!(
        d.memory.read_obj::<u8>(GuestAddress(SECOND + 324)).unwrap(),
        0
    );
    for guard in [FIRST - 1, FIRST + 700, SECOND - 1, SECOND + 325] {
        assert_eq!(
            d.memory.read_obj::<u8>(GuestAddress(guard)).unwrap(),
            0xee,
            "the byte at {guard:#x} is outside the buffers"
        );
    }
    let stored = stored.lock().unwrap().clone();
    let covered = |addr: u64| {
        stored
            .iter()
            .any(|&(a, n)| a <= addr && addr < a + n as u64)
    };
    for addr in (FIRST..FIRST + 700).chain(SECOND..SECOND + 325) {
        assert!(covered(addr), "the write watch missed {addr:#x}");
    }
}
