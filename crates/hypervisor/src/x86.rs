//! x86-64 processor state in backend-neutral form.
//!
//! These are the VMM's words for registers; each backend converts to its
//! own (KVM's `kvm_regs`/`kvm_sregs`, or the software vCPU's state).

/// General-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: bool,
    /// Code or data segment (S bit) rather than a system segment.
    pub s: bool,
    /// 64-bit code segment (L bit).
    pub l: bool,
    /// Granularity: limit counted in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// A segment loaded from a GDT descriptor, the way the processor fills
    /// its descriptor cache.
    pub fn from_descriptor(selector: u16, descriptor: u64) -> Self {
        let base = ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000);
        let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
        let g = (descriptor >> 55) & 1 == 1;
        let limit = if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        Segment {
            base,
            limit,
            selector,
            type_: ((descriptor >> 40) & 0xf) as u8,
            s: (descriptor >> 44) & 1 == 1,
            dpl: ((descriptor >> 45) & 3) as u8,
            present: (descriptor >> 47) & 1 == 1,
            avl: (descriptor >> 52) & 1 == 1,
            l: (descriptor >> 53) & 1 == 1,
            db: (descriptor >> 54) & 1 == 1,
            g,
            unusable: false,
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and system registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The parts of the x87/SSE state a VMM sets at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    /// x87 control word.
    pub fcw: u16,
    /// SSE control and status register.
    pub mxcsr: u32,
}

impl Default for FpuState {
    /// The values after `FNINIT` and processor reset.
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
        }
    }
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// One CPUID leaf/subleaf and the registers it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Control-register and EFER bits the VMM needs by name.
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

/// MSR numbers the VMM sets at boot.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
    pub const MSR_STAR: u32 = 0xc000_0081;
    pub const MSR_LSTAR: u32 = 0xc000_0082;
    pub const MSR_CSTAR: u32 = 0xc000_0083;
    pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
}
