//! virtio-blk (virtio 1.2, section 5.2): one request queue, served by an
//! I/O thread that reads and writes a [`DiskImage`].
//!
//! Data moves between a raw image's file and guest memory by vectored I/O
//! on the request's buffers (the `vectored` module); other formats copy it
//! through a buffer in bounded chunks, whatever length the descriptors
//! claim.
//!
//! Everything in a request is guest input: the sector and every length
//! are checked against the disk before any I/O, every buffer must lie in
//! guest RAM, and a request that is wrong in any way gets
//! `VIRTIO_BLK_S_IOERR` (or `UNSUPP`).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use ram::GuestRam;
use virtio_bindings::virtio_blk as blk;
use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::device::{read_config_bytes, Activation, VirtioDevice, COMMON_FEATURES};
use crate::vectored;
use crate::worker::{IoThread, RequestError, RequestHandler};
use disk::DiskImage;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data moves between guest memory and the image through a buffer of at
/// most this many bytes, however long the request.
const CHUNK: usize = 256 << 10;
/// Segments one DISCARD or WRITE_ZEROES request may carry.
const MAX_SEGMENTS: u32 = 32;
/// Sectors one discard or write-zeroes segment may cover (4 GiB - 1 KiB,
/// so a segment's byte length fits in 32 bits).
const MAX_SEGMENT_SECTORS: u32 = (u32::MAX >> 9) - 1;
/// Length of a GET_ID answer.
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;

fn bit(feature: u32) -> u64 {
    1 << feature
}

/// One virtio block device.
pub struct Block {
    image: Arc<Mutex<Box<dyn DiskImage>>>,
    readonly: bool,
    serial: [u8; ID_BYTES],
    features: u64,
    config: [u8; 60],
    queue_sizes: [u16; 1],
    thread: Option<IoThread>,
    name: String,
}

impl Block {
    /// A device for `image`; `serial` (up to 20 bytes, longer is cut) is
    /// what the guest reads as the disk's serial number; `name` names the
    /// I/O thread.
    pub fn new(image: Box<dyn DiskImage>, readonly: bool, serial: &str, name: &str) -> Block {
        let capacity = image.len() / SECTOR_SIZE;
        let mut features = COMMON_FEATURES
            | bit(blk::VIRTIO_BLK_F_SEG_MAX)
            | bit(blk::VIRTIO_BLK_F_BLK_SIZE)
            | bit(blk::VIRTIO_BLK_F_FLUSH)
            | bit(blk::VIRTIO_BLK_F_DISCARD)
            | bit(blk::VIRTIO_BLK_F_WRITE_ZEROES);
        if readonly {
            features |= bit(blk::VIRTIO_BLK_F_RO);
        }
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // seg_max: a request's data descriptors, leaving room for header
        // and status in a full queue.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        config[36..40].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard alignment: a sector
        config[48..52].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Block {
            image: Arc::new(Mutex::new(image)),
            readonly,
            serial: id,
            features,
            config,
            queue_sizes: [QUEUE_SIZE],
            thread: None,
            name: name.to_owned(),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
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

    fn activate(&mut self, activation: Activation) -> std::io::Result<()> {
        let handler = BlockRequests::new(self.image.clone(), self.readonly, self.serial);
        self.thread = Some(IoThread::spawn(self.name.clone(), activation, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the thread stops it; the image stays with the device.
        self.thread = None;
    }
}

/// The I/O thread's side of the device.
pub(crate) struct BlockRequests {
    image: Arc<Mutex<Box<dyn DiskImage>>>,
    readonly: bool,
    serial: [u8; ID_BYTES],
    buffer: Vec<u8>,
}

impl BlockRequests {
    pub(crate) fn new(
        image: Arc<Mutex<Box<dyn DiskImage>>>,
        readonly: bool,
        serial: [u8; ID_BYTES],
    ) -> BlockRequests {
        BlockRequests {
            image,
            readonly,
            serial,
            buffer: Vec::new(),
        }
    }
}

/// Why a request failed, as the status byte says it.
enum Failure {
    IoError(String),
    Unsupported(u32),
}

impl RequestHandler for BlockRequests {
    fn handle(
        &mut self,
        _queue: usize,
        memory: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
    ) -> Result<u32, RequestError> {
        let bad = |e: virtio_queue::Error| RequestError(format!("block request: {e}"));
        let mut reader = Reader::new(memory, chain.clone()).map_err(bad)?;
        let mut writer = Writer::new(memory, chain.clone()).map_err(bad)?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err(RequestError(
                "block request without room for its status byte".into(),
            ));
        }
        let mut status_writer = writer.split_at(writable - 1).map_err(bad)?;
        let mut received = 0;
        let status = match self.serve(memory, &chain, &mut reader, &mut writer) {
            Ok(n) => {
                received = n;
                blk::VIRTIO_BLK_S_OK
            }
            Err(Failure::IoError(why)) => {
                tracing::debug!("virtio-blk: request failed: {why}");
                blk::VIRTIO_BLK_S_IOERR
            }
            Err(Failure::Unsupported(kind)) => {
                tracing::debug!("virtio-blk: unsupported request type {kind}");
                blk::VIRTIO_BLK_S_UNSUPP
            }
        };
        status_writer
            .write_all(&[status as u8])
            .map_err(|e| RequestError(format!("writing a block request's status: {e}")))?;
        // The used length: what the guest received, and its status byte
        // (after a failure, what was written before it).
        let used = received.max(writer.bytes_written()) + 1;
        Ok(u32::try_from(used).unwrap_or(u32::MAX))
    }
}

impl BlockRequests {
    /// Serves one request; how many bytes the guest received in its
    /// buffers.
    fn serve<'m>(
        &mut self,
        memory: &'m GuestRam,
        chain: &DescriptorChain<&'m GuestRam>,
        reader: &mut Reader<'_, ram::WriteWatch>,
        writer: &mut Writer<'_, ram::WriteWatch>,
    ) -> Result<usize, Failure> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: std::io::Error| Failure::IoError(format!("{what}: {e}"))
        };
        let mut header = [0u8; 16];
        reader
            .read_exact(&mut header)
            .map_err(io("reading the request header"))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let mut image = self
            .image
            .lock()
            .map_err(|_| Failure::IoError("disk image lock poisoned".into()))?;
        let disk_len = image.len();
        match kind {
            blk::VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes() as u64;
                let offset = span(sector, len, disk_len)?;
                if let Some(file) = image.raw_file() {
                    // The data: the writable bytes before the status byte.
                    let slices =
                        vectored::chain_slices(memory, chain.clone(), true, 0, len as usize)
                            .map_err(Failure::IoError)?;
                    vectored::read_into(file, offset, &slices)
                        .map_err(io("reading the disk image"))?;
                    return Ok(len as usize);
                }
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    self.buffer.resize(n, 0);
                    image
                        .read_at(&mut self.buffer[..n], offset + done)
                        .map_err(io("reading the disk image"))?;
                    writer
                        .write_all(&self.buffer[..n])
                        .map_err(io("writing guest memory"))?;
                    done += n as u64;
                }
                Ok(len as usize)
            }
            blk::VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(Failure::IoError("write to a read-only disk".into()));
                }
                let len = reader.available_bytes() as u64;
                let offset = span(sector, len, disk_len)?;
                if let Some(file) = image.raw_file() {
                    // The data: the readable bytes after the header.
                    let slices = vectored::chain_slices(
                        memory,
                        chain.clone(),
                        false,
                        header.len(),
                        len as usize,
                    )
                    .map_err(Failure::IoError)?;
                    vectored::write_from(file, offset, &slices)
                        .map_err(io("writing the disk image"))?;
                    return Ok(0);
                }
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    self.buffer.resize(n, 0);
                    reader
                        .read_exact(&mut self.buffer[..n])
                        .map_err(io("reading guest memory"))?;
                    image
                        .write_at(&self.buffer[..n], offset + done)
                        .map_err(io("writing the disk image"))?;
                    done += n as u64;
                }
                Ok(0)
            }
            blk::VIRTIO_BLK_T_FLUSH => {
                image.flush().map_err(io("flushing the disk image"))?;
                Ok(0)
            }
            blk::VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                writer
                    .write_all(&self.serial[..n])
                    .map_err(io("writing the serial number"))?;
                Ok(n)
            }
            blk::VIRTIO_BLK_T_DISCARD | blk::VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    return Err(Failure::IoError("discard on a read-only disk".into()));
                }
                let count = reader.available_bytes() / 16;
                if count == 0
                    || count > MAX_SEGMENTS as usize
                    || !reader.available_bytes().is_multiple_of(16)
                {
                    return Err(Failure::IoError(format!(
                        "{} bytes of discard segments",
                        reader.available_bytes()
                    )));
                }
                for _ in 0..count {
                    let mut seg = [0u8; 16];
                    reader
                        .read_exact(&mut seg)
                        .map_err(io("reading a discard segment"))?;
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&seg[0..8]);
                    let first = u64::from_le_bytes(s);
                    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    if sectors > MAX_SEGMENT_SECTORS {
                        return Err(Failure::IoError(format!("{sectors} sectors in a segment")));
                    }
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    let offset = span(first, len, disk_len)?;
                    if kind == blk::VIRTIO_BLK_T_DISCARD {
                        if flags != 0 {
                            return Err(Failure::Unsupported(kind));
                        }
                        image.discard(offset, len).map_err(io("discarding"))?;
                    } else {
                        if flags & !blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                            return Err(Failure::Unsupported(kind));
                        }
                        let unmap = flags & blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                        image
                            .write_zeroes(offset, len, unmap)
                            .map_err(io("writing zeroes"))?;
                    }
                }
                Ok(0)
            }
            other => Err(Failure::Unsupported(other)),
        }
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie inside a disk
/// of `disk_len` bytes.
fn span(sector: u64, len: u64, disk_len: u64) -> Result<u64, Failure> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= disk_len))
        .ok_or_else(|| {
            Failure::IoError(format!(
                "{len} bytes at sector {sector} are past the end of a {disk_len}-byte disk"
            ))
        })?;
    Ok(offset)
}
