//! REP MOVS and REP STOS in bulk: each run of elements that stays inside
//! one source and one destination page is one host copy or fill instead
//! of an emulated iteration per element. Linux clears and copies pages and
//! does most `memcpy`/`memset` work this way.

use iced_x86::Register;

use super::{Core, Stop};
use crate::block::Op;
use crate::mem::{perm, Access, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};
use crate::state::rflags::DF;

/// Bytes one execution moves before the instruction restarts (RIP stays
/// on it), so that the block loop takes interrupts between chunks.
const CHUNK_BYTES: u64 = 64 * 1024;

/// Host address of linear `lin` for `access`, or `None` where it is not
/// RAM; translation faults propagate.
fn host_addr(c: &mut Core, lin: u64, access: Access, user: bool) -> Result<Option<usize>, Stop> {
    let need = perm::NEED[usize::from(user)][access as usize];
    if let Some(h) = c.mmu.lookup_host(lin, need) {
        return Ok(Some(h));
    }
    c.translate_as(lin, access, user)?;
    Ok(c.mmu.lookup_host(lin, need))
}

/// REP MOVS (`movs`) or REP STOS of `size`-byte elements, in bulk where
/// that is exact: 64-bit mode and addresses, DF clear, no FS/GS source,
/// RAM on both sides, and no forward overlap (a destination just above
/// its source repeats the source's first elements, which only the
/// element-wise loop reproduces). An element straddling two pages moves
/// on its own, through the interpreter's accesses. `Ok(true)`: the
/// instruction is done, or RIP is set to run it again for the rest;
/// `Ok(false)`: the caller's element-wise loop continues from the
/// registers as they are now.
/// Registers always reflect the elements moved, so a fault in a later
/// page leaves the instruction restartable, as on hardware.
pub(super) fn rep_movs_stos(c: &mut Core, op: &Op, movs: bool, size: usize) -> Result<bool, Stop> {
    if op.bitness != 64 || op.asize != 8 || c.cpu.rflags & DF != 0 || !matches!(size, 1 | 2 | 4 | 8)
    {
        return Ok(false);
    }
    if movs && matches!(op.instr.memory_segment(), Register::FS | Register::GS) {
        return Ok(false);
    }
    let user = c.user();
    let s = size as u64;
    // Element counts from byte counts by shifting: `size` is a power of
    // two, and a 64-bit division costs more than the rest of a page's
    // bookkeeping here.
    let shift = s.trailing_zeros();
    let mut moved = 0u64;
    loop {
        let count = c.cpu.gpr[1];
        if count == 0 {
            return Ok(true);
        }
        let (rsi, rdi) = (c.cpu.gpr[6], c.cpu.gpr[7]);
        let mut elems = count.min((PAGE_SIZE - (rdi & PAGE_MASK)) >> shift);
        if movs {
            elems = elems.min((PAGE_SIZE - (rsi & PAGE_MASK)) >> shift);
        }
        if elems == 0 {
            // An element straddles a page (a source 2 bytes into a page, as
            // Linux's received packets are, does so at every page): it
            // goes through the interpreter's accesses, which split it, and
            // the elements after it in bulk again.
            let to = c.linear(op, Register::ES, rdi);
            let v = if movs {
                let from = c.linear(op, op.instr.memory_segment(), rsi);
                c.read(from, size)?
            } else {
                c.cpu.gpr[0]
            };
            c.write(to, size, v)?;
            if movs {
                c.cpu.gpr[6] = rsi.wrapping_add(s);
            }
            c.cpu.gpr[7] = rdi.wrapping_add(s);
            c.cpu.gpr[1] = count - 1;
            moved += s;
            if c.cpu.gpr[1] != 0 && c.attention {
                // An MMIO write to deliver first, as the element-wise
                // loop would.
                c.cpu.rip = op.instr.ip();
                return Ok(true);
            }
            continue;
        }
        // The source is translated first: its fault is the one reported
        // when both would fault, as with the first element on hardware.
        let (src, src_pa) = if movs {
            match host_addr(c, rsi, Access::Read, user)? {
                // Just looked up, so the entry is the source's.
                Some(h) => (h, (c.mmu.page_of(rsi) << PAGE_SHIFT) | (rsi & PAGE_MASK)),
                None => return Ok(false),
            }
        } else {
            (0, 0)
        };
        let Some(dst) = host_addr(c, rdi, Access::Write, user)? else {
            return Ok(false);
        };
        let dst_page = c.mmu.page_of(rdi);
        if movs {
            // A destination just above its source (in RAM, whatever the
            // linear addresses) repeats the source's first elements when
            // copied element by element: copy only up to the gap.
            let dst_pa = (dst_page << PAGE_SHIFT) | (rdi & PAGE_MASK);
            let gap = dst_pa.wrapping_sub(src_pa);
            if gap != 0 && gap < elems * s {
                elems = gap >> shift;
                if elems == 0 {
                    return Ok(false);
                }
            }
        }
        let bytes = elems * s;
        if movs {
            // SAFETY: `src` and `dst` are host addresses of RAM pages from
            // the TLB, valid while the `Core` lives (see `TlbEntry::host`);
            // `bytes` stays inside each page (bounded above), and `copy`
            // allows the two ranges to overlap.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes as usize) };
            c.cpu.gpr[6] = rsi.wrapping_add(bytes);
        } else {
            let v = c.cpu.gpr[0];
            for k in 0..elems as usize {
                // SAFETY: as above for `dst`; element `k` ends at most at
                // `dst + bytes`, inside the page.
                unsafe {
                    let p = (dst + k * size) as *mut u8;
                    match size {
                        1 => p.write(v as u8),
                        2 => (p as *mut u16).write_unaligned(v as u16),
                        4 => (p as *mut u32).write_unaligned(v as u32),
                        _ => (p as *mut u64).write_unaligned(v),
                    }
                }
            }
        }
        c.note_write(dst_page << PAGE_SHIFT);
        c.cpu.gpr[7] = rdi.wrapping_add(bytes);
        c.cpu.gpr[1] = count - elems;
        moved += bytes;
        if c.cpu.gpr[1] != 0 && (moved >= CHUNK_BYTES || c.attention) {
            c.cpu.rip = op.instr.ip();
            return Ok(true);
        }
    }
}
