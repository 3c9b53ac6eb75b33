//! Call sequences of the Capsule controller against the fake API server
//! and fake agents of `crate::fixtures`.
#![allow(clippy::unwrap_used)]
use http::Method;
use serde_json::Value;
use wrenn_crds::capsule::OperatingMode;

use super::*;
use crate::fixtures::{
    ApiServer, Reply, agent, capsule_c1, context, node_a, not_found, ok, pool, template,
};
use crate::plan::SourceState;
use crate::status::build_capsule_status;
use wrenn_crds::names::FINALIZER;

const CAPSULES: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsules";
const TEMPLATE: &str = "/apis/wrenn.dev/v1alpha1/namespaces/ns/capsuletemplates/base";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
const SSA: &str = "fieldManager=wrenn-operator";

/// A capsule from template `base`, with the finalizer already on.
fn capsule(vcpus: Option<u32>) -> Capsule {
    let mut c = capsule_c1();
    c.spec.resources = vcpus.map(|v| wrenn_crds::capsule::CapsuleResources {
        vcpus: Some(v),
        ..Default::default()
    });
    c.metadata.finalizers = Some(vec![FINALIZER.into()]);
    c
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

/// What a reconcile of a new capsule asks of the API server once the
/// finalizer is on: its template, the Creating status (answered with
/// `cap`), then the Scheduled Event (answered with `event_reply`).
fn expect_first_run_answering(server: &ApiServer, cap: &Capsule, event_reply: Reply) {
    server
        .get(TEMPLATE, ok(template()))
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1/status?{SSA}"),
            phase_is("Creating"),
            ok(cap.clone()),
        )
        .expect(Method::POST, EVENTS, event("Scheduled"), event_reply);
}

/// [`expect_first_run_answering`] with the Event answered at once.
fn expect_first_run(server: &ApiServer, cap: &Capsule) {
    expect_first_run_answering(server, cap, Reply::Echo);
}

/// One reconcile, and the Events it queued published.
async fn reconciled(cap: &Capsule, ctx: &Arc<Context>) -> Result<Action, Error> {
    let result = reconcile(Arc::new(cap.clone()), ctx.clone()).await;
    ctx.events.idle().await;
    result
}

/// Placement is not written on its own: the create follows at once, and
/// the status it ends in (Creating) carries the node and the Scheduled
/// condition, so the capsule is written once on its way to Creating.
#[tokio::test]
async fn a_new_capsule_is_placed_created_then_recorded_in_one_write() {
    let (node, pool, _streams, server) = node_a().await;
    let cap = capsule(None);
    server
        .get(TEMPLATE, ok(template()))
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1/status?{SSA}"),
            |body| {
                phase_is("Creating")(body);
                assert_eq!(body["status"]["nodeName"], "node-a");
                assert_eq!(condition(body, "Scheduled")["reason"], "Placed");
                assert_eq!(condition(body, "Scheduled")["status"], "True");
                assert_eq!(body["status"]["resources"]["vcpus"], 1);
            },
            ok(cap.clone()),
        )
        // The Event once the node work is done: it is not on the way to Running.
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo);
    let ctx = context(&server, pool);
    let action = reconciled(&cap, &ctx).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

/// The real agent answers a create once the guest booted: the capsule
/// then goes from apply to Running in one write, which carries the node
/// and the Scheduled condition.
#[tokio::test]
async fn a_create_answered_running_is_recorded_running_in_one_write() {
    let node = crate::fixtures::agent_booting_in("node-a", 4, Duration::ZERO);
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let server = ApiServer::default();
    let cap = capsule(None);
    server
        .get(TEMPLATE, ok(template()))
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1/status?{SSA}"),
            |body| {
                phase_is("Running")(body);
                assert_eq!(body["status"]["nodeName"], "node-a");
                assert_eq!(condition(body, "Scheduled")["reason"], "Placed");
                assert_eq!(condition(body, "Ready")["status"], "True");
            },
            ok(cap.clone()),
        )
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo)
        .expect(Method::POST, EVENTS, event("Running"), Reply::Echo);
    let ctx = context(&server, pool);
    reconciled(&cap, &ctx).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
}

/// A create the node fails does not lose the placement: the reconcile
/// writes it (Scheduled, with the node) before it backs off, and the retry
/// creates on the same node, even when the status it starts from is stale
/// and another node has room.
#[tokio::test]
async fn a_failed_create_shows_the_placement_and_is_retried_on_the_same_node() {
    let (a, b) = (agent("node-a", 4), agent("node-b", 4));
    let (pool, _streams) = pool(&[a.clone(), b.clone()]).await;
    let server = ApiServer::default();
    let cap = capsule(None);
    a.refuse_creates(true);
    b.refuse_creates(true);
    let status = format!("{CAPSULES}/c1/status?{SSA}");
    server
        .get(TEMPLATE, ok(template()))
        .expect(
            Method::PATCH,
            &status,
            |body| {
                phase_is("Scheduled")(body);
                assert_eq!(condition(body, "Scheduled")["reason"], "Placed");
                assert!(body["status"]["nodeName"].is_string(), "{body:#}");
            },
            ok(cap.clone()),
        )
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo);
    let ctx = context(&server, pool);
    let err = reconciled(&cap, &ctx).await.unwrap_err();
    assert_eq!(err.category(), "agent", "{err:?}");
    server.done();
    let calls = [a.work_calls(), b.work_calls()];
    let placed = calls.iter().position(|c| !c.is_empty()).unwrap();
    assert_eq!(calls[placed], vec![("CreateCapsule", "u1".into())]);
    assert!(calls[1 - placed].is_empty(), "{calls:?}");

    a.refuse_creates(false);
    b.refuse_creates(false);
    server.get(TEMPLATE, ok(template())).expect(
        Method::PATCH,
        &status,
        phase_is("Creating"),
        ok(cap.clone()),
    );
    // The same stale object: only the operator knows where it placed it.
    reconciled(&cap, &ctx).await.unwrap();
    server.done();
    let calls = [a.work_calls(), b.work_calls()];
    assert_eq!(calls[placed].len(), 2, "{calls:?}");
    assert!(calls[1 - placed].is_empty(), "{calls:?}");
}

/// When the API server also fails the placement's write, the operator's
/// reservation alone keeps the retry on the node it chose.
#[tokio::test]
async fn a_placement_the_api_server_did_not_take_still_pins_the_retry() {
    let (a, b) = (agent("node-a", 4), agent("node-b", 4));
    let (pool, _streams) = pool(&[a.clone(), b.clone()]).await;
    let server = ApiServer::default();
    let cap = capsule(None);
    a.refuse_creates(true);
    b.refuse_creates(true);
    let status = format!("{CAPSULES}/c1/status?{SSA}");
    let unavailable = Reply::Json(
        http::StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "etcd unavailable", "reason": "ServiceUnavailable", "code": 503}),
    );
    server
        .get(TEMPLATE, ok(template()))
        .expect(Method::PATCH, &status, phase_is("Scheduled"), unavailable)
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo);
    let ctx = context(&server, pool);
    reconciled(&cap, &ctx).await.unwrap_err();
    server.done();
    let placed = if a.work_calls().is_empty() { &b } else { &a };
    a.refuse_creates(false);
    b.refuse_creates(false);
    let node = if Arc::ptr_eq(placed, &a) {
        "node-a"
    } else {
        "node-b"
    };
    server.get(TEMPLATE, ok(template())).expect(
        Method::PATCH,
        &status,
        move |body| {
            phase_is("Creating")(body);
            assert_eq!(body["status"]["nodeName"], node);
        },
        ok(cap.clone()),
    );
    reconciled(&cap, &ctx).await.unwrap();
    server.done();
    assert_eq!(placed.work_calls().len(), 2);
    assert_eq!(a.work_calls().len() + b.work_calls().len(), 2);
}

/// A VM that finishes booting while its Creating status is being written
/// is shown Running by the same reconcile, and both Events go out after:
/// no reconcile queued behind this one, no Event, stands between the boot
/// and the status that shows it.
#[tokio::test]
async fn a_boot_that_ends_during_the_creating_write_is_shown_running_at_once() {
    let node = crate::agent::fake::FakeNodeAgent::new(
        "node-a",
        pb::Resources {
            vcpus: 4,
            memory_bytes: 8 << 30,
            disk_bytes: 100 << 30,
        },
        Duration::from_secs(1),
    );
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let server = ApiServer::default();
    let cap = capsule(None);
    let (booted, release) = tokio::sync::oneshot::channel();
    let status = format!("{CAPSULES}/c1/status?{SSA}");
    server.get(TEMPLATE, ok(template()));
    // The Creating write is answered only once the agent has reported the boot.
    let writes = [
        (
            "Creating",
            Reply::When(release, serde_json::to_value(&cap).unwrap()),
        ),
        ("Running", ok(cap.clone())),
    ];
    for (phase, reply) in writes {
        server.expect(Method::PATCH, &status, phase_is(phase), reply);
    }
    server
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo)
        .expect(Method::POST, EVENTS, event("Running"), Reply::Echo);
    let ctx = context(&server, pool.clone());
    let events = ctx.events.clone();
    let reconciled = tokio::spawn(reconcile(Arc::new(cap), ctx));
    wrenn_testkit::eventually(Duration::from_secs(10), "the boot never reported", || {
        pool.reported("node-a", "u1")
            .is_some_and(|v| v.state == crate::plan::VmState::Running)
    })
    .await;
    booted.send(()).unwrap();
    let action = reconciled.await.unwrap().unwrap();
    events.idle().await;
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn the_finalizer_goes_on_first_under_the_operators_field_manager_then_the_capsule_applies() {
    let (pool, _streams) = pool(&[]).await;
    let server = ApiServer::default();
    let with_finalizer = capsule(None);
    let mut cap = with_finalizer.clone();
    cap.metadata.finalizers = None;
    cap.metadata.resource_version = Some("7".into());
    server
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1?{SSA}"),
            |body| {
                assert_eq!(body["metadata"]["finalizers"][0], FINALIZER);
                assert_eq!(body["metadata"]["resourceVersion"], "7");
            },
            ok(with_finalizer.clone()),
        )
        // No wait for the write to come back through the watch: the same
        // reconcile applies the object the patch returned.
        .get(TEMPLATE, not_found("capsuletemplates", "base"))
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1/status?{SSA}"),
            |body| {
                phase_is("Pending")(body);
                assert_eq!(condition(body, "Scheduled")["reason"], "TemplateNotFound");
            },
            ok(with_finalizer),
        );
    let action = reconciled(&cap, &context(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

/// The operator is the only writer of a capsule's status: a reconcile that
/// starts from a cached object which has not yet seen the operator's own
/// last writes decides on those writes. An agent's report can trigger one
/// before the watch brings back even the finalizer: it neither adds the
/// finalizer again from the stale version (a conflict, then a backoff on
/// the way to Running), nor places the capsule a second time, nor writes
/// the same status again.
#[tokio::test]
async fn a_stale_cached_capsule_is_not_finalized_placed_or_written_twice() {
    let (node, pool, _streams, server) = node_a().await;
    let with_finalizer = capsule(None);
    let mut stale = with_finalizer.clone();
    stale.metadata.finalizers = None;
    stale.metadata.resource_version = Some("7".into());
    server.expect(
        Method::PATCH,
        &format!("{CAPSULES}/c1?{SSA}"),
        |body| assert_eq!(body["metadata"]["finalizers"][0], FINALIZER),
        ok(with_finalizer.clone()),
    );
    expect_first_run(&server, &with_finalizer);
    // The second reconcile, from the same stale object: reads its source,
    // writes nothing.
    server.get(TEMPLATE, ok(template()));
    let ctx = context(&server, pool);
    reconciled(&stale, &ctx).await.unwrap();
    reconciled(&stale, &ctx).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
}

/// The benchmark's 10 s warm capsule: a warm template turned Ready (its
/// snapshot is on the node) after the agent's last NodeInfo refresh, and
/// its capsule is triggered at once. Placement asks the agents again
/// before calling it unschedulable, so the capsule is placed now instead
/// of waiting in Pending for its retry.
#[tokio::test]
async fn a_warm_snapshot_newer_than_the_last_node_info_is_placed_at_once() {
    let node = agent("node-a", 4);
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let mut tpl = template();
    tpl.spec.warm = Some(wrenn_crds::template::WarmSpec {
        start_command: vec!["httpd".into()],
        readiness: wrenn_crds::template::Readiness {
            tcp_port: Some(8080),
            ..Default::default()
        },
    });
    tpl.status = Some(wrenn_crds::template::CapsuleTemplateStatus {
        phase: Some(wrenn_crds::template::TemplatePhase::Ready),
        ..Default::default()
    });
    let id = crate::templates::warm_snapshot_id(&tpl, "t1").unwrap();
    // Built after the pool's last NodeInfo (refreshed hourly here).
    node.insert_snapshot(&id);
    let server = ApiServer::default();
    let cap = capsule(None);
    server
        .get(TEMPLATE, ok(tpl))
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1/status?{SSA}"),
            |body| {
                phase_is("Creating")(body);
                assert_eq!(body["status"]["nodeName"], "node-a");
            },
            ok(cap.clone()),
        )
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo);
    reconciled(&cap, &context(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
}

#[tokio::test]
async fn a_capsule_no_node_fits_stays_pending_with_a_warning() {
    let node = agent("node-a", 1);
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let server = ApiServer::default();
    let cap = capsule(Some(4));
    server
        .get(TEMPLATE, ok(template()))
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
    let action = reconciled(&cap, &ctx).await.unwrap();
    server.done();
    assert!(node.work_calls().is_empty());
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn a_missing_template_blocks_the_capsule_without_touching_a_node() {
    let (node, pool, _streams, server) = node_a().await;
    let cap = capsule(None);
    server
        .get(TEMPLATE, not_found("capsuletemplates", "base"))
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
    reconciled(&cap, &ctx).await.unwrap();
    server.done();
    assert!(node.work_calls().is_empty());
}

#[tokio::test]
async fn a_shown_status_is_not_written_again() {
    let (_, pool, _streams, server) = node_a().await;
    server.get(TEMPLATE, not_found("capsuletemplates", "base"));
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
    reconciled(&cap, &context(&server, pool)).await.unwrap();
    server.done();
}

/// A phase's Event is published beside the reconcile: one the API server
/// has not answered yet holds neither the reconcile nor the capsule's way
/// to Running.
#[tokio::test]
async fn a_reconcile_does_not_wait_for_its_events() {
    let (_, pool, _streams, server) = node_a().await;
    let cap = capsule(None);
    let (answer, answered) = tokio::sync::oneshot::channel();
    expect_first_run_answering(&server, &cap, Reply::When(answered, serde_json::json!({})));
    let ctx = context(&server, pool);
    let action = tokio::time::timeout(
        Duration::from_secs(5),
        reconcile(Arc::new(cap), ctx.clone()),
    )
    .await
    .expect("the reconcile waited for its Event")
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    answer.send(()).unwrap();
    ctx.events.idle().await;
    server.done();
}

/// After an operator restart nothing proves the finalizer is on: an add
/// that conflicts reads the object again and goes on when it is there.
#[tokio::test]
async fn a_conflicting_finalizer_add_reads_the_object_and_goes_on() {
    let (node, pool, _streams, server) = node_a().await;
    let with_finalizer = capsule(None);
    let mut stale = with_finalizer.clone();
    stale.metadata.finalizers = None;
    let conflict = Reply::Json(
        http::StatusCode::CONFLICT,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the object has been modified", "reason": "Conflict", "code": 409}),
    );
    server
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1?{SSA}"),
            |_| {},
            conflict,
        )
        .get(&format!("{CAPSULES}/c1"), ok(with_finalizer.clone()));
    expect_first_run(&server, &with_finalizer);
    reconciled(&stale, &context(&server, pool)).await.unwrap();
    server.done();
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
}

/// Only the very version the finalizer was added over counts as stale: a
/// newer one without it (someone removed it) gets it back before anything
/// else is done.
#[tokio::test]
async fn a_finalizer_removed_by_someone_else_is_put_back() {
    let (_, pool, _streams, server) = node_a().await;
    let mut with_finalizer = capsule(None);
    with_finalizer.metadata.resource_version = Some("8".into());
    let mut stale = with_finalizer.clone();
    stale.metadata.finalizers = None;
    stale.metadata.resource_version = Some("7".into());
    let mut removed = stale.clone();
    removed.metadata.resource_version = Some("9".into());
    let add = |version: &'static str| {
        move |body: &Value| {
            assert_eq!(body["metadata"]["finalizers"][0], FINALIZER);
            assert_eq!(body["metadata"]["resourceVersion"], version);
        }
    };
    server.expect(
        Method::PATCH,
        &format!("{CAPSULES}/c1?{SSA}"),
        add("7"),
        ok(with_finalizer.clone()),
    );
    expect_first_run(&server, &with_finalizer);
    server
        .expect(
            Method::PATCH,
            &format!("{CAPSULES}/c1?{SSA}"),
            add("9"),
            ok(with_finalizer),
        )
        .get(TEMPLATE, ok(template()));
    let ctx = context(&server, pool);
    reconciled(&stale, &ctx).await.unwrap();
    reconciled(&removed, &ctx).await.unwrap();
    server.done();
}

/// A create the agent takes a while to answer (it answers once the guest
/// booted) shows its node meanwhile, as soon as the create has taken
/// `SHOW_PLACEMENT_AFTER`, and the status it ends in follows.
#[tokio::test]
async fn a_slow_create_shows_its_node_while_in_flight() {
    let node = agent("node-a", 4);
    node.slow_creates(Duration::from_millis(500));
    let (pool, _streams) = pool(std::slice::from_ref(&node)).await;
    let server = ApiServer::default();
    let cap = capsule(None);
    let status = format!("{CAPSULES}/c1/status?{SSA}");
    let shown = Arc::new(std::sync::Mutex::new(None));
    let at = shown.clone();
    server
        .get(TEMPLATE, ok(template()))
        .expect(
            Method::PATCH,
            &status,
            move |body| {
                phase_is("Scheduled")(body);
                assert_eq!(body["status"]["nodeName"], "node-a");
                *at.lock().unwrap() = Some(Instant::now());
            },
            ok(cap.clone()),
        )
        .expect(
            Method::PATCH,
            &status,
            phase_is("Creating"),
            ok(cap.clone()),
        )
        .expect(Method::POST, EVENTS, event("Scheduled"), Reply::Echo);
    let started = Instant::now();
    reconciled(&cap, &context(&server, pool)).await.unwrap();
    server.done();
    let shown = shown.lock().unwrap().unwrap() - started;
    assert!(shown < Duration::from_millis(400), "shown after {shown:?}");
    assert_eq!(node.work_calls(), vec![("CreateCapsule", "u1".into())]);
}
