//! The OCI hooks (runtime.md's lifecycle): each runs with the container's state as JSON
//! on its stdin, in the runtime's namespaces or in the container's, within its timeout.
//!
//! - `prestart`, `createRuntime`: during create, before pivot_root, in the runtime's
//!   namespaces; `createContainer` right after them in the container's.
//! - `startContainer`: during start, in the container's namespaces, before its command.
//! - `poststart`: after the command started; `poststop`: after the container is
//!   destroyed. Their failures are warnings; every other hook's fails the operation
//!   and destroys the container.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::{Hook, Hooks, Spec};
use serde::Serialize;

/// The state a hook reads on stdin (runtime.md's State).
#[derive(Debug, Serialize)]
pub struct HookState<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: &'a str,
    pub pid: libc::pid_t,
    pub bundle: &'a str,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: &'a HashMap<String, String>,
}

/// The hooks of each point of the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Prestart => "prestart",
            Kind::CreateRuntime => "createRuntime",
            Kind::CreateContainer => "createContainer",
            Kind::StartContainer => "startContainer",
            Kind::Poststart => "poststart",
            Kind::Poststop => "poststop",
        }
    }

    /// Whether the hook runs in the container's namespaces.
    fn in_container(self) -> bool {
        matches!(self, Kind::CreateContainer | Kind::StartContainer)
    }

    fn of(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            Kind::Prestart => hooks.prestart(),
            Kind::CreateRuntime => hooks.create_runtime(),
            Kind::CreateContainer => hooks.create_container(),
            Kind::StartContainer => hooks.start_container(),
            Kind::Poststart => hooks.poststart(),
            Kind::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// Checks what the spec requires of every hook before anything runs.
pub fn validate(spec: &Spec) -> Result<()> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    for kind in [
        Kind::Prestart,
        Kind::CreateRuntime,
        Kind::CreateContainer,
        Kind::StartContainer,
        Kind::Poststart,
        Kind::Poststop,
    ] {
        for hook in kind.of(hooks) {
            let path = hook.path();
            if !path.is_absolute() {
                bail!(
                    "hooks.{}: path {} must be absolute",
                    kind.name(),
                    path.display()
                );
            }
            if let Some(t) = hook.timeout() {
                if t <= 0 {
                    bail!(
                        "hooks.{}: {}: timeout {t} must be greater than zero",
                        kind.name(),
                        path.display()
                    );
                }
            }
            if hook.env().iter().flatten().any(|e| !e.contains('=')) {
                bail!(
                    "hooks.{}: {}: env entries must be KEY=VALUE",
                    kind.name(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Runs the `kind` hooks of `spec` in order; the first failure ends the run.
pub fn run(spec: &Spec, kind: Kind, state: &HookState<'_>) -> Result<()> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    let hooks = kind.of(hooks);
    if hooks.is_empty() {
        return Ok(());
    }
    let stdin = serde_json::to_vec(state)?;
    for hook in hooks {
        run_one(hook, kind, &stdin, state.pid)
            .with_context(|| format!("{} hook {}", kind.name(), hook.path().display()))?;
    }
    Ok(())
}

/// Runs the `kind` hooks, where the spec makes a failure only a warning: each failure
/// is printed and the rest still run.
pub fn run_warning(spec: &Spec, kind: Kind, state: &HookState<'_>) {
    let Some(hooks) = spec.hooks() else { return };
    let Ok(stdin) = serde_json::to_vec(state) else {
        return;
    };
    for hook in kind.of(hooks) {
        if let Err(e) = run_one(hook, kind, &stdin, state.pid) {
            eprintln!(
                "vessel-runc: warning: {} hook {}: {e:#}",
                kind.name(),
                hook.path().display()
            );
        }
    }
}

/// An unnamed file for a hook's output: a hook that leaves a background process
/// holding its stdout cannot make the runtime wait, as a pipe would.
fn output_file() -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())
        .context("making a file for the hook's output")
}

fn run_one(hook: &Hook, kind: Kind, stdin: &[u8], pid: libc::pid_t) -> Result<()> {
    let mut command = Command::new(hook.path());
    if let Some((first, rest)) = hook.args().as_deref().and_then(|a| a.split_first()) {
        command.arg0(first).args(rest);
    }
    if let Some(env) = hook.env() {
        command.env_clear();
        for entry in env {
            if let Some((key, value)) = entry.split_once('=') {
                command.env(key, value);
            }
        }
    }
    let mut output = output_file()?;
    command
        .stdin(Stdio::piped())
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?);
    if kind.in_container() {
        container::runtime::in_namespaces_of(pid, &mut command)?;
    }
    let mut child = command.spawn().context("starting it")?;
    if let Some(mut pipe) = child.stdin.take() {
        // A hook that does not read its state may exit first: a broken pipe is fine.
        let _ = pipe.write_all(stdin);
    }
    let timeout = hook.timeout().map(|t| Duration::from_secs(t as u64));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for it")? {
            break status;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "timed out after {} s",
                timeout.unwrap_or_default().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(());
    }
    let mut said = String::new();
    output.rewind()?;
    let _ = output.take(4096).read_to_string(&mut said);
    let said = said.trim();
    if said.is_empty() {
        Err(anyhow!("{status}"))
    } else {
        Err(anyhow!("{status}: {said}"))
    }
}
