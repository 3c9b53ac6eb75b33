//! The HTTPS listener: TLS with the front-proxy CA ([`FrontProxy`]), HTTP/1.1
//! and HTTP/2, and per request: route → authenticate → authorize → serve.
//! Health paths answer anyone (the kubelet's probes); everything else needs
//! the front proxy. Handshakes have a deadline, so a silent peer holds
//! nothing for long.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::authz::{Access, Authorizer};
use crate::files::FileOp;
use crate::frontproxy::{FrontProxy, Peer, identify};
use crate::locate::Locator;
use crate::reply::{Reply, json as json_reply, refuse, text};
use crate::route::{Reason, Refusal, Route, Subresource, plan_route};
use crate::{attach, console, discovery, exec, files, processes, transfer};

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
                async move { Ok::<_, Infallible>(handle(&gw, &peer, req).await) }
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
                Subresource::Files if is_websocket(&req) => {
                    transfer::plan_files(req.uri().query().unwrap_or(""))
                        .map_or("get", |t| t.verb())
                }
                Subresource::Files | Subresource::Console | Subresource::Processes => {
                    FileOp::verb(req.method())
                }
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
                Subresource::Exec => exec_upgrade(gw, &access, req).await,
                Subresource::Files => files_request(gw, &access, req).await,
                Subresource::Console => console_request(gw, &access, req).await,
                Subresource::Processes => processes_request(gw, &access, req).await,
                Subresource::Attach => attach_upgrade(gw, &access, req).await,
                _ => refuse(&Refusal::new(Reason::NotImplemented, "not implemented")),
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
    if is_websocket(&req) {
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
    if is_websocket(&req) {
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

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The WebSocket key and channel protocol of an upgrade to `what`, or why
/// it is refused (pure on the request's headers).
fn plan_upgrade(
    req: &Request<Incoming>,
    what: &str,
) -> Result<(HeaderValue, exec::Protocol), Refusal> {
    if !is_websocket(req) {
        return Err(Refusal::new(
            Reason::BadRequest,
            format!(
                "{what} is a WebSocket upgrade with subprotocol v5.channel.k8s.io (kubectl 1.30 or later; SPDY is not supported)"
            ),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::POST {
        return Err(Refusal::new(
            Reason::MethodNotAllowed,
            format!("{what} takes GET or POST"),
        ));
    }
    plan_handshake(req)
}

async fn exec_upgrade(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    let name = access.name.as_str();
    let (key, protocol) = match plan_upgrade(&req, "exec") {
        Ok(k) => k,
        Err(r) => return refuse(&r.with_capsule(name)),
    };
    let options = match exec::parse_options(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    let started = match exec::start(channel, name, &target.uid, options, protocol).await {
        Ok(s) => s,
        Err(r) => return refuse(&r),
    };
    tracing::info!(namespace = %access.namespace, capsule = %name, node = %target.node, "exec started");
    answer_upgrade(req, &key, protocol, started)
}

async fn attach_upgrade(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    let name = access.name.as_str();
    let (key, protocol) = match plan_upgrade(&req, "attach") {
        Ok(k) => k,
        Err(r) => return refuse(&r.with_capsule(name)),
    };
    let options = match attach::parse_options(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(r) => return refuse(&r),
    };
    let (target, channel) = match reach(gw, access).await {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    let started = match attach::start(channel, name, &target.uid, options, protocol).await {
        Ok(s) => s,
        Err(r) => return refuse(&r),
    };
    tracing::debug!(namespace = %access.namespace, capsule = %name, node = %target.node, "attached");
    answer_upgrade(req, &key, protocol, started)
}

async fn processes_request(gw: &Gateway, access: &Access, req: Request<Incoming>) -> Reply {
    if is_websocket(&req) {
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

/// Answers 101 and bridges the upgraded connection to `started`.
fn answer_upgrade(
    mut req: Request<Incoming>,
    key: &HeaderValue,
    protocol: exec::Protocol,
    started: exec::Started,
) -> Reply {
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(exec::websocket_config()),
                )
                .await;
                exec::bridge(ws, started).await;
            }
            Err(e) => tracing::debug!(error = &e as &dyn std::error::Error, "upgrade"),
        }
    });
    switching_protocols(key, protocol)
}

/// The client's key and the channel protocol to speak, from a WebSocket
/// upgrade's headers.
fn plan_handshake(req: &Request<Incoming>) -> Result<(HeaderValue, exec::Protocol), Refusal> {
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| {
            Refusal::new(
                Reason::BadRequest,
                "the WebSocket upgrade has no Sec-WebSocket-Key",
            )
        })?;
    let protocol = exec::plan_protocol(
        req.headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )?;
    Ok((key, protocol))
}

/// The `101` answering a WebSocket upgrade.
fn switching_protocols(key: &HeaderValue, protocol: exec::Protocol) -> Reply {
    let mut r = Response::new(crate::reply::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol.as_str()),
    );
    r
}

/// `files` or `console` as a WebSocket ([`crate::transfer`]): not cut by
/// the API server's request timeout.
async fn transfer_upgrade(
    gw: &Gateway,
    access: &Access,
    mut req: Request<Incoming>,
    planned: Result<transfer::Transfer, Refusal>,
) -> Reply {
    let name = access.name.clone();
    if req.method() != Method::GET {
        return refuse(&Refusal::new(
            Reason::MethodNotAllowed,
            "a WebSocket upgrade is a GET",
        ));
    }
    let (key, protocol) = match plan_handshake(&req) {
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
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(exec::websocket_config()),
                )
                .await;
                transfer::bridge(ws, name, opened).await;
            }
            Err(e) => tracing::debug!(error = &e as &dyn std::error::Error, "transfer upgrade"),
        }
    });
    switching_protocols(&key, protocol)
}
