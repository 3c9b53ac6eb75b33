//! The crash watcher of a running VM: when the VMM ends on its own, the
//! capsule becomes `Stopped` (guest poweroff) or `Failed` (crash, lost),
//! its runtime is released and the slot and disk stay for the delete.

use std::sync::Arc;

use super::Ctx;
use crate::capsule::model::State;
use crate::capsule::plan::plan_vm_exit;
use crate::capsule::registry::Entry;
use crate::network::Teardown;
use crate::vmm::{Machine, MachineHandle};

impl<M: Machine + 'static> Ctx<M> {
    /// Starts the crash watcher of `vm`.
    pub(crate) fn watch_vm(self: &Arc<Self>, entry: Arc<Entry>, vm: MachineHandle) {
        let shared = self.clone();
        let uid = vm.capsule.clone();
        self.spawn("watch the VMM", &uid, async move {
            let exit = shared.host.machine.wait_exit(&vm).await;
            let mut guard = entry.lock().await;
            let Some(rec) = guard.as_mut() else { return };
            // A VM stopped or replaced by an operation is not ours to judge.
            if rec.vm() != Some(&vm) {
                return;
            }
            let Some((state, reason, message)) = plan_vm_exit(&exit) else {
                return;
            };
            tracing::warn!(capsule = %rec.uid, %message, "VMM ended");
            if state == State::Failed {
                shared.cfg.metrics.error("vmm_exit");
            }
            // Release the runtime (cgroup, namespace); the slot and disk
            // stay until the capsule is deleted.
            if let Err(e) = shared.release(rec, Teardown::KeepSlot, false).await {
                tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "release a dead VM");
            }
            rec.vm_ended(state, reason, message);
            if let Err(e) = shared.commit(&entry, rec).await {
                tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "journal a dead VM");
            }
        });
    }
}
