//! Builds `vessel-agent` (crates/agent) as a static x86-64 binary for the
//! default guest's initramfs, with bare rustc: the agent has no
//! dependencies, so no nested cargo (and no second lock on the target
//! directory) is needed. `-C target-feature=+crt-static` on the gnu target
//! links glibc statically (a static-pie binary).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("../agent/src");
    for file in ["lib.rs", "main.rs", "session.rs", "sys.rs"] {
        println!("cargo:rerun-if-changed={}", src.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=RUSTC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("agent");
    std::fs::create_dir_all(&out).expect("creating OUT_DIR/agent");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // The same bytes from every build (debug, release, clippy, another
    // checkout): the initramfs's identity includes the agent, so a path
    // baked into it would make each build call the others' cache stale.
    let agent_dir = src.parent().unwrap_or(&src).to_path_buf();
    let remaps = [
        format!("{}=/vessel-agent", agent_dir.display()),
        format!("{}=/out", out.display()),
        format!("{}=/rust", sysroot(&rustc).display()),
    ];
    let common = |cmd: &mut Command| {
        for remap in &remaps {
            cmd.arg(format!("--remap-path-prefix={remap}"));
        }
        cmd.args(["--edition", "2021", "--target", TARGET])
            .args(["-C", "opt-level=s", "-C", "codegen-units=1"])
            .args(["-C", "target-feature=+crt-static", "-C", "strip=symbols"])
            // Build scripts inherit cargo's flags for the host; the agent
            // wants none of them.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS");
    };
    let mut lib = Command::new(&rustc);
    common(&mut lib);
    lib.args([
        "--crate-name",
        "vessel_agent",
        "--crate-type",
        "rlib",
        "--out-dir",
    ])
    .arg(&out)
    .arg(src.join("lib.rs"));
    run(lib, "the agent's library");
    let mut bin = Command::new(&rustc);
    common(&mut bin);
    bin.args(["--crate-name", "vessel_agent_bin", "--crate-type", "bin"])
        .arg("--extern")
        .arg(format!(
            "vessel_agent={}",
            out.join("libvessel_agent.rlib").display()
        ))
        .arg("-L")
        .arg(&out)
        .arg("-o")
        .arg(out.join("vessel-agent"))
        .arg(src.join("main.rs"));
    run(bin, "the agent");
    assert_static(&out.join("vessel-agent"));
}

/// The compiler's sysroot (its standard library's sources live there).
fn sysroot(rustc: &std::ffi::OsStr) -> PathBuf {
    Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .unwrap_or_default()
}

fn run(mut cmd: Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {what}: {e}"));
    assert!(
        status.success(),
        "building {what} as a static {TARGET} binary failed (it needs the {TARGET} \
         standard library and a static C library: Debian's libc6-dev)"
    );
}

/// A static binary has no PT_INTERP program header.
fn assert_static(path: &Path) {
    let elf = std::fs::read(path).expect("reading the agent");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&elf[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    let interp = (0..count).any(|i| {
        let o = phoff + i * size;
        u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]) == 3
    });
    assert!(!interp, "the agent was linked dynamically");
}
