//! `vessel-runc`: a runc-compatible OCI runtime on vessel's container code, enough for
//! containerd's runc shim (`ctr run --runc-binary vessel-runc ...`).
//!
//! State lives in `<root>/<id>/state.json` (written atomically); the container's init
//! waits on `<root>/<id>/exec.fifo` between `create` and `start`, as with runc. Errors
//! are one line on stderr and, with `--log`, in the log file (runc's JSON format with
//! `--log-format json`, which the shim reads).

#[path = "../runc/mod.rs"]
mod runc;

fn main() -> std::process::ExitCode {
    runc::main()
}
