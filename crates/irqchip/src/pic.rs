//! The 8259A programmable interrupt controller pair of a PC.
//!
//! The master answers at ports 0x20/0x21 and the slave at 0xa0/0xa1; the
//! slave's INT output is cascaded into the master's IR2. The EISA edge/level
//! control registers (ELCR) sit at 0x4d0 (IRQ0-7) and 0x4d1 (IRQ8-15).
//!
//! Behaviour follows the Intel 8259A datasheet, restricted to what a PC
//! uses (x86 mode, cascade on IR2, no buffered mode) and to what Linux's
//! `arch/x86/kernel/i8259.c` does: the mask probe in `probe_8259A`, the
//! ICW sequence in `init_8259A`, specific EOIs in `mask_and_ack_8259A`, and
//! reading the ISR through OCW3 to detect spurious IRQ7 in
//! `i8259A_irq_real`.
//!
//! Edge/level triggering is per line and set by the ELCR (which is what
//! PIIX-style chipsets do; the LTIM bit of ICW1 is ignored). IRQ0, 1, 2, 8
//! and 13 are always edge-triggered, as on the PIIX.

/// Master PIC command port (ICW1, OCW2, OCW3; reads IRR/ISR).
pub const MASTER_CMD: u16 = 0x20;
/// Master PIC data port (ICW2-4, OCW1 = IMR).
pub const MASTER_DATA: u16 = 0x21;
/// Slave PIC command port.
pub const SLAVE_CMD: u16 = 0xa0;
/// Slave PIC data port.
pub const SLAVE_DATA: u16 = 0xa1;
/// ELCR for IRQ0-7.
pub const ELCR_MASTER: u16 = 0x4d0;
/// ELCR for IRQ8-15.
pub const ELCR_SLAVE: u16 = 0x4d1;

/// The master IR the slave is cascaded into.
const CASCADE_IRQ: u8 = 2;

/// Which ELCR bits may be set: IRQ0-2 (master) and IRQ8/IRQ13 (slave) are
/// hard-wired edge on the PIIX.
const ELCR_MASK_MASTER: u8 = 0xf8;
const ELCR_MASK_SLAVE: u8 = 0xde;

/// Where a chip is in its ICW1..ICW4 initialisation sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    /// Initialised: data port writes are OCW1 (the mask).
    Ready,
    /// ICW1 seen; the next data write is ICW2 (vector base).
    Icw2,
    /// ICW2 seen; the next data write is ICW3 (cascade wiring).
    Icw3,
    /// The next data write is ICW4 (mode).
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone)]
struct Chip {
    /// Interrupt request register: requests waiting for service.
    irr: u8,
    /// In-service register: requests acknowledged and not yet EOI'd.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Current level of each input line; used for edge detection.
    lines: u8,
    /// ELCR: 1 = level-triggered.
    elcr: u8,
    elcr_mask: u8,
    /// Rotation: the IR with the highest priority. Priority of IR n is
    /// `(n - lowest_priority_base) & 7`, 0 being the highest.
    priority_base: u8,
    /// ICW2: vector of IR0 (low 3 bits are forced to 0 in x86 mode).
    vector_base: u8,
    /// OCW3 RR/RIS: data read from the command port is the ISR (else IRR).
    read_isr: bool,
    /// OCW3 P: the next read of either port is a poll.
    poll: bool,
    /// OCW3 special mask mode: masked IRs do not block lower priorities.
    special_mask: bool,
    init: InitState,
    /// ICW1 IC4: an ICW4 follows.
    expect_icw4: bool,
    /// ICW1 SNGL: no ICW3.
    single: bool,
    /// ICW4 AEOI.
    auto_eoi: bool,
    /// OCW2 rotate-in-automatic-EOI mode.
    rotate_on_auto_eoi: bool,
    /// ICW4 SFNM: on the master, an in-service cascade input does not block
    /// further (higher priority) requests from the slave.
    special_fully_nested: bool,
    is_master: bool,
}

impl Chip {
    fn new(is_master: bool) -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0,
            lines: 0,
            elcr: 0,
            elcr_mask: if is_master {
                ELCR_MASK_MASTER
            } else {
                ELCR_MASK_SLAVE
            },
            priority_base: 0,
            vector_base: 0,
            read_isr: false,
            poll: false,
            special_mask: false,
            init: InitState::Ready,
            expect_icw4: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            is_master,
        }
    }

    /// Drives input line `irq` (0..7) to `level`.
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if self.elcr & bit != 0 {
            // Level-triggered: the request follows the line.
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            // Edge-triggered: a rising edge latches a request, which stays
            // latched until acknowledged even if the line drops (devices
            // that pulse their line rely on this).
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit set in `mask`,
    /// or 8 if none.
    fn priority_of(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_base) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IR that would be delivered now: the highest-priority unmasked
    /// request, if it beats everything in service.
    fn pending_irq(&self) -> Option<u8> {
        let requests = self.irr & !self.imr;
        let priority = self.priority_of(requests);
        if priority == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: a masked IR in service does not inhibit
            // lower priorities (datasheet, OCW3 ESMM/SMM).
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            // SFNM: the slave's own priority logic arbitrates among its
            // inputs, so a cascade in service must not block it.
            in_service &= !(1 << CASCADE_IRQ);
        }
        (priority < self.priority_of(in_service)).then_some((priority + self.priority_base) & 7)
    }

    /// INTA for `irq`: move it from IRR to ISR (or EOI at once in AEOI).
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // A level-triggered request stays in IRR while the line is high.
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// Poll command read: acknowledges like INTA and returns 0x80 | IR,
    /// or 0 when nothing is pending.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending_irq() {
            Some(irq) => {
                self.ack(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1. The datasheet: IMR cleared, IR7 gets lowest priority,
            // special mask mode cleared, IRR selected for reading, and the
            // edge-sense latches reset (a line that is already high needs a
            // new low-to-high transition: `lines` keeps the current levels,
            // so that is what happens). ICW4-controlled modes go back to
            // their defaults since ICW4 may not follow.
            self.expect_icw4 = value & 0x01 != 0;
            self.single = value & 0x02 != 0;
            self.imr = 0;
            self.isr = 0;
            // Level-triggered requests reflect lines that are still high.
            self.irr = self.lines & self.elcr;
            self.priority_base = 0;
            self.read_isr = false;
            self.poll = false;
            self.special_mask = false;
            self.auto_eoi = false;
            self.rotate_on_auto_eoi = false;
            self.special_fully_nested = false;
            self.init = InitState::Icw2;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2: R, SL, EOI in bits 7..5, IR level in bits 2..0.
            let level = value & 7;
            match value >> 5 {
                // Rotate in automatic EOI mode: clear (0) / set (4).
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                // Non-specific EOI (1), rotate on non-specific EOI (5): the
                // highest-priority IR in service is the one being ended.
                cmd @ (1 | 5) => {
                    let priority = self.priority_of(self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_base) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_base = (irq + 1) & 7;
                        }
                    }
                }
                // Specific EOI.
                3 => self.isr &= !(1 << level),
                // Set priority: `level` becomes the lowest priority.
                6 => self.priority_base = (level + 1) & 7,
                // Rotate on specific EOI.
                7 => {
                    self.isr &= !(1 << level);
                    self.priority_base = (level + 1) & 7;
                }
                // 2: no operation.
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            InitState::Ready => self.imr = value,
            InitState::Icw2 => {
                // x86 mode: T7..T3 from ICW2, the IR number fills the rest.
                self.vector_base = value & 0xf8;
                self.init = if self.single {
                    if self.expect_icw4 {
                        InitState::Icw4
                    } else {
                        InitState::Ready
                    }
                } else {
                    InitState::Icw3
                };
            }
            InitState::Icw3 => {
                // The cascade wiring is fixed on a PC; nothing to record.
                self.init = if self.expect_icw4 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                };
            }
            InitState::Icw4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                self.init = InitState::Ready;
            }
        }
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            return self.poll_read();
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    fn read_data(&mut self) -> u8 {
        if self.poll {
            return self.poll_read();
        }
        self.imr
    }

    fn write_elcr(&mut self, value: u8) {
        self.elcr = value & self.elcr_mask;
        // Lines switched to level trigger request service while high.
        self.irr |= self.lines & self.elcr;
    }
}

/// The master/slave 8259A pair and its ELCR.
///
/// The slave's output is re-evaluated and fed into the master's IR2 after
/// every state change, so [`DualPic::output`] is always current.
#[derive(Debug, Clone)]
pub struct DualPic {
    master: Chip,
    slave: Chip,
}

impl Default for DualPic {
    fn default() -> Self {
        Self::new()
    }
}

impl DualPic {
    /// The pair in its power-on state: nothing masked, vector base 0 (the
    /// BIOS or the kernel programs it with ICW1-4 before use).
    pub fn new() -> Self {
        Self {
            master: Chip::new(true),
            slave: Chip::new(false),
        }
    }

    /// Whether `port` belongs to the PIC pair or its ELCR.
    pub fn handles_port(port: u16) -> bool {
        matches!(
            port,
            MASTER_CMD | MASTER_DATA | SLAVE_CMD | SLAVE_DATA | ELCR_MASTER | ELCR_SLAVE
        )
    }

    /// Guest `IN` from `port`. Ports that are not the PIC's read as 0xff.
    pub fn read(&mut self, port: u16) -> u8 {
        let value = match port {
            MASTER_CMD => self.master.read_command(),
            MASTER_DATA => self.master.read_data(),
            SLAVE_CMD => self.slave.read_command(),
            SLAVE_DATA => self.slave.read_data(),
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            _ => return 0xff,
        };
        // A poll read acknowledges, which can change the outputs.
        self.update();
        value
    }

    /// Guest `OUT` to `port`. Ports that are not the PIC's are ignored.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.master.write_command(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_CMD => self.slave.write_command(value),
            SLAVE_DATA => self.slave.write_data(value),
            ELCR_MASTER => self.master.write_elcr(value),
            ELCR_SLAVE => self.slave.write_elcr(value),
            _ => return,
        }
        self.update();
    }

    /// Drives ISA interrupt line `irq` (0..15) to `level`. Edge-triggered
    /// lines latch a request on a rising edge (pulse them: high then low);
    /// level-triggered lines (per ELCR) request service while high.
    /// IRQ2 is the cascade input and cannot be driven from outside; out of
    /// range IRQs are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => return,
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => return,
        }
        self.update();
    }

    /// The master's INTR output: the boot CPU's LINT0 (ExtINT) input.
    pub fn output(&self) -> bool {
        self.master.pending_irq().is_some()
    }

    /// The INTA cycle: returns the vector the CPU would read and moves the
    /// request from IRR to ISR (unless in auto-EOI mode).
    ///
    /// If nothing is pending any more (the request went away between INTR
    /// and INTA), the 8259A answers with IR7's vector without setting ISR:
    /// the "spurious IRQ7" that Linux detects by reading the ISR. The same
    /// happens on the slave (spurious IRQ15) when the master acknowledges
    /// the cascade input but the slave has nothing left; the master's IR2
    /// is then in service and needs an EOI like any other.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.pending_irq() {
            Some(CASCADE_IRQ) => {
                self.master.ack(CASCADE_IRQ);
                let irq = match self.slave.pending_irq() {
                    Some(irq) => {
                        self.slave.ack(irq);
                        irq
                    }
                    None => 7,
                };
                self.slave.vector_base.wrapping_add(irq)
            }
            Some(irq) => {
                self.master.ack(irq);
                self.master.vector_base.wrapping_add(irq)
            }
            None => self.master.vector_base.wrapping_add(7),
        };
        self.update();
        vector
    }

    /// Re-evaluates the slave's INT output into the master's IR2.
    fn update(&mut self) {
        let slave_output = self.slave.pending_irq().is_some();
        self.master.set_line(CASCADE_IRQ, slave_output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `init_8259A(0)` (arch/x86/kernel/i8259.c): mask all, ICW1
    /// 0x11 (edge, cascade, ICW4 needed), ICW2 vector base 0x30 / 0x38
    /// (ISA_IRQ_VECTOR(0) on x86-64), ICW3 cascade on IR2 / slave ID 2,
    /// ICW4 0x01 (8086 mode, normal EOI), then restore the masks.
    fn linux_init(pic: &mut DualPic, auto_eoi: bool) {
        pic.write(MASTER_DATA, 0xff);
        pic.write(MASTER_CMD, 0x11);
        pic.write(MASTER_DATA, 0x30);
        pic.write(MASTER_DATA, 1 << 2);
        pic.write(MASTER_DATA, if auto_eoi { 0x03 } else { 0x01 });
        pic.write(SLAVE_CMD, 0x11);
        pic.write(SLAVE_DATA, 0x38);
        pic.write(SLAVE_DATA, 2);
        pic.write(SLAVE_DATA, 0x01);
        // cached_master_mask with only the cascade unmasked, slave all masked.
        pic.write(MASTER_DATA, 0xfb);
        pic.write(SLAVE_DATA, 0xff);
    }

    /// `enable_8259A_irq`: clear the IRQ's mask bit.
    fn unmask(pic: &mut DualPic, irq: u8) {
        if irq < 8 {
            let m = pic.read(MASTER_DATA) & !(1 << irq);
            pic.write(MASTER_DATA, m);
        } else {
            let m = pic.read(SLAVE_DATA) & !(1 << (irq - 8));
            pic.write(SLAVE_DATA, m);
        }
    }

    /// `mask_and_ack_8259A`: specific EOI (0x60 + IR) to the chip(s).
    fn linux_eoi(pic: &mut DualPic, irq: u8) {
        if irq >= 8 {
            pic.write(SLAVE_CMD, 0x60 + (irq & 7));
            pic.write(MASTER_CMD, 0x60 + 2);
        } else {
            pic.write(MASTER_CMD, 0x60 + irq);
        }
    }

    fn pulse(pic: &mut DualPic, irq: u8) {
        pic.set_irq(irq, true);
        pic.set_irq(irq, false);
    }

    fn read_isr_master(pic: &mut DualPic) -> u8 {
        // `i8259A_irq_real`: OCW3 0x0b selects ISR, 0x0a back to IRR.
        pic.write(MASTER_CMD, 0x0b);
        let isr = pic.read(MASTER_CMD);
        pic.write(MASTER_CMD, 0x0a);
        isr
    }

    #[test]
    fn mask_probe_like_linux() {
        // `probe_8259A`: mask the slave, write 0xfb to the master IMR and
        // expect to read it back; otherwise Linux uses the null PIC.
        let mut pic = DualPic::new();
        pic.write(SLAVE_DATA, 0xff);
        pic.write(MASTER_DATA, 0xfb);
        assert_eq!(pic.read(MASTER_DATA), 0xfb);
        assert_eq!(pic.read(SLAVE_DATA), 0xff);
    }

    #[test]
    fn init_sequence_then_data_port_is_mask() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.read(MASTER_DATA), 0xfb);
        assert_eq!(pic.read(SLAVE_DATA), 0xff);
        // ICW1 clears the IMR.
        pic.write(MASTER_CMD, 0x11);
        assert_eq!(pic.read(MASTER_DATA), 0);
    }

    #[test]
    fn edge_irq_delivers_vector_and_needs_eoi() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 1);
        assert!(!pic.output());
        pulse(&mut pic, 1);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x31);
        assert!(!pic.output());
        assert_eq!(read_isr_master(&mut pic), 0x02);
        // A second edge while in service is latched in IRR but blocked.
        pulse(&mut pic, 1);
        assert!(!pic.output());
        assert_eq!(pic.read(MASTER_CMD), 0x02, "IRR readable after OCW3 0x0a");
        linux_eoi(&mut pic, 1);
        assert_eq!(read_isr_master(&mut pic), 0);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x31);
    }

    #[test]
    fn masked_irq_is_held_in_irr() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pulse(&mut pic, 4);
        assert!(!pic.output());
        unmask(&mut pic, 4);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x34);
    }

    #[test]
    fn held_edge_line_does_not_retrigger() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 3);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x33);
        linux_eoi(&mut pic, 3);
        pic.set_irq(3, true);
        assert!(!pic.output(), "no new edge while the line stays high");
        pic.set_irq(3, false);
        pic.set_irq(3, true);
        assert!(pic.output());
    }

    #[test]
    fn priority_between_two_irqs_and_nesting() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 0);
        unmask(&mut pic, 4);
        pulse(&mut pic, 4);
        pulse(&mut pic, 0);
        // IR0 has priority over IR4.
        assert_eq!(pic.acknowledge(), 0x30);
        // IR4 is lower priority than IR0 in service: blocked.
        assert!(!pic.output());
        // A new IR0 is blocked too (same level in service)...
        linux_eoi(&mut pic, 0);
        assert_eq!(pic.acknowledge(), 0x34);
        // ...but a higher priority one nests over IR4.
        pulse(&mut pic, 0);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x30);
        assert_eq!(read_isr_master(&mut pic), 0x11);
        // Non-specific EOI ends the highest priority in service (IR0).
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(read_isr_master(&mut pic), 0x10);
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(read_isr_master(&mut pic), 0);
    }

    #[test]
    fn cascade_from_slave() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 12);
        unmask(&mut pic, 14);
        pulse(&mut pic, 14);
        pulse(&mut pic, 12);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x38 + 4, "IRQ12 beats IRQ14");
        assert_eq!(read_isr_master(&mut pic), 0x04, "cascade IR2 in service");
        assert!(!pic.output());
        linux_eoi(&mut pic, 12);
        // The slave still has IRQ14: it must reach the CPU again.
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x38 + 6);
        linux_eoi(&mut pic, 14);
        assert!(!pic.output());
        pic.write(SLAVE_CMD, 0x0b);
        assert_eq!(pic.read(SLAVE_CMD), 0);
    }

    #[test]
    fn slave_masked_at_master_blocks_cascade() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 9);
        let m = pic.read(MASTER_DATA) | 0x04;
        pic.write(MASTER_DATA, m);
        pulse(&mut pic, 9);
        assert!(!pic.output());
        unmask(&mut pic, 2);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x39);
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        // INTA with nothing pending: IR7's vector, ISR untouched, which is
        // how `i8259A_irq_real` tells it is spurious.
        assert_eq!(pic.acknowledge(), 0x37);
        assert_eq!(read_isr_master(&mut pic), 0);
        // A level-triggered slave request that drops between INTR and INTA
        // gives spurious IRQ15: the cascade is in service on the master.
        pic.write(ELCR_SLAVE, 1 << 3); // IRQ11 level
        unmask(&mut pic, 11);
        pic.set_irq(11, true);
        assert!(pic.output());
        // Mask it at the slave only after the master latched IR2: the
        // cascade edge stays in the master's IRR.
        pic.write(SLAVE_DATA, 0xff);
        assert_eq!(pic.acknowledge(), 0x3f);
        assert_eq!(read_isr_master(&mut pic), 0x04);
        pic.write(SLAVE_CMD, 0x0b);
        assert_eq!(pic.read(SLAVE_CMD), 0, "IR7 of the slave not in service");
    }

    #[test]
    fn level_triggered_follows_line() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pic.write(ELCR_MASTER, 0xff);
        assert_eq!(pic.read(ELCR_MASTER), 0xf8, "IRQ0-2 hard-wired edge");
        unmask(&mut pic, 5);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), 0x35);
        linux_eoi(&mut pic, 5);
        // Still asserted: requests again without a new edge.
        assert!(pic.output());
        pic.set_irq(5, false);
        assert!(!pic.output());
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, true);
        unmask(&mut pic, 1);
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), 0x31);
        assert_eq!(read_isr_master(&mut pic), 0);
        pulse(&mut pic, 1);
        assert!(pic.output());
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 6);
        pulse(&mut pic, 6);
        pic.write(MASTER_CMD, 0x0c); // OCW3 poll
        assert_eq!(pic.read(MASTER_CMD), 0x86);
        assert_eq!(read_isr_master(&mut pic), 0x40);
        pic.write(MASTER_CMD, 0x0c);
        assert_eq!(pic.read(MASTER_DATA), 0, "poll with nothing pending");
        // The poll was one-shot: the data port is the IMR again.
        assert_eq!(pic.read(MASTER_DATA), 0xbb);
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0);
        // Set priority: IR3 lowest, so IR4 highest.
        pic.write(MASTER_CMD, 0xc0 | 3);
        pulse(&mut pic, 1);
        pulse(&mut pic, 5);
        assert_eq!(pic.acknowledge(), 0x35);
        // Rotate on non-specific EOI: IR5 becomes lowest, IR6 highest.
        pic.write(MASTER_CMD, 0xa0);
        assert_eq!(pic.acknowledge(), 0x31);
        pic.write(MASTER_CMD, 0xe0 | 1); // rotate on specific EOI of IR1
        pulse(&mut pic, 1);
        pulse(&mut pic, 2 + 1); // IR3
        assert_eq!(pic.acknowledge(), 0x33, "IR1 is now the lowest priority");
    }

    #[test]
    fn special_mask_mode_allows_lower_priority() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0);
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), 0x31);
        pulse(&mut pic, 5);
        assert!(!pic.output());
        // Mask IR1 and enter special mask mode: IR5 may now interrupt.
        pic.write(MASTER_DATA, 0x02);
        pic.write(MASTER_CMD, 0x68);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x35);
    }
}
