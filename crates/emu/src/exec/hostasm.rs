//! The few host instructions native-run stubs are built from, encoded by
//! hand: a stub is made for every decoded block, so building one must
//! cost little more than copying bytes (iced's encoder is used only to
//! re-encode guest instructions whose memory operand changes).
//!
//! Registers are numbered as in the instruction encoding (0 = RAX, ...,
//! 4 = RSP, 15 = R15). Every memory operand is encoded with a SIB byte
//! and an 8-bit displacement where it fits, else a 32-bit one: one form
//! covers every base and index, RSP, RBP, R12 and R13 included.

pub const RAX: u8 = 0;
pub const RCX: u8 = 1;
pub const RDX: u8 = 2;
#[cfg(test)]
pub const R8: u8 = 8;
pub const RSI: u8 = 6;
pub const RSP: u8 = 4;
/// AH as a byte operand without a REX prefix (the number RSP has elsewhere).
pub const AH: u8 = 4;
pub const RDI: u8 = 7;

/// `[base + index << shift + disp]`; no base means an absolute 32-bit
/// (sign-extended) address plus the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub base: Option<u8>,
    pub index: Option<(u8, u8)>,
    pub disp: i32,
}

impl Addr {
    pub fn at(base: u8, disp: i32) -> Addr {
        Addr {
            base: Some(base),
            index: None,
            disp,
        }
    }
}

/// A place in the code a rel32 jump can be patched to.
#[derive(Debug, Clone, Copy)]
pub struct Fixup(usize);

impl Fixup {
    /// Where its rel32 field is in the code.
    pub fn at(self) -> usize {
        self.0
    }
}

/// Condition codes (the low nibble of Jcc's opcode).
pub const CC_AE: u8 = 0x3;
pub const CC_E: u8 = 0x4;
pub const CC_A: u8 = 0x7;
pub const CC_NE: u8 = 0x5;
pub const CC_LE: u8 = 0xe;

#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    pub fn len(&self) -> usize {
        self.code.len()
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    fn rex(&mut self, w: bool, r: u8, x: u8, b: u8) {
        let rex = 0x40 | (u8::from(w) << 3) | ((r >> 3) << 2) | ((x >> 3) << 1) | (b >> 3);
        if rex != 0x40 {
            self.code.push(rex);
        }
    }

    /// `opcode` with a memory operand: REX (W when `w`), the opcode, then
    /// ModRM (`reg` in its reg field), SIB and disp32.
    pub fn mem(&mut self, w: bool, opcode: &[u8], reg: u8, a: Addr) {
        let (index, shift) = a.index.unwrap_or((RSP, 0));
        let base = a.base.unwrap_or(5);
        self.rex(w, reg, index, if a.base.is_some() { base } else { 0 });
        self.bytes(opcode);
        let short = a.base.is_some() && i8::try_from(a.disp).is_ok();
        let md = match (a.base, short) {
            (None, _) => 0x00,
            (Some(_), true) => 0x40,
            (Some(_), false) => 0x80,
        };
        self.code.push(md | ((reg & 7) << 3) | 4);
        self.code
            .push((shift << 6) | ((index & 7) << 3) | (base & 7));
        if short {
            self.code.push(a.disp as u8);
        } else {
            self.bytes(&a.disp.to_le_bytes());
        }
    }

    /// `opcode` with two 64-bit registers: `reg` in ModRM's reg field,
    /// `rm` in its r/m field.
    pub fn rr(&mut self, opcode: &[u8], reg: u8, rm: u8) {
        self.rex(true, reg, 0, rm);
        self.bytes(opcode);
        self.code.push(0xc0 | ((reg & 7) << 3) | (rm & 7));
    }

    pub fn push(&mut self, r: u8) {
        self.rex(false, 0, 0, r);
        self.code.push(0x50 + (r & 7));
    }

    pub fn pop(&mut self, r: u8) {
        self.rex(false, 0, 0, r);
        self.code.push(0x58 + (r & 7));
    }

    /// `push qword [a]`.
    pub fn push_mem(&mut self, a: Addr) {
        self.mem(false, &[0xff], 6, a);
    }

    pub fn push_imm(&mut self, v: i32) {
        self.code.push(0x68);
        self.bytes(&v.to_le_bytes());
    }

    pub fn pushfq(&mut self) {
        self.code.push(0x9c);
    }

    /// `lahf`: AH = SF:ZF:0:AF:0:PF:1:CF; the flags are left as they are.
    pub fn lahf(&mut self) {
        self.code.push(0x9f);
    }

    /// `sahf`: SF, ZF, AF, PF and CF from AH (OF is left as it is).
    pub fn sahf(&mut self) {
        self.code.push(0x9e);
    }

    /// `seto al`.
    pub fn seto_al(&mut self) {
        self.bytes(&[0x0f, 0x90, 0xc0]);
    }

    /// `lea eax, [rax * 8 + disp]` (no flags change).
    pub fn lea_eax_rax8(&mut self, disp: i32) {
        self.bytes(&[0x8d, 0x04, 0xc5]);
        self.bytes(&disp.to_le_bytes());
    }

    /// `add ah, imm`.
    pub fn add_ah(&mut self, imm: u8) {
        self.bytes(&[0x80, 0xc4, imm]);
    }

    /// `and al, imm`.
    pub fn and_al(&mut self, imm: u8) {
        self.bytes(&[0x24, imm]);
    }

    /// `and ah, imm`.
    pub fn and_ah(&mut self, imm: u8) {
        self.bytes(&[0x80, 0xe4, imm]);
    }

    /// `or al, ah`.
    pub fn or_al_ah(&mut self) {
        self.bytes(&[0x08, 0xe0]);
    }

    /// `mov ah, al`.
    pub fn mov_ah_al(&mut self) {
        self.bytes(&[0x88, 0xc4]);
    }

    pub fn popfq(&mut self) {
        self.code.push(0x9d);
    }

    /// `mov dst, [a]`.
    pub fn load(&mut self, dst: u8, a: Addr) {
        self.mem(true, &[0x8b], dst, a);
    }

    /// `mov [a], src`.
    pub fn store(&mut self, a: Addr, src: u8) {
        self.mem(true, &[0x89], src, a);
    }

    /// `mov qword [a], imm` (sign-extended).
    pub fn store_imm(&mut self, a: Addr, imm: i32) {
        self.mem(true, &[0xc7], 0, a);
        self.bytes(&imm.to_le_bytes());
    }

    pub fn lea(&mut self, dst: u8, a: Addr) {
        self.mem(true, &[0x8d], dst, a);
    }

    /// `add dst, [a]`.
    pub fn add_load(&mut self, dst: u8, a: Addr) {
        self.mem(true, &[0x03], dst, a);
    }

    /// `cmp r, [a]`.
    pub fn cmp_load(&mut self, r: u8, a: Addr) {
        self.mem(true, &[0x3b], r, a);
    }

    /// `sub qword [a], imm` (sign-extended).
    pub fn sub_mem(&mut self, a: Addr, imm: i32) {
        self.mem(true, &[0x81], 5, a);
        self.bytes(&imm.to_le_bytes());
    }

    /// `cmp byte [a], imm`.
    pub fn cmp_byte(&mut self, a: Addr, imm: u8) {
        self.mem(false, &[0x80], 7, a);
        self.code.push(imm);
    }

    /// `xor dst, src`.
    pub fn xor(&mut self, dst: u8, src: u8) {
        self.rr(&[0x31], src, dst);
    }

    /// `imul dst, src, imm`.
    pub fn imul_imm(&mut self, dst: u8, src: u8, imm: i32) {
        self.rr(&[0x69], dst, src);
        self.bytes(&imm.to_le_bytes());
    }

    /// `cmp dword [a], imm`.
    pub fn cmp_dword(&mut self, a: Addr, imm: i32) {
        self.mem(false, &[0x81], 7, a);
        self.bytes(&imm.to_le_bytes());
    }

    /// `jmp qword [a]`.
    pub fn jmp_mem(&mut self, a: Addr) {
        self.mem(false, &[0xff], 4, a);
    }

    /// `and qword [a], imm` (sign-extended).
    pub fn and_mem(&mut self, a: Addr, imm: i32) {
        self.mem(true, &[0x81], 4, a);
        self.bytes(&imm.to_le_bytes());
    }

    /// `or qword [a], src`.
    pub fn or_mem(&mut self, a: Addr, src: u8) {
        self.mem(true, &[0x09], src, a);
    }

    /// `lea dst, [rip + rel32]`, pointed later with [`Asm::patch`] at an
    /// offset in the code.
    pub fn lea_rip(&mut self, dst: u8) -> Fixup {
        self.rex(true, dst, 0, 0);
        self.bytes(&[0x8d, ((dst & 7) << 3) | 5, 0, 0, 0, 0]);
        Fixup(self.code.len() - 4)
    }

    /// `mov dst, src`.
    pub fn mov(&mut self, dst: u8, src: u8) {
        self.rr(&[0x89], src, dst);
    }

    pub fn mov_imm64(&mut self, dst: u8, v: u64) {
        self.rex(true, 0, 0, dst);
        self.code.push(0xb8 + (dst & 7));
        self.bytes(&v.to_le_bytes());
    }

    /// `test a, b`.
    pub fn test(&mut self, a: u8, b: u8) {
        self.rr(&[0x85], b, a);
    }

    /// `or dst, src`.
    pub fn or(&mut self, dst: u8, src: u8) {
        self.rr(&[0x09], src, dst);
    }

    fn shift(&mut self, ext: u8, r: u8, by: u8) {
        self.rex(true, 0, 0, r);
        self.bytes(&[0xc1, 0xc0 | (ext << 3) | (r & 7), by]);
    }

    pub fn shr(&mut self, r: u8, by: u8) {
        self.shift(5, r, by);
    }

    pub fn shl(&mut self, r: u8, by: u8) {
        self.shift(4, r, by);
    }

    /// `and r32, imm` (zeroes the upper half).
    pub fn and32(&mut self, r: u8, imm: u32) {
        self.rex(false, 0, 0, r);
        self.bytes(&[0x81, 0xe0 | (r & 7)]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `and r64, imm` (sign-extended).
    pub fn and64(&mut self, r: u8, imm: i32) {
        self.rex(true, 0, 0, r);
        self.bytes(&[0x81, 0xe0 | (r & 7)]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `cmp r64, imm` (sign-extended).
    pub fn cmp_imm(&mut self, r: u8, imm: i32) {
        self.rex(true, 0, 0, r);
        self.bytes(&[0x81, 0xf8 | (r & 7)]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `test r64, imm` (sign-extended).
    pub fn test_imm(&mut self, r: u8, imm: i32) {
        self.rex(true, 0, 0, r);
        self.bytes(&[0xf7, 0xc0 | (r & 7)]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `movdqu x, [a]` (XMM register `x`).
    pub fn movdqu_load(&mut self, x: u8, a: Addr) {
        self.code.push(0xf3);
        self.mem(false, &[0x0f, 0x6f], x, a);
    }

    /// `movdqu [a], x`.
    pub fn movdqu_store(&mut self, a: Addr, x: u8) {
        self.code.push(0xf3);
        self.mem(false, &[0x0f, 0x7f], x, a);
    }

    /// `stmxcsr [a]`.
    pub fn stmxcsr(&mut self, a: Addr) {
        self.mem(false, &[0x0f, 0xae], 3, a);
    }

    /// `ldmxcsr [a]`.
    pub fn ldmxcsr(&mut self, a: Addr) {
        self.mem(false, &[0x0f, 0xae], 2, a);
    }

    /// `call qword [a]`.
    pub fn call_mem(&mut self, a: Addr) {
        self.mem(false, &[0xff], 2, a);
    }

    /// `ret imm16`: returns, then drops `n` bytes of arguments.
    pub fn ret_pop(&mut self, n: u16) {
        self.code.push(0xc2);
        self.bytes(&n.to_le_bytes());
    }

    /// `or r64, imm` (sign-extended).
    pub fn or64(&mut self, r: u8, imm: i32) {
        self.rex(true, 0, 0, r);
        self.bytes(&[0x81, 0xc8 | (r & 7)]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `add rsp, imm`.
    pub fn add_rsp(&mut self, imm: i8) {
        self.bytes(&[0x48, 0x83, 0xc4, imm as u8]);
    }

    pub fn ret(&mut self) {
        self.code.push(0xc3);
    }

    /// `jcc rel32` to a target patched later.
    pub fn jcc(&mut self, cc: u8) -> Fixup {
        self.bytes(&[0x0f, 0x80 | cc, 0, 0, 0, 0]);
        Fixup(self.code.len() - 4)
    }

    /// `jmp rel32` to a target patched later.
    pub fn jmp(&mut self) -> Fixup {
        self.bytes(&[0xe9, 0, 0, 0, 0]);
        Fixup(self.code.len() - 4)
    }

    /// Points the jump of `f` at `target` (an offset in the code).
    pub fn patch(&mut self, f: Fixup, target: usize) {
        let rel = target as i64 - (f.0 as i64 + 4);
        // Stubs are far shorter than 2 GiB.
        let rel = i32::try_from(rel).unwrap_or(i32::MAX);
        self.code[f.0..f.0 + 4].copy_from_slice(&rel.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    fn one(build: impl FnOnce(&mut Asm)) -> iced_x86::Instruction {
        let mut a = Asm::default();
        build(&mut a);
        let mut d = Decoder::with_ip(64, &a.code, 0, DecoderOptions::NONE);
        let i = d.decode();
        assert!(!i.is_invalid(), "{:02x?}", a.code);
        assert_eq!(i.len(), a.code.len(), "one instruction: {:02x?}", a.code);
        i
    }

    fn reg(n: u8) -> Register {
        iced_x86::Register::RAX + u32::from(n)
    }

    #[test]
    fn memory_operands_of_every_base_and_index() {
        for base in 0..16u8 {
            for index in [None, Some((1u8, 3u8)), Some((12, 0)), Some((13, 2))] {
                for r in [0u8, 5, 8, 15] {
                    let addr = Addr {
                        base: Some(base),
                        index,
                        disp: -0x1234,
                    };
                    let i = one(|a| a.load(r, addr));
                    assert_eq!(i.mnemonic(), Mnemonic::Mov);
                    assert_eq!(i.op0_register(), reg(r));
                    assert_eq!(i.memory_base(), reg(base));
                    let (ix, sh) = index.map_or((Register::None, 0), |(n, s)| (reg(n), s));
                    assert_eq!(i.memory_index(), ix);
                    if ix != Register::None {
                        assert_eq!(i.memory_index_scale(), 1 << sh);
                    }
                    assert_eq!(i.memory_displacement64(), (-0x1234i64) as u64);
                }
            }
        }
        for disp in [0, 8, -128, 127, 128, -129] {
            let i = one(|a| a.load(RAX, Addr::at(RSP, disp)));
            assert_eq!(
                (i.memory_base(), i.memory_displacement64()),
                (Register::RSP, disp as i64 as u64)
            );
            let short = i8::try_from(disp).is_ok();
            assert_eq!(i.memory_displ_size() == 1, short, "disp {disp}");
        }
        let i = one(|a| {
            a.lea(
                3,
                Addr {
                    base: None,
                    index: Some((9, 1)),
                    disp: 0x40,
                },
            )
        });
        assert_eq!(
            (i.memory_base(), i.memory_index()),
            (Register::None, Register::R9)
        );
        assert_eq!(i.memory_displacement64(), 0x40);
    }

    #[test]
    fn chain_helpers_encode_what_they_say() {
        let i = one(|a| a.sub_mem(Addr::at(RAX, 0x48), 7));
        assert_eq!(
            (i.mnemonic(), i.memory_base(), i.immediate32()),
            (Mnemonic::Sub, Register::RAX, 7)
        );
        assert_eq!(i.memory_size(), iced_x86::MemorySize::UInt64);
        let i = one(|a| a.cmp_byte(Addr::at(R8, 0), 0));
        assert_eq!(
            (i.mnemonic(), i.memory_base(), i.memory_size()),
            (Mnemonic::Cmp, Register::R8, iced_x86::MemorySize::UInt8)
        );
        let i = one(|a| a.xor(RDX, R8));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.op1_register()),
            (Mnemonic::Xor, Register::RDX, Register::R8)
        );
        let i = one(|a| a.imul_imm(R8, RDX, 40));
        assert_eq!(
            (
                i.mnemonic(),
                i.op0_register(),
                i.op1_register(),
                i.immediate32()
            ),
            (Mnemonic::Imul, Register::R8, Register::RDX, 40)
        );
        assert_eq!(one(|a| a.lahf()).mnemonic(), Mnemonic::Lahf);
        assert_eq!(one(|a| a.sahf()).mnemonic(), Mnemonic::Sahf);
        let i = one(|a| a.seto_al());
        assert_eq!(
            (i.mnemonic(), i.op0_register()),
            (Mnemonic::Seto, Register::AL)
        );
        let i = one(|a| a.lea_eax_rax8(2));
        assert_eq!(
            (
                i.mnemonic(),
                i.op0_register(),
                i.memory_base(),
                i.memory_index(),
                i.memory_index_scale(),
                i.memory_displacement64()
            ),
            (
                Mnemonic::Lea,
                Register::EAX,
                Register::None,
                Register::RAX,
                8,
                2
            )
        );
        let i = one(|a| a.add_ah(0x76));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8()),
            (Mnemonic::Add, Register::AH, 0x76)
        );
        let i = one(|a| a.and_al(0x2a));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8()),
            (Mnemonic::And, Register::AL, 0x2a)
        );
        let i = one(|a| a.and_ah(0xd4));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8()),
            (Mnemonic::And, Register::AH, 0xd4)
        );
        let i = one(|a| a.or_al_ah());
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.op1_register()),
            (Mnemonic::Or, Register::AL, Register::AH)
        );
        let i = one(|a| a.mov_ah_al());
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.op1_register()),
            (Mnemonic::Mov, Register::AH, Register::AL)
        );
        // A byte store of AH to the stack takes no REX prefix (with one,
        // the register would be SPL).
        let i = one(|a| a.mem(false, &[0x88], AH, Addr::at(RSP, 0x10)));
        assert_eq!(
            (i.mnemonic(), i.op1_register(), i.memory_base()),
            (Mnemonic::Mov, Register::AH, Register::RSP)
        );
        let i = one(|a| a.jmp_mem(Addr::at(RSP, 0x48)));
        assert_eq!(
            (i.mnemonic(), i.memory_base(), i.memory_size()),
            (
                Mnemonic::Jmp,
                Register::RSP,
                iced_x86::MemorySize::QwordOffset
            )
        );
        let i = one(|a| a.and_mem(Addr::at(RSP, 0x10), !0x8d5));
        assert_eq!(
            (i.mnemonic(), i.memory_size(), i.immediate32to64()),
            (Mnemonic::And, iced_x86::MemorySize::UInt64, !0x8d5)
        );
        let i = one(|a| a.or_mem(Addr::at(RSP, 0x10), 9));
        assert_eq!(
            (i.mnemonic(), i.op1_register(), i.memory_size()),
            (Mnemonic::Or, Register::R9, iced_x86::MemorySize::UInt64)
        );
        let mut a = Asm::default();
        let f = a.lea_rip(10);
        a.ret();
        a.patch(f, 1000);
        let i = Decoder::with_ip(64, &a.code, 0, DecoderOptions::NONE).decode();
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.memory_base()),
            (Mnemonic::Lea, Register::R10, Register::RIP)
        );
        assert_eq!(i.memory_displacement64(), 1000);
        let i = one(|a| a.cmp_dword(Addr::at(RDX, 0x10), 64));
        assert_eq!(
            (
                i.mnemonic(),
                i.memory_base(),
                i.memory_size(),
                i.immediate32()
            ),
            (
                Mnemonic::Cmp,
                Register::RDX,
                iced_x86::MemorySize::UInt32,
                64
            )
        );
    }

    #[test]
    fn each_helper_encodes_what_it_says() {
        let i = one(|a| a.push(12));
        assert_eq!(
            (i.mnemonic(), i.op0_register()),
            (Mnemonic::Push, Register::R12)
        );
        let i = one(|a| a.pop(3));
        assert_eq!(
            (i.mnemonic(), i.op0_register()),
            (Mnemonic::Pop, Register::RBX)
        );
        let i = one(|a| a.push_mem(Addr::at(RDI, 24)));
        assert_eq!(
            (i.mnemonic(), i.memory_base()),
            (Mnemonic::Push, Register::RDI)
        );
        let i = one(|a| a.push_imm(17));
        assert_eq!((i.mnemonic(), i.immediate32()), (Mnemonic::Push, 17));
        let i = one(|a| a.store(Addr::at(RSP, 8), 9));
        assert_eq!(
            (i.mnemonic(), i.op1_register()),
            (Mnemonic::Mov, Register::R9)
        );
        assert_eq!(i.op0_kind(), OpKind::Memory);
        let i = one(|a| a.store_imm(Addr::at(11, 0), -5));
        assert_eq!(
            (i.mnemonic(), i.memory_base(), i.immediate32to64()),
            (Mnemonic::Mov, Register::R11, -5)
        );
        let i = one(|a| a.add_load(10, Addr::at(RSP, 16)));
        assert_eq!(
            (i.mnemonic(), i.op0_register()),
            (Mnemonic::Add, Register::R10)
        );
        let i = one(|a| a.cmp_load(11, Addr::at(2, 0)));
        assert_eq!(
            (i.mnemonic(), i.op0_register()),
            (Mnemonic::Cmp, Register::R11)
        );
        let i = one(|a| a.mov(8, 1));
        assert_eq!(
            (i.op0_register(), i.op1_register()),
            (Register::R8, Register::RCX)
        );
        let i = one(|a| a.mov_imm64(13, 0x1122_3344_5566_7788));
        assert_eq!(
            (i.op0_register(), i.immediate64()),
            (Register::R13, 0x1122_3344_5566_7788)
        );
        let i = one(|a| a.test(2, 10));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.op1_register()),
            (Mnemonic::Test, Register::RDX, Register::R10)
        );
        let i = one(|a| a.or(1, 0));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.op1_register()),
            (Mnemonic::Or, Register::RCX, Register::RAX)
        );
        let i = one(|a| a.shr(15, 12));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8()),
            (Mnemonic::Shr, Register::R15, 12)
        );
        let i = one(|a| a.shl(0, 5));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8()),
            (Mnemonic::Shl, Register::RAX, 5)
        );
        let i = one(|a| a.and32(12, 0x3ff));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate32()),
            (Mnemonic::And, Register::R12D, 0x3ff)
        );
        let i = one(|a| a.and64(1, -8));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate32to64()),
            (Mnemonic::And, Register::RCX, -8)
        );
        let i = one(|a| a.cmp_imm(RCX, 512));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate32to64()),
            (Mnemonic::Cmp, Register::RCX, 512)
        );
        let i = one(|a| a.test_imm(10, 15));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate32to64()),
            (Mnemonic::Test, Register::R10, 15)
        );
        for x in [0u8, 7, 8, 15] {
            let xmm = Register::XMM0 + u32::from(x);
            let i = one(|a| a.movdqu_load(x, Addr::at(RAX, 0x30)));
            assert_eq!(
                (i.mnemonic(), i.op0_register(), i.memory_base()),
                (Mnemonic::Movdqu, xmm, Register::RAX)
            );
            let i = one(|a| a.movdqu_store(Addr::at(11, 0x30), x));
            assert_eq!(
                (i.mnemonic(), i.op1_register(), i.memory_base()),
                (Mnemonic::Movdqu, xmm, Register::R11)
            );
        }
        let i = one(|a| a.stmxcsr(Addr::at(RSP, 0xa0)));
        assert_eq!(
            (i.mnemonic(), i.memory_base()),
            (Mnemonic::Stmxcsr, Register::RSP)
        );
        let i = one(|a| a.ldmxcsr(Addr::at(RSP, 0x98)));
        assert_eq!(
            (i.mnemonic(), i.memory_base()),
            (Mnemonic::Ldmxcsr, Register::RSP)
        );
        let i = one(|a| a.call_mem(Addr::at(RSP, 0x88)));
        assert_eq!(
            (i.mnemonic(), i.memory_base(), i.memory_displacement64()),
            (Mnemonic::Call, Register::RSP, 0x88)
        );
        let i = one(|a| a.ret_pop(8));
        assert_eq!((i.mnemonic(), i.immediate16()), (Mnemonic::Ret, 8));
        let i = one(|a| a.or64(9, 0x202));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate32to64()),
            (Mnemonic::Or, Register::R9, 0x202)
        );
        let i = one(|a| a.add_rsp(24));
        assert_eq!(
            (i.mnemonic(), i.op0_register(), i.immediate8to64()),
            (Mnemonic::Add, Register::RSP, 24)
        );
        assert_eq!(one(|a| a.pushfq()).mnemonic(), Mnemonic::Pushfq);
        assert_eq!(one(|a| a.popfq()).mnemonic(), Mnemonic::Popfq);
        assert_eq!(one(|a| a.ret()).mnemonic(), Mnemonic::Ret);
    }

    #[test]
    fn jumps_land_where_patched() {
        let mut a = Asm::default();
        let f = a.jcc(CC_NE);
        let g = a.jmp();
        a.ret();
        let target = a.len() - 1;
        a.patch(f, target);
        a.patch(g, 0);
        let mut d = Decoder::with_ip(64, &a.code, 0, DecoderOptions::NONE);
        let j = d.decode();
        assert_eq!(
            (j.mnemonic(), j.near_branch64()),
            (Mnemonic::Jne, target as u64)
        );
        let j = d.decode();
        assert_eq!((j.mnemonic(), j.near_branch64()), (Mnemonic::Jmp, 0));
    }
}
