//! The `GuestAgent` gRPC service: checks the token, validates at the edge,
//! and hands each RPC to the module that owns it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::guest::v1::guest_agent_server::GuestAgent;
use wrenn_proto::guest::v1::{
    AttachProcessRequest, ListProcessesRequest, ListProcessesResponse, ProcessInfo,
    SignalProcessRequest, StartProcessRequest,
};
use wrenn_proto::guest::v1::{
    ChecksumResponse, ExecInput, FileChunk, FileInfo, GuestMetrics, HealthRequest, HealthResponse,
    InitRequest, InitResponse, ListDirResponse, MakeDirRequest, MetricsRequest, PathRequest,
    PtyInput, QuiesceRequest, QuiesceResponse, ReadFileRequest, RemoveRequest, RemoveResponse,
    RenameRequest, SetAttrRequest, WriteFileInput, WriteTarInput, WriteTarResponse,
};

use crate::process::SpawnContext;
use crate::{archive, dial, exec, files, metrics, processes, pty, setup};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shortest access token Init accepts: the node agent sends 32 random
/// bytes hex-encoded; anything guessable is refused.
pub const MIN_TOKEN_BYTES: usize = 16;

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent owns the guest OS (it runs under our PID 1): Init may set
    /// the clock and hostname, Quiesce drops caches.
    pub owns_os: bool,
    /// Largest file a read or write may move, and the default for reads.
    pub max_file_bytes: u64,
    /// Where users are looked up.
    pub passwd: PathBuf,
    /// `/proc` (metrics, drop_caches).
    pub proc: PathBuf,
    /// The entropy device.
    pub random: PathBuf,
    /// What detached processes may hold.
    pub processes: processes::Limits,
}

#[derive(Debug, Default)]
struct State {
    initialized: bool,
    token: Option<String>,
    env: BTreeMap<String, String>,
}

/// The service.
#[derive(Debug, Clone)]
pub struct Agent {
    config: Arc<Config>,
    state: Arc<RwLock<State>>,
    started: Instant,
    processes: processes::Table,
}

use wrenn_proto::unix_nanos_now;

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A token Init may set: long enough, and sendable as gRPC metadata
/// (visible ASCII), so the node agent can present it on later calls.
fn check_token(token: &str) -> Result<(), Status> {
    if token.len() < MIN_TOKEN_BYTES {
        return Err(Status::invalid_argument(format!(
            "Init needs an access token of at least {MIN_TOKEN_BYTES} bytes"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(
            "the access token must be visible ASCII",
        ));
    }
    Ok(())
}

/// Equal-time comparison, so the token cannot be guessed byte by byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Agent {
    pub fn new(config: Config) -> Self {
        Self {
            processes: processes::Table::new(config.processes),
            config: Arc::new(config),
            state: Arc::new(RwLock::new(State::default())),
            started: Instant::now(),
        }
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a call without the token Init set (`authorization`, bare or
    /// as `Bearer <token>`). Before the first Init there is no token: only
    /// Init (the bootstrap) and Health answer then, and only the host can
    /// connect at all (see `listen`).
    fn authorize(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let state = self.state();
        let Some(token) = state.token.as_deref() else {
            return Ok(());
        };
        let given = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v));
        match given {
            Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => {
                crate::warn_limited!("call with a wrong access token refused");
                Err(Status::unauthenticated("access token is wrong"))
            }
            None => Err(Status::unauthenticated("access token is missing")),
        }
    }

    /// `authorize`, and refuse until Init has run.
    fn ready(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.authorize(metadata)?;
        if self.state().initialized {
            Ok(())
        } else {
            Err(Status::failed_precondition(
                "the agent has not been initialized (call Init first)",
            ))
        }
    }

    fn spawn_context(&self) -> SpawnContext {
        SpawnContext {
            env: self.state().env.clone(),
            passwd: self.config.passwd.clone(),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))?
}

#[tonic::async_trait]
impl GuestAgent for Agent {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        // The first Init sets the token; every later one (after a restore)
        // must carry the current token and may replace it.
        self.authorize(request.metadata())?;
        let req = request.into_inner();
        check_token(&req.access_token)?;
        setup::check_entropy(&req.entropy)?;
        if !req.hostname.is_empty() {
            setup::check_hostname(&req.hostname)?;
        }
        for k in req.env.keys() {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(Status::invalid_argument(format!(
                    "environment variable name {k:?} is invalid"
                )));
            }
        }
        let config = self.config.clone();
        let entropy = req.entropy;
        let host_time = req.unix_time_nanos;
        let hostname = req.hostname.clone();
        // Entropy first, then the clock: nothing user-visible may run on a
        // cloned CRNG state.
        blocking(move || {
            let e = setup::ensure_entropy(&config.random, &entropy)?;
            tracing::info!(entropy = ?e, "entropy mixed in");
            match setup::plan_clock_step(unix_nanos_now(), host_time) {
                Some(t) if config.owns_os => {
                    setup::set_clock(t)?;
                    tracing::info!(unix_nanos = t, "clock stepped");
                }
                Some(t) => tracing::info!(
                    unix_nanos = t,
                    "clock would be stepped (not applied: the agent does not own the OS)"
                ),
                None => {}
            }
            if !hostname.is_empty() && config.owns_os {
                setup::set_hostname(&hostname)?;
            }
            Ok(())
        })
        .await?;
        {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            state.env = req.env.into_iter().collect();
            state.token = Some(req.access_token);
            state.initialized = true;
        }
        Ok(Response::new(InitResponse {
            agent_version: VERSION.to_string(),
            kernel_release: kernel_release(),
        }))
    }

    type ExecStream = exec::OutputStream;

    async fn exec(
        &self,
        request: Request<Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.ready(request.metadata())?;
        let ctx = self.spawn_context();
        exec::exec(request.into_inner(), ctx)
            .await
            .map(Response::new)
    }

    type DialStream = dial::OutputStream;

    async fn dial(
        &self,
        request: Request<Streaming<wrenn_proto::guest::v1::DialInput>>,
    ) -> Result<Response<Self::DialStream>, Status> {
        self.ready(request.metadata())?;
        dial::dial(request.into_inner()).await.map(Response::new)
    }

    type PtyStream = pty::OutputStream;

    async fn pty(
        &self,
        request: Request<Streaming<PtyInput>>,
    ) -> Result<Response<Self::PtyStream>, Status> {
        self.ready(request.metadata())?;
        let ctx = self.spawn_context();
        pty::pty(request.into_inner(), ctx).await.map(Response::new)
    }

    async fn stat(&self, request: Request<PathRequest>) -> Result<Response<FileInfo>, Status> {
        self.ready(request.metadata())?;
        let path = files::to_path(&request.into_inner().path)?;
        blocking(move || Ok(files::stat(&path)?))
            .await
            .map(Response::new)
    }

    async fn list_dir(
        &self,
        request: Request<PathRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        self.ready(request.metadata())?;
        let path = files::to_path(&request.into_inner().path)?;
        blocking(move || Ok(files::list_dir(&path)?))
            .await
            .map(|entries| Response::new(ListDirResponse { entries }))
    }

    type ReadFileStream = BoxStream<FileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        let path = files::to_path(&req.path)?;
        let limit = match req.max_bytes {
            0 => self.config.max_file_bytes,
            n => n.min(self.config.max_file_bytes),
        };
        let p = path.clone();
        let file = blocking(move || Ok(files::open_for_read(&p, limit)?)).await?;
        Ok(Response::new(Box::pin(files::read_stream(
            path, file, limit,
        ))))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileInput>>,
    ) -> Result<Response<FileInfo>, Status> {
        self.ready(request.metadata())?;
        match files::write(request.into_inner(), self.config.max_file_bytes).await {
            Ok(info) => Ok(Response::new(info)),
            Err(e) => {
                crate::warn_limited!(error = %crate::report::chain(&e), "file write refused");
                Err(e.into())
            }
        }
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        let path = files::to_path(&req.path)?;
        blocking(move || Ok(files::make_dir(&path, req.mode, req.parents)?))
            .await
            .map(Response::new)
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        let path = files::to_path(&req.path)?;
        blocking(move || Ok(files::remove(&path, req.recursive)?)).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn rename(&self, request: Request<RenameRequest>) -> Result<Response<FileInfo>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        let from = files::to_path(&req.from)?;
        let to = files::to_path(&req.to)?;
        blocking(move || Ok(files::rename(&from, &to)?))
            .await
            .map(Response::new)
    }

    async fn set_attr(
        &self,
        request: Request<SetAttrRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        let path = files::to_path(&req.path)?;
        blocking(move || Ok(files::set_attr(&path, req.mode, req.uid, req.gid)?))
            .await
            .map(Response::new)
    }

    async fn checksum(
        &self,
        request: Request<PathRequest>,
    ) -> Result<Response<ChecksumResponse>, Status> {
        self.ready(request.metadata())?;
        let path = files::to_path(&request.into_inner().path)?;
        let (sha256, size) = blocking(move || Ok(files::checksum(&path)?)).await?;
        Ok(Response::new(ChecksumResponse { sha256, size }))
    }

    type ReadTarStream = BoxStream<FileChunk>;

    async fn read_tar(
        &self,
        request: Request<PathRequest>,
    ) -> Result<Response<Self::ReadTarStream>, Status> {
        self.ready(request.metadata())?;
        let path = files::to_path(&request.into_inner().path)?;
        Ok(Response::new(Box::pin(archive::read(path))))
    }

    async fn write_tar(
        &self,
        request: Request<Streaming<WriteTarInput>>,
    ) -> Result<Response<WriteTarResponse>, Status> {
        self.ready(request.metadata())?;
        match archive::write(request.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                crate::warn_limited!(error = %crate::report::chain(&e), "tar upload refused");
                Err(e.into())
            }
        }
    }

    async fn metrics(
        &self,
        request: Request<MetricsRequest>,
    ) -> Result<Response<GuestMetrics>, Status> {
        self.ready(request.metadata())?;
        let proc = self.config.proc.clone();
        blocking(move || Ok(metrics::sample(&proc, std::path::Path::new("/"))?))
            .await
            .map(Response::new)
    }

    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.authorize(request.metadata())?;
        Ok(Response::new(HealthResponse {
            agent_version: VERSION.to_string(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            initialized: self.state().initialized,
        }))
    }

    async fn quiesce(
        &self,
        request: Request<QuiesceRequest>,
    ) -> Result<Response<QuiesceResponse>, Status> {
        self.ready(request.metadata())?;
        let config = self.config.clone();
        blocking(move || {
            nix::unistd::sync();
            if config.owns_os {
                // 3 = page cache, dentries and inodes.
                std::fs::write(config.proc.join("sys/vm/drop_caches"), b"3")
                    .map_err(|e| Status::internal(format!("drop caches: {e}")))?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(QuiesceResponse {}))
    }

    async fn start_process(
        &self,
        request: Request<StartProcessRequest>,
    ) -> Result<Response<ProcessInfo>, Status> {
        self.ready(request.metadata())?;
        let ctx = self.spawn_context();
        self.processes
            .start(request.into_inner(), ctx)
            .await
            .map(Response::new)
    }

    async fn list_processes(
        &self,
        request: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        self.ready(request.metadata())?;
        Ok(Response::new(ListProcessesResponse {
            processes: self.processes.list(),
        }))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<ProcessInfo>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        self.processes
            .signal(&req.process.unwrap_or_default(), req.signal)
            .map(Response::new)
    }

    type AttachProcessStream = processes::OutputStream;

    async fn attach_process(
        &self,
        request: Request<AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        self.ready(request.metadata())?;
        let req = request.into_inner();
        self.processes
            .attach(&req.process.unwrap_or_default(), req.follow)
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_missing_short_or_unprintable_tokens() {
        for bad in ["", "short", "sixteen bytes!!!", "0123456789abcdef\n"] {
            assert_eq!(
                check_token(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        assert!(check_token("0123456789abcdef").is_ok());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }
}
