//! A 16550A UART (COM port), built on `vm_superio::Serial`.
//!
//! vm-superio implements the register model; this wrapper adapts it to
//! [`BusDevice`], routes its interrupt to an [`InterruptLine`] and writes
//! guest output to any `std::io::Write`. Host input is pushed in with
//! [`Serial::enqueue_input`]; the receive FIFO holds [`FIFO_SIZE`] bytes, so
//! the VMM should read at most [`Serial::input_capacity`] bytes from its
//! input source at a time, and can use the optional "input drained" notifier
//! to learn when the guest has emptied the FIFO and more can be sent.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// Conventional I/O base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Conventional ISA IRQ (and, with the identity-mapped IOAPIC, GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of I/O ports a UART occupies (the bus length to register).
pub const SERIAL_PORT_LEN: u64 = 8;
/// Capacity of the receive FIFO (fixed by vm-superio).
pub const FIFO_SIZE: usize = 64;

/// Failures pushing input into the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The bytes were queued but the receive interrupt could not be raised.
    #[error("failed to raise the serial interrupt: {0}")]
    Interrupt(#[source] io::Error),
}

/// Adapts an [`InterruptLine`] to vm-superio's `Trigger`.
struct IrqTrigger(Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// vm-superio event hooks: only "the guest drained the receive FIFO" is of
/// interest, to tell the VMM it may send more input.
struct Events {
    input_drained: Option<Arc<dyn InterruptLine>>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(n) = &self.input_drained {
            if let Err(e) = n.trigger() {
                tracing::warn!(%e, "failed to signal serial input drained");
            }
        }
    }
}

type Uart = vm_superio::Serial<IrqTrigger, Events, Box<dyn Write + Send>>;

/// A 16550A UART occupying [`SERIAL_PORT_LEN`] consecutive ports.
pub struct Serial {
    uart: Uart,
    /// Output errors are reported once, not once per byte the guest prints.
    output_error_logged: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("input_capacity", &self.input_capacity())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART that raises `irq` and writes everything the guest transmits to
    /// `out` (flushed after each byte, so a console stays interactive).
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self::build(irq, out, None)
    }

    /// Like [`Serial::new`], and additionally triggers `input_drained` each
    /// time the guest reads the last byte out of the receive FIFO. Pass e.g.
    /// an [`crate::interrupt::EventFdLine`] and poll its eventfd to resume
    /// reading host input when it was paused on a full FIFO.
    pub fn with_input_notifier(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        input_drained: Arc<dyn InterruptLine>,
    ) -> Self {
        Self::build(irq, out, Some(input_drained))
    }

    fn build(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        input_drained: Option<Arc<dyn InterruptLine>>,
    ) -> Self {
        Self {
            uart: vm_superio::Serial::with_events(IrqTrigger(irq), Events { input_drained }, out),
            output_error_logged: false,
        }
    }

    /// Free space in the receive FIFO: how many bytes the next
    /// [`Serial::enqueue_input`] will accept.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest and raises the receive interrupt if
    /// the guest enabled it. Returns how many bytes were accepted: fewer than
    /// `bytes.len()` when the FIFO fills up (the rest must be offered again
    /// later), and 0 when it is full or when the guest has put the UART in
    /// loopback mode (where a real UART ignores the line, too).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        if bytes.is_empty() || self.input_capacity() == 0 {
            return Ok(0);
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::Trigger(e)) => Err(SerialError::Interrupt(e)),
            // Capacity was checked above and enqueueing never writes to the
            // output, so neither of these can occur; treat them as "nothing
            // accepted" rather than panicking.
            Err(UartError::FullFifo) | Err(UartError::IOError(_)) => Ok(0),
        }
    }

    /// The register index for a one-byte access, or None for anything the
    /// UART does not decode.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::register(offset, data.len()) {
            Some(reg) => data[0] = self.uart.read(reg),
            // Undecoded accesses float high, like an undriven ISA bus.
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = Self::register(offset, data.len()) else {
            return;
        };
        match self.uart.write(reg, data[0]) {
            Ok(()) => {}
            Err(UartError::IOError(e)) => {
                // A closed or broken console must not stop the guest; the
                // byte is lost, as on a disconnected serial line.
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    tracing::warn!(%e, "serial output failed; dropping guest output");
                }
            }
            Err(UartError::Trigger(e)) => {
                tracing::warn!(%e, "failed to raise serial interrupt");
            }
            Err(UartError::FullFifo) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::CountingLine;
    use std::sync::Mutex;

    /// A `Write` whose contents the test can inspect after handing it over.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("console gone"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;

    fn read(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_writer() {
        let out = SharedBuf::default();
        let irq = Arc::new(CountingLine::default());
        let mut s = Serial::new(irq, Box::new(out.clone()));
        for b in b"hello\n" {
            s.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        // Transmitter always empty / idle.
        assert_eq!(read(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn input_raises_interrupt_and_is_readable() {
        let irq = Arc::new(CountingLine::default());
        let drained = Arc::new(CountingLine::default());
        let mut s = Serial::with_input_notifier(irq.clone(), Box::new(io::sink()), drained.clone());
        // Enable the received-data interrupt like the Linux 8250 driver.
        s.write(IER, &[0x01]);
        let before = irq.count();
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        assert!(irq.count() > before, "RX interrupt raised");
        assert_eq!(s.input_capacity(), FIFO_SIZE - 2);
        assert_eq!(read(&mut s, LSR) & 0x01, 0x01, "data ready");
        assert_eq!(read(&mut s, DATA), b'a');
        assert_eq!(drained.count(), 0);
        assert_eq!(read(&mut s, DATA), b'b');
        assert_eq!(drained.count(), 1, "drain notifier fired");
        assert_eq!(read(&mut s, LSR) & 0x01, 0);
        assert_eq!(s.input_capacity(), FIFO_SIZE);
    }

    #[test]
    fn input_is_bounded_by_fifo() {
        let irq = Arc::new(CountingLine::default());
        let mut s = Serial::new(irq, Box::new(io::sink()));
        let big = vec![b'x'; FIFO_SIZE + 10];
        assert_eq!(s.enqueue_input(&big).unwrap(), FIFO_SIZE);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(s.enqueue_input(b"").unwrap(), 0);
    }

    #[test]
    fn loopback_mode_ignores_host_input() {
        let irq = Arc::new(CountingLine::default());
        let mut s = Serial::new(irq, Box::new(io::sink()));
        s.write(MCR, &[0x10]);
        assert_eq!(s.enqueue_input(b"abc").unwrap(), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let out = SharedBuf::default();
        let irq = Arc::new(CountingLine::default());
        let mut s = Serial::new(irq, Box::new(out.clone()));
        s.write(DATA, b"ab");
        s.write(8, b"c");
        s.write(u64::MAX, b"d");
        s.write(DATA, &[]);
        assert!(out.0.lock().unwrap().is_empty());
        let mut wide = [0u8; 4];
        s.read(DATA, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let mut one = [0u8; 1];
        s.read(100, &mut one);
        assert_eq!(one, [0xff]);
        s.read(LCR, &mut []);
    }

    #[test]
    fn broken_output_does_not_stop_the_guest() {
        let irq = Arc::new(CountingLine::default());
        let mut s = Serial::new(irq, Box::new(Broken));
        for _ in 0..3 {
            s.write(DATA, b"x");
        }
        assert_eq!(read(&mut s, LCR), 0x03);
    }
}
