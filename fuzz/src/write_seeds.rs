//! Writes the well-formed inputs the virtio targets start from into
//! `corpus/<target>/seed-<n>` (cargo run --bin write_seeds, in fuzz/).
//! The qcow2 seeds are made with qemu-img (see README.md).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("block_queue", virtio::fuzzing::block_seeds()),
        ("vsock_queues", virtio::fuzzing::vsock_seeds()),
    ] {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (n, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n}")), seed)?;
        }
        println!("{}: {} seeds", dir.display(), seeds.len());
    }
    Ok(())
}
