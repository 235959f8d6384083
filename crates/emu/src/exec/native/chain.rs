//! A compiled block's code, and the routines that enter and leave a chain
//! of them.
//!
//! While a chain runs, the guest's registers other than RSP live in the
//! host registers of the same number, from block to block: a block's code
//! neither loads nor stores them. What else the chain needs is on the host
//! stack, at fixed offsets from RSP at a block's entry (see [`slot`]): the
//! guest's RSP and status flags, the TLB, the instruction budget, the
//! link stamp. A block pushes the few registers its lookups work in (it
//! names none of them) and pops them back before it goes on.
//!
//! A block goes on to a fixed successor (a JMP's or CALL's target, either
//! side of a Jcc, straight on) through a jump in its own code, which
//! [`Arena::link`](super::Arena::link) points at the successor's code once
//! the block loop has found it, together with the link stamp it was found
//! under; the jump is taken only while that is still the chain's stamp
//! (no block dropped, no TLB flush, no code written, the same privilege;
//! for a successor in the block's own page, TLB flushes do not count; for
//! one in global pages, CR3 writes that keep them do not; an INVLPG counts
//! only where a link may lead into its page, see `Mmu::note_link_target`).
//! A RET's or indirect jump's target is looked up in the block cache's
//! jump cache. Every other way out goes through the shared exit routine
//! with an [`ExitRecord`] saying where the code stopped.

use super::super::hostasm::{
    Addr, Asm, Fixup, AH, CC_A, CC_AE, CC_E, CC_LE, CC_NE, RAX, RCX, RDI, RDX, RSI, RSP,
};
use super::{
    lookup_parts, offset, rewritten, stack_access, tag_offset, Control, Ending, Frame, Item,
    MemOperand, Next, Scratch, ALL_FLAGS, BLOCK_DONE, CALLEE_SAVED, REFILL_ALIGNED,
    REFILL_MAYBE_WRITE, REFILL_USER, REFILL_WRITE, STATUS,
};
use crate::block::{Block, Jump, JUMP_SLOTS};
use crate::mem::{PAGE_MASK, PAGE_SHIFT};
use iced_x86::Mnemonic;

/// Where a chain keeps its state: offsets from RSP at a block's entry.
pub(super) mod slot {
    /// The vCPU's TLB entries (as a run's stub keeps it, see `lookup`).
    pub const TLB: i32 = 0;
    // 8: free (the layout keeps `SIZE` 8 mod 16).
    /// The guest's status flags, as PUSHFQ stores the host's.
    pub const FLAGS: i32 = 16;
    /// The guest's RSP.
    pub const RSP: i32 = 24;
    /// Instructions the chain may still run.
    pub const LEFT: i32 = 32;
    /// The link stamp the chain runs under.
    pub const STAMP: i32 = 40;
    /// The local link stamp, for jumps within a block's page.
    pub const LOCAL_STAMP: i32 = 48;
    /// The block cache's jump cache.
    pub const JUMPS: i32 = 56;
    /// Where the guest's XMM registers are: 0 in the vCPU's state, 1 in
    /// the host's (loaded by the first block that needed them), 2 in the
    /// vCPU's state where an SSE instruction would fault (CR0.EM or
    /// CR0.TS set, CR4.OSFXSR clear): the interpreter raises that.
    pub const XMM: i32 = 64;
    pub const FS_BASE: i32 = 72;
    pub const GS_BASE: i32 = 80;
    /// Where an indirect hop (or the entry routine) jumps.
    pub const NEXT: i32 = 88;
    /// The exit routine.
    pub const EXIT: i32 = 96;
    /// Out: the [`super::ExitRecord`] of where the code stopped.
    pub const RECORD: i32 = 104;
    /// Out: the RIP an indirect hop did not find code for.
    pub const RIP: i32 = 112;
    /// The global link stamp, for jumps to code in global pages (its
    /// compares, like the link stamp's, address it with a disp8 that
    /// [`Arena::link`](super::super::Arena::link) rewrites).
    pub const GLOBAL_STAMP: i32 = 120;
    /// The vCPU's XMM registers.
    pub const XMM_AT: i32 = 128;
    /// The routine that loads them (see [`super::block_code`]).
    pub const XMM_LOAD: i32 = 136;
    /// Where the guest's MXCSR is: 0 in [`GUEST_MXCSR`], 1 in the host's
    /// (the host's in [`HOST_MXCSR`]), 2 in [`GUEST_MXCSR`] where it
    /// unmasks a floating-point exception: the interpreter runs those
    /// instructions.
    pub const MXCSR: i32 = 144;
    pub const GUEST_MXCSR: i32 = 152;
    pub const HOST_MXCSR: i32 = 160;
    /// The guest's DF (1: set).
    pub const DF: i32 = 168;
    /// The guest's x87 control word, or where x87 instructions would fault
    /// (CR0.EM or CR0.TS set) all ones.
    pub const FCW: i32 = 176;
    /// The `Frame` the chain was entered with.
    pub const FRAME: i32 = 184;
    /// The refill routine: called by a block's code where a TLB lookup
    /// missed, with the slots' address, the access's linear address and
    /// its description (see `native::refill`) pushed, in that order; it
    /// returns with ZF clear where the lookup will now hit, and drops the
    /// three.
    pub const REFILL: i32 = 192;
    /// 8 mod 16, as before the global stamp.
    pub const SIZE: i32 = 200;
}

/// Where a chain stopped, written after the code of the block it stopped
/// in. Offsets are from the record's own address.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct ExitRecord {
    pub block: *const Block,
    /// The successor's RIP, for [`BLOCK_DONE`].
    pub rip: u64,
    /// [`BLOCK_DONE`] (the block ran to its end and RIP is `rip`),
    /// [`DYNAMIC`] (it ran to its end, RIP in [`slot::RIP`]), or how many
    /// of its instructions were done before a lookup missed or a check
    /// left the rest to the interpreter.
    pub result: u64,
    /// For a fixed successor: the low and high halves of the stamp its
    /// jump is taken under, and the jump's rel32 (0: none).
    pub stamp_lo: i32,
    pub stamp_hi: i32,
    pub jump: i32,
    /// Not 0: the jump's successor is in the block's page, and the local
    /// link stamp is the one it is taken under.
    pub local: i32,
}

impl ExitRecord {
    /// Appends its bytes, as `#[repr(C)]` lays them out.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.block as usize as u64).to_le_bytes());
        out.extend_from_slice(&self.rip.to_le_bytes());
        out.extend_from_slice(&self.result.to_le_bytes());
        for n in [self.stamp_lo, self.stamp_hi, self.jump, self.local] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

const _: () = assert!(std::mem::size_of::<ExitRecord>() == 40);

/// An [`ExitRecord::result`]: the block ran to its end and its indirect
/// successor had no code the jump cache knew of.
pub(super) const DYNAMIC: u64 = u64::MAX - 1;

/// Whether `i`, with a memory destination, may leave it unwritten: a
/// shift or rotate whose count may be 0 (the interpreter then writes
/// nothing, and a walk for a write would set a dirty bit it does not).
fn maybe_writes(i: &iced_x86::Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        i.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// RFLAGS.IF and RFLAGS.DF.
const RFLAGS_IF: u64 = 0x200;
const RFLAGS_DF: u64 = 0x400;

/// The host's system flags in user code: IF and the reserved bit 1.
const HOST_FLAGS: i32 = 0x202;

/// The stamp an unlinked jump is checked against: never a link stamp,
/// whose count of changes would have to reach 2^62.
const NO_STAMP: u64 = u64::MAX;

/// The most bytes one REP STOS or MOVS moves in a block's code; a longer
/// one is the interpreter's, which moves it in slices and stops between
/// them when the vCPU is wanted (a block's code does not look).
const STRING_BYTES: i32 = 64 << 10;

/// The routines shared by every block's code, at the start of an arena:
/// the entry (`extern "C" fn(*mut Frame, code: usize) -> *const
/// ExitRecord`) at offset 0, which saves the host's callee-saved
/// registers, lays out the slots, loads the guest's registers and flags
/// and jumps to `code`; the exit, which stores them back (the XMM
/// registers too, if loaded) and returns the record; the XMM load.
pub(super) fn shared_routines() -> Vec<u8> {
    let field = |f: usize| Addr::at(RDI, offset(f));
    let at = |s: i32| Addr::at(RSP, s);
    use std::mem::offset_of;
    let copied = [
        (slot::TLB, offset_of!(Frame, tlb)),
        (slot::LEFT, offset_of!(Frame, left)),
        (slot::STAMP, offset_of!(Frame, stamp)),
        (slot::LOCAL_STAMP, offset_of!(Frame, local_stamp)),
        (slot::GLOBAL_STAMP, offset_of!(Frame, global_stamp)),
        (slot::JUMPS, offset_of!(Frame, jumps)),
        (slot::FS_BASE, offset_of!(Frame, fs_base)),
        (slot::GS_BASE, offset_of!(Frame, gs_base)),
        (slot::XMM, offset_of!(Frame, xmm_state)),
        (slot::XMM_AT, offset_of!(Frame, xmm)),
        (slot::MXCSR, offset_of!(Frame, mxcsr_state)),
        (slot::DF, offset_of!(Frame, df)),
        (slot::FCW, offset_of!(Frame, fcw)),
        (slot::GUEST_MXCSR, offset_of!(Frame, mxcsr)),
    ];
    let mut a = Asm::default();
    for r in CALLEE_SAVED {
        a.push(r);
    }
    a.lea(RSP, at(-slot::SIZE));
    a.store(at(slot::FRAME), RDI);
    a.store(at(slot::NEXT), RSI);
    for (s, f) in copied {
        a.load(RAX, field(f));
        a.store(at(s), RAX);
    }
    let exit = a.lea_rip(RAX);
    a.store(at(slot::EXIT), RAX);
    let load_xmm = a.lea_rip(RAX);
    a.store(at(slot::XMM_LOAD), RAX);
    let refill = a.lea_rip(RAX);
    a.store(at(slot::REFILL), RAX);
    // The guest's status bits with the host's system flags as user code
    // runs with them (IF and the reserved bit 1 set, DF, TF and AC clear):
    // what POPFQ of the slot restores (PUSHFQ here would wait for every
    // flag the caller's code was still computing).
    a.load(RAX, field(offset_of!(Frame, rflags)));
    a.load(RAX, Addr::at(RAX, 0));
    a.and64(RAX, STATUS as i32);
    a.or64(RAX, HOST_FLAGS);
    a.store(at(slot::FLAGS), RAX);
    a.load(RDI, field(offset_of!(Frame, gpr)));
    a.load(RAX, Addr::at(RDI, 8 * i32::from(RSP)));
    a.store(at(slot::RSP), RAX);
    for n in guest_registers() {
        a.load(n, Addr::at(RDI, 8 * i32::from(n)));
    }
    a.load(RDI, Addr::at(RDI, 8 * i32::from(RDI)));
    a.jmp_mem(at(slot::NEXT));

    let here = a.len();
    a.patch(exit, here);
    a.push(RDI);
    a.load(RDI, at(8 + slot::FRAME));
    a.load(RDI, field(offset_of!(Frame, gpr)));
    for n in guest_registers() {
        a.store(Addr::at(RDI, 8 * i32::from(n)), n);
    }
    a.pop(RAX);
    a.store(Addr::at(RDI, 8 * i32::from(RDI)), RAX);
    a.load(RAX, at(slot::RSP));
    a.store(Addr::at(RDI, 8 * i32::from(RSP)), RAX);
    a.load(RDI, at(slot::FRAME));
    a.load(RAX, field(offset_of!(Frame, rflags)));
    a.load(RCX, Addr::at(RAX, 0));
    a.and64(RCX, !STATUS as i32);
    a.load(RDX, at(slot::FLAGS));
    a.and64(RDX, STATUS as i32);
    a.or(RCX, RDX);
    a.store(Addr::at(RAX, 0), RCX);
    a.cmp_dword(at(slot::XMM), 1);
    let unloaded = a.jcc(CC_NE);
    a.load(RAX, at(slot::XMM_AT));
    for x in 0..16u8 {
        a.movdqu_store(Addr::at(RAX, 16 * i32::from(x)), x);
    }
    let here = a.len();
    a.patch(unloaded, here);
    a.cmp_dword(at(slot::MXCSR), 1);
    let unloaded = a.jcc(CC_NE);
    a.stmxcsr(at(slot::GUEST_MXCSR));
    a.ldmxcsr(at(slot::HOST_MXCSR));
    let here = a.len();
    a.patch(unloaded, here);
    a.load(RAX, at(slot::GUEST_MXCSR));
    a.store(field(offset_of!(Frame, mxcsr)), RAX);
    for (s, f) in [
        (slot::LEFT, offset_of!(Frame, left)),
        (slot::RIP, offset_of!(Frame, rip)),
    ] {
        a.load(RAX, at(s));
        a.store(field(f), RAX);
    }
    a.load(RAX, at(slot::RECORD));
    a.lea(RSP, at(slot::SIZE));
    for r in CALLEE_SAVED.iter().rev() {
        a.pop(*r);
    }
    a.ret();

    // The XMM load: called with the vCPU's XMM registers' address pushed.
    let here = a.len();
    a.patch(load_xmm, here);
    a.push(RAX);
    a.load(RAX, at(16));
    for x in 0..16u8 {
        a.movdqu_load(x, Addr::at(RAX, 16 * i32::from(x)));
    }
    a.pop(RAX);
    a.ret_pop(8);

    // The refill routine (see `slot::REFILL`): `native::refill` called
    // by the C convention, every register the guest's values are in kept
    // (the host's XMM registers too where they hold the guest's).
    let here = a.len();
    a.patch(refill, here);
    const RBX: u8 = 3;
    let saved = [RAX, RCX, RDX, RSI, RDI, 8, 9, 10, 11, RBX];
    for r in saved {
        a.push(r);
    }
    // The arguments, above the return address.
    let argument = |n: i32| Addr::at(RBX, 8 * saved.len() as i32 + 8 * n);
    a.mov(RBX, RSP);
    a.load(RDI, argument(3));
    a.load(RSI, argument(2));
    a.load(RDX, argument(1));
    a.and64(RSP, -16);
    let xmm_loaded = |a: &mut Asm| {
        a.cmp_dword(Addr::at(RDI, slot::XMM), 1);
        a.jcc(CC_NE)
    };
    let unloaded = xmm_loaded(&mut a);
    a.lea(RSP, Addr::at(RSP, -256));
    for x in 0..16u8 {
        a.movdqu_store(Addr::at(RSP, 16 * i32::from(x)), x);
    }
    let here = a.len();
    a.patch(unloaded, here);
    a.load(RDI, Addr::at(RDI, slot::FRAME));
    a.call_mem(field(offset_of!(Frame, refill)));
    a.load(RDI, argument(3));
    let unloaded = xmm_loaded(&mut a);
    for x in 0..16u8 {
        a.movdqu_load(x, Addr::at(RSP, 16 * i32::from(x)));
    }
    let here = a.len();
    a.patch(unloaded, here);
    a.mov(RSP, RBX);
    // POP keeps the flags.
    a.test(RAX, RAX);
    for r in saved.iter().rev() {
        a.pop(*r);
    }
    a.ret_pop(24);
    a.code
}

/// The host registers holding guest registers in a chain, but RDI (the
/// routines' frame pointer, loaded and stored last).
fn guest_registers() -> impl Iterator<Item = u8> {
    (0..16u8).filter(|n| *n != RSP && *n != RDI)
}

/// Which guest status flags the host's hold, and which of those the
/// [`slot::FLAGS`] word does not have yet (iced's `RflagsBits`).
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    valid: u32,
    dirty: u32,
}

/// The status flags an instruction reads (or may leave as they were) and
/// those it may change, in iced's bits, undefined ones included.
#[derive(Debug, Clone, Copy)]
struct BlockFlagUse {
    reads: u32,
    modifies: u32,
}

/// How `i` uses the status flags, for a block's code: a shift or rotate by
/// CL changes its flags only if CL's count is not zero, so their values
/// from before must be in the host's; by an immediate count it changes
/// them (or, masked to zero, none).
fn flag_use(i: &iced_x86::Instruction) -> BlockFlagUse {
    use iced_x86::{Mnemonic as M, OpKind};
    let reads = i.rflags_read() & ALL_FLAGS;
    let modifies = i.rflags_modified() & ALL_FLAGS;
    let shift = matches!(
        i.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    );
    if !shift || i.op_count() == 0 {
        return BlockFlagUse { reads, modifies };
    }
    let count = i.op_count() - 1;
    let mask = if i.op0_register().size() == 8 || i.memory_size().size() == 8 {
        0x3f
    } else {
        0x1f
    };
    match i.op_kind(count) {
        OpKind::Register => BlockFlagUse {
            reads: reads | modifies,
            modifies,
        },
        _ if i.immediate(count) & mask == 0 => BlockFlagUse { reads, modifies: 0 },
        _ => BlockFlagUse { reads, modifies },
    }
}

/// Iced's status flag bits as RFLAGS bits.
fn rflags_bits(iced: u32) -> i32 {
    use iced_x86::RflagsBits as F;
    [
        (F::OF, 0x800),
        (F::SF, 0x80),
        (F::ZF, 0x40),
        (F::AF, 0x10),
        (F::CF, 0x1),
        (F::PF, 0x4),
    ]
    .iter()
    .filter(|(f, _)| iced & f != 0)
    .map(|(_, r)| r)
    .sum()
}

/// The status flags in RFLAGS' low byte: SF, ZF, AF, PF and CF.
const STATUS_LOW: u8 = 0xd5;

impl Flags {
    /// Stores the flags the host holds newer values of into the slot (at
    /// stack depth `depth`). The host's flags survive, unless some of the
    /// slot's low byte must be merged with the host's.
    fn flush(&mut self, a: &mut Asm, depth: i32) {
        if self.dirty == 0 {
            return;
        }
        // LAHF and SETO, not PUSHFQ, which costs several times more
        // (measured on Zen 4: 1.4 ns against 0.55 ns for a complete store,
        // RAX's push and pop included). The slot's low byte is RFLAGS' (as
        // LAHF stores it, reserved bit 1 set); its second byte is IF (as
        // the chain's entry stores it) and OF. Only the newer flags are
        // stored: a byte where some are not newer (INC and DEC leave CF)
        // is merged with the slot's, and only that merge changes the
        // host's flags.
        let bits = rflags_bits(self.dirty);
        let low = (bits & 0xff) as u8;
        let slot = Addr::at(RSP, depth + 8 + slot::FLAGS);
        a.push(RAX);
        if bits & 0x800 != 0 {
            a.seto_al();
            // AL = OF << 3 | IF >> 8: bit 11 and bit 9 of RFLAGS.
            a.lea_eax_rax8(2);
            a.mem(
                false,
                &[0x88],
                RAX,
                Addr {
                    disp: slot.disp + 1,
                    ..slot
                },
            );
        }
        if low == STATUS_LOW {
            a.lahf();
            a.mem(false, &[0x88], AH, slot);
        } else if low != 0 {
            a.lahf();
            a.mem(false, &[0x8a], RAX, slot);
            a.and_al(!low);
            a.and_ah(low);
            a.or_al_ah();
            a.mem(false, &[0x88], RAX, slot);
            self.valid = 0;
        }
        a.pop(RAX);
        self.dirty = 0;
    }

    /// Makes the host's flags hold the guest's `reads`: from the slot,
    /// after storing what only the host has.
    fn ensure(&mut self, a: &mut Asm, reads: u32, depth: i32) {
        if reads & !self.valid == 0 {
            return;
        }
        self.flush(a, depth);
        // SAHF and an ADD that overflows exactly when OF is set, not
        // POPFQ (measured on Zen 4: 0.3 ns against 3.7 ns). The slot's
        // second byte is 0x02 (IF) or 0x0a (IF and OF): plus 0x76 it
        // overflows into the sign bit only in the second case.
        a.push(RAX);
        a.mem(false, &[0x8b], RAX, Addr::at(RSP, depth + 8 + slot::FLAGS));
        a.add_ah(0x76);
        a.mov_ah_al();
        a.sahf();
        a.pop(RAX);
        self.valid = ALL_FLAGS;
    }

    /// After an instruction that changes the flags of `modified` (iced's
    /// bits, undefined ones included: the host's value is as good as
    /// any).
    fn after(&mut self, modified: u32) {
        self.valid |= modified;
        self.dirty |= modified;
    }
}

/// The code of a block (see the module comment), `None` where the host
/// has too few registers left or an instruction cannot be re-encoded.
pub(super) fn block_code(
    run: &[Item],
    ending: &Ending,
    block: *const Block,
    info: &mut iced_x86::InstructionInfoFactory,
    encoder: &mut iced_x86::Encoder,
) -> Option<Vec<u8>> {
    let (_, scratch) = super::layout(run, Some(ending.next), info)?;
    let s = scratch?;
    let pushed = s.registers();
    let mut e = Emitter {
        a: Asm::default(),
        pushed: &pushed,
        depth: 8 * pushed.len() as i32,
        block,
        records: Vec::new(),
        refills: Vec::new(),
    };
    for r in &pushed {
        e.a.push(*r);
    }
    if let Some(r) = s.rsp {
        e.a.load(r, e.at(slot::RSP));
    }
    for (r, sl) in [
        (s.seg_base[0], slot::FS_BASE),
        (s.seg_base[1], slot::GS_BASE),
    ] {
        if let Some(r) = r {
            e.a.load(r, e.at(sl));
        }
    }
    let mut flags = Flags::default();
    let mut misses = Vec::new();
    let (mut xmm_loaded, mut mxcsr_loaded) = (false, false);
    for (k, item) in run.iter().enumerate() {
        let i = item.instr();
        let f = flag_use(i);
        if !xmm_loaded && super::names_xmm(i) {
            // The check changes the host's flags, and a miss leaves the
            // guest's in the slot.
            flags.flush(&mut e.a, e.depth);
            flags.valid = 0;
            misses.push((vec![e.load_xmm()], k));
            xmm_loaded = true;
        }
        if !mxcsr_loaded && super::uses_mxcsr(i) {
            flags.flush(&mut e.a, e.depth);
            flags.valid = 0;
            misses.push((vec![e.load_mxcsr()], k));
            mxcsr_loaded = true;
        }
        match item {
            Item::Copy(_, bytes) => {
                flags.ensure(&mut e.a, f.reads, e.depth);
                e.a.bytes(bytes);
            }
            Item::Renamed(i) => {
                flags.ensure(&mut e.a, f.reads, e.depth);
                e.a.bytes(&rewritten(i, None, s.rsp, encoder)?);
            }
            // A move keeps the flags.
            Item::Constant(_, r, value) => e.a.mov_imm64(*r, *value),
            Item::Control(_, c) => {
                // The bit of RFLAGS it clears or sets, if any.
                let change = match c {
                    Control::Nothing => None,
                    Control::ClearIf => Some((RFLAGS_IF, false)),
                    Control::SetIf => Some((RFLAGS_IF, true)),
                    Control::ClearDf => Some((RFLAGS_DF, false)),
                    Control::SetDf => Some((RFLAGS_DF, true)),
                };
                if let Some((bit, set)) = change {
                    // IF and DF are not in the host's flags: the vCPU's
                    // RFLAGS, through the frame. The AND or OR changes the
                    // host's flags.
                    flags.flush(&mut e.a, e.depth);
                    flags.valid = 0;
                    if *c == Control::SetIf {
                        // Left to the interpreter while an interrupt request
                        // is pending (see `Control::SetIf`).
                        e.frame_field(s.entry, std::mem::offset_of!(Frame, requests));
                        e.a.test(s.entry, s.entry);
                        let no_lines = e.a.jcc(CC_E);
                        e.a.cmp_byte(Addr::at(s.entry, 0), 0);
                        misses.push((vec![e.a.jcc(CC_NE)], k));
                        let here = e.a.len();
                        e.a.patch(no_lines, here);
                        // The shadow: RIP after the STI.
                        e.frame_field(s.entry, std::mem::offset_of!(Frame, core));
                        e.a.mov_imm64(s.addr, i.next_ip());
                        let shadow = std::mem::offset_of!(super::super::Core, shadow_rip);
                        e.a.store(Addr::at(s.entry, offset(shadow)), s.addr);
                    }
                    e.frame_field(s.addr, std::mem::offset_of!(Frame, rflags));
                    let rflags = Addr::at(s.addr, 0);
                    if set {
                        e.a.mov_imm64(s.entry, bit);
                        e.a.or_mem(rflags, s.entry);
                    } else {
                        e.a.and_mem(rflags, !(bit as i32));
                    }
                    if bit == RFLAGS_DF {
                        // And the chain's copy, which string items test.
                        e.a.store_imm(e.at(slot::DF), i32::from(set));
                    }
                }
            }
            Item::Fill(_, size) | Item::Move(_, size) => {
                flags.flush(&mut e.a, e.depth);
                flags.valid = 0;
                let moves = matches!(item, Item::Move(..));
                let fixups = e.string(*size, moves, &s, ending.user, k)?;
                misses.push((fixups, k));
            }
            Item::Divide(i, mem) => {
                // The checks change the host's flags, and a miss leaves the
                // guest's in the slot.
                flags.flush(&mut e.a, e.depth);
                flags.valid = 0;
                let mut fixups = Vec::new();
                if let Some(mem) = mem {
                    fixups = e.lookup(mem, &s, ending.user, k, false)?;
                }
                fixups.extend(divide(
                    &mut e.a,
                    i,
                    mem.map(|_| (s.addr, s.entry)),
                    encoder,
                )?);
                misses.push((fixups, k));
            }
            Item::Memory(i, mem) => {
                // The lookup changes the host's flags, and a miss leaves
                // the guest's in the slot.
                flags.flush(&mut e.a, e.depth);
                flags.valid = 0;
                let mut fixups = Vec::new();
                if i.mnemonic() == Mnemonic::Fnstcw {
                    // Where x87 instructions fault (see `slot::FCW`), before
                    // the access, as the interpreter raises it: a refill's
                    // walk would set accessed and dirty bits first.
                    e.a.load(s.entry, e.at(slot::FCW));
                    e.a.cmp_imm(s.entry, 0xffff);
                    fixups.push(e.a.jcc(CC_A));
                }
                fixups.extend(e.lookup(mem, &s, ending.user, k, maybe_writes(i))?);
                // Nothing is left to store: `s.addr`, which holds the
                // host address now, is not needed.
                flags.ensure(&mut e.a, f.reads, e.depth);
                match i.mnemonic() {
                    // The guest's FCW from its slot.
                    Mnemonic::Fnstcw => {
                        e.a.load(s.entry, e.at(slot::FCW));
                        e.a.bytes(&[0x66]);
                        e.a.mem(false, &[0x89], s.entry, Addr::at(s.addr, 0));
                    }
                    // The target of a CALL through memory (see `Next::Called`).
                    Mnemonic::Call if !mem.write => e.a.load(s.temp?, Addr::at(s.addr, 0)),
                    Mnemonic::Push | Mnemonic::Pop | Mnemonic::Call | Mnemonic::Ret => {
                        stack_access(&mut e.a, i, &s)?
                    }
                    // An indirect JMP's target (see `Next::Popped`).
                    Mnemonic::Jmp => e.a.load(s.entry, Addr::at(s.addr, 0)),
                    _ => e.a.bytes(&rewritten(i, Some(s.addr), s.rsp, encoder)?),
                }
                misses.push((fixups, k));
            }
        }
        flags.after(f.modifies);
    }
    if let Some(r) = s.rsp {
        e.a.store(e.at(slot::RSP), r);
    }
    match ending.next {
        Next::To(rip) => {
            flags.flush(&mut e.a, e.depth);
            e.fixed_successor(rip, ending);
        }
        Next::Branch {
            cc,
            reads,
            taken,
            not_taken,
        } => {
            flags.ensure(&mut e.a, reads, e.depth);
            let jump = e.a.jcc(cc);
            let mut other = flags;
            flags.flush(&mut e.a, e.depth);
            e.fixed_successor(not_taken, ending);
            let here = e.a.len();
            e.a.patch(jump, here);
            other.flush(&mut e.a, e.depth);
            e.fixed_successor(taken, ending);
        }
        Next::Popped => {
            flags.flush(&mut e.a, e.depth);
            e.indirect_successor(s.entry, s.addr, s.temp?, ending);
        }
        Next::Register(r) => {
            flags.flush(&mut e.a, e.depth);
            e.indirect_successor(r, s.addr, s.entry, ending);
        }
        Next::Called => {
            flags.flush(&mut e.a, e.depth);
            e.indirect_successor(s.temp?, s.addr, s.entry, ending);
        }
    }
    misses.extend(e.refill_calls(&s));
    for (fixups, k) in misses {
        let here = e.a.len();
        for f in fixups {
            e.a.patch(f, here);
        }
        if let Some(r) = s.rsp {
            e.a.store(e.at(slot::RSP), r);
        }
        e.pop_scratch();
        // The items past the block's last instruction are its own accesses
        // (a CALL's load and push).
        let instruction = k.min(ending.count - 1);
        e.leave(ExitRecord {
            result: instruction as u64,
            ..e.record()
        });
    }
    Some(e.finish())
}

/// DIV `i` after checks that leave (the jumps returned) where it would
/// fault: a zero divisor, or a high half of the dividend (EDX or RDX) not
/// below the divisor. With `memory` (the host address, a free register),
/// the divisor is loaded from the address into the free register first.
fn divide(
    a: &mut Asm,
    i: &iced_x86::Instruction,
    memory: Option<(u8, u8)>,
    encoder: &mut iced_x86::Encoder,
) -> Option<Vec<Fixup>> {
    use iced_x86::{Code, Instruction as I, MemoryOperand, Register as R};
    let wide = i.code() == Code::Div_rm64;
    let reg = |n: u8| {
        let full = R::RAX + u32::from(n);
        if wide {
            full
        } else {
            R::EAX + u32::from(n)
        }
    };
    let (divisor, load) = match memory {
        Some((addr, free)) => {
            let code = if wide {
                Code::Mov_r64_rm64
            } else {
                Code::Mov_r32_rm32
            };
            let at = MemoryOperand::with_base(R::RAX + u32::from(addr));
            (reg(free), Some(I::with2(code, reg(free), at).ok()?))
        }
        None => (i.op0_register(), None),
    };
    let (test, cmp, div) = if wide {
        (Code::Test_rm64_r64, Code::Cmp_r64_rm64, Code::Div_rm64)
    } else {
        (Code::Test_rm32_r32, Code::Cmp_r32_rm32, Code::Div_rm32)
    };
    let mut emit = |a: &mut Asm, ins: I| -> Option<()> {
        encoder.encode(&ins, 0).ok()?;
        a.bytes(&encoder.take_buffer());
        Some(())
    };
    if let Some(load) = load {
        emit(a, load)?;
    }
    emit(a, I::with2(test, divisor, divisor).ok()?)?;
    let zero = a.jcc(CC_E);
    emit(a, I::with2(cmp, reg(RDX), divisor).ok()?)?;
    let overflow = a.jcc(CC_AE);
    emit(a, I::with1(div, divisor).ok()?)?;
    Some(vec![zero, overflow])
}

/// Builds a block's code: its scratch registers pushed (`depth` bytes of
/// them on the stack) and the records its exits point at.
struct Emitter<'a> {
    a: Asm,
    pushed: &'a [u8],
    depth: i32,
    block: *const Block,
    records: Vec<(Fixup, ExitRecord, [Option<usize>; 3])>,
    /// Lookups whose misses call the refill routine (see `slot::REFILL`).
    refills: Vec<Refill>,
}

/// A lookup in a block's code that may call the refill routine.
struct Refill {
    /// Its jumps taken where the TLB has no entry allowing the access.
    misses: Vec<Fixup>,
    /// Where it starts (it computes the address again from the guest's
    /// registers, which nothing changed in between).
    start: usize,
    /// The access, for `native::refill`.
    how: i32,
    /// Where its lookup's tag is in the entry.
    tag: i32,
    /// The instruction it is made for.
    instruction: usize,
}

impl Emitter<'_> {
    /// The TLB lookup of `mem` for instruction `k` (`maybe_write`: one
    /// that may leave its memory destination unwritten, see
    /// [`maybe_writes`]): returns the jumps it takes to leave the chain. Where the TLB has no entry allowing the
    /// access, it first calls the refill routine, and looks up again
    /// after an entry was made (see [`Self::refill_calls`]).
    fn lookup(
        &mut self,
        mem: &MemOperand,
        s: &Scratch,
        user: bool,
        k: usize,
        maybe_write: bool,
    ) -> Option<Vec<Fixup>> {
        let start = self.a.len();
        let (misses, others) = lookup_parts(&mut self.a, mem, s, user, self.depth)?;
        let mut how = i32::from(mem.size);
        if mem.write {
            how |= REFILL_WRITE;
        }
        if user {
            how |= REFILL_USER;
        }
        if mem.aligned {
            how |= REFILL_ALIGNED;
        }
        if mem.write && maybe_write {
            how |= REFILL_MAYBE_WRITE;
        }
        self.refills.push(Refill {
            misses,
            start,
            how,
            tag: tag_offset(user, mem.write),
            instruction: k,
        });
        Some(others)
    }

    /// The refill routine's calls, out of line, for the lookups made with
    /// [`Self::lookup`]: each goes back to its lookup where the routine
    /// made an entry, else it leaves the chain; returns those last jumps
    /// and their instructions, for the exits.
    fn refill_calls(&mut self, s: &Scratch) -> Vec<(Vec<Fixup>, usize)> {
        let mut leaving = Vec::new();
        for r in std::mem::take(&mut self.refills) {
            let here = self.a.len();
            for f in r.misses {
                self.a.patch(f, here);
            }
            let a = &mut self.a;
            // The linear address back from its XOR with the entry's tag.
            a.mem(true, &[0x33], s.addr, Addr::at(s.entry, r.tag));
            a.lea(s.entry, Addr::at(RSP, self.depth));
            a.push(s.entry);
            a.push(s.addr);
            a.push_imm(r.how);
            a.call_mem(Addr::at(RSP, self.depth + 24 + slot::REFILL));
            let entered = a.jcc(CC_NE);
            a.patch(entered, r.start);
            leaving.push((vec![a.jmp()], r.instruction));
        }
        leaving
    }

    /// Makes the host's XMM registers the guest's, through the shared
    /// routine, unless they are: returns the jump taken where SSE
    /// instructions would fault.
    fn load_xmm(&mut self) -> Fixup {
        let pointer = self.at(slot::XMM_AT);
        let routine = Addr::at(RSP, 8 + self.depth + slot::XMM_LOAD);
        self.load_once(slot::XMM, |a| {
            a.push_mem(pointer);
            a.call_mem(routine);
        })
    }

    /// Makes the host's MXCSR the guest's, unless it is: returns the jump
    /// taken where the guest's unmasks an exception.
    fn load_mxcsr(&mut self) -> Fixup {
        let (guest, host) = (self.at(slot::GUEST_MXCSR), self.at(slot::HOST_MXCSR));
        self.load_once(slot::MXCSR, |a| {
            a.stmxcsr(host);
            a.ldmxcsr(guest);
        })
    }

    /// Runs `load` and marks the state slot `state` loaded (1), where it
    /// says not loaded (0); returns the jump taken where it says unusable
    /// (2).
    fn load_once(&mut self, state: i32, load: impl FnOnce(&mut Asm)) -> Fixup {
        let state = self.at(state);
        let a = &mut self.a;
        a.cmp_dword(state, 1);
        let loaded = a.jcc(CC_E);
        let unusable = a.jcc(CC_A);
        load(a);
        a.store_imm(state, 1);
        let here = a.len();
        a.patch(loaded, here);
        unusable
    }

    /// REP STOS or (`moves`) REP MOVS of `size`-byte elements (the guest's
    /// flags in their slot): the host's instruction at the host addresses
    /// of RDI (and RSI), a page at a time: each round looks both ranges up
    /// and moves the elements that fit in both pages, then puts RCX, RSI
    /// and RDI back in the guest's terms. Returns the jumps taken where DF
    /// is set, the count is over [`STRING_BYTES`], an element straddles a
    /// page, or a lookup misses, for the interpreter, which then finds the
    /// registers as the rounds before left them (the instruction resumes
    /// as after an interruption).
    fn string(
        &mut self,
        size: u8,
        moves: bool,
        s: &super::Scratch,
        user: bool,
        k: usize,
    ) -> Option<Vec<Fixup>> {
        use super::super::hostasm::RSI;
        let df = self.at(slot::DF);
        let shift = size.trailing_zeros() as u8;
        let mut out = Vec::new();
        self.a.cmp_dword(df, 0);
        out.push(self.a.jcc(CC_NE));
        self.a.cmp_imm(RCX, STRING_BYTES / i32::from(size));
        out.push(self.a.jcc(CC_A));
        let round = self.a.len();
        self.a.test(RCX, RCX);
        let finished = self.a.jcc(CC_E);
        let source = if moves { Some(s.temp?) } else { None };
        if let Some(source) = source {
            out.extend(self.lookup(&super::string_start(RSI, false), s, user, k, false)?);
            self.a.mov(source, s.addr);
        }
        out.extend(self.lookup(&super::string_start(RDI, true), s, user, k, false)?);
        let a = &mut self.a;
        // The lookups are done with these two.
        let (count, bytes) = (s.count?, s.entry);
        // The elements left in `base`'s page: (4096 - base % 4096) >> shift.
        let room = |a: &mut Asm, dst: u8, base: u8| {
            a.mov(dst, base);
            a.and32(dst, PAGE_MASK as u32);
            a.rr(&[0xf7], 3, dst); // neg
            a.lea(dst, Addr::at(dst, 1 << PAGE_SHIFT));
            if shift > 0 {
                a.shr(dst, shift);
            }
        };
        room(a, count, RDI);
        if moves {
            room(a, bytes, RSI);
            a.rr(&[0x39], bytes, count); // cmp count, bytes
            a.rr(&[0x0f, 0x47], count, bytes); // cmova count, bytes
        }
        a.rr(&[0x39], RCX, count); // cmp count, rcx
        a.rr(&[0x0f, 0x47], count, RCX); // cmova count, rcx
        a.test(count, count);
        // An element straddles a page.
        out.push(a.jcc(CC_E));
        // RDI (and RSI) hold host addresses and RCX this round's count
        // while the host runs it; the guest's values wait in the scratch
        // registers.
        a.rr(&[0x87], RDI, s.addr); // xchg
        if let Some(source) = source {
            a.rr(&[0x87], RSI, source);
        }
        a.rr(&[0x29], count, RCX); // sub rcx, count: what is left after
        a.rr(&[0x87], RCX, count);
        a.mov(bytes, RCX);
        a.shl(bytes, shift);
        let (stos, movs) = match size {
            1 => (&[0xf3, 0xaa][..], &[0xf3, 0xa4][..]),
            2 => (&[0x66, 0xf3, 0xab][..], &[0x66, 0xf3, 0xa5][..]),
            4 => (&[0xf3, 0xab][..], &[0xf3, 0xa5][..]),
            _ => (&[0xf3, 0x48, 0xab][..], &[0xf3, 0x48, 0xa5][..]),
        };
        a.bytes(if moves { movs } else { stos });
        a.rr(&[0x01], bytes, s.addr); // add
        a.mov(RDI, s.addr);
        if let Some(source) = source {
            a.rr(&[0x01], bytes, source);
            a.mov(RSI, source);
        }
        a.mov(RCX, count);
        let again = a.jmp();
        a.patch(again, round);
        let here = a.len();
        a.patch(finished, here);
        Some(out)
    }

    /// Loads field `field` (an offset) of the chain's `Frame` into `dst`.
    fn frame_field(&mut self, dst: u8, field: usize) {
        let frame = self.at(slot::FRAME);
        self.a.load(dst, frame);
        self.a.load(dst, Addr::at(dst, offset(field)));
    }

    /// A slot, with the scratch registers pushed.
    fn at(&self, s: i32) -> Addr {
        Addr::at(RSP, self.depth + s)
    }

    fn pop_scratch(&mut self) {
        for r in self.pushed.iter().rev() {
            self.a.pop(*r);
        }
    }

    fn record(&self) -> ExitRecord {
        ExitRecord {
            block: self.block,
            rip: 0,
            result: BLOCK_DONE,
            stamp_lo: 0,
            stamp_hi: 0,
            jump: 0,
            local: 0,
        }
    }

    /// Leaves the chain through the exit routine with `record`, the
    /// scratch registers popped.
    fn leave(&mut self, record: ExitRecord) {
        self.leave_linked(record, [None; 3]);
    }

    /// [`Self::leave`], the record noting where the stamp halves and the
    /// jump to patch are.
    fn leave_linked(&mut self, record: ExitRecord, sites: [Option<usize>; 3]) {
        self.a.push(RAX);
        let f = self.a.lea_rip(RAX);
        self.a.store(Addr::at(RSP, 8 + slot::RECORD), RAX);
        self.a.pop(RAX);
        self.a.jmp_mem(Addr::at(RSP, slot::EXIT));
        self.records.push((f, record, sites));
    }

    /// The end of a block going on to `rip` (the guest's flags in their
    /// slot): pops the scratch registers and jumps to the successor's code
    /// while the budget lasts and the stamp is the one the jump was linked
    /// under (the local one for a successor in the block's page).
    fn fixed_successor(&mut self, rip: u64, ending: &Ending) {
        self.pop_scratch();
        let local = ending.page == Some(rip >> 12);
        let stamp = if local {
            slot::LOCAL_STAMP
        } else {
            slot::STAMP
        };
        let a = &mut self.a;
        let mut out = vec![];
        // At most `block::MAX_OPS` instructions.
        a.sub_mem(Addr::at(RSP, slot::LEFT), ending.count as i32);
        out.push(a.jcc(CC_LE));
        a.cmp_dword(Addr::at(RSP, stamp), NO_STAMP as u32 as i32);
        let lo = a.len() - 4;
        out.push(a.jcc(CC_NE));
        a.cmp_dword(Addr::at(RSP, stamp + 4), (NO_STAMP >> 32) as u32 as i32);
        let hi = a.len() - 4;
        // Linking rewrites the slot's disp8, just before each immediate.
        debug_assert_eq!(
            (a.code[lo - 1], a.code[hi - 1]),
            (stamp as u8, stamp as u8 + 4)
        );
        out.push(a.jcc(CC_NE));
        let jump = a.jmp();
        out.push(jump);
        let here = a.len();
        for f in out {
            a.patch(f, here);
        }
        let record = ExitRecord {
            rip,
            local: i32::from(local),
            ..self.record()
        };
        self.leave_linked(record, [Some(lo), Some(hi), Some(jump.at())]);
    }

    /// The end of a block going on to the RIP in `rip` (the guest's flags
    /// in their slot, the scratch registers pushed): the jump cache's
    /// entry for it, if made under the chain's stamp for a block with
    /// code for this privilege, while the budget lasts. `x` and `y` are
    /// free registers.
    fn indirect_successor(&mut self, rip: u8, x: u8, y: u8, ending: &Ending) {
        use std::mem::{offset_of, size_of};
        let mut out = vec![];
        let left = self.at(slot::LEFT);
        let jumps = self.at(slot::JUMPS);
        let stamp = self.at(slot::STAMP);
        let global_stamp = self.at(slot::GLOBAL_STAMP);
        let next = self.at(slot::NEXT);
        let dynamic = self.at(slot::RIP);
        let a = &mut self.a;
        let entry = |f: usize| Addr::at(x, super::offset(f));
        a.sub_mem(left, ending.count as i32);
        out.push(a.jcc(CC_LE));
        // As `BlockCache::jump_target` finds it.
        a.mov(x, rip);
        a.shr(x, 12);
        a.xor(x, rip);
        a.and32(x, JUMP_SLOTS as u32 - 1);
        a.imul_imm(x, x, size_of::<Jump>() as i32);
        a.add_load(x, jumps);
        a.cmp_load(rip, entry(offset_of!(Jump, rip)));
        out.push(a.jcc(CC_NE));
        // Made under the link stamp, or for code in global pages under
        // the global one.
        a.load(y, stamp);
        a.cmp_load(y, entry(offset_of!(Jump, stamp)));
        let current = a.jcc(CC_E);
        a.load(y, global_stamp);
        a.cmp_load(y, entry(offset_of!(Jump, stamp)));
        out.push(a.jcc(CC_NE));
        let here = a.len();
        a.patch(current, here);
        // Links between 64-bit blocks need no CS base check: the base
        // does not take part in 64-bit addressing.
        a.cmp_dword(entry(offset_of!(Jump, bitness)), 64);
        out.push(a.jcc(CC_NE));
        a.load(x, entry(offset_of!(Jump, block)));
        a.cmp_byte(entry(offset_of!(Block, native_cpl)), ending.cpl);
        out.push(a.jcc(CC_NE));
        a.load(x, entry(offset_of!(Block, native)));
        a.test(x, x);
        out.push(a.jcc(CC_E));
        a.store(next, x);
        self.pop_scratch();
        self.a.jmp_mem(Addr::at(RSP, slot::NEXT));
        let here = self.a.len();
        for f in out {
            self.a.patch(f, here);
        }
        self.a.store(dynamic, rip);
        self.pop_scratch();
        self.leave(ExitRecord {
            result: DYNAMIC,
            ..self.record()
        });
    }

    /// The code with its records after it.
    fn finish(mut self) -> Vec<u8> {
        for (f, mut record, sites) in std::mem::take(&mut self.records) {
            let at = self.a.len().next_multiple_of(8);
            self.a.code.resize(at, 0xcc);
            self.a.patch(f, at);
            let rel = |site: Option<usize>| site.map_or(0, |s| s as i32 - at as i32);
            record.stamp_lo = rel(sites[0]);
            record.stamp_hi = rel(sites[1]);
            record.jump = rel(sites[2]);
            record.write(&mut self.a.code);
        }
        self.a.code
    }
}
