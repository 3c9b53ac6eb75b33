//! Snapshot disks that capsules are made over ("bases"), kept at a path
//! that never changes while anything depends on it.
//!
//! A capsule from a snapshot gets a copy-on-write disk over the snapshot's
//! disk, and that disk is named by absolute path: in the qcow2 overlay's
//! header, or as the dm origin. A snapshot of that capsule copies the
//! overlay, header and all, so it depends on the same path. Deleting the
//! first snapshot or the capsule must break neither, so the snapshot's disk
//! is hard-linked once into `<state>/bases/<snapshot id>.<inode>/`, every
//! disk made over it names that link, and the link goes only when no
//! capsule record and no snapshot reaches it, directly or through a chain
//! of backing files. The inode in the name keeps a snapshot id that was
//! deleted and taken again from meeting the old disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::Ctx;
use crate::capsule::model::Error;
use crate::capsule::record::Record;
use crate::state::Layout;
use crate::vmm::Machine;

/// Backing chains longer than this are not followed (a loop, or garbage).
const MAX_CHAIN: usize = 64;

impl<M: Machine + 'static> Ctx<M> {
    /// A hard link to snapshot `id`'s disk `disk` among the bases, under
    /// the same file name (the name tells the store its format). Where a
    /// link cannot be made (another filesystem) the snapshot's own path is
    /// used. Callers hold the bases lock until the record naming the
    /// link is journaled, so a collection in between cannot take it.
    pub(crate) fn pin_base(&self, uid: &str, id: &str, disk: &Path) -> Result<PathBuf, Error> {
        use std::os::unix::fs::MetadataExt as _;
        let files = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Files {
                action,
                path,
                source,
            }
        };
        let Some(name) = disk.file_name() else {
            return Ok(disk.to_path_buf());
        };
        let ino = std::fs::metadata(disk).map_err(files("stat", disk))?.ino();
        let dir = self.layout.bases_root().join(format!("{id}.{ino}"));
        let link = dir.join(name);
        std::fs::create_dir_all(&dir).map_err(files("create", &dir))?;
        match std::fs::hard_link(disk, &link) {
            Ok(()) => Ok(link),
            // Another capsule of the same snapshot, or a retried create.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(link),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let _ = std::fs::remove_dir(&dir);
                tracing::warn!(capsule = uid, disk = %disk.display(), "snapshot disk on another filesystem: used in place");
                Ok(disk.to_path_buf())
            }
            Err(e) => Err(files("link", &link)(e)),
        }
    }

    /// Removes every base that no capsule and no snapshot reaches; returns
    /// how many. Does nothing while any journal cannot be read or any
    /// capsule is quarantined: a record it cannot see (or trust) might
    /// need a base.
    pub(crate) async fn collect_bases(&self) -> usize {
        if !self.quarantine.is_empty() {
            return 0;
        }
        let _held = self.bases.lock().await;
        let root = self.layout.bases_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return 0;
        };
        let Some(used) = self.used_bases(&root) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let dir = e.path();
            if !used.contains(&dir) && std::fs::remove_dir_all(&dir).is_ok() {
                tracing::info!(base = %dir.display(), "removed a snapshot disk nothing uses any more");
                removed += 1;
            }
        }
        removed
    }

    /// The base directories reached from capsule records and snapshots;
    /// `None` when a journal is unreadable.
    pub(crate) fn used_bases(&self, root: &Path) -> Option<BTreeSet<PathBuf>> {
        let used = self
            .reached_disks()?
            .into_iter()
            .filter_map(|at| {
                let first = at.strip_prefix(root).ok()?.components().next()?;
                Some(root.join(first))
            })
            .collect();
        Some(used)
    }

    /// Every disk a capsule record or a snapshot names, and every file
    /// their backing chains reach; `None` when a journal is unreadable.
    pub(crate) fn reached_disks(&self) -> Option<Vec<PathBuf>> {
        let mut starts = Vec::new();
        for (_, rec) in self.journal.list(Record::decode).ok()? {
            let rec = rec.ok()?;
            starts.extend(rec.disk_path().cloned());
            starts.extend(rec.base_image);
        }
        // Staging directories too: a snapshot being written is as good as
        // taken.
        let snapshots = std::fs::read_dir(self.layout.snapshots_root());
        for snap in snapshots.into_iter().flatten().flatten() {
            for name in [Layout::SNAPSHOT_DISK, Layout::SNAPSHOT_DISK_QCOW2] {
                starts.push(snap.path().join(name));
            }
        }
        let mut reached = Vec::new();
        for start in starts {
            let mut at = start;
            for _ in 0..MAX_CHAIN {
                reached.push(at.clone());
                match crate::storage::qcow2::read_info(&at) {
                    Ok(info) => match info.backing_file {
                        Some(next) => at = PathBuf::from(next),
                        None => break,
                    },
                    Err(_) => break,
                }
            }
        }
        Some(reached)
    }
}

/// The image cache keeps every template disk a capsule or snapshot
/// reaches.
impl<M: Machine + 'static> crate::images::CacheUsers for Ctx<M> {
    fn in_use(&self) -> Option<Vec<PathBuf>> {
        self.reached_disks()
    }
}
