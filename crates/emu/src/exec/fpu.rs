//! x87 control instructions, FXSAVE/FXRSTOR, and x87 arithmetic.
//!
//! Availability: x87 instructions raise #NM when CR0.EM or CR0.TS is set
//! (WAIT/FWAIT only with CR0.TS and CR0.MP). Arithmetic instructions
//! raise #MF first when an unmasked exception is pending (FSW.ES).
//!
//! Precision: arithmetic on 80-bit values is executed by the host's x87
//! unit (see [`super::hostfp`]) under the guest's precision and rounding
//! control, so results are bit-exact with the host. Unmasked x87
//! exceptions are recorded (FSW.ES) and reported as #MF at the next
//! waiting instruction, as on hardware; the faulting instruction itself
//! still writes its masked-response result (a documented deviation).

use iced_x86::{Code, MemorySize, Mnemonic, OpKind, Register};

use super::{fault, Core, Exception, OpResult, Stop};
use crate::block::{Handler, Op};
use crate::mem::{Access, PAGE_MASK};
use crate::state::bits::{CR0_EM, CR0_MP, CR0_NE, CR0_TS};
use crate::state::{Fpu, F80};

type R = OpResult;

fn gp0() -> Stop {
    Stop::Fault(Exception::with_code(Exception::GP, 0))
}

#[inline(always)]
fn x87_check(c: &Core) -> R {
    if c.cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(fault(Exception::NM));
    }
    Ok(())
}

/// Pending unmasked x87 exception: #MF (with CR0.NE; the legacy FERR#
/// path is not modelled and also gets #MF).
#[inline(always)]
fn pending_check(c: &Core) -> R {
    if c.cpu.fpu.fsw & 0x80 != 0 {
        let _ = CR0_NE;
        return Err(fault(Exception::MF));
    }
    Ok(())
}

fn fwait(c: &mut Core, _: &Op) -> R {
    if c.cpu.cr0 & (CR0_TS | CR0_MP) == (CR0_TS | CR0_MP) {
        return Err(fault(Exception::NM));
    }
    pending_check(c)
}

fn fninit(c: &mut Core, _: &Op) -> R {
    x87_check(c)?;
    c.cpu.fpu.init();
    Ok(())
}

fn fnclex(c: &mut Core, _: &Op) -> R {
    x87_check(c)?;
    c.cpu.fpu.fsw &= !0x80ff;
    Ok(())
}

fn fnstcw(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    let lin = c.mem_linear(op);
    c.write(lin, 2, u64::from(c.cpu.fpu.fcw))
}

fn fldcw(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    let lin = c.mem_linear(op);
    let v = c.read(lin, 2)? as u16;
    // Bits 7 and 13-15 read as zero, bit 6 as one (as with FXRSTOR).
    c.cpu.fpu.fcw = (v & 0x1f3f) | 0x40;
    c.cpu.fpu.update_es();
    Ok(())
}

fn fnstsw(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    let v = u64::from(c.cpu.fpu.fsw);
    if op.instr.op_kind(0) == OpKind::Register {
        c.set_reg(Register::AX, v);
        Ok(())
    } else {
        let lin = c.mem_linear(op);
        c.write(lin, 2, v)
    }
}

// ---- FXSAVE / FXRSTOR ------------------------------------------------------------

fn fx_area(c: &mut Core, op: &Op) -> Result<u64, Stop> {
    if c.cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(fault(Exception::NM));
    }
    let lin = c.mem_linear(op);
    if lin & 15 != 0 {
        return Err(gp0());
    }
    Ok(lin)
}

/// Whether the instruction is the REX.W (64-bit pointer) form.
fn fx64(op: &Op) -> bool {
    matches!(
        op.instr.code(),
        Code::Fxsave64_m512byte | Code::Fxrstor64_m512byte
    )
}

/// The 512-byte FXSAVE image of the current state (bytes 416..512 are
/// left as `area` had them).
pub(crate) fn fxsave_image(f: &Fpu, wide: bool, xmm_regs: usize, area: &mut [u8; 512]) {
    area[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    area[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    area[4] = f.ftw;
    area[5] = 0;
    area[6..8].copy_from_slice(&f.fop.to_le_bytes());
    if wide {
        area[8..16].copy_from_slice(&f.fip.to_le_bytes());
        area[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        // FIP/FDP offsets with FCS/FDS: stored as zero (deprecated FPU
        // CS/DS, as CPUID.7.EBX[13] parts do).
        area[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        area[12..16].fill(0);
        area[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
        area[20..24].fill(0);
    }
    area[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    area[28..32].copy_from_slice(&Fpu::MXCSR_MASK.to_le_bytes());
    let top = f.top();
    for i in 0..8 {
        let o = 32 + 16 * i;
        area[o..o + 10].copy_from_slice(&f.regs[(top + i) & 7].to_bytes());
        area[o + 10..o + 16].fill(0);
    }
    for (i, x) in f.xmm.iter().enumerate().take(xmm_regs) {
        let o = 160 + 16 * i;
        area[o..o + 16].copy_from_slice(&x.to_le_bytes());
    }
}

fn fxsave(c: &mut Core, op: &Op) -> R {
    let lin = fx_area(c, op)?;
    // Check the last byte too so a fault writes nothing.
    if lin & !PAGE_MASK != lin.wrapping_add(511) & !PAGE_MASK {
        c.translate(lin.wrapping_add(511), Access::Write)?;
    }
    c.translate(lin, Access::Write)?;
    let xmm_regs = if op.bitness == 64 { 16 } else { 8 };
    let mut area = [0u8; 512];
    fxsave_image(&c.cpu.fpu, fx64(op), xmm_regs, &mut area);
    let end = 160 + 16 * xmm_regs;
    for k in (0..end).step_by(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&area[k..k + 8]);
        c.write(lin.wrapping_add(k as u64), 8, u64::from_le_bytes(b))?;
    }
    Ok(())
}

fn fxrstor(c: &mut Core, op: &Op) -> R {
    let lin = fx_area(c, op)?;
    let xmm_regs = if op.bitness == 64 { 16 } else { 8 };
    let end = 160 + 16 * xmm_regs;
    let mut area = [0u8; 512];
    for k in (0..end).step_by(8) {
        let v = c.read(lin.wrapping_add(k as u64), 8)?;
        area[k..k + 8].copy_from_slice(&v.to_le_bytes());
    }
    let le16 = |o: usize| u16::from_le_bytes([area[o], area[o + 1]]);
    let le32 = |o: usize| u32::from_le_bytes([area[o], area[o + 1], area[o + 2], area[o + 3]]);
    let le64 = |o: usize| u64::from(le32(o)) | (u64::from(le32(o + 4)) << 32);
    let mxcsr = le32(24);
    if mxcsr & !Fpu::MXCSR_MASK != 0 {
        return Err(gp0());
    }
    let f = &mut c.cpu.fpu;
    f.fcw = (le16(0) & 0x1f3f) | 0x40;
    f.update_es();
    f.fsw = le16(2);
    f.ftw = area[4];
    f.fop = le16(6) & 0x7ff;
    if fx64(op) {
        f.fip = le64(8);
        f.fdp = le64(16);
    } else {
        f.fip = u64::from(le32(8));
        f.fdp = u64::from(le32(16));
    }
    f.mxcsr = mxcsr;
    let top = f.top();
    for i in 0..8 {
        let o = 32 + 16 * i;
        let mut b = [0u8; 10];
        b.copy_from_slice(&area[o..o + 10]);
        f.regs[(top + i) & 7] = F80::from_bytes(b);
    }
    for i in 0..xmm_regs {
        let o = 160 + 16 * i;
        let mut b = [0u8; 16];
        b.copy_from_slice(&area[o..o + 16]);
        f.xmm[i] = u128::from_le_bytes(b);
    }
    Ok(())
}

// ---- x87 arithmetic ------------------------------------------------------------------

const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const IE: u16 = 1;
const SF: u16 = 1 << 6;

/// The default NaN (QNaN floating-point indefinite).
const INDEFINITE: F80 = F80 {
    mant: 0xc000_0000_0000_0000,
    se: 0xffff,
};

impl Fpu {
    #[inline]
    fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    #[inline]
    fn is_empty(&self, i: usize) -> bool {
        self.ftw & (1 << self.phys(i)) == 0
    }

    #[inline]
    fn st(&self, i: usize) -> F80 {
        self.regs[self.phys(i)]
    }

    #[inline]
    fn set_st(&mut self, i: usize, v: F80) {
        let p = self.phys(i);
        self.regs[p] = v;
        self.ftw |= 1 << p;
    }

    fn pop(&mut self) {
        let p = self.phys(0);
        self.ftw &= !(1 << p);
        self.set_top(self.top() + 1);
    }

    /// Records exception flags (and C1) from an operation.
    fn raise(&mut self, sw: u16) {
        self.fsw = (self.fsw & !C1) | (sw & (0x3f | C1));
        self.update_es();
    }

    /// Stack underflow/overflow: IE|SF, C1 = overflow.
    fn stack_fault(&mut self, overflow: bool) {
        self.fsw |= IE | SF;
        if overflow {
            self.fsw |= C1;
        } else {
            self.fsw &= !C1;
        }
        self.update_es();
    }

    /// Pushes `v`; on overflow stores the indefinite (masked response) or
    /// nothing (unmasked).
    fn push(&mut self, v: F80) {
        let new_top = (self.top() + 7) & 7;
        if self.ftw & (1 << new_top) != 0 {
            self.stack_fault(true);
            if self.fcw & 1 == 0 {
                return;
            }
            self.set_top(new_top);
            self.set_st(0, INDEFINITE);
            return;
        }
        self.set_top(new_top);
        self.set_st(0, v);
    }
}

fn buf16(v: F80) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..10].copy_from_slice(&v.to_bytes());
    b
}

fn from16(b: &[u8; 16]) -> F80 {
    let mut t = [0u8; 10];
    t.copy_from_slice(&b[..10]);
    F80::from_bytes(t)
}

/// Common prologue of x87 data instructions: #NM, #MF, and the
/// instruction/data pointers and opcode.
fn begin(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    pending_check(c)?;
    c.cpu.fpu.fip = op.instr.ip();
    if op.instr.op_count() > 0 && op.instr.op_kind(0) == OpKind::Memory
        || op.instr.op_count() > 1 && op.instr.op_kind(1) == OpKind::Memory
    {
        c.cpu.fpu.fdp = c.ea(op);
    }
    Ok(())
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

/// A single- or double-precision signaling NaN widened to 80 bits as the
/// processor holds it inside an arithmetic instruction: still signaling,
/// sign and payload kept. (FLD instead quiets it, as the host's `fld`
/// does.) `None` when `bits` (of `size` bytes) is not a signaling NaN.
#[cfg(target_arch = "x86_64")]
fn widen_snan(bits: u64, size: usize) -> Option<F80> {
    let (exp_bits, frac_bits) = if size == 4 { (8, 23) } else { (11, 52) };
    let sign = (bits >> (exp_bits + frac_bits)) & 1;
    let exp = (bits >> frac_bits) & ((1 << exp_bits) - 1);
    let frac = bits & ((1u64 << frac_bits) - 1);
    let quiet = 1u64 << (frac_bits - 1);
    if exp != (1 << exp_bits) - 1 || frac == 0 || frac & quiet != 0 {
        return None;
    }
    Some(F80 {
        mant: (1 << 63) | (frac << (63 - frac_bits)),
        se: ((sign as u16) << 15) | 0x7fff,
    })
}

/// Reads a memory operand of the instruction as an 80-bit value: as FLD
/// converts it, or with `as_source`, as an arithmetic or compare
/// instruction sees it (a signaling NaN stays signaling, so that the
/// operation's NaN rules pick the same operand as the processor's).
#[cfg(target_arch = "x86_64")]
fn load_mem(c: &mut Core, op: &Op, as_source: bool) -> Result<(F80, u16), Stop> {
    use super::hostfp as h;
    let lin = c.mem_linear(op);
    let ms = op.instr.memory_size();
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let fcw = c.cpu.fpu.fcw;
    let sw = match ms {
        MemorySize::Float80 => {
            let lo = c.read(lin, 8)?;
            let hi = c.read(lin.wrapping_add(8), 2)?;
            return Ok((
                F80 {
                    mant: lo,
                    se: hi as u16,
                },
                0,
            ));
        }
        MemorySize::Float32 | MemorySize::Int32 => {
            let bits = c.read(lin, 4)?;
            src[..4].copy_from_slice(&(bits as u32).to_le_bytes());
            if ms == MemorySize::Float32 {
                if let Some(snan) = widen_snan(bits, 4).filter(|_| as_source) {
                    return Ok((snan, IE));
                }
                h::ld32(&src, &mut dst, fcw)
            } else {
                h::ild32(&src, &mut dst, fcw)
            }
        }
        MemorySize::Float64 | MemorySize::Int64 => {
            let bits = c.read(lin, 8)?;
            src[..8].copy_from_slice(&bits.to_le_bytes());
            if ms == MemorySize::Float64 {
                if let Some(snan) = widen_snan(bits, 8).filter(|_| as_source) {
                    return Ok((snan, IE));
                }
                h::ld64(&src, &mut dst, fcw)
            } else {
                h::ild64(&src, &mut dst, fcw)
            }
        }
        MemorySize::Int16 => {
            src[..2].copy_from_slice(&(c.read(lin, 2)? as u16).to_le_bytes());
            h::ild16(&src, &mut dst, fcw)
        }
        _ => return Err(Stop::Exit(super::Exit::InternalError("x87 memory format"))),
    };
    Ok((from16(&dst), sw & 0x3f))
}

#[cfg(target_arch = "x86_64")]
mod arith {
    use super::*;
    use crate::exec::hostfp as h;

    pub(super) fn fld(c: &mut Core, op: &Op) -> R {
        begin(c, op)?;
        let v = match op.instr.mnemonic() {
            Mnemonic::Fld1 => F80 {
                mant: 1 << 63,
                se: 0x3fff,
            },
            Mnemonic::Fldz => F80::default(),
            _ => match op.instr.op_kind(0) {
                OpKind::Register => {
                    let i = st_index(op.instr.op0_register());
                    if c.cpu.fpu.is_empty(i) {
                        c.cpu.fpu.stack_fault(false);
                        INDEFINITE
                    } else {
                        c.cpu.fpu.st(i)
                    }
                }
                _ => {
                    let (v, sw) = load_mem(c, op, false)?;
                    c.cpu.fpu.raise(sw);
                    v
                }
            },
        };
        c.cpu.fpu.fsw &= !C1;
        c.cpu.fpu.push(v);
        Ok(())
    }

    /// FST/FSTP/FIST/FISTP/FISTTP (memory or ST(i)).
    pub(super) fn fst(c: &mut Core, op: &Op) -> R {
        begin(c, op)?;
        let pops = matches!(
            op.instr.mnemonic(),
            Mnemonic::Fstp | Mnemonic::Fistp | Mnemonic::Fisttp
        );
        let empty = c.cpu.fpu.is_empty(0);
        let v = if empty {
            c.cpu.fpu.stack_fault(false);
            if c.cpu.fpu.fcw & 1 == 0 {
                return Ok(());
            }
            INDEFINITE
        } else {
            c.cpu.fpu.st(0)
        };
        if op.instr.op_kind(0) == OpKind::Register {
            let i = st_index(op.instr.op0_register());
            c.cpu.fpu.set_st(i, v);
        } else {
            let lin = c.mem_linear(op);
            let fcw = c.cpu.fpu.fcw;
            let src = buf16(v);
            let mut dst = [0u8; 16];
            let ms = op.instr.memory_size();
            let fisttp = op.instr.mnemonic() == Mnemonic::Fisttp;
            let (sw, size) = match ms {
                MemorySize::Float80 => (0, 10),
                MemorySize::Float32 => (h::st32(&src, &mut dst, fcw), 4),
                MemorySize::Float64 => (h::st64(&src, &mut dst, fcw), 8),
                MemorySize::Int16 if fisttp => (h::istt16(&src, &mut dst, fcw), 2),
                MemorySize::Int32 if fisttp => (h::istt32(&src, &mut dst, fcw), 4),
                MemorySize::Int64 if fisttp => (h::istt64(&src, &mut dst, fcw), 8),
                MemorySize::Int16 => (h::ist16(&src, &mut dst, fcw), 2),
                MemorySize::Int32 => (h::ist32(&src, &mut dst, fcw), 4),
                MemorySize::Int64 => (h::ist64(&src, &mut dst, fcw), 8),
                _ => return Err(Stop::Exit(super::super::Exit::InternalError("x87 store"))),
            };
            let bytes = if size == 10 { src } else { dst };
            let mut lo = [0u8; 8];
            lo.copy_from_slice(&bytes[..8]);
            let lo = u64::from_le_bytes(lo);
            if size == 10 {
                c.translate(lin.wrapping_add(9), Access::Write)?;
                c.write(lin, 8, lo)?;
                c.write(
                    lin.wrapping_add(8),
                    2,
                    u64::from(u16::from_le_bytes([bytes[8], bytes[9]])),
                )?;
            } else {
                c.write(lin, size, lo)?;
            }
            if !empty {
                c.cpu.fpu.raise(sw);
            }
        }
        if pops {
            c.cpu.fpu.pop();
        }
        Ok(())
    }

    type Bin = fn(&mut [u8; 16], &[u8; 16], u16) -> u16;

    /// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR and their P and I forms.
    pub(super) fn farith(c: &mut Core, op: &Op) -> R {
        begin(c, op)?;
        use Mnemonic as M;
        let m = op.instr.mnemonic();
        let (f, reverse): (Bin, bool) = match m {
            M::Fadd | M::Faddp | M::Fiadd => (h::fadd, false),
            M::Fmul | M::Fmulp | M::Fimul => (h::fmul, false),
            M::Fsub | M::Fsubp | M::Fisub => (h::fsub, false),
            M::Fsubr | M::Fsubrp | M::Fisubr => (h::fsub, true),
            M::Fdiv | M::Fdivp | M::Fidiv => (h::fdiv, false),
            _ => (h::fdiv, true),
        };
        let pop = matches!(
            m,
            M::Faddp | M::Fmulp | M::Fsubp | M::Fsubrp | M::Fdivp | M::Fdivrp
        );
        // (destination index, other operand)
        let (dst, other) = match (op.instr.op_count(), op.instr.op_kind(0)) {
            (1, OpKind::Memory) => (0usize, None),
            (2, _) => (
                st_index(op.instr.op0_register()),
                Some(st_index(op.instr.op1_register())),
            ),
            _ => (1, Some(0)),
        };
        let (b, load_sw) = match other {
            None => load_mem(c, op, true)?,
            Some(i) => {
                if c.cpu.fpu.is_empty(i) {
                    return underflow(c, dst, pop);
                }
                (c.cpu.fpu.st(i), 0)
            }
        };
        if c.cpu.fpu.is_empty(dst) {
            return underflow(c, dst, pop);
        }
        let a = c.cpu.fpu.st(dst);
        let (mut x, y) = if reverse {
            (buf16(b), buf16(a))
        } else {
            (buf16(a), buf16(b))
        };
        let nan = is_nan(a) || is_nan(b);
        let sw = merge_flags(load_sw, f(&mut x, &y, c.cpu.fpu.fcw), nan);
        c.cpu.fpu.raise(sw);
        c.cpu.fpu.set_st(dst, from16(&x));
        if pop {
            c.cpu.fpu.pop();
        }
        Ok(())
    }

    /// Flags of a memory operand's conversion and of the operation (with
    /// `nan`, a NaN among the operands): an invalid operation, a NaN
    /// operand and a division by zero take priority over a denormal
    /// operand, which is then not reported (SDM Vol. 1 4.9.2; found by a
    /// random seed: `fmul m64` of a denormal double with a QNaN in ST0
    /// reported DE).
    fn merge_flags(load: u16, op: u16, nan: bool) -> u16 {
        const DE: u16 = 2;
        const ZE: u16 = 4;
        let f = load | op;
        if f & (IE | ZE) != 0 || nan {
            f & !DE
        } else {
            f
        }
    }

    /// A NaN, quiet or signaling (exponent all ones, integer bit set, a
    /// fraction); pseudo-NaNs are unsupported formats, an invalid
    /// operation anyway.
    fn is_nan(v: F80) -> bool {
        v.se & 0x7fff == 0x7fff && v.mant >> 63 == 1 && v.mant << 1 != 0
    }

    fn underflow(c: &mut Core, dst: usize, pop: bool) -> R {
        c.cpu.fpu.stack_fault(false);
        if c.cpu.fpu.fcw & 1 != 0 {
            c.cpu.fpu.set_st(dst, INDEFINITE);
            if pop {
                c.cpu.fpu.pop();
            }
        }
        Ok(())
    }

    /// FSQRT/FRNDINT/FSCALE/FCHS/FABS on ST(0).
    pub(super) fn funary(c: &mut Core, op: &Op) -> R {
        begin(c, op)?;
        use Mnemonic as M;
        let m = op.instr.mnemonic();
        if c.cpu.fpu.is_empty(0) || (m == M::Fscale && c.cpu.fpu.is_empty(1)) {
            return underflow(c, 0, false);
        }
        let a = c.cpu.fpu.st(0);
        let r = match m {
            M::Fchs => F80 {
                se: a.se ^ 0x8000,
                ..a
            },
            M::Fabs => F80 {
                se: a.se & 0x7fff,
                ..a
            },
            _ => {
                let mut x = buf16(a);
                let y = buf16(c.cpu.fpu.st(1));
                let sw = match m {
                    M::Fsqrt => h::fsqrt(&mut x, &y, c.cpu.fpu.fcw),
                    M::Frndint => h::frndint(&mut x, &y, c.cpu.fpu.fcw),
                    _ => h::fscale(&mut x, &y, c.cpu.fpu.fcw),
                };
                c.cpu.fpu.raise(sw);
                from16(&x)
            }
        };
        c.cpu.fpu.fsw &= !C1;
        c.cpu.fpu.set_st(0, r);
        Ok(())
    }

    /// FCOMI/FUCOMI(P) set ZF/PF/CF; FCOM/FUCOM/FTST(P/PP) set C0/C2/C3.
    pub(super) fn fcom(c: &mut Core, op: &Op) -> R {
        begin(c, op)?;
        use Mnemonic as M;
        let m = op.instr.mnemonic();
        let (other, pops) = match m {
            M::Fcomi | M::Fucomi => (1, 0),
            M::Fcomip | M::Fucomip => (1, 1),
            M::Fcompp | M::Fucompp => (1, 2),
            M::Fcomp | M::Fucomp => (1, 1),
            M::Ftst => (8, 0),
            _ => (1, 0),
        };
        let (other, pops) = if op.instr.op_count() == 2 {
            (st_index(op.instr.op1_register()), pops)
        } else if op.instr.op_count() == 1 && op.instr.op_kind(0) == OpKind::Register {
            (st_index(op.instr.op0_register()), pops)
        } else {
            (other, pops)
        };
        let mem = op.instr.op_count() == 1 && op.instr.op_kind(0) == OpKind::Memory;
        let (b, load_sw) = if mem {
            load_mem(c, op, true)?
        } else if other == 8 {
            (F80::default(), 0)
        } else if c.cpu.fpu.is_empty(other) {
            c.cpu.fpu.stack_fault(false);
            (INDEFINITE, 0)
        } else {
            (c.cpu.fpu.st(other), 0)
        };
        let a = if c.cpu.fpu.is_empty(0) {
            c.cpu.fpu.stack_fault(false);
            INDEFINITE
        } else {
            c.cpu.fpu.st(0)
        };
        let unordered = matches!(
            m,
            M::Fucomi | M::Fucomip | M::Fucom | M::Fucomp | M::Fucompp
        );
        let (fl, sw) = if unordered {
            h::fucomi(&buf16(a), &buf16(b))
        } else {
            h::fcomi(&buf16(a), &buf16(b))
        };
        let f = &mut c.cpu.fpu;
        f.raise(merge_flags(load_sw, sw, is_nan(a) || is_nan(b)) | (f.fsw & 0x3f));
        f.fsw &= !C1;
        if matches!(m, M::Fcomi | M::Fucomi | M::Fcomip | M::Fucomip) {
            c.set_status(crate::state::rflags::STATUS, fl);
        } else {
            let mut cc = 0;
            if fl & 1 != 0 {
                cc |= C0;
            }
            if fl & 4 != 0 {
                cc |= C2;
            }
            if fl & 0x40 != 0 {
                cc |= C3;
            }
            c.cpu.fpu.fsw = (c.cpu.fpu.fsw & !(C0 | C2 | C3)) | cc;
        }
        for _ in 0..pops {
            c.cpu.fpu.pop();
        }
        Ok(())
    }
}

fn fxch(c: &mut Core, op: &Op) -> R {
    begin(c, op)?;
    let i = if op.instr.op_count() == 2 {
        st_index(op.instr.op1_register())
    } else {
        1
    };
    let f = &mut c.cpu.fpu;
    if f.is_empty(0) || f.is_empty(i) {
        f.stack_fault(false);
        if f.fcw & 1 == 0 {
            return Ok(());
        }
        for k in [0, i] {
            if f.is_empty(k) {
                f.set_st(k, INDEFINITE);
            }
        }
    }
    let (a, b) = (f.st(0), f.st(i));
    f.set_st(0, b);
    f.set_st(i, a);
    f.fsw &= !C1;
    Ok(())
}

/// FXAM: classify ST(0) into C3/C2/C0, sign into C1.
fn fxam(c: &mut Core, op: &Op) -> R {
    begin(c, op)?;
    let f = &mut c.cpu.fpu;
    let v = f.st(0);
    let exp = v.se & 0x7fff;
    let int = v.mant >> 63 != 0;
    let frac = v.mant << 1;
    let class = if f.is_empty(0) {
        C3 | C0
    } else if exp == 0 {
        if v.mant == 0 {
            C3
        } else {
            C3 | C2
        }
    } else if exp == 0x7fff {
        if !int {
            0
        } else if frac == 0 {
            C2 | C0
        } else {
            C0
        }
    } else if int {
        C2
    } else {
        0
    };
    let sign = if v.se & 0x8000 != 0 { C1 } else { 0 };
    f.fsw = (f.fsw & !(C0 | C1 | C2 | C3)) | class | sign;
    Ok(())
}

fn ffree(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    let i = st_index(op.instr.op0_register());
    let p = c.cpu.fpu.phys(i);
    c.cpu.fpu.ftw &= !(1 << p);
    Ok(())
}

fn fincdecstp(c: &mut Core, op: &Op) -> R {
    x87_check(c)?;
    let f = &mut c.cpu.fpu;
    let t = f.top();
    f.set_top(if op.instr.mnemonic() == Mnemonic::Fincstp {
        t + 1
    } else {
        t + 7
    });
    f.fsw &= !C1;
    Ok(())
}

fn fnop(c: &mut Core, _: &Op) -> R {
    x87_check(c)?;
    pending_check(c)
}

/// The handler for an x87 / FXSAVE instruction, `None` if `i` is not one.
pub(crate) fn handler(i: &iced_x86::Instruction) -> Option<Handler> {
    use Mnemonic as M;
    let h: Handler = match i.mnemonic() {
        M::Wait => fwait,
        M::Fninit => fninit,
        M::Fnclex => fnclex,
        M::Fnstcw => fnstcw,
        M::Fldcw => fldcw,
        M::Fnstsw => fnstsw,
        M::Fxsave | M::Fxsave64 => fxsave,
        M::Fxrstor | M::Fxrstor64 => fxrstor,
        M::Fxch => fxch,
        M::Fxam => fxam,
        M::Ffree => ffree,
        M::Fincstp | M::Fdecstp => fincdecstp,
        M::Fnop => fnop,
        _ => return arith_handler(i),
    };
    Some(h)
}

#[cfg(target_arch = "x86_64")]
fn arith_handler(i: &iced_x86::Instruction) -> Option<Handler> {
    use Mnemonic as M;
    Some(match i.mnemonic() {
        M::Fld | M::Fild | M::Fld1 | M::Fldz => arith::fld,
        M::Fst | M::Fstp | M::Fist | M::Fistp | M::Fisttp => arith::fst,
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => arith::farith,
        M::Fsqrt | M::Frndint | M::Fscale | M::Fchs | M::Fabs => arith::funary,
        M::Fcom
        | M::Fcomp
        | M::Fcompp
        | M::Fucom
        | M::Fucomp
        | M::Fucompp
        | M::Fcomi
        | M::Fcomip
        | M::Fucomi
        | M::Fucomip
        | M::Ftst => arith::fcom,
        _ => return None,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn arith_handler(_: &iced_x86::Instruction) -> Option<Handler> {
    None
}
