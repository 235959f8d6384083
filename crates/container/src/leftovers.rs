//! What a runtime killed by SIGKILL leaves behind, found and removed by the next one: a
//! state directory whose lock no live process holds, and the cgroups it names.
//!
//! A live owner holds an exclusive `flock` on a lock file in its directory for its
//! whole life; the kernel drops it when the owner dies, however it dies. So a lock that
//! can be taken marks a directory as left behind, with no guessing from pids.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::cgroup;

/// Takes an exclusive lock on `path` (created if missing) without waiting: `None` while
/// another process holds it. The lock lasts as long as the returned file.
pub fn try_lock(path: &Path) -> io::Result<Option<fs::File>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // SAFETY: flock on a descriptor we own; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The name of the lock file in a state directory.
pub const LOCK_FILE: &str = "owner.lock";

/// How old a state directory without a lock file must be to count as left behind (its
/// creator may be between making it and locking it).
const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// Whether the state directory `dir` was left behind by a process that died: it has
/// a lock file and its lock can be taken. The lock is held, through the returned
/// file, while the caller removes the directory. A directory without a lock file is
/// never taken for one.
pub fn abandoned(dir: &Path) -> Option<fs::File> {
    let lock = dir.join(LOCK_FILE);
    if !lock.is_file() {
        return None;
    }
    try_lock(&lock).ok().flatten()
}

/// Whether a run's state directory without a lock file (its creator died between
/// making it and locking it) is old enough to be taken for a dead one's.
fn unlocked_and_old(dir: &Path) -> bool {
    !dir.join(LOCK_FILE).exists()
        && fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > UNLOCKED_GRACE)
}

/// Whether something is mounted at or below `dir` in this mount namespace: deleting
/// through a mount could reach a root's files.
pub(crate) fn has_mounts_below(dir: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(mp).starts_with(dir))
}

/// Removes the state directories under `root` of `vessel run --container` runs whose
/// process died (each named by its 12-hex-digit id, with an overlay's directories),
/// and their cgroups.
pub(crate) fn sweep_runs(root: &Path) {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = entry.path();
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let is_run = id.len() == crate::ID_LEN
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && dir.join("upper").is_dir();
        if !is_run {
            continue;
        }
        let _held = match abandoned(&dir) {
            Some(held) => Some(held),
            None if unlocked_and_old(&dir) => None,
            None => continue,
        };
        tracing::info!("removing {}, left by a run that died", dir.display());
        cgroup::remove_own_children(&format!("vessel-{id}"));
        if has_mounts_below(&dir) {
            tracing::warn!("not removing {}: something is mounted in it", dir.display());
            continue;
        }
        if let Err(e) = crate::run::remove_state_dir(&dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Removes the groups an OCI container with `cgroups_path` would have in every
/// hierarchy, for a create that died half-way. Only groups that empty go (the dead
/// create's child exits on its own as soon as it sees its creator gone, so this
/// waits up to a second for that); one that keeps processes or groups is not a
/// dead create's and stays.
pub fn remove_groups_at(cgroups_path: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    for dir in cgroup::dirs_at(cgroups_path) {
        loop {
            match fs::remove_dir(&dir) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::debug!("leaving {}: {e}", dir.display());
                    break;
                }
                Ok(()) => break,
            }
        }
    }
}
