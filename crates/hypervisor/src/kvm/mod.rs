//! The KVM backend: Linux's in-kernel hypervisor through kvm-ioctls.

mod kick;

use crate::GuestRam;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId,
    Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use kick::{install_kick_handler, kick_signal, KvmInterrupter};

use crate::x86::{
    CpuidEntry, DescriptorTable, FpuState, MsrEntry, Segment, SpecialRegisters, StandardRegisters,
};
use crate::{Hypervisor, HypervisorError, Result, Vcpu, VcpuExit, VcpuInterrupter, Vm, VmConfig};

/// Where KVM on Intel keeps the three pages of its real-mode TSS. Below the
/// 4 GiB boundary and out of the way of RAM and the IOAPIC/LAPIC windows.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> HypervisorError {
    move |source| HypervisorError::Kvm { op, source }
}

/// Linux/KVM, opened through `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
    supported_cpuid: CpuId,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and reads what the host's KVM supports.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        if kvm.get_api_version() != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(HypervisorError::Unsupported(format!(
                "/dev/kvm speaks KVM API version {}, vessel needs {}",
                kvm.get_api_version(),
                kvm_bindings::KVM_API_VERSION
            )));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        install_kick_handler();
        Ok(KvmHypervisor {
            kvm,
            supported_cpuid,
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        if config.num_cpus == 0 || config.num_cpus > self.max_vcpus() {
            return Err(HypervisorError::InvalidArgument(format!(
                "{} vCPUs requested, KVM on this host allows 1 to {}",
                config.num_cpus,
                self.max_vcpus()
            )));
        }
        let fd = self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if config.irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            // The speaker port is left to the VMM (it ignores it); the PIT
            // itself runs in the kernel, as on every KVM VMM.
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        Ok(Arc::new(KvmVm {
            fd,
            cpuid: self.supported_cpuid.clone(),
            config: config.clone(),
            memory: Mutex::new(None),
        }))
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    fd: VmFd,
    cpuid: CpuId,
    config: VmConfig,
    /// Keeps the guest RAM mapped for as long as KVM may touch it.
    memory: Mutex<Option<GuestRam>>,
}

impl Vm for KvmVm {
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
        for (slot, region) in memory.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is a live mmap of `memory_size` bytes that we
            // keep alive (a clone of the collection is stored below) for as
            // long as this VM exists.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
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
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu_cpuid(&self.cpuid, id, self.config.num_cpus)?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if self.config.irqchip {
            set_lint(&fd)?;
        }
        Ok(Box::new(KvmVcpu {
            fd,
            interrupter: Arc::new(KvmInterrupter::default()),
        }))
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        pio: bool,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = if pio {
            let port = u16::try_from(addr).map_err(|_| {
                HypervisorError::InvalidArgument(format!(
                    "ioevent port {addr:#x} is not a 16-bit port"
                ))
            })?;
            IoEventAddress::Pio(u64::from(port))
        } else {
            IoEventAddress::Mmio(addr)
        };
        match datamatch {
            Some(value) => self.fd.register_ioevent(fd, &addr, value),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}

/// The host's supported CPUID, made per-vCPU: APIC IDs, the logical
/// processor count, and the hypervisor-present bit.
fn vcpu_cpuid(supported: &CpuId, id: u32, num_cpus: u32) -> Result<CpuId> {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | ((num_cpus.min(255)) << 16);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if num_cpus > 1 {
                    entry.edx |= 1 << 28; // HTT: the logical count in EBX is valid
                }
            }
            0xb | 0x1f => entry.edx = id,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// LINT0 delivers the PIC's ExtINT and LINT1 the NMI, the wiring firmware
/// sets up on a PC before handing over to the OS.
fn set_lint(fd: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|b| *b as u8)
            .collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    interrupter: Arc<KvmInterrupter>,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.interrupter.set_thread(None);
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // SAFETY: pthread_self has no preconditions.
        self.interrupter
            .set_thread(Some(unsafe { libc::pthread_self() }));
        if self.interrupter.pending.swap(false, Ordering::SeqCst) {
            return Ok(VcpuExit::Interrupted);
        }
        let run_ptr: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run_ptr` points into the kvm_run mapping owned by
        // `self.fd`, which lives for this whole call.
        let immediate_exit: *mut u8 = unsafe { std::ptr::addr_of_mut!((*run_ptr).immediate_exit) };
        kick::set_current_immediate_exit(immediate_exit);
        let result = self.fd.run();
        kick::set_current_immediate_exit(std::ptr::null_mut());
        match result {
            Ok(exit) => Ok(convert_exit(exit, run_ptr)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: as above; nothing else borrows kvm_run on this error path.
                unsafe { std::ptr::write_volatile(immediate_exit, 0) };
                self.interrupter.pending.store(false, Ordering::SeqCst);
                Ok(VcpuExit::Interrupted)
            }
            Err(source) => Err(HypervisorError::Kvm {
                op: "KVM_RUN",
                source,
            }),
        }
    }

    fn interrupter(&self) -> Arc<dyn VcpuInterrupter> {
        self.interrupter.clone()
    }

    fn regs(&self) -> Result<StandardRegisters> {
        let r = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(StandardRegisters {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&mut self, r: &StandardRegisters) -> Result<()> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        let s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(SpecialRegisters {
            cs: segment_from_kvm(&s.cs),
            ds: segment_from_kvm(&s.ds),
            es: segment_from_kvm(&s.es),
            fs: segment_from_kvm(&s.fs),
            gs: segment_from_kvm(&s.gs),
            ss: segment_from_kvm(&s.ss),
            tr: segment_from_kvm(&s.tr),
            ldt: segment_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegisters) -> Result<()> {
        // Start from the current state so fields this boundary does not
        // model (the pending-interrupt bitmap) keep KVM's values.
        let mut k: kvm_sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        k.cs = segment_to_kvm(&s.cs);
        k.ds = segment_to_kvm(&s.ds);
        k.es = segment_to_kvm(&s.es);
        k.fs = segment_to_kvm(&s.fs);
        k.gs = segment_to_kvm(&s.gs);
        k.ss = segment_to_kvm(&s.ss);
        k.tr = segment_to_kvm(&s.tr);
        k.ldt = segment_to_kvm(&s.ldt);
        k.gdt.base = s.gdt.base;
        k.gdt.limit = s.gdt.limit;
        k.idt.base = s.idt.base;
        k.idt.limit = s.idt.limit;
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        if s.apic_base != 0 {
            k.apic_base = s.apic_base;
        }
        self.fd.set_sregs(&k).map_err(kvm_err("KVM_SET_SREGS"))
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        let k = kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(kvm_err("KVM_SET_FPU"))
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries)
            .map_err(|e| HypervisorError::InvalidArgument(format!("MSR list: {e:?}")))?;
        let written = self.fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let failed = entries.get(written).map(|m| m.index).unwrap_or_default();
            return Err(HypervisorError::Unsupported(format!(
                "KVM_SET_MSRS stopped at MSR {failed:#x} ({written} of {} set)",
                entries.len()
            )));
        }
        Ok(())
    }

    fn msr(&self, index: u32) -> Result<u64> {
        let mut list = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| HypervisorError::InvalidArgument(format!("MSR list: {e:?}")))?;
        let read = self
            .fd
            .get_msrs(&mut list)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        match (read, list.as_slice().first()) {
            (1, Some(entry)) => Ok(entry.data),
            _ => Err(HypervisorError::Unsupported(format!(
                "KVM cannot read MSR {index:#x}"
            ))),
        }
    }

    fn cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

fn convert_exit<'a>(
    exit: kvm_ioctls::VcpuExit<'a>,
    run: *const kvm_bindings::kvm_run,
) -> VcpuExit<'a> {
    use kvm_ioctls::VcpuExit as K;
    match exit {
        K::IoIn(port, data) => VcpuExit::IoIn { port, data },
        K::IoOut(port, data) => VcpuExit::IoOut { port, data },
        K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
        K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
        K::Hlt => VcpuExit::Halt,
        K::Shutdown => VcpuExit::Shutdown,
        K::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::SystemPowerOff,
            KVM_SYSTEM_EVENT_RESET => VcpuExit::SystemReset,
            KVM_SYSTEM_EVENT_CRASH => VcpuExit::InternalError("guest crash event".into()),
            other => VcpuExit::Unhandled(format!("KVM system event {other}")),
        },
        K::InternalError => {
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
            // filled the `internal` member of the union; `run` points into
            // the live kvm_run mapping.
            let suberror = unsafe { (*run).__bindgen_anon_1.internal.suberror };
            let what = match suberror {
                1 => "emulation failure",
                2 => "simultaneous exceptions",
                3 => "unexpected exit during event delivery",
                4 => "unexpected exit reason",
                _ => "unknown suberror",
            };
            VcpuExit::InternalError(format!("KVM internal error {suberror} ({what})"))
        }
        K::FailEntry(reason, cpu) => VcpuExit::InternalError(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        )),
        K::Intr => VcpuExit::Interrupted,
        other => VcpuExit::Unhandled(format!("KVM exit {other:?}")),
    }
}

fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}
