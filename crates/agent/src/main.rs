//! `vessel-agent`: listens on vsock port [`AGENT_PORT`] in the guest and
//! runs the commands the host sends, relaying stdio, window sizes, signals
//! and the exit status (protocol: the `vessel_agent` library).
//!
//! `vessel-agent [PORT]`; the default guest's init starts it when the
//! machine has a vsock device. `vessel-agent --stdio` serves one session
//! on its stdin instead (a socket), and `vessel-agent init` is a
//! container's PID 1 (see [`init`]): the daemon runs both in containers,
//! so that exec is the same protocol for VMs and containers.

mod init;
mod power;
mod session;
mod sys;

use std::os::fd::AsRawFd;

use vessel_agent::AGENT_PORT;

fn main() {
    let arg = std::env::args().nth(1);
    let port = match arg.as_deref() {
        None => AGENT_PORT,
        // One session on the socket that is this process's stdin (a
        // container's supervisor hands each exec its own connection).
        Some("--stdio") => {
            match std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned() {
                Ok(stream) => session::serve(stream),
                Err(e) => eprintln!("vessel-agent: stdin: {e}"),
            }
            return;
        }
        // PID 1 of a container.
        Some("init") => init::run(),
        Some(p) => match p.parse() {
            Ok(p) => p,
            Err(_) => {
                eprintln!("vessel-agent: {p}: not a port number (or --stdio, init)");
                std::process::exit(2);
            }
        },
    };
    // The guest agent also answers the machine's power button.
    power::watch();
    let listener = match sys::vsock_listen(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vessel-agent: listening on vsock port {port}: {e}");
            std::process::exit(1);
        }
    };
    loop {
        match sys::accept(listener.as_raw_fd()) {
            Ok(stream) => {
                let spawned = std::thread::Builder::new()
                    .name("session".into())
                    .spawn(move || session::serve(stream));
                if let Err(e) = spawned {
                    eprintln!("vessel-agent: starting a session: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("vessel-agent: accepting: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
