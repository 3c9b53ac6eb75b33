//! The Capsule controller: resolve the source, plan, act on the node agent,
//! write status, all inside the `wrenn.dev/node-cleanup` finalizer. Also the
//! convergence sweep run whenever an agent (re)syncs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::finalizer::{Event as Finalizer, finalizer};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use wrenn_crds::capsule::{CapsulePhase, CapsuleStatus, OperatingMode, Usage};
use wrenn_crds::reason::{ConditionType, Reason};
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::{TemplateDefaults, TemplatePhase};
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};
use wrenn_proto::agent::v1 as pb;

use super::Context;
use crate::agent::{self, to_vm};
use crate::metrics::{ErrorLabels, KindLabels};
use crate::placement::{Request, SnapshotNeed, TemplateNeed, plan_placement};
use crate::plan::{
    ConditionDraft, Expiry, Facts, NodeAction, Observed, Plan, Requeue, SourceState, StatusDraft,
    Vm, plan_capsule, plan_expiry, plan_placed, plan_requeue, plan_unschedulable,
};
use crate::pool::AgentSynced;
use crate::resources::{Resources, effective, format_bytes};
use crate::status::{self, build_capsule_status};
use crate::templates;

/// Errors of one Capsule reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a UID or namespace (never from the API server).
    #[error("capsule without uid or namespace")]
    MissingMetadata,
    /// Reading a referenced object failed.
    #[error("read {kind} {name}")]
    Get {
        /// Kind read.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A node agent call failed.
    #[error("{action} capsule {uid}")]
    Agent {
        /// What was asked.
        action: &'static str,
        /// Capsule UID.
        uid: String,
        /// Why.
        #[source]
        source: agent::Error,
    },
    /// The capsule's node cannot be reached (cleanup waits for it).
    #[error("node {node} unreachable")]
    NodeUnreachable {
        /// The node.
        node: String,
    },
    /// Writing status failed.
    #[error("write capsule status")]
    Status(#[source] status::Error),
    /// Deleting an expired capsule failed.
    #[error("delete expired capsule {name}")]
    DeleteExpired {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer of capsule")]
    Finalizer(#[source] Box<crate::finalizer::Error<Error>>),
}

impl Error {
    /// Label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingMetadata => "invalid",
            Error::Get { .. } | Error::DeleteExpired { .. } => "api",
            Error::Agent { .. } => "agent",
            Error::NodeUnreachable { .. } => "node-unreachable",
            Error::Status(_) => "status",
            Error::Finalizer(e) => match &**e {
                crate::finalizer::Error::ApplyFailed(e)
                | crate::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "finalizer",
            },
        }
    }
}

/// What a node must hold, or be able to make, for the capsule to boot there.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Need {
    /// A template's root disk (any node can prepare it on demand).
    Template {
        /// Key prefix shared by every digest of the template.
        key_prefix: String,
    },
    /// A warm template's snapshot: any node holding it will do.
    Warm {
        /// Snapshot id.
        id: String,
    },
    /// A CapsuleSnapshot's files, which live on one node.
    Snapshot {
        /// The node holding them.
        node: String,
        /// Snapshot id.
        id: String,
    },
    /// Nothing (the source is blocked).
    Nothing,
}

/// Where a capsule boots from, resolved and validated.
#[derive(Clone, Debug)]
struct Source {
    state: SourceState,
    resources: Resources,
    boot: Option<pb::BootSource>,
    need: Need,
    /// The template's own nodeSelector.
    template_selector: BTreeMap<String, String>,
    kernel: templates::Kernel,
}

impl Source {
    fn blocked(why: Reason, message: String) -> Self {
        Self {
            state: SourceState::Blocked(why, message),
            resources: Resources::default(),
            boot: None,
            need: Need::Nothing,
            template_selector: BTreeMap::new(),
            kernel: templates::Kernel::default(),
        }
    }

    /// Boots from the snapshot with this id.
    fn snapshot(
        resources: Resources,
        id: &str,
        need: Need,
        selector: BTreeMap<String, String>,
    ) -> Self {
        Self {
            state: SourceState::Usable,
            resources,
            boot: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
                    id: id.to_string(),
                })),
            }),
            need,
            template_selector: selector,
            kernel: templates::Kernel::default(),
        }
    }

    /// What placement is asked for.
    fn request<'a>(&'a self, cap: &'a Capsule) -> Request<'a> {
        Request {
            resources: self.resources,
            node_selector: Some(&cap.spec.node_selector),
            template: match &self.need {
                Need::Template { key_prefix } => Some(TemplateNeed {
                    key_prefix,
                    preparable: true,
                }),
                _ => None,
            },
            template_selector: Some(&self.template_selector),
            warm: match &self.need {
                Need::Warm { id } => Some(id),
                _ => None,
            },
            snapshot: match &self.need {
                Need::Snapshot { node, id } => Some(SnapshotNeed { node, id }),
                _ => None,
            },
        }
    }
}

/// The object the capsule's source names, as read from the API server
/// (`None`: it does not exist).
enum Fetched {
    Template(String, Option<CapsuleTemplate>),
    Snapshot(String, Option<CapsuleSnapshot>),
    Neither,
}

/// Resolve: reads the template or snapshot the spec names.
async fn fetch_source(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Fetched, Error> {
    let src = &cap.spec.source;
    if let Some(t) = &src.template_ref {
        let tpl = get_opt(ctx, ns, "CapsuleTemplate", &t.name).await?;
        return Ok(Fetched::Template(t.name.clone(), tpl));
    }
    if let Some(s) = &src.snapshot_ref {
        let snap = get_opt(ctx, ns, "CapsuleSnapshot", &s.name).await?;
        return Ok(Fetched::Snapshot(s.name.clone(), snap));
    }
    Ok(Fetched::Neither)
}

/// One object of the capsule's namespace, `None` when absent.
async fn get_opt<K>(
    ctx: &Context,
    ns: &str,
    kind: &'static str,
    name: &str,
) -> Result<Option<K>, Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name).await.map_err(|source| Error::Get {
        kind,
        name: name.to_string(),
        source,
    })
}

/// A referenced object without a UID (never from the API server).
#[derive(Debug)]
struct NoUid;

/// Validate: what the capsule boots from, or why it cannot yet. Pure.
fn validate_source(cap: &Capsule, ns: &str, fetched: Fetched) -> Result<Source, NoUid> {
    match fetched {
        Fetched::Template(name, tpl) => validate_template(cap, ns, &name, tpl),
        Fetched::Snapshot(name, snap) => Ok(validate_snapshot(cap, &name, snap)),
        Fetched::Neither => Ok(Source::blocked(Reason::InvalidSpec, "no source".into())),
    }
}

fn validate_template(
    cap: &Capsule,
    ns: &str,
    name: &str,
    tpl: Option<CapsuleTemplate>,
) -> Result<Source, NoUid> {
    let Some(tpl) = tpl else {
        return Ok(Source::blocked(
            Reason::TemplateNotFound,
            format!("CapsuleTemplate {name} not found in namespace {ns}"),
        ));
    };
    let st = tpl.status.as_ref();
    if st.and_then(|s| s.phase) == Some(TemplatePhase::Failed) {
        return Ok(Source::blocked(
            Reason::TemplateNotFound,
            format!("CapsuleTemplate {name} failed to prepare"),
        ));
    }
    let resources = match effective(cap.spec.resources.as_ref(), &tpl.spec.defaults) {
        Ok(r) => r,
        Err(e) => return Ok(Source::blocked(Reason::InvalidSpec, e.to_string())),
    };
    let Some(disk) = templates::disk_source(&tpl) else {
        return Ok(Source::blocked(
            Reason::InvalidSpec,
            format!("CapsuleTemplate {name} restores a snapshot; use snapshotRef on the capsule"),
        ));
    };
    let tpl_uid = tpl.uid().ok_or(NoUid)?;
    let selector = tpl.spec.node_selector.clone();
    let Some(id) = templates::warm_snapshot_id(&tpl, &tpl_uid) else {
        return Ok(Source {
            state: SourceState::Usable,
            resources,
            boot: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: templates::template_key(ns, name, &tpl_uid),
                    disk: Some(disk),
                    digest: st.and_then(|s| s.digest.clone()).unwrap_or_default(),
                    disk_bytes: resources.disk_bytes,
                })),
            }),
            need: Need::Template {
                key_prefix: templates::key_prefix(ns, name),
            },
            template_selector: selector,
            kernel: templates::kernel(&tpl),
        });
    };
    if st.and_then(|s| s.phase) != Some(TemplatePhase::Ready) {
        let why = st
            .and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == ConditionType::Ready.as_str())
            })
            .map(|c| format!(": {}", c.message))
            .unwrap_or_default();
        return Ok(Source::blocked(
            Reason::WarmSnapshotNotReady,
            format!("CapsuleTemplate {name} has no warm snapshot yet{why}"),
        ));
    }
    // A warm template's capsules restore its snapshot, whose memory fixes
    // vCPUs and memory; booting cold instead would silently skip the
    // startCommand the user asked for.
    let shape = match effective(None, &tpl.spec.defaults) {
        Ok(r) => r,
        Err(e) => return Ok(Source::blocked(Reason::InvalidSpec, e.to_string())),
    };
    if (resources.vcpus, resources.memory_bytes) != (shape.vcpus, shape.memory_bytes) {
        return Ok(Source::blocked(
            Reason::InvalidSpec,
            format!(
                "CapsuleTemplate {name} is warm: its capsules restore a snapshot taken with {} vCPUs and {} of memory; leave spec.resources.vcpus and memory unset or equal",
                shape.vcpus,
                format_bytes(shape.memory_bytes)
            ),
        ));
    }
    Ok(Source::snapshot(
        resources,
        &id,
        Need::Warm { id: id.clone() },
        selector,
    ))
}

fn validate_snapshot(cap: &Capsule, name: &str, snap: Option<CapsuleSnapshot>) -> Source {
    let ready = snap.as_ref().and_then(|snap| {
        let st = snap.status.as_ref()?;
        (st.phase == Some(SnapshotPhase::Ready))
            .then(|| (snap.uid(), st.node_name.clone(), st.compatibility.clone()))
    });
    let Some((Some(id), Some(node), compat)) = ready else {
        return Source::blocked(
            Reason::SnapshotNotReady,
            format!("CapsuleSnapshot {name} is not Ready"),
        );
    };
    let compat = compat.unwrap_or_default();
    let defaults = TemplateDefaults {
        vcpus: compat.vcpus.max(1),
        memory: compat
            .memory
            .unwrap_or_else(|| TemplateDefaults::default().memory),
        ..TemplateDefaults::default()
    };
    match effective(cap.spec.resources.as_ref(), &defaults) {
        Ok(resources) => Source::snapshot(
            resources,
            &id,
            Need::Snapshot {
                node,
                id: id.clone(),
            },
            BTreeMap::new(),
        ),
        Err(e) => Source::blocked(Reason::InvalidSpec, e.to_string()),
    }
}
/// `spec.network` as the agent takes it: DENY with `allowCidrs` reaches
/// exactly those CIDRs.
fn to_proto_network(cap: &Capsule) -> pb::NetworkPolicy {
    let net = cap.spec.network.clone().unwrap_or_default();
    pb::NetworkPolicy {
        egress: match net.egress {
            wrenn_crds::capsule::Egress::Allow => pb::Egress::Allow as i32,
            wrenn_crds::capsule::Egress::Deny => pb::Egress::Deny as i32,
        },
        allow_cidrs: net.allow_cidrs.clone(),
        ports: net
            .ports
            .iter()
            .map(|p| pb::Port {
                port: p.port.into(),
                protocol: format!("{:?}", p.protocol),
            })
            .collect(),
    }
}

fn to_proto_spec(cap: &Capsule, ns: &str, src: &Source) -> pb::CapsuleSpec {
    pb::CapsuleSpec {
        namespace: ns.to_string(),
        name: cap.name_any(),
        source: src.boot.clone(),
        resources: Some(pb::Resources {
            vcpus: src.resources.vcpus,
            memory_bytes: src.resources.memory_bytes,
            disk_bytes: src.resources.disk_bytes,
        }),
        kernel_path: src.kernel.path.clone(),
        kernel_cmdline: src.kernel.cmdline.clone(),
        env: cap
            .spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        network: Some(to_proto_network(cap)),
    }
}

fn proto_state(mode: wrenn_crds::capsule::OperatingMode) -> i32 {
    use wrenn_crds::capsule::OperatingMode as M;
    match mode {
        M::Running => pb::CapsuleState::Running as i32,
        M::Paused => pb::CapsuleState::Paused as i32,
        M::Suspended => pb::CapsuleState::Suspended as i32,
    }
}

/// How long since the last data-plane call on the capsule, as its agent
/// counts; `None` when unknown (no call yet, or the agent did not answer).
async fn quiet_for(ctx: &Context, node: Option<&str>, uid: &str) -> Option<Duration> {
    let client = ctx.pool.client(node?)?;
    let c = client.get_capsule(uid.to_string()).await.ok()?;
    if c.last_activity_unix_nanos <= 0 {
        return None;
    }
    let at = Timestamp::from_nanosecond(i128::from(c.last_activity_unix_nanos)).ok()?;
    Duration::try_from(Timestamp::now().duration_since(at)).ok()
}

fn age(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<Duration> {
    let t = t?;
    let d = Timestamp::now().duration_since(t.0);
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}

/// Placements recorded in capsule statuses, for reservations.
fn placed(store: &Store<Capsule>, except: &str) -> Vec<(String, String, Resources)> {
    store
        .state()
        .iter()
        .filter_map(|c| {
            let uid = c.uid()?;
            if uid == except {
                return None;
            }
            let st = c.status.as_ref()?;
            let node = st.node_name.clone()?;
            let r = st.resources.as_ref()?;
            let q = |q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>, f| {
                q.as_ref()
                    .and_then(|q| crate::resources::quantity_bytes(f, q).ok())
                    .unwrap_or(0)
            };
            Some((
                uid,
                node,
                Resources {
                    vcpus: r.vcpus.unwrap_or(0),
                    memory_bytes: q(&r.memory, "memory"),
                    disk_bytes: q(&r.disk, "disk"),
                },
            ))
        })
        .collect()
}

/// The one writer of a Capsule's status during a reconcile: skips a
/// status equal to the current one, announces phase changes as Events.
struct Writer<'a> {
    cap: &'a Capsule,
    api: Api<Capsule>,
    uid: String,
    current: Option<CapsuleStatus>,
}

impl Writer<'_> {
    /// Writes `status` unless equal to the current one; publishes an Event
    /// on a phase change worth telling.
    async fn write(
        &mut self,
        ctx: &Context,
        draft: &StatusDraft,
        resources: Option<Resources>,
    ) -> Result<(), Error> {
        let mut next = build_capsule_status(
            draft,
            self.current.as_ref(),
            self.cap.meta().generation,
            resources,
            Timestamp::now(),
        );
        if self.current.as_ref() == Some(&next) {
            return Ok(());
        }
        let before = self.current.as_ref().and_then(|s| s.phase);
        if draft.phase != CapsulePhase::Running {
            next.usage = None;
        }
        status::apply_status(&self.api, self.cap, &next)
            .await
            .map_err(Error::Status)?;
        ctx.metrics
            .status_writes
            .get_or_create(&KindLabels { kind: "Capsule" })
            .inc();
        self.current = Some(next);
        if before != Some(draft.phase) {
            self.announce(ctx, before, draft).await;
        }
        Ok(())
    }

    async fn announce(&self, ctx: &Context, before: Option<CapsulePhase>, draft: &StatusDraft) {
        use ConditionType as T;
        let cond = |t: ConditionType| -> Option<&ConditionDraft> {
            draft.conditions.iter().find(|c| c.type_ == t)
        };
        let msg = |t: ConditionType| cond(t).map(|c| c.message.clone()).unwrap_or_default();
        let (type_, reason, note) = match draft.phase {
            CapsulePhase::Scheduled => (EventType::Normal, Reason::Scheduled, msg(T::Scheduled)),
            CapsulePhase::Running => {
                if before == Some(CapsulePhase::Creating)
                    && let Some(created) = age(self.cap.meta().creation_timestamp.as_ref())
                {
                    ctx.metrics.create_to_running.observe(created.as_secs_f64());
                }
                let ip = draft.ip.clone().unwrap_or_default();
                (
                    EventType::Normal,
                    Reason::Running,
                    format!(
                        "running on node {} at {ip}",
                        draft.node.clone().unwrap_or_default()
                    ),
                )
            }
            CapsulePhase::Paused => (
                EventType::Normal,
                Reason::Paused,
                "vCPUs stopped".to_string(),
            ),
            CapsulePhase::Suspended => (EventType::Normal, Reason::Suspended, msg(T::Suspended)),
            CapsulePhase::Failed => (EventType::Warning, Reason::Failed, msg(T::Ready)),
            CapsulePhase::Expired => (EventType::Normal, Reason::Expired, msg(T::Ready)),
            CapsulePhase::Pending
                if cond(T::Scheduled).is_some_and(|c| c.reason == Reason::Unschedulable) =>
            {
                (
                    EventType::Warning,
                    Reason::FailedScheduling,
                    msg(T::Scheduled),
                )
            }
            _ => return,
        };
        ctx.event(&self.cap.object_ref(&()), type_, reason, note)
            .await;
    }
}

/// One reconcile of a Capsule, wrapped in its finalizer.
#[tracing::instrument(skip_all, fields(capsule = %cap.name_any(), namespace = cap.namespace().unwrap_or_default(), uid = cap.uid().unwrap_or_default()))]
pub async fn reconcile(cap: Arc<Capsule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cap.namespace().ok_or(Error::MissingMetadata)?;
    let api: Api<Capsule> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, cap, |ev| async {
        match ev {
            Finalizer::Apply(c) => apply(&c, &ns, &ctx).await,
            Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .get_or_create(&KindLabels { kind: "Capsule" })
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Passes of plan → act in one reconcile: place, create, then show the
/// VM the create returned, with one to spare.
const MAX_PASSES: usize = 4;

/// What one reconcile has learnt between passes: fresher than the object
/// it started from.
struct Known {
    /// The placement (`status.nodeName`, or where a VM was found).
    node: Option<String>,
    /// The phase last written.
    phase: Option<CapsulePhase>,
    /// The VM a node call just returned, ahead of the pool's copy.
    fresh: Option<Vm>,
}

impl Known {
    /// The VM as the plan sees it: `None` when its node's agent is unknown.
    fn observe(&self, ctx: &Context, uid: &str) -> Option<Option<Vm>> {
        match (&self.fresh, &self.node) {
            (Some(vm), _) => Some(Some(vm.clone())),
            (None, Some(n)) => ctx.pool.observe(n, uid),
            (None, None) => Some(None),
        }
    }

    /// Records what a node call returned.
    fn returned(&mut self, ctx: &Context, node: &str, c: pb::Capsule) {
        self.fresh = Some(to_vm(&c));
        ctx.pool.note(node, c);
    }
}

/// How a pass ended.
enum Next {
    /// Plan again with what was learnt.
    Again,
    /// Placed on this node (recorded in the status): plan again.
    Placed(String),
    /// Done: requeue then (counted as a good reconcile).
    Requeue(Requeue),
    /// Done: leave the reconcile as it is (no backoff reset).
    Return(Action),
}

/// Resolve → validate → plan → act, until a pass has nothing more to do.
async fn apply(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Action, Error> {
    // Resolve (I/O): the source objects, the placement, expiry.
    let uid = cap.uid().ok_or(Error::MissingMetadata)?;
    let fetched = fetch_source(cap, ns, ctx).await?;
    // Validate (pure).
    let src = validate_source(cap, ns, fetched).map_err(|NoUid| Error::MissingMetadata)?;
    let current = cap.status.clone();
    let mut known = Known {
        node: current
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .or_else(|| ctx.pool.find(&uid)),
        phase: current.as_ref().and_then(|s| s.phase),
        fresh: None,
    };
    let expiry = expiry(cap, ctx, known.node.as_deref(), &uid).await;
    let egress = agent::to_egress(&to_proto_network(cap));
    let mut w = Writer {
        cap,
        api: Api::namespaced(ctx.client.clone(), ns),
        uid: uid.clone(),
        current,
    };
    let mut requeue = Requeue::Settled;
    for _ in 0..MAX_PASSES {
        let observed = known.observe(ctx, &uid);
        let facts = Facts {
            mode: cap.spec.operating_mode,
            node: known.node.as_deref(),
            phase: known.phase,
            vm: match &observed {
                None => Observed::Unknown,
                Some(None) => Observed::Absent,
                Some(Some(vm)) => Observed::Present(vm),
            },
            source: src.state.clone(),
            expired: match expiry {
                Expiry::Now(on) => Some(on),
                _ => None,
            },
            egress: egress.clone(),
        };
        // Plan (pure).
        let plan = plan_capsule(&facts);
        // Act.
        let pass = Pass {
            ctx,
            ns,
            plan: &plan,
            src: &src,
        };
        let next = match plan.action {
            NodeAction::None => pass.show(&mut w, &known).await?,
            NodeAction::Place => pass.place(&mut w, &facts).await?,
            NodeAction::Create(mode) => pass.create(&w, mode, &mut known).await?,
            NodeAction::Pause | NodeAction::Resume | NodeAction::Suspend => {
                pass.transition(&w, &mut known).await?
            }
            NodeAction::UpdateNetwork => pass.update_network(&mut w, &mut known).await?,
            NodeAction::DeleteObject => pass.delete_object(&mut w).await?,
        };
        match next {
            Next::Again => {}
            Next::Placed(node) => {
                known.node = Some(node);
                known.phase = Some(CapsulePhase::Scheduled);
            }
            Next::Requeue(r) => {
                requeue = r;
                break;
            }
            Next::Return(action) => return Ok(action),
        }
    }
    ctx.succeeded(&uid);
    Ok(Action::requeue(plan_requeue(
        requeue,
        expiry,
        ctx.settings.usage_interval,
    )))
}

/// Whether the lifecycle expired. The agent is asked for the last
/// activity only when an idle timeout would otherwise expire it now
/// (activity is not streamed).
async fn expiry(cap: &Capsule, ctx: &Context, node: Option<&str>, uid: &str) -> Expiry {
    let started = cap.status.as_ref().and_then(|s| s.started_at.as_ref());
    let idle = age(started);
    let created = age(cap.meta().creation_timestamp.as_ref()).unwrap_or_default();
    let lifecycle = cap.spec.lifecycle.as_ref();
    // The API server validated the durations.
    let expiry = plan_expiry(lifecycle, created, idle).unwrap_or(Expiry::Never);
    if matches!(expiry, Expiry::Now(_))
        && lifecycle.is_some_and(|l| l.idle_timeout.is_some())
        && let Some(quiet) = quiet_for(ctx, node, uid).await
    {
        let idle = Some(idle.map_or(quiet, |i| i.min(quiet)));
        return plan_expiry(lifecycle, created, idle).unwrap_or(Expiry::Never);
    }
    expiry
}

/// One pass's step: what the plan decided, carried out.
struct Pass<'a> {
    ctx: &'a Context,
    ns: &'a str,
    plan: &'a Plan,
    src: &'a Source,
}

impl Pass<'_> {
    /// Nothing to do on the node: show the status (and usage while running).
    async fn show(&self, w: &mut Writer<'_>, known: &Known) -> Result<Next, Error> {
        let Some(draft) = &self.plan.status else {
            return Ok(Next::Requeue(self.plan.requeue()));
        };
        let resources = Some(self.src.resources).filter(|_| known.node.is_some());
        w.write(self.ctx, draft, resources).await?;
        if draft.phase == CapsulePhase::Running {
            refresh_usage(w, self.ctx, known.node.as_deref()).await?;
        }
        Ok(Next::Requeue(self.plan.requeue()))
    }

    /// Chooses a node and records it before anything is created there.
    async fn place(&self, w: &mut Writer<'_>, facts: &Facts<'_>) -> Result<Next, Error> {
        let ctx = self.ctx;
        let cap = w.cap;
        // Before every agent listed its VMs, one may already hold this
        // capsule; a nodeSelector matched before the Node labels are
        // listed would call every node a mismatch.
        let labels_pending = !cap.spec.node_selector.is_empty()
            && futures::FutureExt::now_or_never(ctx.nodes.wait_until_ready()).is_none();
        if !ctx.pool.settled(ctx.settings.settle_grace) || labels_pending {
            return Ok(Next::Return(Action::requeue(
                Requeue::NotReady.after(ctx.settings.usage_interval),
            )));
        }
        let nodes = ctx.nodes.clone();
        let views = ctx.pool.views(
            |n| crate::pool::node_labels(&nodes, n),
            &placed(&ctx.capsules, &w.uid),
        );
        match plan_placement(&self.src.request(cap), &views) {
            Ok(chosen) => {
                ctx.pool.reserve(&w.uid, &chosen, self.src.resources);
                let draft = plan_placed(facts, &chosen);
                w.write(ctx, &draft, Some(self.src.resources)).await?;
                Ok(Next::Placed(chosen))
            }
            Err(why) => {
                let plan = plan_unschedulable(facts, why.to_string());
                if let Some(draft) = &plan.status {
                    w.write(ctx, draft, None).await?;
                }
                Ok(Next::Requeue(plan.requeue()))
            }
        }
    }

    /// Creates the VM on the placed node. A refusal of the spec shows as a
    /// failed VM: retrying cannot help.
    async fn create(
        &self,
        w: &Writer<'_>,
        mode: OperatingMode,
        known: &mut Known,
    ) -> Result<Next, Error> {
        let Some(node) = known.node.clone() else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        let client = self
            .ctx
            .pool
            .client(&node)
            .ok_or_else(|| Error::NodeUnreachable { node: node.clone() })?;
        let req = pb::CreateCapsuleRequest {
            uid: w.uid.clone(),
            spec: Some(to_proto_spec(w.cap, self.ns, self.src)),
            initial_state: proto_state(mode),
        };
        match client.create_capsule(req).await {
            Ok(c) => known.returned(self.ctx, &node, c),
            Err(e) if refuses_spec(&e) => {
                known.fresh = Some(Vm {
                    state: crate::plan::VmState::Failed,
                    ip: None,
                    vmm: None,
                    started_unix_nanos: 0,
                    reason: None,
                    message: e.agent_message(),
                    egress: agent::to_egress(&to_proto_network(w.cap)),
                });
            }
            Err(source) => {
                return Err(Error::Agent {
                    action: "create",
                    uid: w.uid.clone(),
                    source,
                });
            }
        }
        known.phase = Some(CapsulePhase::Creating);
        Ok(Next::Again)
    }

    /// Pause, resume or suspend on the node.
    async fn transition(&self, w: &Writer<'_>, known: &mut Known) -> Result<Next, Error> {
        let Some(node) = known.node.clone() else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        let client = self
            .ctx
            .pool
            .client(&node)
            .ok_or_else(|| Error::NodeUnreachable { node: node.clone() })?;
        let uid = w.uid.clone();
        let (action, call) = match self.plan.action {
            NodeAction::Pause => ("pause", client.pause_capsule(uid)),
            NodeAction::Resume => ("resume", client.resume_capsule(uid)),
            _ => ("suspend", client.suspend_capsule(uid)),
        };
        let c = call.await.map_err(|source| Error::Agent {
            action,
            uid: w.uid.clone(),
            source,
        })?;
        known.returned(self.ctx, &node, c);
        Ok(Next::Again)
    }

    /// Makes the node enforce `spec.network`. The status shows the VM as
    /// it is, with the previous observedGeneration, until the node answers.
    async fn update_network(&self, w: &mut Writer<'_>, known: &mut Known) -> Result<Next, Error> {
        let Some(node) = known.node.clone() else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        let client = self
            .ctx
            .pool
            .client(&node)
            .ok_or_else(|| Error::NodeUnreachable { node: node.clone() })?;
        if let Some(draft) = &self.plan.status {
            w.write(self.ctx, draft, None).await?;
        }
        let c = client
            .update_network(pb::UpdateNetworkRequest {
                uid: w.uid.clone(),
                network: Some(to_proto_network(w.cap)),
            })
            .await
            .map_err(|source| Error::Agent {
                action: "update network of",
                uid: w.uid.clone(),
                source,
            })?;
        known.returned(self.ctx, &node, c);
        Ok(Next::Again)
    }

    /// Lifecycle expired with `onExpiry: Delete`: show Expired, then delete
    /// the object (its finalizer deletes the VM).
    async fn delete_object(&self, w: &mut Writer<'_>) -> Result<Next, Error> {
        if let Some(draft) = &self.plan.status {
            w.write(self.ctx, draft, None).await?;
        }
        let name = w.cap.name_any();
        w.api
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(|source| Error::DeleteExpired { name, source })?;
        Ok(Next::Return(Action::await_change()))
    }
}

/// The node refuses this spec (a retry cannot help).
fn refuses_spec(e: &agent::Error) -> bool {
    matches!(
        e.code(),
        Some(
            tonic::Code::InvalidArgument
                | tonic::Code::AlreadyExists
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
        )
    )
}

/// Refreshes `status.usage` from the agent's metrics when older than the interval.
async fn refresh_usage(w: &mut Writer<'_>, ctx: &Context, node: Option<&str>) -> Result<(), Error> {
    let Some(node) = node else { return Ok(()) };
    let Some(cur) = w.current.clone() else {
        return Ok(());
    };
    let interval = ctx.settings.usage_interval;
    let since = cur
        .usage
        .as_ref()
        .and_then(|u| age(u.sampled_at.as_ref()))
        .or_else(|| age(cur.started_at.as_ref()));
    if since.is_none_or(|s| s < interval) {
        return Ok(());
    }
    let Some(client) = ctx.pool.client(node) else {
        return Ok(());
    };
    let now = Timestamp::now();
    let to = now.as_nanosecond() as i64;
    let from = to - interval.as_nanos() as i64;
    let Ok(m) = client
        .get_metrics(pb::GetMetricsRequest {
            uid: w.uid.clone(),
            from_unix_nanos: from,
            to_unix_nanos: to,
        })
        .await
    else {
        return Ok(());
    };
    let Some(last) = m.samples.last() else {
        return Ok(());
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut next = cur.clone();
    next.usage = Some(Usage {
        cpu: Some(Quantity(format!("{}m", last.cpu_millicores))),
        memory: Some(Quantity(crate::resources::format_bytes(
            last.guest_memory_used_bytes,
        ))),
        disk: Some(Quantity(crate::resources::format_bytes(
            last.disk_allocated_bytes,
        ))),
        sampled_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
    });
    status::apply_status(&w.api, w.cap, &next)
        .await
        .map_err(Error::Status)?;
    ctx.metrics
        .status_writes
        .get_or_create(&KindLabels { kind: "Capsule" })
        .inc();
    w.current = Some(next);
    Ok(())
}

async fn cleanup(cap: &Capsule, ctx: &Context) -> Result<Action, Error> {
    let uid = cap.uid().ok_or(Error::MissingMetadata)?;
    ctx.pool.release(&uid);
    let node = cap
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| ctx.pool.find(&uid));
    let Some(node) = node else {
        return Ok(Action::await_change());
    };
    if let Some(client) = ctx.pool.client(&node) {
        let existed = client
            .delete_capsule(uid.clone())
            .await
            .map_err(|source| Error::Agent {
                action: "delete",
                uid: uid.clone(),
                source,
            })?;
        if existed {
            ctx.pool.forget(&node, &uid);
        }
        return Ok(Action::await_change());
    }
    let lost = ctx.pool.lost_for(&node).unwrap_or_default();
    if lost >= ctx.settings.node_lost_timeout {
        ctx.event(
            &cap.object_ref(&()),
            EventType::Warning,
            Reason::NodeLost,
            format!(
                "node {node} unreachable for {}s: finalizer released; its VM may remain on the node until its agent returns",
                lost.as_secs()
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    Err(Error::NodeUnreachable { node })
}

/// Requeue policy after a failed reconcile.
pub fn error_policy(cap: Arc<Capsule>, err: &Error, ctx: Arc<Context>) -> Action {
    let category = err.category();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: "Capsule",
            category,
        })
        .inc();
    if category == "node-unreachable" {
        tracing::debug!(
            error = err as &dyn std::error::Error,
            "capsule waits for its node"
        );
    } else {
        tracing::warn!(
            error = err as &dyn std::error::Error,
            category,
            "capsule reconcile failed"
        );
    }
    ctx.backoff(&cap.uid().unwrap_or_default())
}

/// Convergence after an agent (re)synced: VMs without a Capsule are deleted;
/// capsules placed on that node are reconciled (a vanished VM is noticed).
/// Capsules are listed from the API server, not the cache: deleting a VM
/// is decided on the freshest view there is.
pub async fn converge(
    ctx: &Context,
    caps: &Api<Capsule>,
    sync: &AgentSynced,
    retrigger: &mpsc::UnboundedSender<ObjectRef<Capsule>>,
) {
    let Some(client) = ctx.pool.client(&sync.node) else {
        tracing::debug!(node = %sync.node, "agent gone before convergence");
        return;
    };
    // Taken before the list: a VM created after the list belongs to a
    // Capsule the list may miss, and must not be swept.
    let vms = ctx.pool.uids(&sync.node);
    let listed = match caps.list(&kube::api::ListParams::default()).await {
        Ok(l) => l.items,
        Err(err) => {
            tracing::warn!(node = %sync.node, error = &err as &dyn std::error::Error, "list capsules for convergence");
            return;
        }
    };
    let owners: std::collections::HashSet<String> = listed.iter().filter_map(|c| c.uid()).collect();
    for (uid, ns, name) in vms {
        if owners.contains(&uid) {
            continue;
        }
        match client.delete_capsule(uid.clone()).await {
            Ok(_) => {
                ctx.pool.forget(&sync.node, &uid);
                ctx.metrics.orphans_deleted.inc();
                tracing::info!(node = %sync.node, %uid, capsule = %format!("{ns}/{name}"), "deleted VM without a Capsule");
            }
            Err(err) => {
                tracing::warn!(node = %sync.node, %uid, error = &err as &dyn std::error::Error, "delete orphan VM");
            }
        }
    }
    for c in &listed {
        if c.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(sync.node.as_str()) {
            let _ = retrigger.send(ObjectRef::from_obj(c));
        }
    }
}

/// After an agent (re)synced: one Warning Event on its Node per capsule the
/// agent quarantined at start-up, so an admin sees it without reading agent
/// logs. Once per sync, not per refresh: the list only changes when the
/// agent restarts.
async fn report_quarantined(ctx: &Context, node: &str) {
    let Some(info) = ctx.pool.info(node) else {
        return;
    };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_string()),
        ..Default::default()
    };
    for q in &info.quarantined {
        ctx.event(
            &reference,
            EventType::Warning,
            Reason::CapsuleQuarantined,
            quarantine_note(q),
        )
        .await;
    }
}

/// The Event note for one quarantined capsule.
fn quarantine_note(q: &pb::QuarantinedCapsule) -> String {
    format!(
        "capsule {} quarantined by the node agent ({}: {}); its VM, disk and network are left untouched and create/delete of it are refused until an admin releases it (docs/security.md, Recovery)",
        q.uid, q.reason, q.message
    )
}

/// Runs the Capsule controller until `shutdown` resolves.
pub async fn run(
    ctx_parts: super::Parts,
    namespace: Option<String>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Capsule>>,
    mut syncs: mpsc::UnboundedReceiver<AgentSynced>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx_parts.client.clone();
    let ns = namespace.as_deref();
    let caps: Api<Capsule> = super::scoped(&client, ns);
    let templates: Api<CapsuleTemplate> = super::scoped(&client, ns);
    let snapshots: Api<CapsuleSnapshot> = super::scoped(&client, ns);
    let concurrency = ctx_parts.settings.concurrency;
    let controller = Controller::new(caps, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    let store = controller.store();
    let ctx = Arc::new(ctx_parts.into_context(store.clone()));
    let (retrigger, retriggered) = mpsc::unbounded_channel();
    let by_template = store.clone();
    let by_snapshot = store.clone();
    let conv_ctx = ctx.clone();
    let conv_api: Api<Capsule> = super::scoped(&client, ns);
    let converger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(conv_ctx.settings.converge_interval);
        tick.tick().await;
        loop {
            let nodes = tokio::select! {
                sync = syncs.recv() => match sync {
                    Some(s) => {
                        report_quarantined(&conv_ctx, &s.node).await;
                        vec![s]
                    }
                    None => return,
                },
                _ = tick.tick() => conv_ctx
                    .pool
                    .ready_nodes()
                    .into_iter()
                    .map(|node| AgentSynced { node })
                    .collect(),
            };
            for sync in &nodes {
                converge(&conv_ctx, &conv_api, sync, &retrigger).await;
            }
        }
    });
    let merged = futures::stream::select(
        tokio_stream::wrappers::UnboundedReceiverStream::new(triggers),
        tokio_stream::wrappers::UnboundedReceiverStream::new(retriggered),
    );
    let controller = controller
        .reconcile_on(merged)
        .watches(templates, watcher::Config::default(), move |t| {
            let ns = t.namespace();
            let name = t.name_any();
            by_template
                .state()
                .into_iter()
                .filter(move |c| {
                    c.namespace() == ns
                        && c.spec.source.template_ref.as_ref().map(|r| &r.name) == Some(&name)
                })
                .map(|c| ObjectRef::from_obj(&*c))
        })
        .watches(snapshots, watcher::Config::default(), move |s| {
            let ns = s.namespace();
            let name = s.name_any();
            by_snapshot
                .state()
                .into_iter()
                .filter(move |c| {
                    c.namespace() == ns
                        && c.spec.source.snapshot_ref.as_ref().map(|r| &r.name) == Some(&name)
                })
                .map(|c| ObjectRef::from_obj(&*c))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let mut converger = converger;
    // Convergence runs as long as the controller: if it ends first (a
    // panic), the controller stops too and the operator exits loudly.
    tokio::select! {
        _ = controller => {}
        end = &mut converger => {
            tracing::error!(outcome = ?end, "capsule convergence stopped; stopping the Capsule controller");
        }
    }
    converger.abort();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::Method;
    use serde_json::Value;
    use wrenn_crds::capsule::{CapsuleSource, CapsuleSpec, TemplateRef};
    use wrenn_crds::template::{CapsuleTemplateSpec, ImageSource, TemplateSource};

    use super::*;
    use crate::fixtures::{ApiServer, Reply, agent, context, not_found, ok, pool};
    use wrenn_crds::names::FINALIZER;

    const CAPSULES: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsules";
    const TEMPLATE: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsuletemplates/base";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
    const SSA: &str = "fieldManager=wrenn-operator";

    /// A capsule from template `base`, with the finalizer already on.
    fn capsule(vcpus: Option<u32>) -> Capsule {
        let mut c = Capsule::new(
            "c1",
            CapsuleSpec {
                source: CapsuleSource {
                    template_ref: Some(TemplateRef {
                        name: "base".into(),
                    }),
                    snapshot_ref: None,
                },
                resources: vcpus.map(|v| wrenn_crds::capsule::CapsuleResources {
                    vcpus: Some(v),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("u1".into());
        c.metadata.generation = Some(1);
        c.metadata.finalizers = Some(vec![FINALIZER.into()]);
        c
    }

    fn template() -> CapsuleTemplate {
        let mut t = CapsuleTemplate::new(
            "base",
            CapsuleTemplateSpec {
                source: TemplateSource {
                    image: Some(ImageSource {
                        reference: "docker.io/library/debian:bookworm".into(),
                        pull_secret: None,
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        t.metadata.namespace = Some("ns".into());
        t.metadata.uid = Some("t1".into());
        t
    }

    fn phase_is(phase: &'static str) -> impl Fn(&Value) + Send {
        move |body| assert_eq!(body["status"]["phase"], phase, "{body:#}")
    }

    fn condition(body: &Value, type_: &str) -> Value {
        body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap()
    }

    fn event(reason: &'static str) -> impl Fn(&Value) + Send {
        move |body| assert_eq!(body["reason"], reason, "{body:#}")
    }

    /// Capsule calls the agent saw (its own session calls left out).
    fn capsule_calls(a: &crate::agent::fake::FakeNodeAgent) -> Vec<(&'static str, String)> {
        a.calls()
            .into_iter()
            .filter(|(c, _)| !matches!(*c, "WatchEvents" | "ListCapsules" | "NodeInfo"))
            .collect()
    }

    #[tokio::test]
    async fn a_new_capsule_is_placed_recorded_then_created_in_one_reconcile() {
        let node = agent("node-a", 4);
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        let cap = capsule(None);
        server
            .expect(Method::GET, TEMPLATE, |_| {}, ok(template()))
            .expect(
                Method::PATCH,
                &format!("{CAPSULES}/c1/status?{SSA}"),
                |body| {
                    phase_is("Scheduled")(body);
                    assert_eq!(body["status"]["nodeName"], "node-a");
                    assert_eq!(condition(body, "Scheduled")["reason"], "Placed");
                },
                ok(cap.clone()),
            )
            .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo)
            .expect(
                Method::PATCH,
                &format!("{CAPSULES}/c1/status?{SSA}"),
                |body| {
                    phase_is("Creating")(body);
                    assert_eq!(body["status"]["resources"]["vcpus"], 1);
                },
                ok(cap.clone()),
            );
        let ctx = context(&server, pool);
        let action = reconcile(Arc::new(cap), ctx).await.unwrap();
        server.done();
        assert_eq!(capsule_calls(&node), vec![("CreateCapsule", "u1".into())]);
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn the_finalizer_goes_on_first_under_the_operators_field_manager() {
        let (pool, _streams) = pool(&[]).await;
        let server = ApiServer::default();
        let mut cap = capsule(None);
        cap.metadata.finalizers = None;
        cap.metadata.resource_version = Some("7".into());
        server.expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1?{SSA}"),
            |body| {
                assert_eq!(body["metadata"]["finalizers"][0], FINALIZER);
                assert_eq!(body["metadata"]["resourceVersion"], "7");
            },
            ok(cap.clone()),
        );
        let action = reconcile(Arc::new(cap), context(&server, pool))
            .await
            .unwrap();
        server.done();
        assert_eq!(action, Action::await_change());
    }

    #[tokio::test]
    async fn a_capsule_no_node_fits_stays_pending_with_a_warning() {
        let node = agent("node-a", 1);
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        let cap = capsule(Some(4));
        server
            .expect(Method::GET, TEMPLATE, |_| {}, ok(template()))
            .expect(
                Method::PATCH,
                &format!("{CAPSULES}/c1/status?{SSA}"),
                |body| {
                    phase_is("Pending")(body);
                    assert_eq!(condition(body, "Scheduled")["reason"], "Unschedulable");
                },
                ok(cap.clone()),
            )
            .expect(Method::POST, EVENTS, event("FailedScheduling"), Reply::Echo);
        let ctx = context(&server, pool);
        let action = reconcile(Arc::new(cap), ctx).await.unwrap();
        server.done();
        assert!(capsule_calls(&node).is_empty());
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn a_missing_template_blocks_the_capsule_without_touching_a_node() {
        let node = agent("node-a", 4);
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        let cap = capsule(None);
        server
            .expect(
                Method::GET,
                TEMPLATE,
                |_| {},
                not_found("capsuletemplates", "base"),
            )
            .expect(
                Method::PATCH,
                &format!("{CAPSULES}/c1/status?{SSA}"),
                |body| {
                    phase_is("Pending")(body);
                    assert_eq!(condition(body, "Scheduled")["reason"], "TemplateNotFound");
                },
                ok(cap.clone()),
            );
        let ctx = context(&server, pool);
        reconcile(Arc::new(cap), ctx).await.unwrap();
        server.done();
        assert!(capsule_calls(&node).is_empty());
    }

    #[tokio::test]
    async fn a_shown_status_is_not_written_again() {
        let node = agent("node-a", 4);
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server.expect(
            Method::GET,
            TEMPLATE,
            |_| {},
            not_found("capsuletemplates", "base"),
        );
        // What an earlier reconcile wrote, as the API server stores it.
        let facts = Facts {
            mode: OperatingMode::Running,
            node: None,
            phase: None,
            vm: Observed::Absent,
            source: SourceState::Blocked(
                Reason::TemplateNotFound,
                "CapsuleTemplate base not found in namespace ns".into(),
            ),
            expired: None,
            egress: crate::plan::EgressPolicy::default(),
        };
        let draft = plan_capsule(&facts).status.unwrap();
        let written = build_capsule_status(&draft, None, Some(1), None, Timestamp::now());
        let mut cap = capsule(None);
        cap.status = Some(serde_json::from_value(serde_json::to_value(&written).unwrap()).unwrap());
        reconcile(Arc::new(cap), context(&server, pool))
            .await
            .unwrap();
        server.done();
    }
}
