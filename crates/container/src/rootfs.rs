//! The default container root: a static busybox with its applet links and the few files
//! a shell expects, built once into the data dir.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Where the default root lives under the data dir.
pub fn busybox_root_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("container").join("busybox-root")
}

/// Whether `root` is a finished busybox root (the marker is written last).
pub fn is_busybox_root(root: &Path) -> bool {
    root.join(".vessel-rootfs").is_file() && root.join("bin/busybox").is_file()
}

/// Applet paths `busybox --list-full` prints that are safe to create (relative, no `..`).
fn applet_paths(list: &str) -> Vec<&str> {
    list.lines()
        .map(str::trim)
        .filter(|p| {
            !p.is_empty()
                && !p.starts_with('/')
                && *p != "bin/busybox"
                && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        })
        .collect()
}

/// Builds a busybox root at `dest` from the static binary `busybox` (which must run on
/// this host: its applet list comes from `busybox --list-full`). Built in a temporary
/// directory next to `dest` and renamed into place, so a half-built root is never used.
/// Does nothing if `dest` is already a finished root.
pub fn build_busybox_root(busybox: &Path, dest: &Path) -> Result<()> {
    if is_busybox_root(dest) {
        return Ok(());
    }
    let parent = dest
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{}: no parent directory", dest.display())))?;
    fs::create_dir_all(parent).map_err(|e| Error::path("creating", parent, e))?;
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::path("running", busybox, e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "{} --list-full failed ({}); is it busybox?",
            busybox.display(),
            out.status
        )));
    }
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let applets = applet_paths(&list);
    if !applets.contains(&"bin/sh") {
        return Err(Error::Invalid(format!(
            "{} has no sh applet",
            busybox.display()
        )));
    }

    let tmp = tempdir_in(parent)?;
    let root = tmp.path.clone();
    let mkdir = |rel: &str, mode: u32| {
        let dir = root.join(rel);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(mode)))
            .map_err(|e| Error::path("creating", &dir, e))
    };
    for (rel, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("run", 0o755),
        ("home", 0o755),
    ] {
        mkdir(rel, mode)?;
    }
    let target = root.join("bin/busybox");
    fs::copy(busybox, &target).map_err(|e| Error::path("copying busybox to", &target, e))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::path("chmod", &target, e))?;
    for applet in applets {
        let link = root.join(applet);
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::path("creating", dir, e))?;
        }
        match symlink("/bin/busybox", &link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::path("creating applet link", &link, e)),
        }
    }
    for (rel, contents) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        (".vessel-rootfs", "busybox root built by vessel\n"),
    ] {
        let path = root.join(rel);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(contents.as_bytes()))
            .map_err(|e| Error::path("writing", &path, e))?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::path("chmod", &root, e))?;
    match fs::rename(&root, dest) {
        Ok(()) => {
            tmp.keep();
            Ok(())
        }
        // Someone else finished first: theirs is as good as ours (dropped with `tmp`).
        Err(_) if is_busybox_root(dest) => Ok(()),
        Err(e) => Err(Error::path("moving the new root to", dest, e)),
    }
}

/// A temporary directory removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn tempdir_in(parent: &Path) -> Result<TempDir> {
    for attempt in 0..100u32 {
        let path = parent.join(format!(".rootfs-{}-{attempt}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(TempDir { path, keep: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::path("creating a directory in", parent, e)),
        }
    }
    Err(Error::Invalid(format!(
        "cannot create a temporary directory in {}",
        parent.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_list_is_filtered() {
        let list = "bin/sh\n/abs/x\nusr/bin/../../etc/x\nbin/busybox\nusr/bin/tr\n\n";
        assert_eq!(applet_paths(list), vec!["bin/sh", "usr/bin/tr"]);
    }

    #[test]
    fn not_busybox_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("root");
        assert!(build_busybox_root(Path::new("/bin/false"), &dest).is_err());
        assert!(!dest.exists());
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "temporary directory removed");
    }
}
