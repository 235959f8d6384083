//! The interrupt controllers and timers KVM would otherwise provide: the
//! 8259A PIC pair ([`pic::DualPic`]), the 8254 PIT ([`pit::Pit`]), the
//! IOAPIC ([`ioapic::IoApic`]) and the local APIC ([`lapic::LocalApic`]).
//!
//! With KVM these live in the kernel. vessel's software vCPU (`emu`) has no
//! kernel to lean on, so the VMM runs these models itself.
//!
//! Every model here is pure logic:
//!
//! - **No threads and no clocks.** Time enters only as arguments: the
//!   current virtual time `now_ns` (nanoseconds on one monotonic guest
//!   clock) and, for the local APIC's TSC-deadline mode, the guest TSC.
//!   Identical call sequences give identical results, which makes every
//!   behaviour unit-testable.
//! - **Timers report their next deadline** (`next_deadline_ns`) so the vCPU
//!   loop knows when it has to come back, and report what happened since the
//!   last call when asked (`Pit::irq0_edges`, `LocalApic::advance`).
//! - **No panics on guest input.** Every port, offset, register index,
//!   access width and value comes from the guest and is bounds-checked;
//!   a randomized test drives every model with garbage.
//! - **No wiring.** Models do not own each other. Interrupt messages are
//!   plain [`Interrupt`] values the caller routes: IOAPIC → local APICs,
//!   local APIC (IPIs) → local APICs, local APIC EOI → IOAPIC, PIT IRQ0 →
//!   PIC and IOAPIC pin 2, PIC INTR → the BSP's LINT0.
//!
//! # Wiring sketch (what the VMM does)
//!
//! ```
//! use irqchip::{ioapic::IoApic, lapic::LocalApic, pic::DualPic, pit::Pit};
//!
//! let mut pic = DualPic::new();
//! let mut pit = Pit::new();
//! let mut ioapic = IoApic::new();
//! let mut lapic = LocalApic::new(0, true);
//! let mut out = Vec::new();
//!
//! let now_ns = 1_000_000;
//! // The PIT's channel 0 output drives ISA IRQ0: PIC pin 0 and, by the
//! // MADT's interrupt source override, IOAPIC pin 2.
//! for _ in 0..pit.irq0_edges(now_ns) {
//!     pic.set_irq(0, true);
//!     pic.set_irq(0, false);
//!     ioapic.set_irq(2, true, &mut out);
//!     ioapic.set_irq(2, false, &mut out);
//! }
//! for irq in out.drain(..) {
//!     if lapic.matches_destination(&irq.dest) {
//!         lapic.accept(&irq);
//!     }
//! }
//! // The PIC's INTR output is the BSP's LINT0 (ExtINT in virtual-wire mode).
//! lapic.set_lint0(pic.output());
//! if lapic.pending_extint() {
//!     let _vector = pic.acknowledge();
//! } else if let Some(vector) = lapic.pending_vector() {
//!     lapic.acknowledge(vector);
//! }
//! ```

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;

/// How an interrupt message is delivered (the 3-bit delivery mode field of
/// IOAPIC redirection entries, local APIC LVT entries and the ICR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// Deliver `vector` to every destination.
    Fixed,
    /// Deliver `vector` to the destination running at the lowest priority.
    LowestPriority,
    /// System management interrupt (vector ignored).
    Smi,
    /// Non-maskable interrupt (vector ignored).
    Nmi,
    /// INIT: put the destination into the wait-for-SIPI state.
    Init,
    /// Start-up IPI: an AP in wait-for-SIPI starts at `vector * 0x1000`.
    Startup,
    /// The vector comes from an external 8259A (an INTA cycle to the PIC).
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field. Encoding 0b011 is reserved; like KVM we
    /// treat it as fixed rather than inventing a fault.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::Startup,
            7 => Self::ExtInt,
            _ => Self::Fixed,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::Startup => 6,
            Self::ExtInt => 7,
        }
    }
}

/// Which local APICs an [`Interrupt`] is for.
///
/// IOAPIC redirection entries (and later MSIs) only produce `Physical` and
/// `Logical`; the shorthand forms come from the local APIC's ICR, resolved
/// so that the router needs no knowledge of ICR encodings. Use
/// [`lapic::LocalApic::matches_destination`] to test a given APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Physical destination mode: an APIC ID. The all-ones ID of the
    /// current mode (0xff in xAPIC, 0xffff_ffff in x2APIC) broadcasts.
    Physical(u32),
    /// Logical destination mode: matched against each APIC's LDR (and DFR
    /// model in xAPIC mode).
    Logical(u32),
    /// ICR shorthand "self": only the sending APIC, whose ID is given.
    SelfOnly(u32),
    /// ICR shorthand "all including self".
    AllIncludingSelf,
    /// ICR shorthand "all excluding self": every APIC but the sender's ID.
    AllExcludingSelf(u32),
}

/// An interrupt message on the (virtual) APIC bus: what an IOAPIC pin, a
/// local APIC IPI or (later) an MSI sends to local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interrupt {
    /// Who receives it.
    pub dest: Destination,
    /// The vector (for `Startup`: the start page; ignored for NMI/INIT/SMI).
    pub vector: u8,
    /// How it is delivered.
    pub delivery: DeliveryMode,
    /// Level-triggered: the receiving APIC sets the vector's TMR bit, and its
    /// EOI must be forwarded to the IOAPIC ([`ioapic::IoApic::end_of_interrupt`]).
    pub level_triggered: bool,
}
