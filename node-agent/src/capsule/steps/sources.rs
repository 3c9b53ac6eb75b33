//! Where a capsule's root disk and first memory come from: the read-only
//! base image its copy-on-write disk is made over (a template's rootfs, a
//! template disk built from an OCI image, or a named snapshot's disk), and
//! for a snapshot with memory, the image the VM is restored from instead of
//! booted.
//!
//! A snapshot is only ever read: its disk becomes the base of the new
//! capsule's own copy-on-write disk, and its memory is handed to
//! [`Machine::restore`], which must not write into the directory. Any
//! number of capsules can start from one snapshot, before and after its
//! source capsule is deleted.

use std::path::{Path, PathBuf};

use super::Ctx;
use crate::capsule::model::SnapshotInfo;
use crate::capsule::model::{BootSource, Error};
use crate::capsule::record::Record;
use crate::capsule::registry::Entry;
use crate::images::ImageSource;
use crate::state::Layout;
use crate::vmm::Machine;

/// The name a copy of the capsule disk at `disk` gets in a snapshot.
pub(crate) fn snapshot_disk_name(disk: &Path) -> &'static str {
    if disk.extension().is_some_and(|e| e == "qcow2") {
        Layout::SNAPSHOT_DISK_QCOW2
    } else {
        Layout::SNAPSHOT_DISK
    }
}

/// The disk file of the snapshot in `dir`, if it has one.
fn snapshot_disk(dir: &Path) -> Option<PathBuf> {
    [Layout::SNAPSHOT_DISK, Layout::SNAPSHOT_DISK_QCOW2]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

impl<M: Machine + 'static> Ctx<M> {
    /// The metadata and disk of snapshot `id`, checked to be able to start
    /// `rec` on this node.
    pub(crate) fn read_snapshot(
        &self,
        rec: &Record,
        id: &str,
    ) -> Result<(SnapshotInfo, PathBuf), Error> {
        let dir = self.layout.snapshot_dir(id);
        let meta = dir.join(Layout::SNAPSHOT_META);
        let body = match std::fs::read(&meta) {
            Ok(b) => b,
            // An absent directory and one whose write never completed
            // (no metadata) are the same to a caller: no such snapshot.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound { id: id.to_string() });
            }
            Err(source) => {
                return Err(Error::Files {
                    action: "read",
                    path: meta,
                    source,
                });
            }
        };
        let info: SnapshotInfo = serde_json::from_slice(&body).map_err(|e| Error::Files {
            action: "parse",
            path: meta.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let unusable = |why: String| Error::SnapshotUnusable {
            id: id.to_string(),
            uid: rec.uid.clone(),
            why,
        };
        let Some(disk) = snapshot_disk(&dir) else {
            return Err(unusable("it holds no disk".into()));
        };
        if disk.ends_with(Layout::SNAPSHOT_DISK_QCOW2)
            && self.host.store.backend() != crate::storage::Backend::Qcow2
        {
            return Err(unusable(format!(
                "its disk is a qcow2 overlay and this node stores disks with {}",
                self.host.store.backend()
            )));
        }
        let want = &rec.spec.resources;
        // A memory image fixes the machine's shape; a cold boot does not.
        if info.memory
            && (info.resources.vcpus != want.vcpus
                || info.resources.memory_bytes != want.memory_bytes)
        {
            return Err(unusable(format!(
                "its memory was taken with {} vCPUs and {} bytes of RAM, the spec asks for {} and {}",
                info.resources.vcpus, info.resources.memory_bytes, want.vcpus, want.memory_bytes
            )));
        }
        Ok((info, disk))
    }

    /// The guest token held in the memory of snapshot `id`; `None` for a
    /// disk-only snapshot or one taken before tokens were kept (the guest
    /// then refuses the re-key, and the create fails saying so).
    pub(crate) fn snapshot_guest_token(&self, id: &str) -> Option<crate::guest::GuestToken> {
        let path = self
            .layout
            .snapshot_dir(id)
            .join(Layout::SNAPSHOT_GUEST_TOKEN);
        std::fs::read_to_string(path)
            .ok()
            .map(|s| crate::guest::GuestToken::from_stored(&s))
    }

    /// The memory image to restore `rec` from on create: `Some` only for a
    /// snapshot source taken with memory.
    pub(crate) fn memory_image(&self, rec: &Record) -> Result<Option<PathBuf>, Error> {
        let BootSource::Snapshot { id } = &rec.spec.source else {
            return Ok(None);
        };
        let (info, _) = self.read_snapshot(rec, id)?;
        Ok(info
            .memory
            .then(|| self.layout.snapshot_dir(id).join(Layout::SNAPSHOT_MEMORY)))
    }

    /// Resolves (and, for an image, builds) the base image of `rec`'s disk
    /// and sets it in `rec`. A base resolved once is kept: a later restore
    /// must not build or look it up again. A snapshot's base is journaled
    /// here, under the lock a collection takes; any other is left to the
    /// caller's next commit, which must come before the disk is made over
    /// it: `Ok((base, true))` says that commit is owed.
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "ensure_base"))]
    pub(crate) async fn ensure_base(
        &self,
        entry: &Entry,
        rec: &mut Record,
    ) -> Result<(PathBuf, bool), Error> {
        if let Some(base) = &rec.base_image {
            return Ok((base.clone(), false));
        }
        let base = match rec.spec.source.clone() {
            BootSource::Template(t) => t.rootfs,
            BootSource::Image(image) => {
                let err = |source| Error::Image {
                    uid: rec.uid.clone(),
                    reference: image.reference.clone(),
                    source: Box::new(source),
                };
                let source = ImageSource::parse(&image.reference).map_err(err)?;
                // A pinned image the node holds needs no registry (a
                // private one was pulled with its template's credentials).
                let pull = crate::images::Pull {
                    credentials: None,
                    pinned: Some(image.digest.clone()),
                };
                let disk = self
                    .cfg
                    .templates
                    .ensure_with(&source, rec.spec.resources.disk_bytes, &pull)
                    .await
                    .map_err(err)?;
                if !image.digest.is_empty() && image.digest != disk.manifest_digest {
                    return Err(err(crate::images::Error::DigestMismatch {
                        digest: image.digest.clone(),
                        actual: disk.manifest_digest,
                    }));
                }
                disk.path
            }
            BootSource::Snapshot { id } => {
                let disk = self.read_snapshot(rec, &id)?.1;
                // Journaled before a collection may look for it.
                let _held = self.bases.lock().await;
                let base = self.pin_base(&rec.uid, &id, &disk)?;
                rec.base_image = Some(base.clone());
                self.commit(entry, rec).await?;
                return Ok((base, false));
            }
        };
        rec.base_image = Some(base.clone());
        Ok((base, true))
    }
}
