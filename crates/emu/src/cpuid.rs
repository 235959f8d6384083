//! The CPUID model: a small Intel-vendor processor advertising only what
//! this emulator implements. Later increments add feature bits as they
//! implement them (Linux x86-64 needs at least FPU, PAE, CX8, PGE, FXSR,
//! SSE and SSE2 before it boots).

use hypervisor::x86::CpuidEntry;

/// Leaf 1 EDX bits advertised.
pub mod leaf1_edx {
    pub const FPU: u32 = 1 << 0;
    pub const CLFSH: u32 = 1 << 19;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
}

/// Leaf 1 ECX: CMPXCHG16B.
pub const LEAF1_ECX_CX16: u32 = 1 << 13;
/// Leaf 0x8000_0001 EDX: SYSCALL/SYSRET, NX, 1 GiB pages, RDTSCP.
pub const EXT1_EDX_SYSCALL: u32 = 1 << 11;
pub const EXT1_EDX_NX: u32 = 1 << 20;
pub const EXT1_EDX_PAGE1GB: u32 = 1 << 26;
pub const EXT1_EDX_RDTSCP: u32 = 1 << 27;

/// Leaf 1 ECX: "running under a hypervisor".
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 ECX: LAHF/SAHF in 64-bit mode.
pub const EXT1_ECX_LAHF_LM: u32 = 1 << 0;
/// Leaf 0x8000_0001 EDX: long mode.
pub const EXT1_EDX_LM: u32 = 1 << 29;

/// Highest basic leaf: 0x16 (processor frequency). Leaves 2 to 0x14 are not
/// listed and read as zeros ("not supported") as Linux expects of them.
pub const MAX_BASIC_LEAF: u32 = 0x16;

/// Frequency of the emulated TSC and of the crystal that clocks the LAPIC
/// timer: RDTSC counts nanoseconds of host time.
pub const TSC_HZ: u32 = 1_000_000_000;

fn vendor_word(s: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]])
}

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    }
}

/// The CPUID table for vCPU `apic_id` of `num_cpus`.
pub fn table(apic_id: u32, num_cpus: u32) -> Vec<CpuidEntry> {
    let vendor = b"GenuineIntel";
    // Family 6, model 0x0f, stepping 1: a generic 64-bit Intel part.
    let signature = 0x0000_06f1;
    // CLFLUSH line size 8 qwords, logical processor count, APIC ID.
    let ebx1 = (apic_id << 24) | (num_cpus.min(255) << 16) | (8 << 8);
    vec![
        leaf(
            0,
            MAX_BASIC_LEAF,
            vendor_word(vendor, 0),
            vendor_word(vendor, 2),
            vendor_word(vendor, 1),
        ),
        leaf(
            1,
            signature,
            ebx1,
            LEAF1_ECX_HYPERVISOR | LEAF1_ECX_CX16,
            leaf1_edx::FPU
                | leaf1_edx::PSE
                | leaf1_edx::TSC
                | leaf1_edx::MSR
                | leaf1_edx::PAE
                | leaf1_edx::CX8
                | leaf1_edx::PGE
                | leaf1_edx::CMOV
                | leaf1_edx::CLFSH
                | leaf1_edx::FXSR
                | leaf1_edx::SSE
                | leaf1_edx::SSE2,
        ),
        // Time Stamp Counter and core crystal clock: TSC = crystal * EBX / EAX.
        // The emulator's TSC and LAPIC timer both run at TSC_HZ, so Linux
        // takes the frequency from here (X86_FEATURE_TSC_KNOWN_FREQ, and the
        // LAPIC timer period from the crystal) instead of calibrating against
        // the PIT in wall-clock time, which fails when the host is busy and
        // the interpreter runs the calibration loop slowly.
        leaf(0x15, 1, 1, TSC_HZ, 0),
        // Processor base, maximum and bus (reference) frequency in MHz, so the
        // processor frequency is known too and Linux skips its PIT loops.
        leaf(
            0x16,
            TSC_HZ / 1_000_000,
            TSC_HZ / 1_000_000,
            TSC_HZ / 1_000_000,
            0,
        ),
        leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
        leaf(
            0x8000_0001,
            0,
            0,
            EXT1_ECX_LAHF_LM,
            EXT1_EDX_LM | EXT1_EDX_SYSCALL | EXT1_EDX_NX | EXT1_EDX_PAGE1GB | EXT1_EDX_RDTSCP,
        ),
        // 40 physical and 48 linear address bits.
        leaf(0x8000_0008, 0x3028, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn vendor_string() {
        let t = super::table(3, 4);
        let l0 = t[0];
        let mut v = Vec::new();
        for w in [l0.ebx, l0.edx, l0.ecx] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        assert_eq!(t[1].ebx >> 24, 3);
    }

    #[test]
    fn tsc_frequency_is_advertised_through_leaf_0x15() {
        let t = super::table(0, 1);
        assert!(t[0].eax >= 0x15, "max basic leaf must reach 0x15");
        let l15 = t.iter().find(|e| e.function == 0x15).expect("leaf 0x15");
        assert_ne!(l15.eax, 0);
        assert_ne!(l15.ebx, 0);
        let tsc_hz = u64::from(l15.ecx) * u64::from(l15.ebx) / u64::from(l15.eax);
        assert_eq!(tsc_hz, u64::from(super::TSC_HZ));
        let l16 = t.iter().find(|e| e.function == 0x16).expect("leaf 0x16");
        assert_eq!(u64::from(l16.eax) * 1_000_000, u64::from(super::TSC_HZ));
    }
}
