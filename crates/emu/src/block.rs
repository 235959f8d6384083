//! Decoded blocks and their cache.
//!
//! A block is the straight-line run of instructions from one address up
//! to (and including) the first control transfer, the end of its 4 KiB
//! page, an instruction that changes how the following bytes decode, or
//! [`MAX_OPS`]. Each instruction is decoded once into an [`Op`] holding
//! iced-x86's `Instruction` and the handler picked for it, so executing it
//! again is one indirect call. A JIT replaces this layer: same cache keys,
//! same invalidation, compiled code instead of the `ops` vector.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic};

use crate::exec::{handler_for, Core, Exit, OpResult, Stop};
use crate::mem::{Access, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};

/// Longest block, in instructions. Bounds decode work and the time between
/// checks of the stop flag.
pub const MAX_OPS: usize = 64;
/// Most bytes read from the first page for one block.
const MAX_BLOCK_BYTES: usize = 1024;

/// Executes one decoded instruction. RIP already holds the address of the
/// next instruction when it is called.
pub type Handler = fn(&mut Core, &Op) -> OpResult;

/// One decoded instruction and what executes it.
#[derive(Clone)]
pub struct Op {
    pub instr: Instruction,
    pub handler: Handler,
    /// `instr.next_ip()`, kept beside the handler for the hot loop.
    pub next_ip: u64,
    /// Operand size in bytes of the instruction's main operand (0 when it
    /// has none).
    pub osize: u8,
    /// Address size in bytes (2, 4 or 8), after any 0x67 prefix.
    pub asize: u8,
    /// Code-segment bitness it was decoded for (16, 32 or 64).
    pub bitness: u8,
    /// Register indices (0..16) of operands 0 and 1, for the specialized
    /// handlers of `exec::fast` (unused by the generic ones).
    pub regs: [u8; 2],
    /// The immediate operand, extended and truncated to `osize`, for the
    /// specialized handlers.
    pub imm: u64,
    /// The memory operand's address, pre-decoded (see [`EaForm`]).
    pub ea: EaForm,
}

/// A memory operand's effective address in the common case, 64-bit mode
/// with 64-bit addressing: `disp + base + (index << shift)`, plus the
/// segment base for FS and GS. Decoded once so that computing the address
/// is a few loads and adds with no branches on the operand's form; other
/// modes and address sizes go through iced's `Instruction` each time.
#[derive(Clone, Copy, Debug, Default)]
pub struct EaForm {
    pub disp: u64,
    /// GPR numbers (0..16) of the base and index; used only where
    /// `flags` says they are present.
    pub base: u8,
    pub index: u8,
    /// Segment register number (`state::seg`) whose base is added, where
    /// `flags` has [`EaForm::SEG_BASE`].
    pub seg: u8,
    /// The index scale as a shift (bits 0-1) and the `FAST`, `HAS_BASE`,
    /// `HAS_INDEX` and `SEG_BASE` bits.
    pub flags: u8,
}

impl EaForm {
    pub const SHIFT_MASK: u8 = 3;
    /// The form applies (else the generic path computes the address).
    pub const FAST: u8 = 1 << 2;
    pub const HAS_BASE: u8 = 1 << 3;
    pub const HAS_INDEX: u8 = 1 << 4;
    /// FS or GS: the segment base is added.
    pub const SEG_BASE: u8 = 1 << 5;

    /// The form of `i`'s memory operand, if it has one this covers.
    fn of(i: &Instruction, asize: u8, bitness: u32) -> EaForm {
        use iced_x86::{OpKind, Register};
        let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
        if !has_mem || bitness != 64 || asize != 8 {
            return EaForm::default();
        }
        let gpr = |r: Register| -> Option<u8> {
            r.is_gpr64()
                .then(|| (r as u32 - Register::RAX as u32) as u8)
        };
        let mut flags = Self::FAST;
        let (mut base, mut index) = (0, 0);
        match i.memory_base() {
            Register::None | Register::RIP => {}
            r => match gpr(r) {
                Some(n) => {
                    base = n;
                    flags |= Self::HAS_BASE;
                }
                None => return EaForm::default(),
            },
        }
        match i.memory_index() {
            Register::None => {}
            r => match gpr(r) {
                Some(n) => {
                    index = n;
                    flags |= Self::HAS_INDEX | (i.memory_index_scale().trailing_zeros() as u8 & 3);
                }
                None => return EaForm::default(),
            },
        }
        let seg = match i.memory_segment() {
            Register::FS => {
                flags |= Self::SEG_BASE;
                crate::state::seg::FS as u8
            }
            Register::GS => {
                flags |= Self::SEG_BASE;
                crate::state::seg::GS as u8
            }
            _ => 0,
        };
        EaForm {
            // RIP-relative displacements are already absolute.
            disp: i.memory_displacement64(),
            base,
            index,
            seg,
            flags,
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("ip", &self.instr.ip())
            .field("code", &self.instr.code())
            .finish()
    }
}

/// A direct link from the end of one block to the block that ran after
/// it, so that the next time the same RIP follows, the block loop skips
/// translation and the cache lookup. Valid only while the link stamp it
/// was made under still holds (the block loop's `link_stamp`): any TLB
/// flush, dropped block, code write or privilege change moves the stamp
/// on and so cuts every link at once, but a link within the page its
/// block ran from (see [`Block::within_page`]) is made under the local
/// stamp, which TLB flushes do not move, and a link to code in global
/// pages under the global stamp, which CR3 writes that keep global pages
/// do not move.
#[derive(Clone, Copy)]
pub struct Link {
    pub rip: u64,
    pub stamp: u64,
    /// CS base the successor was translated under (outside 64-bit mode
    /// the same RIP can be reached through another code segment).
    pub cs_base: u64,
    pub target: *const Block,
}

const NO_LINK: Link = Link {
    rip: u64::MAX,
    stamp: u64::MAX,
    cs_base: 0,
    target: std::ptr::null(),
};

/// A decoded straight-line block.
pub struct Block {
    /// Guest-physical address of the first byte (the cache key).
    pub phys: u64,
    /// RIP it was decoded at: RIP-relative operands and branch targets in
    /// `ops` are resolved against it.
    pub rip: u64,
    pub bitness: u32,
    pub ops: Vec<Op>,
    /// The interpreted forms of its native runs that access memory: such
    /// a run's op points into this vector, and falls back to it from the
    /// first access its stub does not make (see `exec::native`). Never
    /// changed after decoding, so the pointers hold while the block does.
    pub native_subs: Vec<Op>,
    /// Physical pages its bytes come from (a block ends with the
    /// instruction that crosses into a second page).
    pub pages: [Option<u64>; 2],
    /// The generations ([`crate::mem::CodePages`]) of `pages` when the
    /// bytes were read: a block whose page has moved on is stale.
    pub gens: [u32; 2],
    /// Whether the block ends in a way that keeps CS and the mode (a near
    /// branch, call or return, or straight on): only then may the block
    /// after it be linked.
    pub chainable: bool,
    /// RIP after the last instruction (the fall-through successor).
    pub end_ip: u64,
    /// Links to successors: `[0]` the fall-through, `[1]` the last other
    /// target (a taken branch, a return address).
    pub links: [Cell<Link>; 2],
    /// What a block of instructions that all have native forms is
    /// compiled from once it has run [`HOT_AFTER`] times (its `ops` are
    /// then one per instruction, for the interpreter to run until then,
    /// and to finish the block from the first access the code did not
    /// make); `None` for other blocks.
    pub source: Option<Box<NativeSource>>,
    /// How many times it ran before being compiled.
    pub runs: Cell<u32>,
    /// The address of the block's native code
    /// (`exec::native::compile_block`), 0 while it has none: entered
    /// through the arena's entry routine by the block loop, or jumped to
    /// from the code of the block before it.
    pub native: Cell<usize>,
    /// The CPL its code was compiled for, and may run at: its accesses
    /// check user or supervisor permissions by it, and at CPL 0 it may
    /// clear IF.
    pub native_cpl: u8,
}

/// The bytes of a block's instructions (`spans[k]` those of op `k` in
/// `bytes`) and what they are compiled for (see [`Block::source`]).
#[derive(Debug)]
pub struct NativeSource {
    pub bytes: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
    pub target: crate::exec::NativeTarget,
}

/// Runs of a block before it is compiled to native code. Compiling costs
/// about as much as interpreting the block dozens of times, and much code
/// runs only a few times before its page is reused or the process exits
/// (fork and exec); compiled code also fills the arena, whose filling
/// drops every block. Measured in one run each, in the default guest:
/// 50 fork+exec of /bin/true took 1.01 s compiling at the 16th run,
/// 0.56-0.60 s at the 64th and 0.85 s at the 256th (0.82 s before blocks
/// were compiled); `sort -n` of 200k lines 13.6, 13.6 and 15.4 s, gzip
/// and gunzip of 16 MiB 11.9, 11.7 and 13.0 s.
pub const HOT_AFTER: u32 = 64;

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("phys", &self.phys)
            .field("rip", &self.rip)
            .field("bitness", &self.bitness)
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl Block {
    /// The link slot for a successor at `rip`.
    #[inline(always)]
    /// Whether `rip` is in the one page the block's instructions are in: a
    /// link from the block to it holds across TLB flushes, as long as
    /// none happened while the block ran. None can: every instruction that
    /// flushes (MOV to a control register, WRMSR, INVLPG, INVPCID) ends its
    /// block, and such a block is never linked from (see `keeps_cs`).
    pub fn within_page(&self, rip: u64) -> bool {
        self.pages[1].is_none() && self.rip >> 12 == rip >> 12
    }

    pub fn link_for(&self, rip: u64) -> &Cell<Link> {
        &self.links[usize::from(rip != self.end_ip)]
    }
}

/// Multiplicative hash for page-aligned-ish u64 keys; SipHash is overkill
/// for a per-block lookup.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Entries of [`BlockCache`]'s direct-mapped front (a power of two).
const RECENT_SLOTS: usize = 4096;

/// One slot of the direct-mapped front: the key beside the block, so a
/// lookup compares within one small array instead of probing the hash
/// map and then the block's own (often cold) header.
#[derive(Clone, Copy)]
struct Recent {
    phys: u64,
    rip: u64,
    bitness: u32,
    block: *const Block,
}

const NO_RECENT: Recent = Recent {
    phys: u64::MAX,
    rip: 0,
    bitness: 0,
    block: std::ptr::null(),
};

/// Entries of [`BlockCache`]'s jump cache (a power of two). A fork, exec
/// and exit of `/bin/true` in the default guest returns to more distinct
/// places in the kernel than 4096 slots hold: with 4096, 4,500 of its
/// blocks' indirect successors missed (each a return to the block loop),
/// with 32768 1,600, and the loop of 1000 ran in 0.92 of the time (median
/// of four runs side by side). 40 bytes each: 1.3 MiB per vCPU.
pub(crate) const JUMP_SLOTS: usize = 32768;

/// One slot of the jump cache: the block that last ran at a RIP, and
/// under what it was found (see [`BlockCache::jump_target`]).
#[derive(Clone, Copy)]
pub(crate) struct Jump {
    pub(crate) rip: u64,
    pub(crate) cs_base: u64,
    pub(crate) bitness: u32,
    pub(crate) stamp: u64,
    pub(crate) block: *const Block,
}

const NO_JUMP: Jump = Jump {
    rip: u64::MAX,
    cs_base: 0,
    bitness: 0,
    stamp: u64::MAX,
    block: std::ptr::null(),
};

/// A heap-allocated block owned through a raw pointer, so that moving
/// the owner (into the map, out to the graveyard) does not invalidate the
/// raw pointers the block loop and links hold, as moving a `Box` would
/// under Rust's aliasing rules. Freed when dropped.
struct OwnedBlock(std::ptr::NonNull<Block>);

impl OwnedBlock {
    fn new(block: Block) -> Self {
        OwnedBlock(std::ptr::NonNull::from(Box::leak(Box::new(block))))
    }

    fn ptr(&self) -> *const Block {
        self.0.as_ptr()
    }

    fn get(&self) -> &Block {
        // SAFETY: the pointer came from `Box::leak` in `new` and is freed
        // only by `drop`; blocks are never mutated through it (links use
        // `Cell`).
        unsafe { self.0.as_ref() }
    }
}

impl Drop for OwnedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box` in `new`, and this is the one owner.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// Blocks by the guest-physical address of their first byte.
///
/// Blocks are boxed so their addresses stay put: the block loop runs a
/// block through a raw pointer (no reference count per block), and links
/// and the front slots point at blocks. A dropped block goes to the
/// graveyard and is freed only by [`Self::collect`], which the block loop
/// calls between blocks, when it holds no block pointer.
pub struct BlockCache {
    blocks: FastMap<u64, OwnedBlock>,
    by_page: FastMap<u64, Vec<u64>>,
    /// Direct-mapped by physical address: the blocks looked up last. Only
    /// ever holds blocks that are also in `blocks`, so dropping a block
    /// from the map drops its slot too (see [`Self::invalidate_page`]).
    recent: Box<[Recent]>,
    /// Dropped blocks not freed yet.
    graveyard: Vec<OwnedBlock>,
    /// Moves on whenever a block is dropped (with the TLB's flush count,
    /// the stamp links are checked against).
    epoch: u64,
    /// Direct-mapped by RIP: the block found for a RIP, valid under the
    /// same stamp as links. It serves the successors links miss: returns
    /// to many callers and other indirect branches, which thrash a
    /// block's one link for targets other than its fall-through.
    jumps: Box<[Jump]>,
}

// SAFETY: the raw pointers inside (front slots, links) point only at
// blocks this cache owns, and the cache moves between threads as a whole
// (with the vCPU that owns it); nothing is shared with another thread.
unsafe impl Send for BlockCache {}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            blocks: FastMap::default(),
            by_page: FastMap::default(),
            recent: vec![NO_RECENT; RECENT_SLOTS].into_boxed_slice(),
            graveyard: Vec::new(),
            epoch: 0,
            jumps: vec![NO_JUMP; JUMP_SLOTS].into_boxed_slice(),
        }
    }
}

/// The jump-cache slot of a block run at `rip`.
#[inline(always)]
fn jump_slot(rip: u64) -> usize {
    ((rip ^ (rip >> 12)) as usize) & (JUMP_SLOTS - 1)
}

/// The front slot of a block starting at `phys`.
#[inline]
fn slot(phys: u64) -> usize {
    // Blocks start anywhere in a page; mix the page number in so that the
    // same offset in different pages does not always collide.
    ((phys ^ (phys >> 12).wrapping_mul(0x9e37)) as usize) & (RECENT_SLOTS - 1)
}

impl BlockCache {
    /// The block starting at `phys`, if it was decoded at this RIP and
    /// bitness (the same physical bytes reached through another address
    /// or mode decode differently). The pointer stays valid until the
    /// next [`Self::collect`].
    #[inline]
    pub fn get(&mut self, phys: u64, rip: u64, bitness: u32) -> Option<*const Block> {
        let i = slot(phys);
        let r = &self.recent[i];
        if r.phys == phys && r.rip == rip && r.bitness == bitness {
            return Some(r.block);
        }
        let b = self
            .blocks
            .get(&phys)
            .filter(|b| b.get().rip == rip && b.get().bitness == bitness)?
            .ptr();
        self.recent[i] = Recent {
            phys,
            rip,
            bitness,
            block: b,
        };
        Some(b)
    }

    /// Adds `block`; the pointer stays valid until the next
    /// [`Self::collect`].
    pub fn insert(&mut self, block: Block) -> *const Block {
        let phys = block.phys;
        for page in block.pages.iter().flatten() {
            self.by_page.entry(*page).or_default().push(phys);
        }
        let block = OwnedBlock::new(block);
        let ptr = block.ptr();
        // Replacing a block at the same address (decoded at another RIP or
        // bitness): its front slot must not keep the old one.
        self.forget_recent(phys);
        if let Some(old) = self.blocks.insert(phys, block) {
            self.bury(old);
        }
        ptr
    }

    fn bury(&mut self, block: OwnedBlock) {
        self.graveyard.push(block);
        self.epoch += 1;
    }

    /// Empties the front slot of the block at `phys`, if it holds it.
    fn forget_recent(&mut self, phys: u64) {
        let r = &mut self.recent[slot(phys)];
        if r.phys == phys {
            *r = NO_RECENT;
        }
    }

    /// Drops every block with bytes in `page` (a page number).
    pub fn invalidate_page(&mut self, page: u64) {
        if let Some(keys) = self.by_page.remove(&page) {
            for k in keys {
                if let Some(b) = self.blocks.remove(&k) {
                    self.bury(b);
                }
                self.forget_recent(k);
            }
        }
    }

    pub fn clear(&mut self) {
        let blocks: Vec<OwnedBlock> = self.blocks.drain().map(|(_, b)| b).collect();
        self.graveyard.extend(blocks);
        self.epoch += 1;
        self.by_page.clear();
        self.recent.fill(NO_RECENT);
    }

    /// Whether dropped blocks wait to be freed.
    #[inline(always)]
    pub fn has_garbage(&self) -> bool {
        !self.graveyard.is_empty()
    }

    /// Frees the dropped blocks. The caller must hold no pointer to a
    /// block obtained before the call (links to them are already stale:
    /// dropping moved the epoch on).
    pub fn collect(&mut self) {
        self.graveyard.clear();
    }

    /// The block last found for `rip` (with this CS base and bitness)
    /// under a link stamp or global link stamp, if it is one of `stamps`
    /// (those two now): nothing that could change the answer (a dropped
    /// block, a TLB flush, for code in global pages one that may drop a
    /// global translation, a code write, a privilege change) happened
    /// since. Its pointer is then as valid as a link's.
    #[inline(always)]
    pub fn jump_target(
        &self,
        rip: u64,
        cs_base: u64,
        bitness: u32,
        stamps: [u64; 2],
    ) -> Option<*const Block> {
        let j = &self.jumps[jump_slot(rip)];
        (j.rip == rip
            && (j.stamp == stamps[0] || j.stamp == stamps[1])
            && j.cs_base == cs_base
            && j.bitness == bitness)
            .then_some(j.block)
    }

    /// Notes `block` as found for `rip` under `stamp` (see
    /// [`Self::jump_target`]).
    #[inline(always)]
    pub fn set_jump_target(
        &mut self,
        rip: u64,
        cs_base: u64,
        bitness: u32,
        stamp: u64,
        block: *const Block,
    ) {
        self.jumps[jump_slot(rip)] = Jump {
            rip,
            cs_base,
            bitness,
            stamp,
            block,
        };
    }

    /// The jump cache's [`JUMP_SLOTS`] entries, for native code to probe
    /// as [`Self::jump_target`] does (its address stays put).
    pub(crate) fn jump_table(&self) -> *const Jump {
        self.jumps.as_ptr()
    }

    /// The cache's part of the link stamp.
    #[inline(always)]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Address size of an instruction: the mode's default, flipped by a 0x67
/// among its legacy prefixes.
fn address_size(bytes: &[u8], bitness: u32) -> u8 {
    let mut flipped = false;
    for &b in bytes.iter().take(15) {
        match b {
            0x67 => flipped = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0xf0 | 0xf2 | 0xf3 => {}
            // A REX byte followed by a legacy prefix is ignored, not the end
            // of the prefixes.
            0x40..=0x4f if bitness == 64 => {}
            _ => break,
        }
    }
    match (bitness, flipped) {
        (64, false) => 8,
        (64, true) | (32, false) | (16, true) => 4,
        _ => 2,
    }
}

/// Operand size of the instruction's main operand.
fn operand_size(i: &Instruction) -> u8 {
    if i.op_count() > 0 && i.op_kind(0) == iced_x86::OpKind::Register {
        let r = i.op_register(0);
        if r.is_gpr() {
            return r.size() as u8;
        }
    }
    let m = i.memory_size().size();
    if m > 0 {
        return m.min(8) as u8;
    }
    i.stack_pointer_increment().unsigned_abs().min(8) as u8
}

/// Instructions after which the next bytes may decode differently or the
/// block loop must re-check state: mode, CS, and control-register changes.
fn ends_block(i: &Instruction) -> bool {
    i.flow_control() != FlowControl::Next
        // A REP string instruction runs in chunks: after one it points RIP
        // back at itself, which only the block loop's next lookup honours.
        || i.has_rep_prefix()
        || i.has_repne_prefix()
        || matches!(
            i.mnemonic(),
            Mnemonic::Mov
                if i.op0_register().is_cr() || i.op0_register().is_segment_register()
        )
        || matches!(
            i.mnemonic(),
            Mnemonic::Wrmsr
                | Mnemonic::Lgdt
                | Mnemonic::Lidt
                | Mnemonic::Popf
                | Mnemonic::Popfd
                | Mnemonic::Popfq
                | Mnemonic::Sti
                | Mnemonic::Cli
                | Mnemonic::Hlt
                // Paging and descriptor-table changes: the rest of the
                // block may have been decoded under the old state.
                | Mnemonic::Invlpg
                | Mnemonic::Invpcid
                | Mnemonic::Lldt
                | Mnemonic::Ltr
        )
}

/// Whether a block ending with `i` leaves CS, the mode and the paging
/// state as they were, so that its successor may be linked: straight-line
/// ends and near branches, calls and returns.
fn keeps_cs(i: &Instruction) -> bool {
    if i.is_invalid() {
        return false;
    }
    match i.flow_control() {
        // CLI and STI end a block for the interrupt window, not for a
        // change of CS or mode.
        FlowControl::Next => {
            !ends_block(i)
                || i.has_rep_prefix()
                || i.has_repne_prefix()
                || matches!(i.mnemonic(), Mnemonic::Cli | Mnemonic::Sti)
        }
        FlowControl::ConditionalBranch => {
            i.is_jcc_short_or_near()
                || matches!(
                    i.mnemonic(),
                    Mnemonic::Loop
                        | Mnemonic::Loope
                        | Mnemonic::Loopne
                        | Mnemonic::Jrcxz
                        | Mnemonic::Jecxz
                        | Mnemonic::Jcxz
                )
        }
        FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => {
            i.is_jmp_short_or_near() || i.is_jmp_near_indirect()
        }
        FlowControl::Call | FlowControl::IndirectCall => {
            i.is_call_near() || i.is_call_near_indirect()
        }
        FlowControl::Return => i.mnemonic() == Mnemonic::Ret,
        _ => false,
    }
}

/// Decodes the block at `rip` (linear `lin`, physical `phys`).
pub(crate) fn decode(
    core: &mut Core,
    phys: u64,
    lin: u64,
    rip: u64,
    bitness: u32,
) -> Result<Block, Stop> {
    let in_page = (PAGE_SIZE - (phys & PAGE_MASK)) as usize;
    let first = in_page.min(MAX_BLOCK_BYTES);
    let first_page = phys >> PAGE_SHIFT;
    // Marked before the bytes are read, so that a write by another vCPU
    // from here on bumps the recorded generation.
    let (first_gen, marked) = core.code.begin_decode(first_page);
    core.marked_code(first_page, marked);
    let mut second_gen = 0;
    let mut buf = [0u8; MAX_BLOCK_BYTES + 15];
    if !core.ram.read(phys, &mut buf[..first]) {
        return Err(Stop::Exit(Exit::InternalError(
            "instruction fetch from a non-RAM address",
        )));
    }
    let mut len = first;
    let mut second_page = None;
    let mut next_fault = None;
    if first == in_page {
        // The last instruction may run into the next page; make up to 15
        // more bytes available if that page is RAM.
        let next_lin = lin.wrapping_add(in_page as u64);
        match core.probe(next_lin, Access::Execute) {
            Ok(next_phys) => {
                let marked;
                (second_gen, marked) = core.code.begin_decode(next_phys >> PAGE_SHIFT);
                core.marked_code(next_phys >> PAGE_SHIFT, marked);
                let mut n = 15;
                while n > 0 && !core.ram.read(next_phys, &mut buf[first..first + n]) {
                    n -= 1;
                }
                if n > 0 {
                    len += n;
                    second_page = Some(next_phys >> PAGE_SHIFT);
                }
            }
            Err(e) => next_fault = Some((next_lin, e)),
        }
    }

    let mut decoder = Decoder::with_ip(bitness, &buf[..len], rip, DecoderOptions::NONE);
    let mut ops = Vec::with_capacity(16);
    // Each op's bytes in `buf`, for native runs.
    let mut spans = Vec::with_capacity(16);
    let mut instr = Instruction::default();
    let mut crossed = false;
    while decoder.can_decode() && decoder.position() < first && ops.len() < MAX_OPS {
        let start = decoder.position();
        decoder.decode_out(&mut instr);
        if instr.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
            // Runs into a page we could not read: end the block before it;
            // if it is the first, fetching it is the error.
            if ops.is_empty() {
                if let Some((next_lin, e)) = next_fault {
                    // The fetch of its tail faults (#PF on the next page).
                    if e.vector == crate::exec::Exception::PF {
                        core.cpu.cr2 = next_lin;
                    }
                    return Err(Stop::Fault(e));
                }
                return Err(Stop::Exit(Exit::InternalError(
                    "instruction fetch runs into a non-RAM address",
                )));
            }
            break;
        }
        let end = decoder.position();
        let asize = address_size(&buf[start..end], bitness);
        let op = Op {
            ea: EaForm::of(&instr, asize, bitness),
            handler: handler_for(&instr),
            next_ip: instr.next_ip(),
            osize: operand_size(&instr),
            asize,
            bitness: bitness as u8,
            regs: [0; 2],
            imm: 0,
            instr,
        };
        let stop = instr.is_invalid() || ends_block(&instr);
        ops.push(op);
        spans.push((start, end));
        if end > first {
            crossed = true;
            break;
        }
        if stop {
            break;
        }
    }
    let target = crate::exec::NativeTarget {
        user: core.user(),
        cpl: core.cpu.cpl(),
        memory: core.mmu.mode == crate::mem::PagingMode::Long,
    };
    let decoded = ops.len();
    let subs =
        crate::exec::specialize_block(&mut ops, &spans, &buf[..len], &mut core.native, target);
    let source = match &subs {
        Some(_) => None,
        None => {
            let spans = spans[..ops.len()].to_vec();
            let end = spans.last().map_or(0, |s| s.1);
            Some(Box::new(NativeSource {
                bytes: buf[..end].to_vec(),
                spans,
                target,
            }))
        }
    };
    let native_subs = subs.unwrap_or_default();
    let (first_gen, marked) = core.code.end_decode(first_page, first_gen);
    core.marked_code(first_page, marked);
    // Only the last instruction crosses into the next page, and a block
    // cut short for native code no longer holds it.
    let second = if crossed && ops.len() == decoded {
        second_page
    } else {
        None
    };
    if let Some(p) = second {
        let marked;
        (second_gen, marked) = core.code.end_decode(p, second_gen);
        core.marked_code(p, marked);
    }
    let (chainable, end_ip) = match ops.last() {
        Some(op) => (keeps_cs(&op.instr), op.next_ip),
        None => (false, rip),
    };
    Ok(Block {
        phys,
        rip,
        bitness,
        ops,
        native_subs,
        pages: [Some(first_page), second],
        gens: [first_gen, second_gen],
        chainable,
        end_ip,
        links: [Cell::new(NO_LINK), Cell::new(NO_LINK)],
        source,
        runs: Cell::new(0),
        native: Cell::new(0),
        native_cpl: target.cpl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_size_prefix() {
        assert_eq!(address_size(&[0x67, 0x8b, 0x00], 64), 4);
        assert_eq!(address_size(&[0x66, 0x67, 0x8b, 0x00], 32), 2);
        assert_eq!(address_size(&[0x48, 0x67, 0x8b], 64), 4);
        assert_eq!(address_size(&[0x48, 0x8b, 0x67], 64), 8);
        assert_eq!(address_size(&[0x8b, 0x00], 16), 2);
    }
}
