//! A PCI host bridge with nothing behind it: configuration mechanism #1
//! (the address register at port 0xCF8, the data window at 0xCFC-0xCFF)
//! answering for one device, the host bridge 00:00.0; every other
//! function reads as absent (all ones).
//!
//! vessel's devices are virtio-mmio, found through ACPI, so the guest
//! needs no PCI devices. Linux's x86 boot still looks for a PCI
//! configuration mechanism and reports an error-level "PCI: Fatal: No
//! config space access function found" when there is none; with this
//! bridge it finds type 1 access (its sanity check wants a host bridge on
//! bus 0), scans an empty bus and boots without the error.

use crate::bus::BusDevice;

/// First port: the 32-bit CONFIG_ADDRESS register.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// CONFIG_ADDRESS (4 ports) and CONFIG_DATA (4 ports).
pub const PCI_CONFIG_PORTS_LEN: u64 = 8;

/// Intel's 440FX host bridge IDs, which every OS knows.
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x1237;
/// Class 06 (bridge), subclass 00 (host bridge), interface 00.
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;
const ENABLE: u32 = 1 << 31;

/// The bridge's configuration ports.
#[derive(Debug, Default)]
pub struct PciHostBridge {
    address: u32,
}

impl PciHostBridge {
    pub fn new() -> PciHostBridge {
        PciHostBridge::default()
    }

    /// The dword at `register` (aligned) of the addressed function.
    fn config_dword(&self) -> u32 {
        if self.address & ENABLE == 0 {
            return u32::MAX;
        }
        let bus = (self.address >> 16) & 0xff;
        let device = (self.address >> 11) & 0x1f;
        let function = (self.address >> 8) & 0x7;
        if (bus, device, function) != (0, 0, 0) {
            return u32::MAX;
        }
        match self.address & 0xfc {
            0x00 => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
            // Status: nothing; command: memory and I/O decoding on.
            0x04 => 0x0000_0003,
            // Class code and revision 2.
            0x08 => HOST_BRIDGE_CLASS | 0x02,
            // Header type 0, single function.
            0x0c => 0,
            _ => 0,
        }
    }
}

impl BusDevice for PciHostBridge {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            // CONFIG_ADDRESS reads back whole (Linux's type-1 probe checks it).
            0 if data.len() == 4 => self.address,
            4..=7 => {
                let shift = (offset - 4) * 8;
                self.config_dword() >> shift
            }
            _ => u32::MAX,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
        if data.len() > 4 {
            data[4..].fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only whole-dword writes set the address; configuration writes go
        // nowhere (the bridge has nothing to configure).
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(b: &mut PciHostBridge, offset: u64, len: usize) -> u32 {
        let mut data = vec![0u8; len];
        b.read(offset, &mut data);
        data.iter()
            .rev()
            .fold(0, |v, byte| (v << 8) | u32::from(*byte))
    }

    fn select(b: &mut PciHostBridge, bus: u32, dev: u32, func: u32, reg: u32) {
        let address = ENABLE | bus << 16 | dev << 11 | func << 8 | reg;
        b.write(0, &address.to_le_bytes());
    }

    #[test]
    fn type_one_probe_and_the_host_bridge() {
        let mut b = PciHostBridge::new();
        b.write(0, &ENABLE.to_le_bytes());
        assert_eq!(read(&mut b, 0, 4), ENABLE, "CONFIG_ADDRESS reads back");
        select(&mut b, 0, 0, 0, 0);
        assert_eq!(read(&mut b, 4, 4), 0x1237_8086);
        assert_eq!(read(&mut b, 4, 2), 0x8086);
        assert_eq!(read(&mut b, 6, 2), 0x1237);
        select(&mut b, 0, 0, 0, 0x08);
        assert_eq!(read(&mut b, 6, 2), 0x0600, "class: host bridge");
        // Every other function is absent.
        select(&mut b, 0, 1, 0, 0);
        assert_eq!(read(&mut b, 4, 4), u32::MAX);
        select(&mut b, 1, 0, 0, 0);
        assert_eq!(read(&mut b, 4, 2), 0xffff);
        // Disabled: all ones too; stray widths do not panic.
        b.write(0, &0u32.to_le_bytes());
        assert_eq!(read(&mut b, 4, 4), u32::MAX);
        let mut big = [0u8; 9];
        b.read(4, &mut big);
        b.write(2, &[1, 2, 3]);
    }
}
