//! Undo: what a record says may exist is removed, newest first (VM,
//! network, disk, runtime dir); a delete then removes the journal, or
//! leaves the capsule `Failed` with what still exists.

use super::Ctx;
use crate::capsule::files::{blocking, remove_dir};
use crate::capsule::ids::{disk_id, net_id};
use crate::capsule::model::Error;
use crate::capsule::record::{Record, note};
use crate::capsule::registry::Entry;
use crate::network::Teardown;
use crate::vmm::Machine;

impl<M: Machine + 'static> Ctx<M> {
    /// Undoes what `rec` says may exist, newest first: the VM, the network
    /// (slot kept or released), and with `remove_disk` the disk and the
    /// VMM's runtime dir. Every step is tried; the first failure is
    /// returned.
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "release"))]
    pub(crate) async fn release(
        &self,
        rec: &mut Record,
        net_mode: Teardown,
        remove_disk: bool,
    ) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let mut first: Option<Error> = None;
        if let Some(vm) = rec.vm().cloned() {
            // First, so the sampler does not count a VMM going away as
            // failed readings. The history stays until the capsule goes.
            self.cfg.metrics.detach(&uid);
            match self.host.machine.stop(&vm).await {
                Ok(()) => rec.vm_gone(),
                Err(source) => {
                    first.get_or_insert(Error::Vm {
                        action: "stop",
                        uid: uid.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
        rec.vm_start_over();
        if rec.held.net.is_some() {
            let net = self.host.net.clone();
            let u = uid.clone();
            let res = blocking(&uid, "tear down network", move || {
                let id = net_id(&u)?;
                net.teardown(&id, net_mode)
                    .map_err(|source| Error::Network {
                        action: "tear down",
                        uid: u,
                        source: Box::new(source),
                    })
            })
            .await;
            match res {
                Ok(()) if net_mode == Teardown::ReleaseSlot => rec.net_released(),
                Ok(()) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if remove_disk && rec.held.disk.is_some() {
            let store = self.host.store.clone();
            let u = uid.clone();
            let res = blocking(&uid, "remove disk", move || {
                let id = disk_id(&u)?;
                store.remove_disk(&id).map_err(|source| Error::Storage {
                    action: "remove",
                    uid: u,
                    source: Box::new(source),
                })
            })
            .await;
            match res {
                Ok(()) => rec.disk_removed(),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        // The VMM's log stays with a crashed or suspended capsule (it may
        // say why); it goes with the capsule.
        if remove_disk && rec.vm().is_none() {
            let run_dir = self.layout.run_dir(&uid);
            if let Err(e) =
                blocking(&uid, "remove the runtime dir", move || remove_dir(&run_dir)).await
            {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Removes everything of `rec` including its journal, or leaves it
    /// `Failed` (journaled, with what still exists) when an undo fails.
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "destroy"))]
    pub(crate) async fn destroy(
        &self,
        entry: &Entry,
        mut rec: Record,
    ) -> (Option<Record>, Result<(), Error>) {
        let released = self.release(&mut rec, Teardown::ReleaseSlot, true).await;
        let removed = match released {
            Ok(()) => self.remove_journal(&rec.uid).await,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {
                self.forget(entry, &rec);
                if rec.base_image.is_some() {
                    self.collect_bases().await;
                }
                (None, Ok(()))
            }
            Err(e) => {
                rec.fail();
                note(&mut rec, &e);
                if let Err(j) = self.commit(entry, &rec).await {
                    tracing::error!(capsule = %rec.uid, error = &j as &dyn std::error::Error, "journal a failed teardown");
                }
                (Some(rec), Err(e))
            }
        }
    }
}
