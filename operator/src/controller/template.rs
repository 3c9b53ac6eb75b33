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
            Error::Finalizer(e) => match &**e {
                crate::finalizer::Error::ApplyFailed(e)
                | crate::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "finalizer",
            },
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
    // Node readiness changes without an event on the template: look again,
    // soon while nodes are preparing.
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
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::{Method, StatusCode};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::Value;
    use wrenn_crds::names::FINALIZER;
    use wrenn_crds::template::{Preparation, Readiness, TemplateSource, WarmSpec};
    use wrenn_proto::agent::v1 as pb;

    use super::*;
    use crate::agent::fake::FakeNodeAgent;
    use crate::fixtures::{ApiServer, Reply, agent, ok, pool};

    const TPL: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsuletemplates/base";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
    const STATUS: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsuletemplates/base/status?fieldManager=wrenn-operator";
    const KEY: &str = "ns/base@t1";

    fn ctx(server: &ApiServer, pool: AgentPool) -> Arc<Ctx> {
        let client = server.client();
        let (nodes, _) = kube::runtime::reflector::store();
        Arc::new(Ctx {
            recorder: super::super::recorder(client.clone(), None),
            client,
            pool,
            nodes,
            metrics: Arc::new(Metrics::new(
                &mut prometheus_client::registry::Registry::default(),
            )),
            failures: Mutex::new(HashMap::new()),
            identity: Some("system:serviceaccount:wrenn:wrenn-operator".into()),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// Template `base` (uid `t1`) from an image, finalizer on.
    fn template(preparation: Option<Preparation>, warm: bool) -> CapsuleTemplate {
        let mut t = crate::fixtures::template();
        t.spec.preparation = preparation;
        t.spec.warm = warm.then(|| WarmSpec {
            start_command: vec!["serve".into()],
            readiness: Readiness {
                tcp_port: Some(8080),
                ..Default::default()
            },
        });
        t.metadata.generation = Some(1);
        t.metadata.resource_version = Some("5".into());
        t.metadata.finalizers = Some(vec![FINALIZER.into()]);
        t
    }

    /// Checks the status body: phase and the Ready condition's reason.
    fn shows(phase: &'static str, reason: Reason) -> impl Fn(&Value) + Send {
        move |body| {
            assert_eq!(body["status"]["phase"], phase, "{body:#}");
            let ready = &body["status"]["conditions"][0];
            assert_eq!(ready["reason"], reason.as_str(), "{body:#}");
        }
    }

    fn event(type_: &'static str, reason: Reason) -> impl Fn(&Value) + Send {
        move |body| {
            assert_eq!(body["type"], type_, "{body:#}");
            assert_eq!(body["reason"], reason.as_str(), "{body:#}");
        }
    }

    /// Waits until the fake's build of [`KEY`] ended (its spawned task).
    async fn built(a: &FakeNodeAgent) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while a
            .templates()
            .get(KEY)
            .is_none_or(|t| t.phase == pb::TemplatePhase::Preparing as i32)
        {
            assert!(Instant::now() < deadline, "the fake never built {KEY}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn quick_agent() -> Arc<FakeNodeAgent> {
        FakeNodeAgent::new(
            "node-a",
            pb::Resources {
                vcpus: 4,
                memory_bytes: 8 << 30,
                disk_bytes: 100 << 30,
            },
            Duration::ZERO,
        )
    }

    #[tokio::test]
    async fn an_on_demand_template_is_ready_without_asking_any_node_and_looked_at_in_15s() {
        let node = agent("node-a", 4);
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server
            .expect(
                Method::PATCH,
                STATUS,
                |body| {
                    shows("Ready", Reason::PreparedOnDemand)(body);
                    assert_eq!(body["status"]["nodes"][0]["name"], "node-a");
                    assert_eq!(body["status"]["nodes"][0]["ready"], false);
                },
                ok(template(None, false)),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Normal", Reason::PreparedOnDemand),
                Reply::Echo,
            );
        let tpl = Arc::new(template(None, false));
        let action = reconcile(tpl, ctx(&server, pool)).await.unwrap();
        server.done();
        assert!(node.work_calls().is_empty());
        assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    }

    #[tokio::test]
    async fn a_template_for_all_nodes_is_prepared_polled_every_3s_then_ready() {
        let node = quick_agent();
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server
            .expect(
                Method::PATCH,
                STATUS,
                shows("Preparing", Reason::Preparing),
                ok(template(Some(Preparation::AllNodes), false)),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Normal", Reason::Preparing),
                Reply::Echo,
            );
        let ctx = ctx(&server, pool);
        let tpl = Arc::new(template(Some(Preparation::AllNodes), false));
        let first = reconcile(tpl.clone(), ctx.clone()).await.unwrap();
        server.done();
        assert_eq!(first, Action::requeue(Duration::from_secs(3)));
        built(&node).await;
        server
            .expect(
                Method::PATCH,
                STATUS,
                |body| {
                    shows("Ready", Reason::TemplateCached)(body);
                    assert_eq!(body["status"]["digest"], "sha256:fake");
                    assert_eq!(body["status"]["nodes"][0]["ready"], true);
                },
                ok(template(Some(Preparation::AllNodes), false)),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Normal", Reason::TemplateCached),
                Reply::Echo,
            );
        let second = reconcile(tpl, ctx).await.unwrap();
        server.done();
        assert_eq!(
            node.work_calls(),
            vec![
                ("PrepareTemplate", KEY.into()),
                ("PrepareTemplate", KEY.into())
            ]
        );
        assert_eq!(second, Action::requeue(Duration::from_secs(15)));
    }

    #[tokio::test]
    async fn a_build_every_node_fails_fails_the_template_with_the_agents_reason() {
        let node = quick_agent();
        node.fail_templates("ns/base@", "port 8080 refused connections");
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server
            .expect(
                Method::PATCH,
                STATUS,
                shows("Preparing", Reason::Preparing),
                ok(template(None, true)),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Normal", Reason::Preparing),
                Reply::Echo,
            );
        let ctx = ctx(&server, pool);
        let tpl = Arc::new(template(None, true));
        reconcile(tpl.clone(), ctx.clone()).await.unwrap();
        built(&node).await;
        server
            .expect(
                Method::PATCH,
                STATUS,
                |body| {
                    shows("Failed", Reason::PreparationFailed)(body);
                    assert_eq!(
                        body["status"]["nodes"][0]["message"],
                        "ReadinessTimeout: port 8080 refused connections"
                    );
                },
                ok(template(None, true)),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Warning", Reason::PreparationFailed),
                Reply::Echo,
            );
        let action = reconcile(tpl, ctx).await.unwrap();
        server.done();
        assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    }

    #[tokio::test]
    async fn deleting_a_warm_template_removes_only_its_snapshots_then_the_finalizer() {
        let node = agent("node-a", 4);
        node.insert_snapshot("w-t1-0123456789abcdef");
        node.insert_snapshot("w-t2-0123456789abcdef");
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server.expect(
            Method::PATCH,
            &format!("{TPL}?fieldManager=wrenn-operator"),
            |body| {
                assert_eq!(body["metadata"]["finalizers"], serde_json::json!([]));
                assert_eq!(body["metadata"]["resourceVersion"], "5");
            },
            ok(template(None, true)),
        );
        let mut tpl = template(None, true);
        tpl.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let action = reconcile(Arc::new(tpl), ctx(&server, pool)).await.unwrap();
        server.done();
        assert_eq!(
            node.work_calls(),
            vec![("DeleteSnapshot", "w-t1-0123456789abcdef".into())]
        );
        assert_eq!(action, Action::await_change());
    }

    const SECRET: &str = "/api/v1/namespaces/ns/secrets/regcred";

    /// An image template (for all nodes by its pull Secret) naming `regcred`.
    fn private() -> CapsuleTemplate {
        let mut t = template(None, false);
        if let Some(i) = t.spec.source.image.as_mut() {
            i.reference = "reg.example.com/team/app:v1".into();
            i.pull_secret = Some("regcred".into());
        }
        t
    }

    fn refused(code: u16, reason: &str) -> Reply {
        Reply::Json(
            StatusCode::from_u16(code).unwrap(),
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "refused", "reason": reason, "code": code}),
        )
    }

    #[tokio::test]
    async fn a_forbidden_pull_secret_fails_the_template_with_the_grant_command_and_asks_no_node() {
        let node = quick_agent();
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        server
            .expect(Method::GET, SECRET, |_| {}, refused(403, "Forbidden"))
            .expect(
                Method::PATCH,
                STATUS,
                |body| {
                    shows("Failed", Reason::PullSecretForbidden)(body);
                    let message = body["status"]["conditions"][0]["message"].as_str().unwrap();
                    assert!(
                        message.contains(
                            "kubectl -n ns create role wrenn-pull-regcred --verb=get --resource=secrets --resource-name=regcred && kubectl -n ns create rolebinding wrenn-pull-regcred --role=wrenn-pull-regcred --serviceaccount=wrenn:wrenn-operator"
                        ),
                        "{message}"
                    );
                },
                ok(private()),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Warning", Reason::PullSecretForbidden),
                Reply::Echo,
            );
        let action = reconcile(Arc::new(private()), ctx(&server, pool))
            .await
            .unwrap();
        server.done();
        assert!(node.work_calls().is_empty());
        assert_eq!(action, Action::requeue(PULL_SECRET_RECHECK));
    }

    #[tokio::test]
    async fn a_missing_or_unusable_pull_secret_has_its_own_reason() {
        let (pool, _streams) = pool(&[]).await;
        let server = ApiServer::default();
        server
            .expect(Method::GET, SECRET, |_| {}, refused(404, "NotFound"))
            .expect(
                Method::PATCH,
                STATUS,
                shows("Failed", Reason::PullSecretNotFound),
                ok(private()),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Warning", Reason::PullSecretNotFound),
                Reply::Echo,
            );
        let ctx = ctx(&server, pool);
        reconcile(Arc::new(private()), ctx.clone()).await.unwrap();
        server.done();
        let opaque = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": "ns"}, "type": "Opaque", "data": {}});
        server
            .expect(Method::GET, SECRET, |_| {}, ok(opaque))
            .expect(
                Method::PATCH,
                STATUS,
                shows("Failed", Reason::PullSecretInvalid),
                ok(private()),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Warning", Reason::PullSecretInvalid),
                Reply::Echo,
            );
        reconcile(Arc::new(private()), ctx).await.unwrap();
        server.done();
    }

    #[tokio::test]
    async fn the_pull_secrets_entry_goes_to_every_node_with_the_prepare_only() {
        let node = quick_agent();
        let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
        let server = ApiServer::default();
        let config = serde_json::json!({"auths": {"https://reg.example.com": {
            "username": "robot", "password": "pa55"}}});
        let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": "ns"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD, config.to_string())}});
        server
            .expect(Method::GET, SECRET, |_| {}, ok(secret))
            .expect(
                Method::PATCH,
                STATUS,
                shows("Preparing", Reason::Preparing),
                ok(private()),
            )
            .expect(
                Method::POST,
                EVENTS,
                event("Normal", Reason::Preparing),
                Reply::Echo,
            );
        reconcile(Arc::new(private()), ctx(&server, pool))
            .await
            .unwrap();
        server.done();
        let sent = node.prepared_with(KEY).unwrap().unwrap();
        assert_eq!(
            (sent.username.as_str(), sent.password.as_str()),
            ("robot", "pa55")
        );
    }

    #[tokio::test]
    async fn a_failed_read_of_the_source_snapshot_is_retried_in_5s() {
        let (pool, _streams) = pool(&[]).await;
        let server = ApiServer::default();
        server.expect(
            Method::GET,
            "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/snap",
            |_| {},
            Reply::Json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd down", "reason": "ServiceUnavailable", "code": 503}),
            ),
        );
        let mut tpl = template(None, false);
        tpl.spec.source = TemplateSource {
            snapshot_ref: Some(wrenn_crds::capsule::SnapshotRef {
                name: "snap".into(),
            }),
            ..Default::default()
        };
        let ctx = ctx(&server, pool);
        let tpl = Arc::new(tpl);
        let err = reconcile(tpl.clone(), ctx.clone()).await.unwrap_err();
        server.done();
        assert_eq!(err.category(), "api");
        assert_eq!(
            error_policy(tpl, &err, ctx),
            Action::requeue(Duration::from_secs(5))
        );
    }
}
