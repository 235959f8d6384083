//! Guest memory as the interpreter sees it.
//!
//! [`Ram`] is a flat table of the RAM regions of a `GuestRam`, kept
//! as host addresses so an access costs a compare and a copy instead of
//! vm-memory's region lookup and slice building. [`Mmu`] turns linear
//! addresses into guest-physical ones (no paging, 32-bit and PAE paging,
//! 4-level long-mode paging) through a software TLB. [`CodePages`]
//! remembers which 4 KiB pages hold decoded blocks, so writes to them can
//! invalidate the block cache.

use hypervisor::GuestRam;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    /// Host virtual address of `start`, kept as an integer so [`Ram`] stays
    /// `Send`; only the accessors below turn it into a pointer.
    host: usize,
}

/// The guest's RAM. Holds a clone of the `GuestRam` so every host
/// mapping in `regions` outlives this value.
#[derive(Debug, Clone)]
pub struct Ram {
    regions: Vec<Region>,
    end: u64,
    _keep: Option<GuestRam>,
}

impl Default for Ram {
    fn default() -> Self {
        Ram::empty()
    }
}

impl Ram {
    /// No RAM at all: every access is MMIO.
    pub fn empty() -> Self {
        Ram {
            regions: Vec::new(),
            end: 0,
            _keep: None,
        }
    }

    pub fn new(memory: &GuestRam) -> Self {
        let mut regions: Vec<Region> = memory
            .iter()
            .map(|r| Region {
                start: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr() as usize,
            })
            .filter(|r| r.len > 0)
            .collect();
        // Biggest first: the low-memory region usually gets most hits.
        regions.sort_by_key(|r| std::cmp::Reverse(r.len));
        let end = regions
            .iter()
            .map(|r| r.start.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        Ram {
            regions,
            end,
            _keep: Some(memory.clone()),
        }
    }

    /// One past the highest RAM address.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Host address of `[gpa, gpa + len)` if the whole range is in one
    /// RAM region.
    #[inline]
    fn host(&self, gpa: u64, len: usize) -> Option<usize> {
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.start);
            if off < r.len && (len as u64) <= r.len - off {
                return Some(r.host + off as usize);
            }
        }
        None
    }

    /// Host address of the 4 KiB page containing `gpa` if the whole page
    /// is RAM, else 0: cached in TLB entries so a hit skips the region
    /// search (see [`TlbEntry::host`]).
    #[inline]
    pub fn page_host(&self, gpa: u64) -> usize {
        self.host(gpa & !PAGE_MASK, PAGE_SIZE as usize).unwrap_or(0)
    }

    /// Whether `gpa` is RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.host(gpa, 1).is_some()
    }

    /// Reads `buf.len()` bytes at `gpa`; false (and nothing read) unless
    /// the whole range is RAM in one region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host(gpa, buf.len()) {
            Some(h) => {
                // SAFETY: `host` checked that `[h, h + len)` lies inside a
                // region mapping kept alive by `_keep`; `buf` is a distinct
                // Rust allocation. Other threads may write guest RAM at the
                // same time, as with vm-memory's own copies: the guest sees
                // some interleaving of bytes, never host memory outside RAM.
                unsafe {
                    std::ptr::copy_nonoverlapping(h as *const u8, buf.as_mut_ptr(), buf.len())
                };
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `gpa`; false (and nothing written) unless the
    /// whole range is RAM in one region.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.host(gpa, data.len()) {
            Some(h) => {
                // SAFETY: as in `read`; the region mapping is writable
                // (GuestRam maps RAM read-write).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), h as *mut u8, data.len()) };
                true
            }
            None => false,
        }
    }

    /// Little-endian load of 1, 2, 4 or 8 bytes. Aligned loads are single
    /// volatile accesses so another vCPU never sees a torn value.
    #[inline]
    pub fn read_u(&self, gpa: u64, size: usize) -> Option<u64> {
        let h = self.host(gpa, size)?;
        let aligned = h % size == 0;
        // SAFETY: `host` checked the range lies in a live mapping; the
        // typed volatile reads are only used when `h` is aligned for them.
        let v = unsafe {
            match (size, aligned) {
                (1, _) => u64::from(std::ptr::read_volatile(h as *const u8)),
                (2, true) => u64::from(std::ptr::read_volatile(h as *const u16)),
                (4, true) => u64::from(std::ptr::read_volatile(h as *const u32)),
                (8, true) => std::ptr::read_volatile(h as *const u64),
                _ => {
                    let mut b = [0u8; 8];
                    std::ptr::copy_nonoverlapping(h as *const u8, b.as_mut_ptr(), size.min(8));
                    u64::from_le_bytes(b)
                }
            }
        };
        Some(v)
    }

    /// Little-endian store of the low `size` (1, 2, 4 or 8) bytes of `v`.
    #[inline]
    pub fn write_u(&self, gpa: u64, size: usize, v: u64) -> bool {
        let Some(h) = self.host(gpa, size) else {
            return false;
        };
        let aligned = h % size == 0;
        // SAFETY: as in `read_u`.
        unsafe {
            match (size, aligned) {
                (1, _) => std::ptr::write_volatile(h as *mut u8, v as u8),
                (2, true) => std::ptr::write_volatile(h as *mut u16, v as u16),
                (4, true) => std::ptr::write_volatile(h as *mut u32, v as u32),
                (8, true) => std::ptr::write_volatile(h as *mut u64, v),
                _ => {
                    let b = v.to_le_bytes();
                    std::ptr::copy_nonoverlapping(b.as_ptr(), h as *mut u8, size.min(8));
                }
            }
        }
        true
    }
}

/// Load of 1, 2, 4 or 8 bytes at host address `h` with the rules of
/// [`Ram::read_u`] (aligned loads are single accesses).
///
/// # Safety
/// `[h, h + size)` must lie inside a live guest RAM mapping.
#[inline(always)]
pub unsafe fn host_load(h: usize, size: usize) -> u64 {
    let aligned = h.is_multiple_of(size);
    // SAFETY: the caller guarantees the range is mapped; typed volatile
    // reads are only used when `h` is aligned for them.
    unsafe {
        match (size, aligned) {
            (1, _) => u64::from(std::ptr::read_volatile(h as *const u8)),
            (2, true) => u64::from(std::ptr::read_volatile(h as *const u16)),
            (4, true) => u64::from(std::ptr::read_volatile(h as *const u32)),
            (8, true) => std::ptr::read_volatile(h as *const u64),
            _ => {
                let mut b = [0u8; 8];
                std::ptr::copy_nonoverlapping(h as *const u8, b.as_mut_ptr(), size.min(8));
                u64::from_le_bytes(b)
            }
        }
    }
}

/// Store of the low `size` (1, 2, 4 or 8) bytes of `v` at host address
/// `h`, with the rules of [`Ram::write_u`].
///
/// # Safety
/// `[h, h + size)` must lie inside a live, writable guest RAM mapping.
#[inline(always)]
pub unsafe fn host_store(h: usize, size: usize, v: u64) {
    let aligned = h.is_multiple_of(size);
    // SAFETY: as in `host_load`.
    unsafe {
        match (size, aligned) {
            (1, _) => std::ptr::write_volatile(h as *mut u8, v as u8),
            (2, true) => std::ptr::write_volatile(h as *mut u16, v as u16),
            (4, true) => std::ptr::write_volatile(h as *mut u32, v as u32),
            (8, true) => std::ptr::write_volatile(h as *mut u64, v),
            _ => {
                let b = v.to_le_bytes();
                std::ptr::copy_nonoverlapping(b.as_ptr(), h as *mut u8, size.min(8));
            }
        }
    }
}

/// Serializes the accesses that cannot be single host atomics: locked
/// operations on a misaligned operand ("split locks") and CMPXCHG16B.
/// Atomic only against each other, not against plain aligned accesses of
/// other vCPUs to the same bytes (hardware takes a bus lock instead).
static SPLIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Ram {
    /// Atomic compare-and-exchange of `size` (1, 2, 4 or 8) bytes at
    /// `gpa`: stores `new` if the memory holds `old`. Returns the value
    /// found (`Ok` when it matched and `new` was stored), or `None` if the
    /// range is not RAM.
    pub fn cmpxchg_u(&self, gpa: u64, size: usize, old: u64, new: u64) -> Option<Result<u64, u64>> {
        use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
        let h = self.host(gpa, size)?;
        if h % size != 0 || !matches!(size, 1 | 2 | 4 | 8) {
            let _g = SPLIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            let cur = self.read_u(gpa, size)?;
            if cur == old {
                self.write_u(gpa, size, new);
                return Some(Ok(cur));
            }
            return Some(Err(cur));
        }
        // SAFETY: `host` checked that `[h, h + size)` lies in a live,
        // writable mapping and `h` is aligned for the atomic type; the
        // atomics only ever alias guest RAM, which no Rust reference covers.
        let r = unsafe {
            match size {
                1 => (*(h as *const AtomicU8))
                    .compare_exchange(old as u8, new as u8, SeqCst, SeqCst)
                    .map(u64::from)
                    .map_err(u64::from),
                2 => (*(h as *const AtomicU16))
                    .compare_exchange(old as u16, new as u16, SeqCst, SeqCst)
                    .map(u64::from)
                    .map_err(u64::from),
                4 => (*(h as *const AtomicU32))
                    .compare_exchange(old as u32, new as u32, SeqCst, SeqCst)
                    .map(u64::from)
                    .map_err(u64::from),
                _ => (*(h as *const AtomicU64)).compare_exchange(old, new, SeqCst, SeqCst),
            }
        };
        Some(r)
    }

    /// 16-byte compare-and-exchange (CMPXCHG16B) at a 16-byte aligned
    /// `gpa`, under [`SPLIT_LOCK`]: atomic against other CMPXCHG16Bs and
    /// split locks. `None` if not RAM.
    pub fn cmpxchg_u128(&self, gpa: u64, old: u128, new: u128) -> Option<Result<u128, u128>> {
        self.host(gpa, 16)?;
        let _g = SPLIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let lo = self.read_u(gpa, 8)?;
        let hi = self.read_u(gpa + 8, 8)?;
        let cur = u128::from(lo) | (u128::from(hi) << 64);
        if cur == old {
            self.write_u(gpa, 8, new as u64);
            self.write_u(gpa + 8, 8, (new >> 64) as u64);
            Some(Ok(cur))
        } else {
            Some(Err(cur))
        }
    }
}

/// Kind of memory access, for the MMU's permission checks (paging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read = 0,
    Write = 1,
    Execute = 2,
}

/// Number of entries of the software TLB (direct-mapped by linear page).
/// With 1024, pages a fork and exec of a small program touches often
/// took one slot (the kernel's stacks, page tables and `struct page`s lie
/// at addresses that change run to run): 1,300 to 3,800 misses per fork
/// and exec of `/bin/true` in the default guest, varying with the run,
/// and 6.8 to 8.3 s for 1000 of them. With 4096: 340 misses, 5.4 to 5.5 s
/// (two runs each, misses refilled from blocks' code in both). Flushes visit only the entries filled since (see
/// [`Mmu::filled`]), so their cost does not grow with the size.
pub const TLB_ENTRIES: usize = 4096;

/// Permission bits of a TLB entry: one bit per (access kind, privilege).
/// A bit is only set when that access needs no page-table update: the
/// write bits require the dirty bit to be set already, so the first write
/// to a clean page walks again and sets it.
pub mod perm {
    pub const SUP_R: u8 = 1 << 0;
    pub const SUP_W: u8 = 1 << 1;
    pub const SUP_X: u8 = 1 << 2;
    pub const USER_R: u8 = 1 << 3;
    pub const USER_W: u8 = 1 << 4;
    pub const USER_X: u8 = 1 << 5;
    /// Translation of a global page (survives CR3 writes with CR4.PGE).
    pub const GLOBAL: u8 = 1 << 6;
    /// The write bits, which a page holding decoded code loses in an
    /// entry's `native` bits.
    pub const WRITES: u8 = SUP_W | USER_W;

    /// The bit an access needs: `[user][access]`.
    pub const NEED: [[u8; 3]; 2] = [[SUP_R, SUP_W, SUP_X], [USER_R, USER_W, USER_X]];
}

/// One TLB entry: a 4 KiB linear page (a large page is entered 4 KiB at a
/// time) and its physical page. Native runs read it from generated code
/// (`exec::native`), hence the C layout; 64 bytes, one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct TlbEntry {
    /// Linear address of the page (low 12 bits zero), or [`TLB_INVALID`].
    pub base: u64,
    /// Physical address of the page (low 12 bits zero).
    pub pa: u64,
    pub perms: u8,
    /// log2 of the size of the page it came from (12, 21, 22 or 30), for
    /// INVLPG of an address elsewhere in a large page.
    pub shift: u8,
    /// `perms`' access bits where the page is RAM, else none, less the
    /// write bits where the page holds decoded code: what native code's
    /// lookup tests (MMIO fails it as a page it may not access, and a write
    /// to code as one it may not write, so both leave for the interpreter).
    pub native: u8,
    /// Host address of the physical page when it is RAM, else 0 (MMIO):
    /// the access fast path (`Core::read_as`/`write_as`) uses it directly.
    /// Valid as long as the entry: `Ram` keeps the `GuestRam` (and
    /// so every mapping) alive for the life of the `Core` owning the TLB,
    /// and guest RAM is never remapped.
    pub host: usize,
    /// What native code's lookup compares an access's page with, by
    /// `[user][write]`: `base` where `native` allows that access, else
    /// [`TLB_INVALID`]. One compare then checks the page, the permission
    /// and RAM.
    pub tags: [[u64; 2]; 2],
}

/// [`TlbEntry::tags`] of an entry of page `base` with `native` bits.
fn tags(base: u64, native: u8) -> [[u64; 2]; 2] {
    let tag = |need: u8| {
        if native & need != 0 {
            base
        } else {
            TLB_INVALID
        }
    };
    [
        [tag(perm::SUP_R), tag(perm::SUP_W)],
        [tag(perm::USER_R), tag(perm::USER_W)],
    ]
}

/// No page's base: not canonical (bit 63 set, bits 62 to 47 clear), and
/// far from every canonical address: any address XORed with it has bits
/// above the page offset set, which is how native code's lookup compares.
pub const TLB_INVALID: u64 = 1 << 63;

/// No span of large pages (see [`Mmu::large`]).
const NO_SPAN: (u64, u64) = (u64::MAX, 0);

const EMPTY: TlbEntry = TlbEntry {
    base: TLB_INVALID,
    pa: 0,
    perms: 0,
    shift: 12,
    native: 0,
    host: 0,
    tags: [[TLB_INVALID; 2]; 2],
};

/// Which paging structure format is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    #[default]
    Off,
    /// 32-bit paging (CR4.PAE = 0), 4 KiB and (with CR4.PSE) 4 MiB pages.
    Legacy,
    /// PAE paging: 3 levels of 8-byte entries, 4 KiB and 2 MiB pages.
    Pae,
    /// 4-level paging (EFER.LMA): 4 KiB, 2 MiB and 1 GiB pages.
    Long,
}

/// Linear-to-physical translation state: the paging mode derived from
/// CR0/CR4/EFER and a direct-mapped software TLB.
///
/// The hit path (see `Core::translate`) is an index, a tag compare and a
/// bit test. Misses walk the guest's tables (`exec::paging`) and refill.
#[derive(Debug, Clone)]
pub struct Mmu {
    pub mode: PagingMode,
    pub entries: Box<[TlbEntry; TLB_ENTRIES]>,
    /// A bit per entry that may be valid (set when filled): flushes and
    /// INVLPG visit only those. `[0]` those of non-global pages, a few
    /// hundred between two CR3 writes, the only ones a CR3 write that keeps
    /// global pages visits; `[1]` those of global pages.
    filled: Box<[[u64; TLB_ENTRIES / 64]; 2]>,
    /// For each half of `filled`: the first and last linear address the
    /// large pages (over 4 KiB) of its entries span, `(u64::MAX, 0)` for
    /// none. An INVLPG outside both spans can only drop the one 4 KiB
    /// entry at its address's index (Linux's INVLPGs are of user pages;
    /// the kernel's direct map is in large global pages).
    large: [(u64, u64); 2],
    /// How many flushes (of any kind) so far: links between decoded
    /// blocks hold translations and die when it moves on.
    pub flushes: u64,
    /// How many of them could drop a global translation (all but the CR3
    /// writes that keep global pages): links to code in global pages die
    /// only when this moves on.
    pub global_flushes: u64,
    /// The linear pages links between blocks may lead into, as a filter
    /// (see [`Mmu::note_link_target`]): an INVLPG elsewhere leaves every
    /// link standing, and neither count above moves.
    link_targets: Box<LinkTargets>,
}

/// Bits for the linear pages, by the size of the page that translated
/// them, that links lead into; a bit may stand for several pages (false
/// positives only cost links). Words 0-1023: 4 KiB pages by the low 16
/// bits of their number; 1024-1087: 2 MiB pages by the low 12 bits; 1088:
/// 1 GiB pages (and targets whose translation was not in the TLB) by the
/// low 6 bits.
#[derive(Debug, Clone)]
struct LinkTargets {
    words: [u64; 1089],
    /// Bits set since the last clearing.
    marked: u32,
}

/// Bits set before [`LinkTargets`] is cleared (and every link cut): an
/// eighth of the small pages' bits, so that false positives stay rare.
const LINK_TARGETS_LIMIT: u32 = 8192;

impl LinkTargets {
    const EMPTY: LinkTargets = LinkTargets {
        words: [0; 1089],
        marked: 0,
    };

    /// The word and bit of `lin` at page size `shift`.
    fn place(lin: u64, shift: u8) -> (usize, u64) {
        let n = match shift {
            12 => (lin >> 12) & 0xffff,
            21 => (1024 << 6) + ((lin >> 21) & 0xfff),
            _ => (1088 << 6) + ((lin >> 30) & 63),
        };
        ((n >> 6) as usize, 1 << (n & 63))
    }

    fn test(&self, lin: u64, shift: u8) -> bool {
        let (word, bit) = Self::place(lin, shift);
        self.words[word] & bit != 0
    }

    /// Sets the bit; whether it was clear.
    fn mark(&mut self, lin: u64, shift: u8) -> bool {
        let (word, bit) = Self::place(lin, shift);
        let clear = self.words[word] & bit == 0;
        self.words[word] |= bit;
        clear
    }
}

impl Default for Mmu {
    fn default() -> Self {
        Mmu {
            mode: PagingMode::Off,
            entries: Box::new([EMPTY; TLB_ENTRIES]),
            filled: Box::new([[0; TLB_ENTRIES / 64]; 2]),
            large: [NO_SPAN; 2],
            flushes: 0,
            global_flushes: 0,
            link_targets: Box::new(LinkTargets::EMPTY),
        }
    }
}

impl Mmu {
    /// The entry for linear address `lin`, if it allows `need`.
    #[inline(always)]
    pub fn lookup(&self, lin: u64, need: u8) -> Option<u64> {
        let vpn = lin >> PAGE_SHIFT;
        let e = &self.entries[(vpn as usize) % TLB_ENTRIES];
        if e.base == lin & !PAGE_MASK && e.perms & need != 0 {
            Some(e.pa | (lin & PAGE_MASK))
        } else {
            None
        }
    }

    /// Enters a translation; `host` is [`Ram::page_host`] of `pa`, and
    /// `code` whether [`CodePages`] has `pa`'s page as code.
    pub fn fill(&mut self, lin: u64, pa: u64, perms: u8, shift: u8, host: usize, code: bool) {
        let vpn = lin >> PAGE_SHIFT;
        let access =
            perm::SUP_R | perm::SUP_W | perm::SUP_X | perm::USER_R | perm::USER_W | perm::USER_X;
        let index = (vpn as usize) % TLB_ENTRIES;
        let global = usize::from(perms & perm::GLOBAL != 0);
        self.filled[global][index / 64] |= 1 << (index % 64);
        self.filled[1 - global][index / 64] &= !(1 << (index % 64));
        if shift > 12 {
            let first = lin & !((1u64 << shift.min(63)) - 1);
            let last = first | ((1u64 << shift.min(63)) - 1);
            let span = &mut self.large[global];
            *span = (span.0.min(first), span.1.max(last));
        }
        let native = match (host, code) {
            (0, _) => 0,
            (_, false) => perms & access,
            (_, true) => perms & access & !perm::WRITES,
        };
        self.entries[index] = TlbEntry {
            base: lin & !PAGE_MASK,
            pa: pa & !PAGE_MASK,
            perms,
            shift,
            native,
            host,
            tags: tags(lin & !PAGE_MASK, native),
        };
    }

    /// Whether native code's lookup of `lin` for an access needing `need`
    /// hits: the entry's tag and its `native` bits.
    pub fn native_hit(&self, lin: u64, need: u8) -> bool {
        let e = &self.entries[((lin >> PAGE_SHIFT) as usize) % TLB_ENTRIES];
        e.base == lin & !PAGE_MASK && e.native & need != 0
    }

    /// Takes native code's write bits from every entry of physical page
    /// `page` (a page number): it now holds decoded code.
    pub fn protect_code(&mut self, page: u64) {
        self.protect_code_where(|p| p == page, |_| {});
    }

    /// Takes native code's write bits from every entry whose physical page
    /// `is_code` says holds decoded code, calling `written` with each such
    /// page that had them (native code may have written it since).
    pub fn protect_code_where(
        &mut self,
        is_code: impl Fn(u64) -> bool,
        mut written: impl FnMut(u64),
    ) {
        for kind in 0..2 {
            self.each_filled(kind, |e| {
                if e.native & perm::WRITES != 0 && is_code(e.pa >> PAGE_SHIFT) {
                    e.native &= !perm::WRITES;
                    e.tags = tags(e.base, e.native);
                    written(e.pa >> PAGE_SHIFT);
                }
                true
            });
        }
    }

    /// Host address of `lin` for an access needing `need`, if the TLB
    /// holds it and it is RAM: the memory fast path.
    #[inline(always)]
    pub fn lookup_host(&self, lin: u64, need: u8) -> Option<usize> {
        let vpn = lin >> PAGE_SHIFT;
        let e = &self.entries[(vpn as usize) % TLB_ENTRIES];
        if e.base == lin & !PAGE_MASK && e.perms & need != 0 && e.host != 0 {
            Some(e.host + (lin & PAGE_MASK) as usize)
        } else {
            None
        }
    }

    /// Physical page of the entry [`Mmu::lookup_host`] just hit.
    #[inline(always)]
    pub fn page_of(&self, lin: u64) -> u64 {
        let vpn = lin >> PAGE_SHIFT;
        self.entries[(vpn as usize) % TLB_ENTRIES].pa >> PAGE_SHIFT
    }

    /// Whether the TLB holds a global translation of `lin`'s page to
    /// physical page `page` (a page number).
    #[inline(always)]
    pub fn translates_global(&self, lin: u64, page: u64) -> bool {
        let e = &self.entries[((lin >> PAGE_SHIFT) as usize) % TLB_ENTRIES];
        e.base == lin & !PAGE_MASK && e.perms & perm::GLOBAL != 0 && e.pa >> PAGE_SHIFT == page
    }

    /// Drops everything (CR0/CR4 paging-bit changes, mode changes).
    pub fn flush_all(&mut self) {
        self.flushes += 1;
        self.global_flushes += 1;
        *self.link_targets = LinkTargets::EMPTY;
        self.drop_filled(0, |_| true);
        self.drop_filled(1, |_| true);
        self.large = [NO_SPAN; 2];
    }

    /// Empties the filled entries of `filled[kind]` that `drops` says to,
    /// and forgets them.
    fn drop_filled(&mut self, kind: usize, drops: impl Fn(&TlbEntry) -> bool) {
        self.each_filled(kind, |e| {
            let dropped = drops(e);
            if dropped {
                *e = EMPTY;
            }
            !dropped
        });
    }

    /// Calls `f` with each filled entry of `filled[kind]`, forgetting
    /// those it returns false for.
    fn each_filled(&mut self, kind: usize, mut f: impl FnMut(&mut TlbEntry) -> bool) {
        for (word, bits) in self.filled[kind].iter_mut().enumerate() {
            let mut left = *bits;
            while left != 0 {
                let bit = left.trailing_zeros() as usize;
                left &= left - 1;
                if !f(&mut self.entries[word * 64 + bit]) {
                    *bits &= !(1 << bit);
                }
            }
        }
    }

    /// Drops all but global entries (a CR3 write), or everything when
    /// global pages are disabled.
    pub fn flush_non_global(&mut self, keep_global: bool) {
        self.flushes += 1;
        if !keep_global {
            self.global_flushes += 1;
        }
        self.drop_filled(0, |_| true);
        self.large[0] = NO_SPAN;
        if !keep_global {
            self.drop_filled(1, |_| true);
            self.large[1] = NO_SPAN;
        }
    }

    /// Notes that a link (a block's link, a jump cache entry, a jump in
    /// blocks' code) now leads to code at linear `lin`, translated by the
    /// TLB's entry for it (its page size; a 1 GiB page where it has none).
    /// An INVLPG of that page then cuts every link; one of a page no link
    /// leads into cuts none.
    pub fn note_link_target(&mut self, lin: u64) {
        let e = &self.entries[((lin >> PAGE_SHIFT) as usize) % TLB_ENTRIES];
        let shift = if e.base == lin & !PAGE_MASK {
            e.shift
        } else {
            30
        };
        if self.link_targets.mark(lin, shift) {
            self.link_targets.marked += 1;
            if self.link_targets.marked > LINK_TARGETS_LIMIT {
                // Too many pages for the filter to tell apart: start
                // again, cutting the links it stood for.
                *self.link_targets = LinkTargets::EMPTY;
                self.flushes += 1;
                self.global_flushes += 1;
            }
        }
    }

    /// Whether a link may lead into the page (of any size) holding `lin`.
    fn may_lead_into(&self, lin: u64) -> bool {
        [12, 21, 30]
            .into_iter()
            .any(|shift| self.link_targets.test(lin, shift))
    }

    /// INVLPG: drops every entry translating part of the page (of
    /// whatever size) that contains `lin`, global or not. Links die only
    /// where one may lead into that page.
    pub fn invalidate(&mut self, lin: u64) {
        if self.may_lead_into(lin) {
            self.flushes += 1;
            self.global_flushes += 1;
        }
        let covers = |e: &TlbEntry| {
            let shift = u32::from(e.shift).min(63);
            e.base != TLB_INVALID && (e.base ^ lin) >> shift == 0
        };
        if self
            .large
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&lin))
        {
            self.drop_filled(0, covers);
            self.drop_filled(1, covers);
            return;
        }
        // No large page filled covers `lin`: only the 4 KiB entry at its
        // page's index can translate it.
        let index = ((lin >> PAGE_SHIFT) as usize) % TLB_ENTRIES;
        if covers(&self.entries[index]) {
            self.entries[index] = EMPTY;
            for kind in self.filled.iter_mut() {
                kind[index / 64] &= !(1 << (index % 64));
            }
        }
    }
}

/// Which 4 KiB pages of RAM hold decoded code, and a generation per page,
/// shared by every vCPU of a VM (cloning shares the map).
///
/// The block cache sets a page's bit when it decodes from it and records
/// the page's generation in the block; every write an emulator makes
/// checks the bit and, if set, clears it and bumps the generation, so a
/// block of any vCPU decoded from the page before the write no longer
/// matches and is decoded again at its next lookup (one relaxed load per
/// page of the block). Writes by devices must call
/// [`crate::Emulator::invalidate_code`].
///
/// Ordering: bits are only cleared by a writer that then bumps the
/// generation, and the decoder sets the bit and reads the generation both
/// before and after reading the bytes (see [`CodePages::begin_decode`]), so
/// a block never outlives a later write unnoticed. The one window left is
/// a write racing with the first decode of a page on another vCPU (the
/// writer's plain bit load may pass its own store); the SDM likewise
/// requires cross-modifying code to synchronise with the executing
/// processor, which Linux does with IPIs.
#[derive(Debug, Clone, Default)]
pub struct CodePages {
    inner: Arc<CodeInner>,
}

#[derive(Debug, Default)]
struct CodeInner {
    bits: Box<[AtomicU64]>,
    gens: Box<[AtomicU32]>,
    /// Bumps of any page's generation, VM-wide: links between blocks
    /// (see [`crate::block::Link`]) are cut when it moves on, so following
    /// one needs no per-page check.
    writes: AtomicU64,
    /// Pages marked (a bit going from clear to set), VM-wide: a vCPU whose
    /// count of them falls behind takes native code's write bits from its
    /// TLB entries of the pages other vCPUs marked (see
    /// `Core::sync_code_marks`).
    marks: AtomicU64,
}

/// What [`CodePages::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// The page is outside the map (not RAM, never code).
    Outside,
    /// Its bit was set already.
    Already,
    /// This call set it; the VM-wide count of marks before it.
    New(u64),
}

impl CodePages {
    /// Forgets the code in every page that `[gpa, gpa + len)` touches
    /// (bumping their generations, so every vCPU decodes them again): for
    /// writes that do not go through a vCPU, such as a device's DMA.
    pub fn invalidate_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        // Order the device's copy before the code-bit tests (as a vCPU's
        // own write is ordered before its check).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let first = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        for page in first..=last {
            if self.test(page) {
                self.clear(page);
            }
        }
    }

    pub fn new(ram_end: u64) -> Self {
        let pages = ram_end.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64) as usize;
        CodePages {
            inner: Arc::new(CodeInner {
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
                gens: (0..words * 64).map(|_| AtomicU32::new(0)).collect(),
                writes: AtomicU64::new(0),
                marks: AtomicU64::new(0),
            }),
        }
    }

    #[inline]
    pub fn test(&self, page: u64) -> bool {
        let w = (page / 64) as usize;
        match self.inner.bits.get(w) {
            Some(word) => word.load(Ordering::Relaxed) & (1 << (page % 64)) != 0,
            None => false,
        }
    }

    /// Marks a page.
    pub fn set(&self, page: u64) -> Marked {
        let w = (page / 64) as usize;
        let Some(word) = self.inner.bits.get(w) else {
            return Marked::Outside;
        };
        let bit = 1 << (page % 64);
        if word.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return Marked::Already;
        }
        Marked::New(self.inner.marks.fetch_add(1, Ordering::SeqCst))
    }

    /// How many times a page was marked (VM-wide), so far.
    #[inline(always)]
    pub fn marks(&self) -> u64 {
        self.inner.marks.load(Ordering::SeqCst)
    }

    /// Clears a page's bit; true if it was set (its generation was then
    /// bumped, invalidating every vCPU's blocks from it).
    pub fn clear(&self, page: u64) -> bool {
        let Some(word) = self.inner.bits.get((page / 64) as usize) else {
            return false;
        };
        let bit = 1 << (page % 64);
        if word.fetch_and(!bit, Ordering::SeqCst) & bit == 0 {
            return false;
        }
        if let Some(g) = self.inner.gens.get(page as usize) {
            g.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.writes.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// How many times a code page was written (VM-wide), so far.
    #[inline(always)]
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// The page's generation (0 outside the map).
    #[inline]
    pub fn generation(&self, page: u64) -> u32 {
        match self.inner.gens.get(page as usize) {
            Some(g) => g.load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// Before reading a page's bytes to decode: marks it as code and
    /// returns its generation and what marking did.
    pub fn begin_decode(&self, page: u64) -> (u32, Marked) {
        let marked = self.set(page);
        let generation = self
            .inner
            .gens
            .get(page as usize)
            .map_or(0, |g| g.load(Ordering::SeqCst));
        (generation, marked)
    }

    /// After reading the bytes: the generation to record in the block
    /// (`begun`, from [`Self::begin_decode`]). A write that cleared the
    /// bit meanwhile may have bumped the generation before `begin_decode`
    /// read it, leaving a block whose page is unmarked: the bit is set
    /// again so later writes are seen. A bump after `begin_decode` makes
    /// `begun` stale, and the block is decoded again at its next lookup.
    pub fn end_decode(&self, page: u64, begun: u32) -> (u32, Marked) {
        (begun, self.set(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Flushes and INVLPG visit only the entries filled since (see
    /// `Mmu::filled`): every entry they must drop is dropped, from either
    /// half, and none they must keep.
    #[test]
    fn tlb_flushes_drop_exactly_what_they_must() {
        const R: u8 = perm::SUP_R;
        const G: u8 = perm::SUP_R | perm::GLOBAL;
        let held = |m: &Mmu, lin: u64| m.lookup(lin, perm::SUP_R).is_some();
        let mut m = Mmu::default();
        // A user page, a global 4 KiB page, and four 4 KiB pieces of a
        // global 2 MiB page (the kernel's direct map), one at the index
        // the user page's neighbour would take.
        let user = 0x40_1000;
        let global = 0xffff_ffff_8100_0000;
        let large = 0xffff_8880_0020_0000;
        m.fill(user, 0x5000, R, 12, 0, false);
        m.fill(global, 0x6000, G, 12, 0, false);
        for piece in [0, 1, 0x1ff, 0x102] {
            m.fill(
                large + (piece << 12),
                0x20_0000 + (piece << 12),
                G,
                21,
                0,
                false,
            );
        }
        // A CR3 write keeping global pages drops the user page only.
        m.flush_non_global(true);
        assert!(!held(&m, user));
        assert!(held(&m, global) && held(&m, large + 0x1ff000));
        // An index refilled with a non-global page moves to that half:
        // the next CR3 write drops it.
        m.fill(
            global + (TLB_ENTRIES as u64) * 4096,
            0x7000,
            R,
            12,
            0,
            false,
        );
        m.flush_non_global(true);
        assert!(!held(&m, global + (TLB_ENTRIES as u64) * 4096));
        assert!(!held(&m, global), "the global entry was replaced");
        // INVLPG of a user page outside every large page: only its entry.
        m.fill(user, 0x5000, R, 12, 0, false);
        m.fill(user + 0x1000, 0x8000, R, 12, 0, false);
        m.invalidate(user);
        assert!(!held(&m, user) && held(&m, user + 0x1000));
        assert!(held(&m, large));
        // INVLPG anywhere in the large page drops all its pieces.
        m.invalidate(large + 0x12_3456);
        for piece in [0, 1, 0x1ff, 0x102] {
            assert!(!held(&m, large + (piece << 12)), "piece {piece:#x}");
        }
        assert!(held(&m, user + 0x1000));
        // A CR3 write dropping global pages, and a full flush.
        m.fill(global, 0x6000, G, 12, 0, false);
        m.flush_non_global(false);
        assert!(!held(&m, global) && !held(&m, user + 0x1000));
        m.fill(global, 0x6000, G, 12, 0, false);
        m.fill(user, 0x5000, R, 12, 0, false);
        m.flush_all();
        assert!(!held(&m, global) && !held(&m, user));
        assert!(m.filled.iter().flatten().all(|w| *w == 0));
    }

    #[test]
    fn ram_bounds() {
        let mem =
            GuestRam::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x10000), 0x1000)])
                .unwrap();
        let ram = Ram::new(&mem);
        assert_eq!(ram.end(), 0x11000);
        assert!(ram.write_u(0x1ffe, 2, 0xbeef));
        assert_eq!(ram.read_u(0x1ffe, 2), Some(0xbeef));
        assert_eq!(ram.read_u(0x1fff, 2), None, "crosses out of the region");
        assert_eq!(ram.read_u(u64::MAX, 8), None);
        assert!(!ram.write_u(0x2000, 1, 0));
        assert!(ram.write_u(0x10ff9, 4, 0x1234_5678), "unaligned");
        assert_eq!(ram.read_u(0x10ff9, 4), Some(0x1234_5678));
        let mut buf = [0u8; 16];
        assert!(!ram.read(0x10ff8, &mut buf));
        assert!(ram.read(0x10ff0, &mut buf));
        let pages = CodePages::new(ram.end());
        let other = pages.clone();
        let (g, marked) = pages.begin_decode(0x10);
        assert_eq!(marked, Marked::New(0));
        assert_eq!(pages.end_decode(0x10, g), (g, Marked::Already));
        assert!(other.test(0x10), "the map is shared");
        assert_eq!(pages.set(0x1_0000_0000), Marked::Outside);
        assert!(other.clear(0x10));
        assert!(!pages.test(0x10));
        assert_ne!(pages.generation(0x10), g, "a write bumps the generation");
        assert!(!other.clear(0x10), "only the first write bumps it");
        assert_eq!(pages.writes(), 1, "one write counted VM-wide");
    }

    /// An INVLPG cuts links (moves both flush counts) only where one may
    /// lead into the page it drops, at the size of the page that
    /// translated the link's target; a target with no TLB entry counts
    /// for its whole 1 GiB; the filter starts again, cutting every link,
    /// when it fills, and with a full flush.
    #[test]
    fn invlpg_cuts_links_only_into_their_pages() {
        let mut mmu = Mmu::default();
        let counts = |m: &Mmu| (m.flushes, m.global_flushes);
        // A 4 KiB page and a 2 MiB page holding link targets.
        mmu.fill(0x40_3000, 0x9000, perm::SUP_X, 12, 0, false);
        mmu.fill(
            0x8060_0000,
            0x20_0000,
            perm::SUP_X | perm::GLOBAL,
            21,
            0,
            false,
        );
        mmu.note_link_target(0x40_3010);
        mmu.note_link_target(0x8060_0040);
        mmu.invalidate(0x40_4000);
        mmu.invalidate(0x7fff_f000);
        assert_eq!(counts(&mmu), (0, 0), "no link leads there");
        mmu.invalidate(0x40_3000);
        assert_eq!(counts(&mmu), (1, 1), "the target's 4 KiB page");
        mmu.invalidate(0x807f_f000);
        assert_eq!(counts(&mmu), (2, 2), "inside the target's 2 MiB page");
        // No TLB entry: the whole 1 GiB around it.
        mmu.note_link_target(0x1_2345_6000);
        mmu.invalidate(0x1_3000_0000);
        assert_eq!(counts(&mmu), (3, 3));
        mmu.flush_all();
        assert_eq!(counts(&mmu), (4, 4));
        mmu.invalidate(0x40_3000);
        assert_eq!(counts(&mmu), (4, 4), "a full flush empties the filter");
        for n in 0..=u64::from(LINK_TARGETS_LIMIT) {
            mmu.fill(n << 12, n << 12, perm::SUP_X, 12, 0, false);
            mmu.note_link_target(n << 12);
        }
        assert_eq!(counts(&mmu), (5, 5), "filling the filter cuts every link");
        mmu.invalidate(0);
        assert_eq!(counts(&mmu), (5, 5), "and empties it");
    }
}
