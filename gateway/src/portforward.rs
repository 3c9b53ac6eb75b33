//! `capsules/portforward`: the kubelet's WebSocket port-forward protocol
//! (`ports=P[,P…]` in the query, subprotocol `v4.channel.k8s.io`; also
//! `v5.channel.k8s.io`, which adds half-close). One WebSocket carries one
//! TCP connection per asked port: port `i` has data channel `2i` and
//! error channel `2i+1`, and the first message on each of them carries
//! the port as two bytes, little endian, as the kubelet sends it. Client
//! messages on a data channel are bytes for the server, unprefixed. A
//! client forwarding many connections opens one WebSocket per connection.
//!
//! Only ports declared in the capsule's `spec.network.ports` are reached
//! (403 naming the declared ones otherwise). Every connection is opened
//! through the node agent before the upgrade is answered
//! ([`crate::tunnel`]): nothing listening is a `502` at once.
//!
//! Half-close (v5): the client's `[255, 2i]` shuts the connection's write
//! side (the server reads end of input, its reply still comes back); the
//! server's end of output is sent as `[255, 2i]` too. Errors of a running
//! connection go on its error channel as text. The WebSocket closes once
//! every connection has ended both ways, or when the client closes it.

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use crate::channel::Socket;
use crate::channel::framed;
use crate::exec::Protocol;
use crate::locate::Target;
use crate::query::form_decode;
use crate::route::{Reason, Refusal};
use crate::tunnel::{self, Tunnel};

/// Most ports one WebSocket forwards (as many as a capsule may declare).
pub const MAX_PORTS: usize = 32;

/// The v5 close channel.
const CLOSE: u8 = 255;

/// Frames queued towards the client before the connections are read slower.
const OUTPUT_QUEUE: usize = 32;

/// What a port-forward request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardOptions {
    /// The ports, in channel order, as asked (numbers or declared names).
    pub ports: Vec<String>,
}

/// Parses the query of a port-forward request (pure): `ports`, repeated
/// or comma-separated, as the kubelet reads it.
pub fn parse_options(query: &str) -> Result<ForwardOptions, Refusal> {
    let bad = |m: String| Refusal::new(Reason::BadRequest, m);
    let mut ports = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        match k.as_str() {
            "ports" | "port" => {
                for p in v.split(',') {
                    if p.is_empty() {
                        return Err(bad("query parameter ports cannot be empty".into()));
                    }
                    ports.push(p.to_string());
                }
            }
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    if ports.is_empty() {
        return Err(bad(
            "query parameter ports is required (ports=8080, repeated or comma-separated)".into(),
        ));
    }
    if ports.len() > MAX_PORTS {
        return Err(bad(format!(
            "{} ports asked; one request forwards at most {MAX_PORTS}",
            ports.len()
        )));
    }
    Ok(ForwardOptions { ports })
}

/// The path and query a client opens to forward `ports` (pure).
pub fn build_request_path(namespace: &str, capsule: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "/apis/{}/{}/namespaces/{namespace}/{}/{capsule}/portforward?ports={}",
        crate::GROUP,
        crate::VERSION,
        crate::RESOURCE,
        ports.join(",")
    )
}

/// The connections, opened.
pub struct Opened {
    conns: Vec<(u16, Tunnel)>,
    protocol: Protocol,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("ports", &self.conns.iter().map(|c| c.0).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Checks every asked port against the declared ones, then opens a
/// connection to each.
pub async fn open(
    channel: Channel,
    capsule: &str,
    target: &Target,
    options: ForwardOptions,
    protocol: Protocol,
) -> Result<Opened, Refusal> {
    let ports = options
        .ports
        .iter()
        .map(|p| target.declared(capsule, p))
        .collect::<Result<Vec<u16>, Refusal>>()?;
    let mut conns = Vec::with_capacity(ports.len());
    for port in ports {
        let t = tunnel::open(channel.clone(), capsule, &target.uid, port).await?;
        conns.push((port, t));
    }
    Ok(Opened { conns, protocol })
}

/// What one client message asks (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Bytes for connection `i`.
    Data(usize, Vec<u8>),
    /// Shut connection `i`'s write side (v5).
    CloseWrite(usize),
    /// Nothing (an empty message, an error channel, an unknown channel).
    Ignore,
}

/// Decodes one binary client message for `ports` connections.
pub fn parse_frame(protocol: Protocol, ports: usize, data: &[u8]) -> ClientFrame {
    let Some((&ch, rest)) = data.split_first() else {
        return ClientFrame::Ignore;
    };
    let data_channel = |c: u8| {
        let i = usize::from(c / 2);
        (c.is_multiple_of(2) && i < ports).then_some(i)
    };
    match ch {
        CLOSE if protocol == Protocol::V5 => match rest.first().copied().and_then(data_channel) {
            Some(i) => ClientFrame::CloseWrite(i),
            None => ClientFrame::Ignore,
        },
        c => match data_channel(c) {
            Some(_) if rest.is_empty() => ClientFrame::Ignore,
            Some(i) => ClientFrame::Data(i, rest.to_vec()),
            None => ClientFrame::Ignore,
        },
    }
}

/// The channel number of connection `i`'s data (`error`: its error channel).
fn channel_of(i: usize, error: bool) -> u8 {
    u8::try_from(i * 2 + usize::from(error)).unwrap_or(u8::MAX)
}

/// Runs the WebSocket until every connection ended or the client left.
pub async fn bridge(ws: Socket, opened: Opened) {
    let Opened { conns, protocol } = opened;
    let (mut sink, mut source) = ws.split();
    // The port on the first message of each channel, as the kubelet does.
    for (i, (port, _)) in conns.iter().enumerate() {
        for error in [false, true] {
            if sink
                .send(framed(channel_of(i, error), &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let (frames, mut to_client) = mpsc::channel::<Message>(OUTPUT_QUEUE);
    let mut inputs = Vec::with_capacity(conns.len());
    let mut readers = tokio::task::JoinSet::new();
    for (i, (port, t)) in conns.into_iter().enumerate() {
        inputs.push(Some(t.tx));
        readers.spawn(from_server(i, port, t.rx, protocol, frames.clone()));
    }
    drop(frames);
    loop {
        tokio::select! {
            msg = source.next() => match msg {
                Some(Ok(Message::Binary(data))) => match parse_frame(protocol, inputs.len(), &data) {
                    ClientFrame::Data(i, b) => {
                        let sent = match inputs.get(i).and_then(Option::as_ref) {
                            Some(tx) => tx.send(tunnel::input(gpb::dial_input::Input::Data(b))).await.is_ok(),
                            None => true,
                        };
                        if !sent {
                            // The connection is gone; its reader reports why.
                            if let Some(slot) = inputs.get_mut(i) { *slot = None; }
                        }
                    }
                    ClientFrame::CloseWrite(i) => {
                        if let Some(tx) = inputs.get_mut(i).and_then(Option::take) {
                            let _ = tx.send(tunnel::input(gpb::dial_input::Input::CloseWrite(true))).await;
                        }
                    }
                    ClientFrame::Ignore => {}
                },
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    tracing::debug!(error = &err as &dyn std::error::Error, "port-forward client stream");
                    return;
                }
            },
            frame = to_client.recv() => match frame {
                Some(m) => if sink.send(m).await.is_err() { return },
                // Every connection ended both ways.
                None => break,
            },
        }
    }
    readers.abort_all();
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.flush().await;
}

/// Connection `i`'s output towards the client: its bytes on the data
/// channel, its end of output as a close (v5), a failure on its error
/// channel.
async fn from_server(
    i: usize,
    port: u16,
    mut rx: tonic::Streaming<pb::ConnectOutput>,
    protocol: Protocol,
    frames: mpsc::Sender<Message>,
) {
    loop {
        let frame = match rx.message().await {
            Ok(Some(pb::ConnectOutput {
                output: Some(pb::connect_output::Output::Data(b)),
            })) => framed(channel_of(i, false), &b),
            Ok(Some(pb::ConnectOutput {
                output: Some(pb::connect_output::Output::ClosedWrite(true)),
            })) if protocol == Protocol::V5 => framed(CLOSE, &[channel_of(i, false)]),
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(s) => {
                let m = format!("error forwarding port {port}: {}", s.message());
                let _ = frames.send(framed(channel_of(i, true), m.as_bytes())).await;
                return;
            }
        };
        if frames.send(frame).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ports_as_the_kubelet_reads_them() {
        assert_eq!(
            parse_options("ports=8080,9090&ports=web").unwrap().ports,
            vec!["8080", "9090", "web"]
        );
        for q in ["", "ports=", "ports=1,,2", "ports=1&shell=1"] {
            assert_eq!(
                parse_options(q).unwrap_err().reason,
                Reason::BadRequest,
                "{q}"
            );
        }
        let many = format!(
            "ports={}",
            (1..=33)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(parse_options(&many).is_err());
        let path = build_request_path("ns", "web", &[8080, 22]);
        assert!(path.ends_with("/namespaces/ns/capsules/web/portforward?ports=8080,22"));
        let (_, q) = path.split_once('?').unwrap();
        assert_eq!(parse_options(q).unwrap().ports, vec!["8080", "22"]);
    }

    #[test]
    fn data_on_even_channels_and_close_only_in_v5() {
        assert_eq!(
            parse_frame(Protocol::V4, 2, &[2, b'a']),
            ClientFrame::Data(1, b"a".to_vec())
        );
        // Error channels and channels past the ports carry nothing in.
        assert_eq!(
            parse_frame(Protocol::V4, 2, &[1, b'a']),
            ClientFrame::Ignore
        );
        assert_eq!(
            parse_frame(Protocol::V4, 2, &[4, b'a']),
            ClientFrame::Ignore
        );
        assert_eq!(
            parse_frame(Protocol::V5, 2, &[255, 2]),
            ClientFrame::CloseWrite(1)
        );
        assert_eq!(parse_frame(Protocol::V4, 2, &[255, 2]), ClientFrame::Ignore);
        assert_eq!(parse_frame(Protocol::V5, 2, &[255, 1]), ClientFrame::Ignore);
        assert_eq!(parse_frame(Protocol::V5, 1, &[]), ClientFrame::Ignore);
    }
}
