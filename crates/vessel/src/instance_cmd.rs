//! Lasting instances: `vessel daemon` and the verbs that talk to it
//! (launch, create, start, stop, restart, rm, list, info, exec, logs),
//! plus the supervisor's hidden entry points.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use client::Client;
use hyper::Method;

/// `vessel daemon`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// The API socket (default: $VESSEL_SOCKET, then /run/vessel/vessel.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the database and the instances live (default: $VESSEL_STATE_DIR, then
    /// /var/lib/vessel).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Memory the running instances may commit, as a multiple of the host's memory.
    #[arg(long, value_name = "RATIO", default_value = "1.0")]
    overcommit: f64,
}

/// What `launch` and `create` make.
#[derive(clap::Args, Debug)]
pub struct NewInstanceArgs {
    /// The instance's name: lowercase letters, digits and '-', starting with a letter.
    name: String,
    /// A virtual machine.
    #[arg(long, conflicts_with = "container")]
    vm: bool,
    /// A container on this host's kernel (the default).
    #[arg(long)]
    container: bool,
    /// A VM's accelerator: auto, kvm or emu.
    #[arg(long, value_name = "ACCEL")]
    accel: Option<String>,
    /// A container's CPU limit such as 0.5, or a VM's vCPUs.
    #[arg(long)]
    cpus: Option<String>,
    /// A container's memory limit or a VM's memory, such as 256M or 1G.
    #[arg(long)]
    memory: Option<String>,
    /// A VM's root disk size, such as 4G.
    #[arg(long, value_name = "SIZE")]
    disk: Option<String>,
    /// The image: busybox (the default) or debian/bookworm (`vessel image list`).
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Start the instance again after the host reboots.
    #[arg(long)]
    autostart: bool,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    name: String,
    /// Stop at once (SIGKILL to a container's processes or a VM's VMM).
    #[arg(long)]
    force: bool,
    /// Seconds a graceful stop may take before it is forced.
    #[arg(long, value_name = "S", default_value_t = api::DEFAULT_STOP_TIMEOUT)]
    timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    name: String,
    /// Delete it even if it runs (it is stopped at once first).
    #[arg(long)]
    force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    name: String,
    /// Give the command a pseudo-terminal.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// An environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The command's working directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// List the images and whether each is built.
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Build an image now (it is otherwise built when an instance first needs it).
    Build { name: String },
    /// Remove an image's built root (refused while an instance uses it).
    Rm { name: String },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn client() -> Client {
    Client::new(client::socket_path())
}

pub fn daemon(args: DaemonArgs) -> Result<ExitCode> {
    if !(args.overcommit > 0.0 && args.overcommit.is_finite()) {
        bail!(
            "--overcommit {}: must be a positive number",
            args.overcommit
        );
    }
    let config = daemon::Config {
        socket: args.socket.unwrap_or_else(client::socket_path),
        state_dir: args.state_dir.unwrap_or_else(|| {
            std::env::var_os("VESSEL_STATE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/vessel"))
        }),
        supervisor_program: std::env::current_exe().context("finding the vessel binary")?,
        data_dir: guest::default_data_dir(),
        overcommit: args.overcommit,
        boot_id_file: PathBuf::from(daemon::BOOT_ID_FILE),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(daemon::serve(config));
    // Requests still in flight (a stop waiting for its timeout) are not
    // waited for: instances live on in their supervisors.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served?;
    Ok(ExitCode::SUCCESS)
}

fn parse_memory(text: &str) -> Result<u64> {
    vmm::config::parse_size(text).with_context(|| format!("--memory {text}"))
}

/// Waits for `work` with a spinner on a terminal's stderr (image builds
/// and first launches take minutes).
fn with_spinner<T>(message: String, work: impl std::future::Future<Output = T>) -> Result<T> {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    } else {
        None
    };
    let result = runtime()?.block_on(work);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result)
}

pub fn image(command: ImageCommand) -> Result<ExitCode> {
    let client = client();
    match command {
        ImageCommand::List { format } => {
            let images: Vec<api::Image> = runtime()?.block_on(client.get("/1.0/images"))?;
            if format == Format::Json {
                println!("{}", serde_json::to_string(&images)?);
            } else {
                println!("{:<20} BUILT", "NAME");
                for i in images {
                    println!("{:<20} {}", i.name, if i.built { "yes" } else { "no" });
                }
            }
        }
        ImageCommand::Build { name } => {
            let request = api::BuildRequest { name: name.clone() };
            with_spinner(
                format!("building image {name}"),
                client.operation(Method::POST, "/1.0/images", Some(&request)),
            )??;
        }
        ImageCommand::Rm { name } => {
            runtime()?.block_on(client.operation::<()>(
                Method::DELETE,
                &format!("/1.0/images/{name}"),
                None,
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn new_instance(args: NewInstanceArgs, start: bool) -> Result<ExitCode> {
    let kind = if args.vm {
        api::Kind::Vm
    } else {
        api::Kind::Container
    };
    if kind == api::Kind::Container {
        if let Some((flag, _)) = [
            ("--accel", args.accel.is_some()),
            ("--disk", args.disk.is_some()),
        ]
        .iter()
        .find(|(_, given)| *given)
        {
            bail!("{flag} applies to VMs only (add --vm)");
        }
    }
    api::check_name(&args.name)?;
    let request = api::CreateRequest {
        name: args.name.clone(),
        config: api::InstanceConfig {
            kind,
            image: args.image,
            cpus: args.cpus,
            memory: args.memory.as_deref().map(parse_memory).transpose()?,
            accel: args.accel,
            disk: args
                .disk
                .as_deref()
                .map(|text| vmm::config::parse_size(text).with_context(|| format!("--disk {text}")))
                .transpose()?,
            autostart: args.autostart,
        },
        start,
    };
    let verb = if start { "launching" } else { "creating" };
    let client = client();
    with_spinner(
        format!("{verb} {}", args.name),
        client.operation(Method::POST, "/1.0/instances", Some(&request)),
    )??;
    Ok(ExitCode::SUCCESS)
}

fn change_state(
    name: &str,
    action: api::Action,
    timeout: Option<u64>,
    force: bool,
) -> Result<ExitCode> {
    let request = api::StateRequest {
        action,
        timeout,
        force,
    };
    let path = format!("/1.0/instances/{name}/state");
    runtime()?.block_on(client().operation(Method::PUT, &path, Some(&request)))?;
    Ok(ExitCode::SUCCESS)
}

pub fn start(name: &str) -> Result<ExitCode> {
    change_state(name, api::Action::Start, None, false)
}

pub fn stop(args: StopArgs, restart: bool) -> Result<ExitCode> {
    let action = if restart {
        api::Action::Restart
    } else {
        api::Action::Stop
    };
    change_state(&args.name, action, Some(args.timeout), args.force)
}

pub fn rm(args: RmArgs) -> Result<ExitCode> {
    let path = format!("/1.0/instances/{}?force={}", args.name, args.force);
    runtime()?.block_on(client().operation::<()>(Method::DELETE, &path, None))?;
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: ListArgs) -> Result<ExitCode> {
    let instances: Vec<api::Instance> = runtime()?.block_on(client().get("/1.0/instances"))?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(&instances)?)?,
        Format::Table => {
            writeln!(
                out,
                "{:<24} {:<10} {:<9} {:<10} {:>8}",
                "NAME", "KIND", "STATUS", "IMAGE", "PID"
            )?;
            for i in &instances {
                let kind = match i.config.kind {
                    api::Kind::Container => "container",
                    api::Kind::Vm => "vm",
                };
                let pid = i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
                writeln!(
                    out,
                    "{:<24} {:<10} {:<9} {:<10} {:>8}",
                    i.name,
                    kind,
                    i.status.as_str(),
                    i.config.image,
                    pid
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn info(name: &str) -> Result<ExitCode> {
    let instance: api::Instance =
        runtime()?.block_on(client().get(&format!("/1.0/instances/{name}")))?;
    println!("{}", serde_json::to_string_pretty(&instance)?);
    Ok(ExitCode::SUCCESS)
}

pub fn logs(name: &str) -> Result<ExitCode> {
    let text = runtime()?.block_on(client().get_text(&format!("/1.0/instances/{name}/logs")))?;
    std::io::stdout().lock().write_all(&text)?;
    Ok(ExitCode::SUCCESS)
}

pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    for pair in &args.env {
        container::parse_env(pair)?;
    }
    let (stream, early) = runtime()?.block_on(client().exec(&args.name))?;
    let (rows, cols) = if args.tty {
        crate::terminal::window_size(libc::STDOUT_FILENO).unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let _raw = if args.tty && crate::terminal::is_terminal(libc::STDIN_FILENO) {
        Some(crate::terminal::RawModeGuard::enter(
            libc::STDIN_FILENO,
            false,
        )?)
    } else {
        None
    };
    let exec = vessel_agent::Exec {
        argv: args.command,
        env: args.env,
        cwd: args.workdir.unwrap_or_default(),
        tty: args.tty,
        rows,
        cols,
    };
    match client::exec::run(stream, early, exec) {
        Ok(code) => Ok(ExitCode::from((code & 0xff) as u8)),
        Err(client::exec::SessionError::NotStarted(why)) => {
            drop(_raw);
            eprintln!("vessel: exec in {}: {why}", args.name);
            // The shell's conventions: 127 not found, 126 not runnable.
            Ok(ExitCode::from(
                if why.contains("No such file") || why.contains("not found") {
                    127
                } else {
                    126
                },
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Ctrl-a, the first key of the console's detach sequence (Ctrl-a q, as
/// Incus's console).
const DETACH_PREFIX: u8 = 0x01;

/// `vessel console NAME`: the console's output to stdout until the
/// instance ends or the user detaches; stdin to a VM's serial input (raw
/// on a terminal). At the end of stdin the input side is closed and the
/// output goes on.
pub fn console(name: &str) -> Result<ExitCode> {
    let (stream, early) = runtime()?.block_on(client().console(name))?;
    let stdin_fd = libc::STDIN_FILENO;
    let on_terminal = crate::terminal::is_terminal(stdin_fd);
    let _raw = if on_terminal {
        eprint!("vessel: attached to the console of {name}; Ctrl-a q detaches\r\n");
        Some(crate::terminal::RawModeGuard::enter(stdin_fd, false)?)
    } else {
        None
    };
    let input = stream.try_clone().context("the console connection")?;
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || forward_console_input(input))
        .context("starting the console's input thread")?;
    let mut stdout = std::io::stdout();
    stdout.write_all(&early)?;
    stdout.flush()?;
    let mut from = &stream;
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                stdout.write_all(&buf[..n])?;
                stdout.flush()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The connection shut down by a detach ends like this too.
            Err(_) => break,
        }
    }
    drop(_raw);
    if on_terminal {
        eprintln!("\nvessel: detached from the console of {name}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies stdin to the console until Ctrl-a q (which ends the session)
/// or the end of stdin (which closes only the input side).
fn forward_console_input(conn: std::os::unix::net::UnixStream) {
    let mut stdin = std::io::stdin().lock();
    let mut to = &conn;
    let mut buf = [0u8; 1024];
    let mut armed = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = conn.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &byte in &buf[..n] {
            if armed {
                armed = false;
                match byte {
                    b'q' | b'Q' => {
                        let _ = to.write_all(&out);
                        let _ = conn.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    DETACH_PREFIX => out.push(DETACH_PREFIX),
                    other => out.extend_from_slice(&[DETACH_PREFIX, other]),
                }
            } else if byte == DETACH_PREFIX {
                armed = true;
            } else {
                out.push(byte);
            }
        }
        if to.write_all(&out).is_err() {
            return;
        }
    }
}

/// `vessel supervise DIR` (started by the daemon, not by users).
pub fn supervise(dir: PathBuf) -> Result<ExitCode> {
    use std::os::fd::AsFd;
    let ready = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("taking the ready pipe")?;
    // Standard output becomes /dev/null: the ready pipe is closed once
    // reported, and nothing else may write to the daemon through it.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    // SAFETY: dup2 onto stdout from a descriptor we own.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), libc::STDOUT_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error()).context("redirecting stdout");
    }
    supervisor::supervise(&dir, ready)?;
    Ok(ExitCode::SUCCESS)
}

/// `vessel supervise-exec DIR` (started by a supervisor).
pub fn supervise_exec(dir: PathBuf) -> Result<ExitCode> {
    supervisor::exec_helper(&dir)?;
    Ok(ExitCode::SUCCESS)
}
