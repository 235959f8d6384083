//! The instance's console output: read from its pipe and appended to
//! `console.log`, which is rotated to `console.log.1` at a size cap, so
//! the log survives restarts without growing without bound; and copied
//! live to the clients attached by `vessel console` ([`Attached`]).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The connections attached to the console, by id.
#[derive(Default)]
pub(crate) struct Attached {
    clients: Mutex<(u64, Vec<(u64, UnixStream)>)>,
}

impl Attached {
    /// Adds a client; its id, for [`Attached::remove`].
    pub(crate) fn add(&self, conn: UnixStream) -> u64 {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 += 1;
        let id = guard.0;
        guard.1.push((id, conn));
        id
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.retain(|(i, _)| *i != id);
    }

    /// Copies `bytes` to every client without waiting: a client that
    /// does not keep up loses output (the log has it all) rather than
    /// stalling the instance's console.
    fn send(&self, bytes: &[u8]) {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.retain(
            |(_, conn)| match crate::sys::send_now(conn.as_raw_fd(), bytes) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            },
        );
    }

    /// Ends every attachment (the instance ended).
    fn close_all(&self) {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for (_, conn) in guard.1.drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Copies the pipe into the log and to the attached clients on a thread
/// of its own until the pipe's writers are all gone.
pub fn pump(pipe: OwnedFd, log: PathBuf, cap: u64, attached: Arc<Attached>) {
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            copy(fs::File::from(pipe), &log, cap, &attached);
            attached.close_all();
        });
    if let Err(e) = spawned {
        tracing::error!("console log thread: {e}");
    }
}

fn open(log: &PathBuf) -> Option<fs::File> {
    match fs::OpenOptions::new().create(true).append(true).open(log) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!("opening {}: {e}", log.display());
            None
        }
    }
}

fn copy(mut pipe: fs::File, log: &PathBuf, cap: u64, attached: &Attached) {
    let mut out = open(log);
    let mut size = out
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if size + n as u64 > cap {
            let _ = fs::rename(log, log.with_extension("log.1"));
            out = open(log);
            size = 0;
        }
        if let Some(f) = out.as_mut() {
            if f.write_all(&buf[..n]).is_ok() {
                size += n as u64;
            }
        }
        attached.send(&buf[..n]);
    }
}
