//! A guest's memory and virtqueue state against virtio-blk's queue code
//! (see `virtio::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| virtio::fuzzing::block_queue(data));
