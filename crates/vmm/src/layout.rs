//! The guest-physical memory map of a vessel machine (x86-64, PC-like).
//!
//! ```text
//! 0x0000_0500  boot GDT
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables (PML4, PDPT, 4 PDs: identity map of 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables, RSDP first (reserved)
//! 0x0010_0000  kernel, then RAM; the initrd sits at the top of low RAM
//! 0xc000_0000  MMIO hole up to 4 GiB (IOAPIC, LAPIC, device windows)
//! 0xd000_0000  virtio-mmio device windows, 4 KiB each
//! 0x1_0000_0000  RAM above the hole, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories, each mapping 1 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The first virtio-mmio window; each device takes [`VIRTIO_WINDOW`].
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_WINDOW: u64 = 0x1000;
/// IOAPIC pins (= GSIs) for virtio devices, in the order they are handed
/// out: first the pins above the ISA range, then the ISA IRQs no legacy
/// device of this machine uses (0 and 2 timer, 1 keyboard, 4 COM1, 8 RTC).
pub const VIRTIO_GSIS: [u32; 18] = [
    16, 17, 18, 19, 20, 21, 22, 23, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15,
];

/// Where one virtio-mmio device sits: its register window and its
/// interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// Slot `index` of the virtio devices, or `None` past the last GSI.
pub fn virtio_slot(index: usize) -> Option<MmioSlot> {
    let gsi = *VIRTIO_GSIS.get(index)?;
    Some(MmioSlot {
        base: VIRTIO_MMIO_START + index as u64 * VIRTIO_WINDOW,
        len: VIRTIO_WINDOW,
        gsi,
    })
}
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Smallest guest vessel accepts: enough for the boot structures below 1 MiB
/// and a small kernel above it.
pub const MIN_MEMORY: u64 = 16 << 20;

/// e820 memory types (from the ACPI/BIOS specification).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The host mappings that make up `memory_size` bytes of guest RAM: one
/// region from 0 up to the MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(memory_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = memory_size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if memory_size > MMIO_HOLE_START {
        regions.push((
            GuestAddress(MMIO_HOLE_END),
            (memory_size - MMIO_HOLE_START) as usize,
        ));
    }
    regions
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(memory_size: u64) -> u64 {
    memory_size.min(MMIO_HOLE_START)
}

/// The e820 map for `memory_size` bytes of RAM laid out by [`ram_regions`].
pub fn e820_map(memory_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa_0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_START,
            size: HIGH_MEMORY_START - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = low_ram_end(memory_size);
    if low_end > HIGH_MEMORY_START {
        map.push(E820Entry {
            addr: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
            kind: E820_RAM,
        });
    }
    if memory_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: memory_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_are_distinct_and_inside_the_hole() {
        let slots: Vec<MmioSlot> = (0..VIRTIO_GSIS.len()).filter_map(virtio_slot).collect();
        assert_eq!(slots.len(), VIRTIO_GSIS.len());
        assert_eq!(virtio_slot(VIRTIO_GSIS.len()), None);
        for (i, a) in slots.iter().enumerate() {
            assert!(a.base >= MMIO_HOLE_START && a.base + a.len <= IOAPIC_ADDR);
            assert!(![0, 1, 2, 4, 8].contains(&a.gsi) && a.gsi < 24);
            for b in &slots[i + 1..] {
                assert!(a.base + a.len <= b.base && a.gsi != b.gsi);
            }
        }
    }

    #[test]
    fn small_guest_has_one_region_and_no_high_ram() {
        let regions = ram_regions(256 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM except the EBDA and the BIOS/ACPI area below 1 MiB.
        assert_eq!(ram, (256 << 20) - (HIGH_MEMORY_START - EBDA_START));
        assert_eq!(map.last().map(|e| e.addr + e.size), Some(256 << 20));
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_hole() {
        let size = 5u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            regions[1],
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize
            )
        );
        let map = e820_map(size);
        for entry in &map {
            let end = entry.addr + entry.size;
            assert!(
                end <= MMIO_HOLE_START || entry.addr >= MMIO_HOLE_END,
                "{entry:?} overlaps the MMIO hole"
            );
        }
        let ram_above: u64 = map
            .iter()
            .filter(|e| e.addr >= MMIO_HOLE_END)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram_above, size - MMIO_HOLE_START);
    }

    #[test]
    fn e820_entries_are_sorted_and_disjoint() {
        for size in [MIN_MEMORY, 512 << 20, 3 << 30, 4 << 30] {
            let map = e820_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
            }
        }
    }
}
