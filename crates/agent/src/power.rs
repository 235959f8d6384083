//! The power button: the machine's ACPI power button (Linux's `button`
//! driver, an input device named "Power Button") read through evdev. A
//! press shuts the guest down cleanly, as acpid or logind would: under
//! systemd by asking PID 1 for `poweroff.target`, otherwise by ending
//! every process, syncing and powering off. This is how the host's
//! graceful stop reaches a VM (`vessel stop`).

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crate::sys;

/// The name the kernel's ACPI button driver gives the device.
const BUTTON_NAME: &str = "Power Button";
/// `struct input_event` on x86-64: a timeval, then type, code, value.
const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// How long an init without a service manager gets to power off by
/// itself after its processes were told to end.
const INIT_GRACE: Duration = Duration::from_secs(20);
/// systemd starts poweroff.target on SIGRTMIN+4 (glibc's SIGRTMIN is 34).
const SYSTEMD_POWEROFF: i32 = 34 + 4;

/// Watches the power button on a thread of its own. Without one (no
/// `button` or `evdev` driver, no device) there is nothing to watch.
pub fn watch() {
    let spawned = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(|| {
            // The drivers are loaded before the agent starts; the device
            // node may lag a little behind.
            let mut device = None;
            for _ in 0..20 {
                device = find_button();
                if device.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            let Some(path) = device else { return };
            match fs::File::open(&path) {
                Ok(file) => read_presses(file),
                Err(e) => eprintln!("vessel-agent: {}: {e}", path.display()),
            }
        });
    if let Err(e) = spawned {
        eprintln!("vessel-agent: starting the power-button thread: {e}");
    }
}

/// `/dev/input/eventN` of the power button, found by name in sysfs.
fn find_button() -> Option<PathBuf> {
    let entries = fs::read_dir("/sys/class/input").ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name();
        let name = name.to_str()?;
        if !name.starts_with("event") {
            return None;
        }
        let device_name = fs::read_to_string(entry.path().join("device/name")).ok()?;
        (device_name.trim_end() == BUTTON_NAME).then(|| PathBuf::from("/dev/input").join(name))
    })
}

/// Whether `event` (one `struct input_event`) is the power key going down.
pub fn is_power_press(event: &[u8; EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

fn read_presses(mut file: fs::File) {
    let mut event = [0u8; EVENT_SIZE];
    loop {
        // evdev hands out whole events only.
        if let Err(e) = file.read_exact(&mut event) {
            eprintln!("vessel-agent: reading the power button: {e}");
            return;
        }
        if is_power_press(&event) {
            shut_down();
        }
    }
}

fn shut_down() {
    let init = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if init.trim_end() == "systemd" {
        if let Err(e) = sys::send_signal(1, SYSTEMD_POWEROFF) {
            eprintln!("vessel-agent: asking systemd to power off: {e}");
        }
        return;
    }
    // No service manager to ask: end everything else. An init that
    // powers off when its work ends (the default guest's, once its
    // command has exited and its status is reported) does so now; if the
    // machine is still up after a while, keep what was written and power
    // off here.
    let _ = sys::send_signal(-1, sys::SIGTERM);
    std::thread::sleep(INIT_GRACE);
    sys::sync_and_power_off();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_the_power_key_going_down_is_a_press() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 2)), "repeat");
        assert!(!is_power_press(&event(EV_KEY, 115, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "a sync event");
    }
}
