//! A minimal i8042 PS/2 controller with nothing attached.
//!
//! Its jobs are (1) to let Linux's i8042 driver find a sane controller
//! quickly — flush, self-test, command-byte read/write, interface tests,
//! port enable/disable all answer at once, so the driver never waits out its
//! 500 ms polling timeouts — and (2) to turn the classic "pulse reset line"
//! command into [`VmEvent::Reset`], since `reboot=k` and Linux's fallback
//! reboot path use it.
//!
//! No keyboard or mouse is attached and the device has no interrupt line:
//! bytes sent to the keyboard are dropped (as with an unplugged keyboard), and
//! the AUX (mouse) channel is reported absent so the driver does not run its
//! AUX IRQ delivery test (a 250 ms wait for an interrupt that would never
//! come).
//!
//! # Registration
//!
//! Offset 0 is the data port (0x60), offset 4 the status/command port (0x64).
//! Either register one range `I8042_DATA_PORT..+I8042_LEN` (offsets 1-3 read
//! as 0xff and ignore writes; note it then also claims port 0x61, the PC
//! speaker / NMI status port, which KVM's in-kernel PIT would otherwise
//! serve), or, preferably, register two one-port ranges sharing the device:
//!
//! ```
//! # use std::sync::{Arc, Mutex};
//! # use devices::{Bus, PowerSignal};
//! # use devices::i8042::{I8042, COMMAND_OFFSET, I8042_COMMAND_PORT, I8042_DATA_PORT};
//! let bus = Bus::new();
//! let i8042 = Arc::new(Mutex::new(I8042::new(PowerSignal::new()?)));
//! bus.insert(i8042.clone(), I8042_DATA_PORT.into(), 1)?;
//! bus.insert_with_offset(i8042, I8042_COMMAND_PORT.into(), 1, COMMAND_OFFSET)?;
//! assert!(bus.write(0x64, &[0xaa])); // self-test
//! let mut reply = [0u8];
//! assert!(bus.read(0x60, &mut reply));
//! assert_eq!(reply, [0x55]);
//! assert!(!bus.read(0x61, &mut reply)); // left to the PC speaker / PIT
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::bus::BusDevice;
use crate::power::{PowerSignal, VmEvent};

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Length of a single range covering both ports.
pub const I8042_LEN: u64 = 5;
/// Device offset of the data port.
pub const DATA_OFFSET: u64 = 0;
/// Device offset of the status/command port.
pub const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const STS_OBF: u8 = 1 << 0; // output buffer full
const STS_SYS: u8 = 1 << 2; // system flag: POST passed (mirrors CTR bit 2)
const STS_CMD: u8 = 1 << 3; // last input byte was a command
const STS_UNLOCKED: u8 = 1 << 4; // keyboard not inhibited (keylock off)

// Controller command byte (CTR) bits.
const CTR_SYS: u8 = 1 << 2;
const CTR_KBD_DISABLE: u8 = 1 << 4;
const CTR_AUX_DISABLE: u8 = 1 << 5;
// Keyboard interrupt enabled, POST passed, scancode translation on, AUX
// disabled (there is none): what a PC BIOS typically hands over.
const CTR_DEFAULT: u8 = 0x01 | CTR_SYS | CTR_AUX_DISABLE | 0x40;

// Output port bits.
const OUTP_NOT_RESET: u8 = 1 << 0; // CPU reset line, active low
const OUTP_A20: u8 = 1 << 1;

// Controller commands (written to port 0x64).
const CMD_READ_RAM_FIRST: u8 = 0x20; // 0x20 reads the CTR
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM_FIRST: u8 = 0x60; // 0x60 writes the CTR
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
const CMD_PASSWORD_TEST: u8 = 0xa4;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX_DEVICE: u8 = 0xd4;
const CMD_A20_DISABLE: u8 = 0xdd;
const CMD_A20_ENABLE: u8 = 0xdf;
const CMD_PULSE_FIRST: u8 = 0xf0; // 0xf0-0xff pulse output port bits 0-3 low
/// The conventional "reset the CPU" command (pulse output port bit 0).
pub const CMD_RESET_CPU: u8 = 0xfe;

// Replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// AUX interface test result "clock line stuck high": nothing is plugged in.
/// Linux treats 0x00, 0xfa and 0xff as a working port, anything else as absent.
const AUX_NOT_CONNECTED: u8 = 0x02;
const NO_PASSWORD: u8 = 0xf1;

/// The i8042 controller. See the module docs for registration.
#[derive(Debug)]
pub struct I8042 {
    power: PowerSignal,
    /// Internal RAM; byte 0 is the controller command byte (CTR).
    ram: [u8; 32],
    output_port: u8,
    /// The output buffer: one byte, as on the real chip. A new reply replaces
    /// an unread one.
    output: Option<u8>,
    /// What a read of the data port returns when the buffer is empty (the
    /// real chip leaves the last byte latched).
    last_output: u8,
    /// A command waiting for its parameter byte on the data port.
    pending: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    /// A controller that reports guest reset requests to `power`.
    pub fn new(power: PowerSignal) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_DEFAULT;
        Self {
            power,
            ram,
            output_port: OUTP_NOT_RESET | OUTP_A20,
            output: None,
            last_output: 0,
            pending: None,
            last_was_command: false,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn set_ctr_bits(&mut self, bits: u8, on: bool) {
        if on {
            self.ram[0] |= bits;
        } else {
            self.ram[0] &= !bits;
        }
    }

    fn reply(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if self.ctr() & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.output.is_some() {
            s |= STS_OBF;
        }
        if self.last_was_command {
            s |= STS_CMD;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.output.take() {
            self.last_output = b;
        }
        self.last_output
    }

    fn request_reset(&self, why: &str) {
        tracing::info!("i8042: guest requested reset ({why})");
        self.power.request(VmEvent::Reset);
    }

    fn command(&mut self, cmd: u8) {
        // A new command abandons one still waiting for its parameter.
        self.pending = None;
        match cmd {
            CMD_READ_RAM_FIRST..=CMD_READ_RAM_LAST => {
                let idx = usize::from(cmd - CMD_READ_RAM_FIRST);
                self.reply(self.ram[idx]);
            }
            CMD_WRITE_RAM_FIRST..=CMD_WRITE_RAM_LAST
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_AUX_DEVICE => self.pending = Some(cmd),
            CMD_PASSWORD_TEST => self.reply(NO_PASSWORD),
            CMD_AUX_DISABLE => self.set_ctr_bits(CTR_AUX_DISABLE, true),
            CMD_AUX_ENABLE => self.set_ctr_bits(CTR_AUX_DISABLE, false),
            CMD_AUX_TEST => self.reply(AUX_NOT_CONNECTED),
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_KBD_TEST => self.reply(INTERFACE_OK),
            CMD_KBD_DISABLE => self.set_ctr_bits(CTR_KBD_DISABLE, true),
            CMD_KBD_ENABLE => self.set_ctr_bits(CTR_KBD_DISABLE, false),
            CMD_READ_INPUT_PORT => self.reply(0),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_A20_DISABLE => self.output_port &= !OUTP_A20,
            CMD_A20_ENABLE => self.output_port |= OUTP_A20,
            CMD_PULSE_FIRST..=0xff => {
                // Bits 0-3 clear select output port lines to pulse low; line
                // 0 is the CPU reset. 0xfe is the usual form, 0xff a no-op.
                if cmd & OUTP_NOT_RESET == 0 {
                    self.request_reset("pulse reset line");
                }
            }
            _ => tracing::debug!("i8042: ignoring unsupported command {cmd:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(cmd @ CMD_WRITE_RAM_FIRST..=CMD_WRITE_RAM_LAST) => {
                self.ram[usize::from(cmd - CMD_WRITE_RAM_FIRST)] = byte;
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTP_NOT_RESET == 0 {
                    self.request_reset("output port reset line low");
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.reply(byte),
            // There is no AUX channel, so the looped byte comes back as
            // keyboard data (status AUXDATA clear). Linux's AUX loop test
            // then fails at once and falls back to the AUX interface test,
            // which reports "not connected" — instead of timing out.
            Some(CMD_WRITE_AUX_BUFFER) => self.reply(byte),
            // No mouse to send it to.
            Some(CMD_WRITE_AUX_DEVICE) => {}
            Some(_) => {}
            // A byte for the keyboard; none is attached, so it is lost.
            None => tracing::trace!("i8042: dropping byte {byte:#04x} for absent keyboard"),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => {
                data.fill(0xff);
                return;
            }
        };
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, [byte]) => {
                self.last_was_command = false;
                self.data(*byte);
            }
            (COMMAND_OFFSET, [cmd]) => {
                self.last_was_command = true;
                self.command(*cmd);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, PowerSignal) {
        let p = PowerSignal::new().unwrap();
        (I8042::new(p.clone()), p)
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    fn cmd(d: &mut I8042, c: u8) {
        d.write(COMMAND_OFFSET, &[c]);
    }

    fn data_out(d: &mut I8042, v: u8) {
        d.write(DATA_OFFSET, &[v]);
    }

    /// Reads a reply the way Linux's driver does: poll OBF, then read data.
    fn reply(d: &mut I8042) -> Option<u8> {
        if status(d) & STS_OBF == 0 {
            return None;
        }
        let mut b = [0];
        d.read(DATA_OFFSET, &mut b);
        Some(b[0])
    }

    #[test]
    fn initial_status_is_idle_and_unlocked() {
        let (mut d, _) = dev();
        let s = status(&mut d);
        assert_eq!(s & STS_OBF, 0, "nothing to flush");
        assert_ne!(s & STS_UNLOCKED, 0, "no keylock warning");
        assert_eq!(s & 0x02, 0, "input buffer never busy");
    }

    #[test]
    fn self_test_and_interface_tests() {
        let (mut d, p) = dev();
        cmd(&mut d, CMD_SELF_TEST);
        assert_eq!(reply(&mut d), Some(0x55));
        assert_eq!(reply(&mut d), None);
        cmd(&mut d, CMD_KBD_TEST);
        assert_eq!(reply(&mut d), Some(0x00));
        cmd(&mut d, CMD_PASSWORD_TEST);
        assert_eq!(reply(&mut d), Some(0xf1));
        assert_eq!(p.pending(), None);
    }

    #[test]
    fn command_byte_read_write() {
        let (mut d, _) = dev();
        cmd(&mut d, 0x20);
        let ctr = reply(&mut d).unwrap();
        assert_eq!(ctr, CTR_DEFAULT);
        // Linux: disable keyboard, clear its interrupt, write back.
        let new = (ctr | CTR_KBD_DISABLE) & !0x01;
        cmd(&mut d, 0x60);
        assert_eq!(status(&mut d) & STS_CMD, STS_CMD);
        data_out(&mut d, new);
        cmd(&mut d, 0x20);
        assert_eq!(reply(&mut d), Some(new));
        // Port enable/disable commands are reflected in the CTR.
        cmd(&mut d, CMD_KBD_ENABLE);
        cmd(&mut d, CMD_AUX_ENABLE);
        cmd(&mut d, 0x20);
        assert_eq!(
            reply(&mut d).unwrap() & (CTR_KBD_DISABLE | CTR_AUX_DISABLE),
            0
        );
        cmd(&mut d, CMD_AUX_DISABLE);
        cmd(&mut d, 0x20);
        assert_ne!(reply(&mut d).unwrap() & CTR_AUX_DISABLE, 0);
        // Other internal RAM bytes are plain storage.
        cmd(&mut d, 0x7f);
        data_out(&mut d, 0x42);
        cmd(&mut d, 0x3f);
        assert_eq!(reply(&mut d), Some(0x42));
    }

    #[test]
    fn aux_probe_reports_absent_without_waiting() {
        // Mirrors Linux i8042_check_aux(): AUX loop, then AUX test.
        let (mut d, _) = dev();
        cmd(&mut d, CMD_WRITE_AUX_BUFFER);
        data_out(&mut d, 0x5a);
        let s = status(&mut d);
        assert_ne!(s & STS_OBF, 0, "a reply is there immediately");
        assert_eq!(s & 0x20, 0, "but it is not flagged as AUX data");
        cmd(&mut d, CMD_AUX_TEST);
        let r = reply(&mut d).unwrap();
        assert!(
            r != 0 && r != 0xfa && r != 0xff,
            "AUX reported absent: {r:#x}"
        );
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut d, p) = dev();
        cmd(&mut d, 0xff); // pulse nothing
        assert_eq!(p.pending(), None);
        cmd(&mut d, CMD_RESET_CPU);
        assert_eq!(p.pending(), Some(VmEvent::Reset));
        assert_eq!(p.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn output_port_write() {
        let (mut d, p) = dev();
        // Linux enables A20 through the output port: not a reset.
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data_out(&mut d, 0xdf);
        cmd(&mut d, CMD_READ_OUTPUT_PORT);
        assert_eq!(reply(&mut d), Some(0xdf));
        assert_eq!(p.pending(), None);
        // Driving the reset line low is.
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data_out(&mut d, 0xde);
        assert_eq!(p.pending(), Some(VmEvent::Reset));
    }

    #[test]
    fn keyboard_bytes_are_dropped_and_stale_reads_are_stable() {
        let (mut d, p) = dev();
        data_out(&mut d, 0xff); // keyboard reset: no keyboard, no reply
        assert_eq!(reply(&mut d), None);
        cmd(&mut d, CMD_WRITE_KBD_BUFFER);
        data_out(&mut d, 0x1c);
        assert_eq!(reply(&mut d), Some(0x1c));
        let mut b = [0];
        d.read(DATA_OFFSET, &mut b);
        assert_eq!(b, [0x1c], "last byte stays latched");
        assert_eq!(p.pending(), None);
    }

    #[test]
    fn bad_widths_and_offsets_are_ignored() {
        let (mut d, p) = dev();
        d.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
        d.write(2, &[0xfe]);
        d.write(COMMAND_OFFSET, &[]);
        assert_eq!(p.pending(), None);
        let mut w = [0u8; 2];
        d.read(COMMAND_OFFSET, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut b = [0u8; 1];
        d.read(1, &mut b);
        assert_eq!(b, [0xff]);
    }
}
