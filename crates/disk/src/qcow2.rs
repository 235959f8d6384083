//! qcow2 images (QEMU's docs/interop/qcow2.txt), versions 2 and 3:
//! reading, including compressed clusters and a backing file (raw or
//! qcow2, read-only), and writing by allocating clusters at the end of the
//! file with 16-bit refcounts, so that `qemu-img check` finds the image
//! consistent.
//!
//! Everything in the file is untrusted: header fields, table offsets and
//! sizes are checked against fixed limits before anything is allocated or
//! read, and a table entry pointing somewhere impossible is an I/O error
//! for that request, not a panic.
//!
//! Writes order themselves for crash safety the usual way: a new data
//! cluster is written before its refcount, and the refcount before the L2
//! entry that makes it visible, so a crash can leak a cluster but never
//! expose one that is not fully written. Metadata is written through (no
//! dirty cache); FLUSH is an fdatasync.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{DiskImage, ImageError};

const MAGIC: u32 = 0x5146_49fb;
/// L1 and standard L2 entries: bits 9-55 hold the offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry, version 3: the cluster reads as zeros.
const ZERO: u64 = 1;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Refcounts vessel writes: 16 bits (refcount_order 4, the default).
const REFCOUNT_ORDER: u32 = 4;
/// Largest L1 table accepted (32 MiB: 4 million L2 tables).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted.
const MAX_REFCOUNT_TABLE_BYTES: u64 = 32 << 20;
/// L2 tables and refcount blocks kept in memory.
const CACHE_TABLES: usize = 64;
/// Backing files nested at most this deep.
const MAX_BACKING_DEPTH: usize = 8;

fn invalid(path: &Path, why: impl Into<String>) -> ImageError {
    ImageError::Corrupt {
        path: path.to_owned(),
        why: why.into(),
    }
}

fn io_invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(v)
}

/// The fields of a qcow2 header vessel uses.
#[derive(Debug, Clone)]
struct Header {
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    refcount_order: u32,
    backing_file: Option<String>,
    backing_format: Option<String>,
}

impl Header {
    fn parse(file: &File, path: &Path) -> Result<Header, ImageError> {
        let mut b = [0u8; 104];
        let io_err = |error| ImageError::Open {
            path: path.to_owned(),
            error,
        };
        file.read_exact_at(&mut b[..72], 0)
            .map_err(|_| invalid(path, "shorter than a qcow2 header"))?;
        if be32(&b, 0) != MAGIC {
            return Err(invalid(path, "no qcow2 magic"));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(invalid(
                path,
                format!("qcow2 version {version} (2 and 3 are read)"),
            ));
        }
        let (incompatible, refcount_order, header_length) = if version == 3 {
            file.read_exact_at(&mut b[72..104], 72)
                .map_err(|_| invalid(path, "version 3 header cut short"))?;
            (be64(&b, 72), be32(&b, 96), be32(&b, 100))
        } else {
            (0, REFCOUNT_ORDER, 72)
        };
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!("cluster_bits {cluster_bits} (9 to 21 allowed)"),
            ));
        }
        if be32(&b, 32) != 0 {
            return Err(invalid(path, "encrypted images are not supported"));
        }
        // Dirty (lazy refcounts), corrupt, external data file, compression
        // type, extended L2: none of them is read here.
        if incompatible != 0 {
            return Err(invalid(
                path,
                format!("incompatible features {incompatible:#x} (run `qemu-img check -r all`, or convert the image)"),
            ));
        }
        if refcount_order > 6 {
            return Err(invalid(path, format!("refcount_order {refcount_order}")));
        }
        let header = Header {
            version,
            cluster_bits,
            size: be64(&b, 24),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            refcount_order,
            backing_file: None,
            backing_format: None,
        };
        let cluster = 1u64 << cluster_bits;
        let entries_per_l2 = cluster / 8;
        let needed_l1 = header.size.div_ceil(cluster * entries_per_l2);
        if u64::from(header.l1_size) < needed_l1 {
            return Err(invalid(path, "the L1 table does not cover the disk"));
        }
        if u64::from(header.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("an L1 table of {} entries", header.l1_size),
            ));
        }
        if u64::from(header.refcount_table_clusters) * cluster > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid(path, "a refcount table too large"));
        }
        for (name, offset) in [
            ("L1 table", header.l1_table_offset),
            ("refcount table", header.refcount_table_offset),
        ] {
            if offset % cluster != 0 || offset == 0 {
                return Err(invalid(
                    path,
                    format!("{name} at {offset:#x}: not on a cluster"),
                ));
            }
        }
        // The backing file's name, and its format from the extensions.
        let mut header = header;
        let backing_offset = be64(&b, 8);
        let backing_len = be32(&b, 16);
        if backing_offset != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(invalid(path, "a backing file name of bad length"));
            }
            let mut name = vec![0u8; backing_len as usize];
            file.read_exact_at(&mut name, backing_offset)
                .map_err(io_err)?;
            header.backing_file = Some(
                String::from_utf8(name)
                    .map_err(|_| invalid(path, "backing file name not UTF-8"))?,
            );
        }
        let mut at = u64::from(header_length);
        for _ in 0..64 {
            let mut ext = [0u8; 8];
            if file.read_exact_at(&mut ext, at).is_err() {
                break;
            }
            let (kind, len) = (be32(&ext, 0), be32(&ext, 4));
            if kind == 0 || len > 4096 {
                break;
            }
            if kind == EXT_BACKING_FORMAT {
                let mut data = vec![0u8; len as usize];
                file.read_exact_at(&mut data, at + 8).map_err(io_err)?;
                header.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
            }
            at += 8 + u64::from(len).next_multiple_of(8);
        }
        Ok(header)
    }
}

/// The backing file a new image reads unwritten clusters from.
#[derive(Debug, Clone)]
pub struct NewBacking {
    /// As written in the image: absolute, or relative to the image's
    /// directory.
    pub name: String,
    /// `raw` or `qcow2` (written down, never guessed when read).
    pub format: String,
}

/// Cluster size of the images vessel creates (qemu-img's default).
const NEW_CLUSTER_BITS: u32 = 16;

/// Creates a qcow2 (version 3) image of `size` bytes at `path`, which must
/// not exist: 64 KiB clusters, 16-bit refcounts, and optionally a backing
/// file. Everything reads as zeros (or as the backing file) until written.
pub fn create(path: &Path, size: u64, backing: Option<&NewBacking>) -> Result<(), ImageError> {
    let cluster = 1u64 << NEW_CLUSTER_BITS;
    if size == 0 || !size.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("a size of {size} bytes: a positive multiple of 512"),
        ));
    }
    if let Some(b) = backing {
        if b.name.is_empty() || b.name.len() > 1023 {
            return Err(invalid(path, "a backing file name of bad length"));
        }
        if b.format != "raw" && b.format != "qcow2" {
            return Err(invalid(
                path,
                format!("backing format {:?} (raw or qcow2)", b.format),
            ));
        }
    }
    let l1_size = size.div_ceil(cluster * (cluster / 8));
    let l1_bytes = l1_size * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(invalid(
            path,
            format!("a size of {size} bytes is too large"),
        ));
    }
    let l1_clusters = l1_bytes.div_ceil(cluster).max(1);
    // Cluster 0: header, extensions, backing name. 1: refcount table.
    // 2: its one refcount block. 3..: the L1 table.
    let (refcount_table, refcount_block, l1_table) = (cluster, 2 * cluster, 3 * cluster);
    let clusters = 3 + l1_clusters;
    if clusters > cluster / 2 {
        return Err(invalid(
            path,
            format!("a size of {size} bytes is too large"),
        ));
    }
    let mut header = vec![0u8; cluster as usize];
    let put32 =
        |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut header, 0, MAGIC);
    put32(&mut header, 4, 3);
    put32(&mut header, 20, NEW_CLUSTER_BITS);
    put64(&mut header, 24, size);
    put32(&mut header, 36, l1_size as u32);
    put64(&mut header, 40, l1_table);
    put64(&mut header, 48, refcount_table);
    put32(&mut header, 56, 1);
    put32(&mut header, 96, REFCOUNT_ORDER);
    put32(&mut header, 100, 104);
    // Header extensions from byte 104: the backing format, then the end.
    let mut at = 104usize;
    if let Some(b) = backing {
        let len = b.format.len();
        put32(&mut header, at, EXT_BACKING_FORMAT);
        put32(&mut header, at + 4, len as u32);
        header[at + 8..at + 8 + len].copy_from_slice(b.format.as_bytes());
        at += 8 + len.next_multiple_of(8);
    }
    at += 8; // the end-of-extensions marker: zeros
    if let Some(b) = backing {
        put64(&mut header, 8, at as u64);
        put32(&mut header, 16, b.name.len() as u32);
        header[at..at + b.name.len()].copy_from_slice(b.name.as_bytes());
    }
    let mut table = vec![0u8; cluster as usize];
    table[..8].copy_from_slice(&refcount_block.to_be_bytes());
    let mut block = vec![0u8; cluster as usize];
    for i in 0..clusters as usize {
        block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let io_err = |error| ImageError::Open {
        path: path.to_owned(),
        error,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let written = (|| -> std::io::Result<()> {
        file.write_all_at(&header, 0)?;
        file.write_all_at(&table, refcount_table)?;
        file.write_all_at(&block, refcount_block)?;
        file.set_len(l1_table + l1_clusters * cluster)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(io_err(e));
    }
    Ok(())
}

/// Where the clusters nobody wrote come from.
enum Backing {
    None,
    Image(Box<dyn DiskImage>),
}

/// An open qcow2 image.
pub struct Qcow2Image {
    file: File,
    path: PathBuf,
    readonly: bool,
    cluster_bits: u32,
    size: u64,
    version: u32,
    l1_offset: u64,
    l1: Vec<u64>,
    refcount_table_offset: u64,
    refcount_table: Vec<u64>,
    /// L2 tables and refcount blocks by file offset (written through).
    tables: HashMap<u64, Vec<u8>>,
    /// Where the next cluster is allocated: the end of the file.
    next_free: u64,
    /// The end of the file when opened: every offset in the image's own
    /// tables must lie below it (a cluster past it would be handed out
    /// again by allocation, and two owners would share it).
    opened_end: u64,
    /// The image's original L2 tables whose entries have been checked.
    checked_tables: HashSet<u64>,
    /// Host clusters holding L2 tables or refcount blocks: guest data is
    /// never written over them.
    metadata: HashSet<u64>,
    backing: Backing,
    /// The last compressed cluster decompressed: (entry, contents).
    inflated: Option<(u64, Vec<u8>)>,
}

impl Qcow2Image {
    /// Opens the qcow2 image in `file` (at `path`, for messages and to
    /// find a relative backing file), writable unless `readonly`.
    pub fn open(file: File, path: &Path, readonly: bool) -> Result<Qcow2Image, ImageError> {
        Self::open_at_depth(file, path, readonly, 0)
    }

    fn open_at_depth(
        file: File,
        path: &Path,
        readonly: bool,
        depth: usize,
    ) -> Result<Qcow2Image, ImageError> {
        let h = Header::parse(&file, path)?;
        let io_err = |error| ImageError::Open {
            path: path.to_owned(),
            error,
        };
        if !readonly && h.refcount_order != REFCOUNT_ORDER {
            return Err(invalid(
                path,
                format!(
                    "{}-bit refcounts: vessel writes images with 16-bit ones only",
                    1 << h.refcount_order
                ),
            ));
        }
        if !readonly && h.nb_snapshots != 0 {
            return Err(invalid(
                path,
                "internal snapshots: vessel writes images without them only (use it read-only, or `qemu-img snapshot -d`)",
            ));
        }
        let cluster = 1u64 << h.cluster_bits;
        let mut l1_bytes = vec![0u8; h.l1_size as usize * 8];
        file.read_exact_at(&mut l1_bytes, h.l1_table_offset)
            .map_err(|_| invalid(path, "the L1 table lies past the end of the file"))?;
        let l1: Vec<u64> = l1_bytes.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let mut rt_bytes = vec![0u8; (u64::from(h.refcount_table_clusters) * cluster) as usize];
        file.read_exact_at(&mut rt_bytes, h.refcount_table_offset)
            .map_err(|_| invalid(path, "the refcount table lies past the end of the file"))?;
        let refcount_table: Vec<u64> = rt_bytes.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let file_len = file.metadata().map_err(io_err)?.len();
        let opened_end = file_len.next_multiple_of(cluster);
        // Every table the header's tables point at exists and is a cluster.
        let mut metadata = HashSet::new();
        let tables = l1.iter().map(|e| ("an L2 table", e & OFFSET_MASK));
        let blocks = refcount_table
            .iter()
            .map(|e| ("a refcount block", e & OFFSET_MASK));
        for (what, offset) in tables.chain(blocks).filter(|(_, o)| *o != 0) {
            if !offset.is_multiple_of(cluster) || offset >= opened_end {
                return Err(invalid(
                    path,
                    format!("{what} at {offset:#x} lies outside the file"),
                ));
            }
            metadata.insert(offset);
        }
        let backing = match &h.backing_file {
            None => Backing::None,
            Some(name) => {
                if depth >= MAX_BACKING_DEPTH {
                    return Err(invalid(path, "backing files nested too deep"));
                }
                let backing_path = match Path::new(name) {
                    p if p.is_absolute() => p.to_owned(),
                    p => path.parent().unwrap_or(Path::new(".")).join(p),
                };
                let backing_file = crate::open_locked(&backing_path, true)?;
                let image: Box<dyn DiskImage> = match h.backing_format.as_deref() {
                    Some("raw") => Box::new(crate::RawImage::new(backing_file, &backing_path)?),
                    Some("qcow2") => Box::new(Qcow2Image::open_at_depth(
                        backing_file,
                        &backing_path,
                        true,
                        depth + 1,
                    )?),
                    None if crate::looks_like_qcow2(&backing_file) => Box::new(
                        Qcow2Image::open_at_depth(backing_file, &backing_path, true, depth + 1)?,
                    ),
                    None => Box::new(crate::RawImage::new(backing_file, &backing_path)?),
                    Some(other) => {
                        return Err(invalid(
                            path,
                            format!("backing format {other:?} (raw and qcow2 are read)"),
                        ))
                    }
                };
                Backing::Image(image)
            }
        };
        Ok(Qcow2Image {
            file,
            path: path.to_owned(),
            readonly,
            cluster_bits: h.cluster_bits,
            size: h.size,
            version: h.version,
            l1_offset: h.l1_table_offset,
            l1,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table,
            tables: HashMap::new(),
            next_free: opened_end,
            opened_end,
            checked_tables: HashSet::new(),
            metadata,
            backing,
            inflated: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// A host offset read from a table: on a cluster boundary and below
    /// 2^56, or the image is corrupt.
    fn check_offset(&self, offset: u64, what: &str) -> io::Result<u64> {
        if !offset.is_multiple_of(self.cluster_size()) || offset >= 1 << 56 {
            return Err(io_invalid(format!(
                "{}: {what} at {offset:#x} is not a cluster",
                self.path.display()
            )));
        }
        Ok(offset)
    }

    /// The table (L2 or refcount block) at `offset`, from the cache or the file.
    fn table(&mut self, offset: u64) -> io::Result<&mut Vec<u8>> {
        if !self.tables.contains_key(&offset) {
            if self.tables.len() >= CACHE_TABLES {
                // Written through: any entry can go.
                if let Some(k) = self.tables.keys().next().copied() {
                    self.tables.remove(&k);
                }
            }
            let mut t = vec![0u8; self.cluster_size() as usize];
            self.file.read_exact_at(&mut t, offset)?;
            self.tables.insert(offset, t);
        }
        self.tables
            .get_mut(&offset)
            .ok_or_else(|| io::Error::other("table cache"))
    }

    /// The L2 entry for virtual cluster `vcluster` (0: unallocated), and
    /// where it lives (L2 table offset, index) if its table exists.
    fn l2_entry(&mut self, vcluster: u64) -> io::Result<(u64, Option<(u64, usize)>)> {
        let per = self.l2_entries();
        let l1_index = (vcluster / per) as usize;
        let l2_index = (vcluster % per) as usize;
        let l1_entry = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| io_invalid("past the L1 table"))?;
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((0, None));
        }
        let l2_offset = self.check_offset(l2_offset, "an L2 table")?;
        if l2_offset < self.opened_end && !self.checked_tables.contains(&l2_offset) {
            self.check_l2_table(l2_offset)?;
            self.checked_tables.insert(l2_offset);
        }
        let table = self.table(l2_offset)?;
        let entry = be64(table, l2_index * 8);
        Ok((entry, Some((l2_offset, l2_index))))
    }

    /// Checks every entry of the image's own L2 table at `offset`: no
    /// reserved bits, and clusters inside the file as it was opened. (A
    /// table vessel allocated holds only entries vessel wrote.)
    fn check_l2_table(&mut self, offset: u64) -> io::Result<()> {
        const RESERVED: u64 = 0x3f00_0000_0000_01fe;
        let x = 62 - (self.cluster_bits - 8);
        let end = self.opened_end;
        let path = self.path.display().to_string();
        let table = self.table(offset)?;
        for (i, e) in table.chunks_exact(8).map(|e| be64(e, 0)).enumerate() {
            let (host, bad_bits) = if e & COMPRESSED != 0 {
                (e & ((1u64 << x) - 1), false)
            } else {
                (e & OFFSET_MASK, e & RESERVED != 0)
            };
            if bad_bits || host >= end {
                return Err(io_invalid(format!(
                    "{path}: entry {i} of the L2 table at {offset:#x} ({e:#x}) is invalid"
                )));
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of virtual cluster `vcluster` from `within`.
    fn read_cluster(&mut self, vcluster: u64, within: u64, buf: &mut [u8]) -> io::Result<()> {
        let (entry, _) = self.l2_entry(vcluster)?;
        let virtual_offset = (vcluster << self.cluster_bits) + within;
        if entry & COMPRESSED != 0 {
            let data = self.inflate(entry)?;
            let start = within as usize;
            buf.copy_from_slice(&data[start..start + buf.len()]);
            return Ok(());
        }
        let host = entry & OFFSET_MASK;
        if self.version >= 3 && entry & ZERO != 0 {
            buf.fill(0);
        } else if host != 0 {
            let host = self.check_offset(host, "a data cluster")?;
            self.file.read_exact_at(buf, host + within)?;
        } else {
            self.read_backing(virtual_offset, buf)?;
        }
        Ok(())
    }

    /// What the backing file holds at `offset` (zeros past its end).
    fn read_backing(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.backing {
            Backing::None => buf.fill(0),
            Backing::Image(image) => {
                let len = image.len();
                let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                if n > 0 {
                    image.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
            }
        }
        Ok(())
    }

    /// The contents of the compressed cluster `entry` describes.
    fn inflate(&mut self, entry: u64) -> io::Result<Vec<u8>> {
        if let Some((e, data)) = &self.inflated {
            if *e == entry {
                return Ok(data.clone());
            }
        }
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !COPIED & !COMPRESSED) >> x) + 1;
        let len = (sectors * 512).saturating_sub(offset & 511);
        if len > 2 * self.cluster_size() {
            return Err(io_invalid("a compressed cluster longer than two clusters"));
        }
        let mut compressed = vec![0u8; len as usize];
        // The last compressed cluster may end before the sectors do.
        let mut got = 0;
        while got < compressed.len() {
            match self
                .file
                .read_at(&mut compressed[got..], offset + got as u64)?
            {
                0 => break,
                n => got += n,
            }
        }
        let mut out = vec![0u8; self.cluster_size() as usize];
        let mut inflater = flate2::Decompress::new(false);
        inflater
            .decompress(
                &compressed[..got],
                &mut out,
                flate2::FlushDecompress::Finish,
            )
            .map_err(|e| io_invalid(format!("a compressed cluster: {e}")))?;
        if inflater.total_out() != self.cluster_size() {
            return Err(io_invalid("a compressed cluster inflates short"));
        }
        self.inflated = Some((entry, out.clone()));
        Ok(out)
    }

    // ---- allocation ----------------------------------------------------

    /// Sets the refcount of host cluster `index` to `value`, creating its
    /// refcount block if needed.
    fn set_refcount(&mut self, index: u64, value: u16) -> io::Result<()> {
        let per_block = self.cluster_size() / 2;
        let block_index = (index / per_block) as usize;
        if block_index >= self.refcount_table.len() {
            return Err(io::Error::other(format!(
                "{}: the image outgrew its refcount table",
                self.path.display()
            )));
        }
        let mut block = self.refcount_table[block_index] & OFFSET_MASK;
        if block == 0 {
            // A new block at the end: zeroed, linked, then counted (it may
            // count itself).
            block = self.next_free;
            self.next_free += self.cluster_size();
            self.metadata.insert(block);
            self.file
                .write_all_at(&vec![0u8; self.cluster_size() as usize], block)?;
            self.refcount_table[block_index] = block;
            self.file.write_all_at(
                &block.to_be_bytes(),
                self.refcount_table_offset + block_index as u64 * 8,
            )?;
            self.set_refcount(block >> self.cluster_bits, 1)?;
        }
        let block = self.check_offset(block, "a refcount block")?;
        let at = ((index % per_block) * 2) as usize;
        let table = self.table(block)?;
        table[at..at + 2].copy_from_slice(&value.to_be_bytes());
        self.file
            .write_all_at(&value.to_be_bytes(), block + at as u64)
    }

    /// A new cluster at the end of the file, counted once, holding `data`
    /// (a whole cluster).
    fn allocate(&mut self, data: &[u8]) -> io::Result<u64> {
        let offset = self.next_free;
        self.next_free += self.cluster_size();
        self.file.write_all_at(data, offset)?;
        self.set_refcount(offset >> self.cluster_bits, 1)?;
        Ok(offset)
    }

    /// The host offset virtual cluster `vcluster` can be written at in
    /// place, allocating (with its current contents) if it has none of
    /// its own.
    fn writable_cluster(&mut self, vcluster: u64) -> io::Result<u64> {
        let (entry, place) = self.l2_entry(vcluster)?;
        let host = entry & OFFSET_MASK;
        let plain = entry & COMPRESSED == 0 && !(self.version >= 3 && entry & ZERO != 0);
        if plain && host != 0 && entry & COPIED != 0 {
            let host = self.check_offset(host, "a data cluster")?;
            if self.overlaps_metadata(host) {
                return Err(io_invalid(format!(
                    "{}: the data cluster at {host:#x} overlaps the image's metadata",
                    self.path.display()
                )));
            }
            return Ok(host);
        }
        // Copy on write: the cluster's current contents into a new one.
        let mut data = vec![0u8; self.cluster_size() as usize];
        self.read_cluster(vcluster, 0, &mut data)?;
        let new = self.allocate(&data)?;
        let (l2_offset, index) = match place {
            Some(p) => p,
            None => {
                let table = self.allocate(&vec![0u8; self.cluster_size() as usize])?;
                self.metadata.insert(table);
                let l1_index = (vcluster / self.l2_entries()) as usize;
                self.l1[l1_index] = table | COPIED;
                self.file.write_all_at(
                    &(table | COPIED).to_be_bytes(),
                    self.l1_offset + l1_index as u64 * 8,
                )?;
                (table, (vcluster % self.l2_entries()) as usize)
            }
        };
        let value = new | COPIED;
        let table = self.table(l2_offset)?;
        table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
        self.file
            .write_all_at(&value.to_be_bytes(), l2_offset + index as u64 * 8)?;
        // What the old entry held is no longer referenced from here (a
        // compressed cluster's host cluster may hold others' data too, so
        // it is left counted: `qemu-img check` calls that a leak, not an
        // error).
        Ok(new)
    }

    /// Whether host cluster `host` holds the header, the L1 or refcount
    /// table, an L2 table or a refcount block.
    fn overlaps_metadata(&self, host: u64) -> bool {
        let cs = self.cluster_size();
        let within = |start: u64, len: u64| host + cs > start && host < start.saturating_add(len);
        host < cs
            || within(self.l1_offset, self.l1.len() as u64 * 8)
            || within(
                self.refcount_table_offset,
                self.refcount_table.len() as u64 * 8,
            )
            || self.metadata.contains(&host)
    }

    /// The pieces of `[offset, offset + len)` that each lie in one cluster:
    /// (virtual cluster, offset in it, offset in the request, length).
    fn pieces(&self, offset: u64, len: usize) -> Vec<(u64, u64, usize, usize)> {
        let cs = self.cluster_size();
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let within = at % cs;
            let n = ((cs - within) as usize).min(len - done);
            out.push((at / cs, within, done, n));
            done += n;
        }
        out
    }
}

impl DiskImage for Qcow2Image {
    fn len(&self) -> u64 {
        self.size / 512 * 512
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (vcluster, within, start, n) in self.pieces(offset, buf.len()) {
            self.read_cluster(vcluster, within, &mut buf[start..start + n])?;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        for (vcluster, within, start, n) in self.pieces(offset, buf.len()) {
            let host = self.writable_cluster(vcluster)?;
            self.file
                .write_all_at(&buf[start..start + n], host + within)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        // A hint: the clusters keep their data (the image does not shrink).
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let zeros = vec![0u8; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
