//! `capsules/exec`: the Kubernetes WebSocket channel protocol
//! (`v5.channel.k8s.io`, also `v4`) bridged to the node agent's `Exec`
//! (or, with `tty=true`, `Pty`) stream, so kubectl and client-go behave as
//! with `pods/exec`. Each binary message starts with its channel: stdin 0,
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
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tonic::Streaming;
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::route::{Reason, Refusal};

/// Channel numbers of the protocol.
mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const RESIZE: u8 = 4;
    pub const CLOSE: u8 = 255;
}

/// Largest message a client may send: the agent takes stdin chunks of at
/// most 1 MiB; the channel byte comes on top.
pub const MAX_CLIENT_MESSAGE: usize = (1 << 20) + 1;

/// Input messages queued towards the agent before the client is slowed.
const INPUT_QUEUE: usize = 16;

/// A channel protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `v5.channel.k8s.io`: v4 plus the close channel.
    V5,
    /// `v4.channel.k8s.io`.
    V4,
}

impl Protocol {
    /// Its `Sec-WebSocket-Protocol` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V5 => "v5.channel.k8s.io",
            Self::V4 => "v4.channel.k8s.io",
        }
    }
}

/// The protocol to speak, from the client's `Sec-WebSocket-Protocol`
/// offers (pure): v5 when offered, else v4.
pub fn plan_protocol<'a>(offers: impl IntoIterator<Item = &'a str>) -> Result<Protocol, Refusal> {
    plan_protocol_for("exec", offers)
}

/// [`plan_protocol`] for subresource `what`, named in the refusal.
pub fn plan_protocol_for<'a>(
    what: &str,
    offers: impl IntoIterator<Item = &'a str>,
) -> Result<Protocol, Refusal> {
    let offered: Vec<String> = offers
        .into_iter()
        .flat_map(|h| h.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    for p in [Protocol::V5, Protocol::V4] {
        if offered.iter().any(|o| o == p.as_str()) {
            return Ok(p);
        }
    }
    Err(Refusal::new(
        Reason::BadRequest,
        format!(
            "{what} needs a WebSocket with subprotocol v5.channel.k8s.io or v4.channel.k8s.io; offered: {offered:?}"
        ),
    ))
}

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

fn flag(v: &str) -> Result<bool, String> {
    match v {
        "" | "1" | "true" | "True" | "TRUE" => Ok(true),
        "0" | "false" | "False" | "FALSE" => Ok(false),
        other => Err(other.to_string()),
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
pub(crate) fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let set = |v: &str| {
            flag(v).map_err(|v| bad(format!("query parameter {k}={v:?} is not a boolean")))
        };
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

/// Form-encodes one query value (pure).
pub(crate) fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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

/// The exit code the error channel's `Status` carries (pure): 0 for
/// `Success`, the `ExitCode` cause of `NonZeroExitCode`; `None` for any
/// other failure (its message says what went wrong).
pub fn exit_code_of(status: &Value) -> Option<i32> {
    if status["status"] == "Success" {
        return Some(0);
    }
    if status["reason"] != "NonZeroExitCode" {
        return None;
    }
    status["details"]["causes"]
        .as_array()?
        .iter()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str())
        .and_then(|m| m.parse().ok())
}

/// What a client message asks (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// Close the process's stdin (v5).
    CloseStdin,
    /// Terminal size.
    Resize {
        /// Rows.
        rows: u32,
        /// Columns.
        cols: u32,
    },
    /// Nothing to do (empty message, an unknown channel, a close of
    /// another channel).
    Ignore,
}

/// Decodes one binary client message.
pub fn parse_frame(protocol: Protocol, data: &[u8]) -> Result<ClientFrame, String> {
    let Some((&ch, rest)) = data.split_first() else {
        return Ok(ClientFrame::Ignore);
    };
    match ch {
        channel::STDIN if rest.is_empty() => Ok(ClientFrame::Ignore),
        channel::STDIN => Ok(ClientFrame::Stdin(rest.to_vec())),
        channel::RESIZE => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "PascalCase")]
            struct Size {
                width: u32,
                height: u32,
            }
            let s: Size = serde_json::from_slice(rest).map_err(|e| {
                format!("resize message is not {{\"Width\":..,\"Height\":..}}: {e}")
            })?;
            Ok(ClientFrame::Resize {
                rows: s.height,
                cols: s.width,
            })
        }
        channel::CLOSE if protocol == Protocol::V5 => Ok(match rest.first() {
            Some(&channel::STDIN) => ClientFrame::CloseStdin,
            _ => ClientFrame::Ignore,
        }),
        _ => Ok(ClientFrame::Ignore),
    }
}

/// The error channel's `Status` for how the process ended (pure), worded
/// as the kubelet words it so clients read the exit code the same way.
pub fn build_exit_status(command: &[String], exit: &gpb::ExecExit) -> Value {
    let code = match (exit.code, exit.signal) {
        (Some(c), _) => c,
        // As a shell reports it.
        (None, Some(sig)) => 128 + sig,
        (None, None) if exit.timed_out => 124,
        (None, None) => -1,
    };
    if code == 0 {
        return json!({ "metadata": {}, "status": "Success" });
    }
    let how = match (exit.code, exit.signal) {
        (None, Some(sig)) => format!(" (killed by signal {sig})"),
        _ if exit.timed_out => " (timed out)".to_string(),
        _ => String::new(),
    };
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command {command:?}, exit code {code}{how}"
        ),
        "reason": "NonZeroExitCode",
        "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
    })
}

/// The error channel's `Status` for a stream that failed (pure).
pub fn build_failure_status(message: &str) -> Value {
    json!({ "metadata": {}, "status": "Failure", "message": message, "reason": "InternalError" })
}

/// A refusal from the agent as the user reads it (pure).
pub fn plan_agent_refusal(capsule: &str, status: &tonic::Status) -> Refusal {
    use tonic::Code;
    let reason = match status.code() {
        Code::NotFound => Reason::NotFound,
        Code::FailedPrecondition | Code::AlreadyExists => Reason::Conflict,
        Code::PermissionDenied => Reason::Forbidden,
        // A checksum that does not match what arrived.
        Code::DataLoss => Reason::Invalid,
        Code::ResourceExhausted => Reason::RequestEntityTooLarge,
        Code::InvalidArgument | Code::OutOfRange => Reason::BadRequest,
        Code::Unavailable => Reason::ServiceUnavailable,
        Code::DeadlineExceeded => Reason::Timeout,
        _ => Reason::InternalError,
    };
    Refusal::capsule(
        reason,
        capsule,
        format!("capsule \"{capsule}\": {}", status.message()),
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
                        Out::Stderr(crate::attach::build_dropped_notice(n).into_bytes())
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

/// Starts the command in capsule `uid` through the agent.
pub async fn start(
    channel: Channel,
    capsule: &str,
    uid: &str,
    options: ExecOptions,
    protocol: Protocol,
) -> Result<Started, Refusal> {
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

/// The WebSocket limits for exec.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// A binary message on channel `ch`.
pub(crate) fn framed(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::binary(v)
}

/// Runs the stream until the process ends or the client goes away.
pub async fn bridge(ws: WebSocketStream<TokioIo<Upgraded>>, started: Started) {
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
        channel::STDOUT
    } else if options.stderr {
        channel::STDERR
    } else {
        channel::ERROR
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
                    if sink.send(framed(channel::STDOUT, &b)).await.is_err() { return; }
                }
                Ok(Some(Out::Stderr(b))) if options.stderr => {
                    if sink.send(framed(channel::STDERR, &b)).await.is_err() { return; }
                }
                Ok(Some(Out::Exit(e))) => break build_exit_status(&options.command, &e),
                Ok(Some(_)) => {}
                Ok(None) => break build_failure_status("the command's stream ended without an exit status"),
                Err(s) => break build_failure_status(s.message()),
            },
        }
    };
    let _ = sink
        .send(framed(channel::ERROR, status.to_string().as_bytes()))
        .await;
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.flush().await;
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
    fn exit_codes_read_back() {
        let cmd = vec!["x".to_string()];
        for code in [0, 1, 3, 255] {
            let s = build_exit_status(
                &cmd,
                &gpb::ExecExit {
                    code: Some(code),
                    ..Default::default()
                },
            );
            assert_eq!(exit_code_of(&s), Some(code));
        }
        assert_eq!(exit_code_of(&build_failure_status("boom")), None);
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

    #[test]
    fn v5_is_preferred_and_spdy_only_clients_are_told() {
        assert_eq!(
            plan_protocol(["v4.channel.k8s.io, v5.channel.k8s.io"]).unwrap(),
            Protocol::V5
        );
        assert_eq!(plan_protocol(["v4.channel.k8s.io"]).unwrap(), Protocol::V4);
        let e = plan_protocol(["channel.k8s.io"]).unwrap_err();
        assert!(e.message.contains("v5.channel.k8s.io"), "{}", e.message);
    }

    #[test]
    fn client_frames() {
        assert_eq!(
            parse_frame(Protocol::V5, &[0, b'a']).unwrap(),
            ClientFrame::Stdin(b"a".to_vec())
        );
        assert_eq!(
            parse_frame(Protocol::V5, &[255, 0]).unwrap(),
            ClientFrame::CloseStdin
        );
        assert_eq!(
            parse_frame(Protocol::V4, &[255, 0]).unwrap(),
            ClientFrame::Ignore
        );
        assert_eq!(
            parse_frame(Protocol::V5, b"\x04{\"Width\":80,\"Height\":24}").unwrap(),
            ClientFrame::Resize { rows: 24, cols: 80 }
        );
        assert!(parse_frame(Protocol::V5, b"\x04nonsense").is_err());
        assert_eq!(parse_frame(Protocol::V5, &[]).unwrap(), ClientFrame::Ignore);
    }

    #[test]
    fn exit_status_like_the_kubelet() {
        let cmd = vec!["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        let ok = build_exit_status(
            &cmd,
            &gpb::ExecExit {
                code: Some(0),
                ..Default::default()
            },
        );
        assert_eq!(ok["status"], "Success");
        let s = build_exit_status(
            &cmd,
            &gpb::ExecExit {
                code: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        let k = build_exit_status(
            &cmd,
            &gpb::ExecExit {
                signal: Some(9),
                ..Default::default()
            },
        );
        assert_eq!(k["details"]["causes"][0]["message"], "137");
    }

    #[test]
    fn agent_refusals_map_to_http() {
        let r = plan_agent_refusal(
            "web",
            &tonic::Status::failed_precondition("capsule u is Paused; resume it first"),
        );
        assert_eq!(r.reason, Reason::Conflict);
        assert!(r.message.contains("web") && r.message.contains("Paused"));
        assert_eq!(
            plan_agent_refusal("web", &tonic::Status::not_found("x")).reason,
            Reason::NotFound
        );
    }
}
