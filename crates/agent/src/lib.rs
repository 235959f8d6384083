//! The protocol between vessel on the host and `vessel-agent` in the
//! guest, over one vsock stream per command.
//!
//! Every message is a frame: a kind byte, a little-endian u32 length, and
//! that many bytes. The host opens the stream (through the vsock device's
//! `CONNECT <port>`), sends one [`Exec`], then stdin data, signals and
//! window sizes; the agent answers [`Frame::Started`] (or
//! [`Frame::Error`]), then the command's output, and last its
//! [`Frame::Exit`]. Either side closing the stream ends the command.
//!
//! std only: the guest crate compiles this crate with bare rustc.

use std::io::{self, Read, Write};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The largest frame either side accepts (a bigger length is an error,
/// not an allocation).
pub const MAX_FRAME: usize = 1 << 20;

/// What the host asks the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Exec {
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to the agent's environment.
    pub env: Vec<String>,
    /// Working directory; empty: `/`.
    pub cwd: String,
    /// Run on a pseudo-terminal of `rows` x `cols` (stdout and stderr
    /// both come as [`Frame::Stdout`]).
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // Host to agent.
    Exec(Exec),
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    // Agent to host.
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The exit status as a shell reports it: the code, or 128 + signal.
    Exit(i32),
    /// The command could not start (the message says why).
    Error(String),
}

const EXEC: u8 = 1;
const STDIN: u8 = 2;
const STDIN_EOF: u8 = 3;
const SIGNAL: u8 = 4;
const RESIZE: u8 = 5;
const STARTED: u8 = 16;
const STDOUT: u8 = 17;
const STDERR: u8 = 18;
const EXIT: u8 = 19;
const ERROR: u8 = 20;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_list(out: &mut Vec<u8>, items: &[String]) {
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for item in items {
        put_str(out, item);
    }
}

/// Reads fields from a frame's payload, every length checked.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(invalid("frame shorter than its fields"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self) -> io::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> io::Result<String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid("a string is not UTF-8"))
    }

    fn list(&mut self) -> io::Result<Vec<String>> {
        let n = self.u32()? as usize;
        // Each entry needs at least its 4-byte length: bounded by the frame.
        if n > self.bytes.len() / 4 {
            return Err(invalid("a list longer than its frame"));
        }
        (0..n).map(|_| self.string()).collect()
    }
}

impl Frame {
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Frame::Exec(e) => {
                let mut p = vec![u8::from(e.tty)];
                p.extend_from_slice(&e.rows.to_le_bytes());
                p.extend_from_slice(&e.cols.to_le_bytes());
                put_list(&mut p, &e.argv);
                put_list(&mut p, &e.env);
                put_str(&mut p, &e.cwd);
                (EXEC, p)
            }
            Frame::Stdin(d) => (STDIN, d.clone()),
            Frame::StdinEof => (STDIN_EOF, Vec::new()),
            Frame::Signal(s) => (SIGNAL, s.to_le_bytes().to_vec()),
            Frame::Resize { rows, cols } => {
                let mut p = rows.to_le_bytes().to_vec();
                p.extend_from_slice(&cols.to_le_bytes());
                (RESIZE, p)
            }
            Frame::Started { pid } => (STARTED, pid.to_le_bytes().to_vec()),
            Frame::Stdout(d) => (STDOUT, d.clone()),
            Frame::Stderr(d) => (STDERR, d.clone()),
            Frame::Exit(code) => (EXIT, code.to_le_bytes().to_vec()),
            Frame::Error(m) => (ERROR, m.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read(from: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        match from.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => from.read_exact(&mut head[1..])?,
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!("a frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload)?;
        Frame::decode(head[0], &payload).map(Some)
    }

    fn decode(kind: u8, payload: &[u8]) -> io::Result<Frame> {
        let mut f = Fields { bytes: payload };
        let frame = match kind {
            EXEC => {
                let tty = f.take(1)?[0] != 0;
                let rows = f.u16()?;
                let cols = f.u16()?;
                Frame::Exec(Exec {
                    tty,
                    rows,
                    cols,
                    argv: f.list()?,
                    env: f.list()?,
                    cwd: f.string()?,
                })
            }
            STDIN => Frame::Stdin(payload.to_vec()),
            STDIN_EOF => Frame::StdinEof,
            SIGNAL => Frame::Signal(f.u32()? as i32),
            RESIZE => Frame::Resize {
                rows: f.u16()?,
                cols: f.u16()?,
            },
            STARTED => Frame::Started { pid: f.u32()? },
            STDOUT => Frame::Stdout(payload.to_vec()),
            STDERR => Frame::Stderr(payload.to_vec()),
            EXIT => Frame::Exit(f.u32()? as i32),
            ERROR => Frame::Error(String::from_utf8_lossy(payload).into_owned()),
            other => return Err(invalid(format!("unknown frame kind {other}"))),
        };
        Ok(frame)
    }

    /// Writes the frame whole.
    pub fn write(&self, to: &mut impl Write) -> io::Result<()> {
        to.write_all(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec!["A=b c".into()],
                cwd: "/tmp".into(),
                tty: true,
                rows: 24,
                cols: 80,
            }),
            Frame::Stdin(b"data".to_vec()),
            Frame::StdinEof,
            Frame::Signal(15),
            Frame::Resize {
                rows: 50,
                cols: 120,
            },
            Frame::Started { pid: 42 },
            Frame::Stdout(vec![0, 1, 2]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(137),
            Frame::Error("no such file".into()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write(&mut wire).unwrap();
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(Frame::read(&mut r).unwrap().as_ref(), Some(f));
        }
        assert_eq!(Frame::read(&mut r).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_errors_not_panics_or_huge_allocations() {
        for wire in [
            vec![99u8, 0, 0, 0, 0],                                        // unknown kind
            vec![EXEC, 1, 0, 0, 0, 1],                                     // exec cut short
            vec![STDIN, 0xff, 0xff, 0xff, 0xff],                           // 4 GiB
            vec![EXEC, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f], // a huge list
            vec![SIGNAL, 1, 0, 0, 0, 1],                                   // short signal
            vec![STDOUT, 4, 0, 0],                                         // truncated header
        ] {
            let mut r = &wire[..];
            assert!(Frame::read(&mut r).is_err(), "{wire:?}");
        }
    }
}
