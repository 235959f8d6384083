//! `emu`: vessel's software x86-64 vCPU.
//!
//! Layers, bottom up:
//!
//! - [`state`]: the architectural register state ([`CpuState`]) and its
//!   conversion to the hypervisor crate's register structs.
//! - [`mem`]: guest RAM as host addresses ([`mem::Ram`]), the linear to
//!   physical translation ([`mem::Mmu`]: the guest's page tables behind a
//!   software TLB)
//!   and the map of pages holding decoded code ([`mem::CodePages`]), one
//!   for all vCPUs of a VM.
//! - [`block`]: straight-line blocks decoded once with iced-x86 into
//!   [`block::Op`]s (the decoded instruction plus the handler chosen at
//!   decode time), cached by the guest-physical address of their first
//!   byte and dropped when their page is written (by any vCPU: each block
//!   records its pages' generations in the shared map).
//! - `exec`: the interpreter. Each handler executes one instruction on
//!   the [`exec::Core`] (registers, memory, pending I/O). On x86-64 hosts
//!   guest code also runs natively: the guest's bytes copied into host
//!   code, memory operands re-encoded to address the host page an inline
//!   software-TLB lookup finds. A block whose every instruction has such
//!   a form (general-purpose, SSE and SSE2 instructions, string stores and
//!   copies, DIV after its checks) is compiled whole once it has run
//!   often, and its code jumps on into the next block's, the guest's
//!   registers staying in the host's from block to block; elsewhere
//!   stretches of such instructions run as native runs inside
//!   interpreted blocks.
//! - [`Emulator`]: runs blocks until something the VMM must see (port I/O,
//!   MMIO, HLT, a reported exception, an interrupt request); exceptions
//!   and interrupts are delivered through the guest's IDT.
//! - [`vcpu`]: the `hypervisor::{Hypervisor, Vm, Vcpu}` implementation.
//!
//! Flags are computed eagerly: each arithmetic handler computes the six
//! status flags from its inputs with a few ALU operations. That keeps the
//! handlers independent (no lazy-flag state to thread through exits and
//! exceptions); a per-block liveness pass skips the flags that are
//! overwritten before anything reads them.

pub mod block;
pub mod cpuid;
pub mod diag;
pub mod exec;
pub mod fuzzing;
pub mod mem;
pub mod platform;
pub mod pvclock;
pub mod state;
mod sys;
pub mod vcpu;

pub use exec::{Emulator, Exception, Exit};
pub use state::CpuState;
pub use vcpu::{EmuHypervisor, EmuVcpu, EmuVm};
