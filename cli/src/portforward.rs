//! `port-forward`: local listeners for a capsule's declared ports, as
//! `kubectl port-forward` for Pods. Each accepted connection gets its own
//! `capsules/portforward` WebSocket through the API server as the user
//! (the port-forward channel protocol: data on channel 0, errors on 1,
//! the port as two bytes little endian first on each). Our side's end of
//! input reaches the capsule's server as a FIN and the reply still comes
//! back (v5's close message, both ways). Runs until Ctrl-C.

use std::net::{IpAddr, SocketAddr};

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wrenn_gateway::locate::plan_target;
use wrenn_gateway::portforward::build_request_path;

use crate::cluster::{self, Target};

/// Channels of the one port each WebSocket forwards.
const DATA: u8 = 0;
const ERROR: u8 = 1;
const CLOSE: u8 = 255;

/// Bytes read from a local connection per message.
const CHUNK: usize = 32 << 10;

/// Why forwarding could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `[LOCAL:]REMOTE` that is not one.
    #[error(
        "port mapping {0:?}: expected [LOCAL:]REMOTE with ports 1 to 65535 (LOCAL may be empty or 0 for any free port)"
    )]
    Mapping(String),
    /// A local port could not be listened on.
    #[error("listen on {addr}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The first connection was refused by the API server or the gateway.
    #[error("port-forward to capsule {capsule:?}")]
    Refused {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The capsule cannot be forwarded to as asked.
    #[error("{0}")]
    Capsule(String),
    /// Waiting for Ctrl-C failed.
    #[error("wait for Ctrl-C")]
    Signal(#[source] std::io::Error),
}

/// One `[LOCAL:]REMOTE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Local port; 0 picks a free one.
    pub local: u16,
    /// The capsule's port.
    pub remote: u16,
}

/// Parses `[LOCAL:]REMOTE` (pure): `8080` is `8080:8080`, `:8080` and
/// `0:8080` take any free local port.
pub fn parse_mapping(s: &str) -> Result<Mapping, Error> {
    let bad = || Error::Mapping(s.to_string());
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    let (local, remote) = match s.split_once(':') {
        Some(("", r)) => (0, port(r)?),
        Some((l, r)) => (port(l)?, port(r)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if remote == 0 {
        return Err(bad());
    }
    Ok(Mapping { local, remote })
}

/// Listens on `address` for every mapping, prints where, and forwards
/// each connection until Ctrl-C.
pub async fn run(
    target: &Target,
    capsule: &str,
    mappings: &[Mapping],
    address: IpAddr,
) -> Result<u8, Error> {
    // Refused at once, before anything listens locally: a capsule that is
    // not running or a port it does not declare (what the gateway checks).
    let api: kube::Api<wrenn_crds::Capsule> =
        kube::Api::namespaced(target.client.clone(), &target.namespace);
    let found = api.get_opt(capsule).await.map_err(|e| Error::Refused {
        capsule: capsule.to_string(),
        source: target.refusal(e, "capsule", capsule),
    })?;
    let reachable = plan_target(&target.namespace, capsule, found.as_ref())
        .map_err(|r| Error::Capsule(r.message))?;
    for m in mappings {
        reachable
            .declared(capsule, &m.remote.to_string())
            .map_err(|r| Error::Capsule(r.message))?;
    }
    for m in mappings {
        let addr = SocketAddr::new(address, m.local);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        println!("Forwarding from {bound} -> {}", m.remote);
        tokio::spawn(accept(
            listener,
            target.clone(),
            capsule.to_string(),
            m.remote,
        ));
    }
    tokio::signal::ctrl_c().await.map_err(Error::Signal)?;
    Ok(0)
}

type Socket = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

async fn connect(
    target: &Target,
    capsule: &str,
    remote: u16,
) -> Result<(Socket, bool), cluster::Error> {
    let req = http::Request::get(build_request_path(&target.namespace, capsule, &[remote]))
        .body(Vec::new())
        .map_err(|e| cluster::Error::Refused {
            code: 400,
            message: e.to_string(),
        })?;
    let conn = target
        .client
        .connect(req)
        .await
        .map_err(|e| target.refusal(e, "capsule", capsule))?;
    let closable = conn.supports_stream_close();
    Ok((conn.into_stream(), closable))
}

async fn accept(listener: TcpListener, target: Target, capsule: String, remote: u16) {
    loop {
        let local = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("error: accept a local connection: {e}");
                continue;
            }
        };
        let (target, capsule) = (target.clone(), capsule.clone());
        tokio::spawn(async move {
            let _ = local.set_nodelay(true);
            if let Err(e) = forward(&target, &capsule, remote, local).await {
                eprintln!("error: port {remote} of capsule/{capsule}: {e}");
            }
        });
    }
}

/// What a server message on a one-port forward carries (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum ServerFrame<'a> {
    /// Bytes from the capsule's server.
    Data(&'a [u8]),
    /// Text on the error channel.
    Error(&'a [u8]),
    /// The server shut its side.
    Closed,
    /// Nothing for us.
    Ignore,
}

/// Decodes a server message; `first` says whether the channel's port
/// prefix is still to come on (data, error).
pub fn parse_server<'a>(data: &'a [u8], first: &mut [bool; 2]) -> ServerFrame<'a> {
    let Some((&ch, rest)) = data.split_first() else {
        return ServerFrame::Ignore;
    };
    let strip = |seen: &mut bool, rest: &'a [u8]| -> &'a [u8] {
        if *seen {
            *seen = false;
            rest.get(2..).unwrap_or(&[])
        } else {
            rest
        }
    };
    match ch {
        DATA => match strip(&mut first[0], rest) {
            [] => ServerFrame::Ignore,
            b => ServerFrame::Data(b),
        },
        ERROR => match strip(&mut first[1], rest) {
            [] => ServerFrame::Ignore,
            b => ServerFrame::Error(b),
        },
        CLOSE if rest.first() == Some(&DATA) => ServerFrame::Closed,
        _ => ServerFrame::Ignore,
    }
}

/// Carries one local connection over its own WebSocket.
async fn forward(
    target: &Target,
    capsule: &str,
    remote: u16,
    local: TcpStream,
) -> Result<(), String> {
    let (ws, closable) = connect(target, capsule, remote)
        .await
        .map_err(|e| format!("{e}: {}", cluster_message(&e)))?;
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = local.into_split();
    let to_capsule = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut m = Vec::with_capacity(n + 1);
                    m.push(DATA);
                    m.extend_from_slice(&buf[..n]);
                    if sink.send(Message::binary(m)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if closable {
            let _ = sink.send(Message::binary(vec![CLOSE, DATA])).await;
            // Keep the sink: dropping it would close the WebSocket while
            // the reply is still coming.
            std::future::pending::<()>().await;
        } else {
            let _ = sink.send(Message::Close(None)).await;
        }
    };
    let from_capsule = async move {
        let mut first = [true, true];
        while let Some(msg) = source.next().await {
            let Ok(Message::Binary(b)) = msg else {
                if matches!(msg, Ok(Message::Close(_)) | Err(_)) {
                    break;
                }
                continue;
            };
            match parse_server(&b, &mut first) {
                ServerFrame::Data(d) => {
                    if wr.write_all(d).await.is_err() {
                        break;
                    }
                }
                ServerFrame::Closed => {
                    let _ = wr.shutdown().await;
                }
                ServerFrame::Error(e) => return Err(String::from_utf8_lossy(e).into_owned()),
                ServerFrame::Ignore => {}
            }
        }
        Ok(())
    };
    // The WebSocket ending (both directions done, or an error) ends the
    // local connection too.
    tokio::select! {
        r = from_capsule => r,
        () = to_capsule => Ok(()),
    }
}

fn cluster_message(e: &cluster::Error) -> String {
    let mut s = String::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mappings_as_kubectl_takes_them() {
        assert_eq!(
            parse_mapping("8080").unwrap(),
            Mapping {
                local: 8080,
                remote: 8080
            }
        );
        assert_eq!(
            parse_mapping("9000:80").unwrap(),
            Mapping {
                local: 9000,
                remote: 80
            }
        );
        assert_eq!(parse_mapping(":80").unwrap().local, 0);
        for bad in ["", "x", "80:", "0", "1:70000", "a:80"] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_port_prefix_is_read_once_per_channel() {
        let mut first = [true, true];
        assert_eq!(
            parse_server(&[0, 0x90, 0x1f], &mut first),
            ServerFrame::Ignore
        );
        assert_eq!(
            parse_server(&[1, 0x90, 0x1f], &mut first),
            ServerFrame::Ignore
        );
        assert_eq!(
            parse_server(&[0, 0x90, 0x1f], &mut first),
            ServerFrame::Data(&[0x90, 0x1f])
        );
        assert_eq!(
            parse_server(b"\x01boom", &mut first),
            ServerFrame::Error(b"boom")
        );
        assert_eq!(parse_server(&[255, 0], &mut first), ServerFrame::Closed);
    }
}
