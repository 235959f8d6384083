//! Images: named root filesystems an instance is made from. Each is built
//! once and shared read-only by the instances made from it (their own
//! changes go to their kept upper layers).
//!
//! - `busybox`: a static busybox and its applets (Debian's busybox-static,
//!   verified against Debian's signed index), built into the default
//!   guest's data directory, as `vessel run --container` uses.
//! - `debian/bookworm`: a minimal Debian system built by mmdebstrap from
//!   Debian's signed packages (apt checks them against the host's Debian
//!   keyring), under the state directory.
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
    cmd.args(["--quiet", "--variant=minbase", "bookworm"])
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

/// Removes image `name`'s root; it is built again when next used.
pub fn remove(config: &Config, name: &str) -> Result<()> {
    check(name)?;
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let root = root_dir(config, name);
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .map_err(|e| Error::Refused(format!("removing image {name}: {e}")))?;
    }
    Ok(())
}
