//! The bodies of long transfers, and their WebSocket form.
//!
//! The agent side: a file or a directory (tar) read from the guest as a
//! stream of chunks, an upload of a file or a tar fed chunk by chunk, the
//! console followed. Plain HTTP (`files`, `console`) and the WebSocket
//! form below share them.
//!
//! Why a WebSocket form: kube-apiserver ends every request that is not
//! long-running at `--request-timeout` (60 s by default). Long-running are
//! only the verbs watch and proxy and the subresources attach, exec, proxy,
//! log and portforward (k8s.io/apiserver `BasicLongRunningRequestCheck`),
//! so a `files` download, an upload or a `console` follow over plain HTTP
//! is cut: `WithTimeoutForNonLongRunningRequests` answers 504, or aborts a
//! response already started. A connection the aggregator's upgrade proxy
//! hijacked after `101 Switching Protocols` is left alone by that filter
//! (a hijacked timeout writer is not written to; apimachinery
//! `proxy/upgradeaware.go` copies bytes with no deadline), so the same
//! request made as a WebSocket upgrade runs as long as it needs, with the
//! same path, query and RBAC (`e2e/tests/cli_cp.rs` proves it against an
//! API server with a 5 s request timeout).
//!
//! The WebSocket speaks the channel protocol (`v5.channel.k8s.io`): the
//! server sends an empty stdout message once the stream is up, then data on
//! stdout (1): the file, the tar or the console text, or after an upload
//! the JSON a plain PUT answers with; the client sends the upload on stdin
//! (0) and ends it with close (`[255, 0]`); the last message is one
//! `Status` on the error channel (3): `Success`, or `Failure` with the
//! code and reason a plain request would have had.

use std::pin::Pin;

use bytes::Bytes;
use futures::{SinkExt as _, Stream, StreamExt as _};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::Streaming;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::console::ConsoleOptions;
use crate::exec::{form_decode, framed, plan_agent_refusal};
use crate::files::{FileOp, build_file_info, parse_request};
use crate::reply::BodyError;
use crate::route::{Reason, Refusal};

/// Upload chunks queued towards the agent before the client is slowed.
const QUEUE: usize = 8;

/// Channel numbers, as [`crate::exec`] speaks them.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const ERROR: u8 = 3;
const CLOSE: u8 = 255;

/// Chunks of a download, whatever produces them.
pub type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// Where an upload goes: one file, or a tar extracted into a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadTo {
    /// A regular file.
    File {
        /// Absolute path.
        path: String,
        /// Permission bits (0 = the guest's default).
        mode: u32,
        /// Bytes that will come; the guest refuses a short or long upload.
        size: u64,
        /// Expected SHA-256, checked in the guest.
        sha256: Option<String>,
    },
    /// A tar stream extracted into this directory.
    Tar {
        /// Absolute path of the directory.
        dir: String,
    },
}

/// An upload running on the agent: chunks go into `data` (dropping it ends
/// the input); `done` answers with the JSON a client reads.
#[derive(Debug)]
pub struct Upload {
    /// Chunks of at most [`crate::files::MAX_CHUNK`] bytes.
    pub data: mpsc::Sender<Vec<u8>>,
    /// The agent's answer once the input ended.
    pub done: tokio::task::JoinHandle<Result<Value, tonic::Status>>,
}

/// Starts an upload into capsule `uid` through the agent.
pub fn start_upload(channel: Channel, uid: &str, to: UploadTo) -> Upload {
    let (data, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let mut agent = NodeAgentClient::new(channel);
    let uid = uid.to_string();
    let done = tokio::spawn(async move {
        match to {
            UploadTo::File {
                path,
                mode,
                size,
                sha256,
            } => {
                use gpb::write_file_input::Input;
                let wrap = move |input| pb::WriteFileInput {
                    uid: uid.clone(),
                    input: Some(gpb::WriteFileInput { input: Some(input) }),
                };
                let start = wrap(Input::Start(gpb::WriteFileStart {
                    path,
                    mode,
                    size,
                    make_parents: false,
                    sha256: sha256.unwrap_or_default(),
                }));
                let rest = ReceiverStream::new(rx).map(move |d| wrap(Input::Data(d)));
                let input = futures::stream::iter([start]).chain(rest);
                let info = agent.write_file(input).await?.into_inner();
                Ok(build_file_info(&info, None))
            }
            UploadTo::Tar { dir } => {
                use gpb::write_tar_input::Input;
                let wrap = move |input| pb::WriteTarInput {
                    uid: uid.clone(),
                    input: Some(gpb::WriteTarInput { input: Some(input) }),
                };
                let start = wrap(Input::Start(gpb::WriteTarStart { dir }));
                let rest = ReceiverStream::new(rx).map(move |d| wrap(Input::Data(d)));
                let input = futures::stream::iter([start]).chain(rest);
                let r = agent.write_tar(input).await?.into_inner();
                Ok(json!({ "entries": r.entries }))
            }
        }
    });
    Upload { data, done }
}

/// The agent's chunk stream as body chunks, after its first item was seen
/// (so a refusal becomes an HTTP status, not a cut body).
async fn peeked(capsule: &str, mut s: Streaming<gpb::FileChunk>) -> Result<Chunks, Refusal> {
    let first = s
        .message()
        .await
        .map_err(|st| plan_agent_refusal(capsule, &st))?;
    let head = futures::stream::iter(first.map(|c| Ok(Bytes::from(c.data))));
    let tail = futures::stream::unfold(s, |mut s| async move {
        match s.message().await {
            Ok(Some(c)) => Some((Ok(Bytes::from(c.data)), s)),
            Ok(None) => None,
            Err(st) => Some((Err(BodyError(st.message().to_string())), s)),
        }
    });
    Ok(Box::pin(head.chain(tail)))
}

/// Regular file `path` of capsule `uid`: its size and its bytes.
pub async fn download(
    channel: Channel,
    capsule: &str,
    uid: &str,
    path: String,
) -> Result<(u64, Chunks), Refusal> {
    let mut agent = NodeAgentClient::new(channel);
    let refused = |s: tonic::Status| plan_agent_refusal(capsule, &s);
    let info = agent
        .stat(pb::PathRequest {
            uid: uid.to_string(),
            path: path.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    if info.r#type != gpb::FileType::Regular as i32 {
        return Err(Refusal::capsule(
            Reason::BadRequest,
            capsule,
            format!("{path} is not a regular file (a directory is read with op=tar)"),
        ));
    }
    let s = agent
        .read_file(pb::ReadFileRequest {
            uid: uid.to_string(),
            request: Some(gpb::ReadFileRequest { path, max_bytes: 0 }),
        })
        .await
        .map_err(refused)?
        .into_inner();
    Ok((info.size, peeked(capsule, s).await?))
}

/// Directory `path` of capsule `uid` as a tar stream.
pub async fn download_tar(
    channel: Channel,
    capsule: &str,
    uid: &str,
    path: String,
) -> Result<Chunks, Refusal> {
    let s = NodeAgentClient::new(channel)
        .read_tar(pb::PathRequest {
            uid: uid.to_string(),
            path,
        })
        .await
        .map_err(|s| plan_agent_refusal(capsule, &s))?
        .into_inner();
    peeked(capsule, s).await
}

/// A long transfer asked for by a WebSocket request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// `files?path=P`: a regular file's bytes.
    Download {
        /// Absolute path.
        path: String,
    },
    /// `files?path=P&op=tar`: a directory as tar.
    TarDownload {
        /// Absolute path.
        path: String,
    },
    /// `files?path=P&upload=true&size=N` (a file) or
    /// `files?path=P&op=tar&upload=true` (a tar into directory P).
    Upload(UploadTo),
    /// `console?follow=true&tailLines=N`.
    Console(ConsoleOptions),
}

impl Transfer {
    /// The RBAC verb, as the plain request's method maps to it (an upload
    /// stands for a PUT).
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Upload(_) => "update",
            _ => "get",
        }
    }
}

/// The transfer a WebSocket `files` request asks for (pure): the plain
/// request's query, plus `upload=true` for what a PUT would send and
/// `size=N` in place of its Content-Length.
pub fn plan_files(query: &str) -> Result<Transfer, Refusal> {
    let bad = |m: String| Refusal::new(Reason::BadRequest, m);
    let mut rest = Vec::new();
    let (mut upload, mut size) = (false, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match form_decode(k).as_str() {
            "upload" => {
                upload = match form_decode(v).as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    v => return Err(bad(format!("upload={v:?} is not a boolean"))),
                }
            }
            "size" => {
                let v = form_decode(v);
                size = Some(
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("size={v:?} is not a byte count")))?,
                );
            }
            _ => rest.push(pair),
        }
    }
    let method = if upload {
        hyper::Method::PUT
    } else {
        hyper::Method::GET
    };
    let (path, op) = parse_request(&method, &rest.join("&"))?;
    let t = match op {
        FileOp::Download => Transfer::Download { path },
        FileOp::TarDownload => Transfer::TarDownload { path },
        FileOp::Upload { mode, sha256 } => Transfer::Upload(UploadTo::File {
            path,
            mode,
            size: size.ok_or_else(|| {
                bad("a WebSocket upload of a file needs size=BYTES (the guest checks it received every byte)".into())
            })?,
            sha256,
        }),
        FileOp::TarUpload => Transfer::Upload(UploadTo::Tar { dir: path }),
        other => {
            return Err(bad(format!(
                "{other:?} answers at once: send it as a plain HTTP request"
            )));
        }
    };
    if size.is_some() && !matches!(t, Transfer::Upload(UploadTo::File { .. })) {
        return Err(bad("size applies to the upload of a file only".into()));
    }
    Ok(t)
}

/// A transfer opened on the agent, waiting for the client's upgrade.
pub enum Opened {
    /// Data for the client.
    Output(Chunks),
    /// An upload waiting for the client's data.
    Upload(Upload),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Output(_) => "Opened::Output",
            Self::Upload(_) => "Opened::Upload",
        })
    }
}

/// Opens `t` on capsule `uid` (named `capsule`) before the upgrade is
/// answered, so what the agent refuses is an HTTP status.
pub async fn open(
    channel: Channel,
    capsule: &str,
    uid: &str,
    t: Transfer,
) -> Result<Opened, Refusal> {
    Ok(match t {
        Transfer::Download { path } => {
            Opened::Output(download(channel, capsule, uid, path).await?.1)
        }
        Transfer::TarDownload { path } => {
            Opened::Output(download_tar(channel, capsule, uid, path).await?)
        }
        Transfer::Upload(to) => Opened::Upload(start_upload(channel, uid, to)),
        Transfer::Console(o) => Opened::Output(Box::pin(
            crate::console::open(channel, capsule, uid, o).await?,
        )),
    })
}

/// The final `Status` of a transfer that worked (pure).
pub fn build_success_status() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" })
}

/// Runs the transfer until it ends or the client goes away.
pub async fn bridge(ws: WebSocketStream<TokioIo<Upgraded>>, capsule: String, opened: Opened) {
    let (mut sink, mut source) = ws.split();
    if sink.send(framed(STDOUT, &[])).await.is_err() {
        return;
    }
    let status = match opened {
        Opened::Output(mut chunks) => loop {
            tokio::select! {
                c = chunks.next() => match c {
                    Some(Ok(b)) => {
                        if sink.send(framed(STDOUT, &b)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        break Refusal::capsule(Reason::InternalError, &capsule, e.to_string()).to_status();
                    }
                    None => break build_success_status(),
                },
                // Only a close (or a broken socket) matters here: dropping
                // the agent stream stops the read in the guest.
                m = source.next() => match m {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
            }
        },
        Opened::Upload(Upload { data, mut done }) => {
            let mut data = Some(data);
            let answer = loop {
                tokio::select! {
                    r = &mut done => break r,
                    m = source.next(), if data.is_some() => match m {
                        Some(Ok(Message::Binary(b))) => match b.split_first() {
                            Some((&STDIN, rest)) => {
                                for c in rest.chunks(crate::files::MAX_CHUNK) {
                                    if let Some(tx) = &data
                                        && tx.send(c.to_vec()).await.is_err()
                                    {
                                        // The agent answered already; `done` says how.
                                        data = None;
                                    }
                                }
                            }
                            Some((&CLOSE, [STDIN])) => data = None,
                            _ => {}
                        },
                        Some(Ok(Message::Close(_)) | Err(_)) | None => {
                            // Gone mid-upload: the guest sees a short
                            // input and discards what it wrote.
                            done.abort();
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                }
            };
            match answer {
                Ok(Ok(v)) => {
                    if sink
                        .send(framed(STDOUT, v.to_string().as_bytes()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    build_success_status()
                }
                Ok(Err(st)) => plan_agent_refusal(&capsule, &st).to_status(),
                Err(_) => Refusal::capsule(
                    Reason::InternalError,
                    &capsule,
                    "the upload ended without an answer",
                )
                .to_status(),
            }
        }
    };
    let _ = sink
        .send(framed(ERROR, status.to_string().as_bytes()))
        .await;
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.flush().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn websocket_files_requests_name_their_transfer() {
        assert_eq!(
            plan_files("path=%2Ftmp%2Fa").unwrap(),
            Transfer::Download {
                path: "/tmp/a".into()
            }
        );
        assert_eq!(
            plan_files("path=/d&op=tar").unwrap(),
            Transfer::TarDownload { path: "/d".into() }
        );
        let up = plan_files(&format!(
            "path=/a&upload=true&size=5&mode=0600&sha256={}",
            "a".repeat(64)
        ))
        .unwrap();
        assert_eq!(
            up,
            Transfer::Upload(UploadTo::File {
                path: "/a".into(),
                mode: 0o600,
                size: 5,
                sha256: Some("a".repeat(64))
            })
        );
        assert_eq!(up.verb(), "update");
        assert_eq!(
            plan_files("path=/d&op=tar&upload=1").unwrap(),
            Transfer::Upload(UploadTo::Tar { dir: "/d".into() })
        );
        assert_eq!(plan_files("path=/a").unwrap().verb(), "get");
    }

    #[test]
    fn websocket_files_requests_refuse_what_does_not_apply() {
        for q in [
            "path=/a&upload=true",
            "path=/a&size=3",
            "path=/a&op=stat",
            "path=/a&upload=maybe",
            "path=/a&upload=true&size=-1",
            "path=rel",
        ] {
            assert_eq!(plan_files(q).unwrap_err().reason, Reason::BadRequest, "{q}");
        }
    }
}
