//! The user namespace of a container an unprivileged user runs: the user becomes the
//! container's root. With subordinate ids for the user in /etc/subuid and /etc/subgid
//! and the setuid helpers newuidmap and newgidmap (as Podman uses them), ids 1 and up
//! map to that range too; otherwise the user's own ids are all there is.

use crate::error::Result;
use crate::runtime::{write_id_maps, IdMapping};
use std::fs;
use std::path::Path;

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
    let mappings = |own: u32, file: &str, helper: &str| {
        let mut list = vec![IdMapping {
            container_id: 0,
            host_id: own,
            size: 1,
        }];
        let range = fs::read_to_string(file)
            .ok()
            .and_then(|text| subordinate_range(&text, &name, uid));
        let has_helper = ["/usr/bin", "/bin", "/usr/sbin"]
            .iter()
            .any(|d| Path::new(d).join(helper).exists());
        if let (Some((start, count)), true) = (range, has_helper) {
            list.push(IdMapping {
                container_id: 1,
                host_id: start,
                size: count,
            });
        }
        list
    };
    write_id_maps(
        pid,
        &mappings(uid, "/etc/subuid", "newuidmap"),
        &mappings(gid, "/etc/subgid", "newgidmap"),
    )
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
