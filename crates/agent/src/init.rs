//! `vessel-agent init`: a container's PID 1. It reaps every orphan the
//! container's processes leave (as PID 1 must), and on SIGTERM or SIGINT
//! passes SIGTERM to every other process in the container, waits for them
//! to end and exits 0. (A PID 1 without handlers ignores both, so the
//! container could only be killed.) Its supervisor escalates to SIGKILL
//! when a graceful stop takes too long.
//!
//! When its stdin is a terminal (the container's console, which the
//! supervisor holds for `vessel console`), it keeps a root login shell on
//! it, started again when it exits, as a getty would be.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::sys;

/// The shell on the console, and how it has been going.
struct ConsoleShell {
    pid: Option<i32>,
    started: Instant,
    /// Exits within a second of starting, in a row: at five the shell is
    /// taken to be broken (missing, failing) and not started again.
    quick_exits: u32,
}

impl ConsoleShell {
    fn start(&mut self) {
        let Some(shell) = ["/bin/bash", "/bin/sh"]
            .into_iter()
            .find(|s| Path::new(s).exists())
        else {
            eprintln!("vessel-agent init: no shell for the console (/bin/sh)");
            self.quick_exits = u32::MAX;
            return;
        };
        let home = if Path::new("/root").is_dir() {
            "/root"
        } else {
            "/"
        };
        let mut command = Command::new(shell);
        command
            .arg("-l")
            .env_clear()
            .env("TERM", "linux")
            .env("HOME", home)
            .env("USER", "root")
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .current_dir(home);
        // SAFETY: the hook makes only async-signal-safe system calls
        // (setsid, ioctl).
        unsafe {
            command.pre_exec(sys::become_session_leader_on_stdin);
        }
        self.started = Instant::now();
        match command.spawn() {
            Ok(child) => self.pid = Some(child.id() as i32),
            Err(e) => {
                eprintln!("vessel-agent init: starting {shell} on the console: {e}");
                self.quick_exits += 1;
            }
        }
    }

    /// Called with each reaped pid.
    fn exited(&mut self, pid: i32) {
        if self.pid == Some(pid) {
            self.pid = None;
            if self.started.elapsed() < Duration::from_secs(1) {
                self.quick_exits += 1;
            } else {
                self.quick_exits = 0;
            }
        }
    }

    /// Starts the shell again if it is gone and not broken.
    fn keep(&mut self) {
        if self.pid.is_none() && self.quick_exits < 5 {
            if self.quick_exits > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            self.start();
        }
    }
}

pub fn run() -> ! {
    let signals = [sys::SIGTERM, sys::SIGINT, sys::SIGCHLD];
    if let Err(e) = sys::block_signals(&signals) {
        eprintln!("vessel-agent init: blocking signals: {e}");
        std::process::exit(1);
    }
    let mut stopping = false;
    let mut console = sys::is_terminal(0).then(|| ConsoleShell {
        pid: None,
        started: Instant::now(),
        quick_exits: 0,
    });
    if let Some(shell) = console.as_mut() {
        shell.start();
    }
    loop {
        match sys::wait_signal(&signals) {
            Ok(sig) if sig == sys::SIGTERM || sig == sys::SIGINT => {
                if !stopping {
                    stopping = true;
                    // -1: every process this one may signal, which in a
                    // PID namespace is the container's, except itself.
                    let _ = sys::send_signal(-1, sys::SIGTERM);
                    // An interactive shell ignores SIGTERM: the console's
                    // gets what a terminal's hangup sends.
                    if let Some(pid) = console.as_ref().and_then(|c| c.pid) {
                        let _ = sys::send_signal(-pid, sys::SIGHUP);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("vessel-agent init: waiting for signals: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let none_left = sys::reap_all(|pid| {
            if let Some(shell) = console.as_mut() {
                shell.exited(pid);
            }
        });
        if stopping && none_left {
            std::process::exit(0);
        }
        if let (Some(shell), false) = (console.as_mut(), stopping) {
            shell.keep();
        }
    }
}
