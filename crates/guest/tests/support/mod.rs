//! A fake Debian mirror on the local disk, signed with a throwaway key.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const RELEASE: &str = "6.1.0-99-cloud-amd64";
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-99-cloud-amd64";
pub const KERNEL_BYTES: &[u8] = b"MZ fake bzImage for tests";
pub const BUSYBOX_BYTES: &[u8] = b"\x7fELF fake busybox";
pub const KERNEL_POOL: &str =
    "pool/main/l/linux-signed-amd64/linux-image-6.1.0-99-cloud-amd64_6.1.99-1_amd64.deb";
pub const BUSYBOX_POOL: &str = "pool/main/b/busybox/busybox-static_1.35.0-4+b1_amd64.deb";

/// Is there a program called `name` that runs?
pub fn have(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// gpg and gpgv present; otherwise say plainly why the test does not run.
pub fn gpg_available(test: &str) -> bool {
    for tool in ["gpg", "gpgv"] {
        if !have(tool) {
            testkit::not_run(
                testkit::prereq::PROGRAM,
                format!("{test} needs `{tool}` (install gnupg / gpgv), which is not on PATH"),
            );
            return false;
        }
    }
    true
}

/// A throwaway GnuPG home; its agent is stopped on drop.
pub struct Gpg {
    home: TempDir,
}

impl Gpg {
    pub fn new() -> Gpg {
        // Under /tmp so the agent's socket path stays short.
        let home = tempfile::Builder::new()
            .prefix("vg")
            .tempdir_in("/tmp")
            .unwrap();
        let gpg = Gpg { home };
        std::fs::set_permissions(
            gpg.home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        gpg
    }

    fn run(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(self.home.path())
            .args([
                "--batch",
                "--yes",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Generates an unprotected signing key for `email`.
    pub fn gen_key(&self, email: &str) {
        self.run(&[
            "--quick-gen-key",
            &format!("vessel test <{email}>"),
            "ed25519",
            "sign",
            "never",
        ]);
    }

    /// Binary keyring with the keys of `emails`, as gpgv wants it.
    pub fn export(&self, emails: &[&str], path: &Path) {
        let mut args = vec!["--export"];
        args.extend_from_slice(emails);
        let keys = self.run(&args);
        assert!(!keys.is_empty());
        std::fs::write(path, keys).unwrap();
    }

    /// Clear-signs `input` into `output` with every key in `emails`.
    pub fn clearsign(&self, emails: &[&str], input: &Path, output: &Path) {
        let mut args = vec!["--digest-algo", "SHA256"];
        for e in emails {
            args.extend_from_slice(&["--local-user", e]);
        }
        let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
        args.extend_from_slice(&["--output", o, "--clearsign", i]);
        self.run(&args);
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "all"])
            .output();
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How the data member of a fake .deb is compressed.
#[derive(Clone, Copy)]
pub enum Compression {
    Xz,
    Gz,
}

/// A .deb whose data.tar holds `./dir/` entries and one regular file at `path` (written
/// with the `./` prefix real packages use).
pub fn make_deb(path: &str, contents: &[u8], compression: Compression) -> Vec<u8> {
    make_deb_files(&[(path.to_string(), contents.to_vec())], compression)
}

/// A kernel package for `release`: its vmlinuz holds `kernel_bytes`, and it carries the
/// modules (fake ELF files with real `.modinfo` dependencies) the guest's drivers need.
pub fn kernel_deb(release: &str, kernel_bytes: &[u8]) -> Vec<u8> {
    let mut files = vec![(format!("boot/vmlinuz-{release}"), kernel_bytes.to_vec())];
    files.extend(guest::modules::fake_package_modules(release));
    make_deb_files(&files, Compression::Xz)
}

/// A .deb whose data.tar holds `files` (path, contents) and their directories.
pub fn make_deb_files(files: &[(String, Vec<u8>)], compression: Compression) -> Vec<u8> {
    fn tar_with(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            // Set the raw name: tar::Builder would normalise "./" away.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(d.len() as u64);
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                }
            }
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            tar.append(&h, data.unwrap_or(&[])).unwrap();
        }
        tar.into_inner().unwrap()
    }
    let mut entries: Vec<(String, Option<&[u8]>)> = vec![("./".into(), None)];
    for (path, contents) in files {
        let mut dir = String::from(".");
        for comp in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            dir = format!("{dir}/{comp}");
            if !entries.iter().any(|(n, _)| *n == format!("{dir}/")) {
                entries.push((format!("{dir}/"), None));
            }
        }
        entries.push((format!("./{path}"), Some(contents)));
    }
    // A decoy that must not be mistaken for the wanted file.
    entries.push(("./usr/share/doc/README".into(), Some(b"doc")));
    let entries: Vec<(&str, Option<&[u8]>)> =
        entries.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let data_tar = tar_with(&entries);
    let control_tar = tar_with(&[("./", None), ("./control", Some(b"Package: fake\n"))]);

    let xz = |raw: &[u8]| {
        let mut out = Vec::new();
        xz2::read::XzEncoder::new(raw, 6)
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let (data_name, data) = match compression {
        Compression::Xz => ("data.tar.xz", xz(&data_tar)),
        Compression::Gz => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&data_tar).unwrap();
            ("data.tar.gz", enc.finish().unwrap())
        }
    };
    let mut ar = ar::Builder::new(Vec::new());
    for (name, body) in [
        ("debian-binary", b"2.0\n".to_vec()),
        ("control.tar.xz", xz(&control_tar)),
        (data_name, data),
    ] {
        let mut h = ar::Header::new(name.as_bytes().to_vec(), body.len() as u64);
        h.set_mode(0o100644);
        ar.append(&h, &body[..]).unwrap();
    }
    ar.into_inner().unwrap()
}

/// The mirror tree plus the key material that signs it.
pub struct FakeMirror {
    pub root: TempDir,
    pub keyring: PathBuf,
    pub gpg: Gpg,
}

impl FakeMirror {
    pub fn url(&self) -> String {
        format!("file://{}", self.root.path().display())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// Options for fetching from this mirror alone into `data_dir`. The security archive
    /// is turned off so that no test reaches for the host's real one.
    pub fn options(&self, data_dir: &Path) -> guest::FetchOptions {
        guest::FetchOptions {
            data_dir: data_dir.to_owned(),
            mirror: Some(self.url()),
            security_mirror: Some(String::new()),
            keyring: Some(self.keyring.clone()),
            progress: false,
        }
    }

    /// Options for fetching from this mirror plus `security` into `data_dir`.
    pub fn options_with(&self, security: &SecurityMirror, data_dir: &Path) -> guest::FetchOptions {
        guest::FetchOptions {
            security_mirror: Some(security.url()),
            ..self.options(data_dir)
        }
    }

    /// A second archive serving `bookworm-security`, signed by this mirror's archive key,
    /// whose `linux-image-cloud-amd64` (version `version`) depends on
    /// `linux-image-6.1.0-<abi>-cloud-amd64`, whose vmlinuz holds `kernel_bytes`.
    pub fn security_mirror(&self, abi: u32, version: &str, kernel_bytes: &[u8]) -> SecurityMirror {
        let root = tempfile::tempdir().unwrap();
        let release = format!("6.1.0-{abi}-cloud-amd64");
        let package = format!("linux-image-{release}");
        let pool = format!("pool/updates/main/l/linux-signed-amd64/{package}_{version}_amd64.deb");
        let deb = kernel_deb(&release, kernel_bytes);
        let p = root.path().join(&pool);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &deb).unwrap();
        let mut packages = stanza(
            "linux-image-cloud-amd64",
            version,
            &format!("Depends: {package} (= {version})\n"),
        );
        packages += &stanza(&package, version, &file_fields(&pool, &deb));
        write_suite(
            root.path(),
            &self.gpg,
            &["archive@vessel.invalid"],
            "bookworm-security",
            &packages,
        );
        SecurityMirror {
            root,
            release,
            pool,
        }
    }
}

/// A fake `bookworm-security` archive (see [`FakeMirror::security_mirror`]).
pub struct SecurityMirror {
    pub root: TempDir,
    /// Kernel release of its kernel package.
    pub release: String,
    /// Pool path of its kernel .deb.
    pub pool: String,
}

impl SecurityMirror {
    pub fn url(&self) -> String {
        format!("file://{}", self.root.path().display())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
}

fn stanza(name: &str, version: &str, extra: &str) -> String {
    format!("Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: Test <t@vessel.invalid>\n{extra}Description: fake {name}\n for vessel's tests\n .\n second paragraph\n\n")
}

fn file_fields(pool: &str, deb: &[u8]) -> String {
    format!(
        "Filename: {pool}\nSize: {}\nSHA256: {}\n",
        deb.len(),
        sha256_hex(deb)
    )
}

/// Builds and signs the mirror. `signers` sign InRelease; `trusted` go into the keyring.
pub fn build_mirror_with(signers: &[&str], trusted: &[&str]) -> FakeMirror {
    let root = tempfile::tempdir().unwrap();
    let gpg = Gpg::new();
    let mut emails: Vec<&str> = signers.to_vec();
    emails.extend(trusted.iter().filter(|t| !signers.contains(t)));
    for e in &emails {
        gpg.gen_key(e);
    }

    let kernel_deb = kernel_deb(RELEASE, KERNEL_BYTES);
    let busybox_deb = make_deb("bin/busybox", BUSYBOX_BYTES, Compression::Gz);
    for (pool, deb) in [(KERNEL_POOL, &kernel_deb), (BUSYBOX_POOL, &busybox_deb)] {
        let p = root.path().join(pool);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, deb).unwrap();
    }

    // Several metapackage versions, in an order where neither "first", "last" nor a plain
    // string comparison finds the newest (6.1.99-1 > 6.1.99~rc1-1 > 6.1.50-1).
    let missing = |n: u32| {
        format!(
            "Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-{n}-cloud-amd64_missing.deb\nSize: 10\nSHA256: {}\n",
            "0".repeat(64)
        )
    };
    let mut packages = String::new();
    packages += &stanza(
        "linux-image-cloud-amd64",
        "6.1.99~rc1-1",
        "Depends: linux-image-6.1.0-98-cloud-amd64 (= 6.1.99~rc1-1)\n",
    );
    packages += &stanza(
        "linux-image-6.1.0-98-cloud-amd64",
        "6.1.99~rc1-1",
        &missing(98),
    );
    packages += &stanza(
        "busybox-static",
        "1:1.35.0-4+b1",
        &format!(
            "Depends: libc6\n{}",
            file_fields(BUSYBOX_POOL, &busybox_deb)
        ),
    );
    packages += &stanza(
        "linux-image-cloud-amd64",
        "6.1.99-1",
        "Depends: initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-99-cloud-amd64 (= 6.1.99-1)\n",
    );
    packages += &stanza(
        KERNEL_PACKAGE,
        "6.1.99-1",
        &file_fields(KERNEL_POOL, &kernel_deb),
    );
    packages += &stanza(
        "linux-image-cloud-amd64",
        "6.1.50-1",
        "Depends: linux-image-6.1.0-97-cloud-amd64\n",
    );
    packages += &stanza("linux-image-6.1.0-97-cloud-amd64", "6.1.50-1", &missing(97));

    write_suite(root.path(), &gpg, signers, "bookworm", &packages);
    let keyring = root.path().join("keyring.gpg");
    gpg.export(trusted, &keyring);
    FakeMirror { root, keyring, gpg }
}

/// Writes `dists/<codename>/` under `root`: `packages` as Packages.xz, a Release listing
/// it, and InRelease clear-signed by `signers`.
fn write_suite(root: &Path, gpg: &Gpg, signers: &[&str], codename: &str, packages: &str) {
    let mut packages_xz = Vec::new();
    xz2::read::XzEncoder::new(packages.as_bytes(), 6)
        .read_to_end(&mut packages_xz)
        .unwrap();
    let dists = root.join("dists").join(codename);
    std::fs::create_dir_all(dists.join("main/binary-amd64")).unwrap();
    std::fs::write(dists.join("main/binary-amd64/Packages.xz"), &packages_xz).unwrap();

    // Like the real security archive, its Release names the component `updates/main`
    // while listing the files as `main/...`.
    let components = if codename.ends_with("-security") {
        "updates/main"
    } else {
        "main"
    };
    let release = format!(
        "Origin: Debian\nLabel: Debian\nSuite: stable\nCodename: {codename}\nDate: Sat, 01 Jan 2000 00:00:00 UTC\n\
         Architectures: amd64\nComponents: {components}\nDescription: fake\n\
         MD5Sum:\n 00000000000000000000000000000000 {xzlen} main/binary-amd64/Packages.xz\n\
         SHA256:\n {plain_sha} {plain_len} main/binary-amd64/Packages\n {xz_sha} {xzlen} main/binary-amd64/Packages.xz\n",
        xzlen = packages_xz.len(),
        xz_sha = sha256_hex(&packages_xz),
        plain_sha = sha256_hex(packages.as_bytes()),
        plain_len = packages.len(),
    );
    let release_path = dists.join("Release");
    std::fs::write(&release_path, release).unwrap();
    gpg.clearsign(signers, &release_path, &dists.join("InRelease"));
    // Like a real mirror, the unsigned Release stays too; it must never be used.
}

pub fn build_mirror() -> FakeMirror {
    build_mirror_with(&["archive@vessel.invalid"], &["archive@vessel.invalid"])
}

/// Every path under `dir`, relative, sorted (directories included).
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// One newc entry, as far as the tests care.
#[derive(Debug)]
pub struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses an uncompressed newc initramfs (panics on anything malformed).
pub fn read_initramfs(path: &Path) -> Vec<CpioEntry> {
    let raw = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        let h = &raw[pos..pos + 110];
        assert_eq!(&h[..6], b"070701", "bad magic at {pos}");
        let f = |i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        let (mode, size, rdev, namesize) = (f(1), f(6) as usize, (f(9), f(10)), f(11) as usize);
        let name = std::str::from_utf8(&raw[pos + 110..pos + 110 + namesize - 1])
            .unwrap()
            .to_owned();
        let data_at = (pos + 110 + namesize).next_multiple_of(4);
        let data = raw[data_at..data_at + size].to_vec();
        pos = (data_at + size).next_multiple_of(4);
        if name == "TRAILER!!!" {
            assert_eq!(pos, raw.len(), "bytes after the trailer");
            return out;
        }
        out.push(CpioEntry {
            name,
            mode,
            rdev,
            data,
        });
    }
}
