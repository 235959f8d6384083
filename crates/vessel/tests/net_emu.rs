//! virtio-net in the real default guest on the software vCPU, on a tap in
//! a network namespace this test makes (every packet stays inside it): the
//! host sends the guest 64 MiB over TCP, the guest sends the same bytes
//! back over a second connection, and the SHA-256 of what returned must be
//! that of what left.
//!
//! Needs root (namespaces, a tap), `ip` (iproute2) and the cached guest.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";

/// A network namespace with a tap in it, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(tap: &str) -> Netns {
        let ns = Netns {
            name: format!("vessel-test-{}", std::process::id()),
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns.name]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.name.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["link", "set", "lo", "up"]);
        exec(&["tuntap", "add", tap, "mode", "tap"]);
        exec(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        exec(&["link", "set", tap, "up"]);
        ns
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn run_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on a namespace file this thread opened; it
            // moves only this thread (CLONE_NEWNET), which then does
            // nothing but the test's networking.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ready() -> bool {
    if !testkit::is_root() {
        testkit::not_run(
            testkit::prereq::ROOT,
            "network namespaces and taps need root",
        );
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        testkit::not_run(testkit::prereq::PROGRAM, "iproute2's ip is not installed");
        return false;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        testkit::not_run(testkit::prereq::NAMESPACES, "this host has no /dev/net/tun");
        return false;
    }
    if !matches!(guest::cached(&guest::default_data_dir()), Ok(Some(_))) {
        testkit::not_run(
            testkit::prereq::GUEST,
            "the default guest is not cached (run `vessel guest fetch`)",
        );
        return false;
    }
    true
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn guest_and_host_exchange_64_mib_each_way_over_tcp() {
    if !ready() {
        return;
    }
    let _timed = testkit::timed();
    let netns = Netns::create("vtap0");
    // What the host sends: seeded, so a failure can be replayed.
    let mut rng = testkit::Rng::new(testkit::seed());
    let download: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let download_sum = hex(&Sha256::digest(&download));

    // The host side: send the download (once the guest listens), then
    // take the upload, which the guest makes of what it received.
    let host = netns.run_inside(move || {
        let listener = TcpListener::bind((HOST_IP, 5001)).expect("bind in the namespace");
        let start = Instant::now();
        let mut stream = loop {
            match TcpStream::connect((GUEST_IP, 5002)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "connecting: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        stream.write_all(&download).expect("sending the download");
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        // Bounded waits: a guest that never connects fails the test
        // instead of hanging it.
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let mut upload = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < Duration::from_secs(300), "no upload");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        upload.set_nonblocking(false).expect("blocking stream");
        upload
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut received = Vec::with_capacity(SIZE);
        let mut buf = vec![0u8; MIB];
        while received.len() < SIZE {
            let n = upload.read(&mut buf).expect("reading the upload");
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
        }
        (received.len(), hex(&Sha256::digest(&received)))
    });

    // The guest keeps what arrives, then sends it back: both directions
    // carry the same 64 MiB, and the host checks what came back.
    let script = format!(
        "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && \
         nc -l -p 5002 > /tmp/data && nc {HOST_IP} 5001 < /tmp/data; \
         echo received=$(wc -c < /tmp/data)"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args([
            "run",
            "--memory",
            "512M",
            "--net",
            "tap=vtap0",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("running vessel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{context}");
    let (received, upload_sum) = host.join().expect("host side");
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {key} line\n{context}"))
    };
    assert_eq!(
        field("received="),
        SIZE.to_string(),
        "bytes the guest received"
    );
    assert_eq!(received, SIZE, "bytes the host received back\n{context}");
    assert_eq!(upload_sum, download_sum, "the data came back changed");
}
