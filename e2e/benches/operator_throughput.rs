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
//! (The operator and fake agents come from `compare/wrenn.rs`, shared with
//! the comparative benchmark `compare`.)
#![allow(clippy::unwrap_used)]

// Shared with `compare`, which also uses its warm-template side.
#[allow(dead_code)]
#[path = "compare/wrenn.rs"]
mod wrenn;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use wrenn::{COLD_TEMPLATE, Stages, Wrenn, capsule};
use wrenn_crds::Capsule;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_e2e::bench::figures::Measured;
use wrenn_operator::controller::Settings;

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
    stages.install().unwrap();
    let cp = match wrenn_e2e::ControlPlane::shared() {
        Ok(cp) => cp,
        Err(why) => {
            eprintln!("operator_throughput: SKIPPED, no control plane: {why}");
            return;
        }
    };
    wrenn_testkit::runtime().block_on(async {
        let client = cp.client().await.unwrap();
        run(client, params, stages).await;
    });
}

/// Prints what the operator spent its time on since the last call.
fn print_spans(stages: &Stages) {
    println!(
        "  {:<34} {:>6} {:>10} {:>10} {:>10}",
        "operator span", "count", "p50", "p99", "total"
    );
    for (name, count, p50, p99, total) in stages.take() {
        println!(
            "  {:<34} {:>6} {:>8.1}ms {:>8.1}ms {:>8.1}ms",
            name, count, p50, p99, total
        );
    }
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

fn percentiles(lat: Vec<Duration>) -> String {
    let m = Measured::new(lat.iter().map(|d| d.as_secs_f64() * 1e3).collect(), 0.0);
    format!(
        "p50 {:.1}ms  p90 {:.1}ms  p99 {:.1}ms  max {:.1}ms",
        m.p50_ms, m.p90_ms, m.p99_ms, m.max_ms
    )
}

async fn run(client: Client, p: Params, stages: Stages) {
    let wrenn = Wrenn::start(&client, p.agents, p.boot).await.unwrap();
    let ns = wrenn.ns.clone();
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
                .create(
                    &PostParams::default(),
                    &capsule(&format!("s{i}"), COLD_TEMPLATE),
                )
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
        print_spans(&stages);
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
                    .create(
                        &PostParams::default(),
                        &capsule(&format!("c{i}"), COLD_TEMPLATE),
                    )
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
    // The operator publishes Events beside its reconciles, so some trail
    // Running: count them once their number has not moved for 0.5 s.
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let count_events = || async {
        events
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
            .count()
    };
    let mut n_events = count_events().await;
    let trailing = Instant::now();
    while trailing.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = count_events().await;
        if now == n_events {
            break;
        }
        n_events = now;
    }
    let trailing = trailing.elapsed();
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
        "  API writes/capsule    {:.2} ({} object writes + {} events, counted until {} after the last Running)",
        (seen.versions.len() + n_events) as f64 / p.capsules as f64,
        seen.versions.len(),
        n_events,
        fmt(trailing)
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
    print_spans(&stages);
    follower.abort();
    wrenn.stop().await;
}
