//! The crate's error type: one line each, saying what was being done and why it failed.

use std::io;
use std::path::Path;

/// What went wrong starting or running a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (a bad flag value, a missing root, ...).
    #[error("{0}")]
    Invalid(String),
    /// The command is not in the container's root (or not on its `PATH`).
    #[error("{0}: not found in the container's root")]
    NotFound(String),
    /// A system call or file operation failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn path(what: &str, path: &Path, source: io::Error) -> Self {
        Error::io(format!("{what} {}", path.display()), source)
    }

    /// The last OS error, with context.
    pub(crate) fn last_os(context: impl Into<String>) -> Self {
        Error::io(context, io::Error::last_os_error())
    }
}
