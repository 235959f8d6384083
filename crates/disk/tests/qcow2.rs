//! vessel's qcow2 against QEMU's own tool: images `qemu-img` makes are
//! read as it reads them, and what vessel writes passes `qemu-img check`
//! and converts back to the bytes a plain model holds. Random writes use
//! a seeded generator (VESSEL_TEST_SEED replays one).

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::qcow2::Qcow2Image;
use disk::{open_locked, DiskImage};

fn qemu_img() -> bool {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        testkit::not_run(
            testkit::prereq::PROGRAM,
            "qemu-img is not installed (apt-get install qemu-utils)",
        );
        return false;
    }
    true
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img check`: 0 clean, 3 leaked clusters only (allowed where said).
fn check(path: &Path, leaks_allowed: bool) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let code = out.status.code();
    let ok = code == Some(0) || (leaks_allowed && code == Some(3));
    assert!(
        ok,
        "qemu-img check exited {code:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn to_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("converted.raw");
    run(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(raw).unwrap()
}

fn open(path: &Path, readonly: bool) -> Qcow2Image {
    Qcow2Image::open(open_locked(path, readonly).unwrap(), path, readonly).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn random_writes_match_a_model_and_pass_qemu_img_check() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("disk.qcow2");
    const SIZE: usize = 16 << 20;
    // Small clusters: more tables, more allocation paths.
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path.to_str().unwrap(),
        "16M",
    ]);
    let mut model = vec![0u8; SIZE];
    let mut rng = testkit::Rng::new(testkit::seed());
    {
        let mut img = open(&path, false);
        assert_eq!(img.len(), SIZE as u64);
        for round in 0..300 {
            let len = 1 + rng.below(20_000) as usize;
            let at = rng.below((SIZE - len) as u64) as usize;
            if rng.below(3) == 0 {
                let mut got = vec![0u8; len];
                img.read_at(&mut got, at as u64).unwrap();
                assert!(
                    got == model[at..at + len],
                    "round {round}: read at {at} len {len}"
                );
            } else {
                let data = pattern(len, round as u8);
                img.write_at(&data, at as u64).unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
        }
        img.flush().unwrap();
    }
    check(&path, false);
    assert!(
        to_raw(&path, dir.path()) == model,
        "qemu-img convert disagrees with the model"
    );
}

#[test]
fn an_overlay_reads_its_raw_backing_file_and_copies_on_write() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes = pattern(4 << 20, 7);
    std::fs::write(&base, &base_bytes).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    // A relative backing name: found beside the overlay.
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
        "8M",
    ]);
    let mut model = base_bytes.clone();
    model.resize(8 << 20, 0);
    {
        let mut img = open(&overlay, false);
        let mut got = vec![0u8; 1 << 20];
        img.read_at(&mut got, 1 << 20).unwrap();
        assert!(got == model[1 << 20..2 << 20], "backing data shows through");
        // A write inside one cluster keeps the rest of that cluster.
        img.write_at(b"vessel", 70_000).unwrap();
        model[70_000..70_006].copy_from_slice(b"vessel");
        // A write past the backing file's end.
        img.write_at(&[9u8; 5000], (5 << 20) - 100).unwrap();
        model[(5 << 20) - 100..(5 << 20) + 4900].fill(9);
        let mut got = vec![0u8; 200_000];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == model[..200_000]);
    }
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "the backing file is untouched"
    );
    check(&overlay, false);
    assert!(to_raw(&overlay, dir.path()) == model);
}

#[test]
fn compressed_clusters_read_and_are_rewritten_on_write() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 2 << 20];
    for (i, chunk) in bytes.chunks_mut(4096).enumerate() {
        chunk[..64].copy_from_slice(&pattern(64, i as u8));
    }
    std::fs::write(&raw, &bytes).unwrap();
    let comp = dir.path().join("comp.qcow2");
    run(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    let mut model = bytes.clone();
    {
        let mut img = open(&comp, false);
        let mut got = vec![0u8; bytes.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == bytes, "compressed clusters inflate to the source");
        img.write_at(b"changed", 123_456).unwrap();
        model[123_456..123_463].copy_from_slice(b"changed");
    }
    // The compressed cluster left behind is counted but unused: a leak.
    check(&comp, true);
    assert!(to_raw(&comp, dir.path()) == model);
}

#[test]
fn corrupt_and_unsupported_images_are_refused_in_one_line() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    run(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
    let bytes = std::fs::read(&good).unwrap();
    type Corruption = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: [(&str, Corruption); 6] = [
        ("no qcow2 magic", Box::new(|b| b[0] = b'X')),
        ("qcow2 version 9", Box::new(|b| b[7] = 9)),
        ("cluster_bits 40", Box::new(|b| b[23] = 40)),
        ("encrypted", Box::new(|b| b[35] = 1)),
        ("incompatible features", Box::new(|b| b[79] = 1)),
        (
            "past the end of the file",
            Box::new(|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
    ];
    for (want, corrupt) in cases {
        let mut b = bytes.clone();
        corrupt(&mut b);
        let path = dir.path().join("bad.qcow2");
        std::fs::write(&path, &b).unwrap();
        let err = Qcow2Image::open(open_locked(&path, true).unwrap(), &path, true)
            .err()
            .unwrap_or_else(|| panic!("{want}: opened"))
            .to_string();
        assert!(
            err.contains(want) && err.contains("bad.qcow2"),
            "{want}: {err}"
        );
        assert_eq!(err.lines().count(), 1);
    }
    let short = dir.path().join("short.qcow2");
    std::fs::write(&short, &bytes[..20]).unwrap();
    let err = Qcow2Image::open(open_locked(&short, true).unwrap(), &short, true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shorter than a qcow2 header"), "{err}");
}

/// Images vessel creates: `qemu-img` checks them clean and reads their
/// size and backing file; vessel then writes them (over a raw backing
/// file too) and `qemu-img convert` shows the writes over the backing.
#[test]
fn created_images_are_valid_qcow2_and_take_writes() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Plain: 3 GiB (six L2 tables' worth of L1 entries), all zeros.
    let plain = dir.path().join("plain.qcow2");
    disk::qcow2::create(&plain, 3 << 30, None).unwrap();
    check(&plain, false);
    let info = run(&["info", "--output=json", plain.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 3u64 << 30);
    let mut image = open(&plain, false);
    image.write_at(&pattern(8192, 7), (2 << 30) + 512).unwrap();
    drop(image);
    check(&plain, false);
    let mut back = vec![0u8; 8192];
    open(&plain, true)
        .read_at(&mut back, (2 << 30) + 512)
        .unwrap();
    assert_eq!(back, pattern(8192, 7));

    // Over a raw backing file named relative to the image.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(1 << 20, 3)).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let backing = disk::qcow2::NewBacking {
        name: "base.raw".into(),
        format: "raw".into(),
    };
    disk::qcow2::create(&overlay, 1 << 20, Some(&backing)).unwrap();
    check(&overlay, false);
    let info = run(&["info", "--output=json", overlay.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let mut image = open(&overlay, false);
    image.write_at(&pattern(4096, 9), 4096).unwrap();
    drop(image);
    check(&overlay, false);
    let mut expected = pattern(1 << 20, 3);
    expected[4096..8192].copy_from_slice(&pattern(4096, 9));
    assert!(
        to_raw(&overlay, dir.path()) == expected,
        "the overlay over its backing"
    );

    // Refusals: an existing file, a bad size, a bad backing format.
    let e = disk::qcow2::create(&overlay, 1 << 20, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlay.qcow2") && e.contains("exists"), "{e}");
    let e = disk::qcow2::create(&dir.path().join("odd.qcow2"), 1000, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 512"), "{e}");
    let vmdk = disk::qcow2::NewBacking {
        name: "x".into(),
        format: "vmdk".into(),
    };
    let e = disk::qcow2::create(&dir.path().join("b.qcow2"), 1 << 20, Some(&vmdk))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vmdk"), "{e}");
}
