//! Native runs: straight-line stretches of register-only guest
//! instructions executed directly on the host processor.
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
//! What keeps this safe for the host: an instruction is copied only when
//! iced decoded it in 64-bit mode as one of a fixed list of mnemonics
//! (none touches memory, the stack, RIP, segment or control state, none
//! can fault on any x86-64 host: LAHF/SAHF, which the first x86-64
//! processors lacked in 64-bit mode, are left out), without LOCK, with every operand a
//! general-purpose register other than RSP or an immediate (LEA's
//! address arithmetic, which reads no memory, is allowed without RIP or
//! RSP). The host stack pointer is never a guest register, so a signal
//! arriving during a run lands on the host stack as usual. DF, IF and the
//! other system flags stay the host's.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::block::Op;

/// Shortest run worth a stub (the stub's entry and exit cost about as
/// much as two dispatches).
pub const MIN_RUN: usize = 3;

/// Bytes of stub code one vCPU may generate; past that, blocks are left
/// to the interpreter.
const ARENA_BYTES: usize = 8 << 20;

/// The status flags (CF PF AF ZF SF OF) in RFLAGS.
const STATUS: u32 = 0x8d5;

/// Whether `i` may run natively (see the module comment).
pub fn eligible(i: &Instruction, bitness: u32) -> bool {
    use Mnemonic as M;
    if bitness != 64 || i.is_invalid() || i.has_lock_prefix() {
        return false;
    }
    let m = i.mnemonic();
    let listed = super::forms::is_register_alu(m)
        || matches!(
            m,
            M::Mul
                | M::Rcl
                | M::Rcr
                | M::Shld
                | M::Shrd
                | M::Bt
                | M::Bts
                | M::Btr
                | M::Btc
                | M::Xchg
                | M::Cbw
                | M::Cwde
                | M::Cdqe
                | M::Cwd
                | M::Cdq
                | M::Cqo
                | M::Clc
                | M::Stc
                | M::Cmc
        )
        || super::forms::is_cmovcc(m)
        || super::forms::is_setcc(m);
    if !listed {
        return false;
    }
    let usable = |r: Register| {
        r.is_gpr()
            && !matches!(
                r,
                Register::RSP | Register::ESP | Register::SP | Register::SPL
            )
    };
    (0..i.op_count()).all(|n| match i.op_kind(n) {
        OpKind::Register => usable(i.op_register(n)),
        OpKind::Memory => {
            m == M::Lea
                && (i.memory_base() == Register::None || usable(i.memory_base()))
                && (i.memory_index() == Register::None || usable(i.memory_index()))
        }
        k => super::forms::is_immediate(k),
    })
}

/// Executable memory for stubs, bump-allocated and never freed (a stub
/// of a dropped block is simply unused). Never writable and executable
/// at once: the pages a new stub goes to are made writable for the copy
/// and executable again before anything can run them.
pub struct Arena {
    base: *mut u8,
    used: usize,
    /// A block's stubs did not fit: the owner should drop every block
    /// and [`Arena::reset`].
    full: bool,
}

// SAFETY: the arena is owned by one vCPU's `Core` and moves between
// threads with it; its pages are only written while that `Core` is
// borrowed mutably.
unsafe impl Send for Arena {}

impl Arena {
    /// A fresh arena, or `None` where the host refuses executable memory,
    /// is not x86-64, or `VESSEL_EMU_NATIVE=0` turns native runs off.
    pub fn new() -> Option<Arena> {
        if !cfg!(target_arch = "x86_64")
            || std::env::var_os("VESSEL_EMU_NATIVE").is_some_and(|v| v == "0")
        {
            return None;
        }
        // SAFETY: an anonymous private mapping; no existing memory is
        // touched. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Arena {
            base: p.cast(),
            used: 0,
            full: false,
        })
    }

    /// Whether stubs stopped fitting (see [`Arena::reset`]).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Makes the whole arena free again. The caller must have dropped
    /// every block holding a stub of this arena.
    pub fn reset(&mut self) {
        self.used = 0;
        self.full = false;
    }

    /// [`Arena::reset`], and the pages that held stubs go back to the host
    /// (an idle vCPU keeps no resident code it no longer runs). The
    /// caller must have dropped every block holding a stub of this arena.
    pub fn release(&mut self) {
        const PAGE: usize = 4096;
        let used = self.used.min(ARENA_BYTES).next_multiple_of(PAGE);
        self.reset();
        if used == 0 {
            return;
        }
        // SAFETY: `[base, base + used)` lies inside the private anonymous
        // mapping; no stub in it can run (no block refers to one), and its
        // pages read back as zeros until stubs are copied in again.
        unsafe {
            libc::madvise(self.base.cast(), used, libc::MADV_DONTNEED);
        }
    }

    /// Copies `code` (a block's stubs, one write-protect round trip for
    /// all of them) in; its address, or `None` when the arena is full.
    fn add(&mut self, code: &[u8]) -> Option<usize> {
        if code.len() > ARENA_BYTES - self.used {
            self.full = true;
            return None;
        }
        const PAGE: usize = 4096;
        let first = self.used / PAGE * PAGE;
        let span = (self.used + code.len()).next_multiple_of(PAGE) - first;
        // SAFETY: `[first, first + span)` lies inside the mapping (the
        // check above, rounded to pages of a page-multiple mapping). No
        // stub runs while this vCPU decodes, so its pages may be
        // non-executable for the copy; `used + code.len()` is inside the
        // mapping, and the stub is published only after this returns.
        unsafe {
            let pages = self.base.add(first).cast::<libc::c_void>();
            if libc::mprotect(pages, span, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return None;
            }
            let dst = self.base.add(self.used);
            std::ptr::copy_nonoverlapping(code.as_ptr(), dst, code.len());
            if libc::mprotect(pages, span, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                // Stubs published earlier on these pages must stay
                // runnable: fall back to writable and executable, and add
                // no more stubs. Failing that, no safe state is left.
                self.used = ARENA_BYTES;
                let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
                if libc::mprotect(pages, span, rwx) != 0 {
                    eprintln!("emu: cannot make native stubs executable again");
                    std::process::abort();
                }
                return None;
            }
            let at = dst as usize;
            self.used += code.len().next_multiple_of(16);
            Some(at)
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no stub runs once the `Core`
        // owning the arena is gone.
        unsafe { libc::munmap(self.base.cast(), ARENA_BYTES) };
    }
}

/// What a run needs loaded and stored: the general-purpose registers it
/// touches (bit n = register n, read or written, implicit operands
/// included; whole registers, since a partial write keeps the rest),
/// whether the incoming status flags may matter (read before being
/// written, or passed through by a shift or rotate whose count may be
/// zero), and whether it writes any flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    regs: u16,
    flags_in: bool,
    flags_out: bool,
}

fn footprint(run: &[Instruction]) -> Footprint {
    // iced's RflagsBits: OF SF ZF AF CF PF.
    const ALL: u32 = 0x3f;
    let mut info = iced_x86::InstructionInfoFactory::new();
    let mut regs = 0u16;
    let mut written = 0u32;
    let mut flags_in = false;
    let mut flags_out = false;
    for i in run {
        for used in info.info(i).used_registers() {
            let full = used.register().full_register();
            if full.is_gpr64() {
                regs |= 1 << (full as u32 - Register::RAX as u32);
            }
        }
        if i.rflags_read() & ALL & !written != 0 {
            flags_in = true;
        }
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
        if may_keep_flags {
            flags_in = true;
        } else {
            // Flags left undefined are not counted: some hosts leave them
            // unchanged, and the guest's own values are the better answer
            // than whatever the emulator had in the host's flags.
            written |= (i.rflags_written() | i.rflags_cleared() | i.rflags_set()) & ALL;
        }
        flags_out |= i.rflags_modified() != 0;
    }
    // The stub stores all six status flags: any the run does not
    // overwrite must come in from the guest to go back out unchanged.
    if flags_out && written != ALL {
        flags_in = true;
    }
    Footprint {
        regs,
        flags_in,
        flags_out,
    }
}

/// The stub for guest instruction bytes `body` with footprint `fp`:
/// `extern "C" fn(gpr: *mut u64 (16 registers), rflags: *mut u64)`.
fn stub(body: &[u8], fp: Footprint) -> Vec<u8> {
    let used = |n: &u8| fp.regs & (1 << n) != 0;
    let mut c = Vec::with_capacity(body.len() + 200);
    // Callee-saved registers: rbx, rbp, r12-r15.
    c.extend_from_slice(&[0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57]);
    // push rsi (flags pointer); push rdi (register file pointer).
    c.extend_from_slice(&[0x56, 0x57]);
    if fp.flags_in {
        // Host flags with the guest's status bits: pushfq; mov rax,
        // [rsi]; and rax, STATUS; and qword [rsp], !STATUS;
        // or [rsp], rax; popfq.
        c.push(0x9c);
        c.extend_from_slice(&[0x48, 0x8b, 0x06]);
        c.extend_from_slice(&[0x48, 0x25]);
        c.extend_from_slice(&STATUS.to_le_bytes());
        c.extend_from_slice(&[0x48, 0x81, 0x24, 0x24]);
        c.extend_from_slice(&(!STATUS).to_le_bytes());
        c.extend_from_slice(&[0x48, 0x09, 0x04, 0x24]);
        c.push(0x9d);
    }
    // Guest registers from [rdi + 8n]: RSP (4) never, RDI (7) last.
    for n in (0..16u8).filter(|n| *n != 4 && *n != 7).filter(used) {
        load_store(&mut c, 0x8b, n);
    }
    if used(&7) {
        load_store(&mut c, 0x8b, 7);
    }
    c.extend_from_slice(body);
    // push rdi (guest rdi); mov rdi, [rsp + 8] (register file pointer).
    c.push(0x57);
    c.extend_from_slice(&[0x48, 0x8b, 0x7c, 0x24, 0x08]);
    for n in (0..16u8).filter(|n| *n != 4 && *n != 7).filter(used) {
        load_store(&mut c, 0x89, n);
    }
    // pop rax (guest rdi); mov [rdi + 56], rax.
    c.push(0x58);
    if used(&7) {
        load_store(&mut c, 0x89, 0);
        let fix = c.len() - 1;
        c[fix] = 56;
    }
    if fp.flags_out {
        // pushfq; pop rax; mov rsi, [rsp + 8]; mov rcx, [rsi];
        // and rcx, !STATUS; and rax, STATUS; or rcx, rax; mov [rsi], rcx.
        c.extend_from_slice(&[0x9c, 0x58]);
        c.extend_from_slice(&[0x48, 0x8b, 0x74, 0x24, 0x08]);
        c.extend_from_slice(&[0x48, 0x8b, 0x0e]);
        c.extend_from_slice(&[0x48, 0x81, 0xe1]);
        c.extend_from_slice(&(!STATUS).to_le_bytes());
        c.extend_from_slice(&[0x48, 0x25]);
        c.extend_from_slice(&STATUS.to_le_bytes());
        c.extend_from_slice(&[0x48, 0x09, 0xc1]);
        c.extend_from_slice(&[0x48, 0x89, 0x0e]);
    }
    // add rsp, 16; restore the callee-saved registers; ret.
    c.extend_from_slice(&[0x48, 0x83, 0xc4, 0x10]);
    c.extend_from_slice(&[0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b]);
    c.push(0xc3);
    c
}

/// `mov reg(n), [rdi + 8n]` (opcode 0x8b) or `mov [rdi + 8n], reg(n)`
/// (0x89), with a one-byte displacement.
fn load_store(c: &mut Vec<u8>, opcode: u8, n: u8) {
    let rex = 0x48 | if n >= 8 { 0x04 } else { 0 };
    c.extend_from_slice(&[rex, opcode, 0x40 | ((n & 7) << 3) | 7, n * 8]);
}

/// Runs the stub whose address is in `op.imm`.
pub(super) fn run(c: &mut super::Core, op: &Op) -> super::OpResult {
    c.native_runs += 1;
    // SAFETY: `op.imm` was set by `compile_runs` to a stub in this vCPU's
    // arena, which lives as long as the `Core` (blocks are per vCPU), and
    // the stub follows the C calling convention with these two pointers,
    // touching only the 16 registers and the flags word they point to.
    unsafe {
        let f: extern "C" fn(*mut u64, *mut u64) = std::mem::transmute(op.imm as usize);
        f(c.cpu.gpr.as_mut_ptr(), &mut c.cpu.rflags);
    }
    Ok(())
}

/// Replaces each run of at least [`MIN_RUN`] eligible instructions among
/// the first `limit` of `ops` (op `k`'s bytes are `bytes[spans[k].0..
/// spans[k].1]`, for `k < limit`) by one op running its stub.
pub fn compile_runs(
    arena: &mut Option<Arena>,
    ops: &mut Vec<Op>,
    limit: usize,
    spans: &[(usize, usize)],
    bytes: &[u8],
) {
    let Some(arena) = arena.as_mut() else {
        return;
    };
    if arena.is_full() {
        return;
    }
    let eligible: Vec<bool> = ops
        .iter()
        .enumerate()
        .map(|(k, op)| k < limit && eligible(&op.instr, u32::from(op.bitness)))
        .collect();
    // The runs as (first op, end op, offset of the stub in `code`).
    let mut runs = Vec::new();
    let mut code = Vec::new();
    let mut k = 0;
    while k < ops.len() {
        let mut end = k;
        while end < ops.len() && eligible[end] {
            end += 1;
        }
        if end - k >= MIN_RUN {
            let mut body = Vec::new();
            for (s, e) in &spans[k..end] {
                body.extend_from_slice(&bytes[*s..*e]);
            }
            let instrs: Vec<Instruction> = ops[k..end].iter().map(|op| op.instr).collect();
            runs.push((k, end, code.len()));
            code.extend_from_slice(&stub(&body, footprint(&instrs)));
            code.resize(code.len().next_multiple_of(16), 0xcc);
        }
        k = end.max(k + 1);
    }
    if runs.is_empty() {
        return;
    }
    let Some(at) = arena.add(&code) else {
        return;
    };
    let mut out = Vec::with_capacity(ops.len());
    let mut next = 0;
    for (first, end, offset) in runs {
        out.extend(ops[next..first].iter().cloned());
        let mut op = ops[first].clone();
        op.handler = run;
        op.imm = (at + offset) as u64;
        op.next_ip = ops[end - 1].next_ip;
        out.push(op);
        next = end;
    }
    out.extend(ops[next..].iter().cloned());
    *ops = out;
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    fn decoded(bytes: &[u8]) -> iced_x86::Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn only_register_only_instructions_run_natively() {
        let yes: &[&[u8]] = &[
            &[0x48, 0x01, 0xd8],             // add rax, rbx
            &[0x4d, 0x0f, 0xaf, 0xee],       // imul r13, r14
            &[0x48, 0x8d, 0x44, 0x98, 0x10], // lea rax, [rax + rbx*4 + 0x10]
            &[0x0f, 0x92, 0xc0],             // setb al
            &[0x88, 0xdc],                   // mov ah, bl
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
            &[0x48, 0x0f, 0xbc, 0xc3],       // bsf (differs with TZCNT hosts)
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
