//! Command-line flags, each with an environment fallback and a default,
//! and how a server binary starts from them. The Helm chart sets these by
//! name; renaming one breaks it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
pub use wrenn_runtime::log::{LogArgs, LogFormat};

/// How a client reaches node agents: their Pods, port and certificate
/// name, and the client's own identity. The operator and the gateway both
/// flatten it into their flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentClientArgs {
    /// Namespace of the node-agent Pods (default: this Pod's own, POD_NAMESPACE).
    #[arg(long, env = "WRENN_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,
    /// Label selector of the node-agent Pods.
    #[arg(
        long,
        env = "WRENN_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=wrenn-node-agent"
    )]
    pub agent_selector: String,
    /// gRPC port of every node agent.
    #[arg(long, env = "WRENN_AGENT_PORT", default_value_t = 7443)]
    pub agent_port: u16,
    /// Name every agent's server certificate carries (checked on connect).
    #[arg(
        long,
        env = "WRENN_AGENT_SERVER_NAME",
        default_value = "wrenn-node-agent"
    )]
    pub agent_server_name: String,
    /// Client certificate presented to agents (PEM); agents serve only the
    /// names they list (`--client-name`).
    #[arg(long, env = "WRENN_TLS_CERT", default_value = "/etc/wrenn/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// Key of the client certificate (PEM).
    #[arg(long, env = "WRENN_TLS_KEY", default_value = "/etc/wrenn/tls/tls.key")]
    pub tls_key: PathBuf,
    /// CA that signs the agents' server certificates (PEM).
    #[arg(long, env = "WRENN_AGENT_CA", default_value = "/etc/wrenn/tls/ca.crt")]
    pub agent_ca: PathBuf,
}

impl AgentClientArgs {
    /// The client identity and agent trust these flags name (blocking: reads the files).
    pub fn client_tls(&self) -> Result<crate::agent::ClientTls, crate::agent::tls::Error> {
        crate::agent::ClientTls::from_files(
            &self.tls_cert,
            &self.tls_key,
            &self.agent_ca,
            &self.agent_server_name,
        )
    }
}

/// The life of a Wrenn server binary: ring as the one rustls provider
/// (a dependency enabling a second cannot make the first handshake panic),
/// logging as `log` says, then `run` on a multi-threaded runtime; its
/// error chain is logged once. Exit code 2 for bad flags, 1 for a failure.
pub fn run_main<F>(program: &str, log: &LogArgs, run: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(err) = log.init() {
        eprintln!("{program}: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{program}: start async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::from(1)
        }
    }
}

/// Flags of `wrenn-operator`.
#[derive(Debug, Parser)]
#[command(
    name = "wrenn-operator",
    version,
    about = "Wrenn operator: places Capsules and drives node agents"
)]
pub struct Args {
    /// Node agents and the operator's identity towards them.
    #[command(flatten)]
    pub agents: AgentClientArgs,
    /// This replica's namespace (downward API): where the Lease is held and,
    /// by default, where the node-agent Pods are found.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// This replica's name (downward API): its Lease identity and the
    /// reporting instance of its Events.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This replica's ServiceAccount (downward API): with `pod_namespace`,
    /// the user a template's status names when it asks a namespace owner to
    /// grant the operator its pull Secret.
    #[arg(long, env = "POD_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Reconcile Capsules, CapsuleSnapshots and CapsuleTemplates of this
    /// namespace only (default: every namespace). Two operators sharing a
    /// cluster must watch disjoint namespaces and drive disjoint agents.
    #[arg(long, env = "WRENN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WRENN_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// Take the `wrenn-operator` Lease before reconciling (several replicas).
    #[arg(
        long,
        env = "WRENN_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub leader_election: bool,
    /// Seconds a deleted capsule waits for its unreachable node before its
    /// finalizer is released with a Warning Event.
    #[arg(long, env = "WRENN_NODE_LOST_TIMEOUT", default_value_t = 300)]
    pub node_lost_timeout: u64,
    /// Capsules reconciled at once (one object is never reconciled twice at
    /// once); bounds the calls in flight to node agents.
    #[arg(
        long,
        env = "WRENN_MAX_CONCURRENT_RECONCILES",
        default_value_t = 32,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub max_concurrent_reconciles: u16,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_the_chart() {
        let a = Args::try_parse_from(["wrenn-operator"]).unwrap();
        assert_eq!(
            a.agents.agent_selector,
            "app.kubernetes.io/name=wrenn-node-agent"
        );
        assert_eq!(a.agents.agent_port, 7443);
        assert_eq!(a.admin_listen.to_string(), "0.0.0.0:8080");
        assert!(a.leader_election);
        assert_eq!(a.log.log_format, LogFormat::Plain);
    }

    #[test]
    fn leader_election_can_be_turned_off() {
        let a = Args::try_parse_from(["wrenn-operator", "--leader-election", "false"]).unwrap();
        assert!(!a.leader_election);
    }
}
