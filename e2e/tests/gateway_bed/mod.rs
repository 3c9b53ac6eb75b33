//! A whole data-plane bed for tests that reach capsules as a user: the
//! Go-built kube-apiserver with the front-proxy flags and two static-token
//! users, the chart's RBAC (alice bound to the role aggregating into
//! `edit` in [`NS`], bob to the one aggregating into `view`), a real node
//! agent gRPC server with its real mutual TLS and supervisor (fake VMM,
//! network and disks), capsule `box` Running on it with the real
//! `wrenn-guest` as its guest agent (its serial console read from the
//! agent's run directory), capsule `nap` Paused, a `box` in [`NS_B`] where
//! neither user has rights, and the real `wrenn-gateway` process
//! registered by an `APIService`, serving once [`Bed::start`] returns.
//! Nothing skips authorization.
//!
//! Below the bed, the requests the gateway tests make through the API
//! server ([`exec`], [`call`]) so each test file says only what it checks.
#![allow(clippy::unwrap_used, dead_code)]

mod agent;
mod requests;
use agent::{Agent, agent_client_as, boot, start_agent};
// Each test file including the bed uses only some of them.
#[allow(unused_imports)]
pub use requests::{Ran, api_code, call, exec, exec_path, forward_request, json_of, sub_path};

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use serde_json::{Value, json};
use wrenn_crds::Capsule;
use wrenn_e2e::gateway::{
    GatewayOptions, GatewayProcess, HostGuest, LocalAddr, register_apiservice,
};
use wrenn_e2e::helm::Helm;
use wrenn_e2e::{ControlPlane, Options, ServerFlags, StaticToken};
use wrenn_node_agent::capsule::Supervisor;
use wrenn_node_agent::vmm::FakeMachine;
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::{Case, Tier, case, need_program, need_root};

/// The chart's release namespace and name here.
pub const RELEASE_NS: &str = "wrenn-system";
const RELEASE: &str = "wrenn";
/// The chart names the gateway's Service and ServiceAccount so.
pub const GATEWAY: &str = "wrenn-gateway";
/// The node the agent plays.
pub const NODE: &str = "bed-node";
/// The users' namespace.
pub const NS: &str = "team-a";
/// A namespace where neither user has rights; it holds a `box` too.
pub const NS_B: &str = "team-b";

type Issuer = CertifiedIssuer<'static, KeyPair>;

/// Everything running; stopped on drop.
pub struct Bed {
    // Dropped in this order: the gateway before the agent it dials, the
    // control plane last.
    _gateway: GatewayProcess,
    _guest: HostGuest,
    agent: Agent,
    /// The node agent's gRPC address.
    agent_addr: SocketAddr,
    /// Cluster admin.
    pub admin: kube::Client,
    /// alice: the edit role in [`NS`]; her kubeconfig's context names [`NS`].
    pub alice_kubeconfig: PathBuf,
    /// bob: the view role in [`NS`]; his kubeconfig names no namespace.
    pub bob_kubeconfig: PathBuf,
    /// A client as alice.
    pub alice: kube::Client,
    /// A client as bob.
    pub bob: kube::Client,
    /// The UID of `box` in [`NS`] (the capsule the agent runs).
    pub uid: String,
    /// Where the gateway listens (straight, not through the API server).
    pub gw_addr: SocketAddr,
    /// The CA of the gateway's serving certificate, PEM.
    pub serving_ca: String,
    _local: LocalAddr,
    _certs: tempfile::TempDir,
    /// The control plane (admin kubeconfig, kubectl).
    pub cp: ControlPlane,
}

impl std::fmt::Debug for Bed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bed").finish_non_exhaustive()
    }
}

fn ca(name: &str) -> Issuer {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf named `cn` (and `dns`) for `usage`, as `<file>.crt`/`.key` in `dir`.
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

/// Creates namespace `name` unless it exists.
pub async fn namespace(client: &kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

/// Binds `user` to ClusterRole `role` in `ns` (directly: no
/// kube-controller-manager aggregates the chart's roles here).
pub async fn bind(client: &kube::Client, ns: &str, user: &str, role: &str) {
    let api: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": format!("{user}-{role}") },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    api.create(&PostParams::default(), &rb).await.unwrap();
}

/// Writes `status` of capsule `name` in [`NS`] as the operator does (its
/// field manager, server-side apply), with `observedGeneration` set to the
/// capsule's current generation.
pub async fn operator_status(client: &kube::Client, name: &str, status: Value) {
    operator_status_in(client, NS, name, status).await;
}

/// [`operator_status`] for a capsule in `ns`.
pub async fn operator_status_in(client: &kube::Client, ns: &str, name: &str, mut status: Value) {
    let api: Api<Capsule> = Api::namespaced(client.clone(), ns);
    let generation = api.get(name).await.unwrap().metadata.generation;
    status["observedGeneration"] = json!(generation);
    api.patch_status(
        name,
        &PatchParams::apply(wrenn_crds::names::FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "status": status,
        })),
    )
    .await
    .unwrap();
}

/// A capsule in [`NS`] from template `base`, `phase` on [`NODE`]; returns its UID.
pub async fn capsule(client: &kube::Client, name: &str, phase: &str) -> String {
    capsule_in(client, NS, name, phase).await
}

/// A capsule in `ns` from template `base`, `phase` on [`NODE`], its status
/// written as the operator does; returns its UID.
pub async fn capsule_in(client: &kube::Client, ns: &str, name: &str, phase: &str) -> String {
    let api: Api<Capsule> = Api::namespaced(client.clone(), ns);
    let c: Capsule = serde_json::from_value(json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": { "name": name },
        "spec": { "source": { "templateRef": { "name": "base" } } },
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &c).await.unwrap();
    operator_status_in(
        client,
        ns,
        name,
        json!({ "phase": phase, "nodeName": NODE }),
    )
    .await;
    created.metadata.uid.unwrap()
}

/// Applies the chart's RBAC: the gateway's own (ServiceAccount, auth
/// delegation) and the user roles aggregating into `edit` and `view`
/// (`wrenn-edit`, `wrenn-view`), in [`RELEASE_NS`].
pub async fn install_chart_rbac(cp: &ControlPlane, helm: &Helm, admin: &kube::Client) {
    namespace(admin, RELEASE_NS).await;
    let docs = helm
        .template(
            RELEASE,
            RELEASE_NS,
            &[
                "--show-only",
                "templates/gateway-rbac.yaml",
                "--show-only",
                "templates/user-rbac.yaml",
                "--show-only",
                "templates/serviceaccounts.yaml",
            ],
        )
        .unwrap();
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
}

/// 50 MiB that compress badly and differ at every offset: a long stream
/// through the API server.
pub fn big_data() -> Vec<u8> {
    (0..50u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// SHA-256 of `data` in lowercase hex, as the gateway's `sha256` checks take it.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(data))
}

pub use wrenn_testkit::eventually_ok as eventually;

/// A kubeconfig for a static-token user whose context names `namespace`.
pub fn kubeconfig_in(
    cp: &ControlPlane,
    user: &str,
    token: &str,
    namespace: Option<&str>,
) -> PathBuf {
    let path = cp.kubeconfig_for(user, token).unwrap();
    if let Some(ns) = namespace {
        let mut kc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for ctx in kc["contexts"].as_array_mut().unwrap() {
            ctx["context"]["namespace"] = json!(ns);
        }
        std::fs::write(&path, kc.to_string()).unwrap();
    }
    path
}

impl Bed {
    /// Starts everything; `Err` names what this machine lacks (a skip).
    pub async fn start() -> Result<Bed, String> {
        Self::start_with(BedOptions::default()).await
    }

    /// [`Bed::start`] with the API server's flags `o` asks for. An address
    /// the aggregator may dial (not loopback), apart for each tag.
    pub async fn start_with(o: BedOptions) -> Result<Bed, String> {
        let pid = std::process::id();
        let n = (pid % 200) as u8 + 20;
        let (link, ip) = match o.tag {
            Some(tag) => (
                format!("wgw{tag}{}", pid % 100_000),
                Ipv4Addr::new(10, 254, n, tag),
            ),
            None => (
                format!("wcl{}", pid % 100_000),
                Ipv4Addr::new(10, 253, n, 1),
            ),
        };
        Self::start_at(&link, ip, o).await
    }

    /// [`Bed::start`] for a test running beside others in one process:
    /// `tag` (1..=9) keeps their links and addresses apart.
    pub async fn start_tagged(tag: u8) -> Result<Bed, String> {
        Self::start_with(BedOptions::tagged(tag)).await
    }

    /// Cluster case `name` with the bed `o` asks for, or the case recorded
    /// as skipped naming what this machine lacks.
    pub async fn for_case(name: &str, o: BedOptions) -> Option<(Case, Bed)> {
        Self::or_skip(case(Tier::Cluster, name), o).await
    }

    /// [`Bed::for_case`] for a case opened earlier (before a build the
    /// case should own).
    pub async fn or_skip(c: Case, o: BedOptions) -> Option<(Case, Bed)> {
        match Self::start_with(o).await {
            Ok(b) => Some((c, b)),
            Err(why) => {
                c.skip(why);
                None
            }
        }
    }

    /// The node agent's capsule supervisor (fake VMM, network and disks).
    pub fn supervisor(&self) -> &Supervisor<FakeMachine> {
        &self.agent.sup
    }

    /// The bed's certificates: `gateway.crt`/`.key` (the gateway's client
    /// certificate, from the clients' CA), `serving.crt`, CAs.
    pub fn certs(&self) -> &Path {
        self._certs.path()
    }

    /// The control plane's own PKI (`front-proxy-client.crt`/`.key`, …).
    pub fn pki_dir(&self) -> PathBuf {
        self.cp.dir().unwrap().join("pki")
    }

    async fn start_at(link: &str, ip: Ipv4Addr, o: BedOptions) -> Result<Bed, String> {
        need_root()?;
        need_program("ip")?;
        need_program("openssl")?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pid = std::process::id();
        let alice = StaticToken {
            token: format!("alice-{pid}"),
            user: "alice".into(),
            groups: vec!["devs".into()],
        };
        let bob = StaticToken {
            token: format!("bob-{pid}"),
            user: "bob".into(),
            groups: vec!["devs".into()],
        };
        let opts = Options {
            front_proxy: true,
            tokens: vec![alice.clone(), bob.clone()],
        };
        let flags = ServerFlags {
            request_timeout: o.request_timeout,
        };
        let cp = tokio::task::spawn_blocking(move || ControlPlane::start_own_with(&opts, flags))
            .await
            .unwrap()
            .map_err(|e| format!("control plane did not start: {e:#}"))?;
        let helm = Helm::find().map_err(|e| format!("no helm: {e:#}"))?;
        let admin = cp.client().await.unwrap();

        install_chart_rbac(&cp, &helm, &admin).await;
        namespace(&admin, NS).await;
        // Bound directly: no kube-controller-manager aggregates them here.
        bind(&admin, NS, "alice", "wrenn-edit").await;
        bind(&admin, NS, "bob", "wrenn-view").await;

        // Agents' CA, the client CA (operator, gateway), the serving CA.
        let certs = tempfile::tempdir().unwrap();
        let dir = certs.path();
        let (agents, clients, serving) = (ca("agents"), ca("clients"), ca("gateway serving"));
        std::fs::write(dir.join("agents-ca.crt"), agents.pem()).unwrap();
        std::fs::write(dir.join("clients-ca.crt"), clients.pem()).unwrap();
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        leaf(
            dir,
            "agent",
            &agents,
            "wrenn-node-agent",
            Some("wrenn-node-agent"),
            server.clone(),
        );
        leaf(
            dir,
            "operator",
            &clients,
            "wrenn-operator",
            None,
            client.clone(),
        );
        leaf(dir, "gateway", &clients, "wrenn-gateway", None, client);
        let svc_dns = format!("{GATEWAY}.{RELEASE_NS}.svc");
        leaf(dir, "serving", &serving, &svc_dns, Some(&svc_dns), server);

        let local =
            LocalAddr::create(link, ip).map_err(|e| format!("no private address: {e:#}"))?;
        let agent_listener = tokio::net::TcpListener::bind((local.ip, 0)).await.unwrap();
        let agent_addr = agent_listener.local_addr().unwrap();
        let agent = start_agent(agent_listener, dir).await;

        // The agent's Pod, as the DaemonSet and kubelet would make it.
        let pods: Api<Pod> = Api::namespaced(admin.clone(), RELEASE_NS);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": "wrenn-node-agent-bed", "labels": { "app.kubernetes.io/name": "wrenn-node-agent" } },
            "spec": { "nodeName": NODE, "containers": [{ "name": "node-agent", "image": "wrenn/node-agent:test" }] },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let ip = local.ip.to_string();
        pods.patch_status(
            "wrenn-node-agent-bed",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } }),
            ),
        )
        .await
        .unwrap();

        let uid = capsule(&admin, "box", "Running").await;
        capsule(&admin, "nap", "Paused").await;
        namespace(&admin, NS_B).await;
        capsule_in(&admin, NS_B, "box", "Running").await;
        let guest = boot(&agent, agent_addr, dir, &uid).await;

        // The gateway as the chart's ServiceAccount, registered by an APIService.
        let mut kc: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&cp.kubeconfig).unwrap()).unwrap();
        kc["users"][0]["user"]["as"] =
            json!(format!("system:serviceaccount:{RELEASE_NS}:{GATEWAY}"));
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

        let alice_kubeconfig = kubeconfig_in(&cp, "alice", &alice.token, Some(NS));
        let bob_kubeconfig = kubeconfig_in(&cp, "bob", &bob.token, None);
        let alice = wrenn_e2e::client_from(&alice_kubeconfig).await.unwrap();
        let bob = wrenn_e2e::client_from(&bob_kubeconfig).await.unwrap();
        Ok(Bed {
            _gateway: gateway,
            _guest: guest,
            agent,
            agent_addr,
            admin,
            alice_kubeconfig,
            bob_kubeconfig,
            alice,
            bob,
            uid,
            gw_addr,
            serving_ca: serving.pem(),
            _local: local,
            _certs: certs,
            cp,
        })
    }
}

/// What [`Bed::start_with`] changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct BedOptions {
    /// The API server's `--request-timeout` (default 60 s).
    pub request_timeout: Option<Duration>,
    /// As [`Bed::start_tagged`]: a bed beside others in one test process
    /// needs its own link and address (1..=9).
    pub tag: Option<u8>,
}

impl BedOptions {
    /// The defaults for a bed beside others in one test process.
    pub fn tagged(tag: u8) -> Self {
        Self {
            tag: Some(tag),
            ..Self::default()
        }
    }
}

impl Bed {
    /// Where the (fake) VMM of capsule `box` writes its serial console:
    /// what `capsules/console` reads.
    pub fn console_log(&self) -> PathBuf {
        let run = self.agent.sup.layout().run_dir(&self.uid);
        std::fs::create_dir_all(&run).unwrap();
        run.join("serial.log")
    }
}

impl Bed {
    /// UID of capsule `box` (the agent's key for it).
    pub fn box_uid(&self) -> &str {
        &self.uid
    }

    /// A client of the node agent with the gateway's certificate: the
    /// direct path the gateway takes, for comparisons.
    pub async fn agent_client(
        &self,
    ) -> pb::node_agent_client::NodeAgentClient<tonic::transport::Channel> {
        agent_client_as(self._certs.path(), self.agent_addr, "gateway")
            .await
            .max_decoding_message_size(16 << 20)
    }

    /// The gateway process's id.
    pub fn gateway_pid(&self) -> Option<u32> {
        self._gateway.pid()
    }
}
