//! `Connect`: one TCP connection to a port of a capsule, its bytes carried
//! both ways over the gRPC stream (port forwarding and the HTTP proxy of
//! the gateway). Two routes, picked per port ([`plan_routes`]):
//! - network: the agent dials the guest's address from inside the
//!   capsule's network namespace (a thread enters it, the socket stays
//!   there), for servers listening on the guest's interface;
//! - loopback: the guest agent dials `127.0.0.1:port` inside the guest
//!   (`Dial` over vsock), for servers bound to loopback as well.
//!
//! With the automatic route the agent tries the route that last answered
//! for this capsule and port first, and the other one when the first is
//! refused, so a loopback-only server costs one refused connect once.
//!
//! Half-close is carried both ways: the client's `close_write` (or the
//! end of its input) becomes a FIN towards the server, and the server's
//! end of output becomes `closed_write`; the stream ends once both
//! directions are done. The open stream counts as activity on the capsule.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use super::activity::keep_open;
use super::dataplane::{chunk_ok, client, first, need_uid, to_status};
use super::{AgentService, BoxStream, GuestEndpoint};
use crate::network::GUEST_ADDR;

/// Longest a connect to the guest's address may take. A guest answers a
/// closed port with a reset at once; only a stalled guest takes this long.
pub const NETWORK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest chunk read from the server per message.
const READ_CHUNK: usize = 64 << 10;

/// Messages queued either way before the other side is read slower.
const QUEUE: usize = 16;

/// Capsule ports remembered at most; the map is cleared when full (a
/// forgotten port only costs one refused connect).
const MAX_REMEMBERED: usize = 4096;

/// A way to reach a capsule port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The guest's address from the capsule's network namespace.
    Network,
    /// 127.0.0.1 inside the guest, through the guest agent.
    Loopback,
}

impl Route {
    fn to_proto(self) -> pb::ConnectRoute {
        match self {
            Self::Network => pb::ConnectRoute::Network,
            Self::Loopback => pb::ConnectRoute::Loopback,
        }
    }
}

/// Which route answered last, per capsule UID and port.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    inner: Arc<Mutex<HashMap<(String, u16), Route>>>,
}

impl Routes {
    fn get(&self, uid: &str, port: u16) -> Option<Route> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(uid.to_string(), port)).copied()
    }

    fn remember(&self, uid: &str, port: u16, route: Route) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_REMEMBERED {
            m.clear();
        }
        m.insert((uid.to_string(), port), route);
    }
}

/// The routes to try, in order (pure): the one asked for; for the
/// automatic route the one that answered last first, the network route
/// only when the capsule has a namespace.
pub fn plan_routes(asked: pb::ConnectRoute, last: Option<Route>, has_netns: bool) -> Vec<Route> {
    match asked {
        pb::ConnectRoute::Network => vec![Route::Network],
        pb::ConnectRoute::Loopback => vec![Route::Loopback],
        pb::ConnectRoute::Auto => {
            let mut order = match last {
                Some(Route::Loopback) => vec![Route::Loopback, Route::Network],
                _ => vec![Route::Network, Route::Loopback],
            };
            if !has_netns {
                order.retain(|r| *r != Route::Network);
            }
            order
        }
    }
}

/// The status of a failed network-route connect to `port` (pure).
pub fn network_status(port: u16, e: &std::io::Error) -> Status {
    let at = format!("{GUEST_ADDR}:{port}");
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Status::failed_precondition(format!(
            "nothing listens on {at} (the guest's address; connection refused)"
        )),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Status::deadline_exceeded(
            format!("connect to {at} timed out after {NETWORK_CONNECT_TIMEOUT:?}"),
        ),
        std::io::ErrorKind::NotFound => {
            Status::unavailable("the capsule's network namespace is gone")
        }
        _ => Status::unavailable(format!("connect to {at}: {e}")),
    }
}

/// The one status of every route failing (pure): refused everywhere says
/// nothing listens on the port; otherwise the first other failure's code.
pub fn plan_failure(port: u16, failures: &[(Route, Status)]) -> Status {
    let code = failures
        .iter()
        .map(|(_, s)| s.code())
        .find(|c| *c != tonic::Code::FailedPrecondition)
        .unwrap_or(tonic::Code::FailedPrecondition);
    let tried: Vec<String> = failures
        .iter()
        .map(|(r, s)| format!("{r:?}: {}", s.message()))
        .collect();
    Status::new(
        code,
        format!("cannot connect to port {port}: {}", tried.join("; ")),
    )
}

/// A connection made: its route and how bytes move.
enum Opened {
    Network(TcpStream),
    Loopback {
        to_guest: mpsc::Sender<gpb::DialInput>,
        // Boxed: the stream is several times the size of a TcpStream.
        from_guest: Box<Streaming<gpb::DialOutput>>,
    },
}

async fn open_network(netns: Option<&Path>, port: u16) -> Result<Opened, Status> {
    let netns = netns
        .ok_or_else(|| Status::unavailable("the capsule has no network namespace"))?
        .to_path_buf();
    let addr = SocketAddr::from((GUEST_ADDR, port));
    let std = tokio::task::spawn_blocking(move || {
        crate::sys::net::tcp_stream_in_netns(&netns, addr, NETWORK_CONNECT_TIMEOUT)
    })
    .await
    .map_err(|e| Status::internal(format!("connect task failed: {e}")))?
    .map_err(|e| network_status(port, &e))?;
    std.set_nonblocking(true)
        .map_err(|e| Status::internal(format!("socket: {e}")))?;
    let stream = TcpStream::from_std(std).map_err(|e| Status::internal(format!("socket: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(Opened::Network(stream))
}

async fn open_loopback(ep: &GuestEndpoint, port: u16) -> Result<Opened, Status> {
    let guest = client(ep).await?;
    let (to_guest, rx) = mpsc::channel(QUEUE);
    let start = gpb::DialInput {
        input: Some(gpb::dial_input::Input::Start(gpb::DialStart {
            port: u32::from(port),
        })),
    };
    to_guest
        .try_send(start)
        .map_err(|_| Status::internal("Connect: input queue closed"))?;
    let mut from_guest = guest
        .dial(ReceiverStream::new(rx))
        .await
        .map_err(to_status)?;
    // The guest answers `connected` or its refusal first.
    match from_guest.message().await? {
        Some(gpb::DialOutput {
            output: Some(gpb::dial_output::Output::Connected(true)),
        }) => Ok(Opened::Loopback {
            to_guest,
            from_guest: Box::new(from_guest),
        }),
        other => Err(Status::internal(format!(
            "the guest agent's Dial began with {other:?}, not connected"
        ))),
    }
}

fn out(o: pb::connect_output::Output) -> Result<pb::ConnectOutput, Status> {
    Ok(pb::ConnectOutput { output: Some(o) })
}

/// What one later client message asks (pure), `None` for nothing.
fn plan_input(m: &pb::ConnectInput) -> Result<Option<gpb::dial_input::Input>, Status> {
    match m.input.as_ref().and_then(|i| i.input.as_ref()) {
        Some(gpb::dial_input::Input::Data(b)) => {
            chunk_ok(b.len(), "connection")?;
            Ok(Some(gpb::dial_input::Input::Data(b.clone())))
        }
        Some(gpb::dial_input::Input::CloseWrite(true)) => {
            Ok(Some(gpb::dial_input::Input::CloseWrite(true)))
        }
        Some(gpb::dial_input::Input::Start(_)) => Err(Status::invalid_argument(
            "Connect: DialStart is only allowed in the first message",
        )),
        Some(gpb::dial_input::Input::CloseWrite(false)) | None => Ok(None),
    }
}

pub(super) async fn connect(
    svc: &AgentService,
    routes: &Routes,
    req: Request<Streaming<pb::ConnectInput>>,
) -> Result<Response<BoxStream<pb::ConnectOutput>>, Status> {
    let mut input = req.into_inner();
    let head = first(&mut input, "Connect").await?;
    let uid = need_uid(&head.uid)?.to_string();
    let port = match head.input.and_then(|i| i.input) {
        Some(gpb::dial_input::Input::Start(s)) => u16::try_from(s.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("Connect: port {} is not 1 to 65535", s.port))
            })?,
        _ => {
            return Err(Status::invalid_argument(
                "Connect: the first message must carry DialStart",
            ));
        }
    };
    let asked = pb::ConnectRoute::try_from(head.route)
        .map_err(|_| Status::invalid_argument(format!("Connect: route {}", head.route)))?;
    let ep = svc.guest_endpoint(&uid).await?;
    let order = plan_routes(asked, routes.get(&uid, port), ep.netns.is_some());
    let mut failures = Vec::new();
    let mut opened = None;
    for route in order {
        let attempt = match route {
            Route::Network => open_network(ep.netns.as_deref(), port).await,
            Route::Loopback => open_loopback(&ep, port).await,
        };
        match attempt {
            Ok(o) => {
                opened = Some((route, o));
                break;
            }
            Err(s) => failures.push((route, s)),
        }
    }
    let Some((route, opened)) = opened else {
        return Err(plan_failure(port, &failures));
    };
    routes.remember(&uid, port, route);
    tracing::debug!(capsule = %uid, port, ?route, "connected");
    let (tx, rx) = mpsc::channel(QUEUE);
    tx.try_send(out(pb::connect_output::Output::Connected(
        route.to_proto() as i32
    )))
    .map_err(|_| Status::internal("Connect: output queue closed"))?;
    match opened {
        Opened::Network(stream) => bridge_tcp(input, stream, tx),
        Opened::Loopback {
            to_guest,
            from_guest,
        } => bridge_guest(input, to_guest, from_guest, tx),
    }
    Ok(Response::new(keep_open(
        Box::pin(ReceiverStream::new(rx)),
        ep.open.clone(),
    )))
}

/// Carries bytes between the client and a connection the agent holds.
fn bridge_tcp(
    mut input: Streaming<pb::ConnectInput>,
    stream: TcpStream,
    tx: mpsc::Sender<Result<pb::ConnectOutput, Status>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (input_done, mut input_ended) = oneshot::channel::<()>();
    let refusals = tx.clone();
    tokio::spawn(async move {
        loop {
            match input.message().await {
                Ok(Some(m)) => match plan_input(&m) {
                    Ok(Some(gpb::dial_input::Input::Data(b))) => {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(gpb::dial_input::Input::CloseWrite(_))) => break,
                    Ok(_) => {}
                    Err(s) => {
                        let _ = refusals.send(Err(s)).await;
                        return;
                    }
                },
                Ok(None) => break,
                // The client broke off: dropping the write half and the
                // output ends the connection.
                Err(_) => return,
            }
        }
        let _ = wr.shutdown().await;
        // Later messages are ignored until the client's input ends.
        while let Ok(Some(_)) = input.message().await {}
        let _ = input_done.send(());
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut input_open = true;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                // Broken input ends the connection now; ended input
                // leaves the server's reply to come.
                r = &mut input_ended, if input_open => match r {
                    Ok(()) => input_open = false,
                    Err(_) => return,
                },
                r = rd.read(&mut buf) => match r {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(out(pb::connect_output::Output::Data(buf[..n].to_vec()))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::aborted(format!("the connection broke: {e}")))).await;
                        return;
                    }
                },
            }
        }
        if tx
            .send(out(pb::connect_output::Output::ClosedWrite(true)))
            .await
            .is_err()
        {
            return;
        }
        if input_open {
            tokio::select! {
                () = tx.closed() => {}
                _ = input_ended => {}
            }
        }
    });
}

/// Carries bytes between the client and the guest agent's `Dial`.
fn bridge_guest(
    mut input: Streaming<pb::ConnectInput>,
    to_guest: mpsc::Sender<gpb::DialInput>,
    mut from_guest: Box<Streaming<gpb::DialOutput>>,
    tx: mpsc::Sender<Result<pb::ConnectOutput, Status>>,
) {
    let refusals = tx.clone();
    tokio::spawn(async move {
        loop {
            let m = match input.message().await {
                Ok(Some(m)) => m,
                // Ended: dropping `to_guest` ends the guest's input, which
                // it takes as close_write. Broken: the output side sees
                // the client gone and drops the guest stream.
                Ok(None) | Err(_) => return,
            };
            match plan_input(&m) {
                Ok(Some(i)) => {
                    if to_guest
                        .send(gpb::DialInput { input: Some(i) })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {}
                Err(s) => {
                    let _ = refusals.send(Err(s)).await;
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                () = tx.closed() => return,
                m = from_guest.message() => match m {
                    Ok(Some(gpb::DialOutput { output: Some(gpb::dial_output::Output::Data(b)) })) => {
                        out(pb::connect_output::Output::Data(b))
                    }
                    Ok(Some(gpb::DialOutput { output: Some(gpb::dial_output::Output::ClosedWrite(true)) })) => {
                        out(pb::connect_output::Output::ClosedWrite(true))
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(s) => Err(s),
                },
            };
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tries_what_answered_last_first() {
        use pb::ConnectRoute as C;
        assert_eq!(
            plan_routes(C::Auto, None, true),
            vec![Route::Network, Route::Loopback]
        );
        assert_eq!(
            plan_routes(C::Auto, Some(Route::Loopback), true),
            vec![Route::Loopback, Route::Network]
        );
        assert_eq!(plan_routes(C::Auto, None, false), vec![Route::Loopback]);
        assert_eq!(
            plan_routes(C::Network, Some(Route::Loopback), true),
            vec![Route::Network]
        );
        assert_eq!(plan_routes(C::Loopback, None, true), vec![Route::Loopback]);
    }

    #[test]
    fn refused_everywhere_says_nothing_listens() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let s = plan_failure(
            8080,
            &[
                (Route::Network, network_status(8080, &refused)),
                (
                    Route::Loopback,
                    Status::failed_precondition("nothing listens on 127.0.0.1:8080 in the guest"),
                ),
            ],
        );
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("port 8080"), "{}", s.message());
        assert!(s.message().contains("Loopback"), "{}", s.message());
        let s = plan_failure(
            80,
            &[(
                Route::Network,
                network_status(80, &std::io::Error::from(std::io::ErrorKind::TimedOut)),
            )],
        );
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
    }

    #[test]
    fn a_second_start_and_oversized_chunks_are_refused() {
        let m = |i| pb::ConnectInput {
            uid: String::new(),
            route: 0,
            input: Some(gpb::DialInput { input: Some(i) }),
        };
        assert!(
            plan_input(&m(gpb::dial_input::Input::Start(gpb::DialStart {
                port: 1
            })))
            .is_err()
        );
        assert!(
            plan_input(&m(gpb::dial_input::Input::Data(vec![
                0;
                super::super::dataplane::MAX_INPUT_CHUNK
                    + 1
            ])))
            .is_err()
        );
        assert!(matches!(
            plan_input(&m(gpb::dial_input::Input::CloseWrite(true))),
            Ok(Some(gpb::dial_input::Input::CloseWrite(true)))
        ));
    }
}
