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

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
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

/// Applies one layer (an uncompressed tar stream) onto `root`.
/// `layer` names it in errors (its digest).
pub fn apply_layer(root: &Path, tar: impl Read, layer: &str) -> Result<LayerStats, Error> {
    let mut applier = Applier {
        root,
        layer,
        created: HashSet::new(),
        stats: LayerStats::default(),
    };
    let mut archive = tar::Archive::new(tar);
    let entries = archive.entries().map_err(|source| Error::ReadLayer {
        layer: layer.to_string(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::ReadLayer {
            layer: layer.to_string(),
            source,
        })?;
        applier.apply(entry)?;
    }
    Ok(applier.stats)
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

struct Applier<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Paths this layer created or replaced: its own whiteouts spare them.
    created: HashSet<PathBuf>,
    stats: LayerStats,
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
        if rel.as_os_str().is_empty() {
            // The root itself: nothing to create.
            return Ok(());
        }
        if let Some(w) = plan_whiteout(&rel) {
            // A whiteout under a directory that does not exist hides
            // nothing, and must not create it.
            if !self.parents_exist(&raw, &rel)? {
                return Ok(());
            }
            match w {
                Whiteout::Remove(target) => {
                    if !self.created.contains(&target) && self.remove_existing(&raw, &target)? {
                        self.stats.whiteouts += 1;
                    }
                }
                Whiteout::Opaque(dir) => self.hide_lower(&raw, &dir)?,
                Whiteout::Ignore => {}
            }
            return Ok(());
        }
        self.ensure_parents(&raw, &rel)?;

        // PAX `SCHILY.xattr.*` records (file capabilities, ACLs). Read now:
        // the data below consumes the entry.
        let xattrs = pax_xattrs(&mut entry).map_err(self.io(&raw))?;
        let header = entry.header();
        let mode = header.mode().map_err(self.io(&raw))? & 0o7777;
        let uid = header.uid().map_err(self.io(&raw))?;
        let gid = header.gid().map_err(self.io(&raw))?;
        let mtime = header.mtime().unwrap_or(0);
        let abs = self.root.join(&rel);

        match kind {
            T::Directory => {
                let is_dir = fs::symlink_metadata(&abs)
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                if !is_dir {
                    self.remove_existing(&raw, &rel)?;
                    fs::create_dir(&abs).map_err(self.io(&raw))?;
                }
                self.set_owner_mode(&raw, &abs, uid, gid, Some(mode))?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.remove_existing(&raw, &rel)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(self.io(&raw))?;
                let n = io::copy(&mut entry, &mut f).map_err(self.io(&raw))?;
                self.stats.bytes += n;
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                f.set_modified(t).map_err(self.io(&raw))?;
                drop(f);
                self.set_owner_mode(&raw, &abs, uid, gid, Some(mode))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(self.io(&raw))?
                    .ok_or_else(|| {
                        self.refuse(&raw, Refusal::UnsupportedType("empty symlink".into()))
                    })?
                    .into_owned();
                check_symlink_target(&rel, &target).map_err(|why| self.refuse(&raw, why))?;
                self.remove_existing(&raw, &rel)?;
                std::os::unix::fs::symlink(&target, &abs).map_err(self.io(&raw))?;
                self.set_owner_mode(&raw, &abs, uid, gid, None)?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(self.io(&raw))?
                    .ok_or_else(|| {
                        self.refuse(&raw, Refusal::UnsupportedType("empty hardlink".into()))
                    })?
                    .into_owned();
                let to = plan_path(&target).map_err(|_| {
                    self.refuse(
                        &raw,
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
                            return Err(self.refuse(&raw, Refusal::ThroughSymlink(prefix)));
                        }
                    }
                }
                let to_abs = self.root.join(&to);
                match fs::symlink_metadata(&to_abs) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(self.refuse(
                            &raw,
                            Refusal::BadHardlinkTarget(target.to_string_lossy().into_owned()),
                        ));
                    }
                }
                if to == rel {
                    return Ok(());
                }
                self.remove_existing(&raw, &rel)?;
                // linkat without AT_SYMLINK_FOLLOW: links a symlink itself,
                // never what it points at.
                fs::hard_link(&to_abs, &abs).map_err(self.io(&raw))?;
            }
            T::Fifo => {
                self.remove_existing(&raw, &rel)?;
                nix::unistd::mkfifo(&abs, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| self.io(&raw)(e.into()))?;
                self.set_owner_mode(&raw, &abs, uid, gid, Some(mode))?;
            }
            T::Char | T::Block => return Err(self.refuse(&raw, Refusal::Device)),
            other => {
                return Err(self.refuse(&raw, Refusal::UnsupportedType(format!("{other:?}"))));
            }
        }
        if kind != T::Link {
            // Last: chown clears security.capability.
            for (name, value) in &xattrs {
                crate::sys::block::set_xattr_nofollow(&abs, name, value).map_err(self.io(&raw))?;
            }
        }
        self.created.insert(rel);
        self.stats.entries += 1;
        Ok(())
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
        apply_layer(r, &l1[..], "l1").unwrap();
        let stats = apply_layer(r, &l2[..], "l2").unwrap();
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
        apply_layer(root.path(), &layer[..], "l").unwrap();
        let tool = root.path().join("tool");
        let get = |n| crate::sys::block::get_xattr_nofollow(&tool, n).unwrap();
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
            let err = apply_layer(root.path(), &layer[..], "sha256:bad").unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(entry) && text.contains(why) && text.contains("sha256:bad"),
                "{entry}: {text}"
            );
        }
    }
}
