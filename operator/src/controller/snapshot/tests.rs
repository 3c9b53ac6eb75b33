//! Tests of `snapshot`: pure rules and, against the fake API server and fake
//! agents of `crate::fixtures`, the exact calls each path makes.
#![allow(clippy::unwrap_used)]
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;
use wrenn_crds::capsule::CapsuleStatus;
use wrenn_crds::names::FINALIZER;
use wrenn_crds::snapshot::CapsuleSnapshotSpec;

use super::*;
use crate::fixtures::{ApiServer, Reply, agent, capsule_c1, node_a, not_found, ok, pool};

const SNAP: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/s1";
const CAPSULE: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsules/c1";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
const STATUS: &str =
    "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/s1/status?fieldManager=wrenn-operator";

fn ctx(server: &ApiServer, pool: AgentPool) -> Arc<Ctx> {
    let client = server.client();
    Arc::new(Ctx {
        recorder: super::super::recorder(client.clone(), None),
        client,
        pool,
        metrics: Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        )),
    })
}

/// A snapshot of capsule `c1`, finalizer on.
fn snapshot(policy: DeletionPolicy) -> CapsuleSnapshot {
    let mut s = CapsuleSnapshot::new(
        "s1",
        CapsuleSnapshotSpec {
            capsule_name: "c1".into(),
            memory: true,
            deletion_policy: policy,
        },
    );
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some("s-uid".into());
    s.metadata.generation = Some(1);
    s.metadata.resource_version = Some("3".into());
    s.metadata.finalizers = Some(vec![FINALIZER.into()]);
    s
}

/// The same snapshot being deleted, its files on `node`.
fn deleted(policy: DeletionPolicy, node: &str) -> CapsuleSnapshot {
    let mut s = snapshot(policy);
    s.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    s.status = Some(CapsuleSnapshotStatus {
        phase: Some(SnapshotPhase::Ready),
        node_name: Some(node.into()),
        ..Default::default()
    });
    s
}

/// Capsule `c1` (uid `u1`) in `phase` on `node`.
fn capsule(phase: CapsulePhase, node: &str) -> Capsule {
    let mut c = capsule_c1();
    c.metadata.generation = Some(2);
    c.status = Some(CapsuleStatus {
        phase: Some(phase),
        node_name: Some(node.into()),
        ..Default::default()
    });
    c
}

/// Checks the status body: phase and the Ready condition's reason.
fn shows(phase: &'static str, reason: Reason) -> impl Fn(&Value) + Send {
    move |body| {
        assert_eq!(body["status"]["phase"], phase, "{body:#}");
        let ready = &body["status"]["conditions"][0];
        assert_eq!(ready["type"], "Ready", "{body:#}");
        assert_eq!(ready["reason"], reason.as_str(), "{body:#}");
    }
}

fn event(reason: Reason) -> impl Fn(&Value) + Send {
    move |body| assert_eq!(body["reason"], reason.as_str(), "{body:#}")
}

#[tokio::test]
async fn a_running_capsule_is_snapshotted_on_its_node_and_the_snapshot_shown_ready() {
    let node = agent("node-a", 4);
    node.insert("u1", "ns", "c1", pb::CapsuleState::Running);
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let server = ApiServer::default();
    server
        .get(CAPSULE, ok(capsule(CapsulePhase::Running, "node-a")))
        .expect(
            Method::PATCH,
            STATUS,
            |body| {
                shows("InProgress", Reason::Snapshotting)(body);
                assert_eq!(body["status"]["nodeName"], "node-a");
                assert_eq!(body["status"]["sourceCapsule"]["uid"], "u1");
            },
            ok(snapshot(DeletionPolicy::Delete)),
        )
        .get(SNAP, ok(snapshot(DeletionPolicy::Delete)))
        .expect(
            Method::PATCH,
            STATUS,
            |body| {
                shows("Ready", Reason::SnapshotTaken)(body);
                assert_eq!(body["status"]["readyToUse"], true);
                assert_eq!(body["status"]["sizeBytes"], 600 << 20);
                assert_eq!(body["status"]["compatibility"]["cpuModel"], "fake cpu");
            },
            ok(snapshot(DeletionPolicy::Delete)),
        )
        .expect(Method::POST, EVENTS, event(Reason::Ready), Reply::Echo);
    let snap = Arc::new(snapshot(DeletionPolicy::Delete));
    let action = reconcile(snap, ctx(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("SnapshotCapsule", "s-uid".into())]);
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_snapshot_the_agent_refuses_fails_with_a_typed_reason_and_a_warning() {
    // The capsule's status names node-a, but the agent holds no such VM.
    let (_, pool, _streams, server) = node_a().await;
    server
        .get(CAPSULE, ok(capsule(CapsulePhase::Running, "node-a")))
        .expect(
            Method::PATCH,
            STATUS,
            shows("InProgress", Reason::Snapshotting),
            ok(snapshot(DeletionPolicy::Delete)),
        )
        .get(SNAP, ok(snapshot(DeletionPolicy::Delete)))
        .expect(
            Method::PATCH,
            STATUS,
            |body| {
                shows("Failed", Reason::NodeError)(body);
                let msg = body["status"]["conditions"][0]["message"].as_str();
                assert_eq!(msg, Some("capsule u1"), "{body:#}");
            },
            ok(snapshot(DeletionPolicy::Delete)),
        )
        .expect(Method::POST, EVENTS, event(Reason::Failed), Reply::Echo);
    let snap = Arc::new(snapshot(DeletionPolicy::Delete));
    let action = reconcile(snap, ctx(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(action, Action::await_change(), "retrying cannot help");
}

#[tokio::test]
async fn a_snapshot_waits_for_its_capsule_to_run_and_looks_again_in_5s() {
    let (node, pool, _streams, server) = node_a().await;
    server
        .get(CAPSULE, ok(capsule(CapsulePhase::Creating, "node-a")))
        .expect(
            Method::PATCH,
            STATUS,
            shows("Pending", Reason::Pending),
            ok(snapshot(DeletionPolicy::Delete)),
        );
    let snap = Arc::new(snapshot(DeletionPolicy::Delete));
    let action = reconcile(snap, ctx(&server, pool)).await.unwrap();
    server.done();
    assert!(node.work_calls().is_empty());
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_missing_capsule_or_unreachable_node_is_pending_and_looked_at_in_10s() {
    let (pool, _streams) = pool(&[]).await;
    let server = ApiServer::default();
    server
        .get(CAPSULE, not_found("capsules", "c1"))
        .expect(
            Method::PATCH,
            STATUS,
            |body| {
                shows("Pending", Reason::Pending)(body);
                let msg = body["status"]["conditions"][0]["message"].as_str();
                assert_eq!(msg, Some("capsule c1 not found"));
            },
            ok(snapshot(DeletionPolicy::Delete)),
        )
        .get(CAPSULE, ok(capsule(CapsulePhase::Running, "node-gone")))
        .expect(
            Method::PATCH,
            STATUS,
            |body| {
                let msg = body["status"]["conditions"][0]["message"].as_str();
                assert_eq!(msg, Some("node node-gone unreachable"));
            },
            ok(snapshot(DeletionPolicy::Delete)),
        );
    let ctx = ctx(&server, pool);
    let snap = Arc::new(snapshot(DeletionPolicy::Delete));
    let missing = reconcile(snap.clone(), ctx.clone()).await.unwrap();
    let unreachable = reconcile(snap, ctx).await.unwrap();
    server.done();
    assert_eq!(missing, Action::requeue(Duration::from_secs(10)));
    assert_eq!(unreachable, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn deleting_a_snapshot_removes_its_files_on_the_node_then_the_finalizer() {
    let (node, pool, _streams, server) = node_a().await;
    server.expect(
        Method::PATCH,
        "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/s1?fieldManager=wrenn-operator",
        |body| {
            assert_eq!(body["metadata"]["finalizers"], serde_json::json!([]));
            assert_eq!(body["metadata"]["resourceVersion"], "3");
        },
        ok(snapshot(DeletionPolicy::Delete)),
    );
    let snap = Arc::new(deleted(DeletionPolicy::Delete, "node-a"));
    let action = reconcile(snap, ctx(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("DeleteSnapshot", "s-uid".into())]);
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_retained_snapshot_keeps_its_files_and_loses_the_finalizer() {
    let (node, pool, _streams, server) = node_a().await;
    server.expect(
        Method::PATCH,
        "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsulesnapshots/s1?fieldManager=wrenn-operator",
        |body| assert_eq!(body["metadata"]["finalizers"], serde_json::json!([])),
        ok(snapshot(DeletionPolicy::Retain)),
    );
    let snap = Arc::new(deleted(DeletionPolicy::Retain, "node-a"));
    reconcile(snap, ctx(&server, pool)).await.unwrap();
    server.done();
    assert!(node.work_calls().is_empty());
}

#[tokio::test]
async fn a_snapshot_on_an_unreachable_node_keeps_its_finalizer_and_retries_in_5s() {
    let (pool, _streams) = pool(&[]).await;
    let server = ApiServer::default();
    let ctx = ctx(&server, pool);
    let snap = Arc::new(deleted(DeletionPolicy::Delete, "node-gone"));
    let err = reconcile(snap.clone(), ctx.clone()).await.unwrap_err();
    server.done();
    assert_eq!(err.category(), "node-unreachable");
    assert_eq!(
        error_policy(snap, &err, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}
