//! The bed's node agent: the real gRPC server with its mutual TLS and the
//! real supervisor over fakes of VMM, network and disks, and a capsule
//! booted on it as the operator would, with a real guest agent.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use wrenn_e2e::gateway::HostGuest;
use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::guest::{GuestClient, InitParams};
use wrenn_node_agent::images::ImageDirs;
use wrenn_node_agent::server::{AgentService, serve_with};
use wrenn_node_agent::tls::{ClientNames, PortConfig, TlsFiles};
use wrenn_node_agent::vmm::FakeMachine;
use wrenn_proto::agent::v1 as pb;

use super::{NODE, NS, eventually};

/// The node agent: real gRPC server and mutual TLS serving the operator
/// and the gateway, real supervisor over fakes of VMM, network and disks.
pub(super) struct Agent {
    pub(super) sup: Supervisor<FakeMachine>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

pub(super) async fn start_agent(listener: tokio::net::TcpListener, pki: &Path) -> Agent {
    wrenn_node_agent::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("kernels")).unwrap();
    std::fs::write(images.join("base.ext4"), b"ext4").unwrap();
    std::fs::write(images.join("kernels/vmlinux"), b"kernel").unwrap();
    let state = dir.path().join("state");
    let image_dirs = ImageDirs::new(std::slice::from_ref(&images), &state).unwrap();
    let sup = Supervisor::new(
        Host::fakes(),
        SupervisorConfig::new(&state, Path::new("/k/vmlinux")),
    );
    let service = AgentService::on_host(NODE, &sup, dir.path())
        .with_image_dirs(image_dirs)
        .with_console_root(sup.layout().vmm_root());
    let mut port = PortConfig::new(TlsFiles {
        cert: pki.join("agent.crt"),
        key: pki.join("agent.key"),
        client_ca: pki.join("clients-ca.crt"),
    });
    port.client_names = ClientNames::new(["wrenn-operator", "wrenn-gateway"]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_with(listener, port, service, async {
            let _ = stopped.await;
        })
        .await
    });
    Agent {
        sup,
        _stop: stop,
        _dir: dir,
    }
}

/// A client of the agent at `addr` presenting `who`'s certificate from
/// `pki` (`<who>.crt`, `<who>.key`), trusting the agents' CA there.
pub(super) async fn agent_client_as(
    pki: &Path,
    addr: SocketAddr,
    who: &str,
) -> pb::node_agent_client::NodeAgentClient<tonic::transport::Channel> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("agents-ca.crt")))
        .identity(Identity::from_pem(
            read(&format!("{who}.crt")),
            read(&format!("{who}.key")),
        ))
        .domain_name("wrenn-node-agent");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::node_agent_client::NodeAgentClient::new(channel)
}

/// Creates capsule `uid` on the agent as the operator does (its own client
/// certificate) and gives it a real guest agent; returns the guest.
pub(super) async fn boot(agent: &Agent, addr: SocketAddr, pki: &Path, uid: &str) -> HostGuest {
    let mut op = agent_client_as(pki, addr, "operator").await;
    let created = op
        .create_capsule(pb::CreateCapsuleRequest {
            uid: uid.into(),
            spec: Some(pb::CapsuleSpec {
                namespace: NS.into(),
                name: "box".into(),
                source: Some(pb::BootSource {
                    source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                        key: format!("{NS}/base@sha256:1"),
                        disk: Some(pb::template_disk::Disk::RootfsPath("base.ext4".into())),
                        digest: "sha256:1".into(),
                        disk_bytes: 1 << 30,
                    })),
                }),
                resources: Some(pb::Resources {
                    vcpus: 1,
                    memory_bytes: 256 << 20,
                    disk_bytes: 1 << 30,
                }),
                ..Default::default()
            }),
            initial_state: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.state,
        pb::CapsuleState::Running as i32,
        "{created:?}"
    );
    let view = agent.sup.get(uid).unwrap();
    let vsock = view.vsock_socket.unwrap();
    std::fs::create_dir_all(vsock.parent().unwrap()).unwrap();
    let guest = HostGuest::start(&vsock).unwrap();
    let token = view.guest_token.unwrap();
    let mut client = eventually(Duration::from_secs(30), "the guest agent answers", || {
        let vsock = vsock.clone();
        async move {
            GuestClient::connect(uid, &vsock)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    client
        .init(&InitParams {
            env: Default::default(),
            hostname: String::new(),
            access_token: token.expose().to_string(),
            send_wall_time: false,
        })
        .await
        .unwrap();
    guest
}
