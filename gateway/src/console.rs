//! `capsules/console`: the capsule's serial console log as text, its tail
//! (`tailLines`) and with `follow=true` what the guest prints next, from
//! the node agent's `ReadConsole` (the node keeps the log bounded).

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;

use crate::query::{flag, form_decode};
use crate::reply::{self, BodyError, Reply};
use crate::route::{Reason, Refusal, plan_agent_refusal};

/// What a console request asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Last lines (0 = all the node keeps).
    pub tail_lines: u32,
    /// Keep the stream open for new output.
    pub follow: bool,
}

/// Parses the query (pure), as `pods/log` names its parameters.
pub fn parse_options(query: &str) -> Result<ConsoleOptions, Refusal> {
    let bad = |m: String| Refusal::new(Reason::BadRequest, m);
    let mut o = ConsoleOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        match k.as_str() {
            "tailLines" => {
                o.tail_lines = v
                    .parse()
                    .map_err(|_| bad(format!("tailLines={v:?} is not a count of lines")))?;
            }
            "follow" => {
                o.follow = flag(&k, &v)?;
            }
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok(o)
}

/// The console of capsule `uid` (named `capsule`) as a stream of chunks.
pub async fn open(
    channel: Channel,
    capsule: &str,
    uid: &str,
    o: ConsoleOptions,
) -> Result<impl Stream<Item = Result<Bytes, BodyError>> + Send + 'static, Refusal> {
    let s = NodeAgentClient::new(channel)
        .read_console(pb::ReadConsoleRequest {
            uid: uid.to_string(),
            tail_lines: o.tail_lines,
            follow: o.follow,
        })
        .await
        .map_err(|s| plan_agent_refusal(capsule, &s))?
        .into_inner();
    Ok(s.map(|c| {
        c.map(|c| Bytes::from(c.data))
            .map_err(|st| BodyError(st.message().to_string()))
    }))
}

/// Streams the console of capsule `uid` (named `capsule`) as a plain HTTP
/// body (cut by the API server's `--request-timeout`; a WebSocket is not,
/// see [`crate::transfer`]).
pub async fn serve(
    channel: Channel,
    capsule: &str,
    uid: &str,
    o: ConsoleOptions,
) -> Result<Reply, Refusal> {
    let chunks = open(channel, capsule, uid, o).await?;
    Ok(reply::stream("text/plain; charset=utf-8", None, chunks))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn options_like_pods_log() {
        assert_eq!(
            parse_options("tailLines=20&follow=true").unwrap(),
            ConsoleOptions {
                tail_lines: 20,
                follow: true
            }
        );
        assert_eq!(parse_options("").unwrap(), ConsoleOptions::default());
        assert!(parse_options("tailLines=-1").is_err());
        assert!(parse_options("since=1h").is_err());
    }
}
