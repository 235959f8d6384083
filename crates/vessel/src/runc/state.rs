//! A container's saved state (`<root>/<id>/state.json`) and its live status.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use container::runtime::CgroupPaths;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    /// Running, but frozen by `pause`.
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub pid: libc::pid_t,
    /// The init's start time (field 22 of /proc/PID/stat), so a reused pid is not taken
    /// for the container.
    pub start_time: u64,
    pub bundle: String,
    pub rootfs: String,
    pub created: String,
    pub annotations: HashMap<String, String>,
    pub cgroups: Vec<PathBuf>,
    pub cgroup_parents: Vec<PathBuf>,
    /// Groups that existed before the container (never removed).
    #[serde(default)]
    pub cgroup_joined: Vec<PathBuf>,
    /// `<root>/<id>`, where state.json and the exec FIFO are.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The runtime spec version this runtime implements, as its state reports it.
pub const OCI_VERSION: &str = "1.0.2";

/// What `state` and `list` print (runc's fields).
#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: libc::pid_t,
    pub status: String,
    pub bundle: String,
    pub rootfs: String,
    pub created: String,
    pub owner: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// Field 22 (starttime) and field 3 (state) of /proc/PID/stat.
fn proc_stat(pid: libc::pid_t) -> Option<(u64, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// RFC 3339 UTC time with nanoseconds, as runc prints.
pub fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

impl State {
    pub fn new(
        root: &Path,
        id: &str,
        pid: libc::pid_t,
        bundle: &Path,
        rootfs: &Path,
        annotations: HashMap<String, String>,
        cgroups: CgroupPaths,
    ) -> State {
        State {
            id: id.to_owned(),
            pid,
            start_time: proc_stat(pid).map_or(0, |(t, _)| t),
            bundle: bundle.to_string_lossy().into_owned(),
            rootfs: rootfs.to_string_lossy().into_owned(),
            created: now_rfc3339(),
            annotations,
            cgroups: cgroups.groups,
            cgroup_parents: cgroups.parents,
            cgroup_joined: cgroups.joined,
            dir: root.join(id),
        }
    }

    pub fn cgroups(&self) -> CgroupPaths {
        CgroupPaths {
            groups: self.cgroups.clone(),
            parents: self.cgroup_parents.clone(),
            joined: self.cgroup_joined.clone(),
        }
    }

    /// Writes state.json atomically: a temporary file renamed over it.
    pub fn save(&self, root: &Path) -> Result<()> {
        let dir = root.join(&self.id);
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join("state.json");
        fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn load(root: &Path, id: &str) -> Result<State> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            bail!("invalid container id {id:?}");
        }
        let path = root.join(id).join("state.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id} does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut state: State = serde_json::from_str(&text)
            .with_context(|| format!("{}: corrupt state", path.display()))?;
        state.dir = root.join(id);
        Ok(state)
    }

    pub fn load_all(root: &Path) -> Vec<State> {
        let mut out: Vec<State> = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| State::load(root, &e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Whether the init is alive (a zombie counts as stopped): same pid, same start time.
    fn alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((start, state)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    pub fn status(&self) -> Status {
        if !self.alive() {
            Status::Stopped
        } else if self.dir.join("exec.fifo").exists() {
            Status::Created
        } else if self.cgroups().is_frozen() {
            Status::Paused
        } else {
            Status::Running
        }
    }

    pub fn wait_gone(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn report(&self) -> Report {
        let status = self.status();
        Report {
            oci_version: OCI_VERSION.into(),
            id: self.id.clone(),
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            status: status.to_string(),
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            owner: String::new(),
            annotations: self.annotations.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 30, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T');
    }
}
