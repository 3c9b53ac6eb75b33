//! The operator's tonic client (`GrpcNodeAgent` through `GrpcConnector`)
//! against the real node-agent gRPC server over mutual TLS on loopback.
//! Certificates are made here with rcgen; nothing between client and
//! server is faked.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rcgen::{
    CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use wrenn_node_agent::node::NodePaths;
use wrenn_node_agent::server::{AgentIdentity, AgentService, serve};
use wrenn_node_agent::tls::TlsFiles;
use wrenn_operator::agent::{ClientTls, Connector, GrpcConnector};
use wrenn_testkit::{Tier, case};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// (cert, key) PEM signed by `issuer`; server certs carry the name the
/// operator checks (`wrenn-node-agent`), as the chart issues them.
fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, server: bool) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "leaf");
    if server {
        params.subject_alt_names = vec![SanType::DnsName("wrenn-node-agent".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn grpc_client_speaks_mutual_tls_to_the_real_agent() {
    let _c = case(Tier::Host, "operator_agent_tls::mutual_tls");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let agents_ca = ca("agents");
    let operators_ca = ca("operators");
    let (cert, key) = leaf(&agents_ca, true);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let files = TlsFiles {
        cert: write("tls.crt", &cert),
        key: write("tls.key", &key),
        client_ca: write("ca.crt", &operators_ca.pem()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AgentService::new(
        AgentIdentity {
            node_name: "node-tls".into(),
            vmm: None,
            storage_backend: "qcow2".into(),
        },
        NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir: dir.path().to_path_buf(),
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve(listener, &files, service, async {
            let _ = stopped.await;
        })
        .await
    });

    let connector = |client_ca: &CertifiedIssuer<'static, KeyPair>| {
        let (c, k) = leaf(client_ca, false);
        GrpcConnector {
            tls: ClientTls::from_pem(
                c.into_bytes(),
                k.into_bytes(),
                agents_ca.pem().into_bytes(),
                "wrenn-node-agent",
            ),
            timeout: Duration::from_secs(5),
        }
    };

    let agent = connector(&operators_ca).connect("node-tls", addr).unwrap();
    let info = agent.node_info().await.unwrap();
    assert_eq!(info.node_name, "node-tls");
    // A refusal keeps its gRPC code, which the controllers act on.
    let err = agent.list_capsules().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unimplemented), "{err}");
    assert_eq!(err.to_string(), "ListCapsules on node node-tls");

    // A client certificate from another CA gets no answer.
    let stranger = ca("stranger");
    let refused = connector(&stranger).connect("node-tls", addr).unwrap();
    assert!(refused.node_info().await.is_err());

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
