//! Start-up recovery: rebuild the supervisor's view from the journals,
//! adopt the VMMs that outlived the previous agent, settle every step a
//! crash interrupted, then remove whatever no journal accounts for.
//!
//! Per journal state:
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
//! is quarantined (see [`super::quarantine`]): not adopted, not rolled
//! back, and every resource named after its UID is kept out of the sweep
//! below, as if it were a live capsule.
//!
//! Orphans, removed and counted: capsule directories a crash left before
//! their first journal write; slot claims, namespaces, links, nftables tables and conntrack
//! entries of no known capsule (`NetOps`); disks of no known capsule
//! (`BlockStore`); cgroups (and any process in them) of no live VM; VMM
//! runtime dirs of unknown capsules; unfinished snapshot staging dirs.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::Mutex as AsyncMutex;

use super::quarantine::{Quarantined, Verdict};
use crate::capsule::supervisor::{Entry, Shared};
use crate::capsule::{Error, Record, State, Supervisor};
use crate::network::{self, Teardown};
use crate::storage;
use crate::vmm::cgroup::CgroupRoot;
use crate::vmm::{Machine, MachineState};

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

impl<M: Machine + 'static> Supervisor<M> {
    /// Runs recovery; call once, before serving.
    pub async fn recover(&self, sweep: &OrphanSweep) -> Result<RecoveryReport, Error> {
        let shared = self.shared.clone();
        let mut report = RecoveryReport::default();
        let net = shared.host.net.clone();
        tokio::task::spawn_blocking(move || net.ensure_node())
            .await
            .map_err(|_| Error::Aborted {
                what: "prepare node network",
                uid: String::new(),
            })?
            .map_err(|source| Error::Network {
                action: "prepare",
                uid: "(node)".into(),
                source: Box::new(source),
            })?;

        let uids = shared.journal.uids().map_err(|source| Error::Journal {
            uid: "(all)".into(),
            source: Box::new(source),
        })?;
        for uid in uids {
            let bytes = shared.journal.read_bytes(&uid);
            let never_written = shared.journal.never_written(&uid);
            let verdict = super::quarantine::plan_journal(
                &uid,
                bytes,
                never_written,
                crate::capsule::RECORD_VERSION,
                |r: &Record| r.uid.as_str(),
            );
            match verdict {
                Verdict::Use(rec) => shared.recover_one(rec, &mut report).await,
                Verdict::Quarantine(q) => {
                    tracing::warn!(capsule = %q.uid, reason = q.reason.as_str(), detail = %q.message, "capsule quarantined: its journal is not usable; nothing of it is touched until an admin releases it");
                    report.quarantined.push(q.clone());
                    shared.quarantine.insert(q);
                }
                Verdict::Discard => {
                    tracing::info!(capsule = %uid, "capsule directory from before its first journal write; removing it");
                    let _ = shared.journal.remove(&uid);
                    report.orphans.journals += 1;
                }
            }
        }
        shared.cfg.metrics.set_quarantined(shared.quarantine.len());

        // Live VMs and their capsules, after settling.
        let (known, live): (BTreeSet<String>, BTreeSet<String>) = {
            let mut known = BTreeSet::new();
            let mut live = BTreeSet::new();
            let entries: Vec<(String, Arc<Entry>)> = shared
                .lock_map()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (uid, e) in entries {
                let guard = e.lock.lock().await;
                if let Some(r) = guard.as_ref() {
                    if r.vm.is_some() {
                        live.insert(uid.clone());
                    }
                    known.insert(uid);
                }
            }
            // A quarantined capsule may have a VM, disk, network and
            // cgroup: all of it counts as known and live to the sweeps.
            for q in shared.quarantine.list() {
                known.insert(q.uid.clone());
                live.insert(q.uid);
            }
            (known, live)
        };
        shared
            .sweep_orphans(sweep, &known, &live, &mut report.orphans)
            .await;
        report.orphans.dirs += shared.collect_bases();
        for (kind, count) in report.orphans.by_kind() {
            shared.cfg.metrics.orphans_removed(kind, count as u64);
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
}

impl<M: Machine + 'static> Shared<M> {
    fn insert(&self, rec: &Record) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            lock: Arc::new(AsyncMutex::new(Some(rec.clone()))),
            view: std::sync::Mutex::new(rec.view(&self.backend)),
            cancel: AtomicBool::new(false),
            internal: rec.internal,
        });
        self.lock_map().insert(rec.uid.clone(), entry.clone());
        entry
    }

    async fn recover_one(self: &Arc<Self>, mut rec: Record, report: &mut RecoveryReport) {
        let uid = rec.uid.clone();
        let entry = self.insert(&rec);
        let mut guard = entry.lock.lock().await;
        // A warm template's build VM never outlives the agent that ran the
        // build: whatever it was doing, it goes, with any snapshot it was
        // writing; the next PrepareTemplate builds again.
        if rec.internal
            && let Some(id) = rec.snapshot_in_progress.take()
            && std::fs::remove_dir_all(self.layout.snapshot_staging(&id)).is_ok()
        {
            report.orphans.dirs += 1;
        }
        match rec.state {
            _ if rec.internal => {
                // Forget the handle only after adopting it: stop() must
                // signal the VMM we know to be ours, never a reused pid.
                if let Some(vm) = rec.vm.clone()
                    && self.host.machine.adopt(&vm).await.is_err()
                {
                    rec.vm = None;
                }
                match self.release(&mut rec, Teardown::ReleaseSlot, true).await {
                    Ok(()) => {
                        let _ = self.journal.remove(&uid);
                        *guard = None;
                        drop(guard);
                        self.lock_map().remove(&uid);
                        report.orphans.rolled_back += 1;
                        return;
                    }
                    Err(e) => self.fail(&entry, &mut rec, &e),
                }
            }
            State::Creating | State::Deleting => {
                // Undo it all; journal removed last, so a crash here
                // retries on the next start.
                match self.release(&mut rec, Teardown::ReleaseSlot, true).await {
                    Ok(()) => {
                        let _ = self.journal.remove(&uid);
                        *guard = None;
                        drop(guard);
                        self.lock_map().remove(&uid);
                        report.orphans.rolled_back += 1;
                        return;
                    }
                    Err(e) => self.fail(&entry, &mut rec, &e),
                }
            }
            State::Suspended => {
                if let Err(e) = self.release(&mut rec, Teardown::KeepSlot, false).await {
                    tracing::warn!(capsule = %uid, error = &e as &dyn std::error::Error, "clear a suspended capsule's runtime");
                }
                report.suspended.push(uid.clone());
            }
            State::Failed | State::Stopped => {
                let _ = self.release(&mut rec, Teardown::KeepSlot, false).await;
            }
            State::Running
            | State::Pausing
            | State::Paused
            | State::Suspending
            | State::Resuming
            | State::Snapshotting => {
                let alive = match &rec.vm {
                    Some(vm) => match self.host.machine.adopt(vm).await {
                        Ok(()) => self.host.machine.state(vm).await.ok(),
                        Err(e) => {
                            tracing::warn!(capsule = %uid, error = &e as &dyn std::error::Error, "VMM not adopted");
                            None
                        }
                    },
                    None => None,
                };
                self.settle(&entry, &mut rec, alive, report).await;
                self.reapply_egress(&rec).await;
            }
        }
        let _ = self.commit(&entry, &rec);
        if let Some(vm) = rec.vm.clone() {
            self.start_sampling(&entry, &rec);
            self.watch_vm(entry.clone(), vm);
        }
        *guard = Some(rec);
    }

    /// Settles a capsule that had (or was getting) a VM; `alive` is what
    /// the adopted VM reports, `None` when it is gone.
    async fn settle(
        &self,
        entry: &Entry,
        rec: &mut Record,
        alive: Option<MachineState>,
        report: &mut RecoveryReport,
    ) {
        let uid = rec.uid.clone();
        let prior = rec.prior.take();
        // Remove the staging dir of an interrupted snapshot.
        if let Some(id) = rec.snapshot_in_progress.take() {
            let staging = self.layout.snapshot_staging(&id);
            if std::fs::remove_dir_all(&staging).is_ok() {
                report.orphans.dirs += 1;
            }
        }
        let suspend_staging = self.layout.suspend_dir(&uid).with_extension("tmp");
        if std::fs::remove_dir_all(&suspend_staging).is_ok() {
            report.orphans.dirs += 1;
        }
        match (rec.state, alive) {
            // The image was complete: finish the suspend.
            (State::Suspending, _) if rec.suspended_image => {
                if let Err(e) = self.release(rec, Teardown::KeepSlot, false).await {
                    self.fail(entry, rec, &e);
                    return;
                }
                rec.state = State::Suspended;
                report.suspended.push(uid);
            }
            // A restore that did not finish: suspended again, retryable.
            (State::Resuming, None) => {
                let _ = self.release(rec, Teardown::KeepSlot, false).await;
                rec.state = State::Suspended;
                rec.reason = wrenn_crds::reason::Reason::ResumeInterrupted.into();
                rec.message = "the agent restarted during the resume; resume again".into();
                report.suspended.push(uid);
            }
            (_, Some(state)) => {
                let want = match rec.state {
                    State::Suspending | State::Snapshotting => prior.unwrap_or(State::Running),
                    State::Resuming => State::Running,
                    s => s,
                };
                let vm = rec.vm.clone();
                // Whatever the interrupted step froze, thaw if the capsule
                // should run.
                if want == State::Running
                    && state == MachineState::Paused
                    && let Some(vm) = &vm
                    && let Err(source) = self.host.machine.resume(vm).await
                {
                    let e = Error::Vm {
                        action: "resume",
                        uid: uid.clone(),
                        source: Box::new(source),
                    };
                    self.fail(entry, rec, &e);
                    return;
                }
                rec.state = match (want, state) {
                    (State::Pausing, MachineState::Paused) => State::Paused,
                    (State::Pausing, _) => State::Running,
                    (State::Paused, MachineState::Running) => State::Running,
                    (w, _) => w,
                };
                rec.vm_starting = false;
                report.adopted.push(uid);
            }
            (_, None) => {
                let e = Error::Vm {
                    action: "adopt",
                    uid: uid.clone(),
                    source: Box::new(crate::vmm::Error::AdoptVmm {
                        capsule: uid.clone(),
                        pid: rec.vm.as_ref().map_or(0, |v| v.process.pid),
                        reason: "the VMM exited while the agent was down".into(),
                    }),
                };
                // Forget the dead handle before stopping: stop() of a
                // handle whose pid may be reused must not signal anything.
                rec.vm = None;
                let _ = self.release(rec, Teardown::KeepSlot, false).await;
                self.fail(entry, rec, &e);
                rec.reason = wrenn_crds::reason::Reason::VmmLost.into();
                report.lost.push(uid);
            }
        }
    }

    fn fail(&self, entry: &Entry, rec: &mut Record, e: &Error) {
        tracing::error!(capsule = %rec.uid, error = e as &dyn std::error::Error, "recovery left the capsule failed");
        self.count_error(e);
        rec.state = State::Failed;
        rec.reason = e.reason().into();
        rec.message = e.chain();
        let _ = self.commit(entry, rec);
    }

    async fn sweep_orphans(
        &self,
        sweep: &OrphanSweep,
        known: &BTreeSet<String>,
        live: &BTreeSet<String>,
        report: &mut OrphanReport,
    ) {
        // Network: claims first (the sweep keeps whatever is claimed).
        let net = self.host.net.clone();
        let known_net = known.clone();
        let net_res = tokio::task::spawn_blocking(move || {
            let mut claims = 0;
            for c in net.claims() {
                if !known_net.contains(c.as_str()) {
                    match net.teardown(&c, Teardown::ReleaseSlot) {
                        Ok(()) => claims += 1,
                        Err(e) => tracing::warn!(capsule = %c, error = &e as &dyn std::error::Error, "remove an orphan network"),
                    }
                }
            }
            (claims, net.sweep())
        })
        .await;
        match net_res {
            Ok((claims, Ok(r))) => {
                report.slot_claims = claims;
                report.network = r;
            }
            Ok((claims, Err(e))) => {
                report.slot_claims = claims;
                tracing::warn!(error = &e as &dyn std::error::Error, "network sweep");
            }
            Err(_) => tracing::warn!("network sweep aborted"),
        }

        // Disks.
        let keep: Vec<storage::CapsuleId> = known
            .iter()
            .filter_map(|u| storage::CapsuleId::new(u).ok())
            .collect();
        let store = self.host.store.clone();
        match tokio::task::spawn_blocking(move || store.sweep(&keep)).await {
            Ok(Ok(r)) => report.storage = r,
            Ok(Err(e)) => tracing::warn!(error = &e as &dyn std::error::Error, "disk sweep"),
            Err(_) => tracing::warn!("disk sweep aborted"),
        }

        // cgroups of no live VM, and whatever still runs in them.
        if let Some(root) = &sweep.cgroups {
            for name in root.list().unwrap_or_default() {
                if live.contains(&name) {
                    continue;
                }
                let cg = root.open_capsule(&name);
                let pids = cg.pids().unwrap_or_default();
                for pid in &pids {
                    // In our cgroup, so ours: no pid-reuse concern.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                report.processes += pids.len();
                if remove_cgroup(&cg).await {
                    report.cgroups += 1;
                }
            }
        }

        // VMM runtime dirs of unknown capsules, unfinished snapshots.
        report.dirs += remove_children(&self.layout.vmm_root(), |n| !known.contains(n));
        // A staging dir may be a quarantined capsule's snapshot in
        // progress; with any quarantined, unfinished snapshots stay too.
        if self.quarantine.is_empty() {
            report.dirs += remove_children(&self.layout.snapshots_root(), |n| {
                n.starts_with('.') || n.ends_with(".old")
            });
        }
    }
}

/// Removes a cgroup once its killed processes are gone (rmdir fails while
/// any remains).
async fn remove_cgroup(cg: &crate::vmm::cgroup::CapsuleCgroup) -> bool {
    for _ in 0..50 {
        if cg.remove().is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(dirs = ?cg.dirs(), "orphan cgroup still busy");
    false
}

fn remove_children(dir: &Path, pick: impl Fn(&str) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if pick(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}
