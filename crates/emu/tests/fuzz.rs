//! Random bytes through the decoder and executor, in 16-, 32- and 64-bit
//! modes, with random registers: nothing may panic, and every run ends in
//! an exit within its instruction budget.

mod common;

use common::Rng;
use emu::{Emulator, Exit};
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 0x1_0000;

fn set_mode(emu: &mut Emulator, bitness: u32) {
    let cpu = emu.cpu_mut();
    common::long_mode(cpu);
    match bitness {
        64 => {}
        32 => {
            cpu.efer = 0;
            cpu.cr0 = 0x11;
            cpu.segs[1].l = false;
            cpu.segs[1].db = true;
        }
        _ => {
            cpu.efer = 0;
            cpu.cr0 = 0x10;
            for s in cpu.segs.iter_mut() {
                s.l = false;
                s.db = false;
                s.base = 0;
            }
        }
    }
}

#[test]
fn random_code_never_panics() {
    let mem = common::memory(MEMORY);
    let mut emu = common::emulator(&mem);
    let mut rng = Rng::seeded("random code");
    let mut code = vec![0u8; MEMORY];
    let mut exits = [0u64; 10];
    for round in 0..20_000u64 {
        // Fresh random memory every few rounds; the emulator must notice.
        if round % 16 == 0 {
            for b in code.iter_mut() {
                *b = rng.next() as u8;
            }
            mem.write_slice(&code, GuestAddress(0)).unwrap();
            // Keep the page tables valid most of the time (random code
            // may still scribble on them: that is part of the test).
            if round % 64 != 0 {
                common::identity_tables(&mem, common::TABLES);
            }
            emu.invalidate_all();
        }
        set_mode(&mut emu, [16, 32, 64][rng.below(3) as usize]);
        let cpu = emu.cpu_mut();
        // SSE enabled (CR4.OSFXSR | OSXMMEXCPT) most of the time, and
        // random MXCSR/x87 control state.
        if rng.below(4) != 0 {
            cpu.cr4 |= 0x600;
        }
        cpu.fpu.mxcsr = rng.next() as u32 & 0xffff;
        cpu.fpu.fcw = rng.next() as u16;
        cpu.fpu.ftw = rng.next() as u8;
        for g in cpu.gpr.iter_mut() {
            *g = if rng.below(2) == 0 {
                rng.below(MEMORY as u64)
            } else {
                rng.value()
            };
        }
        cpu.rip = rng.below(MEMORY as u64);
        cpu.rflags = 0x2 | (rng.next() & 0xcd5);
        // Run a few exits deep, answering I/O and MMIO reads.
        for _ in 0..8 {
            let exit = emu.run(2000, None);
            let k = match exit {
                Exit::IoIn { .. } => {
                    emu.set_io_in_data(rng.next() as u32);
                    0
                }
                Exit::IoOut { .. } => 1,
                Exit::MmioRead { .. } => {
                    emu.set_mmio_read_data(rng.next());
                    2
                }
                Exit::MmioWrite { .. } => 3,
                Exit::Halt => 4,
                Exit::Exception(_) => 5,
                // Without the platform's CPU model there is no
                // IA32_TSC_DEADLINE to write: never here, but like the
                // budget, a run that ended early.
                Exit::BudgetExhausted | Exit::PlatformUpdate => 6,
                Exit::Interrupted => 7,
                Exit::InternalError(_) => 8,
                Exit::Shutdown => 9,
            };
            exits[k] += 1;
            if matches!(
                exit,
                Exit::Exception(_) | Exit::InternalError(_) | Exit::Shutdown
            ) {
                break;
            }
        }
    }
    eprintln!(
        "exits: in {} out {} mmio-r {} mmio-w {} hlt {} exc {} budget {} int {} internal {}",
        exits[0], exits[1], exits[2], exits[3], exits[4], exits[5], exits[6], exits[7], exits[8]
    );
    assert!(exits[5] > 0 && exits[0] + exits[1] > 0 && exits[2] + exits[3] > 0);
}
