//! `vessel-agent`: listens on vsock port [`AGENT_PORT`] in the guest and
//! runs the commands the host sends, relaying stdio, window sizes, signals
//! and the exit status (protocol: the `vessel_agent` library).
//!
//! `vessel-agent [PORT]`; the default guest's init starts it when the
//! machine has a vsock device.

mod session;
mod sys;

use std::os::fd::AsRawFd;

use vessel_agent::AGENT_PORT;

fn main() {
    let port = match std::env::args().nth(1) {
        None => AGENT_PORT,
        Some(p) => match p.parse() {
            Ok(p) => p,
            Err(_) => {
                eprintln!("vessel-agent: {p}: not a port number");
                std::process::exit(2);
            }
        },
    };
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
