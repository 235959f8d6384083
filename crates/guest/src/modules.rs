//! The kernel modules the default guest loads for virtio devices.
//!
//! Debian's cloud kernel builds the virtio transport and drivers as
//! modules. [`fetch`](crate::fetch) takes them (and what they depend on)
//! from the same verified kernel package as the kernel, and the initramfs
//! carries them under [`MODULE_DIR`] with, for each driver, a `NAME.deps`
//! file listing the modules to `insmod` in order. Dependencies come from
//! each module's own `.modinfo` section (`depends=`), since the package
//! ships no `modules.dep` (depmod runs at install time).

use std::collections::{BTreeMap, BTreeSet};

/// Where the initramfs keeps the modules (no `/lib/modules/RELEASE`
/// tree: only `insmod` by path is used).
pub const MODULE_DIR: &str = "lib/modules/vessel";

/// The drivers init may load, by module name: the virtio-mmio transport
/// and the device drivers for block, network, entropy and vsock; the ACPI
/// power button and the event interface the agent reads it through.
pub const DRIVERS: [&str; 7] = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
];

/// A module file's name as its module name (`virtio-rng.ko` is module
/// `virtio_rng`).
pub fn module_name(file_name: &str) -> Option<String> {
    file_name
        .strip_suffix(".ko")
        .map(|stem| stem.replace('-', "_"))
}

/// The `depends=` list of a module's `.modinfo` section.
pub fn depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let info = section(ko, ".modinfo")?;
    let mut deps = Vec::new();
    for entry in info.split(|b| *b == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            let list = std::str::from_utf8(list).map_err(|_| "depends= is not UTF-8")?;
            deps.extend(
                list.split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_")),
            );
        }
    }
    Ok(deps)
}

/// The bytes of section `name` of a 64-bit little-endian ELF file.
fn section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    let u16_at = |o: usize| -> Result<usize, String> {
        elf.get(o..o + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or_else(|| format!("ELF truncated at {o:#x}"))
    };
    let u64_at = |o: usize| -> Result<usize, String> {
        let b = elf
            .get(o..o + 8)
            .ok_or_else(|| format!("ELF truncated at {o:#x}"))?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(v)).map_err(|_| "ELF offset too large".to_string())
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    if shentsize < 0x40 {
        return Err(format!("section header size {shentsize}"));
    }
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let bytes_of = |h: usize| -> Result<&'a [u8], String> {
        let offset = u64_at(h + 0x18)?;
        let size = u64_at(h + 0x20)?;
        offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| "section outside the file".to_string())
    };
    let names = bytes_of(header(shstrndx).ok_or("bad section index")?)?;
    for i in 0..shnum {
        let h = header(i).ok_or("bad section header offset")?;
        let name_at = u32::from_le_bytes(
            elf.get(h..h + 4)
                .ok_or("section header outside the file")?
                .try_into()
                .map_err(|_| "section header")?,
        ) as usize;
        let section_name = names
            .get(name_at..)
            .and_then(|n| n.split(|b| *b == 0).next())
            .unwrap_or_default();
        if section_name == name.as_bytes() {
            return bytes_of(h);
        }
    }
    Err(format!("no {name} section"))
}

/// For each of [`DRIVERS`], the modules to load in order (dependencies
/// first, the driver last), given every module file of the package by
/// module name. Modules the kernel has built in are not in `available`
/// and are skipped when something depends on them.
pub fn load_orders(
    available: &BTreeMap<String, Vec<u8>>,
    builtin: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut orders = BTreeMap::new();
    for driver in DRIVERS {
        let mut order = Vec::new();
        visit(driver, available, builtin, &mut Vec::new(), &mut order)?;
        orders.insert(driver.to_string(), order);
    }
    Ok(orders)
}

fn visit(
    module: &str,
    available: &BTreeMap<String, Vec<u8>>,
    builtin: &BTreeSet<String>,
    path: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<(), String> {
    if order.iter().any(|m| m == module) {
        return Ok(());
    }
    if path.iter().any(|m| m == module) {
        return Err(format!("modules depend on each other in a cycle: {path:?}"));
    }
    let Some(ko) = available.get(module) else {
        if builtin.contains(module) {
            return Ok(());
        }
        return Err(format!(
            "module {module} is neither in the package nor built in"
        ));
    };
    path.push(module.to_string());
    for dep in depends(ko).map_err(|e| format!("{module}.ko: {e}"))? {
        visit(&dep, available, builtin, path, order)?;
    }
    path.pop();
    order.push(module.to_string());
    Ok(())
}

/// The modules an initramfs carries: the files by module name, and for
/// each of [`DRIVERS`] the load order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestModules {
    pub files: BTreeMap<String, Vec<u8>>,
    pub orders: BTreeMap<String, Vec<String>>,
}

/// Whether a path of the kernel package may hold a module the drivers
/// need (their dependencies included), or the list of built-in modules.
/// Kept narrow: the package holds thousands of modules.
pub fn wanted_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("lib/modules/") else {
        return false;
    };
    let Some((_release, inner)) = rest.split_once('/') else {
        return false;
    };
    inner == "modules.builtin"
        || [
            "kernel/drivers/virtio/",
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/drivers/char/hw_random/",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/net/vmw_vsock/",
            "kernel/drivers/acpi/button.ko",
            "kernel/drivers/input/evdev.ko",
        ]
        .iter()
        .any(|prefix| inner.starts_with(prefix))
            && inner.ends_with(".ko")
}

impl GuestModules {
    /// From the files [`wanted_path`] picked out of the kernel package
    /// (path, contents): resolves each driver's dependencies and keeps the
    /// modules some driver needs.
    pub fn from_package(files: Vec<(String, Vec<u8>)>) -> Result<GuestModules, String> {
        let mut available = BTreeMap::new();
        let mut builtin = BTreeSet::new();
        for (path, contents) in files {
            let file_name = path.rsplit('/').next().unwrap_or_default();
            if file_name == "modules.builtin" {
                builtin = parse_builtin(&String::from_utf8_lossy(&contents));
            } else if let Some(name) = module_name(file_name) {
                available.insert(name, contents);
            }
        }
        let orders = load_orders(&available, &builtin)?;
        let needed: BTreeSet<&String> = orders.values().flatten().collect();
        let files = available
            .into_iter()
            .filter(|(name, _)| needed.contains(name))
            .collect();
        Ok(GuestModules { files, orders })
    }
}

/// A minimal 64-bit ELF file whose `.modinfo` section holds `info` (for
/// tests that need module files: the fake mirror's kernel package).
#[doc(hidden)]
pub fn minimal_module(info: &[u8]) -> Vec<u8> {
    let names = b"\0.shstrtab\0.modinfo\0";
    let mut elf = vec![0u8; 0x40];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    let names_at = elf.len();
    elf.extend_from_slice(names);
    let info_at = elf.len();
    elf.extend_from_slice(info);
    while !elf.len().is_multiple_of(8) {
        elf.push(0);
    }
    let shoff = elf.len();
    // Section 0: null; 1: .shstrtab; 2: .modinfo.
    elf.extend_from_slice(&[0u8; 0x40]);
    for (name, at, len) in [(1u32, names_at, names.len()), (11, info_at, info.len())] {
        let mut h = [0u8; 0x40];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(len as u64).to_le_bytes());
        elf.extend_from_slice(&h);
    }
    elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    elf
}

/// The module files of a Debian cloud kernel package that [`DRIVERS`]
/// need, as `(path in the package, contents)` with fake contents: what
/// the fake mirror of the tests ships.
#[doc(hidden)]
pub fn fake_package_modules(release: &str) -> Vec<(String, Vec<u8>)> {
    let dir = format!("lib/modules/{release}");
    let module = |path: &str, depends: &str| {
        (
            format!("{dir}/kernel/{path}"),
            minimal_module(format!("license=GPL\0depends={depends}\0").as_bytes()),
        )
    };
    vec![
        (
            format!("{dir}/modules.builtin"),
            b"kernel/drivers/char/hw_random/rng-core.ko\n".to_vec(),
        ),
        module("drivers/virtio/virtio_ring.ko", ""),
        module("drivers/virtio/virtio.ko", "virtio_ring"),
        module("drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
        module("drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
        module("drivers/char/hw_random/virtio-rng.ko", "virtio,virtio_ring"),
        module("net/core/failover.ko", ""),
        module("drivers/net/net_failover.ko", "failover"),
        module(
            "drivers/net/virtio_net.ko",
            "virtio_ring,virtio,net_failover",
        ),
        module("net/vmw_vsock/vsock.ko", ""),
        module(
            "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "vsock",
        ),
        module(
            "net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        ),
        module("drivers/acpi/button.ko", ""),
        module("drivers/input/evdev.ko", ""),
    ]
}

/// Module names in a `modules.builtin` file (`kernel/fs/ext4/ext4.ko`
/// lines).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(module_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(info: &[u8]) -> Vec<u8> {
        minimal_module(info)
    }

    #[test]
    fn dependencies_come_from_modinfo() {
        let ko = module(b"license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0");
        assert_eq!(depends(&ko).unwrap(), ["virtio", "virtio_ring"]);
        assert_eq!(
            depends(&module(b"depends=\0")).unwrap(),
            Vec::<String>::new()
        );
        assert!(depends(b"not an elf").is_err());
        let mut truncated = module(b"depends=a\0");
        truncated.truncate(0x50);
        assert!(depends(&truncated).is_err());
    }

    #[test]
    fn load_orders_put_dependencies_first_and_skip_builtins() {
        let mut available = BTreeMap::new();
        available.insert("virtio_ring".to_string(), module(b"depends=\0"));
        available.insert("virtio".to_string(), module(b"depends=virtio_ring\0"));
        for driver in ["virtio_mmio", "virtio_blk", "virtio_rng"] {
            available.insert(driver.to_string(), module(b"depends=virtio,virtio_ring\0"));
        }
        available.insert("failover".to_string(), module(b"depends=\0"));
        available.insert("net_failover".to_string(), module(b"depends=failover\0"));
        available.insert(
            "virtio_net".to_string(),
            module(b"depends=virtio_ring,virtio,net_failover\0"),
        );
        available.insert("vsock".to_string(), module(b"depends=\0"));
        available.insert(
            "vmw_vsock_virtio_transport".to_string(),
            module(b"depends=virtio,vsock,rng_core\0"),
        );
        // A driver the kernel has built in is nothing to load.
        let builtin = parse_builtin(
            "kernel/drivers/char/hw_random/rng-core.ko\nkernel/drivers/acpi/button.ko\n\
             kernel/drivers/input/evdev.ko\n",
        );
        let orders = load_orders(&available, &builtin).unwrap();
        assert!(orders["button"].is_empty() && orders["evdev"].is_empty());
        assert_eq!(
            orders["virtio_blk"],
            ["virtio_ring", "virtio", "virtio_blk"]
        );
        assert_eq!(
            orders["virtio_net"],
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        assert_eq!(
            orders["vmw_vsock_virtio_transport"],
            [
                "virtio_ring",
                "virtio",
                "vsock",
                "vmw_vsock_virtio_transport"
            ]
        );
        // A missing dependency and a cycle are errors.
        available.insert("vsock".to_string(), module(b"depends=nowhere\0"));
        assert!(load_orders(&available, &builtin).is_err());
        available.insert(
            "vsock".to_string(),
            module(b"depends=vmw_vsock_virtio_transport\0"),
        );
        assert!(load_orders(&available, &builtin)
            .unwrap_err()
            .contains("cycle"));
    }

    #[test]
    fn the_fake_package_resolves_and_keeps_only_what_drivers_need() {
        let mut files = fake_package_modules("6.1.0-99-cloud-amd64");
        files.push((
            "lib/modules/6.1.0-99-cloud-amd64/kernel/drivers/virtio/virtio_mem.ko".into(),
            module(b"depends=virtio\0"),
        ));
        let m = GuestModules::from_package(files).unwrap();
        assert_eq!(m.orders.len(), DRIVERS.len());
        assert!(!m.files.contains_key("virtio_mem"));
        assert_eq!(m.files.len(), 13);
        assert!(wanted_path("lib/modules/r/kernel/drivers/virtio/virtio.ko"));
        assert!(wanted_path("lib/modules/r/modules.builtin"));
        assert!(!wanted_path("lib/modules/r/kernel/fs/ext4/ext4.ko"));
        assert!(!wanted_path("boot/vmlinuz-r"));
    }

    #[test]
    fn module_names_use_underscores() {
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(module_name("vmlinuz"), None);
    }
}
