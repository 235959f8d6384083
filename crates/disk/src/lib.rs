//! Disk images for VMs: opening and locking them, and the formats: raw
//! here, qcow2 in [`qcow2`].

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod qcow2;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A disk image as the block device sees it: bytes at offsets.
pub trait DiskImage: Send {
    /// Size of the virtual disk in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads `buf.len()` bytes at `offset` (inside `len()`).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset` (inside `len()`).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;
    /// The guest no longer needs `[offset, offset + len)`; it may read
    /// back as anything (here: zeros where the file system can punch).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// `[offset, offset + len)` reads back as zeros; `unmap` allows
    /// freeing the space.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// The file whose byte at each offset is the disk's byte at that
    /// offset, when there is one (raw images): the block device then moves
    /// data between it and guest memory with vectored I/O, without a
    /// bounce buffer. Writes through it must stay inside `len()`.
    fn raw_file(&self) -> Option<&File> {
        None
    }
}

/// Why an image cannot be used, in one line for the user (each message
/// is complete: the I/O error is part of it, not a separate source).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("disk image {}: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error("disk image {}: is a directory", .0.display())]
    Directory(PathBuf),
    #[error("disk image {}: is neither a regular file nor a block device", .0.display())]
    NotADisk(PathBuf),
    #[error("disk image {}: is in use by another VM (it is locked)", .0.display())]
    Locked(PathBuf),
    #[error("disk image {}: is smaller than one 512-byte sector", .0.display())]
    Empty(PathBuf),
    #[error("disk image {}: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
}

/// Opens `path` for a VM, read-only or read-write, and locks it for as
/// long as the returned file lives: a writer excludes every other user,
/// readers exclude writers (as QEMU's image locking does), so two VMs
/// never write one image.
pub fn open_locked(path: &Path, readonly: bool) -> Result<File, ImageError> {
    let open_err = |error| ImageError::Open {
        path: path.to_owned(),
        error,
    };
    // A directory cannot be opened for writing at all: say what it is.
    // Nor can a FIFO without a reader: say what it is too.
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            return Err(ImageError::Directory(path.to_owned()));
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(ImageError::NotADisk(path.to_owned()));
        }
    }
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is then
    // refused below); it changes nothing for files and block devices.
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(ImageError::Directory(path.to_owned()));
    }
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(ImageError::NotADisk(path.to_owned()));
    }
    let how = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor this function owns; no memory
    // is passed.
    let locked = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
    if locked != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            ImageError::Locked(path.to_owned())
        } else {
            open_err(e)
        });
    }
    Ok(file)
}

/// Whether `file` starts with the qcow2 magic (`QFI\xfb`): such an image
/// used as raw would show the guest its metadata, and let it overwrite it.
pub fn looks_like_qcow2(file: &File) -> bool {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).is_ok() && magic == *b"QFI\xfb"
}

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawImage {
    file: File,
    len: u64,
}

impl RawImage {
    /// The disk is the file's size (a block device's too, which its
    /// metadata does not give) rounded down to whole sectors.
    pub fn new(file: File, path: &Path) -> Result<RawImage, ImageError> {
        use std::io::{Seek, SeekFrom};
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|error| ImageError::Open {
                path: path.to_owned(),
                error,
            })?
            / 512
            * 512;
        if len == 0 {
            return Err(ImageError::Empty(path.to_owned()));
        }
        Ok(RawImage { file, len })
    }
}

/// fallocate(2) with `mode` over `[offset, offset + len)`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a file descriptor owned by `file`; no memory
    // is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl DiskImage for RawImage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is a hint: a file system that cannot punch holes
            // keeps the data, which is allowed.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let first = if unmap {
            fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len)
        } else {
            fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len)
        };
        match first {
            Err(e) if unsupported(&e) => {
                // Write the zeros.
                let zeros = vec![0u8; 64 << 10];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let writer = open_locked(&path, false).unwrap();
        assert!(matches!(
            open_locked(&path, false),
            Err(ImageError::Locked(_))
        ));
        assert!(matches!(
            open_locked(&path, true),
            Err(ImageError::Locked(_))
        ));
        drop(writer);
        let r1 = open_locked(&path, true).unwrap();
        let _r2 = open_locked(&path, true).unwrap();
        assert!(matches!(
            open_locked(&path, false),
            Err(ImageError::Locked(_))
        ));
        drop(r1);
    }

    #[test]
    fn bad_images_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let e = open_locked(&missing, false).unwrap_err().to_string();
        assert!(
            e.contains("missing.img") && e.contains("No such file"),
            "{e}"
        );
        let e = open_locked(dir.path(), true).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A FIFO is refused at once, not waited on for a writer.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for readonly in [true, false] {
            let e = open_locked(&fifo, readonly).unwrap_err().to_string();
            assert!(
                e.contains("neither a regular file nor a block device"),
                "{e}"
            );
        }
        let tiny = dir.path().join("tiny.img");
        std::fs::write(&tiny, b"abc").unwrap();
        let f = open_locked(&tiny, false).unwrap();
        let e = RawImage::new(f, &tiny).err().unwrap().to_string();
        assert!(e.contains("smaller than one"), "{e}");
    }

    #[test]
    fn raw_image_reads_writes_discards_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0xaau8; 3 * 4096 + 100]).unwrap();
        let mut img = RawImage::new(open_locked(&path, false).unwrap(), &path).unwrap();
        assert_eq!(img.len(), 3 * 4096); // the 100-byte tail is no whole sector
        img.write_at(b"hello", 512).unwrap();
        let mut b = [0u8; 5];
        img.read_at(&mut b, 512).unwrap();
        assert_eq!(&b, b"hello");
        img.write_zeroes(4096, 4096, false).unwrap();
        img.discard(8192, 4096).unwrap();
        img.flush().unwrap();
        let mut page = vec![0u8; 4096];
        img.read_at(&mut page, 4096).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        img.write_zeroes(0, 512, true).unwrap();
        img.read_at(&mut page[..512], 0).unwrap();
        assert!(page[..512].iter().all(|b| *b == 0));
    }
}
