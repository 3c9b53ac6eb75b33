//! The Kubernetes WebSocket channel protocol (`v5.channel.k8s.io`) as a
//! client speaks it (pure): each binary message starts with its channel,
//! stdin 0, stdout 1, stderr 2, error 3 (one `Status` at the end), resize
//! 4, and close 255 (`[255, 0]` ends the command's stdin). The socket
//! itself is the exec session's.

use serde_json::Value;
use wrenn_gateway::channel::exit_code_of;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// A message carrying `data` for the command's stdin.
pub fn build_stdin(data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(STDIN);
    m.extend_from_slice(data);
    m
}

/// The message that closes the command's stdin (v5 only).
pub fn build_close_stdin() -> Vec<u8> {
    vec![CLOSE, STDIN]
}

/// The message that sets the terminal to `cols` x `rows`.
pub fn build_resize(cols: u16, rows: u16) -> Vec<u8> {
    let mut m = vec![RESIZE];
    m.extend_from_slice(
        serde_json::json!({ "Width": cols, "Height": rows })
            .to_string()
            .as_bytes(),
    );
    m
}

/// What a server message carries.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerFrame<'a> {
    /// Bytes of the command's stdout (or its terminal).
    Stdout(&'a [u8]),
    /// Bytes of its stderr.
    Stderr(&'a [u8]),
    /// How it ended: a `Status` object.
    Status(&'a [u8]),
    /// Anything else (empty, unknown channel).
    Ignore,
}

/// Decodes one binary server message.
pub fn parse_server(data: &[u8]) -> ServerFrame<'_> {
    match data.split_first() {
        Some((&STDOUT, rest)) => ServerFrame::Stdout(rest),
        Some((&STDERR, rest)) => ServerFrame::Stderr(rest),
        Some((&ERROR, rest)) => ServerFrame::Status(rest),
        _ => ServerFrame::Ignore,
    }
}

/// The plugin's exit code for the final `Status`: the command's own code
/// (`Success` is 0), or `Err` with the message of any other failure. A
/// code a process cannot exit with is 1, so it never reads as success.
pub fn plan_exit(status: &Value) -> Result<u8, String> {
    match exit_code_of(status) {
        Some(code) => Ok(u8::try_from(code).unwrap_or(1)),
        None => Err(status["message"]
            .as_str()
            .filter(|m| !m.is_empty())
            .unwrap_or("the command failed without a message")
            .to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;
    use wrenn_gateway::channel::{ClientFrame, Protocol, build_exit_status, parse_frame};
    use wrenn_proto::guest::v1 as gpb;

    // The gateway's own parser reads what we send.
    #[test]
    fn the_gateway_reads_our_stdin_close_and_resize_messages() {
        assert_eq!(
            parse_frame(Protocol::V5, &build_stdin(b"hi\n")).unwrap(),
            ClientFrame::Stdin(b"hi\n".to_vec())
        );
        assert_eq!(
            parse_frame(Protocol::V5, &build_close_stdin()).unwrap(),
            ClientFrame::CloseStdin
        );
        assert_eq!(
            parse_frame(Protocol::V5, &build_resize(132, 43)).unwrap(),
            ClientFrame::Resize {
                rows: 43,
                cols: 132
            }
        );
    }

    #[test]
    fn server_messages_are_split_by_channel() {
        assert_eq!(parse_server(b"\x01out"), ServerFrame::Stdout(b"out"));
        assert_eq!(parse_server(b"\x02err"), ServerFrame::Stderr(b"err"));
        assert_eq!(parse_server(b"\x03{}"), ServerFrame::Status(b"{}"));
        assert_eq!(parse_server(b""), ServerFrame::Ignore);
        assert_eq!(parse_server(b"\x04x"), ServerFrame::Ignore);
    }

    #[test]
    fn the_exit_code_is_the_commands_own() {
        let exit = |code, signal| {
            build_exit_status(
                &["sh".into()],
                &gpb::ExecExit {
                    code,
                    signal,
                    ..Default::default()
                },
            )
        };
        assert_eq!(plan_exit(&exit(Some(0), None)), Ok(0));
        assert_eq!(plan_exit(&exit(Some(3), None)), Ok(3));
        // Killed by SIGKILL, as a shell reports it.
        assert_eq!(plan_exit(&exit(None, Some(9))), Ok(137));
        assert_eq!(plan_exit(&exit(Some(300), None)), Ok(1));
    }

    #[test]
    fn a_failure_without_an_exit_code_is_its_message() {
        let s = json!({ "status": "Failure", "reason": "InternalError", "message": "the guest agent went away" });
        assert_eq!(plan_exit(&s), Err("the guest agent went away".into()));
        assert!(plan_exit(&json!({})).is_err());
    }
}
