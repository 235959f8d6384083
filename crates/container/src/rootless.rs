//! The user namespace of a container an unprivileged user runs: the user becomes the
//! container's root. With subordinate ids for the user in /etc/subuid and /etc/subgid
//! and the setuid helpers newuidmap and newgidmap (as Podman uses them), ids 1 and up
//! map to that range too; otherwise the user's own ids are all there is.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// The first subordinate range of `name` or `id` in a subuid/subgid file's text.
fn subordinate_range(text: &str, name: &str, id: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let start = fields.next()?.parse().ok()?;
        let count = fields.next()?.parse().ok()?;
        (owner == name || owner == id.to_string()).then_some((start, count))
    })
}

/// This process's user name, from /etc/passwd.
fn user_name(uid: u32) -> String {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _ = f.next()?;
            (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
        })
        .unwrap_or_default()
}

/// Maps `pid`'s new user namespace: id 0 to this process's id, and 1.. to the user's
/// subordinate range where there is one and the helper to write it.
pub(crate) fn map_ids(pid: libc::pid_t) -> Result<()> {
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let name = user_name(uid);
    for (kind, own, file, helper) in [
        ("uid", uid, "/etc/subuid", "newuidmap"),
        ("gid", gid, "/etc/subgid", "newgidmap"),
    ] {
        let range = fs::read_to_string(file)
            .ok()
            .and_then(|text| subordinate_range(&text, &name, uid));
        let helper_path = ["/usr/bin", "/bin", "/usr/sbin"]
            .iter()
            .map(|d| Path::new(d).join(helper))
            .find(|p| p.exists());
        if let (Some((start, count)), Some(helper_path)) = (range, helper_path) {
            let out = Command::new(&helper_path)
                .args([
                    pid.to_string(),
                    "0".into(),
                    own.to_string(),
                    "1".into(),
                    "1".into(),
                    start.to_string(),
                    count.to_string(),
                ])
                .output()
                .map_err(|e| Error::io(format!("running {}", helper_path.display()), e))?;
            if !out.status.success() {
                return Err(Error::Invalid(format!(
                    "{helper} {pid}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            continue;
        }
        // Without the helper a process may map only its own id, and only after giving
        // up setgroups for the namespace.
        if kind == "gid" {
            let setgroups = format!("/proc/{pid}/setgroups");
            fs::write(&setgroups, "deny")
                .map_err(|e| Error::io(format!("writing {setgroups}"), e))?;
        }
        let map = format!("/proc/{pid}/{kind}_map");
        fs::write(&map, format!("0 {own} 1\n"))
            .map_err(|e| Error::io(format!("writing {map}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::subordinate_range;

    #[test]
    fn subordinate_ranges_by_name_or_id() {
        let text = "alice:100000:65536\n1001:200000:1000\nbad line\n";
        assert_eq!(
            subordinate_range(text, "alice", 1000),
            Some((100000, 65536))
        );
        assert_eq!(subordinate_range(text, "bob", 1001), Some((200000, 1000)));
        assert_eq!(subordinate_range(text, "carol", 1002), None);
    }
}
