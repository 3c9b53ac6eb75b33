//! Command-line flags, each with an environment fallback and a default.
//! The Helm chart sets these by name; renaming one breaks it. How agents
//! are reached and logging are the operator's flag groups.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
pub use wrenn_operator::args::{AgentClientArgs, LogArgs};

/// Flags of `wrenn-gateway`.
#[derive(Debug, Parser)]
#[command(
    name = "wrenn-gateway",
    version,
    about = "Wrenn gateway: the subresources.wrenn.dev aggregated API (exec into capsules)"
)]
pub struct Args {
    /// Address of the HTTPS port the API server's front proxy calls.
    #[arg(long, env = "WRENN_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM); the APIService's caBundle must verify it.
    #[arg(
        long,
        env = "WRENN_SERVING_CERT",
        default_value = "/etc/wrenn/serving/tls.crt"
    )]
    pub serving_cert: PathBuf,
    /// Key of the serving certificate (PEM).
    #[arg(
        long,
        env = "WRENN_SERVING_KEY",
        default_value = "/etc/wrenn/serving/tls.key"
    )]
    pub serving_key: PathBuf,
    /// Node agents and the gateway's identity towards them.
    #[command(flatten)]
    pub agents: AgentClientArgs,
    /// This replica's namespace (downward API): where the node-agent Pods
    /// are found unless `--agent-namespace` says otherwise.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Seconds an allow decision of a SubjectAccessReview is reused (0: never).
    #[arg(
        long,
        env = "WRENN_AUTHZ_CACHE_SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=30)
    )]
    pub authz_cache_seconds: u64,
    /// Seconds between re-reads of the front-proxy CA and the serving certificate.
    #[arg(
        long,
        env = "WRENN_RELOAD_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub reload_seconds: u64,
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
        let a = Args::try_parse_from(["wrenn-gateway"]).unwrap();
        assert_eq!(a.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(a.agents.agent_port, 7443);
        assert_eq!(a.authz_cache_seconds, 5);
        assert!(Args::try_parse_from(["wrenn-gateway", "--authz-cache-seconds", "60"]).is_err());
    }
}
