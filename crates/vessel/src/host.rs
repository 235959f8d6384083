//! What this host offers, as `vessel doctor` reports it.

use serde::Serialize;

/// The cgroup hierarchy this host mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    V1,
    V2,
    Hybrid,
    None,
}

/// Classifies the host's cgroups from `/proc/self/mountinfo`: v1 controller
/// mounts only, cgroup2 only, or both (systemd's hybrid layout).
pub fn cgroup_mode(mountinfo: &str) -> CgroupMode {
    let mut v1 = false;
    let mut v2 = false;
    for line in mountinfo.lines() {
        // Fields after " - " are: fstype, source, super options.
        let Some((_, after)) = line.split_once(" - ") else {
            continue;
        };
        match after.split_whitespace().next() {
            Some("cgroup") => v1 = true,
            Some("cgroup2") => v2 = true,
            _ => {}
        }
    }
    match (v1, v2) {
        (true, true) => CgroupMode::Hybrid,
        (true, false) => CgroupMode::V1,
        (false, true) => CgroupMode::V2,
        (false, false) => CgroupMode::None,
    }
}

/// Namespace kinds the kernel offers this process (from /proc/self/ns).
pub fn namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/ns")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.ends_with("_for_children"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether /dev/net/tun exists as a character device.
pub fn has_tun() -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata("/dev/net/tun")
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false)
}

/// Everything `vessel doctor` reports.
#[derive(Debug, Serialize)]
pub struct HostReport {
    pub kvm: KvmReport,
    pub hardware_virtualization: bool,
    pub auto_accel: &'static str,
    pub cgroups: CgroupMode,
    pub namespaces: Vec<String>,
    pub tun: bool,
}

#[derive(Debug, Serialize)]
pub struct KvmReport {
    pub device: bool,
    pub usable: bool,
    pub pvm: bool,
}

pub fn report() -> HostReport {
    let kvm = hypervisor::host::kvm_support();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware_virtualization = hypervisor::host::has_hardware_virtualization(&cpuinfo);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    HostReport {
        kvm: KvmReport {
            device: kvm.device,
            usable: kvm.usable,
            pvm: kvm.pvm,
        },
        hardware_virtualization,
        auto_accel: hypervisor::host::auto_accel(kvm, hardware_virtualization).name(),
        cgroups: cgroup_mode(&mountinfo),
        namespaces: namespaces(),
        tun: has_tun(),
    }
}

/// The readable table: one line per item with what it means.
pub fn render_table(r: &HostReport) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut rows: Vec<(String, String, String)> = vec![
        (
            "kvm device".into(),
            yes(r.kvm.device).into(),
            "/dev/kvm exists".into(),
        ),
        (
            "kvm usable".into(),
            yes(r.kvm.usable).into(),
            "a KVM VM can be created by this user".into(),
        ),
        (
            "kvm pvm".into(),
            yes(r.kvm.pvm).into(),
            if r.kvm.pvm {
                "KVM is nested PVM: guest ring 0 is emulated, stock kernels cannot run accelerated"
                    .into()
            } else {
                "KVM is not PVM".into()
            },
        ),
        (
            "hardware virtualization".into(),
            yes(r.hardware_virtualization).into(),
            "the processor shows VT-x (vmx) or AMD-V (svm)".into(),
        ),
        (
            "auto accelerator".into(),
            r.auto_accel.into(),
            if r.auto_accel == "kvm" {
                "VMs run on KVM at native speed".into()
            } else {
                "VMs run on vessel's software vCPU (emu)".into()
            },
        ),
        (
            "cgroups".into(),
            serde_json::to_value(r.cgroups)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            match r.cgroups {
                CgroupMode::V1 => "cgroup v1 controllers only",
                CgroupMode::V2 => "unified cgroup v2 hierarchy",
                CgroupMode::Hybrid => "v1 controllers with an (empty) cgroup2 beside them",
                CgroupMode::None => "no cgroup file system mounted: containers get no limits",
            }
            .into(),
        ),
        (
            "namespaces".into(),
            r.namespaces.join(","),
            "kinds of namespace containers can use".into(),
        ),
        (
            "tun".into(),
            yes(r.tun).into(),
            "/dev/net/tun for VM and container networking".into(),
        ),
    ];
    let width = rows.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
    rows.drain(..)
        .map(|(k, v, why)| format!("{k:<width$}  {v:<value_width$}  {why}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn cgroup_layouts() {
        assert_eq!(cgroup_mode(HYBRID), CgroupMode::Hybrid);
        assert_eq!(
            cgroup_mode("26 25 0:24 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            CgroupMode::V2
        );
        assert_eq!(
            cgroup_mode("27 25 0:25 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"),
            CgroupMode::V1
        );
        assert_eq!(
            cgroup_mode("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            CgroupMode::None
        );
    }

    #[test]
    fn optional_fields_before_the_separator_are_skipped() {
        let line =
            "30 25 0:26 / /sys/fs/cgroup/pids rw shared:9 master:2 - cgroup cgroup rw,pids\n";
        assert_eq!(cgroup_mode(line), CgroupMode::V1);
    }
}
