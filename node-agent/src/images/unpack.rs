//! Applying OCI layers to a directory, safely.
//!
//! Layers are applied in manifest order into one directory (no mounts).
//! Whiteouts (opencontainers/image-spec `layer.md`): `.wh.<name>` deletes
//! `<name>` as lower layers left it; `.wh..wh..opq` hides everything lower
//! layers put in its directory. Entries of the same layer are never
//! hidden by that layer's own whiteouts, whatever the order in the tar.
//!
//! Refused, with an error naming the layer and the entry: paths that climb
//! out with `..`; entries written through a symlink (a layer tar from a
//! real build never does that, and following one during unpack is how a
//! hostile image reaches host files); symlinks whose target climbs above
//! the image root (relative, or absolute with `..`); hardlinks to anything
//! outside the tree or through a symlink; character and block devices.
//! Absolute symlink targets are kept: they mean a path inside the guest
//! and are never followed here.
//!
//! Every byte is metered against the image's [`Budget`] ([`Limits`]):
//! compressed bytes read, bytes the decompressor yields (and their ratio
//! to the compressed ones, so a gzip bomb stops early), the size each file
//! declares (a GNU sparse entry counts its full declared size, since that
//! is what the template will hold) and the number of entries. A file is
//! written with holes where its data is zeros, so a sparse entry within
//! the limits never costs its declared size in disk blocks.
//!
//! Why this file is long: 947 lines of code and 382 of unit tests kept beside
//! the code they check.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::Error;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Why an entry is refused (pure checks, unit-tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A `..` component.
    Traversal,
    /// The symlink target climbs above the root.
    SymlinkEscapes(String),
    /// The hardlink target climbs out of the tree.
    HardlinkEscapes(String),
    /// The entry's parent path goes through this symlink.
    ThroughSymlink(PathBuf),
    /// A parent is a file.
    ParentNotDir(PathBuf),
    /// A device node.
    Device,
    /// An entry type we do not unpack.
    UnsupportedType(String),
    /// A hardlink whose target does not exist or is a directory.
    BadHardlinkTarget(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Traversal => f.write_str("path escapes the image root with `..`"),
            Refusal::SymlinkEscapes(t) => {
                write!(f, "symlink target {t:?} escapes the image root")
            }
            Refusal::HardlinkEscapes(t) => {
                write!(f, "hardlink target {t:?} escapes the image root")
            }
            Refusal::ThroughSymlink(p) => {
                write!(f, "path goes through symlink {:?}", p.display().to_string())
            }
            Refusal::ParentNotDir(p) => {
                write!(f, "parent {:?} is not a directory", p.display().to_string())
            }
            Refusal::Device => f.write_str("device nodes are not allowed in a template"),
            Refusal::UnsupportedType(t) => write!(f, "unsupported entry type {t}"),
            Refusal::BadHardlinkTarget(t) => {
                write!(f, "hardlink target {t:?} is missing or a directory")
            }
        }
    }
}

/// `path` as a relative path of normal components. A leading `/` or `./`
/// is dropped (tars made with absolute names are common); `..` is refused.
/// Returns an empty path for the root itself.
pub fn plan_path(path: &Path) -> Result<PathBuf, Refusal> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(Refusal::Traversal),
        }
    }
    Ok(out)
}

/// Checks a symlink at `link` (relative to the root) pointing at `target`:
/// resolved lexically, from the link's directory or from the root when
/// absolute, it must never climb above the root.
pub fn check_symlink_target(link: &Path, target: &Path) -> Result<(), Refusal> {
    let mut depth: usize = if target.is_absolute() {
        0
    } else {
        link.parent().map_or(0, |p| p.components().count())
    };
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    Refusal::SymlinkEscapes(target.to_string_lossy().into_owned())
                })?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(())
}

/// What a whiteout entry asks for, if it is one.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout {
    /// Delete this path (relative to the root).
    Remove(PathBuf),
    /// Hide lower contents of this directory.
    Opaque(PathBuf),
    /// Another `.wh..wh.` marker (aufs internals): ignore.
    Ignore,
}

/// Classifies a planned (already checked) path.
pub fn plan_whiteout(path: &Path) -> Option<Whiteout> {
    let name = path.file_name()?.to_str()?;
    let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
    if name == OPAQUE {
        return Some(Whiteout::Opaque(parent));
    }
    if name.starts_with(".wh..wh.") {
        return Some(Whiteout::Ignore);
    }
    let hidden = name.strip_prefix(WHITEOUT_PREFIX)?;
    if hidden.is_empty() {
        return Some(Whiteout::Ignore);
    }
    Some(Whiteout::Remove(parent.join(hidden)))
}

/// Counts of what one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries written.
    pub entries: u64,
    /// Paths removed by whiteouts.
    pub whiteouts: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
}

/// Applies one layer (an uncompressed tar stream) onto `root`, charging
/// `budget` (see [`Budget::start_layer`]). `layer` names it in errors (its
/// digest). A limit crossed while reading wins over the read error it
/// caused.
pub fn apply_layer(
    root: &Path,
    tar: impl Read,
    layer: &str,
    budget: &Budget,
) -> Result<LayerStats, Error> {
    let mut applier = Applier {
        root,
        layer,
        created: HashSet::new(),
        stats: LayerStats::default(),
        budget,
    };
    let mut archive = tar::Archive::new(budget.meter(Side::Unpacked, tar));
    let read_err = |source| {
        budget.or_over(Error::ReadLayer {
            layer: layer.to_string(),
            source,
        })
    };
    let entries = archive.entries().map_err(read_err)?;
    for entry in entries {
        let entry = entry.map_err(read_err)?;
        applier.apply(entry).map_err(|e| budget.or_over(e))?;
    }
    Ok(applier.stats)
}

/// What one image may put on the node. Every bound is on by default; the
/// agent's `--image-max-*` flags set them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Compressed bytes of one layer blob.
    pub layer_compressed_bytes: u64,
    /// Compressed bytes of all layer blobs of an image.
    pub image_compressed_bytes: u64,
    /// Unpacked bytes of one layer: tar stream and declared file sizes.
    pub layer_bytes: u64,
    /// Unpacked bytes of all layers of an image.
    pub image_bytes: u64,
    /// Tar entries of all layers of an image.
    pub files: u64,
    /// Unpacked bytes per compressed byte of one layer, once past
    /// [`RATIO_FLOOR`].
    pub ratio: u64,
}

/// Unpacked bytes of a layer before the ratio is checked: tiny layers
/// (a few small files) compress far better than images as a whole.
pub const RATIO_FLOOR: u64 = 16 << 20;

impl Default for Limits {
    /// Room for large real images (CUDA and ML stacks reach tens of GiB
    /// unpacked), while one tenant's image cannot fill a node disk.
    fn default() -> Self {
        Self {
            layer_compressed_bytes: 8 << 30,
            image_compressed_bytes: 16 << 30,
            layer_bytes: 16 << 30,
            image_bytes: 32 << 30,
            files: 1_000_000,
            ratio: 100,
        }
    }
}

/// One of [`Limits`], named as the flag that sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::layer_compressed_bytes`].
    LayerCompressed,
    /// [`Limits::image_compressed_bytes`].
    ImageCompressed,
    /// [`Limits::layer_bytes`].
    LayerBytes,
    /// [`Limits::image_bytes`].
    ImageBytes,
    /// [`Limits::files`].
    Files,
    /// [`Limits::ratio`].
    Ratio,
    /// A registry sent more bytes than the blob's descriptor declares.
    DescriptorSize,
}

impl Limit {
    /// The agent flag that sets it (empty for the descriptor's size).
    pub fn flag(self) -> &'static str {
        match self {
            Limit::LayerCompressed => "--image-max-layer-compressed-bytes",
            Limit::ImageCompressed => "--image-max-compressed-bytes",
            Limit::LayerBytes => "--image-max-layer-bytes",
            Limit::ImageBytes => "--image-max-bytes",
            Limit::Files => "--image-max-files",
            Limit::Ratio => "--image-max-ratio",
            Limit::DescriptorSize => "",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Limit::LayerCompressed => "per-layer compressed size limit",
            Limit::ImageCompressed => "per-image compressed size limit",
            Limit::LayerBytes => "per-layer unpacked size limit",
            Limit::ImageBytes => "per-image unpacked size limit",
            Limit::Files => "per-image file-count limit",
            Limit::Ratio => "compression ratio limit",
            Limit::DescriptorSize => "size its descriptor declares",
        }
    }

    /// `value` in this limit's unit.
    pub fn show(self, value: u64) -> String {
        match self {
            Limit::Files => format!("{value} entries"),
            Limit::Ratio => format!("{value}:1"),
            _ => show_bytes(value),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.flag() {
            "" => f.write_str(self.what()),
            flag => write!(f, "{} ({flag})", self.what()),
        }
    }
}

/// `n` bytes as the largest binary unit that keeps it above 1.
pub fn show_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Which side of the decompressor a [`Metered`] reader counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Bytes of the blob as stored.
    Compressed,
    /// Bytes of the tar stream.
    Unpacked,
}

#[derive(Debug, Default, Clone, Copy)]
struct Used {
    compressed: u64,
    unpacked: u64,
    declared: u64,
}

#[derive(Debug)]
struct Meter {
    limits: Limits,
    image: Used,
    layer: Used,
    files: u64,
    /// The first limit crossed, with what crossed it.
    over: Option<(Limit, String, u64)>,
}

/// What an image has used of its [`Limits`] so far, across its layers.
/// Shared by the readers of a blob and the unpacker (one thread).
#[derive(Debug)]
pub struct Budget {
    meter: RefCell<Meter>,
    layer: RefCell<String>,
}

impl Budget {
    /// A fresh budget under `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            meter: RefCell::new(Meter {
                limits,
                image: Used::default(),
                layer: Used::default(),
                files: 0,
                over: None,
            }),
            layer: RefCell::new(String::new()),
        }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> Limits {
        self.meter.borrow().limits
    }

    /// Starts metering layer `id`; `stored` is its blob size when known,
    /// refused at once when over a compressed limit.
    pub fn start_layer(&self, id: &str, stored: Option<u64>) -> Result<(), Error> {
        *self.layer.borrow_mut() = id.to_string();
        let mut m = self.meter.borrow_mut();
        m.layer = Used::default();
        m.over = None;
        if let Some(n) = stored {
            let image = m.image.compressed.saturating_add(n);
            let over = if n > m.limits.layer_compressed_bytes {
                Some((Limit::LayerCompressed, n))
            } else if image > m.limits.image_compressed_bytes {
                Some((Limit::ImageCompressed, image))
            } else {
                None
            };
            if let Some((limit, value)) = over {
                drop(m);
                return Err(self.error(limit, "the blob".into(), value));
            }
        }
        Ok(())
    }

    fn error(&self, limit: Limit, what: String, value: u64) -> Error {
        let max = {
            let l = self.meter.borrow().limits;
            match limit {
                Limit::LayerCompressed => l.layer_compressed_bytes,
                Limit::ImageCompressed => l.image_compressed_bytes,
                Limit::LayerBytes => l.layer_bytes,
                Limit::ImageBytes => l.image_bytes,
                Limit::Files => l.files,
                Limit::Ratio => l.ratio,
                Limit::DescriptorSize => 0,
            }
        };
        Error::OverLimit {
            layer: self.layer.borrow().clone(),
            limit,
            what,
            value,
            max,
        }
    }

    /// `err`, or the limit whose crossing caused it.
    pub fn or_over(&self, err: Error) -> Error {
        let over = self.meter.borrow_mut().over.take();
        match over {
            Some((limit, what, value)) => self.error(limit, what, value),
            None => err,
        }
    }

    fn trip(&self, limit: Limit, what: String, value: u64) -> io::Error {
        let mut m = self.meter.borrow_mut();
        let msg = format!("{what} is over the {limit}");
        m.over.get_or_insert((limit, what, value));
        io::Error::other(msg)
    }

    /// Counts `n` bytes read on `side`.
    fn read(&self, side: Side, n: u64) -> io::Result<()> {
        let (limit, value) = {
            let mut m = self.meter.borrow_mut();
            let l = m.limits;
            match side {
                Side::Compressed => {
                    m.layer.compressed += n;
                    m.image.compressed += n;
                    if m.layer.compressed > l.layer_compressed_bytes {
                        (Limit::LayerCompressed, m.layer.compressed)
                    } else if m.image.compressed > l.image_compressed_bytes {
                        (Limit::ImageCompressed, m.image.compressed)
                    } else {
                        return Ok(());
                    }
                }
                Side::Unpacked => {
                    m.layer.unpacked += n;
                    m.image.unpacked += n;
                    let ratio = m.layer.unpacked / m.layer.compressed.max(1);
                    if m.layer.unpacked > l.layer_bytes {
                        (Limit::LayerBytes, m.layer.unpacked)
                    } else if m.image.unpacked > l.image_bytes {
                        (Limit::ImageBytes, m.image.unpacked)
                    } else if m.layer.unpacked > RATIO_FLOOR && ratio > l.ratio {
                        (Limit::Ratio, ratio)
                    } else {
                        return Ok(());
                    }
                }
            }
        };
        let what = match (side, limit) {
            (_, Limit::Ratio) => "the decompressed stream".to_string(),
            (Side::Compressed, _) => "the compressed stream".to_string(),
            (Side::Unpacked, _) => "the unpacked stream".to_string(),
        };
        Err(self.trip(limit, what, value))
    }

    /// Charges one entry, and `declared` bytes when it is a file, before
    /// anything of it is written.
    fn entry(&self, name: &Path, declared: u64) -> Result<(), Error> {
        let over = {
            let mut m = self.meter.borrow_mut();
            let l = m.limits;
            m.files += 1;
            m.layer.declared = m.layer.declared.saturating_add(declared);
            m.image.declared = m.image.declared.saturating_add(declared);
            if m.files > l.files {
                Some((Limit::Files, m.files))
            } else if m.layer.declared > l.layer_bytes {
                Some((Limit::LayerBytes, m.layer.declared))
            } else if m.image.declared > l.image_bytes {
                Some((Limit::ImageBytes, m.image.declared))
            } else {
                None
            }
        };
        match over {
            None => Ok(()),
            Some((Limit::Files, n)) => Err(self.error(
                Limit::Files,
                format!("entry {:?}", name.display().to_string()),
                n,
            )),
            Some((limit, total)) => Err(self.error(
                limit,
                format!(
                    "entry {:?} (declaring {})",
                    name.display().to_string(),
                    show_bytes(declared)
                ),
                total,
            )),
        }
    }

    /// `inner`, counted on `side`.
    pub fn meter<R: Read>(&self, side: Side, inner: R) -> Metered<'_, R> {
        Metered {
            inner,
            side,
            budget: self,
        }
    }
}

/// A reader whose bytes are charged to a [`Budget`]; it fails once a limit
/// is crossed.
#[derive(Debug)]
pub struct Metered<'a, R> {
    inner: R,
    side: Side,
    budget: &'a Budget,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.read(self.side, n as u64)?;
        Ok(n)
    }
}

/// Copies `from` into `to`, seeking over blocks of zeros instead of
/// writing them, and sets the length to what was read. Returns the length.
fn copy_with_holes(from: &mut impl Read, to: &mut fs::File) -> io::Result<u64> {
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        if data.iter().all(|b| *b == 0) {
            to.seek(io::SeekFrom::Current(n as i64))?;
        } else {
            to.write_all(data)?;
        }
        len += n as u64;
    }
    to.set_len(len)?;
    Ok(len)
}

const PAX_XATTR: &str = "SCHILY.xattr.";

/// The entry's extended attributes, without SELinux labels (they belong
/// to the host's policy, not the image).
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix(PAX_XATTR)
                && name != "security.selinux"
            {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// What an entry's headers say about the file it makes.
struct EntryMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Applier<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Paths this layer created or replaced: its own whiteouts spare them.
    created: HashSet<PathBuf>,
    stats: LayerStats,
    budget: &'a Budget,
}

impl Applier<'_> {
    fn refuse(&self, entry: &Path, why: Refusal) -> Error {
        Error::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: entry.display().to_string(),
            why: why.to_string(),
        }
    }

    fn io(&self, entry: &Path) -> impl Fn(io::Error) -> Error + '_ {
        let entry = entry.display().to_string();
        move |source| Error::Unpack {
            layer: self.layer.to_string(),
            entry: entry.clone(),
            source,
        }
    }

    /// Makes every parent of `rel` a real directory (creating missing
    /// ones), refusing symlinks and files on the way.
    fn ensure_parents(&mut self, raw: &Path, rel: &Path) -> Result<(), Error> {
        let mut prefix = PathBuf::new();
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        for c in parent.components() {
            prefix.push(c);
            let abs = self.root.join(&prefix);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(raw, Refusal::ThroughSymlink(prefix)));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(self.refuse(raw, Refusal::ParentNotDir(prefix))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&abs).map_err(self.io(raw))?;
                    fs::set_permissions(&abs, fs::Permissions::from_mode(0o755))
                        .map_err(self.io(raw))?;
                    self.created.insert(prefix.clone());
                }
                Err(e) => return Err(self.io(raw)(e)),
            }
        }
        Ok(())
    }

    /// Whether every parent of `rel` is a real directory; `false` when one
    /// is missing. Symlinks and files on the way are refused.
    fn parents_exist(&self, raw: &Path, rel: &Path) -> Result<bool, Error> {
        let mut prefix = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            prefix.push(c);
            match fs::symlink_metadata(self.root.join(&prefix)) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(raw, Refusal::ThroughSymlink(prefix)));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(self.refuse(raw, Refusal::ParentNotDir(prefix))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(self.io(raw)(e)),
            }
        }
        Ok(true)
    }

    /// Removes whatever is at `rel` (not following symlinks).
    fn remove_existing(&self, raw: &Path, rel: &Path) -> Result<bool, Error> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&abs).map_err(self.io(raw))?,
            Ok(_) => fs::remove_file(&abs).map_err(self.io(raw))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io(raw)(e)),
        }
        Ok(true)
    }

    /// Removes what lower layers put under `dir`, keeping this layer's.
    fn hide_lower(&mut self, raw: &Path, dir: &Path) -> Result<(), Error> {
        let abs = self.root.join(dir);
        let entries = match fs::read_dir(&abs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(raw)(e)),
        };
        for child in entries {
            let child = child.map_err(self.io(raw))?;
            let rel = dir.join(child.file_name());
            if self.created.contains(&rel) {
                let is_dir = child.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir {
                    self.hide_lower(raw, &rel)?;
                }
                continue;
            }
            if self.remove_existing(raw, &rel)? {
                self.stats.whiteouts += 1;
            }
        }
        Ok(())
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), Error> {
        use tar::EntryType as T;
        let raw = entry
            .path()
            .map_err(|source| Error::ReadLayer {
                layer: self.layer.to_string(),
                source,
            })?
            .into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let rel = plan_path(&raw).map_err(|why| self.refuse(&raw, why))?;
        // A sparse entry's size is the one it declares, not what it stores.
        let declared = match kind {
            T::Regular | T::Continuous | T::GNUSparse => entry.size(),
            _ => 0,
        };
        self.budget.entry(&raw, declared)?;
        if rel.as_os_str().is_empty() {
            // The root itself: nothing to create.
            return Ok(());
        }
        if let Some(w) = plan_whiteout(&rel) {
            return self.apply_whiteout(&raw, &rel, w);
        }
        self.ensure_parents(&raw, &rel)?;

        let meta = self.read_meta(&raw, &mut entry)?;
        let abs = self.root.join(&rel);
        match kind {
            T::Directory => self.write_dir(&raw, &rel, &abs, &meta)?,
            T::Regular | T::Continuous | T::GNUSparse => {
                self.write_file(&raw, &rel, &abs, &meta, &mut entry)?;
            }
            T::Symlink => self.write_symlink(&raw, &rel, &abs, &meta, &entry)?,
            T::Link => {
                if !self.write_hardlink(&raw, &rel, &abs, &entry)? {
                    return Ok(());
                }
            }
            T::Fifo => self.write_fifo(&raw, &rel, &abs, &meta)?,
            T::Char | T::Block => return Err(self.refuse(&raw, Refusal::Device)),
            other => {
                return Err(self.refuse(&raw, Refusal::UnsupportedType(format!("{other:?}"))));
            }
        }
        if kind != T::Link {
            // Last: chown clears security.capability.
            for (name, value) in &meta.xattrs {
                crate::sys::xattr::set_xattr_nofollow(&abs, name, value).map_err(self.io(&raw))?;
            }
        }
        self.created.insert(rel);
        self.stats.entries += 1;
        Ok(())
    }

    /// Applies one whiteout entry of this layer.
    fn apply_whiteout(&mut self, raw: &Path, rel: &Path, w: Whiteout) -> Result<(), Error> {
        // A whiteout under a directory that does not exist hides
        // nothing, and must not create it.
        if !self.parents_exist(raw, rel)? {
            return Ok(());
        }
        match w {
            Whiteout::Remove(target) => {
                if !self.created.contains(&target) && self.remove_existing(raw, &target)? {
                    self.stats.whiteouts += 1;
                }
            }
            Whiteout::Opaque(dir) => self.hide_lower(raw, &dir)?,
            Whiteout::Ignore => {}
        }
        Ok(())
    }

    /// Ownership, mode, mtime and xattrs from the entry's headers.
    fn read_meta<R: Read>(
        &self,
        raw: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<EntryMeta, Error> {
        // PAX `SCHILY.xattr.*` records (file capabilities, ACLs). Read now:
        // the data consumes the entry.
        let xattrs = pax_xattrs(entry).map_err(self.io(raw))?;
        let header = entry.header();
        Ok(EntryMeta {
            mode: header.mode().map_err(self.io(raw))? & 0o7777,
            uid: header.uid().map_err(self.io(raw))?,
            gid: header.gid().map_err(self.io(raw))?,
            mtime: header.mtime().unwrap_or(0),
            xattrs,
        })
    }

    fn write_dir(&self, raw: &Path, rel: &Path, abs: &Path, meta: &EntryMeta) -> Result<(), Error> {
        let is_dir = fs::symlink_metadata(abs)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if !is_dir {
            self.remove_existing(raw, rel)?;
            fs::create_dir(abs).map_err(self.io(raw))?;
        }
        self.set_owner_mode(raw, abs, meta.uid, meta.gid, Some(meta.mode))
    }

    fn write_file<R: Read>(
        &mut self,
        raw: &Path,
        rel: &Path,
        abs: &Path,
        meta: &EntryMeta,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), Error> {
        self.remove_existing(raw, rel)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(abs)
            .map_err(self.io(raw))?;
        let n = copy_with_holes(entry, &mut f).map_err(self.io(raw))?;
        self.stats.bytes += n;
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime);
        f.set_modified(t).map_err(self.io(raw))?;
        drop(f);
        self.set_owner_mode(raw, abs, meta.uid, meta.gid, Some(meta.mode))
    }

    /// The entry's link target; `what` names the entry kind when it has none.
    fn link_target<R: Read>(
        &self,
        raw: &Path,
        entry: &tar::Entry<'_, R>,
        what: &str,
    ) -> Result<PathBuf, Error> {
        Ok(entry
            .link_name()
            .map_err(self.io(raw))?
            .ok_or_else(|| self.refuse(raw, Refusal::UnsupportedType(format!("empty {what}"))))?
            .into_owned())
    }

    fn write_symlink<R: Read>(
        &self,
        raw: &Path,
        rel: &Path,
        abs: &Path,
        meta: &EntryMeta,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), Error> {
        let target = self.link_target(raw, entry, "symlink")?;
        check_symlink_target(rel, &target).map_err(|why| self.refuse(raw, why))?;
        self.remove_existing(raw, rel)?;
        std::os::unix::fs::symlink(&target, abs).map_err(self.io(raw))?;
        self.set_owner_mode(raw, abs, meta.uid, meta.gid, None)
    }

    /// Links `rel` to an earlier entry; `false` when the entry links to
    /// itself and nothing was written.
    fn write_hardlink<R: Read>(
        &self,
        raw: &Path,
        rel: &Path,
        abs: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<bool, Error> {
        let target = self.link_target(raw, entry, "hardlink")?;
        let to = plan_path(&target).map_err(|_| {
            self.refuse(
                raw,
                Refusal::HardlinkEscapes(target.to_string_lossy().into_owned()),
            )
        })?;
        // The target's parents must be real directories too.
        let mut prefix = PathBuf::new();
        if let Some(parent) = to.parent() {
            for c in parent.components() {
                prefix.push(c);
                if fs::symlink_metadata(self.root.join(&prefix))
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
                {
                    return Err(self.refuse(raw, Refusal::ThroughSymlink(prefix)));
                }
            }
        }
        let to_abs = self.root.join(&to);
        match fs::symlink_metadata(&to_abs) {
            Ok(m) if !m.is_dir() => {}
            _ => {
                return Err(self.refuse(
                    raw,
                    Refusal::BadHardlinkTarget(target.to_string_lossy().into_owned()),
                ));
            }
        }
        if to == rel {
            return Ok(false);
        }
        self.remove_existing(raw, rel)?;
        // linkat without AT_SYMLINK_FOLLOW: links a symlink itself,
        // never what it points at.
        fs::hard_link(&to_abs, abs).map_err(self.io(raw))?;
        Ok(true)
    }

    fn write_fifo(
        &self,
        raw: &Path,
        rel: &Path,
        abs: &Path,
        meta: &EntryMeta,
    ) -> Result<(), Error> {
        self.remove_existing(raw, rel)?;
        nix::unistd::mkfifo(abs, nix::sys::stat::Mode::from_bits_truncate(meta.mode))
            .map_err(|e| self.io(raw)(e.into()))?;
        self.set_owner_mode(raw, abs, meta.uid, meta.gid, Some(meta.mode))
    }

    /// lchown, then chmod (chown clears set-id bits, so mode goes last).
    fn set_owner_mode(
        &self,
        raw: &Path,
        abs: &Path,
        uid: u64,
        gid: u64,
        mode: Option<u32>,
    ) -> Result<(), Error> {
        let id = |v: u64| u32::try_from(v).ok();
        match std::os::unix::fs::lchown(abs, id(uid), id(gid)) {
            Ok(()) => {}
            // Unprivileged runs (unit tests) keep their own ids; the
            // template build itself runs as root.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(self.io(raw)(e)),
        }
        if let Some(mode) = mode {
            fs::set_permissions(abs, fs::Permissions::from_mode(mode)).map_err(self.io(raw))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_planned_relative_and_never_climb() {
        assert_eq!(plan_path(Path::new("./a/b")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(
            plan_path(Path::new("/etc/x")).unwrap(),
            PathBuf::from("etc/x")
        );
        assert_eq!(plan_path(Path::new("./")).unwrap(), PathBuf::new());
        assert_eq!(plan_path(Path::new("a/../b")), Err(Refusal::Traversal));
        assert_eq!(plan_path(Path::new("../../etc")), Err(Refusal::Traversal));
    }

    #[test]
    fn symlink_targets_stay_inside() {
        let ok = [
            ("usr/bin/python", "python3"),
            ("lib", "usr/lib"),
            ("etc/alt/x", "../../usr/bin/x"),
            ("bin/sh", "/usr/bin/dash"),
            ("a/b", "/"),
        ];
        for (l, t) in ok {
            assert_eq!(
                check_symlink_target(Path::new(l), Path::new(t)),
                Ok(()),
                "{l} -> {t}"
            );
        }
        let bad = [
            ("escape", "../../../../etc"),
            ("a/b", "../../x"),
            ("abs", "/../../etc/passwd"),
            ("abs", "/usr/../../etc"),
        ];
        for (l, t) in bad {
            assert!(
                matches!(
                    check_symlink_target(Path::new(l), Path::new(t)),
                    Err(Refusal::SymlinkEscapes(_))
                ),
                "{l} -> {t} accepted"
            );
        }
    }

    #[test]
    fn whiteouts_are_classified() {
        assert_eq!(
            plan_whiteout(Path::new("etc/.wh.passwd")),
            Some(Whiteout::Remove("etc/passwd".into()))
        );
        assert_eq!(
            plan_whiteout(Path::new("var/cache/.wh..wh..opq")),
            Some(Whiteout::Opaque("var/cache".into()))
        );
        assert_eq!(
            plan_whiteout(Path::new(".wh..wh..opq")),
            Some(Whiteout::Opaque("".into()))
        );
        assert_eq!(
            plan_whiteout(Path::new("a/.wh..wh.plnk")),
            Some(Whiteout::Ignore)
        );
        assert_eq!(plan_whiteout(Path::new("a/file.wh.x")), None);
        assert_eq!(plan_whiteout(Path::new("a/b")), None);
    }

    fn unbounded() -> Budget {
        Budget::new(Limits::default())
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn hdr(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = hdr(tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = hdr(tar::EntryType::Directory, 0o755);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = hdr(kind, 0o777);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// Layer order and whiteout rules on a real directory.
    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let l1 = tar_of(|b| {
            dir(b, "etc");
            file(b, "etc/keep", b"1");
            file(b, "etc/gone", b"1");
            file(b, "etc/replaced", b"old");
            dir(b, "var/cache");
            file(b, "var/cache/a", b"a");
            dir(b, "var/cache/sub");
            file(b, "var/cache/sub/b", b"b");
        });
        let l2 = tar_of(|b| {
            file(b, "etc/.wh.gone", b"");
            file(b, "etc/replaced", b"new");
            // Same-layer entry before the opaque marker survives it.
            file(b, "var/cache/new", b"n");
            file(b, "var/cache/.wh..wh..opq", b"");
            dir(b, "var/cache/sub");
            // A whiteout in a layer never hides that layer's own file.
            file(b, "etc/mine", b"m");
            file(b, "etc/.wh.mine", b"");
            // Whiteouts under a missing directory create nothing.
            file(b, "opt/none/.wh.x", b"");
            file(b, "srv/.wh..wh..opq", b"");
        });
        apply_layer(r, &l1[..], "l1", &unbounded()).unwrap();
        let stats = apply_layer(r, &l2[..], "l2", &unbounded()).unwrap();
        assert!(r.join("etc/keep").exists());
        assert!(!r.join("etc/gone").exists());
        assert_eq!(fs::read(r.join("etc/replaced")).unwrap(), b"new");
        assert!(r.join("etc/mine").exists());
        assert!(r.join("var/cache/new").exists());
        assert!(!r.join("var/cache/a").exists());
        assert!(r.join("var/cache/sub").is_dir());
        assert!(!r.join("var/cache/sub/b").exists());
        assert!(!r.join("opt").exists() && !r.join("srv").exists());
        assert_eq!(stats.whiteouts, 3);
    }

    #[test]
    fn pax_xattrs_are_kept() {
        let root = tempfile::tempdir().unwrap();
        let layer = tar_of(|b| {
            b.append_pax_extensions([
                ("SCHILY.xattr.user.wrenn", &b"yes"[..]),
                (
                    "SCHILY.xattr.security.selinux",
                    &b"system_u:object_r:bin_t"[..],
                ),
            ])
            .unwrap();
            file(b, "tool", b"x");
        });
        apply_layer(root.path(), &layer[..], "l", &unbounded()).unwrap();
        let tool = root.path().join("tool");
        let get = |n| crate::sys::xattr::get_xattr_nofollow(&tool, n).unwrap();
        assert_eq!(get("user.wrenn").as_deref(), Some(&b"yes"[..]));
        assert_eq!(get("security.selinux"), None);
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (
                {
                    // tar::Builder refuses `..` itself; write the name raw.
                    let mut h = hdr(tar::EntryType::Regular, 0o644);
                    h.set_size(1);
                    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
                    h.set_cksum();
                    let mut v = h.as_bytes().to_vec();
                    v.extend_from_slice(&[b'x'; 512]);
                    v.extend_from_slice(&[0; 1024]);
                    v
                },
                "../escape",
                "escapes the image root",
            ),
            (
                tar_of(|b| link(b, tar::EntryType::Symlink, "up", "../../../../etc")),
                "up",
                "symlink target",
            ),
            (
                tar_of(|b| {
                    link(b, tar::EntryType::Symlink, "hostetc", "/etc");
                    file(b, "hostetc/pwned", b"x");
                }),
                "hostetc/pwned",
                "through symlink",
            ),
            (
                tar_of(|b| link(b, tar::EntryType::Link, "shadow", "etc/../../etc/shadow")),
                "shadow",
                "hardlink target",
            ),
            (
                tar_of(|b| {
                    let mut h = hdr(tar::EntryType::Char, 0o600);
                    h.set_device_major(1).unwrap();
                    h.set_device_minor(1).unwrap();
                    b.append_data(&mut h, "dev/mem", &[][..]).unwrap();
                }),
                "dev/mem",
                "device nodes",
            ),
        ];
        for (layer, entry, why) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = apply_layer(root.path(), &layer[..], "sha256:bad", &unbounded()).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(entry) && text.contains(why) && text.contains("sha256:bad"),
                "{entry}: {text}"
            );
        }
    }

    fn sparse_tar(path: &str, offset: u64, data: &[u8], real_size: u64) -> Vec<u8> {
        wrenn_testkit::registry::sparse_layer(path, offset, data, real_size).unwrap()
    }

    #[test]
    fn a_sparse_entry_within_limits_is_written_with_holes() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let layer = sparse_tar("big.img", 32 << 20, &[7u8; 512], (32 << 20) + 512);
        let stats = apply_layer(root.path(), &layer[..], "l", &unbounded()).unwrap();
        let meta = fs::metadata(root.path().join("big.img")).unwrap();
        assert_eq!(meta.len(), (32 << 20) + 512);
        assert_eq!(stats.bytes, (32 << 20) + 512);
        // 32 MiB of declared zeros cost no blocks.
        assert!(meta.blocks() * 512 <= 64 << 10, "{} blocks", meta.blocks());
    }

    #[test]
    fn a_sparse_entry_declaring_more_than_the_limit_is_refused_before_writing() {
        let root = tempfile::tempdir().unwrap();
        let layer = sparse_tar("bomb", 1 << 40, b"x", (1 << 40) + 1);
        let err = apply_layer(root.path(), &layer[..], "sha256:sparse", &unbounded()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                Error::OverLimit {
                    limit: Limit::LayerBytes,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("--image-max-layer-bytes") && text.contains("\"bomb\""),
            "{text}"
        );
        assert!(!root.path().join("bomb").exists());
    }

    #[test]
    fn the_file_count_and_image_total_span_layers() {
        let limits = Limits {
            files: 3,
            ..Limits::default()
        };
        let budget = Budget::new(limits);
        let root = tempfile::tempdir().unwrap();
        let two = tar_of(|b| {
            file(b, "a", b"1");
            file(b, "b", b"1");
        });
        budget.start_layer("l1", None).unwrap();
        apply_layer(root.path(), &two[..], "l1", &budget).unwrap();
        budget.start_layer("l2", None).unwrap();
        let err = apply_layer(root.path(), &two[..], "l2", &budget).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OverLimit {
                    limit: Limit::Files,
                    value: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--image-max-files"), "{err}");

        let budget = Budget::new(Limits {
            image_bytes: 1500,
            ..Limits::default()
        });
        let kib = tar_of(|b| file(b, "k", &[1u8; 1024]));
        budget.start_layer("l1", None).unwrap();
        apply_layer(root.path(), &kib[..], "l1", &budget).unwrap_err();
    }

    #[test]
    fn a_blob_over_a_compressed_limit_is_refused_before_reading() {
        let budget = Budget::new(Limits {
            layer_compressed_bytes: 100,
            image_compressed_bytes: 150,
            ..Limits::default()
        });
        let err = budget.start_layer("l1", Some(101)).unwrap_err();
        assert!(
            err.to_string()
                .contains("--image-max-layer-compressed-bytes"),
            "{err}"
        );
        budget.start_layer("l1", Some(100)).unwrap();
        // What a layer read counts towards the image.
        let mut r = budget.meter(Side::Compressed, &[0u8; 100][..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let err = budget.start_layer("l2", Some(60)).unwrap_err();
        assert!(
            err.to_string().contains("--image-max-compressed-bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_high_ratio_stream_is_stopped_once_past_the_floor() {
        let budget = Budget::new(Limits {
            ratio: 10,
            ..Limits::default()
        });
        budget.start_layer("l", None).unwrap();
        io::copy(
            &mut budget.meter(Side::Compressed, &[0u8; 1 << 20][..]),
            &mut io::sink(),
        )
        .unwrap();
        let zeros = io::repeat(0).take(RATIO_FLOOR * 2);
        let err = io::copy(&mut budget.meter(Side::Unpacked, zeros), &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("ratio"), "{err}");
        let err = budget.or_over(Error::ReadLayer {
            layer: "l".into(),
            source: err,
        });
        assert!(
            matches!(
                err,
                Error::OverLimit {
                    limit: Limit::Ratio,
                    ..
                }
            ),
            "{err}"
        );
    }
}
