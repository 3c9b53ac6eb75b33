//! `attach`: the output of a detached process over the gateway's
//! `capsules/attach` WebSocket, as the user: what the capsule kept since
//! the process started, then what it prints next, ending with its exit
//! code as ours. Detached processes read no stdin, so none is sent; ^C
//! (or a closed connection) detaches and leaves the process running.

use futures::StreamExt as _;
use wrenn_gateway::processes::build_path;
use wrenn_gateway::route::Subresource;

use crate::channel;
use crate::cluster::Target;
use crate::processes::{Error, plan_ref};

/// Why an attach ended without the process's exit code.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The request was refused or could not be made.
    #[error(transparent)]
    Call(#[from] Error),
    /// The connection ended before the exit status came.
    #[error("the connection to capsule {capsule:?} ended before process {which}'s exit status")]
    NoStatus {
        /// The capsule.
        capsule: String,
        /// The pid or tag.
        which: String,
    },
    /// The gateway reported a failure instead of an exit.
    #[error("attach to {which} in capsule {capsule:?}: {message}")]
    Failed {
        /// The capsule.
        capsule: String,
        /// The pid or tag.
        which: String,
        /// The gateway's message.
        message: String,
    },
}

/// Follows the process `which` (a pid or a tag) until it exits and
/// returns its exit code.
pub async fn run(target: &Target, capsule: &str, which: &str) -> Result<u8, AttachError> {
    let (key, value) = plan_ref(which);
    let q = [(key, value), ("stdout", "true"), ("stderr", "true")];
    let path = build_path(&target.namespace, capsule, Subresource::Attach, &q);
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(|source| Error::Request {
            capsule: capsule.to_string(),
            source,
        })?;
    let conn = target
        .client
        .connect(req)
        .await
        .map_err(|e| Error::Refused {
            what: "attach to a process",
            capsule: capsule.to_string(),
            source: target.refusal(e, "capsule", capsule),
        })?;
    // The send half stays open (and unused) until the end: closing it
    // would end the stream.
    let (_sink, mut source) = conn.into_stream().split();
    let status = crate::exec::print_until_status(&mut source)
        .await
        .ok_or_else(|| AttachError::NoStatus {
            capsule: capsule.to_string(),
            which: which.to_string(),
        })?;
    channel::plan_exit(&status).map_err(|message| AttachError::Failed {
        capsule: capsule.to_string(),
        which: which.to_string(),
        message,
    })
}
