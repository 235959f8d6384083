//! Native runs: straight-line stretches of guest instructions executed
//! directly on the host processor.
//!
//! Guest and host are both x86-64, and an instruction whose operands are
//! only general-purpose registers and immediates (ADD, ADC, IMUL, SHL,
//! CMOVcc, SETcc, MOVZX, LEA, ...) does the same thing on either: it reads
//! and writes registers and the status flags, nothing else. A block's
//! longest runs of such instructions are copied byte for byte into a stub
//! that loads the guest's registers and status flags into the host's,
//! runs the copied instructions, and stores registers and flags back. A
//! run of thirty instructions then costs one dispatch and runs at host
//! speed, flags exact by construction (the host computes them).
//!
//! The same instructions with one explicit memory operand run natively
//! too: each is re-encoded to address the host page of its operand, found
//! by an inline lookup in the vCPU's software TLB (a dozen host
//! instructions on a hit). Whatever the lookup does not cover (a miss, a
//! page crossing, MMIO, a write to a page holding decoded code, whose TLB
//! entry gives native code no write bit (see `TlbEntry::native`), a run
//! decoded at the other privilege) ends the stub before that instruction,
//! with the guest's registers and flags exact, and the interpreter
//! executes the rest of the run. A fault is therefore always raised by
//! the interpreter, precisely.
//!
//! A block whose every instruction runs natively this way, and which ends
//! in a near Jcc, JMP, CALL or RET (or straight on), is compiled whole
//! (see [`compile_block`]): its code computes the next RIP itself and
//! jumps on into the next block's code (see [`chain`]), so a hot loop runs
//! without coming back to the block loop. Blocks' code also runs what a
//! run cannot: SSE and SSE2 instructions (the guest's XMM registers and
//! MXCSR loaded into the host's), REP STOS and REP MOVS within a page,
//! FNSTCW, DIV after checks that leave before it would fault, CLD, STD,
//! PREFETCHh, and at CPL 0 CLI and STI (see [`Control`]). A TLB miss in a
//! block's code calls a page walk (see [`refill`]) and goes on where it
//! made an entry; only a fault, MMIO, a page crossing or a write to code
//! leaves for the interpreter. Blocks are cut where that stops (see
//! [`plan_block`]).
//!
//! What keeps this safe for the host: an instruction is copied only when
//! iced decoded it in 64-bit mode as one of a fixed list of mnemonics
//! (none touches the stack, RIP, segment or control state, none can fault
//! on any x86-64 host: LAHF/SAHF, which the first x86-64 processors
//! lacked in 64-bit mode, are left out), without LOCK (but for a locked
//! read-modify-write of guest memory), with every operand a
//! general-purpose register other than RSP, an XMM register or an
//! immediate (LEA's address arithmetic, which reads no memory, is allowed
//! without RIP or RSP; a NOP's operand is never accessed), or one memory
//! operand whose host address the lookup checked: a RAM page of this VM
//! the guest's page tables allow the access to, the whole access inside
//! it. What could still fault on the host is checked first and left to
//! the interpreter, which raises the guest's exception: a misaligned
//! 16-byte SSE operand, SSE with CR0.EM, CR0.TS or CR4.OSFXSR in the way,
//! floating point with an unmasked MXCSR exception, DIV by zero or with
//! too large a quotient, a string element straddling two pages (a string
//! instruction moves a page at a time, each looked up). The host stack
//! pointer is never a guest register, so a signal arriving during a run
//! lands on the host stack as usual. DF, IF and the other system flags
//! stay the host's.

mod chain;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::hostasm::{Addr, Asm, Fixup, CC_NE, RAX, RCX, RDI, RSI, RSP};
use crate::block::{Block, EaForm, Op};
use crate::mem::{TlbEntry, PAGE_MASK, PAGE_SHIFT, TLB_ENTRIES};

/// Shortest run worth a stub (the stub's entry and exit cost about as
/// much as two dispatches).
pub const MIN_RUN: usize = 3;

/// Bytes of stub and block code one vCPU may generate; once full, the
/// block loop drops every block and starts the arena afresh. Host memory
/// is taken only as code is written. 8 MiB held the default guest's boot
/// and a fork loop's code until blocks' code called the TLB refill
/// routine (see [`refill`]); then the loop filled it again and again: 1000
/// fork+exec of `/bin/true` took 11.3 s, against 8.2 s with 32 MiB.
const ARENA_BYTES: usize = 32 << 20;

/// The status flags (CF PF AF ZF SF OF) in RFLAGS.
const STATUS: u32 = 0x8d5;

/// Whether `i` may run natively as it is, touching no memory (see the
/// module comment).
pub fn eligible(i: &Instruction, bitness: u32) -> bool {
    eligible_with(i, bitness, false)
}

/// [`eligible`], or with `rsp` also naming the guest's RSP (the whole
/// register, as an operand or LEA's base), which the stub then holds in a
/// scratch register (the host's RSP is the stub's stack).
fn eligible_with(i: &Instruction, bitness: u32, rsp: bool) -> bool {
    use Mnemonic as M;
    if bitness != 64 || i.is_invalid() || i.has_lock_prefix() {
        return false;
    }
    let m = i.mnemonic();
    let listed = super::forms::is_register_alu(m)
        || runs_in_either_form(m)
        || matches!(
            m,
            M::Bt
                | M::Bts
                | M::Btr
                | M::Btc
                | M::Cbw
                | M::Cwde
                | M::Cdqe
                | M::Cwd
                | M::Cdq
                | M::Cqo
                | M::Clc
                | M::Stc
                | M::Cmc
                | M::Bswap
        )
        || super::forms::is_cmovcc(m)
        || super::forms::is_setcc(m);
    // BSWAP of a 16-bit register is undefined (hosts differ).
    if !listed || (m == M::Bswap && i.op0_register().size() == 2) {
        return false;
    }
    let register = |r: Register| usable(r) || (rsp && r == Register::RSP);
    (0..i.op_count()).all(|n| match i.op_kind(n) {
        OpKind::Register => register(i.op_register(n)),
        OpKind::Memory => {
            m == M::Nop
                || m == M::Lea
                    && (i.memory_base() == Register::None || register(i.memory_base()))
                    && (i.memory_index() == Register::None || usable(i.memory_index()))
        }
        k => super::forms::is_immediate(k),
    })
}

/// Mnemonics beyond the ALU list that run natively with register operands
/// ([`eligible`]) and with one memory operand ([`memory_operand`]).
fn runs_in_either_form(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Mul | M::Rcl | M::Rcr | M::Shld | M::Shrd | M::Xchg | M::Bsf | M::Bsr
    )
}

/// Whether `i` names the guest's RSP explicitly (see [`eligible_with`]).
fn names_rsp(i: &Instruction) -> bool {
    i.memory_base() == Register::RSP
        || (0..i.op_count())
            .any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n) == Register::RSP)
}

/// Executable memory for stubs, bump-allocated and never freed (a stub
/// of a dropped block is simply unused). One memory file mapped twice:
/// writable where stubs are copied in, executable where they run, so no
/// page is ever writable and executable in one mapping, and adding a
/// stub costs a copy, not an `mprotect` (which, with the VMM's other
/// threads, also shoots down their TLBs).
pub struct Arena {
    /// The executable view: where stubs run.
    base: *mut u8,
    /// The writable view of the same pages.
    write: *mut u8,
    /// The memory file, for giving its pages back.
    fd: libc::c_int,
    used: usize,
    /// A block's stubs did not fit: the owner should drop every block
    /// and [`Arena::reset`].
    full: bool,
    /// Whether runs may include memory accesses (`VESSEL_EMU_NATIVE=regs`
    /// keeps them register-only, to measure what they add).
    memory: bool,
    /// The routine that enters a chain of blocks' code (see [`chain`]).
    enter: usize,
}

/// Whether the host runs LAHF and SAHF in 64-bit mode (CPUID 8000_0001h,
/// ECX bit 0), with which blocks' code keeps the guest's flags: every
/// x86-64 processor since 2006 does, the first Athlon 64 and Pentium 4
/// did not.
fn host_has_lahf_sahf() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & 1 != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The arena's first page holds the routines every block's code shares;
/// blocks and stubs come after it.
const SHARED_BYTES: usize = 4096;

// SAFETY: the arena is owned by one vCPU's `Core` and moves between
// threads with it; its pages are only written while that `Core` is
// borrowed mutably.
unsafe impl Send for Arena {}

impl Arena {
    /// A fresh arena, or `None` where the host refuses executable memory,
    /// is not x86-64 (or lacks LAHF and SAHF, see [`host_has_lahf_sahf`]),
    /// or `VESSEL_EMU_NATIVE=0` turns native runs off.
    pub fn new() -> Option<Arena> {
        let setting = std::env::var_os("VESSEL_EMU_NATIVE");
        if !host_has_lahf_sahf() || setting.as_ref().is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: creates a new file descriptor, checked before use and
        // owned by the arena from here on (closed on every path below).
        let fd = unsafe { libc::memfd_create(c"vessel-emu-code".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let map = |prot: libc::c_int| {
            // SAFETY: a new shared mapping of the arena's own file; no
            // existing memory is touched. The result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ARENA_BYTES,
                    prot,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            (p != libc::MAP_FAILED).then_some(p.cast::<u8>())
        };
        // SAFETY: `fd` is the file made above.
        let sized = unsafe { libc::ftruncate(fd, ARENA_BYTES as libc::off_t) } == 0;
        let write = sized
            .then(|| map(libc::PROT_READ | libc::PROT_WRITE))
            .flatten();
        let base = write.and_then(|_| map(libc::PROT_READ | libc::PROT_EXEC));
        let (Some(write), Some(base)) = (write, base) else {
            // SAFETY: unmaps only what was mapped above, and closes the
            // file made above.
            unsafe {
                if let Some(w) = write {
                    libc::munmap(w.cast(), ARENA_BYTES);
                }
                libc::close(fd);
            }
            return None;
        };
        let shared = chain::shared_routines();
        assert!(shared.len() <= SHARED_BYTES);
        // SAFETY: the writable view is ARENA_BYTES long, and nothing runs
        // from the arena yet.
        unsafe {
            std::ptr::copy_nonoverlapping(shared.as_ptr(), write, shared.len());
        }
        Some(Arena {
            base,
            write,
            fd,
            used: SHARED_BYTES,
            full: false,
            memory: setting.is_none_or(|v| v != "regs"),
            enter: base as usize,
        })
    }

    /// Whether stubs stopped fitting (see [`Arena::reset`]).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Makes the whole arena free again. The caller must have dropped
    /// every block holding a stub of this arena.
    pub fn reset(&mut self) {
        self.used = SHARED_BYTES;
        self.full = false;
    }

    /// [`Arena::reset`], and the pages that held stubs go back to the host
    /// (an idle vCPU keeps no resident code it no longer runs). The
    /// caller must have dropped every block holding a stub of this arena.
    pub fn release(&mut self) {
        const PAGE: usize = 4096;
        let used = self.used.min(ARENA_BYTES).next_multiple_of(PAGE);
        self.reset();
        if used <= SHARED_BYTES {
            return;
        }
        // SAFETY: punches a hole in the arena's own file between the
        // shared routines and `used`; no stub in it can run (no block
        // refers to one), and its pages read back as zeros until stubs are
        // copied in again.
        unsafe {
            libc::fallocate(
                self.fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                SHARED_BYTES as libc::off_t,
                (used - SHARED_BYTES) as libc::off_t,
            );
        }
    }

    /// Points the jump of the exit record at `record` (written by
    /// [`chain`] after a block's code in this arena) at `target`, the code
    /// of the block that follows it under `stamps` (the link stamp, local
    /// link stamp and global link stamp), and has it taken under one of
    /// them only: the local one where the record says the successor is in
    /// the block's page, else the global one where `global` (the successor
    /// is in global pages), else the link stamp. Ignores a record outside
    /// the arena.
    pub fn link(&mut self, record: usize, stamps: [u64; 3], global: bool, target: usize) {
        let inside = |at: usize, len: usize| {
            at >= self.base as usize + SHARED_BYTES && at + len <= self.base as usize + self.used
        };
        let size = std::mem::size_of::<chain::ExitRecord>();
        if !inside(record, size) || !inside(target, 1) || !record.is_multiple_of(8) {
            return;
        }
        // SAFETY: `record` is inside the arena's used part and aligned
        // (checked above); records are written only by `chain`.
        let r = unsafe { (record as *const chain::ExitRecord).read() };
        let site = |rel: i32| record.wrapping_add(rel as isize as usize);
        let (lo, hi, jump) = (site(r.stamp_lo), site(r.stamp_hi), site(r.jump));
        if r.jump == 0 || ![lo - 1, hi - 1, jump].iter().all(|at| inside(*at, 4)) {
            return;
        }
        let rel = target as i64 - (jump as i64 + 4);
        let Ok(rel) = i32::try_from(rel) else {
            return;
        };
        // The stamp the jump is taken under, and for a successor outside
        // the block's page which slot holds it (the compares' disp8s).
        let (stamp, slot) = if r.local != 0 {
            (stamps[1], None)
        } else if global {
            (stamps[2], Some(chain::slot::GLOBAL_STAMP))
        } else {
            (stamps[0], Some(chain::slot::STAMP))
        };
        let mut writes = vec![
            (lo, 4, stamp as u32),
            (hi, 4, (stamp >> 32) as u32),
            (jump, 4, rel as u32),
        ];
        if let Some(slot) = slot {
            writes.push((lo - 1, 1, slot as u32));
            writes.push((hi - 1, 1, slot as u32 + 4));
        }
        for (at, len, value) in writes {
            // SAFETY: `at` is inside the used part of the arena (checked
            // above), written through the writable view; no code runs
            // while this vCPU's block loop links, and x86 keeps
            // instruction fetch coherent with stores through the other
            // view.
            unsafe {
                let to = self.write.add(at - self.base as usize);
                if len == 4 {
                    std::ptr::write_unaligned(to.cast::<u32>(), value);
                } else {
                    to.write(value as u8);
                }
            }
        }
    }

    /// Copies `code` (a block's stubs) in; its address, or `None` when
    /// the arena is full.
    fn add(&mut self, code: &[u8]) -> Option<usize> {
        if code.len() > ARENA_BYTES - self.used {
            self.full = true;
            return None;
        }
        // SAFETY: `[used, used + code.len())` lies inside both views (the
        // check above). No stub runs while this vCPU decodes, and the stub
        // is published only after this returns; x86 keeps instruction
        // fetch coherent with stores through the other view.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.write.add(self.used), code.len());
        }
        let at = self.base as usize + self.used;
        self.used += code.len().next_multiple_of(16);
        Some(at)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mappings and file made in `new`; no stub runs once
        // the `Core` owning the arena is gone.
        unsafe {
            libc::munmap(self.base.cast(), ARENA_BYTES);
            libc::munmap(self.write.cast(), ARENA_BYTES);
            libc::close(self.fd);
        }
    }
}

/// Status flags in iced's `RflagsBits` (OF SF ZF AF CF PF).
const ALL_FLAGS: u32 = 0x3f;

/// How an instruction uses the status flags, for loading, storing and
/// keeping the guest's flags around it.
#[derive(Debug, Clone, Copy)]
struct FlagUse {
    /// Reads a flag, or may leave them all as they were (a shift or
    /// rotate whose count may be zero).
    reads: u32,
    /// Sets each of these to a defined value. Flags left undefined are
    /// not counted: some hosts leave them unchanged, and the guest's own
    /// values are the better answer than whatever the host's flags held.
    writes: u32,
    /// Changes any flag.
    modifies: bool,
}

impl FlagUse {
    fn of(i: &Instruction) -> FlagUse {
        let may_keep_flags = matches!(
            i.mnemonic(),
            Mnemonic::Shl
                | Mnemonic::Sal
                | Mnemonic::Shr
                | Mnemonic::Sar
                | Mnemonic::Rol
                | Mnemonic::Ror
                | Mnemonic::Rcl
                | Mnemonic::Rcr
                | Mnemonic::Shld
                | Mnemonic::Shrd
        );
        let modifies = i.rflags_modified() != 0;
        if may_keep_flags {
            return FlagUse {
                reads: ALL_FLAGS,
                writes: 0,
                modifies,
            };
        }
        FlagUse {
            reads: i.rflags_read() & ALL_FLAGS,
            writes: (i.rflags_written() | i.rflags_cleared() | i.rflags_set()) & ALL_FLAGS,
            modifies,
        }
    }

    /// Whether the host's flags must hold the guest's before it runs:
    /// it reads them or keeps some of them.
    fn needs_guest_flags(self) -> bool {
        self.reads != 0 || (self.modifies && self.writes != ALL_FLAGS)
    }
}

/// A guest memory operand a run accesses natively, through an inline
/// lookup in the vCPU's software TLB (see [`memory_operand`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemOperand {
    /// Guest register numbers. A base of 4 (RSP) is read from a scratch
    /// register holding the guest's RSP (the host's is the stub's stack).
    base: Option<u8>,
    index: Option<(u8, u8)>,
    /// The sign-extended displacement, or the absolute address of a
    /// RIP-relative or `moffs` operand.
    disp: u64,
    /// FS or GS (`state::seg`), whose base is added.
    seg: Option<u8>,
    size: u8,
    write: bool,
    /// A 16-byte operand of a legacy SSE instruction other than the
    /// unaligned moves: #GP unless 16-byte aligned.
    aligned: bool,
}

/// The memory operand of `op` if it may run natively with it: 64-bit
/// code and addressing, one explicit operand of 1, 2, 4 or 8 bytes, an
/// instruction of the register-only list that reads or writes nothing
/// else (no LOCK, no bit offset from a register, which may address far
/// from the operand), its other operands registers other than RSP or
/// immediates.
fn memory_operand(op: &Op, info: &mut iced_x86::InstructionInfoFactory) -> Option<MemOperand> {
    use iced_x86::{Code, OpAccess};
    use Mnemonic as M;
    let i = &op.instr;
    let m = i.mnemonic();
    // A locked read-modify-write stays one: the host's LOCK on the guest's
    // page, as atomic against other vCPUs as the interpreter's (which
    // uses the host's atomics too), for those the interpreter runs so.
    let lockable = super::ops::runs_atomically(i);
    if op.bitness != 64 || i.is_invalid() || (i.has_lock_prefix() && !lockable) {
        return None;
    }
    // PUSH and POP of a 64-bit register other than RSP, PUSH of an
    // immediate: an 8-byte access below or at RSP, then RSP moves.
    match i.code() {
        Code::Push_r64 if usable(i.op0_register()) => return Some(stack(-8, true)),
        Code::Pushq_imm8 | Code::Pushq_imm32 => return Some(stack(-8, true)),
        Code::Pop_r64 if usable(i.op0_register()) => return Some(stack(0, false)),
        _ => {}
    }
    let immediate_bit_offset = matches!(m, M::Bt | M::Bts | M::Btr | M::Btc)
        && (0..i.op_count()).any(|n| super::forms::is_immediate(i.op_kind(n)));
    let listed = (super::forms::is_register_alu(m) && !matches!(m, M::Lea | M::Nop))
        || runs_in_either_form(m)
        || matches!(m, M::Xadd | M::Cmpxchg | M::Tzcnt | M::Lzcnt)
        || immediate_bit_offset
        || super::forms::is_cmovcc(m)
        || super::forms::is_setcc(m);
    if !listed {
        return None;
    }
    let mut memory = 0;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register if usable(i.op_register(n)) || i.op_register(n) == Register::RSP => {}
            OpKind::Memory => memory += 1,
            k if super::forms::is_immediate(k) => {}
            _ => return None,
        }
    }
    let size = i.memory_size().size();
    if memory != 1 || !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let [access] = info.info(i).used_memory() else {
        return None;
    };
    let write = !matches!(access.access(), OpAccess::Read | OpAccess::CondRead);
    effective(op, size as u8, write)
}

/// The explicit memory operand of `op`, accessed as `size` bytes, where
/// the lookup can compute its address: 64-bit addressing in the common
/// form (see [`EaForm`]), its displacement and last byte's within disp32
/// when it has a base or an index (the lookup's LEAs carry them so).
fn effective(op: &Op, size: u8, write: bool) -> Option<MemOperand> {
    let ea = op.ea;
    if op.asize != 8 || ea.flags & EaForm::FAST == 0 {
        return None;
    }
    let mem = MemOperand {
        base: (ea.flags & EaForm::HAS_BASE != 0).then_some(ea.base),
        index: (ea.flags & EaForm::HAS_INDEX != 0)
            .then_some((ea.index, ea.flags & EaForm::SHIFT_MASK)),
        disp: ea.disp,
        seg: (ea.flags & EaForm::SEG_BASE != 0).then_some(ea.seg),
        size,
        write,
        aligned: false,
    };
    let fits = |d: u64| i32::try_from(d as i64).is_ok();
    let last = mem.disp.wrapping_add(u64::from(mem.size) - 1);
    if (mem.base.is_some() || mem.index.is_some()) && !(fits(mem.disp) && fits(last)) {
        return None;
    }
    Some(mem)
}

/// A general-purpose register a native instruction may name: any but
/// the stack pointer, which is the host's.
fn usable(r: Register) -> bool {
    r.is_gpr()
        && !matches!(
            r,
            Register::RSP | Register::ESP | Register::SP | Register::SPL
        )
}

/// One instruction of a run.
#[derive(Clone, Copy)]
enum Item<'a> {
    /// Register-only: its bytes are copied.
    Copy(&'a Instruction, &'a [u8]),
    /// Register-only, naming RSP (re-encoded with the register holding
    /// it) or TZCNT or LZCNT (re-encoded as BSF or BSR).
    Renamed(&'a Instruction),
    /// With a memory operand (PUSH and POP included): re-encoded to
    /// address the host page.
    Memory(&'a Instruction, MemOperand),
    /// LEA of a constant address: a move of it.
    Constant(&'a Instruction, u8, u64),
    /// DIV, of a memory operand when given (see [`division`]).
    Divide(&'a Instruction, Option<MemOperand>),
    /// REP STOS of elements of `.1` bytes (see [`string_store`]).
    Fill(&'a Instruction, u8),
    /// REP MOVS of elements of `.1` bytes (see [`string_store`]).
    Move(&'a Instruction, u8),
    /// A change of RFLAGS' IF or DF, or nothing (see [`Control`]).
    Control(&'a Instruction, Control),
}

/// What a block's code does for an instruction that changes no register
/// but RFLAGS' system bits, or nothing the guest can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// PREFETCHh: a hint, which never faults.
    Nothing,
    /// CLI and STI, at CPL 0 (where IOPL does not matter). STI leaves
    /// the chain before it where an interrupt request is pending (the
    /// interpreter runs it, and the block loop delivers the interrupt after
    /// the instruction it shadows), else it sets IF and the vCPU's
    /// interrupt shadow, for the block loop to honour should the chain end
    /// right after it (`sti; hlt` must not take the interrupt before HLT).
    ClearIf,
    SetIf,
    /// CLD and STD.
    ClearDf,
    SetDf,
}

/// The [`Control`] form of `op`, if it has one: CLI and STI only in code
/// for CPL 0 (`cpl0`).
fn control(op: &Op, cpl0: bool) -> Option<Control> {
    use iced_x86::Mnemonic as M;
    let i = &op.instr;
    if op.bitness != 64 || i.has_lock_prefix() {
        return None;
    }
    match i.mnemonic() {
        M::Prefetcht0 | M::Prefetcht1 | M::Prefetcht2 | M::Prefetchnta | M::Prefetchw => {
            Some(Control::Nothing)
        }
        M::Cli if cpl0 => Some(Control::ClearIf),
        M::Sti if cpl0 => Some(Control::SetIf),
        M::Cld => Some(Control::ClearDf),
        M::Std => Some(Control::SetDf),
        _ => None,
    }
}

impl Item<'_> {
    fn instr(&self) -> &Instruction {
        match self {
            Item::Copy(i, _)
            | Item::Renamed(i)
            | Item::Memory(i, _)
            | Item::Constant(i, ..)
            | Item::Divide(i, _)
            | Item::Fill(i, _)
            | Item::Move(i, _)
            | Item::Control(i, _) => i,
        }
    }

    fn names_rsp(&self) -> bool {
        match self {
            Item::Copy(..)
            | Item::Constant(..)
            | Item::Fill(..)
            | Item::Move(..)
            | Item::Control(..) => false,
            Item::Renamed(i) => names_rsp(i),
            Item::Divide(_, m) => m.is_some_and(|m| m.base == Some(RSP)),
            Item::Memory(i, m) => m.base == Some(RSP) || names_rsp(i),
        }
    }
}

/// What a run needs loaded and stored: the general-purpose registers it
/// touches (bit n = register n, read or written, implicit operands and
/// address registers included; whole registers, since a partial write
/// keeps the rest), whether the incoming status flags may matter (read
/// before being written, passed through by a shift or rotate whose count
/// may be zero, or kept until a memory access, where the run may stop and
/// must leave them exact), and whether it writes any flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    regs: u16,
    flags_in: bool,
    flags_out: bool,
}

fn footprint(
    run: &[Item],
    branch_reads: u32,
    info: &mut iced_x86::InstructionInfoFactory,
) -> Footprint {
    let mut regs = 0u16;
    let mut written = 0u32;
    // Flags read before written; kept until a memory access (where the run
    // may stop), which matters only if the run changes any.
    let mut flags_in = false;
    let mut kept = false;
    let mut flags_out = false;
    for item in run {
        let i = item.instr();
        for used in info.info(i).used_registers() {
            let full = used.register().full_register();
            if full.is_gpr64() {
                regs |= 1 << (full as u32 - Register::RAX as u32);
            }
        }
        let f = FlagUse::of(i);
        if f.reads & !written != 0 {
            flags_in = true;
        }
        if matches!(item, Item::Memory(..)) && written != ALL_FLAGS {
            kept = true;
        }
        written |= f.writes;
        flags_out |= f.modifies;
    }
    // The stub stores all six status flags: any the run does not
    // overwrite must come in from the guest to go back out unchanged (at
    // its end or where it stops); a block's final Jcc reads them.
    if (flags_out && (written != ALL_FLAGS || kept)) || branch_reads & !written != 0 {
        flags_in = true;
    }
    Footprint {
        regs,
        flags_in,
        flags_out,
    }
}

/// What a run's stub is called with (`extern "C" fn(*mut Frame) -> u64`,
/// returning how many of its instructions it executed), and a chain's
/// entry routine (see [`chain`]).
#[repr(C)]
struct Frame {
    gpr: *mut u64,
    rflags: *mut u64,
    tlb: *const TlbEntry,
    fs_base: u64,
    gs_base: u64,
    // The rest is for a chain.
    /// Out: the RIP an indirect successor had no code for.
    rip: u64,
    /// In: how many instructions the chain may run. Out: less those of
    /// every block that ran to its end.
    left: i64,
    /// What a jump to the next block's code must have been linked under
    /// to be taken (the block loop's link stamp), and for a jump within
    /// the block's page, its local link stamp.
    stamp: u64,
    local_stamp: u64,
    /// The global link stamp, for jumps to code in global pages.
    global_stamp: u64,
    /// The block cache's jump cache, for indirect successors.
    jumps: *const crate::block::Jump,
    /// The guest's XMM registers.
    xmm: *mut u128,
    /// 0 where the guest may run SSE instructions, else 2 (see
    /// [`chain::slot::XMM`]).
    xmm_state: u64,
    /// In and out: the guest's MXCSR.
    mxcsr: u64,
    /// The guest's DF: 1 set (string instructions go down).
    df: u64,
    /// The guest's x87 control word, or all ones where x87 instructions
    /// would fault.
    fcw: u64,
    /// 0 where the guest's MXCSR masks every floating-point exception
    /// (no instruction can raise #XM), else 2 (see
    /// [`chain::slot::MXCSR`]).
    mxcsr_state: u64,
    /// For a chain: the vCPU whose TLB [`refill`] fills, and `refill`
    /// itself, which the chain's refill routine calls (a run's stub
    /// calls nothing: null and `None`).
    core: *mut super::Core,
    refill: Option<extern "C" fn(*mut Frame, u64, u64) -> u64>,
    /// For a chain: the vCPU's flag of pending interrupt requests (its
    /// `InterruptLines::any`), null where it has no lines.
    requests: *const std::sync::atomic::AtomicBool,
}

/// How a chain's call of [`refill`] describes the access that missed:
/// its size in bytes in the low byte, and these bits.
pub(super) const REFILL_WRITE: i32 = 1 << 8;
pub(super) const REFILL_USER: i32 = 1 << 9;
/// The access must be 16-byte aligned (where it is not, the interpreter
/// raises #GP without walking the page tables).
pub(super) const REFILL_ALIGNED: i32 = 1 << 10;
/// A write the instruction may not make (a shift or rotate of memory by a
/// count of 0 writes nothing, and the interpreter sets no dirty bit for
/// it): the walk is a read's, and the refill succeeds only where the page
/// is writable (dirty) already.
pub(super) const REFILL_MAYBE_WRITE: i32 = 1 << 11;

/// Called by a block's code (through the chain's refill routine, see
/// `chain::slot::REFILL`) where its TLB lookup missed: walks the guest's
/// page tables for the access at linear `lin` that `how` describes and
/// enters the translation, as the interpreter would before making the
/// access. Returns 1 when the lookup, made again, will find the entry and
/// pass its permission test: then the code goes on without leaving the
/// chain, where a miss cost a chain's exit, the interpreter's run of the
/// rest of the block and the block loop's next entry (in 1000 fork+exec
/// of `/bin/true` in the default guest, the interpreter finished 1.5M
/// chains before and 67k after, and the loop ran in 0.91 of the time,
/// median of four runs side by side). Returns
/// 0 (the code leaves, the interpreter runs the instruction) where it
/// would not: the access crosses a page, is misaligned where it must not
/// be, faults, is MMIO, or its walk's accessed-bit update wrote a page
/// holding code (the block loop must see that at once). Nothing is walked
/// where the interpreter would fault before the access.
extern "C" fn refill(frame: *mut Frame, lin: u64, how: u64) -> u64 {
    // SAFETY: `frame` is the frame `run_block` entered the chain with,
    // live for the chain's whole run, and its `core` is the vCPU
    // `run_block` was given: `run_block` does not touch that `Core`
    // while the chain runs, and the chain's code holds nothing derived
    // from it across this call but the frame's pointers, which name the
    // same fields as before it (the TLB does not move; the code reads the
    // entry again after the call).
    let c = unsafe { &mut *(*frame).core };
    let size = how & 0xff;
    let write = how & REFILL_WRITE as u64 != 0;
    let user = how & REFILL_USER as u64 != 0;
    if how & REFILL_ALIGNED as u64 != 0 && lin & 15 != 0 {
        return 0;
    }
    let walk_write = write && how & REFILL_MAYBE_WRITE as u64 == 0;
    u64::from(c.refill_for_native(lin, size, write, walk_write, user))
}

/// What a chain's [`chain::ExitRecord`] holds once a block ran to its end
/// (any other value: how many instructions of the block it stopped in
/// were done).
const BLOCK_DONE: u64 = u64::MAX;

const _: () = assert!(std::mem::size_of::<TlbEntry>() == 64);
const _: () = assert!(TLB_ENTRIES.is_power_of_two());

/// Where in a [`TlbEntry`] the tag of an access is (see `TlbEntry::tags`).
fn tag_offset(user: bool, write: bool) -> i32 {
    offset(std::mem::offset_of!(TlbEntry, tags)) + 16 * i32::from(user) + 8 * i32::from(write)
}

fn offset(n: usize) -> i32 {
    // Offsets within `Frame` and `TlbEntry` (asserted small above).
    n as i32
}

/// Host registers a run's memory accesses work in, chosen among those
/// its instructions do not touch.
#[derive(Debug, Clone, Copy)]
struct Scratch {
    /// The access's host address (its linear address and page offset on
    /// the way). Preferably RAX..RDI: a guest instruction naming AH..DH
    /// cannot take the REX prefix R8..R15 would need.
    addr: u8,
    /// The TLB entry's address.
    entry: u8,
    /// The element count of a REP STOS or MOVS round.
    count: Option<u8>,
    /// The guest's RSP, for the instructions naming it (as an operand or
    /// a base) and PUSH and POP; stored back at the end.
    rsp: Option<u8>,
    /// The FS and GS bases, for operands using them.
    seg_base: [Option<u8>; 2],
    /// One more, for a block's indirect successor (see [`chain`]).
    temp: Option<u8>,
}

impl Scratch {
    fn plan(
        regs: u16,
        mems: &[MemOperand],
        needs_rsp: bool,
        needs_count: bool,
        needs_temp: bool,
    ) -> Option<Scratch> {
        let mut free = (0..16u8).filter(|n| *n != RSP && regs & (1 << n) == 0);
        let mut take = |wanted: bool| -> Option<Option<u8>> {
            if wanted {
                free.next().map(Some)
            } else {
                Some(None)
            }
        };
        let addr = take(true)??;
        let entry = take(true)??;
        let count = take(needs_count)?;
        let rsp = take(needs_rsp)?;
        let uses_seg = |s: usize| mems.iter().any(|m| m.seg == Some(s as u8));
        let fs = take(uses_seg(crate::state::seg::FS))?;
        let gs = take(uses_seg(crate::state::seg::GS))?;
        let temp = take(needs_temp)?;
        Some(Scratch {
            addr,
            entry,
            count,
            rsp,
            seg_base: [fs, gs],
            temp,
        })
    }

    /// Every register it takes.
    fn registers(&self) -> Vec<u8> {
        [Some(self.addr), Some(self.entry), self.count, self.rsp]
            .into_iter()
            .chain(self.seg_base)
            .chain([self.temp])
            .flatten()
            .collect()
    }

    fn seg_base_of(&self, seg: u8) -> Option<u8> {
        if usize::from(seg) == crate::state::seg::FS {
            self.seg_base[0]
        } else {
            self.seg_base[1]
        }
    }
}

/// The callee-saved registers a stub saves and restores: RBX, RBP,
/// R12-R15.
const CALLEE_SAVED: [u8; 6] = [3, 5, 12, 13, 14, 15];

/// Where a stub keeps its frame pointers on the host stack, above any
/// saved flags: `[rsp + d]` the TLB, `[rsp + d + 8]` the `Frame`.
const STACK_TLB: i32 = 0;
const STACK_FRAME: i32 = 8;
// A chain's TLB slot is where `lookup` finds it in a stub.
const _: () = assert!(chain::slot::TLB == STACK_TLB);

/// Builds a run's stub, or `None` where its memory accesses lack scratch
/// registers or one cannot be re-encoded. `user`: the privilege whose
/// TLB permissions its accesses check.
///
/// The stub loads the registers the run touches and (where they matter)
/// the guest's status flags into the host's, runs the instructions, and
/// stores registers and flags back. Each memory access first looks its
/// page up in the TLB: tag and permission of the entry its last byte
/// maps to (so an access crossing a page misses), a RAM page, and for a
/// write a page holding no decoded code. A miss leaves through the common
/// tail with the number of instructions done, the guest's state exact as
/// before the access; the interpreter carries on from there.
///
/// The lookup changes the host's flags, so the guest's are pushed before
/// it and kept on the host stack until an instruction needs them (popped
/// back) or overwrites them all (dropped).
fn stub(
    run: &[Item],
    user: bool,
    info: &mut iced_x86::InstructionInfoFactory,
    encoder: &mut iced_x86::Encoder,
) -> Option<Vec<u8>> {
    let (fp, scratch) = layout(run, None, info)?;
    let used = |n: &u8| fp.regs & (1 << n) != 0;
    let mut a = Asm::default();
    for r in CALLEE_SAVED {
        a.push(r);
    }
    a.push(RDI);
    a.push_mem(Addr::at(RDI, offset(std::mem::offset_of!(Frame, tlb))));
    if fp.flags_in {
        // The host's flags with the guest's status bits.
        a.pushfq();
        a.load(
            RAX,
            Addr::at(RDI, offset(std::mem::offset_of!(Frame, rflags))),
        );
        a.load(RAX, Addr::at(RAX, 0));
        a.and64(RAX, STATUS as i32);
        a.and_mem(Addr::at(RSP, 0), !STATUS as i32);
        a.or_mem(Addr::at(RSP, 0), RAX);
        a.popfq();
    }
    a.load(RDI, Addr::at(RDI, offset(std::mem::offset_of!(Frame, gpr))));
    // Guest registers from [rdi + 8n]: RSP never, RDI last.
    for n in (0..16u8).filter(|n| *n != RSP && *n != RDI).filter(used) {
        a.load(n, Addr::at(RDI, 8 * i32::from(n)));
    }
    if used(&RDI) {
        a.load(RDI, Addr::at(RDI, 8 * i32::from(RDI)));
    }
    // The values scratch registers hold for the whole run, each loaded
    // through the frame pointer on the stack into the register itself
    // (which may be RDI).
    if let Some(s) = &scratch {
        let from_frame = |a: &mut Asm, r: u8, field: usize| {
            a.load(r, Addr::at(RSP, STACK_FRAME));
            a.load(r, Addr::at(r, offset(field)));
        };
        if let Some(r) = s.rsp {
            from_frame(&mut a, r, std::mem::offset_of!(Frame, gpr));
            a.load(r, Addr::at(r, 8 * i32::from(RSP)));
        }
        if let Some(r) = s.seg_base[0] {
            from_frame(&mut a, r, std::mem::offset_of!(Frame, fs_base));
        }
        if let Some(r) = s.seg_base[1] {
            from_frame(&mut a, r, std::mem::offset_of!(Frame, gs_base));
        }
    }

    // Whether the guest's flags are saved on the host stack (and the
    // host's flags are not theirs).
    let mut saved = false;
    // A run that neither reads nor changes the flags leaves them to its
    // lookups.
    let track = fp.flags_in || fp.flags_out;
    let mut misses = Vec::new();
    for (k, item) in run.iter().enumerate() {
        let f = FlagUse::of(item.instr());
        match item {
            Item::Copy(_, bytes) => {
                if saved && f.needs_guest_flags() {
                    a.popfq();
                    saved = false;
                }
                a.bytes(bytes);
            }
            Item::Renamed(i) => {
                if saved && f.needs_guest_flags() {
                    a.popfq();
                    saved = false;
                }
                a.bytes(&rewritten(i, None, scratch.and_then(|s| s.rsp), encoder)?);
            }
            // A move keeps the flags.
            Item::Constant(_, r, value) => a.mov_imm64(*r, *value),
            // Only in a block's code.
            Item::Divide(..) | Item::Fill(..) | Item::Move(..) | Item::Control(..) => return None,
            Item::Memory(i, mem) => {
                let s = scratch.as_ref()?;
                if !saved && track {
                    a.pushfq();
                    saved = true;
                }
                let depth = if saved { 8 } else { 0 };
                misses.push((lookup(&mut a, mem, s, user, depth)?, k, saved));
                if saved && f.needs_guest_flags() {
                    a.popfq();
                    saved = false;
                }
                match i.mnemonic() {
                    Mnemonic::Push | Mnemonic::Pop => stack_access(&mut a, i, s)?,
                    _ => a.bytes(&rewritten(i, Some(s.addr), s.rsp, encoder)?),
                }
            }
        }
        if saved && f.writes == ALL_FLAGS {
            a.lea(RSP, Addr::at(RSP, 8));
            saved = false;
        }
    }
    if saved {
        a.popfq();
    }
    let rsp = scratch.and_then(|s| s.rsp);
    a.push_imm(run.len() as i32);
    // The tail: stores the guest's state back and returns the count of
    // instructions done from the top of the stack.
    let tail = a.len();
    store_back(&mut a, &used, rsp, fp.flags_out);
    a.pop(RAX);
    a.add_rsp(16);
    for r in CALLEE_SAVED.iter().rev() {
        a.pop(*r);
    }
    a.ret();
    // The misses, out of line: each puts the guest's flags back where they
    // were saved, pushes its instruction's index and jumps to the tail.
    for (fixups, k, saved) in misses {
        let at = a.len();
        if saved {
            a.popfq();
        }
        a.push_imm(k as i32);
        let back = a.jmp();
        a.patch(back, tail);
        for f in fixups {
            a.patch(f, at);
        }
    }
    Some(a.code)
}

/// What a stub loads and stores, and the scratch registers its memory
/// accesses (or, for a block's code with its ending `next`, its end)
/// work in: `None` where the host has too few registers left.
fn layout(
    run: &[Item],
    next: Option<Next>,
    info: &mut iced_x86::InstructionInfoFactory,
) -> Option<(Footprint, Option<Scratch>)> {
    let branch_reads = match next {
        Some(Next::Branch { reads, .. }) => reads,
        _ => 0,
    };
    let mut fp = footprint(run, branch_reads, info);
    if let Some(Next::Register(r)) = next {
        // An indirect JMP's target register: loaded like any other.
        fp.regs |= 1 << r;
    }
    let mems: Vec<MemOperand> = run
        .iter()
        .filter_map(|item| match item {
            Item::Memory(_, m) | Item::Divide(_, Some(m)) => Some(*m),
            Item::Fill(..) => Some(string_start(RDI, true)),
            Item::Move(..) => Some(string_start(RDI, true)),
            Item::Copy(..)
            | Item::Renamed(_)
            | Item::Constant(..)
            | Item::Divide(_, None)
            | Item::Control(..) => None,
        })
        .collect();
    let needs_rsp = run.iter().any(Item::names_rsp);
    let scratch = if mems.is_empty() && !needs_rsp && next.is_none() {
        None
    } else {
        let temp = matches!(next, Some(Next::Popped | Next::Called))
            || run.iter().any(|item| matches!(item, Item::Move(..)));
        let count = run
            .iter()
            .any(|item| matches!(item, Item::Fill(..) | Item::Move(..)));
        Some(Scratch::plan(fp.regs, &mems, needs_rsp, count, temp)?)
    };
    Some((fp, scratch))
}

/// Stores the registers of `used` (the guest's RSP from `rsp`, where a
/// scratch register holds it) and, with `flags`, the status flags back
/// to the frame. On entry the stack holds one word above the frame
/// pointers, which stays, and the guest's flags are in the host's.
fn store_back(a: &mut Asm, used: &dyn Fn(&u8) -> bool, rsp: Option<u8>, flags: bool) {
    a.pushfq();
    a.push(RDI);
    a.load(RDI, Addr::at(RSP, 24 + STACK_FRAME));
    a.load(RDI, Addr::at(RDI, offset(std::mem::offset_of!(Frame, gpr))));
    for n in (0..16u8).filter(|n| *n != RSP && *n != RDI).filter(used) {
        a.store(Addr::at(RDI, 8 * i32::from(n)), n);
    }
    // The guest's RSP, from its scratch register (or, when that is RDI,
    // from where RDI was pushed).
    if let Some(r) = rsp.filter(|r| *r != RDI) {
        a.store(Addr::at(RDI, 8 * i32::from(RSP)), r);
    }
    a.pop(RAX);
    if used(&RDI) {
        a.store(Addr::at(RDI, 8 * i32::from(RDI)), RAX);
    } else if rsp == Some(RDI) {
        a.store(Addr::at(RDI, 8 * i32::from(RSP)), RAX);
    }
    a.pop(RAX);
    if flags {
        a.load(RSI, Addr::at(RSP, 8 + STACK_FRAME));
        a.load(
            RSI,
            Addr::at(RSI, offset(std::mem::offset_of!(Frame, rflags))),
        );
        a.load(RCX, Addr::at(RSI, 0));
        a.and64(RCX, !STATUS as i32);
        a.and64(RAX, STATUS as i32);
        a.or(RCX, RAX);
        a.store(Addr::at(RSI, 0), RCX);
    }
}

/// TZCNT and LZCNT as the guest runs them: the vCPU does not offer BMI1
/// or LZCNT, so (as on a processor without them) they are BSF and BSR
/// with an ignored REP prefix, which the interpreter runs too.
fn bit_scan(i: &Instruction) -> Option<Instruction> {
    use iced_x86::Code as C;
    let code = match i.code() {
        C::Tzcnt_r16_rm16 => C::Bsf_r16_rm16,
        C::Tzcnt_r32_rm32 => C::Bsf_r32_rm32,
        C::Tzcnt_r64_rm64 => C::Bsf_r64_rm64,
        C::Lzcnt_r16_rm16 => C::Bsr_r16_rm16,
        C::Lzcnt_r32_rm32 => C::Bsr_r32_rm32,
        C::Lzcnt_r64_rm64 => C::Bsr_r64_rm64,
        _ => return None,
    };
    let mut r = *i;
    r.set_code(code);
    r.set_has_repe_prefix(false);
    r.set_has_rep_prefix(false);
    Some(r)
}

/// `i` with its memory operand replaced by `[addr]` (when given) and RSP
/// wherever it names it replaced by `rsp`, or `None` where iced cannot
/// encode that (a `moffs` form, AH..DH beside a REX prefix) or RSP has no
/// register: the encoding is decoded again and checked to be that
/// instruction.
fn rewritten(
    i: &Instruction,
    addr: Option<u8>,
    rsp: Option<u8>,
    encoder: &mut iced_x86::Encoder,
) -> Option<Vec<u8>> {
    let reg = |n: u8| Register::RAX + u32::from(n);
    let mut r = bit_scan(i).unwrap_or(*i);
    if let Some(addr) = addr {
        r.set_memory_base(reg(addr));
        r.set_memory_index(Register::None);
        r.set_memory_index_scale(1);
        r.set_memory_displacement64(0);
        r.set_memory_displ_size(0);
        r.set_segment_prefix(Register::None);
    } else if r.memory_base() == Register::RSP {
        r.set_memory_base(reg(rsp?));
    }
    for n in 0..r.op_count() {
        if r.op_kind(n) == OpKind::Register && r.op_register(n) == Register::RSP {
            r.set_op_register(n, reg(rsp?));
        }
    }
    encoder.encode(&r, 0).ok()?;
    let bytes = encoder.take_buffer();
    let back = iced_x86::Decoder::with_ip(64, &bytes, 0, iced_x86::DecoderOptions::NONE).decode();
    let memory = (0..r.op_count()).any(|n| r.op_kind(n) == OpKind::Memory);
    let same = back.len() == bytes.len()
        && back.code() == r.code()
        && (!memory
            || (back.memory_base() == r.memory_base()
                && back.memory_index() == r.memory_index()
                && back.memory_displacement64() == r.memory_displacement64()
                && back.segment_prefix() == Register::None))
        && (0..r.op_count()).all(|n| {
            back.op_kind(n) == r.op_kind(n)
                && (r.op_kind(n) != OpKind::Register || back.op_register(n) == r.op_register(n))
                && (!super::forms::is_immediate(r.op_kind(n))
                    || back.immediate(n) == r.immediate(n))
        });
    same.then_some(bytes)
}

/// PUSH or POP through the host address in `s.addr` (the lookup checked
/// the 8 bytes at RSP - 8 or RSP), then RSP moves.
fn stack_access(a: &mut Asm, i: &Instruction, s: &Scratch) -> Option<()> {
    let rsp = s.rsp?;
    let at = Addr::at(s.addr, 0);
    let reg = |r: Register| (r as u32 - Register::RAX as u32) as u8;
    match i.code() {
        iced_x86::Code::Push_r64 => a.store(at, reg(i.op0_register())),
        iced_x86::Code::Pushq_imm8 | iced_x86::Code::Pushq_imm32 => {
            a.store_imm(at, i.immediate(0) as i64 as i32)
        }
        iced_x86::Code::Pop_r64 => a.load(reg(i.op0_register()), at),
        // The return address; a RET's target stays in `s.entry` (see
        // `Ending`).
        iced_x86::Code::Call_rel32_64 | iced_x86::Code::Call_rm64 => {
            a.mov_imm64(s.entry, i.next_ip());
            a.store(at, s.entry);
        }
        iced_x86::Code::Retnq => a.load(s.entry, at),
        _ => return None,
    }
    let step = if matches!(i.mnemonic(), Mnemonic::Push | Mnemonic::Call) {
        -8
    } else {
        8
    };
    a.lea(rsp, Addr::at(rsp, step));
    Some(())
}

/// `dst` = the linear address of `mem` plus `extra` (`None` for an
/// operand based on RSP, FS or GS without the register holding it, never
/// planned so).
fn address(a: &mut Asm, dst: u8, mem: &MemOperand, s: &Scratch, extra: u64) -> Option<()> {
    let disp = mem.disp.wrapping_add(extra);
    let base = match mem.base {
        Some(RSP) => Some(s.rsp?),
        other => other,
    };
    if base.is_none() && mem.index.is_none() {
        a.mov_imm64(dst, disp);
    } else {
        a.lea(
            dst,
            Addr {
                base,
                index: mem.index,
                // Checked to fit by `memory_operand`.
                disp: disp as i64 as i32,
            },
        );
    }
    if let Some(seg) = mem.seg {
        let seg = s.seg_base_of(seg)?;
        a.lea(
            dst,
            Addr {
                base: Some(dst),
                index: Some((seg, 0)),
                disp: 0,
            },
        );
    }
    Some(())
}

/// The inline TLB lookup of one access, which changes the host's flags
/// (the guest's, where they matter, saved in the word of the `saved`
/// bytes above the frame pointers): leaves the host address in `s.addr`;
/// returns the jumps taken on a miss, or `None` for a write without its
/// page register (never planned so).
fn lookup(
    a: &mut Asm,
    mem: &MemOperand,
    s: &Scratch,
    user: bool,
    saved: i32,
) -> Option<Vec<Fixup>> {
    let (mut misses, others) = lookup_parts(a, mem, s, user, saved)?;
    misses.extend(others);
    Some(misses)
}

/// [`lookup`], its jumps taken on a miss in two parts: those taken where
/// the TLB has no entry for the page, or one that does not allow the
/// access (where [`refill`] may enter one), with the access's linear
/// address XOR the entry's tag for it (see [`tag_offset`]) in `s.addr`
/// and the entry's address in `s.entry`; and the rest (a misaligned
/// operand).
fn lookup_parts(
    a: &mut Asm,
    mem: &MemOperand,
    s: &Scratch,
    user: bool,
    saved: i32,
) -> Option<(Vec<Fixup>, Vec<Fixup>)> {
    let (addr, entry) = (s.addr, s.entry);
    // The entry of the last byte's page ...
    address(a, addr, mem, s, 0)?;
    a.lea(entry, Addr::at(addr, i32::from(mem.size) - 1));
    const ENTRY_SHIFT: u32 = std::mem::size_of::<TlbEntry>().trailing_zeros();
    a.shr(entry, (PAGE_SHIFT - ENTRY_SHIFT) as u8);
    a.and32(entry, ((TLB_ENTRIES as u32) - 1) << ENTRY_SHIFT);
    a.add_load(entry, Addr::at(RSP, saved + STACK_TLB));
    // ... must hold the first byte's page (an access that crosses a page
    // finds the next page's slot, which cannot) as the tag of an access
    // it allows: RAM (MMIO pages allow nothing here) the guest's page
    // tables allow, and for a write a page holding no decoded code (see
    // `TlbEntry::native`: the interpreter writes it and drops the blocks
    // decoded from it). The first byte's address XOR the tag is then its
    // offset in the page.
    a.mem(
        true,
        &[0x33],
        addr,
        Addr::at(entry, tag_offset(user, mem.write)),
    );
    a.test_imm(addr, !(PAGE_MASK as i32));
    let misses = vec![a.jcc(CC_NE)];
    a.add_load(
        addr,
        Addr::at(entry, offset(std::mem::offset_of!(TlbEntry, host))),
    );
    let mut others = Vec::new();
    if mem.aligned {
        // The host page is page-aligned: the host address is as aligned as
        // the guest's; the interpreter raises the #GP.
        a.test_imm(addr, 15);
        others.push(a.jcc(CC_NE));
    }
    Some((misses, others))
}

/// Runs the stub whose address is in `op.imm` (see [`compile_runs`] for
/// the other fields).
pub(super) fn run(c: &mut super::Core, op: &Op) -> super::OpResult {
    let count = usize::from(op.regs[0]);
    let subs: &[Op] = if op.ea.disp == 0 {
        &[]
    } else {
        // SAFETY: `compile_runs` pointed `ea.disp` at `count` ops of the
        // block's `native_subs`, which lives as long as the block holding
        // `op` and is never changed after decoding.
        unsafe { std::slice::from_raw_parts(op.ea.disp as *const Op, count) }
    };
    if op.regs[1] & RUN_MEMORY != 0 && (op.regs[1] & RUN_USER != 0) != c.user() {
        // Its accesses check the other privilege's permissions.
        return interpret(c, subs);
    }
    c.native_runs += 1;
    c.sync_code_marks();
    let mut frame = Frame {
        gpr: c.cpu.gpr.as_mut_ptr(),
        rflags: &mut c.cpu.rflags,
        tlb: c.mmu.entries.as_ptr(),
        fs_base: c.cpu.segs[crate::state::seg::FS].base,
        gs_base: c.cpu.segs[crate::state::seg::GS].base,
        local_stamp: 0,
        global_stamp: 0,
        // A run does not chain, nor run SSE instructions.
        xmm: std::ptr::null_mut(),
        xmm_state: 2,
        mxcsr: 0,
        mxcsr_state: 2,
        df: 0,
        fcw: u64::MAX,
        rip: 0,
        left: 0,
        stamp: 0,
        jumps: std::ptr::null(),
        core: std::ptr::null_mut(),
        refill: None,
        requests: std::ptr::null(),
    };
    // SAFETY: `op.imm` was set by `compile_runs` to a stub in this vCPU's
    // arena, which lives as long as the `Core` (blocks are per vCPU). The
    // stub follows the C calling convention, touches the 16 registers and
    // the flags word of `frame`, reads the TLB, and reads and writes guest
    // RAM only at host addresses of TLB entries that allow the access
    // (valid while the entry is, see `TlbEntry::host`), within one page.
    let done = unsafe {
        let f: extern "C" fn(*mut Frame) -> u64 = std::mem::transmute(op.imm as usize);
        f(&mut frame)
    } as usize;
    c.sync_code_marks();
    match subs.get(done..) {
        Some(rest) if !rest.is_empty() => {
            c.native_exits += 1;
            interpret(c, rest)
        }
        _ => Ok(()),
    }
}

/// The instructions a run did not execute, by the interpreter, as the
/// block loop would: a fault reports the instruction's own address, and
/// an MMIO write or a write to code ends the block after it.
fn interpret(c: &mut super::Core, ops: &[Op]) -> super::OpResult {
    for op in ops {
        c.cpu.rip = op.next_ip;
        if let Err(s) = (op.handler)(c, op) {
            c.stop_ip = Some(op.instr.ip());
            return Err(s);
        }
        if c.attention {
            return Ok(());
        }
    }
    Ok(())
}

/// `Op::regs[1]` of a run: it touches memory, with user permissions.
const RUN_MEMORY: u8 = 1;
const RUN_USER: u8 = 2;

/// For whom a block's runs are compiled.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The privilege the block was decoded at (its accesses check the
    /// TLB's user or supervisor permissions).
    pub user: bool,
    /// The CPL it was decoded at, which its code is run at (see
    /// `Block::native_cpl`).
    pub cpl: u8,
    /// Whether runs may include memory accesses.
    pub memory: bool,
}

/// How one instruction may run natively.
#[derive(Clone, Copy)]
enum Form {
    Register,
    /// Register-only, naming RSP (needs the scratch register holding it).
    Renamed,
    Memory(MemOperand),
    /// LEA of a RIP-relative address: register `.0` gets `.1`.
    Constant(u8, u64),
    /// DIV of a 32- or 64-bit register or memory operand (see
    /// [`division`]).
    Divide(Option<MemOperand>),
    /// REP STOS of elements of `.0` bytes (see [`string_store`]).
    Fill(u8),
    /// REP MOVS of elements of `.0` bytes (see [`string_store`]).
    Move(u8),
    /// See [`Control`].
    Control(Control),
}

/// How a block's code may run `op` if it is an SSE or SSE2 instruction
/// that computes with integers or moves data (never one that depends on
/// MXCSR: no floating-point arithmetic): legacy-encoded, with XMM
/// registers, general-purpose registers other than RSP, immediates and
/// (with `memory`) one memory operand, and one the interpreter runs too.
/// A block's code loads the guest's XMM registers into the host's before
/// the first of them (see [`chain`]).
fn vector_form(op: &Op, memory: bool, info: &mut iced_x86::InstructionInfoFactory) -> Option<Form> {
    use iced_x86::OpAccess;
    let i = &op.instr;
    if op.bitness != 64 {
        return None;
    }
    match vector_memory_operands(i)? {
        0 => Some(Form::Register),
        1 if memory => {
            let size = i.memory_size().size();
            if !matches!(size, 2 | 4 | 8 | 16) {
                return None;
            }
            let [access] = info.info(i).used_memory() else {
                return None;
            };
            let write = !matches!(access.access(), OpAccess::Read | OpAccess::CondRead);
            let mut m = effective(op, size as u8, write)?;
            m.aligned = size == 16 && !super::sse::unaligned_ok(i);
            Some(Form::Memory(m))
        }
        _ => None,
    }
}

/// How many memory operands `i` has if it is an SSE or SSE2 instruction a
/// block's code may run (see [`vector_form`]): legacy-encoded, one the
/// interpreter runs as SSE or SSE2, other than those that touch MXCSR or
/// the x87 state themselves, flush caches, prefetch, or store through an
/// implicit RDI, its operands XMM registers, general-purpose registers
/// other than RSP, immediates and memory.
fn vector_memory_operands(i: &Instruction) -> Option<u32> {
    use iced_x86::{Code, EncodingKind};
    use Mnemonic as M;
    let listed = super::sse::handler(i).is_some()
        && !matches!(
            i.mnemonic(),
            M::Emms
                | M::Movntq
                | M::Ldmxcsr
                | M::Stmxcsr
                | M::Clflush
                | M::Prefetchnta
                | M::Prefetcht0
                | M::Prefetcht1
                | M::Prefetcht2
                | M::Maskmovdqu
        )
        && !matches!(i.code(), Code::Movsd_m32_m32 | Code::Cmpsd_m32_m32);
    if !listed || i.encoding() != EncodingKind::Legacy || i.has_lock_prefix() {
        return None;
    }
    let mut memory_operands = 0;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if !(usable(r) || r.is_xmm() && r.number() < 16) {
                    return None;
                }
            }
            OpKind::Memory => memory_operands += 1,
            k if super::forms::is_immediate(k) => {}
            _ => return None,
        }
    }
    Some(memory_operands)
}

/// Whether `i` is an SSE or SSE2 floating-point instruction that a block's
/// code may run (see [`vector_form`]) with the guest's MXCSR loaded into
/// the host's, where it masks every exception.
fn uses_mxcsr(i: &Instruction) -> bool {
    super::sse::is_float(i) && i.code() != iced_x86::Code::Cmpsd_m32_m32
}

/// Whether `i` names an XMM register (its code must have the guest's
/// XMM registers loaded).
fn names_xmm(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_xmm())
}

/// The element size of `op` if it is a REP STOS or (`true`) REP MOVS a
/// block's code may run: 64-bit addressing, no segment override (ES is
/// flat in 64-bit mode, and a MOVS source in DS too). Its code runs it
/// natively, a page at a time, where DF is clear, no element straddles
/// two pages and it moves at most 64 KiB, and otherwise leaves it to the
/// interpreter (see `chain::block_code`).
fn string_store(op: &Op) -> Option<(u8, bool)> {
    use iced_x86::Code;
    let i = &op.instr;
    if op.bitness != 64
        || op.asize != 8
        || !i.has_rep_prefix()
        || i.segment_prefix() != Register::None
    {
        return None;
    }
    match i.code() {
        Code::Stosb_m8_AL => Some((1, false)),
        Code::Stosw_m16_AX => Some((2, false)),
        Code::Stosd_m32_EAX => Some((4, false)),
        Code::Stosq_m64_RAX => Some((8, false)),
        Code::Movsb_m8_m8 => Some((1, true)),
        Code::Movsw_m16_m16 => Some((2, true)),
        Code::Movsd_m32_m32 => Some((4, true)),
        Code::Movsq_m64_m64 => Some((8, true)),
        _ => None,
    }
}

/// The access a string instruction's code looks up for one of its ranges:
/// the byte at `base` (RSI or RDI).
fn string_start(base: u8, write: bool) -> MemOperand {
    MemOperand {
        base: Some(base),
        index: None,
        disp: 0,
        seg: None,
        size: 1,
        write,
        aligned: false,
    }
}

/// Whether `op` is a DIV a block's code may run, checking first that it
/// cannot fault (a zero divisor or a quotient too large): DIV of a 32- or
/// 64-bit register, or with `memory` of such a memory operand (`Some`).
fn division(op: &Op, memory: bool) -> Option<Option<MemOperand>> {
    use iced_x86::Code;
    let i = &op.instr;
    if op.bitness != 64 || !matches!(i.code(), Code::Div_rm32 | Code::Div_rm64) {
        return None;
    }
    match i.op0_kind() {
        OpKind::Register if usable(i.op0_register()) => Some(None),
        OpKind::Memory if memory => {
            let size = if i.code() == Code::Div_rm64 { 8 } else { 4 };
            effective(op, size, false).map(Some)
        }
        _ => None,
    }
}

/// How `op` may run natively, if it may (with `memory`, forms that
/// access memory or name RSP too).
fn form(op: &Op, memory: bool, info: &mut iced_x86::InstructionInfoFactory) -> Option<Form> {
    let bitness = u32::from(op.bitness);
    if eligible(&op.instr, bitness) {
        Some(Form::Register)
    } else if memory && bit_scan(&op.instr).is_some() {
        // TZCNT and LZCNT as BSF and BSR (see `bit_scan`).
        let bsf = bit_scan(&op.instr)?;
        eligible(&bsf, bitness).then_some(Form::Renamed)
    } else if memory && eligible_with(&op.instr, bitness, true) {
        Some(Form::Renamed)
    } else if memory {
        memory_operand(op, info).map(Form::Memory)
    } else {
        None
    }
}

/// The memory accesses of a block's last instruction, run as items of its
/// code: CALL's push of the return address (after the load of its target
/// for a CALL through memory), RET's pop of its target, an indirect JMP's
/// load of its target.
fn ending_access(op: &Op) -> Vec<MemOperand> {
    use iced_x86::Code;
    let i = &op.instr;
    let through_memory = i.op0_kind() == OpKind::Memory;
    match i.code() {
        // Its target first: a miss in the push still leaves before the
        // CALL, nothing changed.
        Code::Call_rm64 if through_memory => effective(op, 8, false)
            .map(|target| vec![target, stack(-8, true)])
            .unwrap_or_default(),
        Code::Call_rel32_64 | Code::Call_rm64 => vec![stack(-8, true)],
        Code::Retnq => vec![stack(0, false)],
        Code::Jmp_rm64 if through_memory => effective(op, 8, false).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// An 8-byte access at RSP + `disp` (PUSH, POP, CALL, RET).
fn stack(disp: i64, write: bool) -> MemOperand {
    MemOperand {
        base: Some(RSP),
        index: None,
        disp: disp as u64,
        seg: None,
        size: 8,
        write,
        aligned: false,
    }
}

/// Where a block whose last instruction is `op` goes next, when its code
/// can take it there: a near Jcc or JMP with a relative target, JMP
/// through a register, and with `memory` (the stack or memory accessed
/// natively) CALL with a relative target or a register, RET and JMP
/// through memory.
fn ending(op: &Op, memory: bool) -> Option<Next> {
    use iced_x86::Code;
    let i = &op.instr;
    if op.bitness != 64 {
        return None;
    }
    if i.is_jcc_short_or_near() {
        return Some(Next::Branch {
            cc: (i.condition_code() as u8).checked_sub(1)?,
            reads: i.rflags_read() & ALL_FLAGS,
            taken: i.near_branch_target(),
            not_taken: i.next_ip(),
        });
    }
    if i.is_jmp_short_or_near() {
        return Some(Next::To(i.near_branch_target()));
    }
    let register = || {
        let r = i.op0_register();
        (i.op0_kind() == OpKind::Register && r.is_gpr64() && usable(r))
            .then(|| (r as u32 - Register::RAX as u32) as u8)
    };
    match i.code() {
        Code::Jmp_rm64 if i.op0_kind() == OpKind::Register => Some(Next::Register(register()?)),
        Code::Jmp_rm64 if memory && !ending_access(op).is_empty() => Some(Next::Popped),
        Code::Call_rm64 if memory && ending_access(op).len() == 2 => Some(Next::Called),
        Code::Call_rel32_64 if memory => Some(Next::To(i.near_branch_target())),
        Code::Call_rm64 if memory => Some(Next::Register(register()?)),
        Code::Retnq if memory => Some(Next::Popped),
        _ => None,
    }
}

/// How `op` may be an instruction of a block's code (with `block`, else a
/// run's): as a native run's (see [`form`]), LEA of a RIP-relative
/// address, which is a constant, or in a block, DIV.
fn item_form(
    op: &Op,
    memory: bool,
    block: bool,
    cpl0: bool,
    info: &mut iced_x86::InstructionInfoFactory,
) -> Option<Form> {
    if block {
        if let Some(c) = control(op, cpl0) {
            return Some(Form::Control(c));
        }
        if let Some(divisor) = division(op, memory) {
            return Some(Form::Divide(divisor));
        }
        if let Some(form) = vector_form(op, memory, info) {
            return Some(form);
        }
        if let Some((size, moves)) = string_store(op).filter(|_| memory) {
            return Some(if moves {
                Form::Move(size)
            } else {
                Form::Fill(size)
            });
        }
        // FNSTCW stores the guest's FCW (from the chain's slot).
        if memory && op.instr.code() == iced_x86::Code::Fnstcw_m2byte {
            return effective(op, 2, true).map(Form::Memory);
        }
    }
    use iced_x86::Code;
    let i = &op.instr;
    let lea = matches!(i.code(), Code::Lea_r64_m | Code::Lea_r32_m);
    if lea && i.memory_base() == Register::RIP && op.bitness == 64 {
        let r = i.op0_register().full_register();
        let address = i.memory_displacement64();
        let value = if i.code() == Code::Lea_r32_m {
            address & 0xffff_ffff
        } else {
            address
        };
        return usable(r).then(|| Form::Constant((r as u32 - Register::RAX as u32) as u8, value));
    }
    form(op, memory, info)
}

/// How a block's code ends.
#[derive(Debug, Clone, Copy)]
struct Ending {
    next: Next,
    /// Instructions in the block.
    count: usize,
    /// The privilege its accesses check.
    user: bool,
    /// The CPL it was compiled for, which the next block's code must have
    /// been compiled for too.
    cpl: u8,
    /// The page of its instructions, where they are all in one.
    page: Option<u64>,
}

/// Where a block goes next.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// A fixed RIP: a JMP's or CALL's target, or straight on.
    To(u64),
    /// A Jcc (`cc` the condition's nibble, `reads` the flags it reads).
    Branch {
        cc: u8,
        reads: u32,
        taken: u64,
        not_taken: u64,
    },
    /// A RET's or indirect JMP's target, left in the `entry` scratch
    /// register (a third, `temp`, is taken for the jump cache's lookup).
    Popped,
    /// An indirect JMP's or CALL's target, in a guest register.
    Register(u8),
    /// A CALL's target loaded from memory into the `temp` scratch
    /// register.
    Called,
}

/// Compiles the whole of block `block` to native code: its address (`None`
/// where the arena is full, or the code would need more registers than
/// the host has left), when every instruction in it may run natively
/// (register-only or through the TLB lookup) and it ends in a near Jcc,
/// JMP, CALL or RET with a relative target, or straight on. `ops` are one
/// per instruction, specialized but not fused (op `k`'s bytes are
/// `bytes[spans[k].0..spans[k].1]`); the block keeps them as they are:
/// after a miss in instruction `k`, the block loop interprets `ops[k..]`.
///
/// The code runs the block, then goes on into the next block's code (see
/// [`chain`]): a hot loop or a chain of calls and returns runs without
/// coming back to the block loop.
pub fn compile_block(
    arena: &mut Option<Arena>,
    block: *const Block,
    ops: &[Op],
    spans: &[(usize, usize)],
    bytes: &[u8],
    target: Target,
) -> Option<usize> {
    let arena = arena.as_mut()?;
    let memory = target.memory && arena.memory;
    let last = ops.last()?;
    if arena.is_full() || last.bitness != 64 || spans.len() < ops.len() {
        return None;
    }
    let mut info = iced_x86::InstructionInfoFactory::new();
    let (items, next) = block_items(ops, spans, bytes, memory, target.cpl == 0, &mut info)?;
    // Whether the block's instructions are all in its first page (see
    // `Block::within_page`).
    let first = ops[0].instr.ip();
    let one_page = first >> 12 == last.next_ip.wrapping_sub(1) >> 12;
    let ending = Ending {
        next,
        count: ops.len(),
        user: target.user,
        cpl: target.cpl,
        page: one_page.then_some(first >> 12),
    };
    let mut encoder = iced_x86::Encoder::new(64);
    let code = chain::block_code(&items, &ending, block, &mut info, &mut encoder)?;
    arena.add(&code)
}

/// The items of a block's code and where it goes next, if every
/// instruction of `ops` has a native form (see [`compile_block`]).
fn block_items<'a>(
    ops: &'a [Op],
    spans: &[(usize, usize)],
    bytes: &'a [u8],
    memory: bool,
    cpl0: bool,
    info: &mut iced_x86::InstructionInfoFactory,
) -> Option<(Vec<Item<'a>>, Next)> {
    let last = ops.last()?;
    let (body, next) = match ending(last, memory) {
        Some(next) => (&ops[..ops.len() - 1], next),
        None if last.instr.flow_control() == iced_x86::FlowControl::Next => {
            (ops, Next::To(last.instr.next_ip()))
        }
        None => return None,
    };
    let mut items = body
        .iter()
        .zip(spans)
        .map(
            |(op, (from, to))| match item_form(op, memory, true, cpl0, info)? {
                Form::Register => Some(Item::Copy(&op.instr, bytes.get(*from..*to)?)),
                Form::Renamed => Some(Item::Renamed(&op.instr)),
                Form::Memory(m) => Some(Item::Memory(&op.instr, m)),
                Form::Constant(r, v) => Some(Item::Constant(&op.instr, r, v)),
                Form::Divide(m) => Some(Item::Divide(&op.instr, m)),
                Form::Fill(size) => Some(Item::Fill(&op.instr, size)),
                Form::Move(size) => Some(Item::Move(&op.instr, size)),
                Form::Control(c) => Some(Item::Control(&op.instr, c)),
            },
        )
        .collect::<Option<Vec<Item>>>()?;
    if body.len() < ops.len() {
        for m in ending_access(last) {
            items.push(Item::Memory(&last.instr, m));
        }
    }
    Some((items, next))
}

/// Where a block decoded as `ops` should end so that as much of the code
/// as can runs as blocks' native code (see [`compile_block`]): the number
/// of ops to keep, and whether those are all of a form native code has,
/// so that the block may be compiled once it runs often.
///
/// - A block whose every instruction can run natively is kept whole.
/// - A block that starts with instructions that can ends before the first
///   that cannot, which starts the next block. Where the code would need
///   more registers than the host has left (a block naming most of the
///   sixteen), it ends sooner.
/// - A block that starts with instructions that cannot ends before the
///   first that can (which starts a block of native code), and is
///   interpreted.
///
/// Blocks in other modes, or without an arena, are kept whole.
pub fn plan_block(
    arena: &Option<Arena>,
    ops: &[Op],
    spans: &[(usize, usize)],
    bytes: &[u8],
    target: Target,
) -> (usize, bool) {
    let n = ops.len();
    let Some(arena) = arena else {
        return (n, false);
    };
    if n == 0 || ops.iter().any(|op| op.bitness != 64) {
        return (n, false);
    }
    let memory = target.memory && arena.memory;
    let cpl0 = target.cpl == 0;
    let mut info = iced_x86::InstructionInfoFactory::new();
    let body = |op: &Op, info: &mut iced_x86::InstructionInfoFactory| {
        op.instr.flow_control() == iced_x86::FlowControl::Next
            && item_form(op, memory, true, cpl0, info).is_some()
    };
    let first_bad = (0..n)
        .find(|&k| {
            let op = &ops[k];
            let last = k + 1 == n && ending(op, memory).is_some();
            !(last || body(op, &mut info))
        })
        .unwrap_or(n);
    if first_bad == 0 {
        // Interpreted: up to the first instruction that can run natively.
        let keep = (1..n).find(|&k| body(&ops[k], &mut info)).unwrap_or(n);
        return (keep, false);
    }
    let mut len = first_bad;
    while len > 0 {
        let fits = block_items(&ops[..len], spans, bytes, memory, cpl0, &mut info)
            .and_then(|(items, next)| layout(&items, Some(next), &mut info));
        if fits.is_some() {
            return (len, true);
        }
        len = len * 2 / 3;
    }
    (n, false)
}

/// MXCSR's exception mask bits.
const MXCSR_MASKS: u32 = 0x1f80;

/// Where a block's code stopped (see [`run_block`]).
pub(super) struct BlockStop {
    /// The block it stopped in.
    pub block: *const Block,
    /// `None` when that block ran to its end (RIP is its successor's),
    /// else how many of its instructions were done: the block loop
    /// interprets the rest.
    pub done: Option<usize>,
    /// Instructions of the blocks that ran to their end.
    pub ran: u64,
    /// How the block that ran to its end left.
    pub successor: Successor,
}

/// How the last block of a chain went on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Successor {
    /// It did not: a lookup missed.
    None,
    /// Through the jump at this exit record, to be linked to the next
    /// block's code with [`Arena::link`].
    Fixed(usize),
    /// Indirectly, to a RIP the jump cache had no code for.
    Indirect,
}

/// The most instructions one chain of blocks' code runs: about ten to a
/// hundred microseconds. The block loop checks interrupt requests, the
/// stop flag and code written by other vCPUs between chains.
pub const CHAIN_LIMIT: u64 = 1 << 14;

/// Runs the code of `block` (which has some, compiled for the current
/// privilege) and whatever it goes on to through jumps linked and jump
/// cache entries (`jumps`) made under `stamps` (the block loop's link
/// stamp, local link stamp and global link stamp), for at most `budget`
/// instructions (and [`CHAIN_LIMIT`]; the block that reaches it runs to
/// its end). `requests` is the vCPU's flag of pending interrupt requests
/// (null without lines), which STI's code tests.
pub(super) fn run_block(
    c: &mut super::Core,
    block: &Block,
    stamps: [u64; 3],
    jumps: *const crate::block::Jump,
    requests: *const std::sync::atomic::AtomicBool,
    budget: u64,
) -> BlockStop {
    let Some(enter) = c.native.as_ref().map(|a| a.enter) else {
        // Never so (code is compiled into an arena): the block loop
        // interprets the block.
        return BlockStop {
            block,
            done: Some(0),
            ran: 0,
            successor: Successor::None,
        };
    };
    c.native_runs += 1;
    // The code's writes rely on the TLB's write bits for pages of code.
    c.sync_code_marks();
    // At most CHAIN_LIMIT.
    let left = budget.min(CHAIN_LIMIT) as i64;
    let mut frame = Frame {
        gpr: c.cpu.gpr.as_mut_ptr(),
        rflags: &mut c.cpu.rflags,
        tlb: c.mmu.entries.as_ptr(),
        fs_base: c.cpu.segs[crate::state::seg::FS].base,
        gs_base: c.cpu.segs[crate::state::seg::GS].base,
        rip: c.cpu.rip,
        left,
        stamp: stamps[0],
        local_stamp: stamps[1],
        global_stamp: stamps[2],
        jumps,
        xmm: c.cpu.fpu.xmm.as_mut_ptr(),
        xmm_state: if super::sse::sse_check(c).is_ok() {
            0
        } else {
            2
        },
        mxcsr: u64::from(c.cpu.fpu.mxcsr),
        mxcsr_state: if c.cpu.fpu.mxcsr & MXCSR_MASKS == MXCSR_MASKS {
            0
        } else {
            2
        },
        df: u64::from(c.cpu.rflags & crate::state::rflags::DF != 0),
        fcw: if c.cpu.cr0 & (crate::state::bits::CR0_EM | crate::state::bits::CR0_TS) == 0 {
            u64::from(c.cpu.fpu.fcw)
        } else {
            u64::MAX
        },
        core: std::ptr::null_mut(),
        refill: Some(refill),
        requests,
    };
    frame.core = c;
    // SAFETY: `enter` is the arena's entry routine and `block.native` was
    // set by `compile_block` to code in the same arena, which lives as long
    // as the `Core` (blocks are per vCPU). Besides what a run's stub does
    // (see `run`), the code reads the jump cache (`jumps`, the cache's
    // table, which never moves) and the blocks its entries name, and goes
    // on into other blocks' code only through a jump linked or an entry
    // made under the caller's stamp: no block was dropped since, so its
    // code is live (the arena is reset only with every block dropped). It
    // returns a record it wrote after the code of the block it stopped in.
    let (at, record) = unsafe {
        let f: extern "C" fn(*mut Frame, usize) -> *const chain::ExitRecord =
            std::mem::transmute(enter);
        let at = f(&mut frame, block.native.get());
        (at as usize, at.read())
    };
    let ran = (left - frame.left) as u64;
    // Pages another vCPU marked while the code ran, while this TLB's
    // entries that may have let the code write them are still there.
    c.sync_code_marks();
    c.native_instructions += ran;
    c.cpu.fpu.mxcsr = frame.mxcsr as u32;
    let (done, successor) = match record.result {
        BLOCK_DONE => {
            c.cpu.rip = record.rip;
            (None, Successor::Fixed(at))
        }
        chain::DYNAMIC => {
            c.cpu.rip = frame.rip;
            (None, Successor::Indirect)
        }
        k => {
            c.native_exits += 1;
            (Some(k as usize), Successor::None)
        }
    };
    BlockStop {
        block: record.block,
        done,
        ran,
        successor,
    }
}

/// Replaces each run of at least [`MIN_RUN`] eligible instructions among
/// the first `limit` of `ops` (op `k`'s bytes are `bytes[spans[k].0..
/// spans[k].1]`, for `k < limit`) by one op running its stub, and returns
/// the ops those of them that access memory fall back to, which the
/// block must keep (see [`run`]).
///
/// A run's op holds the stub's address in `imm`, the number of
/// instructions in `regs[0]`, [`RUN_MEMORY`] and [`RUN_USER`] in
/// `regs[1]`, and in `ea.disp` the address of its first fallback op in
/// the returned vector (0 for a register-only run, which never stops).
pub fn compile_runs(
    arena: &mut Option<Arena>,
    ops: &mut Vec<Op>,
    limit: usize,
    spans: &[(usize, usize)],
    bytes: &[u8],
    target: Target,
) -> Vec<Op> {
    let Some(arena) = arena.as_mut() else {
        return Vec::new();
    };
    if arena.is_full() {
        return Vec::new();
    }
    let memory = target.memory && arena.memory;
    let mut info = iced_x86::InstructionInfoFactory::new();
    let forms: Vec<Option<Form>> = ops
        .iter()
        .enumerate()
        .map(|(k, op)| {
            (k < limit)
                .then(|| item_form(op, memory, false, false, &mut info))
                .flatten()
        })
        .collect();
    let mut encoder = iced_x86::Encoder::new(64);
    // The runs as (first op, end op, offset of the stub in `code`, whether
    // it accesses memory).
    let mut runs = Vec::new();
    let mut code = Vec::new();
    let mut k = 0;
    while k < ops.len() {
        let mut end = k;
        while end < ops.len() && forms[end].is_some() {
            end += 1;
        }
        let items = |k: usize, end: usize, with_memory: bool| -> Option<Vec<Item>> {
            (k..end)
                .map(|n| match forms[n]? {
                    Form::Register => {
                        Some(Item::Copy(&ops[n].instr, &bytes[spans[n].0..spans[n].1]))
                    }
                    Form::Renamed if with_memory => Some(Item::Renamed(&ops[n].instr)),
                    Form::Renamed => None,
                    Form::Memory(m) if with_memory => Some(Item::Memory(&ops[n].instr, m)),
                    Form::Memory(_) => None,
                    Form::Constant(r, v) => Some(Item::Constant(&ops[n].instr, r, v)),
                    Form::Divide(_) | Form::Fill(_) | Form::Move(_) | Form::Control(_) => None,
                })
                .collect()
        };
        let mut add = |k: usize, end: usize, with_memory: bool| -> bool {
            if end - k < MIN_RUN {
                return true;
            }
            let Some(stub) = items(k, end, with_memory)
                .and_then(|run| stub(&run, target.user, &mut info, &mut encoder))
            else {
                return false;
            };
            let touches = (k..end).any(|n| matches!(forms[n], Some(Form::Memory(_))));
            runs.push((k, end, code.len(), touches));
            code.extend_from_slice(&stub);
            code.resize(code.len().next_multiple_of(16), 0xcc);
            true
        };
        if end > k && !add(k, end, true) {
            // No stub with its memory accesses: the register-only runs
            // between them.
            let mut s = k;
            while s < end {
                let mut e = s;
                while e < end && matches!(forms[e], Some(Form::Register)) {
                    e += 1;
                }
                add(s, e, false);
                s = e + 1;
            }
        }
        k = end.max(k + 1);
    }
    if runs.is_empty() {
        return Vec::new();
    }
    let Some(at) = arena.add(&code) else {
        return Vec::new();
    };
    let mut subs = Vec::new();
    let mut firsts = Vec::new();
    for (first, end, _, touches) in &runs {
        firsts.push(subs.len());
        if *touches {
            subs.extend(ops[*first..*end].iter().cloned());
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    let mut next = 0;
    for ((first, end, offset, touches), sub) in runs.into_iter().zip(firsts) {
        out.extend(ops[next..first].iter().cloned());
        let mut op = ops[first].clone();
        op.handler = run;
        op.imm = (at + offset) as u64;
        op.next_ip = ops[end - 1].next_ip;
        // At most `block::MAX_OPS` instructions.
        op.regs = [(end - first) as u8, 0];
        op.ea = EaForm::default();
        if touches {
            op.regs[1] = RUN_MEMORY | if target.user { RUN_USER } else { 0 };
            // `subs` is complete: its buffer no longer moves.
            op.ea.disp = subs[sub..].as_ptr() as u64;
        }
        out.push(op);
        next = end;
    }
    out.extend(ops[next..].iter().cloned());
    *ops = out;
    subs
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    fn decoded(bytes: &[u8]) -> iced_x86::Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    /// Bytes of the arena's memory file the host holds.
    fn allocated(arena: &super::Arena) -> u64 {
        // SAFETY: a plain `stat` buffer filled by `fstat` of the arena's
        // open file.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(arena.fd, &mut st), 0);
            st
        };
        st.st_blocks as u64 * 512
    }

    #[test]
    fn code_runs_from_the_arena_and_its_pages_go_back_on_release() {
        if !cfg!(target_arch = "x86_64") {
            testkit::not_run(testkit::prereq::X86_64, "native code needs an x86-64 host");
            return;
        }
        let mut arena = super::Arena::new().expect("an arena");
        // mov eax, 42; ret, then a megabyte of int3.
        let mut code = vec![0xb8, 42, 0, 0, 0, 0xc3];
        code.resize(1 << 20, 0xcc);
        let at = arena.add(&code).expect("room");
        // SAFETY: `at` is the executable copy of the code above, which
        // returns 42 under the C calling convention.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(at) };
        assert_eq!(f(), 42);
        assert!(allocated(&arena) >= 1 << 20, "{}", allocated(&arena));
        arena.release();
        // The routines every block's code shares stay.
        assert_eq!(allocated(&arena), super::SHARED_BYTES as u64);
    }

    #[test]
    fn blocks_run_sse_data_movement_integer_and_floating_point_but_not_state_or_mmx() {
        let yes: &[(&[u8], u32)] = &[
            (&[0xf3, 0x0f, 0x6f, 0x03], 1),       // movdqu xmm0, [rbx]
            (&[0x66, 0x0f, 0xef, 0xc1], 0),       // pxor xmm0, xmm1
            (&[0x66, 0x0f, 0xd7, 0xc1], 0),       // pmovmskb eax, xmm1
            (&[0xf2, 0x0f, 0x58, 0xc1], 0),       // addsd xmm0, xmm1
            (&[0x66, 0x48, 0x0f, 0x7e, 0xc0], 0), // movq rax, xmm0
            (&[0xf2, 0x0f, 0x10, 0x43, 0x08], 1), // movsd xmm0, [rbx+8]
        ];
        let no: &[&[u8]] = &[
            &[0x0f, 0x77],                   // emms (the x87 tag word)
            &[0x0f, 0xae, 0x13],             // ldmxcsr [rbx]
            &[0x0f, 0xae, 0x1b],             // stmxcsr [rbx]
            &[0x66, 0x0f, 0xf7, 0xc1],       // maskmovdqu (stores at RDI)
            &[0x0f, 0xef, 0xc1],             // pxor mm0, mm1
            &[0x0f, 0x18, 0x0b],             // prefetcht0 [rbx]
            &[0xa5],                         // movsd (the string copy)
            &[0xc5, 0xf9, 0xef, 0xc1],       // vpxor (VEX)
            &[0x66, 0x0f, 0x38, 0x00, 0xc1], // pshufb (SSSE3)
        ];
        for (b, memory) in yes {
            assert_eq!(
                super::vector_memory_operands(&decoded(b)),
                Some(*memory),
                "{b:02x?}"
            );
        }
        for b in no {
            assert_eq!(super::vector_memory_operands(&decoded(b)), None, "{b:02x?}");
        }
        assert!(super::uses_mxcsr(&decoded(&[0xf2, 0x0f, 0x58, 0xc1])));
        assert!(!super::uses_mxcsr(&decoded(&[0x66, 0x0f, 0xef, 0xc1])));
    }

    #[test]
    fn only_register_only_instructions_run_natively() {
        let yes: &[&[u8]] = &[
            &[0x48, 0x01, 0xd8],             // add rax, rbx
            &[0x4d, 0x0f, 0xaf, 0xee],       // imul r13, r14
            &[0x48, 0x8d, 0x44, 0x98, 0x10], // lea rax, [rax + rbx*4 + 0x10]
            &[0x0f, 0x92, 0xc0],             // setb al
            &[0x88, 0xdc],                   // mov ah, bl
            &[0x48, 0x0f, 0xbc, 0xc3],       // bsf rax, rbx
        ];
        let no: &[&[u8]] = &[
            &[0x48, 0x8b, 0x03],             // mov rax, [rbx]
            &[0x48, 0x89, 0xe0],             // mov rax, rsp
            &[0x48, 0x8d, 0x05, 0, 0, 0, 0], // lea rax, [rip]
            &[0x48, 0x8d, 0x04, 0x24],       // lea rax, [rsp]
            &[0xf0, 0x48, 0x01, 0x03],       // lock add [rbx], rax
            &[0x48, 0xf7, 0xf3],             // div rbx (#DE)
            &[0x50],                         // push rax
            &[0x0f, 0x22, 0xd8],             // mov cr3, rax
            &[0xf3, 0x48, 0x0f, 0xbc, 0xc3], // tzcnt (BSF here, re-encoded)
            &[0xc4, 0xe2, 0xe3, 0xf6, 0xc1], // mulx (not offered)
            &[0x0f, 0x0b],                   // ud2
            &[0x9f],                         // lahf (#UD in 64-bit mode on early x86-64 hosts)
        ];
        for b in yes {
            assert!(super::eligible(&decoded(b), 64), "{b:02x?}");
            assert!(!super::eligible(&decoded(b), 32), "64-bit mode only");
        }
        for b in no {
            assert!(!super::eligible(&decoded(b), 64), "{b:02x?}");
        }
    }
}
