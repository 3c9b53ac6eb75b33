//! The requests the gateway tests make through the API server as a user:
//! an exec over the WebSocket channel protocol ([`exec`]) and a plain
//! request to a subresource ([`call`]).
#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use wrenn_gateway::exec::{ExecOptions, build_request_path};

/// The path of an exec of `argv` in `ns/capsule` (stdout and stderr, and
/// stdin when asked).
pub fn exec_path(ns: &str, capsule: &str, argv: &[&str], stdin: bool) -> String {
    build_request_path(
        ns,
        capsule,
        &ExecOptions {
            command: argv.iter().map(|a| a.to_string()).collect(),
            stdin,
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
}

/// What an exec through the API server gave.
#[derive(Debug, Default)]
pub struct Ran {
    /// Channel 1.
    pub stdout: String,
    /// Channel 2.
    pub stderr: String,
    /// Channel 3: the `Status` the exec ended with.
    pub status: Value,
}

/// Runs `argv` in `ns/capsule` as the client's user over the WebSocket
/// channel protocol, writing `stdin` then closing it (v5) when given.
pub async fn exec(
    client: &kube::Client,
    ns: &str,
    capsule: &str,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Ran, kube::Error> {
    let req = http::Request::get(exec_path(ns, capsule, argv, stdin.is_some()))
        .body(Vec::new())
        .unwrap();
    let conn = client.connect(req).await?;
    assert!(conn.supports_stream_close(), "v5.channel.k8s.io negotiated");
    let mut ws = conn.into_stream();
    if let Some(data) = stdin {
        let mut m = vec![0u8];
        m.extend_from_slice(data);
        ws.send(Message::binary(m)).await.unwrap();
        ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    }
    let mut ran = Ran::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Ok(Message::Binary(b)) = msg else {
            continue;
        };
        let Some((&ch, data)) = b.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(data);
        match ch {
            1 => ran.stdout.push_str(&text),
            2 => ran.stderr.push_str(&text),
            3 => ran.status = serde_json::from_str(&text).unwrap(),
            _ => {}
        }
    }
    Ok(ran)
}

/// The code and message of the API error `r` must be.
pub fn api_code(r: Result<Ran, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The WebSocket request of a port-forward to `port` of `capsule`.
pub fn forward_request(ns: &str, capsule: &str, port: u16) -> http::Request<Vec<u8>> {
    let path = wrenn_gateway::portforward::build_request_path(ns, capsule, &[port]);
    http::Request::get(path).body(Vec::new()).unwrap()
}

/// The path of subresource `sub` of `ns/capsule` with `query`.
pub fn sub_path(ns: &str, capsule: &str, sub: &str, query: &str) -> String {
    format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{ns}/capsules/{capsule}/{sub}?{query}"
    )
}

/// A request through the API server; the status code and the whole body.
pub async fn call(
    client: &kube::Client,
    method: http::Method,
    uri: String,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(kube::client::Body::from(body))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let code = resp.status().as_u16();
    (
        code,
        resp.into_body().collect_bytes().await.unwrap().to_vec(),
    )
}

/// `body` as JSON, or a panic showing it.
pub fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}
