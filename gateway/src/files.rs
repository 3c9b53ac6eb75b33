//! `capsules/files`: one file streamed down (GET) or up (PUT), stat,
//! paged listing, mkdir, remove, rename, chmod, chown, and directories as
//! tar, each a plain HTTP request bridged to the node agent's file RPCs
//! (which forward to the guest agent). Bodies are streamed both ways in
//! chunks; nothing holds a whole file. The contract is `docs/gateway-api.md`.
//!
//! What a request asks is parsed apart from the I/O ([`parse_request`],
//! [`plan_page`], [`build_file_info`]).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::filestream::{
    MAX_CHUNK, Upload, UploadTo, build_file_info, download, download_tar, start_upload,
};
use crate::query::{flag, form_decode};
use crate::reply::{self, Reply};
use crate::route::{Reason, Refusal, plan_agent_refusal};

/// What a files request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// GET: the file's bytes.
    Download,
    /// PUT: replace the file with the body.
    Upload {
        /// Permission bits (0 = the guest's default, 0644).
        mode: u32,
        /// Expected SHA-256 (lowercase hex), checked in the guest.
        sha256: Option<String>,
    },
    /// GET op=stat.
    Stat {
        /// Add the SHA-256 of a regular file.
        sha256: bool,
    },
    /// GET op=list.
    List {
        /// Most items per page (0 = all).
        limit: usize,
        /// Where the previous page ended.
        after: Option<String>,
    },
    /// POST op=mkdir.
    Mkdir {
        /// Permission bits (0 = 0755).
        mode: u32,
        /// Make missing parents.
        parents: bool,
    },
    /// POST op=remove.
    Remove {
        /// A directory with what it holds.
        recursive: bool,
    },
    /// POST op=rename.
    Rename {
        /// New absolute path.
        to: String,
    },
    /// POST op=chmod.
    Chmod {
        /// Permission bits.
        mode: u32,
    },
    /// POST op=chown.
    Chown {
        /// New owner.
        uid: Option<u32>,
        /// New group.
        gid: Option<u32>,
    },
    /// GET op=tar: the directory as a tar stream.
    TarDownload,
    /// PUT op=tar: extract the body into the directory.
    TarUpload,
}

impl FileOp {
    /// The RBAC verb of the request (as the API server maps HTTP methods).
    pub fn verb(method: &Method) -> &'static str {
        match *method {
            Method::GET | Method::HEAD => "get",
            Method::PUT => "update",
            _ => "create",
        }
    }
}

fn bad(m: impl Into<String>) -> Refusal {
    Refusal::new(Reason::BadRequest, m)
}

fn octal(v: &str) -> Result<u32, Refusal> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            bad(format!(
                "mode {v:?} is not octal permission bits (e.g. 0644)"
            ))
        })
}

fn number<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, Refusal> {
    v.parse()
        .map_err(|_| bad(format!("query parameter {k}={v:?} is not a number")))
}

/// The path and operation a request asks for (pure).
pub fn parse_request(method: &Method, query: &str) -> Result<(String, FileOp), Refusal> {
    let mut q = std::collections::BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if q.insert(form_decode(k), form_decode(v)).is_some() {
            return Err(bad(format!("query parameter {k:?} is given twice")));
        }
    }
    let mut take = |k: &str| q.remove(k);
    let path = take("path").ok_or_else(|| bad("query parameter path is required"))?;
    if !path.starts_with('/') {
        return Err(bad(format!("path {path:?} is not absolute")));
    }
    let op = take("op");
    let mode = take("mode").map(|m| octal(&m)).transpose()?;
    let recursive = take("recursive")
        .map(|v| flag("recursive", &v))
        .transpose()?
        .unwrap_or(false);
    let parsed = match (method.clone(), op.as_deref()) {
        (Method::GET, None) => FileOp::Download,
        (Method::PUT, None) => FileOp::Upload {
            mode: mode.unwrap_or(0),
            sha256: match take("sha256") {
                Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(h.to_ascii_lowercase())
                }
                Some(h) => return Err(bad(format!("sha256 {h:?} is not 64 hex digits"))),
                None => None,
            },
        },
        (Method::GET, Some("stat")) => FileOp::Stat {
            sha256: take("sha256")
                .map(|v| flag("sha256", &v))
                .transpose()?
                .unwrap_or(false),
        },
        (Method::GET, Some("list")) => FileOp::List {
            limit: take("limit")
                .map(|v| number("limit", &v))
                .transpose()?
                .unwrap_or(0),
            after: take("continue").filter(|c| !c.is_empty()),
        },
        (Method::GET, Some("tar")) => FileOp::TarDownload,
        (Method::PUT, Some("tar")) => FileOp::TarUpload,
        (Method::POST, Some("mkdir")) => FileOp::Mkdir {
            mode: mode.unwrap_or(0),
            parents: recursive,
        },
        (Method::POST, Some("remove")) => FileOp::Remove { recursive },
        (Method::POST, Some("rename")) => {
            let to = take("to").ok_or_else(|| bad("op=rename needs to=NEWPATH"))?;
            if !to.starts_with('/') {
                return Err(bad(format!("to {to:?} is not absolute")));
            }
            FileOp::Rename { to }
        }
        (Method::POST, Some("chmod")) => FileOp::Chmod {
            mode: mode.ok_or_else(|| bad("op=chmod needs mode=OCTAL"))?,
        },
        (Method::POST, Some("chown")) => {
            let uid = take("uid").map(|v| number("uid", &v)).transpose()?;
            let gid = take("gid").map(|v| number("gid", &v)).transpose()?;
            if uid.is_none() && gid.is_none() {
                return Err(bad("op=chown needs uid=, gid= or both"));
            }
            FileOp::Chown { uid, gid }
        }
        (m, op) => {
            return Err(Refusal::new(
                Reason::MethodNotAllowed,
                format!(
                    "files does not take {m} with op={}; see docs/gateway-api.md",
                    op.unwrap_or("(none)")
                ),
            ));
        }
    };
    if let Some(k) = q.keys().next() {
        return Err(bad(format!(
            "query parameter {k:?} does not apply to this files request"
        )));
    }
    Ok((path, parsed))
}

/// One page of a sorted listing (pure): the entries after `after`, at
/// most `limit` (0 = all), and the token of the next page when more remain.
pub fn plan_page(
    entries: &[gpb::FileInfo],
    limit: usize,
    after: Option<&str>,
) -> (Vec<gpb::FileInfo>, Option<String>) {
    let start = after.map_or(0, |a| entries.partition_point(|e| e.path.as_str() <= a));
    let rest = &entries[start..];
    let n = if limit == 0 {
        rest.len()
    } else {
        limit.min(rest.len())
    };
    let page = rest[..n].to_vec();
    let next = (n < rest.len())
        .then(|| page.last().map(|e| e.path.clone()))
        .flatten();
    (page, next)
}

fn chunks_of(b: Bytes) -> impl Iterator<Item = Bytes> {
    let mut rest = b;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            None
        } else {
            Some(rest.split_to(MAX_CHUNK.min(rest.len())))
        }
    })
}

/// Feeds the request body to `tx` in chunks of at most [`MAX_CHUNK`]. A
/// broken body ends the input early, which the guest sees as a short
/// upload and refuses.
fn pump(mut body: Incoming, tx: mpsc::Sender<Vec<u8>>) {
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return;
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for c in chunks_of(data) {
                if tx.send(c.to_vec()).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Runs `upload` fed from `body` and answers with its result.
async fn upload_body(capsule: &str, upload: Upload, body: Incoming) -> Result<Reply, Refusal> {
    pump(body, upload.data);
    match upload.done.await {
        Ok(Ok(v)) => Ok(reply::json(StatusCode::OK, &v)),
        Ok(Err(st)) => Err(plan_agent_refusal(capsule, &st)),
        Err(_) => Err(Refusal::capsule(
            Reason::InternalError,
            capsule,
            "the upload task ended without an answer",
        )),
    }
}

/// Serves one files request on capsule `uid` (named `capsule`).
pub async fn serve(
    channel: Channel,
    capsule: &str,
    uid: &str,
    path: String,
    op: FileOp,
    content_length: Option<u64>,
    body: Incoming,
) -> Result<Reply, Refusal> {
    let mut agent = NodeAgentClient::new(channel.clone());
    let refused = |s: tonic::Status| plan_agent_refusal(capsule, &s);
    let uid = uid.to_string();
    let at = |path: &str| pb::PathRequest {
        uid: uid.clone(),
        path: path.to_string(),
    };
    let ok = |v: Value| Ok(reply::json(StatusCode::OK, &v));
    match op {
        FileOp::Download => {
            let (size, chunks) = download(channel, capsule, &uid, path).await?;
            Ok(reply::stream(
                "application/octet-stream",
                Some(size),
                chunks,
            ))
        }
        FileOp::Upload { mode, sha256 } => {
            let size = content_length.ok_or_else(|| {
                Refusal::new(
                    Reason::LengthRequired,
                    "an upload needs a Content-Length (the guest checks it received every byte)",
                )
            })?;
            let to = UploadTo::File {
                path,
                mode,
                size,
                sha256,
            };
            upload_body(capsule, start_upload(channel, &uid, to), body).await
        }
        FileOp::Stat { sha256 } => ok(stat(&mut agent, &at(&path), sha256)
            .await
            .map_err(refused)?),
        FileOp::List { limit, after } => {
            let list = agent.list_dir(at(&path)).await.map_err(refused)?;
            ok(build_page(
                &list.into_inner().entries,
                limit,
                after.as_deref(),
            ))
        }
        FileOp::Mkdir { mode, parents } => {
            let info = agent
                .make_dir(pb::MakeDirRequest {
                    uid: uid.clone(),
                    request: Some(gpb::MakeDirRequest {
                        path,
                        mode,
                        parents,
                    }),
                })
                .await
                .map_err(refused)?
                .into_inner();
            ok(build_file_info(&info, None))
        }
        FileOp::Remove { recursive } => {
            agent
                .remove(pb::RemoveRequest {
                    uid: uid.clone(),
                    request: Some(gpb::RemoveRequest { path, recursive }),
                })
                .await
                .map_err(refused)?;
            ok(json!({}))
        }
        FileOp::Rename { to } => {
            let info = agent
                .rename(pb::RenameRequest {
                    uid: uid.clone(),
                    request: Some(gpb::RenameRequest { from: path, to }),
                })
                .await
                .map_err(refused)?
                .into_inner();
            ok(build_file_info(&info, None))
        }
        FileOp::Chmod { mode } => {
            set_attr(&mut agent, capsule, &uid, path, Some(mode), None, None).await
        }
        FileOp::Chown { uid: u, gid } => {
            set_attr(&mut agent, capsule, &uid, path, None, u, gid).await
        }
        FileOp::TarDownload => {
            let chunks = download_tar(channel, capsule, &uid, path).await?;
            Ok(reply::stream("application/x-tar", None, chunks))
        }
        FileOp::TarUpload => {
            let to = UploadTo::Tar { dir: path };
            upload_body(capsule, start_upload(channel, &uid, to), body).await
        }
    }
}

/// `stat`, with the content's checksum when asked and a regular file.
async fn stat(
    agent: &mut NodeAgentClient<Channel>,
    at: &pb::PathRequest,
    sha256: bool,
) -> Result<Value, tonic::Status> {
    let info = agent.stat(at.clone()).await?.into_inner();
    if !(sha256 && info.r#type == gpb::FileType::Regular as i32) {
        return Ok(build_file_info(&info, None));
    }
    let sum = agent.checksum(at.clone()).await?.into_inner().sha256;
    Ok(build_file_info(&info, Some(&sum)))
}

/// One page of a directory listing, with the `continue` token of the
/// next (pure).
fn build_page(entries: &[gpb::FileInfo], limit: usize, after: Option<&str>) -> Value {
    let (page, next) = plan_page(entries, limit, after);
    let mut v = json!({
        "items": page.iter().map(|i| build_file_info(i, None)).collect::<Vec<_>>(),
    });
    if let Some(n) = next {
        v["continue"] = json!(n);
    }
    v
}

async fn set_attr(
    agent: &mut NodeAgentClient<Channel>,
    capsule: &str,
    uid: &str,
    path: String,
    mode: Option<u32>,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<Reply, Refusal> {
    let info = agent
        .set_attr(pb::SetAttrRequest {
            uid: uid.to_string(),
            request: Some(gpb::SetAttrRequest {
                path,
                mode,
                uid: owner,
                gid: group,
            }),
        })
        .await
        .map_err(|s| plan_agent_refusal(capsule, &s))?
        .into_inner();
    Ok(reply::json(StatusCode::OK, &build_file_info(&info, None)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_parse_to_operations() {
        let p = |m: Method, q: &str| parse_request(&m, q);
        assert_eq!(
            p(Method::GET, "path=%2Ftmp%2Fa").unwrap(),
            ("/tmp/a".into(), FileOp::Download)
        );
        let (_, up) = p(
            Method::PUT,
            &format!("path=/a&mode=0600&sha256={}", "A".repeat(64)),
        )
        .unwrap();
        assert_eq!(
            up,
            FileOp::Upload {
                mode: 0o600,
                sha256: Some("a".repeat(64))
            }
        );
        assert_eq!(
            p(Method::GET, "path=/d&op=list&limit=2&continue=/d/b")
                .unwrap()
                .1,
            FileOp::List {
                limit: 2,
                after: Some("/d/b".into())
            }
        );
        assert_eq!(
            p(Method::POST, "path=/d&op=mkdir&recursive=true")
                .unwrap()
                .1,
            FileOp::Mkdir {
                mode: 0,
                parents: true
            }
        );
        assert_eq!(
            p(Method::POST, "path=/a&op=chown&uid=1000").unwrap().1,
            FileOp::Chown {
                uid: Some(1000),
                gid: None
            }
        );
        assert_eq!(FileOp::verb(&Method::PUT), "update");
    }

    #[test]
    fn bad_requests_say_why() {
        for (m, q) in [
            (Method::GET, ""),
            (Method::GET, "path=rel"),
            (Method::PUT, "path=/a&sha256=abc"),
            (Method::POST, "path=/a&op=chmod"),
            (Method::POST, "path=/a&op=chmod&mode=999"),
            (Method::POST, "path=/a&op=rename"),
            (Method::POST, "path=/a&op=chown"),
            (Method::GET, "path=/a&bogus=1"),
            (Method::GET, "path=/a&path=/b"),
        ] {
            assert_eq!(
                parse_request(&m, q).unwrap_err().reason,
                Reason::BadRequest,
                "{q}"
            );
        }
        assert_eq!(
            parse_request(&Method::DELETE, "path=/a")
                .unwrap_err()
                .reason,
            Reason::MethodNotAllowed
        );
    }

    #[test]
    fn pages_continue_where_the_last_ended() {
        let e: Vec<gpb::FileInfo> = ["/d/a", "/d/b", "/d/c"]
            .iter()
            .map(|p| gpb::FileInfo {
                path: (*p).into(),
                ..Default::default()
            })
            .collect();
        let (p1, n1) = plan_page(&e, 2, None);
        assert_eq!(p1.len(), 2);
        assert_eq!(n1.as_deref(), Some("/d/b"));
        let (p2, n2) = plan_page(&e, 2, n1.as_deref());
        assert_eq!(p2[0].path, "/d/c");
        assert_eq!(n2, None);
        assert_eq!(plan_page(&e, 0, None).0.len(), 3);
    }

    #[test]
    fn file_info_json() {
        let v = build_file_info(
            &gpb::FileInfo {
                path: "/a".into(),
                r#type: gpb::FileType::Directory as i32,
                mode: 0o40755,
                modified_unix_nanos: 1_500_000_000,
                ..Default::default()
            },
            Some("ab"),
        );
        assert_eq!(v["isDir"], true);
        assert_eq!(v["mode"], 0o755);
        assert_eq!(v["mtimeUnix"], 1);
        assert_eq!(v["sha256"], "ab");
        assert_eq!(
            chunks_of(Bytes::from(vec![0u8; MAX_CHUNK * 2 + 1])).count(),
            3
        );
    }
}
