//! Linear-to-physical translation: the TLB fast path and the page walk.
//!
//! Implements the three paging formats of the Intel SDM Vol. 3A ch. 4
//! (32-bit, PAE, 4-level) without PCIDs, SMEP/SMAP or protection keys
//! (none of which the CPUID model advertises).
//!
//! Design:
//! - [`Core::translate`] first looks in the direct-mapped TLB of
//!   [`crate::mem::Mmu`]: one index, one tag compare and one permission-bit
//!   test. Entries only grant an access that needs no page-table update
//!   (writes need the dirty bit already set), so a hit never writes memory.
//! - A miss walks the tables, checks U/S, R/W (with CR0.WP), NX (with
//!   EFER.NXE) and reserved bits, raises #PF (with CR2 and the error code)
//!   or sets the accessed and dirty bits with compare-exchange on the
//!   entries in guest RAM (restarting the walk if another agent changed
//!   an entry meanwhile), and refills the TLB.
//! - Paging-structure reads from addresses that are not RAM read as 0 (a
//!   not-present entry), as reads of an unclaimed bus on a PC chipset
//!   would not be cached by a real MMU either: the guest gets #PF rather
//!   than an MMIO exit from inside a walk.

use super::{Core, Exception, Stop};
use crate::mem::{perm, Access, PagingMode, PAGE_MASK};
use crate::state::bits;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const NX: u64 = 1 << 63;

/// Physical-address width the CPUID model reports (leaf 0x8000_0008).
pub const MAXPHYADDR: u32 = 40;
/// Address bits of a PAE/4-level entry above MAXPHYADDR: reserved.
const RSVD_PHYS: u64 = ((1u64 << 52) - 1) & !((1u64 << MAXPHYADDR) - 1);
const ADDR_4K: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;

/// #PF error-code bits.
pub mod pf {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

pub const CR0_WP: u64 = 1 << 16;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PGE: u64 = 1 << 7;
pub const EFER_NXE: u64 = 1 << 11;

/// One level's entry as the walk saw it, for the A/D update.
#[derive(Clone, Copy, Default)]
struct Seen {
    addr: u64,
    value: u64,
    size: u8,
    /// Whether the entry has an accessed bit (PAE PDPTEs do not).
    has_a: bool,
}

enum Walk {
    Done(u64),
    Fault(Exception),
    /// An entry changed under us while setting A/D: walk again.
    Retry,
}

impl Core {
    /// Whether the current privilege makes accesses user-mode accesses.
    #[inline(always)]
    pub(crate) fn user(&self) -> bool {
        self.cpu.cpl() == 3
    }

    /// Translates `lin` for an access at the current privilege level.
    #[inline(always)]
    pub fn translate(&mut self, lin: u64, access: Access) -> Result<u64, Stop> {
        let user = self.user();
        self.translate_as(lin, access, user)
    }

    /// Translates `lin` for an access as user (`user`) or supervisor
    /// (implicit system accesses: descriptor tables, the TSS, delivery
    /// stacks). A fault sets CR2 and comes back as [`Stop::Fault`].
    #[inline(always)]
    pub fn translate_as(&mut self, lin: u64, access: Access, user: bool) -> Result<u64, Stop> {
        if self.mmu.mode == PagingMode::Off {
            return Ok(lin);
        }
        if let Some(pa) = self
            .mmu
            .lookup(lin, perm::NEED[usize::from(user)][access as usize])
        {
            return Ok(pa);
        }
        self.walk(lin, access, user, true).map_err(Stop::Fault)
    }

    /// Enters the translation of the `size`-byte read or write at `lin`
    /// for a block's native code whose TLB lookup missed (see
    /// `native::refill`), walking as a write only with `walk_write` (the
    /// dirty bit it sets): whether native code's lookup now hits (a RAM
    /// page allowing the access and, for a write, holding no decoded code,
    /// see `TlbEntry::native`), all of it in that page, with no code page
    /// written on the way (a walk's accessed or dirty bit landing in one),
    /// after taking in other vCPUs' code marks. A fault is
    /// left for the interpreter to raise: CR2 is not touched.
    pub(crate) fn refill_for_native(
        &mut self,
        lin: u64,
        size: u64,
        write: bool,
        walk_write: bool,
        user: bool,
    ) -> bool {
        if size == 0 || (lin & PAGE_MASK) + size > PAGE_MASK + 1 || self.mmu.mode == PagingMode::Off
        {
            return false;
        }
        let walked = if walk_write {
            Access::Write
        } else {
            Access::Read
        };
        // The fill below goes by the code bits as they are.
        self.sync_code_marks();
        if self.walk(lin, walked, user, false).is_err() || self.attention {
            return false;
        }
        let access = if write { Access::Write } else { Access::Read };
        let need = perm::NEED[usize::from(user)][access as usize];
        let entered = self.mmu.native_hit(lin, need);
        self.native_refills += u64::from(entered);
        entered
    }

    /// Translates without side effects on CR2 (A/D bits may still be
    /// set): for probing the page after a block's first page.
    pub(crate) fn probe(&mut self, lin: u64, access: Access) -> Result<u64, Exception> {
        if self.mmu.mode == PagingMode::Off {
            return Ok(lin);
        }
        let user = self.user();
        if let Some(pa) = self
            .mmu
            .lookup(lin, perm::NEED[usize::from(user)][access as usize])
        {
            return Ok(pa);
        }
        self.walk(lin, access, user, false)
    }

    /// Re-derives the paging mode from CR0/CR4/EFER and flushes the TLB.
    pub(crate) fn sync_paging(&mut self) {
        let c = &self.cpu;
        self.mmu.mode = if c.cr0 & bits::CR0_PG == 0 || c.cr0 & bits::CR0_PE == 0 {
            PagingMode::Off
        } else if c.efer & bits::EFER_LMA != 0 {
            PagingMode::Long
        } else if c.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Legacy
        };
        self.mmu.flush_all();
    }

    /// The page walk on a TLB miss. With `set_cr2`, a #PF also loads CR2
    /// (the probe of the next code page while decoding passes false).
    pub(crate) fn walk(
        &mut self,
        lin: u64,
        access: Access,
        user: bool,
        set_cr2: bool,
    ) -> Result<u64, Exception> {
        for _ in 0..16 {
            match self.walk_once(lin, access, user) {
                Walk::Done(pa) => return Ok(pa),
                Walk::Fault(e) => {
                    if e.vector == Exception::PF && set_cr2 {
                        self.cpu.cr2 = lin;
                    }
                    return Err(e);
                }
                Walk::Retry => continue,
            }
        }
        // Another agent keeps rewriting the tables: translate once more
        // without insisting on the A/D update.
        Err(Exception::with_code(Exception::GP, 0))
    }

    fn read_entry(&self, addr: u64, size: usize) -> u64 {
        self.ram.read_u(addr, size).unwrap_or(0)
    }

    fn walk_once(&mut self, lin: u64, access: Access, user: bool) -> Walk {
        let mode = self.mmu.mode;
        let nxe = self.cpu.efer & EFER_NXE != 0 && mode != PagingMode::Legacy;
        let write = access == Access::Write;
        let fetch = access == Access::Execute;
        let mut code = 0u32;
        if write {
            code |= pf::WRITE;
        }
        if user {
            code |= pf::USER;
        }
        if fetch && nxe {
            code |= pf::FETCH;
        }
        let pf_err = |extra: u32| Walk::Fault(Exception::with_code(Exception::PF, code | extra));
        let rsvd_nx = if nxe { 0 } else { NX };

        let mut seen = [Seen::default(); 4];
        let mut n = 0usize;
        let mut rw_all = true;
        let mut us_all = true;
        let mut nx_any = false;
        let (pa, shift, leaf) = match mode {
            PagingMode::Off => return Walk::Done(lin),
            PagingMode::Long => {
                // Bits 63:47 must all equal bit 47.
                if ((lin as i64) << 16 >> 16) as u64 != lin {
                    return Walk::Fault(Exception::with_code(Exception::GP, 0));
                }
                let mut table = self.cpu.cr3 & ADDR_4K;
                let mut level = 4u32;
                loop {
                    let idx = (lin >> (12 + 9 * (level - 1))) & 0x1ff;
                    let addr = table + idx * 8;
                    let e = self.read_entry(addr, 8);
                    if e & P == 0 {
                        return pf_err(0);
                    }
                    let ps = e & PS != 0 && level <= 3;
                    let mut rsvd = RSVD_PHYS | rsvd_nx;
                    if level == 4 {
                        rsvd |= PS;
                    }
                    if ps {
                        // Large-page frames: bits 12..shift-1 except PAT.
                        let s = 12 + 9 * (level - 1);
                        rsvd |= ((1u64 << s) - 1) & !0x1fff;
                    }
                    if e & rsvd != 0 {
                        return pf_err(pf::PRESENT | pf::RSVD);
                    }
                    rw_all &= e & RW != 0;
                    us_all &= e & US != 0;
                    nx_any |= e & NX != 0 && nxe;
                    seen[n] = Seen {
                        addr,
                        value: e,
                        size: 8,
                        has_a: true,
                    };
                    n += 1;
                    if level == 1 || ps {
                        let s = 12 + 9 * (level - 1);
                        let frame = e & ADDR_4K & !((1u64 << s) - 1);
                        break (frame | (lin & ((1u64 << s) - 1)), s, e);
                    }
                    table = e & ADDR_4K;
                    level -= 1;
                }
            }
            PagingMode::Pae => {
                let lin = lin & 0xffff_ffff;
                let pdpt = self.cpu.cr3 & 0xffff_ffe0;
                let addr = pdpt + ((lin >> 30) & 3) * 8;
                let e = self.read_entry(addr, 8);
                if e & P == 0 {
                    return pf_err(0);
                }
                // PDPTEs have no R/W, U/S, A or NX; their reserved bits
                // would be #GP at CR3 load on hardware.
                if e & (RSVD_PHYS | NX | 0x1e6) != 0 {
                    return pf_err(pf::PRESENT | pf::RSVD);
                }
                let mut table = e & ADDR_4K;
                let mut level = 2u32;
                loop {
                    let idx = (lin >> (12 + 9 * (level - 1))) & 0x1ff;
                    let addr = table + idx * 8;
                    let e = self.read_entry(addr, 8);
                    if e & P == 0 {
                        return pf_err(0);
                    }
                    let ps = e & PS != 0 && level == 2;
                    let mut rsvd = RSVD_PHYS | rsvd_nx;
                    if ps {
                        rsvd |= 0x1f_e000;
                    }
                    if e & rsvd != 0 {
                        return pf_err(pf::PRESENT | pf::RSVD);
                    }
                    rw_all &= e & RW != 0;
                    us_all &= e & US != 0;
                    nx_any |= e & NX != 0 && nxe;
                    seen[n] = Seen {
                        addr,
                        value: e,
                        size: 8,
                        has_a: true,
                    };
                    n += 1;
                    if level == 1 || ps {
                        let s = 12 + 9 * (level - 1);
                        let frame = e & ADDR_4K & !((1u64 << s) - 1);
                        break (frame | (lin & ((1u64 << s) - 1)), s, e);
                    }
                    table = e & ADDR_4K;
                    level -= 1;
                }
            }
            PagingMode::Legacy => {
                let lin = lin & 0xffff_ffff;
                let pd = self.cpu.cr3 & 0xffff_f000;
                let addr = pd + (lin >> 22) * 4;
                let e = self.read_entry(addr, 4);
                if e & P == 0 {
                    return pf_err(0);
                }
                rw_all &= e & RW != 0;
                us_all &= e & US != 0;
                seen[n] = Seen {
                    addr,
                    value: e,
                    size: 4,
                    has_a: true,
                };
                n += 1;
                if e & PS != 0 && self.cpu.cr4 & CR4_PSE != 0 {
                    // 4 MiB page; without PSE-36 bits 21:13 are reserved.
                    if e & 0x3f_e000 != 0 {
                        return pf_err(pf::PRESENT | pf::RSVD);
                    }
                    ((e & 0xffc0_0000) | (lin & 0x3f_ffff), 22, e)
                } else {
                    let addr = (e & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
                    let e = self.read_entry(addr, 4);
                    if e & P == 0 {
                        return pf_err(0);
                    }
                    rw_all &= e & RW != 0;
                    us_all &= e & US != 0;
                    seen[n] = Seen {
                        addr,
                        value: e,
                        size: 4,
                        has_a: true,
                    };
                    n += 1;
                    ((e & 0xffff_f000) | (lin & 0xfff), 12, e)
                }
            }
        };

        // Permissions of the whole walk, for this access and for the TLB.
        let wp = self.cpu.cr0 & CR0_WP != 0;
        let sup_w = rw_all || !wp;
        let allowed = match (access, user) {
            (Access::Read, false) => true,
            (Access::Read, true) => us_all,
            (Access::Write, false) => sup_w,
            (Access::Write, true) => us_all && rw_all,
            (Access::Execute, false) => !nx_any,
            (Access::Execute, true) => us_all && !nx_any,
        };
        if !allowed {
            return pf_err(pf::PRESENT);
        }

        // Accessed bits on every level, dirty on the leaf for a write.
        let dirty = leaf & D != 0 || write;
        for (k, s) in seen.iter().take(n).enumerate() {
            if !s.has_a {
                continue;
            }
            let mut want = A;
            if k + 1 == n && write {
                want |= D;
            }
            if s.value & want != want {
                match self
                    .ram
                    .cmpxchg_u(s.addr, usize::from(s.size), s.value, s.value | want)
                {
                    Some(Ok(_)) => self.note_write(s.addr),
                    Some(Err(_)) => return Walk::Retry,
                    // Not RAM: it read as 0 and faulted above.
                    None => {}
                }
            }
        }

        let mut perms = perm::SUP_R;
        if sup_w && dirty {
            perms |= perm::SUP_W;
        }
        if !nx_any {
            perms |= perm::SUP_X;
        }
        if us_all {
            perms |= perm::USER_R;
            if rw_all && dirty {
                perms |= perm::USER_W;
            }
            if !nx_any {
                perms |= perm::USER_X;
            }
        }
        if leaf & G != 0 && self.cpu.cr4 & CR4_PGE != 0 {
            perms |= perm::GLOBAL;
        }
        let host = self.ram.page_host(pa);
        let code = self.code.test(pa >> crate::mem::PAGE_SHIFT);
        self.mmu
            .fill(lin, pa & !PAGE_MASK, perms, shift as u8, host, code);
        Walk::Done(pa)
    }
}
