//! The vessel daemon's client: what the `vessel` command uses to talk to
//! `vessel daemon` over its Unix socket.
//!
//! Each call opens a connection (HTTP/1.1 by hyper), sends one request
//! and reads one response. Operations are waited on until they end, and
//! their failure is an error. [`Client::exec`] upgrades the connection
//! and hands back the raw stream, which then carries the agent protocol.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the vessel daemon is not running (nothing listens on {0}); start it with `vessel daemon` (or `systemctl start vessel`)")]
    NotRunning(PathBuf),
    #[error("{path} belongs to uid {uid}, not to root or you: refusing to talk to it")]
    Untrusted { path: PathBuf, uid: u32 },
    #[error("{path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon's own error message.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("talking to the vessel daemon: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

fn protocol(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// The socket the client uses: `$VESSEL_SOCKET`, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("VESSEL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(api::DEFAULT_SOCKET))
}

/// A client of the daemon at one socket.
pub struct Client {
    socket: PathBuf,
}

/// A response: status and body.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// Connects, checking first that the socket is root's or ours.
    async fn connect(&self) -> Result<TokioIo<tokio::net::UnixStream>> {
        check_socket(&self.socket)?;
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                _ => ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                },
            })?;
        Ok(TokioIo::new(stream))
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(protocol)?;
        tokio::spawn(conn);
        let response = sender.send_request(request).await.map_err(protocol)?;
        answer(response).await
    }

    fn build(method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "vessel");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(protocol)
    }

    /// Sends a request and decodes a 2xx JSON answer; a 4xx or 5xx is the
    /// daemon's error message.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let body = body
            .map(|b| serde_json::to_vec(b).map_err(protocol))
            .transpose()?;
        let answer = self.send(Self::build(method, path, body)?).await?;
        decode(answer)
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        self.call::<(), R>(Method::GET, path, None).await
    }

    /// A text resource (logs).
    pub async fn get_text(&self, path: &str) -> Result<Bytes> {
        let answer = self.send(Self::build(Method::GET, path, None)?).await?;
        if answer.status.is_success() {
            Ok(answer.body)
        } else {
            Err(api_error(&answer))
        }
    }

    /// Sends a request that starts an operation and waits for it to end.
    pub async fn operation<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<api::Operation> {
        let op: api::Operation = self.call(method, path, body).await?;
        loop {
            let done: api::Operation = self
                .get(&format!("/1.0/operations/{}/wait?timeout=3600", op.id))
                .await?;
            match done.status {
                api::OperationStatus::Running => continue,
                api::OperationStatus::Success => return Ok(done),
                api::OperationStatus::Failure => {
                    return Err(ClientError::Api {
                        status: 500,
                        message: done
                            .error
                            .unwrap_or_else(|| format!("{} failed", done.description)),
                    })
                }
            }
        }
    }

    /// Opens an exec session on instance `name`: the upgraded connection,
    /// as a blocking stream that carries the agent protocol, and the bytes
    /// of it already read with the response (an early error frame).
    pub async fn exec(&self, name: &str) -> Result<(std::os::unix::net::UnixStream, Vec<u8>)> {
        self.upgrade(&format!("/1.0/instances/{name}/exec"), api::EXEC_UPGRADE)
            .await
    }

    /// Attaches to instance `name`'s console: the upgraded connection (its
    /// output in, a VM's serial input out), and the bytes of it already
    /// read with the response.
    pub async fn console(&self, name: &str) -> Result<(std::os::unix::net::UnixStream, Vec<u8>)> {
        self.upgrade(
            &format!("/1.0/instances/{name}/console"),
            api::CONSOLE_UPGRADE,
        )
        .await
    }

    /// POSTs an HTTP upgrade to `upgrade_to` at `path`: the upgraded
    /// connection as a blocking stream, and what was read past the
    /// response.
    async fn upgrade(
        &self,
        path: &str,
        upgrade_to: &str,
    ) -> Result<(std::os::unix::net::UnixStream, Vec<u8>)> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(protocol)?;
        tokio::spawn(conn.with_upgrades());
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, "vessel")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, upgrade_to)
            .body(Full::new(Bytes::new()))
            .map_err(protocol)?;
        let response = sender.send_request(request).await.map_err(protocol)?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(api_error(&answer(response).await?));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(protocol)?;
        let parts = upgraded
            .downcast::<TokioIo<tokio::net::UnixStream>>()
            .map_err(|_| protocol("the upgraded connection is not the Unix socket"))?;
        let early = parts.read_buf.to_vec();
        let stream = parts.io.into_inner().into_std().map_err(protocol)?;
        stream.set_nonblocking(false).map_err(protocol)?;
        Ok((stream, early))
    }
}

/// A response's status and whole body.
async fn answer(response: hyper::Response<hyper::body::Incoming>) -> Result<Answer> {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(protocol)?
        .to_bytes();
    Ok(Answer { status, body })
}

fn api_error(answer: &Answer) -> ClientError {
    let message = serde_json::from_slice::<api::ErrorBody>(&answer.body)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            format!(
                "HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )
        });
    ClientError::Api {
        status: answer.status.as_u16(),
        message,
    }
}

fn decode<R: DeserializeOwned>(answer: Answer) -> Result<R> {
    if !answer.status.is_success() {
        return Err(api_error(&answer));
    }
    serde_json::from_slice(&answer.body).map_err(protocol)
}

/// Refuses a socket that belongs to neither root nor this user: what
/// answers there could be anyone's.
fn check_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Err(ClientError::NotRunning(path.to_owned())),
    };
    if !meta.file_type().is_socket() {
        return Err(ClientError::NotRunning(path.to_owned()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(ClientError::Untrusted {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

pub mod exec;
