//! One supervising process per running instance of the vessel daemon
//! (`vessel supervise DIR`), as containerd's shims or Incus's QEMU
//! processes: the instance lives as long as its supervisor, not as long
//! as the daemon, so the daemon can be restarted (or killed) and adopt
//! its running instances again.
//!
//! A supervisor owns one instance directory ([`Layout`]). For a container
//! it mounts the instance's root in a mount namespace of its own; for a VM
//! it runs the VM's VMM process on the instance's root disk (see [`vm`]).
//! It starts the instance,
//! keeps its console log (size-capped), answers the daemon on a control
//! socket ([`Request`]), and when the instance ends, cleans up and exits.
//! Exec requests hand the daemon's connection to a `vessel-agent
//! --stdio` started inside a container, or relay it to the guest agent of
//! a VM over vsock, so exec speaks the agent's protocol on both.

mod console;
mod control;
mod sys;
mod vm;

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

pub use control::{wait_unsupervised, Control, Reply, Request};
pub use vm::VmSpec;

/// How large the console log grows before it is rotated (the previous
/// one is kept as `console.log.1`).
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("instance {0}: {1}")]
    Container(String, container::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("instance directory {0} already has a supervisor")]
    AlreadySupervised(PathBuf),
    #[error("no supervisor answers at {0}: the instance is not running")]
    NotRunning(PathBuf),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// What to run, as the daemon resolved it (written to `spec.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    /// The image's root directory (the overlay's read-only layer).
    pub image_root: PathBuf,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU limit: CFS quota and period in microseconds.
    #[serde(default)]
    pub cpu: Option<(u64, u64)>,
    /// The vessel-agent binary on the host, which the container runs as
    /// its init and for exec (one file for every instance, so its pages
    /// are shared).
    pub agent: PathBuf,
    /// Set for a VM: what it boots (`image_root` is then unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,
}

/// The files of one instance's directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// The supervisor's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// Held (flock) by the live supervisor.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }
    /// The kept upper layer of the root: the instance's own files.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The supervisor's own messages.
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }
    /// The running instance's pid and cgroups, for exec helpers.
    fn runtime(&self) -> PathBuf {
        self.dir.join("runtime.json")
    }
    fn exec_fifo(&self) -> PathBuf {
        self.dir.join("exec.fifo")
    }

    /// Whether a supervisor holds this directory now.
    pub fn is_supervised(&self) -> bool {
        match sys::try_lock(&self.lock()) {
            Ok(Some(_lock)) => false,
            Ok(None) => true,
            Err(_) => false,
        }
    }
}

/// What exec helpers read: the running init and its cgroups.
#[derive(Debug, Serialize, Deserialize)]
struct Runtime {
    pid: i32,
    cgroups: Vec<PathBuf>,
}

/// The state the control threads share with the main thread.
pub(crate) struct Shared {
    pub(crate) layout: Layout,
    pub(crate) pid: i32,
    /// A VM's: exec goes to its guest agent.
    pub(crate) is_vm: bool,
    /// The clients of `vessel console`.
    pub(crate) console_attached: Arc<console::Attached>,
    /// What the console's clients type goes here: a VM's serial input, or
    /// a container's console terminal.
    pub(crate) console_input: Option<Mutex<fs::File>>,
    /// Set once the instance has ended.
    pub(crate) ended: Mutex<bool>,
    pub(crate) ended_signal: Condvar,
}

impl Shared {
    pub(crate) fn has_ended(&self) -> bool {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `limit` for the instance to end; whether it has.
    pub(crate) fn wait_ended_for(&self, limit: std::time::Duration) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, _) = self
            .ended_signal
            .wait_timeout_while(ended, limit, |ended| !*ended)
            .unwrap_or_else(|e| e.into_inner());
        *ended
    }

    /// Blocks until the instance has ended.
    pub(crate) fn wait_ended(&self) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        while !*ended {
            ended = self
                .ended_signal
                .wait(ended)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// `vessel supervise DIR`: runs the instance described in `DIR/spec.json`
/// until it ends. `ready` (the process's stdout, a pipe from the daemon)
/// gets one line once the instance runs, `ok <pid>`, or `error: <why>`
/// if it could not start; then it is closed.
pub fn supervise(dir: &Path, ready: OwnedFd) -> Result<()> {
    let mut ready = fs::File::from(ready);
    match start(dir) {
        Ok(running) => {
            let _ = writeln!(ready, "ok {}", running.shared.pid);
            drop(ready);
            running.run()
        }
        Err(e) => {
            let _ = writeln!(ready, "error: {e}");
            Err(e)
        }
    }
}

/// A started instance and what its supervision needs.
struct Running {
    shared: Arc<Shared>,
    cgroups: container::runtime::CgroupPaths,
    _lock: fs::File,
}

fn start(dir: &Path) -> Result<Running> {
    let layout = Layout::new(dir);
    let text = fs::read_to_string(layout.spec())
        .map_err(io_err(format!("reading {}", layout.spec().display())))?;
    let spec: Spec = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", layout.spec().display())))?;
    let lock = sys::try_lock(&layout.lock())
        .map_err(io_err(format!("locking {}", layout.lock().display())))?
        .ok_or_else(|| Error::AlreadySupervised(layout.dir.clone()))?;
    let name = spec.name.clone();
    let container_err = |e| Error::Container(name.clone(), e);
    // The agents exec helpers start outlive the helpers: as their
    // subreaper, this process gets and reaps them.
    sys::become_subreaper().map_err(io_err("becoming a subreaper"))?;
    let limits = container::Limits {
        memory: spec.memory,
        cpu: spec.cpu.map(|(quota_us, period_us)| container::CpuLimit {
            quota_us,
            period_us,
        }),
        // The weight follows the quota: an instance of 2 CPUs weighs as
        // much as two of 1 when CPUs are contended (1024 shares per CPU).
        cpu_shares: spec.cpu.map(|(quota_us, period_us)| {
            (1024u64.saturating_mul(quota_us) / period_us.max(1)).max(2)
        }),
        pids: None,
        settings: Vec::new(),
        device_rules: Vec::new(),
    };
    // The console: a VM's serial output comes through a pipe (its input is the
    // VMM's stdin); a container's is a terminal whose slave is its init's stdio
    // and /dev/console. This process keeps the pipe's read end or the
    // terminal's master, never the other end, so the instance's end reads as
    // the end of its console (EOF, or EIO from the master).
    let (pid, cgroups, console_read, console_input) = match &spec.vm {
        Some(vm_spec) => {
            let (console_read, console_write) =
                sys::pipe().map_err(io_err("making the console pipe"))?;
            let cgroups = container::lasting::cgroups_for_process(&spec.name, &limits)
                .map_err(container_err)?;
            match vm::start(&layout, &spec.name, vm_spec, &cgroups, &console_write) {
                Ok((pid, input)) => (pid, cgroups, console_read, fs::File::from(input)),
                Err(e) => {
                    cgroups.remove();
                    return Err(e);
                }
            }
        }
        None => {
            let pty = sys::open_pty().map_err(io_err("making the console terminal"))?;
            let created = start_container(&layout, &spec, limits, &pty)?;
            let input = pty
                .master
                .try_clone()
                .map_err(io_err("keeping the console terminal"))?;
            (
                created.pid,
                created.cgroups,
                pty.master,
                fs::File::from(input),
            )
        }
    };

    match serve_started(
        &layout,
        &spec,
        pid,
        &cgroups,
        console_read,
        Some(console_input),
    ) {
        Ok(shared) => Ok(Running {
            shared,
            cgroups,
            _lock: lock,
        }),
        Err(e) => {
            // Nothing may outlive a start that failed: not the instance's
            // process (a VMM would run on unsupervised), nor its cgroups.
            sys::kill(pid, libc::SIGKILL);
            sys::reap(pid);
            cgroups.remove();
            let _ = fs::remove_file(layout.runtime());
            Err(e)
        }
    }
}

/// With the instance's process `pid` started: records it for exec
/// helpers, takes the stop signals, keeps the console, and answers the
/// control socket.
fn serve_started(
    layout: &Layout,
    spec: &Spec,
    pid: i32,
    cgroups: &container::runtime::CgroupPaths,
    console_read: OwnedFd,
    console_input: Option<fs::File>,
) -> Result<Arc<Shared>> {
    let runtime = Runtime {
        pid,
        cgroups: cgroups.groups.clone(),
    };
    let json = serde_json::to_vec(&runtime)
        .map_err(|e| Error::Invalid(format!("encoding runtime.json: {e}")))?;
    fs::write(layout.runtime(), json).map_err(io_err("writing runtime.json"))?;

    // From here on SIGTERM, SIGINT and SIGHUP (a host shutting down, the
    // supervisor killed politely) are taken by one thread, which stops
    // the instance gracefully; threads started after this inherit the
    // mask (the container's init, started above, does not).
    let stop_signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    sys::block_signals(&stop_signals).map_err(io_err("blocking signals"))?;
    let attached = Arc::new(console::Attached::default());
    console::pump(
        console_read,
        layout.console_log(),
        CONSOLE_LOG_MAX,
        attached.clone(),
    );
    let shared = Arc::new(Shared {
        layout: layout.clone(),
        pid,
        is_vm: spec.vm.is_some(),
        console_attached: attached,
        console_input: console_input.map(Mutex::new),
        ended: Mutex::new(false),
        ended_signal: Condvar::new(),
    });
    control::serve(shared.clone())?;
    let on_signal = shared.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = sys::wait_signal(&stop_signals) {
                tracing::info!(signal = sig, "stopping the instance");
                control::stop(&on_signal, SIGNAL_STOP_TIMEOUT, false);
            }
        })
        .map_err(io_err("starting the signal thread"))?;
    Ok(shared)
}

/// Mounts a container's root (overlay over its image, in a mount
/// namespace of this process's own) and creates its init, whose stdio
/// and /dev/console are the `console` terminal's slave.
fn start_container(
    layout: &Layout,
    spec: &Spec,
    limits: container::Limits,
    console: &sys::Pty,
) -> Result<container::runtime::Created> {
    let container_err = |e| Error::Container(spec.name.clone(), e);
    // Before any thread: the namespace change is the calling thread's.
    container::lasting::private_mount_namespace().map_err(container_err)?;
    container::lasting::OverlayRoot {
        image: spec.image_root.clone(),
        upper: layout.upper(),
        work: layout.work(),
        merged: layout.rootfs(),
    }
    .mount()
    .map_err(container_err)?;
    let lasting = container::lasting::LastingSpec {
        name: spec.name.clone(),
        root: layout.rootfs(),
        agent: spec.agent.clone(),
        limits,
        exec_fifo: layout.exec_fifo(),
        console: Some(console.slave_path.clone()),
    };
    // The init's stdio is the console: set it for the create, then give
    // this process its own back. The slave is closed here after.
    sys::with_stdio(console.slave.as_raw_fd(), || {
        container::lasting::start(&lasting)
    })
    .map_err(io_err("redirecting the console"))?
    .map_err(container_err)
}

impl Running {
    /// Reaps children until the instance's init ends, then cleans up.
    fn run(self) -> Result<()> {
        // `ended` is set before the init is reaped: a stop's SIGKILL
        // timer, which checks it under its lock, never signals a pid that
        // could have been reused.
        let status = sys::reap_until(self.shared.pid, || {
            *self.shared.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
            // No exec helper may find the pid from now on.
            let _ = fs::remove_file(self.shared.layout.runtime());
        });
        tracing::info!(pid = self.shared.pid, status, "the instance ended");
        self.cgroups.remove();
        let _ = fs::remove_file(self.shared.layout.runtime());
        let _ = fs::remove_file(self.shared.layout.control());
        self.shared.ended_signal.notify_all();
        // Let the control threads answer their stop requests.
        control::drain();
        Ok(())
    }
}

/// How long a graceful stop on a signal may take (as a default `stop`).
const SIGNAL_STOP_TIMEOUT: u64 = 30;

/// `vessel supervise-exec DIR`: started by the supervisor with a daemon
/// connection as stdin and stdout, starts `vessel-agent --stdio` in the
/// instance on that connection and exits; the agent then serves it. A
/// failure is reported on the connection as an agent error frame.
pub fn exec_helper(dir: &Path) -> Result<()> {
    let layout = Layout::new(dir);
    let result = (|| {
        let text = fs::read_to_string(layout.runtime())
            .map_err(io_err(format!("reading {}", layout.runtime().display())))?;
        let runtime: Runtime = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", layout.runtime().display())))?;
        let cgroups = container::runtime::CgroupPaths {
            groups: runtime.cgroups,
            ..Default::default()
        };
        container::lasting::exec_agent(runtime.pid, &cgroups)
            .map_err(|e| Error::Invalid(format!("starting the agent in the instance: {e}")))
    })();
    if let Err(e) = &result {
        let frame = vessel_agent::Frame::Error(e.to_string());
        let _ = frame.write(&mut io::stdout().lock());
    }
    result.map(|_| ())
}
