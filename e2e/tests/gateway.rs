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
    )
    .with_image_dirs(image_dirs)
    .with_capsules(Arc::new(sup.clone()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_through_the_api_server_is_authorized_per_user_and_namespace() {
    let c = case(
        Tier::Cluster,
        "gateway::exec_through_the_api_server_is_authorized_per_user_and_namespace",
    );
    if let Err(why) = need_root()
        .and_then(|()| need_program("ip").map(drop))
        .and_then(|()| need_program("openssl").map(drop))
    {
        c.skip(why);
        return;
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
            c.skip(format!("control plane did not start: {e:#}"));
            return;
        }
    };
    let helm = match Helm::find() {
        Ok(h) => h,
        Err(e) => {
            c.skip(format!("no helm: {e:#}"));
            return;
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
    let (ns_a, ns_b) = ("team-a", "team-b");
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
        &format!("wgw{}", std::process::id() % 100_000),
        Ipv4Addr::new(10, 254, n, 1),
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
    let _guest = boot(&agent, agent_addr, dir, &uid).await;

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
    let alice_kc = cp.kubeconfig_for("alice", &alice.token).unwrap();
    let bob_kc = cp.kubeconfig_for("bob", &bob.token).unwrap();
    eventually(Duration::from_secs(60), "alice may exec in A", || {
        let a = can_i(&alice_kc, ns_a);
        async move { (a == "yes").then_some(()).ok_or(a) }
    })
    .await;
    assert_eq!(can_i(&bob_kc, ns_a), "no");
    assert_eq!(can_i(&alice_kc, ns_b), "no");

    // alice runs a command in A: stdout, stderr and the exit code arrive.
    let ran = exec(
        &alice_c,
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
        &alice_c,
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
    let (code, msg) = api_code(exec(&alice_c, ns_a, "nosuch", &["true"], None).await);
    assert_eq!(code, 404, "{msg}");
    assert!(msg.contains("\"nosuch\""), "{msg}");
    let (code, msg) = api_code(exec(&alice_c, ns_a, "nap", &["true"], None).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("Paused"), "{msg}");

    // bob may only view A; alice has nothing in B.
    let (code, msg) = api_code(exec(&bob_c, ns_a, "box", &["true"], None).await);
    assert_eq!(code, 403, "{msg}");
    let (code, msg) = api_code(exec(&alice_c, ns_b, "box", &["true"], None).await);
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
    drop(gateway);
}
