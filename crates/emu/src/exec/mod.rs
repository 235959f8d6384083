//! The interpreter: the per-vCPU execution core, operand access, and the
//! block loop that runs until an exit.

mod bulk;
mod fast;
pub mod flags;
mod forms;
mod fpu;
mod hostasm;
#[cfg(target_arch = "x86_64")]
mod hostfp;
mod mmx;
mod native;
mod ops;
pub mod paging;
mod sse;
mod sysops;
mod system;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::x86::CpuidEntry;
use hypervisor::GuestRam;
use iced_x86::{OpKind, Register};

use crate::block::{Block, BlockCache, EaForm, Link, Op};
use crate::mem::{
    host_load, host_store, perm, Access, CodePages, Mmu, Ram, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE,
};
use crate::state::{seg, CpuState};
use flags::mask;
use system::EventKind;
pub use system::InterruptLines;

pub(crate) use fast::specialize_block;
pub(crate) use native::Target as NativeTarget;
pub use native::CHAIN_LIMIT;
pub(crate) use ops::handler_for;

/// An exception the guest raised. Delivered through the guest's IDT, or,
/// for vectors in the exception-exit bitmap
/// ([`Emulator::set_exception_exits`]), returned by [`Emulator::run`] as
/// [`Exit::Exception`] with RIP at the faulting instruction and its
/// effects undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
}

impl Exception {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;

    pub const fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
        }
    }

    pub const fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
        }
    }
}

/// Why [`Emulator::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `IN`/`INS` of `size` bytes from `port`: answer with
    /// [`Emulator::set_io_in_data`] before the next run.
    IoIn {
        port: u16,
        size: u8,
    },
    /// `OUT`/`OUTS` of the low `size` bytes of `data` to `port`.
    IoOut {
        port: u16,
        size: u8,
        data: u32,
    },
    /// A read of `size` bytes at a non-RAM physical address: answer with
    /// [`Emulator::set_mmio_read_data`]; the instruction re-executes and
    /// consumes it.
    MmioRead {
        addr: u64,
        size: u8,
    },
    /// A write of the low `size` bytes of `data` at a non-RAM address
    /// (the instruction has completed).
    MmioWrite {
        addr: u64,
        size: u8,
        data: u64,
    },
    Halt,
    /// An exception whose vector is set in the exception-exit bitmap
    /// ([`Emulator::set_exception_exits`]), reported instead of delivered
    /// through the IDT; RIP is at the faulting instruction.
    Exception(Exception),
    /// Triple fault: the processor entered shutdown.
    Shutdown,
    /// The instruction budget given to `run` is spent.
    BudgetExhausted,
    /// The stop flag given to `run` was set.
    Interrupted,
    /// Something this emulator cannot do yet (the string says what).
    InternalError(&'static str),
    /// An instruction wrote state the platform keeps the working copy of
    /// (IA32_TSC_DEADLINE, see [`Emulator::take_tsc_deadline_write`]); it
    /// has completed. The VMM's loop lets the platform look before running
    /// on: a deadline armed just before HLT must reach the timers.
    PlatformUpdate,
}

/// How a handler leaves the normal "next instruction" path: a boxed
/// [`StopKind`]. Boxed so that a handler's [`OpResult`] fits in one
/// register: the common case, `Ok`, then costs the block loop no memory
/// traffic per instruction, and the rare stop (an exit or an exception)
/// pays for an allocation. Built with the variant-named constructors
/// ([`Stop::Exit`], [`Stop::Restart`], [`Stop::Fault`]), read with
/// [`Stop::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop(Box<StopKind>);

#[allow(non_snake_case)]
impl Stop {
    #[cold]
    pub fn Exit(e: Exit) -> Stop {
        Stop(Box::new(StopKind::Exit(e)))
    }

    #[cold]
    pub fn Restart(e: Exit) -> Stop {
        Stop(Box::new(StopKind::Restart(e)))
    }

    #[cold]
    pub fn Fault(x: Exception) -> Stop {
        Stop(Box::new(StopKind::Fault(x)))
    }

    pub fn kind(&self) -> StopKind {
        *self.0
    }
}

/// What a [`Stop`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// The instruction completed (RIP is as it set it); report the exit.
    Exit(Exit),
    /// The instruction did not complete and will run again from its start
    /// (MMIO read replay); report the exit.
    Restart(Exit),
    /// The instruction faulted: RIP goes back to it.
    Fault(Exception),
}

pub type OpResult = Result<(), Stop>;

#[inline]
pub(crate) fn fault(vector: u8) -> Stop {
    Stop::Fault(Exception::new(vector))
}

/// What to do with the data of the last `IoIn` exit.
#[derive(Debug, Clone, Copy)]
enum PendingIn {
    /// `IN`: into AL/AX/EAX.
    Acc { size: u8 },
    /// `INS`: to ES:rDI, then step rDI (and rCX if `rep`).
    Ins { size: u8, asize: u8, rep: bool },
}

/// The one MMIO read being replayed.
#[derive(Debug, Clone, Copy)]
struct MmioRead {
    addr: u64,
    size: u8,
    data: Option<u64>,
}

const MMIO_WRITE_QUEUE: usize = 4;

/// The bit that sets global link stamps apart from link stamps (see
/// `Emulator::global_link_stamp`); the two below it hold the CPL.
const GLOBAL_LINK: u64 = 1 << 2;

/// Everything a handler may touch: registers, memory, and the state of
/// exits in flight. Kept apart from the block cache so a block can run
/// while its handlers hold `&mut Core`.
pub struct Core {
    pub cpu: CpuState,
    pub(crate) ram: Ram,
    pub(crate) mmu: Mmu,
    pub(crate) code: CodePages,
    /// `code.marks()` as of this vCPU's last look at them: where they have
    /// moved on, another vCPU marked pages this TLB may still let native
    /// code write (see [`Core::sync_code_marks`]).
    code_marks_seen: u64,
    /// Pages of `code` written since the last check; their blocks must go.
    pub(crate) dirty_code: Vec<u64>,
    /// Set when the block loop must look at `dirty_code` or the MMIO write
    /// queue after the current instruction (one flag test per instruction).
    pub(crate) attention: bool,
    mmio_writes: [(u64, u8, u64); MMIO_WRITE_QUEUE],
    mmio_write_count: usize,
    mmio_read: Option<MmioRead>,
    pending_in: Option<PendingIn>,
    in_data: Option<u32>,
    pub(crate) cpuid: Arc<[CpuidEntry]>,
    tsc_origin: Instant,
    /// An NMI handler runs (blocked until the next IRET).
    pub(crate) nmi_blocked: bool,
    /// RIP of the instruction after STI (with IF clear before) or MOV/POP
    /// SS: no interrupt is taken before it; `u64::MAX` when none.
    pub(crate) shadow_rip: u64,
    /// IA32_TSC_AUX (RDTSCP).
    pub(crate) tsc_aux: u64,
    /// Where native runs' stubs go; `None`: interpret everything.
    pub(crate) native: Option<native::Arena>,
    /// Native-run stubs executed so far (see [`Emulator::native_runs_executed`]).
    pub(crate) native_runs: u64,
    /// Native runs that stopped before their end (at an access their
    /// TLB lookup did not cover) and were finished by the interpreter.
    pub(crate) native_exits: u64,
    /// Instructions of blocks whose native code ran to their end.
    pub(crate) native_instructions: u64,
    /// TLB misses in blocks' native code that a walk filled without
    /// leaving the chain (see `native::refill`).
    pub(crate) native_refills: u64,
    /// Address of the instruction that stopped inside a native run's
    /// interpreted rest, for [`Emulator::stopped`] (a run's op carries
    /// only its first instruction's).
    pub(crate) stop_ip: Option<u64>,
    /// MSR_KVM_SYSTEM_TIME_NEW: where this vCPU's kvmclock structure is
    /// (bit 0: enabled).
    pub(crate) kvmclock: u64,
    /// MSR_KVM_WALL_CLOCK_NEW as last written.
    pub(crate) wall_clock: u64,
    /// The version of this vCPU's kvmclock structure, even between
    /// updates.
    pub(crate) kvmclock_version: u32,
    /// IA32_TSC_DEADLINE as the guest reads it (the platform's APIC owns
    /// the timer and refreshes this), and a write the platform has not
    /// taken yet.
    pub(crate) tsc_deadline: u64,
    pub(crate) tsc_deadline_write: Option<u64>,
}

impl Core {
    /// Whether CPUID offers the APIC timer's TSC-deadline mode (the
    /// platform's CPU model does), and so IA32_TSC_DEADLINE.
    pub(crate) fn has_tsc_deadline(&self) -> bool {
        self.cpuid
            .iter()
            .any(|e| e.function == 1 && e.ecx & crate::cpuid::LEAF1_ECX_TSC_DEADLINE != 0)
    }

    fn new(ram: Ram, cpuid: Arc<[CpuidEntry]>, code: Option<CodePages>) -> Self {
        let code = code.unwrap_or_else(|| CodePages::new(ram.end()));
        Core {
            cpu: CpuState::reset(),
            // The TLB is empty: no entry lets native code write a page.
            code_marks_seen: code.marks(),
            code,
            ram,
            mmu: Mmu::default(),
            dirty_code: Vec::new(),
            attention: false,
            mmio_writes: [(0, 0, 0); MMIO_WRITE_QUEUE],
            mmio_write_count: 0,
            mmio_read: None,
            pending_in: None,
            in_data: None,
            cpuid,
            tsc_origin: Instant::now(),
            nmi_blocked: false,
            shadow_rip: u64::MAX,
            tsc_aux: 0,
            native: native::Arena::new(),
            native_runs: 0,
            native_exits: 0,
            native_refills: 0,
            native_instructions: 0,
            stop_ip: None,
            kvmclock: 0,
            tsc_deadline: 0,
            tsc_deadline_write: None,
            wall_clock: 0,
            kvmclock_version: 0,
        }
    }

    /// Writes `data` at guest-physical `pa` as the processor would (code
    /// decoded from those pages is dropped); false unless it is all RAM.
    pub(crate) fn write_phys(&mut self, pa: u64, data: &[u8]) -> bool {
        if data.is_empty() || !self.ram.write(pa, data) {
            return data.is_empty();
        }
        let last = pa + data.len() as u64 - 1;
        for page in (pa >> PAGE_SHIFT)..=(last >> PAGE_SHIFT) {
            self.note_write(page << PAGE_SHIFT);
        }
        true
    }

    /// kvmclock's system time: nanoseconds since the VM's time origin (the
    /// guest TSC without the guest's offset).
    fn system_time_ns(&self) -> u64 {
        self.tsc().wrapping_sub(self.cpu.msrs.tsc_offset)
    }

    /// (Re)writes this vCPU's kvmclock structure, if enabled; false if its
    /// address is not RAM. The version is odd while the body changes (the
    /// pvclock protocol: readers retry), even after.
    pub(crate) fn publish_kvmclock(&mut self) -> bool {
        if self.kvmclock & 1 == 0 {
            return true;
        }
        let at = self.kvmclock & !1;
        let system = self.system_time_ns();
        let tsc = system.wrapping_add(self.cpu.msrs.tsc_offset);
        // All vCPUs' TSCs agree (one clock, no offset) until the guest
        // moves one; then the guest must not mix them.
        let stable = self.cpu.msrs.tsc_offset == 0;
        let updating = self.kvmclock_version.wrapping_add(1);
        let done = self.kvmclock_version.wrapping_add(2);
        let info = crate::pvclock::vcpu_time_info(done, tsc, system, stable);
        if !self.write_phys(at, &updating.to_le_bytes()) {
            return false;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write_phys(at + 4, &info[4..]);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write_phys(at, &info[..4]);
        self.kvmclock_version = done;
        true
    }

    /// Writes the wall clock at system time zero where MSR_KVM_WALL_CLOCK_NEW
    /// points; false if that is not RAM.
    pub(crate) fn publish_wall_clock(&mut self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let boot = now.saturating_sub(std::time::Duration::from_nanos(self.system_time_ns()));
        let info = crate::pvclock::wall_clock(
            2,
            boot.as_secs().min(u64::from(u32::MAX)) as u32,
            boot.subsec_nanos(),
        );
        self.write_phys(self.wall_clock, &info)
    }

    /// Guest TSC: a 1 GHz count of host time since the vCPU was created,
    /// plus the guest-set offset.
    pub(crate) fn tsc(&self) -> u64 {
        (self.tsc_origin.elapsed().as_nanos() as u64).wrapping_add(self.cpu.msrs.tsc_offset)
    }

    // ---- registers -------------------------------------------------------

    /// Reads a general-purpose register of any width, zero-extended.
    #[inline(always)]
    pub fn reg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.cpu.gpr[n - 1] & 0xff,
            5..=8 => (self.cpu.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.cpu.gpr[n - 5] & 0xff,
            21..=36 => self.cpu.gpr[n - 21] & 0xffff,
            37..=52 => self.cpu.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.cpu.gpr[n - 53],
            _ => 0,
        }
    }

    /// Writes a general-purpose register with the architectural width
    /// rules: 8/16-bit writes merge, 32-bit writes zero-extend.
    #[inline(always)]
    pub fn set_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        let g = &mut self.cpu.gpr;
        match n {
            1..=4 => g[n - 1] = (g[n - 1] & !0xff) | (v & 0xff),
            5..=8 => g[n - 5] = (g[n - 5] & !0xff00) | ((v & 0xff) << 8),
            9..=20 => g[n - 5] = (g[n - 5] & !0xff) | (v & 0xff),
            21..=36 => g[n - 21] = (g[n - 21] & !0xffff) | (v & 0xffff),
            37..=52 => g[n - 37] = v & 0xffff_ffff,
            53..=68 => g[n - 53] = v,
            _ => {}
        }
    }

    /// Writes the low `size` bytes of GPR number `n` (0..16) with the
    /// width rules (no high-byte registers).
    #[inline(always)]
    pub fn set_gpr(&mut self, n: usize, size: usize, v: u64) {
        let g = &mut self.cpu.gpr[n & 15];
        *g = match size {
            8 => v,
            4 => v & 0xffff_ffff,
            _ => (*g & !mask(size)) | (v & mask(size)),
        };
    }

    #[inline(always)]
    pub fn set_status(&mut self, update_mask: u64, f: u64) {
        self.cpu.rflags = (self.cpu.rflags & !update_mask) | (f & update_mask);
    }

    // ---- addresses -------------------------------------------------------

    /// Effective address (offset within the segment) of the instruction's
    /// memory operand, wrapped to the address size.
    #[inline(always)]
    pub fn ea(&self, op: &Op) -> u64 {
        let f = &op.ea;
        if f.flags & EaForm::FAST != 0 {
            let on = |bit: u8| 0u64.wrapping_sub(u64::from(f.flags & bit != 0));
            let base = self.cpu.gpr[usize::from(f.base & 15)] & on(EaForm::HAS_BASE);
            let index = self.cpu.gpr[usize::from(f.index & 15)] & on(EaForm::HAS_INDEX);
            return f
                .disp
                .wrapping_add(base)
                .wrapping_add(index << (f.flags & EaForm::SHIFT_MASK));
        }
        self.ea_decoded(op)
    }

    /// [`Core::ea`] from iced's `Instruction` (any mode and address size).
    #[inline(never)]
    fn ea_decoded(&self, op: &Op) -> u64 {
        let i = &op.instr;
        let base = i.memory_base();
        let mut a = i.memory_displacement64();
        if base == Register::RIP || base == Register::EIP {
            // iced already resolved RIP-relative operands against the
            // instruction's address.
            return a;
        }
        if base != Register::None {
            a = a.wrapping_add(self.reg(base));
        }
        let index = i.memory_index();
        if index != Register::None {
            a = a.wrapping_add(self.reg(index) << (i.memory_index_scale().trailing_zeros()));
        }
        a & mask(op.asize as usize)
    }

    /// Linear address of `offset` in segment `segment`. In 64-bit mode only
    /// FS and GS have bases; elsewhere the sum wraps at 4 GiB. Segment
    /// limits are not checked yet.
    #[inline(always)]
    pub fn linear(&self, op: &Op, segment: Register, offset: u64) -> u64 {
        let idx = (segment as usize).wrapping_sub(Register::ES as usize);
        if op.bitness == 64 {
            if idx == seg::FS || idx == seg::GS {
                self.cpu.segs[idx].base.wrapping_add(offset)
            } else {
                offset
            }
        } else {
            let base = self.cpu.segs.get(idx).map_or(0, |s| s.base);
            base.wrapping_add(offset) & 0xffff_ffff
        }
    }

    /// Linear address of the instruction's explicit memory operand.
    #[inline(always)]
    pub fn mem_linear(&self, op: &Op) -> u64 {
        let f = &op.ea;
        if f.flags & EaForm::FAST != 0 {
            let ea = self.ea(op);
            if f.flags & EaForm::SEG_BASE != 0 {
                let seg = usize::from(f.seg).min(self.cpu.segs.len() - 1);
                return ea.wrapping_add(self.cpu.segs[seg].base);
            }
            return ea;
        }
        self.linear(op, op.instr.memory_segment(), self.ea(op))
    }

    // ---- memory ----------------------------------------------------------

    /// Reads `size` (1..=8) bytes at linear address `lin` with the
    /// current privilege.
    #[inline]
    pub fn read(&mut self, lin: u64, size: usize) -> Result<u64, Stop> {
        let user = self.user();
        self.read_as(lin, size, user)
    }

    /// Writes the low `size` (1..=8) bytes of `v` at linear address `lin`
    /// with the current privilege.
    #[inline]
    pub fn write(&mut self, lin: u64, size: usize, v: u64) -> OpResult {
        let user = self.user();
        self.write_as(lin, size, v, user)
    }

    /// Reads `size` (1..=8) bytes at linear address `lin`, as a user or a
    /// supervisor access.
    #[inline(always)]
    pub fn read_as(&mut self, lin: u64, size: usize, user: bool) -> Result<u64, Stop> {
        // Fast path, inlined into every handler: a TLB hit on a RAM page
        // carries its host address.
        if (lin & PAGE_MASK) + size as u64 <= PAGE_SIZE {
            if let Some(h) = self
                .mmu
                .lookup_host(lin, perm::NEED[usize::from(user)][Access::Read as usize])
            {
                // SAFETY: `h` is inside a RAM page mapping that lives as
                // long as `self.ram` (see `TlbEntry::host`), and the access
                // does not cross the page (checked above).
                return Ok(unsafe { host_load(h, size) });
            }
        }
        self.read_as_slow(lin, size, user)
    }

    /// [`Core::read_as`] after a TLB miss, for MMIO, or across pages.
    #[inline(never)]
    fn read_as_slow(&mut self, lin: u64, size: usize, user: bool) -> Result<u64, Stop> {
        if (lin & PAGE_MASK) + size as u64 <= PAGE_SIZE {
            let pa = self.translate_as(lin, Access::Read, user)?;
            match self.ram.read_u(pa, size) {
                Some(v) => Ok(v),
                None => self.mmio_read(pa, size),
            }
        } else {
            // Crosses a page: byte by byte, each byte translated on its own
            // (the pages need not be contiguous).
            let mut v = 0u64;
            for k in 0..size {
                let pa = self.translate_as(lin.wrapping_add(k as u64), Access::Read, user)?;
                let b = self.ram.read_u(pa, 1).ok_or_else(|| {
                    Stop::Exit(Exit::InternalError("MMIO access crossing a page boundary"))
                })?;
                v |= b << (8 * k);
            }
            Ok(v)
        }
    }

    /// Writes the low `size` (1..=8) bytes of `v` at linear address `lin`,
    /// as a user or a supervisor access.
    #[inline(always)]
    pub fn write_as(&mut self, lin: u64, size: usize, v: u64, user: bool) -> OpResult {
        if (lin & PAGE_MASK) + size as u64 <= PAGE_SIZE {
            if let Some(h) = self
                .mmu
                .lookup_host(lin, perm::NEED[usize::from(user)][Access::Write as usize])
            {
                // SAFETY: as in `read_as`; a nonzero host address means the
                // page is RAM, which GuestRam maps read-write.
                unsafe { host_store(h, size, v) };
                let page = self.mmu.page_of(lin);
                self.note_write(page << PAGE_SHIFT);
                return Ok(());
            }
        }
        self.write_as_slow(lin, size, v, user)
    }

    /// [`Core::write_as`] after a TLB miss, for MMIO, or across pages.
    #[inline(never)]
    fn write_as_slow(&mut self, lin: u64, size: usize, v: u64, user: bool) -> OpResult {
        if (lin & PAGE_MASK) + size as u64 <= PAGE_SIZE {
            let pa = self.translate_as(lin, Access::Write, user)?;
            if self.ram.write_u(pa, size, v) {
                self.note_write(pa);
                Ok(())
            } else {
                self.mmio_write(pa, size, v)
            }
        } else {
            // Translate every byte first so a fault leaves memory untouched.
            let mut pas = [0u64; 8];
            for (k, pa) in pas.iter_mut().enumerate().take(size) {
                *pa = self.translate_as(lin.wrapping_add(k as u64), Access::Write, user)?;
                if !self.ram.is_ram(*pa) {
                    return Err(Stop::Exit(Exit::InternalError(
                        "MMIO access crossing a page boundary",
                    )));
                }
            }
            for (k, pa) in pas.iter().enumerate().take(size) {
                self.ram.write_u(*pa, 1, v >> (8 * k));
                self.note_write(*pa);
            }
            Ok(())
        }
    }

    /// Atomic read-modify-write of `size` bytes at `lin` (LOCK prefix,
    /// XCHG with memory): `f` maps the old value to the new one and may
    /// run several times. Returns the old value. RAM operands are updated
    /// with a host compare-exchange loop; MMIO operands fall back to a
    /// read and a write (devices see two accesses, as with bus locks).
    pub fn rmw(
        &mut self,
        lin: u64,
        size: usize,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> Result<u64, Stop> {
        let user = self.user();
        if (lin & PAGE_MASK) + size as u64 <= PAGE_SIZE {
            let pa = self.translate_as(lin, Access::Write, user)?;
            if let Some(mut cur) = self.ram.read_u(pa, size) {
                loop {
                    let new = f(cur) & mask(size);
                    match self.ram.cmpxchg_u(pa, size, cur, new) {
                        Some(Ok(_)) => {
                            self.note_write(pa);
                            return Ok(cur);
                        }
                        Some(Err(now)) => cur = now,
                        None => break,
                    }
                }
            }
        }
        // Split across pages or MMIO: not atomic (document: split locks).
        let _ = self.translate_as(lin, Access::Write, user)?;
        let old = self.read_as(lin, size, user)?;
        let new = f(old);
        self.write_as(lin, size, new, user)?;
        Ok(old)
    }

    /// Where this vCPU marked `page` as code (decoding from it, see
    /// [`CodePages::begin_decode`]): native code may no longer write it
    /// through this TLB. Other vCPUs' TLBs follow at their next
    /// [`Core::sync_code_marks`].
    pub(crate) fn marked_code(&mut self, page: u64, marked: crate::mem::Marked) {
        if let crate::mem::Marked::New(before) = marked {
            self.mmu.protect_code(page);
            if before == self.code_marks_seen {
                self.code_marks_seen = before + 1;
            }
        }
    }

    /// Before and after native code runs, and before it refills the TLB:
    /// where other vCPUs marked pages as code since this one last looked,
    /// takes native code's write bits from this TLB's entries of them.
    /// Native code may have written such a page through such an entry
    /// after it was marked, unseen by the page's code bit: the page is
    /// handled as written, so every vCPU decodes it again.
    pub(crate) fn sync_code_marks(&mut self) {
        let marks = self.code.marks();
        if marks == self.code_marks_seen {
            return;
        }
        self.code_marks_seen = marks;
        let code = self.code.clone();
        let mut written = Vec::new();
        self.mmu
            .protect_code_where(|page| code.test(page), |page| written.push(page));
        for page in written {
            self.note_write(page << PAGE_SHIFT);
        }
    }

    /// The code-page hook on every RAM write the emulator makes.
    #[inline(always)]
    pub(crate) fn note_write(&mut self, pa: u64) {
        let page = pa >> PAGE_SHIFT;
        // Clearing bumps the page's generation: every vCPU's blocks from
        // it go stale; this vCPU drops its own at once.
        if self.code.test(page) && self.code.clear(page) {
            self.dirty_code.push(page);
            self.attention = true;
        }
    }

    fn mmio_read(&mut self, pa: u64, size: usize) -> Result<u64, Stop> {
        if let Some(MmioRead {
            addr,
            size: s,
            data: Some(d),
        }) = self.mmio_read
        {
            if addr == pa && s as usize == size {
                self.mmio_read = None;
                return Ok(d & mask(size));
            }
        }
        self.mmio_read = Some(MmioRead {
            addr: pa,
            size: size as u8,
            data: None,
        });
        Err(Stop::Restart(Exit::MmioRead {
            addr: pa,
            size: size as u8,
        }))
    }

    fn mmio_write(&mut self, pa: u64, size: usize, v: u64) -> OpResult {
        if self.mmio_write_count == MMIO_WRITE_QUEUE {
            return Err(Stop::Exit(Exit::InternalError(
                "too many MMIO writes in one instruction",
            )));
        }
        self.mmio_writes[self.mmio_write_count] = (pa, size as u8, v & mask(size));
        self.mmio_write_count += 1;
        self.attention = true;
        Ok(())
    }

    fn pop_mmio_write(&mut self) -> Option<Exit> {
        if self.mmio_write_count == 0 {
            return None;
        }
        let (addr, size, data) = self.mmio_writes[0];
        self.mmio_writes.copy_within(1.., 0);
        self.mmio_write_count -= 1;
        Some(Exit::MmioWrite { addr, size, data })
    }

    // ---- operands --------------------------------------------------------

    /// Reads operand `n` as a value of `size` bytes (immediates are
    /// truncated to it; callers sign-extend where the encoding says so).
    #[inline(always)]
    pub fn operand(&mut self, op: &Op, n: u32, size: usize) -> Result<u64, Stop> {
        let i = &op.instr;
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg(i.op_register(n))),
            OpKind::Memory => {
                let lin = self.mem_linear(op);
                self.read(lin, size)
            }
            k if forms::is_immediate(k) => Ok(i.immediate(n) & mask(size)),
            OpKind::Immediate8_2nd => Ok(u64::from(i.immediate8_2nd())),
            _ => Err(fault(Exception::UD)),
        }
    }

    /// Writes operand `n` (register or memory) with `size` bytes.
    #[inline(always)]
    pub fn set_operand(&mut self, op: &Op, n: u32, size: usize, v: u64) -> OpResult {
        let i = &op.instr;
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let lin = self.mem_linear(op);
                self.write(lin, size, v)
            }
            _ => Err(fault(Exception::UD)),
        }
    }

    // ---- stack -----------------------------------------------------------

    /// Width of the stack pointer: RSP in 64-bit mode, else SS.B picks
    /// ESP or SP.
    #[inline(always)]
    pub fn stack_width(&self, op: &Op) -> usize {
        if op.bitness == 64 {
            8
        } else if self.cpu.segs[seg::SS].db {
            4
        } else {
            2
        }
    }

    #[inline]
    pub fn push(&mut self, op: &Op, size: usize, v: u64) -> OpResult {
        let sw = self.stack_width(op);
        let rsp = self.cpu.gpr[4].wrapping_sub(size as u64) & mask(sw);
        let lin = self.linear(op, Register::SS, rsp);
        self.write(lin, size, v)?;
        self.set_gpr(4, sw, rsp);
        Ok(())
    }

    /// Reads the top of the stack without moving RSP; returns the value
    /// and the new RSP for [`Core::commit_pop`].
    #[inline]
    pub fn peek_pop(&mut self, op: &Op, size: usize, extra: u64) -> Result<(u64, u64), Stop> {
        let sw = self.stack_width(op);
        let rsp = self.cpu.gpr[4] & mask(sw);
        let lin = self.linear(op, Register::SS, rsp);
        let v = self.read(lin, size)?;
        Ok((v, rsp.wrapping_add(size as u64).wrapping_add(extra)))
    }

    #[inline]
    pub fn commit_pop(&mut self, op: &Op, new_rsp: u64) {
        let sw = self.stack_width(op);
        self.set_gpr(4, sw, new_rsp);
    }

    // ---- port I/O completion -----------------------------------------------

    pub(crate) fn begin_in(&mut self, pending: PendingInKind, size: u8) {
        self.pending_in = Some(match pending {
            PendingInKind::Acc => PendingIn::Acc { size },
            PendingInKind::Ins { asize, rep } => PendingIn::Ins { size, asize, rep },
        });
        self.in_data = None;
    }

    /// Finishes an `IN`/`INS` with the data the VMM supplied (all ones,
    /// a floating bus, if it supplied none).
    fn finish_in(&mut self) -> OpResult {
        let Some(p) = self.pending_in.take() else {
            return Ok(());
        };
        let data = u64::from(self.in_data.take().unwrap_or(u32::MAX));
        match p {
            PendingIn::Acc { size } => {
                self.set_gpr(0, size as usize, data);
                Ok(())
            }
            PendingIn::Ins { size, asize, rep } => {
                let size = size as usize;
                let asize = asize as usize;
                let rdi = self.cpu.gpr[7] & mask(asize);
                let lin = if self.cpu.bitness() == 64 {
                    rdi
                } else {
                    self.cpu.segs[seg::ES].base.wrapping_add(rdi) & 0xffff_ffff
                };
                self.write(lin, size, data)?;
                let step = if self.cpu.rflags & crate::state::rflags::DF != 0 {
                    (size as u64).wrapping_neg()
                } else {
                    size as u64
                };
                self.set_gpr(7, asize, rdi.wrapping_add(step));
                if rep {
                    let rcx = self.cpu.gpr[1] & mask(asize);
                    self.set_gpr(1, asize, rcx.wrapping_sub(1));
                }
                Ok(())
            }
        }
    }
}

/// Which kind of `IN` a handler started.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PendingInKind {
    Acc,
    Ins { asize: u8, rep: bool },
}

/// One software vCPU: state, memory view and block cache.
pub struct Emulator {
    core: Core,
    cache: BlockCache,
    /// Vectors (bit n = vector n < 32) reported as [`Exit::Exception`]
    /// instead of delivered through the IDT.
    exception_exits: u32,
    /// External interrupt requests, once attached.
    lines: Option<Arc<InterruptLines>>,
    /// In HLT, waiting for an interrupt.
    halted: bool,
    /// How long a halted vCPU polls for a wake-up before it sleeps (see
    /// [`Self::wait_halted`]).
    halt_poll: Duration,
    /// The idle watch: when its window began, and the instructions
    /// retired by then (see [`Self::release_if_idle`]).
    idle_window: (std::time::Instant, u64),
    /// The state was handed out mutably: re-derive the paging mode and
    /// flush the TLB before running.
    resync: bool,
    /// Instructions retired so far (all runs).
    retired: u64,
    /// This run ends at the first block boundary with RFLAGS.IF set (an
    /// interrupt waits at the APIC for it).
    until_interruptible: bool,
    /// Runs of a block before it is compiled to native code (see
    /// [`crate::block::HOT_AFTER`]).
    hot_after: u32,
}

impl Emulator {
    /// A vCPU in the reset state over `memory`, presenting `cpuid`.
    pub fn new(memory: &GuestRam, cpuid: Arc<[CpuidEntry]>) -> Self {
        Self::with_code_pages(memory, cpuid, None)
    }

    /// A vCPU like [`Self::new`] whose code-page map is `code`, shared
    /// with the other vCPUs of the VM (see [`Self::code_pages`]) so that
    /// their writes invalidate this vCPU's decoded blocks. `None`: a map
    /// of its own.
    pub fn with_code_pages(
        memory: &GuestRam,
        cpuid: Arc<[CpuidEntry]>,
        code: Option<CodePages>,
    ) -> Self {
        Emulator {
            core: Core::new(Ram::new(memory), cpuid, code),
            cache: BlockCache::default(),
            exception_exits: 0,
            lines: None,
            halted: false,
            halt_poll: Duration::ZERO,
            idle_window: (std::time::Instant::now(), 0),
            resync: true,
            retired: 0,
            until_interruptible: false,
            hot_after: crate::block::HOT_AFTER,
        }
    }

    /// A vCPU with no RAM (every access is MMIO); for tests.
    pub fn without_memory(cpuid: Arc<[CpuidEntry]>) -> Self {
        Emulator {
            core: Core::new(Ram::empty(), cpuid, None),
            cache: BlockCache::default(),
            exception_exits: 0,
            lines: None,
            halted: false,
            halt_poll: Duration::ZERO,
            idle_window: (std::time::Instant::now(), 0),
            resync: true,
            retired: 0,
            until_interruptible: false,
            hot_after: crate::block::HOT_AFTER,
        }
    }

    pub fn cpu(&self) -> &CpuState {
        &self.core.cpu
    }

    /// Compiles a block to native code on its `runs`-th run (at least the
    /// first) instead of its [`crate::block::HOT_AFTER`]-th: tests that
    /// compare native code with the interpreter on short programs.
    pub fn compile_after(&mut self, runs: u32) {
        self.hot_after = runs.max(1);
    }

    /// The state, for changing it between runs (the TLB is flushed and
    /// the paging mode re-derived before the next run).
    pub fn cpu_mut(&mut self) -> &mut CpuState {
        self.resync = true;
        self.halted = false;
        &mut self.core.cpu
    }

    /// Vectors to report as [`Exit::Exception`] instead of delivering
    /// them (bit n for vector n), like VMX's exception bitmap: for tests
    /// and debuggers. Default none.
    pub fn set_exception_exits(&mut self, bitmap: u32) {
        self.exception_exits = bitmap;
    }

    /// Attaches the interrupt request lines other threads use to inject
    /// interrupts; from then on HLT with RFLAGS.IF = 1 waits for one
    /// instead of exiting.
    pub fn attach_interrupts(&mut self, lines: Arc<InterruptLines>) {
        self.lines = Some(lines);
    }

    /// Whether the vCPU is halted waiting for an interrupt.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Answers the last [`Exit::IoIn`].
    pub fn set_io_in_data(&mut self, data: u32) {
        self.core.in_data = Some(data);
    }

    /// Answers the last [`Exit::MmioRead`].
    pub fn set_mmio_read_data(&mut self, data: u64) {
        if let Some(r) = &mut self.core.mmio_read {
            r.data = Some(data);
        }
    }

    /// Drops every decoded block overlapping `[gpa, gpa + len)`. Whoever
    /// writes guest RAM behind the emulator's back (a loader, a device
    /// doing DMA, another vCPU) must call this for code to be re-decoded.
    pub fn invalidate_code(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        for page in first..=last.min(first.saturating_add(1 << 20)) {
            // Bumps the generation too: other vCPUs sharing the map
            // re-decode.
            if self.core.code.test(page) && self.core.code.clear(page) {
                self.cache.invalidate_page(page);
            }
        }
    }

    /// Turns native runs (stretches of guest code run on the host
    /// processor, see `exec::native`) off or back on for blocks
    /// decoded from now on; on by default on x86-64 hosts unless
    /// `VESSEL_EMU_NATIVE=0`. For tests that compare the two.
    pub fn set_native_runs(&mut self, on: bool) {
        if !on {
            self.core.native = None;
        } else if self.core.native.is_none() {
            self.core.native = native::Arena::new();
        }
        self.cache.clear();
    }

    /// Drops every decoded block of this vCPU (the shared code-page marks
    /// stay: other vCPUs may still hold blocks from those pages).
    pub fn invalidate_all(&mut self) {
        self.cache.clear();
    }

    /// Called while halted: at the end of each [`IDLE_WINDOW`], if the vCPU
    /// ran fewer than [`IDLE_INSTRUCTIONS`] in it (an idle guest wakes for
    /// timers now and then, but does little), its decoded code goes.
    fn release_if_idle(&mut self, retired: u64) {
        let (start, retired_then) = self.idle_window;
        if start.elapsed() < IDLE_WINDOW {
            return;
        }
        // What an idle guest's timer wake-ups decode is left alone: dropping
        // it each window would only decode it again.
        if retired.saturating_sub(retired_then) < IDLE_INSTRUCTIONS
            && self.cache.len() > IDLE_KEEP_BLOCKS
        {
            self.release_decoded_code();
        }
        self.idle_window = (std::time::Instant::now(), retired);
    }

    /// Drops and frees every decoded block and native stub, and hands the
    /// freed heap back to the host (a long-halted vCPU). Called between
    /// blocks, holding no block pointer.
    fn release_decoded_code(&mut self) {
        self.cache.clear();
        self.cache.collect();
        if let Some(arena) = self.core.native.as_mut() {
            arena.release();
        }
        crate::sys::trim_heap();
    }

    /// The code-page map, to share with another vCPU of the same VM
    /// ([`Self::with_code_pages`]).
    pub fn code_pages(&self) -> CodePages {
        self.core.code.clone()
    }

    /// Counts the guest TSC from `origin` (instead of this vCPU's
    /// creation), so that the vCPUs of a VM share one TSC.
    pub fn set_tsc_origin(&mut self, origin: Instant) {
        self.core.tsc_origin = origin;
    }

    /// Reads an MSR this vCPU implements.
    pub fn msr(&self, index: u32) -> Option<u64> {
        ops::read_msr(&self.core, index)
    }

    /// Writes an MSR; false if this vCPU does not implement it.
    pub fn set_msr(&mut self, index: u32, value: u64) -> bool {
        ops::write_msr(&mut self.core, index, value)
    }

    /// The guest's last write of IA32_TSC_DEADLINE not taken yet, for the
    /// local APIC that runs the timer.
    pub fn take_tsc_deadline_write(&mut self) -> Option<u64> {
        self.core.tsc_deadline_write.take()
    }

    /// IA32_TSC_DEADLINE as the guest should read it: the APIC's armed
    /// deadline, 0 once it fired or outside TSC-deadline mode.
    pub fn set_tsc_deadline_view(&mut self, value: u64) {
        self.core.tsc_deadline = value;
    }

    /// The CPUID table the guest sees.
    pub fn cpuid(&self) -> &[CpuidEntry] {
        &self.core.cpuid
    }

    /// Number of blocks in the cache (for tests and statistics).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Handles the pages written by the last instruction.
    fn settle(&mut self) {
        if !self.core.dirty_code.is_empty() {
            for page in self.core.dirty_code.drain(..) {
                self.cache.invalidate_page(page);
            }
        }
        self.core.attention = self.core.mmio_write_count != 0;
    }

    fn block_at_rip(&mut self) -> Result<*const Block, Stop> {
        let rip = self.core.cpu.rip;
        let bitness = self.core.cpu.bitness();
        let lin = if bitness == 64 {
            rip
        } else {
            self.core.cpu.segs[seg::CS].base.wrapping_add(rip) & 0xffff_ffff
        };
        let pa = self.core.translate(lin, Access::Execute)?;
        if let Some(b) = self.cache.get(pa, rip, bitness) {
            // SAFETY: fresh from the cache; nothing is freed before use.
            let b = unsafe { &*b };
            let first = pa >> PAGE_SHIFT;
            if self.core.code.generation(first) != b.gens[0] {
                // Written by another vCPU (or a device) since decoded.
                self.cache.invalidate_page(first);
                let block = crate::block::decode(&mut self.core, pa, lin, rip, bitness)?;
                return Ok(self.cache.insert(block));
            }
            match b.pages[1] {
                None => return Ok(b as *const Block),
                Some(second) if self.core.code.generation(second) != b.gens[1] => {
                    self.cache.invalidate_page(second);
                }
                Some(second) => {
                    // A block running into the next page is only valid
                    // while that page still maps to the same frame.
                    let next = (lin | PAGE_MASK).wrapping_add(1);
                    if let Ok(p) = self.core.probe(next, Access::Execute) {
                        if p >> PAGE_SHIFT == second {
                            return Ok(b as *const Block);
                        }
                    }
                }
            }
        }
        let block = crate::block::decode(&mut self.core, pa, lin, rip, bitness)?;
        Ok(self.cache.insert(block))
    }

    /// Delivers exception `first`, escalating to #DF and to shutdown per
    /// the SDM's double-fault rules (Vol. 3A 6.15, table 6-5). `None`:
    /// delivered, keep running.
    fn raise(&mut self, first: Exception, kind: EventKind) -> Option<Exit> {
        let contributory = |v: u8| matches!(v, 0 | 10 | 11 | 12 | 13);
        let mut cur = first;
        let mut kind = kind;
        for _ in 0..8 {
            if kind == EventKind::Exception
                && cur.vector < 32
                && self.exception_exits & (1 << cur.vector) != 0
            {
                return Some(Exit::Exception(cur));
            }
            match self
                .core
                .deliver(cur.vector, cur.error_code, kind)
                .map_err(|s| s.kind())
            {
                Ok(()) => return None,
                Err(StopKind::Fault(next)) => {
                    if cur.vector == Exception::DF && kind == EventKind::Exception {
                        return Some(Exit::Shutdown);
                    }
                    let df = kind == EventKind::Exception
                        && ((contributory(cur.vector) && contributory(next.vector))
                            || (cur.vector == Exception::PF
                                && (contributory(next.vector) || next.vector == Exception::PF)));
                    cur = if df {
                        Exception::with_code(Exception::DF, 0)
                    } else {
                        next
                    };
                    kind = EventKind::Exception;
                }
                Err(StopKind::Exit(e)) => return Some(e),
                Err(StopKind::Restart(_)) => {
                    return Some(Exit::InternalError(
                        "exception delivery touches MMIO (IDT, GDT, TSS or stack)",
                    ))
                }
            }
        }
        Some(Exit::Shutdown)
    }

    /// Takes a pending NMI or (with IF set and no shadow) interrupt.
    fn take_interrupt(&mut self, shadowed: bool) -> Option<Exit> {
        let lines = self.lines.clone()?;
        if !self.core.nmi_blocked && lines.has_nmi() && lines.take_nmi() {
            self.core.nmi_blocked = true;
            self.halted = false;
            return self.raise(Exception::new(Exception::NMI), EventKind::External);
        }
        if self.core.cpu.rflags & crate::state::rflags::IF != 0 && !shadowed {
            if let Some(v) = lines.take_interrupt() {
                self.halted = false;
                return self.raise(Exception::new(v), EventKind::External);
            }
        }
        None
    }

    /// Whether something would wake a halted vCPU.
    /// Waits in HLT until an interrupt request, the stop flag or 50 ms.
    /// It first polls for up to `halt_poll`, as KVM's halt polling does: a
    /// device's completion or an IPI often comes within microseconds, and
    /// sleeping and being woken costs the thread more than that. The window
    /// grows (from [`HALT_POLL_START`], doubling, to [`HALT_POLL_MAX`])
    /// while wake-ups come after it ends but within the maximum, and drops
    /// to nothing after a longer sleep, so an idle guest does not spin.
    fn wait_halted(&mut self, stop: Option<&AtomicBool>) {
        let Some(lines) = &self.lines else {
            return;
        };
        let woken = || lines.any() || stop.is_some_and(|s| s.load(Ordering::Relaxed));
        let start = Instant::now();
        while start.elapsed() < self.halt_poll {
            if woken() {
                return;
            }
            std::hint::spin_loop();
        }
        lines.wait(Duration::from_millis(50), stop);
        self.halt_poll = next_halt_poll(self.halt_poll, start.elapsed());
    }

    fn wakeup_pending(&self) -> bool {
        match &self.lines {
            Some(l) => {
                (l.has_nmi() && !self.core.nmi_blocked)
                    || (l.has_interrupt() && self.core.cpu.rflags & crate::state::rflags::IF != 0)
            }
            None => false,
        }
    }

    /// Runs guest code until an exit, at most `budget` instructions, and
    /// checking `stop` between blocks.
    pub fn run(&mut self, budget: u64, stop: Option<&AtomicBool>) -> Exit {
        let mut executed = 0;
        let exit = self.run_counted(budget, stop, &mut executed);
        self.retired += executed;
        exit
    }

    /// Like [`Self::run`], but also ending (with
    /// [`Exit::BudgetExhausted`]) at the first block boundary where
    /// RFLAGS.IF is set: for a VMM holding an interrupt that the guest
    /// has masked, so that it can hand the interrupt over as soon as the
    /// guest unmasks (STI, POPF and IRET end blocks) without running one
    /// block at a time until then.
    pub fn run_until_interruptible(&mut self, budget: u64, stop: Option<&AtomicBool>) -> Exit {
        self.until_interruptible = true;
        let exit = self.run(budget, stop);
        self.until_interruptible = false;
        exit
    }

    /// Operations retired by this vCPU so far: instructions, except that
    /// a native run or a fused compare-and-branch counts once, and an
    /// instruction that faulted counts once per attempt (a block's native
    /// code counts each of its instructions).
    pub fn instructions_retired(&self) -> u64 {
        self.retired
    }

    /// How many times this vCPU has executed a native run's stub or
    /// entered a block's native code: zero when native runs are off or
    /// none was compiled, which tests that compare the two modes check.
    pub fn native_runs_executed(&self) -> u64 {
        self.core.native_runs
    }

    /// How many native runs (or chains of blocks' native code) stopped
    /// before their end, at an access their inline TLB lookup did not
    /// cover, and were finished by the interpreter.
    pub fn native_run_exits(&self) -> u64 {
        self.core.native_exits
    }

    /// How many instructions blocks' native code ran (those of blocks it
    /// ran to their end): many per entry ([`Self::native_runs_executed`])
    /// where it goes on from block to block without the block loop.
    pub fn native_instructions(&self) -> u64 {
        self.core.native_instructions
    }

    /// How many TLB misses of blocks' native code were filled by a page
    /// walk from the code, which then went on (not counted in
    /// [`Self::native_run_exits`]).
    pub fn native_refills(&self) -> u64 {
        self.core.native_refills
    }

    /// INIT: the paravirtual clock MSRs go back to disabled (as KVM's
    /// vCPU reset does).
    pub fn reset_paravirt(&mut self) {
        self.core.kvmclock = 0;
        self.core.wall_clock = 0;
    }

    fn run_counted(&mut self, budget: u64, stop: Option<&AtomicBool>, executed: &mut u64) -> Exit {
        if self.resync {
            self.resync = false;
            self.core.sync_paging();
        }
        if let Some(e) = self.core.pop_mmio_write() {
            self.core.attention = self.core.mmio_write_count != 0;
            return e;
        }
        if let Err(s) = self.core.finish_in() {
            if let Some(e) = self.stopped(s, None) {
                return e;
            }
        }
        self.settle();
        if let Some(e) = self.core.pop_mmio_write() {
            return e;
        }
        let arena_full = self.core.native.as_ref().is_some_and(|a| a.is_full());
        if arena_full || self.cache.len() > MAX_CACHED_BLOCKS {
            // Native code filled its arena (blocks decoded since run as
            // interpreted), or the decoded code reached its bound (a guest
            // that runs much more code than this re-decodes it, as QEMU
            // flushes a full translation cache; about 1.5 KiB of host
            // memory per block): drop every block, and with them every
            // block's code, so the arena starts afresh either way (kept,
            // the dead code would fill it soon after and drop the blocks
            // decoded since).
            self.cache.clear();
            if let Some(arena) = self.core.native.as_mut() {
                arena.reset();
            }
        }
        self.cache.collect();
        // The block that just ended normally, whose link to the next one
        // is followed or made (null after anything else: an exception, an
        // interrupt, a halt, a dropped block).
        let mut prev: *const Block = std::ptr::null();
        // How the last block of the last chain of native code went on, and
        // under which link stamps (link, local, global): its jump is linked
        // to the next block's code, or the jump cache learns its indirect
        // successor.
        let mut pending: Option<(native::Successor, [u64; 3])> = None;
        loop {
            if let Some(flag) = stop {
                if flag.load(Ordering::Relaxed) {
                    return Exit::Interrupted;
                }
            }
            if self.until_interruptible && self.core.cpu.rflags & crate::state::rflags::IF != 0 {
                return Exit::BudgetExhausted;
            }
            if self.halted {
                prev = std::ptr::null();
                if !self.wakeup_pending() {
                    self.release_if_idle(self.retired + *executed);
                    self.wait_halted(stop);
                    continue;
                }
                self.halted = false;
            }
            let rip = self.core.cpu.rip;
            let shadowed = self.core.shadow_rip == rip;
            self.core.shadow_rip = u64::MAX;
            if let Some(l) = &self.lines {
                if l.any() {
                    prev = std::ptr::null();
                    if let Some(e) = self.take_interrupt(shadowed) {
                        return e;
                    }
                }
            }
            if *executed >= budget {
                return Exit::BudgetExhausted;
            }
            if self.cache.has_garbage() {
                // No block pointer may outlive this (links to the dropped
                // blocks are already stale).
                prev = std::ptr::null();
                self.cache.collect();
            }
            let rip = self.core.cpu.rip;
            let stamp = self.link_stamp();
            let local = self.local_link_stamp();
            let global = self.global_link_stamp();
            // SAFETY: `prev` is null or points at a block of `self.cache`,
            // which frees blocks only in `collect`, after which `prev` is
            // reset above; a link's target is valid while its stamp
            // matches, since dropping any block moves the stamp on.
            let cs_base = self.core.cpu.segs[seg::CS].base;
            let prev_ref = unsafe { prev.as_ref() };
            // A link within the page `prev` ran from survives TLB flushes;
            // one to code in global pages, those that keep global pages.
            let linked = prev_ref.and_then(|p| {
                let link = p.link_for(rip).get();
                let current = if p.within_page(rip) {
                    link.stamp == local
                } else {
                    link.stamp == stamp || link.stamp == global
                };
                (link.rip == rip && current && link.cs_base == cs_base).then_some(link.target)
            });
            // Whether the block was found by translating RIP (not through
            // a link or the jump cache): the jump cache learns it then.
            let mut looked_up = false;
            let found = match linked {
                Some(b) => Ok(b),
                None => {
                    let bitness = self.core.cpu.bitness();
                    match self
                        .cache
                        .jump_target(rip, cs_base, bitness, [stamp, global])
                    {
                        Some(b) => Ok(b),
                        None => {
                            looked_up = true;
                            self.block_at_rip()
                        }
                    }
                }
            };
            let block = match found {
                Ok(b) => {
                    // A lookup that dropped blocks moved the stamp on: no
                    // link or jump-cache entry then.
                    if linked.is_none() && self.link_stamp() == stamp {
                        // SAFETY: as above; `prev` is not freed before
                        // `collect` even if the lookup dropped it, and `b`
                        // is fresh from the cache.
                        let (target, prev_ref) = unsafe { (&*b, prev.as_ref()) };
                        let within_page = prev_ref.is_some_and(|p| p.within_page(rip));
                        let across = if self.in_global_pages(target, rip) {
                            global
                        } else {
                            stamp
                        };
                        if looked_up || (prev_ref.is_some() && !within_page) {
                            self.note_link_target(target, rip);
                        }
                        if looked_up {
                            let bitness = self.core.cpu.bitness();
                            self.cache.set_jump_target(rip, cs_base, bitness, across, b);
                        }
                        if let Some(p) = prev_ref {
                            p.link_for(rip).set(Link {
                                rip,
                                stamp: if within_page { local } else { across },
                                cs_base,
                                target: b,
                            });
                        }
                    }
                    b
                }
                Err(s) => {
                    prev = std::ptr::null();
                    match self.stopped(s, None) {
                        Some(e) => return e,
                        None => continue,
                    }
                }
            };
            // SAFETY: `block` came from the cache (directly, or through a
            // live link or jump-cache entry) and nothing frees blocks until
            // `collect` above.
            let mut block_ref = unsafe { &*block };
            // The op the interpreter starts at: past those a block's native
            // code did.
            let mut first = 0;
            // `native` first: a compiled block's source is not touched.
            let source = if block_ref.native.get() == 0 {
                block_ref.source.as_ref()
            } else {
                None
            };
            if let Some(source) = source {
                let runs = block_ref.runs.get() + 1;
                block_ref.runs.set(runs);
                if runs == self.hot_after {
                    let code = native::compile_block(
                        &mut self.core.native,
                        block,
                        &block_ref.ops,
                        &source.spans,
                        &source.bytes,
                        source.target,
                    );
                    if let Some(code) = code {
                        block_ref.native.set(code);
                    }
                }
            }
            // Straight from the chain's last block to this one (nothing
            // between cut `prev`), under the same stamp.
            if let Some((successor, [at, local, global])) = pending.take() {
                if !prev.is_null() && at == self.link_stamp() {
                    let in_global = self.in_global_pages(block_ref, rip);
                    if successor != native::Successor::None {
                        self.note_link_target(block_ref, rip);
                    }
                    match successor {
                        native::Successor::Fixed(record) => {
                            let code = block_ref.native.get();
                            if let (true, Some(arena)) = (
                                code != 0 && block_ref.native_cpl == self.core.cpu.cpl(),
                                self.core.native.as_mut(),
                            ) {
                                arena.link(record, [at, local, global], in_global, code);
                            }
                        }
                        native::Successor::Indirect => {
                            let bitness = self.core.cpu.bitness();
                            let s = if in_global { global } else { at };
                            self.cache.set_jump_target(rip, cs_base, bitness, s, block);
                        }
                        native::Successor::None => {}
                    }
                }
            }
            // An interrupt held back by an STI's shadow is delivered after
            // the next instruction: the interpreter runs this block, not a
            // chain of blocks' code that would go on far beyond it.
            let held = shadowed && self.lines.as_ref().is_some_and(|l| l.any());
            if block_ref.native.get() != 0
                && block_ref.native_cpl == self.core.cpu.cpl()
                && !self.until_interruptible
                && !held
            {
                let stamps = [
                    self.link_stamp(),
                    self.local_link_stamp(),
                    self.global_link_stamp(),
                ];
                let jumps = self.cache.jump_table();
                let requests = self
                    .lines
                    .as_ref()
                    .map_or(std::ptr::null(), |l| l.any_flag());
                let end = native::run_block(
                    &mut self.core,
                    block_ref,
                    stamps,
                    jumps,
                    requests,
                    budget - *executed,
                );
                *executed += end.ran;
                pending = Some((end.successor, stamps));
                // SAFETY: the block the code stopped in is `block_ref` or
                // one reached through links made under the current stamp,
                // as live as a link target is here.
                block_ref = unsafe { &*end.block };
                first = match end.done {
                    None => block_ref.ops.len(),
                    Some(k) => {
                        *executed += k as u64;
                        k
                    }
                };
            }
            prev = if block_ref.chainable {
                block_ref
            } else {
                std::ptr::null()
            };
            for op in block_ref.ops[first..].iter() {
                self.core.cpu.rip = op.next_ip;
                *executed += 1;
                if let Err(s) = (op.handler)(&mut self.core, op) {
                    prev = std::ptr::null();
                    match self.stopped(s, Some(op)) {
                        Some(e) => return e,
                        None => break,
                    }
                }
                if self.core.attention {
                    let smc = !self.core.dirty_code.is_empty();
                    self.settle();
                    if let Some(e) = self.core.pop_mmio_write() {
                        self.core.attention = self.core.mmio_write_count != 0;
                        return e;
                    }
                    if smc {
                        // The block may have just overwritten itself.
                        prev = std::ptr::null();
                        break;
                    }
                }
            }
        }
    }

    /// What a link must have been made under to be followed: no block
    /// dropped, no TLB flush, no code page written by any vCPU, and the
    /// same privilege level since (the successor's translation and bytes
    /// were checked for them). All three counts only grow, so their sum
    /// moves whenever one does.
    #[inline(always)]
    fn link_stamp(&self) -> u64 {
        let changes = self.cache.epoch() + self.core.mmu.flushes + self.core.code.writes();
        (changes << 3) | u64::from(self.core.cpu.cpl())
    }

    /// [`Self::link_stamp`] counting only the TLB flushes that may drop
    /// global translations, for a link to code in global pages (see
    /// [`Self::in_global_pages`]): such a translation outlives CR3 writes,
    /// as Linux's kernel text does every context switch. Its bit 2 keeps
    /// it from ever equalling a link stamp.
    #[inline(always)]
    fn global_link_stamp(&self) -> u64 {
        let changes = self.cache.epoch() + self.core.mmu.global_flushes + self.core.code.writes();
        (changes << 3) | GLOBAL_LINK | u64::from(self.core.cpu.cpl())
    }

    /// Notes the pages of `block`, found at `rip`, as a link's target (see
    /// [`Mmu::note_link_target`]): an INVLPG of them then cuts links.
    fn note_link_target(&mut self, block: &Block, rip: u64) {
        let lin = if self.core.cpu.bitness() == 64 {
            rip
        } else {
            self.core.cpu.segs[seg::CS].base.wrapping_add(rip) & 0xffff_ffff
        };
        let next = (lin | PAGE_MASK).wrapping_add(1);
        for (page, used) in [(lin, true), (next, block.pages[1].is_some())] {
            if used {
                // The TLB's entry says the page's size (a walk refills an
                // evicted one; with none the filter takes 1 GiB).
                let _ = self.core.probe(page, Access::Execute);
                self.core.mmu.note_link_target(page);
            }
        }
    }

    /// Whether `block`, found for linear RIP `rip` in 64-bit mode, runs from
    /// pages the TLB holds global translations of, to the block's own
    /// frames: a link to it may then be made under the global link stamp.
    fn in_global_pages(&self, block: &Block, rip: u64) -> bool {
        if self.core.cpu.bitness() != 64 || block.rip != rip {
            return false;
        }
        let mmu = &self.core.mmu;
        let first = block.pages[0].is_some_and(|p| mmu.translates_global(rip, p));
        first
            && block.pages[1]
                .is_none_or(|p| mmu.translates_global((rip | PAGE_MASK).wrapping_add(1), p))
    }

    /// [`Self::link_stamp`] without the TLB flushes, for a link to a RIP
    /// in the page the block before ran from (see
    /// [`Block::within_page`]): that page translates as it did while the
    /// block ran, whatever was flushed since.
    #[inline(always)]
    fn local_link_stamp(&self) -> u64 {
        let changes = self.cache.epoch() + self.core.code.writes();
        (changes << 3) | u64::from(self.core.cpu.cpl())
    }

    /// Handles a handler's stop: `Some` exit to report, or `None` to keep
    /// running (an exception was delivered, HLT is waiting).
    fn stopped(&mut self, s: Stop, op: Option<&Op>) -> Option<Exit> {
        self.settle();
        // The instruction that stopped: inside a native run, the one the
        // run's interpreted rest stopped at.
        let at = self.core.stop_ip.take().or(op.map(|op| op.instr.ip()));
        match s.kind() {
            StopKind::Exit(Exit::Halt) => {
                // HLT with IF clear is reported: only an NMI or INIT could
                // end it, and the VMM wants to know.
                let waits =
                    self.lines.is_some() && self.core.cpu.rflags & crate::state::rflags::IF != 0;
                if waits {
                    self.halted = true;
                    None
                } else {
                    Some(Exit::Halt)
                }
            }
            StopKind::Exit(e) => Some(e),
            StopKind::Restart(e) => {
                if let Some(ip) = at {
                    self.core.cpu.rip = ip;
                }
                Some(e)
            }
            StopKind::Fault(x) => {
                if let Some(ip) = at {
                    self.core.cpu.rip = ip;
                }
                let r = self.raise(x, EventKind::Exception);
                self.settle();
                r
            }
        }
    }
}

/// The most decoded blocks a vCPU keeps. A Debian boot to multi-user
/// decodes about 70,000 (100 MiB of host memory); with this bound the
/// cache stays near 45 MiB and that boot is as fast (measured in one run
/// each: 43 to 54 s either way, noise on this host).
const MAX_CACHED_BLOCKS: usize = 32 * 1024;

/// An idle vCPU drops its decoded code and returns the memory, so an idle
/// VM costs little more host memory than its guest's pages; waking up
/// re-decodes only what it runs. Idle: halted at the end of a window of
/// The halt-polling window after a halt that polled for `window` and was
/// woken `slept` after it began (see [`Emulator::wait_halted`]).
fn next_halt_poll(window: Duration, slept: Duration) -> Duration {
    if slept <= HALT_POLL_MAX {
        (window * 2).clamp(HALT_POLL_START, HALT_POLL_MAX)
    } else {
        Duration::ZERO
    }
}

/// The first halt-polling window ([`Emulator::wait_halted`]); KVM's
/// `halt_poll_ns_grow_start` is the same.
const HALT_POLL_START: Duration = Duration::from_micros(10);
/// The longest halt-polling window: KVM's default `halt_poll_ns`.
const HALT_POLL_MAX: Duration = Duration::from_micros(200);

/// [`IDLE_WINDOW`] in which it retired fewer than [`IDLE_INSTRUCTIONS`]
/// (an idle Debian guest retires about 1M a second on its timers; the
/// interpreter runs about 100M a second when busy).
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);
const IDLE_INSTRUCTIONS: u64 = 20_000_000;
const IDLE_KEEP_BLOCKS: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    /// Halt polling grows while wake-ups come soon (from 10 µs, doubling,
    /// to 200 µs) and stops after a long sleep, as KVM's does.
    #[test]
    fn the_halt_polling_window_grows_with_quick_wakeups_and_stops_after_a_long_sleep() {
        let quick = Duration::from_micros(50);
        let mut window = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..7 {
            window = next_halt_poll(window, quick);
            seen.push(window.as_micros());
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 200, 200]);
        // A wake-up just within the longest window still counts as quick.
        assert_eq!(next_halt_poll(window, HALT_POLL_MAX), HALT_POLL_MAX);
        // An idle guest's long sleep: no polling next time.
        assert_eq!(
            next_halt_poll(window, Duration::from_millis(4)),
            Duration::ZERO
        );
    }
}
