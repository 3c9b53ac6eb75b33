//! The Kubernetes API client every Wrenn program and test uses: kube's own
//! stack, over connections without Nagle's delay. The requests themselves
//! are left to the callers.

use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt as _;
use kube::client::retry::RetryPolicy;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// kube's own client stack (`kube::Client::try_from`: base URI, retries of
/// 429/503, authentication, impersonation headers) over TCP connections
/// that set `TCP_NODELAY`, as kubectl's do. kube's connector leaves Nagle's
/// algorithm on, so a small write behind an unacknowledged one (the
/// upgrade request after the TLS handshake, a WebSocket frame) waited for
/// the API server's delayed ACK, 40 ms on Linux: every `kubectl wrenn
/// exec` paid it. A kubeconfig naming a proxy keeps kube's own stack, which
/// tunnels through it.
pub fn build(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
    let https = config.rustls_https_connector_with_connector(build_connector())?;
    // kube's timeouts, as its own stack sets them.
    let mut timed = TimeoutConnector::new(https);
    timed.set_connect_timeout(config.connect_timeout);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    timed.set_reset_reader_on_write(config.reset_reader_on_write);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(timed);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The TCP connector under TLS: Nagle off.
fn build_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn connections_to_the_api_server_turn_nagle_off() {
        use tower::Service as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connector = build_connector();
        let uri: http::Uri = format!("http://{addr}").parse().unwrap();
        let (conn, accepted) = tokio::join!(connector.call(uri), listener.accept());
        let (conn, _) = (conn.unwrap(), accepted.unwrap());
        assert!(conn.inner().nodelay().unwrap());
    }

    #[tokio::test]
    async fn the_client_speaks_for_the_kubeconfig_user() {
        // What kube's own stack adds must still be there: the bearer token
        // and the impersonation headers reach the API server.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.auth_info.token = Some("s3cret".to_string().into());
        config.auth_info.impersonate = Some("alice".into());
        let client = build(config).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"nope","reason":"NotFound","code":404}"#;
            let reply = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_lowercase()
        });
        let req = http::Request::get("/api/v1/namespaces/a/pods/p")
            .body(Vec::new())
            .unwrap();
        let err = client.request::<serde_json::Value>(req).await.unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 404),
            "{err:?}"
        );
        let head = server.await.unwrap();
        assert!(head.contains("authorization: bearer s3cret"), "{head}");
        assert!(head.contains("impersonate-user: alice"), "{head}");
    }
}
