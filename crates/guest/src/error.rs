use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while locating, verifying, unpacking or caching the guest.
///
/// Every variant names the file, URL or package involved, and every message is a single
/// line so that the CLI can print it as-is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable mirror in opts, the environment, or the apt configuration.
    #[error(
        "no Debian mirror for bookworm/main found in the apt configuration under {apt_dir}; \
         set VESSEL_DEBIAN_MIRROR to a mirror URL (http://, https:// or file://)"
    )]
    NoMirror { apt_dir: PathBuf },

    /// The configured security mirror could not be reached or failed verification.
    ///
    /// Deliberately fatal: quietly carrying on with `bookworm` alone would let whoever
    /// blocks or forges the security archive hold the guest back on an older kernel.
    #[error(
        "Debian security mirror {mirror} (bookworm-security) cannot be used: {source}; \
         set VESSEL_DEBIAN_SECURITY_MIRROR= (empty) to fetch from bookworm alone, \
         without security updates"
    )]
    SecurityMirror {
        mirror: String,
        #[source]
        source: Box<Error>,
    },

    /// The mirror (or a URL built from it) uses a scheme we cannot fetch.
    #[error("unsupported URL {url:?}: only http://, https:// and file:// are supported")]
    UnsupportedUrl { url: String },

    /// HTTP(S) request failed (connection, TLS, status code, ...).
    #[error("download of {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },

    /// A local file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Reading a download's body (network or file:// source) failed.
    #[error("cannot read {url}: {source}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },

    /// The keyring used to check InRelease does not exist.
    #[error(
        "Debian archive keyring {path} not found; install debian-archive-keyring \
         or set VESSEL_DEBIAN_KEYRING"
    )]
    KeyringMissing { path: PathBuf },

    /// gpgv could not be started at all.
    #[error(
        "cannot run gpgv to check the signature of {url} (install the gpgv package): {source}"
    )]
    GpgvMissing {
        url: String,
        #[source]
        source: io::Error,
    },

    /// gpgv ran but the signature is not good (bad, unknown key, expired, ...).
    #[error("signature check of {url} with keyring {keyring} failed: {detail}")]
    BadSignature {
        url: String,
        keyring: PathBuf,
        detail: String,
    },

    /// The verified Release file is unusable.
    #[error("invalid Release file from {url}: {reason}")]
    Release { url: String, reason: String },

    /// A download's size differs from what the signed index says.
    #[error("{what} from {url} is {actual} bytes, expected {expected} bytes")]
    SizeMismatch {
        what: String,
        url: String,
        expected: u64,
        actual: u64,
    },

    /// A download's SHA-256 differs from what the signed index says.
    #[error("{what} from {url} has SHA-256 {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        url: String,
        expected: String,
        actual: String,
    },

    /// A package we need is not in the Packages index.
    #[error("package {package} not found in {url}")]
    PackageNotFound { package: String, url: String },

    /// A package's index entry is unusable (missing field, no kernel dependency, ...).
    #[error("package {package} in {url}: {reason}")]
    Package {
        package: String,
        url: String,
        reason: String,
    },

    /// A .deb could not be unpacked or lacks the file we need.
    #[error("package {package} ({path}): {reason}")]
    Deb {
        package: String,
        path: PathBuf,
        reason: String,
    },

    /// The kernel file name does not carry a cloud-amd64 release.
    #[error(
        "package {package} ships kernel release {release:?}, which is not a *-cloud-amd64 release"
    )]
    BadKernelRelease { package: String, release: String },

    /// `command_line_for` was given no argv.
    #[error("the guest command is empty: at least argv[0] is needed")]
    EmptyCommand,

    /// An argv element cannot be passed to a program (argv strings are NUL-terminated).
    #[error("guest command argument {index} contains a NUL byte, which a program cannot receive")]
    NulInArgument { index: usize },

    /// The encoded command does not fit on the kernel command line.
    #[error(
        "the guest command is too long for the kernel command line: \
         vessel.cmd needs {len} bytes, at most {max} fit"
    )]
    CommandTooLong { len: usize, max: usize },

    /// current.json exists but cannot be parsed.
    #[error("guest cache record {path} is corrupt: {source}")]
    CacheRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Serialising the cache record failed (should not happen for plain paths and strings).
    #[error("cannot encode guest cache record {path}: {source}")]
    CacheEncode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
