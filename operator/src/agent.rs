//! The [`NodeAgent`] capability (one node agent's gRPC API) and its tonic
//! client [`GrpcNodeAgent`] over mutual TLS. It only translates: decisions
//! live in `plan`, bookkeeping of many agents in `pool`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use tonic::transport::Channel;
use tracing::Instrument;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;

use wrenn_crds::capsule::VmmInfo;

use crate::plan::{EgressPolicy, PublishedPort, Vm, VmState};

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod tls;

pub use tls::ClientTls;

/// Errors talking to a node agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call was refused or failed.
    #[error("{call} on node {node}")]
    Call {
        /// RPC name.
        call: &'static str,
        /// Node of the agent.
        node: String,
        /// What the agent (or transport) said.
        #[source]
        status: tonic::Status,
    },
    /// No agent is known for the node.
    #[error("no agent for node {node}")]
    NoAgent {
        /// Node name.
        node: String,
    },
}

impl Error {
    /// The gRPC code of a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// The agent's own message of a failed call, for conditions.
    pub fn agent_message(&self) -> String {
        match self {
            Error::Call { status, .. } => status.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// Future returned by every [`NodeAgent`] call.
pub type Call<'a, T> = BoxFuture<'a, Result<T, Error>>;
/// Stream of an agent's events.
pub type Events = BoxStream<'static, Result<pb::Event, Error>>;

/// One node agent's API. Every capsule call is keyed by UID and idempotent.
pub trait NodeAgent: Send + Sync + 'static {
    /// Node facts: VMM, capacity, free resources, templates and snapshots held.
    fn node_info(&self) -> Call<'_, pb::NodeInfoResponse>;
    /// Creates (or returns the existing) capsule.
    fn create_capsule(&self, req: pb::CreateCapsuleRequest) -> Call<'_, pb::Capsule>;
    /// One capsule, with fields no event carries (last activity).
    fn get_capsule(&self, uid: String) -> Call<'_, pb::Capsule>;
    /// Every capsule on the node.
    fn list_capsules(&self) -> Call<'_, Vec<pb::Capsule>>;
    /// Deletes a capsule; `false` when it was already gone.
    fn delete_capsule(&self, uid: String) -> Call<'_, bool>;
    /// Running → Paused.
    fn pause_capsule(&self, uid: String) -> Call<'_, pb::Capsule>;
    /// Paused or Suspended → Running.
    fn resume_capsule(&self, uid: String) -> Call<'_, pb::Capsule>;
    /// Running or Paused → Suspended.
    fn suspend_capsule(&self, uid: String) -> Call<'_, pb::Capsule>;
    /// Replaces a capsule's egress policy; answers once the node enforces it.
    fn update_network(&self, req: pb::UpdateNetworkRequest) -> Call<'_, pb::Capsule>;
    /// Snapshots a capsule into the named snapshot.
    fn snapshot_capsule(&self, req: pb::SnapshotCapsuleRequest) -> Call<'_, pb::Snapshot>;
    /// Deletes a snapshot's files; `false` when already gone.
    fn delete_snapshot(&self, id: String) -> Call<'_, bool>;
    /// Starts or reports a template's preparation (answers at once).
    fn prepare_template(&self, req: pb::PrepareTemplateRequest) -> Call<'_, pb::TemplateState>;
    /// State changes of every capsule after sequence `after` (0: from now, after SYNC events).
    fn watch_events(&self, after: u64) -> Call<'_, Events>;
    /// Metric samples of one capsule.
    fn get_metrics(&self, req: pb::GetMetricsRequest) -> Call<'_, pb::GetMetricsResponse>;
}

/// Makes a [`NodeAgent`] for a node at an address (the pool calls it on
/// discovery and whenever the address changes).
pub trait Connector: Send + Sync + 'static {
    /// A client for `node` at `addr`; connecting may be lazy.
    fn connect(&self, node: &str, addr: SocketAddr) -> Result<Arc<dyn NodeAgent>, Error>;
}

/// Connects [`GrpcNodeAgent`]s with mutual TLS.
#[derive(Clone, Debug)]
pub struct GrpcConnector {
    /// TLS identity and trust.
    pub tls: ClientTls,
    /// Per-call deadline (streams excepted).
    pub timeout: Duration,
}

impl GrpcConnector {
    /// A lazily connecting channel to `node`'s agent at `addr`, for callers
    /// that use RPCs [`NodeAgent`] does not cover (the gateway's data plane).
    pub fn channel(&self, node: &str, addr: SocketAddr) -> Result<Channel, Error> {
        // http: TLS is the connector's, which re-reads rotated certificates.
        Ok(Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Call {
                call: "connect",
                node: node.to_string(),
                status: tonic::Status::invalid_argument(e.to_string()),
            })?
            // Covers TCP and TLS. Dead peers are found by HTTP/2 pings
            // (TCP keepalive settings would not reach our connector).
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(self.tls.connector()))
    }
}

impl Connector for GrpcConnector {
    fn connect(&self, node: &str, addr: SocketAddr) -> Result<Arc<dyn NodeAgent>, Error> {
        let channel = self.channel(node, addr)?;
        Ok(Arc::new(GrpcNodeAgent {
            node: node.to_string(),
            client: NodeAgentClient::new(channel),
            timeout: self.timeout,
        }))
    }
}

/// A node agent reached over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcNodeAgent {
    node: String,
    client: NodeAgentClient<Channel>,
    timeout: Duration,
}

impl GrpcNodeAgent {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// For calls that wait for a guest to boot or restore (and, for a
    /// template from an image, for its disk to be built): the agent answers
    /// once the guest agent is ready, which takes minutes without KVM.
    fn boot_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout * 20);
        req
    }

    /// The span of one call: node and RPC, under the reconcile's span.
    fn span(&self, call: &'static str) -> tracing::Span {
        tracing::debug_span!("agent", node = %self.node, call)
    }

    fn fail(&self, call: &'static str) -> impl FnOnce(tonic::Status) -> Error + '_ {
        move |status| Error::Call {
            call,
            node: self.node.clone(),
            status,
        }
    }
}

impl NodeAgent for GrpcNodeAgent {
    fn node_info(&self) -> Call<'_, pb::NodeInfoResponse> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.node_info(self.request(pb::NodeInfoRequest {}))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("NodeInfo"))
            }
            .instrument(self.span("NodeInfo")),
        )
    }

    fn create_capsule(&self, req: pb::CreateCapsuleRequest) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.create_capsule(self.boot_request(req))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("CreateCapsule"))
            }
            .instrument(self.span("CreateCapsule")),
        )
    }

    fn list_capsules(&self) -> Call<'_, Vec<pb::Capsule>> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.list_capsules(self.request(pb::ListCapsulesRequest {}))
                    .await
                    .map(|r| r.into_inner().capsules)
                    .map_err(self.fail("ListCapsules"))
            }
            .instrument(self.span("ListCapsules")),
        )
    }

    fn delete_capsule(&self, uid: String) -> Call<'_, bool> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.delete_capsule(self.request(pb::CapsuleRef { uid }))
                    .await
                    .map(|r| r.into_inner().existed)
                    .map_err(self.fail("DeleteCapsule"))
            }
            .instrument(self.span("DeleteCapsule")),
        )
    }

    fn pause_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.pause_capsule(self.request(pb::CapsuleRef { uid }))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("PauseCapsule"))
            }
            .instrument(self.span("PauseCapsule")),
        )
    }

    fn resume_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.resume_capsule(self.boot_request(pb::CapsuleRef { uid }))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("ResumeCapsule"))
            }
            .instrument(self.span("ResumeCapsule")),
        )
    }

    fn suspend_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.suspend_capsule(self.request(pb::CapsuleRef { uid }))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("SuspendCapsule"))
            }
            .instrument(self.span("SuspendCapsule")),
        )
    }

    fn update_network(&self, req: pb::UpdateNetworkRequest) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.update_network(self.request(req))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("UpdateNetwork"))
            }
            .instrument(self.span("UpdateNetwork")),
        )
    }

    fn snapshot_capsule(&self, req: pb::SnapshotCapsuleRequest) -> Call<'_, pb::Snapshot> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                // Writing memory to disk takes longer than an ordinary call.
                let mut r = tonic::Request::new(req);
                r.set_timeout(self.timeout * 20);
                c.snapshot_capsule(r)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("SnapshotCapsule"))
            }
            .instrument(self.span("SnapshotCapsule")),
        )
    }

    fn delete_snapshot(&self, id: String) -> Call<'_, bool> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.delete_snapshot(self.request(pb::SnapshotRef { id }))
                    .await
                    .map(|r| r.into_inner().existed)
                    .map_err(self.fail("DeleteSnapshot"))
            }
            .instrument(self.span("DeleteSnapshot")),
        )
    }

    fn get_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.get_capsule(self.request(pb::CapsuleRef { uid }))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("GetCapsule"))
            }
            .instrument(self.span("GetCapsule")),
        )
    }

    fn prepare_template(&self, req: pb::PrepareTemplateRequest) -> Call<'_, pb::TemplateState> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.prepare_template(self.request(req))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("PrepareTemplate"))
            }
            .instrument(self.span("PrepareTemplate")),
        )
    }

    fn watch_events(&self, after: u64) -> Call<'_, Events> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                let stream = c
                    .watch_events(pb::WatchEventsRequest { after })
                    .await
                    .map_err(self.fail("WatchEvents"))?
                    .into_inner();
                let node = self.node.clone();
                Ok(stream
                    .map(move |r| {
                        r.map_err(|status| Error::Call {
                            call: "WatchEvents",
                            node: node.clone(),
                            status,
                        })
                    })
                    .boxed())
            }
            .instrument(self.span("WatchEvents")),
        )
    }

    fn get_metrics(&self, req: pb::GetMetricsRequest) -> Call<'_, pb::GetMetricsResponse> {
        Box::pin(
            async move {
                let mut c = self.client.clone();
                c.get_metrics(self.request(req))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(self.fail("GetMetrics"))
            }
            .instrument(self.span("GetMetrics")),
        )
    }
}

/// The plan's view of an agent's capsule.
pub fn to_vm(c: &pb::Capsule) -> Vm {
    use pb::CapsuleState as S;
    let state = match S::try_from(c.state).unwrap_or(S::Unspecified) {
        S::Unspecified | S::Creating => VmState::Creating,
        S::Running => VmState::Running,
        S::Pausing => VmState::Pausing,
        S::Paused => VmState::Paused,
        S::Suspending => VmState::Suspending,
        S::Suspended => VmState::Suspended,
        S::Resuming => VmState::Resuming,
        S::Snapshotting => VmState::Snapshotting,
        S::Deleting => VmState::Deleting,
        S::Failed => VmState::Failed,
        S::Stopped => VmState::Stopped,
    };
    Vm {
        state,
        ip: Some(c.ip.clone()).filter(|ip| !ip.is_empty()),
        vmm: c.vmm.as_ref().map(|v| VmmInfo {
            name: v.name.clone(),
            version: v.version.clone(),
            note: Some(v.note.clone()).filter(|n| !n.is_empty()),
        }),
        started_unix_nanos: c.started_unix_nanos,
        // Empty, or a reason of a newer agent: the operator's own stands.
        reason: c.reason.parse().ok(),
        message: c.message.clone(),
        egress: c
            .spec
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(to_egress)
            .unwrap_or_default(),
        host_ports: c
            .host_ports
            .iter()
            .filter_map(|h| {
                Some((
                    u16::try_from(h.port).ok()?,
                    u16::try_from(h.host_port).ok()?,
                ))
            })
            .collect(),
    }
}

/// The plan's view of a wire network policy: egress, names, and the published
/// ports (TCP with sources; the others are the data plane's alone).
pub fn to_egress(n: &pb::NetworkPolicy) -> EgressPolicy {
    let dns = n.dns.as_ref().map(|d| crate::plan::DnsPolicy {
        nameservers: d.nameservers.clone(),
        searches: d.searches.clone(),
        options: d.options.clone(),
        block_under_deny: d.block_under_deny,
    });
    EgressPolicy::new(n.egress == pb::Egress::Deny as i32, n.allow_cidrs.clone())
        .with_names(n.allow_hosts.clone(), dns)
        .with_ports(
            n.ports
                .iter()
                .filter(|p| p.protocol == "TCP" && !p.from_cidrs.is_empty())
                .filter_map(|p| {
                    Some(PublishedPort {
                        port: u16::try_from(p.port).ok()?,
                        from: p.from_cidrs.clone(),
                    })
                }),
        )
}
