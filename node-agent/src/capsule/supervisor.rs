//! [`Supervisor`]: the public API of the node's capsules. Each operation
//! checks the request, takes the capsule's lock and runs its steps
//! (`super::steps`), which write the journal before each side effect and
//! undo what they did when a later step fails.
//!
//! Each operation runs in a task of its own: a gRPC caller that goes away
//! mid-create must not leave a half-made capsule behind, so the caller only
//! awaits the task's result.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::api::{ApiFuture, CapsuleApi, EventStream};
use super::config::{Host, SupervisorConfig};
use super::files::{blocking, remove_dir};
use super::ids::{disk_id, net_id};
use super::model::{CapsuleSpec, CapsuleView, Egress, Error, PortRule, SnapshotInfo, State};
use super::plan::{Decision, Op, plan_op};
use super::record::{Record, wrong};
use super::registry::{Claim, Entry, Registry};
use super::steps::Ctx;
use super::templates::{AgentGuest, BuildSettings, BuildVms, Builds, VmFuture};
use crate::guest::GuestToken;
use crate::metrics::{Metrics, Outcome, Step};
use crate::state::Layout;
use crate::vmm::{BackendInfo, Machine};

/// The node's capsules.
pub struct Supervisor<M> {
    cx: Arc<Ctx<M>>,
    /// The capsules: only the supervisor and recovery see the map.
    registry: Registry,
    /// Templates prepared ahead of time (`PrepareTemplate`).
    builds: Arc<Builds>,
}

impl<M> std::fmt::Debug for Supervisor<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.cx.fmt(f)
    }
}

impl<M> Clone for Supervisor<M> {
    fn clone(&self) -> Self {
        Self {
            cx: self.cx.clone(),
            registry: self.registry.clone(),
            builds: self.builds.clone(),
        }
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// A supervisor with no capsules. Call
    /// [`recover`](Supervisor::recover) before serving.
    pub fn new(host: Host<M>, cfg: SupervisorConfig) -> Self {
        let guest = cfg.build_guest.clone().unwrap_or_else(|| {
            let g = cfg.guest.unwrap_or_default();
            Arc::new(AgentGuest {
                port: g.port,
                timeouts: g.timeouts,
            })
        });
        let builds = Arc::new(Builds::new(BuildSettings {
            state_dir: cfg.state_dir.clone(),
            warm_builds: cfg.warm_builds,
            images: cfg.templates.clone(),
            metrics: cfg.metrics.clone(),
            probe_every: cfg.warm_probe_every,
            guest,
        }));
        Self {
            cx: Ctx::new(host, cfg),
            registry: Registry::default(),
            builds,
        }
    }

    /// The steps' context.
    #[cfg(test)]
    pub(crate) fn ctx(&self) -> &Arc<Ctx<M>> {
        &self.cx
    }

    /// Runs recovery (see `capsule::recovery`); call once, before serving.
    pub async fn recover(
        &self,
        sweep: &super::OrphanSweep,
    ) -> Result<super::RecoveryReport, Error> {
        super::recovery::recover(&self.cx, &self.registry, sweep).await
    }

    /// Answers where the template of `req` stands, starting its build when
    /// none ran or the last one failed (see `capsule::templates`).
    pub async fn prepare_template(
        &self,
        req: super::PrepareRequest,
    ) -> Result<super::TemplateStatus, Error> {
        let key = req.key.clone();
        let (status, build) = self.builds.prepare(Arc::new(self.clone()), req)?;
        if let Some(build) = build {
            self.cx.spawn("build a template", &key, build);
        }
        Ok(status)
    }

    /// Templates ready on this node: key → digest.
    pub fn templates(&self) -> BTreeMap<String, String> {
        self.builds.ready()
    }

    /// The sequence number of the latest event (tests start watches there).
    #[cfg(test)]
    pub(crate) fn events_head(&self) -> u64 {
        self.cx.bus().head()
    }

    /// The layout of the state directory.
    pub fn layout(&self) -> &Layout {
        self.cx.layout()
    }

    /// Where capsule histories and step durations are recorded.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.cx.cfg().metrics
    }

    /// Resolves once the journal's writer thread is gone (see
    /// `state::GroupCommit::ended`): the agent watches it as one of its
    /// background tasks.
    pub fn journal_writer_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        self.cx.journal_writer_ended()
    }

    /// Publishes the names capsules' resolvers refused as `NameRefused`
    /// events (for the operator's Events); the agent watches it as one of
    /// its background tasks. Never resolves while the network lives; pends
    /// when the network has no resolvers.
    pub fn report_name_refusals(&self) -> impl Future<Output = ()> + Send + 'static {
        let (cx, registry) = (self.cx.clone(), self.registry.clone());
        let reports = cx.host().net.take_name_refusals();
        async move {
            let Some(mut reports) = reports else {
                return std::future::pending().await;
            };
            while let Some(r) = reports.recv().await {
                // A report outliving its capsule (or a build VM's) is dropped.
                if let Some(e) = registry.get(r.capsule.as_str(), false) {
                    cx.bus().publish_refusal(e.view(), r);
                }
            }
        }
    }

    /// Ends every event watch and stops every background task (crash
    /// watchers). Capsules keep running: this is what an agent exit does to
    /// the supervisor.
    pub fn shutdown(&self) {
        self.cx.bus().close();
        self.cx.tasks().abort_all();
    }

    /// The entry of `uid`, if it is a user capsule (`internal: false`) or
    /// a build VM (`internal: true`).
    pub(crate) fn entry(&self, uid: &str, internal: bool) -> Option<Arc<Entry>> {
        self.registry.get(uid, internal)
    }

    /// Runs `op` on `uid`'s record under its lock, in a task of its own.
    /// `internal` picks build VMs instead of user capsules.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        uid: &str,
        what: &'static str,
        internal: bool,
        op: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Ctx<M>>, Arc<Entry>, Record) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = (Option<Record>, Result<T, Error>)> + Send,
    {
        let entry = self.entry(uid, internal).ok_or_else(|| Error::NotFound {
            uid: uid.to_string(),
        })?;
        let shared = self.cx.clone();
        let owned_uid = uid.to_string();
        let task = tokio::spawn(async move {
            let mut guard = entry.lock().await;
            let Some(rec) = guard.take() else {
                return Err(Error::NotFound { uid: owned_uid });
            };
            let (rec, result) = op(shared.clone(), entry.clone(), rec).await;
            *guard = rec;
            if let Err(e) = &result {
                shared.count_error(e);
            }
            result
        });
        task.await.map_err(|_| Error::Aborted {
            what,
            uid: uid.to_string(),
        })?
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// Creates `uid`, or returns it when it exists with an equal spec.
    pub async fn create(
        &self,
        uid: &str,
        spec: CapsuleSpec,
        initial: State,
    ) -> Result<CapsuleView, Error> {
        self.create_with(uid, spec, initial, false).await
    }

    /// [`create`](Self::create) of a user capsule or (`internal`) of a
    /// warm template's build VM.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "create_with"))]
    pub(crate) async fn create_with(
        &self,
        uid: &str,
        spec: CapsuleSpec,
        initial: State,
        internal: bool,
    ) -> Result<CapsuleView, Error> {
        if !matches!(initial, State::Running | State::Paused | State::Suspended) {
            return Err(Error::InvalidSpec {
                reason: format!("a capsule cannot start {initial}"),
            });
        }
        net_id(uid)?;
        disk_id(uid)?;
        self.refuse_quarantined(uid)?;
        let token = GuestToken::generate().map_err(|source| Error::Files {
            action: "read a guest token from",
            path: "/dev/urandom".into(),
            source,
        })?;
        let shared = self.cx.clone();
        let mut shown = Record::new(uid, &spec);
        shown.internal = internal;
        let (entry, guard) = match self
            .registry
            .claim(uid, shown.view(shared.backend()), internal)
        {
            Claim::New(entry, guard) => (entry, guard),
            Claim::Exists(e) => {
                let view = e.view();
                if e.internal() != internal {
                    return Err(Error::AlreadyExists {
                        uid: uid.to_string(),
                        field: "owner",
                    });
                }
                return match view.spec.first_difference(&spec) {
                    None => Ok(view),
                    Some(field) => Err(Error::AlreadyExists {
                        uid: uid.to_string(),
                        field,
                    }),
                };
            }
            Claim::Busy => {
                return Err(Error::Aborted {
                    what: "create",
                    uid: uid.to_string(),
                });
            }
        };
        let owned_uid = uid.to_string();
        let task = tokio::spawn(async move {
            let mut guard = guard;
            let mut rec = Record::new(&owned_uid, &spec);
            rec.internal = internal;
            rec.guest_token = Some(token);
            let (rec, result) = shared.create_steps(&entry, rec, initial).await;
            *guard = rec;
            if let Err(e) = &result {
                shared.count_error(e);
            }
            result
        });
        task.await.map_err(|_| Error::Aborted {
            what: "create",
            uid: uid.to_string(),
        })?
    }

    /// Capsules recovery quarantined (see `state::quarantine`).
    pub fn quarantined(&self) -> Vec<crate::state::Quarantined> {
        self.cx.quarantine().list()
    }

    /// A create or delete would write over or remove what a quarantined
    /// capsule's unreadable journal may name.
    fn refuse_quarantined(&self, uid: &str) -> Result<(), Error> {
        match self.cx.quarantine().get(uid) {
            Some(q) => Err(Error::Quarantined {
                uid: uid.to_string(),
                why: q.reason.reason(),
            }),
            None => Ok(()),
        }
    }

    /// One capsule.
    pub fn get(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.entry(uid, false)
            .map(|e| e.view())
            .ok_or_else(|| Error::NotFound {
                uid: uid.to_string(),
            })
    }

    /// Every capsule, by UID.
    pub fn list(&self) -> Vec<CapsuleView> {
        self.registry.views()
    }

    /// Deletes `uid`; `false` when it did not exist.
    pub async fn delete(&self, uid: &str) -> Result<bool, Error> {
        self.delete_with(uid, false).await
    }

    /// [`delete`](Self::delete) of a user capsule or (`internal`) of a
    /// build VM.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "delete_with"))]
    pub(crate) async fn delete_with(&self, uid: &str, internal: bool) -> Result<bool, Error> {
        self.refuse_quarantined(uid)?;
        let Some(entry) = self.entry(uid, internal) else {
            return Ok(false);
        };
        // Raise the flag before queueing for the lock: a create holding it
        // stops at its next step and rolls back.
        entry.cancel();
        let res = self
            .run(
                uid,
                "delete",
                internal,
                |shared, entry, mut rec| async move {
                    let timer = shared.cfg().metrics.start_step(Step::Delete);
                    rec.begin_delete();
                    if let Err(e) = shared.commit(&entry, &rec).await {
                        timer.finish(Outcome::Error);
                        return (Some(rec), Err(e));
                    }
                    let (rec, res) = shared.destroy(&entry, rec).await;
                    timer.finish(Outcome::of(&res));
                    (rec, res.map(|()| true))
                },
            )
            .await;
        match res {
            // Gone meanwhile (a cancelled create rolled itself back).
            Err(Error::NotFound { .. }) => Ok(true),
            other => other,
        }
    }

    /// Running → Paused; Paused: no-op.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "pause"))]
    pub async fn pause(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "pause", false, |shared, entry, mut rec| async move {
            let res = match plan_op(Op::Pause, rec.state()) {
                Decision::Pause => {
                    shared
                        .timed(Step::Pause, shared.pause_steps(&entry, &mut rec))
                        .await
                }
                other => settled(&rec, other),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Paused → Running, Suspended → Running; Running: no-op.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "resume"))]
    pub async fn resume(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "resume", false, |shared, entry, mut rec| async move {
            let res = match plan_op(Op::Resume, rec.state()) {
                Decision::ResumePaused => {
                    shared
                        .timed(Step::Resume, shared.resume_paused(&entry, &mut rec))
                        .await
                }
                Decision::Restore => {
                    shared
                        .timed(Step::Resume, shared.restore_steps(&entry, &mut rec))
                        .await
                }
                other => settled(&rec, other),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Running|Paused → Suspended; Suspended: no-op.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "suspend"))]
    pub async fn suspend(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "suspend", false, |shared, entry, mut rec| async move {
            let res = match plan_op(Op::Suspend, rec.state()) {
                Decision::Suspend => {
                    shared
                        .timed(Step::Suspend, shared.suspend_steps(&entry, &mut rec))
                        .await
                }
                other => settled(&rec, other),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Writes snapshot `id` of `uid`; the capsule returns to its mode.
    pub async fn snapshot(&self, uid: &str, id: &str, memory: bool) -> Result<SnapshotInfo, Error> {
        self.snapshot_with(uid, id, memory, false).await
    }

    /// [`snapshot`](Self::snapshot) of a user capsule or (`internal`) of a
    /// build VM.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "snapshot_with"))]
    pub(crate) async fn snapshot_with(
        &self,
        uid: &str,
        id: &str,
        memory: bool,
        internal: bool,
    ) -> Result<SnapshotInfo, Error> {
        let id = id.to_string();
        self.run(
            uid,
            "snapshot",
            internal,
            move |shared, entry, mut rec| async move {
                let res = match plan_op(Op::Snapshot, rec.state()) {
                    Decision::Snapshot => {
                        shared
                            .timed(
                                Step::Snapshot,
                                shared.snapshot_steps(&entry, &mut rec, &id, memory),
                            )
                            .await
                    }
                    Decision::Refuse(hint) => Err(wrong(&rec.uid, rec.state(), hint)),
                    other => Err(wrong(&rec.uid, rec.state(), unexpected(other))),
                };
                (Some(rec), res)
            },
        )
        .await
    }

    /// What the journal writer did so far (records, files written,
    /// batches, fsyncs): for benchmarks and the admin view.
    pub fn journal_stats(&self) -> crate::state::CommitStats {
        self.cx.commit_stats()
    }

    /// Removes snapshot `id`; `false` when absent.
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool, Error> {
        let dir = self.cx.layout().snapshot_dir(id);
        // A snapshot holds a disk copy and maybe guest RAM: gigabytes to
        // unlink, off the async workers.
        let removed = blocking(id, "delete snapshot", move || {
            if !dir.exists() {
                return Ok(false);
            }
            remove_dir(&dir)?;
            Ok(true)
        })
        .await?;
        if removed {
            self.cx.collect_bases().await;
        }
        Ok(removed)
    }

    /// Snapshot ids on the node.
    pub fn snapshots(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.cx.layout().snapshots_root())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Starts a watch after `cursor` (0: current state first).
    pub fn watch(&self, cursor: u64) -> EventStream {
        self.cx.bus().watch(cursor, || self.list())
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// Replaces `uid`'s egress policy. Running or paused: applied at once;
    /// suspended, failed or stopped (no network exists): recorded, applied
    /// when the network is made again. The same policy: no-op.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "update_network"))]
    pub async fn update_network(&self, uid: &str, egress: Egress) -> Result<CapsuleView, Error> {
        self.run(
            uid,
            "update network",
            false,
            move |shared, entry, mut rec| async move {
                let res = shared.update_egress(&entry, &mut rec, egress).await;
                let view = entry.view();
                (Some(rec), res.map(|()| view))
            },
        )
        .await
    }

    /// Replaces `uid`'s resolver settings and allowed host names, in the
    /// same states and the same way as [`Self::update_network`].
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "update_names"))]
    pub async fn update_names(
        &self,
        uid: &str,
        names: crate::network::Names,
    ) -> Result<CapsuleView, Error> {
        self.run(
            uid,
            "update names",
            false,
            move |shared, entry, mut rec| async move {
                let res = shared.update_names(&entry, &mut rec, names).await;
                let view = entry.view();
                (Some(rec), res.map(|()| view))
            },
        )
        .await
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// Replaces `uid`'s published ports. Running or paused: published at
    /// once; otherwise recorded and published when the network is made
    /// again. The same ports, all published: no-op.
    #[tracing::instrument(skip_all, fields(capsule = %uid, step = "update_ports"))]
    pub async fn update_ports(
        &self,
        uid: &str,
        ports: Vec<PortRule>,
    ) -> Result<CapsuleView, Error> {
        self.run(
            uid,
            "update ports",
            false,
            move |shared, entry, mut rec| async move {
                let res = shared.update_ports(&entry, &mut rec, ports).await;
                let view = entry.view();
                (Some(rec), res.map(|()| view))
            },
        )
        .await
    }
}

/// A warm template's build VM is an internal capsule: the same steps and
/// journal as any other, reachable only through this.
impl<M: Machine + 'static> BuildVms for Supervisor<M> {
    fn boot<'a>(
        &'a self,
        uid: &'a str,
        spec: CapsuleSpec,
    ) -> VmFuture<'a, (CapsuleView, Option<std::path::PathBuf>)> {
        Box::pin(async move {
            let view = self.create_with(uid, spec, State::Running, true).await?;
            let netns = match self.entry(uid, true) {
                Some(entry) => entry
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|r| r.net_addr().and_then(|a| a.netns.clone())),
                None => None,
            };
            Ok((view, netns))
        })
    }
    fn view(&self, uid: &str) -> Option<CapsuleView> {
        self.entry(uid, true).map(|e| e.view())
    }
    fn snapshot<'a>(&'a self, uid: &'a str, id: &'a str) -> VmFuture<'a, SnapshotInfo> {
        Box::pin(self.snapshot_with(uid, id, true, true))
    }
    fn remove<'a>(&'a self, uid: &'a str) -> VmFuture<'a, bool> {
        Box::pin(self.delete_with(uid, true))
    }
}

/// The result of an operation [`plan_op`] did not send to a step: a no-op
/// or a refusal.
fn settled(rec: &Record, decision: Decision) -> Result<(), Error> {
    match decision {
        Decision::Noop => Ok(()),
        Decision::Refuse(hint) => Err(wrong(&rec.uid, rec.state(), hint)),
        other => Err(wrong(&rec.uid, rec.state(), unexpected(other))),
    }
}

/// The hint of a decision an operation has no step for (a planner bug).
fn unexpected(decision: Decision) -> &'static str {
    tracing::error!(?decision, "no step for this decision");
    "the agent cannot do this now"
}

impl<M: Machine + 'static> CapsuleApi for Supervisor<M> {
    fn backend(&self) -> BackendInfo {
        self.cx.backend().clone()
    }
    fn console_dir(&self, uid: &str) -> std::path::PathBuf {
        self.layout().vmm_root().join(uid)
    }
    fn create<'a>(
        &'a self,
        uid: &'a str,
        spec: CapsuleSpec,
        initial: State,
    ) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::create(self, uid, spec, initial))
    }
    fn get(&self, uid: &str) -> Result<CapsuleView, Error> {
        Supervisor::get(self, uid)
    }
    fn list(&self) -> Vec<CapsuleView> {
        Supervisor::list(self)
    }
    fn delete<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, bool> {
        Box::pin(Supervisor::delete(self, uid))
    }
    fn pause<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::pause(self, uid))
    }
    fn resume<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::resume(self, uid))
    }
    fn suspend<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::suspend(self, uid))
    }
    fn update_network<'a>(&'a self, uid: &'a str, egress: Egress) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::update_network(self, uid, egress))
    }
    fn update_names<'a>(
        &'a self,
        uid: &'a str,
        names: crate::network::Names,
    ) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::update_names(self, uid, names))
    }
    fn update_ports<'a>(
        &'a self,
        uid: &'a str,
        ports: Vec<PortRule>,
    ) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::update_ports(self, uid, ports))
    }
    fn snapshot<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        memory: bool,
    ) -> ApiFuture<'a, SnapshotInfo> {
        Box::pin(Supervisor::snapshot(self, uid, id, memory))
    }
    fn delete_snapshot<'a>(&'a self, id: &'a str) -> ApiFuture<'a, bool> {
        Box::pin(Supervisor::delete_snapshot(self, id))
    }
    fn snapshots(&self) -> Vec<String> {
        Supervisor::snapshots(self)
    }
    fn watch(&self, cursor: u64) -> EventStream {
        Supervisor::watch(self, cursor)
    }
    fn prepare_template(&self, req: super::PrepareRequest) -> ApiFuture<'_, super::TemplateStatus> {
        Box::pin(Supervisor::prepare_template(self, req))
    }
    fn templates(&self) -> BTreeMap<String, String> {
        Supervisor::templates(self)
    }
    fn quarantined(&self) -> Vec<crate::state::Quarantined> {
        Supervisor::quarantined(self)
    }
}
