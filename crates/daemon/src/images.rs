//! Images: named root filesystems an instance is made from. Each is built
//! once into the data directory and shared read-only by the instances
//! made from it (their own changes go to their kept upper layers).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The images the daemon knows.
pub const IMAGES: &[&str] = &["busybox"];

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

/// The root directory of image `name`, built (and downloaded) on first use.
pub fn root(data_dir: &Path, name: &str) -> Result<PathBuf> {
    check(name)?;
    let root = container::rootfs::busybox_root_dir(data_dir);
    if container::rootfs::is_busybox_root(&root) {
        return Ok(root);
    }
    let busybox = guest::fetch_busybox(&guest::FetchOptions {
        data_dir: data_dir.to_owned(),
        mirror: None,
        keyring: None,
        security_mirror: None,
        progress: false,
    })
    .map_err(|e| Error::Refused(format!("image busybox: fetching busybox: {e}")))?;
    container::rootfs::build_busybox_root(&busybox, &root)
        .map_err(|e| Error::Refused(format!("image busybox: building its root: {e}")))?;
    Ok(root)
}
