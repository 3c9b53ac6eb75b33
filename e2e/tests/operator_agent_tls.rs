//! The operator's tonic client (`GrpcNodeAgent` through `GrpcConnector`)
//! against the real node-agent gRPC server over mutual TLS on loopback.
//! Certificates are made here with rcgen; nothing between client and
//! server is faked. Covers identity (CA and name on both sides) and
//! rotation of the operator's certificate files without a restart.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::server::{AgentService, serve};
use wrenn_node_agent::tls::TlsFiles;
use wrenn_operator::agent::{ClientTls, Connector, GrpcConnector, NodeAgent};
use wrenn_testkit::{SecretVolume, Tier, case};

type Issuer = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Issuer {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A server certificate carrying the name the operator checks
/// (`wrenn-node-agent`), as the chart issues them.
fn server_leaf(issuer: &Issuer) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "leaf");
    params.subject_alt_names = vec![SanType::DnsName("wrenn-node-agent".try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client certificate named `cn` (the chart names the operator's
/// `wrenn-operator`, the only name the agent serves by default).
fn client_leaf(issuer: &Issuer, cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Agent {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), wrenn_node_agent::server::Error>>,
}

/// The real agent server on loopback: server certificate from `agents_ca`,
/// trusting clients of `operators_ca`.
async fn start_agent(dir: &Path, agents_ca: &Issuer, operators_ca: &Issuer) -> Agent {
    let (cert, key) = server_leaf(agents_ca);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let files = TlsFiles {
        cert: write("agent.crt", &cert),
        key: write("agent.key", &key),
        client_ca: write("client-ca.crt", &operators_ca.pem()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sup = Supervisor::new(
        Host::fakes(),
        SupervisorConfig::new(&dir.join("state"), Path::new("/k/vmlinux")),
    );
    let service = AgentService::on_host("node-tls", &sup, dir);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, &files, service, async {
            let _ = stopped.await;
        })
        .await
    });
    Agent { addr, stop, task }
}

impl Agent {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn grpc(tls: ClientTls) -> GrpcConnector {
    GrpcConnector {
        tls,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn grpc_client_speaks_mutual_tls_to_the_real_agent() {
    let _c = case(Tier::Host, "operator_agent_tls::mutual_tls");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let agents_ca = ca("agents");
    let operators_ca = ca("operators");
    let agent = start_agent(dir.path(), &agents_ca, &operators_ca).await;

    let connector = |client_ca: &Issuer, cn: &str| {
        let (c, k) = client_leaf(client_ca, cn);
        grpc(
            ClientTls::from_pem(
                c.into_bytes(),
                k.into_bytes(),
                agents_ca.pem().into_bytes(),
                "wrenn-node-agent",
            )
            .unwrap(),
        )
    };

    let client = connector(&operators_ca, "wrenn-operator")
        .connect("node-tls", agent.addr)
        .unwrap();
    let info = client.node_info().await.unwrap();
    assert_eq!(info.node_name, "node-tls");
    // The capsule RPCs are served over the same connection.
    assert!(client.list_capsules().await.unwrap().is_empty());
    // A refusal keeps its gRPC code, which the controllers act on.
    let err = client.get_capsule("nosuch".into()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert_eq!(err.to_string(), "GetCapsule on node node-tls");

    // A client certificate from another CA gets no answer.
    let stranger = ca("stranger");
    let refused = connector(&stranger, "wrenn-operator")
        .connect("node-tls", agent.addr)
        .unwrap();
    assert!(refused.node_info().await.is_err());

    // Nor does one from the right CA under another name.
    let renamed = connector(&operators_ca, "wrenn-node-agent")
        .connect("node-tls", agent.addr)
        .unwrap();
    assert!(renamed.node_info().await.is_err());

    // An agent whose certificate another CA signed is not trusted.
    let dir2 = tempfile::tempdir().unwrap();
    let impostor = start_agent(dir2.path(), &ca("impostor"), &operators_ca).await;
    let fooled = connector(&operators_ca, "wrenn-operator")
        .connect("node-x", impostor.addr)
        .unwrap();
    assert!(fooled.node_info().await.is_err());

    impostor.stop().await;
    agent.stop().await;
}

#[tokio::test]
async fn a_rotated_operator_certificate_is_used_without_a_restart() {
    let _c = case(
        Tier::Host,
        "operator_agent_tls::a_rotated_operator_certificate_is_used_without_a_restart",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agent_dir = tempfile::tempdir().unwrap();
    let agents_ca = ca("agents");
    let operators_ca = ca("operators");
    let agent = start_agent(agent_dir.path(), &agents_ca, &operators_ca).await;

    // The operator starts with a certificate the agent refuses (an old CA,
    // as after the cluster's client CA was replaced).
    let op_dir = tempfile::tempdir().unwrap();
    let (c, k) = client_leaf(&ca("retired operators CA"), "wrenn-operator");
    let mut volume = SecretVolume::new(op_dir.path(), &c, &k, &agents_ca.pem());
    let tls = ClientTls::from_files(
        &volume.path("tls.crt"),
        &volume.path("tls.key"),
        &volume.path("ca.crt"),
        "wrenn-node-agent",
    )
    .unwrap();
    let client = grpc(tls).connect("node-tls", agent.addr).unwrap();
    assert!(
        client.node_info().await.is_err(),
        "the agent accepted a certificate from a CA it does not trust"
    );

    // The Secret is re-issued; the same client (same process, same
    // channel) is served once it dials again.
    let (c, k) = client_leaf(&operators_ca, "wrenn-operator");
    volume.rotate(&c, &k, &agents_ca.pem());
    let served = wait_served(client.as_ref(), Duration::from_secs(10)).await;
    assert!(served, "the rotated operator certificate was not used");
    agent.stop().await;
}

/// Calls NodeInfo until it answers or `within` passed (the channel
/// redials after each failure, with backoff).
async fn wait_served(client: &dyn NodeAgent, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if client.node_info().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn bad_material_is_refused_when_loaded() {
    let _c = case(
        Tier::Unit,
        "operator_agent_tls::bad_material_is_refused_when_loaded",
    );
    let agents_ca = ca("agents");
    let operators_ca = ca("operators");
    let (cert, key) = client_leaf(&operators_ca, "wrenn-operator");
    let (_, other_key) = client_leaf(&operators_ca, "wrenn-operator");
    let err = ClientTls::from_pem(
        cert.clone().into_bytes(),
        other_key.into_bytes(),
        agents_ca.pem().into_bytes(),
        "wrenn-node-agent",
    )
    .unwrap_err();
    assert!(err.to_string().contains("client certificate"), "{err}");
    let err = ClientTls::from_pem(
        cert.into_bytes(),
        key.into_bytes(),
        b"not a certificate".to_vec(),
        "wrenn-node-agent",
    )
    .unwrap_err();
    assert!(err.to_string().contains("agent CA"), "{err}");
}
