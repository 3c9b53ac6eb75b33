//! The scenarios of one run, in order: for each concurrency, cold then
//! warm, each in rounds that alternate the two systems (Wrenn, peer, peer,
//! Wrenn, ...); plus what the page says about the machine. A scenario that
//! fails is recorded with its reason and the run goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use wrenn_crds::Capsule;
use wrenn_e2e::ControlPlane;
use wrenn_e2e::bench::driver::{self, Load, Target, status_str};
use wrenn_e2e::bench::figures::{Measured, Params, Path, Ratio, Run, SpanRow, System, ratios};
use wrenn_e2e::bench::peer::{self, Peer};

use crate::wrenn::{COLD_TEMPLATE, Stages, WARM_TEMPLATE, Wrenn, capsule};

/// Give up on one object after this long.
const OBJECT_TIMEOUT: Duration = Duration::from_secs(120);
/// A warm pool of a few hundred sandboxes fills within this.
const POOL_TIMEOUT: Duration = Duration::from_secs(600);
/// Spans kept per Wrenn scenario for the page.
const SPANS_PER_SCENARIO: usize = 6;

/// What a run produced.
pub struct Done {
    /// Every run, rounds in the order they ran.
    pub runs: Vec<Run>,
    /// The ratios of each round (path, concurrency, round).
    pub per_round: Vec<Ratio>,
    pub versions: BTreeMap<String, String>,
    pub spans: Vec<SpanRow>,
}

/// What the scenarios measured.
struct Scenarios {
    runs: Vec<Run>,
    per_round: Vec<Ratio>,
    spans: Vec<SpanRow>,
}

/// Starts the control plane and the peer, then runs every scenario of `p`.
pub fn run_all(p: &Params, stages: &Stages) -> Result<Done> {
    let cp = ControlPlane::shared().map_err(anyhow::Error::msg)?;
    // Blocking: builds (when not cached) and starts processes.
    let peer = Peer::start(cp).map_err(|e| format!("agent-sandbox did not start: {e:#}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut versions = BTreeMap::new();
    for (name, var) in [("kube-apiserver", "KUBE_VERSION"), ("kwok", "KWOK_VERSION")] {
        versions.insert(name.into(), wrenn_e2e::helm::script_var(var)?);
    }
    if let Ok(peer) = &peer {
        versions.insert("agent-sandbox".into(), peer.version.clone());
    }
    versions.insert("wrenn".into(), git_rev());
    let done = rt.block_on(async {
        let client = cp.client().await?;
        scenarios(
            &client,
            p,
            stages,
            peer.as_ref().map(|_| ()).map_err(Clone::clone),
        )
        .await
    })?;
    Ok(Done {
        runs: done.runs,
        per_round: done.per_round,
        versions,
        spans: done.spans,
    })
}

fn capsule_kind() -> ApiResource {
    ApiResource::erase::<Capsule>(&())
}

fn wrenn_target(template: &'static str) -> Target {
    Target {
        kind: capsule_kind(),
        make: Box::new(move |name| {
            let c = serde_json::to_value(capsule(name, template)).expect("a Capsule serialises");
            serde_json::from_value(c).expect("a Capsule is a DynamicObject")
        }),
        ready: |c| status_str(c, "phase") == Some("Running"),
        counted: vec![ApiResource::erase::<Event>(&())],
    }
}

fn peer_target(path: Path, pool: String) -> Target {
    let mut counted = vec![
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Event>(&()),
    ];
    match path {
        Path::Cold => Target {
            kind: peer::sandbox_kind(),
            make: Box::new(peer::sandbox),
            ready: peer::is_ready,
            counted,
        },
        Path::Warm => {
            counted.push(peer::sandbox_kind());
            Target {
                kind: peer::claim_kind(),
                make: Box::new(move |name| peer::claim(name, &pool)),
                ready: peer::is_ready,
                counted,
            }
        }
    }
}

async fn scenarios(
    client: &Client,
    p: &Params,
    stages: &Stages,
    peer: Result<(), String>,
) -> Result<Scenarios> {
    let wrenn = Wrenn::start(client, p.agents, Duration::ZERO).await?;
    let warm = wrenn
        .prepare_warm(client)
        .await
        .map_err(|e| format!("{e:#}"));
    let peer_ns = match peer {
        Ok(()) => peer_setup(client, p.agents)
            .await
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(e),
    };
    // Warm-up, not measured: first placements, first Pods on each node,
    // connections and caches of both controllers.
    let warmup = |prefix: &str| Load {
        prefix: prefix.into(),
        objects: p.agents * 2,
        in_flight: p.agents,
        timeout: OBJECT_TIMEOUT,
    };
    driver::run(
        client,
        &wrenn.ns,
        &wrenn_target(COLD_TEMPLATE),
        &warmup("warmup"),
    )
    .await
    .context("Wrenn warm-up")?;
    if let Ok(ns) = &peer_ns {
        driver::run(
            client,
            ns,
            &peer_target(Path::Cold, String::new()),
            &warmup("warmup"),
        )
        .await
        .context("agent-sandbox warm-up")?;
    }
    stages.take();

    let mut runs = Vec::new();
    let mut per_round = Vec::new();
    let mut spans = Vec::new();
    for &c in &p.in_flight {
        let objects = if c == 1 { p.sequential } else { p.objects };
        for (path, template) in [(Path::Cold, COLD_TEMPLATE), (Path::Warm, WARM_TEMPLATE)] {
            // The peer's warm pool, one per scenario, sized to a round.
            let pool = match (path, &peer_ns) {
                (Path::Cold, _) => Ok(String::new()),
                (Path::Warm, Err(e)) => Err(e.clone()),
                (Path::Warm, Ok(ns)) => peer_pool(client, ns, &format!("pool-{c}"), objects)
                    .await
                    .map_err(|e| format!("{e:#}")),
            };
            for round in 0..p.rounds.max(1) {
                let load = |prefix: &str| Load {
                    prefix: format!("{prefix}{c}r{round}"),
                    objects,
                    in_flight: c.min(objects),
                    timeout: OBJECT_TIMEOUT,
                };
                // Alternate which side goes first, so a load that grows or
                // fades over the scenario weighs on both alike.
                let order = if round % 2 == 0 {
                    [System::Wrenn, System::AgentSandbox]
                } else {
                    [System::AgentSandbox, System::Wrenn]
                };
                let mut pair = Vec::new();
                for system in order {
                    let result = match system {
                        System::Wrenn => match (path, &warm) {
                            (Path::Warm, Err(e)) => Err(e.clone()),
                            _ => driver::run(
                                client,
                                &wrenn.ns,
                                &wrenn_target(template),
                                &load(&template[..1]),
                            )
                            .await
                            .map_err(|e| format!("{e:#}")),
                        },
                        System::AgentSandbox => match (&peer_ns, &pool) {
                            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
                            (Ok(ns), Ok(pool)) => peer_round(
                                client,
                                ns,
                                path,
                                pool,
                                &load(if path == Path::Cold { "s" } else { "claim" }),
                            )
                            .await
                            .map_err(|e| format!("{e:#}")),
                        },
                    };
                    progress(system, path, c, &result);
                    let (measured, failed) = match result {
                        Ok(m) => (Some(m), None),
                        Err(e) => {
                            eprintln!("{} {path:?} {c} in flight: {e}", system.name());
                            (None, Some(e))
                        }
                    };
                    pair.push(Run {
                        system,
                        path,
                        objects,
                        in_flight: c.min(objects),
                        measured,
                        failed,
                    });
                }
                per_round.extend(ratios(&pair));
                runs.extend(pair);
            }
            let scenario = format!("{path:?} / {c} in flight");
            for (span, count, p50, p99, total) in stages.take().into_iter().take(SPANS_PER_SCENARIO)
            {
                spans.push(SpanRow {
                    scenario: scenario.clone(),
                    span: span.into(),
                    count,
                    p50_ms: p50,
                    p99_ms: p99,
                    total_ms: total,
                });
            }
        }
    }
    wrenn.stop().await;
    if let Ok(ns) = &peer_ns {
        // Nodes are cluster-scoped: remove ours (best effort).
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        for i in 0..p.agents {
            let _ = nodes
                .delete(&format!("{ns}-node-{i}"), &Default::default())
                .await;
        }
    }
    Ok(Scenarios {
        runs,
        per_round,
        spans,
    })
}

fn progress(system: System, path: Path, c: usize, r: &Result<Measured, String>) {
    if let Ok(m) = r {
        println!(
            "{:>13} {:?} {c:>3} in flight: p50 {:.1} ms  p99 {:.1} ms  {:.1}/s  {:.2} writes/object",
            system.name(),
            path,
            m.p50_ms,
            m.p99_ms,
            m.per_s,
            m.all_writes
        );
    }
}

/// The peer's namespace and kwok nodes.
async fn peer_setup(client: &Client, agents: usize) -> Result<String> {
    let ns = wrenn_e2e::temp_namespace(client, "peer").await?;
    peer::add_nodes(client, &format!("{ns}-node"), agents).await?;
    Ok(ns)
}

/// Creates the peer's warm pool `name` of `size` sandboxes (and its
/// template) and waits until it is full.
async fn peer_pool(client: &Client, ns: &str, name: &str, size: usize) -> Result<String> {
    let templates: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &peer::template_kind());
    templates
        .create(&PostParams::default(), &peer::template(name))
        .await
        .context("create the SandboxTemplate")?;
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &peer::pool_kind());
    pools
        .create(&PostParams::default(), &peer::warm_pool(name, name, size))
        .await
        .context("create the SandboxWarmPool")?;
    peer::wait_pool_full(client, ns, name, size, POOL_TIMEOUT)
        .await
        .context("the warm pool never filled")?;
    Ok(name.to_string())
}

/// One peer round; a warm one claims from `pool` (full when it starts)
/// and then waits for the pool to refill, so what runs next starts quiet.
async fn peer_round(
    client: &Client,
    ns: &str,
    path: Path,
    pool: &str,
    load: &Load,
) -> Result<Measured> {
    let m = driver::run(client, ns, &peer_target(path, pool.to_string()), load).await?;
    if path == Path::Warm {
        peer::wait_pool_full(client, ns, pool, load.objects, POOL_TIMEOUT)
            .await
            .context("the warm pool never refilled")?;
    }
    Ok(m)
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(wrenn_e2e::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Cores, CPU, kernel, memory, KVM or not, load.
pub fn machine() -> wrenn_e2e::bench::figures::Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mem_kib: f64 = field(&read("/proc/meminfo"), "MemTotal")
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or(0.0);
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    wrenn_e2e::bench::figures::Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: field(&cpuinfo, "model name"),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        virtualization: if kvm {
            "KVM".into()
        } else {
            "TCG (no KVM)".into()
        },
        load_before: read("/proc/loadavg")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
    }
}
