//! Streaming downloads from http(s):// and file:// URLs, hashed on the way to disk.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::index::Checksum;

/// What actually arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Downloaded {
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes written.
    pub sha256: String,
}

impl Downloaded {
    /// Checks a download against the signed index; `what` names it in the error
    /// (e.g. "package busybox-static").
    pub(crate) fn verify(&self, expected: &Checksum, what: &str, url: &str) -> Result<()> {
        if self.size != expected.size {
            return Err(Error::SizeMismatch {
                what: what.to_owned(),
                url: url.to_owned(),
                expected: expected.size,
                actual: self.size,
            });
        }
        if self.sha256 != expected.sha256 {
            return Err(Error::DigestMismatch {
                what: what.to_owned(),
                url: url.to_owned(),
                expected: expected.sha256.clone(),
                actual: self.sha256.clone(),
            });
        }
        Ok(())
    }
}

/// Package name, bar, bytes done/total, rate, time left.
const BAR_TEMPLATE: &str = "{msg:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";

pub(crate) struct Downloader {
    agent: ureq::Agent,
    progress: bool,
}

impl Downloader {
    /// `progress`: draw bars on stderr (only if it is a terminal as well).
    pub(crate) fn new(progress: bool) -> Self {
        // No overall timeout: a kernel package on a slow link may legitimately take
        // minutes. A stalled connection is caught by the per-read timeout instead.
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("vessel/", env!("CARGO_PKG_VERSION")))
            .build();
        Downloader {
            agent: config.into(),
            progress: progress && io::stderr().is_terminal(),
        }
    }

    /// Streams `url` into the new file `dest`, reading at most `limit + 1` bytes so that a
    /// misbehaving server cannot fill the disk; the caller compares the size it gets back
    /// against the expected one. With `bar` (a label), a progress bar sized `limit` is
    /// drawn, so pass one only when `limit` is the expected size.
    pub(crate) fn download(
        &self,
        url: &str,
        dest: &Path,
        limit: u64,
        bar: Option<&str>,
    ) -> Result<Downloaded> {
        let reader = self.open(url)?;
        let mut out = File::create(dest).map_err(|e| Error::io("create", dest, e))?;
        let bar = match bar {
            Some(label) if self.progress => self.bar(label, limit),
            _ => ProgressBar::hidden(),
        };
        let mut reader = bar.wrap_read(reader.take(limit.saturating_add(1)));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.abandon();
                    return Err(Error::Read {
                        url: url.to_owned(),
                        source: e,
                    });
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| Error::io("write", dest, e))?;
            size += n as u64;
        }
        bar.finish_and_clear();
        out.flush().map_err(|e| Error::io("write", dest, e))?;
        tracing::debug!("downloaded {url} ({size} bytes)");
        Ok(Downloaded {
            size,
            sha256: hex(&hasher.finalize()),
        })
    }

    fn open(&self, url: &str) -> Result<Box<dyn Read>> {
        if let Some(path) = file_url_path(url) {
            let file = File::open(&path).map_err(|source| Error::Read {
                url: url.to_owned(),
                source,
            })?;
            return Ok(Box::new(file));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::UnsupportedUrl {
                url: url.to_owned(),
            });
        }
        let response = self.agent.get(url).call().map_err(|e| Error::Http {
            url: url.to_owned(),
            source: Box::new(e),
        })?;
        Ok(Box::new(response.into_body().into_reader()))
    }

    fn bar(&self, label: &str, len: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        // The template is a constant, so this cannot fail in practice; if it ever did, the
        // default style is still a usable bar.
        if let Ok(style) = ProgressStyle::with_template(BAR_TEMPLATE) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_owned());
        bar
    }
}

/// Local path of a `file://` URL (`file:///p` or `file://localhost/p`, percent-decoded),
/// or `None` for other schemes.
pub(crate) fn file_url_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("file://")?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    Some(PathBuf::from(percent_decode(rest)))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_at = |k: usize| bytes.get(k).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex_at(i + 1), hex_at(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                // Two hex digits are always < 256.
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("file:///srv/m"),
            Some(PathBuf::from("/srv/m"))
        );
        assert_eq!(
            file_url_path("file://localhost/srv/m"),
            Some(PathBuf::from("/srv/m"))
        );
        assert_eq!(
            file_url_path("file:///a%20b/%zz"),
            Some(PathBuf::from("/a b/%zz"))
        );
        assert_eq!(file_url_path("http://x.example/"), None);
    }

    #[test]
    fn bar_template_is_valid() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
    }

    #[test]
    fn hex_digest() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn download_checks_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        let url = format!("file://{}", src.display());
        let d = Downloader::new(false);
        let got = d.download(&url, &dir.path().join("a"), 100, None).unwrap();
        assert_eq!(got.size, 5);
        let good = Checksum {
            size: 5,
            sha256: hex(&Sha256::digest(b"hello")),
        };
        got.verify(&good, "thing", &url).unwrap();
        let bad = Checksum {
            size: 5,
            sha256: "0".repeat(64),
        };
        assert!(matches!(
            got.verify(&bad, "thing", &url),
            Err(Error::DigestMismatch { .. })
        ));
        // The limit stops reading one byte past it, which then fails the size check.
        let got = d.download(&url, &dir.path().join("b"), 3, None).unwrap();
        assert_eq!(got.size, 4);
        let missing = format!("file://{}/nope", dir.path().display());
        assert!(matches!(
            d.download(&missing, &dir.path().join("c"), 3, None),
            Err(Error::Read { .. })
        ));
    }
}
