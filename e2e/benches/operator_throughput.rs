//! Speed of the operator against a real kube-apiserver, on in-process fake
//! node agents (no VMM: the boot delay is a parameter, 0 ms by default), in
//! two scenarios that stop by themselves:
//!
//! - **single**: `--sequential` capsules applied one after the other, each
//!   waited for until Running: apply → Running p50/p90/p99/max;
//! - **burst**: `--capsules` applied with `--concurrency` creates in
//!   flight on `--agents` agents, until every one is Running: wall time,
//!   capsules per second, apply → Running percentiles, API writes per
//!   capsule (writes to the Capsule objects, seen as resourceVersion
//!   changes, plus Events) and the status shapes written.
//!
//! After each scenario a table of where the operator spent its time: the
//! `tracing` spans of the operator (reconcile stages, agent calls, status
//! writes), count, p50, p99 and total.
//!
//! Parameters: `--capsules N --concurrency N --agents N --boot-ms N
//! --sequential N` after `--`, or `WRENN_BENCH_CAPSULES`, `_CONCURRENCY`,
//! `_AGENTS`, `_BOOT_MS`, `_SEQUENTIAL`.
//! `cargo test -p wrenn-e2e --bench operator_throughput -- --capsules 200`
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::mpsc;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use wrenn_crds::Capsule;
use wrenn_crds::CapsuleTemplate;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_operator::agent::fake::{FakeConnector, FakeNodeAgent};
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;
use wrenn_proto::agent::v1 as pb;

/// What one run measures.
#[derive(Clone, Copy, Debug)]
struct Params {
    capsules: usize,
    concurrency: usize,
    agents: usize,
    boot: Duration,
    sequential: usize,
}

impl Params {
    /// From `--name value` arguments, else `WRENN_BENCH_NAME`, else the default.
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let get = |name: &str, default: usize| -> usize {
            let flag = format!("--{name}");
            let env = format!("WRENN_BENCH_{}", name.to_uppercase().replace('-', "_"));
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1).cloned())
                .or_else(|| std::env::var(env).ok())
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{flag}: not a number: {v}"))
                })
                .unwrap_or(default)
        };
        let capsules = get("capsules", 200);
        Self {
            capsules,
            concurrency: get("concurrency", capsules).max(1),
            agents: get("agents", 4).max(1),
            boot: Duration::from_millis(get("boot-ms", 0) as u64),
            sequential: get("sequential", 30),
        }
    }
}

fn main() {
    let params = Params::parse();
    let stages = Stages::default();
    let subscriber = tracing_subscriber::registry().with(
        stages.clone().with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("wrenn_operator", tracing::Level::TRACE),
        ),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();
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
        run(client, params, stages).await;
    });
}

/// Wall time of every closed operator span, by span name.
#[derive(Clone, Default)]
struct Stages(Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>);

struct Opened(Instant);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Stages {
    fn on_new_span(
        &self,
        _: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Opened(Instant::now()));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(took) = span.extensions().get::<Opened>().map(|o| o.0.elapsed()) else {
            return;
        };
        self.0
            .lock()
            .unwrap()
            .entry(span.name())
            .or_default()
            .push(took);
    }
}

impl Stages {
    fn take(&self) -> BTreeMap<&'static str, Vec<Duration>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Prints what the operator spent its time on since the last call.
    fn print(&self) {
        let mut rows: Vec<_> = self.take().into_iter().collect();
        for (_, v) in &mut rows {
            v.sort();
        }
        rows.sort_by_key(|(_, v)| std::cmp::Reverse(v.iter().sum::<Duration>()));
        println!(
            "  {:<34} {:>6} {:>10} {:>10} {:>10}",
            "operator span", "count", "p50", "p99", "total"
        );
        for (name, v) in rows {
            println!(
                "  {:<34} {:>6} {:>10} {:>10} {:>10}",
                name,
                v.len(),
                fmt(pct(&v, 50)),
                fmt(pct(&v, 99)),
                fmt(v.iter().sum())
            );
        }
    }
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn fmt(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

/// Capsule writes and Running times seen on the watch.
#[derive(Default)]
struct Seen {
    /// (uid, resourceVersion) of every write after the create.
    versions: BTreeSet<(String, String)>,
    /// When each capsule was first seen Running.
    running: BTreeMap<String, Instant>,
    /// Per capsule, the phase and condition reasons of each write.
    trail: BTreeMap<String, Vec<String>>,
}

impl Seen {
    fn record(&mut self, c: &Capsule, created_rv: &BTreeMap<String, String>) {
        let (Some(uid), Some(rv)) = (c.uid(), c.resource_version()) else {
            return;
        };
        if created_rv.get(&uid) != Some(&rv) && self.versions.insert((uid.clone(), rv)) {
            let st = c.status.as_ref();
            self.trail.entry(uid.clone()).or_default().push(format!(
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
        if c.status.as_ref().and_then(|s| s.phase) == Some(CapsulePhase::Running) {
            self.running.entry(uid).or_insert_with(Instant::now);
        }
    }
}

fn capsule(name: &str) -> Capsule {
    serde_json::from_value(json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": { "name": name },
        "spec": { "source": { "templateRef": { "name": "base" } }, "resources": { "vcpus": 1, "memory": "256Mi" } },
    }))
    .unwrap()
}

fn percentiles(mut lat: Vec<Duration>) -> String {
    lat.sort();
    format!(
        "p50 {}  p90 {}  p99 {}  max {}",
        fmt(pct(&lat, 50)),
        fmt(pct(&lat, 90)),
        fmt(pct(&lat, 99)),
        fmt(lat.last().copied().unwrap_or_default())
    )
}

async fn run(client: Client, p: Params, stages: Stages) {
    let ns = wrenn_e2e::temp_namespace(&client, "bench").await.unwrap();
    let connector = Arc::new(FakeConnector::default());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for i in 0..p.agents {
        let node = format!("{ns}-n{i}");
        connector.add(FakeNodeAgent::new(
            &node,
            pb::Resources {
                vcpus: 1024,
                memory_bytes: 4 << 40,
                disk_bytes: 64 << 40,
            },
            p.boot,
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
            pool: pool.clone(),
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
    // Measure reconciles, not start-up: wait for every agent to sync.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.ready_nodes().len() < p.agents {
        assert!(Instant::now() < deadline, "agents never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    // Follow every write from before the first create, so none is missed.
    let (tx, mut watch) = mpsc::unbounded_channel();
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
            if let watcher::Event::Apply(c) | watcher::Event::InitApply(c) = ev
                && tx.send(c).is_err()
            {
                return;
            }
        }
    });
    init_rx.await.unwrap();
    stages.take();

    println!(
        "operator_throughput: {} agents (fake VMM, boot {} ms), {} parallel reconciles",
        p.agents,
        p.boot.as_millis(),
        Settings::default().concurrency
    );
    if p.sequential > 0 {
        let mut seen = Seen::default();
        let mut created_rv = BTreeMap::new();
        let mut lat = Vec::new();
        for i in 0..p.sequential {
            let t0 = Instant::now();
            let c = caps
                .create(&PostParams::default(), &capsule(&format!("s{i}")))
                .await
                .unwrap();
            let uid = c.uid().unwrap();
            created_rv.insert(uid.clone(), c.resource_version().unwrap());
            while !seen.running.contains_key(&uid) {
                let c = tokio::time::timeout(Duration::from_secs(60), watch.recv())
                    .await
                    .expect("capsule Running within 60 s")
                    .unwrap();
                seen.record(&c, &created_rv);
            }
            lat.push(seen.running[&uid] - t0);
        }
        println!("single: {} capsules applied one at a time", p.sequential);
        println!("  apply->Running        {}", percentiles(lat));
        println!(
            "  capsule writes        {:.2} per capsule to Running",
            seen.versions.len() as f64 / p.sequential as f64
        );
        stages.print();
    }

    // Burst: every create issued with `concurrency` in flight.
    let mut seen = Seen::default();
    let started = Instant::now();
    let created: Vec<(String, String, Instant)> = futures::stream::iter(0..p.capsules)
        .map(|i| {
            let caps = caps.clone();
            async move {
                let t0 = Instant::now();
                let c = caps
                    .create(&PostParams::default(), &capsule(&format!("c{i}")))
                    .await
                    .unwrap();
                (c.uid().unwrap(), c.resource_version().unwrap(), t0)
            }
        })
        .buffer_unordered(p.concurrency)
        .collect()
        .await;
    let applied = started.elapsed();
    let created_rv: BTreeMap<String, String> = created
        .iter()
        .map(|(u, rv, _)| (u.clone(), rv.clone()))
        .collect();
    let created_at: BTreeMap<&str, Instant> =
        created.iter().map(|(u, _, t)| (u.as_str(), *t)).collect();
    let burst = |uid: &str| created_at.contains_key(uid);
    while seen.running.keys().filter(|u| burst(u)).count() < p.capsules {
        let c = tokio::time::timeout(Duration::from_secs(300), watch.recv())
            .await
            .expect("all capsules Running within 300 s")
            .unwrap();
        if c.uid().is_some_and(|u| burst(&u)) {
            seen.record(&c, &created_rv);
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
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Capsule")
                && e.regarding
                    .as_ref()
                    .and_then(|r| r.uid.as_deref())
                    .is_some_and(burst)
        })
        .count();
    let lat: Vec<Duration> = seen
        .running
        .iter()
        .map(|(u, t)| *t - created_at[u.as_str()])
        .collect();
    println!(
        "burst: {} capsules, {} creates in flight",
        p.capsules, p.concurrency
    );
    println!("  applied in            {}", fmt(applied));
    println!("  all Running after     {}", fmt(total));
    println!(
        "  throughput            {:.1} capsules/s to Running",
        p.capsules as f64 / total.as_secs_f64()
    );
    println!("  apply->Running        {}", percentiles(lat));
    println!(
        "  API writes/capsule    {:.2} ({} object writes + {} events)",
        (seen.versions.len() + n_events) as f64 / p.capsules as f64,
        seen.versions.len(),
        n_events
    );
    let mut shapes: BTreeMap<String, usize> = BTreeMap::new();
    for t in seen.trail.values() {
        *shapes.entry(t.join(" -> ")).or_default() += 1;
    }
    let mut shapes: Vec<_> = shapes.into_iter().collect();
    shapes.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (shape, n) in shapes.iter().take(3) {
        println!("  {n} capsules wrote: {shape}");
    }
    stages.print();
    follower.abort();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), op).await;
}
