//! Tier 2: exec into a capsule with nothing but a kubeconfig, through the
//! real parts. The Go-built kube-apiserver runs with the front-proxy flags;
//! the real `wrenn-gateway` process is registered by an `APIService` and
//! runs as the chart's ServiceAccount (impersonated) with the chart's RBAC,
//! and users hold the chart's roles that aggregate into `edit` and `view`.
//! The node agent is the real gRPC server with its
//! real mutual TLS and capsule supervisor (fake VMM, network and disks),
//! and the capsule's guest agent is the real `wrenn-guest` as a host
//! process behind a vsock shim. Users are static tokens: alice holds the
//! edit role in namespace A, bob the view role; nobody skips authorization.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wrenn_crds::Capsule;
use wrenn_e2e::gateway::{
    GatewayOptions, GatewayProcess, HostGuest, LocalAddr, register_apiservice,
};
use wrenn_e2e::helm::{Helm, chart_dir, documents};
use wrenn_e2e::{ControlPlane, Options, StaticToken};
use wrenn_gateway::exec::{ExecOptions, build_request_path, exit_code_of};
use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::guest::{GuestClient, InitParams};
use wrenn_node_agent::images::ImageDirs;
use wrenn_node_agent::network::FakeNet;
use wrenn_node_agent::node::NodePaths;
use wrenn_node_agent::server::{AgentIdentity, AgentService, serve_with};
use wrenn_node_agent::storage::FakeBlockStore;
use wrenn_node_agent::tls::{ClientNames, PortConfig, TlsFiles};
use wrenn_node_agent::vmm::FakeMachine;
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::{Tier, case, need_program, need_root};

/// The chart's release namespace and name here.
const RELEASE_NS: &str = "wrenn-system";
const RELEASE: &str = "wrenn";
/// The chart names the gateway's Service and ServiceAccount so.
const GATEWAY: &str = "wrenn-gateway";
const NODE: &str = "gw-node";

type Issuer = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Issuer {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf named `cn` (and `dns`, when given) for `usage`, written as
/// `<file>.crt` and `<file>.key` in `dir`.
fn leaf(
    dir: &Path,
    file: &str,
    issuer: &Issuer,
    cn: &str,
    dns: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(d) = dns {
        p.subject_alt_names = vec![SanType::DnsName(d.try_into().unwrap())];
    }
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
}

fn exec_path(ns: &str, capsule: &str, argv: &[&str], stdin: bool) -> String {
    build_request_path(
        ns,
        capsule,
        &ExecOptions {
            command: argv.iter().map(|a| a.to_string()).collect(),
            stdin,
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
}

/// What an exec through the API server gave.
#[derive(Debug, Default)]
struct Ran {
    stdout: String,
    stderr: String,
    status: Value,
}

/// Runs `argv` in `ns/capsule` as the client's user over the WebSocket
/// channel protocol, writing `stdin` then closing it (v5) when given.
async fn exec(
    client: &kube::Client,
    ns: &str,
    capsule: &str,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Ran, kube::Error> {
    let req = http::Request::get(exec_path(ns, capsule, argv, stdin.is_some()))
        .body(Vec::new())
        .unwrap();
    let conn = client.connect(req).await?;
    assert!(conn.supports_stream_close(), "v5.channel.k8s.io negotiated");
    let mut ws = conn.into_stream();
    if let Some(data) = stdin {
        let mut m = vec![0u8];
        m.extend_from_slice(data);
        ws.send(Message::binary(m)).await.unwrap();
        ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    }
    let mut ran = Ran::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Ok(Message::Binary(b)) = msg else {
            continue;
        };
        let Some((&ch, data)) = b.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(data);
        match ch {
            1 => ran.stdout.push_str(&text),
            2 => ran.stderr.push_str(&text),
            3 => ran.status = serde_json::from_str(&text).unwrap(),
            _ => {}
        }
    }
    Ok(ran)
}

fn api_code(r: Result<Ran, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A raw HTTPS GET straight to the gateway, presenting `client` (cert,
/// key) or no certificate, with `headers`; returns the status code, `None`
/// when the TLS handshake refused the client.
async fn direct_get(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&Path, &Path)>,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<u16> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(format!("{GATEWAY}.{RELEASE_NS}.svc")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let head = String::from_utf8_lossy(&out);
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

async fn namespace(client: &kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

async fn bind(client: &kube::Client, ns: &str, user: &str, role: &str) {
    let api: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": format!("{user}-{role}") },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    api.create(&PostParams::default(), &rb).await.unwrap();
}

/// A Capsule in `ns` whose status says `phase` on [`NODE`], written as the
/// operator would; returns its UID.
async fn capsule(client: &kube::Client, ns: &str, name: &str, phase: &str) -> String {
    let api: Api<Capsule> = Api::namespaced(client.clone(), ns);
    let c: Capsule = serde_json::from_value(json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": { "name": name },
        "spec": { "source": { "templateRef": { "name": "base" } } },
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &c).await.unwrap();
    api.patch_status(
        name,
        &PatchParams::apply("wrenn-operator").force(),
        &Patch::Apply(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "status": { "phase": phase, "nodeName": NODE },
        })),
    )
    .await
    .unwrap();
    created.metadata.uid.unwrap()
}

/// Polls `attempt` every 250 ms for up to `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what} not reached: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The node agent: real gRPC server and mutual TLS serving the operator
/// and the gateway, real supervisor over fakes of VMM, network and disks.
struct Agent {
    sup: Supervisor<FakeMachine>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_agent(listener: tokio::net::TcpListener, pki: &Path) -> Agent {
    wrenn_node_agent::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("kernels")).unwrap();
    std::fs::write(images.join("base.ext4"), b"ext4").unwrap();
    std::fs::write(images.join("kernels/vmlinux"), b"kernel").unwrap();
    let state = dir.path().join("state");
    let image_dirs = ImageDirs::new(std::slice::from_ref(&images), &state).unwrap();
    let sup = Supervisor::new(
        Host {
            machine: Arc::new(FakeMachine::new()),
            net: Arc::new(FakeNet::new()),
            store: Arc::new(FakeBlockStore::new()),
        },
        SupervisorConfig::new(&state, Path::new("/k/vmlinux")),
    );
    let service = AgentService::new(
        AgentIdentity {
            node_name: NODE.into(),
            vmm: None,
            storage_backend: "qcow2".into(),
        },
        NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir: dir.path().to_path_buf(),
        },
        Arc::new(sup.clone()),
        sup.metrics().clone(),
    )
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

/// Creates capsule `uid` on the agent as the operator does (its own
/// client certificate) and gives it a real guest agent; returns the guest.
async fn boot(agent: &Agent, addr: SocketAddr, pki: &Path, uid: &str) -> HostGuest {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("agents-ca.crt")))
        .identity(Identity::from_pem(
            read("operator.crt"),
            read("operator.key"),
        ))
        .domain_name("wrenn-node-agent");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut op = pb::node_agent_client::NodeAgentClient::new(channel);
    let created = op
        .create_capsule(pb::CreateCapsuleRequest {
            uid: uid.into(),
            spec: Some(pb::CapsuleSpec {
                namespace: "a".into(),
                name: "box".into(),
                source: Some(pb::BootSource {
                    source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                        key: "a/base@sha256:1".into(),
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

/// Everything a test reaches the gateway through: the control plane with
/// the chart's RBAC, alice (edit in A) and bob (view in A), the node agent
/// with capsule `box` running in A on a real guest agent (`nap` paused in
/// A, `box` in B), the gateway registered by its APIService.
struct Bed {
    _gateway: GatewayProcess,
    _guest: HostGuest,
    agent: Agent,
    _local: LocalAddr,
    certs: tempfile::TempDir,
    serving: Issuer,
    gw_addr: SocketAddr,
    pki_dir: std::path::PathBuf,
    admin: kube::Client,
    alice_c: kube::Client,
    bob_c: kube::Client,
    alice_kc: std::path::PathBuf,
    bob_kc: std::path::PathBuf,
    /// UID of `box` in A.
    uid: String,
    cp: ControlPlane,
}

const NS_A: &str = "team-a";
const NS_B: &str = "team-b";

/// Starts a [`Bed`]; `tag` (1..=9) keeps the links and addresses of tests
/// running at once apart. `Err` names what is missing to run at all.
async fn bed(tag: u8) -> Result<Bed, String> {
    if let Err(why) = need_root()
        .and_then(|()| need_program("ip").map(drop))
        .and_then(|()| need_program("openssl").map(drop))
    {
        return Err(why.to_string());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let alice = StaticToken {
        token: format!("alice-{}", std::process::id()),
        user: "alice".into(),
        groups: vec!["devs".into()],
    };
    let bob = StaticToken {
        token: format!("bob-{}", std::process::id()),
        user: "bob".into(),
        groups: vec!["devs".into()],
    };
    let opts = Options {
        front_proxy: true,
        tokens: vec![alice.clone(), bob.clone()],
    };
    let cp = match tokio::task::spawn_blocking(move || ControlPlane::start_own(&opts))
        .await
        .unwrap()
    {
        Ok(cp) => cp,
        Err(e) => {
            return Err(format!("control plane did not start: {e:#}"));
        }
    };
    let helm = match Helm::find() {
        Ok(h) => h,
        Err(e) => {
            return Err(format!("no helm: {e:#}"));
        }
    };
    let admin = cp.client().await.unwrap();
    let pki_dir = cp.dir().unwrap().join("pki");

    // The chart's RBAC: the gateway's own and the aggregated user roles.
    namespace(&admin, RELEASE_NS).await;
    let chart = chart_dir().display().to_string();
    let rendered = helm
        .ok(&[
            "template",
            RELEASE,
            &chart,
            "-n",
            RELEASE_NS,
            "--kube-version=1.36.3",
            "--show-only",
            "templates/gateway-rbac.yaml",
            "--show-only",
            "templates/user-rbac.yaml",
            "--show-only",
            "templates/serviceaccounts.yaml",
        ])
        .unwrap();
    let docs = documents(&rendered).unwrap();
    assert!(
        docs.iter()
            .any(|d| d["metadata"]["name"] == GATEWAY && d["kind"] == "ServiceAccount")
    );
    let manifest = cp.dir().unwrap().join("gateway-rbac.json");
    std::fs::write(
        &manifest,
        json!({ "apiVersion": "v1", "kind": "List", "items": docs }).to_string(),
    )
    .unwrap();
    cp.kubectl_ok(&["apply", "-f"], Some(&manifest)).unwrap();
    let (ns_a, ns_b) = (NS_A, NS_B);
    namespace(&admin, ns_a).await;
    namespace(&admin, ns_b).await;
    // The chart's roles that aggregate into `edit` and `view` (bound
    // directly: tier A runs no kube-controller-manager to aggregate them).
    bind(&admin, ns_a, "alice", "wrenn-edit").await;
    bind(&admin, ns_a, "bob", "wrenn-view").await;

    // Certificates: agents' CA, the client CA (operator and gateway), and
    // the CA the APIService trusts for the gateway's serving certificate.
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let (agents, clients, serving) = (ca("agents"), ca("clients"), ca("gateway serving"));
    std::fs::write(dir.join("agents-ca.crt"), agents.pem()).unwrap();
    std::fs::write(dir.join("clients-ca.crt"), clients.pem()).unwrap();
    leaf(
        dir,
        "agent",
        &agents,
        "wrenn-node-agent",
        Some("wrenn-node-agent"),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    leaf(
        dir,
        "operator",
        &clients,
        "wrenn-operator",
        None,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    leaf(
        dir,
        "gateway",
        &clients,
        "wrenn-gateway",
        None,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let svc_dns = format!("{GATEWAY}.{RELEASE_NS}.svc");
    leaf(
        dir,
        "serving",
        &serving,
        &svc_dns,
        Some(&svc_dns),
        ExtendedKeyUsagePurpose::ServerAuth,
    );

    // An address the aggregator may dial (not loopback).
    let n = (std::process::id() % 200) as u8 + 20;
    let local = LocalAddr::create(
        &format!("wgw{tag}{}", std::process::id() % 100_000),
        Ipv4Addr::new(10, 254, n, tag),
    )
    .unwrap();
    let agent_listener = tokio::net::TcpListener::bind((local.ip, 0)).await.unwrap();
    let agent_addr = agent_listener.local_addr().unwrap();
    let agent = start_agent(agent_listener, dir).await;

    // The agent's Pod, as the DaemonSet and kubelet would make it.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), RELEASE_NS);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "wrenn-node-agent-gw", "labels": { "app.kubernetes.io/name": "wrenn-node-agent" } },
        "spec": { "nodeName": NODE, "containers": [{ "name": "node-agent", "image": "wrenn/node-agent:test" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ip = local.ip.to_string();
    pods.patch_status(
        "wrenn-node-agent-gw",
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } }),
        ),
    )
    .await
    .unwrap();

    // Capsules: `box` running in A with a real guest agent, `nap` paused in
    // A, and `box` in B.
    let uid = capsule(&admin, ns_a, "box", "Running").await;
    capsule(&admin, ns_a, "nap", "Paused").await;
    capsule(&admin, ns_b, "box", "Running").await;
    let guest = boot(&agent, agent_addr, dir, &uid).await;

    // The gateway as the chart's ServiceAccount, registered by an APIService.
    let kc: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&cp.kubeconfig).unwrap()).unwrap();
    let mut kc = kc;
    kc["users"][0]["user"]["as"] = json!(format!("system:serviceaccount:{RELEASE_NS}:{GATEWAY}"));
    let gw_kubeconfig = cp.dir().unwrap().join("kubeconfig-gateway");
    std::fs::write(&gw_kubeconfig, kc.to_string()).unwrap();
    let gw_listener = std::net::TcpListener::bind((local.ip, 0)).unwrap();
    let gw_addr = gw_listener.local_addr().unwrap();
    drop(gw_listener);
    let gateway = tokio::task::spawn_blocking({
        let o = GatewayOptions {
            kubeconfig: gw_kubeconfig,
            listen: gw_addr,
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            client_cert: dir.join("gateway.crt"),
            client_key: dir.join("gateway.key"),
            agent_ca: dir.join("agents-ca.crt"),
            agent_namespace: RELEASE_NS.into(),
            agent_port: agent_addr.port(),
            log: cp.dir().unwrap().join("gateway.log"),
        };
        move || GatewayProcess::start(&o)
    })
    .await
    .unwrap()
    .unwrap();
    register_apiservice(&admin, RELEASE_NS, GATEWAY, gw_addr, &serving.pem())
        .await
        .unwrap();

    let alice_c = wrenn_e2e::client_from(&cp.kubeconfig_for("alice", &alice.token).unwrap())
        .await
        .unwrap();
    let bob_c = wrenn_e2e::client_from(&cp.kubeconfig_for("bob", &bob.token).unwrap())
        .await
        .unwrap();

    // Discovery through the API server: the group is available.
    eventually(
        Duration::from_secs(90),
        "the APIService serves discovery",
        || {
            let admin = admin.clone();
            async move {
                let req = http::Request::get("/apis/subresources.wrenn.dev/v1alpha1")
                    .body(Vec::new())
                    .unwrap();
                let list: Value = admin.request(req).await.map_err(|e| e.to_string())?;
                (list["resources"][0]["name"] == "capsules/exec")
                    .then_some(())
                    .ok_or_else(|| list.to_string())
            }
        },
    )
    .await;
    let resources = cp
        .kubectl_ok(
            &["api-resources", "--api-group=subresources.wrenn.dev"],
            None,
        )
        .unwrap();
    assert!(!resources.contains("error"), "{resources}");

    let alice_kc = cp.kubeconfig_for("alice", &alice.token).unwrap();
    let bob_kc = cp.kubeconfig_for("bob", &bob.token).unwrap();
    Ok(Bed {
        _gateway: gateway,
        _guest: guest,
        agent,
        _local: local,
        certs,
        serving,
        gw_addr,
        pki_dir,
        admin,
        alice_c,
        bob_c,
        alice_kc,
        bob_kc,
        uid,
        cp,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_through_the_api_server_is_authorized_per_user_and_namespace() {
    let c = case(
        Tier::Cluster,
        "gateway::exec_through_the_api_server_is_authorized_per_user_and_namespace",
    );
    let b = match bed(1).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    let (cp, alice_c, bob_c) = (&b.cp, &b.alice_c, &b.bob_c);
    let (ns_a, ns_b) = (NS_A, NS_B);
    let (alice_kc, bob_kc) = (&b.alice_kc, &b.bob_kc);
    let (gw_addr, serving, dir, pki_dir) = (b.gw_addr, &b.serving, b.certs.path(), &b.pki_dir);
    // The aggregated roles reached edit and view.
    let can_i_on = |resource: &str, kubeconfig: &Path, ns: &str| {
        let out = std::process::Command::new(&cp.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "auth",
                "can-i",
                "create",
                resource,
                "--subresource=exec",
                "-n",
                ns,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // kubectl maps `capsules` to wrenn.dev (a group of subresources only has
    // no top-level resource to map to); the roles grant both groups alike.
    let can_i = |kubeconfig: &Path, ns: &str| can_i_on("capsules", kubeconfig, ns);
    eventually(Duration::from_secs(60), "alice may exec in A", || {
        let a = can_i(alice_kc, ns_a);
        async move { (a == "yes").then_some(()).ok_or(a) }
    })
    .await;
    assert_eq!(can_i(bob_kc, ns_a), "no");
    assert_eq!(can_i(alice_kc, ns_b), "no");

    // alice runs a command in A: stdout, stderr and the exit code arrive.
    let ran = exec(
        alice_c,
        ns_a,
        "box",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(ran.stdout, "out\n", "{ran:?}");
    assert_eq!(ran.stderr, "err\n", "{ran:?}");
    assert_eq!(ran.status["reason"], "NonZeroExitCode", "{ran:?}");
    assert_eq!(exit_code_of(&ran.status), Some(3), "{ran:?}");
    // A closed stdin reaches the process: `cat` ends.
    let ran = exec(
        alice_c,
        ns_a,
        "box",
        &["cat"],
        Some(b"hello through the front door"),
    )
    .await
    .unwrap();
    assert_eq!(ran.stdout, "hello through the front door", "{ran:?}");
    assert_eq!(ran.status["status"], "Success", "{ran:?}");

    // Clear refusals: an unknown capsule names itself, a paused one its phase.
    let (code, msg) = api_code(exec(alice_c, ns_a, "nosuch", &["true"], None).await);
    assert_eq!(code, 404, "{msg}");
    assert!(msg.contains("\"nosuch\""), "{msg}");
    let (code, msg) = api_code(exec(alice_c, ns_a, "nap", &["true"], None).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("Paused"), "{msg}");

    // bob may only view A; alice has nothing in B.
    let (code, msg) = api_code(exec(bob_c, ns_a, "box", &["true"], None).await);
    assert_eq!(code, 403, "{msg}");
    let (code, msg) = api_code(exec(alice_c, ns_b, "box", &["true"], None).await);
    assert_eq!(code, 403, "{msg}");

    // Without credentials the API server refuses (anonymous has no rights).
    let anon_kc = cp.kubeconfig_for("anonymous", "").unwrap();
    let anon = wrenn_e2e::client_from(&anon_kc).await.unwrap();
    let (code, msg) = api_code(exec(&anon, ns_a, "box", &["true"], None).await);
    assert!(code == 401 || code == 403, "{code} {msg}");

    // Straight to the gateway, without the front proxy's certificate, a
    // claimed user is refused; with it, the gateway asks the API server
    // itself and refuses bob in A.
    let path = exec_path(ns_a, "box", &["true"], false);
    let spoof = [
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "system:masters"),
    ];
    assert_eq!(
        direct_get(gw_addr, &serving.pem(), None, &path, &spoof).await,
        Some(401)
    );
    let other_ca = (dir.join("gateway.crt"), dir.join("gateway.key"));
    assert_eq!(
        direct_get(
            gw_addr,
            &serving.pem(),
            Some((&other_ca.0, &other_ca.1)),
            &path,
            &spoof
        )
        .await,
        None,
        "a client certificate from another CA passed as the front proxy"
    );
    let proxy = (
        pki_dir.join("front-proxy-client.crt"),
        pki_dir.join("front-proxy-client.key"),
    );
    let as_bob = [("X-Remote-User", "bob"), ("X-Remote-Group", "devs")];
    assert_eq!(
        direct_get(
            gw_addr,
            &serving.pem(),
            Some((&proxy.0, &proxy.1)),
            &path,
            &as_bob
        )
        .await,
        Some(403)
    );

    // An oversized WebSocket message ends that stream cleanly (a close or
    // a cut connection, no hang); the gateway goes on serving.
    let req = http::Request::get(exec_path(ns_a, "box", &["cat"], true))
        .body(Vec::new())
        .unwrap();
    let mut ws = alice_c.connect(req).await.unwrap().into_stream();
    let _ = ws.send(Message::binary(vec![0u8; 2 << 20])).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an oversized message left the stream open");
    let ran = exec(alice_c, ns_a, "box", &["echo", "still here"], None)
        .await
        .unwrap();
    assert_eq!(ran.stdout, "still here\n", "{ran:?}");
    drop(b);
}

/// A TTY exec: the WebSocket, after the stream-up message.
async fn tty(
    client: &kube::Client,
    argv: &[&str],
) -> impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
+ futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
+ Unpin
+ use<> {
    let path = build_request_path(
        NS_A,
        "box",
        &ExecOptions {
            command: argv.iter().map(|a| a.to_string()).collect(),
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
            ..Default::default()
        },
    );
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    client.connect(req).await.unwrap().into_stream()
}

/// Reads terminal output until the error channel's `Status`; returns the
/// output and the status. With `ctrl_c_after`, once the output shows that
/// text, sends ^C each second until the output shows `until`.
async fn read_tty<S>(ws: &mut S, ctrl_c_after: Option<(&str, &str)>) -> (String, Value)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message>
        + Unpin,
{
    let mut out = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout_at(deadline, ws.next()) => m
                .unwrap_or_else(|_| panic!("no exit status in 60 s; output so far: {out:?}")),
            _ = tick.tick() => {
                if let Some((after, until)) = ctrl_c_after
                    && out.contains(after)
                    && !out.contains(until)
                {
                    let _ = ws.send(Message::binary(vec![0u8, 0x03])).await;
                }
                continue;
            }
        };
        let Some(Ok(Message::Binary(b))) = msg else {
            assert!(msg.is_some(), "stream ended without a status: {out:?}");
            continue;
        };
        match b.split_first() {
            Some((1, data)) => out.push_str(&String::from_utf8_lossy(data)),
            Some((3, data)) => return (out, serde_json::from_slice(data).unwrap()),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tty_exec_resizes_reads_stdin_and_interrupts_with_ctrl_c() {
    let c = case(
        Tier::Cluster,
        "gateway::tty_exec_resizes_reads_stdin_and_interrupts_with_ctrl_c",
    );
    let b = match bed(2).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    // The size reaches the PTY before the line the shell waits for: both
    // travel the one stream in order.
    let mut ws = tty(
        &b.alice_c,
        &[
            "sh",
            "-c",
            "read line; echo \"got $line\"; stty size; exit 7",
        ],
    )
    .await;
    ws.send(Message::binary(
        b"\x04{\"Width\":100,\"Height\":40}".to_vec(),
    ))
    .await
    .unwrap();
    ws.send(Message::binary(b"\x00hello\n".to_vec()))
        .await
        .unwrap();
    let (out, status) = read_tty(&mut ws, None).await;
    assert!(out.contains("got hello"), "{out:?}");
    assert!(
        out.contains("40 100"),
        "stty size after the resize: {out:?}"
    );
    assert_eq!(exit_code_of(&status), Some(7), "{status}");

    // ^C on the terminal interrupts the foreground command (the shell
    // traps it and goes on). Sent again each second until it lands while
    // `sleep` runs: one sent before `sleep` started only runs the trap.
    let started = Instant::now();
    let mut ws = tty(
        &b.alice_c,
        &[
            "sh",
            "-c",
            "trap 'echo trapped' INT; echo ready; sleep 100; echo \"slept $?\"; exit 5",
        ],
    )
    .await;
    let (out, status) = read_tty(&mut ws, Some(("ready", "slept"))).await;
    assert!(
        out.contains("slept 130"),
        "sleep was not interrupted: {out:?}"
    );
    assert_eq!(exit_code_of(&status), Some(5), "{status}");
    assert!(started.elapsed() < Duration::from_secs(60));
    drop(b);
}

fn sub_path(ns: &str, capsule: &str, sub: &str, query: &str) -> String {
    format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{ns}/capsules/{capsule}/{sub}?{query}"
    )
}

/// A request through the API server; the status code and the whole body.
async fn call(
    client: &kube::Client,
    method: http::Method,
    uri: String,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(kube::client::Body::from(body))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let code = resp.status().as_u16();
    (
        code,
        resp.into_body().collect_bytes().await.unwrap().to_vec(),
    )
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar entry whose name is written as given, `..` and all (the tar
/// crate's builder refuses such names, an attacker's does not).
fn raw_entry(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_stream_both_ways_with_checksums_and_refuse_escapes() {
    let c = case(
        Tier::Cluster,
        "gateway::files_stream_both_ways_with_checksums_and_refuse_escapes",
    );
    let b = match bed(3).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    let alice = &b.alice_c;
    let files = |q: &str| sub_path(NS_A, "box", "files", q);
    use http::Method;
    // Discovery lists what is served, with its verbs.
    let req = http::Request::get("/apis/subresources.wrenn.dev/v1alpha1")
        .body(Vec::new())
        .unwrap();
    let list: Value = b.admin.request(req).await.unwrap();
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["capsules/exec", "capsules/files", "capsules/console"]
    );

    // The guest agent runs on this host: its files are the host's, in a
    // directory of this test.
    let root = tempfile::Builder::new()
        .prefix("wrenn-gw-files-")
        .tempdir()
        .unwrap();
    let r = root.path().display().to_string();

    // 50 MiB up with its checksum, and down again, streamed.
    let data: Vec<u8> = (0..50u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sum = sha256_hex(&data);
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/big.bin&mode=0600&sha256={sum}")),
        data,
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let info = json_of(&body);
    assert_eq!(info["size"], 50 << 20, "{info}");
    assert_eq!(info["mode"], 0o600, "{info}");
    let req = http::Request::get(files(&format!("path={r}/big.bin")))
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = alice.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some("52428800")
    );
    let mut body = resp.into_body();
    let mut hash = sha2::Sha256::default();
    let mut got = 0usize;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Ok(d) = frame.unwrap().into_data() {
            got += d.len();
            sha2::Digest::update(&mut hash, &d);
        }
    }
    let down: String = sha2::Digest::finalize(hash)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!((got, down.as_str()), (50 << 20, sum.as_str()));
    // The guest computes the same checksum.
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/big.bin&op=stat&sha256=true")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let st = json_of(&body);
    assert_eq!(st["sha256"], sum.as_str(), "{st}");
    assert_eq!(st["isDir"], false, "{st}");

    // A checksum mismatch is 422 and leaves no file, partial or temporary.
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/bad.bin&sha256={}", "0".repeat(64))),
        b"not what you expected".to_vec(),
    )
    .await;
    assert_eq!(code, 422, "{}", String::from_utf8_lossy(&body));
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("SHA-256")
    );
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}&op=list")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let listed: Vec<String> = json_of(&body)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [format!("{r}/big.bin")]);

    // mkdir, paged list, rename, chmod, chown, remove.
    let post = |q: String| call(alice, Method::POST, files(&q), Vec::new());
    let (code, body) = post(format!("path={r}/d/e&op=mkdir&recursive=true")).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["isDir"], true);
    for n in ["a", "b", "c"] {
        let (code, _) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/d/{n}")),
            n.into(),
        )
        .await;
        assert_eq!(code, 200);
    }
    let (_, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d&op=list&limit=2")),
        Vec::new(),
    )
    .await;
    let page = json_of(&body);
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(page["items"][0]["path"], format!("{r}/d/a"));
    let next = page["continue"].as_str().unwrap().to_string();
    let (_, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d&op=list&limit=2&continue={next}")),
        Vec::new(),
    )
    .await;
    let page = json_of(&body);
    let rest: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    assert_eq!(rest, [format!("{r}/d/c"), format!("{r}/d/e")], "{page}");
    assert!(page.get("continue").is_none(), "{page}");
    let (code, body) = post(format!("path={r}/d/c&op=rename&to={r}/d/z")).await;
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)["path"], format!("{r}/d/z"));
    let (_, body) = post(format!("path={r}/d/z&op=chmod&mode=0751")).await;
    assert_eq!(json_of(&body)["mode"], 0o751);
    let (_, body) = post(format!("path={r}/d/z&op=chown&uid=1&gid=2")).await;
    let owned = json_of(&body);
    assert_eq!(
        (owned["uid"].clone(), owned["gid"].clone()),
        (json!(1), json!(2))
    );
    let (code, body) = post(format!("path={r}/d/z&op=remove")).await;
    assert_eq!((code, json_of(&body)), (200, json!({})));
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d/z&op=stat")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
    // A directory with contents goes only with recursive=true.
    let (code, _) = post(format!("path={r}/d&op=remove")).await;
    assert_eq!(code, 409);
    let (code, _) = post(format!("path={r}/d&op=remove&recursive=true")).await;
    assert_eq!(code, 200);

    // A directory round trip as tar.
    let (code, _) = post(format!("path={r}/src/sub&op=mkdir&recursive=true")).await;
    assert_eq!(code, 200);
    for (p, d) in [
        ("src/x.txt", &b"x"[..]),
        ("src/sub/y.bin", &[0u8, 1, 2, 255][..]),
    ] {
        let (code, _) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/{p}")),
            d.to_vec(),
        )
        .await;
        assert_eq!(code, 200);
    }
    let (code, packed) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/src&op=tar")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let mut names: Vec<String> = tar::Archive::new(&packed[..])
        .entries()
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path().unwrap().display().to_string();
            p.trim_end_matches('/').to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["sub", "sub/y.bin", "x.txt"]);
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/dst&op=tar")),
        packed,
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["entries"], 3);
    let (_, y) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/dst/sub/y.bin")),
        Vec::new(),
    )
    .await;
    assert_eq!(y, [0u8, 1, 2, 255]);

    // Tar entries leaving the directory are refused, and nothing lands
    // outside it: `..`, an absolute path, a symlink then a file through it.
    let outside = format!("{r}/outside");
    let attacks = [
        tar_of(&[raw_entry(
            "../escaped.txt",
            tar::EntryType::Regular,
            None,
            b"x",
        )]),
        tar_of(&[raw_entry(
            &format!("{outside}/abs.txt"),
            tar::EntryType::Regular,
            None,
            b"x",
        )]),
        tar_of(&[
            raw_entry("link", tar::EntryType::Symlink, Some(&r), b""),
            raw_entry("link/owned.txt", tar::EntryType::Regular, None, b"x"),
        ]),
        tar_of(&[raw_entry(
            "hard",
            tar::EntryType::Link,
            Some("../big.bin"),
            b"",
        )]),
    ];
    for (i, attack) in attacks.into_iter().enumerate() {
        let (code, body) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/jail&op=tar")),
            attack,
        )
        .await;
        assert_eq!(code, 400, "attack {i}: {}", String::from_utf8_lossy(&body));
        let msg = json_of(&body)["message"].as_str().unwrap().to_string();
        assert!(msg.contains("refused"), "attack {i}: {msg}");
    }
    assert!(!root.path().join("escaped.txt").exists());
    assert!(!Path::new(&outside).exists());
    assert!(!root.path().join("owned.txt").exists());

    // The guest's own errors pass through: root may not create files in
    // sysfs (EACCES), and a missing file is 404.
    let (code, body) = call(
        alice,
        Method::PUT,
        files("path=/sys/kernel/wrenn-gateway-test"),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    let msg = json_of(&body)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("ermission denied"), "{msg}");
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/nope")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));

    // bob only views; unknown and paused capsules say so.
    let (code, _) = call(
        &b.bob_c,
        Method::GET,
        files(&format!("path={r}/big.bin&op=stat")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 403);
    let (code, body) = call(
        alice,
        Method::GET,
        sub_path(NS_A, "nosuch", "files", "path=/etc/hostname"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404);
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("\"nosuch\"")
    );
    let (code, body) = call(
        alice,
        Method::GET,
        sub_path(NS_A, "nap", "files", "path=/etc/hostname"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 409);
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("Paused")
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_shows_the_tail_and_follows_new_output() {
    let c = case(
        Tier::Cluster,
        "gateway::console_shows_the_tail_and_follows_new_output",
    );
    let b = match bed(4).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    use http::Method;
    // Written where the VMM writes the serial console (the VMM is fake).
    let run = b.agent.sup.layout().run_dir(&b.uid);
    std::fs::create_dir_all(&run).unwrap();
    let log = run.join("serial.log");
    std::fs::write(&log, "boot 1\nboot 2\nboot 3\nlogin:\n").unwrap();
    let console = |q: &str| sub_path(NS_A, "box", "console", q);
    let (code, body) = call(&b.alice_c, Method::GET, console("tailLines=2"), Vec::new()).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(String::from_utf8_lossy(&body), "boot 3\nlogin:\n");
    // kubectl reads it as it reads any path of the API.
    let raw =
        b.cp.kubectl_ok(&["get", "--raw", &console("tailLines=1")], None)
            .unwrap();
    assert_eq!(raw.trim_end(), "login:");
    let (_, body) = call(&b.alice_c, Method::GET, console(""), Vec::new()).await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        "boot 1\nboot 2\nboot 3\nlogin:\n"
    );

    // A follower gets the tail, then what the guest prints next.
    let req = http::Request::get(console("tailLines=1&follow=true"))
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = b.alice_c.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut appended = false;
    while !seen.contains("late line") {
        let frame = tokio::time::timeout_at(deadline, http_body_util::BodyExt::frame(&mut body))
            .await
            .unwrap_or_else(|_| panic!("no new console output in 30 s: {seen:?}"))
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&d));
        }
        if !appended && seen.contains("login:") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            f.write_all(b"late line\n").unwrap();
            appended = true;
        }
    }
    assert_eq!(seen, "login:\nlate line\n");
    drop(body);

    let (code, _) = call(&b.bob_c, Method::GET, console(""), Vec::new()).await;
    assert_eq!(code, 403);
    let (code, body) = call(
        &b.alice_c,
        Method::GET,
        sub_path(NS_A, "nap", "console", ""),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    drop(b);
}
