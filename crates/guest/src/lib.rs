//! The default guest of `vessel run`: Debian bookworm's stock cloud kernel plus a
//! busybox initramfs built here.
//!
//! [`fetch`] finds a Debian mirror, checks the archive signature on `InRelease` with gpgv,
//! follows the signed checksums down to the two packages it needs
//! (`linux-image-cloud-amd64`'s current kernel and `busybox-static`), unpacks them, builds
//! the initramfs and caches the result under the data directory. Later calls are answered
//! from that cache without touching the network.
//!
//! Kernel security fixes reach `bookworm-security` weeks before a point release folds them
//! into `bookworm`, so when a security mirror is known its index is verified the same way
//! and the newer of the two kernels wins. busybox always comes from `bookworm`.
//!
//! The guest side of the protocol (how the command gets in and its exit status gets out)
//! is documented on [`INIT_SCRIPT`] and [`command_line_for`].

mod cmdline;
mod cpio;
mod deb;
mod deb822;
mod download;
mod error;
mod exit_helper;
mod gpg;
mod index;
mod initramfs;
mod mirror;
pub mod modules;

use std::fs::{self, File};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cmdline::{command_line_for, CMD_PARAM, KERNEL_COMMAND_LINE_MAX};
pub use error::{Error, Result};
pub use gpg::{DEFAULT_KEYRING, KEYRING_ENV};
pub use initramfs::{build_initramfs, AGENT, INIT_SCRIPT};
pub use mirror::{
    parse_deb822_sources, parse_deb822_sources_for, parse_sources_list, parse_sources_list_for,
    MIRROR_ENV, SECURITY_MIRROR_ENV,
};

use download::Downloader;
use index::{Checksum, PackageEntry};

/// I/O port the guest's init writes the command's exit status to (one byte).
pub const EXIT_STATUS_PORT: u16 = 0x501;

/// Environment variable that overrides [`default_data_dir`].
pub const DATA_DIR_ENV: &str = "VESSEL_DATA_DIR";

pub(crate) const SUITE: &str = "bookworm";
/// Debian's security archive for [`SUITE`]; its Release carries this as its Codename too.
pub(crate) const SECURITY_SUITE: &str = "bookworm-security";
pub(crate) const COMPONENT: &str = "main";
/// Relative to `dists/SUITE/` in both archives: the security Release lists its components
/// as `updates/main` but its files (and the URLs that serve them) as `main/...`.
const PACKAGES_PATH: &str = "main/binary-amd64/Packages.xz";
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const RELEASE_SUFFIX: &str = "-cloud-amd64";

/// InRelease is a few hundred KiB; anything far bigger is not one.
const INRELEASE_LIMIT: u64 = 16 << 20;

/// A guest ready to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Absolute path of the kernel (bzImage).
    pub kernel: PathBuf,
    /// Absolute path of the (uncompressed) cpio initramfs.
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

/// How [`fetch`] finds and stores the guest.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Cache root; see [`default_data_dir`]. Relative paths are taken from the current directory.
    pub data_dir: PathBuf,
    /// Debian mirror URL (`http://`, `https://` or `file://`); `None`: `$VESSEL_DEBIAN_MIRROR`,
    /// else the host's apt sources.
    pub mirror: Option<String>,
    /// Debian security mirror URL for `bookworm-security`; `Some("")` turns the security
    /// archive off. `None`: `$VESSEL_DEBIAN_SECURITY_MIRROR` (empty also means off), else the
    /// host's apt sources, else none (the kernel then comes from `bookworm` alone).
    /// [`fetch_busybox`] does not use it.
    pub security_mirror: Option<String>,
    /// Keyring for gpgv; `None`: `$VESSEL_DEBIAN_KEYRING`, else [`DEFAULT_KEYRING`].
    pub keyring: Option<PathBuf>,
    /// Show download progress bars on stderr (only when it is a terminal).
    pub progress: bool,
}

/// `$VESSEL_DATA_DIR`, else `$XDG_DATA_HOME/vessel`, else `$HOME/.local/share/vessel`.
///
/// Empty values count as unset, and a relative `XDG_DATA_HOME` is ignored as the XDG spec
/// requires. With none of them set, `/var/lib/vessel`.
pub fn default_data_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var(DATA_DIR_ENV) {
        return dir;
    }
    if let Some(xdg) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("vessel");
    }
    if let Some(home) = var("HOME") {
        return home.join(".local/share/vessel");
    }
    // No home at all (e.g. a bare system service): use the FHS place for state.
    PathBuf::from("/var/lib/vessel")
}

/// The guest a previous [`fetch`] left in `data_dir`, if its record exists and both files
/// it names exist and are non-empty. Never touches the network.
///
/// `Ok(None)`: nothing (intact) cached. `Err`: the record exists but cannot be read or parsed.
pub fn cached(data_dir: &Path) -> Result<Option<GuestImage>> {
    let record = data_dir.join("guest").join("current.json");
    let bytes = match fs::read(&record) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", record, e)),
    };
    let image: GuestImage =
        serde_json::from_slice(&bytes).map_err(|source| Error::CacheRecord {
            path: record,
            source,
        })?;
    let intact =
        |p: &Path| p.is_absolute() && fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0);
    if !(intact(&image.kernel) && intact(&image.initrd)) {
        tracing::debug!(
            "cached guest {} is incomplete; it will be fetched again",
            image.release
        );
        return Ok(None);
    }
    // An initramfs built by another vessel (another /init protocol) is stale.
    let id_file = image.initrd.with_file_name(INITRAMFS_ID_FILE);
    match fs::read_to_string(&id_file) {
        Ok(id) if id.trim() == initramfs_id() => Ok(Some(image)),
        _ => {
            tracing::info!(
                "cached guest {} has an initramfs from another vessel version; it will be rebuilt",
                image.release
            );
            Ok(None)
        }
    }
}

/// Beside the cached initrd: which /init and helper it was built with.
const INITRAMFS_ID_FILE: &str = "initramfs.id";

/// Identifies the initramfs contents vessel itself contributes (the /init script and the
/// exit-status helper), so a cache built by an older vessel is rebuilt rather than booted
/// with a stale guest protocol.
pub fn initramfs_id() -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    // The archive format is part of the identity too.
    hash.update(b"newc, uncompressed\n");
    hash.update(INIT_SCRIPT.as_bytes());
    // Which drivers the initramfs carries modules for.
    hash.update(modules::DRIVERS.join(",").as_bytes());
    hash.update(exit_helper::exit_status_helper());
    hash.update(initramfs::AGENT);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The default guest: from the cache if intact (no network access at all), otherwise
/// downloaded, verified, built and cached by [`fetch_latest`].
pub fn fetch(opts: &FetchOptions) -> Result<GuestImage> {
    let data_dir = absolute(&opts.data_dir)?;
    match cached(&data_dir) {
        Ok(Some(image)) => return Ok(image),
        Ok(None) => {}
        // A broken record is just a cache miss; the fetch below replaces it.
        Err(e) => tracing::warn!("ignoring guest cache: {e}"),
    }
    fetch_latest(opts)
}

/// Always goes to the mirror: fetches the current kernel and busybox, builds the guest and
/// makes it the cached one (e.g. to pick up a new kernel). Older releases stay on disk.
///
/// The kernel is the newest `linux-image-cloud-amd64` of `bookworm` and, if a security
/// mirror is configured, `bookworm-security` (ties go to `bookworm`). A configured security
/// mirror that cannot be reached or verified fails the fetch with
/// [`Error::SecurityMirror`] rather than being skipped.
///
/// Everything is downloaded into a private temporary directory inside the data dir and
/// only renamed into place once verified, so an error or interruption never leaves a
/// partial file where [`cached`] would find it; on error that directory is removed.
pub fn fetch_latest(opts: &FetchOptions) -> Result<GuestImage> {
    let data_dir = absolute(&opts.data_dir)?;
    let mirror = mirror::resolve(opts.mirror.as_deref())?;
    let security_mirror = mirror::resolve_security(opts.security_mirror.as_deref())?;
    let keyring = gpg::resolve_keyring(opts.keyring.as_deref())?;
    fs::create_dir_all(&data_dir).map_err(|e| Error::io("create directory", &data_dir, e))?;
    // Resolve `..` and symlinks so the recorded paths are clean as well as absolute.
    let data_dir = fs::canonicalize(&data_dir).map_err(|e| Error::io("resolve", &data_dir, e))?;
    // Dropped (and so deleted with everything in it) on every return, error or not.
    let work_dir = tempfile::Builder::new()
        .prefix(".vessel-fetch-")
        .tempdir_in(&data_dir)
        .map_err(|e| Error::io("create a temporary directory in", &data_dir, e))?;
    let work = work_dir.path();
    let downloader = Downloader::new(opts.progress);

    let main = signed_packages(&downloader, &mirror, SUITE, &keyring, work, |name| {
        name == KERNEL_METAPACKAGE || name == BUSYBOX_PACKAGE || is_cloud_kernel_package(name)
    })?;
    // Every failure against the security mirror is wrapped so that the message names it
    // and says how to opt out.
    let in_security = |mirror: &str| {
        let mirror = mirror.to_owned();
        move |source: Error| Error::SecurityMirror {
            mirror,
            source: Box::new(source),
        }
    };
    let security = match &security_mirror {
        Some(sec) => Some(
            signed_packages(&downloader, sec, SECURITY_SUITE, &keyring, work, |name| {
                name == KERNEL_METAPACKAGE || is_cloud_kernel_package(name)
            })
            .map_err(in_security(sec))?,
        ),
        None => None,
    };

    // 3. The kernel the newest metapackage points at, resolved in that metapackage's own
    // index and downloaded from that index's mirror; busybox from bookworm.
    let kernel_index = newest_kernel_index(&main, security.as_ref());
    let kernel =
        current_kernel(&kernel_index.entries, &kernel_index.packages_url).and_then(|pkg| {
            tracing::info!(
                "kernel {} {} from {}",
                pkg.name,
                pkg.version,
                kernel_index.suite
            );
            let deb = download_package(
                &downloader,
                &kernel_index.mirror,
                pkg,
                &kernel_index.packages_url,
                &work.join("kernel.deb"),
            )?;
            Ok((pkg, deb))
        });
    let (kernel_pkg, kernel_deb) = if kernel_index.suite == SECURITY_SUITE {
        kernel.map_err(in_security(&kernel_index.mirror))?
    } else {
        kernel?
    };
    let busybox_pkg =
        index::newest(&main.entries, BUSYBOX_PACKAGE).ok_or_else(|| Error::PackageNotFound {
            package: BUSYBOX_PACKAGE.to_owned(),
            url: main.packages_url.clone(),
        })?;

    let busybox_deb = download_package(
        &downloader,
        &mirror,
        busybox_pkg,
        &main.packages_url,
        &work.join("busybox.deb"),
    )?;

    // 4. Unpack: the kernel and the modules its virtio drivers need, in one pass.
    let is_vmlinuz = |p: &str| {
        p.strip_prefix("boot/vmlinuz-")
            .is_some_and(|r| !r.is_empty() && !r.contains('/'))
    };
    let mut kernel_files = deb::extract_all(&kernel_deb, &kernel_pkg.name, |p| {
        is_vmlinuz(p) || modules::wanted_path(p)
    })?;
    let Some(at) = kernel_files.iter().position(|f| is_vmlinuz(&f.path)) else {
        return Err(Error::Deb {
            package: kernel_pkg.name.clone(),
            path: kernel_deb.clone(),
            reason: "its data archive contains no boot/vmlinuz-*".into(),
        });
    };
    let vmlinuz = kernel_files.swap_remove(at);
    let release = vmlinuz.path.trim_start_matches("boot/vmlinuz-").to_owned();
    if !is_valid_release(&release) {
        return Err(Error::BadKernelRelease {
            package: kernel_pkg.name.clone(),
            release,
        });
    }
    // Only this release's modules: a package never holds another's, but
    // the check costs nothing.
    let module_prefix = format!("lib/modules/{release}/");
    let guest_modules = modules::GuestModules::from_package(
        kernel_files
            .into_iter()
            .filter(|f| f.path.starts_with(&module_prefix))
            .map(|f| (f.path, f.contents))
            .collect(),
    )
    .map_err(|reason| Error::Deb {
        package: kernel_pkg.name.clone(),
        path: kernel_deb.clone(),
        reason: format!("virtio driver modules: {reason}"),
    })?;
    let busybox = deb::extract(&busybox_deb, &busybox_pkg.name, "bin/busybox", |p| {
        p == "bin/busybox" || p == "usr/bin/busybox"
    })?;

    // 5. Build the outputs next to the downloads, then move them into place.
    let work_kernel = work.join("vmlinuz");
    write_synced(&work_kernel, |f| f.write_all(&vmlinuz.contents))?;
    let work_initrd = work.join("initrd.img");
    write_synced(&work_initrd, |f| {
        build_initramfs(
            &busybox.contents,
            &guest_modules,
            std::io::BufWriter::new(f),
        )
    })?;

    let guest_dir = data_dir.join("guest");
    let release_dir = guest_dir.join(&release);
    fs::create_dir_all(&release_dir).map_err(|e| Error::io("create directory", &release_dir, e))?;
    let image = GuestImage {
        kernel: release_dir.join("vmlinuz"),
        initrd: release_dir.join("initrd.img"),
        release,
    };
    rename(&work_kernel, &image.kernel)?;
    rename(&work_initrd, &image.initrd)?;
    let work_id = work.join(INITRAMFS_ID_FILE);
    write_synced(&work_id, |f| f.write_all(initramfs_id().as_bytes()))?;
    rename(&work_id, &release_dir.join(INITRAMFS_ID_FILE))?;

    // The record goes last: until it is renamed into place, cached() still sees the old
    // (or no) guest.
    let record = guest_dir.join("current.json");
    let json = serde_json::to_vec_pretty(&image).map_err(|source| Error::CacheEncode {
        path: record.clone(),
        source,
    })?;
    let work_record = work.join("current.json");
    write_synced(&work_record, |f| f.write_all(&json))?;
    rename(&work_record, &record)?;
    sync_dir(&release_dir);
    sync_dir(&guest_dir);
    tracing::info!(
        "guest kernel {} cached in {}",
        image.release,
        release_dir.display()
    );
    Ok(image)
}

/// The entries a verified package index yielded, and where they came from.
struct SignedIndex {
    /// Mirror root the index's `Filename`s are relative to.
    mirror: String,
    suite: &'static str,
    entries: Vec<PackageEntry>,
    /// The index's URL, for error messages.
    packages_url: String,
}

/// The index whose `linux-image-cloud-amd64` has the highest version: `security` only if
/// it has one strictly newer than `main`'s (or `main` has none), so a tie stays on the
/// main archive.
fn newest_kernel_index<'a>(
    main: &'a SignedIndex,
    security: Option<&'a SignedIndex>,
) -> &'a SignedIndex {
    let meta_version =
        |i: &SignedIndex| index::newest(&i.entries, KERNEL_METAPACKAGE).map(|e| e.version.clone());
    let Some(security) = security else {
        return main;
    };
    match (meta_version(main), meta_version(security)) {
        (Some(m), Some(s)) if index::compare_versions(&s, &m).is_gt() => security,
        (None, Some(_)) => security,
        _ => main,
    }
}

/// Steps shared by every fetch: downloads `suite`'s `InRelease`, verifies it with gpgv,
/// then downloads `Packages.xz`, checks it against the signed digest and returns the
/// entries `wanted` accepts. Everything lands in `work/suite/`.
fn signed_packages(
    downloader: &Downloader,
    mirror: &str,
    suite: &'static str,
    keyring: &Path,
    work: &Path,
    wanted: impl FnMut(&str) -> bool,
) -> Result<SignedIndex> {
    // Each suite gets its own directory, so two indexes never overwrite each other's files.
    let work = &work.join(suite);
    fs::create_dir(work).map_err(|e| Error::io("create directory", work, e))?;
    // 1. The signed Release file. Only what gpgv wrote out as verified is parsed.
    let inrelease_url = format!("{mirror}/dists/{suite}/InRelease");
    let inrelease = work.join("InRelease");
    let got = downloader.download(&inrelease_url, &inrelease, INRELEASE_LIMIT, None)?;
    if got.size > INRELEASE_LIMIT {
        return Err(Error::Release {
            url: inrelease_url,
            reason: format!("it is larger than {INRELEASE_LIMIT} bytes"),
        });
    }
    let gnupg_home = work.join("gnupg");
    fs::create_dir(&gnupg_home).map_err(|e| Error::io("create directory", &gnupg_home, e))?;
    let verified = work.join("Release");
    gpg::verify_clearsigned(&inrelease, &verified, keyring, &gnupg_home, &inrelease_url)?;
    let release = fs::read_to_string(&verified).map_err(|e| Error::io("read", &verified, e))?;
    let packages_sum =
        index::release_checksum(&release, suite, PACKAGES_PATH).map_err(|reason| {
            Error::Release {
                url: inrelease_url.clone(),
                reason,
            }
        })?;

    // 2. The package index, checked against the signed Release.
    let packages_url = format!("{mirror}/dists/{suite}/{PACKAGES_PATH}");
    let packages_xz = work.join("Packages.xz");
    downloader
        .download(
            &packages_url,
            &packages_xz,
            packages_sum.size,
            Some("Packages.xz"),
        )?
        .verify(&packages_sum, PACKAGES_PATH, &packages_url)?;
    let file = File::open(&packages_xz).map_err(|e| Error::io("open", &packages_xz, e))?;
    let entries = index::scan_packages(
        BufReader::new(xz2::read::XzDecoder::new_multi_decoder(BufReader::new(
            file,
        ))),
        wanted,
    )
    .map_err(|e| Error::Read {
        url: packages_url.clone(),
        source: e,
    })?;

    Ok(SignedIndex {
        mirror: mirror.to_owned(),
        suite,
        entries,
        packages_url,
    })
}

/// Where [`fetch_busybox`] keeps the static busybox binary, relative to the data dir.
const BUSYBOX_CACHE: &str = "busybox/busybox";

/// The static busybox binary from Debian's `busybox-static` (as in the guest's initramfs),
/// cached in the data dir: answered from the cache without network access when present,
/// else downloaded and verified against the signed index like [`fetch_latest`] does.
/// Returns the cached binary's absolute path. Containers use it to build their default root.
pub fn fetch_busybox(opts: &FetchOptions) -> Result<PathBuf> {
    let data_dir = absolute(&opts.data_dir)?;
    let cached = data_dir.join(BUSYBOX_CACHE);
    if fs::metadata(&cached).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return Ok(cached);
    }
    let mirror = mirror::resolve(opts.mirror.as_deref())?;
    let keyring = gpg::resolve_keyring(opts.keyring.as_deref())?;
    let dir = data_dir.join("busybox");
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    // Deleted on every return; the binary is renamed out of it only once verified.
    let work_dir = tempfile::Builder::new()
        .prefix(".vessel-fetch-")
        .tempdir_in(&dir)
        .map_err(|e| Error::io("create a temporary directory in", &dir, e))?;
    let work = work_dir.path();
    let downloader = Downloader::new(opts.progress);
    let main = signed_packages(&downloader, &mirror, SUITE, &keyring, work, |name| {
        name == BUSYBOX_PACKAGE
    })?;
    let busybox_pkg =
        index::newest(&main.entries, BUSYBOX_PACKAGE).ok_or_else(|| Error::PackageNotFound {
            package: BUSYBOX_PACKAGE.to_owned(),
            url: main.packages_url.clone(),
        })?;
    let busybox_deb = download_package(
        &downloader,
        &mirror,
        busybox_pkg,
        &main.packages_url,
        &work.join("busybox.deb"),
    )?;
    let busybox = deb::extract(&busybox_deb, &busybox_pkg.name, "bin/busybox", |p| {
        p == "bin/busybox" || p == "usr/bin/busybox"
    })?;
    let work_binary = work.join("busybox");
    write_synced(&work_binary, |f| {
        use std::os::unix::fs::PermissionsExt;
        f.write_all(&busybox.contents)?;
        f.set_permissions(fs::Permissions::from_mode(0o755))
    })?;
    rename(&work_binary, &cached)?;
    sync_dir(&dir);
    tracing::info!(
        "busybox {} cached in {}",
        busybox_pkg.version,
        cached.display()
    );
    Ok(cached)
}

/// `linux-image-<something>-cloud-amd64`, but not the metapackage itself.
fn is_cloud_kernel_package(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .and_then(|r| r.strip_suffix(RELEASE_SUFFIX))
        .is_some_and(|middle| !middle.is_empty())
}

/// A release string is also a directory name: it must look like `6.1.0-56-cloud-amd64`.
fn is_valid_release(release: &str) -> bool {
    release.len() > RELEASE_SUFFIX.len()
        && release.ends_with(RELEASE_SUFFIX)
        && release.starts_with(|c: char| c.is_ascii_digit())
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
}

/// Newest `linux-image-cloud-amd64`, then the first `linux-image-*-cloud-amd64` in its
/// Depends; the exact version it pins if it pins one, else the newest of that name.
fn current_kernel<'a>(entries: &'a [PackageEntry], url: &str) -> Result<&'a PackageEntry> {
    let meta =
        index::newest(entries, KERNEL_METAPACKAGE).ok_or_else(|| Error::PackageNotFound {
            package: KERNEL_METAPACKAGE.to_owned(),
            url: url.to_owned(),
        })?;
    let (name, pinned) = index::first_dependency(&meta.depends, is_cloud_kernel_package)
        .ok_or_else(|| Error::Package {
            package: KERNEL_METAPACKAGE.to_owned(),
            url: url.to_owned(),
            reason: format!(
                "no linux-image-*{RELEASE_SUFFIX} in its Depends ({:?})",
                meta.depends
            ),
        })?;
    let pinned_entry =
        pinned.and_then(|v| entries.iter().find(|e| e.name == name && e.version == v));
    pinned_entry
        .or_else(|| index::newest(entries, &name))
        .ok_or_else(|| Error::PackageNotFound {
            package: name,
            url: url.to_owned(),
        })
}

/// Downloads a package's .deb to `dest` and checks it against the signed index.
fn download_package(
    downloader: &Downloader,
    mirror: &str,
    pkg: &PackageEntry,
    packages_url: &str,
    dest: &Path,
) -> Result<PathBuf> {
    let incomplete = |field: &str| Error::Package {
        package: pkg.name.clone(),
        url: packages_url.to_owned(),
        reason: format!("its index entry has no usable {field}"),
    };
    let filename = pkg
        .filename
        .as_deref()
        .ok_or_else(|| incomplete("Filename"))?;
    let checksum: &Checksum = pkg
        .checksum
        .as_ref()
        .ok_or_else(|| incomplete("Size and SHA256"))?;
    let url = format!("{mirror}/{filename}");
    tracing::info!(
        "downloading {} {} ({} bytes)",
        pkg.name,
        pkg.version,
        checksum.size
    );
    downloader
        .download(&url, dest, checksum.size, Some(&pkg.name))?
        .verify(checksum, &format!("package {}", pkg.name), &url)?;
    Ok(dest.to_owned())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))
}

/// Creates `path`, fills it with `fill`, and flushes it to disk before it is renamed
/// anywhere, so a crash cannot leave a renamed-but-empty file.
fn write_synced(path: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io("create", path, e))?;
    fill(&mut file).map_err(|e| Error::io("write", path, e))?;
    file.sync_all().map_err(|e| Error::io("write", path, e))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| Error::io("move a file into", to, e))
}

/// Best effort: makes the renames durable. Failure only weakens crash safety.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!("cannot sync directory {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names() {
        assert!(is_valid_release("6.1.0-56-cloud-amd64"));
        assert!(!is_valid_release("-cloud-amd64"));
        assert!(!is_valid_release("6.1.0-56-amd64"));
        assert!(!is_valid_release("../../x-cloud-amd64"));
        assert!(!is_valid_release("6.1/x-cloud-amd64"));
        assert!(is_cloud_kernel_package("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!is_cloud_kernel_package("linux-image-cloud-amd64"));
        assert!(!is_cloud_kernel_package(
            "linux-image-6.1.0-56-cloud-amd64-dbg"
        ));
    }

    #[test]
    fn cached_checks_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(cached(dir.path()).unwrap().is_none());
        let guest = dir.path().join("guest");
        fs::create_dir_all(guest.join("r")).unwrap();
        let image = GuestImage {
            kernel: guest.join("r/vmlinuz"),
            initrd: guest.join("r/initrd.img"),
            release: "r".into(),
        };
        fs::write(
            guest.join("current.json"),
            serde_json::to_vec(&image).unwrap(),
        )
        .unwrap();
        assert!(cached(dir.path()).unwrap().is_none(), "files missing");
        fs::write(&image.kernel, b"k").unwrap();
        fs::write(&image.initrd, b"").unwrap();
        assert!(cached(dir.path()).unwrap().is_none(), "empty initrd");
        fs::write(&image.initrd, b"i").unwrap();
        assert!(cached(dir.path()).unwrap().is_none(), "no initramfs id");
        fs::write(guest.join("r").join(INITRAMFS_ID_FILE), b"stale").unwrap();
        assert!(cached(dir.path()).unwrap().is_none(), "stale initramfs id");
        fs::write(guest.join("r").join(INITRAMFS_ID_FILE), initramfs_id()).unwrap();
        assert_eq!(cached(dir.path()).unwrap(), Some(image));
        fs::write(guest.join("current.json"), b"{not json").unwrap();
        let err = cached(dir.path()).unwrap_err();
        assert!(matches!(err, Error::CacheRecord { .. }), "{err}");
    }
}
