//! Template root disks from OCI images: fetch or read a local layout,
//! unpack layers safely, inject `wrenn-guest`, write a sparse ext4 image,
//! cache it by manifest digest.
//!
//! Sources: a registry reference ([`pull_to_layout`] writes it as a local
//! OCI layout first, so both paths share one build), an OCI image layout
//! directory, or a `docker save` tarball. The build:
//! 1. resolve the image to its manifest digest and layers ([`oci`]);
//! 2. take the cache entry's lock (`flock`), so two capsules asking for the
//!    same image wait for one build instead of racing;
//! 3. apply the layers in order into a scratch directory, honouring
//!    whiteouts and refusing hostile entries ([`unpack`]);
//! 4. copy `wrenn-guest` to [`GUEST_PATH`] (mode 0755, root-owned);
//! 5. `mkfs.ext4 -d` into a sparse file of the requested size, then rename
//!    it into the cache: a cached file is always complete.
//!
//! Cache layout under the directory passed in:
//! `sha256-<manifest hex>/rootfs-<size>-g<guest sha256 prefix>.ext4`, one
//! lock file `sha256-<hex>.lock` per image. A template disk is never
//! rewritten in place (running capsules use it as their origin); a new
//! size or guest binary makes a new file.
//!
//! [`ImageSource`] parses the references capsules name images by;
//! [`TemplateBuilder`] is what the capsule supervisor calls (pull, then
//! build, off the async runtime).
//!
//! The build is blocking (file I/O and a child process): async callers run
//! it on a blocking thread. It needs root so ownership in the image is
//! kept. Storage of capsule disks is `storage`'s job.

mod credentials;
pub mod dirs;
pub mod oci;
pub mod quota;
pub mod refusal;
mod registry;
mod source;
mod templates;
pub mod unpack;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest as _, Sha256};

pub use credentials::Credentials;
pub use dirs::ImageDirs;
pub use refusal::Refusal;
pub use registry::{PullOptions, check_descriptors, pull_to_layout};
pub use source::ImageSource;
pub use templates::{CacheUsers, Pull, TemplateBuilder, TemplateSettings};

/// Where `wrenn-guest` lives inside every template. It is outside every
/// distribution's directories (no clash with the image's `/sbin`, which is
/// a symlink on merged-/usr systems); the kernel command line names it as
/// `init=/.wrenn/wrenn-guest`.
pub const GUEST_PATH: &str = "/.wrenn/wrenn-guest";

/// An image action failed. Variants name the action and carry the path,
/// layer, entry or reference a reader needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer entry is refused.
    #[error("refuse entry {entry:?} of layer {layer}: {why}")]
    UnsafeEntry {
        /// Layer digest (or archive member).
        layer: String,
        /// The entry's path as written in the tar.
        entry: String,
        /// Why.
        why: String,
    },
    /// Writing a layer entry failed.
    #[error("unpack entry {entry:?} of layer {layer}")]
    Unpack {
        /// Layer digest.
        layer: String,
        /// Entry path.
        entry: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An image goes over one of this node's [`unpack::Limits`].
    #[error(
        "refuse layer {layer}: {what} reaches {}, over the {limit} of {}",
        limit.show(*value),
        limit.show(*max)
    )]
    OverLimit {
        /// Layer digest (or archive member).
        layer: String,
        /// Which limit.
        limit: unpack::Limit,
        /// What crossed it (the blob, the stream, an entry).
        what: String,
        /// How far it got.
        value: u64,
        /// The limit's value.
        max: u64,
    },
    /// The image cache cannot take another template: the templates that
    /// capsules and snapshots use (or that were used moments ago) fill it.
    #[error(
        "image cache {} holds {} of its {} quota (--image-cache-max-bytes) in templates still in use",
        dir.display(),
        unpack::show_bytes(*used),
        unpack::show_bytes(*quota)
    )]
    CacheFull {
        /// The cache directory.
        dir: PathBuf,
        /// Bytes it holds.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// Reading a layer stream failed.
    #[error("read layer {layer}")]
    ReadLayer {
        /// Layer digest.
        layer: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A layer is compressed in a way we do not read.
    #[error("layer {layer} is {compression}-compressed, which is not supported")]
    UnsupportedCompression {
        /// Layer digest.
        layer: String,
        /// e.g. `zstd`.
        compression: &'static str,
    },
    /// Reading an image file failed.
    #[error("read image file {}", path.display())]
    ReadImage {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An image JSON document is malformed.
    #[error("parse {}", path.display())]
    ParseImage {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// No usable manifest.
    #[error("choose a manifest in {}: {why}", path.display())]
    NoManifest {
        /// Layout or archive.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A digest is not `sha256:<64 lowercase hex>`.
    #[error("unsupported or malformed digest {digest:?}")]
    BadDigest {
        /// As found.
        digest: String,
    },
    /// Content does not match its digest.
    #[error("content of {digest} hashes to {actual}")]
    DigestMismatch {
        /// Expected.
        digest: String,
        /// Found.
        actual: String,
    },
    /// A registry reference does not parse.
    #[error("parse image reference {reference:?}")]
    InvalidReference {
        /// As given.
        reference: String,
        /// Cause.
        #[source]
        source: oci_client::ParseError,
    },
    /// A local image reference (`oci:`, `docker-archive:`) is malformed.
    #[error("image reference {reference:?}: {why}")]
    LocalReference {
        /// As given.
        reference: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A local image's name is malformed, or is not a file the agent may
    /// read from an image directory.
    #[error("find local image")]
    NodeFile {
        /// Cause.
        #[source]
        source: dirs::Error,
    },
    /// Pulling from a registry failed. The registry's words are kept
    /// only as a sanitized [`Refusal`], never as the raw error, so no
    /// chain printed from here carries unbounded registry text.
    #[error("pull {reference}: {}", refusal.message)]
    Pull {
        /// Reference.
        reference: String,
        /// What the registry said, classified.
        refusal: Refusal,
    },
    /// Writing a pulled layout failed.
    #[error("write image layout file {}", path.display())]
    WriteLayout {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or copying `wrenn-guest` failed.
    #[error("inject wrenn-guest from {}", from.display())]
    InjectGuest {
        /// Binary on the host.
        from: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Taking the cache lock failed.
    #[error("lock image cache entry {}", path.display())]
    Lock {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Preparing cache or scratch files failed.
    #[error("prepare {}", path.display())]
    Scratch {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` could not run or failed.
    #[error("mkfs.ext4 {} ({size_bytes} bytes): {stderr}", image.display())]
    Mkfs {
        /// Image being written.
        image: PathBuf,
        /// Requested size.
        size_bytes: u64,
        /// Its stderr, or why it did not start.
        stderr: String,
    },
}

impl Error {
    /// Whether trying again later may succeed: the registry was
    /// unreachable or refused, rather than the image being unusable.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Pull { .. } | Error::Lock { .. } | Error::CacheFull { .. }
        )
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A local image to build a template from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalImage {
    /// An OCI image layout directory; `tag` matches the
    /// `org.opencontainers.image.ref.name` annotation when several images
    /// are in it.
    Layout {
        /// Directory.
        dir: PathBuf,
        /// Tag to pick.
        tag: Option<String>,
    },
    /// A `docker save` tarball; `tag` is `repo:tag` when it holds several.
    DockerArchive {
        /// Tarball.
        path: PathBuf,
        /// Tag to pick.
        tag: Option<String>,
    },
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRequest {
    /// Source image.
    pub image: LocalImage,
    /// `wrenn-guest` binary on the host.
    pub guest_binary: PathBuf,
    /// Size of the ext4 image (sparse), rounded up to 4 KiB.
    pub size_bytes: u64,
}

/// A template disk in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateDisk {
    /// Raw ext4 image; read-only from here on.
    pub path: PathBuf,
    /// Manifest digest it was built from.
    pub manifest_digest: String,
    /// Its size.
    pub size_bytes: u64,
    /// Whether this call built it (false: it was cached).
    pub built: bool,
}

/// Template disks cached by manifest digest in one directory.
#[derive(Clone, Debug)]
pub struct ImageCache {
    dir: PathBuf,
    limits: unpack::Limits,
}

/// Removes a scratch path when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = match fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&self.0),
            Ok(_) => fs::remove_file(&self.0),
            Err(_) => Ok(()),
        };
    }
}

/// Removes a directory when dropped, if it is empty by then.
struct RemoveIfEmpty(PathBuf);

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn scratch_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Scratch {
        path: path.to_path_buf(),
        source,
    }
}

fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn sha256_of_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

impl ImageCache {
    /// A cache in `dir` (created if needed).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(scratch_err(&dir))?;
        Ok(Self {
            dir,
            limits: unpack::Limits::default(),
        })
    }

    /// The same cache, building images under `limits`.
    pub fn with_limits(mut self, limits: unpack::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The cache entry of a manifest digest, and the disk in it at `size`
    /// (a multiple of 4 KiB) with the guest binary of hash `guest_hash`.
    fn paths(&self, digest: &str, size: u64, guest_hash: &str) -> Result<(PathBuf, PathBuf)> {
        let hex = oci::digest_hex(digest)?;
        let entry = self.dir.join(format!("sha256-{hex}"));
        let short = guest_hash.get(..12).unwrap_or(guest_hash);
        let target = entry.join(format!("rootfs-{size}-g{short}.ext4"));
        Ok((entry, target))
    }

    /// The template disk built from manifest `digest` at `size_bytes` with
    /// `guest_binary`, if the cache holds it; nothing is pulled or built.
    /// Blocking.
    pub fn cached(
        &self,
        digest: &str,
        size_bytes: u64,
        guest_binary: &Path,
    ) -> Result<Option<TemplateDisk>> {
        let size = size_bytes.div_ceil(4096) * 4096;
        let guest_hash = sha256_of_file(guest_binary).map_err(|source| Error::InjectGuest {
            from: guest_binary.to_path_buf(),
            source,
        })?;
        let (_, target) = self.paths(digest, size, &guest_hash)?;
        Ok(target.is_file().then(|| TemplateDisk {
            path: target,
            manifest_digest: digest.to_string(),
            size_bytes: size,
            built: false,
        }))
    }

    /// Makes the template disk for `req` exist and returns it. Blocking;
    /// concurrent calls for the same image (threads or processes) build
    /// it once, the others wait on the lock and get the cached file.
    pub fn ensure_template(&self, req: &TemplateRequest) -> Result<TemplateDisk> {
        let size = req.size_bytes.div_ceil(4096) * 4096;
        let guest_hash =
            sha256_of_file(&req.guest_binary).map_err(|source| Error::InjectGuest {
                from: req.guest_binary.clone(),
                source,
            })?;

        // A docker archive must be unpacked before we know its digest.
        let mut _archive_scratch = None;
        let (image, resolved) = match &req.image {
            LocalImage::Layout { dir, tag } => {
                (dir.clone(), oci::resolve_layout(dir, tag.as_deref())?)
            }
            LocalImage::DockerArchive { path, tag } => {
                let out = self.dir.join(format!(".archive-{}", unique_suffix()));
                let guard = Scratch(out.clone());
                fs::create_dir(&out).map_err(scratch_err(&out))?;
                let file = File::open(path).map_err(|source| Error::ReadImage {
                    path: path.clone(),
                    source,
                })?;
                // The archive gets the same checks as a layer, and holds
                // at most an image's worth of layers.
                let l = self.limits;
                let budget = unpack::Budget::new(unpack::Limits {
                    layer_bytes: l.image_bytes,
                    layer_compressed_bytes: l.image_bytes,
                    image_compressed_bytes: l.image_bytes,
                    ..l
                });
                let name = path.display().to_string();
                budget.start_layer(&name, None)?;
                unpack::apply_layer(&out, io::BufReader::new(file), &name, &budget)?;
                let resolved = oci::resolve_docker_dir(&out, tag.as_deref())?;
                _archive_scratch = Some(guard);
                (path.clone(), resolved)
            }
        };
        let (entry, target) = self.paths(&resolved.manifest_digest, size, &guest_hash)?;
        let disk = |built| TemplateDisk {
            path: target.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            size_bytes: size,
            built,
        };
        // Fast path: a cached file is complete (it is renamed in last).
        if target.exists() {
            return Ok(disk(false));
        }

        let lock_path = entry.with_extension("lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| Error::Lock {
                path: lock_path.clone(),
                source: errno.into(),
            })?;
        // Whoever held the lock before us may have built it.
        if target.exists() {
            return Ok(disk(false));
        }

        let started = std::time::Instant::now();
        fs::create_dir_all(&entry).map_err(scratch_err(&entry))?;
        // Dropped after `_work`: a failed first build leaves no entry.
        let _entry = RemoveIfEmpty(entry.clone());
        let work = entry.join(format!(".build-{}", unique_suffix()));
        let _work = Scratch(work.clone());
        let root = work.join("rootfs");
        fs::create_dir_all(&root).map_err(scratch_err(&root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .map_err(scratch_err(&root))?;

        let mut bytes = 0;
        let budget = unpack::Budget::new(self.limits);
        for layer in &resolved.layers {
            bytes += oci::apply_blob(&root, layer, &budget)?.bytes;
        }
        inject_guest(&root, &req.guest_binary)?;
        let tmp = work.join("rootfs.ext4");
        write_ext4(&root, &tmp, size)?;
        fs::rename(&tmp, &target).map_err(scratch_err(&target))?;
        if let Ok(d) = File::open(&entry) {
            let _ = d.sync_all();
        }
        tracing::info!(
            image = %image.display(),
            digest = %resolved.manifest_digest,
            layers = resolved.layers.len(),
            unpacked_bytes = bytes,
            size_bytes = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built template disk"
        );
        Ok(disk(true))
    }
}

/// Copies the guest binary to [`GUEST_PATH`] under `root`, replacing
/// whatever the image had there.
fn inject_guest(root: &Path, binary: &Path) -> Result<()> {
    let err = |source| Error::InjectGuest {
        from: binary.to_path_buf(),
        source,
    };
    let rel = GUEST_PATH.trim_start_matches('/');
    let dest = root.join(rel);
    let dir = dest.parent().unwrap_or(root);
    // The image may have put a file or symlink where our directory goes.
    if let Ok(m) = fs::symlink_metadata(dir)
        && !m.is_dir()
    {
        fs::remove_file(dir).map_err(err)?;
    }
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(err)?;
    if let Ok(m) = fs::symlink_metadata(&dest) {
        if m.is_dir() {
            fs::remove_dir_all(&dest).map_err(err)?;
        } else {
            fs::remove_file(&dest).map_err(err)?;
        }
    }
    fs::copy(binary, &dest).map_err(err)?;
    match std::os::unix::fs::chown(&dest, Some(0), Some(0)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(err(e)),
    }
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).map_err(err)?;
    Ok(())
}

/// Writes `root` as an ext4 image at `image`, a sparse file of
/// `size_bytes`. No journal-less or exotic features: the guest kernel and
/// e2fsck of any recent distribution read it.
pub fn write_ext4(root: &Path, image: &Path, size_bytes: u64) -> Result<()> {
    let mkfs_err = |stderr: String| Error::Mkfs {
        image: image.to_path_buf(),
        size_bytes,
        stderr,
    };
    // Sparse from the start: mkfs only writes metadata blocks.
    let f = File::create(image).map_err(|e| mkfs_err(e.to_string()))?;
    f.set_len(size_bytes).map_err(|e| mkfs_err(e.to_string()))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", "wrenn-root", "-m", "0"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg("-d")
        .arg(root)
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| mkfs_err(format!("cannot run mkfs.ext4: {e}")))?;
    if !out.status.success() {
        return Err(mkfs_err(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let f = File::open(image).map_err(|e| mkfs_err(e.to_string()))?;
    f.sync_all().map_err(|e| mkfs_err(e.to_string()))?;
    Ok(())
}
