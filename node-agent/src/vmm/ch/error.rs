//! How a Cloud Hypervisor call failed, and what that means for the caller.
//!
//! CH's status codes changed across releases (notes §4): up to v52 nearly
//! every failure is 500; v53 adds 404 for "VM is not created"; `main` after
//! v53 adds 400 for validation, 404 for an unknown device id and 409 for
//! duplicate ids. Error bodies are a JSON array of strings (top to root
//! cause) since v47 and a Rust `Debug` string before. So [`classify`] looks
//! at the status first and at the chain text second, and the caller only
//! sees an [`ErrorKind`].

use std::time::Duration;

use super::api::Action;
use super::version::ChVersion;

/// What a failed call means, independent of the CH version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The VMM has no VM (create or restore first).
    NotCreated,
    /// A VM already exists (second `vm.create`, restore into a created VM).
    AlreadyExists,
    /// The VM is in the wrong state for the action (pause while paused,
    /// resume while not booted, snapshot while running).
    InvalidState,
    /// CH refused the request itself: malformed JSON, a body where none is
    /// allowed, validation errors, a wrong fd count.
    InvalidRequest,
    /// `vm.remove-device` named an unknown device.
    DeviceNotFound,
    /// A device id or path is already in use.
    Conflict,
    /// Retry later (429: a vCPU removal is pending).
    Busy,
    /// This CH build has no such endpoint (404 `["Not Found"]`), e.g.
    /// `vm.coredump` without `guest_debug`.
    UnsupportedEndpoint,
    /// Anything else CH reported (boot failed, device open failed...).
    Failed,
    /// No answer: socket missing, connection refused, timeout, broken
    /// HTTP. The VMM may be dead or busy with a long call.
    Unreachable,
}

/// One failed call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("connect to the API socket")]
    Connect(#[source] std::io::Error),
    /// Writing the request failed.
    #[error("send the request")]
    Send(#[source] std::io::Error),
    /// Reading the response failed or the peer closed early.
    #[error("read the response")]
    Receive(#[source] std::io::Error),
    /// The response was not HTTP/1.1 as CH speaks it.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// No complete answer within the call's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Encoding the request body failed.
    #[error("encode the request body")]
    Encode(#[source] serde_json::Error),
    /// A 2xx body did not decode.
    #[error("decode the response body")]
    Decode(#[source] serde_json::Error),
    /// CH answered with an error status; `chain` is its error chain, top
    /// to root cause.
    #[error("status {status}: {}", chain.join(": "))]
    Status {
        /// HTTP status.
        status: u16,
        /// What it means.
        kind: ErrorKind,
        /// CH's error chain.
        chain: Vec<String>,
    },
}

impl ApiError {
    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Status { kind, .. } => *kind,
            ApiError::Encode(_) => ErrorKind::InvalidRequest,
            ApiError::Decode(_) => ErrorKind::Failed,
            _ => ErrorKind::Unreachable,
        }
    }
}

/// Reads an error body: a JSON array of strings (v47+), else the raw text
/// as one element (older releases print a `Debug` string). Elements are
/// opaque; some contain newlines or even a backtrace.
pub fn parse_error_chain(body: &[u8]) -> Vec<String> {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body) {
        return chain;
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        Vec::new()
    } else {
        vec![text]
    }
}

/// Classifies an error answer to `action` from its status and chain.
/// `version` (when known) decides what a 404 can mean.
pub fn classify(
    action: Action,
    status: u16,
    chain: &[String],
    version: Option<&ChVersion>,
) -> ErrorKind {
    let text = chain.join("\n").to_ascii_lowercase();
    let route_missing = chain.len() == 1 && chain[0] == "Not Found";
    match status {
        400 | 405 | 413 | 415 => ErrorKind::InvalidRequest,
        404 if route_missing => ErrorKind::UnsupportedEndpoint,
        // Before v53 CH never sent 404 for anything but a missing route.
        404 if version.is_some_and(|v| v.major < 53) => ErrorKind::UnsupportedEndpoint,
        404 if action == Action::VmRemoveDevice && !mentions_not_created(&text) => {
            ErrorKind::DeviceNotFound
        }
        404 => ErrorKind::NotCreated,
        409 => ErrorKind::Conflict,
        429 => ErrorKind::Busy,
        _ => classify_text(action, &text),
    }
}

fn mentions_not_created(text: &str) -> bool {
    text.contains("not created") || text.contains("vmnotcreated") || text.contains("no vm")
}

/// The 500 case (and anything unexpected): only the chain tells.
fn classify_text(action: Action, text: &str) -> ErrorKind {
    if mentions_not_created(text) {
        ErrorKind::NotCreated
    } else if text.contains("already created") || text.contains("vmalreadycreated") {
        ErrorKind::AlreadyExists
    } else if text.contains("not unique")
        || text.contains("identifiernotunique")
        || text.contains("duplicatedevicepath")
    {
        ErrorKind::Conflict
    } else if text.contains("invalidstatetransition")
        || text.contains("invalid state transition")
        || text.contains("not running")
        || text.contains("vmnotrunning")
        || text.contains("not booted")
        || text.contains("not paused")
        || text.contains("while vm is running")
    {
        ErrorKind::InvalidState
    } else if action == Action::VmRemoveDevice
        && (text.contains("unknown device")
            || text.contains("unknowndeviceid")
            || text.contains("could not find device"))
    {
        ErrorKind::DeviceNotFound
    } else {
        ErrorKind::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32) -> ChVersion {
        ChVersion {
            major,
            minor: 0,
            raw: format!("v{major}.0"),
        }
    }

    fn chain(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn bodies_old_and_new() {
        assert_eq!(
            parse_error_chain(br#"["Error from API","The VM could not boot"]"#),
            chain(&["Error from API", "The VM could not boot"])
        );
        assert_eq!(
            parse_error_chain(b"VmBoot(DeviceManager(...))"),
            chain(&["VmBoot(DeviceManager(...))"])
        );
        assert!(parse_error_chain(b"").is_empty());
    }

    #[test]
    fn not_created_across_versions() {
        let c = chain(&["Error from API", "VM is not created"]);
        assert_eq!(
            classify(Action::VmInfo, 500, &c, Some(&v(52))),
            ErrorKind::NotCreated
        );
        assert_eq!(
            classify(Action::VmInfo, 404, &c, Some(&v(53))),
            ErrorKind::NotCreated
        );
        // Pre-v47 Debug body.
        let old = chain(&["VmInfo(VmNotCreated)"]);
        assert_eq!(
            classify(Action::VmInfo, 500, &old, Some(&v(40))),
            ErrorKind::NotCreated
        );
    }

    #[test]
    fn state_errors_are_500_with_text() {
        let c = chain(&["Error from API", "InvalidStateTransition(Paused, Paused)"]);
        assert_eq!(
            classify(Action::VmPause, 500, &c, None),
            ErrorKind::InvalidState
        );
        let c = chain(&["Error from API", "Trying to snapshot while VM is running"]);
        assert_eq!(
            classify(Action::VmSnapshot, 500, &c, None),
            ErrorKind::InvalidState
        );
        let c = chain(&["Error from API", "VM is already created"]);
        assert_eq!(
            classify(Action::VmCreate, 500, &c, None),
            ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn route_and_device_404s() {
        let nf = chain(&["Not Found"]);
        assert_eq!(
            classify(Action::VmReboot, 404, &nf, None),
            ErrorKind::UnsupportedEndpoint
        );
        let c = chain(&[
            "Error from API",
            "Failed to remove device",
            "Unknown device id",
        ]);
        assert_eq!(
            classify(Action::VmRemoveDevice, 404, &c, None),
            ErrorKind::DeviceNotFound
        );
        assert_eq!(
            classify(Action::VmRemoveDevice, 500, &c, Some(&v(52))),
            ErrorKind::DeviceNotFound
        );
        assert_eq!(
            classify(
                Action::VmAddNet,
                409,
                &chain(&["Identifier net1 is not unique"]),
                None
            ),
            ErrorKind::Conflict
        );
        assert_eq!(
            classify(Action::VmRestore, 400, &chain(&["Bad Request"]), None),
            ErrorKind::InvalidRequest
        );
        assert_eq!(classify(Action::VmResize, 429, &[], None), ErrorKind::Busy);
    }
}
