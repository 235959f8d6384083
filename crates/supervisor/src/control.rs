//! The supervisor's control socket (`control.sock`, mode 0600): one JSON
//! request line per connection, one JSON reply line. After the reply to
//! [`Request::Exec`] the connection is the exec'd agent's; after the reply
//! to [`Request::Watch`] it stays open until the instance ends.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{io_err, sys, Error, Layout, Result, Shared};

/// The longest request line read.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Is the instance running, and as which pid.
    Status,
    /// End the instance: SIGTERM to its init (a VM's VMM, which presses
    /// the power button), SIGKILL after `timeout` seconds (at once with
    /// `force`). Answered once it has ended.
    Stop { timeout: u64, force: bool },
    /// Hand this connection to a new `vessel-agent --stdio` inside (a
    /// container), or to the guest agent (a VM).
    Exec,
    /// Keep this connection open until the instance ends.
    Watch,
    /// Attach this connection to the console: its output, live, and what
    /// the client sends as a VM's serial input.
    Console,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Control connections being answered (the main thread lets them finish
/// before the process exits).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Binds the control socket and answers it on a thread of its own.
pub(crate) fn serve(shared: Arc<Shared>) -> Result<()> {
    let path = shared.layout.control();
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("request".into())
                    .spawn(move || {
                        if let Err(e) = answer(&shared, conn) {
                            tracing::warn!("control request: {e}");
                        }
                        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .map_err(io_err("starting the control thread"))?;
    Ok(())
}

/// Waits (up to 2 s) for the requests being answered.
pub(crate) fn drain() {
    let deadline = Instant::now() + Duration::from_secs(2);
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn reply(conn: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    conn.write_all(&line)
}

fn answer(shared: &Arc<Shared>, mut conn: UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    conn.set_read_timeout(None)?;
    let request: Request = match serde_json::from_str(line.trim_end()) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                &mut conn,
                &Reply {
                    ok: false,
                    pid: None,
                    error: Some(format!("bad request: {e}")),
                },
            )
        }
    };
    // An instance that has ended answers nothing (the connection closes,
    // which the daemon reads as "not running"): its pid may be reaped.
    if shared.has_ended() {
        return Ok(());
    }
    let ok = Reply {
        ok: true,
        pid: Some(shared.pid),
        error: None,
    };
    match request {
        Request::Status => reply(&mut conn, &ok),
        Request::Stop { timeout, force } => {
            stop(shared, timeout, force);
            shared.wait_ended();
            reply(&mut conn, &ok)
        }
        Request::Exec if shared.is_vm => {
            reply(&mut conn, &ok)?;
            crate::vm::exec(&shared.layout, conn, || shared.has_ended());
            Ok(())
        }
        Request::Exec => {
            reply(&mut conn, &ok)?;
            let stdin = OwnedFd::from(conn.try_clone()?);
            let stdout = OwnedFd::from(conn);
            // The agent inherits the helper's stdio: nothing of the host's
            // (no log file) may reach the container, so stderr is null.
            // The helper reports its own failures on the connection.
            Command::new("/proc/self/exe")
                .arg("supervise-exec")
                .arg(&shared.layout.dir)
                .stdin(Stdio::from(stdin))
                .stdout(Stdio::from(stdout))
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| io::Error::new(e.kind(), format!("starting the exec helper: {e}")))?;
            // Not waited for here: the main thread reaps every child.
            Ok(())
        }
        Request::Watch => {
            reply(&mut conn, &ok)?;
            shared.wait_ended();
            Ok(())
        }
        Request::Console => {
            reply(&mut conn, &ok)?;
            attach_console(shared, conn)
        }
    }
}

/// Serves one console client until it leaves or the instance ends.
fn attach_console(shared: &Arc<Shared>, conn: UnixStream) -> io::Result<()> {
    let output = conn.try_clone()?;
    let id = shared.console_attached.add(output);
    let mut input = conn;
    let mut buf = [0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(serial) = &shared.console_input {
            let mut serial = serial.lock().unwrap_or_else(|e| e.into_inner());
            if serial.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    shared.console_attached.remove(id);
    Ok(())
}

/// Ends the instance: SIGKILL with `force`, else SIGTERM to its init
/// (repeated each second, in case the init had not yet set up its
/// handlers) and SIGKILL after `timeout` seconds. Every signal is sent
/// under the `ended` lock, which the main thread sets before it reaps the
/// init, so a reaped (and perhaps reused) pid is never signalled.
pub(crate) fn stop(shared: &Arc<Shared>, timeout: u64, force: bool) {
    let signal = |sig| {
        let ended = shared.ended.lock().unwrap_or_else(|e| e.into_inner());
        if !*ended {
            sys::kill(shared.pid, sig);
        }
        !*ended
    };
    if force {
        signal(libc::SIGKILL);
        return;
    }
    signal(libc::SIGTERM);
    let shared = shared.clone();
    let _ = std::thread::Builder::new()
        .name("stop-timeout".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if shared.wait_ended_for(left.min(Duration::from_secs(1))) {
                    return;
                }
                let ended = shared.ended.lock().unwrap_or_else(|e| e.into_inner());
                if *ended {
                    return;
                }
                if Instant::now() >= deadline {
                    sys::kill(shared.pid, libc::SIGKILL);
                    return;
                }
                sys::kill(shared.pid, libc::SIGTERM);
            }
        });
}

/// The daemon's side of a supervisor's control socket.
pub struct Control;

impl Control {
    /// Sends `request` and reads the reply line; the connection, for
    /// exec and watch. [`Error::NotRunning`] if no supervisor answers.
    pub fn request(layout: &Layout, request: &Request) -> Result<(Reply, UnixStream)> {
        Self::request_within(layout, request, Duration::from_secs(10))
    }

    /// [`Self::request`], waiting at most `limit` for the reply.
    fn request_within(
        layout: &Layout,
        request: &Request,
        limit: Duration,
    ) -> Result<(Reply, UnixStream)> {
        let path = layout.control();
        let mut conn = UnixStream::connect(&path).map_err(|_| Error::NotRunning(path.clone()))?;
        let broken = |e: io::Error| Error::Io {
            context: format!("the supervisor at {} did not answer", path.display()),
            source: e,
        };
        conn.set_read_timeout(Some(limit)).map_err(broken)?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(broken)?;
        let mut line = serde_json::to_vec(request).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push(b'\n');
        conn.write_all(&line).map_err(broken)?;
        let reply = match read_reply(&conn) {
            Ok(r) => r,
            // Closed without a word: the instance has ended.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Error::NotRunning(path.clone()))
            }
            Err(e) => return Err(broken(e)),
        };
        conn.set_read_timeout(None).map_err(broken)?;
        conn.set_write_timeout(None).map_err(broken)?;
        if !reply.ok {
            return Err(Error::Invalid(
                reply
                    .error
                    .unwrap_or_else(|| "the supervisor refused".into()),
            ));
        }
        Ok((reply, conn))
    }

    /// The running instance's pid; [`Error::NotRunning`] if it is not.
    pub fn status(layout: &Layout) -> Result<i32> {
        let (reply, _) = Self::request(layout, &Request::Status)?;
        reply
            .pid
            .ok_or_else(|| Error::Invalid("the supervisor gave no pid".into()))
    }

    /// Stops the instance and returns once it has ended and its
    /// supervisor is gone.
    pub fn stop(layout: &Layout, timeout: u64, force: bool) -> Result<()> {
        let limit = Duration::from_secs(timeout.saturating_add(30));
        match Self::request_within(layout, &Request::Stop { timeout, force }, limit) {
            Ok(_) | Err(Error::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
        wait_unsupervised(layout, Duration::from_secs(10))
    }
}

/// Waits until no process holds the instance's supervisor lock.
pub fn wait_unsupervised(layout: &Layout, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while layout.is_supervised() {
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "the supervisor of {} did not exit",
                layout.dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads one reply line, byte by byte, so nothing after it is consumed
/// (after an exec reply, the agent's frames follow).
fn read_reply(mut conn: &UnixStream) -> io::Result<Reply> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte)? {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ if byte[0] == b'\n' => break,
            _ if line.len() as u64 >= MAX_REQUEST => {
                return Err(io::Error::other("reply line too long"))
            }
            _ => line.push(byte[0]),
        }
    }
    serde_json::from_slice(&line).map_err(io::Error::other)
}
