//! Finding the Debian mirrors: explicit option, environment, or the host's apt sources.
//!
//! Two archives are looked for the same way: the main one (suite `bookworm`) and the
//! security one (suite `bookworm-security`), which Debian serves from a different base URI.

use std::path::{Path, PathBuf};

use crate::deb822::Paragraphs;
use crate::error::{Error, Result};
use crate::{COMPONENT, SECURITY_SUITE, SUITE};

/// Environment variable that overrides mirror discovery.
pub const MIRROR_ENV: &str = "VESSEL_DEBIAN_MIRROR";

/// Environment variable that overrides security mirror discovery; set but empty, it turns
/// the security archive off.
pub const SECURITY_MIRROR_ENV: &str = "VESSEL_DEBIAN_SECURITY_MIRROR";

/// Where apt keeps its configuration on the host.
const APT_DIR: &str = "/etc/apt";

/// The mirror to use: `explicit`, else `$VESSEL_DEBIAN_MIRROR`, else the host's apt sources.
///
/// The result has no trailing slash and a supported scheme.
pub(crate) fn resolve(explicit: Option<&str>) -> Result<String> {
    // An empty value (e.g. `VESSEL_DEBIAN_MIRROR=`) means "not set", not "the empty URL".
    let nonempty = |m: &str| Some(m.trim().to_owned()).filter(|m| !m.is_empty());
    let chosen = explicit
        .and_then(nonempty)
        .or_else(|| std::env::var(MIRROR_ENV).ok().as_deref().and_then(nonempty));
    let mirror = match chosen {
        Some(m) => m,
        None => discover(Path::new(APT_DIR))?,
    };
    checked_url(mirror)
}

/// The security mirror to use, or `None` to fetch from `bookworm` alone.
///
/// `explicit`, else `$VESSEL_DEBIAN_SECURITY_MIRROR`, else the first `bookworm-security`
/// source in the host's apt sources. Unlike the main mirror, an empty explicit or
/// environment value is an answer, not "unset": it switches the security archive off, so
/// that a host without access to it can still fetch.
pub(crate) fn resolve_security(explicit: Option<&str>) -> Result<Option<String>> {
    resolve_security_in(
        explicit,
        std::env::var(SECURITY_MIRROR_ENV).ok(),
        Path::new(APT_DIR),
    )
}

/// [`resolve_security`] with the environment value and apt directory passed in (for tests).
fn resolve_security_in(
    explicit: Option<&str>,
    env: Option<String>,
    apt_dir: &Path,
) -> Result<Option<String>> {
    let chosen = match (explicit, env) {
        (Some(m), _) => Some(("the fetch options", m.trim().to_owned())),
        (None, Some(m)) => Some((SECURITY_MIRROR_ENV, m.trim().to_owned())),
        (None, None) => None,
    };
    let mirror = match chosen {
        Some((from, m)) if m.is_empty() => {
            tracing::info!("Debian security archive turned off by {from}; using {SUITE} alone");
            return Ok(None);
        }
        Some((_, m)) => m,
        None => match find_in_apt(apt_dir, SECURITY_SUITE) {
            Some(m) => m,
            None => {
                tracing::info!(
                    "no {SECURITY_SUITE}/{COMPONENT} source in the apt configuration under {} \
                     and {SECURITY_MIRROR_ENV} is unset; using {SUITE} alone",
                    apt_dir.display()
                );
                return Ok(None);
            }
        },
    };
    checked_url(mirror).map(Some)
}

/// Rejects schemes we cannot fetch and drops trailing slashes.
fn checked_url(mirror: String) -> Result<String> {
    if !is_supported_url(&mirror) {
        return Err(Error::UnsupportedUrl { url: mirror });
    }
    Ok(mirror.trim_end_matches('/').to_owned())
}

fn is_supported_url(url: &str) -> bool {
    ["http://", "https://", "file://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// The main mirror from the host's apt sources, or an error saying how to set one.
fn discover(apt_dir: &Path) -> Result<String> {
    find_in_apt(apt_dir, SUITE).ok_or_else(|| Error::NoMirror {
        apt_dir: apt_dir.to_owned(),
    })
}

/// First `deb` URI for `suite`/main in apt's sources, read the way apt orders them:
/// `sources.list` first, then `sources.list.d/*.list` and `*.sources` sorted by file name.
///
/// Unreadable files are skipped with a warning: a broken unrelated source file should not
/// stop us when another one names a usable mirror.
fn find_in_apt(apt_dir: &Path, suite: &str) -> Option<String> {
    let mut files: Vec<PathBuf> = vec![apt_dir.join("sources.list")];
    if let Ok(entries) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("list" | "sources")
                )
            })
            .collect();
        extra.sort();
        files.extend(extra);
    }
    for file in files {
        let contents = match std::fs::read_to_string(&file) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!("skipping apt source file {}: {e}", file.display());
                continue;
            }
        };
        let found = if file.extension().and_then(|e| e.to_str()) == Some("sources") {
            parse_deb822_sources_for(&contents, suite)
        } else {
            parse_sources_list_for(&contents, suite)
        };
        if let Some(uri) = found {
            tracing::debug!("using Debian mirror for {suite} from {}", file.display());
            return Some(uri);
        }
    }
    None
}

/// First `deb` URI for bookworm/main in one-line `sources.list` format; see
/// [`parse_sources_list_for`].
pub fn parse_sources_list(contents: &str) -> Option<String> {
    parse_sources_list_for(contents, SUITE)
}

/// First `deb` URI for `suite`/main in one-line `sources.list` format
/// (`deb [options] URI SUITE COMPONENT...`); `None` if there is none.
///
/// Only URIs we can fetch (http, https, file) are considered, so a `cdrom:` or
/// `mirror+file:` line does not shadow a later usable one.
pub fn parse_sources_list_for(contents: &str, suite: &str) -> Option<String> {
    contents.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let rest = line.strip_prefix("deb")?;
        // `deb-src` also starts with "deb"; require whitespace (or the options bracket) next.
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let mut rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            rest = after[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        let line_suite = words.next()?;
        let mut components = words;
        (line_suite == suite && components.any(|c| c == COMPONENT) && is_supported_url(uri))
            .then(|| uri.to_owned())
    })
}

/// First `deb` URI for bookworm/main in deb822 `.sources` format; see
/// [`parse_deb822_sources_for`].
pub fn parse_deb822_sources(contents: &str) -> Option<String> {
    parse_deb822_sources_for(contents, SUITE)
}

/// First `deb` URI for `suite`/main in deb822 `.sources` format; `None` if there is none.
///
/// Paragraphs with `Enabled: no` are ignored, as apt does.
pub fn parse_deb822_sources_for(contents: &str, suite: &str) -> Option<String> {
    Paragraphs::new(contents.as_bytes())
        .filter_map(|p| p.ok())
        .find_map(|p| {
            let has = |field: &str, want: &str| {
                p.get(field)
                    .is_some_and(|v| v.split_whitespace().any(|w| w == want))
            };
            let enabled = p
                .get("Enabled")
                .is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
            if !(enabled
                && has("Types", "deb")
                && has("Suites", suite)
                && has("Components", COMPONENT))
            {
                return None;
            }
            p.get("URIs")?
                .split_whitespace()
                .find(|u| is_supported_url(u))
                .map(str::to_owned)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_format() {
        let list = "\
# deb http://old.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb cdrom:[Debian]/ bookworm main
deb http://other.example/debian bullseye main
deb http://sec.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://m.example/debian bookworm contrib main # comment
deb http://later.example/debian bookworm main
";
        assert_eq!(
            parse_sources_list(list).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            parse_sources_list("deb http://x.example/debian bookworm contrib\n"),
            None
        );
        assert_eq!(parse_sources_list(""), None);
        assert_eq!(
            parse_sources_list("deb\tfile:///srv/mirror bookworm main"),
            Some("file:///srv/mirror".to_owned())
        );
    }

    #[test]
    fn deb822_format() {
        let sources = "\
Types: deb
# URIs: http://commented.example/debian
URIs: http://sec.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb deb-src
URIs: mirror+file:/etc/apt/mirrors.txt https://m.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://later.example/debian
Suites: bookworm
Components: main
";
        assert_eq!(
            parse_deb822_sources(sources).as_deref(),
            Some("https://m.example/debian/")
        );
        assert_eq!(
            parse_deb822_sources(
                "Types: deb\nURIs: http://x.example/\nSuites: trixie\nComponents: main\n"
            ),
            None
        );
    }

    #[test]
    fn discovery_reads_files_in_apt_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sources.list.d")).unwrap();
        std::fs::write(d.join("sources.list"), "# empty\n").unwrap();
        std::fs::write(
            d.join("sources.list.d/b.sources"),
            "Types: deb\nURIs: http://b.example/debian\nSuites: bookworm\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sources.list.d/a.list"),
            "deb http://a.example/debian bookworm main\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sources.list.d/0.list.disabled"),
            "deb http://disabled.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(discover(d).unwrap(), "http://a.example/debian");

        std::fs::remove_file(d.join("sources.list.d/a.list")).unwrap();
        assert_eq!(discover(d).unwrap(), "http://b.example/debian");

        std::fs::remove_file(d.join("sources.list.d/b.sources")).unwrap();
        let err = discover(d).unwrap_err();
        assert!(matches!(err, Error::NoMirror { .. }));
        assert!(err.to_string().contains("VESSEL_DEBIAN_MIRROR"), "{err}");
    }

    #[test]
    fn security_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sources.list.d")).unwrap();
        // Nothing configured anywhere: no security archive, and that is not an error.
        assert_eq!(resolve_security_in(None, None, d).unwrap(), None);

        std::fs::write(
            d.join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://sec.example/debian-security/\nSuites: bookworm-security\nComponents: main\n",
        )
        .unwrap();
        assert_eq!(
            resolve_security_in(None, None, d).unwrap().as_deref(),
            Some("http://sec.example/debian-security")
        );
        assert_eq!(discover(d).unwrap(), "http://m.example/debian");
        // The environment beats apt; the option beats both; empty turns it off.
        let env = || Some("file:///srv/sec/".to_owned());
        assert_eq!(
            resolve_security_in(None, env(), d).unwrap().as_deref(),
            Some("file:///srv/sec")
        );
        assert_eq!(
            resolve_security_in(Some("https://o.example/s"), env(), d)
                .unwrap()
                .as_deref(),
            Some("https://o.example/s")
        );
        assert_eq!(
            resolve_security_in(None, Some(String::new()), d).unwrap(),
            None
        );
        assert_eq!(resolve_security_in(Some(" "), env(), d).unwrap(), None);
        assert!(matches!(
            resolve_security_in(Some("ftp://x.example/s"), None, d),
            Err(Error::UnsupportedUrl { .. })
        ));
    }
}
