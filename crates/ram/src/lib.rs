//! Guest RAM as every layer of vessel sees it, with a watch on writes made
//! through it. (A crate of its own so that the device crates below the
//! `hypervisor` boundary use the same type.)
//!
//! [`GuestRam`] is vm-memory's mmap backend whose per-region "bitmap" is a
//! [`WriteWatch`]: vm-memory calls it for every write that goes through its
//! API (`write_slice`, `write_obj`, volatile slices, reads from a file into
//! guest memory), which is how devices and the boot loader write guest
//! memory. An accelerator that caches something derived from guest memory
//! installs a hook with [`watch_writes`]: the software vCPU drops the code
//! it decoded from a page that a device then overwrites by DMA (a disk read
//! into the page cache, say). KVM needs none: the processor keeps its own
//! caches coherent. Without a hook a write costs one atomic load more.

use std::fmt;
use std::sync::{Arc, OnceLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest RAM: the type every crate above `hypervisor` uses for it.
pub type GuestRam = vm_memory::GuestMemoryMmap<WriteWatch>;

/// What [`watch_writes`] calls: a guest-physical address and a length in
/// bytes that something just wrote.
pub type WriteHook = Arc<dyn Fn(u64, usize) + Send + Sync>;

/// The write watch of one RAM region, or of a slice of it (`offset` bytes
/// into the region).
#[derive(Clone, Default)]
pub struct WriteWatch {
    region: Arc<RegionWatch>,
    offset: usize,
}

#[derive(Default)]
struct RegionWatch {
    /// The region's guest-physical start and the hook, set together by
    /// [`watch_writes`].
    hook: OnceLock<(u64, WriteHook)>,
}

impl fmt::Debug for WriteWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteWatch")
            .field("offset", &self.offset)
            .field("watched", &self.region.hook.get().is_some())
            .finish()
    }
}

impl WithBitmapSlice<'_> for WriteWatch {
    type S = WriteWatch;
}

impl BitmapSlice for WriteWatch {}

impl Bitmap for WriteWatch {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        if let Some((start, hook)) = self.region.hook.get() {
            let within = self.offset.saturating_add(offset) as u64;
            hook(start.saturating_add(within), len);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        // A watch, not a dirty log: nothing is remembered.
        false
    }

    fn slice_at(&self, offset: usize) -> WriteWatch {
        WriteWatch {
            region: self.region.clone(),
            offset: self.offset.saturating_add(offset),
        }
    }
}

impl NewBitmap for WriteWatch {
    fn with_len(_len: usize) -> Self {
        WriteWatch::default()
    }
}

/// Calls `hook` for every write made through vm-memory to any region of
/// `memory` from now on. One hook per region, for good: false if a region
/// already had one.
pub fn watch_writes(memory: &GuestRam, hook: WriteHook) -> bool {
    let mut all_new = true;
    for region in memory.iter() {
        let start = region.start_addr().0;
        all_new &= region
            .bitmap()
            .region
            .hook
            .set((start, hook.clone()))
            .is_ok();
    }
    all_new
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_through_vm_memory_reach_the_hook_with_guest_addresses() {
        let ram = GuestRam::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x10_0000), 0x1_0000),
        ])
        .unwrap();
        // Before a hook: writes work and go nowhere.
        ram.write_obj(1u32, GuestAddress(0x10)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        assert!(watch_writes(
            &ram,
            Arc::new(move |gpa, len| log.lock().unwrap().push((gpa, len)))
        ));
        ram.write_obj(2u64, GuestAddress(0x2000)).unwrap();
        ram.write_slice(&[7; 3], GuestAddress(0x10_0ffe)).unwrap();
        // A volatile slice handed out at an offset (as virtio queues use them).
        let slice = ram.get_slice(GuestAddress(0x10_8000), 16).unwrap();
        slice.write_slice(&[1, 2], 4).unwrap();
        // Reads are not writes.
        let _: u64 = ram.read_obj(GuestAddress(0x2000)).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(seen.contains(&(0x2000, 8)), "{seen:x?}");
        assert!(seen.contains(&(0x10_0ffe, 3)), "{seen:x?}");
        assert!(seen.contains(&(0x10_8004, 2)), "{seen:x?}");
        assert_eq!(seen.len(), 3, "{seen:x?}");
        // A second hook is refused.
        assert!(!watch_writes(&ram, Arc::new(|_, _| {})));
    }
}
