//! A guest's memory and virtqueue state against virtio-vsock's queue and
//! packet code (see `virtio::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| virtio::fuzzing::vsock_queues(data));
