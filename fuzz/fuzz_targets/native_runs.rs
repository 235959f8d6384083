//! Guest code with native runs against the interpreter alone (see
//! `emu::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    emu::fuzzing::native_runs(data);
});
