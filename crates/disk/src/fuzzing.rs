//! An entry point for fuzzing the qcow2 reader and writer with arbitrary
//! image files (the cargo-fuzz target in `fuzz/` and the corpus replay in
//! this crate's tests): a corrupt image must be refused or served, never
//! panic, hang or read and write outside what it describes.

use std::io;
use std::path::PathBuf;

use crate::qcow2::Qcow2Image;
use crate::DiskImage;

/// Opens `input` as a qcow2 image (next to a 64 KiB `backing.raw`) read-only and reads samples of its
/// disk; then read-write, writes sectors and checks that they read back.
/// Panics only on a bug.
pub fn qcow2_image(input: &[u8]) {
    let Ok(dir) = ScratchDir::new() else {
        return;
    };
    // A raw file an image may name as its backing file.
    let backing: Vec<u8> = (0..64 << 10).map(|i: u32| i as u8).collect();
    if std::fs::write(dir.0.join("backing.raw"), backing).is_err() {
        return;
    }
    let path = dir.0.join("fuzz.qcow2");
    if std::fs::write(&path, input).is_err() {
        return;
    }
    let open = |readonly| -> Option<Qcow2Image> {
        let file = crate::open_locked(&path, readonly).ok()?;
        Qcow2Image::open(file, &path, readonly).ok()
    };
    if let Some(mut image) = open(true) {
        for offset in sample_offsets(image.len()) {
            let mut buf = vec![0u8; 4096.min((image.len() - offset) as usize)];
            let _ = image.read_at(&mut buf, offset);
        }
    }
    let Some(mut image) = open(false) else {
        return;
    };
    for (i, offset) in sample_offsets(image.len()).into_iter().enumerate() {
        let len = 1024.min((image.len() - offset) as usize);
        let data: Vec<u8> = (0..len).map(|b| (b + i * 7 + 1) as u8).collect();
        if image.write_at(&data, offset).is_err() {
            // A corrupt table found while allocating: refused, fine.
            continue;
        }
        let mut back = vec![0u8; len];
        if image.read_at(&mut back, offset).is_ok() {
            assert!(
                back == data,
                "{len} bytes written at {offset} read back differently"
            );
        }
    }
    let _ = image.flush();
}

/// Where to look in a disk of `len` bytes: the start, sectors spread over
/// it, and its last sector.
fn sample_offsets(len: u64) -> Vec<u64> {
    if len < 512 {
        return Vec::new();
    }
    let last = len / 512 * 512 - 512;
    let mut offsets = vec![0, last];
    for i in 1..8u64 {
        offsets.push(last / 8 * i / 512 * 512);
    }
    offsets
}

/// A directory removed when dropped (tempfile is only a dev-dependency).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> io::Result<ScratchDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vessel-fuzz-qcow2-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::Rng;

    #[test]
    fn qcow2_corpus_and_mutations_are_survived() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_image");
        let mut inputs = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
        assert!(!inputs.is_empty(), "{}: an empty corpus", dir.display());
        for input in &inputs {
            qcow2_image(input);
        }
        // Mutations in the header and the first tables, where the
        // format's structure is.
        let mut rng = Rng::derived(testkit::seed(), "qcow2_image");
        for _ in 0..300 {
            let mut v = inputs[rng.below(inputs.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(v.len().min(0x4_0000) as u64) as usize;
                match rng.below(3) {
                    0 => v[at] = rng.next() as u8,
                    1 => v[at] ^= 1 << rng.below(8),
                    _ => v[at] = rng.pick(&[0, 1, 0xff, 0x80]),
                }
            }
            qcow2_image(&v);
        }
    }
}
