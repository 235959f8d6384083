//! The `emu` accelerator behind the `hypervisor` traits.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor::x86::{CpuidEntry, FpuState, MsrEntry, SpecialRegisters, StandardRegisters};
use hypervisor::GuestRam;
use hypervisor::{
    Hypervisor, HypervisorError, Result, Vcpu, VcpuExit, VcpuInterrupter, Vm, VmConfig,
};
use vmm_sys_util::eventfd::EventFd;

use crate::exec::{Emulator, Exception, Exit, InterruptLines};
use crate::mem::CodePages;
use crate::platform::{CpuMode, CpuSignal, Platform};
use crate::state::{seg, CpuState};

/// Instructions between two looks at the platform (timers, interrupts)
/// from [`Vcpu::run`]'s loop. The platform's helper thread also stops
/// the emulator at timer deadlines, so this only bounds the latency of
/// work the thread does not see.
const RUN_SLICE: u64 = 1 << 16;

/// Blocks remembered with `VESSEL_EMU_TRACE` (its value, else 64).
fn trace_len() -> Option<usize> {
    let text = std::env::var("VESSEL_EMU_TRACE").ok()?;
    Some(text.trim().parse::<usize>().unwrap_or(64).clamp(1, 1 << 20))
}

/// The exception-exit bit of #PF.
const PF_BIT: u32 = 1 << Exception::PF;

/// How long a parked application processor sleeps between checks.
const SIPI_WAIT: Duration = Duration::from_millis(20);

/// Stop on an exception of these vectors instead of delivering it, when
/// `VESSEL_EMU_EXIT_ON` names them (e.g. `6` or `6,13`): a debugging aid
/// that turns "the guest got #UD from a missing instruction" into a VMM
/// error showing the instruction.
fn exception_exits_from_env() -> u32 {
    let Ok(text) = std::env::var("VESSEL_EMU_EXIT_ON") else {
        return 0;
    };
    text.split(',')
        .filter_map(|v| v.trim().parse::<u8>().ok())
        .filter(|&v| v < 32)
        .fold(0, |bits, v| bits | (1 << v))
}

/// CPUID leaf 1 EDX: on-chip local APIC.
const LEAF1_EDX_APIC: u32 = 1 << 9;

/// What the platform adds to the CPU model: with the interrupt
/// controllers present the local APIC exists (KVM likewise sets the bit
/// only with its in-kernel irqchip), and its timer has TSC-deadline mode:
/// the emulator keeps IA32_TSC_DEADLINE and hands each write to the
/// platform (see [`Exit::PlatformUpdate`]). With it Linux programs its
/// timer by one MSR write and skips calibrating the APIC timer, which
/// otherwise waits 100 ms of guest time at boot. x2APIC stays off: its
/// MSRs (0x800-0x8ff) would need the same hook for every register.
fn platform_cpuid(table: &mut [CpuidEntry]) {
    for e in table.iter_mut().filter(|e| e.function == 1) {
        e.edx |= LEAF1_EDX_APIC;
        e.ecx |= crate::cpuid::LEAF1_ECX_TSC_DEADLINE;
    }
}

/// The software accelerator.
#[derive(Debug, Default)]
pub struct EmuHypervisor;

impl EmuHypervisor {
    pub fn new() -> Self {
        EmuHypervisor
    }
}

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    /// The vCPUs of a VM share one code-page map (a write by any of them
    /// invalidates every vCPU's decoded blocks of the page), the platform
    /// models one local APIC per vCPU, IPIs and INIT/SIPI. 254: the most
    /// xAPIC IDs below the broadcast ID 0xff (the VMM's MAX_CPUS too).
    fn max_vcpus(&self) -> u32 {
        254
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        if config.num_cpus == 0 || config.num_cpus > self.max_vcpus() {
            return Err(HypervisorError::InvalidArgument(format!(
                "{} vCPUs requested, the emu accelerator allows 1 to {}",
                config.num_cpus,
                self.max_vcpus()
            )));
        }
        let platform = if config.irqchip {
            Some(Platform::new(config.num_cpus).map_err(|e| {
                HypervisorError::Unsupported(format!("starting the emu interrupt controllers: {e}"))
            })?)
        } else {
            None
        };
        Ok(Arc::new(EmuVm {
            config: config.clone(),
            memory: Mutex::new(None),
            platform,
        }))
    }
}

/// A VM run by software vCPUs.
pub struct EmuVm {
    config: VmConfig,
    /// The guest memory, the code-page map every vCPU shares, and the
    /// instant their TSCs count from (one TSC for all: Linux checks that
    /// the CPUs' TSCs agree).
    memory: Mutex<Option<(GuestRam, CodePages, Instant)>>,
    /// The interrupt controllers and timers (`VmConfig::irqchip`).
    platform: Option<Arc<Platform>>,
}

impl EmuVm {
    fn platform(&self, what: &str) -> Result<&Arc<Platform>> {
        self.platform.as_ref().ok_or_else(|| {
            HypervisorError::Unsupported(format!(
                "{what} needs the in-accelerator interrupt controllers (VmConfig::irqchip)"
            ))
        })
    }
}

impl Vm for EmuVm {
    fn set_memory(&self, memory: &GuestRam) -> Result<()> {
        let mut held = self
            .memory
            .lock()
            .map_err(|_| HypervisorError::Unsupported("VM memory lock poisoned".into()))?;
        if held.is_some() {
            return Err(HypervisorError::InvalidArgument(
                "guest memory is already set".into(),
            ));
        }
        let code = CodePages::new(crate::mem::Ram::new(memory).end());
        // Devices write guest memory from their own threads (virtio DMA):
        // code decoded from a page they overwrite must be decoded again,
        // as when a vCPU writes it.
        let watched = code.clone();
        if !hypervisor::watch_writes(
            memory,
            Arc::new(move |gpa, len| watched.invalidate_range(gpa, len as u64)),
        ) {
            return Err(HypervisorError::InvalidArgument(
                "guest memory already belongs to another software-vCPU VM".into(),
            ));
        }
        *held = Some((memory.clone(), code, Instant::now()));
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        if id >= self.config.num_cpus {
            return Err(HypervisorError::InvalidArgument(format!(
                "vCPU id {id} is outside the VM's {} vCPUs",
                self.config.num_cpus
            )));
        }
        let held = self
            .memory
            .lock()
            .map_err(|_| HypervisorError::Unsupported("VM memory lock poisoned".into()))?;
        let (memory, code, tsc_origin) = held.as_ref().ok_or_else(|| {
            HypervisorError::InvalidArgument("set the VM's memory before creating vCPUs".into())
        })?;
        let mut table = crate::cpuid::table(id, self.config.num_cpus);
        if self.platform.is_some() {
            platform_cpuid(&mut table);
        }
        let cpuid: Arc<[CpuidEntry]> = table.into();
        let index = id as usize;
        let signal = match &self.platform {
            Some(p) => p.cpu_signal(index).ok_or_else(|| {
                HypervisorError::InvalidArgument(format!("vCPU id {id} has no local APIC"))
            })?,
            None => Arc::new(CpuSignal::default()),
        };
        let mut emu = Emulator::with_code_pages(memory, cpuid, Some(code.clone()));
        emu.set_tsc_origin(*tsc_origin);
        let pf_trace = std::env::var_os("VESSEL_EMU_PF_TRACE").map(|_| VecDeque::new());
        let exit_on = exception_exits_from_env();
        emu.set_exception_exits(exit_on | if pf_trace.is_some() { PF_BIT } else { 0 });
        let mut lines = None;
        if let Some(p) = &self.platform {
            // The emulator's IA32_APIC_BASE starts as the APIC model's
            // (BSP flag on vCPU 0 only).
            if let Some(base) = p.apic_base(index) {
                emu.cpu_mut().apic_base = base;
            }
            // With interrupt controllers, HLT with IF=1 waits for them.
            emu.attach_interrupts(signal.lines.clone());
            lines = Some(signal.lines.clone());
        }
        Ok(Box::new(EmuVcpu {
            emu,
            index,
            memory: memory.clone(),
            platform: self.platform.clone(),
            interrupter: Arc::new(EmuInterrupter {
                signal: signal.clone(),
            }),
            signal,
            lines,
            buf: [0; 8],
            answer: Answer::None,
            trace: trace_len().map(VecDeque::with_capacity),
            exit_on,
            reflecting: false,
            pf_trace,
            profile: std::env::var_os("VESSEL_EMU_PROFILE")
                .map(|_| std::collections::HashMap::new()),
        }))
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        if self.platform("set_irq_line")?.set_irq_line(gsi, level) {
            Ok(())
        } else {
            Err(HypervisorError::InvalidArgument(format!(
                "GSI {gsi} does not exist (the IOAPIC has 24 pins)"
            )))
        }
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        match self.platform("register_irqfd")?.register_irqfd(fd, gsi) {
            Ok(true) => Ok(()),
            Ok(false) => Err(HypervisorError::InvalidArgument(format!(
                "GSI {gsi} does not exist (the IOAPIC has 24 pins)"
            ))),
            Err(e) => Err(HypervisorError::Unsupported(format!("irqfd: {e}"))),
        }
    }

    fn edge_trigger(&self, gsi: u32) -> Result<Arc<dyn hypervisor::EdgeTrigger>> {
        self.platform("edge_trigger")?
            .edge_trigger(gsi)
            .ok_or_else(|| {
                HypervisorError::InvalidArgument(format!(
                    "GSI {gsi} does not exist (the IOAPIC has 24 pins)"
                ))
            })
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        pio: bool,
        datamatch: Option<u32>,
    ) -> Result<()> {
        if pio && addr > u64::from(u16::MAX) {
            return Err(HypervisorError::InvalidArgument(format!(
                "port {addr:#x} does not exist"
            )));
        }
        self.platform("register_ioevent")?
            .register_ioevent(fd, addr, pio, datamatch)
            .map_err(|e| HypervisorError::Unsupported(format!("ioeventfd: {e}")))
    }
}

/// Makes [`EmuVcpu::run`] return [`VcpuExit::Interrupted`]; the block loop
/// polls the attention flag between blocks.
#[derive(Debug)]
pub struct EmuInterrupter {
    signal: Arc<CpuSignal>,
}

impl VcpuInterrupter for EmuInterrupter {
    fn interrupt(&self) {
        // Request first, then attention: the vCPU loop clears attention
        // before looking at the request, so neither can be lost.
        self.signal
            .interrupt_requested
            .store(true, Ordering::SeqCst);
        self.signal.poke();
    }
}

/// What the data in the exit buffer answers when `run` is called again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    None,
    IoIn,
    MmioRead,
}

/// A software vCPU.
pub struct EmuVcpu {
    emu: Emulator,
    /// vCPU id = initial APIC ID = index into the platform's APICs.
    index: usize,
    /// Guest memory, for diagnostics.
    memory: GuestRam,
    platform: Option<Arc<Platform>>,
    interrupter: Arc<EmuInterrupter>,
    signal: Arc<CpuSignal>,
    lines: Option<Arc<InterruptLines>>,
    /// The exit buffer `VcpuExit` data slices borrow.
    buf: [u8; 8],
    answer: Answer,
    /// With `VESSEL_EMU_TRACE` set: the RIPs of the last blocks run (the
    /// emulator then runs one block per call), reported when the vCPU
    /// stops on an error or a triple fault.
    trace: Option<VecDeque<u64>>,
    /// Exceptions `VESSEL_EMU_EXIT_ON` asked to stop on.
    exit_on: u32,
    /// An exception reported to this loop (a traced #PF) is being let
    /// through to the guest: its exit is off for one emulator run.
    reflecting: bool,
    /// With `VESSEL_EMU_PF_TRACE` set: the last page faults (RIP, CS,
    /// RSP, error code), each reported to this loop before delivery; a
    /// page fault recurring at the same kernel RIP stops the VM with them.
    pf_trace: Option<VecDeque<(u64, u16, u64, u32)>>,
    /// With `VESSEL_EMU_PROFILE` set: how often each guest RIP was where a
    /// short run of blocks ended (a sampling profile of the guest,
    /// printed when the vCPU goes away).
    profile: Option<std::collections::HashMap<u64, u64>>,
}

/// Operations per run while profiling: short runs, many samples (a run
/// also ends at each exit, so device-heavy code shows more than its share).
const PROFILE_SLICE: u64 = 256;

/// With `VESSEL_EMU_STATS` set, each vCPU reports how many instructions
/// it retired when it goes away (the emulator performance work).
impl Drop for EmuVcpu {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let mut top: Vec<(u64, u64)> = profile.iter().map(|(r, n)| (*n, *r)).collect();
            top.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = top.iter().map(|(n, _)| n).sum();
            for (n, rip) in top.iter().take(60) {
                eprintln!(
                    "emu profile: vCPU {} {rip:#018x} {n} ({:.1}%)",
                    self.index,
                    *n as f64 * 100.0 / total.max(1) as f64
                );
            }
        }
        if std::env::var_os("VESSEL_EMU_STATS").is_some() {
            eprintln!(
                "emu: vCPU {} retired {} instructions; {} native runs (blocks' code included), {} of them finished by the interpreter; {} instructions in blocks' code; {} TLB misses refilled in blocks' code; {} pages marked as code (VM-wide)",
                self.index,
                self.emu.instructions_retired(),
                self.emu.native_runs_executed(),
                self.emu.native_run_exits(),
                self.emu.native_instructions(),
                self.emu.native_refills(),
                self.emu.code_pages().marks()
            );
        }
    }
}

impl EmuVcpu {
    /// The emulator underneath (state inspection, code invalidation).
    pub fn emulator(&mut self) -> &mut Emulator {
        &mut self.emu
    }

    /// The vCPU's interrupt request lines (created and attached on first
    /// use): `request(vector)` / `request_nmi()` from any thread. Once
    /// attached, HLT with interrupts enabled waits for a request (or
    /// the interrupter) instead of returning [`VcpuExit::Halt`]. With the
    /// platform (`VmConfig::irqchip`) they are attached from the start and
    /// fed by the local APIC.
    pub fn interrupt_lines(&mut self) -> Arc<InterruptLines> {
        if let Some(l) = &self.lines {
            return l.clone();
        }
        let l = self.signal.lines.clone();
        self.emu.attach_interrupts(l.clone());
        self.lines = Some(l.clone());
        l
    }

    /// Requests external interrupt `vector` (see [`Self::interrupt_lines`]).
    pub fn inject_interrupt(&mut self, vector: u8) {
        self.interrupt_lines().request(vector);
    }

    /// Where the vCPU is and the instruction there (for error reports).
    pub fn describe_position(&self) -> String {
        crate::diag::describe(self.emu.cpu(), Some(&self.memory))
    }

    /// Lets the exception just reported reach the guest: the faulting
    /// instruction runs again (one block) with only the exits
    /// `VESSEL_EMU_EXIT_ON` asked for, so the exception and whatever it
    /// escalates to (#GP from a bad gate, #DF, shutdown) are delivered
    /// as the processor would.
    fn reflect_exception(&mut self) {
        self.emu.set_exception_exits(self.exit_on);
    }

    /// The exceptions reported to this loop instead of delivered.
    fn exception_exits(&self) -> u32 {
        let pf = if self.pf_trace.is_some() { PF_BIT } else { 0 };
        self.exit_on | pf
    }

    /// The position and, when tracing, the last blocks run.
    fn stop_report(&self) -> String {
        let mut s = self.describe_position();
        if let Some(t) = &self.trace {
            let rips: Vec<String> = t.iter().map(|r| format!("{r:#x}")).collect();
            s.push_str(&format!("; last blocks: {}", rips.join(" ")));
        }
        s
    }

    /// Starts an application processor at `vector * 0x1000` in real mode
    /// (a start-up IPI).
    fn start_at(&mut self, vector: u8) {
        let base = self.emu.cpu().apic_base;
        let cpu = self.emu.cpu_mut();
        *cpu = CpuState::reset();
        cpu.apic_base = base;
        self.emu.reset_paravirt();
        let cpu = self.emu.cpu_mut();
        cpu.segs[seg::CS].selector = u16::from(vector) << 8;
        cpu.segs[seg::CS].base = u64::from(vector) << 12;
        cpu.rip = 0;
    }

    /// Takes back the attention flag; true if the VMM asked for the thread.
    fn take_attention(&self) -> bool {
        self.signal.attention.store(false, Ordering::SeqCst);
        self.signal
            .interrupt_requested
            .swap(false, Ordering::SeqCst)
    }
}

impl Vcpu for EmuVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // An MMIO read re-executes its instruction with the answer: no
        // interrupt may be taken in between.
        let mut replaying_mmio = false;
        match self.answer {
            Answer::IoIn => {
                let b = self.buf;
                self.emu
                    .set_io_in_data(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            Answer::MmioRead => {
                self.emu.set_mmio_read_data(u64::from_le_bytes(self.buf));
                replaying_mmio = true;
            }
            Answer::None => {}
        }
        self.answer = Answer::None;
        // An interrupt waits for RFLAGS.IF: run until the first block
        // boundary with IF set, so it is handed over as soon as it can.
        let mut interrupt_blocked = false;
        loop {
            if let Some(platform) = &self.platform {
                if !std::mem::take(&mut replaying_mmio) {
                    match platform.service(self.index, &mut self.emu) {
                        CpuMode::Run { blocked } => interrupt_blocked = blocked,
                        CpuMode::WaitForSipi => {
                            if self.take_attention() {
                                return Ok(VcpuExit::Interrupted);
                            }
                            self.signal
                                .lines
                                .wait(SIPI_WAIT, Some(&self.signal.attention));
                            continue;
                        }
                        CpuMode::Start(vector) => self.start_at(vector),
                    }
                }
            }
            let budget = match &mut self.trace {
                // Letting one exception through: one block, then the
                // exception exits are back.
                _ if self.reflecting => 1,
                Some(t) => {
                    if t.len() == t.capacity().max(1) {
                        t.pop_front();
                    }
                    t.push_back(self.emu.cpu().rip);
                    1
                }
                None if self.profile.is_some() => PROFILE_SLICE,
                None => RUN_SLICE,
            };
            let exit = if interrupt_blocked {
                self.emu
                    .run_until_interruptible(budget, Some(&self.signal.attention))
            } else {
                self.emu.run(budget, Some(&self.signal.attention))
            };
            if std::mem::take(&mut self.reflecting) {
                self.emu.set_exception_exits(self.exception_exits());
            }
            let platform = self.platform.as_deref();
            if let Some(profile) = self.profile.as_mut() {
                *profile.entry(self.emu.cpu().rip).or_insert(0) += 1;
            }
            return Ok(match exit {
                // The platform looks at the loop's top.
                Exit::BudgetExhausted | Exit::PlatformUpdate => continue,
                Exit::Interrupted => {
                    if self.take_attention() {
                        VcpuExit::Interrupted
                    } else {
                        // The platform wants a look (timer, interrupt).
                        continue;
                    }
                }
                Exit::IoIn { port, size } => {
                    if let Some(v) = platform.and_then(|p| p.pio_in(port, size)) {
                        self.emu.set_io_in_data(v);
                        continue;
                    }
                    self.buf = [0; 8];
                    self.answer = Answer::IoIn;
                    let n = usize::from(size).min(4);
                    VcpuExit::IoIn {
                        port,
                        data: &mut self.buf[..n],
                    }
                }
                Exit::IoOut { port, size, data } => {
                    if let Some(p) = platform {
                        if p.ioevent(u64::from(port), true, size, u64::from(data))
                            || p.pio_out(port, size, data)
                        {
                            continue;
                        }
                    }
                    self.buf[..4].copy_from_slice(&data.to_le_bytes());
                    let n = usize::from(size).min(4);
                    VcpuExit::IoOut {
                        port,
                        data: &self.buf[..n],
                    }
                }
                Exit::MmioRead { addr, size } => {
                    if let Some(v) = platform.and_then(|p| p.mmio_read(self.index, addr, size)) {
                        self.emu.set_mmio_read_data(v);
                        replaying_mmio = true;
                        continue;
                    }
                    self.buf = [0; 8];
                    self.answer = Answer::MmioRead;
                    let n = usize::from(size).min(8);
                    VcpuExit::MmioRead {
                        addr,
                        data: &mut self.buf[..n],
                    }
                }
                Exit::MmioWrite { addr, size, data } => {
                    if let Some(p) = platform {
                        if p.ioevent(addr, false, size, data)
                            || p.mmio_write(self.index, addr, size, data)
                        {
                            continue;
                        }
                    }
                    self.buf = data.to_le_bytes();
                    let n = usize::from(size).min(8);
                    VcpuExit::MmioWrite {
                        addr,
                        data: &self.buf[..n],
                    }
                }
                // HLT with IF clear (or without interrupt lines): nothing
                // but an NMI or INIT could end it; the VMM decides.
                Exit::Halt => VcpuExit::Halt,
                Exit::Shutdown => {
                    if std::env::var_os("VESSEL_EMU_DIAG").is_some() {
                        eprintln!("emu: triple fault (shutdown) at {}", self.stop_report());
                    }
                    VcpuExit::Shutdown
                }
                Exit::Exception(x) if x.vector == Exception::PF && self.exit_on & PF_BIT == 0 => {
                    let cpu = self.emu.cpu();
                    let entry = (
                        cpu.rip,
                        cpu.segs[seg::CS].selector,
                        cpu.gpr[4],
                        x.error_code.unwrap_or(0),
                    );
                    let mut recurring = false;
                    if let Some(t) = &mut self.pf_trace {
                        recurring = entry.1 & 3 == 0
                            && t.iter().rev().take(2).filter(|e| e.0 == entry.0).count() == 2;
                        if t.len() == 64 {
                            t.pop_front();
                        }
                        t.push_back(entry);
                    }
                    if recurring {
                        let list: Vec<String> = self
                            .pf_trace
                            .iter()
                            .flatten()
                            .map(|(rip, cs, rsp, code)| {
                                format!("rip {rip:#x} cs {cs:#x} rsp {rsp:#x} err {code:#x}")
                            })
                            .collect();
                        return Ok(VcpuExit::InternalError(format!(
                            "emu: recurring kernel page fault at {}; page faults: {}",
                            self.stop_report(),
                            list.join("; ")
                        )));
                    }
                    self.reflect_exception();
                    self.reflecting = true;
                    continue;
                }
                // Only vectors in the exception-exit bitmap get here.
                Exit::Exception(x) => VcpuExit::InternalError(format!(
                    "emu: guest exception {} (error code {:?}) at {}",
                    x.vector,
                    x.error_code,
                    self.stop_report()
                )),
                Exit::InternalError(what) => {
                    VcpuExit::InternalError(format!("emu: {what} at {}", self.stop_report()))
                }
            });
        }
    }

    fn interrupter(&self) -> Arc<dyn VcpuInterrupter> {
        self.interrupter.clone()
    }

    fn regs(&self) -> Result<StandardRegisters> {
        Ok(self.emu.cpu().standard())
    }

    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<()> {
        self.emu.cpu_mut().set_standard(regs);
        Ok(())
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        Ok(self.emu.cpu().special())
    }

    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<()> {
        self.emu.cpu_mut().set_special(sregs);
        Ok(())
    }

    /// No x87/SSE state yet; accepted so the VMM's boot sequence runs.
    fn set_fpu(&mut self, _fpu: &FpuState) -> Result<()> {
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        for m in msrs {
            if !self.emu.set_msr(m.index, m.data) {
                return Err(HypervisorError::Unsupported(format!(
                    "the emu accelerator does not implement MSR {:#x}",
                    m.index
                )));
            }
        }
        Ok(())
    }

    fn msr(&self, index: u32) -> Result<u64> {
        self.emu.msr(index).ok_or_else(|| {
            HypervisorError::Unsupported(format!(
                "the emu accelerator does not implement MSR {index:#x}"
            ))
        })
    }

    fn cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(self.emu.cpuid().to_vec())
    }
}
