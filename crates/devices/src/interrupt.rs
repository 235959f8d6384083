//! Interrupt lines from devices to the guest's interrupt controller.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line. Devices call [`InterruptLine::trigger`]
/// when they want the guest's attention; how that reaches the guest (the
/// accelerator's edge trigger, an irqfd, a test counter, ...) is up to the
/// implementor.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt line backed by an eventfd. With KVM the eventfd is
/// registered as an irqfd for the line's GSI, so a write injects the
/// interrupt without a round trip through the VMM.
#[derive(Debug)]
pub struct EventFdLine(pub EventFd);

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        // An eventfd counter only overflows after 2^64 - 2 unconsumed writes;
        // a non-blocking eventfd reports that as EAGAIN, which still means
        // the interrupt is pending, so it is not an error for the device.
        match self.0.write(1) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts triggers; shared by the device tests.
    #[derive(Default, Debug)]
    pub(crate) struct CountingLine(pub AtomicUsize);

    impl CountingLine {
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn eventfd_line_signals() {
        let line = EventFdLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.0.read().unwrap(), 2);
        // Nothing pending afterwards.
        assert!(line.0.read().is_err());
    }
}
