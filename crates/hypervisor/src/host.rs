//! What virtualization this host offers, for `vessel doctor` and for
//! choosing an accelerator.

use std::path::Path;

/// What the host's KVM can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmSupport {
    /// `/dev/kvm` exists.
    pub device: bool,
    /// `/dev/kvm` opens and a VM can be created.
    pub usable: bool,
    /// KVM here is PVM (`kvm_pvm`), a nested software-assisted mode in which
    /// guest ring 0 is emulated instruction by instruction: stock kernels
    /// stop on instructions it cannot emulate.
    pub pvm: bool,
}

/// The accelerator `auto` resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Emu,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Emu => "emu",
        }
    }
}

/// Probes `/dev/kvm`.
pub fn kvm_support() -> KvmSupport {
    let device = Path::new("/dev/kvm").exists();
    let usable = device
        && kvm_ioctls::Kvm::new()
            .and_then(|kvm| kvm.create_vm().map(|_| ()))
            .is_ok();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    KvmSupport {
        device,
        usable,
        pvm,
    }
}

/// VT-x (`vmx`) or AMD-V (`svm`) in the processor flags of `cpuinfo` text.
pub fn has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| {
            line.split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        })
}

/// The accelerator that runs stock kernels here: KVM only where it is
/// usable, backed by VT-x/AMD-V, and not PVM.
pub fn auto_accel(kvm: KvmSupport, hardware_virtualization: bool) -> Accel {
    if kvm.usable && hardware_virtualization && !kvm.pvm {
        Accel::Kvm
    } else {
        Accel::Emu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vmx_and_svm_only_in_flags_lines() {
        assert!(has_hardware_virtualization(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(has_hardware_virtualization("flags : fpu svm\n"));
        assert!(!has_hardware_virtualization("flags : fpu sse2 vmxx\n"));
        assert!(!has_hardware_virtualization(
            "model name: vmx\nflags: fpu\n"
        ));
    }

    #[test]
    fn auto_picks_kvm_only_with_real_hardware_support() {
        let good = KvmSupport {
            device: true,
            usable: true,
            pvm: false,
        };
        assert_eq!(auto_accel(good, true), Accel::Kvm);
        assert_eq!(auto_accel(good, false), Accel::Emu);
        assert_eq!(
            auto_accel(KvmSupport { pvm: true, ..good }, true),
            Accel::Emu
        );
        assert_eq!(
            auto_accel(
                KvmSupport {
                    usable: false,
                    ..good
                },
                true
            ),
            Accel::Emu
        );
    }
}
