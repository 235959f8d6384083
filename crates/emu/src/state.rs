//! Architectural state of one software vCPU.
//!
//! Kept as plain fields (GPRs in an array indexed by the x86 register
//! number) so the interpreter and native-run stubs can address them with a
//! constant offset. Conversions to and from the backend-neutral
//! [`StandardRegisters`]/[`SpecialRegisters`] live here too.

use hypervisor::x86::{DescriptorTable, Segment, SpecialRegisters, StandardRegisters};

/// GPR numbers as encoded in ModRM/REX.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
}

/// Segment register numbers as encoded in ModRM (ES, CS, SS, DS, FS, GS).
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
}

/// RFLAGS bits.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change with POPF at CPL 0 outside virtual-8086
    /// mode (VM and RF are never set by POPF; VIF/VIP are left alone).
    pub const POPF_WRITABLE: u64 = STATUS | TF | IF | DF | IOPL | NT | AC | ID;
}

/// Control-register, EFER and MSR bits the emulator looks at.
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_EM: u64 = 1 << 2;
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_UMIP: u64 = 1 << 11;
    pub const CR4_DE: u64 = 1 << 3;
    pub const CR0_PG: u64 = 1 << 31;
    pub const EFER_LMA: u64 = 1 << 10;
}

/// Model-specific registers this vCPU stores (no behaviour yet beyond
/// read-back; SYSCALL/SYSENTER come with the system instructions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub misc_enable: u64,
    pub pat: u64,
    /// Guest TSC = host-derived counter + this offset.
    pub tsc_offset: u64,
}

/// The whole architectural state the interpreter works on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuState {
    /// RAX..R15 by encoding number.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (see [`seg`]), with their descriptor caches.
    pub segs: [Segment; 6],
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
    pub msrs: Msrs,
    /// x87, MXCSR and XMM state.
    pub fpu: Fpu,
    /// DR0-DR7 (DR4/DR5 are never stored: they alias DR6/DR7). Kept for
    /// MOV to/from DRn; no breakpoint fires.
    pub dr: [u64; 8],
}

/// DR6 after reset (SDM Vol. 3B 18.2.3: reserved bits read as 1).
pub const DR6_RESET: u64 = 0xffff_0ff0;
/// DR7 after reset (bit 10 reads as 1).
pub const DR7_RESET: u64 = 0x400;

/// One x87 register: 64-bit significand (explicit integer bit) and
/// sign + 15-bit exponent, the layout FXSAVE uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct F80 {
    pub mant: u64,
    pub se: u16,
}

impl F80 {
    pub fn to_bytes(self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&self.mant.to_le_bytes());
        b[8..].copy_from_slice(&self.se.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 10]) -> Self {
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[..8]);
        F80 {
            mant: u64::from_le_bytes(m),
            se: u16::from_le_bytes([b[8], b[9]]),
        }
    }
}

/// The x87 FPU, MXCSR and the sixteen XMM registers (what FXSAVE saves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fpu {
    /// Data registers by physical number (ST(i) is `regs[(TOP + i) & 7]`).
    pub regs: [F80; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word, TOP included (bits 13:11).
    pub fsw: u16,
    /// Abridged tag word: bit i set = physical register i is not empty
    /// (FXSAVE's format; the full tag is derived from the contents).
    pub ftw: u8,
    /// Last x87 opcode (11 bits), instruction and data pointers.
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
}

impl Fpu {
    /// FCW after FNINIT.
    pub const FCW_INIT: u16 = 0x037f;
    /// MXCSR after reset: all exceptions masked, round to nearest.
    pub const MXCSR_RESET: u32 = 0x1f80;
    /// Writable MXCSR bits (DAZ supported): the MXCSR_MASK FXSAVE reports.
    pub const MXCSR_MASK: u32 = 0xffff;

    /// Power-up/RESET values (SDM Vol. 3A table 9-1): FCW 0040H, FSW 0,
    /// FTW 5555H (every register valid and zero), MXCSR 1F80H.
    pub fn reset() -> Self {
        Fpu {
            regs: [F80::default(); 8],
            fcw: 0x0040,
            fsw: 0,
            ftw: 0xff,
            fop: 0,
            fip: 0,
            fdp: 0,
            mxcsr: Self::MXCSR_RESET,
            xmm: [0; 16],
        }
    }

    /// FNINIT: FCW 037FH, FSW 0, all registers empty, pointers cleared.
    pub fn init(&mut self) {
        self.fcw = Self::FCW_INIT;
        self.fsw = 0;
        self.ftw = 0;
        self.fop = 0;
        self.fip = 0;
        self.fdp = 0;
    }

    #[inline]
    pub fn top(&self) -> usize {
        usize::from((self.fsw >> 11) & 7)
    }

    #[inline]
    pub fn set_top(&mut self, top: usize) {
        self.fsw = (self.fsw & !(7 << 11)) | (((top & 7) as u16) << 11);
    }

    /// Recomputes FSW.ES and FSW.B from the pending exceptions and the
    /// masks in FCW.
    #[inline]
    pub fn update_es(&mut self) {
        if self.fsw & !self.fcw & 0x3f != 0 {
            self.fsw |= 0x8080;
        } else {
            self.fsw &= !0x8080;
        }
    }

    /// The full 16-bit tag word (FSTENV's format) from the abridged one and
    /// the register contents: 00 valid, 01 zero, 10 special, 11 empty.
    pub fn full_tag(&self) -> u16 {
        let mut t = 0u16;
        for (i, r) in self.regs.iter().enumerate() {
            let tag = if self.ftw & (1 << i) == 0 {
                3
            } else {
                let exp = r.se & 0x7fff;
                if exp == 0x7fff || (exp != 0 && r.mant >> 63 == 0) {
                    2
                } else if exp == 0 {
                    if r.mant == 0 {
                        1
                    } else {
                        2
                    }
                } else {
                    0
                }
            };
            t |= tag << (2 * i);
        }
        t
    }
}

impl Default for Fpu {
    fn default() -> Self {
        Self::reset()
    }
}

impl CpuState {
    /// Code-segment bitness the decoder must use: 64 in long mode with
    /// CS.L, otherwise CS.D (32) or 16. Real mode is 16 unless CS.D was
    /// left set ("unreal" code), as on hardware.
    pub fn bitness(&self) -> u32 {
        let cs = &self.segs[seg::CS];
        if self.efer & bits::EFER_LMA != 0 && cs.l {
            64
        } else if cs.db {
            32
        } else {
            16
        }
    }

    /// Current privilege level. In protected mode it is CS's DPL (the RPL
    /// of CS equals it); in real mode 0.
    pub fn cpl(&self) -> u8 {
        if self.cr0 & bits::CR0_PE == 0 {
            0
        } else {
            self.segs[seg::CS].selector as u8 & 3
        }
    }

    pub fn standard(&self) -> StandardRegisters {
        let g = &self.gpr;
        StandardRegisters {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    pub fn set_standard(&mut self, r: &StandardRegisters) {
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        // Bit 1 always reads as one; the reserved bits above 21 and bits
        // 3, 5, 15 read as zero whatever the VMM wrote.
        self.rflags = (r.rflags & 0x3f_7fd5) | rflags::FIXED1;
    }

    pub fn special(&self) -> SpecialRegisters {
        SpecialRegisters {
            cs: self.segs[seg::CS],
            ds: self.segs[seg::DS],
            es: self.segs[seg::ES],
            fs: self.segs[seg::FS],
            gs: self.segs[seg::GS],
            ss: self.segs[seg::SS],
            tr: self.tr,
            ldt: self.ldt,
            gdt: self.gdt,
            idt: self.idt,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
        }
    }

    pub fn set_special(&mut self, s: &SpecialRegisters) {
        self.segs[seg::CS] = s.cs;
        self.segs[seg::DS] = s.ds;
        self.segs[seg::ES] = s.es;
        self.segs[seg::FS] = s.fs;
        self.segs[seg::GS] = s.gs;
        self.segs[seg::SS] = s.ss;
        self.tr = s.tr;
        self.ldt = s.ldt;
        self.gdt = s.gdt;
        self.idt = s.idt;
        self.cr0 = s.cr0;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8;
        self.efer = s.efer;
        // As with KVM, 0 means "leave the APIC base as it is".
        if s.apic_base != 0 {
            self.apic_base = s.apic_base;
        }
    }

    /// The state after RESET/INIT as the SDM gives it (Vol. 3A 9.1.1):
    /// real mode at F000:FFF0 with CS base FFFF0000.
    pub fn reset() -> Self {
        let data = Segment {
            limit: 0xffff,
            type_: 0x3,
            present: true,
            s: true,
            ..Default::default()
        };
        let mut segs = [data; 6];
        segs[seg::CS] = Segment {
            base: 0xffff_0000,
            selector: 0xf000,
            type_: 0xb,
            ..data
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: rflags::FIXED1,
            segs,
            tr: Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            ldt: Segment {
                limit: 0xffff,
                type_: 0x2,
                present: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            msrs: Msrs {
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                ..Default::default()
            },
            fpu: Fpu::reset(),
            dr: [0, 0, 0, 0, 0, 0, DR6_RESET, DR7_RESET],
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let mut cpu = CpuState::reset();
        let regs = StandardRegisters {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 13,
            r13: 14,
            r14: 15,
            r15: 16,
            rip: 0x1234,
            rflags: 0x2 | rflags::CF | rflags::ZF,
        };
        cpu.set_standard(&regs);
        assert_eq!(cpu.standard(), regs);
        assert_eq!(cpu.gpr[gpr::RSP], 7);
        let mut sregs = cpu.special();
        sregs.cr3 = 0x9000;
        sregs.fs.base = 0xdead_0000;
        cpu.set_special(&sregs);
        assert_eq!(cpu.special(), sregs);
        assert_eq!(cpu.segs[seg::FS].base, 0xdead_0000);
        assert_eq!(cpu.bitness(), 16);
    }
}
