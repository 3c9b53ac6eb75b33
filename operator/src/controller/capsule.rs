//! The Capsule controller: resolve the source, plan, act on the node agent,
//! write status, all inside the `wrenn.dev/node-cleanup` finalizer. Also the
//! convergence sweep run whenever an agent (re)syncs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use wrenn_crds::Capsule;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::names::FINALIZER;
use wrenn_crds::reason::Reason;
use wrenn_proto::agent::v1 as pb;

use super::Context;
use crate::agent;
use crate::finalizer::{Event as Finalizer, finalizer};
use crate::metrics::{ErrorLabels, KindLabels};
use crate::plan::{
    Expiry, Facts, NodeAction, Observed, Requeue, plan_capsule, plan_expiry, plan_requeue,
};
use crate::resources::Resources;
use crate::status;

mod converge;
mod names;
mod pass;
mod publish;
mod run;
mod source;
mod writer;

pub use converge::converge;
use pass::{Known, Next, Pass};
pub use run::run;
use source::{NoUid, Source, fetch_source, to_proto_network, validate_source};
use writer::Writer;

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
    /// Reading, applying or deleting a published Service or EndpointSlice
    /// failed.
    #[error("{action} {kind} {name}")]
    Publish {
        /// `read`, `apply` or `delete`.
        action: &'static str,
        /// Service or EndpointSlice.
        kind: String,
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
            Error::Publish { .. } => "publish",
            Error::Agent { .. } => "agent",
            Error::NodeUnreachable { .. } => "node-unreachable",
            Error::Status(_) => "status",
            Error::Finalizer(e) => e.category(Error::category),
        }
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

/// The capsule with the finalizer this process put on it, when the cached
/// object is the very version the finalizer was added over: an agent's
/// report can trigger a reconcile before the watch brings back that write,
/// and adding it again from the stale version would only conflict. A
/// newer version without it (someone removed it) gets it again.
fn with_own_finalizer(cap: Arc<Capsule>, ctx: &Context) -> Arc<Capsule> {
    let stale = match (cap.uid(), cap.resource_version()) {
        (Some(uid), Some(version)) => ctx.finalized_over(&uid, &version),
        _ => false,
    };
    if crate::finalizer::has(&*cap) || !stale || cap.meta().deletion_timestamp.is_some() {
        return cap;
    }
    let mut own = (*cap).clone();
    own.finalizers_mut().push(FINALIZER.to_string());
    Arc::new(own)
}

/// One reconcile of a Capsule, wrapped in its finalizer.
#[tracing::instrument(name = "capsule.reconcile", skip_all, fields(capsule = %cap.name_any(), namespace = cap.namespace().unwrap_or_default(), uid = cap.uid().unwrap_or_default()))]
pub async fn reconcile(cap: Arc<Capsule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cap.namespace().ok_or(Error::MissingMetadata)?;
    let api: Api<Capsule> = Api::namespaced(ctx.client.clone(), &ns);
    let cap = with_own_finalizer(cap, &ctx);
    let adds_over = cap
        .resource_version()
        .filter(|_| !crate::finalizer::has(&*cap));
    // A new capsule's first reconcile is a chain of writes (finalizer,
    // status): Events yield to it.
    let _writing = adds_over.as_ref().map(|_| ctx.events.writing());
    let result = finalizer(&api, cap, |ev| async {
        match ev {
            Finalizer::Apply(c) => {
                if let (Some(version), Some(uid)) = (adds_over, c.uid()) {
                    ctx.added_finalizer(&uid, &version);
                }
                apply(&c, &ns, &ctx).await
            }
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

/// Passes of plan → act in one reconcile: place, create, show the VM the
/// create returned, show it again once it has booted meanwhile, with one
/// to spare.
const MAX_PASSES: usize = 5;

/// Resolve → validate → plan → act, until a pass has nothing more to do.
#[tracing::instrument(name = "capsule.apply", skip_all)]
async fn apply(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Action, Error> {
    // Resolve (I/O): the source objects, the placement, expiry.
    let uid = cap.uid().ok_or(Error::MissingMetadata)?;
    let fetched = fetch_source(cap, ns, ctx).await?;
    // Validate (pure).
    let src = validate_source(cap, ns, fetched).map_err(|NoUid| Error::MissingMetadata)?;
    let current = ctx.capsule_status(&uid, cap.status.as_ref());
    let mut known = Known {
        // A placement not yet shown in the status (see `Writer::hold`)
        // pins the capsule to its node through the reservation.
        node: current
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .or_else(|| ctx.pool.find(&uid))
            .or_else(|| ctx.pool.reserved(&uid)),
        phase: current.as_ref().and_then(|s| s.phase),
        fresh: None,
    };
    let expiry = expiry(cap, ctx, known.node.as_deref(), &uid).await;
    let network = ctx.with_cluster(cap, |cluster| to_proto_network(cap, cluster));
    let mut w = Writer {
        cap,
        api: Api::namespaced(ctx.client.clone(), ns),
        uid: uid.clone(),
        current,
        announced: Vec::new(),
        held: None,
    };
    let mut passes = passes(ns, ctx, &src, &mut known, &mut w, expiry, &network).await;
    // A placement no later write carried (the create failed) is shown now.
    if let Err(err) = w.write_held(ctx).await {
        match passes {
            Ok(_) => passes = Err(err),
            Err(_) => tracing::warn!(
                error = &err as &dyn std::error::Error,
                "write the placement of a failed reconcile"
            ),
        }
    }
    w.flush(ctx);
    // Published ports follow what the node reports; while nothing is known
    // (agent not synced, e.g. just after an operator restart) they stay as
    // they are rather than lose their endpoint.
    if passes.as_ref().is_ok_and(Result::is_ok)
        && let Some(vm) = known.observe(ctx, &uid)
    {
        publish::ensure_published(ctx, cap, ns, known.node.as_deref(), vm.as_ref()).await?;
    }
    let requeue = match passes? {
        Ok(requeue) => requeue,
        Err(action) => return Ok(action),
    };
    ctx.succeeded(&uid);
    Ok(Action::requeue(plan_requeue(
        requeue,
        expiry,
        ctx.settings.usage_interval,
    )))
}

/// Plan → act until a pass has nothing more to do: `Ok(requeue)` when done
/// (a good reconcile), `Err(action)` to return `action` as it is.
async fn passes(
    ns: &str,
    ctx: &Context,
    src: &Source,
    known: &mut Known,
    w: &mut Writer<'_>,
    expiry: Expiry,
    network: &pb::NetworkPolicy,
) -> Result<Result<Requeue, Action>, Error> {
    let (cap, uid) = (w.cap, w.uid.clone());
    let egress = agent::to_egress(network);
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
            src,
            network,
        };
        let next = match plan.action {
            NodeAction::None => {
                let next = pass.show(w, known).await?;
                // The VM moved on while its status was written (a boot
                // finished): show that now rather than in a reconcile
                // queued behind this one.
                match next {
                    Next::Requeue(r) if known.observe(ctx, &uid) != observed => {
                        requeue = r;
                        Next::Again
                    }
                    next => next,
                }
            }
            NodeAction::Place => pass.place(w, &facts).await?,
            NodeAction::Create(mode) => pass.create(w, mode, known).await?,
            NodeAction::Pause | NodeAction::Resume | NodeAction::Suspend => {
                pass.transition(w, known).await?
            }
            NodeAction::UpdateNetwork => pass.update_network(w, known).await?,
            NodeAction::DeleteObject => pass.delete_object(w).await?,
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
            Next::Return(action) => return Ok(Err(action)),
        }
    }
    Ok(Ok(requeue))
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

async fn cleanup(cap: &Capsule, ctx: &Context) -> Result<Action, Error> {
    let uid = cap.uid().ok_or(Error::MissingMetadata)?;
    ctx.pool.release(&uid);
    ctx.forget_status(&uid);
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

#[cfg(test)]
mod tests;
