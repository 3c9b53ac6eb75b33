//! The CapsuleTemplate controller. Templates that are warm or ask for
//! `preparation: AllNodes` are prepared on every matching node through the
//! agents' `PrepareTemplate` (which answers at once; the controller polls
//! while nodes prepare). Others are prepared by the agent on demand, when
//! the first capsule lands on a node; for them the controller only reports
//! which nodes hold the disk. Per-node readiness and the phase go to status.
//!
//! The finalizer removes the template's warm snapshots from every node;
//! snapshots of an earlier warm spec are removed on every reconcile.
//!
//! A template whose image names a `pullSecret` is prepared on every
//! matching node: the operator `get`s that Secret by name (never lists or
//! watches Secrets; a namespace owner grants that one Secret), picks the
//! image registry's entry and sends it with each `PrepareTemplate` only.
//! A Secret that is absent, forbidden or unusable is the template's
//! status, looked at again every [`PULL_SECRET_RECHECK`].

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::finalizer::{Event as Finalizer, finalizer};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use wrenn_crds::reason::Reason;
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::{CapsuleTemplateStatus, TemplatePhase};
use wrenn_crds::{CapsuleSnapshot, CapsuleTemplate};

use crate::metrics::{KindLabels, Metrics};
use crate::plan::ConditionDraft;
use crate::pool::{AgentPool, node_labels};
use crate::pull_secret::{Credentials, credentials_for, grant_hint};
use crate::resources::effective;
use crate::status::{self, build_conditions};
use crate::templates::{
    OnNode, build_blocked_status, build_template_status, key_prefix, on_node, prepare_request,
    selects, template_key, warm_id_prefix, warm_snapshot_id,
};

/// A node that failed a build is asked again only after this long: a
/// broken startCommand would otherwise boot a VM every few seconds.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(300);

/// How soon a template whose pull Secret is missing, forbidden or
/// unusable looks again (Secrets are read by name, never watched).
const PULL_SECRET_RECHECK: Duration = Duration::from_secs(20);

/// Errors of one CapsuleTemplate reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a namespace or UID.
    #[error("template without namespace or uid")]
    MissingMetadata,
    /// Reading the template's pull Secret failed (other than absent or
    /// forbidden, which the template's status shows).
    #[error("read pull secret {name}")]
    GetPullSecret {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Reading the referenced snapshot failed.
    #[error("read snapshot {name}")]
    GetSnapshot {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("write template status")]
    Status(#[source] status::Error),
    /// Adding or removing the finalizer failed.
    #[error("template finalizer")]
    Finalizer(#[source] Box<crate::finalizer::Error<Error>>),
}

impl Error {
    /// Label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingMetadata => "invalid",
            Error::GetSnapshot { .. } | Error::GetPullSecret { .. } => "api",
            Error::Status(_) => "status",
            Error::Finalizer(e) => e.category(Error::category),
        }
    }
}

/// A build on a node: (template uid, generation, node).
type BuildMemo = (String, i64, String);

/// What the template controller needs.
pub struct Ctx {
    client: Client,
    pool: AgentPool,
    nodes: Store<Node>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// (template uid, generation, node) → when its build was seen failing,
    /// and a keyed hash of the credentials it was asked with.
    failures: Mutex<HashMap<BuildMemo, (Instant, u64)>>,
    /// The operator's user as the API server knows it, named in the
    /// command that grants it a pull Secret.
    identity: Option<String>,
    /// Keys the credentials hash (per process: it is never shown).
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("template::Ctx").finish_non_exhaustive()
    }
}

async fn event(ctx: &Ctx, tpl: &CapsuleTemplate, type_: EventType, reason: Reason, note: String) {
    super::publish(&ctx.recorder, &tpl.object_ref(&()), type_, reason, note).await;
}

/// Asks `node` to prepare the template (or how far it got). A failed
/// build is retried [`RETRY_FAILED_AFTER`] after the operator first saw it
/// fail, or at once when the pull Secret's credentials changed since.
async fn prepare_on(
    ctx: &Ctx,
    memo: (String, i64, String),
    mut req: wrenn_proto::agent::v1::PrepareTemplateRequest,
) -> OnNode {
    let node = memo.2.clone();
    let Some(client) = ctx.pool.client(&node) else {
        return OnNode::Preparing("waiting for the node agent".into());
    };
    let creds = req
        .registry_credentials
        .as_ref()
        .map_or(0, |c| ctx.hasher.hash_one((&c.username, &c.password)));
    req.retry = ctx
        .failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&memo)
        .is_some_and(|(at, asked)| at.elapsed() >= RETRY_FAILED_AFTER || *asked != creds);
    let retried = req.retry;
    let on = match client.prepare_template(req).await {
        Ok(state) => on_node(&state),
        Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => {
            OnNode::Failed(Reason::InvalidSpec, e.agent_message())
        }
        // Unreachable for now: the next reconcile asks again.
        Err(e) => return OnNode::Preparing(format!("node agent unreachable: {e}")),
    };
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    match &on {
        OnNode::Failed(..) => {
            let (at, asked) = failures
                .entry(memo)
                .or_insert_with(|| (Instant::now(), creds));
            if retried {
                // The retry was asked for just now: count from here.
                *at = Instant::now();
                *asked = creds;
            }
        }
        _ => {
            failures.remove(&memo);
        }
    }
    on
}

/// Removes this template's warm snapshots other than `keep` from `node`.
async fn remove_warm(ctx: &Ctx, node: &str, uid: &str, keep: Option<&str>) {
    let prefix = warm_id_prefix(uid);
    let (Some(info), Some(client)) = (ctx.pool.info(node), ctx.pool.client(node)) else {
        return;
    };
    for id in info.snapshots.iter().filter(|id| id.starts_with(&prefix)) {
        if Some(id.as_str()) == keep {
            continue;
        }
        match client.delete_snapshot(id.clone()).await {
            Ok(_) => tracing::info!(node, snapshot = %id, "removed a stale warm snapshot"),
            Err(e) => tracing::warn!(
                node,
                snapshot = %id,
                error = &e as &dyn std::error::Error,
                "remove warm snapshot"
            ),
        }
    }
}

/// The registry credentials of the template's pull Secret: `Ok(None)`
/// without one, `Ok(Err(..))` when the template cannot be pulled as it
/// stands (Secret absent, not readable by the operator, or unusable).
/// Only a `get` by name: the operator never lists or watches Secrets.
async fn pull_credentials(
    tpl: &CapsuleTemplate,
    ns: &str,
    ctx: &Ctx,
) -> Result<Option<Result<Credentials, (Reason, String)>>, Error> {
    let (Some(name), Some(image)) = (tpl.spec.pull_secret(), &tpl.spec.source.image) else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = match api.get(name).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Ok(Some(Err((
                Reason::PullSecretNotFound,
                format!("pull Secret {name} not found in namespace {ns}"),
            ))));
        }
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Ok(Some(Err((
                Reason::PullSecretForbidden,
                format!(
                    "the operator may not read pull Secret {name}; a namespace owner grants it that Secret alone with: {}",
                    grant_hint(ns, name, ctx.identity.as_deref())
                ),
            ))));
        }
        Err(source) => {
            return Err(Error::GetPullSecret {
                name: name.to_string(),
                source,
            });
        }
    };
    Ok(Some(
        credentials_for(name, &secret, &image.reference).map_err(|e| (e.reason(), e.to_string())),
    ))
}

/// Writes `next` (with condition `cond`) when it differs from the
/// template's status, with an Event when the phase changes.
async fn write_status(
    tpl: &CapsuleTemplate,
    ns: &str,
    ctx: &Ctx,
    mut next: CapsuleTemplateStatus,
    cond: ConditionDraft,
) -> Result<(), Error> {
    let current = tpl.status.clone().unwrap_or_default();
    next.observed_generation = tpl.metadata.generation;
    next.conditions = build_conditions(
        std::slice::from_ref(&cond),
        &current.conditions,
        tpl.metadata.generation,
        Timestamp::now(),
    );
    if tpl.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let api: Api<CapsuleTemplate> = Api::namespaced(ctx.client.clone(), ns);
    status::apply_status(&api, tpl, &next)
        .await
        .map_err(Error::Status)?;
    ctx.metrics
        .status_writes
        .get_or_create(&KindLabels {
            kind: "CapsuleTemplate",
        })
        .inc();
    if current.phase != next.phase {
        let type_ = match next.phase {
            Some(TemplatePhase::Failed) => EventType::Warning,
            _ => EventType::Normal,
        };
        event(ctx, tpl, type_, cond.reason, cond.message).await;
    }
    Ok(())
}

async fn apply(tpl: &CapsuleTemplate, ns: &str, ctx: &Ctx) -> Result<Action, Error> {
    let name = tpl.name_any();
    let uid = tpl.uid().ok_or(Error::MissingMetadata)?;
    let credentials = match pull_credentials(tpl, ns, ctx).await? {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err((reason, message))) => {
            let (next, cond) = build_blocked_status(reason, message);
            write_status(tpl, ns, ctx, next, cond).await?;
            // Secrets are not watched: a new Secret or grant is seen on
            // the next look.
            return Ok(Action::requeue(PULL_SECRET_RECHECK));
        }
    };
    let generation = tpl.metadata.generation.unwrap_or_default();
    let key = template_key(ns, &name, &uid);
    let prefix = key_prefix(ns, &name);
    let warm_id = warm_snapshot_id(tpl, &uid);
    let everywhere = tpl.spec.prepares_everywhere();
    let shape = effective(None, &tpl.spec.defaults);
    let selected: Vec<String> = ctx
        .pool
        .ready_nodes()
        .into_iter()
        .filter(|n| selects(&tpl.spec.node_selector, &node_labels(&ctx.nodes, n)))
        .collect();
    let mut nodes = Vec::with_capacity(selected.len());
    for node in selected {
        let held = ctx.pool.info(&node).and_then(|i| {
            i.templates
                .iter()
                .find(|(k, _)| k.starts_with(&prefix))
                .map(|(_, d)| d.clone())
        });
        let on = match (&shape, everywhere) {
            (Err(e), true) => OnNode::Failed(Reason::InvalidSpec, e.to_string()),
            (Ok(shape), true) => match prepare_request(tpl, &key, *shape, warm_id.as_deref()) {
                Ok(Some(mut req)) => {
                    req.registry_credentials = credentials.clone();
                    prepare_on(ctx, (uid.clone(), generation, node.clone()), req).await
                }
                Ok(None) => OnNode::Absent,
                Err(e) => OnNode::Failed(Reason::InvalidSpec, e.to_string()),
            },
            (_, false) => match held {
                Some(digest) => OnNode::Ready {
                    digest,
                    snapshot: false,
                },
                None => OnNode::Absent,
            },
        };
        remove_warm(ctx, &node, &uid, warm_id.as_deref()).await;
        nodes.push((node, on));
    }
    let snapshot_ready = match &tpl.spec.source.snapshot_ref {
        Some(r) => {
            let api: Api<CapsuleSnapshot> = Api::namespaced(ctx.client.clone(), ns);
            let s = api
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::GetSnapshot {
                    name: r.name.clone(),
                    source,
                })?;
            Some(
                s.and_then(|s| s.status)
                    .is_some_and(|st| st.phase == Some(SnapshotPhase::Ready)),
            )
        }
        None => None,
    };
    // Dropped here: the credentials went with this reconcile's requests.
    drop(credentials);
    let preparing = nodes.iter().any(|(_, o)| matches!(o, OnNode::Preparing(_)));
    let (next, cond) = build_template_status(&nodes, warm_id.is_some(), snapshot_ready);
    write_status(tpl, ns, ctx, next, cond).await?;
    // A sync re-runs this at once; a lost node or a preparation's end is
    // seen on the next look, soon while nodes are preparing.
    Ok(Action::requeue(if preparing {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(15)
    }))
}

/// Removes the template's warm snapshots from every node that is up. A
/// node that is down keeps its copy: logged, never blocking the delete.
async fn cleanup(tpl: &CapsuleTemplate, ctx: &Ctx) -> Result<Action, Error> {
    let uid = tpl.uid().ok_or(Error::MissingMetadata)?;
    if tpl.spec.warm.is_none() {
        return Ok(Action::await_change());
    }
    for node in ctx.pool.ready_nodes() {
        remove_warm(ctx, &node, &uid, None).await;
    }
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(u, _, _), _| *u != uid);
    Ok(Action::await_change())
}

#[tracing::instrument(name = "template.reconcile", skip_all, fields(template = %tpl.name_any(), namespace = tpl.namespace().unwrap_or_default(), uid = tpl.uid().unwrap_or_default()))]
async fn reconcile(tpl: Arc<CapsuleTemplate>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = tpl.namespace().ok_or(Error::MissingMetadata)?;
    let api: Api<CapsuleTemplate> = Api::namespaced(ctx.client.clone(), &ns);
    let reconcile = finalizer(&api, tpl, |ev| async {
        match ev {
            Finalizer::Apply(t) => apply(&t, &ns, &ctx).await,
            Finalizer::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    });
    super::timed(&ctx.metrics, "CapsuleTemplate", reconcile)
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn error_policy(_: Arc<CapsuleTemplate>, err: &Error, ctx: Arc<Ctx>) -> Action {
    super::requeue_failed(
        &ctx.metrics,
        "CapsuleTemplate",
        err.category(),
        err,
        "template reconcile failed",
    )
}

/// Runs the CapsuleTemplate controller until `shutdown`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    pool: AgentPool,
    nodes: Store<Node>,
    metrics: Arc<Metrics>,
    identity: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let recorder = super::recorder(client.clone(), None);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pool,
        nodes,
        metrics,
        recorder,
        failures: Mutex::new(HashMap::new()),
        identity,
        hasher: std::hash::RandomState::new(),
    });
    let api: Api<CapsuleTemplate> = super::scoped(&client, namespace.as_deref());
    // A template's status counts the ready nodes: an agent that syncs
    // changes it without any event on the template.
    let syncs = ctx.pool.syncs_from_now().map(|_| ());
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(syncs)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests;
