//! An exec session on the upgraded connection: the agent protocol's
//! host side, with this process's stdio.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use vessel_agent::{Exec, Frame};

/// How a session ended without an exit status.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The command could not start (the agent's message).
    #[error("{0}")]
    NotStarted(String),
    #[error("the exec session broke: {0}")]
    Io(#[from] io::Error),
    #[error("the exec session ended without the command's exit status")]
    NoExit,
}

/// Runs `exec` on `stream` (whose first bytes, already read, are
/// `early`): this process's stdin goes to the command (until EOF), its
/// output comes to stdout and stderr. Returns the exit status as a shell
/// reports it.
pub fn run(stream: UnixStream, early: Vec<u8>, exec: Exec) -> Result<i32, SessionError> {
    let mut writer = stream.try_clone()?;
    writer.write_all(&Frame::Exec(exec).encode())?;
    let mut stdin_writer = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    let _ = stdin_writer.write_all(&Frame::StdinEof.encode());
                    return;
                }
                Ok(n) => {
                    if stdin_writer
                        .write_all(&Frame::Stdin(buf[..n].to_vec()).encode())
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let _ = stdin_writer.write_all(&Frame::StdinEof.encode());
                    return;
                }
            }
        }
    });
    let mut reader = io::BufReader::new(io::Cursor::new(early).chain(stream));
    loop {
        match Frame::read(&mut reader)? {
            None => return Err(SessionError::NoExit),
            Some(Frame::Started { .. }) => {}
            Some(Frame::Stdout(data)) => {
                let mut out = io::stdout().lock();
                out.write_all(&data)?;
                out.flush()?;
            }
            Some(Frame::Stderr(data)) => {
                let mut err = io::stderr().lock();
                err.write_all(&data)?;
                err.flush()?;
            }
            Some(Frame::Exit(code)) => return Ok(code),
            Some(Frame::Error(message)) => return Err(SessionError::NotStarted(message)),
            Some(other) => {
                return Err(SessionError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected frame from the agent: {other:?}"),
                )))
            }
        }
    }
}
