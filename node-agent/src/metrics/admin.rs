//! The admin HTTP server: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process answers) and `GET /readyz` (recovery is done). Plain
//! HTTP/1.1 on its own port, without authentication: anyone who reaches
//! the address may scrape it. So it binds where the admin says (the pod IP
//! or loopback, [`AdminListen`]), shows no capsule UIDs unless told to
//! ([`AdminState::capsule_labels`]), and bounds what a client may hold:
//! a deadline for the request head, one request per connection, a deadline
//! for the whole connection, and a cap on connections.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Error, Metrics};

/// OpenMetrics text, which Prometheus negotiates and prometheus-client
/// writes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin server serves from.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The agent's metrics and readiness flag.
    pub metrics: Arc<Metrics>,
    /// Show per-capsule series, labelled with capsule UIDs, on /metrics.
    /// Off, /metrics names no capsule: the port has no authentication.
    pub capsule_labels: bool,
    /// Deadlines and the connection cap.
    pub limits: AdminLimits,
}

impl AdminState {
    /// Serves `metrics` without capsule labels, with [`AdminLimits::default`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            capsule_labels: false,
            limits: AdminLimits::default(),
        }
    }
}

/// What one client may hold on the admin port.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// Time to send the request head.
    pub header_timeout: Duration,
    /// Time for the whole connection (one request, one response).
    pub connection_timeout: Duration,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_connections: 32,
        }
    }
}

/// Serves until `shutdown` resolves, then closes open connections.
/// Accept errors other than running out of fds end the server.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(state.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, "admin accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            Err(source) => return Err(Error::Accept { source }),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        connections.spawn(async move {
            let _slot = slot;
            let limits = state.limits;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // One request per connection: no idle keep-alive to hold.
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = &e as &dyn std::error::Error, "admin connection");
                }
                Err(_) => tracing::debug!("admin connection timed out"),
            }
        });
    }
    connections.shutdown().await;
    Ok(())
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = if state.capsule_labels {
                state.metrics.encode()
            } else {
                state.metrics.encode_without_capsules()
            };
            reply(StatusCode::OK, METRICS_CONTENT_TYPE, text)
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.metrics.is_ready() => {
            reply(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "recovering\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Where the admin server listens: an address, or this pod's IP (with the
/// host network: the node's address) and a port, written `pod-ip:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminListen {
    /// A fixed address, e.g. `127.0.0.1:9090`.
    Addr(SocketAddr),
    /// The pod IP (`--pod-ip`, from the downward API) and this port.
    PodIp(u16),
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("pod-ip:") {
            return port
                .parse()
                .map(AdminListen::PodIp)
                .map_err(|_| format!("{s:?}: pod-ip:PORT needs a port number"));
        }
        s.parse()
            .map(AdminListen::Addr)
            .map_err(|_| format!("{s:?}: want IP:PORT, [IPv6]:PORT or pod-ip:PORT"))
    }
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminListen::Addr(a) => write!(f, "{a}"),
            AdminListen::PodIp(p) => write!(f, "pod-ip:{p}"),
        }
    }
}

impl AdminListen {
    /// The address to bind, given the pod IP from the downward API.
    pub fn resolve(self, pod_ip: Option<&str>) -> Result<SocketAddr, String> {
        match self {
            AdminListen::Addr(a) => Ok(a),
            AdminListen::PodIp(port) => {
                let ip = pod_ip
                    .filter(|s| !s.is_empty())
                    .ok_or("--admin-listen pod-ip:PORT needs --pod-ip (POD_IP)")?;
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("--pod-ip {ip:?} is not an IP address"))?;
                Ok(SocketAddr::new(ip, port))
            }
        }
    }
}

/// Flags of the admin port besides its address (flattened into the agent's).
#[derive(Clone, Debug, clap::Args)]
pub struct AdminArgs {
    /// This pod's IP (downward API `status.podIP`), bound by
    /// `--admin-listen pod-ip:PORT`.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<String>,
    /// Show per-capsule series, labelled with capsule UIDs, on /metrics.
    /// The port has no authentication: leave off unless only your
    /// monitoring can reach it.
    #[arg(
        long,
        env = "WRENN_METRICS_CAPSULE_LABELS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub metrics_capsule_labels: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn listen_addresses_parse_and_resolve() {
        let pod: AdminListen = "pod-ip:9090".parse().unwrap();
        assert_eq!(pod, AdminListen::PodIp(9090));
        assert_eq!(
            pod.resolve(Some("10.0.0.7")).unwrap(),
            "10.0.0.7:9090".parse().unwrap()
        );
        assert_eq!(
            pod.resolve(Some("fd00::7")).unwrap(),
            "[fd00::7]:9090".parse().unwrap()
        );
        assert!(pod.resolve(None).unwrap_err().contains("--pod-ip"));
        assert!(pod.resolve(Some("node-a")).is_err());
        let lo: AdminListen = "127.0.0.1:9090".parse().unwrap();
        assert_eq!(lo.resolve(None).unwrap(), "127.0.0.1:9090".parse().unwrap());
        assert!("pod-ip:x".parse::<AdminListen>().is_err());
        assert!("localhost:9090".parse::<AdminListen>().is_err());
    }
}
