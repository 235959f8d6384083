//! The local APIC of one vCPU: xAPIC MMIO registers, x2APIC MSRs, interrupt
//! acceptance and priority, IPIs, INIT/SIPI, LINT0/LINT1 and the timer.
//!
//! Behaviour follows the Intel SDM vol. 3A chapter 11 ("Advanced
//! Programmable Interrupt Controller") and, where the SDM leaves a choice,
//! what KVM's `arch/x86/kvm/lapic.c` does, since that is what Linux guests
//! are used to seeing under virtualization:
//!
//! - version register 0x0005_0014 (version 0x14, 6 LVT entries: timer,
//!   thermal, performance, LINT0, LINT1, error; no CMCI, no directed EOI);
//! - the timer counts at a configurable frequency (default 1 GHz, as KVM)
//!   divided by the divide configuration register;
//! - fixed interrupts are dropped while the APIC is software-disabled;
//! - at reset the BSP's LINT0 is unmasked in ExtINT mode (virtual wire), so
//!   the 8259A reaches the boot CPU before the guest touches the APIC.
//!
//! Nothing is delivered behind the caller's back: IPIs and EOIs for
//! level-triggered vectors come back as [`LapicAction`]s from register
//! writes, the timer fires only in [`LocalApic::advance`], and NMI, INIT,
//! SIPI and ExtINT are flags the vCPU loop collects.

use crate::{DeliveryMode, Destination, Interrupt};

/// Default guest-physical base of the xAPIC MMIO page.
pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC MMIO page.
pub const APIC_MMIO_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First and last x2APIC register MSRs.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8ff;
/// Version register: version 0x14, max LVT entry 5.
pub const VERSION: u32 = 0x0005_0014;
/// KVM's APIC timer base frequency.
pub const DEFAULT_TIMER_HZ: u64 = 1_000_000_000;

const NS_PER_SEC: u128 = 1_000_000_000;

// IA32_APIC_BASE bits.
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_ENABLE: u64 = 1 << 11;
/// Bits 0-7 and 9 are reserved; so are address bits beyond the 52-bit
/// architectural maximum.
const BASE_RESERVED: u64 = 0x2ff | (!0u64 << 52);

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
/// x2APIC only.
const REG_SELF_IPI: u32 = 0x3f0;

// SVR bits.
const SVR_ENABLE: u32 = 1 << 8;
/// Vector, enable and (Pentium-era) focus checking are writable.
const SVR_WRITABLE: u32 = 0x3ff;

// LVT bits.
const LVT_MASKED: u32 = 1 << 16;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_TIMER_MODE_SHIFT: u32 = 17;

/// LVT indices, in register order from 0x320.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;
const NUM_LVT: usize = 6;
/// Writable bits of each LVT (delivery status and remote IRR are
/// read-only; the timer has no delivery mode, the error LVT neither).
const LVT_WRITABLE: [u32; NUM_LVT] = [
    0x0007_00ff, // timer: mask, mode (bits 17-18), vector
    0x0001_07ff, // thermal: mask, delivery mode, vector
    0x0001_07ff, // performance counters
    0x0001_a7ff, // LINT0: mask, trigger, polarity, delivery mode, vector
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: mask, vector
];

// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// The three timer modes of LVT timer bits 17-18.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// What a register write asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicAction {
    /// Route this interrupt (an IPI from the ICR or SELF IPI register) to
    /// the APICs it matches (see [`LocalApic::matches_destination`]),
    /// possibly including this one.
    Ipi(Interrupt),
    /// EOI of a level-triggered vector: forward to the IOAPIC(s) with
    /// [`crate::ioapic::IoApic::end_of_interrupt`].
    Eoi(u8),
}

/// An MSR access the guest must receive #GP for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsrFault {
    /// The MSR does not exist or is not accessible in the current APIC
    /// mode (e.g. x2APIC registers while in xAPIC mode, or write-only).
    #[error("MSR {0:#x} is not accessible in the current APIC mode")]
    NotAccessible(u32),
    /// The value is not acceptable for the MSR (reserved bits, invalid
    /// APIC mode transition, nonzero EOI write in x2APIC mode).
    #[error("invalid value {value:#x} for MSR {msr:#x}")]
    InvalidValue { msr: u32, value: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Not counting (current count reads 0).
    Stopped,
    /// One-shot or periodic: `base_ticks` ticks had elapsed since the
    /// initial count was loaded at `anchor_ns` (nonzero after a divide
    /// change, which re-anchors the count at the new rate); `fired`
    /// periods have been delivered.
    Running {
        anchor_ns: u64,
        base_ticks: u64,
        fired: u64,
    },
}

/// One local APIC.
#[derive(Debug, Clone)]
pub struct LocalApic {
    /// APIC ID the vCPU was created with (x2APIC ID, and xAPIC ID at reset).
    initial_id: u32,
    /// Current APIC ID (xAPIC lets software change it).
    id: u32,
    /// IA32_APIC_BASE.
    base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// ESR as last latched by a write.
    esr: u32,
    /// Errors since the last ESR write.
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; NUM_LVT],
    timer_initial: u32,
    timer_divide: u32,
    timer: Timer,
    tsc_deadline: u64,
    timer_hz: u64,
    tsc_hz: u64,
    /// Levels of the LINT0 and LINT1 pins.
    lint: [bool; 2],
    nmi_pending: bool,
    init_pending: bool,
    startup_pending: Option<u8>,
    /// An ExtINT message (not a LINT pin) awaits the PIC's vector.
    extint_pending: bool,
    wait_for_sipi: bool,
}

fn highest_bit(regs: &[u32; 8]) -> Option<u8> {
    (0..8u8).rev().find_map(|i| {
        let word = regs[usize::from(i)];
        // 31 - leading_zeros < 32, so the sum fits in a u8.
        (word != 0).then(|| i * 32 + (31 - word.leading_zeros() as u8))
    })
}

fn test_bit(regs: &[u32; 8], vector: u8) -> bool {
    regs[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn set_bit(regs: &mut [u32; 8], vector: u8, on: bool) {
    let word = &mut regs[usize::from(vector >> 5)];
    if on {
        *word |= 1 << (vector & 31);
    } else {
        *word &= !(1 << (vector & 31));
    }
}

impl LocalApic {
    /// A local APIC with ID `apic_id` in its power-on state: xAPIC mode,
    /// hardware-enabled at 0xfee00000, software-disabled; `bsp` sets the
    /// BSP flag (and the virtual-wire LINT0 setup). The timer runs at
    /// [`DEFAULT_TIMER_HZ`]; the TSC is assumed to run at 1 GHz until
    /// [`LocalApic::with_tsc_hz`] says otherwise.
    pub fn new(apic_id: u32, bsp: bool) -> Self {
        let mut apic = Self {
            initial_id: apic_id,
            id: apic_id,
            base: APIC_DEFAULT_BASE | BASE_ENABLE | if bsp { BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; NUM_LVT],
            timer_initial: 0,
            timer_divide: 0,
            timer: Timer::Stopped,
            tsc_deadline: 0,
            timer_hz: DEFAULT_TIMER_HZ,
            tsc_hz: 1_000_000_000,
            lint: [false; 2],
            nmi_pending: false,
            init_pending: false,
            startup_pending: None,
            extint_pending: false,
            wait_for_sipi: false,
        };
        apic.reset_registers();
        apic
    }

    /// Sets the frequency the timer counts at before the divider (KVM:
    /// 1 GHz). Zero is treated as 1 Hz.
    pub fn with_timer_hz(mut self, hz: u64) -> Self {
        self.timer_hz = hz.max(1);
        self
    }

    /// Sets the guest TSC frequency, which relates TSC-deadline values to
    /// virtual time. Zero is treated as 1 Hz.
    pub fn with_tsc_hz(mut self, hz: u64) -> Self {
        self.tsc_hz = hz.max(1);
        self
    }

    /// The current APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this is the bootstrap processor's APIC.
    pub fn is_bsp(&self) -> bool {
        self.base & BASE_BSP != 0
    }

    fn hw_enabled(&self) -> bool {
        self.base & BASE_ENABLE != 0
    }

    /// Whether the APIC is in x2APIC mode (MSR access, no MMIO).
    pub fn is_x2apic(&self) -> bool {
        self.hw_enabled() && self.base & BASE_EXTD != 0
    }

    /// Whether the xAPIC MMIO page is decoded (hardware-enabled, not x2APIC).
    pub fn mmio_enabled(&self) -> bool {
        self.hw_enabled() && !self.is_x2apic()
    }

    /// Whether software enabled the APIC (SVR bit 8) — and the hardware
    /// enable is on.
    pub fn software_enabled(&self) -> bool {
        self.hw_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// Register state after power-on, INIT, or a hardware disable. The
    /// ID and IA32_APIC_BASE survive (SDM 11.4.7.3).
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; NUM_LVT];
        if self.is_bsp() {
            // Virtual wire mode, as KVM sets up: the PIC reaches the BSP.
            self.lvt[LVT_LINT0] = DeliveryMode::ExtInt.bits() << 8;
        }
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer = Timer::Stopped;
        self.tsc_deadline = 0;
        self.nmi_pending = false;
        self.extint_pending = false;
        self.startup_pending = None;
    }

    /// INIT (from an INIT IPI or the INIT pin): resets the APIC's registers
    /// and, on an AP, enters wait-for-SIPI. The vCPU learns of it through
    /// [`LocalApic::take_init`] and must reset its own architectural state.
    pub fn init(&mut self) {
        self.reset_registers();
        self.init_pending = true;
        self.wait_for_sipi = !self.is_bsp();
    }

    /// Start-up IPI with `vector`: honoured only in wait-for-SIPI, where it
    /// asks the vCPU (via [`LocalApic::take_startup`]) to start in real
    /// mode at `vector * 0x1000`. Otherwise ignored, as on hardware.
    pub fn startup(&mut self, vector: u8) {
        if self.wait_for_sipi {
            self.wait_for_sipi = false;
            self.startup_pending = Some(vector);
        }
    }

    /// Whether the vCPU is parked waiting for a SIPI (it must not run).
    pub fn is_waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// Consumes a pending INIT: the vCPU resets its state.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init_pending)
    }

    /// Consumes a pending SIPI: the vCPU starts at `vector * 0x1000`
    /// (CS = vector << 8, IP = 0) in real mode.
    pub fn take_startup(&mut self) -> Option<u8> {
        self.startup_pending.take()
    }

    /// Consumes a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    // ----- priorities -------------------------------------------------

    fn isrv(&self) -> u32 {
        highest_bit(&self.isr).map_or(0, u32::from)
    }

    /// Processor priority (SDM 11.8.3.1): the TPR, or the in-service
    /// class if higher.
    pub fn ppr(&self) -> u32 {
        let isrv = self.isrv();
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Arbitration priority (SDM 11.6.2.4 / 11.8.3.1).
    fn apr(&self) -> u32 {
        let isrv = self.isrv();
        let irrv = highest_bit(&self.irr).map_or(0, u32::from);
        if self.tpr >> 4 >= irrv >> 4 && self.tpr >> 4 > isrv >> 4 {
            self.tpr
        } else {
            (self.tpr & 0xf0).max(isrv & 0xf0).max(irrv & 0xf0)
        }
    }

    /// The vector the APIC would present to the CPU now: the highest
    /// requested vector whose priority class is above the PPR's. `None`
    /// when the APIC is disabled (hardware or software).
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let irrv = highest_bit(&self.irr)?;
        (u32::from(irrv) & 0xf0 > self.ppr() & 0xf0).then_some(irrv)
    }

    /// The CPU took `vector` (as returned by [`LocalApic::pending_vector`]):
    /// IRR → ISR, which raises the PPR. Ignored if `vector` is not requested.
    pub fn acknowledge(&mut self, vector: u8) {
        if test_bit(&self.irr, vector) {
            set_bit(&mut self.irr, vector, false);
            set_bit(&mut self.isr, vector, true);
        }
    }

    /// EOI: ends the highest-priority in-service vector. Returns the vector
    /// if it was level-triggered (TMR set), for the IOAPIC.
    pub fn end_of_interrupt(&mut self) -> Option<u8> {
        let vector = highest_bit(&self.isr)?;
        set_bit(&mut self.isr, vector, false);
        test_bit(&self.tmr, vector).then_some(vector)
    }

    // ----- interrupt acceptance ----------------------------------------

    /// Accepts an interrupt message the router decided is for this APIC
    /// (see [`LocalApic::matches_destination`]). Fixed and lowest-priority
    /// messages set IRR (and TMR when level-triggered) if the APIC is
    /// software-enabled; NMI, INIT, SIPI and ExtINT set flags for the vCPU.
    /// SMIs are dropped: vessel's vCPUs have no SMM.
    pub fn accept(&mut self, irq: &Interrupt) {
        if !self.hw_enabled() {
            return;
        }
        match irq.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_fixed(irq.vector, irq.level_triggered);
            }
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::Init => self.init(),
            DeliveryMode::Startup => self.startup(irq.vector),
            DeliveryMode::ExtInt => self.extint_pending = true,
            DeliveryMode::Smi => {}
        }
    }

    fn accept_fixed(&mut self, vector: u8, level_triggered: bool) {
        if !self.software_enabled() {
            // KVM drops fixed interrupts to a software-disabled APIC.
            return;
        }
        if vector < 16 {
            // Vectors 0-15 are reserved for exceptions.
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
    }

    fn signal_error(&mut self, bits: u32) {
        let already_seen = self.esr_pending & bits == bits;
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        // Only new errors interrupt; and the error vector itself must be
        // legal, which keeps this from recursing.
        let vector = (lvt & 0xff) as u8;
        if !already_seen && lvt & LVT_MASKED == 0 && vector >= 16 && self.software_enabled() {
            set_bit(&mut self.irr, vector, true);
            set_bit(&mut self.tmr, vector, false);
        }
    }

    /// Whether an interrupt message with destination `dest` is for this
    /// APIC, given its current ID, LDR, DFR and mode. Lowest-priority
    /// arbitration among several matches is the router's job.
    pub fn matches_destination(&self, dest: &Destination) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        let x2 = self.is_x2apic();
        match *dest {
            Destination::Physical(d) if x2 => d == u32::MAX || d == self.id,
            Destination::Physical(d) => {
                let d = d & 0xff;
                d == 0xff || d == self.id & 0xff
            }
            Destination::Logical(d) if x2 => {
                let ldr = self.ldr();
                d == u32::MAX || (d >> 16 == ldr >> 16 && d & ldr & 0xffff != 0)
            }
            Destination::Logical(d) => {
                let d = d & 0xff;
                let ldr = self.ldr >> 24;
                if d == 0xff {
                    true
                } else if self.dfr >> 28 == 0xf {
                    // Flat model: one bit per APIC.
                    ldr & d != 0
                } else {
                    // Cluster model: cluster in the high nibble.
                    d >> 4 == ldr >> 4 && d & ldr & 0xf != 0
                }
            }
            Destination::SelfOnly(source) => source == self.id,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf(source) => source != self.id,
        }
    }

    // ----- LINT pins and ExtINT -----------------------------------------

    /// Drives the LINT0 pin (on the BSP: the 8259A's INTR output).
    pub fn set_lint0(&mut self, level: bool) {
        self.set_lint(0, level);
    }

    /// Drives the LINT1 pin (on a PC: NMI).
    pub fn set_lint1(&mut self, level: bool) {
        self.set_lint(1, level);
    }

    fn set_lint(&mut self, pin: usize, level: bool) {
        let rising = level && !self.lint[pin];
        self.lint[pin] = level;
        if !rising {
            return;
        }
        if !self.hw_enabled() {
            // A disabled APIC passes LINT1 straight through as NMI
            // (LINT0 as INTR is handled by `pending_extint`).
            if pin == 1 {
                self.nmi_pending = true;
            }
            return;
        }
        let lvt = self.lvt[LVT_LINT0 + pin];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        match DeliveryMode::from_bits(lvt >> 8) {
            DeliveryMode::Fixed => self.accept_fixed((lvt & 0xff) as u8, lvt & LVT_LEVEL != 0),
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::Init => self.init(),
            // ExtINT is level-sensitive: see `pending_extint`.
            _ => {}
        }
    }

    /// Whether the CPU should run an INTA cycle to the 8259A: an ExtINT
    /// message arrived, or LINT0/LINT1 is asserted and routed as ExtINT
    /// (or the APIC is hardware-disabled, making LINT0 the plain INTR pin).
    /// ExtINT bypasses the TPR/PPR. After taking the vector from
    /// [`crate::pic::DualPic::acknowledge`], call
    /// [`LocalApic::acknowledge_extint`].
    pub fn pending_extint(&self) -> bool {
        if self.extint_pending {
            return true;
        }
        if !self.hw_enabled() {
            return self.lint[0];
        }
        (0..2).any(|pin| {
            let lvt = self.lvt[LVT_LINT0 + pin];
            self.lint[pin]
                && lvt & LVT_MASKED == 0
                && DeliveryMode::from_bits(lvt >> 8) == DeliveryMode::ExtInt
        })
    }

    /// The CPU performed the INTA for an ExtINT.
    pub fn acknowledge_extint(&mut self) {
        self.extint_pending = false;
    }

    // ----- registers ------------------------------------------------------

    /// The LDR as the current mode defines it (derived from the ID in x2APIC).
    fn ldr(&self) -> u32 {
        if self.is_x2apic() {
            ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
        } else {
            self.ldr
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            // 3 is reserved; treat it like one-shot.
            _ => TimerMode::OneShot,
        }
    }

    /// Reads the register at `offset` (16-byte aligned). Unknown offsets
    /// read 0.
    fn read_register(&self, offset: u32, now_ns: u64) -> u32 {
        match offset {
            REG_ID => {
                if self.is_x2apic() {
                    self.id
                } else {
                    self.id << 24
                }
            }
            REG_VERSION => VERSION,
            REG_TPR => self.tpr,
            REG_APR => self.apr(),
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr(),
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((offset - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((offset - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.lvt[((offset - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.timer_current(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            // EOI, RRD (remote read is not supported) and reserved.
            _ => 0,
        }
    }

    /// Writes `value` to the register at `offset` (16-byte aligned).
    fn write_register(&mut self, offset: u32, value: u32, now_ns: u64) -> Option<LapicAction> {
        match offset {
            REG_ID if !self.is_x2apic() => self.id = value >> 24,
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => return self.end_of_interrupt().map(LapicAction::Eoi),
            REG_LDR if !self.is_x2apic() => self.ldr = value & 0xff00_0000,
            REG_DFR if !self.is_x2apic() => self.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.svr = value & SVR_WRITABLE;
                if self.svr & SVR_ENABLE == 0 {
                    // Software disable masks every LVT (SDM 11.4.7.2).
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                // A write latches the errors seen since the last write.
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW => {
                // Delivery is instantaneous: the status bit stays idle.
                self.icr_low = value & !(1 << 12);
                return self.send_ipi();
            }
            REG_ICR_HIGH if !self.is_x2apic() => self.icr_high = value & 0xff00_0000,
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                let index = ((offset - REG_LVT_TIMER) >> 4) as usize;
                self.write_lvt(index, value);
            }
            REG_TIMER_INITIAL => self.write_timer_initial(value, now_ns),
            REG_TIMER_DIVIDE => self.write_timer_divide(value, now_ns),
            REG_SELF_IPI if self.is_x2apic() => {
                return Some(LapicAction::Ipi(Interrupt {
                    dest: Destination::SelfOnly(self.id),
                    vector: (value & 0xff) as u8,
                    delivery: DeliveryMode::Fixed,
                    level_triggered: false,
                }));
            }
            // Read-only registers: writes are ignored.
            REG_ID
            | REG_VERSION
            | REG_APR
            | REG_PPR
            | REG_RRD
            | REG_LDR
            | REG_DFR
            | REG_ICR_HIGH
            | REG_TIMER_CURRENT
            | 0x100..=0x270 => {}
            _ => self.signal_error(ESR_ILLEGAL_REGISTER),
        }
        None
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut value = value & LVT_WRITABLE[index];
        if !self.software_enabled() {
            // LVT mask bits cannot be cleared while software-disabled.
            value |= LVT_MASKED;
        }
        let old_mode = self.timer_mode();
        self.lvt[index] = value;
        if index == LVT_TIMER && self.timer_mode() != old_mode {
            // A mode switch disarms the timer (SDM 11.5.4.1; KVM also
            // clears the initial count).
            self.timer = Timer::Stopped;
            self.timer_initial = 0;
            self.tsc_deadline = 0;
        }
    }

    /// Sends the IPI described by ICR.
    fn send_ipi(&mut self) -> Option<LapicAction> {
        let low = self.icr_low;
        let vector = (low & 0xff) as u8;
        let delivery = DeliveryMode::from_bits(low >> 8);
        let logical = low & (1 << 11) != 0;
        let assert = low & (1 << 14) != 0;
        let level_triggered = low & (1 << 15) != 0;
        if delivery == DeliveryMode::Init && level_triggered && !assert {
            // INIT level de-assert only synchronised arbitration IDs on
            // P6-era APICs; modern ones (and Linux's wakeup code, which
            // still sends it) treat it as a no-op.
            return None;
        }
        if matches!(delivery, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        let dest_field = if self.is_x2apic() {
            self.icr_high
        } else {
            self.icr_high >> 24
        };
        let dest = match (low >> 18) & 3 {
            1 => Destination::SelfOnly(self.id),
            2 => Destination::AllIncludingSelf,
            3 => Destination::AllExcludingSelf(self.id),
            _ if logical => Destination::Logical(dest_field),
            _ => Destination::Physical(dest_field),
        };
        Some(LapicAction::Ipi(Interrupt {
            dest,
            vector,
            delivery,
            level_triggered,
        }))
    }

    /// Guest read of `data.len()` bytes at `offset` in the xAPIC page.
    ///
    /// Registers are 32 bits wide at 16-byte-aligned offsets; 1-, 2- and
    /// 4-byte reads inside the 32-bit register work (as in KVM), anything
    /// else reads zeros. When the page is not decoded (APIC hardware-
    /// disabled or in x2APIC mode) reads return all ones.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        if !self.mmio_enabled() {
            data.fill(0xff);
            return;
        }
        data.fill(0);
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        let within = (offset & 0xf) as usize;
        if u64::from(offset) >= APIC_MMIO_SIZE || data.is_empty() || within + data.len() > 4 {
            return;
        }
        let value = self.read_register(offset & !0xf, now_ns).to_le_bytes();
        data.copy_from_slice(&value[within..within + data.len()]);
    }

    /// Guest write of `data` at `offset` in the xAPIC page. Only aligned
    /// 32-bit writes are honoured (the SDM leaves others undefined; KVM
    /// drops them too).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> Option<LapicAction> {
        if !self.mmio_enabled() || offset >= APIC_MMIO_SIZE || offset & 0xf != 0 {
            return None;
        }
        let bytes: [u8; 4] = data.try_into().ok()?;
        let offset = u32::try_from(offset).ok()?;
        self.write_register(offset, u32::from_le_bytes(bytes), now_ns)
    }

    // ----- MSRs -----------------------------------------------------------

    /// Whether this APIC implements `msr` (IA32_APIC_BASE,
    /// IA32_TSC_DEADLINE, the x2APIC range).
    pub fn handles_msr(msr: u32) -> bool {
        matches!(
            msr,
            MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST
        )
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base
    }

    /// Writes IA32_APIC_BASE. Fails (the guest gets #GP) on reserved bits
    /// and on the transitions the SDM forbids: x2APIC without the global
    /// enable, disabled → x2APIC, and x2APIC → xAPIC (SDM 11.12.5).
    /// Disabling the APIC resets its registers; entering x2APIC mode
    /// restores the initial APIC ID, which becomes read-only.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), MsrFault> {
        let invalid = MsrFault::InvalidValue {
            msr: MSR_APIC_BASE,
            value,
        };
        if value & BASE_RESERVED != 0 {
            return Err(invalid);
        }
        let enable = value & BASE_ENABLE != 0;
        let extd = value & BASE_EXTD != 0;
        let was_enabled = self.hw_enabled();
        let was_x2 = self.is_x2apic();
        match (enable, extd) {
            (false, true) => return Err(invalid),
            (true, true) if !was_enabled => return Err(invalid),
            (true, false) if was_x2 => return Err(invalid),
            _ => {}
        }
        self.base = value;
        if was_enabled && !enable {
            self.reset_registers();
        }
        if extd && !was_x2 {
            self.id = self.initial_id;
        }
        Ok(())
    }

    /// IA32_TSC_DEADLINE: the armed deadline, 0 when disarmed or when the
    /// timer is not in TSC-deadline mode (SDM 11.5.4.1).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Writes IA32_TSC_DEADLINE (a TSC value; 0 disarms). Ignored outside
    /// TSC-deadline mode. A deadline already passed fires at the next
    /// [`LocalApic::advance`].
    pub fn set_tsc_deadline(&mut self, tsc: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline = tsc;
        }
    }

    /// RDMSR for any MSR [`LocalApic::handles_msr`] accepts.
    pub fn read_msr(&self, msr: u32, now_ns: u64) -> Result<u64, MsrFault> {
        match msr {
            MSR_APIC_BASE => return Ok(self.base),
            MSR_TSC_DEADLINE => return Ok(self.tsc_deadline()),
            _ => {}
        }
        let offset = self.x2apic_offset(msr)?;
        match offset {
            REG_ICR_LOW => Ok((u64::from(self.icr_high) << 32) | u64::from(self.icr_low)),
            REG_ID
            | REG_VERSION
            | REG_TPR
            | REG_PPR
            | REG_LDR
            | REG_SVR
            | REG_ESR
            | REG_TIMER_INITIAL
            | REG_TIMER_CURRENT
            | REG_TIMER_DIVIDE
            | 0x100..=0x270
            | REG_LVT_TIMER..=REG_LVT_ERROR => Ok(u64::from(self.read_register(offset, now_ns))),
            // APR, EOI, RRD, DFR, ICR high, SELF IPI and reserved: #GP.
            _ => Err(MsrFault::NotAccessible(msr)),
        }
    }

    /// WRMSR for any MSR [`LocalApic::handles_msr`] accepts.
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<Option<LapicAction>, MsrFault> {
        match msr {
            MSR_APIC_BASE => return self.set_apic_base(value).map(|()| None),
            MSR_TSC_DEADLINE => {
                self.set_tsc_deadline(value);
                return Ok(None);
            }
            _ => {}
        }
        let offset = self.x2apic_offset(msr)?;
        let invalid = MsrFault::InvalidValue { msr, value };
        let low = (value & 0xffff_ffff) as u32;
        match offset {
            // x2APIC registers are 32 bits wide except the ICR.
            REG_ICR_LOW => {
                self.icr_high = (value >> 32) as u32;
                Ok(self.write_register(REG_ICR_LOW, low, now_ns))
            }
            _ if value >> 32 != 0 => Err(invalid),
            REG_EOI | REG_ESR if low != 0 => Err(invalid),
            REG_TPR
            | REG_EOI
            | REG_SVR
            | REG_ESR
            | REG_TIMER_INITIAL
            | REG_TIMER_DIVIDE
            | REG_SELF_IPI
            | REG_LVT_TIMER..=REG_LVT_ERROR => Ok(self.write_register(offset, low, now_ns)),
            // Read-only, nonexistent in x2APIC mode, or reserved: #GP.
            _ => Err(MsrFault::NotAccessible(msr)),
        }
    }

    /// The register offset of x2APIC MSR `msr`, if accessible now.
    fn x2apic_offset(&self, msr: u32) -> Result<u32, MsrFault> {
        if !self.is_x2apic() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(MsrFault::NotAccessible(msr));
        }
        Ok((msr - MSR_X2APIC_FIRST) << 4)
    }

    // ----- timer ----------------------------------------------------------

    /// The divide configuration register as a divisor (1..=128).
    fn divisor(&self) -> u64 {
        let code = (self.timer_divide & 3) | ((self.timer_divide & 8) >> 1);
        1 << ((code + 1) & 7)
    }

    /// Timer ticks between `anchor_ns` and `now_ns` at the current divisor.
    fn ticks_since(&self, anchor_ns: u64, now_ns: u64) -> u64 {
        let ns = u128::from(now_ns.saturating_sub(anchor_ns));
        // Saturating: a host-chosen frequency near u64::MAX must not panic.
        let ticks = ns.saturating_mul(u128::from(self.timer_hz))
            / (NS_PER_SEC * u128::from(self.divisor()));
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Nanoseconds for `ticks` timer ticks at the current divisor, rounded
    /// up so the count has really elapsed by then.
    fn ns_for_ticks(&self, ticks: u64) -> u64 {
        let ns = (u128::from(ticks) * NS_PER_SEC * u128::from(self.divisor()))
            .div_ceil(u128::from(self.timer_hz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn timer_current(&self, now_ns: u64) -> u32 {
        let Timer::Running {
            anchor_ns,
            base_ticks,
            ..
        } = self.timer
        else {
            return 0;
        };
        let initial = u64::from(self.timer_initial);
        if initial == 0 {
            return 0;
        }
        let elapsed = base_ticks.saturating_add(self.ticks_since(anchor_ns, now_ns));
        let remaining = match self.timer_mode() {
            TimerMode::Periodic => initial - elapsed % initial,
            TimerMode::OneShot => initial.saturating_sub(elapsed),
            TimerMode::TscDeadline => 0,
        };
        u32::try_from(remaining).unwrap_or(0)
    }

    fn write_timer_initial(&mut self, value: u32, now_ns: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            // TMICT is ignored in TSC-deadline mode (SDM 11.5.4.1).
            return;
        }
        self.timer_initial = value;
        self.timer = if value == 0 {
            Timer::Stopped
        } else {
            Timer::Running {
                anchor_ns: now_ns,
                base_ticks: 0,
                fired: 0,
            }
        };
    }

    fn write_timer_divide(&mut self, value: u32, now_ns: u64) {
        let value = value & 0xb;
        if let Timer::Running {
            anchor_ns,
            base_ticks,
            fired,
        } = self.timer
        {
            // Keep the count where it is and continue from there at the
            // new rate (KVM rescales the remaining time the same way).
            let elapsed = base_ticks.saturating_add(self.ticks_since(anchor_ns, now_ns));
            self.timer = Timer::Running {
                anchor_ns: now_ns,
                base_ticks: elapsed,
                fired,
            };
        }
        self.timer_divide = value;
    }

    /// Runs the timer up to `now_ns` (TSC value `tsc`). If it expired, its
    /// vector is made pending (unless masked or software-disabled) and this
    /// returns true. Periodic expirations missed between calls coalesce
    /// into one interrupt, as an IRR bit can only be set once.
    pub fn advance(&mut self, now_ns: u64, tsc: u64) -> bool {
        let expired = match (self.timer_mode(), self.timer) {
            (TimerMode::TscDeadline, _) => {
                let due = self.tsc_deadline != 0 && tsc >= self.tsc_deadline;
                if due {
                    // The MSR reads 0 once the deadline fired.
                    self.tsc_deadline = 0;
                }
                due
            }
            (_, Timer::Stopped) => false,
            (
                mode,
                Timer::Running {
                    anchor_ns,
                    base_ticks,
                    fired,
                },
            ) => {
                let initial = u64::from(self.timer_initial).max(1);
                let elapsed = base_ticks.saturating_add(self.ticks_since(anchor_ns, now_ns));
                let periods = elapsed / initial;
                if periods <= fired {
                    false
                } else {
                    self.timer = if mode == TimerMode::Periodic {
                        Timer::Running {
                            anchor_ns,
                            base_ticks,
                            fired: periods,
                        }
                    } else {
                        Timer::Stopped
                    };
                    true
                }
            }
        };
        if !expired {
            return false;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED != 0 || !self.software_enabled() {
            return false;
        }
        let vector = (lvt & 0xff) as u8;
        self.accept_fixed(vector, false);
        test_bit(&self.irr, vector)
    }

    /// When the timer next needs [`LocalApic::advance`]: the absolute time
    /// of its next expiry (never earlier than `now_ns`), or `None` if it is
    /// stopped, disarmed or masked. `tsc` is the TSC at `now_ns`.
    pub fn next_deadline_ns(&self, now_ns: u64, tsc: u64) -> Option<u64> {
        if self.lvt[LVT_TIMER] & LVT_MASKED != 0 || !self.software_enabled() {
            return None;
        }
        let due = match (self.timer_mode(), self.timer) {
            (TimerMode::TscDeadline, _) => {
                if self.tsc_deadline == 0 {
                    return None;
                }
                let cycles = u128::from(self.tsc_deadline.saturating_sub(tsc));
                let ns = (cycles * NS_PER_SEC).div_ceil(u128::from(self.tsc_hz));
                now_ns.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
            }
            (_, Timer::Stopped) => return None,
            (
                _,
                Timer::Running {
                    anchor_ns,
                    base_ticks,
                    fired,
                },
            ) => {
                // The end of the next undelivered period; if that is
                // already behind the re-anchored count it is due now.
                let target = u64::from(self.timer_initial).saturating_mul(fired.saturating_add(1));
                let ticks = target.saturating_sub(base_ticks);
                anchor_ns.saturating_add(self.ns_for_ticks(ticks))
            }
        };
        Some(due.max(now_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(apic: &mut LocalApic, offset: u32, value: u32, now: u64) -> Option<LapicAction> {
        apic.mmio_write(u64::from(offset), &value.to_le_bytes(), now)
    }

    fn r(apic: &LocalApic, offset: u32, now: u64) -> u32 {
        let mut data = [0u8; 4];
        apic.mmio_read(u64::from(offset), &mut data, now);
        u32::from_le_bytes(data)
    }

    fn fixed(vector: u8, level_triggered: bool) -> Interrupt {
        Interrupt {
            dest: Destination::Physical(0),
            vector,
            delivery: DeliveryMode::Fixed,
            level_triggered,
        }
    }

    /// What Linux's `setup_local_APIC` (arch/x86/kernel/apic/apic.c) ends
    /// up doing that matters here: TPR 0, SVR enable with spurious vector
    /// 0xff, LINT0 ExtINT (BSP) and LINT1 NMI, error LVT.
    fn enabled_apic() -> LocalApic {
        let mut apic = LocalApic::new(0, true);
        w(&mut apic, REG_TPR, 0, 0);
        w(&mut apic, REG_SVR, 0x1ff, 0);
        w(&mut apic, 0x350, 0x700, 0);
        w(&mut apic, 0x360, 0x400, 0);
        w(&mut apic, REG_LVT_ERROR, 0xfe, 0);
        apic
    }

    #[test]
    fn reset_state_registers() {
        let apic = LocalApic::new(3, false);
        assert_eq!(r(&apic, REG_ID, 0), 3 << 24);
        assert_eq!(r(&apic, REG_VERSION, 0), 0x0005_0014);
        assert_eq!(r(&apic, REG_SVR, 0), 0xff);
        assert_eq!(r(&apic, REG_DFR, 0), 0xffff_ffff);
        assert_eq!(r(&apic, 0x350, 0), LVT_MASKED, "AP: LINT0 masked");
        assert_eq!(apic.apic_base(), 0xfee0_0800);
        let bsp = LocalApic::new(0, true);
        assert_eq!(bsp.apic_base(), 0xfee0_0900);
        assert_eq!(r(&bsp, 0x350, 0), 0x700, "BSP: virtual wire");
        // Byte read inside a register; reads past the 32-bit word are 0.
        let mut b = [0u8; 1];
        apic.mmio_read(u64::from(REG_ID) + 3, &mut b, 0);
        assert_eq!(b[0], 3);
        let mut b = [0xaau8; 2];
        apic.mmio_read(u64::from(REG_ID) + 3, &mut b, 0);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn svr_software_enable_gates_delivery() {
        let mut apic = LocalApic::new(0, false);
        apic.accept(&fixed(0x40, false));
        assert_eq!(apic.pending_vector(), None, "dropped while disabled");
        // LVT masks cannot be cleared while software-disabled.
        w(&mut apic, REG_LVT_TIMER, 0x20, 0);
        assert_eq!(r(&apic, REG_LVT_TIMER, 0), LVT_MASKED | 0x20);
        w(&mut apic, REG_SVR, 0x1ff, 0);
        assert!(apic.software_enabled());
        apic.accept(&fixed(0x40, false));
        assert_eq!(apic.pending_vector(), Some(0x40));
        w(&mut apic, REG_LVT_TIMER, 0x20, 0);
        assert_eq!(r(&apic, REG_LVT_TIMER, 0), 0x20);
        // Disabling again masks every LVT and hides IRR.
        w(&mut apic, REG_SVR, 0xff, 0);
        assert_eq!(r(&apic, REG_LVT_TIMER, 0), LVT_MASKED | 0x20);
        assert_eq!(apic.pending_vector(), None);
    }

    #[test]
    fn tpr_masks_by_priority_class() {
        let mut apic = enabled_apic();
        apic.accept(&fixed(0x51, false));
        w(&mut apic, REG_TPR, 0x50, 0);
        assert_eq!(r(&apic, REG_PPR, 0), 0x50);
        assert_eq!(apic.pending_vector(), None, "same class as TPR is held");
        w(&mut apic, REG_TPR, 0x4f, 0);
        assert_eq!(apic.pending_vector(), Some(0x51));
        apic.accept(&fixed(0x62, false));
        assert_eq!(apic.pending_vector(), Some(0x62));
        // IRR words: vector 0x51 is bit 17 of word 2, 0x62 bit 2 of word 3.
        assert_eq!(r(&apic, REG_IRR + 0x20, 0), 1 << (0x51 - 64));
        assert_eq!(r(&apic, REG_IRR + 0x30, 0), 1 << (0x62 - 96));
    }

    #[test]
    fn nested_isr_and_eoi_order() {
        let mut apic = enabled_apic();
        apic.accept(&fixed(0x41, false));
        let v = apic.pending_vector().unwrap();
        apic.acknowledge(v);
        assert_eq!(r(&apic, REG_PPR, 0), 0x40);
        // Same class: held until EOI.
        apic.accept(&fixed(0x45, false));
        assert_eq!(apic.pending_vector(), None);
        // Higher class nests.
        apic.accept(&fixed(0x80, false));
        assert_eq!(apic.pending_vector(), Some(0x80));
        apic.acknowledge(0x80);
        assert_eq!(r(&apic, REG_PPR, 0), 0x80);
        assert_eq!(r(&apic, REG_ISR + 0x40, 0), 1);
        // EOI ends the highest in service first (0x80), then 0x41.
        assert_eq!(w(&mut apic, REG_EOI, 0, 0), None);
        assert_eq!(r(&apic, REG_ISR + 0x40, 0), 0);
        assert_eq!(r(&apic, REG_PPR, 0), 0x40);
        assert_eq!(apic.pending_vector(), None);
        w(&mut apic, REG_EOI, 0, 0);
        assert_eq!(apic.pending_vector(), Some(0x45));
        assert_eq!(apic.end_of_interrupt(), None, "nothing in service");
    }

    #[test]
    fn level_triggered_eoi_is_reported_for_ioapic() {
        let mut apic = enabled_apic();
        apic.accept(&fixed(0x33, true));
        assert_eq!(r(&apic, REG_TMR + 0x10, 0), 1 << (0x33 - 32));
        apic.acknowledge(0x33);
        assert_eq!(w(&mut apic, REG_EOI, 0, 0), Some(LapicAction::Eoi(0x33)));
        apic.accept(&fixed(0x33, false));
        assert_eq!(r(&apic, REG_TMR + 0x10, 0), 0, "edge clears TMR");
    }

    #[test]
    fn illegal_vectors_set_esr() {
        let mut apic = enabled_apic();
        apic.accept(&fixed(0x05, false));
        assert_eq!(apic.pending_vector(), Some(0xfe), "error LVT fired");
        w(&mut apic, REG_ESR, 0, 0);
        assert_eq!(r(&apic, REG_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(w(&mut apic, REG_ICR_LOW, 0x0000_0003, 0), None);
        w(&mut apic, REG_ESR, 0, 0);
        assert_eq!(r(&apic, REG_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
        w(&mut apic, REG_ESR, 0, 0);
        assert_eq!(r(&apic, REG_ESR, 0), 0);
    }

    #[test]
    fn self_ipi_via_icr() {
        let mut apic = enabled_apic();
        // Linux `__default_send_IPI_shortcut(APIC_DEST_SELF, vector)`:
        // shorthand 01, fixed, edge.
        let action = w(&mut apic, REG_ICR_LOW, (1 << 18) | 0xf3, 0);
        let Some(LapicAction::Ipi(irq)) = action else {
            panic!("no IPI: {action:?}");
        };
        assert_eq!(irq.dest, Destination::SelfOnly(0));
        assert_eq!(irq.vector, 0xf3);
        assert!(apic.matches_destination(&irq.dest));
        apic.accept(&irq);
        assert_eq!(apic.pending_vector(), Some(0xf3));
        assert_eq!(r(&apic, REG_ICR_LOW, 0) & (1 << 12), 0, "delivery idle");
    }

    #[test]
    fn icr_destinations_and_shorthands() {
        let mut apic = enabled_apic();
        w(&mut apic, REG_ICR_HIGH, 0x0300_0000, 0);
        let ipi = |apic: &mut LocalApic, low| match w(apic, REG_ICR_LOW, low, 0) {
            Some(LapicAction::Ipi(i)) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(ipi(&mut apic, 0x40).dest, Destination::Physical(3));
        assert_eq!(ipi(&mut apic, 0x840).dest, Destination::Logical(3));
        assert_eq!(
            ipi(&mut apic, (2 << 18) | 0x40).dest,
            Destination::AllIncludingSelf
        );
        let all_but = ipi(&mut apic, (3 << 18) | 0x40).dest;
        assert_eq!(all_but, Destination::AllExcludingSelf(0));
        assert!(!apic.matches_destination(&all_but));
        assert!(LocalApic::new(1, false).matches_destination(&all_but));
        // NMI IPI.
        assert_eq!(ipi(&mut apic, 0x400).delivery, DeliveryMode::Nmi);
    }

    #[test]
    fn logical_destination_flat_and_cluster() {
        let mut apic = enabled_apic();
        w(&mut apic, REG_LDR, 0x0400_0000, 0);
        assert!(apic.matches_destination(&Destination::Logical(0x04)));
        assert!(apic.matches_destination(&Destination::Logical(0x0c)));
        assert!(!apic.matches_destination(&Destination::Logical(0x03)));
        assert!(apic.matches_destination(&Destination::Logical(0xff)));
        // Cluster model: cluster 2, member bit 1.
        w(&mut apic, REG_DFR, 0x0fff_ffff, 0);
        assert_eq!(r(&apic, REG_DFR, 0), 0x0fff_ffff);
        w(&mut apic, REG_LDR, 0x2200_0000, 0);
        assert!(apic.matches_destination(&Destination::Logical(0x23)));
        assert!(!apic.matches_destination(&Destination::Logical(0x13)));
        // Physical, broadcast.
        assert!(apic.matches_destination(&Destination::Physical(0)));
        assert!(apic.matches_destination(&Destination::Physical(0xff)));
        assert!(!apic.matches_destination(&Destination::Physical(1)));
    }

    #[test]
    fn init_sipi_sequence() {
        // Linux `wakeup_secondary_cpu_via_init` (arch/x86/kernel/smpboot.c):
        // INIT assert (level), INIT de-assert, then STARTUP twice.
        let mut bsp = enabled_apic();
        let mut ap = LocalApic::new(1, false);
        w(&mut ap, REG_SVR, 0x1ff, 0);
        w(&mut bsp, REG_ICR_HIGH, 1 << 24, 0);
        let route = |bsp: &mut LocalApic, ap: &mut LocalApic, low: u32| {
            if let Some(LapicAction::Ipi(irq)) = w(bsp, REG_ICR_LOW, low, 0) {
                if ap.matches_destination(&irq.dest) {
                    ap.accept(&irq);
                }
            }
        };
        route(&mut bsp, &mut ap, 0x0000_c500); // INIT, level, assert
        assert!(ap.take_init());
        assert!(ap.is_waiting_for_sipi());
        assert!(!ap.software_enabled(), "INIT resets the APIC");
        route(&mut bsp, &mut ap, 0x0000_8500); // INIT de-assert: ignored
        assert!(!ap.take_init());
        route(&mut bsp, &mut ap, 0x0000_069a); // STARTUP vector 0x9a
        assert_eq!(ap.take_startup(), Some(0x9a));
        assert!(!ap.is_waiting_for_sipi());
        route(&mut bsp, &mut ap, 0x0000_069a); // second SIPI: ignored
        assert_eq!(ap.take_startup(), None);
        assert_eq!(ap.id(), 1, "ID survives INIT");
    }

    #[test]
    fn lint0_extint_and_lint1_nmi() {
        let mut apic = enabled_apic();
        assert!(!apic.pending_extint());
        apic.set_lint0(true);
        assert!(apic.pending_extint());
        w(&mut apic, REG_TPR, 0xff, 0);
        assert!(apic.pending_extint(), "ExtINT ignores the TPR");
        apic.set_lint0(false);
        assert!(!apic.pending_extint());
        apic.set_lint1(true);
        assert!(apic.take_nmi());
        apic.set_lint1(true);
        assert!(!apic.take_nmi(), "edge only");
        // Masked LINT0 keeps the PIC out.
        w(&mut apic, 0x350, 0x1_0700, 0);
        apic.set_lint0(true);
        assert!(!apic.pending_extint());
        // ExtINT message (e.g. from the IOAPIC).
        apic.accept(&Interrupt {
            delivery: DeliveryMode::ExtInt,
            ..fixed(0, false)
        });
        assert!(apic.pending_extint());
        apic.acknowledge_extint();
        assert!(!apic.pending_extint());
        // Before the guest touches the APIC, the BSP's LINT0 is virtual wire.
        let mut fresh = LocalApic::new(0, true);
        fresh.set_lint0(true);
        assert!(fresh.pending_extint());
    }

    #[test]
    fn divide_config_decoding() {
        let mut apic = enabled_apic();
        for (dcr, div) in [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xa, 128),
            (0xb, 1),
        ] {
            w(&mut apic, REG_TIMER_DIVIDE, dcr, 0);
            assert_eq!(apic.divisor(), div, "dcr {dcr:#x}");
            assert_eq!(r(&apic, REG_TIMER_DIVIDE, 0), dcr);
        }
    }

    #[test]
    fn one_shot_timer() {
        // Linux `lapic_next_event`: TMICT = delta, with LVT one-shot.
        let mut apic = enabled_apic();
        w(&mut apic, REG_TIMER_DIVIDE, 0x3, 0); // divide by 16
        w(&mut apic, REG_LVT_TIMER, 0xec, 0);
        w(&mut apic, REG_TIMER_INITIAL, 1000, 1_000);
        // 1 GHz / 16: 16 ns per tick, 16 us in all.
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 1_000), 1000);
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 1_000 + 160), 990);
        assert_eq!(apic.next_deadline_ns(1_000, 0), Some(17_000));
        assert!(!apic.advance(16_999, 0));
        assert!(apic.advance(17_000, 0));
        assert_eq!(apic.pending_vector(), Some(0xec));
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 17_000), 0);
        assert_eq!(r(&apic, REG_TIMER_INITIAL, 17_000), 1000);
        assert!(!apic.advance(100_000, 0), "one shot");
        assert_eq!(apic.next_deadline_ns(100_000, 0), None);
        // Writing 0 stops a running timer.
        w(&mut apic, REG_TIMER_INITIAL, 1000, 200_000);
        w(&mut apic, REG_TIMER_INITIAL, 0, 200_001);
        assert_eq!(apic.next_deadline_ns(200_001, 0), None);
    }

    #[test]
    fn periodic_timer() {
        let mut apic = LocalApic::new(0, true).with_timer_hz(100_000_000);
        w(&mut apic, REG_SVR, 0x1ff, 0);
        w(&mut apic, REG_TIMER_DIVIDE, 0xb, 0); // divide by 1: 10 ns ticks
        w(&mut apic, REG_LVT_TIMER, (1 << 17) | 0x30, 0);
        w(&mut apic, REG_TIMER_INITIAL, 100, 0); // 1 us period
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 250), 75);
        let mut now = 0;
        for k in 1..=5u64 {
            now = apic.next_deadline_ns(now, 0).unwrap();
            assert_eq!(now, k * 1000);
            assert!(apic.advance(now, 0));
            apic.acknowledge(0x30);
            apic.end_of_interrupt();
        }
        // Missed periods coalesce into one interrupt.
        assert!(apic.advance(10_500, 0));
        assert!(!apic.advance(10_600, 0));
        assert_eq!(apic.next_deadline_ns(10_600, 0), Some(11_000));
        // Masked: counts on, no interrupt, no deadline.
        w(
            &mut apic,
            REG_LVT_TIMER,
            (1 << 17) | LVT_MASKED | 0x30,
            10_600,
        );
        assert_eq!(apic.next_deadline_ns(10_600, 0), None);
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 10_650), 35);
    }

    #[test]
    fn divide_change_keeps_current_count() {
        let mut apic = enabled_apic();
        w(&mut apic, REG_TIMER_DIVIDE, 0xb, 0); // 1 ns ticks
        w(&mut apic, REG_LVT_TIMER, 0x30, 0);
        w(&mut apic, REG_TIMER_INITIAL, 1000, 0);
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 400), 600);
        w(&mut apic, REG_TIMER_DIVIDE, 0x0, 400); // now 2 ns per tick
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 400), 600);
        assert_eq!(r(&apic, REG_TIMER_CURRENT, 600), 500);
        assert_eq!(apic.next_deadline_ns(600, 0), Some(1600));
    }

    #[test]
    fn tsc_deadline_timer() {
        // Linux `lapic_next_deadline`: wrmsr(MSR_IA32_TSC_DEADLINE, tsc + delta)
        // with LVT timer in TSC-deadline mode (`__setup_APIC_LVTT`).
        let tsc_hz = 2_500_000_000;
        let mut apic = enabled_apic().with_tsc_hz(tsc_hz);
        apic.set_tsc_deadline(1234);
        assert_eq!(apic.tsc_deadline(), 0, "ignored outside TSC-deadline mode");
        w(&mut apic, REG_LVT_TIMER, (2 << 17) | 0xef, 0);
        // TMICT is ignored and TMCCT reads 0 in this mode.
        w(&mut apic, REG_TIMER_INITIAL, 500, 0);
        assert_eq!(r(&apic, REG_TIMER_INITIAL, 0), 0);
        let tsc_at = |ns: u64| ns * 5 / 2; // 2.5 GHz
        let now = 1_000_000;
        apic.write_msr(MSR_TSC_DEADLINE, tsc_at(now) + 25_000, now)
            .unwrap();
        assert_eq!(
            apic.read_msr(MSR_TSC_DEADLINE, now),
            Ok(tsc_at(now) + 25_000)
        );
        assert_eq!(apic.next_deadline_ns(now, tsc_at(now)), Some(now + 10_000));
        assert!(!apic.advance(now + 9_999, tsc_at(now + 9_999)));
        assert!(apic.advance(now + 10_000, tsc_at(now + 10_000)));
        assert_eq!(apic.pending_vector(), Some(0xef));
        assert_eq!(apic.tsc_deadline(), 0, "cleared after firing");
        assert_eq!(apic.next_deadline_ns(now + 10_000, 0), None);
        // A deadline in the past fires at once.
        apic.set_tsc_deadline(1);
        assert_eq!(apic.next_deadline_ns(now, tsc_at(now)), Some(now));
        // Leaving TSC-deadline mode disarms.
        w(&mut apic, REG_LVT_TIMER, 0xef, 0);
        assert_eq!(apic.tsc_deadline(), 0);
        assert!(!apic.advance(u64::MAX, u64::MAX));
    }

    #[test]
    fn apic_base_msr_transitions() {
        let mut apic = LocalApic::new(5, false);
        assert!(
            apic.read_msr(0x802, 0).is_err(),
            "x2APIC MSRs need x2APIC mode"
        );
        let base = apic.apic_base();
        assert!(apic.set_apic_base(base | 1).is_err(), "reserved bit");
        assert!(apic.set_apic_base(base & !BASE_ENABLE | BASE_EXTD).is_err());
        // xAPIC -> x2APIC.
        apic.set_apic_base(base | BASE_EXTD).unwrap();
        assert!(apic.is_x2apic());
        assert_eq!(apic.read_msr(0x802, 0), Ok(5));
        assert_eq!(apic.read_msr(0x803, 0), Ok(u64::from(VERSION)));
        assert_eq!(apic.read_msr(0x80d, 0), Ok((1 << 5) as u64), "LDR from ID");
        let mut data = [0u8; 4];
        apic.mmio_read(0x20, &mut data, 0);
        assert_eq!(data, [0xff; 4], "MMIO off in x2APIC mode");
        // x2APIC -> xAPIC directly is forbidden; via disabled is fine.
        assert!(apic.set_apic_base(base).is_err());
        apic.set_apic_base(base & !BASE_ENABLE).unwrap();
        assert!(!apic.matches_destination(&Destination::AllIncludingSelf));
        assert!(
            apic.set_apic_base(base | BASE_EXTD).is_err(),
            "disabled -> x2APIC"
        );
        apic.set_apic_base(base).unwrap();
        assert_eq!(r(&apic, REG_SVR, 0), 0xff, "registers reset");
    }

    #[test]
    fn x2apic_msr_interface() {
        let mut apic = LocalApic::new(0x21, true);
        apic.set_apic_base(apic.apic_base() | BASE_EXTD).unwrap();
        apic.write_msr(0x80f, 0x1ff, 0).unwrap();
        assert!(apic.software_enabled());
        // SELF IPI register.
        let action = apic.write_msr(0x83f, 0x55, 0).unwrap();
        assert_eq!(
            action,
            Some(LapicAction::Ipi(Interrupt {
                dest: Destination::SelfOnly(0x21),
                vector: 0x55,
                delivery: DeliveryMode::Fixed,
                level_triggered: false,
            }))
        );
        // 64-bit ICR with a 32-bit destination.
        let action = apic
            .write_msr(0x830, (0x1234_5678u64 << 32) | 0x60, 0)
            .unwrap();
        assert!(matches!(
            action,
            Some(LapicAction::Ipi(Interrupt {
                dest: Destination::Physical(0x1234_5678),
                ..
            }))
        ));
        assert_eq!(apic.read_msr(0x830, 0), Ok((0x1234_5678u64 << 32) | 0x60));
        // EOI must be written with 0; read-only/write-only registers #GP.
        assert!(apic.write_msr(0x80b, 1, 0).is_err());
        assert!(apic.write_msr(0x80b, 0, 0).is_ok());
        assert!(apic.read_msr(0x80b, 0).is_err());
        assert!(apic.write_msr(0x802, 0, 0).is_err());
        assert!(apic.write_msr(0x808, 1 << 32, 0).is_err());
        // Cluster logical destination from the x2APIC ID: cluster 2, bit 1.
        assert!(apic.matches_destination(&Destination::Logical(0x0002_0002)));
        assert!(!apic.matches_destination(&Destination::Logical(0x0001_0002)));
        assert!(apic.matches_destination(&Destination::Physical(0x21)));
        assert!(apic.matches_destination(&Destination::Physical(u32::MAX)));
    }

    #[test]
    fn unaligned_and_odd_writes_are_ignored() {
        let mut apic = enabled_apic();
        apic.mmio_write(u64::from(REG_TPR) + 1, &[0x10, 0, 0, 0], 0);
        apic.mmio_write(u64::from(REG_TPR), &[0x10, 0], 0);
        apic.mmio_write(u64::from(REG_TPR), &[0x10, 0, 0, 0, 0, 0, 0, 0], 0);
        apic.mmio_write(0x1000, &[0x10, 0, 0, 0], 0);
        assert_eq!(r(&apic, REG_TPR, 0), 0);
        // Writes to read-only registers are ignored.
        w(&mut apic, REG_VERSION, 0, 0);
        assert_eq!(r(&apic, REG_VERSION, 0), VERSION);
    }
}
