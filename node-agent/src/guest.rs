//! The node agent's link to one capsule's guest agent (`wrenn-guest`,
//! `guest.proto`): dial the VMM's vsock Unix socket with the hybrid-vsock
//! handshake (`CONNECT <port>\n` → `OK <n>\n`, the same for Cloud
//! Hypervisor and QEMU's vhost-device-vsock), run gRPC over the stream, and
//! offer one typed call per RPC with bounded timeouts.
//!
//! Lifecycle duties, in the order the supervisor uses them:
//! - [`GuestClient::wait_ready`] after boot or restore: redials until the
//!   agent answers `Health` or the deadline passes;
//! - [`GuestClient::init`] right after: wall time, fresh entropy, env,
//!   hostname and the capsule's [`GuestToken`], authorized by the token the
//!   guest already holds (none on first boot; after a restore, the one
//!   in the restored memory), so a restore re-keys the guest;
//! - [`GuestClient::redial`] after every restore: the VMM resets vsock, so
//!   connections made before it are dead.
//!
//! Host setup (sockets, VMM processes) belongs to `vmm`; which capsule is
//! reachable belongs to the supervisor.
//!
//! Why this file is long: one typed call per `guest.proto` RPC on one client,
//! beside the dial, token and error rules they all share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Streaming};
use wrenn_proto::guest::v1 as gpb;
use wrenn_proto::guest::v1::guest_agent_client::GuestAgentClient;

/// The vsock port `wrenn-guest` listens on (its `--vsock-port` default).
pub const AGENT_PORT: u32 = 1024;
/// Bytes of host entropy sent with every `Init` (the guest wants ≥ 32).
pub const INIT_ENTROPY_BYTES: usize = 64;
/// Longest handshake reply we read: `OK ` and a u32.
const MAX_REPLY: usize = 64;
/// How long [`dial_through_refusals`] retries a refused handshake.
pub const REFUSED_RETRY_FOR: Duration = Duration::from_secs(1);
/// Pause between those retries.
const REFUSED_RETRY_EVERY: Duration = Duration::from_millis(10);

/// Errors of the guest link.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the VMM's vsock socket failed.
    #[error("connect to guest vsock socket {}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused or garbled the `CONNECT` handshake (nothing listens
    /// on the port yet, or the guest is gone).
    #[error("vsock handshake for port {port} on {}: {}", socket.display(), describe_reply(reply))]
    Handshake {
        /// The socket.
        socket: PathBuf,
        /// The guest port.
        port: u32,
        /// What came back (empty: the VMM closed the connection, which is
        /// how a guest's refusal reaches the host).
        reply: String,
    },
    /// Dialing did not finish in time.
    #[error("dial guest of capsule {capsule} within {after:?}")]
    DialTimeout {
        /// The capsule.
        capsule: String,
        /// The bound.
        after: Duration,
    },
    /// HTTP/2 setup over the handshaken stream failed.
    #[error("open gRPC channel to guest of capsule {capsule}")]
    Channel {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The guest agent answered with an error.
    #[error("guest {rpc} for capsule {capsule}")]
    Call {
        /// The capsule.
        capsule: String,
        /// The RPC.
        rpc: &'static str,
        /// The guest's status.
        #[source]
        source: tonic::Status,
    },
    /// The guest agent did not answer in time (paused VM, hung guest).
    #[error("guest {rpc} for capsule {capsule} timed out after {after:?}")]
    Timeout {
        /// The capsule.
        capsule: String,
        /// The RPC.
        rpc: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The guest agent never became ready before the deadline.
    #[error("guest agent of capsule {capsule} not ready after {waited:?} ({attempts} attempts)")]
    NotReady {
        /// The capsule.
        capsule: String,
        /// How long we tried.
        waited: Duration,
        /// Attempts made, the one cut by the deadline included.
        attempts: u32,
        /// The last attempt's failure.
        #[source]
        last: Box<Error>,
    },
    /// Reading host entropy for `Init` failed.
    #[error("read host entropy for capsule {capsule}")]
    Entropy {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The access token cannot be sent as gRPC metadata.
    #[error("access token of capsule {capsule} is not valid metadata")]
    Token {
        /// The capsule.
        capsule: String,
    },
    /// The capsule's journal holds no token to send on `Init`.
    #[error("capsule {capsule} has no guest access token")]
    NoToken {
        /// The capsule.
        capsule: String,
    },
}

impl Error {
    /// The guest's gRPC status, when the guest answered.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Call { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether a retry after redialing may succeed (the link, not the
    /// request, failed).
    pub fn is_link_failure(&self) -> bool {
        match self {
            // A broken connection surfaces as Unknown with a transport
            // error inside, not only as Unavailable.
            Error::Call { source, .. } => {
                source.code() == tonic::Code::Unavailable
                    || std::error::Error::source(source)
                        .is_some_and(|e| e.is::<tonic::transport::Error>())
            }
            Error::Entropy { .. } | Error::Token { .. } | Error::NoToken { .. } => false,
            _ => true,
        }
    }
}

/// Random bytes in a [`GuestToken`].
const TOKEN_BYTES: usize = 32;

/// A capsule's guest-agent access token: 32 random bytes, hex-encoded.
/// It lives in the capsule's journal and next to a snapshot's memory image
/// (both under the root-only state dir) and on the wire to the guest;
/// nowhere else. `Debug` prints a placeholder, and no view, event, status
/// or log line carries it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct GuestToken(String);

impl GuestToken {
    /// A fresh token from the kernel's CSPRNG.
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut buf = [0u8; TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
        Ok(Self(buf.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A token read back from where the agent stored it (a snapshot).
    pub fn from_stored(s: &str) -> Self {
        Self(s.trim().to_string())
    }

    /// The secret itself, for the wire and the agent's own files only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for GuestToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestToken(<redacted>)")
    }
}

/// Bounds on guest calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect plus handshake plus HTTP/2 setup.
    pub dial: Duration,
    /// Unary calls and the first response of streaming calls.
    pub call: Duration,
    /// One `Health` attempt inside [`GuestClient::wait_ready`].
    pub probe: Duration,
    /// Pause between readiness attempts.
    pub retry: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            dial: Duration::from_secs(2),
            call: Duration::from_secs(30),
            probe: Duration::from_secs(2),
            retry: Duration::from_millis(50),
        }
    }
}

/// What `Init` carries besides time and entropy, which are taken fresh on
/// every call. `Debug` leaves the token out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InitParams {
    /// Environment for every process the guest starts.
    pub env: HashMap<String, String>,
    /// Guest hostname (empty: keep).
    pub hostname: String,
    /// Token the guest then requires on every call (empty: none).
    pub access_token: String,
    /// Send the host's wall time (tests running the agent as a host
    /// process turn this off; a guest under our PID 1 always gets it).
    pub send_wall_time: bool,
}

impl std::fmt::Debug for InitParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitParams")
            .field("env", &self.env)
            .field("hostname", &self.hostname)
            .field("access_token", &"<redacted>")
            .field("send_wall_time", &self.send_wall_time)
            .finish()
    }
}

/// One capsule's guest agent, reached through its VMM's vsock socket.
#[derive(Clone, Debug)]
pub struct GuestClient {
    capsule: String,
    socket: PathBuf,
    port: u32,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    timeouts: Timeouts,
    client: GuestAgentClient<Channel>,
}

/// [`dial`] to a guest that was listening: a refusal (the VMM closes
/// without a reply: the guest answered with a reset) is retried for
/// [`REFUSED_RETRY_FOR`]. After a restore or a new vsock helper, the VMM
/// numbers its host-side ports from the start again, while the guest
/// still holds recently closed connections on those ports for some
/// seconds; a request that lands on one of them is reset, and the next
/// port is free. Not for a guest still booting: nothing listens there
/// yet, and [`GuestClient::wait_ready`] paces its own attempts.
pub async fn dial_through_refusals(socket: &Path, port: u32) -> Result<UnixStream, Error> {
    let until = tokio::time::Instant::now() + REFUSED_RETRY_FOR;
    loop {
        match dial(socket, port).await {
            Err(Error::Handshake { reply, .. })
                if reply.is_empty() && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(REFUSED_RETRY_EVERY).await;
            }
            done => return done,
        }
    }
}

/// Connects to `socket` and performs the hybrid-vsock handshake for
/// `port`, once. The stream carries the guest's bytes from then on.
pub async fn dial(socket: &Path, port: u32) -> Result<UnixStream, Error> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let handshake = |reply: String| Error::Handshake {
        socket: socket.to_path_buf(),
        port,
        reply,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| handshake(format!("write: {e}")))?;
    // Byte by byte: anything after the newline is already the guest's.
    let mut line = Vec::with_capacity(16);
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(_) => return Err(handshake(String::from_utf8_lossy(&line).into_owned())),
        };
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_REPLY {
            return Err(handshake(String::from_utf8_lossy(&line).into_owned()));
        }
    }
    // The number after OK is the VMM's local port: opaque to us.
    if !line.starts_with(b"OK ") {
        return Err(handshake(String::from_utf8_lossy(&line).into_owned()));
    }
    Ok(s)
}

fn describe_reply(reply: &str) -> String {
    if reply.is_empty() {
        "refused: the VMM closed the connection without a reply (nothing listens on the port in the guest)".into()
    } else {
        format!("unexpected reply {reply:?}")
    }
}

fn host_entropy(capsule: &str) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let mut buf = vec![0u8; INIT_ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| Error::Entropy {
            capsule: capsule.to_string(),
            source,
        })?;
    Ok(buf)
}

use wrenn_proto::unix_nanos_now;

impl GuestClient {
    /// Dials the guest of `capsule` through `socket` on [`AGENT_PORT`]
    /// once; fails if the agent does not answer the handshake in time.
    pub async fn connect(capsule: &str, socket: &Path) -> Result<Self, Error> {
        Self::connect_with(capsule, socket, AGENT_PORT, Timeouts::default()).await
    }

    /// [`connect`](Self::connect) with a port and timeouts.
    pub async fn connect_with(
        capsule: &str,
        socket: &Path,
        port: u32,
        timeouts: Timeouts,
    ) -> Result<Self, Error> {
        Self::open(capsule, socket, port, timeouts, FirstDial::ThroughRefusals).await
    }

    async fn open(
        capsule: &str,
        socket: &Path,
        port: u32,
        timeouts: Timeouts,
        first: FirstDial,
    ) -> Result<Self, Error> {
        let client = open_channel(capsule, socket, port, timeouts.dial, first).await?;
        Ok(Self {
            capsule: capsule.to_string(),
            socket: socket.to_path_buf(),
            port,
            token: None,
            timeouts,
            client: GuestAgentClient::new(client),
        })
    }

    /// Dials until the agent answers `Health` or `deadline` passes; after
    /// boot and after restore. `token` is the one a previous `Init` set
    /// (empty on first boot). Returns the client and the health reply.
    pub async fn wait_ready(
        capsule: &str,
        socket: &Path,
        port: u32,
        token: &str,
        timeouts: Timeouts,
        deadline: Duration,
    ) -> Result<(Self, gpb::HealthResponse), Error> {
        let started = tokio::time::Instant::now();
        let until = started + deadline;
        let mut attempts = 0;
        let mut finished: Option<Error> = None;
        loop {
            attempts += 1;
            let attempt = async {
                let mut c = Self::open(capsule, socket, port, timeouts, FirstDial::Once)
                    .await?
                    .with_token(token)?;
                let probe = Timeouts {
                    call: timeouts.probe,
                    ..timeouts
                };
                let saved = std::mem::replace(&mut c.timeouts, probe);
                let health = c.health().await?;
                c.timeouts = saved;
                Ok::<_, Error>((c, health))
            };
            let cut = match tokio::time::timeout_at(until, attempt).await {
                Ok(Ok(ready)) => return Ok(ready),
                Ok(Err(e)) => {
                    finished = Some(e);
                    false
                }
                Err(_) => true,
            };
            if cut || tokio::time::Instant::now() + timeouts.retry >= until {
                // An attempt the deadline cut says nothing; the one before
                // it says how the guest answered.
                let last = finished.unwrap_or_else(|| Error::DialTimeout {
                    capsule: capsule.to_string(),
                    after: deadline,
                });
                return Err(Error::NotReady {
                    capsule: capsule.to_string(),
                    waited: started.elapsed(),
                    attempts,
                    last: Box::new(last),
                });
            }
            tokio::time::sleep(timeouts.retry).await;
        }
    }

    /// Sends `token` on every later call (the guest requires it once an
    /// `Init` set it).
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        self.token = if token.is_empty() {
            None
        } else {
            let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| Error::Token {
                        capsule: self.capsule.clone(),
                    })?;
            // Not printed by Debug, never HPACK-indexed.
            value.set_sensitive(true);
            Some(value)
        };
        Ok(self)
    }

    /// The capsule.
    pub fn capsule(&self) -> &str {
        &self.capsule
    }

    /// The vsock socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Drops the old connection and dials again (after every restore: the
    /// VMM resets vsock, so the old HTTP/2 connection is dead).
    pub async fn redial(&mut self) -> Result<(), Error> {
        let channel = open_channel(
            &self.capsule,
            &self.socket,
            self.port,
            self.timeouts.dial,
            FirstDial::ThroughRefusals,
        )
        .await?;
        self.client = GuestAgentClient::new(channel);
        Ok(())
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    async fn bounded<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeouts.call, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(source)) => Err(Error::Call {
                capsule: self.capsule.clone(),
                rpc,
                source,
            }),
            Err(_) => Err(Error::Timeout {
                capsule: self.capsule.clone(),
                rpc,
                after: self.timeouts.call,
            }),
        }
    }

    /// A call that may run as long as its data takes (a large file).
    async fn unbounded<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|source| Error::Call {
                capsule: self.capsule.clone(),
                rpc,
                source,
            })
    }

    /// `Init` with the host's wall time and fresh entropy; after boot and
    /// after every restore. The token, once sent, is used on later calls.
    pub async fn init(&mut self, params: &InitParams) -> Result<gpb::InitResponse, Error> {
        let req = gpb::InitRequest {
            unix_time_nanos: if params.send_wall_time {
                unix_nanos_now()
            } else {
                0
            },
            entropy: host_entropy(&self.capsule)?,
            env: params.env.clone(),
            hostname: params.hostname.clone(),
            access_token: params.access_token.clone(),
        };
        let mut c = self.client.clone();
        let resp = self.bounded("Init", c.init(self.request(req))).await?;
        if !params.access_token.is_empty() {
            let token = params.access_token.clone();
            *self = self.clone().with_token(&token)?;
        }
        Ok(resp)
    }

    /// `Health`.
    pub async fn health(&self) -> Result<gpb::HealthResponse, Error> {
        let mut c = self.client.clone();
        self.bounded("Health", c.health(self.request(gpb::HealthRequest {})))
            .await
    }

    /// `Exec`: `input` starts with an `ExecStart`. The output stream ends
    /// with an `ExecExit`; dropping it kills the guest process group.
    pub async fn exec(
        &self,
        input: impl Stream<Item = gpb::ExecInput> + Send + 'static,
    ) -> Result<Streaming<gpb::ExecOutput>, Error> {
        let mut c = self.client.clone();
        self.bounded("Exec", c.exec(self.request(input))).await
    }

    /// `Dial`: `input` starts with a `DialStart`; a TCP connection to
    /// 127.0.0.1 inside the guest.
    pub async fn dial(
        &self,
        input: impl Stream<Item = gpb::DialInput> + Send + 'static,
    ) -> Result<Streaming<gpb::DialOutput>, Error> {
        let mut c = self.client.clone();
        self.bounded("Dial", c.dial(self.request(input))).await
    }

    /// `Pty`: `input` starts with a `PtyStart`.
    pub async fn pty(
        &self,
        input: impl Stream<Item = gpb::PtyInput> + Send + 'static,
    ) -> Result<Streaming<gpb::PtyOutput>, Error> {
        let mut c = self.client.clone();
        self.bounded("Pty", c.pty(self.request(input))).await
    }

    /// `Stat`.
    pub async fn stat(&self, path: &str) -> Result<gpb::FileInfo, Error> {
        let mut c = self.client.clone();
        let req = gpb::PathRequest {
            path: path.to_string(),
        };
        self.bounded("Stat", c.stat(self.request(req))).await
    }

    /// `ListDir`.
    pub async fn list_dir(&self, path: &str) -> Result<gpb::ListDirResponse, Error> {
        let mut c = self.client.clone();
        let req = gpb::PathRequest {
            path: path.to_string(),
        };
        self.bounded("ListDir", c.list_dir(self.request(req))).await
    }

    /// `ReadFile`: a stream of chunks of a regular file.
    pub async fn read_file(
        &self,
        req: gpb::ReadFileRequest,
    ) -> Result<Streaming<gpb::FileChunk>, Error> {
        let mut c = self.client.clone();
        self.bounded("ReadFile", c.read_file(self.request(req)))
            .await
    }

    /// `WriteFile`: `input` starts with a `WriteFileStart`. Not bounded by
    /// the call timeout (a large file takes as long as it takes); the
    /// caller bounds the input.
    pub async fn write_file(
        &self,
        input: impl Stream<Item = gpb::WriteFileInput> + Send + 'static,
    ) -> Result<gpb::FileInfo, Error> {
        let mut c = self.client.clone();
        self.unbounded("WriteFile", c.write_file(self.request(input)))
            .await
    }

    /// Writes a small file in one call bounded by the call timeout: the
    /// guest writes a temp file and renames it over `path` once every
    /// byte arrived (the agent's resolver file, not user data).
    pub async fn put_file(
        &self,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<gpb::FileInfo, Error> {
        let start = gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Start(gpb::WriteFileStart {
                path: path.to_string(),
                mode,
                size: data.len() as u64,
                make_parents: true,
                sha256: String::new(),
            })),
        };
        let body = gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Data(data)),
        };
        let mut c = self.client.clone();
        let input = tokio_stream::iter([start, body]);
        self.bounded("WriteFile", c.write_file(self.request(input)))
            .await
    }

    /// `MakeDir`.
    pub async fn make_dir(&self, req: gpb::MakeDirRequest) -> Result<gpb::FileInfo, Error> {
        let mut c = self.client.clone();
        self.bounded("MakeDir", c.make_dir(self.request(req))).await
    }

    /// `Remove`.
    pub async fn remove(&self, req: gpb::RemoveRequest) -> Result<(), Error> {
        let mut c = self.client.clone();
        self.bounded("Remove", c.remove(self.request(req)))
            .await
            .map(|_| ())
    }

    /// `Rename`.
    pub async fn rename(&self, req: gpb::RenameRequest) -> Result<gpb::FileInfo, Error> {
        let mut c = self.client.clone();
        self.bounded("Rename", c.rename(self.request(req))).await
    }

    /// `SetAttr`: chmod and/or chown.
    pub async fn set_attr(&self, req: gpb::SetAttrRequest) -> Result<gpb::FileInfo, Error> {
        let mut c = self.client.clone();
        self.bounded("SetAttr", c.set_attr(self.request(req))).await
    }

    /// `Checksum`: SHA-256 of a regular file. Not bounded by the call
    /// timeout: hashing a large file takes as long as reading it.
    pub async fn checksum(&self, path: &str) -> Result<gpb::ChecksumResponse, Error> {
        let mut c = self.client.clone();
        let req = gpb::PathRequest {
            path: path.to_string(),
        };
        self.unbounded("Checksum", c.checksum(self.request(req)))
            .await
    }

    /// `ReadTar`: a directory as a tar stream.
    pub async fn read_tar(&self, path: &str) -> Result<Streaming<gpb::FileChunk>, Error> {
        let mut c = self.client.clone();
        let req = gpb::PathRequest {
            path: path.to_string(),
        };
        self.bounded("ReadTar", c.read_tar(self.request(req))).await
    }

    /// `WriteTar`: `input` starts with a `WriteTarStart`. Not bounded by
    /// the call timeout, as `WriteFile`.
    pub async fn write_tar(
        &self,
        input: impl Stream<Item = gpb::WriteTarInput> + Send + 'static,
    ) -> Result<gpb::WriteTarResponse, Error> {
        let mut c = self.client.clone();
        self.unbounded("WriteTar", c.write_tar(self.request(input)))
            .await
    }

    /// `Metrics` (guest memory used = total − available feeds the
    /// sampler).
    pub async fn metrics(&self) -> Result<gpb::GuestMetrics, Error> {
        let mut c = self.client.clone();
        self.bounded("Metrics", c.metrics(self.request(gpb::MetricsRequest {})))
            .await
    }

    /// `StartProcess`: a detached process, owned by the guest agent.
    pub async fn start_process(
        &self,
        req: gpb::StartProcessRequest,
    ) -> Result<gpb::ProcessInfo, Error> {
        let mut c = self.client.clone();
        self.bounded("StartProcess", c.start_process(self.request(req)))
            .await
    }

    /// `ListProcesses`.
    pub async fn list_processes(&self) -> Result<gpb::ListProcessesResponse, Error> {
        let mut c = self.client.clone();
        let req = gpb::ListProcessesRequest {};
        self.bounded("ListProcesses", c.list_processes(self.request(req)))
            .await
    }

    /// `SignalProcess`.
    pub async fn signal_process(
        &self,
        req: gpb::SignalProcessRequest,
    ) -> Result<gpb::ProcessInfo, Error> {
        let mut c = self.client.clone();
        self.bounded("SignalProcess", c.signal_process(self.request(req)))
            .await
    }

    /// `AttachProcess`: the process's output ring, then (with `follow`)
    /// live output. Dropping the stream detaches; the process runs on.
    pub async fn attach_process(
        &self,
        req: gpb::AttachProcessRequest,
    ) -> Result<Streaming<gpb::ProcessOutput>, Error> {
        let mut c = self.client.clone();
        self.bounded("AttachProcess", c.attach_process(self.request(req)))
            .await
    }

    /// `Quiesce`: sync and drop caches before a snapshot.
    pub async fn quiesce(&self) -> Result<(), Error> {
        let mut c = self.client.clone();
        self.bounded("Quiesce", c.quiesce(self.request(gpb::QuiesceRequest {})))
            .await
            .map(|_| ())
    }
}

/// How [`open_channel`] makes its first connection.
#[derive(Clone, Copy, Debug)]
enum FirstDial {
    /// One attempt: the guest may still be booting.
    Once,
    /// Through refusals: the guest is known to listen.
    ThroughRefusals,
}

/// An HTTP/2 channel over `dial(socket, port)`. The first connection is
/// dialed here, so a refused handshake is reported as itself; tonic redials
/// the same way if the connection breaks later.
async fn open_channel(
    capsule: &str,
    socket: &Path,
    port: u32,
    dial_timeout: Duration,
    how: FirstDial,
) -> Result<Channel, Error> {
    let timed_out = || Error::DialTimeout {
        capsule: capsule.to_string(),
        after: dial_timeout,
    };
    let first = match how {
        FirstDial::Once => tokio::time::timeout(dial_timeout, dial(socket, port)).await,
        FirstDial::ThroughRefusals => {
            tokio::time::timeout(dial_timeout, dial_through_refusals(socket, port)).await
        }
    }
    .map_err(|_| timed_out())??;
    let first = std::sync::Arc::new(std::sync::Mutex::new(Some(first)));
    let target = socket.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        let first = first.clone();
        async move {
            let ready = first.lock().ok().and_then(|mut f| f.take());
            let stream = match ready {
                Some(s) => s,
                // The guest answered before: a refusal now is a stale port.
                None => dial_through_refusals(&target, port)
                    .await
                    .map_err(std::io::Error::other)?,
            };
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // Keepalive notices a connection the VMM dropped (restore) while a
    // stream is idle; the connect timeout bounds a redial whose request
    // the guest never answers.
    let endpoint = Endpoint::from_static("http://guest.invalid")
        .connect_timeout(dial_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    tokio::time::timeout(dial_timeout, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| Error::Channel {
            capsule: capsule.to_string(),
            source,
        })
}
