//! The HTTPS listener: TLS with the front-proxy CA ([`FrontProxy`]), HTTP/1.1
//! and HTTP/2, and per request: route → authenticate → authorize → serve.
//! Health paths answer anyone (the kubelet's probes); everything else needs
//! the front proxy. Handshakes have a deadline, so a silent peer holds
//! nothing for long.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::authz::{Access, Authorizer};
use crate::files::FileOp;
use crate::frontproxy::{FrontProxy, Peer, identify};
use crate::locate::Locator;
use crate::reply::{Reply, json as json_reply, refuse, text};
use crate::route::{Reason, Refusal, Route, Subresource, plan_route};
use crate::upgrade::{self, Upgrade};
use crate::{console, discovery, exec, files, processes, proxy, transfer};

/// Time from TCP accept to a finished TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request needs.
#[derive(Clone, Debug)]
pub struct Gateway {
    /// Front-proxy trust and TLS.
    pub front: FrontProxy,
    /// SubjectAccessReviews.
    pub authz: Authorizer,
    /// Capsules and agents.
    pub locator: Locator,
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer_addr) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        configure_accepted(&tcp);
        let Some(loaded) = gw.front.current() else {
            // No trust loaded yet: nobody can be authenticated.
            drop(tcp);
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let acceptor = TlsAcceptor::from(loaded.tls.clone());
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer_addr, error = &e as &dyn std::error::Error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer_addr, "TLS handshake timed out");
                    return;
                }
            };
            let peer = Arc::new(Peer::from_certs(tls.get_ref().1.peer_certificates()));
            let service = service_fn(move |req| {
                let gw = gw.clone();
                let peer = peer.clone();
                async move {
                    let asked_upgrade = req.headers().contains_key(header::UPGRADE);
                    let mut reply = handle(&gw, &peer, req).await;
                    close_refused_upgrade(asked_upgrade, &mut reply);
                    Ok::<_, Infallible>(reply)
                }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer_addr, error = &*e as &dyn std::error::Error, "connection");
            }
        });
    }
}

/// Socket options of every accepted connection: no Nagle delay, as Go's
/// net package gives the API server and the kubelet. Sessions write many
/// small frames in a row (the 101, the first empty frame, output, the
/// status, the close; a terminal's echo; a forwarded port's replies),
/// which must not wait for the peer's ACK of the one before.
fn configure_accepted(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = &e as &dyn std::error::Error, "set TCP_NODELAY");
    }
}

/// A refused upgrade ends its connection, and says so. The API server
/// echoes a backend's answer to an upgrade request and then closes the
/// client's connection; without `Connection: close` in that answer the
/// client pools the connection, and its next request on it fails
/// (`IncompleteMessage`) whenever it wins the race with the close.
fn close_refused_upgrade(asked_upgrade: bool, reply: &mut Reply) {
    if asked_upgrade && reply.status() != StatusCode::SWITCHING_PROTOCOLS {
        reply.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
}

/// Serves one request.
pub async fn handle(gw: &Gateway, peer: &Peer, req: Request<Incoming>) -> Reply {
    let route = plan_route(req.uri().path());
    match route {
        Route::Live => return text(StatusCode::OK, "ok"),
        Route::Ready => {
            return if gw.front.current().is_some() && gw.locator.ready() {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
        }
        _ => {}
    }
    let Some(loaded) = gw.front.current() else {
        return refuse(&Refusal::new(Reason::ServiceUnavailable, "not ready"));
    };
    let user = match identify(&loaded.request_header, peer, req.headers()) {
        Ok(u) => u,
        Err(r) => return refuse(&r),
    };
    let is_get = req.method() == Method::GET;
    let document = |doc: fn() -> Value| {
        if is_get {
            json_reply(StatusCode::OK, &doc())
        } else {
            refuse(&Refusal::new(
                Reason::MethodNotAllowed,
                "discovery documents are read with GET",
            ))
        }
    };
    match route {
        Route::Live | Route::Ready => text(StatusCode::OK, "ok"),
        Route::ApiGroupList => document(discovery::build_api_group_list),
        Route::ApiGroup => document(discovery::build_api_group),
        Route::ApiResourceList => document(discovery::build_api_resource_list),
        Route::OpenApiV2 => document(discovery::build_openapi_v2),
        Route::OpenApiV3Index => document(discovery::build_openapi_v3_index),
        Route::OpenApiV3Group => document(discovery::build_openapi_v3_group),
        Route::Unknown => refuse(&Refusal::new(
            Reason::NotFound,
            "the server could not find the requested resource",
        )),
        Route::Capsule {
            namespace,
            name,
            sub,
        } => {
            if !sub.served() {
                return refuse(&Refusal::capsule(
                    Reason::NotImplemented,
                    &name,
                    format!(
                        "capsules/{} is not implemented by this gateway yet; served: {}",
                        sub.as_str(),
                        Subresource::SERVED
                            .map(|s| format!("capsules/{}", s.as_str()))
                            .join(", ")
                    ),
                ));
            }
            let verb = match sub {
                // A WebSocket is a GET; an upload over it stands for a PUT.
                Subresource::Files if upgrade::is_websocket(&req) => {
                    transfer::plan_files(req.uri().query().unwrap_or(""))
                        .map_or("get", |t| t.verb())
                }
                Subresource::Files | Subresource::Console | Subresource::Processes => {
                    FileOp::verb(req.method())
                }
                // As the API server names the verb of `pods/proxy`.
                Subresource::Proxy => proxy::verb(req.method()),
                // As `pods/exec`: a WebSocket GET needs create too.
                _ => "create",
            };
            let access = Access {
                verb,
                namespace,
                name,
                sub,
            };
            if let Err(r) = gw.authz.authorize(&user, &access).await {
                tracing::debug!(user = %user.name, namespace = %access.namespace, capsule = %access.name, "forbidden");
                return refuse(&r);
            }
            match sub {
                Subresource::Exec => channel_upgrade::<upgrade::Exec>(gw, &access, req).await,
                Subresource::Files => files_request(gw, &access, req).await,
                Subresource::Console => console_request(gw, &access, req).await,
                Subresource::Processes => processes_request(gw, &access, req).await,
                Subresource::Attach => channel_upgrade::<upgrade::Attach>(gw, &access, req).await,
                Subresource::Portforward => {
                    channel_upgrade::<upgrade::PortForward>(gw, &access, req).await
                }
                Subresource::Proxy => proxy_request(gw, &access, req).await,
            }
        }
    }
}

/// The capsule's node agent: its target and a channel to it.
async fn reach(
    gw: &Gateway,
    access: &Access,
) -> Result<(crate::locate::Target, tonic::transport::Channel), Refusal> {
    let target = gw.locator.target(&access.namespace, &access.name).await?;
    let channel = gw.locator.channel(&target.node)?;
    Ok((target, channel))
}

async fn files_request(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    if upgrade::is_websocket(&req) {
        let t = transfer::plan_files(req.uri().query().unwrap_or(""));
        return transfer_upgrade(gw, access, req, t).await;
    }
    let (path, op) = match files::parse_request(req.method(), req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    tracing::debug!(namespace = %access.namespace, capsule = %access.name, ?op, %path, "files");
    files::serve(
        channel,
        &access.name,
        &target.uid,
        path,
        op,
        length,
        req.into_body(),
    )
    .await
    .unwrap_or_else(|r| refuse(&r))
}

async fn console_request(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    if upgrade::is_websocket(&req) {
        let t = console::parse_options(req.uri().query().unwrap_or(""))
            .map(transfer::Transfer::Console);
        return transfer_upgrade(gw, access, req, t).await;
    }
    if req.method() != Method::GET {
        return refuse(&Refusal::new(
            Reason::MethodNotAllowed,
            "console is read with GET",
        ));
    }
    let options = match console::parse_options(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    console::serve(channel, &access.name, &target.uid, options)
        .await
        .unwrap_or_else(|r| refuse(&r))
}

/// A channel-protocol WebSocket (`exec`, `attach`, `portforward`):
/// upgrade checked, query parsed, capsule found and agent side opened
/// before `101`, then bridged.
async fn channel_upgrade<U: Upgrade>(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply
where
    U::Opened: 'static,
{
    let name = access.name.as_str();
    let (key, protocol) = match upgrade::plan_upgrade(&req, U::WHAT) {
        Ok(k) => k,
        Err(r) => return refuse(&r.with_capsule(name)),
    };
    let options = match U::parse(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    let opened = match U::open(channel, name, &target, options, protocol).await {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    tracing::debug!(namespace = %access.namespace, capsule = %name, node = %target.node, what = U::WHAT, "upgraded");
    upgrade::answer(req, &key, protocol, move |ws| U::bridge(ws, opened))
}

async fn proxy_request(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    proxy::serve(channel, &access.name, &target, req)
        .await
        .unwrap_or_else(|r| refuse(&r))
}

async fn processes_request(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    if upgrade::is_websocket(&req) {
        let t = transfer::plan_processes(req.uri().query().unwrap_or(""));
        return transfer_upgrade(gw, access, req, t).await;
    }
    let op = match processes::parse_request(req.method(), req.uri().query().unwrap_or("")) {
        Ok(op) => op,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    tracing::debug!(namespace = %access.namespace, capsule = %access.name, ?op, "processes");
    processes::serve(channel, &access.name, &target.uid, op)
        .await
        .unwrap_or_else(|r| refuse(&r))
}

/// `files` or `console` as a WebSocket ([`crate::transfer`]): not cut by
/// the API server's request timeout.
async fn transfer_upgrade(
    gw: &Gateway,
    access: &Access,
    req: Request<Incoming>,
    planned: Result<transfer::Transfer, Refusal>,
) -> Reply {
    let name = access.name.clone();
    if req.method() != Method::GET {
        return refuse(&Refusal::new(
            Reason::MethodNotAllowed,
            "a WebSocket upgrade is a GET",
        ));
    }
    let (key, protocol) = match upgrade::plan_handshake(&req, "a transfer") {
        Ok(h) => h,
        Err(r) => return refuse(&r),
    };
    let planned = match planned {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    if matches!(planned, transfer::Transfer::Upload(_)) && protocol != exec::Protocol::V5 {
        return refuse(&Refusal::capsule(
            Reason::BadRequest,
            &name,
            "an upload needs v5.channel.k8s.io, whose close message ends it",
        ));
    }
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    tracing::debug!(namespace = %access.namespace, capsule = %name, transfer = ?planned, "transfer");
    let opened = match transfer::open(channel, &name, &target.uid, planned).await {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    upgrade::answer(req, &key, protocol, move |ws| {
        transfer::bridge(ws, name, opened)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_refused_upgrade_closes_its_connection_and_an_answered_one_does_not() {
        let close = |asked: bool, code: StatusCode| {
            let mut r = text(code, "x");
            close_refused_upgrade(asked, &mut r);
            r.headers().get(header::CONNECTION).cloned()
        };
        assert_eq!(close(true, StatusCode::FORBIDDEN).unwrap(), "close");
        assert_eq!(close(true, StatusCode::BAD_GATEWAY).unwrap(), "close");
        assert_eq!(close(true, StatusCode::SWITCHING_PROTOCOLS), None);
        assert_eq!(close(false, StatusCode::FORBIDDEN), None);
    }

    #[tokio::test]
    async fn accepted_connections_write_small_frames_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        assert!(!tcp.nodelay().unwrap(), "the kernel's default has Nagle on");
        configure_accepted(&tcp);
        assert!(tcp.nodelay().unwrap());
    }
}
