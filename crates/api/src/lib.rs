//! The vessel daemon's REST API, as both the daemon and the `vessel`
//! command see it: JSON over HTTP/1.1 on a Unix socket.
//!
//! - `GET /1.0`: the server.
//! - `GET /1.0/instances`, `POST /1.0/instances` ([`CreateRequest`]).
//! - `GET /1.0/instances/{name}`, `DELETE /1.0/instances/{name}?force=true`.
//! - `PUT /1.0/instances/{name}/state` ([`StateRequest`]).
//! - `POST /1.0/instances/{name}/exec`: an HTTP upgrade to `vessel-exec`,
//!   after which the connection carries `vessel_agent`'s exec frames.
//! - `GET /1.0/instances/{name}/logs`: the console log, as text.
//! - `GET /1.0/operations/{id}`, `GET /1.0/operations/{id}/wait?timeout=S`.
//! - `GET /1.0/events`: one JSON [`Event`] per line as instances change.
//! - `GET /1.0/images`, `POST /1.0/images` ([`BuildRequest`]),
//!   `DELETE /1.0/images/{name}` (names contain `/`: `debian/bookworm`).
//!
//! Changes that take time (create, start, stop, restart, delete) answer
//! `202 Accepted` with an [`Operation`] to wait on. Every error is an
//! [`ErrorBody`] with a 4xx or 5xx status. The same contract, in OpenAPI 3,
//! is [`OPENAPI`] (`openapi.json` in this crate), which the daemon's tests
//! check against what it routes.

use serde::{Deserialize, Serialize};

/// The API document, OpenAPI 3.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The socket the daemon listens on unless `$VESSEL_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vessel/vessel.sock";

/// The protocol name of the exec upgrade.
pub const EXEC_UPGRADE: &str = "vessel-exec";
/// The protocol name of the console upgrade: after it, the console's
/// output comes as raw bytes, and what the client sends is a VM's serial
/// input (a container's console takes none).
pub const CONSOLE_UPGRADE: &str = "vessel-console";

/// A VM or a container: the same object with the same verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Container,
    Vm,
}

/// What an instance is made of; fixed at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub kind: Kind,
    /// An image name from `vessel image list` (`busybox`, ...).
    pub image: String,
    /// A CPU limit (containers: a share such as 0.5; VMs: vCPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// Memory in bytes: a container's limit, a VM's guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// A VM's accelerator: `auto` (the default), `kvm` or `emu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// A VM's root disk size in bytes (at least its image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// Start with the daemon after the host boots.
    #[serde(default)]
    pub autostart: bool,
}

/// `POST /1.0/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub config: InstanceConfig,
    /// Start it once created (`vessel launch`).
    #[serde(default)]
    pub start: bool,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Stopped,
    Starting,
    Running,
    Stopping,
    /// Its supervisor died unexpectedly; `start` tries again.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Error => "error",
        }
    }
}

/// An instance as `GET /1.0/instances/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub config: InstanceConfig,
    pub status: Status,
    /// The host pid of the instance's init (container) or VMM (VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Unix seconds.
    pub created_at: i64,
}

/// `PUT /1.0/instances/{name}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRequest {
    pub action: Action,
    /// Seconds a graceful stop may take before it is forced (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Stop at once (SIGKILL, or the VM's power cut).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Start,
    Stop,
    Restart,
}

/// The default graceful-stop timeout, seconds.
pub const DEFAULT_STOP_TIMEOUT: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationStatus {
    Running,
    Success,
    Failure,
}

/// A change in progress or done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    /// What it does, such as `start web`.
    pub description: String,
    pub instance: String,
    pub status: OperationStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of `GET /1.0/events`: an instance changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub time: i64,
    pub instance: String,
    /// The new status; `None` when the instance was deleted.
    pub status: Option<Status>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An image, as `GET /1.0/images` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// Whether its root is built (else it is built when first used).
    pub built: bool,
}

/// `POST /1.0/images`: build an image now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    pub name: String,
}

/// `GET /1.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub server: String,
    pub version: String,
    pub api: String,
}

/// Why a name cannot name an instance.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid instance name {name:?}: {why}")]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

/// Instance names are host names (as Incus's): 1 to 63 of `a-z`, `0-9`
/// and `-`, starting with a letter and not ending with `-`. They name
/// directories, cgroups and URLs, so nothing else is accepted.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let fail = |why| {
        Err(NameError {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return fail("it must be 1 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("only lowercase letters, digits and '-' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return fail("it must start with a letter");
    }
    if name.ends_with('-') {
        return fail("it must not end with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_host_names() {
        for good in ["web", "vm1", "a", "a-b-c", &"x".repeat(63)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1vm",
            "Web",
            "a_b",
            "a-",
            "a/b",
            "..",
            "a b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let e = serde_json::from_str::<StateRequest>(r#"{"action":"start","forse":true}"#);
        assert!(e.is_err());
        let ok: StateRequest = serde_json::from_str(r#"{"action":"stop","force":true}"#).unwrap();
        assert_eq!(ok.action, Action::Stop);
        assert!(ok.force);
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }
}
