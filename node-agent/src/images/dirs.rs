//! [`ImageDirs`]: the directories the node admin lists (`--image-dir`) as
//! the only places a template may take a root disk, a kernel or a local
//! image (`oci:`, `docker-archive:`) from. Whatever a template names is a
//! [`NodeFileName`] relative to them, resolved strictly beneath each
//! directory in turn (`sys::beneath`: no symlinks, no `..`, no absolute
//! paths) and accepted only as the kind of file it must be, so a namespace
//! user cannot make the agent open `/dev/vda`, kubelet's key or another
//! capsule's disk.
//!
//! The directories are checked once, at start: each must exist and must not
//! overlap the agent's state directory (journals, capsule disks,
//! snapshots), except for [`NODE_IMAGES_SUBDIR`] inside it, which the agent
//! never writes. Only the node admin writes into image directories; a name
//! resolved here is opened again by path later (loop device, VMM), which is
//! safe because nobody else can swap what it names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use crate::sys::beneath::{FileKind, open_beneath};

/// The image directory inside the state directory that the chart uses by
/// default. The agent never writes there.
pub const NODE_IMAGES_SUBDIR: &str = "node-images";

/// Longest name accepted (the CRD allows the same).
pub const MAX_NAME_LEN: usize = 255;

/// What a name is for; it says which kind of file is acceptable and names
/// the field in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// A template's raw ext4 root disk: a regular file.
    RootDisk,
    /// A guest kernel: a regular file.
    Kernel,
    /// An OCI image layout: a directory.
    OciLayout,
    /// A `docker save` tarball: a regular file.
    DockerArchive,
}

impl Use {
    fn wants(self) -> FileKind {
        match self {
            Use::OciLayout => FileKind::Directory,
            Use::RootDisk | Use::Kernel | Use::DockerArchive => FileKind::Regular,
        }
    }
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Use::RootDisk => "root disk",
            Use::Kernel => "kernel",
            Use::OciLayout => "OCI layout",
            Use::DockerArchive => "docker archive",
        })
    }
}

/// A node file could not be named, found or accepted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is not a plain relative name.
    #[error("{what} {name:?} is not a name inside an image directory: {why}")]
    BadName {
        /// What it was for.
        what: Use,
        /// As given.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The node lists no image directories.
    #[error("{what} {name:?}: this node has no image directory (--image-dir)")]
    NoDirs {
        /// What it was for.
        what: Use,
        /// As given.
        name: String,
    },
    /// No image directory holds the name.
    #[error("{what} {name:?} is in no image directory of this node ({dirs})")]
    NotFound {
        /// What it was for.
        what: Use,
        /// As given.
        name: String,
        /// The directories searched, comma-separated.
        dirs: String,
    },
    /// The name resolves to something the agent must not open.
    #[error("{what} {name:?} in {}: {why}", dir.display())]
    Refused {
        /// What it was for.
        what: Use,
        /// As given.
        name: String,
        /// The image directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// Looking the name up failed for another reason.
    #[error("look up {what} {name:?} in {}", dir.display())]
    Lookup {
        /// What it was for.
        what: Use,
        /// As given.
        name: String,
        /// The image directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An `--image-dir` is unusable.
    #[error("image directory {}: {why}", dir.display())]
    Config {
        /// As given.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl Error {
    /// Whether the request is at fault (a bad or hostile name), as opposed
    /// to the node lacking the file.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::BadName { .. } | Error::Refused { .. })
    }
}

/// Checks `name` against the node file name rule: `/`-separated segments
/// of ASCII letters, digits and `._+-`, none empty or starting with `.`, at
/// most [`MAX_NAME_LEN`] bytes. The CRD's `NODE_FILE_NAME_PATTERN` is the
/// same rule; a test keeps them in step.
pub fn check_name(what: Use, name: &str) -> Result<(), Error> {
    let bad = |why| Error::BadName {
        what,
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 255 bytes"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(bad("it has an empty segment"));
        }
        if segment.starts_with('.') {
            return Err(bad("a segment starts with '.' ('..' and hidden files)"));
        }
        if !segment.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(
                "a segment starts with something other than a letter, digit or '_'",
            ));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
        {
            return Err(bad(
                "only letters, digits, '.', '_', '+', '-' and '/' are allowed",
            ));
        }
    }
    Ok(())
}

/// The node admin's image directories, in search order. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ImageDirs {
    dirs: Arc<[PathBuf]>,
}

impl ImageDirs {
    /// Checks `dirs` against `state_dir` (see the module docs) and keeps
    /// their canonical paths. An empty list refuses every node file.
    /// Blocking.
    pub fn new(dirs: &[PathBuf], state_dir: &Path) -> Result<Self, Error> {
        let state = state_dir
            .canonicalize()
            .or_else(|_| std::path::absolute(state_dir))
            .map_err(|e| Error::Config {
                dir: state_dir.to_path_buf(),
                why: format!("resolve the state directory: {e}"),
            })?;
        let allowed_inside = state.join(NODE_IMAGES_SUBDIR);
        let mut out = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let config = |why: String| Error::Config {
                dir: dir.clone(),
                why,
            };
            let real = dir
                .canonicalize()
                .map_err(|e| config(format!("resolve it: {e}")))?;
            if !real.is_dir() {
                return Err(config("it is not a directory".into()));
            }
            if state.starts_with(&real) {
                return Err(config(format!(
                    "it holds the agent's state directory {}; templates could name capsule disks",
                    state.display()
                )));
            }
            if real.starts_with(&state) && !real.starts_with(&allowed_inside) {
                return Err(config(format!(
                    "it is inside the agent's state directory {}; only {} may be",
                    state.display(),
                    allowed_inside.display()
                )));
            }
            out.push(real);
        }
        Ok(Self { dirs: out.into() })
    }

    /// The directories, in search order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The path of `name` in the first image directory that holds it,
    /// checked to be the kind of file `what` needs. A name that exists but
    /// is refused (symlink, device, FIFO, wrong kind) stops the search: a
    /// later directory never shadows a refusal. Blocking.
    pub fn resolve(&self, what: Use, name: &str) -> Result<PathBuf, Error> {
        check_name(what, name)?;
        if self.dirs.is_empty() {
            return Err(Error::NoDirs {
                what,
                name: name.to_string(),
            });
        }
        for dir in self.dirs.iter() {
            let refused = |why: String| Error::Refused {
                what,
                name: name.to_string(),
                dir: dir.clone(),
                why,
            };
            match open_beneath(dir, Path::new(name)) {
                Ok((_fd, kind)) if kind == what.wants() => return Ok(dir.join(name)),
                Ok((_, kind)) => {
                    return Err(refused(format!(
                        "it is {}, not {}",
                        describe(kind),
                        describe(what.wants())
                    )));
                }
                Err(Errno::ENOENT) => continue,
                Err(Errno::ELOOP) => {
                    return Err(refused(
                        "it is or passes through a symlink, which image directories never follow"
                            .into(),
                    ));
                }
                Err(Errno::EXDEV) => {
                    return Err(refused("it leads out of the image directory".into()));
                }
                Err(Errno::ENOTDIR) => {
                    return Err(refused(
                        "a segment before the last is not a directory".into(),
                    ));
                }
                Err(e) => {
                    return Err(Error::Lookup {
                        what,
                        name: name.to_string(),
                        dir: dir.clone(),
                        source: e.into(),
                    });
                }
            }
        }
        Err(Error::NotFound {
            what,
            name: name.to_string(),
            dirs: self
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

fn describe(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Regular => "a regular file",
        FileKind::Directory => "a directory",
        FileKind::BlockDevice => "a block device",
        FileKind::CharDevice => "a character device",
        FileKind::Fifo => "a FIFO",
        FileKind::Socket => "a socket",
        FileKind::Other => "a special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_relative_paths() {
        for ok in ["debian-12.ext4", "kernels/vmlinux-6.1", "a_b+c/D.E", "_x"] {
            check_name(Use::RootDisk, ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("/dev/vda", "absolute"),
            ("../capsules/x/disk", "'.'"),
            ("kernels/../../etc/shadow", "'.'"),
            ("./disk", "'.'"),
            (".hidden", "'.'"),
            ("a//b", "empty segment"),
            ("a/", "empty segment"),
            ("-rf", "letter, digit or '_'"),
            ("a b", "only letters"),
            ("a:b", "only letters"),
            ("a\0b", "only letters"),
            ("d\u{e9}j\u{e0}", "only letters"),
        ] {
            let e = check_name(Use::Kernel, bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert!(e.is_refusal());
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(check_name(Use::Kernel, &long).is_err());
    }

    /// The API server refuses with the CRD's rule what the agent refuses
    /// here (length aside: the schema's maxLength carries it).
    #[test]
    fn the_crd_rule_accepts_exactly_what_the_agent_accepts() {
        let cel = regex::Regex::new(wrenn_crds::template::NODE_FILE_NAME_PATTERN).unwrap();
        let local = regex::Regex::new(wrenn_crds::template::LOCAL_IMAGE_PATTERN).unwrap();
        for name in [
            "debian-12.ext4",
            "kernels/vmlinux-6.1",
            "a_b+c/D.E",
            "_x",
            "",
            "/dev/vda",
            "../capsules/x",
            "a/../b",
            "./d",
            ".h",
            "a//b",
            "a/",
            "-rf",
            "+x",
            "a b",
            "a:b",
            "a\0b",
            "a\\b",
            "d\u{e9}",
            "a\nb",
            "x/.y",
            "x/-y",
        ] {
            let agent = check_name(Use::RootDisk, name).is_ok();
            assert_eq!(cel.is_match(name), agent, "{name:?}");
            // A ':' after the name starts the tag, which the agent splits
            // off before checking the name.
            for prefix in ["oci:", "docker-archive:"]
                .iter()
                .filter(|_| !name.contains(':'))
            {
                assert_eq!(
                    local.is_match(&format!("{prefix}{name}")),
                    agent,
                    "{prefix}{name:?}"
                );
                assert_eq!(
                    local.is_match(&format!("{prefix}{name}:v1")),
                    agent,
                    "{prefix}{name:?}:v1"
                );
            }
        }
    }

    #[test]
    fn image_dirs_never_overlap_the_state_dir() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        for d in ["capsules/c1", "images", NODE_IMAGES_SUBDIR, "elsewhere"] {
            std::fs::create_dir_all(state.join(d)).unwrap();
        }
        std::fs::create_dir_all(root.path().join("images")).unwrap();
        let dirs = |ds: &[PathBuf]| ImageDirs::new(ds, &state);
        dirs(&[state.join(NODE_IMAGES_SUBDIR), root.path().join("images")]).unwrap();
        for bad in [
            state.clone(),
            root.path().to_path_buf(),
            state.join("capsules"),
            state.join("capsules/c1"),
            state.join("images"),
            state.join("elsewhere"),
            state.join("node-images/../capsules"),
            root.path().join("missing"),
        ] {
            let e = dirs(std::slice::from_ref(&bad)).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{}: {e}", bad.display());
        }
        // A symlink to the state dir is seen through.
        std::os::unix::fs::symlink(state.join("capsules"), root.path().join("sneaky")).unwrap();
        assert!(dirs(&[root.path().join("sneaky")]).is_err());
    }

    #[test]
    fn resolve_searches_in_order_and_refuses_without_falling_through() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(a.join("kernels")).unwrap();
        std::fs::create_dir_all(b.join("layout")).unwrap();
        std::fs::write(a.join("kernels/vmlinux"), b"k").unwrap();
        std::fs::write(b.join("kernels-only-in-b"), b"k").unwrap();
        std::fs::write(b.join("disk.ext4"), b"d").unwrap();
        std::os::unix::fs::symlink(b.join("disk.ext4"), a.join("disk.ext4")).unwrap();
        let dirs = ImageDirs::new(&[a.clone(), b.clone()], &root.path().join("state")).unwrap();
        let a = a.canonicalize().unwrap();
        let b = b.canonicalize().unwrap();
        assert_eq!(
            dirs.resolve(Use::Kernel, "kernels/vmlinux").unwrap(),
            a.join("kernels/vmlinux")
        );
        assert_eq!(
            dirs.resolve(Use::Kernel, "kernels-only-in-b").unwrap(),
            b.join("kernels-only-in-b")
        );
        assert_eq!(
            dirs.resolve(Use::OciLayout, "layout").unwrap(),
            b.join("layout")
        );
        // The symlink in `a` is refused even though `b` has a real file.
        let e = dirs.resolve(Use::RootDisk, "disk.ext4").unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains("symlink"), "{e}");
        let e = dirs.resolve(Use::RootDisk, "layout").unwrap_err();
        assert!(
            e.to_string().contains("a directory, not a regular file"),
            "{e}"
        );
        let e = dirs.resolve(Use::OciLayout, "disk.ext4").unwrap_err();
        assert!(e.is_refusal(), "{e}");
        let e = dirs.resolve(Use::RootDisk, "nothing.ext4").unwrap_err();
        assert!(
            matches!(e, Error::NotFound { .. }) && !e.is_refusal(),
            "{e}"
        );
        let none = ImageDirs::default()
            .resolve(Use::Kernel, "vmlinux")
            .unwrap_err();
        assert!(matches!(none, Error::NoDirs { .. }), "{none}");
    }
}
