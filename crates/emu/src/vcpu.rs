//! The `emu` accelerator behind the `hypervisor` traits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hypervisor::x86::{CpuidEntry, FpuState, MsrEntry, SpecialRegisters, StandardRegisters};
use hypervisor::{
    Hypervisor, HypervisorError, Result, Vcpu, VcpuExit, VcpuInterrupter, Vm, VmConfig,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::exec::{Emulator, Exit, InterruptLines};

/// Instructions between two looks at the interrupt flag from
/// [`Vcpu::run`]'s loop (the block loop also checks it between blocks).
const RUN_SLICE: u64 = 1 << 20;

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

    /// One vCPU until LOCK-prefixed instructions are atomic across host
    /// threads and code invalidation is shared between vCPUs.
    fn max_vcpus(&self) -> u32 {
        1
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        if config.num_cpus == 0 || config.num_cpus > self.max_vcpus() {
            return Err(HypervisorError::InvalidArgument(format!(
                "{} vCPUs requested, the emu accelerator allows 1 to {}",
                config.num_cpus,
                self.max_vcpus()
            )));
        }
        Ok(Arc::new(EmuVm {
            config: config.clone(),
            memory: Mutex::new(None),
        }))
    }
}

/// A VM run by software vCPUs.
pub struct EmuVm {
    config: VmConfig,
    memory: Mutex<Option<GuestMemoryMmap>>,
}

impl Vm for EmuVm {
    fn set_memory(&self, memory: &GuestMemoryMmap) -> Result<()> {
        let mut held = self
            .memory
            .lock()
            .map_err(|_| HypervisorError::Unsupported("VM memory lock poisoned".into()))?;
        if held.is_some() {
            return Err(HypervisorError::InvalidArgument(
                "guest memory is already set".into(),
            ));
        }
        *held = Some(memory.clone());
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
        let memory = held.as_ref().ok_or_else(|| {
            HypervisorError::InvalidArgument("set the VM's memory before creating vCPUs".into())
        })?;
        let cpuid: Arc<[CpuidEntry]> = crate::cpuid::table(id, self.config.num_cpus).into();
        Ok(Box::new(EmuVcpu {
            emu: Emulator::new(memory, cpuid),
            interrupter: Arc::new(EmuInterrupter::default()),
            lines: None,
            buf: [0; 8],
            answer: Answer::None,
        }))
    }

    fn set_irq_line(&self, _gsi: u32, _level: bool) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "the emu accelerator has no interrupt controller yet".into(),
        ))
    }

    fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "the emu accelerator has no irqfd support yet".into(),
        ))
    }

    fn register_ioevent(&self, _fd: &EventFd, _addr: u64, _pio: bool) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "the emu accelerator has no ioeventfd support yet".into(),
        ))
    }
}

/// Makes [`EmuVcpu::run`] return [`VcpuExit::Interrupted`]; the block loop
/// polls the flag between blocks.
#[derive(Debug, Default)]
pub struct EmuInterrupter {
    flag: AtomicBool,
    /// Kicked so a vCPU waiting in HLT sees the flag at once.
    lines: Arc<InterruptLines>,
}

impl VcpuInterrupter for EmuInterrupter {
    fn interrupt(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.lines.kick();
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
    interrupter: Arc<EmuInterrupter>,
    lines: Option<Arc<InterruptLines>>,
    /// The exit buffer `VcpuExit` data slices borrow.
    buf: [u8; 8],
    answer: Answer,
}

impl EmuVcpu {
    /// The emulator underneath (state inspection, code invalidation).
    pub fn emulator(&mut self) -> &mut Emulator {
        &mut self.emu
    }

    /// The vCPU's interrupt request lines (created and attached on first
    /// use): `request(vector)` / `request_nmi()` from any thread. Once
    /// attached, HLT with interrupts enabled waits for a request (or
    /// the interrupter) instead of returning [`VcpuExit::Halt`].
    pub fn interrupt_lines(&mut self) -> Arc<InterruptLines> {
        if let Some(l) = &self.lines {
            return l.clone();
        }
        let l = self.interrupter.lines.clone();
        self.emu.attach_interrupts(l.clone());
        self.lines = Some(l.clone());
        l
    }

    /// Requests external interrupt `vector` (see [`Self::interrupt_lines`]).
    pub fn inject_interrupt(&mut self, vector: u8) {
        self.interrupt_lines().request(vector);
    }
}

impl Vcpu for EmuVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        match self.answer {
            Answer::IoIn => {
                let b = self.buf;
                self.emu
                    .set_io_in_data(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            Answer::MmioRead => self.emu.set_mmio_read_data(u64::from_le_bytes(self.buf)),
            Answer::None => {}
        }
        self.answer = Answer::None;
        loop {
            let exit = self.emu.run(RUN_SLICE, Some(&self.interrupter.flag));
            return Ok(match exit {
                Exit::BudgetExhausted => continue,
                Exit::Interrupted => {
                    self.interrupter.flag.store(false, Ordering::SeqCst);
                    VcpuExit::Interrupted
                }
                Exit::IoIn { port, size } => {
                    self.buf = [0; 8];
                    self.answer = Answer::IoIn;
                    let n = usize::from(size).min(4);
                    VcpuExit::IoIn {
                        port,
                        data: &mut self.buf[..n],
                    }
                }
                Exit::IoOut { port, size, data } => {
                    self.buf[..4].copy_from_slice(&data.to_le_bytes());
                    let n = usize::from(size).min(4);
                    VcpuExit::IoOut {
                        port,
                        data: &self.buf[..n],
                    }
                }
                Exit::MmioRead { addr, size } => {
                    self.buf = [0; 8];
                    self.answer = Answer::MmioRead;
                    let n = usize::from(size).min(8);
                    VcpuExit::MmioRead {
                        addr,
                        data: &mut self.buf[..n],
                    }
                }
                Exit::MmioWrite { addr, size, data } => {
                    self.buf = data.to_le_bytes();
                    let n = usize::from(size).min(8);
                    VcpuExit::MmioWrite {
                        addr,
                        data: &self.buf[..n],
                    }
                }
                Exit::Halt => VcpuExit::Halt,
                Exit::Shutdown => VcpuExit::Shutdown,
                // Only vectors in the exception-exit bitmap get here.
                Exit::Exception(x) => VcpuExit::InternalError(format!(
                    "guest exception {} (error code {:?}) at rip {:#x}",
                    x.vector,
                    x.error_code,
                    self.emu.cpu().rip
                )),
                Exit::InternalError(what) => {
                    VcpuExit::InternalError(format!("emu: {what} at rip {:#x}", self.emu.cpu().rip))
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
