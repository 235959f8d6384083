//! Para-virtualized devices: a guest that knows it is virtual talks to
//! vessel through virtio queues in its own memory instead of through
//! emulated hardware registers.
//!
//! - [`mmio`]: the virtio-mmio transport, one 4 KiB register window per
//!   device, which Linux finds through the ACPI DSDT (`LNRO0005`).
//! - [`device`]: the [`VirtioDevice`] trait the transport drives, and the
//!   device's [`Interrupt`].
//! - [`worker`]: each active device serves its queues on an I/O thread of
//!   its own, woken by the queue's eventfd (an ioeventfd in the
//!   accelerator), and interrupts through the accelerator's edge trigger
//!   (an irqfd on KVM): device I/O never runs on a vCPU thread.
//! - `vectored`: data moves between guest memory and a raw image or a tap
//!   by vectored I/O on the buffers themselves.
//! - [`block`] over `disk` images, [`net`] over a host [`tap`], [`rng`], and
//!   [`vsock`] with Firecracker's Unix-socket host side.
//!
//! Devices see guest memory ([`ram::GuestRam`]) and an interrupt line,
//! nothing else; they do not know which accelerator runs the VM. Every
//! address, length and index the guest supplies is checked (by
//! `virtio-queue` for the rings and descriptor chains, here for requests).

pub mod block;
pub mod device;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
mod vectored;
pub mod vsock;
pub mod worker;

pub use block::Block;
pub use device::{Interrupt, VirtioDevice};
pub use mmio::MmioTransport;
pub use net::Net;
pub use rng::Rng;
pub use vsock::Vsock;
