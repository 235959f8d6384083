//! Pulling single files out of a .deb (an `ar` archive around `data.tar.*`).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

/// A file found in a package's data archive.
#[derive(Debug)]
pub(crate) struct Extracted {
    /// Path inside the package without the leading `./` (e.g. `boot/vmlinuz-6.1.0-1-cloud-amd64`).
    pub path: String,
    pub contents: Vec<u8>,
}

/// Returns the first regular file in `deb`'s data archive whose path `wanted` accepts
/// (paths are given without a leading `./` or `/`). `description` says what was sought,
/// for the error when nothing matches.
pub(crate) fn extract(
    deb: &Path,
    package: &str,
    description: &str,
    mut wanted: impl FnMut(&str) -> bool,
) -> Result<Extracted> {
    let mut found = None;
    // `take` stops the walk at the first match.
    walk(deb, package, &mut wanted, |file| {
        found = Some(file);
        false
    })?;
    found.ok_or_else(|| Error::Deb {
        package: package.to_owned(),
        path: deb.to_owned(),
        reason: format!("its data archive contains no {description}"),
    })
}

/// Every regular file in `deb`'s data archive whose path `wanted` accepts, in archive
/// order, read in one pass over the (compressed) archive.
pub(crate) fn extract_all(
    deb: &Path,
    package: &str,
    wanted: impl FnMut(&str) -> bool,
) -> Result<Vec<Extracted>> {
    let mut found = Vec::new();
    walk(deb, package, wanted, |file| {
        found.push(file);
        true
    })?;
    Ok(found)
}

/// Reads the regular files of `deb`'s data archive that `wanted` accepts and hands each
/// to `take`, until `take` returns false or the archive ends.
fn walk(
    deb: &Path,
    package: &str,
    mut wanted: impl FnMut(&str) -> bool,
    mut take: impl FnMut(Extracted) -> bool,
) -> Result<()> {
    let err = |reason: String| Error::Deb {
        package: package.to_owned(),
        path: deb.to_owned(),
        reason,
    };
    let file = File::open(deb).map_err(|e| Error::io("open", deb, e))?;
    let mut archive = ar::Archive::new(BufReader::new(file));
    while let Some(member) = archive.next_entry() {
        let member = member.map_err(|e| err(format!("not a valid .deb (ar) archive: {e}")))?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        let Some(compression) = name.strip_prefix("data.tar") else {
            continue;
        };
        let data: Box<dyn Read + '_> = match compression {
            ".xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(member)),
            ".gz" => Box::new(flate2::read::GzDecoder::new(member)),
            // deb(5) allows an uncompressed data.tar too; it costs nothing to accept.
            "" => Box::new(member),
            _ => {
                return Err(err(format!(
                "unsupported data archive {name} (only data.tar.xz and data.tar.gz are supported)"
            )))
            }
        };
        let mut tar = tar::Archive::new(data);
        let entries = tar
            .entries()
            .map_err(|e| err(format!("cannot read {name}: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| err(format!("cannot read {name}: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let raw = entry
                .path()
                .map_err(|e| err(format!("bad path in {name}: {e}")))?;
            let Some(raw) = raw.to_str() else {
                continue; // not UTF-8, so not one of the files we look for
            };
            let path = raw
                .trim_start_matches("./")
                .trim_start_matches('/')
                .to_owned();
            if !wanted(&path) {
                continue;
            }
            let mut contents = Vec::new();
            entry
                .read_to_end(&mut contents)
                .map_err(|e| err(format!("cannot read {path} from {name}: {e}")))?;
            if !take(Extracted { path, contents }) {
                return Ok(());
            }
        }
        return Ok(());
    }
    Err(err("no data.tar member; is this a .deb?".to_owned()))
}
