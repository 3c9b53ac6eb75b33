//! `wrenn-gateway`: flags, telemetry, loading the front-proxy trust and
//! serving until SIGTERM. `anyhow` stops here.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use wrenn_gateway::args::Args;
use wrenn_gateway::authz::{Authorizer, KubeReviewer};
use wrenn_gateway::frontproxy::{CONFIGMAP_NAMESPACE, FrontProxy, ServingFiles};
use wrenn_gateway::locate::Locator;
use wrenn_gateway::server::{Gateway, serve};
use wrenn_operator::agent::GrpcConnector;

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    wrenn_operator::args::run_main("wrenn-gateway", &log, || run(args))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

async fn run(args: Args) -> Result<()> {
    let Args {
        listen,
        serving_cert,
        serving_key,
        agents,
        pod_namespace,
        authz_cache_seconds,
        reload_seconds,
        log: _,
    } = args;
    let config = kube::Config::infer()
        .await
        .context("find the Kubernetes API (in-cluster or kubeconfig)")?;
    let client =
        wrenn_operator::kube_client::build(config).context("connect to the Kubernetes API")?;
    let agent_namespace = agents
        .agent_namespace
        .clone()
        .or(pod_namespace)
        .context("--agent-namespace or POD_NAMESPACE is required")?;
    let files = agents.clone();
    let tls = tokio::task::spawn_blocking(move || files.client_tls())
        .await
        .context("load the agent client certificate")?
        .context("load the agent client certificate")?;
    let connector = GrpcConnector {
        tls,
        timeout: Duration::from_secs(30),
    };
    let (locator, pods) = Locator::new(
        client.clone(),
        &agent_namespace,
        &agents.agent_selector,
        agents.agent_port,
        connector,
    );
    let front = FrontProxy::new(ServingFiles {
        cert: serving_cert,
        key: serving_key,
    });
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), CONFIGMAP_NAMESPACE);
    // Without the front proxy's CA nothing can be served: wait for it.
    let mut backoff = Duration::from_millis(500);
    loop {
        match front.load(&configmaps).await {
            Ok(()) => break,
            Err(err) => {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "load front-proxy trust; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let authz = Authorizer::new(
        Arc::new(KubeReviewer(Api::all(client.clone()))),
        Duration::from_secs(authz_cache_seconds),
    );
    let gw = Arc::new(Gateway {
        front: front.clone(),
        authz,
        locator,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tracing::info!(%listen, "wrenn-gateway serving");
    let watch = front.watch(configmaps, Duration::from_secs(reload_seconds));
    tokio::select! {
        res = serve(listener, gw, shutdown_signal()) => res.context("serve")?,
        () = pods => anyhow::bail!("the agent Pod watch ended"),
        () = watch => anyhow::bail!("the front-proxy reload ended"),
    }
    tracing::info!("wrenn-gateway stopped");
    Ok(())
}
