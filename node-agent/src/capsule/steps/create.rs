//! Create: disk and network (journaled before each is made), then the VM
//! booted or restored from a snapshot's memory, then the guest reached and
//! sent `Init`. A failure or a delete meanwhile rolls everything back; a
//! capsule asked to start paused or suspended gets there from running.

use std::sync::Arc;

use super::Ctx;
use super::telemetry::outcome;
use crate::capsule::model::{BootSource, CapsuleView, Error, State};
use crate::capsule::record::{Record, now_nanos};
use crate::capsule::registry::Entry;
use crate::metrics::{Outcome, Step};
use crate::vmm::Machine;

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "create_steps"))]
    pub(crate) async fn create_steps(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        mut rec: Record,
        initial: State,
    ) -> (Option<Record>, Result<CapsuleView, Error>) {
        let uid = rec.uid.clone();
        let timer = self.cfg.metrics.start_step(Step::Create);
        let res: Result<(), Error> = async {
            // A template base is resolved without side effects, so the
            // record's first durable write can wait for the claims; an
            // image pull or a snapshot pin happens under a record already
            // journaled.
            if matches!(rec.spec.source, BootSource::Template(_)) {
                self.show(entry, &rec);
            } else {
                self.commit(entry, &rec).await?;
            }
            // The VM's start is journaled with the disk and network claims:
            // recovery removes a `Creating` capsule whole, whichever of the
            // three it finds made, so a separate write before the launch
            // would only add a wait.
            rec.vm_starting().map_err(|r| r.on(&rec))?;
            let (disk, net) = self.ensure_disk_and_net(entry, &mut rec).await?;
            if entry.cancelled() {
                return Err(Error::Cancelled { uid: uid.clone() });
            }
            self.show(entry, &rec);
            let spec = self.machine_spec(&rec, &net, &disk);
            self.timed(Step::Boot, async {
                // A snapshot with memory is restored (the guest resumes where
                // it was; guest_up below re-initialises it); anything else boots.
                // A restored guest holds the snapshot's token; a booted one
                // none yet.
                let (action, started, held) = match self.memory_image(&rec)? {
                    Some(image) => {
                        let held = match &rec.spec.source {
                            BootSource::Snapshot { id } => self.snapshot_guest_token(id),
                            _ => None,
                        };
                        let vm = self.host.machine.restore(&spec, &image).await;
                        ("restore", vm, held)
                    }
                    None => ("launch", self.host.machine.launch(&spec).await, None),
                };
                let vm = started.map_err(|source| Error::Vm {
                    action,
                    uid: uid.clone(),
                    source: Box::new(source),
                })?;
                rec.vm_started(vm.clone()).map_err(|r| r.on(&rec))?;
                self.commit(entry, &rec).await?;
                self.guest_up(&rec, &vm, held.as_ref()).await
            })
            .await?;
            if entry.cancelled() {
                return Err(Error::Cancelled { uid: uid.clone() });
            }
            rec.running_since(now_nanos());
            self.commit(entry, &rec).await?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            if !matches!(e, Error::Cancelled { .. }) {
                tracing::error!(capsule = %uid, error = &e as &dyn std::error::Error, "create failed; rolling back");
            }
            rec.begin_delete();
            self.show(entry, &rec);
            let (rec, undo) = self.destroy(entry, rec).await;
            if let Err(u) = undo {
                tracing::error!(capsule = %uid, error = &u as &dyn std::error::Error, "roll back a failed create");
            }
            // Timed after the rollback: what the caller waited for.
            let res = Err(e);
            timer.finish(outcome(&res));
            return (rec, res);
        }
        timer.finish(Outcome::Ok);
        if let Some(vm) = rec.vm().cloned() {
            self.start_sampling(entry, &rec);
            self.watch_vm(entry.clone(), vm);
        }
        let res = match initial {
            State::Paused => {
                self.timed(Step::Pause, self.pause_steps(entry, &mut rec))
                    .await
            }
            State::Suspended => {
                self.timed(Step::Suspend, self.suspend_steps(entry, &mut rec))
                    .await
            }
            _ => Ok(()),
        };
        let view = entry.view();
        (Some(rec), res.map(|()| view))
    }
}
