//! Prints the host's TSC frequency in kHz, measured against the monotonic clock over
//! 300 ms. QEMU's TCG guest reads the host's TSC, so its `tsc_early_khz=` must be this
//! figure: a wrong one makes the guest's clock, and every time measured inside it, run
//! fast or slow (2000000 on a 2.6 GHz host made it run 1.3x fast).
use std::time::{Duration, Instant};

fn main() {
    let tsc = || {
        // SAFETY: RDTSC reads a counter; it touches no memory.
        unsafe { std::arch::x86_64::_rdtsc() }
    };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(300));
    let (c1, dt) = (tsc(), t0.elapsed());
    println!("{}", (c1.wrapping_sub(c0) as f64 / dt.as_secs_f64() / 1000.0).round() as u64);
}
