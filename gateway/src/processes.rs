//! `capsules/processes`: detached processes in the capsule, as plain HTTP
//! requests bridged to the node agent's process RPCs (which forward to the
//! guest agent, the owner of the processes and their output rings):
//! `POST` starts one (the command and its options in the query, as
//! `capsules/exec` takes them, plus `tag`), `GET` lists them, `POST
//! op=signal` signals one, `GET op=logs` streams its kept output (and with
//! `follow=true` what comes next; as a WebSocket, see `transfer`, a follow
//! outlives the API server's request timeout). The contract is
//! `docs/gateway-api.md`.
//!
//! What a request asks is parsed apart from the I/O ([`parse_request`],
//! [`build_process`]).

use std::collections::HashMap;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::query::{flag, form_decode, form_encode};
use crate::reply::{self, BodyError, Reply};
use crate::route::{Reason, Refusal, Subresource, plan_agent_refusal};

/// The response header of `op=logs` saying how many bytes of the
/// process's output its ring dropped before what the body holds.
pub const DROPPED_HEADER: &str = "x-wrenn-dropped-bytes";

/// What a processes request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessOp {
    /// GET: every process the guest keeps.
    List,
    /// POST: start a detached process.
    Start {
        /// Tag (may be empty).
        tag: String,
        /// Command and arguments.
        command: Vec<String>,
        /// Environment.
        env: HashMap<String, String>,
        /// Working directory.
        working_dir: String,
        /// User name or uid.
        user: String,
    },
    /// POST op=signal.
    Signal {
        /// Which process.
        process: gpb::ProcessRef,
        /// Signal number.
        signal: i32,
    },
    /// GET op=logs.
    Logs {
        /// Which process.
        process: gpb::ProcessRef,
        /// Keep the stream open until the process exits.
        follow: bool,
    },
}

fn bad(m: impl Into<String>) -> Refusal {
    Refusal::new(Reason::BadRequest, m)
}

/// A signal by name (`TERM`, `SIGTERM`, any case) or number (pure).
pub fn parse_signal(s: &str) -> Result<i32, Refusal> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad(format!("signal {n} is not between 1 and 64")))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => return Err(bad(format!("signal {s:?} is not a number or a known name"))),
    })
}

/// Which process the query names (`pid=N` or `tag=T`; exactly one).
fn process_ref(
    q: &mut std::collections::BTreeMap<String, String>,
) -> Result<gpb::ProcessRef, Refusal> {
    match (q.remove("pid"), q.remove("tag")) {
        (Some(p), None) => Ok(gpb::ProcessRef {
            pid: p
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("pid {p:?} is not a process id")))?,
            tag: String::new(),
        }),
        (None, Some(t)) if !t.is_empty() => Ok(gpb::ProcessRef { pid: 0, tag: t }),
        _ => Err(bad("name the process with pid=N or tag=T (one of them)")),
    }
}

/// What the client reads on stderr when the ring dropped output (pure).
pub fn build_dropped_notice(bytes: u64) -> String {
    format!(
        "wrenn: {bytes} bytes of earlier output were dropped (the capsule keeps the newest only)\n"
    )
}

/// The operation a request asks for (pure).
pub fn parse_request(method: &Method, query: &str) -> Result<ProcessOp, Refusal> {
    let mut q = std::collections::BTreeMap::new();
    let mut command = Vec::new();
    let mut env = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        match k.as_str() {
            "command" => command.push(v),
            "env" => {
                let (name, value) = v
                    .split_once('=')
                    .filter(|(n, _)| !n.is_empty())
                    .ok_or_else(|| bad(format!("env {v:?} is not NAME=VALUE")))?;
                env.insert(name.to_string(), value.to_string());
            }
            _ => {
                if q.insert(k.clone(), v).is_some() {
                    return Err(bad(format!("query parameter {k:?} is given twice")));
                }
            }
        }
    }
    let op = q.remove("op");
    let parsed = match (method.clone(), op.as_deref()) {
        (Method::GET, None) => ProcessOp::List,
        (Method::POST, None) => {
            if command.is_empty() {
                return Err(bad(
                    "a command is required (query parameter command, repeated)",
                ));
            }
            ProcessOp::Start {
                tag: q.remove("tag").unwrap_or_default(),
                command: std::mem::take(&mut command),
                env: std::mem::take(&mut env),
                working_dir: q.remove("workingDir").unwrap_or_default(),
                user: q.remove("user").unwrap_or_default(),
            }
        }
        (Method::POST, Some("signal")) => {
            let process = process_ref(&mut q)?;
            let signal = parse_signal(&q.remove("signal").unwrap_or_else(|| "TERM".into()))?;
            ProcessOp::Signal { process, signal }
        }
        (Method::GET, Some("logs")) => {
            let process = process_ref(&mut q)?;
            let follow = q
                .remove("follow")
                .map(|v| flag("follow", &v))
                .transpose()?
                .unwrap_or(false);
            ProcessOp::Logs { process, follow }
        }
        (m, op) => {
            return Err(Refusal::new(
                Reason::MethodNotAllowed,
                format!(
                    "processes does not take {m} with op={}; see docs/gateway-api.md",
                    op.unwrap_or("(none)")
                ),
            ));
        }
    };
    if !command.is_empty() || !env.is_empty() {
        return Err(bad(
            "command and env are only taken when starting a process",
        ));
    }
    if let Some(k) = q.keys().next() {
        return Err(bad(format!("unknown query parameter {k:?}")));
    }
    Ok(parsed)
}

fn rfc3339(unix_nanos: i64) -> Option<String> {
    (unix_nanos > 0)
        .then(|| k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(unix_nanos)).ok())
        .flatten()
        .map(|t| t.to_string())
}

/// The JSON a client reads for `p` (pure).
pub fn build_process(p: &gpb::ProcessInfo) -> Value {
    let mut v = json!({
        "pid": p.pid,
        "tag": p.tag,
        "command": p.argv,
        "startedAt": rfc3339(p.started_unix_nanos),
        "state": if p.running { "Running" } else { "Exited" },
        "outputBytes": p.output_bytes,
        "droppedBytes": p.dropped_bytes,
    });
    if let Some(e) = &p.exit {
        if let Some(c) = e.code {
            v["exitCode"] = json!(c);
        }
        if let Some(s) = e.signal {
            v["signal"] = json!(s);
        }
        v["exitedAt"] = json!(rfc3339(p.exited_unix_nanos));
    }
    v
}

/// The path and query of a request to capsule `capsule`'s `sub` with
/// `query` pairs (pure): what a client sends, and what [`parse_request`]
/// or `attach::parse_options` read back.
pub fn build_path(
    namespace: &str,
    capsule: &str,
    sub: Subresource,
    query: &[(&str, &str)],
) -> String {
    let q: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect();
    format!(
        "/apis/{}/{}/namespaces/{}/{}/{}/{}?{}",
        crate::GROUP,
        crate::VERSION,
        form_encode(namespace),
        crate::RESOURCE,
        form_encode(capsule),
        sub.as_str(),
        q.join("&")
    )
}

/// An agent refusal of a process call (pure). The capsule was found (the
/// call reached its agent), so a NOT_FOUND is about the process: the
/// refusal names no capsule, and its message names the pid or tag.
pub fn plan_process_refusal(capsule: &str, status: &tonic::Status) -> Refusal {
    let mut r = plan_agent_refusal(capsule, status);
    if r.reason == Reason::NotFound {
        r.capsule = None;
    }
    r
}

/// The kept output of `process` in capsule `uid` (stdout and stderr as
/// they came), and with `follow` what comes next until it exits; first the
/// count of bytes its ring dropped before that output.
pub async fn open_logs(
    mut agent: NodeAgentClient<Channel>,
    capsule: &str,
    uid: String,
    process: gpb::ProcessRef,
    follow: bool,
) -> Result<
    (
        u64,
        impl Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
    ),
    Refusal,
> {
    use gpb::process_output::Output as O;
    let refused = |s: tonic::Status| plan_process_refusal(capsule, &s);
    let mut s = agent
        .attach_process(pb::AttachProcessRequest {
            uid,
            request: Some(gpb::AttachProcessRequest {
                process: Some(process),
                follow,
            }),
        })
        .await
        .map_err(refused)?
        .into_inner();
    // The guest says first how much was dropped.
    let dropped = match s.message().await.map_err(refused)? {
        Some(gpb::ProcessOutput {
            output: Some(O::Dropped(n)),
        }) => n,
        _ => 0,
    };
    let chunks = s.filter_map(|m| async move {
        match m {
            Ok(gpb::ProcessOutput {
                output: Some(O::Stdout(b) | O::Stderr(b)),
            }) => Some(Ok(Bytes::from(b))),
            Ok(_) => None,
            Err(st) => Some(Err(BodyError(st.message().to_string()))),
        }
    });
    Ok((dropped, chunks))
}

/// Serves `op` on capsule `uid` (named `capsule`).
pub async fn serve(
    channel: Channel,
    capsule: &str,
    uid: &str,
    op: ProcessOp,
) -> Result<Reply, Refusal> {
    let mut agent = NodeAgentClient::new(channel);
    let refused = |s: tonic::Status| plan_process_refusal(capsule, &s);
    let uid = uid.to_string();
    match op {
        ProcessOp::List => {
            let list = agent
                .list_processes(pb::CapsuleRef { uid })
                .await
                .map_err(refused)?
                .into_inner();
            let items: Vec<Value> = list.processes.iter().map(build_process).collect();
            Ok(reply::json(
                StatusCode::OK,
                &json!({ "kind": "ProcessList", "apiVersion": format!("{}/{}", crate::GROUP, crate::VERSION), "items": items }),
            ))
        }
        ProcessOp::Start {
            tag,
            command,
            env,
            working_dir,
            user,
        } => {
            let p = agent
                .start_process(pb::StartProcessRequest {
                    uid,
                    request: Some(gpb::StartProcessRequest {
                        tag,
                        argv: command,
                        env,
                        cwd: working_dir,
                        user,
                    }),
                })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(reply::json(StatusCode::CREATED, &build_process(&p)))
        }
        ProcessOp::Signal { process, signal } => {
            let p = agent
                .signal_process(pb::SignalProcessRequest {
                    uid,
                    request: Some(gpb::SignalProcessRequest {
                        process: Some(process),
                        signal,
                    }),
                })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(reply::json(StatusCode::OK, &build_process(&p)))
        }
        ProcessOp::Logs { process, follow } => {
            let (dropped, chunks) = open_logs(agent, capsule, uid, process, follow).await?;
            // The count as a header, so the body is the output alone.
            let mut r = reply::stream("text/plain; charset=utf-8", None, chunks);
            r.headers_mut().insert(
                HeaderName::from_static(DROPPED_HEADER),
                HeaderValue::from(dropped),
            );
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_parse_like_the_contract() {
        assert_eq!(parse_request(&Method::GET, "").unwrap(), ProcessOp::List);
        let start = parse_request(
            &Method::POST,
            "tag=web&command=sh&command=-c&command=echo+hi&env=A%3D1&workingDir=/tmp",
        )
        .unwrap();
        let ProcessOp::Start {
            tag,
            command,
            env,
            working_dir,
            ..
        } = start
        else {
            panic!("{start:?}")
        };
        assert_eq!((tag.as_str(), working_dir.as_str()), ("web", "/tmp"));
        assert_eq!(command, vec!["sh", "-c", "echo hi"]);
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            parse_request(&Method::POST, "op=signal&tag=web&signal=KILL").unwrap(),
            ProcessOp::Signal {
                process: gpb::ProcessRef {
                    pid: 0,
                    tag: "web".into()
                },
                signal: 9
            }
        );
        assert_eq!(
            parse_request(&Method::GET, "op=logs&pid=42&follow=true").unwrap(),
            ProcessOp::Logs {
                process: gpb::ProcessRef {
                    pid: 42,
                    tag: String::new()
                },
                follow: true
            }
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (m, q) in [
            (Method::POST, "tag=x"),
            (Method::POST, "op=signal"),
            (Method::POST, "op=signal&tag=a&pid=1"),
            (Method::POST, "op=signal&tag=a&signal=BOGUS"),
            (Method::POST, "op=signal&pid=0"),
            (Method::GET, "op=logs&tag=a&follow=maybe"),
            (Method::GET, "tag=a&tag=b"),
            (Method::GET, "op=logs&tag=a&command=ls"),
            (Method::GET, "colour=red"),
        ] {
            assert_eq!(
                parse_request(&m, q).unwrap_err().reason,
                Reason::BadRequest,
                "{m} {q}"
            );
        }
        assert_eq!(
            parse_request(&Method::PUT, "").unwrap_err().reason,
            Reason::MethodNotAllowed
        );
    }

    #[test]
    fn a_built_path_parses_back() {
        let path = build_path(
            "ns",
            "web",
            Subresource::Processes,
            &[("op", "signal"), ("tag", "a b&c"), ("signal", "TERM")],
        );
        let (p, q) = path.split_once('?').unwrap();
        assert_eq!(
            p,
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/ns/capsules/web/processes"
        );
        assert_eq!(
            parse_request(&Method::POST, q).unwrap(),
            ProcessOp::Signal {
                process: gpb::ProcessRef {
                    pid: 0,
                    tag: "a b&c".into()
                },
                signal: 15
            }
        );
    }

    #[test]
    fn an_unknown_process_is_a_404_about_the_process() {
        let r = plan_process_refusal("web", &tonic::Status::not_found("no process tagged \"x\""));
        assert_eq!(r.reason, Reason::NotFound);
        assert!(r.capsule.is_none());
        assert!(r.message.contains("\"x\""), "{}", r.message);
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn a_process_as_json() {
        let p = gpb::ProcessInfo {
            pid: 7,
            tag: "job".into(),
            argv: vec!["sleep".into(), "9".into()],
            started_unix_nanos: 1_700_000_000_000_000_000,
            running: false,
            exit: Some(gpb::ExecExit {
                code: None,
                signal: Some(15),
                timed_out: false,
            }),
            output_bytes: 10,
            dropped_bytes: 2,
            exited_unix_nanos: 1_700_000_001_000_000_000,
        };
        let v = build_process(&p);
        assert_eq!(v["state"], "Exited");
        assert_eq!(v["signal"], 15);
        assert!(v.get("exitCode").is_none());
        assert_eq!(v["startedAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v["command"][1], "9");
    }
    #[test]
    fn the_dropped_notice_names_the_bytes() {
        assert!(build_dropped_notice(4000).contains("4000 bytes"));
    }
}
