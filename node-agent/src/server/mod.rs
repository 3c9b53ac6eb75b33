//! The agent's gRPC service (`wrenn.agent.v1.NodeAgent`) over mutual TLS.
//!
//! It validates requests and converts between proto and domain types
//! ([`convert`]); side effects belong to the capsule supervisor, reached
//! through [`CapsuleApi`]; `GetMetrics` reads the agent's sampled history.
//! Both are required by [`AgentService::new`], so no wiring slip can leave
//! an RPC answering `UNIMPLEMENTED`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_server::{NodeAgent, NodeAgentServer};
use wrenn_proto::guest::v1 as gpb;

use crate::capsule::{CapsuleApi, State};
use crate::node::{NodePaths, VmmCap, plan_offer, read_cpu_model, read_facts};

mod activity;
mod console;
pub mod convert;
mod dataplane;
mod files;
mod ports;
mod processes;
use crate::tls::{Listening, PortConfig, TlsFiles};
use convert::{to_capsule, to_resources, to_status, validate_snapshot_id, validate_uid};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material could not be loaded.
    #[error("load TLS material")]
    Tls(#[source] crate::tls::Error),
    /// The server failed.
    #[error("serve gRPC")]
    Serve(#[source] tonic::transport::Error),
    /// Accepting connections failed for good.
    #[error("accept gRPC connections")]
    Accept(#[source] std::io::Error),
}

/// Static identity of this agent.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    /// Kubernetes node name.
    pub node_name: String,
    /// The VMM this agent drives, when detected.
    pub vmm: Option<pb::VmmInfo>,
    /// `dm-snapshot` or `qcow2`.
    pub storage_backend: String,
}

/// The service.
#[derive(Clone, Debug)]
pub struct AgentService {
    identity: AgentIdentity,
    paths: NodePaths,
    capsules: Arc<dyn CapsuleApi>,
    metrics: Arc<crate::metrics::Metrics>,
    activity: activity::Activity,
    vmm_cap: VmmCap,
    /// `--disk-quota`; `None`: a share of the state filesystem.
    disk_quota: Option<u64>,
    image_dirs: crate::images::ImageDirs,
    /// Where ReadConsole looks instead of the supervisor's
    /// [`CapsuleApi::console_dir`]; `None` (as `main` runs it): there.
    console_root: Option<std::path::PathBuf>,
    /// Which route answered per capsule port (`ports`).
    routes: ports::Routes,
}

impl AgentService {
    /// A service answering for `identity`, reading node facts from `paths`,
    /// serving capsule RPCs from `capsules` (the supervisor) and `GetMetrics`
    /// from `metrics` (the agent's sampled history).
    pub fn new(
        identity: AgentIdentity,
        paths: NodePaths,
        capsules: Arc<dyn CapsuleApi>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            identity,
            paths,
            capsules,
            metrics,
            activity: activity::Activity::default(),
            vmm_cap: VmmCap::default(),
            disk_quota: None,
            image_dirs: crate::images::ImageDirs::default(),
            console_root: None,
            routes: ports::Routes::default(),
        }
    }

    /// A service over `sup` for node `node_name` with no VMM version to
    /// report (a fake or QEMU machine): qcow2 storage, node facts from
    /// `/proc` and `/dev/kvm`, node files under `state_dir`. What tests and
    /// single-host tools build; `main` builds its own from its flags.
    pub fn on_host<M: crate::vmm::Machine + 'static>(
        node_name: &str,
        sup: &crate::capsule::Supervisor<M>,
        state_dir: &std::path::Path,
    ) -> Self {
        Self::new(
            AgentIdentity {
                node_name: node_name.into(),
                vmm: None,
                storage_backend: "qcow2".into(),
            },
            NodePaths {
                proc: "/proc".into(),
                kvm: "/dev/kvm".into(),
                state_dir: state_dir.to_path_buf(),
            },
            Arc::new(sup.clone()),
            sup.metrics().clone(),
        )
    }

    /// Serves ReadConsole from the run directories under `root` instead of
    /// the supervisor's own (`Layout::vmm_root`), which it serves from
    /// without this call.
    pub fn with_console_root(mut self, root: std::path::PathBuf) -> Self {
        self.console_root = Some(root);
        self
    }

    /// Resolves the root disks, kernels and local images requests name in
    /// `dirs` (see `images::dirs`); without it every node file is refused.
    pub fn with_image_dirs(mut self, dirs: crate::images::ImageDirs) -> Self {
        self.image_dirs = dirs;
        self
    }

    /// Offers at most `cap` (the VMM parent cgroup's cap) as capacity.
    pub fn with_vmm_cap(mut self, cap: VmmCap) -> Self {
        self.vmm_cap = cap;
        self
    }

    /// Reports `quota` (bytes) as the node's disk quota instead of
    /// [`crate::node::DEFAULT_QUOTA_PERCENT`] of the state filesystem.
    pub fn with_disk_quota(mut self, quota: Option<u64>) -> Self {
        self.disk_quota = quota;
        self
    }

    /// A capsule as Get and List show it: the supervisor's view and the
    /// last data-plane call this service saw.
    fn shown(&self, view: &crate::capsule::CapsuleView) -> pb::Capsule {
        let mut c = to_capsule(view);
        let busy = self.metrics.last_busy(&view.uid, activity::BUSY_MILLICORES);
        c.last_activity_unix_nanos = self.activity.last(&view.uid).max(busy.unwrap_or(0));
        c
    }

    /// Keeps data-plane activity in `file` across restarts.
    pub fn with_activity_file(mut self, file: &std::path::Path) -> Self {
        self.activity = activity::Activity::persisted(file);
        self
    }

    fn capsules(&self) -> &dyn CapsuleApi {
        self.capsules.as_ref()
    }

    /// A state change named by a `CapsuleRef` (pause, resume, suspend):
    /// the UID checked at the edge, the capsule as it is afterwards.
    async fn change(
        &self,
        req: Request<pb::CapsuleRef>,
        op: impl for<'a> FnOnce(
            &'a dyn CapsuleApi,
            &'a str,
        ) -> crate::capsule::ApiFuture<'a, crate::capsule::CapsuleView>,
    ) -> Result<Response<pb::Capsule>, Status> {
        let uid = req.into_inner().uid;
        validate_uid(&uid)?;
        let view = op(self.capsules(), &uid).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(to_capsule(&view)))
    }

    /// Where the data plane reaches `capsule`'s guest agent. Refuses with
    /// a status the user understands when the capsule is unknown, not
    /// running (paused: "resume it first"), or its guest is not ready.
    pub async fn guest_endpoint(&self, capsule: &str) -> Result<GuestEndpoint, Status> {
        validate_uid(capsule)?;
        let view = self.capsules().get(capsule).map_err(|e| to_status(&e))?;
        let refuse = |hint: &str| {
            Status::failed_precondition(format!("capsule {capsule} is {}; {hint}", view.state))
        };
        match view.state {
            State::Running => {}
            State::Paused | State::Suspended => return Err(refuse("resume it first")),
            State::Creating
            | State::Resuming
            | State::Pausing
            | State::Suspending
            | State::Snapshotting => return Err(refuse("wait until it is running")),
            State::Deleting | State::Failed | State::Stopped => {
                return Err(refuse("it has no running guest"));
            }
        }
        let open = Arc::new(self.activity.hold(capsule));
        let netns = view.netns;
        let vsock_socket = view.vsock_socket.ok_or_else(|| {
            Status::unavailable(format!("capsule {capsule} has no guest connection yet"))
        })?;
        Ok(GuestEndpoint {
            capsule: capsule.to_string(),
            vsock_socket,
            guest_token: view.guest_token,
            netns,
            open,
        })
    }
}

/// How to reach one capsule's guest agent.
#[derive(Clone, Debug)]
pub struct GuestEndpoint {
    /// Capsule id.
    pub capsule: String,
    /// Host Unix socket of the guest's vsock (`CONNECT <port>` handshake).
    pub vsock_socket: std::path::PathBuf,
    /// What the guest agent requires on every call.
    pub guest_token: Option<crate::guest::GuestToken>,
    /// The capsule's network namespace (`None` before its network is set up).
    pub netns: Option<std::path::PathBuf>,
    /// Counts as activity on the capsule while any clone lives.
    open: Arc<activity::Held>,
}

pub(crate) type BoxStream<T> =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl NodeAgent for AgentService {
    #[tracing::instrument(skip_all)]
    async fn node_info(
        &self,
        _: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let paths = self.paths.clone();
        let facts = tokio::task::spawn_blocking(move || read_facts(&paths))
            .await
            .map_err(|e| Status::internal(format!("read node facts: {e}")))?;
        // One listing gives both what `free` subtracts and the UIDs that
        // tell the operator so: they cannot disagree.
        let capsules = self.capsules.list();
        let held: Vec<(State, crate::capsule::Resources)> = capsules
            .iter()
            .map(|v| (v.state, v.spec.resources))
            .collect();
        let offer = plan_offer(&facts, &self.vmm_cap, &held);
        Ok(Response::new(pb::NodeInfoResponse {
            node_name: self.identity.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kvm: facts.kvm,
            vmm: self
                .identity
                .vmm
                .clone()
                .or_else(|| Some(convert::to_vmm(&self.capsules.backend()))),
            cpu_model: facts.cpu_model,
            capacity: Some(to_resources(&offer.capacity)),
            free: Some(to_resources(&offer.free)),
            templates: self.capsules.templates().into_iter().collect(),
            snapshots: self.capsules.snapshots(),
            storage_backend: self.identity.storage_backend.clone(),
            held: capsules.into_iter().map(|v| v.uid).collect(),
            quarantined: self
                .capsules
                .quarantined()
                .iter()
                .map(convert::to_quarantined)
                .collect(),
            disk_quota_bytes: crate::node::plan_quota(self.disk_quota, facts.disk_total),
            disk_quota_used_bytes: facts.quota_used,
        }))
    }

    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn create_capsule(
        &self,
        req: Request<pb::CreateCapsuleRequest>,
    ) -> Result<Response<pb::Capsule>, Status> {
        let dirs = self.image_dirs.clone();
        let req = req.into_inner();
        // Resolving node file names is blocking file work.
        let (uid, spec, initial) =
            tokio::task::spawn_blocking(move || convert::from_create(req, &dirs))
                .await
                .map_err(|e| Status::internal(format!("check the request: {e}")))??;
        let view = self
            .capsules()
            .create(&uid, spec, initial)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(to_capsule(&view)))
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn get_capsule(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        let uid = req.into_inner().uid;
        validate_uid(&uid)?;
        let view = self.capsules().get(&uid).map_err(|e| to_status(&e))?;
        Ok(Response::new(self.shown(&view)))
    }
    #[tracing::instrument(skip_all)]
    async fn list_capsules(
        &self,
        _: Request<pb::ListCapsulesRequest>,
    ) -> Result<Response<pb::ListCapsulesResponse>, Status> {
        let capsules = self
            .capsules()
            .list()
            .iter()
            .map(|v| self.shown(v))
            .collect();
        Ok(Response::new(pb::ListCapsulesResponse { capsules }))
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn delete_capsule(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::DeleteCapsuleResponse>, Status> {
        let uid = req.into_inner().uid;
        validate_uid(&uid)?;
        let existed = self
            .capsules()
            .delete(&uid)
            .await
            .map_err(|e| to_status(&e))?;
        self.activity.forget(&uid);
        Ok(Response::new(pb::DeleteCapsuleResponse { existed }))
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn pause_capsule(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        self.change(req, |c, uid| c.pause(uid)).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn resume_capsule(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        self.change(req, |c, uid| c.resume(uid)).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn suspend_capsule(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        self.change(req, |c, uid| c.suspend(uid)).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn update_network(
        &self,
        req: Request<pb::UpdateNetworkRequest>,
    ) -> Result<Response<pb::Capsule>, Status> {
        let req = req.into_inner();
        validate_uid(&req.uid)?;
        let net = req.network.unwrap_or_default();
        // All checked before any is applied.
        let names = convert::from_names(&net)?;
        let ports = convert::from_ports(&net.ports)?;
        let egress = convert::from_network(net)?;
        // Ports first: exhaustion refuses the call before the egress
        // policy changes, so a retry finds the same starting point.
        self.capsules()
            .update_ports(&req.uid, ports)
            .await
            .map_err(|e| to_status(&e))?;
        self.capsules()
            .update_network(&req.uid, egress)
            .await
            .map_err(|e| to_status(&e))?;
        let view = self
            .capsules()
            .update_names(&req.uid, names)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(to_capsule(&view)))
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn snapshot_capsule(
        &self,
        req: Request<pb::SnapshotCapsuleRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let req = req.into_inner();
        validate_uid(&req.uid)?;
        let id = req
            .snapshot
            .map(|s| s.id)
            .ok_or_else(|| Status::invalid_argument("snapshot.id is required"))?;
        validate_snapshot_id(&id)?;
        let caps = self.capsules();
        let info = caps
            .snapshot(&req.uid, &id, req.memory)
            .await
            .map_err(|e| to_status(&e))?;
        let paths = self.paths.clone();
        let cpu_model = tokio::task::spawn_blocking(move || read_cpu_model(&paths))
            .await
            .unwrap_or_default();
        Ok(Response::new(convert::to_snapshot(
            &info,
            &caps.backend(),
            cpu_model,
        )))
    }
    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().id))]
    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = req.into_inner().id;
        validate_snapshot_id(&id)?;
        let existed = self
            .capsules()
            .delete_snapshot(&id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeleteSnapshotResponse { existed }))
    }

    #[tracing::instrument(skip_all, fields(template = req.get_ref().disk.as_ref().map_or("", |d| d.key.as_str())))]
    async fn prepare_template(
        &self,
        req: Request<pb::PrepareTemplateRequest>,
    ) -> Result<Response<pb::TemplateState>, Status> {
        let dirs = self.image_dirs.clone();
        let req = req.into_inner();
        let req = tokio::task::spawn_blocking(move || convert::from_prepare(req, &dirs))
            .await
            .map_err(|e| Status::internal(format!("check the request: {e}")))??;
        let state = self
            .capsules()
            .prepare_template(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::to_template_state(&state)))
    }

    type WatchEventsStream = BoxStream<pb::Event>;
    #[tracing::instrument(skip_all)]
    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use tokio_stream::StreamExt as _;
        use tokio_stream::wrappers::BroadcastStream;
        let watch = self.capsules().watch(req.into_inner().after);
        let backlog: Vec<Result<pb::Event, Status>> = watch
            .backlog
            .iter()
            .map(|e| Ok(convert::to_event(e)))
            .collect();
        let live = BroadcastStream::new(watch.live).map(|item| match item {
            Ok(e) => Ok(convert::to_event(&e)),
            // This watcher fell behind the bus: whatever it missed is
            // gone, so tell it to list again.
            Err(_) => Ok(pb::Event {
                sequence: 0,
                kind: pb::EventKind::Reset as i32,
                capsule: None,
                unix_nanos: 0,
                name_refused: None,
            }),
        });
        let mut closed = watch.closed;
        let stop = async move {
            let _ = closed.wait_for(|c| *c).await;
        };
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            tokio_stream::iter(backlog).chain(live),
            stop,
        ))))
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        match self.metrics.get_metrics(req.get_ref()) {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e @ crate::metrics::Error::UnknownCapsule { .. }) => {
                Err(Status::not_found(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    type ExecStream = BoxStream<gpb::ExecOutput>;
    #[tracing::instrument(skip_all, fields(capsule = tracing::field::Empty))]
    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        dataplane::exec(self, req).await
    }
    type PtyStream = BoxStream<gpb::PtyOutput>;
    #[tracing::instrument(skip_all, fields(capsule = tracing::field::Empty))]
    async fn pty(
        &self,
        req: Request<Streaming<pb::PtyInput>>,
    ) -> Result<Response<Self::PtyStream>, Status> {
        dataplane::pty(self, req).await
    }
    type ReadFileStream = BoxStream<gpb::FileChunk>;
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        dataplane::read_file(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = tracing::field::Empty))]
    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileInput>>,
    ) -> Result<Response<gpb::FileInfo>, Status> {
        dataplane::write_file(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn list_dir(
        &self,
        req: Request<pb::PathRequest>,
    ) -> Result<Response<gpb::ListDirResponse>, Status> {
        dataplane::list_dir(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn stat(&self, req: Request<pb::PathRequest>) -> Result<Response<gpb::FileInfo>, Status> {
        dataplane::stat(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn make_dir(
        &self,
        req: Request<pb::MakeDirRequest>,
    ) -> Result<Response<gpb::FileInfo>, Status> {
        files::make_dir(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<gpb::RemoveResponse>, Status> {
        files::remove(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn rename(
        &self,
        req: Request<pb::RenameRequest>,
    ) -> Result<Response<gpb::FileInfo>, Status> {
        files::rename(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn set_attr(
        &self,
        req: Request<pb::SetAttrRequest>,
    ) -> Result<Response<gpb::FileInfo>, Status> {
        files::set_attr(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn checksum(
        &self,
        req: Request<pb::PathRequest>,
    ) -> Result<Response<gpb::ChecksumResponse>, Status> {
        files::checksum(self, req).await
    }
    type ReadTarStream = BoxStream<gpb::FileChunk>;
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn read_tar(
        &self,
        req: Request<pb::PathRequest>,
    ) -> Result<Response<Self::ReadTarStream>, Status> {
        files::read_tar(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = tracing::field::Empty))]
    async fn write_tar(
        &self,
        req: Request<Streaming<pb::WriteTarInput>>,
    ) -> Result<Response<gpb::WriteTarResponse>, Status> {
        files::write_tar(self, req).await
    }
    type ReadConsoleStream = BoxStream<pb::ConsoleChunk>;
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn read_console(
        &self,
        req: Request<pb::ReadConsoleRequest>,
    ) -> Result<Response<Self::ReadConsoleStream>, Status> {
        console::read_console(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn start_process(
        &self,
        req: Request<pb::StartProcessRequest>,
    ) -> Result<Response<gpb::ProcessInfo>, Status> {
        processes::start(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn list_processes(
        &self,
        req: Request<pb::CapsuleRef>,
    ) -> Result<Response<gpb::ListProcessesResponse>, Status> {
        processes::list(self, req).await
    }
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<gpb::ProcessInfo>, Status> {
        processes::signal(self, req).await
    }
    type AttachProcessStream = BoxStream<gpb::ProcessOutput>;
    #[tracing::instrument(skip_all, fields(capsule = %req.get_ref().uid))]
    async fn attach_process(
        &self,
        req: Request<pb::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        processes::attach(self, req).await
    }
    type ConnectStream = BoxStream<pb::ConnectOutput>;
    #[tracing::instrument(skip_all)]
    async fn connect(
        &self,
        req: Request<Streaming<pb::ConnectInput>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        ports::connect(self, &self.routes, req).await
    }
}

/// Serves `service` on `listener` with mutual TLS until `shutdown` resolves,
/// with the default port settings ([`PortConfig::new`]: only the operator's
/// name, default limits).
pub async fn serve(
    listener: TcpListener,
    tls: &TlsFiles,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve_with(listener, PortConfig::new(tls.clone()), service, shutdown).await
}

/// Serves `service` on `listener` as `port` says: mutual TLS with named
/// clients, handshake deadline, connection cap, certificate reload.
pub async fn serve_with(
    listener: TcpListener,
    port: PortConfig,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let (incoming, accepting) = Listening::start(listener, port)
        .await
        .map_err(Error::Tls)?
        .split();
    Server::builder()
        .add_service(NodeAgentServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(Error::Serve)?;
    accepting.finish().await.map_err(Error::Accept)
}
