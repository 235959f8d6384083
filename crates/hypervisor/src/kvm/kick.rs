//! Bringing a vCPU thread out of `KVM_RUN` on request.
//!
//! A thread blocked in `KVM_RUN` (a guest spinning, or halted waiting for an
//! interrupt that never comes) only returns when a signal reaches it. The
//! signal handler sets `kvm_run.immediate_exit` of the vCPU that thread is
//! running, so a signal that lands just *before* the thread enters
//! `KVM_RUN` still makes it return at once with `EINTR` instead of being
//! lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::VcpuInterrupter;

thread_local! {
    /// `immediate_exit` byte of the `kvm_run` this thread is about to run,
    /// or null. Read by the signal handler on this same thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(|cell| cell.get());
    if !ptr.is_null() {
        // SAFETY: the pointer was set by `KvmVcpu::run` on this thread to a
        // byte inside that vCPU's kvm_run mapping, and is cleared before that
        // mapping can go away (the vCPU is borrowed for the whole call). A
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

static INSTALL_HANDLER: Once = Once::new();
static HANDLER_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the process-wide handler for [`kick_signal`] (once).
pub fn install_kick_handler() -> bool {
    INSTALL_HANDLER.call_once(|| {
        let ok = register_signal_handler(kick_signal(), on_kick_signal).is_ok();
        HANDLER_INSTALLED.store(ok, Ordering::SeqCst);
    });
    HANDLER_INSTALLED.load(Ordering::SeqCst)
}

/// Marks `ptr` as the `immediate_exit` byte the kick handler must set while
/// this thread runs a vCPU; `null` when it stops.
pub(super) fn set_current_immediate_exit(ptr: *mut u8) {
    IMMEDIATE_EXIT.with(|cell| cell.set(ptr));
}

/// The [`VcpuInterrupter`] of a KVM vCPU.
#[derive(Default)]
pub struct KvmInterrupter {
    /// An interrupt was asked for and `run` has not reported it yet.
    pub(super) pending: AtomicBool,
    /// The thread currently running this vCPU, if any.
    pub(super) thread: Mutex<Option<libc::pthread_t>>,
}

impl KvmInterrupter {
    pub(super) fn set_thread(&self, thread: Option<libc::pthread_t>) {
        if let Ok(mut guard) = self.thread.lock() {
            *guard = thread;
        }
    }
}

impl VcpuInterrupter for KvmInterrupter {
    fn interrupt(&self) {
        self.pending.store(true, Ordering::SeqCst);
        // Holding the lock keeps the thread from exiting (it clears the
        // entry under the same lock when the vCPU is dropped) while we
        // signal it, so the pthread_t is never stale.
        if let Ok(guard) = self.thread.lock() {
            if let Some(thread) = *guard {
                // SAFETY: `thread` is a live thread (see above) and the
                // signal has a handler installed by `install_kick_handler`.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
        }
    }
}
