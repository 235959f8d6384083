//! `vessel-agent init`: a container's PID 1. It reaps every orphan the
//! container's processes leave (as PID 1 must), and on SIGTERM or SIGINT
//! passes SIGTERM to every other process in the container, waits for them
//! to end and exits 0. (A PID 1 without handlers ignores both, so the
//! container could only be killed.) Its supervisor escalates to SIGKILL
//! when a graceful stop takes too long.

use crate::sys;

pub fn run() -> ! {
    let signals = [sys::SIGTERM, sys::SIGINT, sys::SIGCHLD];
    if let Err(e) = sys::block_signals(&signals) {
        eprintln!("vessel-agent init: blocking signals: {e}");
        std::process::exit(1);
    }
    let mut stopping = false;
    loop {
        match sys::wait_signal(&signals) {
            Ok(sig) if sig == sys::SIGTERM || sig == sys::SIGINT => {
                if !stopping {
                    stopping = true;
                    // -1: every process this one may signal, which in a
                    // PID namespace is the container's, except itself.
                    let _ = sys::send_signal(-1, sys::SIGTERM);
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("vessel-agent init: waiting for signals: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let none_left = sys::reap_all();
        if stopping && none_left {
            std::process::exit(0);
        }
    }
}
