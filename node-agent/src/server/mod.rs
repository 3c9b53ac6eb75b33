//! The agent's gRPC service (`wrenn.agent.v1.NodeAgent`) over mutual TLS.
//!
//! It validates requests and converts between proto and domain types; side
//! effects belong to the capsule supervisor. Until the supervisor lands
//! (issue 3), capsule and data-plane RPCs answer `UNIMPLEMENTED` with a
//! message saying so, rather than pretending.

use std::future::Future;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_server::{NodeAgent, NodeAgentServer};
use wrenn_proto::guest::v1 as gpb;

use crate::node::{NodePaths, read_facts};

mod dataplane;
use crate::tls::TlsFiles;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material could not be loaded.
    #[error("load TLS material")]
    Tls(#[source] crate::tls::Error),
    /// tonic refused the TLS configuration or the server failed.
    #[error("serve gRPC")]
    Serve(#[source] tonic::transport::Error),
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
}

impl AgentService {
    /// A service answering for `identity`, reading node facts from `paths`.
    pub fn new(identity: AgentIdentity, paths: NodePaths) -> Self {
        Self { identity, paths }
    }

    /// Where the data plane reaches `capsule`'s guest agent. Refuses with
    /// a status the user understands when the capsule is unknown, not
    /// running (paused: "resume it first"), or its guest is not ready.
    pub async fn guest_endpoint(&self, capsule: &str) -> Result<GuestEndpoint, Status> {
        let _ = capsule;
        Err(not_yet("the data plane"))
    }
}

/// How to reach one capsule's guest agent.
#[derive(Clone, Debug)]
pub struct GuestEndpoint {
    /// Capsule id.
    pub capsule: String,
    /// Host Unix socket of the guest's vsock (`CONNECT <port>` handshake).
    pub vsock_socket: std::path::PathBuf,
}

pub(crate) type BoxStream<T> =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented by this node agent yet: the capsule supervisor is pending"
    ))
}

#[tonic::async_trait]
impl NodeAgent for AgentService {
    async fn node_info(
        &self,
        _: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let paths = self.paths.clone();
        let facts = tokio::task::spawn_blocking(move || read_facts(&paths))
            .await
            .map_err(|e| Status::internal(format!("read node facts: {e}")))?;
        Ok(Response::new(pb::NodeInfoResponse {
            node_name: self.identity.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kvm: facts.kvm,
            vmm: self.identity.vmm.clone(),
            cpu_model: facts.cpu_model,
            capacity: Some(pb::Resources {
                vcpus: facts.vcpus,
                memory_bytes: facts.memory_total,
                disk_bytes: facts.disk_total,
            }),
            free: Some(pb::Resources {
                vcpus: facts.vcpus,
                memory_bytes: facts.memory_available,
                disk_bytes: facts.disk_free,
            }),
            templates: Default::default(),
            snapshots: Vec::new(),
            storage_backend: self.identity.storage_backend.clone(),
        }))
    }

    async fn create_capsule(
        &self,
        _: Request<pb::CreateCapsuleRequest>,
    ) -> Result<Response<pb::Capsule>, Status> {
        Err(not_yet("CreateCapsule"))
    }
    async fn get_capsule(
        &self,
        _: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        Err(not_yet("GetCapsule"))
    }
    async fn list_capsules(
        &self,
        _: Request<pb::ListCapsulesRequest>,
    ) -> Result<Response<pb::ListCapsulesResponse>, Status> {
        Err(not_yet("ListCapsules"))
    }
    async fn delete_capsule(
        &self,
        _: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::DeleteCapsuleResponse>, Status> {
        Err(not_yet("DeleteCapsule"))
    }
    async fn pause_capsule(
        &self,
        _: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        Err(not_yet("PauseCapsule"))
    }
    async fn resume_capsule(
        &self,
        _: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        Err(not_yet("ResumeCapsule"))
    }
    async fn suspend_capsule(
        &self,
        _: Request<pb::CapsuleRef>,
    ) -> Result<Response<pb::Capsule>, Status> {
        Err(not_yet("SuspendCapsule"))
    }
    async fn snapshot_capsule(
        &self,
        _: Request<pb::SnapshotCapsuleRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Err(not_yet("SnapshotCapsule"))
    }
    async fn delete_snapshot(
        &self,
        _: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(not_yet("DeleteSnapshot"))
    }

    type WatchEventsStream = BoxStream<pb::Event>;
    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(not_yet("WatchEvents"))
    }
    async fn get_metrics(
        &self,
        _: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        Err(not_yet("GetMetrics"))
    }

    type ExecStream = BoxStream<gpb::ExecOutput>;
    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        dataplane::exec(self, req).await
    }
    type PtyStream = BoxStream<gpb::PtyOutput>;
    async fn pty(
        &self,
        req: Request<Streaming<pb::PtyInput>>,
    ) -> Result<Response<Self::PtyStream>, Status> {
        dataplane::pty(self, req).await
    }
    type ReadFileStream = BoxStream<gpb::FileChunk>;
    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        dataplane::read_file(self, req).await
    }
    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileInput>>,
    ) -> Result<Response<gpb::FileInfo>, Status> {
        dataplane::write_file(self, req).await
    }
    async fn list_dir(
        &self,
        req: Request<pb::PathRequest>,
    ) -> Result<Response<gpb::ListDirResponse>, Status> {
        dataplane::list_dir(self, req).await
    }
    async fn stat(&self, req: Request<pb::PathRequest>) -> Result<Response<gpb::FileInfo>, Status> {
        dataplane::stat(self, req).await
    }
}

/// Serves `service` on `listener` with mutual TLS until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: &TlsFiles,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let tls = tls.server_config().map_err(Error::Tls)?;
    Server::builder()
        .tls_config(tls)
        .map_err(Error::Serve)?
        .add_service(NodeAgentServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(Error::Serve)
}
