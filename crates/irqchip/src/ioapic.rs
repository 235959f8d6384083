//! The I/O APIC: 24 interrupt pins turned into [`Interrupt`] messages.
//!
//! Registers are reached through a 4 KiB MMIO page at 0xfec00000: IOREGSEL
//! (offset 0x00) selects a register, IOWIN (0x10) reads or writes it, and
//! the EOI register (0x40) lets software end a level-triggered interrupt by
//! vector. Behaviour follows the 82093AA datasheet as extended by later
//! chipsets (the EOI register appeared with version 0x20).
//!
//! **Version.** We report version 0x20 with 24 pins (`0x0017_0020`, QEMU's
//! default) rather than KVM's 0x11: version 0x20 is the one that has the
//! EOI register we implement, and Linux (`__eoi_ioapic_pin`) uses that
//! register instead of the mask/edge-toggle dance when it needs a directed
//! EOI.
//!
//! **Polarity.** `set_irq`'s `level` is the logical "asserted" state; the
//! polarity bit (13) is stored for the guest but not applied, since vessel's
//! device models signal assertion, not electrical levels (KVM does the same).
//!
//! **Delivery status** (bit 12) always reads 0: messages are handed to the
//! caller at once, never left in flight.

use crate::{DeliveryMode, Destination, Interrupt};

/// Guest-physical base of the IOAPIC's MMIO page.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window vessel maps.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of input pins (GSIs 0-23).
pub const NUM_PINS: usize = 24;
/// The version register: max redirection entry 23, version 0x20.
pub const VERSION: u32 = ((NUM_PINS as u32 - 1) << 16) | 0x20;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;

/// Redirection entry bits.
const RTE_DEST_LOGICAL: u64 = 1 << 11;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Software-writable bits of the low dword: vector, delivery mode,
/// destination mode, polarity, trigger mode, mask. Delivery status and
/// remote IRR are read-only; bits 17-31 are reserved.
const RTE_LOW_WRITABLE: u64 = 0x0000_0000_0001_afff;

/// The I/O APIC.
#[derive(Debug, Clone)]
pub struct IoApic {
    /// 4-bit APIC ID (register 0 bits 24-27).
    id: u8,
    /// IOREGSEL.
    select: u8,
    redirection: [u64; NUM_PINS],
    /// Bit n: pin n is asserted.
    lines: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// An IOAPIC in its reset state: every pin masked, ID 0.
    pub fn new() -> Self {
        Self {
            id: 0,
            select: 0,
            redirection: [RTE_MASKED; NUM_PINS],
            lines: 0,
        }
    }

    /// The raw 64-bit redirection entry of `pin`, if it exists.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// Guest read of `data.len()` bytes at `offset` in the MMIO page.
    ///
    /// IOREGSEL and IOWIN can be read with 1-, 2- or 4-byte accesses
    /// anywhere inside their 32-bit register; an 8-byte read returns the
    /// register in the low half. Everything else reads as zeros.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 1 | 2 | 4 | 8) || offset >= IOAPIC_SIZE {
            return;
        }
        let value = match offset & !3 {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(self.select),
            _ => return,
        };
        let bytes = value.to_le_bytes();
        let start = usize::try_from(offset & 3).unwrap_or(0);
        for (dst, src) in data.iter_mut().zip(bytes.iter().skip(start)) {
            *dst = *src;
        }
    }

    /// Guest write of `data` at `offset`. Interrupts that the write causes
    /// (unmasking an asserted level-triggered pin, an EOI that re-delivers)
    /// are appended to `out`.
    ///
    /// IOREGSEL takes its low byte from writes of any width; IOWIN needs a
    /// 32-bit write (an 8-byte write uses its low half); the EOI register
    /// takes the vector from the low byte. Other writes are ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut Vec<Interrupt>) {
        match (offset, data) {
            (IOREGSEL, [select, ..]) => self.select = *select,
            (IOWIN, [a, b, c, d]) | (IOWIN, [a, b, c, d, _, _, _, _]) => {
                let value = u32::from_le_bytes([*a, *b, *c, *d]);
                self.write_register(self.select, value, out);
            }
            (EOI, [vector, ..]) => self.end_of_interrupt(*vector, out),
            _ => {}
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            _ => match Self::pin_of(index) {
                Some((pin, high)) => {
                    let entry = self.redirection[pin];
                    let half = if high { entry >> 32 } else { entry };
                    // Truncation keeps the selected half.
                    (half & 0xffff_ffff) as u32
                }
                None => 0,
            },
        }
    }

    /// Register index → (pin, is the high dword), for redirection entries.
    fn pin_of(index: u8) -> Option<(usize, bool)> {
        let rel = usize::from(index.checked_sub(REG_REDIRECTION)?);
        let pin = rel / 2;
        (pin < NUM_PINS).then_some((pin, rel % 2 == 1))
    }

    fn write_register(&mut self, index: u8, value: u32, out: &mut Vec<Interrupt>) {
        if index == REG_ID {
            self.id = ((value >> 24) & 0xf) as u8;
            return;
        }
        let Some((pin, high)) = Self::pin_of(index) else {
            // Version, arbitration and unknown registers are read-only.
            return;
        };
        let old = self.redirection[pin];
        let value = u64::from(value);
        let mut entry = if high {
            (old & 0xffff_ffff) | (value << 32)
        } else {
            (old & !0xffff_ffff) | (value & RTE_LOW_WRITABLE) | (old & RTE_REMOTE_IRR)
        };
        if entry & RTE_LEVEL == 0 {
            // Remote IRR only means something for level-triggered entries;
            // Linux expects it to clear when it switches a pin to edge
            // (its `ioapic_ack_level` workaround relies on that), as KVM
            // notes.
            entry &= !RTE_REMOTE_IRR;
        }
        self.redirection[pin] = entry;
        // A level-triggered pin that is asserted delivers as soon as it is
        // unmasked (or switched to level).
        if entry & RTE_LEVEL != 0 && self.lines & (1 << pin) != 0 {
            self.service(pin, out);
        }
    }

    /// Drives `pin` to `level` (true = asserted). Edge-triggered pins
    /// deliver on the rising edge if unmasked (an edge while masked is
    /// lost, as on the chip); level-triggered pins deliver while asserted,
    /// unmasked and not already waiting for an EOI (remote IRR).
    /// Out-of-range pins are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool, out: &mut Vec<Interrupt>) {
        if pin >= NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let level_triggered = self.redirection[pin] & RTE_LEVEL != 0;
        if level && (level_triggered || !was) {
            self.service(pin, out);
        }
    }

    /// The local APICs signalled EOI for `vector` of a level-triggered
    /// interrupt (or the guest wrote the EOI register): clear remote IRR on
    /// every pin using that vector, and deliver again those still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8, out: &mut Vec<Interrupt>) {
        for pin in 0..NUM_PINS {
            let entry = self.redirection[pin];
            if entry & 0xff != u64::from(vector) || entry & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.redirection[pin] &= !RTE_REMOTE_IRR;
            if self.lines & (1 << pin) != 0 {
                self.service(pin, out);
            }
        }
    }

    /// Sends the pin's message if its entry allows it.
    fn service(&mut self, pin: usize, out: &mut Vec<Interrupt>) {
        let entry = self.redirection[pin];
        if entry & RTE_MASKED != 0 {
            return;
        }
        let level_triggered = entry & RTE_LEVEL != 0;
        if level_triggered {
            if entry & RTE_REMOTE_IRR != 0 {
                return;
            }
            self.redirection[pin] |= RTE_REMOTE_IRR;
        }
        let dest_field = ((entry >> 56) & 0xff) as u32;
        out.push(Interrupt {
            dest: if entry & RTE_DEST_LOGICAL != 0 {
                Destination::Logical(dest_field)
            } else {
                Destination::Physical(dest_field)
            },
            vector: (entry & 0xff) as u8,
            delivery: DeliveryMode::from_bits(((entry >> 8) & 7) as u32),
            level_triggered,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(io: &mut IoApic, offset: u64, value: u32, out: &mut Vec<Interrupt>) {
        io.mmio_write(offset, &value.to_le_bytes(), out);
    }

    fn read32(io: &IoApic, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        io.mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg(io: &mut IoApic, index: u32, value: u32, out: &mut Vec<Interrupt>) {
        write32(io, IOREGSEL, index, out);
        write32(io, IOWIN, value, out);
    }

    fn read_reg(io: &mut IoApic, index: u32) -> u32 {
        let mut out = Vec::new();
        write32(io, IOREGSEL, index, &mut out);
        read32(io, IOWIN)
    }

    /// Programs `pin` the way Linux's `ioapic_write_entry` does: high dword
    /// first, then low (arch/x86/kernel/apic/io_apic.c, `__ioapic_write_entry`).
    fn program(io: &mut IoApic, pin: u32, low: u32, dest: u8, out: &mut Vec<Interrupt>) {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24, out);
        write_reg(io, 0x10 + 2 * pin, low, out);
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        assert_eq!(read_reg(&mut io, 1), 0x0017_0020);
        write_reg(&mut io, 0, 0x0f00_0000 | 0xff, &mut out);
        assert_eq!(read_reg(&mut io, 0), 0x0f00_0000);
        assert_eq!(read_reg(&mut io, 2), 0x0f00_0000);
        write_reg(&mut io, 1, 0, &mut out);
        assert_eq!(read_reg(&mut io, 1), VERSION, "version is read-only");
        // IOREGSEL reads back; byte reads of IOWIN work.
        write32(&mut io, IOREGSEL, 1, &mut out);
        assert_eq!(read32(&io, IOREGSEL), 1);
        let mut b = [0u8; 1];
        io.mmio_read(IOWIN + 2, &mut b);
        assert_eq!(b[0], 0x17);
        assert_eq!(read_reg(&mut io, 0x40), 0, "unknown registers read 0");
    }

    #[test]
    fn redirection_entries_read_back_with_readonly_bits() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        assert_eq!(read_reg(&mut io, 0x10), 0x0001_0000, "masked at reset");
        // Try to set delivery status, remote IRR and reserved bits.
        write_reg(&mut io, 0x10 + 2 * 5, 0xffff_ffff, &mut out);
        assert_eq!(read_reg(&mut io, 0x10 + 2 * 5), 0x0001_afff);
        write_reg(&mut io, 0x11 + 2 * 5, 0xab00_0000, &mut out);
        assert_eq!(read_reg(&mut io, 0x11 + 2 * 5), 0xab00_0000);
        assert_eq!(io.redirection_entry(5), Some(0xab00_0000_0001_afff));
        assert_eq!(io.redirection_entry(24), None);
        // Pin 23 exists, pin 24 does not.
        write_reg(&mut io, 0x10 + 2 * 23, 0x30, &mut out);
        assert_eq!(read_reg(&mut io, 0x10 + 2 * 23), 0x30);
        write_reg(&mut io, 0x10 + 2 * 24, 0x30, &mut out);
        assert_eq!(read_reg(&mut io, 0x10 + 2 * 24), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_only() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 4, 0x0000_0031, 1, &mut out); // fixed, physical, edge
        io.set_irq(4, true, &mut out);
        io.set_irq(4, true, &mut out);
        io.set_irq(4, false, &mut out);
        assert_eq!(
            out,
            [Interrupt {
                dest: Destination::Physical(1),
                vector: 0x31,
                delivery: DeliveryMode::Fixed,
                level_triggered: false,
            }]
        );
        out.clear();
        io.set_irq(4, true, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 3, 0x0001_0033, 0, &mut out);
        io.set_irq(3, true, &mut out);
        io.set_irq(3, false, &mut out);
        program(&mut io, 3, 0x0000_0033, 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        // Level, active low (as for PCI INTx), logical dest 0x01, lowest prio.
        program(&mut io, 10, 0x0000_a941, 0x01, &mut out);
        io.set_irq(10, true, &mut out);
        assert_eq!(
            out,
            [Interrupt {
                dest: Destination::Logical(1),
                vector: 0x41,
                delivery: DeliveryMode::LowestPriority,
                level_triggered: true,
            }]
        );
        out.clear();
        assert_ne!(
            read_reg(&mut io, 0x10 + 20) & (1 << 14),
            0,
            "remote IRR set"
        );
        // Still asserted, but remote IRR blocks re-delivery.
        io.set_irq(10, true, &mut out);
        assert!(out.is_empty());
        // EOI while still asserted: delivered again.
        io.end_of_interrupt(0x41, &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        // Device deasserts, then EOI: nothing more, remote IRR clear.
        io.set_irq(10, false, &mut out);
        io.end_of_interrupt(0x41, &mut out);
        assert!(out.is_empty());
        assert_eq!(read_reg(&mut io, 0x10 + 20) & (1 << 14), 0);
        // EOI for another vector does nothing.
        io.set_irq(10, true, &mut out);
        out.clear();
        io.end_of_interrupt(0x42, &mut out);
        assert!(out.is_empty());
        // The EOI register (version 0x20) works like the APIC's EOI.
        io.set_irq(10, false, &mut out);
        write32(&mut io, EOI, 0x41, &mut out);
        assert_eq!(read_reg(&mut io, 0x10 + 20) & (1 << 14), 0);
    }

    #[test]
    fn unmasking_asserted_level_pin_delivers() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 9, 0x0001_8039, 0, &mut out); // level, masked
        io.set_irq(9, true, &mut out);
        assert!(out.is_empty());
        write_reg(&mut io, 0x10 + 18, 0x0000_8039, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].level_triggered);
        // Masking while remote IRR is set keeps it until EOI.
        out.clear();
        write_reg(&mut io, 0x10 + 18, 0x0001_8039, &mut out);
        io.end_of_interrupt(0x39, &mut out);
        assert!(out.is_empty(), "masked: EOI does not re-deliver");
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 1, 0x0000_8021, 0, &mut out);
        io.set_irq(1, true, &mut out);
        assert_eq!(out.len(), 1);
        write_reg(&mut io, 0x10 + 2, 0x0000_0021, &mut out);
        assert_eq!(read_reg(&mut io, 0x10 + 2) & (1 << 14), 0);
    }

    #[test]
    fn delivery_modes_decode() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        for (bits, mode) in [
            (0, DeliveryMode::Fixed),
            (1, DeliveryMode::LowestPriority),
            (2, DeliveryMode::Smi),
            (4, DeliveryMode::Nmi),
            (5, DeliveryMode::Init),
            (7, DeliveryMode::ExtInt),
        ] {
            program(&mut io, 0, (bits << 8) | 0x20, 0, &mut out);
            io.set_irq(0, true, &mut out);
            io.set_irq(0, false, &mut out);
            assert_eq!(out.pop().map(|i| i.delivery), Some(mode));
        }
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        write32(&mut io, IOREGSEL, 0x10, &mut out);
        // 2-byte IOWIN write: ignored.
        io.mmio_write(IOWIN, &[0x55, 0x00], &mut out);
        assert_eq!(read32(&io, IOWIN), 0x0001_0000);
        // Byte write to IOREGSEL works (some guests do that).
        io.mmio_write(IOREGSEL, &[0x01], &mut out);
        assert_eq!(read32(&io, IOWIN), VERSION);
        let mut big = [0xaau8; 3];
        io.mmio_read(IOWIN, &mut big);
        assert_eq!(big, [0; 3]);
        io.mmio_read(0x2000, &mut big);
        io.set_irq(24, true, &mut out);
        io.set_irq(usize::MAX, true, &mut out);
        assert!(out.is_empty());
    }
}
