//! Tier 2: the operator's controllers against a real kube-apiserver, with
//! in-process fake node agents (`FakeNodeAgent`) found through real
//! node-agent Pods. Each test runs its own operator scoped to its own
//! namespace, with its own nodes.
//!
//! Why this file is long: eleven controller scenarios against one real API server
//! bed and its fake agents.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::reason::{ConditionType, Reason, find_condition};
use wrenn_crds::template::TemplatePhase;
use wrenn_crds::{Capsule, CapsuleTemplate};
use wrenn_e2e::workloads::GarbageCollector;
use wrenn_operator::agent::fake::{FakeConnector, FakeNodeAgent};
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;
use wrenn_proto::agent::v1 as pb;

const SELECTOR: &str = "app.kubernetes.io/name=wrenn-node-agent";
const GI: u64 = 1 << 30;

/// A running operator; dropping `stop` shuts it down.
struct RunningOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningOperator {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("operator stops within 30 s")
            .unwrap();
    }
}

fn start_operator(client: &Client, ns: &str, connector: Arc<FakeConnector>) -> RunningOperator {
    // RUST_LOG=wrenn_operator=debug shows what the operator did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let (pool, streams) = AgentPool::new(connector, Duration::from_secs(1));
    let op = Operator {
        client: client.clone(),
        pool,
        streams,
        discovery: (ns.to_string(), SELECTOR.to_string(), 7443),
        metrics,
        settings: Settings {
            node_lost_timeout: Duration::from_secs(3),
            // Placement waits until every agent synced, or this long.
            // Under CI load (eight tests on one API server) a sync can take
            // over 5 s, and placing before it writes a transient
            // Unschedulable that blurs the write count.
            settle_grace: Duration::from_secs(30),
            // Usage writes would blur the write count; they have their own interval.
            usage_interval: Duration::from_secs(3600),
            converge_interval: Duration::from_secs(60),
            ..Settings::default()
        },
        instance: None,
        namespace: Some(ns.to_string()),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_all(op, async move {
        let _ = rx.await;
    }));
    RunningOperator {
        stop: Some(tx),
        task,
    }
}

/// A node-agent Pod on `node` with an IP, as the DaemonSet and kubelet would make it.
async fn agent_pod(client: &Client, ns: &str, node: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": format!("agent-{node}"), "labels": { "app.kubernetes.io/name": "wrenn-node-agent" } },
        "spec": { "nodeName": node, "containers": [{ "name": "agent", "image": "wrenn/node-agent:test" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        &format!("agent-{node}"),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "podIP": ip, "podIPs": [{ "ip": ip }] } })),
    )
    .await
    .unwrap();
}

struct Nodes {
    connector: Arc<FakeConnector>,
    agents: Vec<Arc<FakeNodeAgent>>,
}

async fn nodes(client: &Client, ns: &str, vcpus: u32) -> Nodes {
    let connector = Arc::new(FakeConnector::default());
    let mut agents = Vec::new();
    for (i, suffix) in ["a", "b"].iter().enumerate() {
        let node = format!("{ns}-{suffix}");
        let agent = FakeNodeAgent::new(
            &node,
            pb::Resources {
                vcpus,
                memory_bytes: 16 * GI,
                disk_bytes: 100 * GI,
            },
            Duration::from_millis(300),
        );
        connector.add(agent.clone());
        agent_pod(client, ns, &node, &format!("127.0.0.{}", i + 2)).await;
        agents.push(agent);
    }
    Nodes { connector, agents }
}

async fn apply<K>(client: &Client, ns: &str, body: serde_json::Value) -> K
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let obj: K = serde_json::from_value(body).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

async fn template(client: &Client, ns: &str) {
    let _: CapsuleTemplate = apply(
        client,
        ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": { "name": "base" },
            "spec": { "source": { "image": { "reference": "docker.io/library/debian:bookworm" } } },
        }),
    )
    .await;
}

async fn capsule(client: &Client, ns: &str, name: &str, vcpus: u32) -> Capsule {
    apply(
        client,
        ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": name },
            "spec": { "source": { "templateRef": { "name": "base" } }, "resources": { "vcpus": vcpus, "memory": "512Mi" } },
        }),
    )
    .await
}

/// Polls object `name` of `ns` until `check` holds, returning it; past
/// 30 s the test fails showing its status.
async fn wait_object<K>(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + kube::core::object::HasStatus
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::Status: std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = api.get(name).await.unwrap();
        if check(&o) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "{} {name}: {what} not reached in 30 s; status: {:?}",
            K::kind(&()),
            o.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the capsule until `check` holds, returning it.
async fn wait_capsule(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Capsule) -> bool,
) -> Capsule {
    wait_object(client, ns, name, what, check).await
}

/// Polls the capsule until it is Running, returning it.
async fn wait_running(client: &Client, ns: &str, name: &str) -> Capsule {
    wait_capsule(client, ns, name, "Running", |c| {
        phase(c) == Some(CapsulePhase::Running)
    })
    .await
}

fn phase(c: &Capsule) -> Option<CapsulePhase> {
    c.status.as_ref().and_then(|s| s.phase)
}

async fn wait_until(what: &str, check: impl FnMut() -> bool) {
    wrenn_testkit::eventually(Duration::from_secs(30), what, check).await
}

/// Polls `check` (which may call the API) until it holds, for 30 s.
async fn poll<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wrenn_testkit::eventually_async(Duration::from_secs(30), what, check).await
}

async fn set_mode(client: &Client, ns: &str, name: &str, mode: &str) {
    let api: Api<Capsule> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "operatingMode": mode } })),
    )
    .await
    .unwrap();
}

/// What most cases start from: a namespace, two fake nodes of `vcpus`
/// each, the operator driving them, and template `base`. The `Env` is
/// held to the end of the case: dropping it records the outcome.
async fn bed(
    name: &str,
    vcpus: u32,
) -> Option<(common::Env, Client, String, Nodes, RunningOperator)> {
    let env = common::setup(name).await?;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let nodes = nodes(&client, &ns, vcpus).await;
    let op = start_operator(&client, &ns, nodes.connector.clone());
    template(&client, &ns).await;
    Some((env, client, ns, nodes, op))
}

/// Stops the operator, then removes the Node objects `<ns>-a` and `<ns>-b`
/// a test made: they are cluster-scoped, so the namespace's end does not
/// take them.
async fn stop_and_delete_nodes(
    op: RunningOperator,
    node_api: &Api<k8s_openapi::api::core::v1::Node>,
    ns: &str,
) {
    op.stop().await;
    for suffix in ["a", "b"] {
        let _ = node_api
            .delete(&format!("{ns}-{suffix}"), &DeleteParams::default())
            .await;
    }
}

fn vm_state(nodes: &Nodes, uid: &str) -> Option<pb::CapsuleState> {
    nodes
        .agents
        .iter()
        .find_map(|a| a.capsule(uid))
        .and_then(|c| pb::CapsuleState::try_from(c.state).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsule_runs_pauses_suspends_resumes_and_is_deleted() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::lifecycle", 8).await else {
        return;
    };

    // Every write to the capsule bumps its resourceVersion; a watch sees each.
    let api: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let cfg = watcher::Config::default().fields("metadata.name=c1");
    let mut versions = watcher(api.clone(), cfg).boxed();
    let created = capsule(&client, &ns, "c1", 1).await;
    let uid = created.uid().unwrap();
    let created_rv = created.resource_version().unwrap();
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    let mut shown = Vec::new();
    let running = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), versions.next())
            .await
            .expect("capsule reaches Running within 30 s")
            .unwrap()
            .unwrap();
        if let watcher::Event::Apply(c) | watcher::Event::InitApply(c) = ev {
            let rv = c.resource_version().unwrap();
            if rv != created_rv && seen.insert(rv) {
                let st = c.status.as_ref();
                let conds: Vec<_> = st
                    .map(|s| {
                        s.conditions
                            .iter()
                            .map(|c| format!("{}={}", c.type_, c.reason))
                            .collect()
                    })
                    .unwrap_or_default();
                shown.push(format!(
                    "{:?} {conds:?} finalizers={:?}",
                    phase(&c),
                    c.finalizers()
                ));
            }
            if phase(&c) == Some(CapsulePhase::Running) {
                break c;
            }
        }
    };
    let to_running = started.elapsed();
    drop(versions);
    let st = running.status.clone().unwrap();
    assert!(
        st.ip.as_deref().unwrap().starts_with("10.201."),
        "IP comes from the agent: {st:?}"
    );
    let node = st.node_name.clone().unwrap();
    assert!(node.starts_with(&ns));
    assert_eq!(st.observed_generation, running.metadata.generation);
    let ready = find_condition(&st.conditions, ConditionType::Ready).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Running")
    );
    assert_eq!(running.finalizers(), ["wrenn.dev/node-cleanup"]);
    assert!(
        running.annotations().is_empty(),
        "the operator never annotates user objects: {:?}",
        running.annotations()
    );

    // The Running Event follows the status write that shows Running.
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    let ours: Vec<K8sEvent> = loop {
        let ours: Vec<K8sEvent> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid.as_str()))
            .collect();
        if ours
            .iter()
            .any(|e| e.reason.as_deref() == Some(Reason::Running.as_str()))
            || Instant::now() > deadline
        {
            break ours;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reasons: Vec<_> = ours.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(
        reasons.iter().any(|r| *r == Reason::Scheduled),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| *r == Reason::Running), "{reasons:?}");
    let writes = seen.len() + ours.len();
    eprintln!(
        "apply -> Running: {:?}; API writes: {} to the Capsule + {} Events = {writes}",
        to_running,
        seen.len(),
        ours.len()
    );
    assert!(
        writes <= 6,
        "{writes} API writes from apply to Running:\n{}\nevents: {reasons:?}",
        shown.join("\n")
    );

    // The template's controller runs beside the capsule's: a capsule may
    // reach Running before its template's Ready is written.
    wait_template(&client, &ns, "base", |t| {
        template_status(t).0 == Some(TemplatePhase::Ready)
    })
    .await;

    for (mode, want, vm) in [
        ("Paused", CapsulePhase::Paused, pb::CapsuleState::Paused),
        (
            "Suspended",
            CapsulePhase::Suspended,
            pb::CapsuleState::Suspended,
        ),
        ("Running", CapsulePhase::Running, pb::CapsuleState::Running),
    ] {
        set_mode(&client, &ns, "c1", mode).await;
        let c = wait_capsule(&client, &ns, "c1", mode, |c| phase(c) == Some(want)).await;
        assert_eq!(vm_state(&nodes, &uid), Some(vm), "agent state after {mode}");
        let st = c.status.unwrap();
        let cond = |t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| c.status.clone())
                .unwrap()
        };
        assert_eq!(
            cond("Paused"),
            if mode == "Paused" { "True" } else { "False" }
        );
        assert_eq!(
            cond("Suspended"),
            if mode == "Suspended" { "True" } else { "False" }
        );
        assert_eq!(
            st.node_name.as_deref(),
            Some(node.as_str()),
            "stays on its node"
        );
    }

    api.delete("c1", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.get_opt("c1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "capsule still there after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deleted: usize = nodes
        .agents
        .iter()
        .map(|a| {
            a.calls()
                .iter()
                .filter(|(c, u)| *c == "DeleteCapsule" && *u == uid)
                .count()
        })
        .sum();
    assert!(deleted >= 1, "DeleteCapsule called on the agent");
    assert!(
        nodes.agents.iter().all(|a| a.uids().is_empty()),
        "no VM left"
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_capsule_says_why_per_node() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::unschedulable", 2).await
    else {
        return;
    };
    capsule(&client, &ns, "big", 4).await;
    let c = wait_capsule(&client, &ns, "big", "Unschedulable", |c| {
        c.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == ConditionType::Scheduled && c.reason == Reason::Unschedulable)
        })
    })
    .await;
    let st = c.status.unwrap();
    let sched = find_condition(&st.conditions, ConditionType::Scheduled).unwrap();
    assert_eq!(sched.status, "False");
    assert_eq!(
        sched.message,
        format!(
            "0/2 nodes fit: {ns}-a: not enough vcpus (need 4, free 2); {ns}-b: not enough vcpus (need 4, free 2)"
        )
    );
    assert_eq!(st.phase, Some(CapsulePhase::Pending));
    assert!(nodes.agents.iter().all(|a| a.count("CreateCapsule") == 0));

    // A capsule that names a missing template waits with its own reason.
    let _: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "orphaned" },
            "spec": { "source": { "templateRef": { "name": "nope" } } },
        }),
    )
    .await;
    wait_capsule(&client, &ns, "orphaned", "TemplateNotFound", |c| {
        c.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == ConditionType::Scheduled && c.reason == Reason::TemplateNotFound
            })
        })
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_deletes_orphans_recreates_vanished_and_never_duplicates() {
    let Some(env) = common::setup("operator_capsule::restart").await else {
        return;
    };
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let nodes = nodes(&client, &ns, 8).await;
    template(&client, &ns).await;

    let op = start_operator(&client, &ns, nodes.connector.clone());
    let first = capsule(&client, &ns, "first", 1).await;
    let first_uid = first.uid().unwrap();
    wait_running(&client, &ns, "first").await;
    op.stop().await;

    // While the operator is down: an orphan VM appears on node a, the
    // first capsule's VM vanishes, and a new capsule is applied.
    nodes.agents[0].insert("orphan-uid", &ns, "ghost", pb::CapsuleState::Running);
    let first_node = nodes
        .agents
        .iter()
        .position(|a| a.capsule(&first_uid).is_some())
        .unwrap();
    nodes.agents[first_node].vanish(&first_uid);
    let second = capsule(&client, &ns, "second", 1).await;
    let second_uid = second.uid().unwrap();

    let op = start_operator(&client, &ns, nodes.connector.clone());
    wait_until("orphan VM deleted", || {
        !nodes.agents[0].uids().contains(&"orphan-uid".to_string())
    })
    .await;
    wait_running(&client, &ns, "second").await;
    let again = wait_capsule(&client, &ns, "first", "recreated", |c| {
        phase(c) == Some(CapsulePhase::Running)
            && nodes.agents[first_node].capsule(&first_uid).is_some()
    })
    .await;
    assert_eq!(
        again.status.unwrap().node_name.as_deref(),
        Some(format!("{ns}-{}", ["a", "b"][first_node]).as_str()),
        "recreated on the node it was placed on"
    );
    for uid in [&first_uid, &second_uid] {
        let holders = nodes
            .agents
            .iter()
            .filter(|a| a.capsule(uid).is_some())
            .count();
        assert_eq!(holders, 1, "exactly one VM for {uid}");
    }
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_taken_and_a_capsule_restores_on_its_node() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::snapshot", 8).await else {
        return;
    };
    let src = capsule(&client, &ns, "src", 2).await;
    let running = wait_running(&client, &ns, "src").await;
    let node = running.status.unwrap().node_name.unwrap();
    let snap: wrenn_crds::CapsuleSnapshot = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
            "metadata": { "name": "s1" },
            "spec": { "capsuleName": "src" },
        }),
    )
    .await;
    let snaps: Api<wrenn_crds::CapsuleSnapshot> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let s = snaps.get("s1").await.unwrap();
        if s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot not Ready: {:?}",
            s.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let st = ready.status.unwrap();
    assert_eq!(st.node_name.as_deref(), Some(node.as_str()));
    assert_eq!(st.size_bytes, Some(600 << 20));
    let compat = st.compatibility.unwrap();
    assert_eq!((compat.vmm.as_str(), compat.vcpus), ("fake-vmm", 2));
    assert_eq!(st.source_capsule.unwrap().uid, src.uid().unwrap());

    // Deleting the source keeps the Ready snapshot.
    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    caps.delete("src", &DeleteParams::default()).await.unwrap();
    let restored: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "restored" },
            "spec": { "source": { "snapshotRef": { "name": "s1" } } },
        }),
    )
    .await;
    let r = wait_running(&client, &ns, "restored").await;
    assert_eq!(
        r.status.as_ref().unwrap().node_name.as_deref(),
        Some(node.as_str()),
        "lands on the node that holds the snapshot"
    );
    let agent = nodes
        .agents
        .iter()
        .find(|a| a.capsule(&restored.uid().unwrap()).is_some())
        .unwrap();
    let boot = agent
        .capsule(&restored.uid().unwrap())
        .unwrap()
        .spec
        .unwrap()
        .source
        .unwrap()
        .source
        .unwrap();
    assert_eq!(
        boot,
        pb::boot_source::Source::Snapshot(pb::SnapshotRef {
            id: snap.uid().unwrap()
        })
    );
    let s = snaps.get("s1").await.unwrap();
    assert_eq!(s.status.and_then(|s| s.ready_to_use), Some(true));

    snaps.delete("s1", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while snaps.get_opt("s1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "snapshot object still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        agent.count("DeleteSnapshot"),
        1,
        "files removed on the node"
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_expiry_deletes_or_suspends() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::expiry", 8).await else {
        return;
    };
    for (name, on_expiry) in [("ttl-delete", "Delete"), ("ttl-suspend", "Suspend")] {
        let _: Capsule = apply(
            &client,
            &ns,
            json!({
                "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
                "metadata": { "name": name },
                "spec": {
                    "source": { "templateRef": { "name": "base" } },
                    "lifecycle": { "shutdownAfter": "3s", "onExpiry": on_expiry },
                },
            }),
        )
        .await;
    }
    let c = wait_capsule(&client, &ns, "ttl-suspend", "Suspended on expiry", |c| {
        phase(c) == Some(CapsulePhase::Suspended)
    })
    .await;
    let st = c.status.unwrap();
    let s = find_condition(&st.conditions, ConditionType::Suspended).unwrap();
    assert_eq!(
        (s.status.as_str(), s.reason.as_str()),
        ("True", "SuspendedOnExpiry")
    );
    assert_eq!(
        vm_state(&nodes, &c.metadata.uid.clone().unwrap()),
        Some(pb::CapsuleState::Suspended)
    );
    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while caps.get_opt("ttl-delete").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "expired capsule not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total: usize = nodes.agents.iter().map(|a| a.uids().len()).sum();
    assert_eq!(total, 1, "only the suspended capsule's VM remains");
    op.stop().await;
}

/// idleTimeout counts from the last exec/PTY/file call the agent saw, not
/// from the start: a capsule in use stays, one left alone expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_counts_from_the_last_activity() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::idle", 8).await else {
        return;
    };
    let c: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "busy" },
            "spec": {
                "source": { "templateRef": { "name": "base" } },
                "lifecycle": { "idleTimeout": "3s", "onExpiry": "Suspend" },
            },
        }),
    )
    .await;
    let uid = c.uid().unwrap();
    wait_running(&client, &ns, "busy").await;
    // In use every second for 8 s: well past 3 s since it started.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        for a in &nodes.agents {
            a.touch(&uid);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
        let now = caps.get("busy").await.unwrap();
        assert_eq!(
            phase(&now),
            Some(CapsulePhase::Running),
            "expired while in use, {:.1} s after start",
            t0.elapsed().as_secs_f64()
        );
    }
    assert!(
        nodes
            .agents
            .iter()
            .map(|a| a.count("GetCapsule"))
            .sum::<usize>()
            >= 1,
        "the operator asked the agent for the last activity"
    );
    // Left alone, it is suspended about 3 s later.
    let t1 = Instant::now();
    let c = wait_capsule(&client, &ns, "busy", "Suspended when idle", |c| {
        phase(c) == Some(CapsulePhase::Suspended)
    })
    .await;
    assert!(t1.elapsed() >= Duration::from_secs(2), "{:?}", t1.elapsed());
    let cond = c.status.unwrap();
    assert!(
        cond.conditions
            .iter()
            .any(|c| c.type_ == ConditionType::Suspended && c.reason == Reason::SuspendedOnExpiry)
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_capsule_on_a_lost_node_releases_it_after_the_timeout() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::node_lost", 8).await else {
        return;
    };
    let c = capsule(&client, &ns, "stranded", 1).await;
    let uid = c.uid().unwrap();
    wait_running(&client, &ns, "stranded").await;
    for a in &nodes.agents {
        a.set_down(true);
    }
    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let asked = Instant::now();
    caps.delete("stranded", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while caps.get_opt("stranded").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "finalizer never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "released only after the node-lost timeout, not at once ({:?})",
        asked.elapsed()
    );
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let lost = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| {
            e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid.as_str())
                && e.reason.as_deref() == Some(Reason::NodeLost.as_str())
        })
        .expect("a NodeLost event");
    assert_eq!(lost.type_.as_deref(), Some("Warning"));
    op.stop().await;
}

fn template_status(t: &CapsuleTemplate) -> (Option<TemplatePhase>, String, String) {
    let st = t.status.clone().unwrap_or_default();
    let ready = find_condition(&st.conditions, ConditionType::Ready);
    (
        st.phase,
        ready.map(|c| c.reason.clone()).unwrap_or_default(),
        ready.map(|c| c.message.clone()).unwrap_or_default(),
    )
}

async fn wait_template(
    client: &Client,
    ns: &str,
    name: &str,
    check: impl Fn(&CapsuleTemplate) -> bool,
) -> CapsuleTemplate {
    wait_object(client, ns, name, "the wanted state", check).await
}

/// Warm and `AllNodes` templates are prepared on the nodes their
/// nodeSelector picks, per-node results reach status, capsules of a warm
/// template restore its snapshot where it was built, and deleting the
/// template removes the snapshot from the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_prepared_ahead_and_warm_capsules_restore_them() {
    // The template names a node file (the fake agents never open it).
    let Some(env) = common::setup_node_images("operator_capsule::warm").await else {
        return;
    };
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let nodes = nodes(&client, &ns, 8).await;
    // Node objects: a and b run warm templates, only b the "only-b" one.
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for (suffix, only_b) in [("a", false), ("b", true)] {
        let mut labels = json!({ "wrenn.test/warm": "yes" });
        if only_b {
            labels["wrenn.test/only-b"] = json!("yes");
        }
        let n = serde_json::from_value(json!({
            "metadata": { "name": format!("{ns}-{suffix}"), "labels": labels },
        }))
        .unwrap();
        node_api.create(&PostParams::default(), &n).await.unwrap();
    }
    // b's warm build never gets ready.
    nodes.agents[1].fail_templates(
        &format!("{ns}/warm@"),
        "port 8080 refused connections for 2m0s",
    );
    let op = start_operator(&client, &ns, nodes.connector.clone());
    let warm: CapsuleTemplate = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": { "name": "warm" },
            "spec": {
                "source": { "rootfs": { "path": "web.ext4" } },
                "defaults": { "vcpus": 1, "memory": "256Mi", "disk": "1Gi" },
                "nodeSelector": { "wrenn.test/warm": "yes" },
                "warm": {
                    "startCommand": ["httpd", "-f", "-p", "8080"],
                    "readiness": { "tcpPort": 8080, "timeout": "2m" },
                },
            },
        }),
    )
    .await;
    let t = wait_template(&client, &ns, "warm", |t| {
        template_status(t).0 == Some(TemplatePhase::Ready)
            && t.status.as_ref().is_some_and(|s| {
                s.nodes.len() == 2 && s.nodes.iter().all(|n| n.ready || n.message.is_some())
            })
            && template_status(t).2.contains("failed on")
    })
    .await;
    let (_, why, msg) = template_status(&t);
    assert_eq!(why, "WarmSnapshotReady");
    assert_eq!(
        msg,
        format!(
            "warm snapshot on 1/2 nodes; failed on {ns}-b: ReadinessTimeout: port 8080 refused connections for 2m0s"
        )
    );
    let st = t.status.unwrap();
    let a = st
        .nodes
        .iter()
        .find(|n| n.name == format!("{ns}-a"))
        .unwrap();
    assert!(a.ready && a.snapshot_ready);
    let b = st
        .nodes
        .iter()
        .find(|n| n.name == format!("{ns}-b"))
        .unwrap();
    assert!(!b.ready && !b.snapshot_ready);
    // What the agent was asked to build: the defaults' shape and readiness.
    let built = nodes.agents[0].templates();
    let (key, state) = built.iter().next().unwrap();
    assert_eq!(key, &format!("{ns}/warm@{}", warm.uid().unwrap()));
    let warm_id = state.snapshot_id.clone();
    assert!(warm_id.starts_with(&format!("w-{}-", warm.uid().unwrap())));
    assert!(nodes.agents[0].count("PrepareTemplate") >= 1);

    // A capsule of the warm template restores the snapshot on a.
    let w1: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "w1" },
            "spec": { "source": { "templateRef": { "name": "warm" } } },
        }),
    )
    .await;
    let r = wait_running(&client, &ns, "w1").await;
    assert_eq!(
        r.status.unwrap().node_name,
        Some(format!("{ns}-a")),
        "only a holds the warm snapshot"
    );
    let vm = nodes.agents[0].capsule(&w1.uid().unwrap()).unwrap();
    let spec = vm.spec.unwrap();
    assert_eq!(
        spec.source.unwrap().source.unwrap(),
        pb::boot_source::Source::Snapshot(pb::SnapshotRef {
            id: warm_id.clone()
        })
    );
    assert_eq!(spec.resources.unwrap().memory_bytes, 256 << 20);

    // One asking for another shape is refused with the reason, not booted cold.
    let _: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "w2" },
            "spec": { "source": { "templateRef": { "name": "warm" } }, "resources": { "vcpus": 2 } },
        }),
    )
    .await;
    let c = wait_capsule(&client, &ns, "w2", "InvalidSpec", |c| {
        c.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == ConditionType::Scheduled && c.reason == Reason::InvalidSpec)
        })
    })
    .await;
    let msg = &c.status.unwrap().conditions[0].message;
    assert!(
        msg.contains("is warm") && msg.contains("1 vCPUs and 256Mi"),
        "{msg}"
    );

    // AllNodes: prepared on the one node its selector picks, before any capsule.
    let _: CapsuleTemplate = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": { "name": "only-b" },
            "spec": {
                "source": { "image": { "reference": "docker.io/library/debian:bookworm" } },
                "preparation": "AllNodes",
                "nodeSelector": { "wrenn.test/only-b": "yes" },
            },
        }),
    )
    .await;
    let t = wait_template(&client, &ns, "only-b", |t| {
        template_status(t).0 == Some(TemplatePhase::Ready)
    })
    .await;
    let (_, why, msg) = template_status(&t);
    assert_eq!(
        (why.as_str(), msg.as_str()),
        ("TemplateCached", "root disk on 1/1 nodes")
    );
    assert_eq!(t.status.unwrap().nodes[0].name, format!("{ns}-b"));
    assert!(
        nodes.agents[0]
            .calls()
            .iter()
            .all(|(c, k)| !(c == &"PrepareTemplate" && k.contains("/only-b@"))),
        "a is not selected"
    );
    let _: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "on-b" },
            "spec": { "source": { "templateRef": { "name": "only-b" } } },
        }),
    )
    .await;
    let r = wait_running(&client, &ns, "on-b").await;
    assert_eq!(r.status.unwrap().node_name, Some(format!("{ns}-b")));

    // Deleting the warm template removes its snapshot from a.
    let tpls: Api<CapsuleTemplate> = Api::namespaced(client.clone(), &ns);
    tpls.delete("warm", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tpls.get_opt("warm").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "template object still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        nodes.agents[0]
            .calls()
            .contains(&("DeleteSnapshot", warm_id.clone())),
        "warm snapshot removed on the node"
    );
    stop_and_delete_nodes(op, &node_api, &ns).await;
}

/// A changed `spec.network` reaches the running VM's node through
/// UpdateNetwork (no new VM), and `observedGeneration` claims the new
/// generation only once the node answered that it enforces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_change_is_applied_in_place_before_it_is_observed() {
    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::network_update", 8).await
    else {
        return;
    };
    let created = capsule(&client, &ns, "c1", 1).await;
    let uid = created.uid().unwrap();
    let running = wait_running(&client, &ns, "c1").await;
    let before = running.metadata.generation.unwrap();
    assert_eq!(running.status.unwrap().observed_generation, Some(before));

    // The node cannot load the new rules yet.
    for a in &nodes.agents {
        a.refuse_network_updates(true);
    }
    let api: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let patched = api
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "network": {
                "egress": "Deny", "allowCidrs": ["203.0.113.0/24"] } } })),
        )
        .await
        .unwrap();
    let after = patched.metadata.generation.unwrap();
    assert!(after > before);
    wait_until("UpdateNetwork tried", || {
        nodes.agents.iter().any(|a| a.count("UpdateNetwork") > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = api.get("c1").await.unwrap().status.unwrap();
    assert_eq!(
        held.observed_generation,
        Some(before),
        "a policy the node does not enforce was reported observed"
    );
    assert_eq!(held.phase, Some(CapsulePhase::Running));

    for a in &nodes.agents {
        a.refuse_network_updates(false);
    }
    wait_capsule(&client, &ns, "c1", "the new generation observed", |c| {
        c.status.as_ref().and_then(|s| s.observed_generation) == Some(after)
    })
    .await;
    let net = nodes
        .agents
        .iter()
        .find_map(|a| a.capsule(&uid))
        .and_then(|c| c.spec)
        .and_then(|s| s.network)
        .unwrap();
    assert_eq!(
        (net.egress, net.allow_cidrs),
        (pb::Egress::Deny as i32, vec!["203.0.113.0/24".to_string()])
    );
    let created: usize = nodes.agents.iter().map(|a| a.created().len()).sum();
    assert_eq!(created, 1, "the VM was recreated instead of updated");
    op.stop().await;
}

/// An agent that quarantined a capsule at start-up (unreadable journal)
/// reports it in NodeInfo; the operator turns that into a Warning Event on
/// the Node when the agent syncs, so an admin sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_capsule_is_a_warning_event_on_its_node() {
    let Some(env) = common::setup("operator_capsule::quarantine_event").await else {
        return;
    };
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let nodes = nodes(&client, &ns, 8).await;
    let uid = format!("{ns}-quarantined-uid");
    nodes.agents[0].quarantine(&uid, Reason::JournalUnreadable, "decode journal: EOF");
    let op = start_operator(&client, &ns, nodes.connector.clone());
    let node = format!("{ns}-a");
    // Events about a cluster-scoped object land in "default".
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    let ev = loop {
        let found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(Reason::CapsuleQuarantined.as_str())
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node.as_str())
            });
        if let Some(e) = found {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no CapsuleQuarantined event for {node}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let regarding = ev.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("Node"));
    let note = ev.note.unwrap_or_default();
    assert!(
        note.contains(&uid) && note.contains(Reason::JournalUnreadable.as_str()),
        "{note}"
    );
    // The other node quarantined nothing and gets no such Event.
    let other = format!("{ns}-b");
    assert!(
        !events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(
                |e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(other.as_str())
                    && e.reason.as_deref() == Some(Reason::CapsuleQuarantined.as_str())
            )
    );
    op.stop().await;
}

/// A capsule's ports with `from` become a selector-less Service and an
/// EndpointSlice pointing at its node's InternalIP and host ports, owned by
/// the capsule; an operator restart writes none of them again; a full
/// host-port range shows as PortsPublished=False HostPortsExhausted until a
/// deleted capsule gives its host port back, and the garbage collector
/// (kube-controller-manager's, nothing of ours) removes its objects; a
/// port without `from` is never published, and removing the last `from`
/// removes the objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ports_are_a_service_and_endpointslice_that_do_not_churn() {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let Some(env) = common::setup("operator_capsule::published_ports").await else {
        return;
    };
    let (client, ns) = (env.client.clone(), env.ns.clone());
    // Started first: it has to discover every resource before it collects.
    let cp = env.cp;
    let gc = tokio::task::spawn_blocking(move || GarbageCollector::start(cp))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("kube-controller-manager (garbage collector): {e:#}"));
    let nodes = nodes(&client, &ns, 8).await;
    // Node objects with an InternalIP each (cluster-scoped: removed below).
    let node_api: Api<Node> = Api::all(client.clone());
    let node_ip = |suffix: &str| {
        if suffix == "a" {
            "192.0.2.10"
        } else {
            "192.0.2.11"
        }
    };
    for suffix in ["a", "b"] {
        let name = format!("{ns}-{suffix}");
        let n: Node = serde_json::from_value(json!({ "metadata": {
            "name": name, "labels": { "kubernetes.io/hostname": name } } }))
        .unwrap();
        node_api.create(&PostParams::default(), &n).await.unwrap();
        node_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "addresses": [
                    { "type": "InternalIP", "address": node_ip(suffix) },
                    { "type": "Hostname", "address": name },
                ] } })),
            )
            .await
            .unwrap();
    }
    for a in &nodes.agents {
        a.set_host_port_range(29000, 29000);
    }
    let op = start_operator(&client, &ns, nodes.connector.clone());
    template(&client, &ns).await;
    let with_ports = |name: &str, on: Option<&str>| {
        let selector = on.map(|n| json!({ "kubernetes.io/hostname": n }));
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": name },
            "spec": {
                "source": { "templateRef": { "name": "base" } },
                "nodeSelector": selector.unwrap_or_else(|| json!({})),
                "resources": { "vcpus": 1, "memory": "512Mi" },
                "network": { "ports": [
                    { "name": "http", "port": 8888, "from": [{ "cidr": "10.244.0.0/16" }] },
                    { "port": 9000 },
                ] },
            },
        })
    };
    let cond = |c: &Capsule| {
        c.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, ConditionType::PortsPublished))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let _: Capsule = apply(&client, &ns, with_ports("c1", None)).await;
    let c1 = wait_capsule(&client, &ns, "c1", "Running with PortsPublished", |c| {
        phase(c) == Some(CapsulePhase::Running) && cond(c).is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let node = c1
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap();
    let ip = node_ip(node.rsplit('-').next().unwrap());

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    // The objects follow the status write in the same reconcile; the
    // endpoint is ready once the VM runs.
    poll("a ready endpoint in EndpointSlice c1-wrenn", || async {
        slices.get_opt("c1-wrenn").await.unwrap().is_some_and(|s| {
            s.endpoints
                .unwrap_or_default()
                .iter()
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        })
    })
    .await;
    let svc = services.get("c1").await.unwrap();
    let spec = svc.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert!(spec.selector.is_none(), "the Service must not select Pods");
    let ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.port))
        .collect();
    assert_eq!(
        ports,
        vec![("http".to_string(), 8888)],
        "port 9000 has no from"
    );
    let owner = |m: &kube::api::ObjectMeta| {
        m.owner_references
            .iter()
            .flatten()
            .map(|o| (o.kind.clone(), o.uid.clone(), o.controller))
            .collect::<Vec<_>>()
    };
    let mine = vec![("Capsule".to_string(), c1.uid().unwrap(), Some(true))];
    assert_eq!(owner(&svc.metadata), mine);
    let slice = slices.get("c1-wrenn").await.unwrap();
    assert_eq!(owner(&slice.metadata), mine);
    assert_eq!(
        slice
            .labels()
            .get("kubernetes.io/service-name")
            .map(String::as_str),
        Some("c1")
    );
    let ep = &slice.endpoints.clone().unwrap_or_default()[0];
    assert_eq!(ep.addresses, vec![ip.to_string()]);
    let sp: Vec<_> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.port))
        .collect();
    assert_eq!(sp, vec![("http".to_string(), Some(29000))]);

    // An operator restart writes neither object (nor the capsule) again.
    let versions = |s: &Service, e: &EndpointSlice, c: &Capsule| {
        (
            s.resource_version(),
            e.resource_version(),
            c.resource_version(),
        )
    };
    let api: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let before = versions(&svc, &slice, &api.get("c1").await.unwrap());
    // Settled: the running operator itself writes nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = versions(
        &services.get("c1").await.unwrap(),
        &slices.get("c1-wrenn").await.unwrap(),
        &api.get("c1").await.unwrap(),
    );
    assert_eq!(settled, before, "the operator kept writing");
    op.stop().await;
    let lists: usize = nodes.agents.iter().map(|a| a.count("ListCapsules")).sum();
    let op = start_operator(&client, &ns, nodes.connector.clone());
    wait_until("the new operator synced its agents", || {
        nodes
            .agents
            .iter()
            .map(|a| a.count("ListCapsules"))
            .sum::<usize>()
            >= lists + 2
    })
    .await;
    // Long enough for every reconcile the restart causes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = versions(
        &services.get("c1").await.unwrap(),
        &slices.get("c1-wrenn").await.unwrap(),
        &api.get("c1").await.unwrap(),
    );
    assert_eq!(after, before, "the restarted operator wrote again");

    // The node's one host port is c1's: c2, on the same node, cannot be
    // published, and says so.
    let _: Capsule = apply(&client, &ns, with_ports("c2", Some(&node))).await;
    wait_capsule(&client, &ns, "c2", "HostPortsExhausted", |c| {
        phase(c) == Some(CapsulePhase::Running)
            && cond(c).is_some_and(|(s, r, m)| {
                s == "False"
                    && r == Reason::HostPortsExhausted.as_str()
                    && m.contains("29000-29000")
            })
    })
    .await;
    // c1 goes: its host port comes back and c2 gets it.
    api.delete("c1", &DeleteParams::default()).await.unwrap();
    wait_capsule(&client, &ns, "c2", "published after c1 left", |c| {
        cond(c).is_some_and(|(s, _, m)| s == "True" && m.contains("node port 29000"))
    })
    .await;
    poll("port 29000 in c2's EndpointSlice", || async {
        slices.get_opt("c2-wrenn").await.unwrap().is_some_and(|s| {
            s.ports.iter().flatten().any(|p| p.port == Some(29000))
                && !s.endpoints.clone().unwrap_or_default().is_empty()
        })
    })
    .await;
    // c1's objects go with it, by their owner references alone.
    wrenn_testkit::eventually_async(
        Duration::from_secs(60),
        &format!(
            "c1's Service and EndpointSlice collected with it (garbage collector log {})",
            gc.log.display()
        ),
        || async {
            services.get_opt("c1").await.unwrap().is_none()
                && slices.get_opt("c1-wrenn").await.unwrap().is_none()
        },
    )
    .await;

    // No port with from left: both objects go.
    api.patch(
        "c2",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "network": { "ports": [{ "port": 9000 }] } } })),
    )
    .await
    .unwrap();
    poll("c2's Service and EndpointSlice removed", || async {
        services.get_opt("c2").await.unwrap().is_none()
            && slices.get_opt("c2-wrenn").await.unwrap().is_none()
    })
    .await;
    wait_capsule(&client, &ns, "c2", "no PortsPublished condition", |c| {
        cond(c).is_none()
    })
    .await;
    stop_and_delete_nodes(op, &node_api, &ns).await;
}

/// A port's `from` by Pod and namespace labels: the operator resolves the
/// selectors to the chosen Pods' addresses and keeps the node's sources
/// following them, live, as Pods come, change labels and go; Pods in
/// namespaces the selector does not choose, and Pods without an address,
/// are never sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_selectors_follow_the_pods_they_choose() {
    use k8s_openapi::api::core::v1::Namespace;

    let Some((_env, client, ns, nodes, op)) = bed("operator_capsule::from_selectors", 8).await
    else {
        return;
    };
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "wrenn-test-team": &ns } } })),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &'static str, app: &'static str, ip: Option<&'static str>| {
        let pods = pods.clone();
        async move {
            let p: Pod = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": { "app": app } },
                "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
            }))
            .unwrap();
            pods.create(&PostParams::default(), &p).await.unwrap();
            if let Some(ip) = ip {
                pods.patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } })),
                )
                .await
                .unwrap();
            }
        }
    };
    pod("web-1", "web", Some("10.1.0.1")).await;
    pod("web-starting", "web", None).await;
    pod("db", "db", Some("10.1.0.9")).await;
    let _: Capsule = apply(
        &client,
        &ns,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "c1" },
            "spec": {
                "source": { "templateRef": { "name": "base" } },
                "resources": { "vcpus": 1, "memory": "512Mi" },
                "network": { "ports": [
                    { "port": 8080, "from": [{ "podSelector": { "matchLabels": { "app": "web" } } }] },
                    { "port": 5432, "from": [
                        { "namespaceSelector": { "matchLabels": { "wrenn-test-team": &ns } },
                          "podSelector": { "matchLabels": { "app": "db" } } },
                        { "namespaceSelector": { "matchLabels": { "wrenn-test-team": "nobody" } } },
                    ] },
                ] },
            },
        }),
    )
    .await;
    let c1 = wait_running(&client, &ns, "c1").await;
    let uid = c1.uid().unwrap();
    let sources = |port: u32| {
        let agents = nodes.agents.clone();
        let uid = uid.clone();
        move || {
            agents
                .iter()
                .find_map(|a| a.capsule(&uid))
                .and_then(|c| c.spec?.network)
                .and_then(|n| n.ports.into_iter().find(|p| p.port == port))
                .map(|p| p.from_cidrs)
                .unwrap_or_default()
        }
    };
    let web = sources(8080);
    let db = sources(5432);
    poll("web-1 the only source of 8080, db of 5432", || async {
        web() == ["10.1.0.1/32"] && db() == ["10.1.0.9/32"]
    })
    .await;
    // A new Pod with the label: a source on the running capsule.
    pod("web-2", "web", Some("10.1.0.2")).await;
    poll("web-2 added", || async {
        web() == ["10.1.0.1/32", "10.1.0.2/32"]
    })
    .await;
    // A label changed: no longer chosen.
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "app": "other" } } })),
    )
    .await
    .unwrap();
    poll("web-1 removed after its label changed", || async {
        web() == ["10.1.0.2/32"]
    })
    .await;
    // A Pod gone: its address goes, and with no source left the port is
    // no longer published.
    pods.delete("web-2", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    poll("no source of 8080 once web-2 is gone", || async {
        web().is_empty()
    })
    .await;
    assert_eq!(db(), ["10.1.0.9/32"]);
    op.stop().await;
}
