//! The ACPI power-management device of a hardware-reduced platform.
//!
//! A hardware-reduced ACPI machine has no PM1 event/control blocks; instead
//! the FADT points at a sleep control register, a sleep status register and
//! a reset register (ACPI 6.x, 4.8.3.7 and 4.8.3.6). This device implements
//! the three as one-byte I/O ports, and the ACPI tables (vmm `acpi.rs`)
//! advertise exactly these constants:
//!
//! * sleep control (write): Linux `acpi_hw_extended_sleep()` writes
//!   `(SLP_TYP << 2) | SLP_EN` with an 8-bit access; SLP_TYP comes from the
//!   DSDT's `\_S5_` package, so S5 is [`S5_SLP_TYP`] → [`VmEvent::PowerOff`].
//!   Other sleep types are not implemented: the request completes at once by
//!   setting WAK_STS, since Linux then spins until it reads WAK_STS.
//! * sleep status: WAK_STS (bit 7), write 1 to clear.
//! * reset: Linux `acpi_reset()` writes the FADT reset value with an 8-bit
//!   port write; [`RESET_VALUE`] → [`VmEvent::Reset`].
//!
//! Register it at [`ACPI_PM_BASE`] with length [`ACPI_PM_LEN`].

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice, BusError};
use crate::power::{PowerSignal, VmEvent};

/// First port of the device. 0x600 is clear of the PC legacy ports (PIC,
/// PIT, RTC, i8042, COM1-4, VGA) and of the 0x501 debug-exit port.
pub const ACPI_PM_BASE: u16 = 0x600;
/// Sleep control register (FADT `SLEEP_CONTROL_REG`), 8 bits.
pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_BASE;
/// Sleep status register (FADT `SLEEP_STATUS_REG`), 8 bits.
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_BASE + 1;
/// Reset register (FADT `RESET_REG`), 8 bits.
pub const RESET_PORT: u16 = ACPI_PM_BASE + 2;
/// Bus length covering the three registers.
pub const ACPI_PM_LEN: u64 = 3;
/// Value the guest writes to [`RESET_PORT`] to reset (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP for S5 (soft off); the DSDT's `\_S5_` package must carry it.
pub const S5_SLP_TYP: u8 = 5;
/// Register width in bits, for the FADT generic address structures.
pub const REGISTER_BIT_WIDTH: u8 = 8;

/// Sleep control: SLP_EN.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: SLP_TYP field position.
pub const SLP_TYP_SHIFT: u8 = 2;
/// Sleep control: SLP_TYP field mask (bits 2-4).
pub const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// Sleep status: WAK_STS.
pub const WAK_STS: u8 = 1 << 7;

const SLEEP_CONTROL_OFFSET: u64 = 0;
const SLEEP_STATUS_OFFSET: u64 = 1;
const RESET_OFFSET: u64 = 2;

/// The sleep control / sleep status / reset register block.
#[derive(Debug)]
pub struct AcpiPowerDevice {
    power: PowerSignal,
    sleep_status: u8,
}

impl AcpiPowerDevice {
    /// A device that reports power off and reset to `power`.
    pub fn new(power: PowerSignal) -> Self {
        Self {
            power,
            sleep_status: 0,
        }
    }

    /// Creates the device and registers it on the port bus at
    /// [`ACPI_PM_BASE`]..+[`ACPI_PM_LEN`].
    pub fn register(pio: &Bus, power: PowerSignal) -> Result<(), BusError> {
        pio.insert(
            Arc::new(Mutex::new(Self::new(power))),
            u64::from(ACPI_PM_BASE),
            ACPI_PM_LEN,
        )
    }

    fn sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if slp_typ == S5_SLP_TYP {
            self.power.request(VmEvent::PowerOff);
        } else {
            tracing::debug!(slp_typ, "acpi: unsupported sleep type; waking at once");
            self.sleep_status |= WAK_STS;
        }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (SLEEP_STATUS_OFFSET, 1) => self.sleep_status,
            // SLP_EN and the reset register are write-only and read as 0.
            (SLEEP_CONTROL_OFFSET | RESET_OFFSET, 1) => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (SLEEP_CONTROL_OFFSET, [v]) => self.sleep_control(*v),
            (SLEEP_STATUS_OFFSET, [v]) => self.sleep_status &= !v,
            (RESET_OFFSET, [v]) if *v == RESET_VALUE => {
                tracing::info!("acpi: guest wrote the reset register");
                self.power.request(VmEvent::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPowerDevice, PowerSignal) {
        let p = PowerSignal::new().unwrap();
        (AcpiPowerDevice::new(p.clone()), p)
    }

    #[test]
    fn ports_are_consistent() {
        assert_eq!(u64::from(RESET_PORT - ACPI_PM_BASE), RESET_OFFSET);
        assert_eq!(
            u64::from(SLEEP_STATUS_PORT - ACPI_PM_BASE),
            SLEEP_STATUS_OFFSET
        );
        assert!(u64::from(RESET_PORT - ACPI_PM_BASE) < ACPI_PM_LEN);
        // Clear of COM1-4, i8042, RTC, PIT, PICs and the debug-exit port.
        for p in [SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, RESET_PORT] {
            assert!(!(0x3f8..0x400).contains(&p) && !(0x2f8..0x300).contains(&p));
            assert!(!(0x3e8..0x3f0).contains(&p) && !(0x2e8..0x2f0).contains(&p));
            assert!(!(0x20..0x22).contains(&p) && !(0xa0..0xa2).contains(&p));
            assert!(!(0x40..0x44).contains(&p) && !(0x60..0x65).contains(&p));
            assert!(!(0x70..0x72).contains(&p) && p != 0x501);
        }
    }

    #[test]
    fn s5_powers_off() {
        let (mut d, p) = dev();
        // Linux: clear WAK_STS, then write SLP_TYP|SLP_EN (0x34 for S5).
        d.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        d.write(
            SLEEP_CONTROL_OFFSET,
            &[(S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN],
        );
        assert_eq!(p.pending(), Some(VmEvent::PowerOff));
        assert_eq!(p.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_types_are_ignored_and_wake() {
        let (mut d, p) = dev();
        // SLP_TYP 5 without SLP_EN does nothing.
        d.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << SLP_TYP_SHIFT]);
        for typ in [0u8, 1, 3, 4, 7] {
            d.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
            d.write(SLEEP_CONTROL_OFFSET, &[(typ << SLP_TYP_SHIFT) | SLP_EN]);
            let mut s = [0];
            d.read(SLEEP_STATUS_OFFSET, &mut s);
            assert_eq!(s[0] & WAK_STS, WAK_STS, "S{typ} returns at once");
        }
        assert_eq!(p.pending(), None);
        d.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        let mut s = [0];
        d.read(SLEEP_STATUS_OFFSET, &mut s);
        assert_eq!(s[0], 0, "write 1 clears");
    }

    #[test]
    fn register_places_device_on_bus() {
        let bus = Bus::new();
        let p = PowerSignal::new().unwrap();
        AcpiPowerDevice::register(&bus, p.clone()).unwrap();
        assert!(bus.write(u64::from(SLEEP_CONTROL_PORT), &[0x34]));
        assert_eq!(p.pending(), Some(VmEvent::PowerOff));
        assert!(!bus.write(u64::from(RESET_PORT) + 1, &[RESET_VALUE]));
    }

    #[test]
    fn reset_register_resets() {
        let (mut d, p) = dev();
        d.write(RESET_OFFSET, &[RESET_VALUE.wrapping_add(1)]);
        d.write(RESET_OFFSET, &[RESET_VALUE, 0]);
        assert_eq!(p.pending(), None);
        d.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(p.pending(), Some(VmEvent::Reset));
    }

    #[test]
    fn wide_or_stray_accesses_are_ignored() {
        let (mut d, p) = dev();
        d.write(SLEEP_CONTROL_OFFSET, &[0x34, 0x00]);
        d.write(3, &[0x34]);
        d.write(SLEEP_CONTROL_OFFSET, &[]);
        assert_eq!(p.pending(), None);
        let mut w = [0u8; 4];
        d.read(SLEEP_CONTROL_OFFSET, &mut w);
        assert_eq!(w, [0xff; 4]);
    }
}
