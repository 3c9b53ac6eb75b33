//! `capsules/attach`: the output of a detached process (see
//! `capsules/processes`) over the same WebSocket channel protocol as
//! `capsules/exec` (`v5.channel.k8s.io`): what the guest's ring kept since
//! the start, then live output, then the process's exit on the error
//! channel, so a client ends with the process's exit code. Detached
//! processes read `/dev/null`: attach takes no stdin and no TTY, and says
//! so rather than dropping input. Closing the stream detaches; the
//! process runs on.

use tonic::transport::Channel;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::channel::Protocol;
use crate::exec::Started;
use crate::locate::Target;
use crate::processes::plan_process_refusal;
use crate::query::{flag, form_decode};
use crate::route::{Reason, Refusal};

/// What an attach request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// Which process.
    pub process: gpb::ProcessRef,
    /// Send its stdout (default true).
    pub stdout: bool,
    /// Send its stderr (default true).
    pub stderr: bool,
}

impl AttachOptions {
    /// How the process is named in messages.
    fn label(&self) -> String {
        if self.process.tag.is_empty() {
            format!("process {}", self.process.pid)
        } else {
            format!("process {:?}", self.process.tag)
        }
    }
}

/// Parses the query of an attach request (pure).
pub fn parse_options(query: &str) -> Result<AttachOptions, Refusal> {
    let bad = |m: String| Refusal::new(Reason::BadRequest, m);
    let (mut pid, mut tag) = (None, None);
    let mut o = AttachOptions {
        process: gpb::ProcessRef::default(),
        stdout: true,
        stderr: true,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        match k.as_str() {
            "tag" => tag = Some(v),
            "pid" => {
                pid = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad(format!("pid {v:?} is not a process id")))?,
                );
            }
            "stdout" => o.stdout = flag(&k, &v)?,
            "stderr" => o.stderr = flag(&k, &v)?,
            "stdin" if flag(&k, &v)? => {
                return Err(bad(
                    "a detached process reads /dev/null: attach takes no stdin (use exec for input)"
                        .into(),
                ));
            }
            "tty" if flag(&k, &v)? => {
                return Err(bad(
                    "a detached process has no terminal: attach takes no tty".into(),
                ));
            }
            // kubectl sends the container's name; a capsule has one.
            "stdin" | "tty" | "container" => {}
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    o.process = match (pid, tag) {
        (Some(pid), None) => gpb::ProcessRef {
            pid,
            tag: String::new(),
        },
        (None, Some(tag)) if !tag.is_empty() => gpb::ProcessRef { pid: 0, tag },
        _ => {
            return Err(bad(
                "name the process with pid=N or tag=T (one of them)".into()
            ));
        }
    };
    if !(o.stdout || o.stderr) {
        return Err(bad("attach at least one of stdout, stderr".into()));
    }
    Ok(o)
}

/// Opens the process's output stream (replay, then follow) in the capsule
/// `target`, before the upgrade is answered: an unknown process is
/// refused with an HTTP status naming it.
pub async fn start(
    channel: Channel,
    capsule: &str,
    target: &Target,
    options: AttachOptions,
    protocol: Protocol,
) -> Result<Started, Refusal> {
    let uid = target.uid.as_str();
    let label = options.label();
    let out = NodeAgentClient::new(channel)
        .attach_process(pb::AttachProcessRequest {
            uid: uid.to_string(),
            request: Some(gpb::AttachProcessRequest {
                process: Some(options.process),
                follow: true,
            }),
        })
        .await
        .map_err(|s| plan_process_refusal(capsule, &s))?
        .into_inner();
    Ok(Started::attached(
        out,
        label,
        options.stdout,
        options.stderr,
        protocol,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tag_or_a_pid_and_never_stdin() {
        let o = parse_options("tag=web&container=x&stdin=false").unwrap();
        assert_eq!(o.process.tag, "web");
        assert!(o.stdout && o.stderr);
        assert_eq!(
            parse_options("pid=12&stderr=false").unwrap().process.pid,
            12
        );
        for q in [
            "",
            "tag=",
            "pid=0",
            "tag=a&pid=3",
            "tag=a&stdout=0&stderr=0",
            "tag=a&shell=1",
        ] {
            assert_eq!(
                parse_options(q).unwrap_err().reason,
                Reason::BadRequest,
                "{q}"
            );
        }
        let e = parse_options("tag=a&stdin=true").unwrap_err();
        assert!(e.message.contains("no stdin"), "{}", e.message);
        assert!(parse_options("tag=a&tty=1").is_err());
    }
}
