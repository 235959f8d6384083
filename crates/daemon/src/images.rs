//! Images: named root filesystems an instance is made from. Each is built
//! once and shared read-only by the instances made from it (their own
//! changes go to their kept upper layers).
//!
//! - `busybox`: a static busybox and its applets (Debian's busybox-static,
//!   verified against Debian's signed index), built into the default
//!   guest's data directory, as `vessel run --container` uses.
//! - `debian/bookworm`: a minimal Debian system with systemd built by
//!   mmdebstrap from Debian's signed packages (apt checks them against the
//!   host's Debian keyring), under the state directory.
//!
//! An image is built in a temporary directory and renamed into place, so a
//! half-built image is never used; builds are serialized.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::{Config, Error, Result};

/// The images the daemon knows.
pub const IMAGES: &[&str] = &["busybox", "debian/bookworm"];

/// One build at a time (two instances of one new image wait for one build).
static BUILDING: Mutex<()> = Mutex::new(());

/// Checks that `name` is a known image.
pub fn check(name: &str) -> Result<()> {
    if IMAGES.contains(&name) {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "unknown image {name:?}: the images are {}",
            IMAGES.join(", ")
        )))
    }
}

/// Where image `name`'s root is (built or not).
fn root_dir(config: &Config, name: &str) -> PathBuf {
    match name {
        "busybox" => container::rootfs::busybox_root_dir(&config.data_dir),
        other => config
            .state_dir
            .join("images")
            .join(other.replace('/', "-"))
            .join("rootfs"),
    }
}

fn is_built(config: &Config, name: &str) -> bool {
    let root = root_dir(config, name);
    match name {
        "busybox" => container::rootfs::is_busybox_root(&root),
        _ => root.join("etc/debian_version").is_file(),
    }
}

/// Every image, and whether it is built.
pub fn list(config: &Config) -> Vec<api::Image> {
    IMAGES
        .iter()
        .map(|name| api::Image {
            name: (*name).to_owned(),
            built: is_built(config, name),
        })
        .collect()
}

/// The root directory of image `name`, built first if it is not.
pub fn root(config: &Config, name: &str) -> Result<PathBuf> {
    build(config, name)?;
    Ok(root_dir(config, name))
}

/// Builds image `name` unless it is built.
pub fn build(config: &Config, name: &str) -> Result<()> {
    check(name)?;
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if is_built(config, name) {
        return Ok(());
    }
    let root = root_dir(config, name);
    match name {
        "busybox" => build_busybox(config, &root),
        _ => build_debian(&root),
    }
}

fn build_busybox(config: &Config, root: &Path) -> Result<()> {
    let busybox = guest::fetch_busybox(&guest::FetchOptions {
        data_dir: config.data_dir.clone(),
        mirror: None,
        keyring: None,
        security_mirror: None,
        progress: false,
    })
    .map_err(|e| Error::Refused(format!("image busybox: fetching busybox: {e}")))?;
    container::rootfs::build_busybox_root(&busybox, root)
        .map_err(|e| Error::Refused(format!("image busybox: building its root: {e}")))
}

fn build_debian(root: &Path) -> Result<()> {
    let fail = |why: String| Error::Refused(format!("image debian/bookworm: {why}"));
    let parent = root
        .parent()
        .ok_or_else(|| fail("no parent directory".into()))?;
    std::fs::create_dir_all(parent).map_err(|e| fail(format!("{}: {e}", parent.display())))?;
    let tmp = parent.join("rootfs.building");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| fail(format!("{}: {e}", tmp.display())))?;
    }
    let mirror = std::env::var("VESSEL_DEBIAN_MIRROR").ok();
    let mut cmd = Command::new("mmdebstrap");
    // systemd and udev: a VM made from the image boots them (a container
    // runs vessel's own init instead and leaves them unused).
    cmd.args([
        "--quiet",
        "--variant=minbase",
        "--include=systemd-sysv,udev",
        "bookworm",
    ])
    .arg(&tmp);
    if let Some(m) = mirror.filter(|m| !m.is_empty()) {
        cmd.arg(m);
    }
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fail("building it needs mmdebstrap (apt-get install mmdebstrap)".into())
        } else {
            fail(format!("running mmdebstrap: {e}"))
        }
    })?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(fail(format!("mmdebstrap failed ({}): {last}", out.status)));
    }
    std::fs::rename(&tmp, root).map_err(|e| fail(format!("{}: {e}", root.display())))
}

/// Whether image `name` can boot as a VM: it has an init system (the
/// default guest's initramfs hands the machine over to `/sbin/init`).
pub fn check_vm(name: &str) -> Result<()> {
    check(name)?;
    if name == "busybox" {
        return Err(Error::Refused(
            "image busybox has no init system to boot as a VM; use --image debian/bookworm".into(),
        ));
    }
    Ok(())
}

/// The directory of image `name`'s VM disks.
fn vm_disk_dir(config: &Config, name: &str) -> PathBuf {
    config.state_dir.join("images").join(name.replace('/', "-"))
}

/// Names the current VM disk of an image (`disk-<build time>.ext4`). Each
/// build gets a file name of its own, so an instance's root disk never
/// finds another build's file system under its backing file's name.
const CURRENT_DISK: &str = "disk.current";

/// Image `name`'s VM disk, if one is built.
fn current_vm_disk(config: &Config, name: &str) -> Option<PathBuf> {
    let dir = vm_disk_dir(config, name);
    let file = std::fs::read_to_string(dir.join(CURRENT_DISK)).ok()?;
    let disk = dir.join(file.trim());
    disk.is_file().then_some(disk)
}

/// Image `name` as a VM's disk: its root made into an ext4 file system
/// (raw, read-only), built from the root once (the root first if need
/// be). Every VM made from the image has it as the read-only backing
/// file of its own copy-on-write root disk.
pub fn vm_disk(config: &Config, name: &str) -> Result<PathBuf> {
    check_vm(name)?;
    let root = root(config, name)?;
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(disk) = current_vm_disk(config, name) {
        return Ok(disk);
    }
    let fail = |why: String| Error::Refused(format!("image {name} as a VM disk: {why}"));
    if !root.join("sbin/init").exists() {
        return Err(fail(format!(
            "{} has no /sbin/init (an image built by an older vessel: `vessel image rm {name}` and build it again)",
            root.display()
        )));
    }
    let dir = vm_disk_dir(config, name);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let file_name = format!("disk-{stamp}.ext4");
    let disk = dir.join(&file_name);
    let used = tree_size(&root).map_err(|e| fail(format!("measuring {}: {e}", root.display())))?;
    // Room for ext4's own structures and the first writes, in whole 64 MiB.
    let size = (used + used / 4 + (256 << 20)).div_ceil(64 << 20) * (64 << 20);
    let tmp = dir.join("disk.building");
    let _ = std::fs::remove_file(&tmp);
    let made = make_ext4(&root, &tmp, size, &dir);
    if let Err(why) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(why));
    }
    // Read-only: the VMs' root disks are written, never their base.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .map_err(|e| fail(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &disk).map_err(|e| fail(format!("{}: {e}", disk.display())))?;
    let pointer = dir.join("disk.current.new");
    std::fs::write(&pointer, &file_name)
        .and_then(|()| std::fs::rename(&pointer, dir.join(CURRENT_DISK)))
        .map_err(|e| fail(format!("recording {file_name}: {e}")))?;
    Ok(disk)
}

/// Makes `disk` (`size` bytes) an ext4 file system holding `root`, plus
/// the VM's own /etc/fstab (written into the file system only: `root` is
/// also the lower layer of containers' roots, which must not change).
fn make_ext4(
    root: &Path,
    disk: &Path,
    size: u64,
    scratch: &Path,
) -> std::result::Result<(), String> {
    std::fs::File::create(disk)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let run = |program: &str, args: &[&std::ffi::OsStr]| -> std::result::Result<String, String> {
        let out = Command::new(program).args(args).output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("making it needs {program} (apt-get install e2fsprogs)")
            } else {
                format!("running {program}: {e}")
            }
        })?;
        if !out.status.success() {
            return Err(format!(
                "{program} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "root".as_ref(),
            "-d".as_ref(),
            root.as_os_str(),
            disk.as_os_str(),
        ],
    )?;
    // The root file system's entry: mounted read-write by the kernel
    // command line already, grown by systemd to a larger disk.
    let fstab = "# vessel: the VM's root disk\n/dev/vda / ext4 rw,x-systemd.growfs 0 1\n";
    let fstab_file = scratch.join("fstab.vm");
    let commands = scratch.join("fstab.debugfs");
    std::fs::write(&fstab_file, fstab).map_err(|e| format!("{}: {e}", fstab_file.display()))?;
    std::fs::write(
        &commands,
        format!("rm /etc/fstab\nwrite {} /etc/fstab\n", fstab_file.display()),
    )
    .map_err(|e| format!("{}: {e}", commands.display()))?;
    let written = run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-f".as_ref(),
            commands.as_os_str(),
            disk.as_os_str(),
        ],
    );
    let _ = std::fs::remove_file(&commands);
    let _ = std::fs::remove_file(&fstab_file);
    written?;
    // debugfs goes on past a failed command: read the file back.
    let back = run(
        "debugfs",
        &["-R".as_ref(), "cat /etc/fstab".as_ref(), disk.as_os_str()],
    )?;
    if back != fstab {
        return Err(format!(
            "writing /etc/fstab into the disk: it reads back as {back:?}"
        ));
    }
    Ok(())
}

/// The bytes of the regular files under `dir` (not following links).
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += tree_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Removes image `name`'s root (and its VM disk), unless `in_use` (asked
/// under the lock every image lookup takes) says why not; it is built
/// again when next used.
pub fn remove_unless(
    config: &Config,
    name: &str,
    in_use: impl FnOnce() -> Option<String>,
) -> Result<()> {
    check(name)?;
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = in_use() {
        return Err(Error::Refused(why));
    }
    let root = root_dir(config, name);
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .map_err(|e| Error::Refused(format!("removing image {name}: {e}")))?;
    }
    let dir = vm_disk_dir(config, name);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.starts_with("disk") {
                std::fs::remove_file(entry.path()).map_err(|e| {
                    Error::Refused(format!("removing image {name}'s VM disk {file_name}: {e}"))
                })?;
            }
        }
    }
    Ok(())
}
