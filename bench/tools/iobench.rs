//! Guest-side disk benchmark for bench/disk.sh: O_DIRECT sequential write
//! and read of a block device, then 4 KiB random reads, each timed with
//! the monotonic clock inside the guest. Built static by the script
//! (std only: `rustc -O -C target-feature=+crt-static`).
//!
//!   iobench DEVICE MIB RANDOM_READS

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

const O_DIRECT: i32 = 0o40000;

/// A buffer of `len` bytes aligned for O_DIRECT (4 KiB): the storage and
/// where the aligned part starts.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    (v, off)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: iobench DEVICE MIB RANDOM_READS");
        std::process::exit(2);
    }
    let mib: u64 = args[2].parse().expect("MIB");
    let reads: u64 = args[3].parse().expect("RANDOM_READS");
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&args[1])
        .expect("opening the device with O_DIRECT");
    let (mut block_store, at) = aligned(1 << 20);
    let block = &mut block_store[at..at + (1 << 20)];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let t = Instant::now();
    for i in 0..mib {
        dev.write_all_at(block, i << 20).expect("write");
    }
    dev.sync_data().expect("fdatasync");
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..mib {
        dev.read_exact_at(block, i << 20).expect("read");
    }
    let r = t.elapsed().as_secs_f64();
    let (mut small_store, at) = aligned(4096);
    let small = &mut small_store[at..at + 4096];
    let blocks = (mib << 20) / 4096;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let t = Instant::now();
    for _ in 0..reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        dev.read_exact_at(small, (x % blocks) * 4096).expect("random read");
    }
    let rr = t.elapsed().as_secs_f64();
    println!("iobench seqwrite_mbps={:.1} seqread_mbps={:.1} randread_iops={:.0}",
        mib as f64 / w, mib as f64 / r, reads as f64 / rr);
}
