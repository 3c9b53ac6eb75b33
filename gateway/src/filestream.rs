//! The file RPCs' bodies on the agent side: a file or a directory (tar)
//! read from the guest as a stream of chunks, an upload of a file or a
//! tar fed chunk by chunk, and the `FileInfo` JSON a client reads. Plain
//! HTTP (`files`) and the WebSocket form (`transfer`) share them; what a
//! request asks is theirs to parse.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::reply::BodyError;
use crate::route::{Reason, Refusal, plan_agent_refusal};

/// Largest chunk sent to the agent (its limit per message).
pub const MAX_CHUNK: usize = 1 << 20;

/// Upload chunks queued towards the agent before the client is slowed.
const QUEUE: usize = 8;

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
    /// Chunks of at most [`MAX_CHUNK`] bytes.
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
    let head = futures::stream::iter(first.map(|c| Ok(c.data)));
    let tail = futures::stream::unfold(s, |mut s| async move {
        match s.message().await {
            Ok(Some(c)) => Some((Ok(c.data), s)),
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

/// The JSON a client reads for `info` (pure).
pub fn build_file_info(info: &gpb::FileInfo, sha256: Option<&str>) -> Value {
    let kind = match gpb::FileType::try_from(info.r#type) {
        Ok(gpb::FileType::Regular) => "file",
        Ok(gpb::FileType::Directory) => "dir",
        Ok(gpb::FileType::Symlink) => "symlink",
        _ => "other",
    };
    let mut v = json!({
        "path": info.path,
        "type": kind,
        "size": info.size,
        "mode": info.mode & 0o7777,
        "isDir": kind == "dir",
        "mtimeUnix": info.modified_unix_nanos.div_euclid(1_000_000_000),
        "uid": info.uid,
        "gid": info.gid,
    });
    if !info.link_target.is_empty() {
        v["linkTarget"] = json!(info.link_target);
    }
    if let Some(h) = sha256 {
        v["sha256"] = json!(h);
    }
    v
}
