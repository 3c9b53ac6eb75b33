//! Tests of `template`: against the fake API server and fake agents of
//! `crate::fixtures`, the exact calls each path makes.
#![allow(clippy::unwrap_used)]
use http::{Method, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;
use wrenn_crds::names::FINALIZER;
use wrenn_crds::template::{Preparation, Readiness, TemplateSource, WarmSpec};
use wrenn_proto::agent::v1 as pb;

use super::*;
use crate::agent::fake::FakeNodeAgent;
use crate::fixtures::{ApiServer, Reply, agent, node_a, ok, pool};

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

/// The status write a reconcile makes and the Event that goes with it.
trait Shown {
    fn server(&self) -> &ApiServer;

    /// Expects the status showing `phase` with `reason` (answered with
    /// `body`), then an Event of `type_` with the same reason.
    fn shown(
        &self,
        phase: &'static str,
        reason: Reason,
        type_: &'static str,
        body: impl serde::Serialize,
    ) -> &ApiServer {
        self.shown_and(phase, reason, type_, body, |_| {})
    }

    /// [`Shown::shown`], with `more` looking at the status body too.
    fn shown_and(
        &self,
        phase: &'static str,
        reason: Reason,
        type_: &'static str,
        body: impl serde::Serialize,
        more: impl Fn(&Value) + Send + 'static,
    ) -> &ApiServer {
        let shows = shows(phase, reason);
        let check = move |b: &Value| {
            shows(b);
            more(b);
        };
        self.server()
            .expect(Method::PATCH, STATUS, check, ok(body))
            .expect(Method::POST, EVENTS, event(type_, reason), Reply::Echo)
    }
}

impl Shown for ApiServer {
    fn server(&self) -> &ApiServer {
        self
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
    crate::fixtures::agent_booting_in("node-a", 4, Duration::ZERO)
}

#[tokio::test]
async fn an_on_demand_template_is_ready_without_asking_any_node_and_looked_at_in_15s() {
    let (node, pool, _streams, server) = node_a().await;
    server.shown_and(
        "Ready",
        Reason::PreparedOnDemand,
        "Normal",
        template(None, false),
        |body| {
            assert_eq!(body["status"]["nodes"][0]["name"], "node-a");
            assert_eq!(body["status"]["nodes"][0]["ready"], false);
        },
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
    server.shown(
        "Preparing",
        Reason::Preparing,
        "Normal",
        template(Some(Preparation::AllNodes), false),
    );
    let ctx = ctx(&server, pool);
    let tpl = Arc::new(template(Some(Preparation::AllNodes), false));
    let first = reconcile(tpl.clone(), ctx.clone()).await.unwrap();
    server.done();
    assert_eq!(first, Action::requeue(Duration::from_secs(3)));
    built(&node).await;
    server.shown_and(
        "Ready",
        Reason::TemplateCached,
        "Normal",
        template(Some(Preparation::AllNodes), false),
        |body| {
            assert_eq!(body["status"]["digest"], "sha256:fake");
            assert_eq!(body["status"]["nodes"][0]["ready"], true);
        },
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
    server.shown(
        "Preparing",
        Reason::Preparing,
        "Normal",
        template(None, true),
    );
    let ctx = ctx(&server, pool);
    let tpl = Arc::new(template(None, true));
    reconcile(tpl.clone(), ctx.clone()).await.unwrap();
    built(&node).await;
    server.shown_and(
        "Failed",
        Reason::PreparationFailed,
        "Warning",
        template(None, true),
        |body| {
            assert_eq!(
                body["status"]["nodes"][0]["message"],
                "ReadinessTimeout: port 8080 refused connections"
            );
        },
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
            .get(SECRET, refused(403, "Forbidden"))
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
    server.get(SECRET, refused(404, "NotFound")).shown(
        "Failed",
        Reason::PullSecretNotFound,
        "Warning",
        private(),
    );
    let ctx = ctx(&server, pool);
    reconcile(Arc::new(private()), ctx.clone()).await.unwrap();
    server.done();
    let opaque = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": "ns"}, "type": "Opaque", "data": {}});
    server
        .get(SECRET, ok(opaque))
        .shown("Failed", Reason::PullSecretInvalid, "Warning", private());
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
        .get(SECRET, ok(secret))
        .shown("Preparing", Reason::Preparing, "Normal", private());
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
    server.get(
        "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/snap",
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
