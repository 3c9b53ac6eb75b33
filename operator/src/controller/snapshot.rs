//! The CapsuleSnapshot controller: once its capsule runs (or is paused) on
//! a reachable node, ask that node's agent to snapshot it (the agent pauses
//! briefly and returns the capsule to its prior mode), then record size,
//! node and compatibility. Its finalizer removes the files on the node
//! unless `deletionPolicy: Retain`.

use std::sync::Arc;
use std::time::Duration;

use crate::finalizer::{Event as Finalizer, finalizer};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use wrenn_crds::capsule::CapsulePhase;

use wrenn_crds::reason::{ConditionType, Reason};
use wrenn_crds::snapshot::{
    CapsuleSnapshotStatus, Compatibility, DeletionPolicy, SnapshotPhase, SourceCapsule,
};
use wrenn_crds::{Capsule, CapsuleSnapshot};
use wrenn_proto::agent::v1 as pb;

use crate::agent;
use crate::metrics::{KindLabels, Metrics};
use crate::plan::ConditionDraft;
use crate::pool::AgentPool;
use crate::resources::format_bytes;
use crate::status::{self, build_conditions};

/// Errors of one CapsuleSnapshot reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a UID or namespace.
    #[error("snapshot without uid or namespace")]
    MissingMetadata,
    /// Reading the capsule failed.
    #[error("read capsule {name}")]
    GetCapsule {
        /// Capsule name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The agent failed transiently.
    #[error("{action} snapshot {id}")]
    Agent {
        /// What was asked.
        action: &'static str,
        /// Snapshot UID.
        id: String,
        /// Why.
        #[source]
        source: agent::Error,
    },
    /// The node holding the files cannot be reached.
    #[error("node {node} unreachable")]
    NodeUnreachable {
        /// The node.
        node: String,
    },
    /// Writing status failed.
    #[error("write snapshot status")]
    Status(#[source] status::Error),
    /// The finalizer failed.
    #[error("finalizer of snapshot")]
    Finalizer(#[source] Box<crate::finalizer::Error<Error>>),
}

impl Error {
    /// Label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingMetadata => "invalid",
            Error::GetCapsule { .. } => "api",
            Error::Agent { .. } => "agent",
            Error::NodeUnreachable { .. } => "node-unreachable",
            Error::Status(_) => "status",
            Error::Finalizer(e) => e.category(Error::category),
        }
    }
}

/// What the snapshot controller needs.
pub struct Ctx {
    client: Client,
    pool: AgentPool,
    metrics: Arc<Metrics>,
    recorder: Recorder,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("snapshot::Ctx").finish_non_exhaustive()
    }
}

fn ready_cond(ok: bool, reason: Reason, message: String) -> ConditionDraft {
    ConditionDraft::new(ConditionType::Ready, ok, reason, message)
}

async fn write(
    ctx: &Ctx,
    api: &Api<CapsuleSnapshot>,
    snap: &CapsuleSnapshot,
    mut next: CapsuleSnapshotStatus,
    cond: ConditionDraft,
) -> Result<bool, Error> {
    let current = snap.status.clone().unwrap_or_default();
    next.observed_generation = snap.meta().generation;
    next.conditions = build_conditions(
        &[cond],
        &current.conditions,
        snap.meta().generation,
        Timestamp::now(),
    );
    if snap.status.as_ref() == Some(&next) {
        return Ok(false);
    }
    status::apply_status(api, snap, &next)
        .await
        .map_err(Error::Status)?;
    ctx.metrics
        .status_writes
        .get_or_create(&KindLabels {
            kind: "CapsuleSnapshot",
        })
        .inc();
    Ok(true)
}

async fn event(ctx: &Ctx, snap: &CapsuleSnapshot, type_: EventType, reason: Reason, note: String) {
    super::publish(&ctx.recorder, &snap.object_ref(&()), type_, reason, note).await;
}

fn pending(message: String) -> (CapsuleSnapshotStatus, ConditionDraft) {
    (
        CapsuleSnapshotStatus {
            phase: Some(SnapshotPhase::Pending),
            ready_to_use: Some(false),
            ..Default::default()
        },
        ready_cond(false, Reason::Pending, message),
    )
}

/// Why a snapshot cannot be taken yet: the Pending message and when to look again.
struct Wait {
    message: String,
    requeue: Duration,
}

/// The node the capsule runs on and the capsule's identity, or why the
/// snapshot must wait for it.
fn plan_node(name: &str, cap: Option<&Capsule>) -> Result<(String, SourceCapsule), Wait> {
    let Some(cap) = cap else {
        return Err(Wait {
            message: format!("capsule {name} not found"),
            requeue: Duration::from_secs(10),
        });
    };
    let cst = cap.status.as_ref();
    match (
        cst.and_then(|s| s.node_name.clone()),
        cst.and_then(|s| s.phase),
    ) {
        (Some(n), Some(CapsulePhase::Running | CapsulePhase::Paused)) => Ok((
            n,
            SourceCapsule {
                uid: cap.uid().unwrap_or_default(),
                generation: cap.meta().generation.unwrap_or(0),
            },
        )),
        _ => Err(Wait {
            message: format!("waiting for capsule {name} to run"),
            requeue: Duration::from_secs(5),
        }),
    }
}

/// Status while the node writes the snapshot.
fn build_in_progress(node: &str, source: SourceCapsule) -> (CapsuleSnapshotStatus, ConditionDraft) {
    (
        CapsuleSnapshotStatus {
            phase: Some(SnapshotPhase::InProgress),
            ready_to_use: Some(false),
            node_name: Some(node.to_string()),
            source_capsule: Some(source),
            ..Default::default()
        },
        ready_cond(
            false,
            Reason::Snapshotting,
            format!("writing on node {node}"),
        ),
    )
}

/// Status of a snapshot the node has written.
fn build_taken(
    node: &str,
    source: SourceCapsule,
    s: pb::Snapshot,
) -> (CapsuleSnapshotStatus, ConditionDraft) {
    let vmm = s.vmm.unwrap_or_default();
    let res = s.resources.unwrap_or_default();
    (
        CapsuleSnapshotStatus {
            phase: Some(SnapshotPhase::Ready),
            ready_to_use: Some(true),
            node_name: Some(node.to_string()),
            size_bytes: i64::try_from(s.size_bytes).ok(),
            created_at: Timestamp::from_nanosecond(s.created_unix_nanos.into())
                .ok()
                .map(Time),
            compatibility: Some(Compatibility {
                vmm: vmm.name,
                vmm_version: vmm.version,
                cpu_model: s.cpu_model,
                vcpus: res.vcpus,
                memory: Some(Quantity(format_bytes(res.memory_bytes))),
            }),
            source_capsule: Some(source),
            ..Default::default()
        },
        ready_cond(
            true,
            Reason::SnapshotTaken,
            format!("{} on node {node}", format_bytes(s.size_bytes)),
        ),
    )
}

/// Status of a snapshot the node refused for good.
fn build_failed(node: String, message: String) -> (CapsuleSnapshotStatus, ConditionDraft) {
    (
        CapsuleSnapshotStatus {
            phase: Some(SnapshotPhase::Failed),
            ready_to_use: Some(false),
            node_name: Some(node),
            ..Default::default()
        },
        ready_cond(false, Reason::NodeError, message),
    )
}

/// Whether the agent's answer will not change on a retry.
fn is_permanent(e: &agent::Error) -> bool {
    matches!(
        e.code(),
        Some(
            tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::NotFound
                | tonic::Code::ResourceExhausted
        )
    )
}

async fn apply(snap: &CapsuleSnapshot, ns: &str, ctx: &Ctx) -> Result<Action, Error> {
    let id = snap.uid().ok_or(Error::MissingMetadata)?;
    let api: Api<CapsuleSnapshot> = Api::namespaced(ctx.client.clone(), ns);
    let phase = snap.status.as_ref().and_then(|s| s.phase);
    if matches!(phase, Some(SnapshotPhase::Ready | SnapshotPhase::Failed)) {
        return Ok(Action::await_change());
    }
    let caps: Api<Capsule> = Api::namespaced(ctx.client.clone(), ns);
    let name = &snap.spec.capsule_name;
    let cap = caps
        .get_opt(name)
        .await
        .map_err(|source| Error::GetCapsule {
            name: name.clone(),
            source,
        })?;
    let target = match plan_node(name, cap.as_ref()) {
        Ok((node, source)) => match ctx.pool.client(&node) {
            Some(client) => Ok((node, source, client)),
            None => Err(Wait {
                message: format!("node {node} unreachable"),
                requeue: Duration::from_secs(10),
            }),
        },
        Err(wait) => Err(wait),
    };
    let (node, source, client) = match target {
        Ok(found) => found,
        Err(Wait { message, requeue }) => {
            let (s, c) = pending(message);
            write(ctx, &api, snap, s, c).await?;
            return Ok(Action::requeue(requeue));
        }
    };
    let (s, c) = build_in_progress(&node, source.clone());
    write(ctx, &api, snap, s, c).await?;
    let taken = client
        .snapshot_capsule(pb::SnapshotCapsuleRequest {
            uid: source.uid.clone(),
            snapshot: Some(pb::SnapshotRef { id: id.clone() }),
            memory: snap.spec.memory,
        })
        .await;
    // The status write above changed the object; write on top of it.
    let snap_now = api
        .get(&snap.name_any())
        .await
        .unwrap_or_else(|_| snap.clone());
    match taken {
        Ok(s) => {
            let (s, c) = build_taken(&node, source, s);
            write(ctx, &api, &snap_now, s, c).await?;
            let note = format!("snapshot of {name} on node {node}");
            event(ctx, snap, EventType::Normal, Reason::Ready, note).await;
            Ok(Action::await_change())
        }
        Err(e) if is_permanent(&e) => {
            let msg = e.agent_message();
            let (s, c) = build_failed(node, msg.clone());
            write(ctx, &api, &snap_now, s, c).await?;
            event(ctx, snap, EventType::Warning, Reason::Failed, msg).await;
            Ok(Action::await_change())
        }
        Err(source) => Err(Error::Agent {
            action: "take",
            id,
            source,
        }),
    }
}

async fn cleanup(snap: &CapsuleSnapshot, ctx: &Ctx) -> Result<Action, Error> {
    let id = snap.uid().ok_or(Error::MissingMetadata)?;
    let Some(node) = snap.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Action::await_change());
    };
    if snap.spec.deletion_policy == DeletionPolicy::Retain {
        return Ok(Action::await_change());
    }
    let client = ctx
        .pool
        .client(&node)
        .ok_or(Error::NodeUnreachable { node })?;
    client
        .delete_snapshot(id.clone())
        .await
        .map_err(|source| Error::Agent {
            action: "delete",
            id,
            source,
        })?;
    Ok(Action::await_change())
}

/// One reconcile of a CapsuleSnapshot, inside its finalizer.
#[tracing::instrument(name = "snapshot.reconcile", skip_all, fields(snapshot = %snap.name_any(), namespace = snap.namespace().unwrap_or_default(), uid = snap.uid().unwrap_or_default()))]
pub async fn reconcile(snap: Arc<CapsuleSnapshot>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = snap.namespace().ok_or(Error::MissingMetadata)?;
    let api: Api<CapsuleSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let reconcile = finalizer(&api, snap, |ev| async {
        match ev {
            Finalizer::Apply(s) => apply(&s, &ns, &ctx).await,
            Finalizer::Cleanup(s) => cleanup(&s, &ctx).await,
        }
    });
    super::timed(&ctx.metrics, "CapsuleSnapshot", reconcile)
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn error_policy(_: Arc<CapsuleSnapshot>, err: &Error, ctx: Arc<Ctx>) -> Action {
    super::requeue_failed(
        &ctx.metrics,
        "CapsuleSnapshot",
        err.category(),
        err,
        "snapshot reconcile failed",
    )
}

/// Runs the CapsuleSnapshot controller until `shutdown`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    pool: AgentPool,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let recorder = super::recorder(client.clone(), None);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pool,
        metrics,
        recorder,
    });
    let snaps: Api<CapsuleSnapshot> = super::scoped(&client, namespace.as_deref());
    let caps: Api<Capsule> = super::scoped(&client, namespace.as_deref());
    let controller = Controller::new(snaps, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(caps, watcher::Config::default(), move |c| {
            let ns = c.namespace();
            let name = c.name_any();
            store
                .state()
                .into_iter()
                .filter(move |s| s.namespace() == ns && s.spec.capsule_name == name)
                .map(|s| kube::runtime::reflector::ObjectRef::from_obj(&*s))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests;
