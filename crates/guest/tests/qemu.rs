//! Boots the real guest under QEMU and checks the whole protocol: argv in through the
//! kernel command line, output on the serial console, exit status out through port 0x501.
//!
//! Needs `qemu-system-x86_64` (Debian's qemu-system-x86) and the default guest in the
//! local cache (`vessel guest fetch`, or the README's run command); without them it
//! prints `NOT RUN` (a failure under CI, which installs QEMU and fetches the guest).

mod support;

use std::process::Command;

use guest::{command_line_for, GuestImage, EXIT_STATUS_PORT};

/// Boots `image` running `argv`; returns (console output, exit status from the port).
fn boot(image: &GuestImage, argv: &[&str]) -> (String, Option<u8>) {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let out = Command::new("qemu-system-x86_64")
        // TCG: works without (nested) KVM and boots this kernel in a few seconds.
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 {}",
            command_line_for(&argv).unwrap()
        ))
        // isa-debug-exit makes QEMU exit with (value << 1) | 1 when the port is written.
        .arg("-device")
        .arg(format!(
            "isa-debug-exit,iobase={EXIT_STATUS_PORT:#x},iosize=1"
        ))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = strip_ansi(&String::from_utf8_lossy(&out.stdout).replace('\r', ""));
    // Everything up to the firmware's "Booting from ROM..." is SeaBIOS and iPXE. Its dots
    // and line end race with the kernel's first output, so skip them loosely.
    let guest = all
        .split_once("Booting from ROM")
        .map_or(all.as_str(), |(_, g)| g);
    let console = guest
        .trim_start_matches('.')
        .trim_start_matches('\n')
        .to_string();
    let status = out
        .status
        .code()
        .filter(|c| c & 1 == 1)
        .map(|c| (c >> 1) as u8);
    (console, status)
}

/// Removes terminal escape sequences (the firmware clears the screen).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters, then one final letter.
            while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
        } else {
            chars.next(); // two-character sequence such as ESC c
        }
    }
    out
}

#[test]
fn guest_runs_commands_and_reports_status() {
    if !support::have("qemu-system-x86_64") {
        testkit::not_run(
            testkit::prereq::PROGRAM,
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
        );
        return;
    }
    let Ok(Some(image)) = guest::cached(&guest::default_data_dir()) else {
        testkit::not_run(
            testkit::prereq::GUEST,
            "the default guest is not cached (run `vessel guest fetch`)",
        );
        return;
    };
    let _timed = testkit::timed();

    let (console, status) = boot(
        &image,
        &[
            "sh",
            "-c",
            "printf '<%s>' \"$@\"; hostname; pwd; exit 42",
            "sh",
            "a b",
            "it's \"x\"",
            "",
        ],
    );
    assert!(
        console.contains("<a b><it's \"x\"><>vessel\n/root\n"),
        "{console:?}"
    );
    assert_eq!(status, Some(42), "{console}");

    let (_, status) = boot(&image, &["true"]);
    assert_eq!(status, Some(0));

    let (console, status) = boot(&image, &["no-such-command"]);
    assert_eq!(status, Some(127), "{console}");
    assert!(
        console.contains("no-such-command: command not found"),
        "{console}"
    );

    // Killed by SIGTERM: the guest reports 128 + 15 = 143, but QEMU's exit code
    // (143 << 1) | 1 = 287 is cut to 8 bits by the host, leaving 31, read back as 15.
    let (_, status) = boot(&image, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(status, Some(15));

    // Nothing but the command's output: no init chatter, no kernel messages before it.
    let (console, status) = boot(&image, &["echo", "only this"]);
    assert_eq!(status, Some(0));
    let before = console.split("only this").next().unwrap();
    assert_eq!(before, "", "{console:?}");
}
