//! `capsules/exec`: the Kubernetes WebSocket channel protocol
//! (`v5.channel.k8s.io`, also `v4`; see `channel`) bridged to the node
//! agent's `Exec` (or, with `tty=true`, `Pty`) stream, and `attach`'s
//! replay of a detached process, so kubectl and client-go behave as with
//! `pods/exec`. Each binary message starts with its channel: stdin 0,
//! stdout 1, stderr 2, error 3 (one `Status` at the end, carrying a
//! non-zero exit code as `NonZeroExitCode` with an `ExitCode` cause, as the
//! kubelet does), resize 4, and in v5 close 255 (`[255, 0]` closes stdin,
//! which reaches the process as end of input).
//!
//! The agent stream is opened before the upgrade is answered, so a capsule
//! the agent cannot serve is refused with an HTTP status, not a stream
//! that ends at once. A client that goes away drops the agent stream,
//! which ends the command in the guest.

use std::collections::HashMap;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::Streaming;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::channel::{
    ClientFrame, Socket, build_exit_status, build_failure_status, framed, number, parse_frame,
    send_final_status,
};
use crate::locate::Target;
use crate::query::{flag, form_decode, form_encode};
use crate::route::{Reason, Refusal, plan_agent_refusal};

// The upgrade in `server` names these through `exec`.
pub use crate::channel::{Protocol, plan_protocol, plan_protocol_for, websocket_config};

/// Input messages queued towards the agent before the client is slowed.
const INPUT_QUEUE: usize = 16;

/// What the query asks for, as `pods/exec` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Command and arguments (`command`, repeated).
    pub command: Vec<String>,
    /// Attach stdin.
    pub stdin: bool,
    /// Attach stdout (default true).
    pub stdout: bool,
    /// Attach stderr (default true; with a TTY stderr is the terminal).
    pub stderr: bool,
    /// Run on a terminal.
    pub tty: bool,
    /// Environment (`env=NAME=VALUE`, repeated).
    pub env: HashMap<String, String>,
    /// Working directory (`workingDir`).
    pub working_dir: String,
    /// User name or uid (`user`).
    pub user: String,
}

/// Parses the query of an exec request (pure).
pub fn parse_options(query: &str) -> Result<ExecOptions, Refusal> {
    let bad = |m: String| Refusal::new(Reason::BadRequest, m);
    let mut o = ExecOptions {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        let set = |v: &str| flag(&k, v);
        match k.as_str() {
            "command" => o.command.push(v),
            "stdin" => o.stdin = set(&v)?,
            "stdout" => o.stdout = set(&v)?,
            "stderr" => o.stderr = set(&v)?,
            "tty" => o.tty = set(&v)?,
            "env" => {
                let (name, value) = v
                    .split_once('=')
                    .filter(|(n, _)| !n.is_empty())
                    .ok_or_else(|| bad(format!("env {v:?} is not NAME=VALUE")))?;
                o.env.insert(name.to_string(), value.to_string());
            }
            "workingDir" => o.working_dir = v,
            "user" => o.user = v,
            // kubectl sends the container's name; a capsule has one.
            "container" => {}
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    if o.command.is_empty() {
        return Err(bad(
            "a command is required (query parameter command, repeated)".into(),
        ));
    }
    if !(o.stdin || o.stdout || o.stderr) {
        return Err(bad(
            "you must attach at least one of stdin, stdout, stderr".into()
        ));
    }
    if o.tty {
        // The terminal merges both outputs.
        o.stderr = false;
    }
    Ok(o)
}

/// The path and query of an exec request for `options` (pure): what a
/// client sends, and what [`parse_options`] reads back.
pub fn build_request_path(namespace: &str, capsule: &str, o: &ExecOptions) -> String {
    let mut q: Vec<String> = o
        .command
        .iter()
        .map(|c| format!("command={}", form_encode(c)))
        .collect();
    q.push(format!(
        "stdin={}&stdout={}&stderr={}&tty={}",
        o.stdin, o.stdout, o.stderr, o.tty
    ));
    let mut env: Vec<_> = o.env.iter().collect();
    env.sort();
    q.extend(
        env.into_iter()
            .map(|(k, v)| format!("env={}", form_encode(&format!("{k}={v}")))),
    );
    if !o.working_dir.is_empty() {
        q.push(format!("workingDir={}", form_encode(&o.working_dir)));
    }
    if !o.user.is_empty() {
        q.push(format!("user={}", form_encode(&o.user)));
    }
    format!(
        "/apis/{}/{}/namespaces/{}/{}/{}/exec?{}",
        crate::GROUP,
        crate::VERSION,
        form_encode(namespace),
        crate::RESOURCE,
        form_encode(capsule),
        q.join("&")
    )
}

/// Input towards the agent, whichever stream it is.
enum Input {
    Exec(mpsc::Sender<pb::ExecInput>),
    Pty(mpsc::Sender<pb::PtyInput>),
    /// An attach to a detached process, which reads no stdin.
    Nothing,
}

/// Output from the agent, whichever stream it is.
enum Output {
    Exec(Streaming<gpb::ExecOutput>),
    Pty(Streaming<gpb::PtyOutput>),
    Attach(Streaming<gpb::ProcessOutput>),
}

enum Out {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(gpb::ExecExit),
    Nothing,
}

impl Output {
    async fn next(&mut self) -> Result<Option<Out>, tonic::Status> {
        use gpb::exec_output::Output as E;
        use gpb::pty_output::Output as P;
        Ok(match self {
            Self::Exec(s) => s.message().await?.map(|m| match m.output {
                Some(E::Stdout(b)) => Out::Stdout(b),
                Some(E::Stderr(b)) => Out::Stderr(b),
                Some(E::Exit(e)) => Out::Exit(e),
                Some(E::StartedPid(_)) | None => Out::Nothing,
            }),
            Self::Pty(s) => s.message().await?.map(|m| match m.output {
                Some(P::Data(b)) => Out::Stdout(b),
                Some(P::Exit(e)) => Out::Exit(e),
                Some(P::StartedPid(_)) | None => Out::Nothing,
            }),
            Self::Attach(s) => s.message().await?.map(|m| {
                use gpb::process_output::Output as A;
                match m.output {
                    Some(A::Stdout(b)) => Out::Stdout(b),
                    Some(A::Stderr(b)) => Out::Stderr(b),
                    Some(A::Exit(e)) => Out::Exit(e),
                    // The client is told on stderr, apart from the output.
                    Some(A::Dropped(n)) if n > 0 => {
                        Out::Stderr(crate::processes::build_dropped_notice(n).into_bytes())
                    }
                    Some(A::Dropped(_)) | None => Out::Nothing,
                }
            }),
        })
    }
}

impl Input {
    /// Forwards a client frame; `false` once the agent no longer takes input.
    async fn send(&self, frame: ClientFrame) -> bool {
        use gpb::exec_input::Input as E;
        use gpb::pty_input::Input as P;
        let exec = |i| pb::ExecInput {
            uid: String::new(),
            input: Some(gpb::ExecInput { input: Some(i) }),
        };
        let pty = |i| pb::PtyInput {
            uid: String::new(),
            input: Some(gpb::PtyInput { input: Some(i) }),
        };
        match (self, frame) {
            (_, ClientFrame::Ignore) | (Self::Nothing, _) => true,
            (Self::Exec(tx), ClientFrame::Stdin(b)) => tx.send(exec(E::Stdin(b))).await.is_ok(),
            (Self::Exec(tx), ClientFrame::CloseStdin) => {
                tx.send(exec(E::CloseStdin(true))).await.is_ok()
            }
            // A command without a terminal has no size.
            (Self::Exec(_), ClientFrame::Resize { .. }) => true,
            (Self::Pty(tx), ClientFrame::Stdin(b)) => tx.send(pty(P::Data(b))).await.is_ok(),
            // A terminal's end of input is ^D, which the client sends as data.
            (Self::Pty(_), ClientFrame::CloseStdin) => true,
            (Self::Pty(tx), ClientFrame::Resize { rows, cols }) => tx
                .send(pty(P::Resize(gpb::PtySize { rows, cols })))
                .await
                .is_ok(),
        }
    }
}

/// An exec started on the agent, waiting for the client's upgrade.
pub struct Started {
    input: Input,
    output: Output,
    options: ExecOptions,
    protocol: Protocol,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("options", &self.options)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl Started {
    /// A stream of a detached process's output (`capsules/attach`):
    /// no input; `label` names the process in a failure's message.
    pub fn attached(
        output: Streaming<gpb::ProcessOutput>,
        label: String,
        stdout: bool,
        stderr: bool,
        protocol: Protocol,
    ) -> Self {
        Self {
            input: Input::Nothing,
            output: Output::Attach(output),
            options: ExecOptions {
                command: vec![label],
                stdout,
                stderr,
                ..Default::default()
            },
            protocol,
        }
    }
}

/// Starts the command in the capsule `target` through its agent.
pub async fn start(
    channel: Channel,
    capsule: &str,
    target: &Target,
    options: ExecOptions,
    protocol: Protocol,
) -> Result<Started, Refusal> {
    let uid = target.uid.as_str();
    let mut agent = NodeAgentClient::new(channel);
    let refused = |s: tonic::Status| plan_agent_refusal(capsule, &s);
    if options.tty {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let start = pb::PtyInput {
            uid: uid.to_string(),
            input: Some(gpb::PtyInput {
                input: Some(gpb::pty_input::Input::Start(gpb::PtyStart {
                    argv: options.command.clone(),
                    env: options.env.clone(),
                    cwd: options.working_dir.clone(),
                    user: options.user.clone(),
                    size: None,
                })),
            }),
        };
        // The queue is empty: the first message always fits.
        let _ = tx.try_send(start);
        let out = agent
            .pty(ReceiverStream::new(rx))
            .await
            .map_err(refused)?
            .into_inner();
        return Ok(Started {
            input: Input::Pty(tx),
            output: Output::Pty(out),
            options,
            protocol,
        });
    }
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let msg = |i| pb::ExecInput {
        uid: uid.to_string(),
        input: Some(gpb::ExecInput { input: Some(i) }),
    };
    let _ = tx.try_send(msg(gpb::exec_input::Input::Start(gpb::ExecStart {
        argv: options.command.clone(),
        env: options.env.clone(),
        cwd: options.working_dir.clone(),
        user: options.user.clone(),
        ..Default::default()
    })));
    if !options.stdin {
        // Without stdin the process reads end of input at once.
        let _ = tx.try_send(msg(gpb::exec_input::Input::CloseStdin(true)));
    }
    let out = agent
        .exec(ReceiverStream::new(rx))
        .await
        .map_err(refused)?
        .into_inner();
    Ok(Started {
        input: Input::Exec(tx),
        output: Output::Exec(out),
        options,
        protocol,
    })
}

/// Runs the stream until the process ends or the client goes away.
pub async fn bridge(ws: Socket, started: Started) {
    let Started {
        input,
        mut output,
        options,
        protocol,
    } = started;
    let (mut sink, mut source) = ws.split();
    // As the kubelet: an empty message on the lowest writable channel
    // tells the client the stream is up.
    let first = if options.stdout {
        number::STDOUT
    } else if options.stderr {
        number::STDERR
    } else {
        number::ERROR
    };
    if sink.send(framed(first, &[])).await.is_err() {
        return;
    }
    let mut input = Some(input);
    let status = loop {
        tokio::select! {
            msg = source.next() => match msg {
                Some(Ok(Message::Binary(data))) => match parse_frame(protocol, &data) {
                    Ok(frame) => {
                        let frame = match frame {
                            ClientFrame::Stdin(_) | ClientFrame::CloseStdin if !options.stdin => ClientFrame::Ignore,
                            f => f,
                        };
                        if let Some(i) = &input
                            && !i.send(frame).await
                        {
                            // The agent takes no more input; the output
                            // says how the process ended.
                            input = None;
                        }
                    }
                    Err(m) => break build_failure_status(&m),
                },
                Some(Ok(Message::Close(_))) | None => {
                    // The client went away: dropping the agent stream ends the command.
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    // A malformed or oversized frame: the stream ends
                    // (dropping the agent stream ends the command).
                    tracing::debug!(error = &err as &dyn std::error::Error, "exec client stream");
                    return;
                }
            },
            out = output.next() => match out {
                Ok(Some(Out::Stdout(b))) if options.stdout => {
                    if sink.send(framed(number::STDOUT, &b)).await.is_err() { return; }
                }
                Ok(Some(Out::Stderr(b))) if options.stderr => {
                    if sink.send(framed(number::STDERR, &b)).await.is_err() { return; }
                }
                Ok(Some(Out::Exit(e))) => break build_exit_status(&options.command, &e),
                Ok(Some(_)) => {}
                Ok(None) => break build_failure_status("the command's stream ended without an exit status"),
                Err(s) => break build_failure_status(s.message()),
            },
        }
    };
    send_final_status(&mut sink, &status).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn query_like_pods_exec() {
        let o = parse_options("command=sh&command=-c&command=echo%20hi+there&stdin=true&stdout=1&stderr=false&tty=false&container=x").unwrap();
        assert_eq!(o.command, vec!["sh", "-c", "echo hi there"]);
        assert!(o.stdin && o.stdout && !o.stderr && !o.tty);
        let o = parse_options("command=ls").unwrap();
        assert!(!o.stdin && o.stdout && o.stderr);
        let o = parse_options("command=bash&tty=true&stdin=true&stderr=true").unwrap();
        assert!(o.tty && !o.stderr);
        let o = parse_options("command=env&env=A%3D1&workingDir=/tmp&user=nobody").unwrap();
        assert_eq!(o.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            (o.working_dir.as_str(), o.user.as_str()),
            ("/tmp", "nobody")
        );
    }

    #[test]
    fn a_built_path_parses_back() {
        let mut o = ExecOptions {
            command: vec!["sh".into(), "-c".into(), "echo a&b=c %".into()],
            stdin: true,
            stdout: true,
            stderr: true,
            working_dir: "/tmp/x y".into(),
            user: "nobody".into(),
            ..Default::default()
        };
        o.env.insert("A".into(), "1=2".into());
        let path = build_request_path("ns", "web", &o);
        let (p, q) = path.split_once('?').unwrap();
        assert_eq!(
            p,
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/ns/capsules/web/exec"
        );
        assert_eq!(parse_options(q).unwrap(), o);
    }

    #[test]
    fn bad_queries_are_400() {
        for q in [
            "",
            "stdin=true",
            "command=ls&tty=maybe",
            "command=ls&stdout=0&stderr=0",
            "command=ls&shell=1",
            "command=ls&env=novalue",
        ] {
            let e = parse_options(q).unwrap_err();
            assert_eq!(e.reason, Reason::BadRequest, "{q}");
        }
    }
}
