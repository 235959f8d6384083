//! One command for the host: the [`Exec`] frame, the process, and the
//! relaying of its stdio until it exits.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vessel_agent::{Exec, Frame};

use crate::sys;

/// The stream to the host, shared by the threads that write frames.
type Out = Arc<Mutex<File>>;

fn send(out: &Out, frame: &Frame) -> io::Result<()> {
    let mut stream = out.lock().map_err(|_| io::Error::other("stream lock"))?;
    frame.write(&mut *stream)
}

/// Serves one connection; errors end it (the host sees the stream close).
pub fn serve(stream: OwnedFd) {
    let mut input = File::from(stream);
    let out = match input.try_clone() {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(_) => return,
    };
    let exec = match Frame::read(&mut input) {
        Ok(Some(Frame::Exec(exec))) => exec,
        Ok(Some(other)) => {
            let _ = send(
                &out,
                &Frame::Error(format!("expected an exec request, got {other:?}")),
            );
            return;
        }
        Ok(None) | Err(_) => return,
    };
    if let Err(e) = run(exec, input, &out) {
        let _ = send(&out, &Frame::Error(e.to_string()));
    }
}

/// The command's side of a pty, or of three pipes.
enum Io {
    Pty { master: File },
    Pipes,
}

fn command(exec: &Exec) -> io::Result<Command> {
    let Some(program) = exec.argv.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty command",
        ));
    };
    let mut cmd = Command::new(program);
    cmd.args(&exec.argv[1..]);
    cmd.current_dir(if exec.cwd.is_empty() { "/" } else { &exec.cwd });
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    for pair in &exec.env {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("environment entry {pair:?} is not KEY=VALUE"),
                ))
            }
        }
    }
    Ok(cmd)
}

fn run(exec: Exec, mut input: File, out: &Out) -> io::Result<()> {
    let mut cmd = command(&exec)?;
    let (mut child, io) = if exec.tty {
        let (master, slave) = sys::open_pty(exec.rows.max(1), exec.cols.max(1))?;
        let slave = File::from(slave);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe system calls (setsid, ioctl).
        unsafe {
            cmd.pre_exec(sys::become_session_leader_on_stdin);
        }
        let child = spawn(&mut cmd, &exec)?;
        // `cmd` holds the parent's copies of the slave: drop them, so that
        // reading the master ends when the command's side closes.
        drop(cmd);
        (
            child,
            Io::Pty {
                master: File::from(master),
            },
        )
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that a signal from the host reaches
        // the whole command (a shell and its children).
        cmd.process_group(0);
        (spawn(&mut cmd, &exec)?, Io::Pipes)
    };
    let pid = child.id();
    send(out, &Frame::Started { pid })?;

    // Output: one thread per stream, each sending frames until EOF.
    let mut readers = Vec::new();
    let mut stdin: Option<Box<dyn Write + Send>> = None;
    let mut master_fd = None;
    match io {
        Io::Pty { master } => {
            master_fd = Some(master.as_raw_fd());
            stdin = Some(Box::new(master.try_clone()?));
            readers.push(relay(master, out.clone(), Frame::Stdout));
        }
        Io::Pipes => {
            if let Some(s) = child.stdin.take() {
                stdin = Some(Box::new(s));
            }
            if let Some(s) = child.stdout.take() {
                readers.push(relay(s, out.clone(), Frame::Stdout));
            }
            if let Some(s) = child.stderr.take() {
                readers.push(relay(s, out.clone(), Frame::Stderr));
            }
        }
    }
    // Input from the host, on its own thread: stdin, signals, resizes.
    let group = if exec.tty { pid as i32 } else { -(pid as i32) };
    // Set once the command has exited (before its Exit frame goes out):
    // from then on the host's leaving, or a late signal, is not for the
    // processes it left running in the background on purpose.
    let exited = Arc::new(AtomicBool::new(false));
    let exited_seen = exited.clone();
    std::thread::spawn(move || {
        loop {
            match Frame::read(&mut input) {
                Ok(Some(Frame::Stdin(data))) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(Some(Frame::StdinEof)) => {
                    if exec.tty {
                        // A terminal has no end of file: send its EOF
                        // character, as a user's Ctrl-D would.
                        if let Some(w) = stdin.as_mut() {
                            let _ = w.write_all(&[4]);
                        }
                    } else {
                        stdin = None; // closes the pipe
                    }
                }
                Ok(Some(Frame::Signal(signal))) => {
                    if !exited_seen.load(Ordering::SeqCst) {
                        let _ = sys::send_signal(group, signal);
                    }
                }
                Ok(Some(Frame::Resize { rows, cols })) => {
                    if let Some(fd) = master_fd {
                        let _ = sys::set_window_size(fd, rows, cols);
                    }
                }
                Ok(Some(_)) => {}
                // The host went away while the command ran: so does the
                // command.
                Ok(None) | Err(_) => {
                    if !exited_seen.load(Ordering::SeqCst) {
                        let _ = sys::send_signal(group, 9);
                    }
                    return;
                }
            }
        }
    });
    let status = child.wait()?;
    exited.store(true, Ordering::SeqCst);
    for reader in readers {
        let _ = reader.join();
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    send(out, &Frame::Exit(code))
}

fn spawn(cmd: &mut Command, exec: &Exec) -> io::Result<Child> {
    cmd.spawn().map_err(|e| {
        let program = exec.argv.first().map(String::as_str).unwrap_or_default();
        io::Error::new(e.kind(), format!("{program}: {e}"))
    })
}

/// Sends what `from` yields as frames made by `frame`, until its end (a
/// pty master's EIO once the command's side is closed counts as the end).
fn relay(
    mut from: impl Read + Send + 'static,
    out: Out,
    frame: fn(Vec<u8>) -> Frame,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if send(&out, &frame(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}
