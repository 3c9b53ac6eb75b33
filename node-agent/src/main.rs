//! The Wrenn node agent: one per node, privileged. It serves `agent.proto`
//! over mutual TLS to the operator and owns everything on the host — VMM
//! processes, copy-on-write root disks, capsule network namespaces, the vsock
//! link to each guest, metrics and the on-disk journal used for recovery. It
//! never reads or writes Capsule objects in Kubernetes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wrenn_node_agent::node::NodePaths;
use wrenn_node_agent::server::{self, AgentIdentity, AgentService};
use wrenn_node_agent::tls::TlsFiles;

/// Exit codes, one per failure class, so a crash loop says what is wrong.
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_LISTEN: u8 = 3;
const EXIT_SERVE: u8 = 4;

#[derive(Debug, Parser)]
#[command(version, about = "Wrenn node agent")]
struct Args {
    /// Kubernetes node name (downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Address of the gRPC server.
    #[arg(long, env = "WRENN_LISTEN", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long, env = "WRENN_TLS_CERT", default_value = "/etc/wrenn/tls/tls.crt")]
    tls_cert: PathBuf,
    /// Server key (PEM).
    #[arg(long, env = "WRENN_TLS_KEY", default_value = "/etc/wrenn/tls/tls.key")]
    tls_key: PathBuf,
    /// CA that signs the operator's client certificate (PEM).
    #[arg(long, env = "WRENN_CLIENT_CA", default_value = "/etc/wrenn/tls/ca.crt")]
    client_ca: PathBuf,
    /// State directory: journals, disks, snapshots.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn")]
    state_dir: PathBuf,
    /// Log filter, e.g. `info` or `wrenn_node_agent=debug`.
    #[arg(long, env = "WRENN_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WRENN_LOG_FORMAT", default_value = "plain")]
    log_format: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    wrenn_node_agent::tls::install_crypto_provider();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(err) => {
            eprintln!("wrenn-node-agent: --log-level {:?}: {err}", args.log_level);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format.as_str() {
        "json" => builder.json().init(),
        "plain" => builder.init(),
        other => {
            eprintln!("wrenn-node-agent: --log-format must be plain or json, not {other:?}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "start async runtime"
            );
            return ExitCode::from(EXIT_SERVE);
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let Args {
        node_name,
        listen,
        tls_cert,
        tls_key,
        client_ca,
        state_dir,
        ..
    } = args;
    let tls = TlsFiles {
        cert: tls_cert,
        key: tls_key,
        client_ca,
    };
    if let Err(err) = tls.server_config() {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "bad TLS configuration"
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%listen, error = &err as &dyn std::error::Error, "bind gRPC listener");
            return ExitCode::from(EXIT_LISTEN);
        }
    };
    let service = AgentService::new(
        AgentIdentity {
            node_name,
            vmm: None,
            storage_backend: String::new(),
        },
        NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir,
        },
    );
    tracing::info!(%listen, "serving wrenn.agent.v1 with mutual TLS");
    let shutdown = stop_signal();
    match server::serve(listener, &tls, service, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "gRPC server failed");
            ExitCode::from(EXIT_SERVE)
        }
    }
}

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT. Running capsules
/// are left alone: they outlive the agent by design.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "no SIGTERM handler; stopping on SIGINT only"
            );
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stop signal received; capsules keep running");
}
