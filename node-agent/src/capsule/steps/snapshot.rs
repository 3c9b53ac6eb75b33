//! A named snapshot: the VM frozen, its memory (optional) and a sparse
//! copy of its disk written to a staging dir with the metadata and the
//! guest token, swapped into place, then the VM thawed to its mode.

use super::Ctx;
use crate::capsule::files::{
    blocking, copy_disk, dir_allocated_bytes, files, remove_dir, swap_into_place, write_secret,
};
use crate::capsule::model::Error;
use crate::capsule::model::SnapshotInfo;
use crate::capsule::record::{Record, note, now_nanos, wrong};
use crate::capsule::registry::Entry;
use crate::state::Layout;
use crate::vmm::Machine;

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "snapshot_steps"))]
    pub(crate) async fn snapshot_steps(
        &self,
        entry: &Entry,
        rec: &mut Record,
        id: &str,
        memory: bool,
    ) -> Result<SnapshotInfo, Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm().cloned() else {
            return Err(wrong(&uid, rec.state(), "it has no VM"));
        };
        let dest = self.layout.snapshot_dir(id);
        let d = dest.clone();
        if blocking(&uid, "look for the snapshot", move || Ok(d.exists())).await? {
            return Err(Error::SnapshotExists { id: id.to_string() });
        }
        let prior = rec.begin_snapshot(id).map_err(|r| r.on(rec))?;
        self.commit(entry, rec).await?;
        let staging = self.layout.snapshot_staging(id);
        let written: Result<SnapshotInfo, Error> = async {
            self.freeze(rec, &vm, prior).await?;
            let mem_dir = staging.join(Layout::SNAPSHOT_MEMORY);
            let (s, m) = (staging.clone(), mem_dir.clone());
            blocking(&uid, "create the snapshot staging dir", move || {
                remove_dir(&s)?;
                std::fs::create_dir_all(&m).map_err(files("create", &m))
            })
            .await?;
            if memory {
                self.write_memory(&uid, &vm, &mem_dir).await?;
            }
            // The disk is copied while the vCPUs are stopped, so it matches
            // the memory image.
            if let Some(disk) = rec.disk_path().cloned() {
                let to = staging.join(super::sources::snapshot_disk_name(&disk));
                let u = uid.clone();
                blocking(&u, "copy disk", move || {
                    copy_disk(&disk, &to).map_err(files("copy disk to", &to))
                })
                .await?;
            }
            // A capsule restored from this memory must prove it is the
            // host to the guest inside: keep the token that memory holds.
            let token = rec.guest_token.clone().filter(|_| memory);
            let (id, staging, dest) = (id.to_string(), staging.clone(), dest.clone());
            let (capsule_uid, resources) = (uid.clone(), rec.spec.resources);
            blocking(&uid, "finish the snapshot", move || {
                let info = SnapshotInfo {
                    id,
                    capsule_uid,
                    size_bytes: dir_allocated_bytes(&staging),
                    created_unix_nanos: now_nanos(),
                    memory,
                    resources,
                };
                if let Some(token) = token {
                    let path = staging.join(Layout::SNAPSHOT_GUEST_TOKEN);
                    write_secret(&path, token.expose()).map_err(files("write", &path))?;
                }
                let meta = staging.join(Layout::SNAPSHOT_META);
                let body = serde_json::to_vec_pretty(&info).map_err(|e| Error::Files {
                    action: "encode",
                    path: meta.clone(),
                    source: std::io::Error::other(e),
                })?;
                std::fs::write(&meta, body).map_err(files("write", &meta))?;
                swap_into_place(&staging, &dest)?;
                Ok(info)
            })
            .await
        }
        .await;
        // Only this step begins snapshots, under the capsule's lock.
        let _ = rec.end_snapshot();
        if let Err(e) = &written {
            let _ = blocking(&uid, "remove the snapshot staging dir", move || {
                remove_dir(&staging)
            })
            .await;
            note(rec, e);
        }
        self.thaw(entry, rec, &vm, prior).await;
        written
    }
}

impl<M: Machine + 'static> Ctx<M> {
    /// Writes the paused VM's memory image into `dir` (suspend and named
    /// snapshots alike).
    pub(super) async fn write_memory(
        &self,
        uid: &str,
        vm: &crate::vmm::MachineHandle,
        dir: &std::path::Path,
    ) -> Result<(), Error> {
        self.host
            .machine
            .snapshot(vm, dir)
            .await
            .map_err(|source| Error::Vm {
                action: "snapshot",
                uid: uid.to_string(),
                source: Box::new(source),
            })
    }
}
