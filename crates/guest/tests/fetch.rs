//! End-to-end tests of `fetch` against a signed fake mirror on the local disk (no network).

mod support;

use std::path::Path;

use guest::{cached, fetch, Error, FetchOptions};
use support::*;

const S_IFMT: u32 = 0o170000;

#[test]
fn fetch_builds_and_caches_the_guest() {
    if !gpg_available("fetch_builds_and_caches_the_guest") {
        return;
    }
    let mirror = build_mirror();
    let data = tempfile::tempdir().unwrap();
    assert!(cached(data.path()).unwrap().is_none());

    let image = fetch(&mirror.options(data.path())).unwrap();
    assert_eq!(image.release, RELEASE);
    let release_dir = data.path().join("guest").join(RELEASE);
    assert_eq!(image.kernel, release_dir.join("vmlinuz"));
    assert_eq!(image.initrd, release_dir.join("initrd.img"));
    assert!(image.kernel.is_absolute() && image.initrd.is_absolute());
    assert_eq!(std::fs::read(&image.kernel).unwrap(), KERNEL_BYTES);

    let entries = read_initramfs(&image.initrd);
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("initramfs lacks {n}"))
    };
    let init = get("init");
    assert_eq!(init.mode, 0o100755);
    let init_text = std::str::from_utf8(&init.data).unwrap();
    assert!(
        init_text.contains("0x501"),
        "init does not write the exit-status port"
    );
    assert!(
        init_text.contains("vessel.cmd=") && init_text.contains("base64 -d"),
        "init does not parse vessel.cmd"
    );
    assert_eq!(init_text, guest::INIT_SCRIPT);
    assert_eq!(get("bin/busybox").mode, 0o100755);
    assert_eq!(get("bin/busybox").data, BUSYBOX_BYTES);
    // The virtio drivers' modules from the kernel package, with their load orders.
    assert_eq!(
        get("lib/modules/vessel/virtio_blk.deps").data,
        b"virtio_ring\nvirtio\nvirtio_blk\n"
    );
    assert_eq!(
        &get("lib/modules/vessel/virtio_net.ko").data[..4],
        b"\x7fELF",
        "a module file"
    );
    // The power button's driver and its event interface come too.
    assert_eq!(get("lib/modules/vessel/button.deps").data, b"button\n");
    assert_eq!(get("lib/modules/vessel/evdev.deps").data, b"evdev\n");
    let kos = entries.iter().filter(|e| e.name.ends_with(".ko")).count();
    assert_eq!(kos, 13, "only the modules the drivers need");
    assert_eq!(get("dev/console").mode, 0o020600);
    assert_eq!(get("dev/console").rdev, (5, 1));
    assert_eq!(get("dev/null").mode & S_IFMT, 0o020000);
    assert_eq!(get("dev/null").rdev, (1, 3));
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt",
        "run",
    ] {
        assert_eq!(get(dir).mode & S_IFMT, 0o040000, "{dir} is not a directory");
    }

    // Exactly the cache layout, no leftovers of the download.
    assert_eq!(
        tree(data.path()),
        [
            "guest".to_string(),
            "guest/6.1.0-99-cloud-amd64".into(),
            "guest/6.1.0-99-cloud-amd64/initramfs.id".into(),
            "guest/6.1.0-99-cloud-amd64/initrd.img".into(),
            "guest/6.1.0-99-cloud-amd64/vmlinuz".into(),
            "guest/current.json".into(),
        ]
    );
    let record: guest::GuestImage =
        serde_json::from_slice(&std::fs::read(data.path().join("guest/current.json")).unwrap())
            .unwrap();
    assert_eq!(record, image);
    assert_eq!(cached(data.path()).unwrap(), Some(image.clone()));

    // Same inputs, same initramfs bytes.
    let first_initrd = std::fs::read(&image.initrd).unwrap();
    let again = tempfile::tempdir().unwrap();
    let image2 = guest::fetch_latest(&mirror.options(again.path())).unwrap();
    assert_eq!(std::fs::read(&image2.initrd).unwrap(), first_initrd);

    // Idempotent and offline: with the mirror gone the cache answers.
    let opts = mirror.options(data.path());
    drop(mirror);
    assert_eq!(fetch(&opts).unwrap(), image);
    let nowhere = FetchOptions {
        mirror: Some("file:///nonexistent/vessel-mirror".into()),
        keyring: Some("/nonexistent/keyring.gpg".into()),
        ..opts.clone()
    };
    assert_eq!(fetch(&nowhere).unwrap(), image);

    // A damaged cache is not trusted: fetch goes back to the (now missing) mirror.
    std::fs::write(&image.initrd, b"").unwrap();
    assert!(cached(data.path()).unwrap().is_none());
    assert!(fetch(&nowhere).is_err());
}

#[test]
fn relative_data_dir_gives_absolute_paths() {
    if !gpg_available("relative_data_dir_gives_absolute_paths") {
        return;
    }
    let mirror = build_mirror();
    let data = tempfile::tempdir().unwrap();
    // The same directory spelled relative to the current one ("../../tmp/...").
    let cwd = std::env::current_dir().unwrap();
    let mut rel = std::path::PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.push(data.path().strip_prefix("/").unwrap());
    assert!(rel.is_relative());
    let image = fetch(&mirror.options(&rel)).unwrap();
    assert!(image.kernel.is_absolute(), "{}", image.kernel.display());
    assert!(image.initrd.is_absolute(), "{}", image.initrd.display());
    assert!(image.kernel.is_file());
    assert!(
        image.kernel.starts_with(data.path()),
        "{}",
        image.kernel.display()
    );
}

/// Fetching must fail and leave `data` exactly as it was.
fn assert_fails_cleanly(opts: &FetchOptions, data: &Path) -> Error {
    let before = tree(data);
    let err = fetch(opts).unwrap_err();
    assert_eq!(tree(data), before, "fetch left files behind after: {err}");
    assert!(!err.to_string().contains('\n'), "multi-line message: {err}");
    err
}

fn data_dir_with_marker() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("unrelated.txt"), b"keep me").unwrap();
    data
}

#[test]
fn corrupt_deb_is_rejected_and_leaves_nothing() {
    if !gpg_available("corrupt_deb_is_rejected_and_leaves_nothing") {
        return;
    }
    let mirror = build_mirror();
    let deb = mirror.path(BUSYBOX_POOL);
    let mut bytes = std::fs::read(&deb).unwrap();
    let expected = sha256_hex(&bytes);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&deb, &bytes).unwrap();

    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    let msg = err.to_string();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains("busybox-static"), "{msg}");
    assert!(msg.contains(&expected), "{msg}");
    assert!(msg.contains(&sha256_hex(&bytes)), "{msg}");
}

#[test]
fn truncated_kernel_deb_is_rejected() {
    if !gpg_available("truncated_kernel_deb_is_rejected") {
        return;
    }
    let mirror = build_mirror();
    let deb = mirror.path(KERNEL_POOL);
    let mut bytes = std::fs::read(&deb).unwrap();
    bytes.pop();
    std::fs::write(&deb, &bytes).unwrap();
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(KERNEL_PACKAGE), "{err}");
}

#[test]
fn tampered_inrelease_is_rejected() {
    if !gpg_available("tampered_inrelease_is_rejected") {
        return;
    }
    let mirror = build_mirror();
    let inrelease = mirror.path("dists/bookworm/InRelease");
    let text = std::fs::read_to_string(&inrelease).unwrap();
    assert!(text.contains("Label: Debian"));
    std::fs::write(&inrelease, text.replace("Label: Debian", "Label: Evil!!")).unwrap();
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("InRelease"), "{err}");
}

#[test]
fn unsigned_or_untrusted_inrelease_is_rejected() {
    if !gpg_available("unsigned_or_untrusted_inrelease_is_rejected") {
        return;
    }
    // Signed by a key the keyring does not hold.
    let mirror = build_mirror_with(&["intruder@vessel.invalid"], &["archive@vessel.invalid"]);
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");

    // Not signed at all: the plain Release text served as InRelease.
    let mirror = build_mirror();
    std::fs::copy(
        mirror.path("dists/bookworm/Release"),
        mirror.path("dists/bookworm/InRelease"),
    )
    .unwrap();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");

    // A keyring that does not exist is named in the error.
    let mirror = build_mirror();
    let opts = FetchOptions {
        keyring: Some(mirror.path("no-such-keyring.gpg")),
        ..mirror.options(data.path())
    };
    let err = assert_fails_cleanly(&opts, data.path());
    assert!(matches!(err, Error::KeyringMissing { .. }), "{err}");
    assert!(err.to_string().contains("no-such-keyring.gpg"), "{err}");
}

#[test]
fn one_known_signature_among_several_is_enough() {
    if !gpg_available("one_known_signature_among_several_is_enough") {
        return;
    }
    // Like Debian's InRelease: several signatures, the keyring knows only one of them.
    let mirror = build_mirror_with(
        &["old@vessel.invalid", "archive@vessel.invalid"],
        &["archive@vessel.invalid"],
    );
    let data = tempfile::tempdir().unwrap();
    let image = fetch(&mirror.options(data.path())).unwrap();
    assert_eq!(image.release, RELEASE);
}

#[test]
fn unsigned_packages_index_is_not_trusted() {
    if !gpg_available("unsigned_packages_index_is_not_trusted") {
        return;
    }
    let mirror = build_mirror();
    // A Packages.xz that differs from what the signed Release lists.
    let path = mirror.path("dists/bookworm/main/binary-amd64/Packages.xz");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("Packages.xz"), "{err}");
}

#[test]
fn missing_mirror_file_names_the_url() {
    if !gpg_available("missing_mirror_file_names_the_url") {
        return;
    }
    let mirror = build_mirror();
    std::fs::remove_file(mirror.path(KERNEL_POOL)).unwrap();
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options(data.path()), data.path());
    assert!(err.to_string().contains(KERNEL_POOL), "{err}");
}

#[test]
fn unsupported_mirror_scheme() {
    let data = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        data_dir: data.path().to_owned(),
        mirror: Some("ftp://mirror.invalid/debian".into()),
        security_mirror: Some(String::new()),
        keyring: None,
        progress: false,
    };
    let err = fetch(&opts).unwrap_err();
    assert!(matches!(err, Error::UnsupportedUrl { .. }), "{err}");
    assert!(tree(data.path()).is_empty());
}

const SECURITY_KERNEL_BYTES: &[u8] = b"MZ fake bzImage with security fixes";

#[test]
fn newer_security_kernel_is_chosen() {
    if !gpg_available("newer_security_kernel_is_chosen") {
        return;
    }
    let mirror = build_mirror();
    let security = mirror.security_mirror(101, "6.1.105-1", SECURITY_KERNEL_BYTES);
    // The security index alone carries this package: it must be resolved there, not in main.
    assert_eq!(security.release, "6.1.0-101-cloud-amd64");
    let data = tempfile::tempdir().unwrap();
    let image = fetch(&mirror.options_with(&security, data.path())).unwrap();
    assert_eq!(image.release, security.release);
    assert_eq!(std::fs::read(&image.kernel).unwrap(), SECURITY_KERNEL_BYTES);
    // busybox still comes from bookworm.
    let entries = read_initramfs(&image.initrd);
    let busybox = entries.iter().find(|e| e.name == "bin/busybox").unwrap();
    assert_eq!(busybox.data, BUSYBOX_BYTES);
    assert_eq!(
        tree(data.path()),
        [
            "guest".to_string(),
            "guest/6.1.0-101-cloud-amd64".into(),
            "guest/6.1.0-101-cloud-amd64/initramfs.id".into(),
            "guest/6.1.0-101-cloud-amd64/initrd.img".into(),
            "guest/6.1.0-101-cloud-amd64/vmlinuz".into(),
            "guest/current.json".into(),
        ]
    );

    // An intact cache still answers without touching either mirror.
    let nowhere = FetchOptions {
        mirror: Some("file:///nonexistent/vessel-mirror".into()),
        security_mirror: Some("file:///nonexistent/vessel-security".into()),
        ..mirror.options(data.path())
    };
    assert_eq!(fetch(&nowhere).unwrap(), image);
}

#[test]
fn older_security_kernel_loses_to_main() {
    if !gpg_available("older_security_kernel_loses_to_main") {
        return;
    }
    let mirror = build_mirror();
    // 6.1.99~rc2-1 sorts before main's 6.1.99-1 (but after a plain-string comparison would
    // put it). Its .deb is removed, so fetching it would fail.
    let security = mirror.security_mirror(100, "6.1.99~rc2-1", SECURITY_KERNEL_BYTES);
    std::fs::remove_file(security.path(&security.pool)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let image = fetch(&mirror.options_with(&security, data.path())).unwrap();
    assert_eq!(image.release, RELEASE);
    assert_eq!(std::fs::read(&image.kernel).unwrap(), KERNEL_BYTES);
}

#[test]
fn disabled_security_mirror_means_main_only() {
    if !gpg_available("disabled_security_mirror_means_main_only") {
        return;
    }
    let mirror = build_mirror();
    for off in ["", "  "] {
        let data = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            security_mirror: Some(off.into()),
            ..mirror.options(data.path())
        };
        assert_eq!(fetch(&opts).unwrap().release, RELEASE);
    }
}

/// Name of [`security_env_child`], which [`security_mirror_from_environment`] runs in a
/// child process so that setting the variable cannot race with other tests' threads.
const ENV_CHILD: &str = "security_env_child";

#[test]
fn security_mirror_from_environment() {
    if !gpg_available("security_mirror_from_environment") {
        return;
    }
    let mirror = build_mirror();
    let security = mirror.security_mirror(101, "6.1.105-1", SECURITY_KERNEL_BYTES);
    // Empty turns the security archive off (falling back to the host's apt sources instead
    // would fail here: they are not signed by the test key). A URL is used.
    for (value, want) in [("", RELEASE), (&*security.url(), &*security.release)] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([ENV_CHILD, "--exact", "--ignored", "--nocapture"])
            .env(guest::SECURITY_MIRROR_ENV, value)
            .env("VESSEL_TEST_CHILD_MIRROR", mirror.url())
            .env("VESSEL_TEST_CHILD_KEYRING", &mirror.keyring)
            .env("VESSEL_TEST_CHILD_RELEASE", want)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{value:?}: {said}");
        assert!(said.contains("1 passed"), "{value:?}: {said}");
    }
}

#[test]
#[ignore = "run by security_mirror_from_environment in a child process"]
fn security_env_child() {
    let Ok(mirror) = std::env::var("VESSEL_TEST_CHILD_MIRROR") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        data_dir: data.path().to_owned(),
        mirror: Some(mirror),
        security_mirror: None,
        keyring: std::env::var_os("VESSEL_TEST_CHILD_KEYRING").map(Into::into),
        progress: false,
    };
    let want = std::env::var("VESSEL_TEST_CHILD_RELEASE").unwrap();
    assert_eq!(fetch(&opts).unwrap().release, want);
}

#[test]
fn tampered_security_inrelease_fails_the_fetch() {
    if !gpg_available("tampered_security_inrelease_fails_the_fetch") {
        return;
    }
    let mirror = build_mirror();
    let security = mirror.security_mirror(101, "6.1.105-1", SECURITY_KERNEL_BYTES);
    let inrelease = security.path("dists/bookworm-security/InRelease");
    let text = std::fs::read_to_string(&inrelease).unwrap();
    assert!(text.contains("Label: Debian"));
    std::fs::write(&inrelease, text.replace("Label: Debian", "Label: Evil!!")).unwrap();
    let data = data_dir_with_marker();
    let err = assert_fails_cleanly(&mirror.options_with(&security, data.path()), data.path());
    let msg = err.to_string();
    let Error::SecurityMirror {
        mirror: named,
        source,
    } = &err
    else {
        panic!("not a security mirror error: {msg}");
    };
    assert_eq!(*named, security.url());
    assert!(matches!(**source, Error::BadSignature { .. }), "{msg}");
    assert!(msg.contains(&security.url()), "{msg}");
    assert!(msg.contains("bookworm-security/InRelease"), "{msg}");
    assert!(msg.contains("VESSEL_DEBIAN_SECURITY_MIRROR="), "{msg}");
}

#[test]
fn broken_security_mirror_is_not_skipped() {
    if !gpg_available("broken_security_mirror_is_not_skipped") {
        return;
    }
    let mirror = build_mirror();
    let data = data_dir_with_marker();

    // Unreachable.
    let opts = FetchOptions {
        security_mirror: Some("file:///nonexistent/vessel-security".into()),
        ..mirror.options(data.path())
    };
    let err = assert_fails_cleanly(&opts, data.path());
    assert!(matches!(err, Error::SecurityMirror { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("file:///nonexistent/vessel-security"),
        "{err}"
    );

    // The main archive's index served as bookworm-security: signed, but the wrong codename.
    let security = mirror.security_mirror(101, "6.1.105-1", SECURITY_KERNEL_BYTES);
    let dists = security.path("dists/bookworm-security");
    for f in ["InRelease", "main/binary-amd64/Packages.xz"] {
        std::fs::copy(mirror.path(&format!("dists/bookworm/{f}")), dists.join(f)).unwrap();
    }
    let err = assert_fails_cleanly(&mirror.options_with(&security, data.path()), data.path());
    assert!(matches!(err, Error::SecurityMirror { .. }), "{err}");
    assert!(err.to_string().contains("\"bookworm\""), "{err}");

    // The newer kernel's .deb does not match the signed security index.
    let security = mirror.security_mirror(101, "6.1.105-1", SECURITY_KERNEL_BYTES);
    let deb = security.path(&security.pool);
    let mut bytes = std::fs::read(&deb).unwrap();
    bytes.pop();
    std::fs::write(&deb, &bytes).unwrap();
    let err = assert_fails_cleanly(&mirror.options_with(&security, data.path()), data.path());
    let Error::SecurityMirror { source, .. } = &err else {
        panic!("not a security mirror error: {err}");
    };
    assert!(matches!(**source, Error::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&security.pool), "{err}");
}

#[test]
fn security_sources_discovery() {
    let list = "\
deb http://m.example/debian bookworm main
deb-src http://s.example/debian-security bookworm-security main
deb http://s.example/debian-security bookworm-security contrib
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://s.example/debian-security bookworm-security main non-free-firmware
";
    assert_eq!(
        guest::parse_sources_list_for(list, "bookworm-security").as_deref(),
        Some("http://s.example/debian-security")
    );
    assert_eq!(
        guest::parse_sources_list(list).as_deref(),
        Some("http://m.example/debian")
    );
    assert_eq!(
        guest::parse_sources_list_for(
            "deb http://m.example/debian bookworm main\n",
            "bookworm-security"
        ),
        None
    );

    let sources = "\
Types: deb
URIs: http://m.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://off.example/debian-security
Suites: bookworm-security
Components: main
Enabled: no

Types: deb
URIs: https://s.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
    assert_eq!(
        guest::parse_deb822_sources_for(sources, "bookworm-security").as_deref(),
        Some("https://s.example/debian-security")
    );
    assert_eq!(
        guest::parse_deb822_sources(sources).as_deref(),
        Some("http://m.example/debian")
    );
}

/// Real download from the mirror in the host's apt configuration (or VESSEL_DEBIAN_MIRROR),
/// checked with the real archive keyring. Needs the network, and downloads about 20 MB
/// each time, so `cargo test` leaves it out; CI runs it with
/// `cargo test --workspace -- --ignored`.
#[test]
#[ignore = "downloads ~20 MB from the configured Debian mirror"]
fn real_mirror() {
    let _timed = testkit::timed();
    let data = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        data_dir: data.path().to_owned(),
        mirror: None,
        security_mirror: None,
        keyring: None,
        progress: true,
    };
    let image = fetch(&opts).unwrap();
    eprintln!("{image:?}");
    assert!(image.release.ends_with("-cloud-amd64"));
    let kernel = std::fs::read(&image.kernel).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "not a bzImage");
    let entries = read_initramfs(&image.initrd);
    let busybox = entries.iter().find(|e| e.name == "bin/busybox").unwrap();
    assert_eq!(&busybox.data[..4], b"\x7fELF");
    if let Ok(dir) = std::env::var("VESSEL_KEEP_REAL_GUEST") {
        for p in [&image.kernel, &image.initrd] {
            std::fs::copy(p, Path::new(&dir).join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn initramfs_from_another_vessel_version_is_rebuilt() {
    if !gpg_available("initramfs_from_another_vessel_version_is_rebuilt") {
        return;
    }
    let mirror = build_mirror();
    let data = tempfile::tempdir().unwrap();
    let image = fetch(&mirror.options(data.path())).unwrap();
    let id_file = image.initrd.with_file_name("initramfs.id");
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap(),
        guest::initramfs_id()
    );
    // A cache written by a vessel with another /init.
    std::fs::write(&id_file, "0000").unwrap();
    std::fs::write(&image.initrd, b"stale initramfs").unwrap();
    assert_eq!(cached(data.path()).unwrap(), None);
    let again = fetch(&mirror.options(data.path())).unwrap();
    assert_eq!(again, image);
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap(),
        guest::initramfs_id()
    );
    assert_ne!(std::fs::read(&image.initrd).unwrap(), b"stale initramfs");
    assert_eq!(cached(data.path()).unwrap(), Some(image));
}
