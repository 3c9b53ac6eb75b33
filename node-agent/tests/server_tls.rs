//! The agent's gRPC port over real TLS on loopback, attacked as a stranger
//! on the node network would: only clients whose certificate the configured
//! CA signed AND that name an allowed client get an answer; a peer that
//! never finishes its handshake is dropped after the deadline and delays
//! nobody; connections beyond the cap are closed while held ones keep
//! working; rotated certificate files are served to the next connection
//! without a restart. Certificates are made in the test with rcgen; nothing
//! is mocked between client and server.
#![allow(clippy::unwrap_used)]

mod agent_bed;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_bed::{Ca, channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::server::serve_with;
use wrenn_node_agent::tls::{ClientNames, PortConfig, TlsFiles};
use wrenn_proto::agent::v1::NodeInfoRequest;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_testkit::{SecretVolume, Tier, case, eventually_async};

fn files(volume: &SecretVolume) -> TlsFiles {
    TlsFiles {
        cert: volume.path("tls.crt"),
        key: volume.path("tls.key"),
        client_ca: volume.path("ca.crt"),
    }
}

struct Agent {
    addr: SocketAddr,
    /// Signs the agent's server certificate.
    server_ca: Ca,
    /// Signs clients the agent trusts.
    client_ca: Ca,
    volume: SecretVolume,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), wrenn_node_agent::server::Error>>,
}

async fn start_agent() -> Agent {
    start_agent_with(|_| {}).await
}

/// An agent on loopback; `tune` adjusts the port settings.
async fn start_agent_with(tune: impl FnOnce(&mut PortConfig)) -> Agent {
    wrenn_node_agent::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("wrenn test agent CA");
    let client_ca = Ca::new("wrenn test client CA");
    let (cert, key) = server_ca.server();
    let volume = SecretVolume::new(dir.path(), &cert, &key, &client_ca.pem());
    let mut port = PortConfig::new(files(&volume));
    port.reload_every = Duration::from_millis(100);
    tune(&mut port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sup = Supervisor::new(
        Host::fakes(),
        SupervisorConfig::new(&dir.path().join("state"), Path::new("/k/vmlinux")),
    );
    let service = agent_bed::service(&sup, dir.path());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        serve_with(listener, port, service, async {
            let _ = stopped.await;
        })
        .await
    });
    Agent {
        addr,
        server_ca,
        client_ca,
        volume,
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

    /// NodeInfo over a new connection with the operator's certificate.
    async fn operator_node_info(&self) -> Result<String, String> {
        ask(self.operator_channel().await?).await
    }

    /// A connected channel for the operator's certificate.
    async fn operator_channel(&self) -> Result<Channel, String> {
        channel(
            self.addr,
            &self.server_ca.pem(),
            Some(self.client_ca.operator()),
        )
        .await
    }
}

async fn ask(channel: Channel) -> Result<String, String> {
    let reply = NodeAgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner().node_name)
}

/// Calls NodeInfo with `identity` (or none), trusting `server_ca`.
async fn node_info(
    addr: SocketAddr,
    server_ca: &str,
    identity: Option<(String, String)>,
) -> Result<String, String> {
    ask(channel(addr, server_ca, identity).await?).await
}

/// Reads until the peer closes; `Some(elapsed)` if it did within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(t0.elapsed()), stream.read(&mut buf)).await
        {
            Ok(Ok(0) | Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn the_operators_certificate_gets_node_info() {
    let _c = case(
        Tier::Unit,
        "server_tls::the_operators_certificate_gets_node_info",
    );
    let agent = start_agent().await;
    assert_eq!(agent.operator_node_info().await, Ok("node-a".to_string()));
    agent.stop().await;
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let _c = case(Tier::Unit, "server_tls::client_from_another_ca_is_refused");
    let agent = start_agent().await;
    let stranger = Ca::new("someone else's CA").operator();
    let res = node_info(agent.addr, &agent.server_ca.pem(), Some(stranger)).await;
    assert!(
        res.is_err(),
        "a certificate from another CA was accepted: {res:?}"
    );
    // The server keeps serving good clients after refusing a bad one.
    assert_eq!(agent.operator_node_info().await, Ok("node-a".to_string()));
    agent.stop().await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let _c = case(
        Tier::Unit,
        "server_tls::client_without_a_certificate_is_refused",
    );
    let agent = start_agent().await;
    let res = node_info(agent.addr, &agent.server_ca.pem(), None).await;
    assert!(
        res.is_err(),
        "a client without a certificate was accepted: {res:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn client_from_the_right_ca_with_the_wrong_name_is_refused() {
    let _c = case(
        Tier::Unit,
        "server_tls::client_from_the_right_ca_with_the_wrong_name_is_refused",
    );
    // The agent serves the operator and a gateway, nobody else.
    let agent = start_agent_with(|p| {
        p.client_names = ClientNames::new(["wrenn-operator", "wrenn-gateway"]).unwrap();
    })
    .await;
    let ca = agent.server_ca.pem();
    for (what, cn, sans) in [
        ("another name", "wrenn-intruder", &[][..]),
        (
            "an allowed name as a suffix",
            "x",
            &["wrenn-operator.evil"][..],
        ),
        (
            "an allowed name as a prefix",
            "evil.wrenn-operator",
            &[][..],
        ),
        ("no names at all", "", &[][..]),
    ] {
        let res = node_info(agent.addr, &ca, Some(agent.client_ca.client(cn, sans))).await;
        assert!(res.is_err(), "{what}: a wrong name was accepted: {res:?}");
    }
    // Each allowed name, in the CN or in a SAN, is served.
    for identity in [
        agent.client_ca.operator(),
        agent.client_ca.client("x", &["wrenn-gateway"]),
    ] {
        assert_eq!(
            node_info(agent.addr, &ca, Some(identity)).await,
            Ok("node-a".to_string())
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_dropped_and_blocks_nobody() {
    let _c = case(
        Tier::Unit,
        "server_tls::a_handshake_that_never_finishes_is_dropped_and_blocks_nobody",
    );
    let deadline = Duration::from_secs(1);
    let agent = start_agent_with(|p| p.limits.handshake_timeout = deadline).await;
    // One peer says nothing at all, one stops in the middle of a ClientHello.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(agent.addr).await.unwrap();
    let mut partial = TcpStream::connect(agent.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();

    // The operator is served while both hang.
    let t0 = Instant::now();
    assert_eq!(agent.operator_node_info().await, Ok("node-a".to_string()));
    assert!(
        t0.elapsed() < deadline,
        "the operator waited {:?} behind stalled handshakes",
        t0.elapsed()
    );

    // Both are closed by the agent once the deadline passed, not before.
    for (what, s) in [("silent", &mut silent), ("partial", &mut partial)] {
        if closed_within(s, deadline * 5).await.is_none() {
            panic!(
                "{what} peer still open {:?} after connecting",
                opened.elapsed()
            );
        }
        let after = opened.elapsed();
        assert!(
            after + Duration::from_millis(100) >= deadline,
            "{what} peer closed after {after:?}, before the deadline"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_while_held_ones_work() {
    let _c = case(
        Tier::Unit,
        "server_tls::connections_beyond_the_cap_are_refused_while_held_ones_work",
    );
    let agent = start_agent_with(|p| {
        p.limits.max_connections = 2;
        p.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // Slot 1: the operator's established channel. Slot 2: a stalled peer.
    let held = agent.operator_channel().await.unwrap();
    assert_eq!(ask(held.clone()).await, Ok("node-a".to_string()));
    let stalled = TcpStream::connect(agent.addr).await.unwrap();

    // A third connection is closed at once, whoever it is.
    let mut third = TcpStream::connect(agent.addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2))
            .await
            .is_some(),
        "a connection beyond the cap was kept open"
    );
    let refused = agent.operator_channel().await;
    assert!(refused.is_err(), "a connection beyond the cap was served");

    // The held connection keeps working.
    assert_eq!(ask(held.clone()).await, Ok("node-a".to_string()));

    // A freed slot serves the next client.
    drop(stalled);
    eventually_async(
        Duration::from_secs(5),
        "the slot of a closed connection was not freed",
        || async {
            match agent.operator_channel().await {
                Ok(ch) => ask(ch).await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    drop(held);
    agent.stop().await;
}

#[tokio::test]
async fn rotated_certificate_files_are_served_to_the_next_connection() {
    let _c = case(
        Tier::Unit,
        "server_tls::rotated_certificate_files_are_served_to_the_next_connection",
    );
    let mut agent = start_agent().await;
    let before = agent.operator_channel().await.unwrap();
    assert_eq!(ask(before.clone()).await, Ok("node-a".to_string()));

    // Rotate everything: a server certificate from a new agent CA and a new
    // client CA, swapped in as the kubelet swaps a Secret volume.
    let new_server_ca = Ca::new("rotated agent CA");
    let new_client_ca = Ca::new("rotated client CA");
    let (cert, key) = new_server_ca.server();
    agent.volume.rotate(&cert, &key, &new_client_ca.pem());

    let (addr, new_ca) = (agent.addr, new_server_ca.pem());
    eventually_async(
        Duration::from_secs(5),
        "no new connection got the rotated certificate",
        || {
            let id = new_client_ca.operator();
            let ca = new_ca.clone();
            async move { node_info(addr, &ca, Some(id)).await.is_ok() }
        },
    )
    .await;
    // The old server certificate and the old client CA are gone for new
    // connections; the connection made before keeps working.
    let old = node_info(
        agent.addr,
        &agent.server_ca.pem(),
        Some(agent.client_ca.operator()),
    )
    .await;
    assert!(old.is_err(), "the old certificates still work: {old:?}");
    let old_client = node_info(agent.addr, &new_ca, Some(agent.client_ca.operator())).await;
    assert!(old_client.is_err(), "the old client CA is still trusted");
    assert_eq!(ask(before).await, Ok("node-a".to_string()));
    agent.stop().await;
}

#[tokio::test]
async fn a_half_written_rotation_keeps_the_certificates_that_work() {
    let _c = case(
        Tier::Unit,
        "server_tls::a_half_written_rotation_keeps_the_certificates_that_work",
    );
    let agent = start_agent().await;
    // Serving first: the agent loads its files when its task first runs,
    // and a half-written pair at start-up is refused outright (another test).
    assert_eq!(agent.operator_node_info().await, Ok("node-a".to_string()));
    // A new certificate whose key has not arrived yet (written in place,
    // not through the Secret swap): the agent must not serve a certificate
    // it cannot prove, nor stop serving the old one.
    let new_ca = Ca::new("next agent CA");
    let (cert, key) = new_ca.server();
    let data = std::fs::canonicalize(agent.volume.path("tls.crt")).unwrap();
    std::fs::write(&data, &cert).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        agent.operator_node_info().await,
        Ok("node-a".to_string()),
        "a mismatched certificate and key replaced the working pair"
    );
    // The key arrives: the new pair is served.
    let key_path = std::fs::canonicalize(agent.volume.path("tls.key")).unwrap();
    std::fs::write(key_path, &key).unwrap();
    let (addr, ca) = (agent.addr, new_ca.pem());
    let id = agent.client_ca.operator();
    eventually_async(
        Duration::from_secs(5),
        "the completed rotation was not picked up",
        || {
            let (ca, id) = (ca.clone(), id.clone());
            async move { node_info(addr, &ca, Some(id)).await.is_ok() }
        },
    )
    .await;
    agent.stop().await;
}

#[test]
fn wrong_files_are_named_at_start_up() {
    let _c = case(Tier::Unit, "server_tls::wrong_files_are_named_at_start_up");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let (cert, key) = ca.server();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let names = ClientNames::default();
    let files = TlsFiles {
        cert: write("tls.crt", &cert),
        // A certificate where the key should be: the classic swapped flag.
        key: write("tls.key", &cert),
        client_ca: write("ca.crt", &ca.pem()),
    };
    let err = files.server_config(&names).unwrap_err().to_string();
    assert!(
        err.contains("tls.key") && err.contains("private key"),
        "{err}"
    );
    // Another certificate's key: refused as a pair, naming both files.
    let (_, other_key) = ca.server();
    let mismatched = TlsFiles {
        key: write("other.key", &other_key),
        ..files.clone()
    };
    let err = mismatched.server_config(&names).unwrap_err().to_string();
    assert!(
        err.contains("tls.crt") && err.contains("other.key"),
        "{err}"
    );
    let missing = TlsFiles {
        key: write("good.key", &key),
        client_ca: dir.path().join("absent.crt"),
        ..files
    };
    let err = missing.server_config(&names).unwrap_err().to_string();
    assert!(
        err.contains("absent.crt") && err.contains("client CA"),
        "{err}"
    );
}
