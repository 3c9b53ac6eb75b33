//! Data-plane RPCs (exec, PTY, files): each resolves the capsule's guest
//! endpoint through the supervisor and forwards to the guest agent over
//! vsock (`crate::guest`), streams plumbed both ways.
//!
//! Activity: each call holds the capsule's endpoint, and each output
//! stream keeps it (`activity::keep_open`), so the capsule counts as in
//! use until the call or stream ends.
//!
//! Cancellation: when the client goes away tonic drops the response
//! stream, which drops the guest call; the guest agent then kills the
//! process group (exec, PTY) or discards the temp file (write). Input the
//! client sends after an error is not forwarded.
//!
//! Limits here protect the node agent, not the guest (which has its own):
//! one input message at most [`MAX_INPUT_CHUNK`], a write no larger than
//! it declared, a read no larger than [`MAX_FILE_BYTES`].

use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use super::activity::keep_open;
use super::{AgentService, BoxStream, GuestEndpoint};
use crate::guest::{self, GuestClient};

/// Largest stdin, PTY or file chunk one client message may carry.
pub const MAX_INPUT_CHUNK: usize = 1 << 20;
/// Largest file one ReadFile or WriteFile moves through the node agent.
pub const MAX_FILE_BYTES: u64 = 4 << 30;
/// Input messages buffered towards the guest before the client is slowed.
const INPUT_QUEUE: usize = 16;

/// A guest-link error as the client should see it: the guest's own status
/// passes through (with the capsule named); a broken link or timeout says
/// the guest is unavailable.
pub(super) fn to_status(e: guest::Error) -> Status {
    let chain = crate::error_chain(&e);
    if e.is_link_failure() && !matches!(e, guest::Error::Timeout { .. }) {
        return Status::unavailable(chain);
    }
    match e {
        guest::Error::Call {
            source, capsule, ..
        } => Status::new(
            source.code(),
            format!("capsule {capsule}: {}", source.message()),
        ),
        guest::Error::Timeout { .. } => Status::deadline_exceeded(chain),
        guest::Error::Entropy { .. } | guest::Error::Token { .. } => Status::internal(chain),
        _ => Status::unavailable(chain),
    }
}

pub(super) async fn client(ep: &GuestEndpoint) -> Result<GuestClient, Status> {
    GuestClient::connect(&ep.capsule, &ep.vsock_socket)
        .await
        .and_then(|c| c.with_token(ep.guest_token.as_ref().map_or("", |t| t.expose())))
        .map_err(to_status)
}

pub(super) fn need_uid(uid: &str) -> Result<&str, Status> {
    if uid.is_empty() {
        Err(Status::invalid_argument(
            "uid (the capsule's UID) is required",
        ))
    } else {
        Ok(uid)
    }
}

/// [`need_uid`] for a streaming RPC, whose span cannot name the capsule
/// before its first message: records it there now.
pub(super) fn stream_uid(uid: &str) -> Result<&str, Status> {
    let uid = need_uid(uid)?;
    tracing::Span::current().record("capsule", uid);
    Ok(uid)
}

pub(super) fn chunk_ok(len: usize, what: &str) -> Result<(), Status> {
    if len > MAX_INPUT_CHUNK {
        Err(Status::invalid_argument(format!(
            "{what} chunk of {len} bytes exceeds {MAX_INPUT_CHUNK}"
        )))
    } else {
        Ok(())
    }
}

/// Reads the first message of a client stream, which names the capsule.
pub(super) async fn first<T>(stream: &mut Streaming<T>, rpc: &str) -> Result<T, Status> {
    match stream.message().await? {
        Some(m) => Ok(m),
        None => Err(Status::invalid_argument(format!(
            "{rpc}: the stream ended before its first message"
        ))),
    }
}

/// Forwards the client's later messages to the guest through a bounded
/// queue, refusing an oversized one by ending the input and reporting the
/// refusal on `errors`. A client error or disconnect ends the input.
pub(super) fn forward<T, G>(
    mut from: Streaming<T>,
    first: G,
    check: impl Fn(&T) -> Result<Option<G>, Status> + Send + 'static,
    errors: tokio::sync::oneshot::Sender<Status>,
) -> tokio_stream::wrappers::ReceiverStream<G>
where
    T: Send + 'static,
    G: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(INPUT_QUEUE);
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        loop {
            let msg = match from.message().await {
                Ok(Some(m)) => m,
                // Ended or broken: the guest sees end of input.
                Ok(None) | Err(_) => return,
            };
            match check(&msg) {
                Ok(Some(g)) => {
                    if tx.send(g).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(status) => {
                    let _ = errors.send(status);
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Guest output relayed to the client, ended early with the refusal's
/// status if the input was refused. When the client goes away the relay
/// drops the guest stream, which cancels the call in the guest.
fn output<T: Send + 'static>(
    mut guest_out: Streaming<T>,
    mut refused: tokio::sync::oneshot::Receiver<Status>,
) -> BoxStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(INPUT_QUEUE);
    tokio::spawn(async move {
        let mut refusal_pending = true;
        loop {
            let item = tokio::select! {
                () = tx.closed() => return,
                r = &mut refused, if refusal_pending => match r {
                    Ok(status) => Err(status),
                    // No refusal will come (the input ended normally).
                    Err(_) => { refusal_pending = false; continue; }
                },
                m = guest_out.message() => match m {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => return,
                    Err(status) => Err(status),
                },
            };
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// How to read one kind of interactive stream (exec or PTY). Both open
/// with a message that names the capsule and carries the start; later
/// messages carry bounded input and never a second start.
struct Interactive<T, G> {
    /// The RPC and its start message, for refusals.
    rpc: &'static str,
    start: &'static str,
    /// What a data chunk is called in a refusal.
    chunk: &'static str,
    uid: fn(&T) -> &str,
    input: fn(&T) -> Option<&G>,
    is_start: fn(&G) -> bool,
    /// The length of `G` if it is a data chunk.
    chunk_len: fn(&G) -> Option<usize>,
}

const EXEC: Interactive<pb::ExecInput, gpb::ExecInput> = Interactive {
    rpc: "Exec",
    start: "ExecStart",
    chunk: "stdin",
    uid: |m| &m.uid,
    input: |m| m.input.as_ref(),
    is_start: |g| matches!(g.input, Some(gpb::exec_input::Input::Start(_))),
    chunk_len: |g| match &g.input {
        Some(gpb::exec_input::Input::Stdin(b)) => Some(b.len()),
        _ => None,
    },
};

const PTY: Interactive<pb::PtyInput, gpb::PtyInput> = Interactive {
    rpc: "Pty",
    start: "PtyStart",
    chunk: "PTY input",
    uid: |m| &m.uid,
    input: |m| m.input.as_ref(),
    is_start: |g| matches!(g.input, Some(gpb::pty_input::Input::Start(_))),
    chunk_len: |g| match &g.input {
        Some(gpb::pty_input::Input::Data(b)) => Some(b.len()),
        _ => None,
    },
};

/// Refuses a message after the first: a second start or an oversized chunk.
fn later_input_ok<T, G>(kind: &Interactive<T, G>, g: &G) -> Result<(), Status> {
    if (kind.is_start)(g) {
        return Err(Status::invalid_argument(format!(
            "{}: {} is only allowed in the first message",
            kind.rpc, kind.start
        )));
    }
    (kind.chunk_len)(g).map_or(Ok(()), |len| chunk_ok(len, kind.chunk))
}

/// An exec or PTY stream opened towards the guest: its endpoint (held for
/// activity), a connected client, the checked input and where a refusal
/// of later input is reported.
struct Opened<G> {
    ep: GuestEndpoint,
    guest: GuestClient,
    input: tokio_stream::wrappers::ReceiverStream<G>,
    refused: tokio::sync::oneshot::Receiver<Status>,
}

/// Reads and checks the first message, names the capsule on the RPC's
/// span, connects to its guest and starts forwarding later input.
async fn open<T, G>(
    svc: &AgentService,
    req: Request<Streaming<T>>,
    kind: &'static Interactive<T, G>,
) -> Result<Opened<G>, Status>
where
    T: Send + 'static,
    G: Clone + Send + 'static,
{
    let mut stream = req.into_inner();
    let head = first(&mut stream, kind.rpc).await?;
    let uid = stream_uid((kind.uid)(&head))?.to_string();
    let start = match (kind.input)(&head) {
        Some(g) if (kind.is_start)(g) => g.clone(),
        _ => {
            return Err(Status::invalid_argument(format!(
                "{}: the first message must carry {}",
                kind.rpc, kind.start
            )));
        }
    };
    let ep = svc.guest_endpoint(&uid).await?;
    let guest = client(&ep).await?;
    let (err_tx, refused) = tokio::sync::oneshot::channel();
    let input = forward(
        stream,
        start,
        move |m: &T| match (kind.input)(m) {
            Some(g) => later_input_ok(kind, g).map(|()| Some(g.clone())),
            None => Ok(None),
        },
        err_tx,
    );
    Ok(Opened {
        ep,
        guest,
        input,
        refused,
    })
}

pub(super) async fn exec(
    svc: &AgentService,
    req: Request<Streaming<pb::ExecInput>>,
) -> Result<Response<BoxStream<gpb::ExecOutput>>, Status> {
    let o = open(svc, req, &EXEC).await?;
    let out = o.guest.exec(o.input).await.map_err(to_status)?;
    Ok(Response::new(keep_open(
        output(out, o.refused),
        o.ep.open.clone(),
    )))
}

pub(super) async fn pty(
    svc: &AgentService,
    req: Request<Streaming<pb::PtyInput>>,
) -> Result<Response<BoxStream<gpb::PtyOutput>>, Status> {
    let o = open(svc, req, &PTY).await?;
    let out = o.guest.pty(o.input).await.map_err(to_status)?;
    Ok(Response::new(keep_open(
        output(out, o.refused),
        o.ep.open.clone(),
    )))
}

pub(super) async fn read_file(
    svc: &AgentService,
    req: Request<pb::ReadFileRequest>,
) -> Result<Response<BoxStream<gpb::FileChunk>>, Status> {
    let req = req.into_inner();
    let uid = need_uid(&req.uid)?;
    let mut inner = req
        .request
        .ok_or_else(|| Status::invalid_argument("ReadFile: request is required"))?;
    inner.max_bytes = match inner.max_bytes {
        0 => MAX_FILE_BYTES,
        n => n.min(MAX_FILE_BYTES),
    };
    let ep = svc.guest_endpoint(uid).await?;
    let guest = client(&ep).await?;
    let out = guest.read_file(inner).await.map_err(to_status)?;
    Ok(Response::new(keep_open(Box::pin(out), ep.open.clone())))
}

pub(super) async fn write_file(
    svc: &AgentService,
    req: Request<Streaming<pb::WriteFileInput>>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let mut stream = req.into_inner();
    let head = first(&mut stream, "WriteFile").await?;
    let uid = stream_uid(&head.uid)?.to_string();
    let declared = match &head.input {
        Some(gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Start(s)),
        }) => s.size,
        _ => {
            return Err(Status::invalid_argument(
                "WriteFile: the first message must carry WriteFileStart",
            ));
        }
    };
    let start = head.input.unwrap_or_default();
    if declared > MAX_FILE_BYTES {
        return Err(Status::invalid_argument(format!(
            "WriteFile: {declared} bytes exceed the limit of {MAX_FILE_BYTES}"
        )));
    }
    let ep = svc.guest_endpoint(&uid).await?;
    let guest = client(&ep).await?;
    let (err_tx, mut err_rx) = tokio::sync::oneshot::channel();
    let sent = std::sync::atomic::AtomicU64::new(0);
    let input = forward(
        stream,
        start,
        move |m: &pb::WriteFileInput| match &m.input {
            Some(gpb::WriteFileInput {
                input: Some(gpb::write_file_input::Input::Data(b)),
            }) => {
                chunk_ok(b.len(), "file")?;
                let len = b.len() as u64;
                let total = sent.fetch_add(len, std::sync::atomic::Ordering::Relaxed) + len;
                if total > declared {
                    return Err(Status::invalid_argument(format!(
                        "WriteFile: more than the declared {declared} bytes sent"
                    )));
                }
                Ok(m.input.clone())
            }
            Some(_) => Err(Status::invalid_argument(
                "WriteFile: WriteFileStart is only allowed in the first message",
            )),
            None => Ok(None),
        },
        err_tx,
    );
    let result = guest.write_file(input).await;
    // A refused input ended the guest's stream early; the refusal is the
    // error the client needs, not the guest's "short write".
    if let Ok(status) = err_rx.try_recv() {
        return Err(status);
    }
    result.map(Response::new).map_err(to_status)
}

pub(super) async fn list_dir(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<gpb::ListDirResponse>, Status> {
    let req = req.into_inner();
    let ep = svc.guest_endpoint(need_uid(&req.uid)?).await?;
    let guest = client(&ep).await?;
    guest
        .list_dir(&req.path)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn stat(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let req = req.into_inner();
    let ep = svc.guest_endpoint(need_uid(&req.uid)?).await?;
    let guest = client(&ep).await?;
    guest
        .stat(&req.path)
        .await
        .map(Response::new)
        .map_err(to_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_and_misplaced_input_is_refused() {
        let big = gpb::ExecInput {
            input: Some(gpb::exec_input::Input::Stdin(vec![0; MAX_INPUT_CHUNK + 1])),
        };
        assert_eq!(
            later_input_ok(&EXEC, &big).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let ok = gpb::ExecInput {
            input: Some(gpb::exec_input::Input::Stdin(vec![0; MAX_INPUT_CHUNK])),
        };
        assert!(later_input_ok(&EXEC, &ok).is_ok());
        let restart = gpb::PtyInput {
            input: Some(gpb::pty_input::Input::Start(gpb::PtyStart::default())),
        };
        assert_eq!(
            later_input_ok(&PTY, &restart).unwrap_err().message(),
            "Pty: PtyStart is only allowed in the first message"
        );
    }

    #[test]
    fn guest_status_passes_through_and_link_failures_are_unavailable() {
        let denied = guest::Error::Call {
            capsule: "c1".into(),
            rpc: "Stat",
            source: Status::not_found("no such file"),
        };
        let s = to_status(denied);
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().contains("c1") && s.message().contains("no such file"));
        let gone = guest::Error::Handshake {
            socket: "/x".into(),
            port: 1024,
            reply: String::new(),
        };
        assert_eq!(to_status(gone).code(), tonic::Code::Unavailable);
    }
}
