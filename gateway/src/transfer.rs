//! The WebSocket form of long transfers: a file or a directory (tar) read
//! from the guest, an upload of a file or a tar, the console or a detached
//! process's output followed. The agent-side bodies are `filestream`'s,
//! `console`'s and `processes`', shared with the plain HTTP form.
//!
//! Why a WebSocket form: kube-apiserver ends every request that is not
//! long-running at `--request-timeout` (60 s by default). Long-running are
//! only the verbs watch and proxy and the subresources attach, exec, proxy,
//! log and portforward (k8s.io/apiserver `BasicLongRunningRequestCheck`),
//! so a `files` download, an upload, a `console` or a `processes` logs
//! follow over plain HTTP
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

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::channel::number::{CLOSE, STDIN, STDOUT};
use crate::channel::{Socket, framed, send_final_status};
use crate::console::ConsoleOptions;
use crate::files::{FileOp, parse_request};
use crate::filestream::{
    Chunks, MAX_CHUNK, Upload, UploadTo, download, download_tar, start_upload,
};
use crate::outstream::{Ended, OutSocket};
use crate::processes::{self, ProcessOp};
use crate::query::{flag, form_decode};
use crate::route::{Reason, Refusal, plan_agent_refusal};

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
    /// `processes?op=logs&tag=T&follow=true` (or `pid=N`): a detached
    /// process's output. The count of bytes its ring dropped is not sent
    /// here; the process list has it.
    Logs {
        /// Which process.
        process: gpb::ProcessRef,
        /// Keep the stream open until the process exits.
        follow: bool,
    },
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
            "upload" => upload = flag("upload", &form_decode(v))?,
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

/// The transfer a WebSocket `processes` request asks for (pure): only
/// `op=logs`, with the plain request's query; the other operations answer
/// at once.
pub fn plan_processes(query: &str) -> Result<Transfer, Refusal> {
    match processes::parse_request(&hyper::Method::GET, query)? {
        ProcessOp::Logs { process, follow } => Ok(Transfer::Logs { process, follow }),
        ProcessOp::List => Err(Refusal::new(
            Reason::BadRequest,
            "the process list answers at once: send it as a plain HTTP request",
        )),
        // GET never parses to the others.
        other => Err(Refusal::new(
            Reason::BadRequest,
            format!("{other:?} is not a transfer"),
        )),
    }
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
        Transfer::Logs { process, follow } => {
            let agent = NodeAgentClient::new(channel);
            let (_dropped, chunks) =
                processes::open_logs(agent, capsule, uid.to_string(), process, follow).await?;
            Opened::Output(Box::pin(chunks))
        }
    })
}

/// The final `Status` of a transfer that worked (pure).
pub fn build_success_status() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" })
}

/// Runs the transfer until it ends or the client goes away.
pub async fn bridge(mut ws: Socket, capsule: String, opened: Opened) {
    if ws.send(framed(STDOUT, &[])).await.is_err() {
        return;
    }
    match opened {
        Opened::Output(chunks) => send_output(ws, &capsule, chunks).await,
        Opened::Upload(upload) => receive_upload(ws, &capsule, upload).await,
    }
}

/// Sends `chunks` on stdout, then the final status.
async fn send_output(ws: Socket, capsule: &str, mut chunks: Chunks) {
    let Ok(mut out) = OutSocket::take(ws).await else {
        return;
    };
    let status = match out.pump(&mut chunks).await {
        Ended::Done => build_success_status(),
        Ended::Failed(m) => Refusal::capsule(Reason::InternalError, capsule, m).to_status(),
        Ended::Gone => return,
    };
    out.finish(&status).await;
}

/// Feeds the client's stdin to the upload, then sends the agent's answer
/// and the final status.
async fn receive_upload(ws: Socket, capsule: &str, upload: Upload) {
    let (mut sink, mut source) = ws.split();
    let Upload { data, mut done } = upload;
    let mut data = Some(data);
    let answer = loop {
        tokio::select! {
            r = &mut done => break r,
            m = source.next(), if data.is_some() => match m {
                Some(Ok(Message::Binary(b))) => match b.split_first() {
                    Some((&STDIN, rest)) => {
                        for c in rest.chunks(MAX_CHUNK) {
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
    let status = match answer {
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
        Ok(Err(st)) => plan_agent_refusal(capsule, &st).to_status(),
        Err(_) => Refusal::capsule(
            Reason::InternalError,
            capsule,
            "the upload ended without an answer",
        )
        .to_status(),
    };
    send_final_status(&mut sink, &status).await;
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
