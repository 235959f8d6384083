//! `vessel`: virtual machines and containers on one Linux host.

mod container_cmd;
mod host;
mod instance_cmd;
mod terminal;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hypervisor::host::Accel;
use vmm::{Console, MachineConfig, StopReason};

/// The kernel command line of the default guest: the serial console,
/// a panic ends the VM at once, and a quiet boot so a command's output is
/// all that appears. `tsc=reliable`: both accelerators give the guest a TSC
/// that runs at a fixed rate from host time, while the guest's tick-based
/// clocks can lag when the host is busy (most under the software vCPU); the
/// clocksource watchdog would then wrongly mark the TSC unstable.
/// `quiet` still shows error-level messages, and the default guest boots
/// without any (the machine's empty PCI bus keeps Linux from reporting a
/// missing PCI configuration mechanism).
const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet tsc=reliable";

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Virtual machines and containers on one Linux host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what virtualization this host offers.
    Doctor {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage the default guest (Debian's cloud kernel and a busybox initramfs).
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
    /// Boot a transient VM with its serial console on this terminal (or, with
    /// --container, run the command in a container on this host's kernel).
    Run(Box<RunArgs>),
    /// Run the vessel daemon in the foreground: lasting instances behind its API socket.
    Daemon(instance_cmd::DaemonArgs),
    /// Create an instance and start it (through the daemon).
    Launch(instance_cmd::NewInstanceArgs),
    /// Create an instance, stopped.
    Create(instance_cmd::NewInstanceArgs),
    /// Start an instance.
    Start { name: String },
    /// Stop an instance: gracefully (SIGTERM to a container's init, a VM's ACPI power
    /// button), then by force after the timeout.
    Stop(instance_cmd::StopArgs),
    /// Stop an instance, then start it.
    Restart(instance_cmd::StopArgs),
    /// Delete an instance and its files.
    Rm(instance_cmd::RmArgs),
    /// List the instances.
    List(instance_cmd::ListArgs),
    /// Show one instance as JSON.
    Info { name: String },
    /// Run a command in a running instance.
    Exec(instance_cmd::ExecArgs),
    /// Print an instance's console log (kept across restarts, size-capped).
    Logs { name: String },
    /// Attach to an instance's console (input and output): a VM's serial console, a
    /// container's console terminal with a root shell. Ctrl-a q detaches; Ctrl-a
    /// Ctrl-a sends Ctrl-a.
    Console { name: String },
    /// Manage the images instances are made from (through the daemon).
    Image {
        #[command(subcommand)]
        command: instance_cmd::ImageCommand,
    },
    /// The supervising process of one instance (started by the daemon).
    #[command(hide = true)]
    Supervise { dir: PathBuf },
    /// Starts the agent in a running instance (started by its supervisor).
    #[command(hide = true, name = "supervise-exec")]
    SuperviseExec { dir: PathBuf },
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Download, verify and cache the default guest (does nothing if cached).
    Fetch {
        /// Debian mirror URL (default: $VESSEL_DEBIAN_MIRROR, then this host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Show where the cached default guest is.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum AccelArg {
    /// KVM where stock kernels run accelerated, else the software vCPU.
    Auto,
    /// Linux KVM (hardware virtualization).
    Kvm,
    /// vessel's software x86-64 vCPU.
    Emu,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum OnSigtermArg {
    /// Tear the VM down.
    Stop,
    /// Press the VM's power button.
    PowerButton,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Number of vCPUs (default 1); with --container, a CPU limit such as 0.5 (default none).
    #[arg(long)]
    cpus: Option<String>,
    /// Guest memory: a number of MiB or a size like 512M, 2G (default 512M); with
    /// --container, a memory limit (default none).
    #[arg(long)]
    memory: Option<String>,
    /// Kernel to boot (bzImage or ELF vmlinux); default: the default guest's.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk; default: the default guest's when --kernel is not given.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing vessel's default.
    #[arg(long)]
    cmdline: Option<String>,
    /// A virtio disk: an image file, with options readonly, format=raw|qcow2 and
    /// serial=S, comma-separated (repeatable; the guest sees /dev/vda, /dev/vdb, ...).
    #[arg(long, value_name = "PATH[,OPTION...]")]
    disk: Vec<String>,
    /// A virtio entropy device fed from the host's random source (/dev/hwrng in the guest).
    #[arg(long)]
    rng: bool,
    /// Network. A VM: a virtio NIC on a host tap device, tap[=NAME][,mac=MAC]
    /// (repeatable; without NAME a new tap vessel0, vessel1, ... that goes with the VM).
    /// A container: none (a namespace with loopback only, the default) or host.
    #[arg(long, value_name = "MODE")]
    net: Vec<String>,
    /// A virtio-vsock device (guest CID 3) whose host side is the Unix socket PATH:
    /// write `CONNECT <port>` to reach a guest listener; guest connections to host
    /// port P reach the socket PATH_P (Firecracker's protocol).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// What SIGTERM does to a VM: stop it at once, or press its ACPI power button so
    /// the guest shuts itself down (each SIGTERM one press; the daemon's graceful stop).
    #[arg(long, value_enum, default_value = "stop", value_name = "ACTION")]
    on_sigterm: OnSigtermArg,
    #[command(flatten)]
    container: container_cmd::ContainerArgs,
    /// Command to run in the guest; without it, an interactive shell.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VESSEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor { json } => doctor(json),
        Command::Guest {
            command: GuestCommand::Fetch { mirror },
        } => guest_fetch(mirror),
        Command::Guest {
            command: GuestCommand::Info { json },
        } => guest_info(json),
        Command::Run(args) => run(*args),
        Command::Daemon(args) => instance_cmd::daemon(args),
        Command::Launch(args) => instance_cmd::new_instance(args, true),
        Command::Create(args) => instance_cmd::new_instance(args, false),
        Command::Start { name } => instance_cmd::start(&name),
        Command::Stop(args) => instance_cmd::stop(args, false),
        Command::Restart(args) => instance_cmd::stop(args, true),
        Command::Rm(args) => instance_cmd::rm(args),
        Command::List(args) => instance_cmd::list(args),
        Command::Info { name } => instance_cmd::info(&name),
        Command::Exec(args) => instance_cmd::exec(args),
        Command::Logs { name } => instance_cmd::logs(&name),
        Command::Console { name } => instance_cmd::console(&name),
        Command::Image { command } => instance_cmd::image(command),
        Command::Supervise { dir } => instance_cmd::supervise(dir),
        Command::SuperviseExec { dir } => instance_cmd::supervise_exec(dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(json: bool) -> Result<ExitCode> {
    let report = host::report();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", host::render_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch_options(mirror: Option<String>) -> guest::FetchOptions {
    guest::FetchOptions {
        data_dir: guest::default_data_dir(),
        mirror,
        keyring: None,
        // From $VESSEL_DEBIAN_SECURITY_MIRROR or the host's apt sources.
        security_mirror: None,
        progress: true,
    }
}

fn guest_fetch(mirror: Option<String>) -> Result<ExitCode> {
    let image = guest::fetch(&fetch_options(mirror)).context("fetching the default guest")?;
    eprintln!("default guest ready: Linux {}", image.release);
    Ok(ExitCode::SUCCESS)
}

fn guest_info(json: bool) -> Result<ExitCode> {
    let data_dir = guest::default_data_dir();
    let Some(image) = guest::cached(&data_dir).context("reading the guest cache")? else {
        bail!(
            "the default guest is not fetched yet (in {}); run `vessel guest fetch`",
            data_dir.display()
        );
    };
    if json {
        let value = serde_json::json!({
            "kernel": image.kernel,
            "initrd": image.initrd,
            "release": image.release,
        });
        println!("{value}");
    } else {
        println!(
            "release  {}\nkernel   {}\ninitrd   {}",
            image.release,
            image.kernel.display(),
            image.initrd.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The accelerator `--accel` names, checked against this host.
fn choose_accel(arg: AccelArg) -> Result<Accel> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware_virtualization = hypervisor::host::has_hardware_virtualization(&cpuinfo);
    resolve_accel(
        arg,
        hypervisor::host::kvm_support(),
        hardware_virtualization,
    )
}

/// `--accel` resolved against what the host offers (pure, for testing).
fn resolve_accel(
    arg: AccelArg,
    kvm: hypervisor::host::KvmSupport,
    hardware_virtualization: bool,
) -> Result<Accel> {
    let accel = match arg {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Emu => Accel::Emu,
        AccelArg::Auto => hypervisor::host::auto_accel(kvm, hardware_virtualization),
    };
    match accel {
        Accel::Kvm if !kvm.device => bail!("--accel kvm: this host has no /dev/kvm"),
        Accel::Kvm if !kvm.usable => bail!(
            "--accel kvm: /dev/kvm exists but a VM cannot be created (permissions, or KVM is busy)"
        ),
        Accel::Kvm if kvm.pvm => {
            eprintln!(
                "vessel: warning: KVM here is nested PVM; stock Linux kernels stop on instructions it cannot emulate (see `vessel doctor`)"
            );
        }
        // emu, vessel's software x86-64 vCPU, needs nothing from the host.
        Accel::Emu | Accel::Kvm => {}
    }
    Ok(accel)
}

fn check_file(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<ExitCode> {
    if args.container.container {
        return container_cmd::run(args);
    }
    container_cmd::refuse_container_flags(&args.container)?;
    let memory_text = args.memory.as_deref().unwrap_or("512M");
    let memory = vmm::config::parse_size(memory_text)?;
    let cpus = match args.cpus.as_deref() {
        None => 1,
        Some(text) => text
            .trim()
            .parse::<u32>()
            .map_err(|_| anyhow::anyhow!("--cpus {text}: expected a whole number of vCPUs"))?,
    };
    let host_memory = vmm::config::host_memory().context("reading this host's memory size")?;
    vmm::config::validate_resources(cpus, memory, memory_text, vmm::MAX_CPUS, host_memory)?;
    if let Some(kernel) = &args.kernel {
        vmm::boot::kernel_format(kernel)?;
    }
    if let Some(initrd) = &args.initrd {
        check_file(initrd, "initrd")?;
    }
    let disks = args
        .disk
        .iter()
        .map(|spec| vmm::config::DiskConfig::parse(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let nics = args
        .net
        .iter()
        .map(|spec| vmm::config::NicConfig::parse(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let accel = choose_accel(args.accel)?;
    let hypervisor: Box<dyn hypervisor::Hypervisor> = match accel {
        Accel::Kvm => Box::new(hypervisor::kvm::KvmHypervisor::new().context("opening KVM")?),
        Accel::Emu => Box::new(emu::EmuHypervisor::new()),
    };
    if cpus > hypervisor.max_vcpus() {
        bail!(
            "--cpus {}: {} allows at most {}",
            cpus,
            hypervisor.name(),
            hypervisor.max_vcpus()
        );
    }

    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        None => {
            // Uses the cache when it is intact; fetches (once) otherwise.
            let image = guest::fetch(&fetch_options(None)).context("fetching the default guest")?;
            (image.kernel, Some(args.initrd.unwrap_or(image.initrd)))
        }
    };
    let mut cmdline = args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    let has_command = !args.command.is_empty();
    if has_command {
        cmdline.push(' ');
        cmdline.push_str(&guest::command_line_for(&args.command)?);
    }
    let config = MachineConfig {
        cpus,
        memory,
        kernel,
        initrd,
        cmdline,
        exit_status_port: Some(guest::EXIT_STATUS_PORT),
        disks,
        nics,
        rng: args.rng,
        vsock: args.vsock,
        on_sigterm: match args.on_sigterm {
            OnSigtermArg::Stop => vmm::SigtermAction::Stop,
            OnSigtermArg::PowerButton => vmm::SigtermAction::PowerButton,
        },
    };

    let stdin = libc::STDIN_FILENO;
    let interactive_terminal = terminal::is_terminal(stdin);
    // An interactive shell gets the terminal raw, Ctrl-C included (Ctrl-A x
    // stops the VM); a single command keeps Ctrl-C as "stop the VM".
    let _raw = if interactive_terminal {
        Some(
            terminal::RawModeGuard::enter(stdin, has_command)
                .context("putting the terminal in raw mode")?,
        )
    } else {
        None
    };
    let console = Console {
        output: Box::new(std::io::stdout()),
        input: Some(stdin),
        escape: interactive_terminal && !has_command,
    };
    let outcome = vmm::run(hypervisor.as_ref(), &config, console)?;
    drop(_raw);
    let _ = std::io::stdout().flush();
    Ok(exit_code(&outcome, has_command))
}

/// The exit status of `vessel run`: the guest command's, when it reported
/// one; otherwise what the way the VM stopped means.
fn exit_code(outcome: &vmm::Outcome, has_command: bool) -> ExitCode {
    if let Some(status) = outcome.exit_status {
        return ExitCode::from(status);
    }
    match &outcome.reason {
        StopReason::PowerOff
        | StopReason::Reset
        | StopReason::Halted
        | StopReason::ConsoleEscape => {
            if has_command {
                eprintln!(
                    "vessel: the guest stopped ({}) before reporting the command's exit status",
                    describe(&outcome.reason)
                );
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        StopReason::TripleFault => {
            eprintln!("vessel: the guest triple-faulted (processor shutdown); the VM was stopped");
            ExitCode::FAILURE
        }
        StopReason::Signal(signal) => {
            eprintln!("vessel: stopped by signal {signal}; the VM was torn down");
            ExitCode::from(128u8.saturating_add(*signal as u8))
        }
        StopReason::Error(what) => {
            eprintln!("vessel: the VM stopped on an error: {what}");
            ExitCode::FAILURE
        }
    }
}

fn describe(reason: &StopReason) -> &'static str {
    match reason {
        StopReason::PowerOff => "power off",
        StopReason::Reset => "reset",
        StopReason::Halted => "halted",
        StopReason::ConsoleEscape => "console escape",
        StopReason::TripleFault => "triple fault",
        StopReason::Signal(_) => "signal",
        StopReason::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::host::KvmSupport;

    const NO_KVM: KvmSupport = KvmSupport {
        device: false,
        usable: false,
        pvm: false,
    };
    const PVM: KvmSupport = KvmSupport {
        device: true,
        usable: true,
        pvm: true,
    };
    const REAL_KVM: KvmSupport = KvmSupport {
        device: true,
        usable: true,
        pvm: false,
    };

    fn error_of(result: Result<Accel>) -> String {
        format!("{:#}", result.expect_err("must be refused"))
    }

    #[test]
    fn kvm_where_it_is_absent_or_unusable_is_refused() {
        assert_eq!(
            error_of(resolve_accel(AccelArg::Kvm, NO_KVM, true)),
            "--accel kvm: this host has no /dev/kvm"
        );
        let busy = KvmSupport {
            device: true,
            usable: false,
            pvm: false,
        };
        assert!(
            error_of(resolve_accel(AccelArg::Kvm, busy, true)).contains("a VM cannot be created")
        );
    }

    #[test]
    fn auto_uses_kvm_only_with_hardware_support() {
        assert_eq!(
            resolve_accel(AccelArg::Auto, REAL_KVM, true).ok(),
            Some(Accel::Kvm)
        );
        // Without a KVM that runs stock kernels, auto picks the software vCPU.
        assert_eq!(
            resolve_accel(AccelArg::Auto, PVM, false).ok(),
            Some(Accel::Emu)
        );
        assert_eq!(
            resolve_accel(AccelArg::Auto, NO_KVM, false).ok(),
            Some(Accel::Emu)
        );
        assert_eq!(
            resolve_accel(AccelArg::Kvm, PVM, false).ok(),
            Some(Accel::Kvm)
        );
    }

    #[test]
    fn emu_is_available_everywhere() {
        for kvm in [NO_KVM, PVM, REAL_KVM] {
            assert_eq!(
                resolve_accel(AccelArg::Emu, kvm, true).ok(),
                Some(Accel::Emu)
            );
        }
    }
}
