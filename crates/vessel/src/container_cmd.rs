//! `vessel run --container`: the command line of shared-kernel containers, turned into a
//! `container::Config`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use super::{AccelArg, RunArgs};

/// The flags of `vessel run` that only containers use.
#[derive(clap::Args, Debug)]
pub struct ContainerArgs {
    /// Run the command in a container on this host's kernel instead of a VM.
    #[arg(long)]
    pub container: bool,
    /// Container root directory (never modified: writes go to a discarded overlay);
    /// default: a busybox root vessel builds once.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Container: the most processes and threads it may have.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Container hostname (default: the container's id).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Container environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Container working directory (default /).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Container: give the command a pseudo-terminal.
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
}

/// Without --container, the container-only flags are mistakes.
pub fn refuse_container_flags(args: &ContainerArgs) -> Result<()> {
    let given = [
        ("--rootfs", args.rootfs.is_some()),
        ("--pids", args.pids.is_some()),
        ("--hostname", args.hostname.is_some()),
        ("-e", !args.env.is_empty()),
        ("-w", args.workdir.is_some()),
        ("-t", args.tty),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        bail!("{flag} applies to containers only; add --container");
    }
    Ok(())
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let vm_only = [
        ("--kernel", args.kernel.is_some()),
        ("--initrd", args.initrd.is_some()),
        ("--cmdline", args.cmdline.is_some()),
        ("--accel", args.accel != AccelArg::Auto),
        ("--disk", !args.disk.is_empty()),
        ("--rng", args.rng),
        ("--vsock", args.vsock.is_some()),
        ("--on-sigterm", args.on_sigterm != crate::OnSigtermArg::Stop),
    ];
    if let Some((flag, _)) = vm_only.iter().find(|(_, g)| *g) {
        bail!("{flag} applies to VMs only, not to --container");
    }
    if args.command.is_empty() {
        bail!("--container needs a command: vessel run --container -- CMD [ARG...]");
    }
    let c = args.container;
    let rootfs = match c.rootfs {
        Some(dir) => dir,
        None => default_rootfs()?,
    };
    let mut config = container::Config::new(rootfs, args.command);
    config.limits.memory = args
        .memory
        .as_deref()
        .map(|text| -> Result<u64> {
            let bytes = vmm::config::parse_size(text)?;
            Ok(container::check_memory(bytes, text)?)
        })
        .transpose()?;
    config.limits.cpu = args
        .cpus
        .as_deref()
        .map(|text| container::parse_cpus(text, container::host_cpus()))
        .transpose()?;
    if let Some(pids) = c.pids {
        if pids == 0 {
            bail!("--pids 0: a container needs at least one process");
        }
        config.limits.pids = Some(pids);
    }
    config.net = match args.net.as_slice() {
        [] => container::Net::None,
        [one] if one == "none" => container::Net::None,
        [one] if one == "host" => container::Net::Host,
        [one] => bail!("--net {one}: a container's network is none or host"),
        _ => bail!("--net: a container takes one network mode (none or host)"),
    };
    config.hostname = c.hostname;
    config.env = c
        .env
        .iter()
        .map(|pair| container::parse_env(pair))
        .collect::<container::Result<_>>()?;
    if let Some(dir) = c.workdir {
        config.cwd = dir;
    }
    config.tty = c.tty;

    let outcome = match container::run(&config) {
        Ok(outcome) => outcome,
        // The shell convention for a command that is not there.
        Err(e @ container::Error::NotFound(_)) => {
            eprintln!("vessel: {e}");
            return Ok(ExitCode::from(127));
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.killed_by_memory_limit() {
        eprintln!(
            "vessel: container {} was killed: it exceeded its memory limit (--memory {})",
            outcome.id(),
            args.memory.as_deref().unwrap_or("?")
        );
    } else if outcome.oom_kills > 0 {
        eprintln!(
            "vessel: container {}: the memory limit (--memory {}) made the kernel kill {} of its processes",
            outcome.id(),
            args.memory.as_deref().unwrap_or("?"),
            outcome.oom_kills
        );
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

/// The cached busybox root in the data dir, built (and busybox fetched) on first use.
fn default_rootfs() -> Result<PathBuf> {
    let data_dir = guest::default_data_dir();
    let root = container::rootfs::busybox_root_dir(&data_dir);
    if container::rootfs::is_busybox_root(&root) {
        return Ok(root);
    }
    let busybox = guest::fetch_busybox(&guest::FetchOptions {
        data_dir: data_dir.clone(),
        mirror: None,
        keyring: None,
        security_mirror: None,
        progress: true,
    })
    .context("fetching busybox for the default container root")?;
    container::rootfs::build_busybox_root(&busybox, &root)
        .context("building the default container root")?;
    Ok(root)
}
