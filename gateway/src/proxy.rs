//! `capsules/proxy`, like `pods/proxy`: `…/capsules/NAME/proxy/PORT/PATH`
//! with any method reaches the HTTP server on declared port `PORT` (a
//! number or a declared port's name) of the capsule at `/PATH`, query
//! included, over one connection through the node agent
//! ([`crate::tunnel`]). A WebSocket upgrade is passed through: once the
//! guest answers `101`, bytes are copied both ways until either side
//! closes. Nothing listening is `502`, no response headers within
//! [`RESPONSE_TIMEOUT`] is `504`.
//!
//! The guest never sees who asked: the front proxy's identity headers and
//! any credentials are removed; `Host` names the guest's own port.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tonic::transport::Channel;

use crate::locate::Target;
use crate::reply::{BodyError, Reply};
use crate::route::{Reason, Refusal};
use crate::tunnel;
use crate::upgrade::is_websocket;

/// Longest the guest's server may take to send its response headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The RBAC verb of a proxied request, as the API server names it for
/// `pods/proxy` (pure).
pub fn verb(method: &Method) -> &'static str {
    match *method {
        Method::GET | Method::HEAD => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "create",
    }
}

/// The port as asked and the guest's path and query, from the request's
/// path and query (pure).
pub fn plan_path(path: &str, query: Option<&str>) -> Result<(String, String), Refusal> {
    // apis/G/V/namespaces/NS/capsules/NAME/proxy/PORT/REST: the tenth
    // part is the guest's path, slashes and all.
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(10, '/').collect();
    if parts.len() < 8 || parts[7] != "proxy" {
        return Err(Refusal::new(Reason::NotFound, "not a capsules/proxy path"));
    }
    let port = parts.get(8).copied().unwrap_or("");
    let tail = format!("/{}", parts.get(9).copied().unwrap_or(""));
    if port.is_empty() {
        return Err(Refusal::new(
            Reason::BadRequest,
            "name the port: capsules/NAME/proxy/PORT/PATH",
        ));
    }
    let target = match query {
        Some(q) if !q.is_empty() => format!("{tail}?{q}"),
        _ => tail,
    };
    Ok((port.to_string(), target))
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are not passed on
/// (except `Upgrade` and `Connection` of an upgrade).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Whether a header must not reach the guest: hop-by-hop, credentials,
/// and the front proxy's and impersonation's identity headers (pure).
fn withheld(name: &HeaderName, upgrade: bool) -> bool {
    let n = name.as_str();
    if upgrade && (n == "connection" || n == "upgrade") {
        return false;
    }
    HOP_BY_HOP.contains(&n)
        || n == "authorization"
        || n.starts_with("x-remote-")
        || n.starts_with("impersonate-")
}

/// The headers passed to the guest (pure).
pub fn plan_request_headers(from: &HeaderMap, port: u16, upgrade: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !withheld(name, upgrade) && name != header::HOST {
            h.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("localhost:{port}")) {
        h.insert(header::HOST, v);
    }
    h
}

/// Serves one proxied request.
pub async fn serve(
    channel: Channel,
    capsule: &str,
    target: &Target,
    mut req: Request<Incoming>,
) -> Result<Reply, Refusal> {
    let (asked, path) = plan_path(req.uri().path(), req.uri().query())?;
    let port = target.declared(capsule, &asked)?;
    let upgrade = is_websocket(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let tunnel = tunnel::open(channel, capsule, &target.uid, port).await?;
    let bad_gateway = |m: String| Refusal::capsule(Reason::BadGateway, capsule, m);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel.into_io()))
        .await
        .map_err(|e| bad_gateway(format!("capsule \"{capsule}\" port {port}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = &e as &dyn std::error::Error, "proxy connection");
        }
    });
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method)
        .uri(&path)
        .body(body)
        .map_err(|e| Refusal::new(Reason::BadRequest, format!("path {path:?}: {e}")))?;
    *out.headers_mut() = plan_request_headers(&parts.headers, port, upgrade);
    let mut resp = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(bad_gateway(format!(
                "capsule \"{capsule}\" port {port} did not answer HTTP: {e}"
            )));
        }
        Err(_) => {
            return Err(Refusal::capsule(
                Reason::Timeout,
                capsule,
                format!(
                    "capsule \"{capsule}\" port {port} sent no response within {RESPONSE_TIMEOUT:?}"
                ),
            ));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let guest_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, guest_upgrade) {
                Ok((c, g)) => {
                    let (mut c, mut g) = (TokioIo::new(c), TokioIo::new(g));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut g).await;
                }
                Err(e) => tracing::debug!(error = &e as &dyn std::error::Error, "proxy upgrade"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Reply::from_parts(parts, crate::reply::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    let kept: HeaderMap = parts
        .headers
        .iter()
        .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    parts.headers = kept;
    let body = body
        .map_err(|e| BodyError(format!("the capsule's server: {e}")))
        .boxed_unsync();
    Ok(Reply::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/web/proxy";

    #[test]
    fn the_port_and_the_guest_path() {
        assert_eq!(
            plan_path(&format!("{BASE}/8080/api/x/"), Some("a=1&b")).unwrap(),
            ("8080".into(), "/api/x/?a=1&b".into())
        );
        assert_eq!(
            plan_path(&format!("{BASE}/web"), None).unwrap(),
            ("web".into(), "/".into())
        );
        assert_eq!(
            plan_path(&format!("{BASE}/8888/"), Some("")).unwrap(),
            ("8888".into(), "/".into())
        );
        // A namespace or capsule named like the subresource is no trap.
        assert_eq!(
            plan_path(
                "/apis/subresources.wrenn.dev/v1alpha1/namespaces/proxy/capsules/proxy/proxy/80/proxy",
                None
            )
            .unwrap(),
            ("80".into(), "/proxy".into())
        );
        for p in [BASE.to_string(), format!("{BASE}/"), format!("{BASE}//x")] {
            assert_eq!(
                plan_path(&p, None).unwrap_err().reason,
                Reason::BadRequest,
                "{p}"
            );
        }
    }

    #[test]
    fn the_guest_never_sees_who_asked() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-remote-user", "alice"),
            ("x-remote-group", "devs"),
            ("x-remote-extra-scopes", "s"),
            ("impersonate-user", "bob"),
            ("authorization", "Bearer t"),
            ("connection", "keep-alive"),
            ("host", "api:6443"),
            ("accept", "text/html"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = plan_request_headers(&h, 8888, false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out["accept"], "text/html");
        assert_eq!(out["host"], "localhost:8888");
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let out = plan_request_headers(&h, 8888, true);
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["connection"], "Upgrade");
    }

    #[test]
    fn verbs_as_for_pods_proxy() {
        assert_eq!(verb(&Method::GET), "get");
        assert_eq!(verb(&Method::POST), "create");
        assert_eq!(verb(&Method::DELETE), "delete");
    }
}
