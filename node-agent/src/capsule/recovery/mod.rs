//! Start-up recovery: rebuild the supervisor's view from the journals,
//! adopt the VMMs that outlived the previous agent, settle every step a
//! crash interrupted, then remove whatever no journal accounts for.
//!
//! Per journal state (decided by [`plan::plan_recovery`]):
//! - `Running`/`Paused`/`Pausing` with a VM: adopt it (pid + start time,
//!   so a reused pid is refused) and read its real state; a VM that is gone
//!   leaves the capsule `Failed` (runtime released, disk kept for delete).
//! - `Suspended`: nothing runs; make sure the network is down (slot kept).
//! - `Creating`, `Deleting`: roll back everything; the operator will create
//!   again (calls are idempotent).
//! - `Suspending`: a complete image finishes the suspend; otherwise the VM
//!   goes back to its prior mode (or `Failed` if it is gone).
//! - `Resuming`: a live restored VM is adopted as `Running`; otherwise the
//!   capsule is `Suspended` again and the resume can be retried.
//! - `Snapshotting`: the staging directory is removed and the VM returns to
//!   its prior mode.
//! - A warm template's build VM (`internal`), in any state: removed with
//!   its disk, network and any snapshot it was writing.
//!
//! A capsule whose journal cannot be read, or was written by a newer agent,
//! is quarantined (see [`crate::state::quarantine`]): not adopted, not rolled
//! back, and every resource named after its UID is kept out of the sweep
//! below, as if it were a live capsule.
//!
//! Orphans, removed and counted: capsule directories a crash left before
//! their first journal write; slot claims, namespaces, links, nftables
//! tables and conntrack entries of no known capsule (`NetOps`); disks of no known capsule
//! (`BlockStore`); cgroups (and any process in them) of no live VM; VMM
//! runtime dirs of unknown capsules; unfinished snapshot staging dirs.

mod plan;
mod sweep;

use std::collections::BTreeSet;
use std::sync::Arc;

use self::plan::{Facts, Plan, observes_vm, plan_recovery};
use super::files::blocking;
use super::record::{RECORD_VERSION, Record, note};
use super::registry::{Entry, Registry};
use super::steps::Ctx;
use super::{Error, State};
use crate::network::{self, Teardown};
use crate::state::quarantine::{self, Quarantined, Verdict};
use crate::storage;
use crate::vmm::cgroup::CgroupRoot;
use crate::vmm::{Machine, MachineState};
use wrenn_crds::reason::Reason;

/// Host resources recovery sweeps besides those behind `NetOps` and
/// `BlockStore`.
#[derive(Clone, Debug, Default)]
pub struct OrphanSweep {
    /// The capsule cgroups' root (`None`: do not sweep cgroups).
    pub cgroups: Option<CgroupRoot>,
}

/// What was removed because nothing accounted for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrphanReport {
    /// Capsule directories a crash left before their first journal write.
    pub journals: usize,
    /// Capsules rolled back (interrupted create or delete).
    pub rolled_back: usize,
    /// Slot claims of unknown capsules (network torn down).
    pub slot_claims: usize,
    /// What `NetOps::sweep` removed.
    pub network: network::SweepReport,
    /// What `BlockStore::sweep` removed.
    pub storage: storage::SweepReport,
    /// cgroups removed.
    pub cgroups: usize,
    /// Processes killed inside them.
    pub processes: usize,
    /// VMM runtime and snapshot staging directories, and bases nothing
    /// uses (a delete interrupted before it collected them), removed.
    pub dirs: usize,
}

impl OrphanReport {
    /// Everything removed.
    pub fn total(&self) -> usize {
        self.by_kind().iter().map(|(_, n)| n).sum()
    }

    /// Counts by the `kind` label of `wrenn_agent_orphans_removed_total`.
    /// Every kind is listed, zero or not, so each series exists from the
    /// first scrape.
    pub fn by_kind(&self) -> [(&'static str, usize); 13] {
        [
            ("journal", self.journals),
            ("capsule", self.rolled_back),
            ("slot", self.slot_claims),
            ("netns", self.network.namespaces),
            ("link", self.network.links),
            ("nftables", self.network.tables),
            ("conntrack", self.network.conntrack),
            ("dm", self.storage.dm_devices.len()),
            ("loop", self.storage.loop_devices.len()),
            ("file", self.storage.files.len()),
            ("cgroup", self.cgroups),
            ("process", self.processes),
            ("dir", self.dirs),
        ]
    }
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Capsules whose VMM was adopted.
    pub adopted: Vec<String>,
    /// Suspended capsules restored to the view.
    pub suspended: Vec<String>,
    /// Capsules whose VM was gone (now `Failed`).
    pub lost: Vec<String>,
    /// Capsules left untouched because their journal is unusable.
    pub quarantined: Vec<Quarantined>,
    /// Orphans removed.
    pub orphans: OrphanReport,
}

/// Runs recovery on a supervisor's context, adopting capsules into
/// `registry`; once, before serving.
pub(crate) async fn recover<M: Machine + 'static>(
    shared: &Arc<Ctx<M>>,
    registry: &Registry,
    sweep: &OrphanSweep,
) -> Result<RecoveryReport, Error> {
    let mut report = RecoveryReport::default();
    let net = shared.host().net.clone();
    blocking("", "prepare node network", move || {
        net.ensure_node().map_err(|source| Error::Network {
            action: "prepare",
            uid: "(node)".into(),
            source: Box::new(source),
        })
    })
    .await?;

    shared.journal_replayed().await?;
    // Every journal read on a blocking thread, then decided one by one.
    let journal = shared.journal().clone();
    let journals = blocking("", "read the journals", move || {
        let uids = journal.uids().map_err(|source| Error::Journal {
            uid: "(all)".into(),
            source: Box::new(source),
        })?;
        Ok(uids
            .into_iter()
            .map(|uid| {
                let bytes = journal.read_bytes(&uid);
                let never_written = journal.never_written(&uid);
                (uid, bytes, never_written)
            })
            .collect::<Vec<_>>())
    })
    .await?;
    for (uid, bytes, never_written) in journals {
        let verdict = quarantine::plan_journal(
            &uid,
            bytes,
            never_written,
            RECORD_VERSION,
            Record::decode,
            |r: &Record| r.uid.as_str(),
        );
        match verdict {
            Verdict::Use(rec) => recover_one(shared, registry, rec, &mut report).await,
            Verdict::Quarantine(q) => {
                tracing::warn!(capsule = %q.uid, reason = q.reason.reason().as_str(), detail = %q.message, "capsule quarantined: its journal is not usable; nothing of it is touched until an admin releases it");
                report.quarantined.push(q.clone());
                shared.quarantine().insert(q);
            }
            Verdict::Discard => {
                tracing::info!(capsule = %uid, "capsule directory from before its first journal write; removing it");
                let _ = shared.remove_journal(&uid).await;
                report.orphans.journals += 1;
            }
        }
    }
    shared
        .cfg()
        .metrics
        .set_quarantined(shared.quarantine().len());

    // Live VMs and their capsules, after settling.
    let (known, live): (BTreeSet<String>, BTreeSet<String>) = {
        let mut known = BTreeSet::new();
        let mut live = BTreeSet::new();
        for (uid, e) in registry.entries() {
            let guard = e.lock().await;
            if let Some(r) = guard.as_ref() {
                if r.vm().is_some() {
                    live.insert(uid.clone());
                }
                known.insert(uid);
            }
        }
        // A quarantined capsule may have a VM, disk, network and
        // cgroup: all of it counts as known and live to the sweeps.
        for q in shared.quarantine().list() {
            known.insert(q.uid.clone());
            live.insert(q.uid);
        }
        (known, live)
    };
    sweep::sweep_orphans(shared, sweep, &known, &live, &mut report.orphans).await;
    report.orphans.dirs += shared.collect_bases().await;
    for (kind, count) in report.orphans.by_kind() {
        shared.cfg().metrics.orphans_removed(kind, count as u64);
    }
    tracing::info!(
        adopted = report.adopted.len(),
        suspended = report.suspended.len(),
        lost = report.lost.len(),
        quarantined = report.quarantined.len(),
        orphans = report.orphans.total(),
        "recovery done"
    );
    Ok(report)
}

/// Carries out [`plan_recovery`] for one journaled capsule.
#[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "recover"))]
async fn recover_one<M: Machine + 'static>(
    cx: &Arc<Ctx<M>>,
    registry: &Registry,
    mut rec: Record,
    report: &mut RecoveryReport,
) {
    let uid = rec.uid.clone();
    let entry = registry.adopt(&rec, rec.view(cx.backend()));
    let mut guard = entry.lock().await;
    // A snapshot being written is never finished by a restarted agent:
    // its staging directory goes (a build VM's too, with the VM).
    let observed = observes_vm(rec.state(), rec.internal);
    let mut stale = Vec::new();
    stale.extend(
        rec.take_snapshot_in_flight()
            .map(|id| cx.layout().snapshot_staging(&id)),
    );
    if observed {
        stale.push(cx.layout().suspend_dir(&uid).with_extension("tmp"));
    }
    let removed = tokio::task::spawn_blocking(move || {
        stale
            .iter()
            .filter(|d| std::fs::remove_dir_all(d).is_ok())
            .count()
    })
    .await
    .unwrap_or(0);
    report.orphans.dirs += removed;
    let vm = if observed {
        observe(cx, &rec).await
    } else {
        None
    };
    let plan = plan_recovery(&Facts {
        state: rec.state(),
        prior: rec.prior(),
        internal: rec.internal,
        suspended_image: rec.suspend_image_complete(),
        vm,
    });
    if observed {
        rec.forget_prior();
    }
    if carry_out(cx, &entry, &mut rec, plan, report).await == Outcome::Removed {
        *guard = None;
        drop(guard);
        entry.leave();
        report.orphans.rolled_back += 1;
        return;
    }
    if observed {
        cx.reapply_egress(&rec).await;
    }
    let _ = cx.commit(&entry, &rec).await;
    if let Some(vm) = rec.vm().cloned() {
        cx.start_sampling(&entry, &rec);
        cx.watch_vm(entry.clone(), vm);
    }
    *guard = Some(rec);
}

/// What became of a capsule recovery carried a plan out for.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Removed with its journal.
    Removed,
    /// Still known, in the state `rec` now says.
    Kept,
}

/// Carries out `plan` on `rec` (see [`Plan`] for what each does).
async fn carry_out<M: Machine + 'static>(
    cx: &Arc<Ctx<M>>,
    entry: &Entry,
    rec: &mut Record,
    plan: Plan,
    report: &mut RecoveryReport,
) -> Outcome {
    let uid = rec.uid.clone();
    match plan {
        Plan::Remove { adopt_first } => {
            // Forget the handle only after adopting it: stop() must
            // signal the VMM we know to be ours, never a reused pid.
            if adopt_first
                && let Some(vm) = rec.vm().cloned()
                && cx.host().machine.adopt(&vm).await.is_err()
            {
                rec.vm_gone();
            }
            // Journal removed last, so a crash here retries on the
            // next start.
            match cx.release(rec, Teardown::ReleaseSlot, true).await {
                Ok(()) => {
                    let _ = cx.remove_journal(&uid).await;
                    return Outcome::Removed;
                }
                Err(e) => fail(cx, entry, rec, &e).await,
            }
        }
        Plan::Quiesce { suspended } => {
            let released = cx.release(rec, Teardown::KeepSlot, false).await;
            if suspended {
                if let Err(e) = released {
                    tracing::warn!(capsule = %uid, error = &e as &dyn std::error::Error, "clear a suspended capsule's runtime");
                }
                report.suspended.push(uid.clone());
            }
        }
        Plan::FinishSuspend => match cx.release(rec, Teardown::KeepSlot, false).await {
            Ok(()) => {
                rec.back_to(State::Suspended);
                report.suspended.push(uid.clone());
            }
            Err(e) => fail(cx, entry, rec, &e).await,
        },
        Plan::ResumeInterrupted => {
            let _ = cx.release(rec, Teardown::KeepSlot, false).await;
            rec.back_to(State::Suspended);
            rec.explain(
                Reason::ResumeInterrupted,
                "the agent restarted during the resume; resume again",
            );
            report.suspended.push(uid.clone());
        }
        Plan::Keep { thaw, state } => {
            let thawed = match (rec.vm(), thaw) {
                (Some(vm), true) => cx.host().machine.resume(vm).await,
                _ => Ok(()),
            };
            match thawed {
                Ok(()) => {
                    rec.back_to(state);
                    rec.vm_start_over();
                    report.adopted.push(uid.clone());
                }
                Err(source) => {
                    let e = Error::Vm {
                        action: "resume",
                        uid: uid.clone(),
                        source: Box::new(source),
                    };
                    fail(cx, entry, rec, &e).await;
                }
            }
        }
        Plan::Lost => {
            let e = Error::Vm {
                action: "adopt",
                uid: uid.clone(),
                source: Box::new(crate::vmm::Error::AdoptVmm {
                    capsule: uid.clone(),
                    pid: rec.vm().map_or(0, |v| v.process.pid),
                    reason: "the VMM exited while the agent was down".into(),
                }),
            };
            // Forget the dead handle before stopping: stop() of a
            // handle whose pid may be reused must not signal anything.
            rec.vm_gone();
            let _ = cx.release(rec, Teardown::KeepSlot, false).await;
            fail(cx, entry, rec, &e).await;
            rec.reason = Some(Reason::VmmLost);
            report.lost.push(uid.clone());
        }
    }
    Outcome::Kept
}

/// Adopts the VMM `rec` names (pid and start time, so a reused pid is
/// refused) and asks its state; `None` when there is none or it is
/// gone.
async fn observe<M: Machine + 'static>(cx: &Ctx<M>, rec: &Record) -> Option<MachineState> {
    let vm = rec.vm()?;
    match cx.host().machine.adopt(vm).await {
        Ok(()) => cx.host().machine.state(vm).await.ok(),
        Err(e) => {
            tracing::warn!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "VMM not adopted");
            None
        }
    }
}

async fn fail<M: Machine + 'static>(cx: &Ctx<M>, entry: &Entry, rec: &mut Record, e: &Error) {
    tracing::error!(capsule = %rec.uid, error = e as &dyn std::error::Error, "recovery left the capsule failed");
    cx.count_error(e);
    rec.back_to(State::Failed);
    note(rec, e);
    let _ = cx.commit(entry, rec).await;
}
