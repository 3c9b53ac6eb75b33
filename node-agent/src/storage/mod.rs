//! Capsule root disks behind the `BlockStore` trait: device-mapper snapshots
//! over loop devices where the kernel has device-mapper, qcow2 overlays
//! elsewhere. Loop and dm ioctls go through `sys::block`.
//!
//! A template disk is a raw ext4 image built by `images`; it is never
//! written. Each capsule gets a copy-on-write layer over it:
//! - [`DmSnapshotStore`] (DESIGN §4): the template on one read-only loop
//!   device shared by all its capsules (refcounted, reused by backing file);
//!   per capsule a sparse CoW file at least as large as the template on its
//!   own loop device; a `snapshot` target (persistent, 8-sector chunks)
//!   named `wrenn-<capsule>` joins them. The guest sees `/dev/mapper/…`.
//! - [`Qcow2Store`]: per capsule a qcow2 file whose backing file is the
//!   template (backing format `raw`), which Cloud Hypervisor and QEMU both
//!   open. We write the qcow2 header ourselves (see [`qcow2`]).
//!
//! Every `ensure_*` call is idempotent and adopts what it finds only when
//! it matches; every side effect of a failed call is undone before it
//! returns. Journaling across agent restarts is the `state` module's job;
//! [`BlockStore::sweep`] removes whatever a crash left behind. This module
//! leaves networking, VMMs and the image build to their own modules.

mod dm;
mod fake;
pub mod loops;
pub mod qcow2;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use dm::{DmSnapshotStore, SnapshotParams, SnapshotTable};
pub use fake::{FakeBlockStore, FakeCall};
pub use qcow2::Qcow2Store;

/// A storage action failed. Each variant names the action and carries the
/// capsule, device or path a reader needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A capsule id that cannot be a file or device name.
    #[error("invalid capsule id {id:?}: {why}")]
    InvalidCapsuleId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Reading the template image failed.
    #[error("read template image {}", path.display())]
    ReadTemplate {
        /// Template path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating a capsule's copy-on-write file failed.
    #[error("create copy-on-write file {} for capsule {capsule}", path.display())]
    CreateCow {
        /// Capsule id.
        capsule: String,
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An existing disk of this capsule does not match the request; it is
    /// left alone.
    #[error("existing disk {} of capsule {capsule} does not match: {why}", path.display())]
    Mismatch {
        /// Capsule id.
        capsule: String,
        /// The disk found.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// Removing a capsule's files failed.
    #[error("remove {} of capsule {capsule}", path.display())]
    RemoveFile {
        /// Capsule id.
        capsule: String,
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading a file's allocation failed.
    #[error("stat {}", path.display())]
    Stat {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Attaching a loop device failed.
    #[error("attach loop device to {}", file.display())]
    AttachLoop {
        /// Backing file.
        file: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Detaching a loop device failed.
    #[error("detach loop device {}", device.display())]
    DetachLoop {
        /// Device node.
        device: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Listing loop devices failed.
    #[error("list loop devices under {}", sys_dir.display())]
    ListLoops {
        /// sysfs root used.
        sys_dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A device-mapper call failed.
    #[error("{action} device-mapper device {device}")]
    DeviceMapper {
        /// What we were doing (`create`, `remove`, `read table of`, …).
        action: &'static str,
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: crate::sys::block::dm::DmFailure,
    },
    /// A device-mapper table could not be parsed.
    #[error("parse device-mapper table {table:?}: {why}")]
    ParseTable {
        /// The text.
        table: String,
        /// What is wrong.
        why: String,
    },
    /// The requested backend cannot run on this host.
    #[error("storage backend {backend} is unavailable: {why}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why not.
        why: String,
    },
    /// Creating the state directory failed.
    #[error("create storage directory {}", path.display())]
    CreateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Injected by `FakeBlockStore`.
    #[error("fake failure in {0}")]
    Fake(&'static str),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A capsule id checked to be safe as a file name and a dm device name:
/// 1–64 of `[a-z0-9-]`, not starting with `-` (wrenn-go-notes §11.50).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapsuleId(String);

impl CapsuleId {
    /// Validates `id`.
    pub fn new(id: &str) -> Result<Self> {
        let bad = |why| Error::InvalidCapsuleId {
            id: id.to_string(),
            why,
        };
        if id.is_empty() || id.len() > 64 {
            return Err(bad("must be 1 to 64 characters"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("only a-z, 0-9 and '-' are allowed"));
        }
        if id.starts_with('-') {
            return Err(bad("must not start with '-'"));
        }
        Ok(Self(id.to_string()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefix of every dm device and file we create; the sweep only touches
/// names with this prefix.
pub const NAME_PREFIX: &str = "wrenn-";

/// What a capsule's disk should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRequest {
    /// Owner.
    pub capsule: CapsuleId,
    /// Raw template image (read-only from here on).
    pub template: PathBuf,
    /// Size the capsule asked for. The guest sees at least the template's
    /// size; dm-snapshot always exposes exactly the template's size (grow
    /// the template instead), qcow2 exposes the larger of the two.
    pub size_bytes: u64,
}

/// How a VMM should open the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A block device (dm-snapshot).
    Raw,
    /// A qcow2 file with a raw backing file. Cloud Hypervisor must be told
    /// `backing_files=on` to follow it.
    Qcow2,
}

/// A capsule's disk, ready to hand to a VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleDisk {
    /// Owner.
    pub capsule: CapsuleId,
    /// Device node or file the VMM opens.
    pub path: PathBuf,
    /// How to open it.
    pub format: DiskFormat,
    /// Size the guest sees.
    pub size_bytes: u64,
}

/// What a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// dm devices removed.
    pub dm_devices: Vec<String>,
    /// Loop devices detached.
    pub loop_devices: Vec<PathBuf>,
    /// Files removed.
    pub files: Vec<PathBuf>,
}

/// Capsule root disks. Calls are idempotent and keyed by capsule id.
/// Calls for different capsules may run concurrently; the caller
/// serialises calls for one capsule (its per-capsule lifecycle lock).
pub trait BlockStore: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// Makes the capsule's disk exist as requested: adopts an existing one
    /// if it matches, creates it if absent, fails with
    /// [`Error::Mismatch`] (touching nothing) if it differs. A failed call
    /// leaves nothing behind.
    fn ensure_disk(&self, req: &DiskRequest) -> Result<CapsuleDisk>;

    /// Removes the capsule's disk and everything under it. Succeeds when
    /// there is nothing to remove. The VMM must have exited first.
    fn remove_disk(&self, capsule: &CapsuleId) -> Result<()>;

    /// Bytes the capsule's copy-on-write layer occupies on the host.
    fn allocated_bytes(&self, capsule: &CapsuleId) -> Result<u64>;

    /// Removes every disk not in `keep` (startup orphan sweep).
    fn sweep(&self, keep: &[CapsuleId]) -> Result<SweepReport>;
}

/// A storage backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// device-mapper `snapshot` over loop devices.
    DmSnapshot,
    /// qcow2 overlay files.
    Qcow2,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::DmSnapshot => "dm-snapshot",
            Backend::Qcow2 => "qcow2",
        })
    }
}

/// The `--storage-backend` flag: a backend, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// dm-snapshot where device-mapper exists, else qcow2.
    #[default]
    Auto,
    /// Exactly this backend; fail at startup if it cannot run.
    Fixed(Backend),
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "dm-snapshot" => Ok(Self::Fixed(Backend::DmSnapshot)),
            "qcow2" => Ok(Self::Fixed(Backend::Qcow2)),
            other => Err(format!(
                "unknown storage backend {other:?} (auto, dm-snapshot, qcow2)"
            )),
        }
    }
}

/// Host paths storage works under; tests point them at temp dirs.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Where CoW and qcow2 files live, e.g. `/var/lib/wrenn/disks`.
    pub state_dir: PathBuf,
    /// Normally `/dev`.
    pub dev_dir: PathBuf,
    /// Normally `/sys`.
    pub sys_dir: PathBuf,
    /// Normally `/proc`.
    pub proc_dir: PathBuf,
}

impl StorageConfig {
    /// Host defaults with `state_dir` given.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            dev_dir: PathBuf::from("/dev"),
            sys_dir: PathBuf::from("/sys"),
            proc_dir: PathBuf::from("/proc"),
        }
    }

    fn loop_host(&self) -> crate::sys::block::LoopHost {
        crate::sys::block::LoopHost {
            dev_dir: self.dev_dir.clone(),
            sys_dir: self.sys_dir.clone(),
        }
    }
}

/// `Ok` if dm-snapshot can run here, else why not.
pub fn detect_device_mapper(cfg: &StorageConfig) -> std::result::Result<(), String> {
    crate::sys::block::device_mapper_available(&cfg.proc_dir, &cfg.dev_dir)
}

/// Resolves `choice` against what this host has.
pub fn plan_backend(choice: BackendChoice, dm: std::result::Result<(), String>) -> Result<Backend> {
    match (choice, dm) {
        (BackendChoice::Auto, Ok(())) => Ok(Backend::DmSnapshot),
        (BackendChoice::Auto, Err(why)) => {
            tracing::info!(%why, "device-mapper unavailable; using qcow2 overlays");
            Ok(Backend::Qcow2)
        }
        (BackendChoice::Fixed(Backend::DmSnapshot), Err(why)) => Err(Error::BackendUnavailable {
            backend: Backend::DmSnapshot,
            why,
        }),
        (BackendChoice::Fixed(b), _) => Ok(b),
    }
}

/// Opens the store `choice` resolves to on this host.
pub fn open_store(choice: BackendChoice, cfg: StorageConfig) -> Result<Box<dyn BlockStore>> {
    match plan_backend(choice, detect_device_mapper(&cfg))? {
        Backend::DmSnapshot => Ok(Box::new(DmSnapshotStore::open(cfg)?)),
        Backend::Qcow2 => Ok(Box::new(Qcow2Store::open(cfg)?)),
    }
}

fn ensure_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// The files in `state_dir` named `wrenn-<capsule>` plus one of
/// `suffixes`, of capsules not in `keep`: what a backend's sweep removes.
/// Names that are not such files are left alone.
fn orphan_files(
    state_dir: &Path,
    suffixes: &[&str],
    keep: &[CapsuleId],
) -> Result<Vec<(CapsuleId, PathBuf)>> {
    let entries = std::fs::read_dir(state_dir).map_err(|source| Error::Stat {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix(NAME_PREFIX))
            .and_then(|n| suffixes.iter().find_map(|s| n.strip_suffix(s)))
            .and_then(|n| CapsuleId::new(n).ok())
        else {
            continue;
        };
        if !keep.contains(&id) {
            out.push((id, entry.path()));
        }
    }
    Ok(out)
}

/// Bytes a file occupies on disk (`st_blocks` × 512), not its length.
pub fn file_allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|source| Error::Stat {
            path: path.to_path_buf(),
            source,
        })
}

fn template_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| Error::ReadTemplate {
            path: path.to_path_buf(),
            source,
        })
}

/// Undo steps of one call, run newest first unless the call commits.
/// Each step is named so a failed undo can be logged with what it was.
struct Rollback {
    steps: Vec<(&'static str, UndoStep)>,
}

type UndoStep = Box<dyn FnOnce() + Send>;

impl Rollback {
    fn new() -> Self {
        Self { steps: Vec::new() }
    }

    fn push(&mut self, what: &'static str, undo: impl FnOnce() + Send + 'static) {
        self.steps.push((what, Box::new(undo)));
    }

    fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            tracing::debug!(step = what, "undoing");
            undo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsule_ids_are_safe_names() {
        assert!(CapsuleId::new("abc-123").is_ok());
        for bad in ["", "../x", "a/b", "A", "-x", "a b", &"x".repeat(65)] {
            assert!(CapsuleId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn auto_picks_dm_only_when_present() {
        assert_eq!(
            plan_backend(BackendChoice::Auto, Ok(())).unwrap(),
            Backend::DmSnapshot
        );
        assert_eq!(
            plan_backend(BackendChoice::Auto, Err("none".into())).unwrap(),
            Backend::Qcow2
        );
        let err = plan_backend(
            BackendChoice::Fixed(Backend::DmSnapshot),
            Err("no dm".into()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no dm"), "{err}");
        assert_eq!(
            plan_backend(BackendChoice::Fixed(Backend::Qcow2), Ok(())).unwrap(),
            Backend::Qcow2
        );
        assert_eq!("qcow2".parse(), Ok(BackendChoice::Fixed(Backend::Qcow2)));
        assert!("zfs".parse::<BackendChoice>().is_err());
    }

    #[test]
    fn rollback_runs_newest_first_unless_committed() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let mut rb = Rollback::new();
            for i in 0..3 {
                let log = log.clone();
                rb.push("step", move || log.lock().unwrap().push(i));
            }
        }
        assert_eq!(*log.lock().unwrap(), vec![2, 1, 0]);
        let mut rb = Rollback::new();
        let l = log.clone();
        rb.push("step", move || l.lock().unwrap().push(9));
        rb.commit();
        assert_eq!(log.lock().unwrap().len(), 3);
    }

    #[test]
    fn detection_reads_proc_misc_and_dev() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("proc");
        let dev_dir = dir.path().join("dev");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::create_dir_all(dev_dir.join("mapper")).unwrap();
        std::fs::write(proc_dir.join("misc"), "237 loop-control\n").unwrap();
        let cfg = StorageConfig {
            state_dir: dir.path().join("s"),
            dev_dir: dev_dir.clone(),
            sys_dir: dir.path().join("sys"),
            proc_dir: proc_dir.clone(),
        };
        let why = detect_device_mapper(&cfg).unwrap_err();
        assert!(why.contains("no device-mapper"), "{why}");
        std::fs::write(
            proc_dir.join("misc"),
            "237 loop-control\n236 device-mapper\n",
        )
        .unwrap();
        let why = detect_device_mapper(&cfg).unwrap_err();
        assert!(why.contains("control node"), "{why}");
        std::fs::write(dev_dir.join("mapper/control"), "").unwrap();
        assert_eq!(detect_device_mapper(&cfg), Ok(()));
    }
}
