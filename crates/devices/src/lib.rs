//! Device models for vessel: the legacy PC devices a Linux guest expects on
//! a hardware-reduced ACPI machine, and the address bus they sit on.
//!
//! Every device sees only its own registers (bus offsets), an interrupt line
//! where it has one, and the [`power::PowerSignal`] where it can end the run.
//! All guest-supplied offsets, widths and values are bounds-checked: no input
//! makes a device panic.
//!
//! Port map used by the VMM (constants live in the device modules):
//!
//! | ports         | device                                   |
//! |---------------|------------------------------------------|
//! | 0x60, 0x64    | [`i8042::I8042`]                         |
//! | 0x70-0x71     | [`rtc::Rtc`]                             |
//! | 0x80          | [`sink::Sink`] (POST codes / I/O delay)  |
//! | 0x3f8-0x3ff   | [`serial::Serial`] (COM1, IRQ 4)         |
//! | 0xcf8-0xcff   | [`pci_host::PciHostBridge`] (no devices) |
//! | 0x501         | [`exit_status::ExitStatusPort`]          |
//! | 0x600-0x602   | [`acpi_pm::AcpiPowerDevice`]                      |

pub mod acpi_pm;
pub mod bus;
pub mod exit_status;
pub mod i8042;
pub mod interrupt;
pub mod pci_host;
pub mod power;
pub mod rtc;
pub mod serial;
pub mod sink;

pub use acpi_pm::AcpiPowerDevice;
pub use bus::{Bus, BusDevice, BusError};
pub use exit_status::{ExitStatus, ExitStatusPort};
pub use i8042::I8042;
pub use interrupt::{EventFdLine, InterruptLine};
pub use power::{PowerSignal, VmEvent};
pub use rtc::Rtc;
pub use serial::{Serial, SerialError};
pub use sink::Sink;

#[cfg(test)]
mod fuzz_tests {
    //! Throws random offsets, widths and values at every device, directly
    //! and through a bus, to check that nothing panics.

    use super::*;
    use crate::interrupt::tests::CountingLine;
    use std::sync::{Arc, Mutex};

    /// `testkit`'s seeded generator, plus the shapes of device accesses.
    struct Rng(testkit::Rng);

    impl Rng {
        /// From the running test's seed (`testkit::seed`, printed for replay).
        fn seeded() -> Rng {
            Rng(testkit::Rng::new(testkit::seed()))
        }

        fn next(&mut self) -> u64 {
            self.0.next()
        }

        fn below(&mut self, n: u64) -> u64 {
            self.0.below(n)
        }

        fn offset(&mut self) -> u64 {
            match self.below(4) {
                0 => self.next(),              // anything
                1 => self.below(16),           // near the registers
                2 => u64::MAX - self.below(4), // the very top
                _ => self.below(8),
            }
        }

        fn len(&mut self) -> usize {
            match self.below(8) {
                0 => 0,
                1 => 2,
                2 => 4,
                3 => 8,
                4 => self.below(300) as usize,
                _ => 1,
            }
        }
    }

    fn devices() -> Vec<(&'static str, Box<dyn BusDevice>)> {
        let power = PowerSignal::new().unwrap();
        let irq: Arc<dyn InterruptLine> = Arc::new(CountingLine::default());
        vec![
            (
                "serial",
                Box::new(Serial::with_input_notifier(
                    irq.clone(),
                    Box::new(std::io::sink()),
                    irq,
                )),
            ),
            ("i8042", Box::new(I8042::new(power.clone()))),
            ("rtc", Box::new(Rtc::new())),
            ("acpi_pm", Box::new(AcpiPowerDevice::new(power))),
            ("exit_status", Box::new(ExitStatusPort::new().0)),
            ("pci_host", Box::new(pci_host::PciHostBridge::new())),
            ("sink", Box::new(Sink)),
        ]
    }

    #[test]
    fn random_accesses_never_panic() {
        let mut rng = Rng::seeded();
        for (name, mut dev) in devices() {
            for _ in 0..20_000 {
                let offset = rng.offset();
                let len = rng.len();
                if rng.below(2) == 0 {
                    let mut data = vec![0u8; len];
                    dev.read(offset, &mut data);
                } else {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    dev.write(offset, &data);
                }
            }
            // Also a dense sweep of every register with every byte value.
            for offset in 0..8 {
                for v in 0..=255u8 {
                    dev.write(offset, &[v]);
                    let mut b = [0u8];
                    dev.read(offset, &mut b);
                }
            }
            eprintln!("{name}: ok");
        }
    }

    #[test]
    fn random_bus_accesses_never_panic() {
        let bus = Bus::new();
        for (i, (_, dev)) in devices().into_iter().enumerate() {
            let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(BoxedDevice(dev)));
            bus.insert(dev, 0x100 * i as u64, 8).unwrap();
        }
        let mut rng = Rng::seeded();
        for _ in 0..50_000 {
            let addr = match rng.below(3) {
                0 => rng.next(),
                _ => rng.below(0x700),
            };
            let len = rng.len();
            let mut data = vec![0u8; len];
            if rng.below(2) == 0 {
                bus.read(addr, &mut data);
            } else {
                bus.write(addr, &data);
            }
        }
    }

    struct BoxedDevice(Box<dyn BusDevice>);

    impl BusDevice for BoxedDevice {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.read(offset, data)
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.write(offset, data)
        }
    }
}
