//! virtio-vsock in the real default guest on the software vCPU: a host
//! program reaches the guest agent through the Unix socket of `--vsock`
//! (Firecracker's `CONNECT <port>`), has it run `cat`, and 1 MiB goes in
//! through the command's stdin and comes back through its stdout, both
//! ways through vsock. Then a command's exit status and stderr, a command
//! that does not exist, and the power button (SIGTERM with `--on-sigterm
//! power-button`), which the agent answers by shutting the guest down.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vessel_agent::{Exec, Frame, AGENT_PORT};

fn ready() -> bool {
    if !matches!(guest::cached(&guest::default_data_dir()), Ok(Some(_))) {
        testkit::not_run(
            testkit::prereq::GUEST,
            "the default guest is not cached (run `vessel guest fetch`)",
        );
        return false;
    }
    true
}

/// Stops the VM when the test ends, however it ends: SIGTERM (vessel
/// cleans up), then SIGKILL if it does not go.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to the guest agent, retrying while the guest boots (until
/// then the device answers the CONNECT by closing the socket).
fn connect_agent(path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the agent never answered"
        );
        if let Ok(mut s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            if writeln!(s, "CONNECT {AGENT_PORT}").is_ok() {
                let mut line = String::new();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                    return s;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `argv` through the agent with `stdin`; (stdout, stderr, status).
fn exec(path: &Path, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Vec<u8>, i32) {
    let mut s = connect_agent(path);
    let request = Exec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        ..Exec::default()
    };
    Frame::Exec(request).write(&mut s).unwrap();
    // Input on its own thread, output here: neither side waits for the other.
    let mut writer = s.try_clone().unwrap();
    let input = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        for chunk in input.chunks(32 << 10) {
            Frame::Stdin(chunk.to_vec()).write(&mut writer).unwrap();
        }
        Frame::StdinEof.write(&mut writer).unwrap();
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match Frame::read(&mut s).unwrap() {
            Some(Frame::Started { .. }) => {}
            Some(Frame::Stdout(d)) => out.extend_from_slice(&d),
            Some(Frame::Stderr(d)) => err.extend_from_slice(&d),
            Some(Frame::Exit(code)) => break code,
            Some(Frame::Error(msg)) => break -1 - i32::from(!msg.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    };
    feeder.join().unwrap();
    (out, err, status)
}

#[test]
fn a_host_program_and_the_guest_agent_exchange_a_mib_each_way() {
    if !ready() {
        return;
    }
    let _timed = testkit::timed();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.vsock");
    let vm = Vm(Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("run")
        .arg("--vsock")
        .arg(&path)
        .args(["--on-sigterm", "power-button"])
        // The guest's command says when the guest shut it down.
        // (No child process: a child would get the same SIGTERM, and the
        // shell could end with its status before running the trap.)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; touch /tmp/trapping; while :; do read -t 1 line; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let mut rng = testkit::Rng::new(testkit::seed());
    let data: Vec<u8> = (0..(1 << 20) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let (out, err, status) = exec(&path, &["cat"], &data);
    assert_eq!(status, 0, "stderr: {}", String::from_utf8_lossy(&err));
    assert!(
        out == data,
        "cat gave back {} bytes, not the MiB sent",
        out.len()
    );

    let (out, err, status) = exec(&path, &["sh", "-c", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!(
        (out.as_slice(), err.as_slice(), status),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    let (_, _, status) = exec(&path, &["no-such-command"], b"");
    assert!(
        status < 0,
        "a command that cannot start is an error, got {status}"
    );

    // SIGTERM presses the power button: the guest agent ends the guest's
    // processes (the command's trap reports it) and powers off. The init
    // starts the agent before the command, so wait for the trap first.
    let start = Instant::now();
    while exec(&path, &["test", "-e", "/tmp/trapping"], b"").2 != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest's command never installed its trap"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut vm = vm;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.0.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = vm.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest did not shut down on the power button"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = vm.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert_eq!(
        status.code(),
        Some(42),
        "the guest's command saw SIGTERM; stderr: {stderr}"
    );
    assert!(!path.exists(), "the socket goes with the VM");
}
