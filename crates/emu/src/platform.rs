//! The platform KVM keeps in the kernel, for software vCPUs: the 8259A
//! pair, the 8254 PIT, the IOAPIC and one local APIC per vCPU (the pure
//! models of the `irqchip` crate), a virtual clock, irqfds and ioeventfds.
//!
//! Everything sits behind one lock ([`Platform`]'s chip set): interrupt
//! routing touches several models at once (PIT → PIC and IOAPIC, IOAPIC →
//! local APICs, local APIC EOI → IOAPIC), and one lock keeps that simple
//! and obviously consistent. The vCPU loop ([`crate::vcpu`]) calls
//! [`Platform::service`] between emulator runs to advance the timers and
//! hand the next deliverable vector to the emulator, and the port/MMIO
//! handlers here before an exit would reach the VMM.
//!
//! One helper thread per VM waits for the earliest timer deadline of any
//! vCPU and for the registered irqfds, so that a vCPU halted in `HLT` is
//! woken exactly when its timer fires or a device interrupts (no busy
//! polling). Devices that hold an edge trigger instead of an irqfd route
//! their interrupt on their own thread, one wake-up fewer.
//!
//! Time: the virtual clock is host `CLOCK_MONOTONIC` nanoseconds since the
//! VM was created. The guest TSC (exec's RDTSC) counts host nanoseconds
//! too, so the TSC runs at [`TSC_HZ`] = 1 GHz; the local APICs are told so
//! for TSC-deadline mode, and the TSC value passed to them is read from
//! the emulator itself (MSR 0x10), whatever offset the guest wrote.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use irqchip::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE, NUM_PINS};
use irqchip::lapic::{LapicAction, LocalApic, APIC_MMIO_SIZE};
use irqchip::pic::DualPic;
use irqchip::pit::Pit;
use irqchip::{DeliveryMode, Interrupt};
use vmm_sys_util::eventfd::EventFd;

use crate::exec::{Emulator, InterruptLines};
use crate::state::rflags;

/// The guest TSC frequency: exec's RDTSC returns host nanoseconds.
pub const TSC_HZ: u64 = 1_000_000_000;

/// MSR index of the TSC, read to learn the guest's current TSC value.
const MSR_TSC: u32 = 0x10;

/// Longest the helper thread sleeps without a deadline, so it notices a
/// shutdown even if the wake-up write were lost.
const IDLE_WAIT_NS: u64 = 500_000_000;

/// Physical address bits of IA32_APIC_BASE that hold the page (the CPUID
/// model advertises 40 physical address bits).
const APIC_BASE_PAGE_MASK: u64 = 0x0000_00ff_ffff_f000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a platform lock leaves plain data behind;
    // carrying on is better than wedging every vCPU.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the vCPU loop, its interrupter and the platform reach one vCPU.
#[derive(Debug, Default)]
pub struct CpuSignal {
    /// The stop flag the emulator polls between blocks: set when the vCPU
    /// loop has something to look at (a timer expired, an interrupt
    /// arrived, the VMM wants the thread back).
    pub(crate) attention: AtomicBool,
    /// The VMM asked for the thread back (`VcpuInterrupter`).
    pub(crate) interrupt_requested: AtomicBool,
    /// The emulator's interrupt request lines (and its HLT wake-up).
    pub(crate) lines: Arc<InterruptLines>,
}

impl CpuSignal {
    /// Makes the vCPU's emulator return to the vCPU loop soon, even from
    /// `HLT`.
    pub(crate) fn poke(&self) {
        self.attention.store(true, Ordering::SeqCst);
        self.lines.kick();
    }
}

/// The interrupt controllers and timers, under one lock.
struct Chips {
    pic: DualPic,
    pit: Pit,
    ioapic: IoApic,
    /// Indexed by vCPU id (= initial APIC ID); index 0 is the BSP.
    lapics: Vec<LocalApic>,
    /// Interrupt messages produced and not yet routed.
    out: Vec<Interrupt>,
}

impl Chips {
    /// Delivers the queued messages to the local APICs they match.
    /// Returns the vCPUs that received something.
    fn route(&mut self) -> Vec<usize> {
        let mut woken = Vec::new();
        let out = std::mem::take(&mut self.out);
        for irq in &out {
            for (i, apic) in self.lapics.iter_mut().enumerate() {
                if !apic.matches_destination(&irq.dest) {
                    continue;
                }
                apic.accept(irq);
                if !woken.contains(&i) {
                    woken.push(i);
                }
                // Lowest priority: one recipient is enough (arbitration
                // by priority is a refinement for SMP guests).
                if irq.delivery == DeliveryMode::LowestPriority {
                    break;
                }
            }
        }
        // Keep the allocation.
        self.out = out;
        self.out.clear();
        woken
    }

    /// Drives GSI `gsi` as KVM's default routing does: IOAPIC pin `gsi`
    /// and, for the ISA range, PIC pin `gsi`.
    fn set_gsi(&mut self, gsi: u32, level: bool) {
        if let Ok(pin) = usize::try_from(gsi) {
            self.ioapic.set_irq(pin, level, &mut self.out);
        }
        if let Ok(irq) = u8::try_from(gsi) {
            if irq < 16 {
                self.pic.set_irq(irq, level);
            }
        }
    }

    /// The PIC's INTR output is the BSP's LINT0.
    fn sync_lint0(&mut self) -> bool {
        let out = self.pic.output();
        if let Some(bsp) = self.lapics.first_mut() {
            bsp.set_lint0(out);
        }
        out
    }

    /// Collects the PIT's IRQ0 edges up to `now`: ISA IRQ0 is PIC pin 0
    /// and, per the MADT's interrupt source override, IOAPIC pin 2.
    fn tick_pit(&mut self, now: u64) {
        if self.pit.irq0_edges(now) > 0 {
            // One pulse: an edge-triggered input coalesces edges the guest
            // has not acknowledged in between, as on hardware.
            self.pic.set_irq(0, true);
            self.pic.set_irq(0, false);
            self.ioapic.set_irq(2, true, &mut self.out);
            self.ioapic.set_irq(2, false, &mut self.out);
        }
    }

    /// Runs a local APIC register write's consequences.
    fn lapic_action(&mut self, action: Option<LapicAction>) {
        match action {
            Some(LapicAction::Ipi(irq)) => self.out.push(irq),
            Some(LapicAction::Eoi(vector)) => self.ioapic.end_of_interrupt(vector, &mut self.out),
            None => {}
        }
    }
}

/// A port or MMIO address whose writes signal an eventfd.
struct IoEvent {
    addr: u64,
    pio: bool,
    /// Only a 4-byte write of this value signals (KVM's datamatch).
    datamatch: Option<u32>,
    fd: EventFd,
}

/// What the vCPU loop must do after [`Platform::service`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuMode {
    /// Run guest code. `blocked`: an interrupt is deliverable but
    /// RFLAGS.IF is clear, so it waits in the APIC; the vCPU loop must
    /// come back soon (at the next block) to hand it over once IF is set
    /// (`sti; hlt` would otherwise sleep until the next timer).
    Run { blocked: bool },
    /// An application processor waiting for a start-up IPI: do not run.
    WaitForSipi,
    /// A SIPI arrived: start in real mode at `vector * 0x1000`.
    Start(u8),
}

/// State shared with the helper thread.
struct Shared {
    start: Instant,
    chips: Mutex<Chips>,
    cpus: Vec<Arc<CpuSignal>>,
    /// Per vCPU: the virtual time its timers next need servicing.
    deadlines: Mutex<Vec<Option<u64>>>,
    irqfds: Mutex<Vec<(EventFd, u32)>>,
    ioevents: Mutex<Vec<IoEvent>>,
    /// Wakes the helper thread (new deadline, new irqfd, shutdown).
    wake: EventFd,
    shutdown: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn poke_all(&self, which: &[usize]) {
        for &i in which {
            if let Some(c) = self.cpus.get(i) {
                c.poke();
            }
        }
    }

    /// Pulses `gsi` (an edge), routes the result and wakes whoever got it.
    fn pulse_gsi(&self, gsi: u32) {
        let (woken, intr) = {
            let mut chips = lock(&self.chips);
            chips.set_gsi(gsi, true);
            chips.set_gsi(gsi, false);
            let intr = chips.sync_lint0();
            (chips.route(), intr)
        };
        self.poke_all(&woken);
        if intr {
            self.poke_all(&[0]);
        }
    }
}

/// [`Platform::edge_trigger`]'s handle.
struct DirectEdge {
    shared: Arc<Shared>,
    gsi: u32,
}

impl hypervisor::EdgeTrigger for DirectEdge {
    fn trigger(&self) -> std::io::Result<()> {
        self.shared.pulse_gsi(self.gsi);
        Ok(())
    }
}

/// The in-"kernel" platform of one emu VM.
pub struct Platform {
    shared: Arc<Shared>,
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // If this write failed the thread still sees the flag within
        // IDLE_WAIT_NS.
        let _ = self.shared.wake.write(1);
    }
}

impl Platform {
    /// The platform for `num_cpus` vCPUs, with its helper thread running.
    pub fn new(num_cpus: u32) -> std::io::Result<Arc<Platform>> {
        let lapics = (0..num_cpus)
            .map(|id| {
                let mut apic = LocalApic::new(id, id == 0).with_tsc_hz(TSC_HZ);
                if id != 0 {
                    // Application processors start parked in
                    // wait-for-SIPI, as after the BIOS's INIT.
                    apic.init();
                    apic.take_init();
                }
                apic
            })
            .collect();
        let shared = Arc::new(Shared {
            start: Instant::now(),
            chips: Mutex::new(Chips {
                pic: firmware_initialized_pic(),
                pit: Pit::new(),
                ioapic: IoApic::new(),
                lapics,
                out: Vec::new(),
            }),
            cpus: (0..num_cpus)
                .map(|_| Arc::new(CpuSignal::default()))
                .collect(),
            deadlines: Mutex::new(vec![None; num_cpus as usize]),
            irqfds: Mutex::new(Vec::new()),
            ioevents: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            shutdown: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        // The helper thread must never take a process-directed signal
        // (the VMM blocks SIGINT/SIGTERM/SIGHUP in its threads and reads
        // them from a signalfd, possibly after this VM exists): it starts
        // with every signal blocked, inherited from this thread's mask for
        // the duration of the spawn.
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("emu-platform".into())
                .spawn(move || helper_thread(&thread_shared))
        });
        spawned?;
        Ok(Arc::new(Platform { shared }))
    }

    /// vCPU `index`'s signal block.
    pub(crate) fn cpu_signal(&self, index: usize) -> Option<Arc<CpuSignal>> {
        self.shared.cpus.get(index).cloned()
    }

    /// IA32_APIC_BASE of vCPU `index`'s local APIC (its reset value).
    pub(crate) fn apic_base(&self, index: usize) -> Option<u64> {
        lock(&self.shared.chips)
            .lapics
            .get(index)
            .map(LocalApic::apic_base)
    }

    /// The virtual clock: nanoseconds since the VM was created.
    pub fn now_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// `Vm::set_irq_line`.
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> bool {
        if gsi as usize >= NUM_PINS {
            return false;
        }
        let (woken, intr) = {
            let mut chips = lock(&self.shared.chips);
            chips.set_gsi(gsi, level);
            let intr = chips.sync_lint0();
            (chips.route(), intr)
        };
        self.shared.poke_all(&woken);
        if intr {
            self.shared.poke_all(&[0]);
        }
        true
    }

    /// `Vm::register_irqfd`: the helper thread pulses `gsi` whenever `fd`
    /// is written.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<bool> {
        if gsi as usize >= NUM_PINS {
            return Ok(false);
        }
        let fd = fd.try_clone()?;
        lock(&self.shared.irqfds).push((fd, gsi));
        self.shared.wake.write(1)?;
        Ok(true)
    }

    /// `Vm::edge_trigger`: a handle that pulses `gsi` on the calling
    /// thread (routing it and waking the vCPU that takes it), with no
    /// helper-thread hop in between. None for a GSI the IOAPIC lacks.
    pub fn edge_trigger(&self, gsi: u32) -> Option<Arc<dyn hypervisor::EdgeTrigger>> {
        if gsi as usize >= NUM_PINS {
            return None;
        }
        Some(Arc::new(DirectEdge {
            shared: self.shared.clone(),
            gsi,
        }))
    }

    /// `Vm::register_ioevent`.
    pub fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        pio: bool,
        datamatch: Option<u32>,
    ) -> std::io::Result<()> {
        let fd = fd.try_clone()?;
        lock(&self.shared.ioevents).push(IoEvent {
            addr,
            pio,
            datamatch,
            fd,
        });
        Ok(())
    }

    /// Signals the ioeventfd registered for a `size`-byte write of `data`
    /// at `addr`, if any.
    pub(crate) fn ioevent(&self, addr: u64, pio: bool, size: u8, data: u64) -> bool {
        let events = lock(&self.shared.ioevents);
        let matches = |e: &&IoEvent| {
            e.addr == addr
                && e.pio == pio
                && e.datamatch
                    .is_none_or(|want| size == 4 && data & 0xffff_ffff == u64::from(want))
        };
        match events.iter().find(matches) {
            Some(e) => {
                // EAGAIN (counter full) still leaves the event signalled.
                let _ = e.fd.write(1);
                true
            }
            None => false,
        }
    }

    /// Advances the timers to now, routes what they raised, and hands
    /// vCPU `index`'s next deliverable interrupt to its emulator (only
    /// with RFLAGS.IF set, so that the local APIC's acknowledgement and
    /// the CPU taking the vector happen together), then tells the helper
    /// thread when this vCPU's timers next need it.
    pub(crate) fn service(&self, index: usize, emu: &mut Emulator) -> CpuMode {
        let Some(signal) = self.shared.cpus.get(index) else {
            return CpuMode::Run { blocked: false };
        };
        let now = self.shared.now_ns();
        let tsc = emu.msr(MSR_TSC).unwrap_or(now);
        let mut chips = lock(&self.shared.chips);
        if index >= chips.lapics.len() {
            return CpuMode::Run { blocked: false };
        }

        // The emulator keeps IA32_APIC_BASE itself (WRMSR 0x1b); carry
        // guest changes over to the APIC model, and undo those it refuses
        // (the guest misses the #GP it would get; see the report).
        let guest_base = emu.cpu().apic_base;
        if guest_base != chips.lapics[index].apic_base()
            && chips.lapics[index].set_apic_base(guest_base).is_err()
        {
            emu.cpu_mut().apic_base = chips.lapics[index].apic_base();
        }
        // Likewise IA32_TSC_DEADLINE, whose every write ends the run so
        // that it arrives here (the APIC ignores it outside TSC-deadline
        // mode).
        if let Some(deadline) = emu.take_tsc_deadline_write() {
            chips.lapics[index].set_tsc_deadline(deadline);
        }

        // INIT: the APIC reset itself and an AP now waits for SIPI, whose
        // start resets the vCPU's state (`CpuMode::Start`). An INIT of the
        // BSP (which Linux never sends) leaves its registers as they are.
        let _ = chips.lapics[index].take_init();
        if let Some(vector) = chips.lapics[index].take_startup() {
            drop(chips);
            return CpuMode::Start(vector);
        }
        if chips.lapics[index].is_waiting_for_sipi() {
            drop(chips);
            lock(&self.shared.deadlines)[index] = None;
            return CpuMode::WaitForSipi;
        }

        chips.tick_pit(now);
        chips.sync_lint0();
        let mut woken = chips.route();
        woken.retain(|&i| i != index);
        chips.lapics[index].advance(now, tsc);
        // What RDMSR returns: 0 once the deadline fired.
        emu.set_tsc_deadline_view(chips.lapics[index].tsc_deadline());

        if chips.lapics[index].take_nmi() {
            signal.lines.request_nmi();
        }
        // At most one vector waits in the emulator's lines at a time: it
        // was acknowledged at the APIC, so a second one would bypass the
        // APIC's priority rules.
        let interrupts_on = emu.cpu().rflags & rflags::IF != 0;
        let mut blocked = false;
        if !interrupts_on && !signal.lines.has_interrupt() {
            let apic = &chips.lapics[index];
            blocked = apic.pending_extint() || apic.pending_vector().is_some();
        }
        if interrupts_on && !signal.lines.has_interrupt() {
            if chips.lapics[index].pending_extint() {
                let vector = chips.pic.acknowledge();
                chips.lapics[index].acknowledge_extint();
                chips.sync_lint0();
                signal.lines.request(vector);
            } else if let Some(vector) = chips.lapics[index].pending_vector() {
                chips.lapics[index].acknowledge(vector);
                signal.lines.request(vector);
            }
        }

        let pit = if index == 0 {
            chips.pit.next_deadline_ns(now)
        } else {
            None
        };
        let apic = chips.lapics[index].next_deadline_ns(now, tsc);
        drop(chips);
        let next = match (pit, apic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.set_deadline(index, next);
        self.shared.poke_all(&woken);
        CpuMode::Run { blocked }
    }

    fn set_deadline(&self, index: usize, next: Option<u64>) {
        let mut deadlines = lock(&self.shared.deadlines);
        let Some(slot) = deadlines.get_mut(index) else {
            return;
        };
        let earlier = match (next, *slot) {
            (Some(n), Some(old)) => n < old,
            (Some(_), None) => true,
            _ => false,
        };
        *slot = next;
        drop(deadlines);
        if earlier {
            // A lost wake-up only delays the thread to its previous
            // deadline or IDLE_WAIT_NS.
            let _ = self.shared.wake.write(1);
        }
    }

    /// Guest `IN` of `size` bytes from `port` if the platform owns it.
    pub(crate) fn pio_in(&self, port: u16, size: u8) -> Option<u32> {
        if !owns_port(port) {
            return None;
        }
        let now = self.shared.now_ns();
        let mut chips = lock(&self.shared.chips);
        let mut value = 0u32;
        for i in 0..u16::from(size.clamp(1, 4)) {
            let p = port.wrapping_add(i);
            let byte = if DualPic::handles_port(p) {
                chips.pic.read(p)
            } else if Pit::handles_port(p) {
                chips.pit.read(p, now)
            } else {
                0xff
            };
            value |= u32::from(byte) << (8 * i);
        }
        // A poll-mode read acknowledges at the PIC.
        chips.sync_lint0();
        Some(value)
    }

    /// Guest `OUT` to `port`; false if the platform does not own it.
    pub(crate) fn pio_out(&self, port: u16, size: u8, data: u32) -> bool {
        if !owns_port(port) {
            return false;
        }
        let now = self.shared.now_ns();
        let intr = {
            let mut chips = lock(&self.shared.chips);
            for i in 0..u16::from(size.clamp(1, 4)) {
                let p = port.wrapping_add(i);
                // Truncation picks byte i.
                let byte = (data >> (8 * i)) as u8;
                if DualPic::handles_port(p) {
                    chips.pic.write(p, byte);
                } else if Pit::handles_port(p) {
                    chips.pit.write(p, byte, now);
                }
            }
            chips.sync_lint0()
        };
        // A PIT reprogramming or a PIC unmask can move deadlines and
        // interrupts; the writing vCPU services before it runs again, and
        // the BSP (PIC output) is poked.
        if intr {
            self.shared.poke_all(&[0]);
        }
        true
    }

    /// Guest read of `size` bytes at physical `addr` by vCPU `index`, if
    /// it hits the IOAPIC or this vCPU's local APIC page.
    pub(crate) fn mmio_read(&self, index: usize, addr: u64, size: u8) -> Option<u64> {
        let n = usize::from(size.clamp(1, 8));
        let mut data = [0u8; 8];
        let now = self.shared.now_ns();
        let chips = lock(&self.shared.chips);
        if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
            chips.ioapic.mmio_read(addr - IOAPIC_BASE, &mut data[..n]);
            return Some(u64::from_le_bytes(data));
        }
        let apic = chips.lapics.get(index)?;
        let base = apic.apic_base() & APIC_BASE_PAGE_MASK;
        if apic.mmio_enabled() && (base..base + APIC_MMIO_SIZE).contains(&addr) {
            apic.mmio_read(addr - base, &mut data[..n], now);
            return Some(u64::from_le_bytes(data));
        }
        None
    }

    /// Guest write at physical `addr` by vCPU `index`; false if neither
    /// the IOAPIC nor this vCPU's local APIC claims it.
    pub(crate) fn mmio_write(&self, index: usize, addr: u64, size: u8, data: u64) -> bool {
        let n = usize::from(size.clamp(1, 8));
        let bytes = data.to_le_bytes();
        let now = self.shared.now_ns();
        let woken = {
            let mut chips = lock(&self.shared.chips);
            if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
                let mut out = std::mem::take(&mut chips.out);
                chips
                    .ioapic
                    .mmio_write(addr - IOAPIC_BASE, &bytes[..n], &mut out);
                chips.out = out;
            } else {
                let Some(apic) = chips.lapics.get_mut(index) else {
                    return false;
                };
                let base = apic.apic_base() & APIC_BASE_PAGE_MASK;
                if !apic.mmio_enabled() || !(base..base + APIC_MMIO_SIZE).contains(&addr) {
                    return false;
                }
                let action = apic.mmio_write(addr - base, &bytes[..n], now);
                chips.lapic_action(action);
            }
            chips.route()
        };
        // The writer services itself before running on; others are poked
        // (IPIs, INIT/SIPI, interrupts re-raised by an EOI).
        let others: Vec<usize> = woken.into_iter().filter(|&i| i != index).collect();
        self.shared.poke_all(&others);
        true
    }
}

/// Runs `f` with every blockable signal blocked in this thread, then
/// restores the mask.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; sigfillset initialises `all`, and
    // pthread_sigmask only reads `all` and writes `old`, both live locals.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let blocked = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0
    };
    let r = f();
    if blocked {
        // SAFETY: restores the mask saved above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
    }
    r
}

/// Ports the platform answers: the PIC pair and ELCR, the PIT and port 0x61.
fn owns_port(port: u16) -> bool {
    DualPic::handles_port(port) || Pit::handles_port(port)
}

/// The helper thread: sleeps until the earliest vCPU deadline or an irqfd
/// write, then pokes the vCPUs whose deadline passed and pulses the GSIs
/// of the irqfds that fired.
fn helper_thread(s: &Shared) {
    loop {
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let now = s.now_ns();
        let mut next: Option<u64> = None;
        {
            let mut deadlines = lock(&s.deadlines);
            for (i, slot) in deadlines.iter_mut().enumerate() {
                let Some(t) = *slot else { continue };
                if t <= now {
                    *slot = None;
                    if let Some(c) = s.cpus.get(i) {
                        c.poke();
                    }
                } else {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        let wait_ns = next.map_or(IDLE_WAIT_NS, |t| (t - now).min(IDLE_WAIT_NS));

        // The raw fds stay valid while polled: irqfds are never removed
        // and `s` (which owns them) outlives this function.
        let fds: Vec<(i32, Option<u32>)> = std::iter::once((s.wake.as_raw_fd(), None))
            .chain(
                lock(&s.irqfds)
                    .iter()
                    .map(|(fd, gsi)| (fd.as_raw_fd(), Some(*gsi))),
            )
            .collect();
        let mut pollfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&(fd, _)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = libc::timespec {
            tv_sec: libc::time_t::try_from(wait_ns / 1_000_000_000).unwrap_or(1),
            tv_nsec: libc::c_long::try_from(wait_ns % 1_000_000_000).unwrap_or(0),
        };
        // SAFETY: `pollfds` is a live, correctly sized array of pollfd for
        // the duration of the call; `timeout` is a valid timespec; a null
        // signal mask leaves the thread's mask unchanged.
        let ready = unsafe {
            libc::ppoll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
        if ready <= 0 {
            // Timeout, or EINTR: recompute deadlines.
            continue;
        }
        for (pfd, &(_, gsi)) in pollfds.iter().zip(fds.iter()) {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            match gsi {
                None => {
                    let _ = s.wake.read();
                }
                Some(gsi) => {
                    let fired = lock(&s.irqfds)
                        .iter()
                        .find(|(fd, _)| fd.as_raw_fd() == pfd.fd)
                        .map(|(fd, _)| fd.read().is_ok())
                        .unwrap_or(false);
                    if fired {
                        s.pulse_gsi(gsi);
                    }
                }
            }
        }
    }
}

/// The PIC pair as PC firmware leaves it for the OS: vectors 0x08-0x0f
/// and 0x70-0x77, every line masked but the cascade. A PIC left in its
/// power-on state would deliver IRQ n as vector n through the boot CPU's
/// virtual-wire LINT0 (an exception vector) to a guest that never touched
/// it; firmware does this set-up on every PC, and Linux re-initialises
/// the PIC itself anyway.
fn firmware_initialized_pic() -> DualPic {
    let mut pic = DualPic::new();
    for (command, data, base, wiring, mask) in [
        (0x20u16, 0x21u16, 0x08u8, 0x04u8, 0xfbu8),
        (0xa0, 0xa1, 0x70, 0x02, 0xff),
    ] {
        pic.write(command, 0x11); // ICW1: edge, cascade, ICW4 follows
        pic.write(data, base); // ICW2: vector base
        pic.write(data, wiring); // ICW3: slave on IR2 / slave ID 2
        pic.write(data, 0x01); // ICW4: 8086 mode
        pic.write(data, mask); // OCW1: mask
    }
    pic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_and_pit_ports_are_claimed() {
        let p = Platform::new(1).unwrap();
        assert!(p.pio_in(0x21, 1).is_some());
        assert!(p.pio_in(0x61, 1).is_some());
        assert!(p.pio_in(0x3f8, 1).is_none());
        assert!(p.pio_out(0x43, 1, 0x34));
        assert!(!p.pio_out(0x80, 1, 0));
    }

    #[test]
    fn ioapic_and_lapic_mmio() {
        let p = Platform::new(1).unwrap();
        // IOAPIC version register through IOREGSEL/IOWIN.
        assert!(p.mmio_write(0, IOAPIC_BASE, 4, 1));
        let v = p.mmio_read(0, IOAPIC_BASE + 0x10, 4).unwrap();
        assert_eq!(v & 0xff, 0x20);
        // LAPIC version at 0xfee00030.
        let v = p.mmio_read(0, 0xfee0_0030, 4).unwrap();
        assert_eq!(v & 0xff, 0x14);
        assert!(p.mmio_read(0, 0xfed0_0000, 4).is_none());
        // Out-of-range vCPU index: only the IOAPIC answers.
        assert!(p.mmio_read(5, 0xfee0_0030, 4).is_none());
        assert!(!p.mmio_write(5, 0xfee0_0030, 4, 0));
    }

    #[test]
    fn out_of_range_gsi_is_refused() {
        let p = Platform::new(1).unwrap();
        assert!(!p.set_irq_line(24, true));
        assert!(!p.set_irq_line(u32::MAX, true));
        assert!(p.set_irq_line(4, true));
    }
}
