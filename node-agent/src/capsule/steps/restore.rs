//! Resume of a suspended capsule: disk and network made again, the VM
//! restored from its suspend image and its guest re-initialised. A failure
//! leaves it `Suspended` with the image untouched, so the resume can be
//! retried.

use std::path::Path;
use std::sync::Arc;

use super::Ctx;
use crate::capsule::files::files;
use crate::capsule::model::{Error, State};
use crate::capsule::record::{Record, note, now_nanos};
use crate::capsule::registry::Entry;
use crate::guest::GuestToken;
use crate::metrics::Step;
use crate::network::Teardown;
use crate::vmm::{Machine, MachineHandle};

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "restore_steps"))]
    pub(crate) async fn restore_steps(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        rec: &mut Record,
    ) -> Result<(), Error> {
        let uid = rec.uid.clone();
        // Its own suspend image holds its own token; a record from before
        // tokens gets one now, journaled before the guest is re-keyed.
        let held = rec.guest_token.clone();
        if rec.guest_token.is_none() {
            rec.guest_token = Some(
                GuestToken::generate()
                    .map_err(files("read a guest token from", Path::new("/dev/urandom")))?,
            );
        }
        rec.begin_resume().map_err(|r| r.on(rec))?;
        self.commit(entry, rec).await?;
        let res: Result<MachineHandle, Error> = async {
            let (disk, net) = self.ensure_disk_and_net(entry, rec).await?;
            rec.vm_starting().map_err(|r| r.on(rec))?;
            self.commit(entry, rec).await?;
            let spec = self.machine_spec(rec, &net, &disk);
            self.timed(Step::Restore, async {
                let vm = self
                    .host
                    .machine
                    .restore(&spec, &self.layout.suspend_dir(&uid))
                    .await
                    .map_err(|source| Error::Vm {
                        action: "restore",
                        uid: uid.clone(),
                        source: Box::new(source),
                    })?;
                // The VMM reset vsock: the guest is reached and
                // re-initialised (clock, entropy) before the capsule counts
                // as running again.
                if let Err(e) = self.guest_up(rec, &vm, held.as_ref()).await {
                    if let Err(stop) = self.host.machine.stop(&vm).await {
                        tracing::error!(capsule = %uid, error = &stop as &dyn std::error::Error, "stop a restored VM whose guest did not answer");
                    }
                    return Err(e);
                }
                Ok(vm)
            })
            .await
        }
        .await;
        match res {
            Ok(vm) => {
                rec.restored(vm.clone(), now_nanos())
                    .map_err(|r| r.on(rec))?;
                // Init wrote the resolver file.
                rec.resolver_stale = false;
                self.commit(entry, rec).await?;
                self.start_sampling(entry, rec);
                self.watch_vm(entry.clone(), vm);
                Ok(())
            }
            Err(e) => {
                // Back to Suspended, retryable: the image is untouched and
                // the slot still ours (§11 #19, #26).
                if let Err(u) = self.release(rec, Teardown::KeepSlot, false).await {
                    tracing::error!(capsule = %uid, error = &u as &dyn std::error::Error, "undo a failed restore");
                }
                rec.back_to(State::Suspended);
                note(rec, &e);
                self.commit(entry, rec).await?;
                Err(e)
            }
        }
    }
}
