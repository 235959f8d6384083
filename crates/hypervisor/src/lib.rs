//! The accelerator boundary.
//!
//! Everything above this crate (the VMM, the devices, the command line) talks
//! to a virtual machine through the [`Hypervisor`], [`Vm`] and [`Vcpu`]
//! traits and never learns which accelerator runs it. Two backends
//! implement them: `kvm` here (Linux/KVM, hardware virtualization) and the
//! `emu` crate (vessel's own software x86-64 vCPU). Both share the same guest memory
//! (`vm-memory`) and the same device models, which see only the exits a vCPU
//! returns.

pub mod host;
pub mod kvm;
pub mod x86;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use ram::{watch_writes, GuestRam, WriteHook, WriteWatch};

pub use x86::{
    CpuidEntry, DescriptorTable, FpuState, MsrEntry, Segment, SpecialRegisters, StandardRegisters,
};

/// Why a vCPU stopped running guest code and handed control to the VMM.
///
/// Data slices borrow the backend's exit buffer: an `In` or MMIO read exit
/// must be answered by filling `data` before the next [`Vcpu::run`].
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest executed `IN` (or `INS`) on `port`; fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// The guest executed `OUT` (or `OUTS`) on `port` with `data`.
    IoOut { port: u16, data: &'a [u8] },
    /// The guest read `data.len()` bytes at a guest-physical address that is not RAM; fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// The guest wrote `data` at a guest-physical address that is not RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The vCPU executed `HLT` and no interrupt can wake it (without an
    /// in-kernel interrupt controller every `HLT` ends up here).
    Halt,
    /// The processor shut down, which on a PC means a triple fault.
    Shutdown,
    /// The guest asked the platform to reset (a backend-level system event).
    SystemReset,
    /// The guest asked the platform to power off (a backend-level system event).
    SystemPowerOff,
    /// [`VcpuInterrupter::interrupt`] was called: the VMM wants the thread back.
    Interrupted,
    /// The accelerator could not continue this guest (for KVM: an emulation
    /// failure or a failed VM entry). The string says what the backend knows.
    InternalError(String),
    /// An exit this VMM does not handle; the string names it.
    Unhandled(String),
}

/// Errors at the accelerator boundary. Each carries the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Properties of a VM that the backend needs when creating it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs the VM will have (APIC IDs 0..num_cpus).
    pub num_cpus: u32,
    /// Create the interrupt controllers (LAPICs, IOAPIC, PIC) and the PIT
    /// inside the accelerator. Without them, the VMM sees every `HLT`.
    pub irqchip: bool,
}

/// An accelerator able to create VMs.
pub trait Hypervisor: Send + Sync {
    /// Short name shown to users (`kvm`, `emu`).
    fn name(&self) -> &'static str;
    /// Largest number of vCPUs one VM can have.
    fn max_vcpus(&self) -> u32;
    /// Creates an empty VM (no memory, no vCPUs yet).
    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>>;
}

/// One virtual machine: its memory map, its vCPUs and its interrupt wiring.
pub trait Vm: Send + Sync {
    /// Makes every region of `memory` guest RAM at its guest-physical
    /// address. The VM keeps a reference so the mapping outlives it.
    fn set_memory(&self, memory: &GuestRam) -> Result<()>;
    /// Creates vCPU `id` (its APIC ID), with the backend's CPUID model.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Drives interrupt line `gsi` to `level` (edge devices pulse it).
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()>;
    /// Raises `gsi` (edge) whenever `fd` is written: the fast path for
    /// device interrupts that need no VMM round trip.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// A handle any thread uses to raise `gsi` (an edge): what a device's
    /// interrupt line holds. By default an irqfd, which is KVM's fastest
    /// path; a backend that can route the edge on the calling thread (the
    /// software vCPU's platform) returns a handle that does so, and saves
    /// the wake-up of a thread that waits on the eventfd.
    fn edge_trigger(&self, gsi: u32) -> Result<Arc<dyn EdgeTrigger>> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
            HypervisorError::Unsupported(format!("an eventfd for GSI {gsi}'s irqfd: {e}"))
        })?;
        self.register_irqfd(&fd, gsi)?;
        Ok(Arc::new(IrqFd(fd)))
    }
    /// Signals `fd` instead of exiting when the guest writes to `addr`
    /// (an MMIO address, or a port when `pio`): virtio queue notifications.
    /// With `datamatch`, only a 4-byte write of that value does (one
    /// eventfd per queue on a shared notify register); other writes exit
    /// as usual.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        pio: bool,
        datamatch: Option<u32>,
    ) -> Result<()>;
}

/// Raises one interrupt line, an edge, from any thread
/// ([`Vm::edge_trigger`]).
pub trait EdgeTrigger: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

/// An eventfd registered as an irqfd: a write raises its GSI.
#[derive(Debug)]
pub struct IrqFd(pub EventFd);

impl EdgeTrigger for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        // The counter only overflows after 2^64 - 2 unconsumed writes; a
        // non-blocking eventfd reports that as EAGAIN, which still leaves
        // the interrupt pending.
        match self.0.write(1) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

/// One virtual processor. A vCPU is run by one host thread at a time.
pub trait Vcpu: Send {
    /// Runs guest code until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// A handle other threads use to make [`Vcpu::run`] return
    /// [`VcpuExit::Interrupted`] promptly, even when the guest never exits.
    fn interrupter(&self) -> Arc<dyn VcpuInterrupter>;

    fn regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<()>;
    fn sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<()>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()>;
    fn msr(&self, index: u32) -> Result<u64>;
    /// The CPUID table this vCPU presents.
    fn cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// Makes a running vCPU come back to the VMM.
pub trait VcpuInterrupter: Send + Sync {
    fn interrupt(&self);
}
