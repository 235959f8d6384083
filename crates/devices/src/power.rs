//! Guest-requested power events (power off, reset) delivered to the VMM.
//!
//! Several devices can end the VM's run (the ACPI sleep register, the ACPI
//! reset register, the i8042 reset line). They all report into one
//! [`PowerSignal`]; the VMM polls its eventfd in its main loop and then asks
//! [`PowerSignal::pending`] what happened.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmEvent {
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset / reboot.
    Reset,
}

const NONE: u8 = 0;
const POWER_OFF: u8 = 1;
const RESET: u8 = 2;

impl VmEvent {
    fn encode(self) -> u8 {
        match self {
            VmEvent::PowerOff => POWER_OFF,
            VmEvent::Reset => RESET,
        }
    }

    fn decode(v: u8) -> Option<Self> {
        match v {
            POWER_OFF => Some(VmEvent::PowerOff),
            RESET => Some(VmEvent::Reset),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    event: AtomicU8,
    eventfd: EventFd,
}

/// A latch for the first power event of a run, shared by all devices that
/// can raise one (clone it freely; clones share state).
#[derive(Debug, Clone)]
pub struct PowerSignal {
    inner: Arc<Inner>,
}

impl PowerSignal {
    /// A signal with nothing pending. Fails only if an eventfd cannot be
    /// created.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                event: AtomicU8::new(NONE),
                eventfd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
        })
    }

    /// Records `event` unless an event is already pending: the first request
    /// wins, since once the guest has asked to power off, a reset it issues
    /// while going down must not turn that into a reboot (and vice versa).
    /// The eventfd becomes readable on the first request only.
    pub fn request(&self, event: VmEvent) {
        let won = self
            .inner
            .event
            .compare_exchange(NONE, event.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            tracing::info!(?event, "guest requested power event");
            // Only fails with EAGAIN on counter overflow, which cannot happen
            // after one write; log anything else rather than drop it silently.
            if let Err(e) = self.inner.eventfd.write(1) {
                tracing::error!(%e, "failed to signal power event eventfd");
            }
        } else {
            tracing::debug!(?event, "ignoring power event: one is already pending");
        }
    }

    /// The event requested so far, if any.
    pub fn pending(&self) -> Option<VmEvent> {
        VmEvent::decode(self.inner.event.load(Ordering::Acquire))
    }

    /// An eventfd that becomes readable when the first event is requested.
    /// It is non-blocking; the VMM may read it to clear readiness.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: &EventFd) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and
        // we pass a count of exactly one entry.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    #[test]
    fn first_request_wins() {
        let sig = PowerSignal::new().unwrap();
        assert_eq!(sig.pending(), None);
        assert!(!readable(sig.eventfd()));

        let other = sig.clone();
        other.request(VmEvent::PowerOff);
        sig.request(VmEvent::Reset);
        assert_eq!(sig.pending(), Some(VmEvent::PowerOff));
        assert_eq!(other.pending(), Some(VmEvent::PowerOff));

        assert!(readable(sig.eventfd()));
        // Exactly one write happened.
        assert_eq!(sig.eventfd().read().unwrap(), 1);
        assert!(!readable(sig.eventfd()));
    }

    #[test]
    fn reset_first() {
        let sig = PowerSignal::new().unwrap();
        sig.request(VmEvent::Reset);
        sig.request(VmEvent::PowerOff);
        assert_eq!(sig.pending(), Some(VmEvent::Reset));
    }

    #[test]
    fn concurrent_requests_agree() {
        let sig = PowerSignal::new().unwrap();
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = sig.clone();
                std::thread::spawn(move || {
                    s.request(if i % 2 == 0 {
                        VmEvent::PowerOff
                    } else {
                        VmEvent::Reset
                    })
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(sig.pending().is_some());
        assert_eq!(sig.eventfd().read().unwrap(), 1);
    }
}
