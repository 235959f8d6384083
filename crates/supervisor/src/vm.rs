//! VM instances: the supervisor runs the VM's own VMM process (`vessel
//! run`, on the instance's copy-on-write root disk), in the instance's
//! cgroups, with its serial console as the console log. A graceful stop is
//! SIGTERM to the VMM, which presses the machine's ACPI power button; exec
//! reaches the guest agent over the VM's vsock socket.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{io_err, sys, Error, Layout, Result};

/// What a VM instance boots, as the daemon resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The guest kernel and initramfs (the default guest's: its init
    /// mounts the root disk and starts the agent).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The image's ext4 disk (raw), the read-only backing file of the
    /// instance's root disk.
    pub base: PathBuf,
    /// The root disk's size in bytes (at least the base's).
    pub disk_size: u64,
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// `auto`, `kvm` or `emu`.
    pub accel: String,
}

/// How long exec waits for the guest agent to answer (a VM that was just
/// started is still booting).
const AGENT_WAIT: Duration = Duration::from_secs(180);

impl Layout {
    /// A VM's root disk: qcow2 over its image's base, kept across starts.
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    /// The host side of a VM's vsock device.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
}

/// Makes the root disk unless it exists: a qcow2 image whose backing file
/// is the base, so the instance's writes stay its own.
fn ensure_root_disk(layout: &Layout, vm: &VmSpec) -> Result<()> {
    let path = layout.root_disk();
    if path.exists() {
        return Ok(());
    }
    let base_size = fs::metadata(&vm.base)
        .map_err(io_err(format!("reading {}", vm.base.display())))?
        .len();
    // Whole MiB: qcow2 sizes are multiples of 512, the base's may not be.
    let size = vm.disk_size.max(base_size).div_ceil(1 << 20) << 20;
    let backing = disk::qcow2::NewBacking {
        name: vm.base.to_string_lossy().into_owned(),
        format: "raw".into(),
    };
    let partial = layout.dir.join("root.qcow2.new");
    // Left by a supervisor killed mid-create (the instance's lock is ours).
    let _ = fs::remove_file(&partial);
    disk::qcow2::create(&partial, size, Some(&backing))
        .map_err(|e| Error::Invalid(format!("making the root disk: {e}")))?;
    fs::rename(&partial, &path).map_err(io_err(format!("renaming {}", partial.display())))
}

/// The guest's kernel command line: the serial console, the root disk,
/// the instance's name as its hostname.
fn cmdline(name: &str) -> String {
    format!("console=ttyS0 panic=-1 tsc=reliable root=/dev/vda rw systemd.hostname={name}")
}

/// Starts the VMM in `cgroups`, its console output (stdout and stderr)
/// going to `console`. The VMM's pid, and the write end of its serial
/// console's input (its stdin).
pub(crate) fn start(
    layout: &Layout,
    name: &str,
    vm: &VmSpec,
    cgroups: &container::runtime::CgroupPaths,
    console: &OwnedFd,
) -> Result<(i32, OwnedFd)> {
    ensure_root_disk(layout, vm)?;
    let _ = fs::remove_file(layout.vsock());
    let memory_mib = vm.memory.div_ceil(1 << 20);
    let (input_read, input_write) = sys::pipe().map_err(io_err("making the console input pipe"))?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("run")
        .arg("--accel")
        .arg(&vm.accel)
        .arg("--cpus")
        .arg(vm.cpus.to_string())
        .arg("--memory")
        .arg(format!("{memory_mib}M"))
        .arg("--kernel")
        .arg(&vm.kernel)
        .arg("--initrd")
        .arg(&vm.initrd)
        .arg("--cmdline")
        .arg(cmdline(name))
        .arg("--disk")
        .arg(format!("{},format=qcow2", layout.root_disk().display()))
        .arg("--vsock")
        .arg(layout.vsock())
        .arg("--rng")
        .arg("--on-sigterm")
        .arg("power-button")
        .stdin(Stdio::from(input_read))
        .stdout(Stdio::from(
            console.try_clone().map_err(io_err("the console pipe"))?,
        ))
        .stderr(Stdio::from(
            console.try_clone().map_err(io_err("the console pipe"))?,
        ));
    // In the instance's cgroups from its first instruction: everything it
    // allocates (guest memory first) is charged there.
    let procs = cgroups
        .groups
        .iter()
        .map(|dir| CString::new(dir.join("cgroup.procs").into_os_string().into_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::Invalid("a cgroup path with a NUL byte".into()))?;
    sys::confine_before_exec(&mut command, procs);
    let child = command.spawn().map_err(io_err(
        "starting the VMM (vessel run) in the instance's cgroups",
    ))?;
    let pid = child.id() as i32;
    // Not waited for here: the main thread reaps every child.
    drop(child);
    Ok((pid, input_write))
}

/// Serves an exec on `conn` (its reply already sent): connects to the
/// guest agent through the vsock socket, waiting while the guest boots,
/// and relays bytes both ways until either side closes. A failure is
/// reported on `conn` as an agent error frame.
pub(crate) fn exec(layout: &Layout, conn: UnixStream, ended: impl Fn() -> bool) {
    let agent = match connect_agent(&layout.vsock(), ended) {
        Ok(agent) => agent,
        Err(why) => {
            let frame = vessel_agent::Frame::Error(why);
            let _ = frame.write(&mut &conn);
            return;
        }
    };
    relay(conn, agent);
}

/// A connection to the guest agent: Firecracker's `CONNECT <port>`, which
/// the device answers with `OK <host port>`, or by closing the socket
/// while nothing in the guest listens on the port yet.
fn connect_agent(path: &Path, ended: impl Fn() -> bool) -> std::result::Result<UnixStream, String> {
    let deadline = Instant::now() + AGENT_WAIT;
    let mut last = String::from("the VM has no vsock socket yet");
    while Instant::now() < deadline {
        if ended() {
            return Err("the VM stopped".into());
        }
        match try_connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!(
        "the guest agent did not answer within {} s ({last}); is the VM still booting?",
        AGENT_WAIT.as_secs()
    ))
}

fn try_connect(path: &Path) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "CONNECT {}", vessel_agent::AGENT_PORT)?;
    // One line, read byte by byte: what follows is the agent's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if (&stream).read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "nothing listens on the agent's port yet",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "the vsock device answered {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Copies bytes both ways; each direction's end is passed on as a
/// half-close, and the relay ends when both directions have.
fn relay(client: UnixStream, agent: UnixStream) {
    let (Ok(client2), Ok(agent2)) = (client.try_clone(), agent.try_clone()) else {
        return;
    };
    let upstream = std::thread::Builder::new()
        .name("exec-in".into())
        .spawn(move || copy_then_close(client2, agent2));
    copy_then_close(agent, client);
    if let Ok(thread) = upstream {
        let _ = thread.join();
    }
}

fn copy_then_close(from: UnixStream, to: UnixStream) {
    let mut reader = BufReader::with_capacity(64 << 10, &from);
    let mut writer = &to;
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let n = chunk.len();
        if writer.write_all(chunk).is_err() {
            break;
        }
        reader.consume(n);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}
