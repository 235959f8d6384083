//! `/sbin/vessel-exit-status N`: writes the byte N to I/O port [`EXIT_STATUS_PORT`].
//!
//! Debian's cloud kernel is built without `/dev/port` (`# CONFIG_DEVPORT is not set`), so
//! busybox alone cannot reach an I/O port. The kernel does have `ioperm(2)`
//! (`CONFIG_X86_IOPL_IOPERM=y`), so this is a tiny (231 bytes) static x86-64 ELF executable,
//! generated here byte by byte, that parses its one decimal argument, calls
//! `ioperm(port, 1, 1)` and executes `out dx, al`.
//!
//! Exit status: 0 written, 1 `ioperm` refused, 2 usage (not exactly one argument, or not a
//! decimal number 0-255). The argument is checked before `ioperm`, so a bad one never
//! touches a port.

use crate::EXIT_STATUS_PORT;

/// Virtual address the single segment (the whole file) is mapped at.
const LOAD_ADDR: u64 = 0x40_0000;
const ELF_HEADER_SIZE: u16 = 64;
const PROGRAM_HEADER_SIZE: u16 = 56;

/// The machine code. The port number is spliced into the two `0x501` immediates by
/// [`code`], so [`EXIT_STATUS_PORT`] stays the single source of truth.
///
/// A unit test assembles the same listing with iced-x86 and compares the bytes.
fn code() -> Vec<u8> {
    let port = u32::from(EXIT_STATUS_PORT).to_le_bytes();
    let mut c = Vec::with_capacity(0x70);
    // 00: cmp qword [rsp], 2        ; argc must be 2
    c.extend_from_slice(&[0x48, 0x83, 0x3c, 0x24, 0x02]);
    // 05: jne usage
    c.extend_from_slice(&[0x75, 0x55]);
    // 07: mov rsi, [rsp+16]         ; argv[1]
    c.extend_from_slice(&[0x48, 0x8b, 0x74, 0x24, 0x10]);
    // 0c: xor ecx, ecx              ; value = 0
    c.extend_from_slice(&[0x31, 0xc9]);
    // 0e: cmp byte [rsi], 0         ; "" is not a number
    c.extend_from_slice(&[0x80, 0x3e, 0x00]);
    // 11: je usage
    c.extend_from_slice(&[0x74, 0x49]);
    // 13: digit: movzx eax, byte [rsi]
    c.extend_from_slice(&[0x0f, 0xb6, 0x06]);
    // 16: test eax, eax
    c.extend_from_slice(&[0x85, 0xc0]);
    // 18: jz parsed
    c.extend_from_slice(&[0x74, 0x1a]);
    // 1a: sub eax, '0'
    c.extend_from_slice(&[0x83, 0xe8, 0x30]);
    // 1d: cmp eax, 9
    c.extend_from_slice(&[0x83, 0xf8, 0x09]);
    // 20: ja usage                  ; not a digit (unsigned compare catches < '0' too)
    c.extend_from_slice(&[0x77, 0x3a]);
    // 22: imul ecx, ecx, 10
    c.extend_from_slice(&[0x6b, 0xc9, 0x0a]);
    // 25: add ecx, eax
    c.extend_from_slice(&[0x01, 0xc1]);
    // 27: cmp ecx, 255
    c.extend_from_slice(&[0x81, 0xf9, 0xff, 0x00, 0x00, 0x00]);
    // 2d: ja usage                  ; checked every digit, so it cannot overflow
    c.extend_from_slice(&[0x77, 0x2d]);
    // 2f: inc rsi
    c.extend_from_slice(&[0x48, 0xff, 0xc6]);
    // 32: jmp digit
    c.extend_from_slice(&[0xeb, 0xdf]);
    // 34: parsed: mov ebx, ecx      ; syscall clobbers rcx
    c.extend_from_slice(&[0x89, 0xcb]);
    // 36: mov eax, 173              ; SYS_ioperm
    c.extend_from_slice(&[0xb8, 0xad, 0x00, 0x00, 0x00]);
    // 3b: mov edi, PORT
    c.push(0xbf);
    c.extend_from_slice(&port);
    // 40: mov esi, 1                ; one port
    c.extend_from_slice(&[0xbe, 0x01, 0x00, 0x00, 0x00]);
    // 45: mov edx, 1                ; turn access on
    c.extend_from_slice(&[0xba, 0x01, 0x00, 0x00, 0x00]);
    // 4a: syscall
    c.extend_from_slice(&[0x0f, 0x05]);
    // 4c: test eax, eax
    c.extend_from_slice(&[0x85, 0xc0]);
    // 4e: jnz fail
    c.extend_from_slice(&[0x75, 0x13]);
    // 50: mov eax, ebx
    c.extend_from_slice(&[0x89, 0xd8]);
    // 52: mov edx, PORT
    c.push(0xba);
    c.extend_from_slice(&port);
    // 57: out dx, al
    c.push(0xee);
    // 58: xor edi, edi              ; exit 0
    c.extend_from_slice(&[0x31, 0xff]);
    // 5a: jmp exit
    c.extend_from_slice(&[0xeb, 0x0c]);
    // 5c: usage: mov edi, 2
    c.extend_from_slice(&[0xbf, 0x02, 0x00, 0x00, 0x00]);
    // 61: jmp exit
    c.extend_from_slice(&[0xeb, 0x05]);
    // 63: fail: mov edi, 1
    c.extend_from_slice(&[0xbf, 0x01, 0x00, 0x00, 0x00]);
    // 68: exit: mov eax, 60         ; SYS_exit
    c.extend_from_slice(&[0xb8, 0x3c, 0x00, 0x00, 0x00]);
    // 6d: syscall
    c.extend_from_slice(&[0x0f, 0x05]);
    c
}

/// The complete executable: ELF header, one PT_LOAD program header mapping the whole file
/// read+execute at [`LOAD_ADDR`], then the code.
pub(crate) fn exit_status_helper() -> Vec<u8> {
    let code = code();
    let code_offset = u64::from(ELF_HEADER_SIZE + PROGRAM_HEADER_SIZE);
    let file_size = code_offset + code.len() as u64;
    let mut elf = Vec::with_capacity(file_size as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(LOAD_ADDR + code_offset).to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(ELF_HEADER_SIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&ELF_HEADER_SIZE.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&PROGRAM_HEADER_SIZE.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    debug_assert_eq!(elf.len(), usize::from(ELF_HEADER_SIZE));
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    debug_assert_eq!(elf.len() as u64, code_offset);
    elf.extend_from_slice(&code);
    elf
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use iced_x86::code_asm::*;
    use iced_x86::{Code, Instruction, Register};

    use super::*;

    /// The hand-encoded bytes are exactly what an assembler makes of the listing.
    #[test]
    fn code_matches_assembler() {
        let port = i32::from(EXIT_STATUS_PORT);
        let mut a = CodeAssembler::new(64).unwrap();
        let mut digit = a.create_label();
        let mut parsed = a.create_label();
        let mut usage = a.create_label();
        let mut fail = a.create_label();
        let mut exit = a.create_label();
        a.cmp(qword_ptr(rsp), 2).unwrap();
        a.jne(usage).unwrap();
        a.mov(rsi, qword_ptr(rsp + 16)).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.cmp(byte_ptr(rsi), 0).unwrap();
        a.je(usage).unwrap();
        a.set_label(&mut digit).unwrap();
        a.movzx(eax, byte_ptr(rsi)).unwrap();
        a.test(eax, eax).unwrap();
        a.je(parsed).unwrap();
        // The assembler would pick the longer accumulator forms (2D/3D imm32); ask for
        // the imm8 forms the listing uses.
        a.add_instruction(Instruction::with2(Code::Sub_rm32_imm8, Register::EAX, 0x30).unwrap())
            .unwrap();
        a.add_instruction(Instruction::with2(Code::Cmp_rm32_imm8, Register::EAX, 9).unwrap())
            .unwrap();
        a.ja(usage).unwrap();
        a.imul_3(ecx, ecx, 10).unwrap();
        a.add(ecx, eax).unwrap();
        a.cmp(ecx, 255).unwrap();
        a.ja(usage).unwrap();
        a.inc(rsi).unwrap();
        a.jmp(digit).unwrap();
        a.set_label(&mut parsed).unwrap();
        a.mov(ebx, ecx).unwrap();
        a.mov(eax, 173).unwrap();
        a.mov(edi, port).unwrap();
        a.mov(esi, 1).unwrap();
        a.mov(edx, 1).unwrap();
        a.syscall().unwrap();
        a.test(eax, eax).unwrap();
        a.jne(fail).unwrap();
        a.mov(eax, ebx).unwrap();
        a.mov(edx, port).unwrap();
        a.out(dx, al).unwrap();
        a.xor(edi, edi).unwrap();
        a.jmp(exit).unwrap();
        a.set_label(&mut usage).unwrap();
        a.mov(edi, 2).unwrap();
        a.jmp(exit).unwrap();
        a.set_label(&mut fail).unwrap();
        a.mov(edi, 1).unwrap();
        a.set_label(&mut exit).unwrap();
        a.mov(eax, 60).unwrap();
        a.syscall().unwrap();
        let entry = LOAD_ADDR + u64::from(ELF_HEADER_SIZE + PROGRAM_HEADER_SIZE);
        assert_eq!(a.assemble(entry).unwrap(), code());
    }

    #[test]
    fn elf_layout() {
        let elf = exit_status_helper();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDR + 120);
        let filesz = u64::from_le_bytes(elf[64 + 32..64 + 40].try_into().unwrap());
        assert_eq!(filesz, elf.len() as u64);
    }

    /// Runs the helper on the host with arguments it must refuse, which it does before
    /// asking for port access, so no port is ever touched here.
    #[test]
    fn rejects_bad_arguments_on_host() {
        if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            testkit::not_run(
                testkit::prereq::X86_64,
                "the helper needs an x86-64 Linux host",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vessel-exit-status");
        std::fs::write(&path, exit_status_helper()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        for args in [
            &[][..],
            &["256"],
            &["-1"],
            &[""],
            &["12a"],
            &["1", "2"],
            &["99999999999"],
        ] {
            let status = Command::new(&path).args(args).status().unwrap();
            assert_eq!(status.code(), Some(2), "args {args:?}");
        }
    }
}
