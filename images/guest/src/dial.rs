//! `Dial`: one TCP connection from inside the guest to `127.0.0.1:port`,
//! its bytes carried both ways over the gRPC stream, so port forwarding
//! reaches servers that listen on loopback only.
//!
//! Half-close: a `close_write` from the caller (or the end of its input)
//! shuts the connection's write side, so the server reads end of input
//! and its reply still comes back; the server shutting its side is
//! reported as `closed_write`, and the output ends only once both
//! directions are done. A caller that goes away drops the connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::{DialInput, DialOutput, dial_input, dial_output};

/// Longest a connect to loopback may take; a listener whose backlog is
/// full is the only thing that makes it wait.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest chunk read from the server per message.
const READ_CHUNK: usize = 64 << 10;

/// Messages queued towards the caller before the server is read slower.
const OUTPUT_QUEUE: usize = 16;

/// The output of a `Dial`.
pub type OutputStream = Pin<Box<dyn Stream<Item = Result<DialOutput, Status>> + Send>>;

/// The port a `DialStart` names, or why it is refused (pure).
pub fn check_port(port: u32) -> Result<u16, Status> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {port} is not 1 to 65535")))
}

/// The status of a failed connect to `port` (pure): refused means nothing
/// listens, which the caller reports as such.
pub fn connect_status(port: u16, e: &std::io::Error) -> Status {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Status::failed_precondition(format!(
            "nothing listens on 127.0.0.1:{port} in the guest (connection refused)"
        )),
        std::io::ErrorKind::TimedOut => Status::deadline_exceeded(format!(
            "connect to 127.0.0.1:{port} in the guest timed out"
        )),
        _ => Status::unavailable(format!("connect to 127.0.0.1:{port} in the guest: {e}")),
    }
}

fn output(o: dial_output::Output) -> Result<DialOutput, Status> {
    Ok(DialOutput { output: Some(o) })
}

/// Serves one `Dial`: reads the `DialStart`, connects, then carries bytes
/// until both directions are done or the caller goes away.
pub async fn dial(mut input: Streaming<DialInput>) -> Result<OutputStream, Status> {
    let port = match input.message().await? {
        Some(DialInput {
            input: Some(dial_input::Input::Start(s)),
        }) => check_port(s.port)?,
        _ => {
            return Err(Status::invalid_argument(
                "Dial: the first message must carry DialStart",
            ));
        }
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(connect_status(port, &e)),
        Err(_) => {
            return Err(connect_status(
                port,
                &std::io::Error::from(std::io::ErrorKind::TimedOut),
            ));
        }
    };
    // Small writes (a keystroke, a request line) go out at once.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let (sent_all, input_done) = oneshot::channel();
    // Queued before the reader starts: `connected` is always first.
    tx.try_send(output(dial_output::Output::Connected(true)))
        .map_err(|_| Status::internal("Dial: output queue closed"))?;
    tokio::spawn(async move {
        to_server(input, wr).await;
        let _ = sent_all.send(());
    });
    tokio::spawn(from_server(rd, tx, input_done));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The caller's bytes to the server; ends (shutting the write side) at
/// `close_write` or the end of input, and drops the write side when the
/// caller's stream breaks.
async fn to_server(mut input: Streaming<DialInput>, mut wr: OwnedWriteHalf) {
    loop {
        match input.message().await {
            Ok(Some(DialInput {
                input: Some(dial_input::Input::Data(b)),
            })) => {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            Ok(Some(DialInput {
                input: Some(dial_input::Input::CloseWrite(true)),
            })) => break,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let _ = wr.shutdown().await;
    // Wait for the caller to go away or the server to finish: dropping
    // the write half now would not close anything more, but a later
    // message is ignored rather than read into a closed socket.
    while let Ok(Some(_)) = input.message().await {}
}

/// The server's bytes to the caller; `closed_write` at its end of output,
/// then the stream stays open until the caller's input is done.
async fn from_server(
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<Result<DialOutput, Status>>,
    input_done: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        tokio::select! {
            () = tx.closed() => return,
            r = rd.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(output(dial_output::Output::Data(buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::aborted(format!("connection to the server broke: {e}"))))
                        .await;
                    return;
                }
            },
        }
    }
    if tx
        .send(output(dial_output::Output::ClosedWrite(true)))
        .await
        .is_err()
    {
        return;
    }
    tokio::select! {
        () = tx.closed() => {}
        _ = input_done => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535() {
        assert!(check_port(0).is_err());
        assert!(check_port(65_536).is_err());
        assert_eq!(check_port(8080).ok(), Some(8080));
    }

    #[test]
    fn refused_says_nothing_listens() {
        let s = connect_status(
            80,
            &std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("nothing listens on 127.0.0.1:80"));
    }
}
