//! The steps that move one capsule between states, one file per
//! operation, over [`Ctx`]: the host capabilities, the settings, the
//! journal, the event bus and the background tasks. A step is handed its
//! capsule's [`Entry`] and record; it never sees the map of capsules (the
//! registry stays with `super::supervisor` and recovery), so it cannot
//! reach another capsule, and the only change it can make to the map is
//! its own capsule leaving it once gone. Every step runs under its
//! capsule's lock (taken by `super::supervisor`), journals before each side
//! effect (`commit`, or `journal_only` where the view must wait) and undoes
//! what it did when a later step fails.
//!
//! | file | operation |
//! |---|---|
//! | `create` | create (boot or restore from a snapshot), rollback |
//! | `provision` | base image, disk and network; the machine spec |
//! | `sources`, `bases` | where a disk comes from; snapshot disks kept while used |
//! | `guest` | reaching the guest agent and `Init` |
//! | `pause` | pause, resume of a paused VM, freeze/thaw |
//! | `suspend`, `restore` | suspend to the node, resume from it |
//! | `snapshot` | named snapshots |
//! | `egress` | live egress policy changes |
//! | `names` | live DNS and allowHosts changes, the guest's resolver file |
//! | `ports` | published ports: at create, live changes |
//! | `release` | undo and delete |
//! | `watch` | the crash watcher |
//! | `telemetry` | sample sources and step timings for `crate::metrics` |
//!
//! `Ctx`'s fields are private to this module; the rest of `capsule`
//! reads them through accessors and changes a capsule only through steps.

mod bases;
mod create;
mod egress;
mod guest;
mod names;
mod pause;
mod ports;
mod provision;
mod release;
mod restore;
mod snapshot;
pub(crate) mod sources;
mod suspend;
pub(crate) mod telemetry;
#[cfg(test)]
mod testing;
mod watch;

use std::sync::Arc;

use super::config::{Host, SupervisorConfig};
use super::events::{EventBus, EventKind};
use super::model::Error;
use super::record::Record;
use super::registry::Entry;
use super::tasks::Tasks;
use crate::state::{CommitStats, GroupCommit, Journal, Layout, Quarantine};
use crate::vmm::{BackendInfo, Machine};

/// What every step works with, and nothing else.
pub(crate) struct Ctx<M> {
    host: Host<M>,
    cfg: SupervisorConfig,
    layout: Layout,
    journal: Journal,
    /// The one writer of journals: batched, off the async workers.
    commits: GroupCommit,
    backend: BackendInfo,
    /// Background tasks started for capsules.
    tasks: Tasks,
    bus: EventBus,
    /// Held from linking a base until the record naming it is journaled,
    /// and while bases are collected.
    bases: tokio::sync::Mutex<()>,
    /// Capsules recovery could not read: nothing of theirs is touched.
    quarantine: Quarantine,
}

impl<M> std::fmt::Debug for Ctx<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("state_dir", &self.cfg.state_dir)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<M: Machine + 'static> Ctx<M> {
    /// The context of a supervisor with no capsules.
    pub(crate) fn new(host: Host<M>, cfg: SupervisorConfig) -> Arc<Self> {
        let backend = host.machine.info();
        let cx = Arc::new(Self {
            layout: Layout::new(&cfg.state_dir),
            journal: Journal::new(&cfg.state_dir),
            commits: GroupCommit::start(Journal::new(&cfg.state_dir)),
            bus: EventBus::starting_now(cfg.event_history),
            backend,
            host,
            cfg,
            tasks: Tasks::default(),
            bases: tokio::sync::Mutex::new(()),
            quarantine: Quarantine::default(),
        });
        // The image cache drops no template disk this supervisor's
        // capsules or snapshots reach.
        let weak = Arc::downgrade(&cx);
        let users: std::sync::Weak<dyn crate::images::CacheUsers> = weak;
        cx.cfg.templates.set_users(users);
        cx
    }
}

impl<M> Ctx<M> {
    /// The host capabilities.
    pub(crate) fn host(&self) -> &Host<M> {
        &self.host
    }

    /// The settings.
    pub(crate) fn cfg(&self) -> &SupervisorConfig {
        &self.cfg
    }

    /// The state directory's layout.
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The journal.
    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The VMM backend.
    pub(crate) fn backend(&self) -> &BackendInfo {
        &self.backend
    }

    /// Background tasks started for capsules.
    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The event bus.
    pub(crate) fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// Quarantined capsules.
    pub(crate) fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Journals `rec` (durable when this returns), then updates the view
    /// and publishes a change.
    pub(crate) async fn commit(&self, entry: &Entry, rec: &Record) -> Result<(), Error> {
        self.journal_only(rec).await?;
        self.show(entry, rec);
        Ok(())
    }

    /// Journals `rec` without showing it: for a change the view must wait
    /// for (a policy applied only after it is durable).
    pub(crate) async fn journal_only(&self, rec: &Record) -> Result<(), Error> {
        self.commits
            .write(&rec.uid, rec)
            .await
            .map_err(|source| Error::Journal {
                uid: rec.uid.clone(),
                source: Box::new(source),
            })
    }

    /// Removes `rec`'s journal and directory through the journal writer
    /// (durable when this returns).
    pub(crate) async fn remove_journal(&self, uid: &str) -> Result<(), Error> {
        self.commits
            .remove(uid)
            .await
            .map_err(|source| Error::Journal {
                uid: uid.to_string(),
                source: Box::new(source),
            })
    }

    /// Waits until the last run's journal log is replayed over the
    /// journal files: read them only after it.
    pub(crate) async fn journal_replayed(&self) -> Result<u64, Error> {
        self.commits
            .replayed()
            .await
            .map_err(|source| Error::Journal {
                uid: "(all)".into(),
                source: Box::new(source),
            })
    }

    /// What the journal writer did so far.
    pub(crate) fn commit_stats(&self) -> CommitStats {
        self.commits.stats()
    }

    /// Resolves once the journal writer thread is gone.
    pub(crate) fn journal_writer_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        self.commits.ended()
    }

    /// Updates the view (and publishes) without journaling: for states
    /// that only exist in memory and for the final view of a gone capsule.
    pub(crate) fn show(&self, entry: &Entry, rec: &Record) {
        let view = rec.view(&self.backend);
        if entry.set_view(view.clone()) && !rec.internal {
            self.bus.publish(EventKind::StateChanged, view);
        }
    }

    /// Forgets a capsule that is gone, publishing `Deleted`.
    pub(crate) fn forget(&self, entry: &Entry, rec: &Record) {
        entry.leave();
        self.cfg.metrics.remove(&rec.uid);
        if !rec.internal {
            self.bus
                .publish(EventKind::Deleted, rec.view(&self.backend));
        }
    }

    /// Runs `task` in the background, supervised: a panic is logged and
    /// counted as an `aborted` error.
    pub(crate) fn spawn(
        &self,
        what: &'static str,
        capsule: &str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let metrics = self.cfg.metrics.clone();
        self.tasks
            .spawn(what, capsule, move || metrics.error("aborted"), task);
    }
}
