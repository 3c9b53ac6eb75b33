//! The Capsule controller: resolve the source, plan, act on the node agent,
//! write status, all inside the `wrenn.dev/node-cleanup` finalizer. Also the
//! convergence sweep run whenever an agent (re)syncs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use wrenn_crds::capsule::{CapsulePhase, CapsuleStatus, Usage};
use wrenn_crds::names::{FINALIZER, reason};
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::{TemplateDefaults, TemplatePhase};
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};
use wrenn_proto::agent::v1 as pb;

use super::Context;
use crate::agent::{self, to_vm};
use crate::metrics::{ErrorLabels, KindLabels};
use crate::placement::{Request, SnapshotNeed, TemplateNeed, plan_placement};
use crate::plan::{
    ConditionDraft, Expiry, Facts, NodeAction, Observed, SourceState, StatusDraft, Vm,
    plan_capsule, plan_expiry,
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
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
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
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "finalizer",
            },
        }
    }
}

/// Where a capsule boots from, resolved.
struct Source {
    state: SourceState,
    resources: Resources,
    boot: Option<pb::BootSource>,
    template_key: Option<(String, bool)>,
    /// The template's own nodeSelector.
    template_selector: BTreeMap<String, String>,
    snapshot: Option<(String, String)>,
    /// A warm template's snapshot id: any node holding it will do.
    warm: Option<String>,
    kernel: (String, String),
}

fn blocked(why: &'static str, message: String) -> Source {
    Source {
        state: SourceState::Blocked(why, message),
        resources: Resources::default(),
        boot: None,
        template_key: None,
        template_selector: BTreeMap::new(),
        snapshot: None,
        warm: None,
        kernel: Default::default(),
    }
}

async fn resolve(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Source, Error> {
    let src = &cap.spec.source;
    if let Some(t) = &src.template_ref {
        let api: Api<CapsuleTemplate> = Api::namespaced(ctx.client.clone(), ns);
        let tpl = api.get_opt(&t.name).await.map_err(|source| Error::Get {
            kind: "CapsuleTemplate",
            name: t.name.clone(),
            source,
        })?;
        let Some(tpl) = tpl else {
            return Ok(blocked(
                reason::TEMPLATE_NOT_FOUND,
                format!("CapsuleTemplate {} not found in namespace {ns}", t.name),
            ));
        };
        if tpl.status.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Failed) {
            return Ok(blocked(
                reason::TEMPLATE_NOT_FOUND,
                format!("CapsuleTemplate {} failed to prepare", t.name),
            ));
        }
        let resources = match effective(cap.spec.resources.as_ref(), &tpl.spec.defaults) {
            Ok(r) => r,
            Err(e) => return Ok(blocked(reason::INVALID_SPEC, e.to_string())),
        };
        let Some(disk) = templates::disk_source(&tpl) else {
            return Ok(blocked(
                reason::INVALID_SPEC,
                format!(
                    "CapsuleTemplate {} restores a snapshot; use snapshotRef on the capsule",
                    t.name
                ),
            ));
        };
        let Some(tpl_uid) = tpl.uid() else {
            return Err(Error::MissingMetadata);
        };
        let template_selector = tpl.spec.node_selector.clone();
        if let Some(id) = templates::warm_snapshot_id(&tpl, &tpl_uid) {
            let st = tpl.status.as_ref();
            if st.and_then(|s| s.phase) != Some(TemplatePhase::Ready) {
                let why = st
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| format!(": {}", c.message))
                    .unwrap_or_default();
                return Ok(blocked(
                    reason::WARM_SNAPSHOT_NOT_READY,
                    format!("CapsuleTemplate {} has no warm snapshot yet{why}", t.name),
                ));
            }
            // A warm template's capsules restore its snapshot, whose memory
            // fixes vCPUs and memory; booting cold instead would silently
            // skip the startCommand the user asked for.
            let shape = match effective(None, &tpl.spec.defaults) {
                Ok(r) => r,
                Err(e) => return Ok(blocked(reason::INVALID_SPEC, e.to_string())),
            };
            if (resources.vcpus, resources.memory_bytes) != (shape.vcpus, shape.memory_bytes) {
                return Ok(blocked(
                    reason::INVALID_SPEC,
                    format!(
                        "CapsuleTemplate {} is warm: its capsules restore a snapshot taken with {} vCPUs and {} of memory; leave spec.resources.vcpus and memory unset or equal",
                        t.name,
                        shape.vcpus,
                        format_bytes(shape.memory_bytes)
                    ),
                ));
            }
            return Ok(Source {
                state: SourceState::Usable,
                resources,
                boot: Some(pb::BootSource {
                    source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
                        id: id.clone(),
                    })),
                }),
                template_key: None,
                template_selector,
                snapshot: None,
                warm: Some(id),
                kernel: Default::default(),
            });
        }
        let digest = tpl
            .status
            .as_ref()
            .and_then(|s| s.digest.clone())
            .unwrap_or_default();
        return Ok(Source {
            state: SourceState::Usable,
            resources,
            boot: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: templates::template_key(ns, &t.name, &tpl_uid),
                    disk: Some(disk),
                    digest,
                    disk_bytes: resources.disk_bytes,
                })),
            }),
            template_key: Some((templates::key_prefix(ns, &t.name), true)),
            template_selector,
            snapshot: None,
            warm: None,
            kernel: templates::kernel(&tpl),
        });
    }
    let Some(s) = &src.snapshot_ref else {
        return Ok(blocked(reason::INVALID_SPEC, "no source".into()));
    };
    let api: Api<CapsuleSnapshot> = Api::namespaced(ctx.client.clone(), ns);
    let snap = api.get_opt(&s.name).await.map_err(|source| Error::Get {
        kind: "CapsuleSnapshot",
        name: s.name.clone(),
        source,
    })?;
    let ready = snap.as_ref().and_then(|snap| {
        let st = snap.status.as_ref()?;
        (st.phase == Some(SnapshotPhase::Ready))
            .then(|| (snap.uid(), st.node_name.clone(), st.compatibility.clone()))
    });
    let Some((Some(id), Some(node), compat)) = ready else {
        return Ok(blocked(
            reason::SNAPSHOT_NOT_READY,
            format!("CapsuleSnapshot {} is not Ready", s.name),
        ));
    };
    let compat = compat.unwrap_or_default();
    let defaults = TemplateDefaults {
        vcpus: compat.vcpus.max(1),
        memory: compat
            .memory
            .unwrap_or_else(|| TemplateDefaults::default().memory),
        ..TemplateDefaults::default()
    };
    let resources = match effective(cap.spec.resources.as_ref(), &defaults) {
        Ok(r) => r,
        Err(e) => return Ok(blocked(reason::INVALID_SPEC, e.to_string())),
    };
    Ok(Source {
        state: SourceState::Usable,
        resources,
        boot: Some(pb::BootSource {
            source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
                id: id.clone(),
            })),
        }),
        template_key: None,
        template_selector: BTreeMap::new(),
        snapshot: Some((node, id)),
        warm: None,
        kernel: Default::default(),
    })
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
        kernel_path: src.kernel.0.clone(),
        kernel_cmdline: src.kernel.1.clone(),
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

/// State the reconcile carries between its steps.
struct Step<'a> {
    cap: &'a Capsule,
    api: Api<Capsule>,
    uid: String,
    current: Option<CapsuleStatus>,
}

impl Step<'_> {
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
        let ready =
            |t: &str| -> Option<&ConditionDraft> { draft.conditions.iter().find(|c| c.type_ == t) };
        let msg = |t: &str| ready(t).map(|c| c.message.clone()).unwrap_or_default();
        let (type_, reason, note) = match draft.phase {
            CapsulePhase::Scheduled => (EventType::Normal, "Scheduled", msg("Scheduled")),
            CapsulePhase::Running => {
                if before == Some(CapsulePhase::Creating)
                    && let Some(created) = age(self.cap.meta().creation_timestamp.as_ref())
                {
                    ctx.metrics.create_to_running.observe(created.as_secs_f64());
                }
                let ip = draft.ip.clone().unwrap_or_default();
                (
                    EventType::Normal,
                    "Running",
                    format!(
                        "running on node {} at {ip}",
                        draft.node.clone().unwrap_or_default()
                    ),
                )
            }
            CapsulePhase::Paused => (EventType::Normal, "Paused", "vCPUs stopped".to_string()),
            CapsulePhase::Suspended => (EventType::Normal, "Suspended", msg("Suspended")),
            CapsulePhase::Failed => (EventType::Warning, "Failed", msg("Ready")),
            CapsulePhase::Expired => (EventType::Normal, "Expired", msg("Ready")),
            CapsulePhase::Pending
                if ready("Scheduled").is_some_and(|c| c.reason == reason::UNSCHEDULABLE) =>
            {
                (EventType::Warning, "FailedScheduling", msg("Scheduled"))
            }
            _ => return,
        };
        ctx.event(&self.cap.object_ref(&()), type_, reason, note)
            .await;
    }
}

/// One reconcile of a Capsule, wrapped in its finalizer.
#[tracing::instrument(skip_all, fields(capsule = %cap.name_any(), namespace = cap.namespace().unwrap_or_default()))]
pub async fn reconcile(cap: Arc<Capsule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cap.namespace().ok_or(Error::MissingMetadata)?;
    let api: Api<Capsule> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, cap, |ev| async {
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

async fn apply(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Action, Error> {
    let uid = cap.uid().ok_or(Error::MissingMetadata)?;
    let api: Api<Capsule> = Api::namespaced(ctx.client.clone(), ns);
    let src = resolve(cap, ns, ctx).await?;
    let current = cap.status.clone();
    let mut node = current
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| ctx.pool.find(&uid));
    let mut phase = current.as_ref().and_then(|s| s.phase);
    let idle = age(current.as_ref().and_then(|s| s.started_at.as_ref()));
    let created = age(cap.meta().creation_timestamp.as_ref()).unwrap_or_default();
    let lifecycle = cap.spec.lifecycle.as_ref();
    let mut expiry = match plan_expiry(lifecycle, created, idle) {
        Ok(e) => e,
        Err(_) => Expiry::Never, // the API server validated the format
    };
    if matches!(expiry, Expiry::Now(_))
        && lifecycle.is_some_and(|l| l.idle_timeout.is_some())
        && let Some(quiet) = quiet_for(ctx, node.as_deref(), &uid).await
    {
        // Only now is the agent asked: activity is not streamed.
        let idle = Some(idle.map_or(quiet, |i| i.min(quiet)));
        expiry = plan_expiry(lifecycle, created, idle).unwrap_or(Expiry::Never);
    }
    let mut step = Step {
        cap,
        api: api.clone(),
        uid: uid.clone(),
        current,
    };
    let mut fresh: Option<Vm> = None;
    let mut requeue = Duration::from_secs(300);
    for _ in 0..4 {
        let observed_vm = match (&fresh, &node) {
            (Some(vm), _) => Some(Some(vm.clone())),
            (None, Some(n)) => ctx.pool.observe(n, &uid),
            (None, None) => Some(None),
        };
        let vm_ref = observed_vm.as_ref();
        let facts = Facts {
            mode: cap.spec.operating_mode,
            node: node.as_deref(),
            phase,
            vm: match vm_ref {
                None => Observed::Unknown,
                Some(None) => Observed::Absent,
                Some(Some(vm)) => Observed::Present(vm),
            },
            source: src.state.clone(),
            expired: match expiry {
                Expiry::Now(on) => Some(on),
                _ => None,
            },
            egress: agent::to_egress(&to_proto_network(cap)),
        };
        let plan = plan_capsule(&facts);
        match plan.action {
            NodeAction::None => {
                if let Some(draft) = &plan.status {
                    step.write(ctx, draft, Some(src.resources).filter(|_| node.is_some()))
                        .await?;
                    requeue = match draft.phase {
                        CapsulePhase::Running => {
                            refresh_usage(&mut step, ctx, node.as_deref()).await?;
                            ctx.settings.usage_interval
                        }
                        CapsulePhase::Paused | CapsulePhase::Suspended | CapsulePhase::Failed => {
                            Duration::from_secs(300)
                        }
                        _ => Duration::from_secs(10),
                    };
                } else {
                    requeue = Duration::from_secs(15);
                }
                break;
            }
            NodeAction::Place => {
                if !ctx.pool.settled(ctx.settings.settle_grace) {
                    return Ok(Action::requeue(Duration::from_millis(500)));
                }
                // A nodeSelector matched before the Node labels are listed
                // would call every node a mismatch and park the capsule as
                // Unschedulable until its next requeue.
                if !cap.spec.node_selector.is_empty()
                    && futures::FutureExt::now_or_never(ctx.nodes.wait_until_ready()).is_none()
                {
                    return Ok(Action::requeue(Duration::from_millis(500)));
                }
                let nodes = ctx.nodes.clone();
                let views = ctx.pool.views(
                    |n| crate::pool::node_labels(&nodes, n),
                    &placed(&ctx.capsules, &uid),
                );
                let req = Request {
                    resources: src.resources,
                    node_selector: Some(&cap.spec.node_selector),
                    template: src.template_key.as_ref().map(|(k, p)| TemplateNeed {
                        key_prefix: k,
                        preparable: *p,
                    }),
                    template_selector: Some(&src.template_selector),
                    warm: src.warm.as_deref(),
                    snapshot: src
                        .snapshot
                        .as_ref()
                        .map(|(n, id)| SnapshotNeed { node: n, id }),
                };
                match plan_placement(&req, &views) {
                    Ok(chosen) => {
                        ctx.pool.reserve(&uid, &chosen, src.resources);
                        let mut draft = plan.status.clone().unwrap_or_else(unreachable_draft);
                        draft.phase = CapsulePhase::Scheduled;
                        draft.node = Some(chosen.clone());
                        for c in &mut draft.conditions {
                            if c.type_ == "Scheduled" {
                                c.status = "True";
                                c.reason = reason::PLACED;
                                c.message = format!("placed on node {chosen}");
                            }
                        }
                        // Recorded before the VM is created: after a crash the
                        // next reconcile creates on this node, never another.
                        step.write(ctx, &draft, Some(src.resources)).await?;
                        node = Some(chosen);
                        phase = Some(CapsulePhase::Scheduled);
                    }
                    Err(why) => {
                        let mut draft = plan.status.clone().unwrap_or_else(unreachable_draft);
                        for c in &mut draft.conditions {
                            if c.type_ == "Scheduled" {
                                c.reason = reason::UNSCHEDULABLE;
                                c.message = why.to_string();
                            }
                        }
                        step.write(ctx, &draft, None).await?;
                        requeue = Duration::from_secs(10);
                        break;
                    }
                }
            }
            NodeAction::Create(mode) => {
                let Some(n) = node.clone() else { break };
                let client = ctx
                    .pool
                    .client(&n)
                    .ok_or_else(|| Error::NodeUnreachable { node: n.clone() })?;
                let req = pb::CreateCapsuleRequest {
                    uid: uid.clone(),
                    spec: Some(to_proto_spec(cap, ns, &src)),
                    initial_state: proto_state(mode),
                };
                match client.create_capsule(req).await {
                    Ok(c) => {
                        ctx.pool.note(&n, c.clone());
                        fresh = Some(to_vm(&c));
                    }
                    Err(e)
                        if matches!(
                            e.code(),
                            Some(
                                tonic::Code::InvalidArgument
                                    | tonic::Code::AlreadyExists
                                    | tonic::Code::FailedPrecondition
                                    | tonic::Code::ResourceExhausted
                            )
                        ) =>
                    {
                        // The node refuses this spec: retrying cannot help.
                        fresh = Some(Vm {
                            state: crate::plan::VmState::Failed,
                            ip: String::new(),
                            vmm: None,
                            started_unix_nanos: 0,
                            message: e.agent_message(),
                            egress: agent::to_egress(&to_proto_network(cap)),
                        });
                    }
                    Err(source) => {
                        return Err(Error::Agent {
                            action: "create",
                            uid,
                            source,
                        });
                    }
                }
                phase = Some(CapsulePhase::Creating);
            }
            NodeAction::Pause | NodeAction::Resume | NodeAction::Suspend => {
                let Some(n) = node.clone() else { break };
                let client = ctx
                    .pool
                    .client(&n)
                    .ok_or_else(|| Error::NodeUnreachable { node: n.clone() })?;
                let (action, call) = match plan.action {
                    NodeAction::Pause => ("pause", client.pause_capsule(uid.clone())),
                    NodeAction::Resume => ("resume", client.resume_capsule(uid.clone())),
                    _ => ("suspend", client.suspend_capsule(uid.clone())),
                };
                let c = call.await.map_err(|source| Error::Agent {
                    action,
                    uid: uid.clone(),
                    source,
                })?;
                ctx.pool.note(&n, c.clone());
                fresh = Some(to_vm(&c));
            }
            NodeAction::UpdateNetwork => {
                let Some(n) = node.clone() else { break };
                let client = ctx
                    .pool
                    .client(&n)
                    .ok_or_else(|| Error::NodeUnreachable { node: n.clone() })?;
                // The status shows the VM as it is, with the previous
                // observedGeneration, until the node answers.
                if let Some(draft) = &plan.status {
                    step.write(ctx, draft, None).await?;
                }
                let c = client
                    .update_network(pb::UpdateNetworkRequest {
                        uid: uid.clone(),
                        network: Some(to_proto_network(cap)),
                    })
                    .await
                    .map_err(|source| Error::Agent {
                        action: "update network of",
                        uid: uid.clone(),
                        source,
                    })?;
                ctx.pool.note(&n, c.clone());
                fresh = Some(to_vm(&c));
            }
            NodeAction::DeleteObject => {
                if let Some(draft) = &plan.status {
                    step.write(ctx, draft, None).await?;
                }
                api.delete(&cap.name_any(), &DeleteParams::default())
                    .await
                    .map_err(|source| Error::DeleteExpired {
                        name: cap.name_any(),
                        source,
                    })?;
                return Ok(Action::await_change());
            }
        }
    }
    if let Expiry::In(left) = expiry {
        requeue = requeue.min(left + Duration::from_millis(200));
    }
    ctx.succeeded(&step.uid);
    Ok(Action::requeue(requeue))
}

fn unreachable_draft() -> StatusDraft {
    StatusDraft {
        phase: CapsulePhase::Pending,
        node: None,
        ip: None,
        started_unix_nanos: None,
        vmm: None,
        conditions: Vec::new(),
        network_pending: false,
    }
}

/// Refreshes `status.usage` from the agent's metrics when older than the interval.
async fn refresh_usage(
    step: &mut Step<'_>,
    ctx: &Context,
    node: Option<&str>,
) -> Result<(), Error> {
    let Some(node) = node else { return Ok(()) };
    let Some(cur) = step.current.clone() else {
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
            uid: step.uid.clone(),
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
    status::apply_status(&step.api, step.cap, &next)
        .await
        .map_err(Error::Status)?;
    ctx.metrics
        .status_writes
        .get_or_create(&KindLabels { kind: "Capsule" })
        .inc();
    step.current = Some(next);
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
            reason::NODE_LOST,
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
            reason::CAPSULE_QUARANTINED,
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
    controller
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
        .for_each(|_| futures::future::ready(()))
        .await;
    converger.abort();
}
