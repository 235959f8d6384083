//! Vectored I/O straight between a file and guest memory: `preadv` and
//! `pwritev` on the host addresses of a request's buffers (a raw disk
//! image), and `writev` of a packet (a tap). The data is then copied once,
//! by the host kernel, instead of through a bounce buffer as well.
//!
//! The buffers are guest input like everything in a request: each range
//! comes from vm-memory's own lookup (`get_slices`), which refuses any
//! byte outside guest RAM, and the lengths are summed with overflow checks.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use ram::{GuestRam, WriteWatch};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

/// A stretch of guest RAM one request's buffer covers.
pub(crate) type GuestSlice<'m> = VolatileSlice<'m, WriteWatch>;

/// Most iovecs one `preadv`/`pwritev` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// The guest RAM that bytes `skip..skip + len` of `chain`'s readable
/// (or, with `writable`, its writable) descriptors cover, in order.
pub(crate) fn chain_slices<'m>(
    memory: &'m GuestRam,
    chain: DescriptorChain<&'m GuestRam>,
    writable: bool,
    skip: usize,
    len: usize,
) -> Result<Vec<GuestSlice<'m>>, String> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let descriptors: Box<dyn Iterator<Item = _>> = if writable {
        Box::new(chain.writable())
    } else {
        Box::new(chain.readable())
    };
    let mut slices = Vec::new();
    let mut skip = skip;
    let mut left = len;
    for desc in descriptors {
        if left == 0 {
            break;
        }
        let desc_len = desc.len() as usize;
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        let take = (desc_len - skip).min(left);
        let addr = desc
            .addr()
            .0
            .checked_add(skip as u64)
            .ok_or_else(|| format!("a buffer at {:#x} wraps around", desc.addr().0))?;
        let found = memory
            .get_slices(vm_memory::GuestAddress(addr), take, access)
            .map_err(|e| format!("a buffer at {addr:#x}: {e}"))?;
        for slice in found {
            slices.push(slice.map_err(|e| format!("a buffer at {addr:#x}: {e}"))?);
        }
        skip = 0;
        left -= take;
    }
    if left != 0 {
        return Err(format!("the buffers hold {} bytes too few", left));
    }
    Ok(slices)
}

/// Reads the file at `offset` into `slices`, filling every byte; the
/// guest's write watch hears of each byte written.
pub(crate) fn read_into(file: &File, offset: u64, slices: &[GuestSlice<'_>]) -> io::Result<()> {
    transfer(file, offset, slices, Direction::FileToGuest)
}

/// Writes all of `slices` to the file at `offset`.
pub(crate) fn write_from(file: &File, offset: u64, slices: &[GuestSlice<'_>]) -> io::Result<()> {
    transfer(file, offset, slices, Direction::GuestToFile)
}

/// Writes all of `slices` to `fd` in one `writev`, as one packet (a tap
/// takes each write as a frame); how many bytes it took.
pub(crate) fn write_packet(fd: &impl AsRawFd, slices: &[GuestSlice<'_>]) -> io::Result<usize> {
    if slices.len() > IOV_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a packet in {} pieces", slices.len()),
        ));
    }
    // A guest RAM slice's pointer stays valid while the memory mapping
    // lives, which `slices` borrows.
    let iovecs: Vec<libc::iovec> = slices
        .iter()
        .map(|slice| libc::iovec {
            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
            iov_len: slice.len(),
        })
        .collect();
    loop {
        // SAFETY: every iovec points into guest RAM that `slices` keeps
        // mapped, with its slice's length; the kernel only reads them.
        let done =
            unsafe { libc::writev(fd.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as libc::c_int) };
        if done >= 0 {
            return Ok(done as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FileToGuest,
    GuestToFile,
}

fn transfer(
    file: &File,
    offset: u64,
    slices: &[GuestSlice<'_>],
    direction: Direction,
) -> io::Result<()> {
    // Where the next byte goes: slice `index`, `within` bytes into it.
    let mut index = 0;
    let mut within = 0usize;
    let mut offset = offset;
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(slices.len().min(IOV_MAX));
    while index < slices.len() {
        iovecs.clear();
        for (i, slice) in slices[index..].iter().take(IOV_MAX).enumerate() {
            let skip = if i == 0 { within } else { 0 };
            // A guest RAM slice's pointer stays valid while the memory
            // mapping lives, which `slices` borrows.
            let base = slice.ptr_guard_mut().as_ptr();
            iovecs.push(libc::iovec {
                // SAFETY: `skip` is less than the slice's length (the
                // cursor never rests at a slice's end), so the pointer
                // stays inside the slice.
                iov_base: unsafe { base.add(skip) }.cast(),
                iov_len: slice.len() - skip,
            });
        }
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
        let count = iovecs.len() as libc::c_int;
        // SAFETY: every iovec points into guest RAM that `slices` keeps
        // mapped, with a length inside its slice; the kernel reads or
        // writes only those bytes (guest memory may change under it, which
        // is the nature of DMA and harmless to the host).
        let done = unsafe {
            match direction {
                Direction::FileToGuest => {
                    libc::preadv(file.as_raw_fd(), iovecs.as_ptr(), count, at)
                }
                Direction::GuestToFile => {
                    libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), count, at)
                }
            }
        };
        if done < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if direction == Direction::FileToGuest {
                // A partial read may have written anything.
                for slice in &slices[index..] {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
            }
            return Err(error);
        }
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file ended early",
            ));
        }
        let mut left = done as usize;
        offset += left as u64;
        while left > 0 {
            let slice = &slices[index];
            let n = (slice.len() - within).min(left);
            if direction == Direction::FileToGuest {
                slice.bitmap().mark_dirty(within, n);
            }
            left -= n;
            within += n;
            if within == slice.len() {
                index += 1;
                within = 0;
            }
        }
    }
    Ok(())
}
