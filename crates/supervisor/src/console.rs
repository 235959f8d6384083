//! The instance's console output: read from its pipe and appended to
//! `console.log`, which is rotated to `console.log.1` at a size cap, so
//! the log survives restarts without growing without bound.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// Copies the pipe into the log on a thread of its own until the pipe's
/// writers are all gone.
pub fn pump(pipe: OwnedFd, log: PathBuf, cap: u64) {
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || copy(fs::File::from(pipe), &log, cap));
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

fn copy(mut pipe: fs::File, log: &PathBuf, cap: u64) {
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
    }
}
