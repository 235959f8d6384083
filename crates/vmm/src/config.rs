//! A machine's validated configuration.

use std::path::PathBuf;

use crate::layout;

/// Largest vCPU count: the IOAPIC takes the APIC ID after the last vCPU
/// and xAPIC IDs are 8 bits (255 is broadcast).
pub const MAX_CPUS: u32 = 254;

/// What to boot and with how much.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The I/O port where the guest reports its command's exit status, if
    /// the guest speaks that protocol.
    pub exit_status_port: Option<u16>,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on host taps, in the order the guest sees them.
    pub nics: Vec<NicConfig>,
    /// A virtio-rng device fed from the host's random source.
    pub rng: bool,
    /// A virtio-vsock device whose host side is the Unix socket at this
    /// path (Firecracker's protocol); the guest is CID 3.
    pub vsock: Option<PathBuf>,
    /// What SIGTERM to the VMM does.
    pub on_sigterm: SigtermAction,
}

/// What SIGTERM to the VMM does (SIGINT and SIGHUP always stop the VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigtermAction {
    /// Tear the VM down at once, as QEMU does.
    #[default]
    Stop,
    /// Press the machine's ACPI power button, so that the guest shuts
    /// itself down (a supervisor's graceful stop, which SIGKILLs after a
    /// timeout). Each SIGTERM is one press.
    PowerButton,
}

/// One `--net tap[=NAME][,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// The tap to attach to (created if missing); `None`: a new one.
    pub tap: Option<String>,
    /// The NIC's address; `None`: a random one in QEMU's 52:54:00 range.
    pub mac: Option<[u8; 6]>,
}

impl NicConfig {
    pub fn parse(text: &str) -> Result<NicConfig, ConfigError> {
        let bad = |why: String| ConfigError::BadNic {
            spec: text.to_string(),
            why,
        };
        let mut parts = text.split(',');
        let kind = parts.next().unwrap_or_default();
        let tap =
            match kind.split_once('=') {
                None if kind == "tap" => None,
                Some(("tap", name)) if !name.is_empty() => Some(name.to_string()),
                _ => return Err(bad(
                    "a VM's network is tap[=NAME][,mac=MAC] (none and host are for --container)"
                        .into(),
                )),
            };
        let mut nic = NicConfig { tap, mac: None };
        for option in parts {
            match option.split_once('=') {
                Some(("mac", mac)) => nic.mac = Some(parse_mac(mac).map_err(bad)?),
                _ => return Err(bad(format!("unknown option {option:?} (expected mac=MAC)"))),
            }
        }
        Ok(nic)
    }
}

/// `52:54:00:12:34:56`: six two-digit hex bytes of a unicast address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "mac={text}: expected six hex bytes like 52:54:00:12:34:56"
        ));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(format!("mac={text}: {part:?} is not two hex digits"));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("mac={text}: {part:?} is not two hex digits"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac={text}: a multicast address cannot be a NIC's"));
    }
    Ok(mac)
}

/// Disk image formats vessel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// One `--disk PATH[,readonly][,format=raw|qcow2][,serial=S]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub format: DiskFormat,
    /// The serial number the guest reads (at most 20 bytes); default: the
    /// image's file name, cut to 20 bytes.
    pub serial: Option<String>,
}

impl DiskConfig {
    /// Parses `PATH[,readonly][,format=raw|qcow2][,serial=S]` (the options in
    /// any order; a path containing a comma is written with `,,`, as in
    /// QEMU).
    pub fn parse(text: &str) -> Result<DiskConfig, ConfigError> {
        let bad = |why: String| ConfigError::BadDisk {
            spec: text.to_string(),
            why,
        };
        // Split on single commas; ",," stands for a comma.
        let mut parts = vec![String::new()];
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    if let Some(last) = parts.last_mut() {
                        last.push(',');
                    }
                } else {
                    parts.push(String::new());
                }
            } else if let Some(last) = parts.last_mut() {
                last.push(c);
            }
        }
        let path = parts.remove(0);
        if path.is_empty() {
            return Err(bad("no image path".into()));
        }
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            readonly: false,
            format: DiskFormat::Raw,
            serial: None,
        };
        for option in parts {
            match option.split_once('=') {
                None if option == "readonly" || option == "ro" => disk.readonly = true,
                Some(("readonly", v)) | Some(("ro", v)) => {
                    disk.readonly = match v {
                        "on" | "true" | "yes" | "1" => true,
                        "off" | "false" | "no" | "0" => false,
                        _ => return Err(bad(format!("readonly={v}: expected on or off"))),
                    }
                }
                Some(("format", "raw")) => disk.format = DiskFormat::Raw,
                Some(("format", "qcow2")) => disk.format = DiskFormat::Qcow2,
                Some(("format", other)) => {
                    return Err(bad(format!("format={other}: expected raw or qcow2")))
                }
                Some(("serial", s)) => {
                    if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad(format!(
                            "serial={s}: at most 20 printable ASCII characters"
                        )));
                    }
                    disk.serial = Some(s.to_string());
                }
                _ => {
                    return Err(bad(format!(
                    "unknown option {option:?} (expected readonly, format=raw|qcow2 or serial=S)"
                )))
                }
            }
        }
        Ok(disk)
    }
}

/// A configuration vessel refuses, with the reason in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    BadSize(String),
    #[error("--memory {0}: a guest needs at least {min} MiB", min = layout::MIN_MEMORY >> 20)]
    MemoryTooSmall(String),
    #[error("--memory {requested}: more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { requested: String, host_mib: u64 },
    #[error("--cpus {0}: a guest needs at least one vCPU")]
    NoCpus(u32),
    #[error("--cpus {requested}: at most {max} vCPUs here")]
    TooManyCpus { requested: u32, max: u32 },
    #[error("--disk {spec}: {why}")]
    BadDisk { spec: String, why: String },
    #[error("--net {spec}: {why}")]
    BadNic { spec: String, why: String },
    #[error("{count} virtio devices: a machine has room for {max}")]
    TooManyDevices { count: usize, max: usize },
}

/// Parses `512M`, `2G`, `1048576K`, `1T`, or a plain number of MiB (as
/// QEMU's `-m` does). Suffixes are binary (K = 1024) and case-insensitive;
/// a trailing `B` or `iB` is accepted.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let without_b = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match without_b.chars().last() {
        Some('k') => (&without_b[..without_b.len() - 1], 10),
        Some('m') => (&without_b[..without_b.len() - 1], 20),
        Some('g') => (&without_b[..without_b.len() - 1], 30),
        Some('t') => (&without_b[..without_b.len() - 1], 40),
        Some(c) if c.is_ascii_digit() && without_b.len() == lower.len() => (without_b, 20),
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Checks the guest's size against fixed limits and this host.
pub fn validate_resources(
    cpus: u32,
    memory: u64,
    memory_text: &str,
    max_cpus: u32,
    host_memory: u64,
) -> Result<(), ConfigError> {
    if memory < layout::MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(memory_text.to_string()));
    }
    if memory > host_memory {
        return Err(ConfigError::MemoryTooLarge {
            requested: memory_text.to_string(),
            host_mib: host_memory >> 20,
        });
    }
    if cpus == 0 {
        return Err(ConfigError::NoCpus(cpus));
    }
    let max = max_cpus.min(MAX_CPUS);
    if cpus > max {
        return Err(ConfigError::TooManyCpus {
            requested: cpus,
            max,
        });
    }
    Ok(())
}

/// Total RAM of this host, from /proc/meminfo.
pub fn host_memory() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_total(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal line in /proc/meminfo",
        )
    })
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "1 G B",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn resources_are_bounded() {
        let host = 24u64 << 30;
        assert!(validate_resources(1, 512 << 20, "512M", 255, host).is_ok());
        assert_eq!(
            validate_resources(1, 0, "0", 255, host),
            Err(ConfigError::MemoryTooSmall("0".into()))
        );
        assert!(matches!(
            validate_resources(1, 1 << 40, "1T", 255, host),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert_eq!(
            validate_resources(0, 512 << 20, "512M", 255, host),
            Err(ConfigError::NoCpus(0))
        );
        assert_eq!(
            validate_resources(1000, 512 << 20, "512M", 1024, host),
            Err(ConfigError::TooManyCpus {
                requested: 1000,
                max: MAX_CPUS
            })
        );
        assert_eq!(
            validate_resources(8, 512 << 20, "512M", 4, host),
            Err(ConfigError::TooManyCpus {
                requested: 8,
                max: 4
            })
        );
    }

    #[test]
    fn disk_specs_parse_like_qemu_drive_options() {
        let d = DiskConfig::parse("/img/a.raw").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(!d.readonly && d.serial.is_none() && d.format == DiskFormat::Raw);
        let d = DiskConfig::parse("a.img,readonly,format=raw,serial=disk-1").unwrap();
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("disk-1"));
        assert!(DiskConfig::parse("a.img,readonly=off").is_ok_and(|d| !d.readonly));
        assert_eq!(
            DiskConfig::parse("a.qcow2,format=qcow2").unwrap().format,
            DiskFormat::Qcow2
        );
        assert_eq!(
            DiskConfig::parse("odd,,name.img,ro").unwrap().path,
            PathBuf::from("odd,name.img")
        );
        for bad in [
            "",
            ",readonly",
            "a.img,format=vmdk",
            "a.img,cache=none",
            "a.img,readonly=maybe",
            "a.img,serial=012345678901234567890",
            "a.img,serial=has space",
        ] {
            let e = DiskConfig::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--disk "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn nic_specs_and_macs_parse() {
        assert_eq!(
            NicConfig::parse("tap").unwrap(),
            NicConfig {
                tap: None,
                mac: None
            }
        );
        let n = NicConfig::parse("tap=tap0,mac=52:54:00:12:34:ab").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0xab]));
        for bad in [
            "none",
            "host",
            "tap=",
            "user",
            "tap,mac=01:00:5e:00:00:01",
            "tap,mac=52:54:00:12:34",
            "tap,mac=zz:54:00:12:34:56",
            "tap,model=e1000",
        ] {
            let e = NicConfig::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--net "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24604896 kB\nMemFree: 1 kB\n"),
            Some(24604896 * 1024)
        );
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }
}
