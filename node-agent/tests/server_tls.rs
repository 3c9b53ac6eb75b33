//! The agent's gRPC server over real TLS on loopback: only clients whose
//! certificate the configured CA signed get an answer. Certificates are made
//! in the test with rcgen; nothing is mocked between client and server.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use rcgen::{
    CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use wrenn_node_agent::node::NodePaths;
use wrenn_node_agent::server::{AgentIdentity, AgentService, serve};
use wrenn_node_agent::tls::TlsFiles;
use wrenn_proto::agent::v1::NodeInfoRequest;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_testkit::{Tier, case};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key, both PEM.
    fn leaf(&self, cn: &str, server: bool) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Agent {
    addr: std::net::SocketAddr,
    ca: Ca,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), wrenn_node_agent::server::Error>>,
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn start_agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("wrenn test CA");
    let (cert, key) = ca.leaf("node-a", true);
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &cert),
        key: write(dir.path(), "tls.key", &key),
        client_ca: write(dir.path(), "ca.crt", &ca.pem()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AgentService::new(
        AgentIdentity {
            node_name: "node-a".into(),
            vmm: None,
            storage_backend: "qcow2".into(),
        },
        NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir: dir.path().to_path_buf(),
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        serve(listener, &files, service, async {
            let _ = stopped.await;
        })
        .await
    });
    Agent {
        addr,
        ca,
        _dir: dir,
        stop: Some(stop),
        task,
    }
}

impl Agent {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops when asked")
            .unwrap();
        res.unwrap();
    }
}

/// Calls NodeInfo with `identity` (or none), trusting `server_ca`.
async fn node_info(
    addr: std::net::SocketAddr,
    server_ca: &str,
    identity: Option<(String, String)>,
) -> Result<String, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let reply = NodeAgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner().node_name)
}

#[tokio::test]
async fn client_signed_by_the_configured_ca_gets_node_info() {
    let _c = case(
        Tier::Unit,
        "server_tls::client_signed_by_the_configured_ca_gets_node_info",
    );
    wrenn_node_agent::tls::install_crypto_provider();
    let agent = start_agent().await;
    let client = agent.ca.leaf("wrenn-operator", false);
    let name = node_info(agent.addr, &agent.ca.pem(), Some(client)).await;
    assert_eq!(name, Ok("node-a".to_string()));
    agent.stop().await;
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let _c = case(Tier::Unit, "server_tls::client_from_another_ca_is_refused");
    wrenn_node_agent::tls::install_crypto_provider();
    let agent = start_agent().await;
    let stranger = Ca::new("someone else's CA").leaf("wrenn-operator", false);
    let res = node_info(agent.addr, &agent.ca.pem(), Some(stranger)).await;
    assert!(
        res.is_err(),
        "a certificate from another CA was accepted: {res:?}"
    );
    // The server keeps serving good clients after refusing a bad one.
    let good = agent.ca.leaf("wrenn-operator", false);
    assert_eq!(
        node_info(agent.addr, &agent.ca.pem(), Some(good)).await,
        Ok("node-a".to_string())
    );
    agent.stop().await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let _c = case(
        Tier::Unit,
        "server_tls::client_without_a_certificate_is_refused",
    );
    wrenn_node_agent::tls::install_crypto_provider();
    let agent = start_agent().await;
    let res = node_info(agent.addr, &agent.ca.pem(), None).await;
    assert!(
        res.is_err(),
        "a client without a certificate was accepted: {res:?}"
    );
    agent.stop().await;
}

#[test]
fn wrong_files_are_named_at_start_up() {
    let _c = case(Tier::Unit, "server_tls::wrong_files_are_named_at_start_up");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let (cert, key) = ca.leaf("node-a", true);
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &cert),
        // A certificate where the key should be: the classic swapped flag.
        key: write(dir.path(), "tls.key", &cert),
        client_ca: write(dir.path(), "ca.crt", &ca.pem()),
    };
    let err = files.server_config().unwrap_err().to_string();
    assert!(
        err.contains("tls.key") && err.contains("private key"),
        "{err}"
    );
    let missing = TlsFiles {
        key: write(dir.path(), "good.key", &key),
        client_ca: dir.path().join("absent.crt"),
        ..files
    };
    let err = missing.server_config().unwrap_err().to_string();
    assert!(
        err.contains("absent.crt") && err.contains("client CA"),
        "{err}"
    );
}
