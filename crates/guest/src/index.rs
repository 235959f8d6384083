//! The signed archive index: the Release file and the Packages list it vouches for.

use std::cmp::Ordering;
use std::io::BufRead;

use crate::deb822::{Paragraph, Paragraphs};

/// Size and SHA-256 of one file, as listed by a signed index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checksum {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Looks up `path` (e.g. `main/binary-amd64/Packages.xz`) in the `SHA256` field of a
/// Release file and checks that the Release is for `codename`.
///
/// Checking the codename stops a mirror from answering a bookworm request with some other
/// release's perfectly signed (but older) index.
pub(crate) fn release_checksum(
    release: &str,
    codename: &str,
    path: &str,
) -> Result<Checksum, String> {
    let para = Paragraphs::new(release.as_bytes())
        .next()
        .and_then(|p| p.ok())
        .ok_or_else(|| "it is empty".to_owned())?;
    match para.get("Codename") {
        Some(c) if c == codename => {}
        Some(c) => return Err(format!("it is for {c:?}, not {codename:?}")),
        None => return Err("it has no Codename field".to_owned()),
    }
    let list = para
        .get("SHA256")
        .ok_or_else(|| "it has no SHA256 field".to_owned())?;
    for line in list.lines() {
        let mut words = line.split_whitespace();
        let (Some(digest), Some(size), Some(name), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        if name != path {
            continue;
        }
        let size = size
            .parse()
            .map_err(|_| format!("the size of {path} is not a number: {size:?}"))?;
        let sha256 = parse_sha256(digest)
            .ok_or_else(|| format!("the SHA-256 of {path} is malformed: {digest:?}"))?;
        return Ok(Checksum { size, sha256 });
    }
    Err(format!("its SHA256 list has no entry for {path}"))
}

/// Normalises a hex SHA-256 to lower case, rejecting anything that is not 64 hex digits.
pub(crate) fn parse_sha256(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// One binary package as listed in Packages, reduced to what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageEntry {
    pub name: String,
    pub version: String,
    pub depends: String,
    /// Pool path relative to the mirror root, or `None` if the stanza lacks a usable one.
    pub filename: Option<String>,
    pub checksum: Option<Checksum>,
}

impl PackageEntry {
    fn from_paragraph(p: &Paragraph) -> Option<Self> {
        let name = p.get("Package")?.to_owned();
        let checksum = match (
            p.get("Size").and_then(|s| s.parse().ok()),
            p.get("SHA256").and_then(parse_sha256),
        ) {
            (Some(size), Some(sha256)) => Some(Checksum { size, sha256 }),
            _ => None,
        };
        Some(PackageEntry {
            name,
            version: p.get("Version").unwrap_or("").to_owned(),
            depends: p.get("Depends").unwrap_or("").to_owned(),
            filename: p
                .get("Filename")
                .filter(|f| is_safe_pool_path(f))
                .map(str::to_owned),
            checksum,
        })
    }
}

/// A pool path must stay inside the mirror: relative, no `..`, and only characters that
/// need no URL escaping (Debian pool names use letters, digits and `+-._~`).
fn is_safe_pool_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._~/".contains(&b))
}

/// Reads a Packages stream and keeps the entries `keep` selects by package name.
pub(crate) fn scan_packages(
    reader: impl BufRead,
    mut keep: impl FnMut(&str) -> bool,
) -> std::io::Result<Vec<PackageEntry>> {
    let mut kept = Vec::new();
    for para in Paragraphs::new(reader) {
        let para = para?;
        if para.get("Package").is_some_and(&mut keep) {
            kept.extend(PackageEntry::from_paragraph(&para));
        }
    }
    Ok(kept)
}

/// The entry for `name` with the highest version (`None` if absent).
pub(crate) fn newest<'a>(entries: &'a [PackageEntry], name: &str) -> Option<&'a PackageEntry> {
    entries
        .iter()
        .filter(|e| e.name == name)
        .max_by(|a, b| compare_versions(&a.version, &b.version))
}

/// The first dependency in a `Depends` value whose package name satisfies `pred`, with its
/// `(= version)` constraint if it has one. Version constraints, architecture
/// qualifiers and alternatives after the first are ignored.
pub(crate) fn first_dependency(
    depends: &str,
    pred: impl Fn(&str) -> bool,
) -> Option<(String, Option<String>)> {
    depends.split(',').find_map(|dep| {
        let first_alt = dep.split('|').next()?.trim();
        let name_end = first_alt
            .find(|c: char| c.is_whitespace() || c == '(' || c == '[' || c == ':')
            .unwrap_or(first_alt.len());
        let name = &first_alt[..name_end];
        if !pred(name) {
            return None;
        }
        let exact = first_alt
            .split_once('(')
            .and_then(|(_, c)| c.split_once(')'))
            .and_then(|(c, _)| c.trim().strip_prefix('=').map(|v| v.trim().to_owned()));
        Some((name.to_owned(), exact))
    })
}

/// Debian version comparison (`[epoch:]upstream[-revision]`), as dpkg does it.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        (epoch, upstream, revision)
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs; `~` sorts before everything,
/// even the end of the string; letters sort before other punctuation.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    fn order(c: Option<&u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
            Some(b'~') => -1,
            Some(c) => i32::from(*c) + 256,
        }
    }
    let digit = |s: &[u8], i: usize| s.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i)), order(b.get(j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        use Ordering::*;
        let cases = [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0+b1", Less),
            ("1:0.1", "9.9", Greater),
            ("6.1.153-1", "6.1.99-1", Greater),
            ("6.1.0-1", "6.1.0-1~bpo", Greater),
            ("1.0a", "1.0-", Greater),
            ("001", "1", Equal),
            ("1.0-2", "1.0-10", Less),
            ("2.30-1", "2.3-1", Greater),
            ("1.0~~", "1.0~", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn dependency_parsing() {
        let cloud = |n: &str| {
            n.strip_prefix("linux-image-")
                .and_then(|r| r.strip_suffix("-cloud-amd64"))
                .is_some_and(|m| !m.is_empty())
        };
        assert_eq!(
            first_dependency(
                "foo (>= 1), linux-image-6.1.0-99-cloud-amd64 (= 6.1.1-1) | bar, linux-image-6.1.0-98-cloud-amd64",
                cloud
            ),
            Some(("linux-image-6.1.0-99-cloud-amd64".to_owned(), Some("6.1.1-1".to_owned())))
        );
        assert_eq!(
            first_dependency("linux-image-6.1.0-9-cloud-amd64:amd64", cloud),
            Some(("linux-image-6.1.0-9-cloud-amd64".to_owned(), None))
        );
        assert_eq!(
            first_dependency("linux-image-cloud-amd64, foo", cloud),
            None
        );
        assert_eq!(first_dependency("", cloud), None);
    }

    #[test]
    fn release_lookup() {
        let digest = "AB".repeat(32);
        let release = format!(
            "Origin: Debian\nCodename: bookworm\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\nSHA256:\n {d2} 5 main/binary-amd64/Packages\n {digest} 1234 main/binary-amd64/Packages.xz\n",
            d2 = "cd".repeat(32)
        );
        let c = release_checksum(&release, "bookworm", "main/binary-amd64/Packages.xz").unwrap();
        assert_eq!(
            c,
            Checksum {
                size: 1234,
                sha256: "ab".repeat(32)
            }
        );
        let e =
            release_checksum(&release, "bookworm", "contrib/binary-amd64/Packages.xz").unwrap_err();
        assert!(e.contains("no entry"), "{e}");
        let e = release_checksum(&release, "trixie", "main/binary-amd64/Packages.xz").unwrap_err();
        assert!(e.contains("bookworm"), "{e}");
    }

    #[test]
    fn pool_paths() {
        assert!(is_safe_pool_path(
            "pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb"
        ));
        assert!(!is_safe_pool_path(
            "pool/main/b/busybox/busybox-static_1%3a1.35.0-4_amd64.deb"
        ));
        assert!(!is_safe_pool_path("/etc/passwd"));
        assert!(!is_safe_pool_path("pool/../../x.deb"));
        assert!(!is_safe_pool_path("pool//x.deb"));
        assert!(!is_safe_pool_path("pool/x y.deb"));
        assert!(!is_safe_pool_path(""));
    }
}
