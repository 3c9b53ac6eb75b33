//! WebSocket upgrades speaking the Kubernetes channel protocol
//! (`capsules/exec`, `capsules/attach`, `capsules/portforward`): one
//! [`Upgrade`] per subresource says how its query parses, how its agent
//! side opens and how the stream is bridged; the server runs them all the
//! same way: check the upgrade, parse, find the capsule, open the agent
//! side (so a refusal is an HTTP status, not a stream that ends at once),
//! then answer `101` and bridge. The handshake helpers here serve the
//! WebSocket forms of `files` and `console` too.

use std::future::Future;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tonic::transport::Channel;

use crate::channel::Socket;
use crate::exec::{self, Protocol};
use crate::locate::Target;
use crate::reply::Reply;
use crate::route::{Reason, Refusal};
use crate::{attach, portforward};

/// One channel-protocol subresource.
pub trait Upgrade {
    /// The query, parsed.
    type Options: Send;
    /// The agent side, opened before the upgrade is answered.
    type Opened: Send + 'static;
    /// The subresource's name in messages.
    const WHAT: &'static str;
    /// Parses the request's query (pure).
    fn parse(query: &str) -> Result<Self::Options, Refusal>;
    /// Opens the agent side for capsule `capsule` at `target`.
    fn open(
        channel: Channel,
        capsule: &str,
        target: &Target,
        options: Self::Options,
        protocol: Protocol,
    ) -> impl Future<Output = Result<Self::Opened, Refusal>> + Send;
    /// Runs the stream until either side ends it.
    fn bridge(ws: Socket, opened: Self::Opened) -> impl Future<Output = ()> + Send;
}

/// One unit type per subresource; each impl only names its module's
/// functions, so the three cannot drift apart in how they are wired.
macro_rules! channel_upgrade {
    ($(#[$doc:meta] $name:ident($what:literal) => $module:ident::{$options:ident, $parse:ident, $open:ident}, $opened:ty, $bridge:path;)*) => {$(
        #[$doc]
        #[derive(Debug)]
        pub struct $name;
        impl Upgrade for $name {
            type Options = $module::$options;
            type Opened = $opened;
            const WHAT: &'static str = $what;
            fn parse(query: &str) -> Result<Self::Options, Refusal> {
                $module::$parse(query)
            }
            fn open(
                channel: Channel,
                capsule: &str,
                target: &Target,
                options: Self::Options,
                protocol: Protocol,
            ) -> impl Future<Output = Result<Self::Opened, Refusal>> + Send {
                $module::$open(channel, capsule, target, options, protocol)
            }
            fn bridge(ws: Socket, opened: Self::Opened) -> impl Future<Output = ()> + Send {
                $bridge(ws, opened)
            }
        }
    )*};
}

channel_upgrade! {
    /// `capsules/exec`.
    Exec("exec") => exec::{ExecOptions, parse_options, start}, exec::Started, exec::bridge;
    /// `capsules/attach`.
    Attach("attach") => attach::{AttachOptions, parse_options, start}, exec::Started, exec::bridge;
    /// `capsules/portforward`.
    PortForward("portforward") => portforward::{ForwardOptions, parse_options, open}, portforward::Opened, portforward::bridge;
}

/// Whether the request asks for a WebSocket.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The WebSocket key and channel protocol of an upgrade to `what`, or why
/// it is refused (pure on the request's headers).
pub fn plan_upgrade(
    req: &Request<Incoming>,
    what: &str,
) -> Result<(HeaderValue, Protocol), Refusal> {
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
    plan_handshake(req, what)
}

/// The client's key and the channel protocol to speak, from a WebSocket
/// upgrade's headers.
pub fn plan_handshake(
    req: &Request<Incoming>,
    what: &str,
) -> Result<(HeaderValue, Protocol), Refusal> {
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
    let protocol = exec::plan_protocol_for(
        what,
        req.headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )?;
    Ok((key, protocol))
}

/// The `101` answering a WebSocket upgrade.
pub fn switching_protocols(key: &HeaderValue, protocol: Protocol) -> Reply {
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

/// Answers `101` and runs `bridge` on the upgraded connection.
pub fn answer<F, Fut>(
    mut req: Request<Incoming>,
    key: &HeaderValue,
    protocol: Protocol,
    bridge: F,
) -> Reply
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
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
                bridge(ws).await;
            }
            Err(e) => tracing::debug!(error = &e as &dyn std::error::Error, "upgrade"),
        }
    });
    switching_protocols(key, protocol)
}
