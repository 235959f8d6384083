//! The virtual machine monitor: assembles a machine from a validated
//! configuration (memory layout, Linux boot, ACPI tables, device buses,
//! vCPU threads) and runs it on any accelerator behind the `hypervisor`
//! boundary.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod layout;
pub mod machine;
mod sys;

pub use config::{MachineConfig, SigtermAction, MAX_CPUS};
pub use machine::{run, Console, Outcome, StopReason, VmmError};
