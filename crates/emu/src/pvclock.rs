//! KVM's paravirtual clock (kvmclock) for the software vCPU, so that a
//! guest that knows KVM's interface reads time from a structure in its own
//! memory instead of calibrating and cross-checking hardware timers.
//!
//! The guest finds it through the hypervisor CPUID leaves
//! ([`cpuid_leaves`]: the `KVMKVMKVM` signature and the feature bits), then
//! writes the guest-physical address of a per-vCPU `pvclock_vcpu_time_info`
//! to [`MSR_KVM_SYSTEM_TIME_NEW`] and of a `pvclock_wall_clock` to
//! [`MSR_KVM_WALL_CLOCK_NEW`] (Documentation/virt/kvm/x86/msr.rst).
//!
//! The numbers are simple here: the guest TSC counts host nanoseconds
//! since the VM's origin plus the guest's TSC offset (1 GHz, the same on
//! every vCPU), and kvmclock's system time is those nanoseconds without the
//! offset. So one structure per vCPU, written when the guest enables it
//! (or moves its TSC), stays exact for good: `tsc_to_system_mul` is 2^31
//! with a shift of 1 (a factor of exactly one), and the TSC-stable flag
//! tells the guest that all vCPUs agree (until it moves a vCPU's TSC).

use hypervisor::x86::CpuidEntry;

/// The structure's address (bit 0: enable) for this vCPU.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Where the guest wants the wall clock at system time zero.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

/// CPUID 0x4000_0001 EAX: the new kvmclock MSRs.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// Port 0x80 I/O delays are not needed (each would be an exit).
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// The clock's TSC-stable flag may be trusted.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// `pvclock_vcpu_time_info.flags`: every vCPU's TSC agrees.
const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;

/// The hypervisor leaves: signature and features.
pub fn cpuid_leaves() -> [CpuidEntry; 2] {
    let sig = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    [
        CpuidEntry {
            function: 0x4000_0000,
            index: 0,
            flags: 0,
            eax: 0x4000_0001,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
        },
        CpuidEntry {
            function: 0x4000_0001,
            index: 0,
            flags: 0,
            eax: KVM_FEATURE_CLOCKSOURCE2
                | KVM_FEATURE_NOP_IO_DELAY
                | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
            ebx: 0,
            ecx: 0,
            edx: 0,
        },
    ]
}

/// `pvclock_vcpu_time_info` for a vCPU whose TSC reads `tsc` when its
/// system time is `system_ns` (32 bytes, little-endian); `stable`: every
/// vCPU's TSC agrees with this one.
pub fn vcpu_time_info(version: u32, tsc: u64, system_ns: u64, stable: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[8..16].copy_from_slice(&tsc.to_le_bytes());
    b[16..24].copy_from_slice(&system_ns.to_le_bytes());
    // ns = ((tsc_delta << 1) * 2^31) >> 32 = tsc_delta: the TSC is 1 GHz.
    b[24..28].copy_from_slice(&(1u32 << 31).to_le_bytes());
    b[28] = 1; // tsc_shift
    b[29] = if stable { PVCLOCK_TSC_STABLE_BIT } else { 0 };
    b
}

/// `pvclock_wall_clock`: the wall-clock time at system time zero.
pub fn wall_clock(version: u32, sec: u32, nsec: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[4..8].copy_from_slice(&sec.to_le_bytes());
    b[8..12].copy_from_slice(&nsec.to_le_bytes());
    b
}

/// What a guest computes from a `pvclock_vcpu_time_info` (Linux's
/// `__pvclock_read_cycles`), for tests.
pub fn guest_reading(info: &[u8; 32], tsc: u64) -> u64 {
    let u64_at = |o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&info[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let delta = tsc.wrapping_sub(u64_at(8));
    let shift = info[28] as i8;
    let delta = if shift >= 0 {
        delta << shift
    } else {
        delta >> -shift
    };
    let mul = u32::from_le_bytes([info[24], info[25], info[26], info[27]]);
    let scaled = ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
    u64_at(16).wrapping_add(scaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_is_exactly_one() {
        let info = vcpu_time_info(2, 5_000, 1_000, true);
        for t in [5_000u64, 5_001, 1 << 40, 5_000 + 3_600_000_000_000] {
            assert_eq!(guest_reading(&info, t), 1_000 + (t - 5_000));
        }
        assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()) % 2, 0);
    }

    #[test]
    fn the_signature_reads_kvmkvmkvm() {
        let [sig, features] = cpuid_leaves();
        let mut s = Vec::new();
        for w in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&s, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, 0x4000_0001);
        assert_ne!(features.eax & KVM_FEATURE_CLOCKSOURCE2, 0);
    }
}
