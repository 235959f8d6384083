//! The cgroup settings of an OCI `linux.resources` beyond [`crate::Limits`]' own: each
//! knows its controller and the file it is written to on cgroup v1 and v2, following
//! runc's choices (which file, which conversion, what is an error and what is skipped).
//!
//! Every value arrives from a config file, so each is checked before it becomes part
//! of a file name or a line written to the kernel.

use std::path::Path;

use crate::error::{Error, Result};

/// Which of blkio's four throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    ReadBps,
    WriteBps,
    ReadIops,
    WriteIops,
}

/// One cgroup setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    CpusetCpus(String),
    CpusetMems(String),
    CpuIdle(i64),
    CpuRealtimeRuntime(i64),
    CpuRealtimePeriod(u64),
    /// The soft limit (v1) or protected amount (v2), in bytes.
    MemoryReservation(i64),
    /// Memory plus swap in bytes, as v1's memsw (-1: unlimited); the memory limit is
    /// kept beside it because v2's `memory.swap.max` counts swap alone.
    MemorySwap {
        total: i64,
        memory: Option<i64>,
    },
    MemorySwappiness(u64),
    DisableOomKiller,
    BlkioWeight(u16),
    BlkioLeafWeight(u16),
    BlkioWeightDevice {
        major: i64,
        minor: i64,
        weight: u16,
    },
    BlkioLeafWeightDevice {
        major: i64,
        minor: i64,
        weight: u16,
    },
    BlkioThrottle {
        throttle: Throttle,
        major: i64,
        minor: i64,
        rate: u64,
    },
    NetClsClassid(u32),
    NetPrio {
        interface: String,
        priority: u32,
    },
    /// A limit for one huge page size (`2MB`, `1GB`), in bytes.
    Hugetlb {
        page_size: String,
        limit: i64,
    },
}

/// A file to write in a group and the value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Write {
    pub file: String,
    pub value: String,
}

fn write(file: impl Into<String>, value: impl ToString) -> Option<Write> {
    Some(Write {
        file: file.into(),
        value: value.to_string(),
    })
}

impl Setting {
    /// The controller whose group the setting is written to.
    pub fn controller(&self) -> &'static str {
        match self {
            Setting::CpusetCpus(_) | Setting::CpusetMems(_) => "cpuset",
            Setting::CpuIdle(_)
            | Setting::CpuRealtimeRuntime(_)
            | Setting::CpuRealtimePeriod(_) => "cpu",
            Setting::MemoryReservation(_)
            | Setting::MemorySwap { .. }
            | Setting::MemorySwappiness(_)
            | Setting::DisableOomKiller => "memory",
            Setting::BlkioWeight(_)
            | Setting::BlkioLeafWeight(_)
            | Setting::BlkioWeightDevice { .. }
            | Setting::BlkioLeafWeightDevice { .. }
            | Setting::BlkioThrottle { .. } => "blkio",
            Setting::NetClsClassid(_) => "net_cls",
            Setting::NetPrio { .. } => "net_prio",
            Setting::Hugetlb { .. } => "hugetlb",
        }
    }

    /// The config field it came from, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            Setting::CpusetCpus(_) => "linux.resources.cpu.cpus",
            Setting::CpusetMems(_) => "linux.resources.cpu.mems",
            Setting::CpuIdle(_) => "linux.resources.cpu.idle",
            Setting::CpuRealtimeRuntime(_) => "linux.resources.cpu.realtimeRuntime",
            Setting::CpuRealtimePeriod(_) => "linux.resources.cpu.realtimePeriod",
            Setting::MemoryReservation(_) => "linux.resources.memory.reservation",
            Setting::MemorySwap { .. } => "linux.resources.memory.swap",
            Setting::MemorySwappiness(_) => "linux.resources.memory.swappiness",
            Setting::DisableOomKiller => "linux.resources.memory.disableOOMKiller",
            Setting::BlkioWeight(_) => "linux.resources.blockIO.weight",
            Setting::BlkioLeafWeight(_) => "linux.resources.blockIO.leafWeight",
            Setting::BlkioWeightDevice { .. } | Setting::BlkioLeafWeightDevice { .. } => {
                "linux.resources.blockIO.weightDevice"
            }
            Setting::BlkioThrottle { throttle, .. } => match throttle {
                Throttle::ReadBps => "linux.resources.blockIO.throttleReadBpsDevice",
                Throttle::WriteBps => "linux.resources.blockIO.throttleWriteBpsDevice",
                Throttle::ReadIops => "linux.resources.blockIO.throttleReadIOPSDevice",
                Throttle::WriteIops => "linux.resources.blockIO.throttleWriteIOPSDevice",
            },
            Setting::NetClsClassid(_) => "linux.resources.network.classID",
            Setting::NetPrio { .. } => "linux.resources.network.priorities",
            Setting::Hugetlb { .. } => "linux.resources.hugepageLimits",
        }
    }

    /// Checks what the kernel would otherwise see unchecked: strings that become part
    /// of a file name or of a line.
    pub fn validate(&self) -> Result<()> {
        let problem = match self {
            Setting::CpusetCpus(list) | Setting::CpusetMems(list) => (!list
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b',' || b == b'-'))
            .then(|| format!("{list:?} is not a list like 0-3,6")),
            Setting::NetPrio { interface, .. } => (interface.is_empty()
                || interface.len() > 15
                || interface
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b == b'/'))
            .then(|| format!("{interface:?} is not an interface name")),
            Setting::Hugetlb { page_size, .. } => {
                let digits = page_size.trim_end_matches(['K', 'M', 'G', 'B']);
                (digits.is_empty()
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || !page_size.ends_with('B'))
                .then(|| format!("{page_size:?} is not a page size like 2MB"))
            }
            Setting::BlkioWeightDevice { major, minor, .. }
            | Setting::BlkioLeafWeightDevice { major, minor, .. }
            | Setting::BlkioThrottle { major, minor, .. } => (*major < 0 || *minor < 0)
                .then(|| format!("device {major}:{minor} is not a device number")),
            _ => None,
        };
        match problem {
            Some(what) => Err(Error::Invalid(format!("{}: {what}", self.field()))),
            None => Ok(()),
        }
    }

    /// What to write in `dir`, a group of a v1 (`v2` false) or v2 hierarchy. `None`:
    /// nothing on this version, where runc skips the setting too; an error where runc
    /// fails.
    pub(crate) fn write_for(&self, dir: &Path, v2: bool) -> Result<Option<Write>> {
        let unsupported = || {
            Err(Error::Invalid(format!(
                "{}: cgroup v2 has no equivalent",
                self.field()
            )))
        };
        // BFQ's file where the kernel has BFQ's, else the generic one (as runc picks).
        let pick = |bfq: &str, plain: &str| {
            if dir.join(bfq).exists() {
                bfq.to_owned()
            } else {
                plain.to_owned()
            }
        };
        Ok(match (self, v2) {
            (Setting::CpusetCpus(list), _) => write("cpuset.cpus", list),
            (Setting::CpusetMems(list), _) => write("cpuset.mems", list),
            (Setting::CpuIdle(idle), _) => write("cpu.idle", idle),
            (Setting::CpuRealtimeRuntime(us), false) => write("cpu.rt_runtime_us", us),
            (Setting::CpuRealtimePeriod(us), false) => write("cpu.rt_period_us", us),
            (Setting::CpuRealtimeRuntime(_) | Setting::CpuRealtimePeriod(_), true) => {
                return unsupported()
            }
            (Setting::MemoryReservation(bytes), false) => {
                write("memory.soft_limit_in_bytes", bytes)
            }
            (Setting::MemoryReservation(bytes), true) => write("memory.low", max_or(*bytes)),
            (Setting::MemorySwap { total, .. }, false) => {
                write("memory.memsw.limit_in_bytes", total)
            }
            (Setting::MemorySwap { total, memory }, true) => {
                let swap = match (total, memory) {
                    (-1, _) => "max".to_owned(),
                    (total, Some(memory)) if *memory > 0 => {
                        if total < memory {
                            return Err(Error::Invalid(format!(
                                "{}: {total} is less than the memory limit {memory}",
                                self.field()
                            )));
                        }
                        (total - memory).to_string()
                    }
                    _ => {
                        return Err(Error::Invalid(format!(
                            "{}: on cgroup v2 it needs a memory limit",
                            self.field()
                        )))
                    }
                };
                write("memory.swap.max", swap)
            }
            (Setting::MemorySwappiness(value), false) => {
                if *value > 100 {
                    return Err(Error::Invalid(format!(
                        "{}: {value} is over 100",
                        self.field()
                    )));
                }
                write("memory.swappiness", value)
            }
            (Setting::DisableOomKiller, false) => write("memory.oom_control", 1),
            (Setting::MemorySwappiness(_) | Setting::DisableOomKiller, true) => None,
            (Setting::BlkioWeight(weight), false) => {
                write(pick("blkio.bfq.weight", "blkio.weight"), weight)
            }
            (Setting::BlkioWeight(weight), true) => {
                if dir.join("io.bfq.weight").exists() {
                    write("io.bfq.weight", weight)
                } else {
                    write("io.weight", blkio_weight_to_io_weight(*weight))
                }
            }
            (Setting::BlkioLeafWeight(weight), false) => write("blkio.leaf_weight", weight),
            (
                Setting::BlkioWeightDevice {
                    major,
                    minor,
                    weight,
                },
                false,
            ) => write(
                pick("blkio.bfq.weight_device", "blkio.weight_device"),
                format!("{major}:{minor} {weight}"),
            ),
            (
                Setting::BlkioWeightDevice {
                    major,
                    minor,
                    weight,
                },
                true,
            ) => write("io.bfq.weight", format!("{major}:{minor} {weight}")),
            (
                Setting::BlkioLeafWeightDevice {
                    major,
                    minor,
                    weight,
                },
                false,
            ) => write(
                "blkio.leaf_weight_device",
                format!("{major}:{minor} {weight}"),
            ),
            (Setting::BlkioLeafWeight(_) | Setting::BlkioLeafWeightDevice { .. }, true) => None,
            (
                Setting::BlkioThrottle {
                    throttle,
                    major,
                    minor,
                    rate,
                },
                false,
            ) => {
                let file = match throttle {
                    Throttle::ReadBps => "blkio.throttle.read_bps_device",
                    Throttle::WriteBps => "blkio.throttle.write_bps_device",
                    Throttle::ReadIops => "blkio.throttle.read_iops_device",
                    Throttle::WriteIops => "blkio.throttle.write_iops_device",
                };
                write(file, format!("{major}:{minor} {rate}"))
            }
            (
                Setting::BlkioThrottle {
                    throttle,
                    major,
                    minor,
                    rate,
                },
                true,
            ) => {
                let key = match throttle {
                    Throttle::ReadBps => "rbps",
                    Throttle::WriteBps => "wbps",
                    Throttle::ReadIops => "riops",
                    Throttle::WriteIops => "wiops",
                };
                write("io.max", format!("{major}:{minor} {key}={rate}"))
            }
            (Setting::NetClsClassid(id), false) => write("net_cls.classid", id),
            (
                Setting::NetPrio {
                    interface,
                    priority,
                },
                false,
            ) => write("net_prio.ifpriomap", format!("{interface} {priority}")),
            (Setting::NetClsClassid(_) | Setting::NetPrio { .. }, true) => return unsupported(),
            (Setting::Hugetlb { page_size, limit }, false) => {
                write(format!("hugetlb.{page_size}.limit_in_bytes"), limit)
            }
            (Setting::Hugetlb { page_size, limit }, true) => {
                write(format!("hugetlb.{page_size}.max"), max_or(*limit))
            }
        })
    }
}

/// `max` for a negative (unlimited) value, as v2's files take it.
fn max_or(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

/// blkio's weight (10 to 1000) as v2's io.weight (1 to 10000), by runc's conversion.
fn blkio_weight_to_io_weight(weight: u16) -> u64 {
    let weight = u64::from(weight.clamp(10, 1000));
    1 + (weight - 10) * 9999 / 990
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(setting: &Setting, v2: bool) -> Option<(String, String)> {
        let dir = tempfile::tempdir().unwrap();
        setting
            .write_for(dir.path(), v2)
            .unwrap()
            .map(|w| (w.file, w.value))
    }

    #[test]
    fn files_on_each_version() {
        let swap = Setting::MemorySwap {
            total: 3 << 20,
            memory: Some(1 << 20),
        };
        assert_eq!(
            on(&swap, false),
            Some(("memory.memsw.limit_in_bytes".into(), "3145728".into()))
        );
        assert_eq!(
            on(&swap, true),
            Some(("memory.swap.max".into(), "2097152".into()))
        );
        let hugetlb = Setting::Hugetlb {
            page_size: "2MB".into(),
            limit: -1,
        };
        assert_eq!(on(&hugetlb, true).unwrap().1, "max");
        assert_eq!(on(&hugetlb, false).unwrap().0, "hugetlb.2MB.limit_in_bytes");
        assert_eq!(on(&Setting::DisableOomKiller, true), None);
        assert_eq!(
            on(&Setting::BlkioWeight(10), true),
            Some(("io.weight".into(), "1".into()))
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(Setting::NetClsClassid(1)
            .write_for(dir.path(), true)
            .is_err());
        let throttle = Setting::BlkioThrottle {
            throttle: Throttle::WriteIops,
            major: 254,
            minor: 0,
            rate: 100,
        };
        assert_eq!(
            on(&throttle, true),
            Some(("io.max".into(), "254:0 wiops=100".into()))
        );
    }

    #[test]
    fn strings_from_the_config_are_checked() {
        assert!(Setting::CpusetCpus("0-1,3".into()).validate().is_ok());
        assert!(Setting::CpusetCpus("0\n1".into()).validate().is_err());
        let page = |s: &str| Setting::Hugetlb {
            page_size: s.into(),
            limit: 1,
        };
        assert!(page("2MB").validate().is_ok());
        assert!(page("../x").validate().is_err());
        assert!(page("MB").validate().is_err());
        let prio = |s: &str| Setting::NetPrio {
            interface: s.into(),
            priority: 1,
        };
        assert!(prio("eth0").validate().is_ok());
        assert!(prio("eth0 5\nlo").validate().is_err());
        assert!(Setting::BlkioWeightDevice {
            major: -1,
            minor: 0,
            weight: 1
        }
        .validate()
        .is_err());
    }
}

/// One device cgroup rule (`linux.resources.devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    /// `a`, `c` or `b`.
    pub kind: char,
    /// `None`: any.
    pub major: Option<i64>,
    pub minor: Option<i64>,
    /// A subset of `rwm`.
    pub access: String,
}

impl DeviceRule {
    /// The rule as v1's devices.allow and devices.deny take it (`c 1:3 rwm`), checked.
    pub fn line(&self) -> Result<String> {
        let bad = |what: String| Err(Error::Invalid(format!("linux.resources.devices: {what}")));
        if !matches!(self.kind, 'a' | 'c' | 'b') {
            return bad(format!("type {:?} is not a, c or b", self.kind));
        }
        if self.access.is_empty() || !self.access.chars().all(|c| "rwm".contains(c)) {
            return bad(format!(
                "access {:?} is not made of r, w and m",
                self.access
            ));
        }
        let number = |n: Option<i64>| match n {
            None | Some(-1) => Ok("*".to_owned()),
            Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => Ok(n.to_string()),
            Some(n) => Err(n),
        };
        let (major, minor) = match (number(self.major), number(self.minor)) {
            (Ok(major), Ok(minor)) => (major, minor),
            (Err(n), _) | (_, Err(n)) => return bad(format!("device number {n} is out of range")),
        };
        Ok(format!("{} {major}:{minor} {}", self.kind, self.access))
    }
}

#[cfg(test)]
mod device_rule_tests {
    use super::DeviceRule;

    #[test]
    fn rules_as_v1_lines() {
        let rule = |kind, major, minor, access: &str| DeviceRule {
            allow: true,
            kind,
            major,
            minor,
            access: access.into(),
        };
        assert_eq!(
            rule('c', Some(1), Some(11), "w").line().unwrap(),
            "c 1:11 w"
        );
        assert_eq!(
            rule('a', None, Some(-1), "rwm").line().unwrap(),
            "a *:* rwm"
        );
        assert!(rule('x', None, None, "rwm").line().is_err());
        assert!(rule('c', None, None, "rwx").line().is_err());
        assert!(rule('c', Some(-5), None, "r").line().is_err());
        assert!(rule('c', None, None, "").line().is_err());
    }
}
