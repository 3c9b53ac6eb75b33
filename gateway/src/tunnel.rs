//! One TCP connection to a capsule port through the node agent's
//! `Connect` (which picks the route: the guest's address from the
//! capsule's network namespace, or 127.0.0.1 inside the guest), opened
//! before anything is answered so a refusal is an HTTP status: nothing
//! listening is `502`, no answer in time `504`. [`Tunnel::into_io`] turns
//! it into a byte stream for an HTTP client ([`crate::proxy`]);
//! [`crate::portforward`] moves its messages itself.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::route::plan_agent_refusal;
use crate::route::{Reason, Refusal};

/// Messages queued towards the agent before the client is read slower.
const QUEUE: usize = 16;

/// Largest chunk sent to the agent per message.
const CHUNK: usize = 64 << 10;

/// An open connection.
pub struct Tunnel {
    /// Towards the server; dropping it ends the input (a FIN).
    pub tx: mpsc::Sender<pb::ConnectInput>,
    /// From the server, after `connected`.
    pub rx: Streaming<pb::ConnectOutput>,
    /// The route the agent took.
    pub route: pb::ConnectRoute,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// A message carrying `i`.
pub fn input(i: gpb::dial_input::Input) -> pb::ConnectInput {
    pb::ConnectInput {
        uid: String::new(),
        route: 0,
        input: Some(gpb::DialInput { input: Some(i) }),
    }
}

/// A refusal of the agent's `Connect` as the user reads it (pure):
/// nothing listening is a bad gateway, no answer in time a timeout.
pub fn plan_connect_refusal(capsule: &str, port: u16, status: &tonic::Status) -> Refusal {
    let reason = match status.code() {
        tonic::Code::FailedPrecondition => Reason::BadGateway,
        tonic::Code::DeadlineExceeded => Reason::Timeout,
        _ => return plan_agent_refusal(capsule, status),
    };
    Refusal::capsule(
        reason,
        capsule,
        format!("capsule \"{capsule}\" port {port}: {}", status.message()),
    )
}

/// Opens a connection to `port` of capsule `uid`.
pub async fn open(
    channel: Channel,
    capsule: &str,
    uid: &str,
    port: u16,
) -> Result<Tunnel, Refusal> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let mut first = input(gpb::dial_input::Input::Start(gpb::DialStart {
        port: u32::from(port),
    }));
    first.uid = uid.to_string();
    first.route = pb::ConnectRoute::Auto as i32;
    tx.try_send(first)
        .map_err(|_| Refusal::new(Reason::InternalError, "connect queue closed"))?;
    let refused = |s: &tonic::Status| plan_connect_refusal(capsule, port, s);
    let mut out = NodeAgentClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    match out.message().await {
        Ok(Some(pb::ConnectOutput {
            output: Some(pb::connect_output::Output::Connected(r)),
        })) => Ok(Tunnel {
            tx,
            rx: out,
            route: pb::ConnectRoute::try_from(r).unwrap_or(pb::ConnectRoute::Auto),
        }),
        Ok(other) => Err(Refusal::capsule(
            Reason::InternalError,
            capsule,
            format!("the node agent's Connect began with {other:?}"),
        )),
        Err(s) => Err(refused(&s)),
    }
}

impl Tunnel {
    /// The connection as a byte stream: writes go to the server, its
    /// shutdown is a FIN, reads are the server's bytes and end at its end
    /// of output. A pump task carries them; it ends with both directions.
    pub fn into_io(self) -> DuplexStream {
        let (near, mut far) = tokio::io::duplex(CHUNK);
        let Tunnel { tx, mut rx, .. } = self;
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut tx = Some(tx);
            let mut server_open = true;
            loop {
                tokio::select! {
                    r = far.read(&mut buf), if tx.is_some() => match r {
                        Ok(0) | Err(_) => {
                            if let Some(t) = tx.take() {
                                let _ = t.send(input(gpb::dial_input::Input::CloseWrite(true))).await;
                            }
                        }
                        Ok(n) => {
                            let sent = match &tx {
                                Some(t) => t.send(input(gpb::dial_input::Input::Data(buf[..n].to_vec()))).await.is_ok(),
                                None => false,
                            };
                            if !sent {
                                return;
                            }
                        }
                    },
                    m = rx.message(), if server_open => match m {
                        Ok(Some(pb::ConnectOutput { output: Some(pb::connect_output::Output::Data(b)) })) => {
                            if far.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(pb::ConnectOutput { output: Some(pb::connect_output::Output::ClosedWrite(true)) })) => {
                            let _ = far.shutdown().await;
                            server_open = false;
                        }
                        Ok(Some(_)) => {}
                        // Ended or broken: the connection is over.
                        Ok(None) | Err(_) => return,
                    },
                    else => return,
                }
            }
        });
        near
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nothing_listening_is_502_and_no_answer_504() {
        let r = plan_connect_refusal(
            "web",
            8080,
            &tonic::Status::failed_precondition("nothing listens"),
        );
        assert_eq!(r.reason, Reason::BadGateway);
        assert_eq!(r.reason.code(), 502);
        assert!(r.message.contains("port 8080"), "{}", r.message);
        let r = plan_connect_refusal("web", 1, &tonic::Status::deadline_exceeded("slow"));
        assert_eq!(r.reason.code(), 504);
        let r = plan_connect_refusal("web", 1, &tonic::Status::not_found("gone"));
        assert_eq!(r.reason, Reason::NotFound);
    }
}
