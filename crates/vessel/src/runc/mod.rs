//! The commands of `vessel-runc`.

mod hooks;
mod manage;
mod spec;
mod state;

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use state::{State, Status};

/// Where container state is kept (for root; see `dispatch` for other users).
const DEFAULT_ROOT: &str = "/run/vessel-runc";

#[derive(Parser, Debug)]
#[command(
    name = "vessel-runc",
    version,
    about = "A runc-compatible OCI runtime built on vessel"
)]
struct Cli {
    /// Where container state is kept.
    #[arg(
        long,
        global = true,
        default_value = DEFAULT_ROOT,
        value_name = "DIR"
    )]
    root: PathBuf,
    /// Also write errors (and with --debug, progress) to this file.
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Log lines as text, or as runc's JSON {"level","msg","time"} objects.
    #[arg(
        long = "log-format",
        global = true,
        default_value = "text",
        value_name = "FORMAT",
        value_parser = ["text", "json"]
    )]
    log_format: String,
    /// Also write progress lines to the --log file.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for compatibility; systemd cgroups are refused.
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// true, false or auto (the default: rootless when not run as root). Rootless
    /// containers need a user namespace in their config, and limits need a cgroup
    /// the user may write.
    #[arg(long, global = true, value_name = "BOOL")]
    rootless: Option<String>,
    /// Accepted for compatibility; checkpointing is not supported.
    #[arg(long, global = true, value_name = "PATH")]
    criu: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container from a bundle, its process waiting for `start`.
    Create {
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Start the user process of a created container.
    Start { id: String },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's init, or with --all to all of its processes.
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Delete a stopped (or with --force, any) container.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; without --detach, wait for it, delete it and exit with its status.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
    },
    /// Run a process in a running container.
    Exec {
        /// The OCI process (JSON) to run.
        #[arg(short, long, value_name = "FILE")]
        process: Option<PathBuf>,
        #[arg(short, long)]
        detach: bool,
        #[arg(long = "pid-file", value_name = "FILE")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket", value_name = "SOCK")]
        console_socket: Option<PathBuf>,
        #[arg(short, long)]
        tty: bool,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        id: String,
        /// Command and arguments (when no --process is given); options after the id
        /// belong to the command, as with runc.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List the processes of a container.
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        /// ps options (ignored).
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a running container's cgroup limits.
    Update {
        #[command(flatten)]
        flags: manage::UpdateFlags,
        id: String,
    },
    /// Print a container's resource usage as JSON: once with --stats, else every
    /// --interval (and an "oom" event when the memory limit kills) until it stops.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        interval: String,
        id: String,
    },
    /// Print what this runtime implements (the runtime spec's features document).
    Features,
}

#[derive(clap::Args, Debug)]
struct CreateArgs {
    #[arg(short, long, default_value = ".", value_name = "DIR")]
    bundle: PathBuf,
    #[arg(long = "pid-file", value_name = "FILE")]
    pid_file: Option<PathBuf>,
    #[arg(long = "console-socket", value_name = "SOCK")]
    console_socket: Option<PathBuf>,
    /// Accepted; vessel-runc always pivots.
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Accepted; vessel-runc creates no session keyring.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    id: String,
}

/// Where errors go besides stderr.
struct Logger {
    file: Option<PathBuf>,
    json: bool,
}

impl Logger {
    fn log(&self, level: &str, msg: &str) {
        let Some(path) = &self.file else { return };
        let line = if self.json {
            serde_json::json!({"level": level, "msg": msg, "time": state::now_rfc3339()})
                .to_string()
        } else {
            format!(
                "time=\"{}\" level={level} msg={msg:?}",
                state::now_rfc3339()
            )
        };
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let logger = Logger {
        file: cli.log.clone(),
        json: cli.log_format == "json",
    };
    match dispatch(&cli, &logger) {
        Ok(code) => code,
        Err(e) => {
            let msg = one_line(&e);
            logger.log("error", &msg);
            eprintln!("vessel-runc: {msg}");
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, without repeating a cause that the message
/// before it already ends with (container errors include their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.ends_with(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Removes what creates killed half-way left under `root` (a container directory
/// without state.json whose lock is free): the container's cgroups and the directory.
/// Returns the ids removed.
fn sweep(root: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = entry.path();
        if !dir.is_dir() || dir.join("state.json").exists() {
            continue;
        }
        let Some(_held) = container::leftovers::abandoned(&dir) else {
            continue;
        };
        // Empty: its creator had only just taken the lock; not a create to undo.
        let cgroups_path =
            fs::read_to_string(dir.join(container::leftovers::LOCK_FILE)).unwrap_or_default();
        if cgroups_path.is_empty() {
            continue;
        }
        container::leftovers::remove_groups_at(&cgroups_path);
        if fs::remove_dir_all(&dir).is_ok() {
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

fn dispatch(cli: &Cli, logger: &Logger) -> Result<ExitCode> {
    if cli.systemd_cgroup {
        bail!("--systemd-cgroup: systemd cgroups are not supported by vessel-runc; use cgroupfs (drop the flag / SystemdCgroup = false)");
    }
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0;
    match cli.rootless.as_deref() {
        None | Some("auto") | Some("true") => {}
        Some("false") if privileged => {}
        Some("false") => bail!("--rootless false: vessel-runc is not running as root"),
        Some(other) => bail!("--rootless {other}: expected true, false or auto"),
    }
    if cli.debug {
        logger.log("debug", &format!("{:?}", cli.command));
    }
    // A user's containers are kept where that user may write, as runc keeps them.
    let root = &if !privileged && cli.root == Path::new(DEFAULT_ROOT) {
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir).join("vessel-runc"),
            // SAFETY: getuid has no preconditions.
            None => PathBuf::from(format!("/tmp/vessel-runc-{}", unsafe { libc::getuid() })),
        }
    } else {
        cli.root.clone()
    };
    let swept = sweep(root);
    if !swept.is_empty() && cli.debug {
        logger.log("debug", &format!("removed the leftovers of {swept:?}"));
    }
    match &cli.command {
        Command::Create { create } => {
            create_container(root, create, false)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Start { id } => {
            start(root, id)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::State { id } => {
            let state = State::load(root, id)?;
            println!("{}", serde_json::to_string_pretty(&state.report())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Kill { all, id, signal } => {
            kill(root, id, signal.as_deref().unwrap_or("TERM"), *all)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { force, id } => {
            // A create killed half-way: its leftovers are gone now, which is the delete.
            if !swept.contains(id) {
                delete(root, id, *force)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { create, detach } => run(root, create, *detach),
        Command::Exec {
            process,
            detach,
            pid_file,
            console_socket,
            tty,
            preserve_fds,
            id,
            args,
        } => {
            if *preserve_fds > 0 {
                bail!("--preserve-fds is not supported");
            }
            exec(
                root,
                id,
                process.as_deref(),
                args,
                *tty,
                *detach,
                pid_file.as_deref(),
                console_socket.as_deref(),
            )
        }
        Command::Ps { format, id, .. } => {
            let state = State::load(root, id)?;
            let pids = state.cgroups().pids();
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string(&pids)?),
                "table" => {
                    println!("PID CMD");
                    for pid in pids {
                        let cmd =
                            fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                        println!("{pid} {}", cmd.trim());
                    }
                }
                other => bail!("--format {other}: expected json or table"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { id } => {
            manage::pause(root, id)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { id } => {
            manage::resume(root, id)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Update { flags, id } => {
            manage::update(root, id, flags)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            stats,
            interval,
            id,
        } => manage::events(root, id, *stats, interval),
        Command::Features => {
            println!("{}", serde_json::to_string_pretty(&manage::features())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::List { format, quiet } => {
            let states = State::load_all(root);
            let reports: Vec<_> = states.iter().map(State::report).collect();
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string(&reports)?),
                "table" if *quiet => {
                    for r in &reports {
                        println!("{}", r.id);
                    }
                }
                "table" => {
                    println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
                    for r in &reports {
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            r.id, r.pid, r.status, r.bundle, r.created, r.owner
                        );
                    }
                }
                other => bail!("--format {other}: expected json or table"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 1024
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
    {
        bail!(
            "invalid container id {id:?}: use letters, digits and _ + - . (not starting with '.')"
        );
    }
    Ok(())
}

/// Connects to the console socket the caller listens on.
fn connect_console(path: &Path) -> Result<OwnedFd> {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to the console socket {}", path.display()))?;
    Ok(OwnedFd::from(stream))
}

/// Writes `pid` to `path` atomically (a temporary file renamed into place).
fn write_pid_file(path: &Path, pid: libc::pid_t) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map_or("pid".into(), |n| n.to_string_lossy())
    ));
    fs::write(&tmp, pid.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Removes a half-made container directory unless disarmed.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn create_container(root: &Path, args: &CreateArgs, die_with_parent: bool) -> Result<State> {
    check_id(&args.id)?;
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported");
    }
    let bundle = fs::canonicalize(&args.bundle)
        .with_context(|| format!("bundle {}", args.bundle.display()))?;
    let oci = spec::load(&bundle)?;
    let init = spec::init_spec(&oci, &bundle, &args.id)?;
    hooks::validate(&oci)?;
    if init.process.terminal && args.console_socket.is_none() {
        bail!("process.terminal is true: --console-socket is required");
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let dir = root.join(&args.id);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("container with id {} exists", args.id)
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let mut guard = DirGuard(Some(dir.clone()));
    // Held until the state is saved: a create killed before that leaves a directory
    // whose lock is free, and the cgroups path in the lock file, for the next command
    // to clean up (see `sweep`).
    let lock_path = dir.join(container::leftovers::LOCK_FILE);
    let mut creating = container::leftovers::try_lock(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
        .ok_or_else(|| anyhow!("{} is locked by another process", lock_path.display()))?;
    creating
        .write_all(init.cgroups_path.as_bytes())
        .with_context(|| format!("writing {}", lock_path.display()))?;
    // The config as it was at create: start, exec and delete read this copy, so an
    // edit of the bundle's config.json cannot change the container.
    let snapshot = dir.join(CONFIG_SNAPSHOT);
    fs::write(&snapshot, serde_json::to_vec(&oci)?)
        .with_context(|| format!("writing {}", snapshot.display()))?;
    let fifo = dir.join("exec.fifo");
    let fifo_c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo on a NUL-terminated path.
    if unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o622) } == -1 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {}", fifo.display()));
    }
    // The init opens it for writing as the container's root, which in a user namespace
    // is another host user: it owns the FIFO, as under runc.
    let host_id = |mappings: &[container::runtime::IdMapping]| {
        mappings
            .iter()
            .find(|m| m.container_id == 0 && m.size > 0)
            .map(|m| m.host_id)
    };
    if let (Some(uid), Some(gid)) = (host_id(&init.uid_mappings), host_id(&init.gid_mappings)) {
        std::os::unix::fs::chown(&fifo, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to the container's root", fifo.display()))?;
    }
    let console_socket = args
        .console_socket
        .as_deref()
        .map(connect_console)
        .transpose()?;
    let bundle_text = bundle.to_string_lossy().into_owned();
    let annotations = oci.annotations().clone().unwrap_or_default();
    let mut hooks_ran = false;
    let mut create_hooks = |pid: libc::pid_t| -> container::Result<()> {
        hooks_ran = true;
        let state = hooks::HookState {
            oci_version: state::OCI_VERSION,
            id: &args.id,
            status: "creating",
            pid,
            bundle: &bundle_text,
            annotations: &annotations,
        };
        [
            hooks::Kind::Prestart,
            hooks::Kind::CreateRuntime,
            hooks::Kind::CreateContainer,
        ]
        .into_iter()
        .try_for_each(|kind| hooks::run(&oci, kind, &state))
        .map_err(|e| container::Error::Invalid(format!("{e:#}")))
    };
    let has_create_hooks = oci.hooks().as_ref().is_some_and(|h| {
        [&h.prestart(), &h.create_runtime(), &h.create_container()]
            .iter()
            .any(|list| list.as_ref().is_some_and(|l| !l.is_empty()))
    });
    let created = container::runtime::create(
        &init,
        container::runtime::CreateOptions {
            exec_fifo: fifo,
            console_socket,
            die_with_parent,
            creator_lock: Some(std::os::fd::AsRawFd::as_raw_fd(&creating)),
            before_pivot: if has_create_hooks {
                Some(&mut create_hooks)
            } else {
                None
            },
        },
    );
    let created = match created {
        Ok(created) => created,
        Err(e) => {
            // A create hook failed or ran before a failure: the container is destroyed
            // (create's guards did it) and the poststop hooks run, as the lifecycle says.
            if hooks_ran {
                hooks::run_warning(
                    &oci,
                    hooks::Kind::Poststop,
                    &hooks::HookState {
                        oci_version: state::OCI_VERSION,
                        id: &args.id,
                        status: "stopped",
                        pid: 0,
                        bundle: &bundle_text,
                        annotations: &annotations,
                    },
                );
            }
            return Err(e.into());
        }
    };
    let state = State::new(
        root,
        &args.id,
        created.pid,
        &bundle,
        &spec::rootfs_path(&oci, &bundle),
        oci.annotations().clone().unwrap_or_default(),
        created.cgroups,
    );
    let saved = state.save(root).and_then(|()| match &args.pid_file {
        Some(p) => write_pid_file(p, created.pid),
        None => Ok(()),
    });
    if let Err(e) = saved {
        destroy(&state, root);
        return Err(e);
    }
    guard.0 = None;
    Ok(state)
}

/// The copy of config.json in a container's state directory.
const CONFIG_SNAPSHOT: &str = "config.json";

/// The config the container was created with (the bundle's, for a container
/// created before the copy was kept).
fn snapshot(state: &State) -> Result<oci_spec::runtime::Spec> {
    if state.dir.join(CONFIG_SNAPSHOT).exists() {
        spec::load(&state.dir)
    } else {
        spec::load(Path::new(&state.bundle))
    }
}

/// The state hooks read, with `status`.
fn hook_state<'a>(state: &'a State, status: &'a str) -> hooks::HookState<'a> {
    hooks::HookState {
        oci_version: state::OCI_VERSION,
        id: &state.id,
        status,
        pid: state.pid,
        bundle: &state.bundle,
        annotations: &state.annotations,
    }
}

/// Destroys the container, then runs its poststop hooks (failures are warnings).
fn destroy_and_poststop(state: &State, root: &Path, oci: Option<&oci_spec::runtime::Spec>) {
    destroy(state, root);
    if let Some(oci) = oci {
        hooks::run_warning(oci, hooks::Kind::Poststop, &hook_state(state, "stopped"));
    }
}

/// Kills the init (and so its PID namespace), removes cgroups and state.
fn destroy(state: &State, root: &Path) {
    if state.status() != Status::Stopped {
        // SAFETY: kill has no memory-safety preconditions; the pid is checked against the
        // recorded start time by status().
        unsafe { libc::kill(state.pid, libc::SIGKILL) };
        // A paused container's processes die only once thawed.
        if state.cgroups().is_frozen() {
            let _ = state.cgroups().freeze(false);
        }
        state.wait_gone(Duration::from_secs(5));
    }
    state.cgroups().remove();
    let _ = fs::remove_dir_all(root.join(&state.id));
}

fn start(root: &Path, id: &str) -> Result<()> {
    let state = State::load(root, id)?;
    match state.status() {
        Status::Created => {}
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
        Status::Stopped => bail!("cannot start a container that has stopped"),
    }
    let oci = snapshot(&state)?;
    if let Err(e) = hooks::run(
        &oci,
        hooks::Kind::StartContainer,
        &hook_state(&state, "created"),
    ) {
        destroy_and_poststop(&state, root, Some(&oci));
        return Err(e);
    }
    let fifo = root.join(id).join("exec.fifo");
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .with_context(|| format!("opening {}", fifo.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // The init opens its end for writing once we are a reader and writes one byte.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut byte = [0u8; 1];
        // SAFETY: reading one byte into a stack buffer from a descriptor we own.
        let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
        if n == 1 {
            break;
        }
        if state.status() == Status::Stopped {
            let _ = fs::remove_file(&fifo);
            bail!("the container's init process exited before start");
        }
        if std::time::Instant::now() > deadline {
            bail!("the container's init process did not take the start signal");
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
    }
    fs::remove_file(&fifo).with_context(|| format!("removing {}", fifo.display()))?;
    hooks::run_warning(&oci, hooks::Kind::Poststart, &hook_state(&state, "running"));
    Ok(())
}

/// A signal by name (KILL, SIGKILL) or number.
fn parse_signal(s: &str) -> Result<libc::c_int> {
    if let Ok(n) = s.parse::<libc::c_int>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal {s}");
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" | "CLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => bail!("unknown signal {s:?}"),
    };
    Ok(sig)
}

fn kill(root: &Path, id: &str, signal: &str, all: bool) -> Result<()> {
    let sig = parse_signal(signal)?;
    let state = State::load(root, id)?;
    if all {
        for pid in state.cgroups().pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
        return Ok(());
    }
    if state.status() == Status::Stopped {
        bail!("container not running");
    }
    // SAFETY: kill has no memory-safety preconditions; status() checked the pid.
    if unsafe { libc::kill(state.pid, sig) } == -1 {
        return Err(std::io::Error::last_os_error()).context("signalling the container");
    }
    Ok(())
}

fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let state = match State::load(root, id) {
        Ok(s) => s,
        Err(e) if force && !root.join(id).exists() => {
            // runc: deleting a container that is not there with --force is not an error.
            let _ = e;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    match state.status() {
        status @ (Status::Running | Status::Paused) if !force => {
            bail!("cannot delete container {id} that is not stopped: {status}")
        }
        _ => {}
    }
    let oci = snapshot(&state).ok();
    destroy_and_poststop(&state, root, oci.as_ref());
    Ok(())
}

fn run(root: &Path, args: &CreateArgs, detach: bool) -> Result<ExitCode> {
    // Without --detach we are the init's parent: its status comes to us.
    let state = create_container(root, args, !detach)?;
    let oci = snapshot(&state).ok();
    if let Err(e) = start(root, &args.id) {
        // A failed startContainer hook has destroyed it already.
        if root.join(&args.id).exists() {
            destroy_and_poststop(&state, root, oci.as_ref());
        }
        return Err(e);
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let status = wait_child(state.pid);
    destroy_and_poststop(&state, root, oci.as_ref());
    Ok(ExitCode::from(status?))
}

/// Waits for our child `pid`; returns the shell-style exit code.
fn wait_child(pid: libc::pid_t) -> Result<u8> {
    let mut raw = 0;
    loop {
        // SAFETY: waitpid writes the status into `raw`.
        let ret = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if ret == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("waiting for the container");
        }
        break;
    }
    Ok(if libc::WIFSIGNALED(raw) {
        128u8.saturating_add(libc::WTERMSIG(raw) as u8)
    } else {
        libc::WEXITSTATUS(raw) as u8
    })
}

#[allow(clippy::too_many_arguments)]
fn exec(
    root: &Path,
    id: &str,
    process_file: Option<&Path>,
    args: &[String],
    tty: bool,
    detach: bool,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
) -> Result<ExitCode> {
    let state = State::load(root, id)?;
    // As runc: a created container's init has its namespaces and cgroups already.
    match state.status() {
        Status::Stopped => bail!("cannot exec in a stopped container"),
        Status::Paused => bail!("cannot exec in a paused container"),
        Status::Created | Status::Running => {}
    }
    let oci = snapshot(&state)?;
    let process = match process_file {
        Some(path) => spec::process(&spec::load_process(path)?)?,
        None => {
            if args.is_empty() {
                bail!("exec needs --process FILE or a command");
            }
            let base = oci
                .process()
                .as_ref()
                .ok_or_else(|| anyhow!("config.json has no process"))?;
            let mut p = spec::process(base)?;
            p.args = args.to_vec();
            p.terminal = tty;
            p
        }
    };
    let seccomp = match oci.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => spec::seccomp(s)?,
        None => Vec::new(),
    };
    let console = console_socket.map(connect_console).transpose()?;
    let pid = container::runtime::exec(state.pid, &state.cgroups(), &process, &seccomp, console)?;
    if let Some(path) = pid_file {
        if let Err(e) = write_pid_file(path, pid) {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_child(pid);
            return Err(e);
        }
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(ExitCode::from(wait_child(pid)?))
}
