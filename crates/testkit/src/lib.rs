//! Test support shared by vessel's test suites (a dev-dependency only).
//!
//! - [`not_run`]: a test whose prerequisite is missing says so. Outside CI
//!   it then passes; under CI (`CI` set to anything but `false` or `0`) it
//!   fails, unless CI declared that prerequisite really unavailable on its
//!   host in `VESSEL_CI_UNAVAILABLE` (a comma-separated list of
//!   [prerequisite names](prereq)). Green CI therefore means every test ran.
//! - [`timed`]: a guard that records how long a heavyweight test ran.
//! - Both append to the file named by `VESSEL_TEST_REPORT`, when set, one
//!   tab-separated line per event, which `.ci/run` summarizes: the harness
//!   hides the output of passing tests, so a report file is how CI shows
//!   what ran and what did not.
//! - [`Rng`] and [`seed`]: random tests draw their seed from
//!   `VESSEL_TEST_SEED`, else from the clock, and print it so a failure can
//!   be replayed.
//! - [`static_busybox`]: the static busybox the container tests build
//!   their roots from.

use std::fmt::Display;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The names of the prerequisites tests check for, as `VESSEL_CI_UNAVAILABLE`
/// lists them.
pub mod prereq {
    /// Running as root (containers, cgroups, mounts).
    pub const ROOT: &str = "root";
    /// A usable `/dev/kvm`.
    pub const KVM: &str = "kvm";
    /// PID and cgroup namespaces in the host kernel.
    pub const NAMESPACES: &str = "namespaces";
    /// A cgroup controller the test needs (memory, cpu).
    pub const CGROUP: &str = "cgroup";
    /// A statically linked busybox (Debian's busybox-static).
    pub const BUSYBOX: &str = "busybox";
    /// vessel's default guest in the local cache (`vessel guest fetch`).
    pub const GUEST: &str = "guest";
    /// A program on PATH (qemu-system-x86_64, gpg, ctr, script, base64, ...).
    pub const PROGRAM: &str = "program";
    /// An x86-64 Linux host (native code, raw port I/O).
    pub const X86_64: &str = "x86_64";
}

/// Whether this runs under CI: `CI` set, and not to `false` or `0` (the
/// convention of the common CI services).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether CI declared `prereq` unavailable on its host.
fn declared_unavailable(prereq: &str) -> bool {
    std::env::var("VESSEL_CI_UNAVAILABLE")
        .is_ok_and(|list| list.split(',').any(|p| p.trim() == prereq))
}

/// The running test's name (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned()
}

/// Appends one tab-separated line to the `VESSEL_TEST_REPORT` file, if set.
fn report(fields: &[&str]) {
    let Some(path) = std::env::var_os("VESSEL_TEST_REPORT") else {
        return;
    };
    let line: Vec<String> = fields
        .iter()
        .map(|f| f.replace(['\t', '\n'], " "))
        .collect();
    // One write of a short line to an O_APPEND file: lines from tests
    // running in parallel, in one process or several, do not interleave.
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{}\n", line.join("\t")).as_bytes()));
    if let Err(e) = written {
        panic!(
            "cannot append to VESSEL_TEST_REPORT {}: {e}",
            Path::new(&path).display()
        );
    }
}

/// The calling test cannot run here because `prereq` (one of [`prereq`]'s
/// names) is missing, for the reason `why`. Prints `NOT RUN` and records
/// it; under CI it panics, failing the test, unless CI declared `prereq`
/// unavailable. The caller returns right after.
pub fn not_run(prereq: &str, why: impl Display) {
    let test = test_name();
    eprintln!("NOT RUN: {test}: {why}");
    report(&["not-run", prereq, &test, &why.to_string()]);
    if under_ci() && !declared_unavailable(prereq) {
        panic!(
            "{test} did not run under CI: {why}. CI must provide `{prereq}`, or list it in \
             VESSEL_CI_UNAVAILABLE where this host cannot"
        );
    }
}

/// Records, when dropped at the end of a test that passed, how long it ran.
pub struct Timed {
    test: String,
    started: Instant,
}

/// Starts timing the calling test (see [`Timed`]).
pub fn timed() -> Timed {
    Timed {
        test: test_name(),
        started: Instant::now(),
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!("{}: ran in {secs:.1} s", self.test);
        report(&["ran", &self.test, &format!("{secs:.1}")]);
    }
}

thread_local! {
    /// The running test's seed, once drawn (libtest runs each test on a
    /// thread of its own).
    static SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The seed for the calling random test: `VESSEL_TEST_SEED` (decimal or
/// 0x-hex) when set, else one from the clock, drawn once per test. Printed
/// when drawn, so that a failing test's output (which the harness shows)
/// says how to replay it.
pub fn seed() -> u64 {
    if let Some(seed) = SEED.get() {
        return seed;
    }
    let seed = match std::env::var("VESSEL_TEST_SEED") {
        Ok(s) => parse_seed(&s)
            .unwrap_or_else(|| panic!("VESSEL_TEST_SEED={s:?} is not a decimal or 0x-hex u64")),
        Err(_) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            // Nanoseconds mixed with the thread, so tests started in the
            // same instant still differ.
            let thread = std::thread::current().id();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&thread, &mut h);
            now.as_nanos() as u64 ^ std::hash::Hasher::finish(&h)
        }
    };
    println!(
        "{}: seed {seed:#x} (replay with VESSEL_TEST_SEED={seed:#x})",
        test_name()
    );
    SEED.set(Some(seed));
    seed
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// SplitMix64's output function: a bijection that spreads every input bit
/// over the whole word, so neighbouring seeds give unrelated streams.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64*: small, fast and deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; every seed, zero included, gives its own
    /// stream.
    pub fn new(seed: u64) -> Rng {
        // xorshift's state must not be zero; splitmix maps exactly one
        // input to zero.
        let state = splitmix(seed);
        Rng(if state == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            state
        })
    }

    /// A generator for a stream of its own within one test: `seed` (from
    /// [`seed`]) mixed with `stream`, such as a family's name or a round.
    pub fn derived(seed: u64, stream: impl std::hash::Hash) -> Rng {
        // FNV-1a over the hash input: stable across runs and Rust
        // versions, unlike the std hasher's keys.
        struct Fnv(u64);
        impl std::hash::Hasher for Fnv {
            fn finish(&self) -> u64 {
                self.0
            }
            fn write(&mut self, bytes: &[u8]) {
                for b in bytes {
                    self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        stream.hash(&mut h);
        Rng::new(seed ^ splitmix(std::hash::Hasher::finish(&h)))
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // an endless stream, not an Iterator
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The paths in directory `dir` (none if it is missing).
pub fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a program called `name` is on PATH and runs (`name --version`
/// exits 0).
pub fn have_program(name: &str) -> bool {
    std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether every program of `names` can be started at all (some, such as
/// mkfs.ext4, have no `--version` that exits 0); otherwise the first one
/// missing is reported with [`not_run`] and the caller returns.
pub fn programs_present(names: &[&str]) -> bool {
    for name in names {
        let started = std::process::Command::new(name)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if started.is_err() {
            not_run(prereq::PROGRAM, format!("{name} is not installed"));
            return false;
        }
    }
    true
}

/// Whether `path` is a statically linked 64-bit ELF (no PT_INTERP).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&bytes[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff.saturating_add(i.saturating_mul(phentsize));
        bytes
            .get(o..o.saturating_add(4))
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != PT_INTERP)
    })
}

/// The first static busybox among Debian's busybox-static locations and
/// `also` (such as the copy vessel caches).
pub fn static_busybox(also: &[PathBuf]) -> Option<PathBuf> {
    [
        PathBuf::from("/usr/bin/busybox"),
        PathBuf::from("/bin/busybox"),
    ]
    .into_iter()
    .chain(also.iter().cloned())
    .find(|p| is_static_elf(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_seeds_give_different_streams() {
        let streams: Vec<Vec<u64>> = (0..64u64)
            .map(|s| {
                let mut r = Rng::new(s);
                (0..4).map(|_| r.next()).collect()
            })
            .collect();
        for a in 0..streams.len() {
            for b in a + 1..streams.len() {
                assert_ne!(streams[a][0], streams[b][0], "seeds {a} and {b}");
            }
        }
        // The old `seed | 1` scheme made 0 and 1 (and 2 and 3) the same.
        assert_ne!(Rng::new(0).next(), Rng::new(1).next());
    }

    #[test]
    fn derived_streams_differ_by_name_and_repeat_by_seed() {
        let a = Rng::derived(7, "adc").next();
        assert_eq!(a, Rng::derived(7, "adc").next());
        assert_ne!(a, Rng::derived(7, "sbb").next());
        assert_ne!(a, Rng::derived(8, "adc").next());
    }

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("42"), Some(42));
        assert_eq!(parse_seed("0x2a"), Some(42));
        assert_eq!(parse_seed(" 0X2A "), Some(42));
        assert_eq!(parse_seed("forty-two"), None);
    }

    #[test]
    fn the_running_tests_name_is_known() {
        assert!(test_name().ends_with("the_running_tests_name_is_known"));
    }
}
