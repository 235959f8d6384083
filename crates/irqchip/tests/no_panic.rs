//! Throws random ports, offsets, lengths, values, times and MSRs at every
//! model: guest input must never make one panic (overflow checks are on in
//! test builds, so arithmetic slips show up here too).

use irqchip::ioapic::IoApic;
use irqchip::lapic::LocalApic;
use irqchip::pic::DualPic;
use irqchip::pit::Pit;
use irqchip::{DeliveryMode, Destination, Interrupt};

/// `testkit`'s seeded generator, plus the shapes of guest input.
struct Rng(testkit::Rng);

impl Rng {
    /// Stream `round` of model `model`, from the running test's seed.
    fn seeded(model: &str, round: u64) -> Rng {
        Rng(testkit::Rng::derived(testkit::seed(), (model, round)))
    }
    fn next(&mut self) -> u64 {
        self.0.next()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// Mostly plausible values, sometimes extremes.
    fn time(&mut self, now: &mut u64) -> u64 {
        match self.below(20) {
            0 => u64::MAX - self.below(1000),
            1 => self.below(1000), // backwards
            _ => {
                *now = now.saturating_add(self.below(2_000_000));
                *now
            }
        }
    }
    fn bytes(&mut self) -> Vec<u8> {
        let len = match self.below(10) {
            0 => self.below(64) as usize,
            1..=6 => 4,
            7 => 8,
            8 => 1,
            _ => 2,
        };
        (0..len).map(|_| self.byte()).collect()
    }
    fn offset(&mut self) -> u64 {
        match self.below(8) {
            0 => self.next(),
            1 => self.below(0x2000),
            _ => (self.below(0x100) << 4) | (self.below(2) * self.below(16)),
        }
    }
    fn interrupt(&mut self) -> Interrupt {
        let dest = match self.below(5) {
            0 => Destination::Physical(self.next() as u32),
            1 => Destination::Logical(self.next() as u32),
            2 => Destination::SelfOnly(self.below(4) as u32),
            3 => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf(self.below(4) as u32),
        };
        Interrupt {
            dest,
            vector: self.byte(),
            delivery: DeliveryMode::from_bits(self.next() as u32),
            level_triggered: self.below(2) == 0,
        }
    }
}

const SEEDS: u64 = 8;
const STEPS: usize = 40_000;

#[test]
fn pic_never_panics() {
    for seed in 1..=SEEDS {
        let mut rng = Rng::seeded("pic", seed);
        let mut pic = DualPic::new();
        let ports = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1];
        for _ in 0..STEPS {
            let port = if rng.below(10) == 0 {
                rng.next() as u16
            } else {
                ports[rng.below(6) as usize]
            };
            match rng.below(5) {
                0 => {
                    pic.read(port);
                }
                1 => pic.write(port, rng.byte()),
                2 => pic.set_irq(rng.byte() % 20, rng.below(2) == 0),
                3 => {
                    pic.acknowledge();
                }
                _ => {
                    pic.output();
                }
            }
        }
    }
}

#[test]
fn pit_never_panics() {
    for seed in 1..=SEEDS {
        let mut rng = Rng::seeded("pit", seed);
        let mut pit = Pit::new();
        let mut now = 0;
        for _ in 0..STEPS {
            let port = if rng.below(10) == 0 {
                rng.next() as u16
            } else {
                [0x40u16, 0x41, 0x42, 0x43, 0x61][rng.below(5) as usize]
            };
            let t = rng.time(&mut now);
            match rng.below(6) {
                0 | 1 => {
                    pit.read(port, t);
                }
                2 | 3 => {
                    // Bias toward small counts so terminal counts happen.
                    let value = if rng.below(2) == 0 {
                        rng.byte() % 4
                    } else {
                        rng.byte()
                    };
                    pit.write(port, value, t);
                }
                4 => {
                    pit.irq0_edges(t);
                }
                _ => {
                    if let Some(deadline) = pit.next_deadline_ns(t) {
                        assert!(deadline >= t);
                    }
                    pit.output(rng.below(5) as usize, t);
                }
            }
        }
    }
}

#[test]
fn ioapic_never_panics() {
    for seed in 1..=SEEDS {
        let mut rng = Rng::seeded("ioapic", seed);
        let mut io = IoApic::new();
        let mut out = Vec::new();
        for _ in 0..STEPS {
            match rng.below(5) {
                0 => {
                    let mut data = rng.bytes();
                    io.mmio_read(
                        (rng.offset() & 0xfff) | (rng.below(2) * rng.next()),
                        &mut data,
                    );
                }
                1 => {
                    let data = rng.bytes();
                    let offset = [0x00, 0x10, 0x40][rng.below(3) as usize];
                    // Keep IOREGSEL mostly on real registers.
                    let data = if offset == 0 && !data.is_empty() && rng.below(2) == 0 {
                        vec![rng.byte() % 0x40; data.len()]
                    } else {
                        data
                    };
                    io.mmio_write(offset, &data, &mut out);
                }
                2 => {
                    let data = rng.bytes();
                    io.mmio_write(rng.offset(), &data, &mut out);
                }
                3 => io.set_irq(rng.below(30) as usize, rng.below(2) == 0, &mut out),
                _ => io.end_of_interrupt(rng.byte(), &mut out),
            }
            out.clear();
        }
    }
}

#[test]
fn lapic_never_panics() {
    for seed in 1..=SEEDS {
        let mut rng = Rng::seeded("lapic", seed);
        let mut apic = LocalApic::new(rng.below(300) as u32, rng.below(2) == 0)
            .with_timer_hz(rng.next() % 3_000_000_000)
            .with_tsc_hz(rng.next() % 5_000_000_000);
        let mut now = 0;
        for _ in 0..STEPS {
            let t = rng.time(&mut now);
            match rng.below(12) {
                0 | 1 => {
                    let mut data = rng.bytes();
                    apic.mmio_read(rng.offset(), &mut data, t);
                }
                2..=4 => {
                    let mut data = rng.bytes();
                    if data.len() == 4 && rng.below(3) == 0 {
                        // Keep the APIC software-enabled often enough.
                        data[1] |= 1;
                    }
                    apic.mmio_write(rng.offset(), &data, t);
                }
                5 => {
                    let msr = match rng.below(4) {
                        0 => rng.next() as u32,
                        1 => 0x1b,
                        2 => 0x6e0,
                        _ => 0x800 + rng.below(0x100) as u32,
                    };
                    let value = match rng.below(3) {
                        0 => rng.next(),
                        1 => rng.next() & 0xffff_ffff,
                        _ => 0xfee0_0000 | (rng.below(2) << 11) | (rng.below(2) << 10),
                    };
                    if rng.below(2) == 0 {
                        let _ = apic.read_msr(msr, t);
                    } else {
                        let _ = apic.write_msr(msr, value, t);
                    }
                }
                6 => apic.accept(&rng.interrupt()),
                7 => {
                    if let Some(v) = apic.pending_vector() {
                        apic.acknowledge(v);
                    } else {
                        apic.acknowledge(rng.byte());
                    }
                    apic.end_of_interrupt();
                }
                8 => {
                    apic.advance(t, rng.next());
                    if let Some(d) = apic.next_deadline_ns(t, rng.next()) {
                        assert!(d >= t);
                    }
                }
                9 => {
                    apic.set_lint0(rng.below(2) == 0);
                    apic.set_lint1(rng.below(2) == 0);
                    apic.pending_extint();
                    apic.acknowledge_extint();
                }
                10 => {
                    apic.matches_destination(&rng.interrupt().dest);
                    apic.take_nmi();
                    apic.take_init();
                    apic.take_startup();
                }
                _ => {
                    apic.set_tsc_deadline(rng.next());
                    apic.tsc_deadline();
                    apic.ppr();
                }
            }
        }
    }
}
