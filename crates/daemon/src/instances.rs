//! The instances' lifecycle: create, start, stop, restart, delete, and
//! finding running instances again when the daemon starts.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use api::{Action, CreateRequest, InstanceConfig, Kind, Operation, StateRequest, Status};
use supervisor::{Control, Layout};

use crate::routes::ApiError;
use crate::{images, Daemon};

/// How long a supervisor may take to report its instance started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs blocking work (supervisor sockets, processes, files) off the
/// async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs `work` as operation `id`: its result ends the operation, and so
/// does a panic in it (as an internal error), so no client waits forever.
fn run_op(
    daemon: Arc<Daemon>,
    id: String,
    work: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
) {
    tokio::spawn(async move {
        let result = match tokio::spawn(work).await {
            Ok(result) => result,
            Err(e) => Err(format!("internal error: {e}")),
        };
        daemon.ops.end(&id, result);
    });
}

/// The longest graceful stop accepted, seconds.
const MAX_STOP_TIMEOUT: u64 = 3600;

/// Starts only one at a time: admission sees every running instance.
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The record of `name`, or 404.
fn record(daemon: &Daemon, name: &str) -> Result<state::InstanceRecord, ApiError> {
    daemon
        .store()
        .get(name)
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no instance named {name:?}")))
}

fn config_of(record: &state::InstanceRecord) -> Result<InstanceConfig, ApiError> {
    serde_json::from_str(&record.config).map_err(|e| {
        ApiError::internal(format!(
            "instance {}: its stored configuration is unreadable: {e}",
            record.name
        ))
    })
}

/// What `name` is doing now: its supervisor's answer, else an operation
/// in progress, else stopped.
fn status_now(daemon: &Daemon, name: &str) -> (Status, Option<i32>) {
    match Control::status(&daemon.layout(name)) {
        Ok(pid) => (Status::Running, Some(pid)),
        Err(_) => match daemon.ops.running_on(name) {
            Some(d) if d.starts_with("start") || d.starts_with("restart") => {
                (Status::Starting, None)
            }
            Some(d) if d.starts_with("stop") => (Status::Stopping, None),
            _ => (Status::Stopped, None),
        },
    }
}

fn view(daemon: &Daemon, record: &state::InstanceRecord) -> Result<api::Instance, ApiError> {
    let (status, pid) = status_now(daemon, &record.name);
    Ok(api::Instance {
        name: record.name.clone(),
        config: config_of(record)?,
        status,
        pid,
        created_at: record.created_at,
    })
}

pub async fn list(daemon: Arc<Daemon>) -> Result<Vec<api::Instance>, ApiError> {
    blocking(move || {
        let records = daemon.store().list().map_err(ApiError::internal)?;
        records.iter().map(|r| view(&daemon, r)).collect()
    })
    .await
}

pub async fn get(daemon: Arc<Daemon>, name: String) -> Result<api::Instance, ApiError> {
    blocking(move || view(&daemon, &record(&daemon, &name)?)).await
}

/// A VM's guest memory when none is asked for.
pub const DEFAULT_VM_MEMORY: u64 = 256 << 20;
/// The least guest memory a Debian VM boots in: Debian's cloud kernel
/// decompresses into 51.5 MiB above 16 MiB before anything else runs, and
/// systemd wants room after that.
const MIN_VM_MEMORY: u64 = 96 << 20;
/// The most vCPUs a VM may ask for (the machine's limit).
const MAX_VM_CPUS: u32 = 254;
/// What a VM's VMM process needs beyond its guest memory: its own heap
/// and device buffers, and per vCPU the software vCPU's decoded code (up
/// to about 45 MiB) and native stubs (8 MiB). Part of its memory limit
/// and of what admission counts.
pub fn vmm_overhead(cpus: u32) -> u64 {
    (32 << 20) + (64 << 20) * u64::from(cpus)
}

/// A VM's vCPUs (`cpus` is a whole number for VMs).
fn vm_cpus(config: &InstanceConfig) -> Result<u32, String> {
    match &config.cpus {
        None => Ok(1),
        Some(text) => match text.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_VM_CPUS).contains(&n) => Ok(n),
            _ => Err(format!(
                "cpus {text:?}: a VM's vCPUs, a whole number from 1 to {MAX_VM_CPUS}"
            )),
        },
    }
}

/// The memory an instance commits: a container's limit (none: nothing
/// reserved), a VM's guest memory and its VMM's overhead.
fn committed_memory(config: &InstanceConfig) -> u64 {
    match config.kind {
        Kind::Container => config.memory.unwrap_or(0),
        Kind::Vm => config
            .memory
            .unwrap_or(DEFAULT_VM_MEMORY)
            .saturating_add(vmm_overhead(vm_cpus(config).unwrap_or(1))),
    }
}

/// Checks a configuration: the kind, the image, the limits.
fn check_config(config: &InstanceConfig) -> Result<(), ApiError> {
    let bad = |why: String| ApiError::bad_request(why);
    match config.kind {
        Kind::Container => {
            images::check(&config.image).map_err(|e| bad(e.to_string()))?;
            if config.accel.is_some() || config.disk.is_some() {
                return Err(bad("accel and disk apply to VMs only".into()));
            }
            if let Some(cpus) = &config.cpus {
                container::parse_cpus(cpus, container::host_cpus())
                    .map_err(|e| bad(e.to_string()))?;
            }
            if let Some(bytes) = config.memory {
                container::check_memory(bytes, &format!("{bytes}"))
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        Kind::Vm => {
            images::check_vm(&config.image).map_err(|e| bad(e.to_string()))?;
            vm_cpus(config).map_err(bad)?;
            if let Some(accel) = &config.accel {
                if !["auto", "kvm", "emu"].contains(&accel.as_str()) {
                    return Err(bad(format!("accel {accel:?}: one of auto, kvm, emu")));
                }
            }
            if let Some(bytes) = config.memory {
                if bytes < MIN_VM_MEMORY || bytes % (1 << 20) != 0 {
                    return Err(bad(format!(
                        "memory {bytes}: a VM needs a whole number of MiB, at least {} MiB",
                        MIN_VM_MEMORY >> 20
                    )));
                }
                let host = host_memory();
                if bytes > host {
                    return Err(bad(format!(
                        "memory {} MiB: more than this host's {} MiB",
                        bytes >> 20,
                        host >> 20
                    )));
                }
            }
            if let Some(bytes) = config.disk {
                if bytes == 0 || bytes > 1 << 50 {
                    return Err(bad(format!("disk {bytes}: from 1 byte to 1 PiB")));
                }
            }
        }
    }
    Ok(())
}

/// `POST /1.0/instances`.
pub async fn create(daemon: Arc<Daemon>, request: CreateRequest) -> Result<Operation, ApiError> {
    api::check_name(&request.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_config(&request.config)?;
    let name = request.name.clone();
    if record(&daemon, &name).is_ok() {
        return Err(ApiError::conflict(format!(
            "an instance named {name:?} already exists"
        )));
    }
    let verb = if request.start { "launch" } else { "create" };
    let op = daemon.ops.begin(format!("{verb} {name}"), &name);
    let d = daemon.clone();
    run_op(daemon, op.id.clone(), async move {
        let lock = d.instance_lock(&name);
        let _held = lock.lock().await;
        create_now(&d, &request).await?;
        if request.start {
            start_now(&d, &name).await?;
        }
        Ok(())
    });
    Ok(op)
}

async fn create_now(daemon: &Arc<Daemon>, request: &CreateRequest) -> Result<(), String> {
    let daemon2 = daemon.clone();
    let request = request.clone();
    blocking(move || {
        let daemon = daemon2;
        let layout = daemon.layout(&request.name);
        // Checked again under the instance's lock: another create may
        // have made it since the request was accepted.
        if record(&daemon, &request.name).is_ok() {
            return Err(format!(
                "an instance named {:?} already exists",
                request.name
            ));
        }
        // A directory without a record is what a daemon killed during a
        // create left: nothing of value.
        if layout.dir.exists() && !layout.is_supervised() {
            let _ = std::fs::remove_dir_all(&layout.dir);
        }
        std::fs::create_dir_all(&layout.dir)
            .map_err(|e| format!("creating {}: {e}", layout.dir.display()))?;
        let config = serde_json::to_string(&request.config).map_err(|e| e.to_string())?;
        let inserted = daemon.store().insert(&state::InstanceRecord {
            name: request.name.clone(),
            kind: match request.config.kind {
                Kind::Container => "container".into(),
                Kind::Vm => "vm".into(),
            },
            config,
            running: false,
            autostart: request.config.autostart,
            created_at: now_secs(),
        });
        if let Err(e) = inserted {
            // Not ours to remove if the name was taken meanwhile.
            if !matches!(e, state::StateError::Exists(_)) {
                let _ = std::fs::remove_dir_all(&layout.dir);
            }
            return Err(e.to_string());
        }
        daemon.emit(&request.name, Some(Status::Stopped));
        Ok(())
    })
    .await
}

/// The host's memory, from /proc/meminfo.
fn host_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Refuses a start that would commit more memory than the host has
/// times the overcommit ratio.
fn admit(daemon: &Daemon, name: &str, config: &InstanceConfig) -> Result<(), String> {
    let wanted = committed_memory(config);
    if wanted == 0 {
        return Ok(());
    }
    let records = daemon.store().list().map_err(|e| e.to_string())?;
    let mut committed = 0u64;
    for r in records.iter().filter(|r| r.name != name) {
        if Control::status(&daemon.layout(&r.name)).is_ok() {
            if let Ok(c) = serde_json::from_str::<InstanceConfig>(&r.config) {
                committed = committed.saturating_add(committed_memory(&c));
            }
        }
    }
    let limit = (host_memory() as f64 * daemon.config.overcommit) as u64;
    if committed.saturating_add(wanted) > limit {
        let mib = |b: u64| b >> 20;
        return Err(format!(
            "starting {name} would commit {} MiB of memory ({} MiB running, {} MiB for it), over the limit of {} MiB (host memory times the overcommit ratio {})",
            mib(committed.saturating_add(wanted)),
            mib(committed),
            mib(wanted),
            mib(limit),
            daemon.config.overcommit
        ));
    }
    Ok(())
}

/// Starts `name` (its lock held); the error says why not.
async fn start_now(daemon: &Arc<Daemon>, name: &str) -> Result<(), String> {
    let daemon2 = daemon.clone();
    let name2 = name.to_owned();
    let (pid, started) = blocking(move || start_blocking(&daemon2, &name2)).await?;
    if !started {
        return Ok(()); // already running (and watched)
    }
    tracing::info!(instance = name, pid, "started");
    daemon
        .store()
        .set_running(name, true)
        .map_err(|e| e.to_string())?;
    daemon.emit(name, Some(Status::Running));
    watch(daemon.clone(), name.to_owned());
    Ok(())
}

/// Starts `name` unless it runs: its pid, and whether it was started now.
fn start_blocking(daemon: &Daemon, name: &str) -> Result<(i32, bool), String> {
    let record = record(daemon, name).map_err(|e| e.message)?;
    let config = config_of(&record).map_err(|e| e.message)?;
    let layout = daemon.layout(name);
    if let Ok(pid) = Control::status(&layout) {
        return Ok((pid, false));
    }
    // The image first (a build can take minutes), then admission and the
    // start together, one start at a time.
    let spec = match config.kind {
        Kind::Container => container_spec(daemon, name, &config)?,
        Kind::Vm => vm_spec(daemon, name, &config)?,
    };
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    admit(daemon, name, &config)?;
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
    std::fs::write(layout.spec(), json)
        .map_err(|e| format!("writing {}: {e}", layout.spec().display()))?;
    spawn_supervisor(&daemon.config.supervisor_program, &layout).map(|pid| (pid, true))
}

fn container_spec(
    daemon: &Daemon,
    name: &str,
    config: &InstanceConfig,
) -> Result<supervisor::Spec, String> {
    let image_root = images::root(&daemon.config, &config.image).map_err(|e| e.to_string())?;
    let cpu = match &config.cpus {
        Some(text) => {
            let limit =
                container::parse_cpus(text, container::host_cpus()).map_err(|e| e.to_string())?;
            Some((limit.quota_us, limit.period_us))
        }
        None => None,
    };
    Ok(supervisor::Spec {
        name: name.to_owned(),
        image_root,
        memory: config.memory,
        cpu,
        agent: daemon.config.state_dir.join(crate::AGENT_FILE),
        vm: None,
    })
}

/// A VM boots the default guest's kernel and initramfs on a root disk over
/// its image's VM disk. Its cgroups hold its guest memory plus the VMM's
/// overhead, and as much CPU time as it has vCPUs.
fn vm_spec(
    daemon: &Daemon,
    name: &str,
    config: &InstanceConfig,
) -> Result<supervisor::Spec, String> {
    let cpus = vm_cpus(config)?;
    let base = images::vm_disk(&daemon.config, &config.image).map_err(|e| e.to_string())?;
    let guest = guest::fetch(&guest::FetchOptions {
        data_dir: daemon.config.data_dir.clone(),
        mirror: None,
        keyring: None,
        security_mirror: None,
        progress: false,
    })
    .map_err(|e| format!("fetching the default guest: {e}"))?;
    let memory = config.memory.unwrap_or(DEFAULT_VM_MEMORY);
    let period_us = 100_000;
    Ok(supervisor::Spec {
        name: name.to_owned(),
        image_root: base.clone(),
        memory: Some(memory.saturating_add(vmm_overhead(cpus))),
        cpu: Some((period_us * u64::from(cpus), period_us)),
        agent: daemon.config.state_dir.join(crate::AGENT_FILE),
        vm: Some(supervisor::VmSpec {
            kernel: guest.kernel,
            initrd: guest.initrd,
            base,
            disk_size: config.disk.unwrap_or(0),
            cpus,
            memory,
            accel: config.accel.clone().unwrap_or_else(|| "auto".into()),
        }),
    })
}

/// Starts `PROGRAM supervise DIR` in a process group of its own (a
/// terminal's ^C to the daemon does not reach it) and reads its ready
/// line.
fn spawn_supervisor(program: &Path, layout: &Layout) -> Result<i32, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.supervisor_log())
        .map_err(|e| format!("opening {}: {e}", layout.supervisor_log().display()))?;
    let mut child = Command::new(program)
        .arg("supervise")
        .arg(&layout.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the supervisor {}: {e}", program.display()))?;
    let stdout = child.stdout.take();
    let supervisor_pid = child.id();
    // Reaped here when it ends, while this daemon lives.
    std::thread::spawn(move || child.wait());
    let Some(stdout) = stdout else {
        return Err("the supervisor has no ready pipe".into());
    };
    let give_up = |why: String| {
        // A supervisor that never reported goes, and its instance with it
        // (the init dies with its supervisor). It had not exited: that
        // would have closed the pipe.
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(supervisor_pid as i32, libc::SIGKILL) };
        Err(why)
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout.take(4096)).read_line(&mut line);
        let _ = sender.send(read.map(|_| line));
    });
    let line = match receiver.recv_timeout(START_TIMEOUT) {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return give_up(format!("reading the supervisor's report: {e}")),
        Err(_) => return give_up("the supervisor did not report within 60 s".into()),
    };
    let line = line.trim_end();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid
            .parse()
            .map_err(|_| format!("the supervisor reported {line:?}"));
    }
    match line.strip_prefix("error: ") {
        Some(why) => Err(why.to_owned()),
        None => Err(format!(
            "the supervisor ended without starting the instance (see {})",
            layout.supervisor_log().display()
        )),
    }
}

/// Notices when `name`'s supervisor ends. Then, under the instance's
/// lock (so after any stop or restart in progress has finished and
/// recorded itself), an instance that is not running but is recorded as
/// running stopped by itself (its init exited): it is recorded stopped.
pub fn watch(daemon: Arc<Daemon>, name: String) {
    let layout = daemon.layout(&name);
    std::thread::spawn(move || {
        if let Ok((_, mut conn)) = Control::request(&layout, &supervisor::Request::Watch) {
            let mut sink = [0u8; 64];
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        }
        let lock = daemon.instance_lock(&name);
        let _held = lock.blocking_lock();
        let _ = supervisor::wait_unsupervised(&layout, Duration::from_secs(10));
        if Control::status(&layout).is_ok() {
            return; // restarted meanwhile, and watched again
        }
        // The record may be gone (deleted meanwhile).
        let recorded = matches!(daemon.store().get(&name), Ok(Some(r)) if r.running);
        if recorded {
            tracing::info!(instance = name, "stopped by itself");
            let _ = daemon.store().set_running(&name, false);
            daemon.emit(&name, Some(Status::Stopped));
        }
    });
}

/// Stops `name` (its lock held).
async fn stop_now(
    daemon: &Arc<Daemon>,
    name: &str,
    timeout: u64,
    force: bool,
) -> Result<(), String> {
    let daemon2 = daemon.clone();
    let name2 = name.to_owned();
    blocking(move || Control::stop(&daemon2.layout(&name2), timeout, force))
        .await
        .map_err(|e| e.to_string())?;
    daemon
        .store()
        .set_running(name, false)
        .map_err(|e| e.to_string())?;
    daemon.emit(name, Some(Status::Stopped));
    Ok(())
}

/// A forced stop does not wait behind a graceful one (or anything else
/// holding the instance's lock): the instance is killed at once, and the
/// bookkeeping follows under the lock.
async fn kill_now(daemon: &Arc<Daemon>, name: &str) {
    let layout = daemon.layout(name);
    let _ = blocking(move || Control::stop(&layout, 0, true)).await;
}

/// Whether `name` runs now, or an operation on it is under way.
async fn running_or_busy(daemon: &Arc<Daemon>, name: &str) -> (bool, bool) {
    let daemon2 = daemon.clone();
    let name2 = name.to_owned();
    let running = blocking(move || Control::status(&daemon2.layout(&name2)).is_ok()).await;
    (running, daemon.ops.running_on(name).is_some())
}

/// `PUT /1.0/instances/{name}/state`. The state is checked when the
/// request comes (for a clear refusal) and again under the instance's
/// lock, where the change happens.
pub async fn change_state(
    daemon: Arc<Daemon>,
    name: String,
    request: StateRequest,
) -> Result<Operation, ApiError> {
    record(&daemon, &name)?;
    let timeout = request.timeout.unwrap_or(api::DEFAULT_STOP_TIMEOUT);
    if timeout > MAX_STOP_TIMEOUT {
        return Err(ApiError::bad_request(format!(
            "a stop timeout of {timeout} s: at most {MAX_STOP_TIMEOUT}"
        )));
    }
    let (running, busy) = running_or_busy(&daemon, &name).await;
    match (request.action, running, busy) {
        (Action::Start, true, false) => {
            return Err(ApiError::conflict(format!("{name} is already running")))
        }
        (Action::Stop, false, false) => {
            return Err(ApiError::conflict(format!("{name} is not running")))
        }
        _ => {}
    }
    let verb = match request.action {
        Action::Start => "start",
        Action::Stop => "stop",
        Action::Restart => "restart",
    };
    let op = daemon.ops.begin(format!("{verb} {name}"), &name);
    let d = daemon.clone();
    run_op(daemon, op.id.clone(), async move {
        if request.force && request.action != Action::Start {
            kill_now(&d, &name).await;
        }
        let lock = d.instance_lock(&name);
        let _held = lock.lock().await;
        match request.action {
            Action::Start => start_now(&d, &name).await,
            Action::Stop => stop_now(&d, &name, timeout, request.force).await,
            Action::Restart => {
                stop_now(&d, &name, timeout, request.force).await?;
                start_now(&d, &name).await
            }
        }
    });
    Ok(op)
}

/// `DELETE /1.0/instances/{name}`.
pub async fn delete(daemon: Arc<Daemon>, name: String, force: bool) -> Result<Operation, ApiError> {
    record(&daemon, &name)?;
    let (running, _) = running_or_busy(&daemon, &name).await;
    if running && !force {
        return Err(ApiError::conflict(format!(
            "{name} is running: stop it first, or delete it with --force"
        )));
    }
    let op = daemon.ops.begin(format!("delete {name}"), &name);
    let d = daemon.clone();
    run_op(daemon, op.id.clone(), async move {
        if force {
            kill_now(&d, &name).await;
        }
        let lock = d.instance_lock(&name);
        let _held = lock.lock().await;
        delete_now(&d, &name, force).await
    });
    Ok(op)
}

async fn delete_now(daemon: &Arc<Daemon>, name: &str, force: bool) -> Result<(), String> {
    if record(daemon, name).is_err() {
        return Err(format!("no instance named {name:?}"));
    }
    let layout = daemon.layout(name);
    let (running, _) = running_or_busy(daemon, name).await;
    if running {
        if !force {
            return Err(format!(
                "{name} is running: stop it first, or delete it with --force"
            ));
        }
        stop_now(daemon, name, 0, true).await?;
    }
    // The record first: a daemon killed after it leaves a directory
    // without a record, which the next create or start-up removes.
    daemon.store().delete(name).map_err(|e| e.to_string())?;
    blocking(move || std::fs::remove_dir_all(&layout.dir))
        .await
        .map_err(|e| format!("removing the instance's directory: {e}"))?;
    daemon.emit(name, None);
    Ok(())
}

/// At start-up: adopts the instances whose supervisors still run,
/// records as stopped those that ended while the daemon was away, removes
/// directories without records, and after a host reboot starts the
/// autostart instances.
pub async fn recover(daemon: &Arc<Daemon>) {
    let boot_id = std::fs::read_to_string(&daemon.config.boot_id_file)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let (records, rebooted) = {
        let mut store = daemon.store();
        let last = store.meta("boot_id").ok().flatten();
        let _ = store.set_meta("boot_id", &boot_id);
        let records = store.list().unwrap_or_default();
        (records, last.is_some_and(|l| l != boot_id))
    };
    let known: std::collections::HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
    if let Ok(entries) = std::fs::read_dir(daemon.config.state_dir.join("instances")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let layout = Layout::new(entry.path());
            if !known.contains(name.as_str()) && !layout.is_supervised() {
                tracing::info!(
                    "removing {}, left by an unfinished create",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    for record in records {
        let layout = daemon.layout(&record.name);
        if Control::status(&layout).is_ok() {
            tracing::info!(instance = record.name, "adopted");
            if !record.running {
                let _ = daemon.store().set_running(&record.name, true);
            }
            watch(daemon.clone(), record.name.clone());
            continue;
        }
        if record.running {
            let _ = daemon.store().set_running(&record.name, false);
        }
        if rebooted && record.autostart {
            tracing::info!(instance = record.name, "autostart");
            let request = StateRequest {
                action: Action::Start,
                timeout: None,
                force: false,
            };
            if let Err(e) = change_state(daemon.clone(), record.name.clone(), request).await {
                tracing::warn!(instance = record.name, "autostart: {}", e.message);
            }
        }
    }
}

/// `POST /1.0/instances/{name}/exec` and `.../console`: the supervisor's
/// connection after `request` (then the agent's, or the console's), once
/// the instance is known to run.
pub async fn attach(
    daemon: Arc<Daemon>,
    name: String,
    request: supervisor::Request,
) -> Result<std::os::unix::net::UnixStream, ApiError> {
    record(&daemon, &name)?;
    blocking(move || {
        let layout = daemon.layout(&name);
        match Control::request(&layout, &request) {
            Ok((_, conn)) => Ok(conn),
            Err(supervisor::Error::NotRunning(_)) => {
                Err(ApiError::conflict(format!("{name} is not running")))
            }
            Err(e) => Err(ApiError::internal(e)),
        }
    })
    .await
}

/// `GET /1.0/instances/{name}/logs`: the rotated log, then the current.
pub async fn logs(daemon: Arc<Daemon>, name: String) -> Result<Vec<u8>, ApiError> {
    record(&daemon, &name)?;
    let layout = daemon.layout(&name);
    blocking(move || {
        let current = layout.console_log();
        let mut out = std::fs::read(current.with_extension("log.1")).unwrap_or_default();
        out.extend(std::fs::read(&current).unwrap_or_default());
        Ok(out)
    })
    .await
}

/// `GET /1.0/images`.
pub async fn images(daemon: Arc<Daemon>) -> Result<Vec<api::Image>, ApiError> {
    blocking(move || Ok(images::list(&daemon.config))).await
}

/// `POST /1.0/images`: builds the image in an operation.
pub async fn build_image(daemon: Arc<Daemon>, name: String) -> Result<Operation, ApiError> {
    images::check(&name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let op = daemon.ops.begin(format!("build image {name}"), &name);
    let d = daemon.clone();
    run_op(daemon, op.id.clone(), async move {
        blocking(move || images::build(&d.config, &name))
            .await
            .map_err(|e| e.to_string())
    });
    Ok(op)
}

/// `DELETE /1.0/images/{name}`: refused while any instance is made from it.
pub async fn remove_image(daemon: Arc<Daemon>, name: String) -> Result<Operation, ApiError> {
    images::check(&name).map_err(|e| ApiError::not_found(e.to_string()))?;
    if let Some(why) = image_in_use(&daemon, &name).map_err(ApiError::internal)? {
        return Err(ApiError::conflict(why));
    }
    let op = daemon.ops.begin(format!("remove image {name}"), &name);
    let d = daemon.clone();
    run_op(daemon, op.id.clone(), async move {
        blocking(move || {
            // Checked again under the images' lock, which every start
            // takes to find its image: no instance made meanwhile loses it.
            images::remove_unless(&d.config, &name, || {
                image_in_use(&d, &name).unwrap_or_else(|e| Some(e.to_string()))
            })
        })
        .await
        .map_err(|e| e.to_string())
    });
    Ok(op)
}

/// Why image `name` may not be removed (the instances made from it).
fn image_in_use(daemon: &Daemon, name: &str) -> Result<Option<String>, state::StateError> {
    let records = daemon.store().list()?;
    let users: Vec<String> = records
        .iter()
        .filter(|r| config_of(r).is_ok_and(|c| c.image == name))
        .map(|r| r.name.clone())
        .collect();
    Ok((!users.is_empty()).then(|| {
        format!(
            "image {name} is used by {}: delete them first",
            users.join(", ")
        )
    }))
}
