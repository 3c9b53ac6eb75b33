//! Tests of `pool`: pure rules and, against the fake API server and fake
//! agents of `crate::fixtures`, the exact calls each path makes.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::agent::fake::{FakeConnector, FakeNodeAgent};

const GI: u64 = 1 << 30;

fn two_cpus() -> Resources {
    Resources {
        vcpus: 2,
        memory_bytes: GI,
        disk_bytes: GI,
    }
}

#[test]
fn a_placement_counts_until_the_agent_lists_it_as_held() {
    let placed = [("a", two_cpus()), ("b", two_cpus())];
    let none = BTreeSet::new();
    assert_eq!(plan_reserved(&placed, &none).vcpus, 4);
    let a_held = BTreeSet::from(["a"]);
    assert_eq!(plan_reserved(&placed, &a_held), two_cpus());
    let both = BTreeSet::from(["a", "b"]);
    assert_eq!(plan_reserved(&placed, &both), Resources::default());
}

/// An operator that has not yet listed the agent Pods knows no agent, and
/// "every known agent synced" would hold of none: placement would call a
/// capsule unschedulable (a write) on a cluster full of nodes. Settled
/// waits for the list, then for each listed agent's own sync.
#[tokio::test]
async fn placement_waits_for_the_agent_list_not_only_for_the_agents_on_it() {
    let connector = Arc::new(FakeConnector::default());
    let agent = FakeNodeAgent::new("node-a", four_cpus(), Duration::ZERO);
    connector.add(agent.clone());
    let (grace, refresh) = (Duration::from_secs(3600), Duration::from_secs(3600));
    let (pool, _streams) = AgentPool::new(connector, refresh);
    assert!(!pool.settled(grace), "no agent listed yet");
    pool.upsert("node-a", "127.0.0.1:1".parse().unwrap());
    pool.discovered();
    wrenn_testkit::eventually(Duration::from_secs(5), "agent never synced", || {
        pool.settled(grace)
    })
    .await;
    assert_eq!(pool.ready_nodes(), vec!["node-a".to_string()]);

    let (empty, _streams) = AgentPool::new(Arc::new(FakeConnector::default()), refresh);
    empty.discovered();
    assert!(
        empty.settled(grace),
        "a listed cluster without agents is settled"
    );
}

/// What placement sees as left on `node`: the agent's free minus the
/// operator's reservations.
fn left(pool: &AgentPool, node: &str) -> Resources {
    let views = pool.views(|_| BTreeMap::new(), &[]);
    let v = views.iter().find(|v| v.name == node).unwrap();
    v.free.minus(v.reserved)
}

/// The hand-off for real: a fake agent answers NodeInfo on a short
/// refresh while a placed capsule is created on it. At every moment
/// the capsule is counted once: by the reservation until the agent's
/// NodeInfo lists it as held, then by the agent's free alone.
#[tokio::test]
async fn no_moment_counts_a_placed_capsule_by_neither_side_nor_twice() {
    let connector = Arc::new(FakeConnector::default());
    let agent = FakeNodeAgent::new("node-a", four_cpus(), Duration::ZERO);
    connector.add(agent.clone());
    let (pool, _streams) = AgentPool::new(connector.clone(), Duration::from_millis(20));
    pool.upsert("node-a", "127.0.0.1:1".parse().unwrap());
    wrenn_testkit::eventually(Duration::from_secs(5), "agent never synced", || {
        !pool.ready_nodes().is_empty()
    })
    .await;
    assert_eq!(left(&pool, "node-a").vcpus, 4);

    pool.reserve("x", "node-a", two_cpus());
    assert_eq!(left(&pool, "node-a").vcpus, 2, "reserved before created");
    let client = pool.client("node-a").unwrap();
    client
        .create_capsule(pb::CreateCapsuleRequest {
            uid: "x".into(),
            spec: Some(pb::CapsuleSpec {
                namespace: "ns".into(),
                name: "x".into(),
                resources: Some(two_cpus().into()),
                ..Default::default()
            }),
            initial_state: 0,
        })
        .await
        .unwrap();
    // Until and after the agent reports it: always exactly 2 left.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert_eq!(left(&pool, "node-a").vcpus, 2);
        let held = pool
            .info("node-a")
            .is_some_and(|i| i.held.iter().any(|u| u == "x"));
        if held && pool.inner.placements.read().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never listed x as held"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(left(&pool, "node-a").vcpus, 2, "counted by the agent alone");
    pool.shutdown();
}

/// Session calls of an agent, in order.
fn session_calls(a: &FakeNodeAgent) -> Vec<&'static str> {
    a.calls().into_iter().map(|(c, _)| c).collect()
}

/// Discovery and the first session, against the fake API server: the
/// agent Pods are listed, then watched; the node's agent is asked to
/// stream events first (nothing is missed), then to list its capsules
/// and its NodeInfo; the pool announces the sync and triggers the
/// capsules it holds.
#[tokio::test]
async fn a_discovered_agent_is_followed_then_listed_then_announced() {
    use crate::fixtures::{ApiServer, Reply, ok};
    let agent = crate::fixtures::agent("node-a", 4);
    agent.insert("u1", "ns", "c1", pb::CapsuleState::Running);
    let connector = Arc::new(FakeConnector::default());
    connector.add(agent.clone());
    let (pool, mut streams) = AgentPool::new(connector, Duration::from_secs(3600));
    let pods = "/api/v1/namespaces/wrenn/pods";
    let selector = "labelSelector=app.kubernetes.io%2Fname%3Dwrenn-node-agent";
    let server = ApiServer::default();
    let pod = serde_json::json!({
        "metadata": {"name": "agent-x", "namespace": "wrenn", "resourceVersion": "1"},
        "spec": {"nodeName": "node-a", "containers": []},
        "status": {"podIP": "10.0.0.7"},
    });
    server
        .get(
            &format!("{pods}?{selector}"),
            ok(serde_json::json!({
                "apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "1"}, "items": [pod],
            })),
        )
        .get(&format!("{pods}?{selector}&watch=true"), Reply::Hang);
    let pods: Api<Pod> = Api::namespaced(server.client(), "wrenn");
    let discovery = tokio::spawn(discover(
        pool.clone(),
        pods,
        "app.kubernetes.io/name=wrenn-node-agent".into(),
        50051,
    ));
    let synced = tokio::time::timeout(Duration::from_secs(5), streams.syncs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(synced.node, "node-a");
    assert_eq!(
        session_calls(&agent),
        vec!["WatchEvents", "ListCapsules", "NodeInfo"]
    );
    let triggered = streams.triggers.recv().await.unwrap();
    assert_eq!(triggered, ObjectRef::new("c1").within("ns"));
    assert_eq!(pool.find("u1").as_deref(), Some("node-a"));
    server.done();
    discovery.abort();
    pool.shutdown();
}

/// An agent that goes away is unsynced at once (its capsules are then
/// unknown, not absent) and, once back, followed, listed and announced
/// again in the same order, to the capsules and to the templates.
#[tokio::test]
async fn a_lost_agent_is_unknown_until_it_resyncs_in_order() {
    let agent = crate::fixtures::agent("node-a", 4);
    let (pool, mut streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    assert!(streams.syncs.recv().await.is_some());
    assert_eq!(pool.observe("node-a", "u1"), Some(None));
    agent.set_down(true);
    wrenn_testkit::eventually(Duration::from_secs(5), "never unsynced", || {
        pool.client("node-a").is_none()
    })
    .await;
    assert_eq!(pool.observe("node-a", "u1"), None);
    let before = agent.calls().len();
    let mut templates = pool.syncs_from_now();
    agent.set_down(false);
    let synced = tokio::time::timeout(Duration::from_secs(5), streams.syncs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(synced.node, "node-a");
    tokio::time::timeout(Duration::from_secs(5), templates.next())
        .await
        .expect("the templates hear of the sync")
        .expect("the pool is alive");
    let again = &session_calls(&agent)[before..];
    // Failed attempts while down may come first; the last three are the sync.
    assert_eq!(
        again[again.len() - 3..],
        ["WatchEvents", "ListCapsules", "NodeInfo"]
    );
    pool.shutdown();
}

/// A deleted agent Pod takes the node's client away at once: calls to
/// it wait (the node counts as lost) instead of going to an address
/// that may now be another Pod's.
#[tokio::test]
async fn a_deleted_agent_pod_drops_the_nodes_client_at_once() {
    use crate::fixtures::{ApiServer, Reply, ok};
    let agent = crate::fixtures::agent("node-a", 4);
    let connector = Arc::new(FakeConnector::default());
    connector.add(agent.clone());
    let (pool, mut streams) = AgentPool::new(connector, Duration::from_secs(3600));
    let pods = "/api/v1/namespaces/wrenn/pods";
    let server = ApiServer::default();
    let pod = serde_json::json!({
        "metadata": {"name": "agent-x", "namespace": "wrenn", "resourceVersion": "1"},
        "spec": {"nodeName": "node-a", "containers": []},
        "status": {"podIP": "10.0.0.7"},
    });
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let deleted = serde_json::json!({"type": "DELETED", "object": {
        "metadata": {"name": "agent-x", "namespace": "wrenn", "resourceVersion": "2"},
        "spec": {"nodeName": "node-a", "containers": []},
    }});
    server
        .get(
            pods,
            ok(serde_json::json!({
                "apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "1"}, "items": [pod],
            })),
        )
        // The watch answers the deletion only once the agent synced.
        .get(&format!("{pods}?watch=true"), Reply::When(gone_rx, deleted))
        .get(&format!("{pods}?watch=true&resourceVersion=2"), Reply::Hang);
    let discovery = tokio::spawn(discover(
        pool.clone(),
        Api::namespaced(server.client(), "wrenn"),
        "app.kubernetes.io/name=wrenn-node-agent".into(),
        50051,
    ));
    tokio::time::timeout(Duration::from_secs(5), streams.syncs.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(pool.client("node-a").is_some());
    gone_tx.send(()).unwrap();
    wrenn_testkit::eventually(
        Duration::from_secs(5),
        "client kept after the Pod went",
        || pool.client("node-a").is_none(),
    )
    .await;
    assert!(pool.lost_for("node-a").is_some());
    assert_eq!(pool.ready_nodes(), Vec::<String>::new());
    server.done();
    discovery.abort();
    pool.shutdown();
}

/// The agent's event stream is the fast path to Running: a state change
/// updates the pool's view and triggers the capsule's reconcile, without
/// any call from the operator.
#[tokio::test]
async fn an_agent_event_updates_the_view_and_triggers_its_capsule() {
    // A boot that takes a moment: the create answers Creating, the stream
    // reports Running.
    let agent = FakeNodeAgent::new("node-a", four_cpus(), Duration::from_millis(1));
    let (pool, mut streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    let client = pool.client("node-a").unwrap();
    client
        .create_capsule(pb::CreateCapsuleRequest {
            uid: "u1".into(),
            spec: Some(pb::CapsuleSpec {
                namespace: "ns".into(),
                name: "c1".into(),
                ..Default::default()
            }),
            initial_state: 0,
        })
        .await
        .unwrap();
    let c1 = ObjectRef::new("c1").within("ns");
    let first = tokio::time::timeout(Duration::from_secs(5), streams.triggers.recv());
    assert_eq!(first.await.unwrap().unwrap(), c1, "Creating triggers");
    let second = tokio::time::timeout(Duration::from_secs(5), streams.triggers.recv());
    assert_eq!(second.await.unwrap().unwrap(), c1, "Running triggers");
    let seen = pool.observe("node-a", "u1").unwrap().unwrap();
    assert_eq!(seen.state, crate::plan::VmState::Running);
    assert_eq!(pool.find("u1").as_deref(), Some("node-a"));
    pool.shutdown();
}

fn create_req(uid: &str) -> pb::CreateCapsuleRequest {
    pb::CreateCapsuleRequest {
        uid: uid.into(),
        spec: Some(pb::CapsuleSpec {
            namespace: "ns".into(),
            name: uid.into(),
            ..Default::default()
        }),
        initial_state: 0,
    }
}

/// A small node: four vCPUs, 8 GiB of memory, 100 GiB of disk.
fn four_cpus() -> pb::Resources {
    pb::Resources {
        vcpus: 4,
        memory_bytes: 8 * GI,
        disk_bytes: 100 * GI,
    }
}

fn roomy() -> pb::Resources {
    pb::Resources {
        vcpus: 1024,
        memory_bytes: 1024 * GI,
        disk_bytes: 1024 * GI,
    }
}

/// Polls until `node`'s view of every UID in `uids` is Running.
async fn wait_running(pool: &AgentPool, node: &str, uids: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let behind: Vec<String> = uids
            .iter()
            .filter(|u| {
                pool.observe(node, u).flatten().map(|v| v.state)
                    != Some(crate::plan::VmState::Running)
            })
            .cloned()
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not Running in the pool's view: {behind:?}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn an_answer_counts_only_until_the_stream_reports_the_capsule() {
    assert!(
        plan_note(false, false),
        "unknown capsule: the answer is news"
    );
    assert!(plan_note(true, true), "over an earlier answer: newer");
    assert!(
        !plan_note(true, false),
        "over the stream's view: maybe older"
    );
}

/// The stuck capsule of the benchmark: the create's answer (Creating)
/// reaches the operator after the Running event (answers and events travel
/// apart). Recording the answer then must not roll the view back to
/// Creating: no event would ever correct it, and the capsule would wait
/// in Creating forever.
#[tokio::test]
async fn a_late_answer_does_not_roll_back_what_the_stream_reported() {
    // A boot that takes a moment, so the answer says Creating.
    let agent = FakeNodeAgent::new("node-a", roomy(), Duration::from_millis(1));
    let (pool, _streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    let client = pool.client("node-a").unwrap();
    let answer = client.create_capsule(create_req("u1")).await.unwrap();
    assert_eq!(answer.state, pb::CapsuleState::Creating as i32);
    wait_running(&pool, "node-a", &["u1".into()]).await.unwrap();
    // The answer arrives now, after the Running event.
    pool.note("node-a", answer);
    let seen = pool.observe("node-a", "u1").unwrap().unwrap();
    assert_eq!(seen.state, crate::plan::VmState::Running);
    pool.shutdown();
}

/// An operator that falls behind an agent's events loses some (the agent
/// keeps a bounded buffer per watcher) and gets a `Reset`: the pool lists
/// the agent again at once, so every capsule's view converges and the
/// node stays usable. Single-threaded runtime: the creates below run
/// without yielding, so the pool's session cannot keep up.
#[tokio::test]
async fn a_reset_stream_is_listed_again_and_the_view_converges() {
    let agent = FakeNodeAgent::with_event_buffer("node-a", roomy(), Duration::ZERO, 4);
    let (pool, _streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    let client = pool.client("node-a").unwrap();
    let uids: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    for uid in &uids {
        client.create_capsule(create_req(uid)).await.unwrap();
    }
    wait_running(&pool, "node-a", &uids).await.unwrap();
    assert!(pool.client("node-a").is_some(), "the node is usable again");
    assert!(
        agent.count("ListCapsules") >= 2,
        "listed again after the reset: {:?}",
        session_calls(&agent)
    );
    pool.shutdown();
}

fn vm(state: crate::plan::VmState) -> Vm {
    Vm {
        state,
        ip: None,
        vmm: None,
        started_unix_nanos: 0,
        reason: None,
        message: String::new(),
        egress: crate::plan::EgressPolicy::default(),
        host_ports: Vec::new(),
    }
}

#[test]
fn a_creating_answer_gives_way_to_any_later_state_the_stream_reported() {
    use crate::plan::VmState as S;
    let (creating, running, paused) = (vm(S::Creating), vm(S::Running), vm(S::Paused));
    assert_eq!(plan_fresher(&creating, Some(&running)).state, S::Running);
    assert_eq!(plan_fresher(&creating, Some(&creating)).state, S::Creating);
    assert_eq!(plan_fresher(&creating, None).state, S::Creating);
    // Any other answer stands: the stream may not have caught up with it.
    assert_eq!(plan_fresher(&paused, Some(&running)).state, S::Paused);
}

/// `reported` is the stream's view only: an answer no event has reported
/// since is not one.
#[tokio::test]
async fn reported_is_what_the_stream_said_not_an_answer() {
    let agent = FakeNodeAgent::new("node-a", roomy(), Duration::from_secs(3600));
    let (pool, _streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    let client = pool.client("node-a").unwrap();
    let mut answer = client.create_capsule(create_req("u1")).await.unwrap();
    // An answer about a capsule the stream has not reported yet.
    answer.uid = "u2".into();
    pool.note("node-a", answer);
    assert_eq!(pool.reported("node-a", "u2"), None);
    assert!(pool.observe("node-a", "u2").flatten().is_some());
    // The create's own Creating event reaches the pool's view.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.reported("node-a", "u1").is_none() {
        assert!(Instant::now() < deadline, "u1 never reported");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        pool.reported("node-a", "u1").map(|v| v.state),
        Some(crate::plan::VmState::Creating)
    );
    assert_eq!(pool.reported("node-b", "u1"), None);
    pool.shutdown();
}

/// Name refusals come from guests: unread, they fill a bounded queue and
/// the rest are dropped; the agent's session is not disturbed by them.
#[tokio::test]
async fn unread_name_refusals_are_dropped_past_the_queue() {
    use wrenn_crds::reason::Reason;
    let agent = FakeNodeAgent::new("node-a", roomy(), Duration::from_secs(3600));
    agent.insert("u1", "ns", "c1", pb::CapsuleState::Running);
    let (pool, streams) = crate::fixtures::pool(std::slice::from_ref(&agent)).await;
    let sent = REFUSALS_QUEUED + 50;
    for i in 0..sent {
        agent.refuse_name("u1", &format!("n{i}.example"), Reason::NameNotAllowed, 1);
    }
    wrenn_testkit::eventually(Duration::from_secs(5), "queue never filled", || {
        streams.refusals.len() == REFUSALS_QUEUED
    })
    .await;
    // A state change after them still reaches the pool's view.
    client_pause(&pool, "u1").await;
    wrenn_testkit::eventually(Duration::from_secs(5), "pause never seen", || {
        pool.reported("node-a", "u1")
            .is_some_and(|v| v.state == crate::plan::VmState::Paused)
    })
    .await;
    assert_eq!(streams.refusals.len(), REFUSALS_QUEUED);
    pool.shutdown();
}

async fn client_pause(pool: &AgentPool, uid: &str) {
    let client = pool.client("node-a").unwrap();
    client.pause_capsule(uid.to_string()).await.unwrap();
}
