//! ACPI tables for a hardware-reduced x86 machine.
//!
//! The guest finds the RSDP at [`RSDP_ADDR`] (also passed in the zero page),
//! which points at an XSDT listing the FADT and the MADT; the FADT points at
//! the DSDT. All tables live between [`RSDP_ADDR`] and [`ACPI_REGION_END`],
//! which the e820 map reserves.
//!
//! * FADT (revision 6): `HW_REDUCED_ACPI`, so there is no SCI, no PM1/GPE
//!   blocks and no FACS. Power off and reset go through the sleep control,
//!   sleep status and reset registers of `devices::acpi_pm`, described as
//!   8-bit I/O-port generic addresses — Linux writes `SLP_TYP << 2 | SLP_EN`
//!   to the sleep control register with the register's width, and the reset
//!   value with an 8-bit port write (`acpi_hw_extended_sleep()` and
//!   `acpi_reset()`). The IA-PC boot flags say legacy devices and an 8042 are
//!   present (so Linux probes the i8042 directly instead of assuming it is
//!   absent) and VGA is not. The century field names the RTC's century byte,
//!   which Linux reads even on hardware-reduced machines.
//! * DSDT: `\_S5_` with [`S5_SLP_TYP`], and COM1 as a PNP0501 device so Linux
//!   takes its ports and IRQ from firmware instead of probing for them.
//!   Each virtio-mmio device is a `LNRO0005` device with its register window
//!   and its interrupt (edge-triggered, active-high) in `_CRS`, which is how
//!   Linux's `virtio_mmio` driver finds devices on ACPI machines (as on
//!   QEMU's microvm) without kernel parameters.
//!   The power button is a `PNP0C0C` device notified by a Generic Event
//!   Device (`ACPI0013`) on [`POWER_BUTTON_GSI`], as on QEMU's microvm.
//! * MADT: the local APIC address, one enabled local APIC per vCPU (APIC ID
//!   = processor UID = vCPU index), one IOAPIC with ID `num_cpus` and GSI base
//!   0, the ISA IRQ 0 -> GSI 2 override that the PC timer wiring needs, and
//!   LINT1 as NMI on all processors.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm::{
    REGISTER_BIT_WIDTH, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use devices::i8042::{I8042_COMMAND_PORT, I8042_DATA_PORT};
use devices::rtc::{RTC_CENTURY_INDEX, RTC_INDEX_PORT, RTC_LEN};
use devices::serial::{COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN};
use hypervisor::GuestRam;

use crate::layout::MmioSlot;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Where the RSDP goes; the other tables follow it.
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// The tables must end below this address (the end of the BIOS area).
pub const ACPI_REGION_END: u64 = 0x0010_0000;

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_TABLE_ID: [u8; 8] = *b"VESSELVM";
const OEM_REVISION: u32 = 1;

/// The ISA IRQ (= GSI, identity-mapped in the MADT) of the i8042's
/// keyboard port.
const I8042_KBD_IRQ: u32 = 1;
/// The ISA IRQ of the CMOS clock's alarm/periodic interrupt.
const RTC_IRQ: u32 = 8;
/// Tables start on 16-byte boundaries (the RSDP must; the rest by habit).
const TABLE_ALIGN: u64 = 16;

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// MADT revision matching the ACPI 6.x FADT.
const MADT_REVISION: u8 = 5;

// IA-PC boot architecture flags (FADT offset 109).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

// MADT.
const MADT_LAPIC_ADDR_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
const MADT_HEADER_LEN: u32 = 44;
/// The machine also has dual 8259s (KVM's in-kernel irqchip); the OS must
/// mask them.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_TYPE_ISO: u8 = 2;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// Processor UID meaning "all processors" in a local APIC NMI entry.
const MADT_ALL_PROCESSORS: u8 = 0xff;
/// APIC ID 0xff is the broadcast ID, so at most 254 vCPUs (IDs 0..=253)
/// leave an ID for the IOAPIC.
const MAX_CPUS: u8 = 254;

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, 1..=254.
    pub num_cpus: u8,
    /// IOAPIC MMIO base (normally 0xfec0_0000).
    pub ioapic_addr: u32,
    /// Local APIC MMIO base (normally 0xfee0_0000).
    pub lapic_addr: u32,
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `num_cpus` was 0 or above 254.
    #[error("ACPI tables support 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// The tables would run past [`ACPI_REGION_END`].
    #[error("ACPI tables need {needed:#x} bytes from {RSDP_ADDR:#x}, past the end of the ACPI area at {ACPI_REGION_END:#x}")]
    TooLarge {
        /// Bytes needed from [`RSDP_ADDR`].
        needed: u64,
    },
    /// Guest memory does not cover the area the tables go to.
    #[error("guest memory does not cover the ACPI tables at {start:#x}..{end:#x}")]
    MemoryTooSmall {
        /// First byte of the tables.
        start: u64,
        /// One past their last byte.
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("writing the ACPI {table} table at {addr:#x}: {source}")]
    GuestMemory {
        /// Signature of the table.
        table: &'static str,
        /// Where it was going.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// An 8-bit register in I/O space, as the FADT describes the
/// `devices::acpi_pm` registers.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        REGISTER_BIT_WIDTH,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The `_HID` under which Linux's virtio_mmio driver binds on ACPI.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// The Generic Event Device.
const GED_HID: &str = "ACPI0013";
/// The GSI of the power button's GED interrupt: ISA IRQ 3 (COM2's, which
/// this machine does not have; no virtio device is given it).
pub const POWER_BUTTON_GSI: u32 = 3;
/// The bytes of a virtio-mmio window the DSDT describes (registers and
/// configuration space).
const VIRTIO_MMIO_REGISTERS: u32 = 0x200;

fn build_dsdt(virtio: &[MmioSlot]) -> Vec<u8> {
    // \_S5_: the SLP_TYP the guest writes to the sleep control register to
    // power off. One element is all ACPICA requires (it is SLP_TYPa).
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLP_TYP]));

    let com1_port = COM1_BASE;
    let com1_len = SERIAL_PORT_LEN as u8; // 8: fits by definition
    let com1_io = aml::IO::new(com1_port, com1_port, 0, com1_len);
    // Edge-triggered, active-high, exclusive: an ISA interrupt.
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    // The i8042 keyboard controller and the CMOS clock. The FADT's boot
    // flags say they exist, but a hardware-reduced ACPI machine has no
    // legacy PIC, so Linux maps ISA IRQs only for devices ACPI describes
    // with interrupt resources (PNP-ACPI); without these the i8042 and
    // rtc_cmos probes fail with -EINVAL. devices::i8042 has no aux (mouse)
    // port, so there is no PNP0F13 device.
    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 0, 1);
    let kbd_cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 0, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let kbd_crs = aml::Name::new("_CRS".into(), &kbd_crs);
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    let rtc_len = RTC_LEN as u8; // 2: fits by definition
    let rtc_io = aml::IO::new(RTC_INDEX_PORT, RTC_INDEX_PORT, 0, rtc_len);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, RTC_IRQ);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_crs);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    // virtio-mmio devices: VR00, VR01, ...
    struct VirtioAml {
        hid: aml::Name,
        uid: aml::Name,
        crs: aml::Name,
    }
    let virtio_aml: Vec<(String, VirtioAml)> = virtio
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            // The windows sit below 4 GiB (layout::VIRTIO_MMIO_START).
            let base = u32::try_from(slot.base).unwrap_or(u32::MAX);
            let window = aml::Memory32Fixed::new(true, base, VIRTIO_MMIO_REGISTERS);
            let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
            let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
            (
                format!("VR{i:02X}"),
                VirtioAml {
                    hid: aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID),
                    uid: aml::Name::new("_UID".into(), &i),
                    crs: aml::Name::new("_CRS".into(), &crs),
                },
            )
        })
        .collect();
    let virtio_devices: Vec<aml::Device> = virtio_aml
        .iter()
        .map(|(name, d)| aml::Device::new(name.as_str().into(), vec![&d.hid, &d.uid, &d.crs]))
        .collect();
    // The power button: a control-method button (PNP0C0C) and a Generic
    // Event Device (ACPI0013) whose interrupt says "pressed". Linux's GED
    // driver runs _EVT with the GSI on each interrupt, which notifies the
    // button (0x80: pressed); the button driver then reports KEY_POWER,
    // as on QEMU's microvm. A hardware-reduced machine has no fixed power
    // button, so this is how a guest learns it should shut down.
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);
    let ged_hid = aml::Name::new("_HID".into(), &GED_HID);
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_irq = aml::Interrupt::new(true, true, false, false, POWER_BUTTON_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = aml::Name::new("_CRS".into(), &ged_crs);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = aml::Notify::new(&pwrb_path, &pressed);
    let is_button = aml::Equal::new(&aml::Arg(0), &POWER_BUTTON_GSI);
    let if_button = aml::If::new(&is_button, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&if_button]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt]);
    let mut children: Vec<&dyn Aml> = vec![&com1, &kbd, &rtc, &pwrb, &ged];
    children.extend(virtio_devices.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), children);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-hardware power or sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.century = RTC_CENTURY_INDEX;
    to_bytes(&fadt.finalize())
}

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(MADT_LAPIC_ADDR_OFFSET, cfg.lapic_addr);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for cpu in 0..cfg.num_cpus {
        // Type, length, ACPI processor UID, APIC ID, flags.
        entries.extend_from_slice(&[MADT_TYPE_LAPIC, 8, cpu, cpu]);
        entries.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    // Type, length, IOAPIC ID, reserved, address, GSI base. The IOAPIC takes
    // the first APIC ID after the vCPUs'.
    entries.extend_from_slice(&[MADT_TYPE_IOAPIC, 12, cfg.num_cpus, 0]);
    entries.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Type, length, bus (ISA), source IRQ 0, GSI 2, flags (conforms to the
    // bus: edge, active high). The PIT output is wired to IOAPIC pin 2.
    entries.extend_from_slice(&[MADT_TYPE_ISO, 10, 0, 0]);
    entries.extend_from_slice(&2u32.to_le_bytes());
    entries.extend_from_slice(&0u16.to_le_bytes());
    // Type, length, processor UID (all), flags (conforms), LINT1.
    entries.extend_from_slice(&[MADT_TYPE_LAPIC_NMI, 6, MADT_ALL_PROCESSORS, 0, 0, 1]);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

fn align_up(addr: u64) -> Option<u64> {
    addr.checked_add(TABLE_ALIGN - 1)
        .map(|a| a & !(TABLE_ALIGN - 1))
}

/// Places tables of the given sizes one after another from [`RSDP_ADDR`],
/// each aligned to [`TABLE_ALIGN`]. Returns their addresses and the end of
/// the last, or [`AcpiError::TooLarge`] if that end passes
/// [`ACPI_REGION_END`].
fn place(sizes: &[usize]) -> Result<(Vec<u64>, u64), AcpiError> {
    let mut addrs = Vec::with_capacity(sizes.len());
    let mut cursor = RSDP_ADDR;
    for &size in sizes {
        let addr = align_up(cursor).ok_or(AcpiError::TooLarge { needed: u64::MAX })?;
        addrs.push(addr);
        cursor = u64::try_from(size)
            .ok()
            .and_then(|s| addr.checked_add(s))
            .ok_or(AcpiError::TooLarge { needed: u64::MAX })?;
    }
    if cursor > ACPI_REGION_END {
        return Err(AcpiError::TooLarge {
            needed: cursor - RSDP_ADDR,
        });
    }
    Ok((addrs, cursor))
}

/// Builds the RSDP, XSDT, FADT, DSDT and MADT for `cfg` and writes them to
/// `mem` from [`RSDP_ADDR`]. Returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestRam,
    cfg: &AcpiConfig,
    virtio: &[MmioSlot],
) -> Result<GuestAddress, AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cfg.num_cpus));
    }

    // Sizes are known before addresses: the only cross-references are the
    // FADT's DSDT pointer, the XSDT's entries and the RSDP's XSDT pointer,
    // none of which change a table's size.
    let dsdt = build_dsdt(virtio);
    let madt = build_madt(cfg);
    let fadt_len = build_fadt(0).len();
    // XSDT: header plus one 64-bit pointer each for the FADT and the MADT.
    let xsdt_len = 36 + 2 * 8;
    let (addrs, end) = place(&[Rsdp::len(), dsdt.len(), fadt_len, madt.len(), xsdt_len])?;
    let &[rsdp_addr, dsdt_addr, fadt_addr, madt_addr, xsdt_addr] = addrs.as_slice() else {
        // `place` returns one address per size.
        return Err(AcpiError::TooLarge { needed: u64::MAX });
    };

    let fadt = build_fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    debug_assert_eq!(xsdt.len(), xsdt_len);
    debug_assert_eq!(fadt.len(), fadt_len);

    // Check the whole area first so a too-small guest gets a clear error and
    // no half-written tables.
    let total = usize::try_from(end - RSDP_ADDR).unwrap_or(usize::MAX);
    if !GuestMemoryBackend::check_range(mem, GuestAddress(RSDP_ADDR), total) {
        return Err(AcpiError::MemoryTooSmall {
            start: RSDP_ADDR,
            end,
        });
    }
    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp),
        ("DSDT", dsdt_addr, &dsdt),
        ("FACP", fadt_addr, &fadt),
        ("APIC", madt_addr, &madt),
        ("XSDT", xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::GuestMemory {
                table,
                addr,
                source,
            })?;
    }
    tracing::debug!(
        rsdp = rsdp_addr,
        end,
        cpus = cfg.num_cpus,
        "ACPI tables written"
    );
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: AcpiConfig = AcpiConfig {
        num_cpus: 1,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
    };

    fn memory(size: usize) -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a whole table (header length) and checks its checksum.
    fn table(mem: &GuestRam, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert!((RSDP_ADDR..ACPI_REGION_END).contains(&addr), "{addr:#x}");
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], signature);
        let len = u32_at(&header, 4) as usize;
        let t = read(mem, addr, len);
        assert_eq!(
            sum(&t),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&t[10..16], &OEM_ID);
        assert!(addr + len as u64 <= ACPI_REGION_END);
        t
    }

    struct Tables {
        xsdt_entries: Vec<u64>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    fn parse(mem: &GuestRam, rsdp_addr: GuestAddress) -> Tables {
        assert_eq!(rsdp_addr.0, RSDP_ADDR);
        let rsdp = read(mem, RSDP_ADDR, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");

        let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
        let xsdt_entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let find = |sig: &[u8; 4]| {
            let hits: Vec<u64> = xsdt_entries
                .iter()
                .copied()
                .filter(|&a| &read(mem, a, 4)[..] == sig)
                .collect();
            assert_eq!(
                hits.len(),
                1,
                "one {} in the XSDT",
                String::from_utf8_lossy(sig)
            );
            hits[0]
        };
        let fadt = table(mem, find(b"FACP"), b"FACP");
        let madt = table(mem, find(b"APIC"), b"APIC");
        let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
        Tables {
            xsdt_entries,
            fadt,
            madt,
            dsdt,
        }
    }

    #[test]
    fn tables_parse_back() {
        let mem = memory(2 << 20);
        let rsdp = create_acpi_tables(&mem, &CONFIG, &[]).unwrap();
        let t = parse(&mem, rsdp);
        assert_eq!(t.xsdt_entries.len(), 2);

        // FADT.
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16_at(f, 109);
        assert_ne!(iapc & IAPC_8042, 0, "8042 present");
        assert_ne!(iapc & IAPC_VGA_NOT_PRESENT, 0, "no VGA");
        assert_eq!(iapc & (1 << 5), 0, "CMOS RTC present");
        assert_eq!(f[108], RTC_CENTURY_INDEX);
        // GAS: space, bit width, bit offset, access size, address.
        let gas = |off: usize| {
            (
                f[off],
                f[off + 1],
                f[off + 2],
                f[off + 3],
                u64_at(f, off + 4),
            )
        };
        assert_eq!(
            gas(116),
            (1, 8, 0, 1, u64::from(RESET_PORT)),
            "reset register"
        );
        assert_eq!(f[128], RESET_VALUE);
        assert_eq!(
            gas(244),
            (1, 8, 0, 1, u64::from(SLEEP_CONTROL_PORT)),
            "sleep control"
        );
        assert_eq!(
            gas(256),
            (1, 8, 0, 1, u64::from(SLEEP_STATUS_PORT)),
            "sleep status"
        );
        assert_eq!(u32_at(f, 36), 0, "no FACS");
        assert_eq!(u64_at(f, 132), 0, "no X_FACS");

        // DSDT.
        let d = &t.dsdt;
        let s5 = d
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in DSDT");
        // NameOp precedes the name; PackageOp, PkgLength, 1 element,
        // BytePrefix 5 follow it.
        assert_eq!(d[s5 - 1], 0x08);
        assert_eq!(&d[s5 + 4..s5 + 9], &[0x12, 0x04, 0x01, 0x0a, S5_SLP_TYP]);
        assert!(d.windows(4).any(|w| w == b"COM1"));
        assert!(d.windows(4).any(|w| w == b"_CRS"));
        // The COM1 I/O descriptor: 16-bit decode, 0x3f8..0x3f8, 8 ports.
        assert!(d
            .windows(8)
            .any(|w| w == [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]));
        // The _HID strings, read back from their compressed EISA IDs.
        let hids: Vec<String> = d
            .windows(9)
            .filter(|w| w[..4] == *b"_HID" && w[4] == 0x0c)
            .map(|w| eisa_id(u32::from_le_bytes([w[5], w[6], w[7], w[8]])))
            .collect();
        assert_eq!(hids, ["PNP0501", "PNP0303", "PNP0B00", "PNP0C0C"]);
        // The GED's _HID is a string, and it has an _EVT method taking one
        // argument that notifies \_SB_.PWRB with 0x80 when it is the
        // button's GSI.
        assert!(d.windows(9).any(|w| w == b"ACPI0013\0"));
        let evt = d
            .windows(4)
            .position(|w| w == b"_EVT")
            .expect("_EVT in the DSDT");
        assert_eq!(d[evt + 4], 0x09, "one argument, serialized");
        let body = &d[evt..];
        // NotifyOp, \ MultiNamePrefix... or DualNamePrefix _SB_ PWRB, BytePrefix 0x80.
        assert!(body.windows(13).any(|w| w == b"\x86\\\x2e_SB_PWRB\x0a\x80"));
        // The i8042's two single ports, the RTC's pair.
        assert!(d
            .windows(8)
            .any(|w| w == [0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x00, 0x01]));
        assert!(d
            .windows(8)
            .any(|w| w == [0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x00, 0x01]));
        assert!(d
            .windows(8)
            .any(|w| w == [0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x00, 0x02]));
        // Extended interrupt descriptors (0x89, length 6, flags, one IRQ)
        // for IRQs 4 (COM1), 1 (keyboard) and 8 (RTC).
        let irqs: Vec<u32> = d
            .windows(9)
            .filter(|w| w[0] == 0x89 && w[1] == 6 && w[2] == 0 && w[4] == 1)
            .map(|w| u32::from_le_bytes([w[5], w[6], w[7], w[8]]))
            .collect();
        assert_eq!(irqs, [4, 1, 8, POWER_BUTTON_GSI]);
    }

    /// Walks the MADT's interrupt controller structures.
    /// Decodes a compressed EISA ID (AML's EISAID(), stored big-endian).
    fn eisa_id(v: u32) -> String {
        let v = v.swap_bytes();
        let letter = |shift: u32| char::from(b'@' + ((v >> shift) & 0x1f) as u8);
        format!(
            "{}{}{}{:04X}",
            letter(26),
            letter(21),
            letter(16),
            v & 0xffff
        )
    }

    fn madt_entries(m: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let len = m[off + 1] as usize;
            assert!(len >= 2 && off + len <= m.len(), "entry at {off} fits");
            out.push(&m[off..off + len]);
            off += len;
        }
        out
    }

    #[test]
    fn madt_describes_cpus_and_ioapic() {
        for n in [1u8, 2, 8, MAX_CPUS] {
            let mem = memory(2 << 20);
            let cfg = AcpiConfig {
                num_cpus: n,
                ..CONFIG
            };
            let t = parse(&mem, create_acpi_tables(&mem, &cfg, &[]).unwrap());
            let m = &t.madt;
            assert_eq!(u32_at(m, 36), 0xfee0_0000);
            let entries = madt_entries(m);
            let lapics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
            assert_eq!(lapics.len(), usize::from(n), "{n} CPUs");
            for (i, e) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!((e[2], e[3]), (i as u8, i as u8), "UID and APIC ID");
                assert_eq!(u32_at(e, 4) & 1, 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == 1).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][2], n, "IOAPIC ID follows the CPUs'");
            assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
            assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
            let isos: Vec<_> = entries.iter().filter(|e| e[0] == 2).collect();
            assert_eq!(isos.len(), 1);
            assert_eq!(
                (isos[0][2], isos[0][3], u32_at(isos[0], 4)),
                (0, 0, 2),
                "IRQ0 -> GSI2"
            );
            assert!(entries.iter().any(|e| e[0] == 4 && e[5] == 1), "LINT1 NMI");
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = memory(2 << 20);
        for n in [0u8, 255] {
            let cfg = AcpiConfig {
                num_cpus: n,
                ..CONFIG
            };
            assert!(matches!(
                create_acpi_tables(&mem, &cfg, &[]),
                Err(AcpiError::CpuCount(x)) if x == n
            ));
        }
    }

    #[test]
    fn rejects_memory_without_the_acpi_area() {
        // RAM ends below the RSDP.
        let mem = memory(0x8_0000);
        let err = create_acpi_tables(&mem, &CONFIG, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                AcpiError::MemoryTooSmall {
                    start: RSDP_ADDR,
                    ..
                }
            ),
            "{err}"
        );
        // RAM ends 2 KiB into the area, enough for the RSDP but not for a
        // 254-CPU MADT: nothing is written.
        let mem = memory(RSDP_ADDR as usize + 0x800);
        let cfg = AcpiConfig {
            num_cpus: MAX_CPUS,
            ..CONFIG
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg, &[]),
            Err(AcpiError::MemoryTooSmall { .. })
        ));
        assert_eq!(read(&mem, RSDP_ADDR, 8), vec![0u8; 8]);
    }

    #[test]
    fn placement_is_aligned_and_bounded() {
        let (addrs, end) = place(&[36, 100, 276]).unwrap();
        assert_eq!(addrs, vec![RSDP_ADDR, RSDP_ADDR + 48, RSDP_ADDR + 160]);
        assert_eq!(end, RSDP_ADDR + 160 + 276);
        let too_big = (ACPI_REGION_END - RSDP_ADDR) as usize;
        assert!(matches!(
            place(&[36, too_big]),
            Err(AcpiError::TooLarge { .. })
        ));
        assert!(matches!(
            place(&[usize::MAX]),
            Err(AcpiError::TooLarge { .. })
        ));
        // Exactly filling the area is fine.
        assert!(place(&[too_big]).is_ok());
    }
}
