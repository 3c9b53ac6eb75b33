//! Reconcile throughput of the operator: 200 capsules applied at once to a
//! real kube-apiserver, placed on four in-process fake node agents (boot
//! delay 50 ms), until every one is Running. Prints the wall time,
//! capsules per second, create-to-Running percentiles and API writes per
//! capsule (writes to the Capsule objects, seen as resourceVersion changes,
//! plus Events).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::{Capsule, CapsuleTemplate};
use wrenn_operator::agent::fake::{FakeConnector, FakeNodeAgent};
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;
use wrenn_proto::agent::v1 as pb;

const NODES: usize = 4;

fn main() {
    let cp = match wrenn_e2e::ControlPlane::shared() {
        Ok(cp) => cp,
        Err(why) => {
            eprintln!("operator_throughput: SKIPPED, no control plane: {why}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cp.client().await.unwrap();
        run(client).await;
    });
}

async fn run(client: Client) {
    let capsules: usize = std::env::var("WRENN_BENCH_CAPSULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let ns = wrenn_e2e::temp_namespace(&client, "bench").await.unwrap();
    let connector = Arc::new(FakeConnector::default());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for i in 0..NODES {
        let node = format!("{ns}-n{i}");
        connector.add(FakeNodeAgent::new(
            &node,
            pb::Resources {
                vcpus: 64,
                memory_bytes: 256 << 30,
                disk_bytes: 4 << 40,
            },
            Duration::from_millis(50),
        ));
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": format!("agent-{i}"), "labels": { "app.kubernetes.io/name": "wrenn-node-agent" } },
            "spec": { "nodeName": node, "containers": [{ "name": "a", "image": "x" }] },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        pods.patch_status(
            &format!("agent-{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "podIP": format!("127.0.1.{}", i + 1) } })),
        )
        .await
        .unwrap();
    }
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let (pool, streams) = AgentPool::new(connector, Duration::from_secs(1));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let op = tokio::spawn(run_all(
        Operator {
            client: client.clone(),
            pool,
            streams,
            discovery: (
                ns.clone(),
                "app.kubernetes.io/name=wrenn-node-agent".into(),
                7443,
            ),
            metrics: metrics.clone(),
            settings: Settings {
                usage_interval: Duration::from_secs(3600),
                ..Settings::default()
            },
            instance: None,
            namespace: Some(ns.clone()),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let tpl: CapsuleTemplate = serde_json::from_value(json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
        "metadata": { "name": "base" },
        "spec": { "source": { "image": { "reference": "docker.io/library/debian:bookworm" } } },
    }))
    .unwrap();
    let tpls: Api<CapsuleTemplate> = Api::namespaced(client.clone(), &ns);
    tpls.create(&PostParams::default(), &tpl).await.unwrap();
    // Let the agents sync so the run measures reconciles, not start-up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    // Follow every write from before the first create, so none is missed.
    let (tx, mut watch) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = watcher(caps.clone(), watcher::Config::default()).boxed();
    let (init_tx, init_rx) = tokio::sync::oneshot::channel();
    let follower = tokio::spawn(async move {
        let mut init = Some(init_tx);
        while let Some(Ok(ev)) = stream.next().await {
            if matches!(ev, watcher::Event::InitDone)
                && let Some(i) = init.take()
            {
                let _ = i.send(());
            }
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    init_rx.await.unwrap();
    let started = Instant::now();
    let mut created_rv = BTreeMap::new();
    let mut created_at = BTreeMap::new();
    for i in 0..capsules {
        let c: Capsule = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": format!("c{i}") },
            "spec": { "source": { "templateRef": { "name": "base" } }, "resources": { "vcpus": 1, "memory": "256Mi" } },
        }))
        .unwrap();
        let c = caps.create(&PostParams::default(), &c).await.unwrap();
        created_rv.insert(c.uid().unwrap(), c.resource_version().unwrap());
        created_at.insert(c.uid().unwrap(), Instant::now());
    }
    let applied = started.elapsed();
    let mut versions: BTreeSet<(String, String)> = BTreeSet::new();
    let mut running: BTreeMap<String, Duration> = BTreeMap::new();
    let mut trail: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while running.len() < capsules {
        let ev = tokio::time::timeout(Duration::from_secs(300), watch.recv())
            .await
            .expect("all capsules Running within 300 s")
            .unwrap();
        if let watcher::Event::Apply(c) | watcher::Event::InitApply(c) = ev {
            let uid = c.uid().unwrap();
            let rv = c.resource_version().unwrap();
            if created_rv.get(&uid) != Some(&rv) && versions.insert((uid.clone(), rv)) {
                let st = c.status.as_ref();
                if std::env::var_os("WRENN_BENCH_DIFF").is_some() {
                    let now = serde_json::to_string(&c.status).unwrap();
                    if let Some(prev) = last.insert(uid.clone(), now.clone())
                        && prev.contains("\"phase\":\"Running\"")
                    {
                        eprintln!("same-phase write:\n  {prev}\n  {now}");
                    }
                }
                trail.entry(uid.clone()).or_default().push(format!(
                    "{:?}/{}",
                    st.and_then(|s| s.phase),
                    st.map(|s| {
                        s.conditions
                            .iter()
                            .map(|c| format!("{}={}", c.type_, c.reason))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
                ));
            }
            if c.status.as_ref().and_then(|s| s.phase) == Some(CapsulePhase::Running)
                && !running.contains_key(&uid)
            {
                let t = created_at
                    .get(&uid)
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                running.insert(uid, t);
            }
        }
    }
    let total = started.elapsed();
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let n_events = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Capsule"))
        .count();
    let mut lat: Vec<Duration> = running.values().copied().collect();
    lat.sort();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    println!("operator_throughput: {capsules} capsules on {NODES} fake agents (boot 50 ms)");
    println!("  applied in            {applied:?}");
    println!("  all Running after     {total:?}");
    println!(
        "  throughput            {:.1} capsules/s to Running",
        capsules as f64 / total.as_secs_f64()
    );
    println!(
        "  create->Running       p50 {:?}  p90 {:?}  p99 {:?}",
        pct(50),
        pct(90),
        pct(99)
    );
    println!(
        "  API writes/capsule    {:.2} ({} object writes + {} events)",
        (versions.len() + n_events) as f64 / capsules as f64,
        versions.len(),
        n_events
    );
    let mut shapes: BTreeMap<String, usize> = BTreeMap::new();
    for t in trail.values() {
        *shapes.entry(t.join(" -> ")).or_default() += 1;
    }
    let mut shapes: Vec<_> = shapes.into_iter().collect();
    shapes.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (shape, n) in shapes.iter().take(3) {
        println!("  {n} capsules wrote: {shape}");
    }
    follower.abort();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), op).await;
}
