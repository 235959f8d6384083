//! Host calls std does not wrap.

/// Hands the heap's free pages back to the host (glibc's `malloc_trim`):
/// freed blocks are many small allocations, which `free` alone keeps.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only releases memory the
    // allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
