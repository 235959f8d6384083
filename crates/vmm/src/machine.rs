//! Assembling and running one machine: guest memory, the Linux boot state,
//! ACPI tables, the device buses, one host thread per vCPU, and the main
//! loop that waits for the guest to stop, for the console's input and for
//! stop signals.

use hypervisor::GuestRam;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::acpi_pm::AcpiPowerDevice;
use devices::bus::{Bus, BusDevice};
use devices::exit_status::{ExitStatus, ExitStatusPort};
use devices::i8042::{self, I8042};
use devices::interrupt::InterruptLine;
use devices::power::{PowerSignal, VmEvent};
use devices::rtc::{self, Rtc};
use devices::serial::{self, Serial};
use hypervisor::{Hypervisor, Vcpu, VcpuExit, VcpuInterrupter, Vm, VmConfig};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskConfig, DiskFormat, MachineConfig, NicConfig, SigtermAction};
use crate::layout::MmioSlot;
use crate::sys::{self, SignalFd};
use crate::{acpi, boot, layout};

/// Ctrl-A, the console escape (as in QEMU): Ctrl-A x stops the VM.
const ESCAPE_BYTE: u8 = 0x01;

/// Why a machine stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (ACPI reset register, i8042, KVM event).
    Reset,
    /// The processor shut down: a triple fault.
    TripleFault,
    /// A vCPU halted with nothing left to wake it (no in-kernel irqchip).
    Halted,
    /// A host signal (SIGINT, SIGTERM, SIGHUP) stopped the VM.
    Signal(i32),
    /// The user typed the console escape (Ctrl-A x).
    ConsoleEscape,
    /// The accelerator or the VMM failed; the VM could not go on.
    Error(String),
}

/// How a machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reason: StopReason,
    /// What the guest reported on the exit-status port, if anything.
    pub exit_status: Option<u8>,
}

/// Where the guest's serial console goes.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    /// Host input for the guest's serial port (the terminal, a pipe), or
    /// none.
    pub input: Option<RawFd>,
    /// Recognize Ctrl-A x in the input as "stop the VM" (interactive use).
    pub escape: bool,
}

/// Errors setting up a machine. Errors that happen while it runs end it
/// with [`StopReason::Error`] instead.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("{op}: {source}")]
    Hypervisor {
        op: &'static str,
        #[source]
        source: hypervisor::HypervisorError,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device set-up: {0}")]
    Device(String),
    /// A disk image that cannot be used (missing, locked, ...); the
    /// message names it.
    #[error(transparent)]
    Disk(#[from] disk::ImageError),
    /// A tap device that cannot be opened; the message says why.
    #[error(transparent)]
    Tap(#[from] virtio::tap::TapError),
    /// The vsock socket path cannot be used.
    #[error(transparent)]
    Vsock(#[from] virtio::vsock::VsockError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

fn hv_err(op: &'static str) -> impl FnOnce(hypervisor::HypervisorError) -> VmmError {
    move |source| VmmError::Hypervisor { op, source }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { op, source }
}

/// State the vCPU threads share with the main loop.
struct Shared {
    pio: Bus,
    mmio: Bus,
    power: PowerSignal,
    /// Set when the VM is being torn down; vCPU threads leave their loop.
    stopping: AtomicBool,
    /// The first reason a vCPU thread found to stop the VM.
    vcpu_stop: Mutex<Option<StopReason>>,
    /// Readable once `vcpu_stop` is set.
    vcpu_stopped: EventFd,
}

impl Shared {
    fn stop_from_vcpu(&self, reason: StopReason) {
        if let Ok(mut slot) = self.vcpu_stop.lock() {
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        // Waking the main loop cannot meaningfully fail; if it did, the
        // loop still sees `vcpu_stop` on its next timeout.
        let _ = self.vcpu_stopped.write(1);
    }
}

/// Guest memory with the kernel, initrd, command line, zero page, boot
/// tables and ACPI tables in place, and the boot vCPU's entry state.
pub struct PreparedGuest {
    pub memory: GuestRam,
    pub boot_cpu: boot::BootCpuState,
}

/// The virtio devices of a machine, in slot order: the disks, the NICs,
/// then the entropy device.
enum VirtioKind<'a> {
    Disk(&'a DiskConfig),
    Nic(&'a NicConfig),
    Rng,
    Vsock,
}

fn virtio_kinds(config: &MachineConfig) -> Vec<VirtioKind<'_>> {
    let mut kinds: Vec<VirtioKind> = config.disks.iter().map(VirtioKind::Disk).collect();
    kinds.extend(config.nics.iter().map(VirtioKind::Nic));
    if config.rng {
        kinds.push(VirtioKind::Rng);
    }
    if config.vsock.is_some() {
        kinds.push(VirtioKind::Vsock);
    }
    kinds
}

/// Where each virtio device of `config` sits (window and GSI).
pub fn virtio_slots(config: &MachineConfig) -> Result<Vec<MmioSlot>, VmmError> {
    let count = virtio_kinds(config).len();
    (0..count)
        .map(|i| {
            layout::virtio_slot(i).ok_or(VmmError::Config(
                crate::config::ConfigError::TooManyDevices {
                    count,
                    max: layout::VIRTIO_GSIS.len(),
                },
            ))
        })
        .collect()
}

/// Opens (and locks) every disk image of `config`, before anything else
/// is set up, so that a missing or busy image is the first error.
fn open_disks(config: &MachineConfig) -> Result<Vec<Box<dyn disk::DiskImage>>, VmmError> {
    let mut images: Vec<Box<dyn disk::DiskImage>> = Vec::new();
    for spec in &config.disks {
        let file = disk::open_locked(&spec.path, spec.readonly)?;
        match spec.format {
            DiskFormat::Raw => {
                // Never guessed: a raw image whose guest wrote a qcow2
                // header (naming any backing file) must stay raw.
                if disk::looks_like_qcow2(&file) {
                    return Err(VmmError::Device(format!(
                        "disk image {}: is a qcow2 image; say so with format=qcow2",
                        spec.path.display()
                    )));
                }
                images.push(Box::new(disk::RawImage::new(file, &spec.path)?));
            }
            DiskFormat::Qcow2 => images.push(Box::new(disk::qcow2::Qcow2Image::open(
                file,
                &spec.path,
                spec.readonly,
            )?)),
        }
    }
    Ok(images)
}

/// Opens every tap of `config` (each a clear error when it cannot be).
fn open_taps(config: &MachineConfig) -> Result<Vec<virtio::tap::Tap>, VmmError> {
    config
        .nics
        .iter()
        .map(|nic| Ok(virtio::tap::Tap::open(nic.tap.as_deref())?))
        .collect()
}

/// A random address in QEMU's 52:54:00 range (as QEMU gives a NIC without
/// one; the random part keeps two VMs on one bridge apart).
fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut tail);
    }
    [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]
}

/// The serial number of `disk`: the configured one, else its file name
/// (at most 20 bytes, cut at a character boundary).
fn disk_serial(disk: &DiskConfig) -> String {
    if let Some(serial) = &disk.serial {
        return serial.clone();
    }
    let name = disk
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cut = name.len().min(virtio::block::ID_BYTES);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    name[..cut].to_string()
}

/// A device's interrupt line: the accelerator's edge trigger for one GSI.
struct GsiLine(Arc<dyn hypervisor::EdgeTrigger>);

impl GsiLine {
    fn new(vm: &dyn Vm, gsi: u32) -> hypervisor::Result<GsiLine> {
        vm.edge_trigger(gsi).map(GsiLine)
    }
}

impl InterruptLine for GsiLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Creates the virtio devices on the MMIO bus: each one's queue
/// notifications are ioeventfds and its interrupt the accelerator's edge
/// trigger (an irqfd on KVM), so the guest's I/O goes between the vCPU and
/// the device's I/O thread without the VMM.
fn create_virtio_devices(
    vm: &dyn Vm,
    config: &MachineConfig,
    memory: &GuestRam,
    mut disks: Vec<Box<dyn disk::DiskImage>>,
    mut taps: Vec<virtio::tap::Tap>,
    mut vsock: Option<virtio::Vsock>,
    mmio: &Bus,
) -> Result<(), VmmError> {
    let slots = virtio_slots(config)?;
    disks.reverse();
    taps.reverse();
    for (index, (kind, slot)) in virtio_kinds(config).into_iter().zip(slots).enumerate() {
        let device: Box<dyn virtio::VirtioDevice> = match kind {
            VirtioKind::Disk(disk) => {
                let Some(image) = disks.pop() else {
                    return Err(VmmError::Device("a disk image went missing".into()));
                };
                let name = format!("virtio-blk{index}");
                Box::new(virtio::Block::new(
                    image,
                    disk.readonly,
                    &disk_serial(disk),
                    &name,
                ))
            }
            VirtioKind::Nic(nic) => {
                let Some(tap) = taps.pop() else {
                    return Err(VmmError::Device("a tap device went missing".into()));
                };
                let mac = nic.mac.unwrap_or_else(random_mac);
                tracing::info!(tap = tap.name(), "virtio-net on the tap");
                Box::new(virtio::Net::new(tap, mac, &format!("virtio-net{index}")))
            }
            VirtioKind::Rng => Box::new(virtio::Rng::new(&format!("virtio-rng{index}"))),
            VirtioKind::Vsock => match vsock.take() {
                Some(device) => Box::new(device),
                None => return Err(VmmError::Device("the vsock device went missing".into())),
            },
        };
        let line =
            GsiLine::new(vm, slot.gsi).map_err(hv_err("wiring a virtio device's interrupt"))?;
        let interrupt = Arc::new(virtio::Interrupt::new(Arc::new(line)));
        let mut notifiers = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("virtio queue eventfd"))?;
            vm.register_ioevent(
                &fd,
                slot.base + virtio::mmio::QUEUE_NOTIFY,
                false,
                Some(queue as u32),
            )
            .map_err(hv_err("wiring a virtio queue notification"))?;
            notifiers.push(Arc::new(fd));
        }
        let transport = virtio::MmioTransport::new(device, memory.clone(), interrupt, notifiers)
            .map_err(VmmError::Device)?;
        mmio.insert(transport.into_bus_device(), slot.base, slot.len)
            .map_err(|e| VmmError::Device(format!("virtio device {index}: {e}")))?;
    }
    Ok(())
}

/// Builds guest memory and everything the kernel finds in it at entry.
/// Nothing runs yet, so this is where bad kernels, initrds and command
/// lines are refused.
pub fn prepare_guest(config: &MachineConfig) -> Result<PreparedGuest, VmmError> {
    let memory = GuestRam::from_ranges(&layout::ram_regions(config.memory)).map_err(|e| {
        VmmError::Memory {
            mib: config.memory >> 20,
            reason: e.to_string(),
        }
    })?;
    crate::sys::advise_huge_pages(&memory);
    let kernel = boot::load_kernel(&memory, &config.kernel, config.memory)?;
    boot::load_cmdline(&memory, &kernel, &config.cmdline)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&memory, &kernel, config.memory, path)?),
        None => None,
    };
    let acpi_config = acpi::AcpiConfig {
        num_cpus: u8::try_from(config.cpus)
            .map_err(|_| VmmError::Acpi(format!("{} vCPUs", config.cpus)))?,
        ioapic_addr: layout::IOAPIC_ADDR as u32,
        lapic_addr: layout::LAPIC_ADDR as u32,
    };
    let rsdp = acpi::create_acpi_tables(&memory, &acpi_config, &virtio_slots(config)?)
        .map_err(|e| VmmError::Acpi(e.to_string()))?;
    let params = boot::zero_page(
        &kernel,
        config.cmdline.len(),
        initrd,
        &layout::e820_map(config.memory),
        Some(rsdp),
    )?;
    boot::write_zero_page(&memory, &params)?;
    boot::write_boot_tables(&memory)?;
    Ok(PreparedGuest {
        memory,
        boot_cpu: boot::boot_cpu_state(kernel.entry),
    })
}

/// The legacy PC devices on the port bus, wired to the VM's interrupts.
struct Devices {
    pio: Bus,
    power: PowerSignal,
    serial: Arc<Mutex<Serial>>,
    exit_status: Option<ExitStatus>,
}

fn create_devices(
    vm: &dyn Vm,
    config: &MachineConfig,
    output: Box<dyn Write + Send>,
) -> Result<Devices, VmmError> {
    let dev_err = |what: &'static str| {
        move |e: devices::bus::BusError| VmmError::Device(format!("{what}: {e}"))
    };
    let power = PowerSignal::new().map_err(io_err("power event"))?;
    let pio = Bus::new();

    let serial_irq = GsiLine::new(vm, serial::COM1_IRQ).map_err(hv_err("wiring COM1 to IRQ 4"))?;
    let serial = Arc::new(Mutex::new(Serial::new(Arc::new(serial_irq), output)));
    pio.insert(
        serial.clone(),
        u64::from(serial::COM1_BASE),
        serial::SERIAL_PORT_LEN,
    )
    .map_err(dev_err("COM1"))?;

    // Two one-port ranges: port 0x61 between them belongs to the PIT's
    // speaker gate, not to the keyboard controller.
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(power.clone())));
    pio.insert(i8042.clone(), u64::from(i8042::I8042_DATA_PORT), 1)
        .map_err(dev_err("i8042"))?;
    pio.insert_with_offset(
        i8042,
        u64::from(i8042::I8042_COMMAND_PORT),
        1,
        i8042::COMMAND_OFFSET,
    )
    .map_err(dev_err("i8042"))?;
    let rtc: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Rtc::new()));
    pio.insert(rtc, u64::from(rtc::RTC_INDEX_PORT), rtc::RTC_LEN)
        .map_err(dev_err("RTC"))?;
    AcpiPowerDevice::register(&pio, power.clone()).map_err(dev_err("ACPI power"))?;
    // An empty PCI bus behind a host bridge: Linux then finds a PCI
    // configuration mechanism instead of reporting an error.
    let pci: Arc<Mutex<dyn BusDevice>> =
        Arc::new(Mutex::new(devices::pci_host::PciHostBridge::new()));
    pio.insert(
        pci,
        u64::from(devices::pci_host::PCI_CONFIG_ADDRESS_PORT),
        devices::pci_host::PCI_CONFIG_PORTS_LEN,
    )
    .map_err(dev_err("PCI host bridge"))?;
    let post: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(devices::Sink));
    // Linux writes to the POST port as an I/O delay.
    pio.insert(post, u64::from(devices::sink::POST_CODE_PORT), 1)
        .map_err(dev_err("POST port"))?;

    let exit_status = match config.exit_status_port {
        Some(port) => {
            let (device, status) = ExitStatusPort::new();
            pio.insert(Arc::new(Mutex::new(device)), u64::from(port), 1)
                .map_err(dev_err("exit-status port"))?;
            Some(status)
        }
        None => None,
    };
    Ok(Devices {
        pio,
        power,
        serial,
        exit_status,
    })
}

/// Boots `config` on `hypervisor` and runs it until it stops.
pub fn run(
    hypervisor: &dyn Hypervisor,
    config: &MachineConfig,
    console: Console,
) -> Result<Outcome, VmmError> {
    let disks = open_disks(config)?;
    let taps = open_taps(config)?;
    let vsock = match &config.vsock {
        Some(path) => Some(virtio::Vsock::new(
            virtio::vsock::DEFAULT_GUEST_CID,
            path,
            "virtio-vsock",
        )?),
        None => None,
    };
    let guest = prepare_guest(config)?;
    let vm = hypervisor
        .create_vm(&VmConfig {
            num_cpus: config.cpus,
            irqchip: true,
        })
        .map_err(hv_err("creating the VM"))?;
    vm.set_memory(&guest.memory)
        .map_err(hv_err("mapping guest memory"))?;
    let (console_input, console_escape) = (console.input, console.escape);
    let devices = create_devices(vm.as_ref(), config, console.output)?;
    let power_button = GsiLine::new(vm.as_ref(), acpi::POWER_BUTTON_GSI)
        .map_err(hv_err("wiring the power button"))?;
    let mmio = Bus::new();
    create_virtio_devices(
        vm.as_ref(),
        config,
        &guest.memory,
        disks,
        taps,
        vsock,
        &mmio,
    )?;

    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    for id in 0..config.cpus {
        let mut vcpu = vm.create_vcpu(id).map_err(hv_err("creating a vCPU"))?;
        if id == 0 {
            let state = &guest.boot_cpu;
            vcpu.set_sregs(&state.sregs)
                .map_err(hv_err("setting the boot vCPU's segments"))?;
            vcpu.set_regs(&state.regs)
                .map_err(hv_err("setting the boot vCPU's registers"))?;
            vcpu.set_fpu(&state.fpu)
                .map_err(hv_err("setting the boot vCPU's FPU"))?;
            vcpu.set_msrs(&state.msrs)
                .map_err(hv_err("setting the boot vCPU's MSRs"))?;
        }
        // Secondary vCPUs wait for INIT/SIPI from the boot vCPU.
        vcpus.push(vcpu);
    }

    let shared = Arc::new(Shared {
        pio: devices.pio,
        mmio,
        power: devices.power,
        stopping: AtomicBool::new(false),
        vcpu_stop: Mutex::new(None),
        vcpu_stopped: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("vCPU stop eventfd"))?,
    });

    // Block the stop signals before any vCPU thread exists, so they all
    // inherit the mask and only the signalfd sees them.
    let signals =
        SignalFd::block_stop_signals().map_err(io_err("blocking SIGINT/SIGTERM/SIGHUP"))?;

    let mut interrupters: Vec<Arc<dyn VcpuInterrupter>> = Vec::new();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        interrupters.push(vcpu.interrupter());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(vcpu, &thread_shared))
            .map_err(io_err("starting a vCPU thread"));
        match thread {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                stop_vcpus(&shared, &interrupters, threads);
                return Err(e);
            }
        }
    }

    let reason = main_loop(
        &shared,
        &signals,
        &devices.serial,
        (console_input, console_escape),
        (config.on_sigterm, &power_button),
    );
    stop_vcpus(&shared, &interrupters, threads);
    drop(signals);
    Ok(Outcome {
        reason,
        exit_status: devices.exit_status.and_then(|s| s.get()),
    })
}

fn stop_vcpus(
    shared: &Shared,
    interrupters: &[Arc<dyn VcpuInterrupter>],
    threads: Vec<JoinHandle<()>>,
) {
    shared.stopping.store(true, Ordering::SeqCst);
    for interrupter in interrupters {
        interrupter.interrupt();
    }
    for thread in threads {
        // A vCPU thread that panicked has nothing left to clean up.
        let _ = thread.join();
    }
}

/// Waits for the guest to stop, forwarding console input meanwhile.
fn main_loop(
    shared: &Shared,
    signals: &SignalFd,
    serial: &Mutex<Serial>,
    (input, escape): (Option<RawFd>, bool),
    (on_sigterm, power_button): (SigtermAction, &dyn InterruptLine),
) -> StopReason {
    let mut input = input;
    let mut pending: Vec<u8> = Vec::new();
    let mut escape_armed = false;
    loop {
        if let Some(event) = shared.power.pending() {
            return match event {
                VmEvent::PowerOff => StopReason::PowerOff,
                VmEvent::Reset => StopReason::Reset,
            };
        }
        if let Ok(slot) = shared.vcpu_stop.lock() {
            if let Some(reason) = slot.clone() {
                return reason;
            }
        }
        // Read more input only when the guest has taken what we hold.
        let want_input = input.filter(|_| pending.is_empty());
        let mut fds = vec![
            shared.power.eventfd().as_raw_fd(),
            shared.vcpu_stopped.as_raw_fd(),
            signals.as_raw_fd(),
        ];
        if let Some(fd) = want_input {
            fds.push(fd);
        }
        // With input waiting for room in the UART FIFO, poll briefly.
        let timeout_ms = if pending.is_empty() { 1000 } else { 10 };
        let ready = match sys::poll_readable(&fds, timeout_ms) {
            Ok(ready) => ready,
            Err(e) => return StopReason::Error(format!("waiting for events: {e}")),
        };
        if ready[2] {
            match signals.read_signal() {
                Some(libc::SIGTERM) if on_sigterm == SigtermAction::PowerButton => {
                    tracing::info!("SIGTERM: pressing the power button");
                    if let Err(e) = power_button.trigger() {
                        return StopReason::Error(format!("pressing the power button: {e}"));
                    }
                }
                Some(signal) => return StopReason::Signal(signal),
                None => {}
            }
        }
        if ready.get(3).copied().unwrap_or(false) {
            if let Some(fd) = want_input {
                let mut buf = [0u8; 256];
                match sys::read_some(fd, &mut buf) {
                    // End of input: the guest keeps running, without it.
                    Ok(0) => input = None,
                    Ok(n) => {
                        for &byte in &buf[..n] {
                            if escape && escape_armed {
                                escape_armed = false;
                                match byte {
                                    b'x' | b'X' => return StopReason::ConsoleEscape,
                                    ESCAPE_BYTE => pending.push(ESCAPE_BYTE),
                                    other => pending.extend_from_slice(&[ESCAPE_BYTE, other]),
                                }
                            } else if escape && byte == ESCAPE_BYTE {
                                escape_armed = true;
                            } else {
                                pending.push(byte);
                            }
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::Interrupted
                            || e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => input = None,
                }
            }
        }
        if !pending.is_empty() {
            if let Ok(mut serial) = serial.lock() {
                match serial.enqueue_input(&pending) {
                    Ok(taken) => {
                        pending.drain(..taken.min(pending.len()));
                    }
                    Err(e) => return StopReason::Error(format!("serial input: {e}")),
                }
            }
        }
    }
}

/// Runs one vCPU until the VM stops, dispatching its exits to the buses.
fn vcpu_loop(mut vcpu: Box<dyn Vcpu>, shared: &Shared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                shared.stop_from_vcpu(StopReason::Error(format!("running a vCPU: {e}")));
                return;
            }
        };
        match exit {
            VcpuExit::IoIn { port, data } => {
                if !shared.pio.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    tracing::debug!(
                        port = format_args!("{port:#x}"),
                        len = data.len(),
                        "read from an unclaimed port"
                    );
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut { port, data } => {
                // Writes to ports with no device are dropped, as on a PC.
                if !shared.pio.write(u64::from(port), data) {
                    tracing::debug!(
                        port = format_args!("{port:#x}"),
                        ?data,
                        "write to an unclaimed port"
                    );
                }
            }
            VcpuExit::MmioRead { addr, data } => {
                if !shared.mmio.read(addr, data) {
                    tracing::debug!(
                        addr = format_args!("{addr:#x}"),
                        len = data.len(),
                        "read from unclaimed MMIO"
                    );
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                if !shared.mmio.write(addr, data) {
                    tracing::debug!(
                        addr = format_args!("{addr:#x}"),
                        ?data,
                        "write to unclaimed MMIO"
                    );
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Halt => return shared.stop_from_vcpu(StopReason::Halted),
            VcpuExit::Shutdown => return shared.stop_from_vcpu(StopReason::TripleFault),
            VcpuExit::SystemReset => return shared.power.request(VmEvent::Reset),
            VcpuExit::SystemPowerOff => return shared.power.request(VmEvent::PowerOff),
            VcpuExit::InternalError(what) | VcpuExit::Unhandled(what) => {
                let rip = vcpu
                    .regs()
                    .map(|r| format!(" at rip {:#x}", r.rip))
                    .unwrap_or_default();
                return shared.stop_from_vcpu(StopReason::Error(format!("{what}{rip}")));
            }
        }
    }
}

/// The guest-physical address of the ACPI RSDP (for tests and tools).
pub fn rsdp_address() -> GuestAddress {
    GuestAddress(acpi::RSDP_ADDR)
}
