//! The Wrenn operator: watches `Capsule`, `CapsuleSnapshot` and
//! `CapsuleTemplate`, places capsules on nodes, drives each node's agent over
//! mutual-TLS gRPC and writes status by server-side apply under the
//! `wrenn-operator` field manager. It never execs processes and never touches
//! host networking or disks: that is the node agent's job.
//!
//! This file: flags, telemetry, the admin server, leader election and
//! graceful shutdown. `anyhow` stops here.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use prometheus_client::registry::Registry;
use wrenn_operator::agent::GrpcConnector;
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;

use wrenn_operator::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    wrenn_operator::args::run_main("wrenn-operator", &log, || run(args))
}

#[derive(Clone)]
struct Admin {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn serve_metrics(State(a): State<Admin>) -> (StatusCode, String) {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &a.registry) {
        Ok(()) => (StatusCode::OK, out),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
    }
}

async fn readyz(State(a): State<Admin>) -> StatusCode {
    if a.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The Lease watch while this instance leads: `true` while it holds the
/// Lease; the task releases it once the receiver is dropped.
struct Leadership {
    rx: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Leadership {
    /// Resolves once the Lease is lost (or its task ended).
    async fn lost(&mut self) {
        while self.rx.changed().await.is_ok() {
            if !*self.rx.borrow() {
                break;
            }
        }
    }

    /// Gives the Lease up and waits briefly for the release.
    async fn release(self) {
        // Dropping the receiver makes the manager release the lease.
        drop(self.rx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The admin server's routes: metrics, liveness, readiness.
fn build_admin(registry: Registry, ready: Arc<AtomicBool>) -> Router {
    let admin = Admin {
        registry: Arc::new(registry),
        ready,
    };
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .with_state(admin)
}

/// Waits until this instance holds the `wrenn-operator` Lease; `None` when
/// a stop signal came first. Ready meanwhile: a standby is healthy.
async fn lead(
    client: &kube::Client,
    namespace: &str,
    identity: &str,
    ready: &AtomicBool,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Option<Leadership>> {
    let manager = wrenn_operator::leader::manager(client.clone(), namespace, identity)
        .await
        .context("set up leader election")?;
    let (mut rx, task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("waiting for the wrenn-operator lease");
    loop {
        if *rx.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = rx.changed() => changed.context("leader election task ended")?,
            _ = &mut *stop => return Ok(None),
        }
    }
    tracing::info!("leading");
    Ok(Some(Leadership { rx, task }))
}

async fn run(args: Args) -> Result<()> {
    let Args {
        agents,
        pod_namespace: own_namespace,
        pod_name: instance,
        service_account,
        admin_listen,
        leader_election,
        node_lost_timeout,
        max_concurrent_reconciles,
        watch_namespace,
        ..
    } = args;
    let agent_namespace = agents
        .agent_namespace
        .clone()
        .or_else(|| own_namespace.clone())
        .context("--agent-namespace (WRENN_AGENT_NAMESPACE) or POD_NAMESPACE must be set")?;
    let tls = agents.client_tls().context("load agent TLS material")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let app = build_admin(registry, ready.clone());
    let listener = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("bind admin server on {admin_listen}"))?;
    let admin_task = tokio::spawn(async move { axum::serve(listener, app).await });

    // kube's default client leaves Nagle's algorithm on: every status write
    // could wait 40 ms for the API server's delayed ACK.
    let kube_config = kube::Config::infer()
        .await
        .context("find the Kubernetes client configuration")?;
    let client =
        wrenn_operator::kube_client::build(kube_config).context("build Kubernetes client")?;

    let stop = wrenn_runtime::stop_signal();
    tokio::pin!(stop);

    // Only the Lease holder reconciles; a standby waits, ready to take over.
    let mut leadership = None;
    if leader_election {
        let ns = own_namespace.as_deref().unwrap_or(&agent_namespace);
        let identity = instance
            .clone()
            .unwrap_or_else(|| format!("wrenn-operator-{}", std::process::id()));
        match lead(&client, ns, &identity, &ready, &mut stop).await? {
            Some(l) => leadership = Some(l),
            None => return Ok(()),
        }
    }

    let connector = GrpcConnector {
        tls,
        timeout: Duration::from_secs(30),
    };
    let (pool, streams) = AgentPool::new(Arc::new(connector), Duration::from_secs(10));
    let settings = Settings {
        node_lost_timeout: Duration::from_secs(node_lost_timeout),
        concurrency: max_concurrent_reconciles,
        identity: own_namespace
            .as_deref()
            .zip(service_account.as_deref())
            .map(|(ns, sa)| format!("system:serviceaccount:{ns}:{sa}")),
        ..Settings::default()
    };
    ready.store(true, Ordering::Relaxed);
    let operator = Operator {
        client,
        pool,
        streams,
        discovery: (agent_namespace, agents.agent_selector, agents.agent_port),
        metrics,
        settings,
        instance,
        namespace: watch_namespace.filter(|ns| !ns.is_empty()),
    };
    supervise(operator, &mut stop, leadership, admin_task).await
}

/// Runs the controllers until a stop signal, a lost Lease, or the
/// controllers or the admin server ending; then lets in-flight reconciles
/// finish and gives the Lease up.
async fn supervise(
    operator: Operator,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
    mut leadership: Option<Leadership>,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<()> {
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let controllers = run_all(operator, async move {
        let _ = lost_rx.await;
    });
    tokio::pin!(controllers);
    let lost_lease = async {
        match &mut leadership {
            Some(l) => l.lost().await,
            None => std::future::pending::<()>().await,
        }
    };
    let outcome = tokio::select! {
        _ = &mut controllers => Err(anyhow::anyhow!("controllers stopped")),
        _ = stop => Ok(()),
        _ = lost_lease => Err(anyhow::anyhow!("lost the wrenn-operator lease")),
        res = admin_task => Err(anyhow::anyhow!("admin server stopped: {res:?}")),
    };
    // Let in-flight reconciles finish before the lease is given up.
    let _ = lost_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), controllers).await;
    if let Some(l) = leadership {
        l.release().await;
    }
    outcome
}
