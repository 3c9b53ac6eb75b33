//! One long transfer with the gateway (`files`, `console` or a process's
//! `logs`) as a WebSocket through the API server: the form the API
//! server's request timeout does not cut (`docs/gateway-api.md`, "Long
//! transfers"). Data
//! comes on stdout (1), an upload goes on stdin (0) and ends with close
//! (`[255, 0]`), and the last message is a `Status` on the error channel
//! (3). Short requests (stat, mkdir) are plain HTTP ([`request_json`]).

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use kube::client::Connection;
use serde_json::Value;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::channel::{self, ServerFrame};
use crate::cluster::Target;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be built (a name no URL can carry).
    #[error("build the request for capsule {capsule:?}")]
    Request {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The API server, the gateway or the guest refused, in their words
    /// (a missing path reads as the guest's error).
    #[error("{message} ({code})")]
    Refused {
        /// HTTP status (or the final `Status`'s code).
        code: u16,
        /// The message.
        message: String,
    },
    /// RBAC refused, in the API server's words.
    #[error("{0}")]
    Forbidden(String),
    /// The request got no answer (network, TLS, authentication plugin).
    #[error("reach the API server")]
    Transport(#[source] kube::Error),
    /// The WebSocket broke.
    #[error("the stream from capsule {capsule:?} broke")]
    Broken {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
    /// The stream ended before its final status.
    #[error("the stream from capsule {capsule:?} ended before its final status")]
    NoStatus {
        /// The capsule.
        capsule: String,
    },
}

/// The path of `sub` of `capsule` with `query` (already encoded).
pub fn build_path(namespace: &str, capsule: &str, sub: &str, query: &str) -> String {
    format!(
        "/apis/{}/{}/namespaces/{namespace}/{}/{capsule}/{sub}?{query}",
        wrenn_gateway::GROUP,
        wrenn_gateway::VERSION,
        wrenn_gateway::RESOURCE
    )
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A refusal as the user reads it (pure): RBAC in the API server's
/// words, anything else with the gateway's message and code.
fn refusal(err: kube::Error) -> Error {
    match err {
        kube::Error::Api(s) if s.code == 403 => Error::Forbidden(s.message),
        kube::Error::Api(s) => Error::Refused {
            code: s.code,
            message: s.message,
        },
        other => Error::Transport(other),
    }
}

/// The outcome a final `Status` reports (pure).
pub fn plan_status(status: &Value) -> Result<(), Error> {
    if status["status"] == "Success" {
        return Ok(());
    }
    Err(Error::Refused {
        code: status["code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(500),
        message: status["message"]
            .as_str()
            .unwrap_or("the transfer failed without a message")
            .to_string(),
    })
}

/// A short plain-HTTP request answered with JSON (stat, mkdir).
pub async fn request_json(
    target: &Target,
    capsule: &str,
    method: http::Method,
    sub: &str,
    query: &str,
) -> Result<Value, Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(build_path(&target.namespace, capsule, sub, query))
        .body(Vec::new())
        .map_err(|source| Error::Request {
            capsule: capsule.to_string(),
            source,
        })?;
    target.client.request(req).await.map_err(refusal)
}

type Ws = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// An open transfer.
pub struct Session {
    capsule: String,
    sink: SplitSink<Ws, Message>,
    source: SplitStream<Ws>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("capsule", &self.capsule)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens `sub` of `capsule` with `query` as a WebSocket.
    pub async fn open(
        target: &Target,
        capsule: &str,
        sub: &str,
        query: &str,
    ) -> Result<Session, Error> {
        let req = http::Request::get(build_path(&target.namespace, capsule, sub, query))
            .body(Vec::new())
            .map_err(|source| Error::Request {
                capsule: capsule.to_string(),
                source,
            })?;
        let conn: Connection = target.client.connect(req).await.map_err(refusal)?;
        let (sink, source) = conn.into_stream().split();
        Ok(Session {
            capsule: capsule.to_string(),
            sink,
            source,
        })
    }

    fn broken(&self, source: tokio_tungstenite::tungstenite::Error) -> Error {
        Error::Broken {
            capsule: self.capsule.clone(),
            source,
        }
    }

    /// Sends `data` for the upload.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        let m = Message::binary(channel::build_stdin(data));
        self.sink.send(m).await.map_err(|e| self.broken(e))
    }

    /// Ends the upload.
    pub async fn finish(&mut self) -> Result<(), Error> {
        let m = Message::binary(channel::build_close_stdin());
        self.sink.send(m).await.map_err(|e| self.broken(e))
    }

    /// The next data the server sends; `None` after the final status said
    /// the transfer worked, `Err` when it failed or the stream broke.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, Error> {
        while let Some(msg) = self.source.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(_) => continue,
                Err(e) => return Err(self.broken(e)),
            };
            match channel::parse_server(&data) {
                ServerFrame::Stdout([]) => {}
                ServerFrame::Stdout(_) => return Ok(Some(data.slice(1..))),
                ServerFrame::Status(s) => {
                    let status: Value = serde_json::from_slice(s).unwrap_or_default();
                    return plan_status(&status).map(|()| None);
                }
                ServerFrame::Stderr(_) | ServerFrame::Ignore => {}
            }
        }
        Err(Error::NoStatus {
            capsule: self.capsule.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_and_queries_are_the_gateways() {
        assert_eq!(
            build_path(
                "a",
                "box",
                "files",
                &format!("path={}", encode("/tmp/a b&c"))
            ),
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/box/files?path=/tmp/a%20b%26c"
        );
    }

    #[test]
    fn the_final_status_decides() {
        assert!(plan_status(&json!({ "status": "Success" })).is_ok());
        let e = plan_status(&json!({ "status": "Failure", "code": 404, "message": "capsule \"box\": no such file" })).unwrap_err();
        assert_eq!(e.to_string(), "capsule \"box\": no such file (404)");
        assert!(plan_status(&json!({})).is_err());
    }
}
