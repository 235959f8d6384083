//! Linux boot through the x86 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the kernel (bzImage or ELF vmlinux)
//! and initrd in guest memory, the command line, the zero page with its e820
//! map, and the processor state at the 64-bit entry point.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hypervisor::x86::bits::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED};
use hypervisor::x86::msr;
use hypervisor::{
    DescriptorTable, FpuState, GuestRam, MsrEntry, Segment, SpecialRegisters, StandardRegisters,
};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{self, E820Entry};

/// "HdrS", the boot-protocol magic at offset 0x202 of a bzImage.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// `xloadflags` bit: the kernel has the 64-bit entry point at load + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of `startup_64` from the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Kernels before boot protocol 2.06 do not say; they accept 255 bytes.
const DEFAULT_CMDLINE_MAX: usize = 255;
/// The x86 kernel's COMMAND_LINE_SIZE, for an ELF vmlinux that carries no
/// setup header to ask.
const ELF_CMDLINE_MAX: usize = 2047;
/// Highest initrd end for protocol versions that do not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

/// GDT selectors the boot protocol requires (__BOOT_CS, __BOOT_DS).
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;

/// Why a kernel, initrd or command line cannot be booted. Each message
/// names the file and the problem in one line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is empty")]
    KernelEmpty(PathBuf),
    #[error("{0} is not a Linux kernel: it has neither a bzImage boot header nor an ELF header")]
    NotAKernel(PathBuf),
    #[error("kernel {path} is not usable: {reason}")]
    KernelInvalid { path: PathBuf, reason: String },
    #[error("kernel {path} ({size} bytes, decompressed at {load:#x}) does not fit in {memory_mib} MiB of guest memory; give the guest more")]
    KernelTooBig {
        path: PathBuf,
        size: u64,
        load: u64,
        memory_mib: u64,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {0} is empty")]
    InitrdEmpty(PathBuf),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel's end ({kernel_end:#x}) and {limit:#x}; give the guest more memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is invalid: {0}")]
    CmdlineInvalid(String),
    #[error("writing {what} into guest memory: {reason}")]
    GuestMemory { what: &'static str, reason: String },
}

/// The kind of kernel image, told by its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Looks at the first bytes of a kernel file.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let metadata = file.metadata().map_err(read_err)?;
    if metadata.is_dir() {
        return Err(BootError::KernelRead {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "it is a directory"),
        });
    }
    if metadata.len() == 0 {
        return Err(BootError::KernelEmpty(path.to_path_buf()));
    }
    let mut head = vec![0u8; 0x210];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(read_err)? {
            0 => break,
            n => filled += n,
        }
    }
    head.truncate(filled);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(path.to_path_buf()))
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Longest command line (without the NUL) this kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        match &self.setup_header {
            Some(hdr) if hdr.version >= 0x0206 && hdr.cmdline_size > 0 => hdr.cmdline_size as usize,
            Some(_) => DEFAULT_CMDLINE_MAX,
            None => ELF_CMDLINE_MAX,
        }
    }

    /// Highest address the initrd may end at.
    fn initrd_addr_max(&self) -> u64 {
        match &self.setup_header {
            Some(hdr) if hdr.version >= 0x0203 && hdr.initrd_addr_max != 0 => {
                u64::from(hdr.initrd_addr_max)
            }
            Some(_) => DEFAULT_INITRD_ADDR_MAX,
            // A vmlinux decides nothing here; stay below 4 GiB because the
            // zero page holds 32-bit initrd fields.
            None => u64::from(u32::MAX),
        }
    }
}

/// Loads the kernel at `path` into `mem`.
/// Where a bzImage loaded at `load` decompresses itself: at `load`, or
/// up at its preferred address if that is higher (the decompressor of a
/// relocatable kernel never goes below `pref_address`).
fn decompress_base(load: u64, hdr: &setup_header) -> u64 {
    let pref = hdr.pref_address;
    load.max(pref)
}

pub fn load_kernel(
    mem: &GuestRam,
    path: &Path,
    memory_size: u64,
) -> Result<LoadedKernel, BootError> {
    let format = kernel_format(path)?;
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    let too_big = |load: u64| BootError::KernelTooBig {
        path: path.to_path_buf(),
        size,
        load,
        memory_mib: memory_size >> 20,
    };
    match format {
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(|e| match e {
                loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel) => {
                    too_big(layout::HIGH_MEMORY_START)
                }
                other => BootError::KernelInvalid {
                    path: path.to_path_buf(),
                    reason: other.to_string(),
                },
            })?;
            let hdr = result
                .setup_header
                .ok_or_else(|| BootError::KernelInvalid {
                    path: path.to_path_buf(),
                    reason: "no setup header".into(),
                })?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::KernelInvalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "boot protocol {}.{:02} without a 64-bit entry point (vessel needs 2.12 or later with XLF_KERNEL_64)",
                        hdr.version >> 8,
                        hdr.version & 0xff
                    ),
                });
            }
            // The decompressor needs init_size bytes from where it runs:
            // its load address, or the kernel's preferred address when that
            // is higher (a relocatable kernel moves up to it: Debian's to
            // 16 MiB, needing 51.5 MiB from there).
            let needed_end = decompress_base(result.kernel_load.0, &hdr)
                .saturating_add(u64::from(hdr.init_size))
                .max(result.kernel_end);
            if needed_end > layout::low_ram_end(memory_size) {
                return Err(too_big(decompress_base(result.kernel_load.0, &hdr)));
            }
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end: result.kernel_end,
                setup_header: Some(hdr),
            })
        }
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, highmem).map_err(|e| match e {
                loader::Error::Elf(loader::elf::Error::ReadKernelImage) => {
                    too_big(layout::HIGH_MEMORY_START)
                }
                other => BootError::KernelInvalid {
                    path: path.to_path_buf(),
                    reason: other.to_string(),
                },
            })?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                end: result.kernel_end,
                setup_header: None,
            })
        }
    }
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Chooses the initrd's address: as high as the kernel allows, page
/// aligned, below the MMIO hole, above the kernel. Pure arithmetic, so it
/// can be tested without files.
pub fn place_initrd(
    kernel: &LoadedKernel,
    memory_size: u64,
    size: u64,
    path: &Path,
) -> Result<InitrdPlacement, BootError> {
    let limit = layout::low_ram_end(memory_size).min(kernel.initrd_addr_max().saturating_add(1));
    // The bzImage decompressor works in [load, load + init_size); keep the
    // initrd out of it.
    let kernel_end = match &kernel.setup_header {
        Some(hdr) => kernel.end.max(
            decompress_base(layout::HIGH_MEMORY_START, hdr)
                .saturating_add(u64::from(hdr.init_size)),
        ),
        None => kernel.end,
    };
    let too_big = || BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_big());
    }
    Ok(InitrdPlacement { addr, size })
}

/// Reads the initrd into guest memory at its placement.
pub fn load_initrd(
    mem: &GuestRam,
    kernel: &LoadedKernel,
    memory_size: u64,
    path: &Path,
) -> Result<InitrdPlacement, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let metadata = file.metadata().map_err(read_err)?;
    if metadata.is_dir() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "it is a directory",
        )));
    }
    let size = metadata.len();
    if size == 0 {
        return Err(BootError::InitrdEmpty(path.to_path_buf()));
    }
    let placement = place_initrd(kernel, memory_size, size, path)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        kernel_end: kernel.end,
        limit: placement.addr,
    })?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut file, len)
        .map_err(|e| BootError::InitrdRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(placement)
}

/// Checks `cmdline` against the kernel's limit and writes it to guest memory.
pub fn load_cmdline(mem: &GuestRam, kernel: &LoadedKernel, cmdline: &str) -> Result<(), BootError> {
    let cmdline = build_cmdline(cmdline, kernel.cmdline_max())?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline).map_err(|e| {
        BootError::GuestMemory {
            what: "the kernel command line",
            reason: e.to_string(),
        }
    })
}

/// A [`Cmdline`] holding `text`, which may be at most `max` bytes long.
pub fn build_cmdline(text: &str, max: usize) -> Result<Cmdline, BootError> {
    if text.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    // Cmdline's capacity counts the terminating NUL.
    Cmdline::try_from(text, max + 1).map_err(|e| BootError::CmdlineInvalid(e.to_string()))
}

/// Builds the zero page (`boot_params`).
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
    rsdp: Option<GuestAddress>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr).map_err(|_| BootError::GuestMemory {
                what: "the zero page",
                reason: format!("initrd address {:#x} is above 4 GiB", initrd.addr),
            })?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| BootError::GuestMemory {
                what: "the zero page",
                reason: format!("initrd size {} does not fit 32 bits", initrd.size),
            })?;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::GuestMemory {
            what: "the zero page",
            reason: format!(
                "{} e820 entries, the zero page holds {}",
                e820.len(),
                params.e820_table.len()
            ),
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = e820.len() as u8;
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    Ok(params)
}

/// Writes the zero page at [`layout::ZERO_PAGE_ADDR`].
pub fn write_zero_page(mem: &GuestRam, params: &boot_params) -> Result<(), BootError> {
    LinuxBootConfigurator::write_bootparams::<GuestRam>(
        &BootParams::new::<boot_params>(params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::GuestMemory {
        what: "the zero page",
        reason: e.to_string(),
    })
}

/// Writes the boot GDT and page tables that identity-map the first 4 GiB
/// with 2 MiB pages, as the 64-bit boot protocol requires for the kernel,
/// the zero page and the command line.
pub fn write_boot_tables(mem: &GuestRam) -> Result<(), BootError> {
    let err = |what| {
        move |e: vm_memory::GuestMemoryError| BootError::GuestMemory {
            what,
            reason: e.to_string(),
        }
    };
    let gdt = [0u64, 0, GDT_CODE64, GDT_DATA, GDT_TSS];
    for (i, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(err("the boot GDT"))?;
    }
    mem.write_obj(layout::PDPT_ADDR | 0x3, GuestAddress(layout::PML4_ADDR))
        .map_err(err("the boot PML4"))?;
    for gib in 0..4u64 {
        let pd = layout::PD_ADDR + gib * PAGE_SIZE;
        mem.write_obj(pd | 0x3, GuestAddress(layout::PDPT_ADDR + gib * 8))
            .map_err(err("the boot PDPT"))?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = ((gib << 30) + (i << 21)) | 0x83;
            mem.write_obj(entry, GuestAddress(pd + i * 8))
                .map_err(err("the boot page directory"))?;
        }
    }
    Ok(())
}

/// Processor state of the boot vCPU at the kernel's 64-bit entry.
#[derive(Debug, Clone)]
pub struct BootCpuState {
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
    pub fpu: FpuState,
    pub msrs: Vec<MsrEntry>,
}

/// The 64-bit boot protocol's entry state: long mode with the boot page
/// tables, flat __BOOT_CS/__BOOT_DS segments, RSI = zero page, interrupts off.
pub fn boot_cpu_state(entry: GuestAddress) -> BootCpuState {
    let code = Segment::from_descriptor(BOOT_CS, GDT_CODE64);
    let data = Segment::from_descriptor(BOOT_DS, GDT_DATA);
    let tss = Segment::from_descriptor(BOOT_TSS, GDT_TSS);
    let sregs = SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt: Segment {
            type_: 0x2,
            present: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: layout::GDT_ADDR,
            limit: (5 * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: CR0_PE | CR0_PG | CR0_ET,
        cr3: layout::PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..Default::default()
    };
    let regs = StandardRegisters {
        rip: entry.0,
        rsi: layout::ZERO_PAGE_ADDR,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    let msrs = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::MSR_STAR, 0),
        (msr::MSR_CSTAR, 0),
        (msr::MSR_KERNEL_GS_BASE, 0),
        (msr::MSR_SYSCALL_MASK, 0),
        (msr::MSR_LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::IA32_MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect();
    BootCpuState {
        regs,
        sregs,
        fpu: FpuState::default(),
        msrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::GuestRam;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    /// A minimal bzImage: a setup header with the fields the loader and
    /// the boot protocol read, 4 setup sectors, then `payload` bytes of
    /// "protected-mode kernel".
    fn fake_bzimage(payload: usize, init_size: u32, cmdline_size: u32) -> tempfile::NamedTempFile {
        let setup_sects = 4u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        image[0x1f1] = setup_sects;
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 0x01; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        image[0x234] = 1; // relocatable
        image[0x236..0x238].copy_from_slice(&(XLF_KERNEL_64 | 0x2).to_le_bytes()); // xloadflags
        image[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        for (i, b) in image[(usize::from(setup_sects) + 1) * 512..]
            .iter_mut()
            .enumerate()
        {
            *b = (i % 251) as u8;
        }
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&image).expect("write image");
        file
    }

    fn memory(size: u64) -> GuestRam {
        GuestRam::from_ranges(&layout::ram_regions(size)).expect("guest memory")
    }

    #[test]
    fn bzimage_loads_at_1mib_with_64bit_entry() {
        let image = fake_bzimage(64 * 1024, 4 * MIB as u32, 2047);
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, image.path(), 64 * MIB).expect("load");
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.entry, GuestAddress(0x10_0200));
        assert_eq!(kernel.end, 0x10_0000 + 64 * 1024);
        let first: u8 = mem.read_obj(GuestAddress(0x10_0000 + 7)).expect("read");
        assert_eq!(first, 7);
        assert_eq!(kernel.cmdline_max(), 2047);
    }

    #[test]
    fn kernel_too_big_for_memory_is_refused() {
        // The decompressor would need 40 MiB; the guest has 16.
        let image = fake_bzimage(64 * 1024, 40 * MIB as u32, 2047);
        let mem = memory(16 * MIB);
        let err = load_kernel(&mem, image.path(), 16 * MIB).expect_err("must not fit");
        assert!(matches!(err, BootError::KernelTooBig { .. }), "{err}");
        // An image whose bytes themselves run past the end of RAM.
        let image = fake_bzimage(17 * MIB as usize, 17 * MIB as u32, 2047);
        let err = load_kernel(&mem, image.path(), 16 * MIB).expect_err("must not fit");
        assert!(matches!(err, BootError::KernelTooBig { .. }), "{err}");
        assert!(err.to_string().contains("does not fit in 16 MiB"), "{err}");
    }

    #[test]
    fn a_kernel_decompresses_at_its_preferred_address() {
        // 40 MiB from 1 MiB would fit in 48 MiB; from the preferred 16 MiB
        // (where a relocatable kernel's decompressor moves) it does not.
        let image = fake_bzimage(64 * 1024, 40 * MIB as u32, 2047);
        let mut bytes = std::fs::read(image.path()).unwrap();
        bytes[0x258..0x260].copy_from_slice(&(16 * MIB).to_le_bytes());
        std::fs::write(image.path(), &bytes).unwrap();
        let mem = memory(48 * MIB);
        let err = load_kernel(&mem, image.path(), 48 * MIB).expect_err("must not fit");
        assert!(
            err.to_string().contains("at 0x1000000") && err.to_string().contains("48 MiB"),
            "{err}"
        );
        let mem = memory(64 * MIB);
        load_kernel(&mem, image.path(), 64 * MIB).expect("16 + 40 MiB fit in 64");
    }

    #[test]
    fn non_kernels_are_refused_clearly() {
        let mem = memory(32 * MIB);
        let empty = tempfile::NamedTempFile::new().expect("temp");
        assert!(matches!(
            load_kernel(&mem, empty.path(), 32 * MIB),
            Err(BootError::KernelEmpty(_))
        ));
        let mut text = tempfile::NamedTempFile::new().expect("temp");
        text.write_all(b"myhost\n").expect("write");
        let err = load_kernel(&mem, text.path(), 32 * MIB).expect_err("text");
        assert!(matches!(err, BootError::NotAKernel(_)));
        assert!(err.to_string().contains("is not a Linux kernel"));
        let missing = Path::new("/nonexistent/vmlinuz");
        assert!(matches!(
            load_kernel(&mem, missing, 32 * MIB),
            Err(BootError::KernelRead { .. })
        ));
        // A bzImage cut off inside its header.
        let image = fake_bzimage(4096, MIB as u32, 2047);
        let bytes = std::fs::read(image.path()).expect("read");
        let mut cut = tempfile::NamedTempFile::new().expect("temp");
        cut.write_all(&bytes[..0x100]).expect("write");
        assert!(matches!(
            load_kernel(&mem, cut.path(), 32 * MIB),
            Err(BootError::NotAKernel(_))
        ));
        // A truncated ELF header.
        let mut elf = tempfile::NamedTempFile::new().expect("temp");
        elf.write_all(b"\x7fELF\x02\x01\x01").expect("write");
        assert!(matches!(
            load_kernel(&mem, elf.path(), 32 * MIB),
            Err(BootError::KernelInvalid { .. })
        ));
    }

    #[test]
    fn old_protocol_without_64bit_entry_is_refused() {
        let image = fake_bzimage(4096, MIB as u32, 2047);
        let mut bytes = std::fs::read(image.path()).expect("read");
        bytes[0x236] = 0; // no XLF_KERNEL_64
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(&bytes).expect("write");
        let mem = memory(32 * MIB);
        let err = load_kernel(&mem, file.path(), 32 * MIB).expect_err("no 64-bit entry");
        assert!(err.to_string().contains("64-bit entry"), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let image = fake_bzimage(4096, 8 * MIB as u32, 2047);
        let mem = memory(128 * MIB);
        let kernel = load_kernel(&mem, image.path(), 128 * MIB).expect("load");
        let placement = place_initrd(&kernel, 128 * MIB, 5000, Path::new("initrd")).expect("fits");
        assert_eq!(placement.addr % PAGE_SIZE, 0);
        assert!(placement.addr + placement.size <= 128 * MIB);
        assert!(128 * MIB - (placement.addr + placement.size) < PAGE_SIZE);
        // Above 3 GiB of RAM the initrd stays below the MMIO hole.
        let big = place_initrd(&kernel, 8 << 30, 5000, Path::new("initrd")).expect("fits");
        assert!(big.addr + big.size <= layout::MMIO_HOLE_START);
        // initrd_addr_max is honoured.
        let mut low_max = kernel.clone();
        if let Some(hdr) = low_max.setup_header.as_mut() {
            hdr.initrd_addr_max = 0x3fff_ffff;
        }
        let capped = place_initrd(&low_max, 2 << 30, 5000, Path::new("initrd")).expect("fits");
        assert!(capped.addr + capped.size <= 0x4000_0000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let image = fake_bzimage(4096, 8 * MIB as u32, 2047);
        let mem = memory(32 * MIB);
        let kernel = load_kernel(&mem, image.path(), 32 * MIB).expect("load");
        // 30 MiB cannot sit above the kernel's 9 MiB working area in 32 MiB.
        let err =
            place_initrd(&kernel, 32 * MIB, 30 * MIB, Path::new("big.img")).expect_err("too big");
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
        assert!(err.to_string().contains("big.img"));
        // And one larger than all of memory.
        assert!(place_initrd(&kernel, 32 * MIB, 64 * MIB, Path::new("x")).is_err());
        // Loading it from a file gives the same error and writes nothing.
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(&vec![0xaa; 30 * MIB as usize])
            .expect("write");
        assert!(matches!(
            load_initrd(&mem, &kernel, 32 * MIB, file.path()),
            Err(BootError::InitrdTooBig { .. })
        ));
        let empty = tempfile::NamedTempFile::new().expect("temp");
        assert!(matches!(
            load_initrd(&mem, &kernel, 32 * MIB, empty.path()),
            Err(BootError::InitrdEmpty(_))
        ));
    }

    #[test]
    fn initrd_bytes_land_at_the_placement() {
        let image = fake_bzimage(4096, 4 * MIB as u32, 2047);
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, image.path(), 64 * MIB).expect("load");
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(b"070701initrd-bytes").expect("write");
        let placement = load_initrd(&mem, &kernel, 64 * MIB, file.path()).expect("load initrd");
        let mut back = [0u8; 18];
        mem.read_slice(&mut back, GuestAddress(placement.addr))
            .expect("read");
        assert_eq!(&back, b"070701initrd-bytes");
    }

    #[test]
    fn command_line_limit_is_the_kernels() {
        assert!(build_cmdline(&"a".repeat(2047), 2047).is_ok());
        let err = build_cmdline(&"a".repeat(2048), 2047).expect_err("too long");
        assert_eq!(
            err.to_string(),
            "kernel command line is 2048 bytes; this kernel accepts at most 2047"
        );
        let image = fake_bzimage(4096, MIB as u32, 255);
        let mem = memory(32 * MIB);
        let kernel = load_kernel(&mem, image.path(), 32 * MIB).expect("load");
        assert_eq!(kernel.cmdline_max(), 255);
        assert!(load_cmdline(&mem, &kernel, &"x".repeat(256)).is_err());
        load_cmdline(&mem, &kernel, "console=ttyS0 quiet").expect("fits");
        let mut back = [0u8; 20];
        mem.read_slice(&mut back, GuestAddress(layout::CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&back, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn zero_page_carries_header_cmdline_initrd_e820_and_rsdp() {
        let image = fake_bzimage(4096, MIB as u32, 2047);
        let mem = memory(256 * MIB);
        let kernel = load_kernel(&mem, image.path(), 256 * MIB).expect("load");
        let e820 = layout::e820_map(256 * MIB);
        let initrd = InitrdPlacement {
            addr: 0x0f00_0000,
            size: 12345,
        };
        let params = zero_page(
            &kernel,
            19,
            Some(initrd),
            &e820,
            Some(GuestAddress(0xe_0000)),
        )
        .expect("zero page");
        write_zero_page(&mem, &params).expect("write");
        let back: boot_params = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_ADDR))
            .expect("read back");
        assert_eq!({ back.hdr.header }, HDRS_MAGIC);
        assert_eq!({ back.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!(back.hdr.type_of_loader, LOADER_UNDEFINED);
        assert_eq!({ back.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ back.hdr.cmdline_size }, 19);
        assert_eq!({ back.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ back.hdr.ramdisk_size }, 12345);
        assert_eq!({ back.hdr.code32_start }, 0x10_0000);
        assert_eq!({ back.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(usize::from(back.e820_entries), e820.len());
        for (entry, want) in back.e820_table.iter().zip(&e820) {
            assert_eq!(
                ({ entry.addr }, { entry.size }, { entry.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
    }

    #[test]
    fn boot_state_is_long_mode_with_boot_selectors() {
        let state = boot_cpu_state(GuestAddress(0x10_0200));
        assert_eq!(state.regs.rip, 0x10_0200);
        assert_eq!(state.regs.rsi, layout::ZERO_PAGE_ADDR);
        assert_eq!(state.regs.rflags & (1 << 9), 0, "interrupts must be off");
        assert_eq!(state.sregs.cs.selector, BOOT_CS);
        assert!(state.sregs.cs.l && !state.sregs.cs.db);
        assert_eq!(state.sregs.ds.selector, BOOT_DS);
        assert_eq!(
            state.sregs.efer & (EFER_LME | EFER_LMA),
            EFER_LME | EFER_LMA
        );
        assert_eq!(state.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
    }

    #[test]
    fn boot_page_tables_identity_map_four_gib() {
        let mem = memory(32 * MIB);
        write_boot_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).expect("pml4");
        assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR);
        for gib in 0..4u64 {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(layout::PDPT_ADDR + gib * 8))
                .expect("pdpte");
            let pd = pdpte & !0xfff;
            let last: u64 = mem.read_obj(GuestAddress(pd + 511 * 8)).expect("pde");
            assert_eq!(last & !0xfff, (gib << 30) + (511 << 21));
            assert_eq!(last & 0x81, 0x81, "present 2 MiB page");
        }
    }
}
