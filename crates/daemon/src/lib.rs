//! The vessel daemon (`vessel daemon`): lasting instances behind a JSON
//! REST API ([`api`]) on a root-only Unix socket.
//!
//! - State that must survive the daemon is in SQLite ([`state`]) under
//!   the state directory, with one directory per instance
//!   (`instances/<name>`: its kept root layer, console log, control
//!   socket).
//! - Each running instance has its own supervisor process ([`supervisor`]),
//!   started by the daemon in a process group of its own: the daemon can
//!   stop or die and the instance keeps running; a restarted daemon finds
//!   it again through its control socket (adoption).
//! - Changes (create, start, stop, restart, delete) are operations
//!   ([`ops`]), serialized per instance; every status change is an event.
//! - After a host reboot, instances marked autostart are started again.
//!
//! Containers are the kind the daemon runs so far; VM instances are
//! refused with an error that says so.

mod images;
mod instances;
mod ops;
mod routes;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::future::IntoFuture;

use tokio::sync::broadcast;

pub use routes::{router, ROUTES};

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The API socket.
    pub socket: PathBuf,
    /// Where the database and the instances' directories live.
    pub state_dir: PathBuf,
    /// The `vessel` binary, whose `supervise` subcommand runs instances.
    pub supervisor_program: PathBuf,
    /// Where images (and their downloads) are cached.
    pub data_dir: PathBuf,
    /// `start` refuses when the running instances' memory would exceed
    /// the host's memory times this.
    pub overcommit: f64,
    /// The file naming this boot of the host (a change means the host
    /// rebooted): /proc/sys/kernel/random/boot_id.
    pub boot_id_file: PathBuf,
}

/// Where Linux names the current boot.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    State(#[from] state::StateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The daemon's shared state.
pub struct Daemon {
    pub(crate) config: Config,
    pub(crate) store: Mutex<state::Store>,
    /// One lock per instance name: changes to one instance run one at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) ops: ops::Operations,
    pub(crate) events: broadcast::Sender<api::Event>,
}

impl Daemon {
    /// Opens the state and prepares the directories.
    pub fn open(config: Config) -> Result<Arc<Daemon>> {
        let instances = config.state_dir.join("instances");
        std::fs::create_dir_all(&instances)
            .map_err(io_err(format!("creating {}", instances.display())))?;
        std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", config.state_dir.display())))?;
        let store = state::Store::open(&config.state_dir.join("state.db"))?;
        install_agent(&config.state_dir.join(AGENT_FILE))?;
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new(Daemon {
            config,
            store: Mutex::new(store),
            locks: Mutex::new(HashMap::new()),
            ops: ops::Operations::default(),
            events,
        }))
    }

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, state::Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn instance_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    pub(crate) fn layout(&self, name: &str) -> supervisor::Layout {
        supervisor::Layout::new(self.config.state_dir.join("instances").join(name))
    }

    pub(crate) fn emit(&self, instance: &str, status: Option<api::Status>) {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // No subscriber is not an error.
        let _ = self.events.send(api::Event {
            time,
            instance: instance.to_owned(),
            status,
        });
    }
}

/// The agent binary every container runs, under the state directory.
pub(crate) const AGENT_FILE: &str = "vessel-agent";

/// Writes this vessel's agent binary to `path` unless it is there already
/// (replaced by a rename: running containers keep the file they mapped).
fn install_agent(path: &Path) -> Result<()> {
    if std::fs::read(path).is_ok_and(|bytes| bytes == guest::AGENT) {
        return Ok(());
    }
    let tmp = path.with_extension("new");
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(&tmp, guest::AGENT)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(io_err(format!("installing {}", path.display())))
}

/// Binds the socket (root-only), refusing one a live daemon holds or
/// that belongs to another user; removes a stale one.
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(Error::Refused(format!(
                "{} belongs to uid {}, not to this daemon's uid {me}: refusing to replace it",
                path.display(),
                meta.uid()
            )));
        }
        if !meta.file_type().is_socket() {
            return Err(Error::Refused(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Refused(format!(
                "a vessel daemon already listens on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io_err(format!("removing {}", path.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(listener)
}

/// Runs the daemon until SIGTERM or SIGINT: adopts the instances whose
/// supervisors still run, starts autostart instances after a host reboot,
/// and serves the API. Running instances keep running when it returns.
pub async fn serve(config: Config) -> Result<()> {
    let listener = bind_socket(&config.socket)?;
    let socket = config.socket.clone();
    let daemon = Daemon::open(config)?;
    instances::recover(&daemon).await;
    tracing::info!("vessel daemon listening on {}", socket.display());
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    // Not a graceful shutdown: event streams and exec sessions never end
    // by themselves. Instances are unaffected either way.
    let served = tokio::select! {
        r = axum::serve(listener, router(daemon)).into_future() => r,
        () = shutdown => Ok(()),
    };
    let _ = std::fs::remove_file(&socket);
    served.map_err(io_err("serving the API"))
}
