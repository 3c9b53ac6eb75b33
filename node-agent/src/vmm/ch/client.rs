//! [`ChClient`]: typed calls to one VMM's API socket, each bounded by the
//! timeout of its class, each failure mapped to `vmm::Error::Api` with the
//! action, capsule and socket.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::api::{CallClass, Endpoint, RequestBody, ResponseBody};
use super::error::{ApiError, classify, parse_error_chain};
use super::http::{build_request, exchange};
use super::version::ChVersion;
use crate::vmm::Error;

/// Timeouts per [`CallClass`]. CH serialises requests, so even a ping waits
/// behind a running snapshot or restore: callers that probe liveness during
/// one must not read a timeout as death (notes §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// ping, info, counters (3 s: wrenn-go-notes §11 #14 probes with 3 s).
    pub query: Duration,
    /// create, boot, pause, resume, add/remove devices, shutdown, delete
    /// (30 s: the bounded pause of §11 #14).
    pub control: Duration,
    /// Snapshot and restore: this much...
    pub bulk_base: Duration,
    /// ...plus this much per GiB of guest RAM (§11 #17: a fixed 10 s timeout
    /// killed large memory writes).
    pub bulk_per_gib: Duration,
    /// `vmm.shutdown`.
    pub exit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            query: Duration::from_secs(3),
            control: Duration::from_secs(30),
            bulk_base: Duration::from_secs(60),
            bulk_per_gib: Duration::from_secs(30),
            exit: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// The timeout for a call of `class` on a guest with `memory_bytes`.
    pub fn for_class(&self, class: CallClass, memory_bytes: u64) -> Duration {
        match class {
            CallClass::Query => self.query,
            CallClass::Control => self.control,
            CallClass::Exit => self.exit,
            CallClass::Bulk => {
                let gib = memory_bytes.div_ceil(1 << 30);
                self.bulk_base
                    + self
                        .bulk_per_gib
                        .saturating_mul(u32::try_from(gib).unwrap_or(u32::MAX))
            }
        }
    }
}

/// A client for one capsule's VMM.
#[derive(Clone, Debug)]
pub struct ChClient {
    socket: PathBuf,
    capsule: String,
    timeouts: Timeouts,
    version: Option<ChVersion>,
    memory_bytes: u64,
}

impl ChClient {
    /// A client for the API socket at `socket`, serving `capsule`.
    pub fn new(socket: &Path, capsule: &str) -> Self {
        Self {
            socket: socket.to_path_buf(),
            capsule: capsule.to_string(),
            timeouts: Timeouts::default(),
            version: None,
            memory_bytes: 0,
        }
    }

    /// Overrides the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The CH version, which decides how errors are read.
    pub fn with_version(mut self, version: ChVersion) -> Self {
        self.version = Some(version);
        self
    }

    /// Guest RAM, which scales snapshot and restore timeouts.
    pub fn with_guest_memory(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls endpoint `E` with `request`.
    pub async fn call<E: Endpoint>(&self, request: &E::Request) -> Result<E::Response, Error> {
        self.call_with_fds::<E>(request, &[]).await
    }

    /// Calls endpoint `E` with `request` and `fds` passed as SCM_RIGHTS.
    pub async fn call_with_fds<E: Endpoint>(
        &self,
        request: &E::Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<E::Response, Error> {
        self.call_inner::<E>(request, fds)
            .await
            .map_err(|source| Error::Api {
                action: E::ACTION,
                capsule: self.capsule.clone(),
                socket: self.socket.clone(),
                source,
            })
    }

    async fn call_inner<E: Endpoint>(
        &self,
        request: &E::Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<E::Response, ApiError> {
        let action = E::ACTION;
        let body = request.to_body().map_err(ApiError::Encode)?;
        let bytes = build_request(action.method(), &action.path(), body.as_deref());
        let timeout = self.timeouts.for_class(action.class(), self.memory_bytes);
        let response = tokio::time::timeout(timeout, exchange(&self.socket, &bytes, fds))
            .await
            .map_err(|_| ApiError::Timeout(timeout))??;
        if (200..300).contains(&response.status) {
            return E::Response::from_body(&response.body).map_err(ApiError::Decode);
        }
        let chain = parse_error_chain(&response.body);
        let kind = classify(action, response.status, &chain, self.version.as_ref());
        Err(ApiError::Status {
            status: response.status,
            kind,
            chain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_timeouts_grow_with_ram() {
        let t = Timeouts::default();
        assert_eq!(t.for_class(CallClass::Bulk, 0), Duration::from_secs(60));
        assert_eq!(
            t.for_class(CallClass::Bulk, 8 << 30),
            Duration::from_secs(60 + 8 * 30)
        );
        assert_eq!(
            t.for_class(CallClass::Query, 8 << 30),
            Duration::from_secs(3)
        );
    }
}
