//! Checking the clear-signed InRelease with gpgv.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Environment variable that overrides the keyring.
pub const KEYRING_ENV: &str = "VESSEL_DEBIAN_KEYRING";

/// Where debian-archive-keyring installs the archive keys.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The keyring to use: `explicit`, else `$VESSEL_DEBIAN_KEYRING`, else the Debian default.
///
/// The result is absolute because gpgv looks a slash-less `--keyring` name up in its home
/// directory instead of the current one, and it must exist.
pub(crate) fn resolve_keyring(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(KEYRING_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING));
    let path = std::path::absolute(&path).map_err(|e| Error::io("resolve", &path, e))?;
    if !path.is_file() {
        return Err(Error::KeyringMissing { path });
    }
    Ok(path)
}

/// Verifies the clear-signed `signed` file with gpgv and has gpgv write the signed text to
/// `output`; only that output may be parsed afterwards. `homedir` is an empty private
/// directory, so that the user's own GnuPG files never take part. `url` is for messages.
pub(crate) fn verify_clearsigned(
    signed: &Path,
    output: &Path,
    keyring: &Path,
    homedir: &Path,
    url: &str,
) -> Result<()> {
    let result = Command::new("gpgv")
        .arg("--homedir")
        .arg(homedir)
        .args(["--status-fd", "1"])
        .arg("--keyring")
        .arg(keyring)
        .arg("--output")
        .arg(output)
        .arg(signed)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| Error::GpgvMissing {
            url: url.to_owned(),
            source,
        })?;
    let status = String::from_utf8_lossy(&result.stdout);
    let verdict = judge(&status);
    let bad = |detail: String| Error::BadSignature {
        url: url.to_owned(),
        keyring: keyring.to_owned(),
        detail,
    };
    if let Err(why) = verdict {
        // gpgv's own words are the most useful detail; squeeze them onto one line.
        let stderr = String::from_utf8_lossy(&result.stderr);
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let detail = if said.is_empty() {
            format!("{why} (gpgv {})", result.status)
        } else {
            format!("{why}; gpgv: {}", said.join("; "))
        };
        return Err(bad(detail));
    }
    match std::fs::metadata(output) {
        Ok(m) if m.len() > 0 => Ok(()),
        _ => Err(bad(
            "gpgv accepted the signature but wrote no signed text".to_owned()
        )),
    }
}

/// Decides from gpgv's machine-readable status lines whether the file is trustworthy.
///
/// gpgv's exit status alone is not enough: it is non-zero when *any* of several signatures
/// cannot be checked (Debian signs InRelease with more than one key, and a keyring holding
/// only some of them is normal), and it is zero for signatures by expired keys. So, like
/// apt: at least one good signature (`GOODSIG`, which gpgv only emits for a valid, unexpired,
/// unrevoked key, together with `VALIDSIG`), no bad one, and any other signature merely by a
/// key we do not have.
pub(crate) fn judge(status: &str) -> Result<(), String> {
    let mut good = false;
    let mut valid = false;
    let mut problems = Vec::new();
    for line in status.lines() {
        let Some(rest) = line.strip_prefix("[GNUPG:] ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let keyword = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        match keyword {
            "GOODSIG" => good = true,
            "VALIDSIG" => valid = true,
            "BADSIG" => problems.push(format!(
                "bad signature by key {}",
                args.first().unwrap_or(&"?")
            )),
            // ERRSIG <keyid> <pkalgo> <hashalgo> <class> <time> <rc>; rc 9 = no public key.
            "ERRSIG" if args.get(5) == Some(&"9") => {}
            "ERRSIG" => problems.push(format!(
                "signature by key {} cannot be checked",
                args.first().unwrap_or(&"?")
            )),
            "EXPSIG" => problems.push("the signature has expired".to_owned()),
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(problems.join(", "));
    }
    if !(good && valid) {
        return Err("no good signature by a key in the keyring".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::judge;

    #[test]
    fn status_judgement() {
        let good =
            "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 1234 Debian\n[GNUPG:] VALIDSIG ABCD 2023-01-01\n";
        assert!(judge(good).is_ok());
        let partly_unknown = format!("{good}[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG 99 1 8 01 1700000000 9 FFFF\n[GNUPG:] NO_PUBKEY 99\n");
        assert!(judge(&partly_unknown).is_ok());
        let unknown_only = "[GNUPG:] ERRSIG 99 1 8 01 1700000000 9 FFFF\n[GNUPG:] NO_PUBKEY 99\n";
        assert!(judge(unknown_only).is_err());
        let bad = format!("{good}[GNUPG:] BADSIG 77 Evil\n");
        assert!(judge(&bad).unwrap_err().contains("bad signature"));
        let expired_key = "[GNUPG:] EXPKEYSIG 1234 Old\n[GNUPG:] VALIDSIG ABCD\n";
        assert!(judge(expired_key).is_err());
        assert!(judge("").is_err());
    }
}
