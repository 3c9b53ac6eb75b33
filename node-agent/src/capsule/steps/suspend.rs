//! Suspend: the VM's memory written to a fresh staging dir, swapped into
//! place, journaled complete, and only then the VMM released with its RAM.
//! A failed write thaws the VM back to the mode it was in.

use super::Ctx;
use crate::capsule::files::{blocking, files, remove_dir, swap_into_place};
use crate::capsule::model::{Error, State};
use crate::capsule::record::{Record, note, wrong};
use crate::capsule::registry::Entry;
use crate::network::Teardown;
use crate::vmm::Machine;

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "suspend_steps"))]
    pub(crate) async fn suspend_steps(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm().cloned() else {
            return Err(wrong(&uid, rec.state(), "it has no VM"));
        };
        let prior = rec.begin_suspend().map_err(|r| r.on(rec))?;
        self.commit(entry, rec).await?;
        let final_dir = self.layout.suspend_dir(&uid);
        let staging = final_dir.with_extension("tmp");
        let written: Result<(), Error> = async {
            self.freeze(rec, &vm, prior).await?;
            // A fresh directory every time: CH refuses to overwrite files,
            // and may still hold the previous image open (§11 #11).
            let dir = staging.clone();
            blocking(&uid, "create the suspend dir", move || {
                remove_dir(&dir)?;
                std::fs::create_dir_all(&dir).map_err(files("create", &dir))
            })
            .await?;
            self.write_memory(&uid, &vm, &staging).await?;
            let (from, to) = (staging.clone(), final_dir.clone());
            // fsyncs of the whole image and renames.
            blocking(&uid, "put the suspend image in place", move || {
                swap_into_place(&from, &to)
            })
            .await
        }
        .await;
        if let Err(e) = written {
            let dir = staging.clone();
            let _ = blocking(&uid, "remove the suspend staging dir", move || {
                remove_dir(&dir)
            })
            .await;
            note(rec, &e);
            self.thaw(entry, rec, &vm, prior).await;
            return Err(e);
        }
        rec.suspend_image_written().map_err(|r| r.on(rec))?;
        self.commit(entry, rec).await?;
        // The image is safe: the VMM can go, and with it the RAM.
        if let Err(e) = self.release(rec, Teardown::KeepSlot, false).await {
            rec.fail();
            note(rec, &e);
            self.commit(entry, rec).await?;
            return Err(e);
        }
        rec.settle(State::Suspended);
        self.commit(entry, rec).await
    }
}
