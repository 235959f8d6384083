//! An image file against the qcow2 reader and writer (see
//! `disk::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| disk::fuzzing::qcow2_image(data));
