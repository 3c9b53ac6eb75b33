//! Pause and resume of a paused capsule (vCPUs stopped, memory kept), and
//! the freeze/thaw pair a suspend or snapshot wraps its writes in.

use super::Ctx;
use crate::capsule::model::{Error, State};
use crate::capsule::record::{Record, note, wrong};
use crate::capsule::registry::Entry;
use crate::vmm::{Machine, MachineHandle};

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "pause_steps"))]
    pub(crate) async fn pause_steps(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm().cloned() else {
            return Err(wrong(&uid, rec.state(), "it has no VM"));
        };
        rec.begin_pause();
        self.show(entry, rec);
        match self.host.machine.pause(&vm).await {
            Ok(()) => {
                rec.settle(State::Paused);
                self.commit(entry, rec).await
            }
            Err(source) => {
                let e = Error::Vm {
                    action: "pause",
                    uid,
                    source: Box::new(source),
                };
                // A pause that timed out may still have frozen the vCPUs:
                // thaw them, or the capsule is a frozen zombie that says
                // "running" (wrenn-go-notes §11 #18).
                let thawed = match self.host.machine.state(&vm).await {
                    Ok(crate::vmm::MachineState::Paused) => {
                        self.host.machine.resume(&vm).await.is_ok()
                    }
                    Ok(crate::vmm::MachineState::Running) => true,
                    _ => false,
                };
                rec.back_to(if thawed {
                    State::Running
                } else {
                    State::Failed
                });
                note(rec, &e);
                self.commit(entry, rec).await?;
                Err(e)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "resume_paused"))]
    pub(crate) async fn resume_paused(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm().cloned() else {
            return Err(wrong(&uid, rec.state(), "it has no VM"));
        };
        match self.host.machine.resume(&vm).await {
            Ok(()) => {
                rec.settle(State::Running);
                self.catch_up_resolver(rec).await;
                self.commit(entry, rec).await
            }
            Err(source) => {
                // Still paused, and the call can be retried.
                let e = Error::Vm {
                    action: "resume",
                    uid,
                    source: Box::new(source),
                };
                note(rec, &e);
                self.commit(entry, rec).await?;
                Err(e)
            }
        }
    }

    /// Pauses if running; the caller goes back to `prior` on failure.
    pub(crate) async fn freeze(
        &self,
        rec: &Record,
        vm: &MachineHandle,
        prior: State,
    ) -> Result<(), Error> {
        if prior == State::Running {
            self.host
                .machine
                .pause(vm)
                .await
                .map_err(|source| Error::Vm {
                    action: "pause",
                    uid: rec.uid.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Returns a VM frozen by [`freeze`] to `prior`; `Failed` if it will
    /// not thaw.
    pub(crate) async fn thaw(
        &self,
        entry: &Entry,
        rec: &mut Record,
        vm: &MachineHandle,
        prior: State,
    ) {
        rec.back_to(prior);
        if prior == State::Running
            && let Err(source) = self.host.machine.resume(vm).await
        {
            let e = Error::Vm {
                action: "resume",
                uid: rec.uid.clone(),
                source: Box::new(source),
            };
            rec.fail();
            note(rec, &e);
        }
        if let Err(e) = self.commit(entry, rec).await {
            tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "journal after undo");
        }
    }
}
