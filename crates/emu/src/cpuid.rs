//! The CPUID model: a small Intel-vendor processor advertising only what
//! this emulator implements (Linux x86-64 needs at least FPU, PAE, CX8,
//! PGE, FXSR, SSE and SSE2 before it boots). A feature bit is added only
//! with the instructions or state it stands for.

use hypervisor::x86::CpuidEntry;

/// Leaf 1 EDX bits advertised.
pub mod leaf1_edx {
    pub const FPU: u32 = 1 << 0;
    pub const CLFSH: u32 = 1 << 19;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    /// Leaf 1 EBX[23:16] (the logical processor count) is valid.
    pub const HTT: u32 = 1 << 28;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    /// MMX: with CMOV, CX8, FPU, FXSR, SSE, SSE2 and SYSCALL, the x86-64
    /// baseline glibc's dynamic loader requires of a CPU.
    pub const MMX: u32 = 1 << 23;
}

/// Leaf 1 ECX: CMPXCHG16B.
pub const LEAF1_ECX_CX16: u32 = 1 << 13;
/// Leaf 0x8000_0001 EDX: SYSCALL/SYSRET, NX, 1 GiB pages, RDTSCP.
pub const EXT1_EDX_SYSCALL: u32 = 1 << 11;
pub const EXT1_EDX_NX: u32 = 1 << 20;
pub const EXT1_EDX_PAGE1GB: u32 = 1 << 26;
pub const EXT1_EDX_RDTSCP: u32 = 1 << 27;

/// Leaf 1 ECX: the local APIC timer has TSC-deadline mode (with the
/// platform's APIC only; see `vcpu::platform_cpuid`).
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Leaf 1 ECX: "running under a hypervisor".
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 ECX: LAHF/SAHF in 64-bit mode.
pub const EXT1_ECX_LAHF_LM: u32 = 1 << 0;
/// Leaf 0x8000_0001 EDX: long mode.
pub const EXT1_EDX_LM: u32 = 1 << 29;

/// Leaf 7 (subleaf 0) EDX: the IA32_ARCH_CAPABILITIES MSR exists.
pub const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// IA32_ARCH_CAPABILITIES (MSR 0x10a): the processor is not affected by
/// the speculative-execution and data-sampling flaws these bits name.
/// True of an interpreter, which executes nothing speculatively and keeps
/// no microarchitectural buffers a guest could sample, so the guest
/// kernel need not pay for the mitigations (page-table isolation, return
/// thunks, buffer clearing on every return to user space).
pub const ARCH_CAPABILITIES: u64 = {
    const RDCL_NO: u64 = 1 << 0; // Meltdown, L1TF
    const SSB_NO: u64 = 1 << 4; // speculative store bypass
    const MDS_NO: u64 = 1 << 5;
    const PSCHANGE_MC_NO: u64 = 1 << 6; // iTLB multihit
    const TAA_NO: u64 = 1 << 8;
    const SBDR_SSDP_NO: u64 = 1 << 13; // MMIO stale data (with the next two)
    const FBSDP_NO: u64 = 1 << 14;
    const PSDP_NO: u64 = 1 << 15;
    const BHI_NO: u64 = 1 << 20;
    const PBRSB_NO: u64 = 1 << 24;
    const GDS_NO: u64 = 1 << 26;
    const RFDS_NO: u64 = 1 << 27;
    const ITS_NO: u64 = 1 << 62; // indirect target selection
    RDCL_NO
        | SSB_NO
        | MDS_NO
        | PSCHANGE_MC_NO
        | TAA_NO
        | SBDR_SSDP_NO
        | FBSDP_NO
        | PSDP_NO
        | BHI_NO
        | PBRSB_NO
        | GDS_NO
        | RFDS_NO
        | ITS_NO
};

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

/// CPUID.06H:EAX bit 2: the APIC timer runs at a constant rate in every
/// C-state.
const LEAF6_EAX_ARAT: u32 = 1 << 2;

/// The CPUID table for vCPU `apic_id` of `num_cpus`.
pub fn table(apic_id: u32, num_cpus: u32) -> Vec<CpuidEntry> {
    let vendor = b"GenuineIntel";
    // Family 6, model 0x0f, stepping 1: a generic 64-bit Intel part.
    let signature = 0x0000_06f1;
    // CLFLUSH line size 8 qwords, logical processor count, APIC ID.
    let ebx1 = (apic_id << 24) | (num_cpus.min(255) << 16) | (8 << 8);
    // With more than one vCPU the count is declared valid and leaf 0xb
    // describes one package of `num_cpus` single-thread cores, so that
    // Linux puts them in one package rather than one package each; then
    // APs take the boot CPU's loops_per_jiffy instead of calibrating their
    // delay loop (slow and noisy on an interpreter). Cores, not threads:
    // SMT siblings would make Linux warn about SMT-based CPU bugs.
    let htt = if num_cpus > 1 { leaf1_edx::HTT } else { 0 };
    let mut table = vec![
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
                | leaf1_edx::MMX
                | leaf1_edx::CLFSH
                | leaf1_edx::FXSR
                | leaf1_edx::SSE
                | leaf1_edx::SSE2
                | htt,
        ),
        // Thermal and power management: only ARAT, "the APIC timer always
        // runs" (the emulated one never stops in a C-state). Without it
        // Linux must assume the LAPIC timer stops when the CPU idles; with
        // no broadcast timer to fall back on it then keeps the periodic
        // tick forever (no NO_HZ idle), and an idle guest wakes its vCPU
        // HZ times a second.
        leaf(6, LEAF6_EAX_ARAT, 0, 0, 0),
        // Structured extended features, subleaf 0 (the only one): none of
        // the instruction-set extensions, only the capabilities MSR.
        CpuidEntry {
            function: 7,
            index: 0,
            flags: 1,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: LEAF7_EDX_ARCH_CAPABILITIES,
        },
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
    ];
    if num_cpus > 1 {
        table.extend(extended_topology(apic_id, num_cpus));
    }
    // KVM's paravirtual interface: the guest reads time from kvmclock.
    table.extend(crate::pvclock::cpuid_leaves());
    table
}

/// Leaf 0xb for one package of `num_cpus` cores with one thread each:
/// level 0 (SMT, type 1) has one logical processor and no APIC-ID bits,
/// level 1 (core, type 2) has `num_cpus` and the APIC-ID bits below the
/// package ID. EDX is the (x2)APIC ID.
fn extended_topology(apic_id: u32, num_cpus: u32) -> [CpuidEntry; 2] {
    let core_bits = num_cpus.next_power_of_two().trailing_zeros();
    let sub = |index: u32, eax: u32, ebx: u32, level_type: u32| CpuidEntry {
        function: 0xb,
        index,
        // KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the subleaf selects the entry.
        flags: 1,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
    };
    [sub(0, 0, 1, 1), sub(1, core_bits, num_cpus, 2)]
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

    #[test]
    fn leaf_7_offers_only_the_capabilities_msr() {
        let t = super::table(0, 1);
        let l7 = t
            .iter()
            .find(|e| e.function == 7 && e.index == 0)
            .expect("leaf 7");
        assert_eq!(
            (l7.eax, l7.ebx, l7.ecx),
            (0, 0, 0),
            "no extensions, one subleaf"
        );
        assert_eq!(l7.edx, super::LEAF7_EDX_ARCH_CAPABILITIES);
        assert_eq!(l7.flags & 1, 1, "subleaf 1 and up read as zeros");
        assert_ne!(
            super::ARCH_CAPABILITIES & 1,
            0,
            "RDCL_NO: no page-table isolation"
        );
    }

    #[test]
    fn several_vcpus_are_cores_of_one_package() {
        let one = super::table(0, 1);
        assert!(one.iter().all(|e| e.function != 0xb));
        assert_eq!(one[1].edx & super::leaf1_edx::HTT, 0);
        let t = super::table(2, 3);
        assert_eq!(t[1].ebx >> 16 & 0xff, 3, "logical processor count");
        assert_ne!(t[1].edx & super::leaf1_edx::HTT, 0);
        let level = |n: u32| {
            *t.iter()
                .find(|e| e.function == 0xb && e.index == n)
                .expect("leaf 0xb level")
        };
        let (smt, core) = (level(0), level(1));
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8 & 0xff), (0, 1, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8 & 0xff), (2, 3, 2));
        assert_eq!((smt.edx, core.edx), (2, 2), "x2APIC ID");
    }
}
