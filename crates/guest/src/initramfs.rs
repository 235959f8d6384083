//! The busybox initramfs and its /init.

use std::io::{self, Write};

use crate::cpio::CpioWriter;
use crate::exit_helper::exit_status_helper;
use crate::modules::{GuestModules, MODULE_DIR};

/// `vessel-agent` (crates/agent), built static by this crate's build
/// script: the initramfs's /sbin/vessel-agent.
pub const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agent/vessel-agent"));

/// `/init` of the guest, run by busybox sh.
///
/// Protocol: `vessel.cmd=B64,B64,...` on the kernel command line is the argv to run (each
/// element standard base64, so spaces, quotes and any other bytes survive the kernel's
/// parameter parsing). Its exit status (0-255, 128+N for signal N) is written as one byte
/// to I/O port [`crate::EXIT_STATUS_PORT`] by `/sbin/vessel-exit-status`, a tiny static
/// ioperm + outb program this crate generates (Debian's cloud kernel has no /dev/port),
/// then the guest powers off.
/// Without `vessel.cmd` an interactive shell runs instead and its status is reported.
///
/// The script prints nothing of its own on success: whatever reaches the console is the
/// command's output. The marked decoding section reads `VESSEL_CMDLINE` (default
/// /proc/cmdline) so that tests can run it on the host against a plain file.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# vessel guest init. See the guest crate for the protocol.

# Applet links do not exist yet, so call busybox by path until --install has run.
bb=/bin/busybox
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o nosuid,noexec,mode=0620,ptmxmode=0666 devpts /dev/pts
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
$bb mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
$bb --install -s

export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
umask 022
hostname vessel
cd /root

# Drivers for the virtio devices vessel gave this machine, from the kernel's own
# package: the virtio-mmio transport only when ACPI describes such a device
# (LNRO0005); it finds the devices, and each one's driver is loaded by device type.
vessel_modules=/lib/modules/vessel
vessel_vsock=0
vessel_load() {
	for vessel_m in $(cat "$vessel_modules/$1.deps"); do
		[ -d "/sys/module/$vessel_m" ] || insmod "$vessel_modules/$vessel_m.ko"
	done
}
for vessel_dev in /sys/bus/acpi/devices/LNRO0005:*; do
	[ -e "$vessel_dev" ] || break
	vessel_load virtio_mmio
	for vessel_dev in /sys/bus/virtio/devices/*; do
		case $(cat "$vessel_dev/device" 2>/dev/null) in
		0x0001) vessel_load virtio_net ;;
		0x0002) vessel_load virtio_blk ;;
		0x0004) vessel_load virtio_rng ;;
		0x0013)
			vessel_load vmw_vsock_virtio_transport
			vessel_vsock=1
			;;
		esac
	done
	break
done
# The ACPI power button (PNP0C0C), which the agent reads through evdev: the host's
# graceful stop.
for vessel_dev in /sys/bus/acpi/devices/PNP0C0C:*; do
	[ -e "$vessel_dev" ] || break
	vessel_load button
	vessel_load evdev
	break
done

# root=DEVICE (with rootfstype=, rootflags=, ro/rw, init=): a system on a disk. Mount
# it and hand the machine over to its init; vessel.cmd is then not run.
vessel_root= vessel_rootfstype= vessel_rootflags= vessel_rootmode=ro vessel_init=/sbin/init
set -f
for vessel_word in $(cat /proc/cmdline); do
	case $vessel_word in
	root=*) vessel_root=${vessel_word#root=} ;;
	rootfstype=*) vessel_rootfstype=${vessel_word#rootfstype=} ;;
	rootflags=*) vessel_rootflags=${vessel_word#rootflags=} ;;
	rw) vessel_rootmode=rw ;;
	ro) vessel_rootmode=ro ;;
	init=*) vessel_init=${vessel_word#init=} ;;
	esac
done
set +f
if [ -n "$vessel_root" ]; then
	case $vessel_root in
	UUID=* | LABEL=*) vessel_root=$(findfs "$vessel_root") ;;
	esac
	# The disk's driver was loaded above; its node may take a moment.
	vessel_wait=0
	while [ ! -b "$vessel_root" ] && [ $vessel_wait -lt 50 ]; do
		sleep 0.1
		vessel_wait=$((vessel_wait + 1))
	done
	mkdir -p /newroot
	if mount -o "$vessel_rootmode${vessel_rootflags:+,$vessel_rootflags}" \
		${vessel_rootfstype:+-t "$vessel_rootfstype"} "$vessel_root" /newroot; then
		# The new system mounts what it needs itself; /dev moves with it.
		umount /dev/pts /dev/shm /tmp 2>/dev/null
		mount --move /dev /newroot/dev 2>/dev/null || umount /dev
		# With a vsock device, the new system runs the agent (the host's exec
		# and power button): the binary and a systemd unit go to /run, which
		# moves with it (systemd keeps a /run it finds mounted, and reads units
		# in /run/systemd/system), so nothing is written to the disk.
		if [ "$vessel_vsock" = 1 ]; then
			mkdir -p /run/vessel /run/systemd/system/sysinit.target.wants
			cp /sbin/vessel-agent /run/vessel/vessel-agent
			cat >/run/systemd/system/vessel-agent.service <<-'EOF'
			[Unit]
			Description=vessel guest agent (the host's exec and power button)
			DefaultDependencies=no
			After=systemd-remount-fs.service
			Before=sysinit.target shutdown.target
			Conflicts=shutdown.target

			[Service]
			ExecStart=/run/vessel/vessel-agent
			Restart=always
			RestartSec=1
			EOF
			ln -s ../vessel-agent.service /run/systemd/system/sysinit.target.wants/
			mount --move /run /newroot/run 2>/dev/null || umount /run
		else
			umount /run 2>/dev/null
		fi
		umount /sys /proc
		exec switch_root /newroot "$vessel_init"
	fi
	echo "vessel: cannot mount root=$vessel_root" >&2
	/sbin/vessel-exit-status 1
	poweroff -f
fi

# The host runs commands in the guest through the agent.
if [ "$vessel_vsock" = 1 ]; then
	/sbin/vessel-agent </dev/null &
fi

# >>> decode vessel.cmd
vessel_cmdline=${VESSEL_CMDLINE:-/proc/cmdline}
vessel_has_cmd=0
vessel_bad=0
vessel_quiet=0
vessel_b64=
# Kernel parameters are data: no globbing while they are split into words.
set -f
for vessel_word in $(cat "$vessel_cmdline"); do
	case $vessel_word in
	vessel.cmd=*) vessel_b64=${vessel_word#vessel.cmd=} vessel_has_cmd=1 ;;
	quiet) vessel_quiet=1 ;;
	esac
done
set +f
set --
if [ "$vessel_has_cmd" = 1 ] && [ -n "$vessel_b64" ]; then
	# Split on commas by hand: IFS splitting would drop an empty last element.
	vessel_rest=$vessel_b64,
	while [ -n "$vessel_rest" ]; do
		vessel_el=${vessel_rest%%,*}
		vessel_rest=${vessel_rest#*,}
		# busybox base64 -d skips characters outside the alphabet instead of failing.
		case $vessel_el in *[!A-Za-z0-9+/=]*) vessel_bad=1 ;; esac
		# $(...) strips trailing newlines; the x sentinel keeps them.
		vessel_arg=$(printf '%s' "$vessel_el" | base64 -d && echo x) || vessel_bad=1
		set -- "$@" "${vessel_arg%x}"
	done
fi
# <<< decode vessel.cmd

if [ "$vessel_quiet" = 1 ]; then
	# "quiet" still lets warnings through; keep them off the command's output.
	echo 1 >/proc/sys/kernel/printk
fi

# setsid + cttyhack give the program the real console tty as controlling terminal
# (/dev/console cannot be one), so Ctrl-C and job control work.
if [ "$vessel_bad" = 1 ]; then
	echo "vessel: malformed vessel.cmd on the kernel command line" >&2
	vessel_status=127
elif [ $# -gt 0 ] && ! command -v "$1" >/dev/null; then
	echo "vessel: $1: command not found" >&2
	vessel_status=127
elif [ $# -gt 0 ]; then
	setsid cttyhack "$@"
	vessel_status=$?
else
	setsid cttyhack sh
	vessel_status=$?
fi

# One byte to I/O port 0x501. Debian's cloud kernel has no /dev/port, so a tiny static
# helper in the initramfs does ioperm + outb.
/sbin/vessel-exit-status "$vessel_status" ||
	echo "vessel: cannot report exit status $vessel_status to the host" >&2

sync
# The kernel's "reboot: Power down" is an emergency-level message, which even
# "quiet" prints; console level 0 keeps it off the command's output.
echo 0 >/proc/sys/kernel/printk
poweroff -f
"#;

/// Writes the newc initramfs with `busybox` as /bin/busybox,
/// [`INIT_SCRIPT`] as /init, the exit-status helper as /sbin/vessel-exit-status
/// and `modules` under [`MODULE_DIR`] (each driver's load order in `DRIVER.deps`).
/// Equal input gives byte-for-byte equal output (all mtimes are 0).
pub fn build_initramfs(busybox: &[u8], modules: &GuestModules, out: impl Write) -> io::Result<()> {
    // Uncompressed: the kernel then only copies the archive instead of
    // inflating it, which on the software vCPU costs a few percent of the
    // boot (about 50 million guest instructions for gzip); the price is a
    // bigger file (about 2.2 MiB instead of 1 MiB), freed after unpacking.
    let mut cpio = CpioWriter::new(out);
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "etc",
        "mnt",
        "run",
        "lib",
        "lib/modules",
        MODULE_DIR,
    ] {
        cpio.dir(dir, 0o755)?;
    }
    for (name, ko) in &modules.files {
        cpio.file(&format!("{MODULE_DIR}/{name}.ko"), 0o644, ko)?;
    }
    for (driver, order) in &modules.orders {
        let list: String = order.iter().map(|m| format!("{m}\n")).collect();
        cpio.file(
            &format!("{MODULE_DIR}/{driver}.deps"),
            0o644,
            list.as_bytes(),
        )?;
    }
    cpio.dir("tmp", 0o1777)?;
    cpio.dir("root", 0o700)?;
    // The kernel opens /dev/console for init before anything is mounted; without these
    // nodes init would start with no stdin/stdout/stderr.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    cpio.file("sbin/vessel-exit-status", 0o755, &exit_status_helper())?;
    cpio.file("sbin/vessel-agent", 0o755, AGENT)?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    // Enough of /etc for `id`, `ls -l` and `mount` to show names instead of numbers/errors.
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
    cpio.symlink("etc/mtab", "/proc/mounts")?;
    cpio.finish()?.flush()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use base64::Engine;

    use super::*;
    use crate::cpio::{read::parse, S_IFCHR, S_IFREG};

    /// Marks the part of [`INIT_SCRIPT`] that turns the kernel command line into `"$@"`.
    const DECODE_SECTION: (&str, &str) = ("# >>> decode vessel.cmd\n", "# <<< decode vessel.cmd\n");

    fn section(marks: (&str, &str)) -> &'static str {
        let start = INIT_SCRIPT.find(marks.0).expect("start marker") + marks.0.len();
        let len = INIT_SCRIPT[start..].find(marks.1).expect("end marker");
        &INIT_SCRIPT[start..start + len]
    }

    /// The host's busybox sh if there is one (closest to the guest), else plain sh.
    fn host_shell() -> Option<Vec<&'static str>> {
        let works = |argv: &[&str]| {
            Command::new(argv[0])
                .args(&argv[1..])
                .args(["-c", "true"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        [vec!["busybox", "sh"], vec!["sh"]]
            .into_iter()
            .find(|a| works(a))
    }

    fn run_section(shell: &[&str], script: &str, env: &[(&str, &Path)]) -> Vec<u8> {
        let out = Command::new(shell[0])
            .args(&shell[1..])
            .args(["-c", script])
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn init_decodes_argv_exactly() {
        let Some(shell) = host_shell() else {
            testkit::not_run(
                testkit::prereq::PROGRAM,
                "neither busybox nor sh can be run on this host",
            );
            return;
        };
        if shell[0] != "busybox" && Command::new("base64").arg("--version").output().is_err() {
            testkit::not_run(testkit::prereq::PROGRAM, "no base64 command on this host");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        // Print each decoded argument NUL-terminated, then the flags.
        let script = format!(
            "{}for a in \"$@\"; do printf '%s\\0' \"$a\"; done; printf 'n=%s has=%s bad=%s quiet=%s' $# $vessel_has_cmd $vessel_bad $vessel_quiet",
            section(DECODE_SECTION)
        );
        let argv: Vec<String> = [
            "printf",
            "%s\\n",
            "hello world",
            "it's \"quoted\" 'twice'",
            "",
            "tab\there",
            "ends with newlines\n\n",
            "$HOME `id` $(id) ${x} \\ \\n",
            "*",
            "a,b",
            "non-ASCII: ✓ ü",
            "-n",
            "???>>>", // base64 with '/' and '+'
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let fragment = crate::command_line_for(&argv).unwrap();
        assert!(
            fragment.contains('+') && fragment.contains('/'),
            "{fragment}"
        );
        std::fs::write(
            &cmdline,
            format!("BOOT_IMAGE=/vmlinuz console=ttyS0 quiet /* {fragment} panic=-1\n"),
        )
        .unwrap();
        let out = run_section(&shell, &script, &[("VESSEL_CMDLINE", &cmdline)]);
        let (args, flags) =
            out.split_at(out.len() - out.iter().rev().position(|b| *b == 0).unwrap());
        let decoded: Vec<String> = args
            .split(|b| *b == 0)
            .take(argv.len())
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect();
        assert_eq!(decoded, argv);
        assert_eq!(
            std::str::from_utf8(flags).unwrap(),
            format!("n={} has=1 bad=0 quiet=1", argv.len())
        );

        // No vessel.cmd: no arguments, so init starts the interactive shell.
        std::fs::write(&cmdline, "console=ttyS0\n").unwrap();
        let out = run_section(&shell, &script, &[("VESSEL_CMDLINE", &cmdline)]);
        assert_eq!(out, b"n=0 has=0 bad=0 quiet=0");

        // Garbage is reported, not run.
        for garbage in ["vessel.cmd=!!!!", "vessel.cmd=YQ", "vessel.cmd=bHM=,a*b="] {
            std::fs::write(&cmdline, format!("{garbage}\n")).unwrap();
            let out = run_section(&shell, &script, &[("VESSEL_CMDLINE", &cmdline)]);
            assert!(
                out.ends_with(b"bad=1 quiet=0"),
                "{garbage}: {}",
                String::from_utf8_lossy(&out)
            );
        }

        // Sanity check of the test's own decoding against the crate's encoding.
        let b64 = fragment.strip_prefix("vessel.cmd=").unwrap();
        let first = base64::engine::general_purpose::STANDARD
            .decode(b64.split(',').next().unwrap())
            .unwrap();
        assert_eq!(first, b"printf");
    }

    #[test]
    fn init_script_shape() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains("/sbin/vessel-exit-status \"$vessel_status\""));
        assert!(INIT_SCRIPT.contains("0x501"));
        assert_eq!(crate::EXIT_STATUS_PORT, 0x501);
        assert!(INIT_SCRIPT.contains("poweroff -f"));
        // Tabs and LF only: a CR would end up in the shell's words.
        assert!(!INIT_SCRIPT.contains('\r'));
    }

    #[test]
    fn initramfs_contents_and_determinism() {
        let mut a = Vec::new();
        build_initramfs(b"BUSYBOX", &GuestModules::default(), &mut a).unwrap();
        let mut b = Vec::new();
        build_initramfs(b"BUSYBOX", &GuestModules::default(), &mut b).unwrap();
        assert_eq!(a, b, "same input must give the same bytes");

        let entries = parse(&a);
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        for dir in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc",
            "mnt", "run",
        ] {
            assert_eq!(get(dir).mode & 0o170000, crate::cpio::S_IFDIR, "{dir}");
        }
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(get("bin/busybox").mode, S_IFREG | 0o755);
        assert_eq!(get("bin/busybox").data, b"BUSYBOX");
        assert_eq!(get("sbin/vessel-exit-status").mode, S_IFREG | 0o755);
        assert_eq!(get("sbin/vessel-exit-status").data, exit_status_helper());
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("dev/null").rdev, (1, 3));
        assert_eq!(entries.last().unwrap().name, "TRAILER!!!");
        // Parents always precede children, as the kernel's unpacker needs.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(
                    entries[..i].iter().any(|p| p.name == parent),
                    "{} before its parent",
                    e.name
                );
            }
        }
    }
}
