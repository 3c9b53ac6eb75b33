//! The Kubernetes WebSocket channel protocol (`v5.channel.k8s.io`, also
//! `v4`) as exec, attach and the long transfers speak it: the channel
//! numbers, the version a client offers, its frames, and the `Status` the
//! error channel ends with (pure). Which agent stream sits behind the
//! socket is left to `exec` and `transfer`.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use wrenn_proto::guest::v1 as gpb;

use crate::route::{Reason, Refusal};

/// The WebSocket a session runs on, once the upgrade is answered.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Channel numbers: the first byte of every binary message.
pub mod number {
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
        number::STDIN if rest.is_empty() => Ok(ClientFrame::Ignore),
        number::STDIN => Ok(ClientFrame::Stdin(rest.to_vec())),
        number::RESIZE => {
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
        number::CLOSE if protocol == Protocol::V5 => Ok(match rest.first() {
            Some(&number::STDIN) => ClientFrame::CloseStdin,
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

/// The WebSocket limits: no message larger than [`MAX_CLIENT_MESSAGE`].
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// A binary message on channel `ch`.
pub fn framed(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::binary(v)
}

/// Ends a stream as the kubelet does: the final `Status` on the error
/// channel, then a close. A client already gone is no error here.
pub async fn send_final_status<S>(sink: &mut S, status: &Value)
where
    S: futures::Sink<Message> + Unpin,
{
    use futures::SinkExt as _;
    let _ = sink
        .send(framed(number::ERROR, status.to_string().as_bytes()))
        .await;
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.flush().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
