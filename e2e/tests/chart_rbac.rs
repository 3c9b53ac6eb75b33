//! The chart's operator RBAC and settings, proven by use rather than by
//! listing verbs:
//!
//! - the real operator controllers run as the chart's ServiceAccount
//!   (impersonated) through a whole capsule lifecycle against the real API
//!   server, holding the chart's leader Lease, with in-process fake node
//!   agents found through node-agent Pods labelled as the chart's DaemonSet
//!   labels them, and without a single Forbidden in its log;
//! - the same with one permission taken out of the chart's ClusterRole
//!   fails where a user would look: a Forbidden in the operator's log and
//!   its reconcile-error metric, and a capsule that never gets a status;
//! - every environment variable the chart's Deployment and DaemonSet set is
//!   a flag the binaries accept, and the binaries start on them.
//!
//! Why this file is long: four scenarios that run the real controllers as the
//! chart's ServiceAccount, each a whole lifecycle.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::reason::Reason;
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::TemplatePhase;
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};
use wrenn_e2e::helm::{self, Helm, chart_dir, env_of, find_of, find_one as find, helm_or_skip};
use wrenn_e2e::{ControlPlane, refused_merge_patch};
use wrenn_operator::agent::fake::{FakeConnector, FakeNodeAgent};
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::{Case, Tier, case, unique_name};

const GI: u64 = 1 << 30;
const ZONE: &str = "topology.kubernetes.io/zone";

/// The kinds of the chart that make up the operator's permissions.
const RBAC_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// An operator started by one test sees every namespace (as the binary
/// does), so it would reconcile the other test's capsules: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- operator log capture ----

/// Everything the operator logged in this process. Tests run one at a time
/// (SERIAL), so each reads what was written after its own start.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        // Shown by the harness only when a test fails.
        print!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once; returns the current log length.
fn log_mark() -> usize {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        // Warnings and errors are where a refused API call shows up.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
    LOG.lock().unwrap_or_else(|p| p.into_inner()).len()
}

fn log_since(mark: usize) -> Vec<String> {
    let log = LOG.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&log[mark.min(log.len())..])
        .lines()
        .map(str::to_string)
        .collect()
}

// ---- the chart ----

async fn cluster_or_skip(name: &str) -> Option<(Case, Helm, &'static ControlPlane)> {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || helm::cluster_or_skip(case(Tier::Cluster, &name)))
        .await
        .unwrap()
}

fn render(helm: &Helm, release: &str, ns: &str, extra: &[&str]) -> Vec<Value> {
    helm.template(release, ns, extra).unwrap()
}

fn env_value(container: &Value, name: &str) -> String {
    env_of(container)
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("the chart sets no {name}"))
}

/// The chart's RBAC and admission policy for release `release` in `ns`,
/// rendered by helm, passed through `edit`, and applied to the cluster.
/// Returns the rendered documents (all of them, unedited).
fn install_rbac(
    cp: &ControlPlane,
    helm: &Helm,
    release: &str,
    ns: &str,
    values: &[&str],
    edit: impl FnOnce(&mut Vec<Value>),
) -> Vec<Value> {
    // The control plane already serves the CRDs and the API's own policy.
    let mut args = vec!["--set", "crds.install=false"];
    args.extend_from_slice(values);
    let docs = render(helm, release, ns, &args);
    let mut rbac: Vec<Value> = docs
        .iter()
        .filter(|d| RBAC_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    for kind in RBAC_KINDS {
        assert!(
            rbac.iter().any(|d| d["kind"] == *kind),
            "the chart renders no {kind}"
        );
    }
    edit(&mut rbac);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rbac.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    std::fs::write(&file, serde_json::to_vec(&list).unwrap()).unwrap();
    cp.kubectl_ok(&["apply", "--server-side", "-f"], Some(&file))
        .unwrap();
    docs
}

/// What the test needs to know of the rendered chart, read from it rather
/// than repeated here.
struct Rendered {
    /// `system:serviceaccount:<ns>:<operator SA>`.
    user: String,
    /// WRENN_AGENT_SELECTOR and WRENN_AGENT_PORT of the operator Deployment.
    selector: String,
    port: u16,
    /// Labels of the node-agent DaemonSet's Pods.
    agent_labels: Value,
}

fn read_chart(docs: &[Value], ns: &str) -> Rendered {
    let dep = find_of(docs, "Deployment", "operator");
    let op = &dep["spec"]["template"]["spec"]["containers"][0];
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let ds = find(docs, "DaemonSet");
    Rendered {
        user: format!("system:serviceaccount:{ns}:{sa}"),
        selector: env_value(op, "WRENN_AGENT_SELECTOR"),
        port: env_value(op, "WRENN_AGENT_PORT").parse().unwrap(),
        agent_labels: ds["spec"]["template"]["metadata"]["labels"].clone(),
    }
}

// ---- the cluster ----

/// A client that acts as `user`, as the API server sees a Pod's token.
async fn client_as(cp: &ControlPlane, user: &str) -> Client {
    let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).unwrap()
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API refusal: {other}"),
    }
}

/// New bindings reach the API server's authorizer through a watch: wait
/// until both bindings are in force (Pods in `ns` through the Role, Nodes
/// and Capsules everywhere through the ClusterRole), so that a refusal the
/// operator logs later is the chart's doing, not a race with the install.
async fn wait_for_rbac(client: &Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let caps: Api<Capsule> = Api::all(client.clone());
    let lp = ListParams::default().limit(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = match (
            pods.list(&lp).await,
            nodes.list(&lp).await,
            caps.list(&lp).await,
        ) {
            (Ok(_), Ok(_), Ok(_)) => return,
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => e,
        };
        assert!(
            Instant::now() < deadline,
            "the chart's RBAC never took effect: {refused}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create<K>(client: &Client, ns: &str, body: Value) -> K
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(body).unwrap(),
    )
    .await
    .unwrap()
}

/// Fake agents on nodes `<prefix>-a` and `<prefix>-b`, each found through a
/// Pod that carries the chart's DaemonSet labels, on a Node object labelled
/// with zone `a` or `b`.
async fn agents(
    admin: &Client,
    ns: &str,
    prefix: &str,
    labels: &Value,
) -> (Arc<FakeConnector>, Vec<Arc<FakeNodeAgent>>) {
    let connector = Arc::new(FakeConnector::default());
    let mut agents = Vec::new();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let nodes: Api<Node> = Api::all(admin.clone());
    for (i, zone) in ["a", "b"].into_iter().enumerate() {
        let node = format!("{prefix}-{zone}");
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": node, "labels": {ZONE: zone}},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
        let agent = FakeNodeAgent::new(
            &node,
            pb::Resources {
                vcpus: 8,
                memory_bytes: 16 * GI,
                disk_bytes: 100 * GI,
            },
            Duration::from_millis(300),
        );
        connector.add(agent.clone());
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("agent-{node}"), "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "node-agent", "image": "wrenn-node-agent:test"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let ip = format!("127.0.0.{}", i + 2);
        pods.patch_status(
            &format!("agent-{node}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}})),
        )
        .await
        .unwrap();
        agents.push(agent);
    }
    (connector, agents)
}

/// Capsule `c1` from template `template`, with the template's resources.
fn capsule_of(template: &str) -> Value {
    json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": {"name": "c1"},
        "spec": {"source": {"templateRef": {"name": template}}},
    })
}

/// Deletes the Nodes [`agents`] made for `prefix`.
async fn delete_nodes(admin: &Client, prefix: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    for zone in ["a", "b"] {
        nodes
            .delete(&format!("{prefix}-{zone}"), &DeleteParams::default())
            .await
            .unwrap();
    }
}

/// A running operator; `stop` shuts it down and waits.
struct RunningOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    registry: Registry,
}

impl RunningOperator {
    fn start(
        client: &Client,
        chart: &Rendered,
        agent_ns: &str,
        namespace: Option<String>,
        connector: Arc<FakeConnector>,
    ) -> Self {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (pool, streams) = AgentPool::new(connector, Duration::from_secs(1));
        let op = Operator {
            client: client.clone(),
            pool,
            streams,
            discovery: (agent_ns.to_string(), chart.selector.clone(), chart.port),
            metrics,
            settings: Settings {
                node_lost_timeout: Duration::from_secs(3),
                settle_grace: Duration::from_secs(3),
                // As the binary derives it from the downward API.
                identity: Some(chart.user.clone()),
                ..Settings::default()
            },
            instance: Some("wrenn-operator-0".into()),
            namespace,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_all(op, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task,
            registry,
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("operator stops within 30 s")
            .unwrap();
    }
}

/// Polls `get` until `check` holds, failing after 30 s with the last value.
async fn wait_for<K: std::fmt::Debug>(
    what: &str,
    mut get: impl AsyncFnMut() -> K,
    check: impl Fn(&K) -> bool,
) -> K {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get().await;
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in 30 s: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn phase(c: &Capsule) -> Option<CapsulePhase> {
    c.status.as_ref().and_then(|s| s.phase)
}

fn condition(c: &Capsule, type_: &str) -> Option<(String, String)> {
    c.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    })
}

/// Deletes an object and strips its finalizers (for objects whose operator
/// is gone), then waits until it is gone.
async fn purge<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
    let _ = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    wait_for(
        &format!("{name} gone"),
        async || api.get_opt(name).await.unwrap().map(|o| o.name_any()),
        Option::is_none,
    )
    .await;
}

fn forbidden_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_as_the_chart_service_account_runs_a_capsule_lifecycle() {
    let _serial = SERIAL.lock().await;
    let Some((_case, helm, cp)) = cluster_or_skip(
        "chart_rbac::operator_as_the_chart_service_account_runs_a_capsule_lifecycle",
    )
    .await
    else {
        return;
    };
    let mark = log_mark();
    let admin = cp.client().await.unwrap();
    let ns = wrenn_e2e::temp_namespace(&admin, "wrenn").await.unwrap();
    let users = wrenn_e2e::temp_namespace(&admin, "users").await.unwrap();
    // Cluster-scoped names (ClusterRole, policy) carry the release name.
    let release = unique_name("rbac");
    let docs = install_rbac(cp, &helm, &release, &ns, &[], |_| {});
    let chart = read_chart(&docs, &ns);
    let (connector, agents) = agents(&admin, &ns, &release, &chart.agent_labels).await;
    let op_client = client_as(cp, &chart.user).await;
    wait_for_rbac(&op_client, &ns).await;

    // Leader election first, as the binary does: the Lease in its namespace.
    let manager = wrenn_operator::leader::manager(op_client.clone(), &ns, "wrenn-operator-0")
        .await
        .unwrap();
    let (mut leading, lease_task) = manager.watch().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !*leading.borrow_and_update() {
            leading.changed().await.unwrap();
        }
    })
    .await
    .expect("the operator takes the wrenn-operator Lease within 30 s");
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let lease = leases
        .get(wrenn_operator::leader::LEASE_NAME)
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("wrenn-operator-0")
    );

    // Every namespace, as the binary watches, unless the cluster is shared
    // with other test processes whose capsules it must not touch.
    let scope = std::env::var_os("WRENN_KUBECONFIG").map(|_| users.clone());
    let op = RunningOperator::start(&op_client, &chart, &ns, scope, connector);

    // The user's side, as cluster admin: a template, then a capsule that
    // must land in zone b (Node labels: the operator reads Nodes).
    let _: CapsuleTemplate = create(
        &admin,
        &users,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": {"name": "base"},
            "spec": {"source": {"image": {"reference": "docker.io/library/debian:bookworm"}}},
        }),
    )
    .await;
    let created: Capsule = create(
        &admin,
        &users,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": {"name": "c1"},
            "spec": {
                "source": {"templateRef": {"name": "base"}},
                "resources": {"vcpus": 1, "memory": "512Mi"},
                "nodeSelector": {ZONE: "b"},
            },
        }),
    )
    .await;
    let uid = created.uid().unwrap();
    let caps: Api<Capsule> = Api::namespaced(admin.clone(), &users);
    let running = wait_for(
        "capsule Running",
        async || caps.get("c1").await.unwrap(),
        |c| phase(c) == Some(CapsulePhase::Running),
    )
    .await;
    let st = running.status.clone().unwrap();
    assert_eq!(
        st.node_name.as_deref(),
        Some(format!("{release}-b").as_str()),
        "placed by its nodeSelector"
    );
    assert!(st.ip.is_some(), "{st:?}");
    assert_eq!(
        condition(&running, "Scheduled"),
        Some(("True".into(), "Placed".into()))
    );
    assert_eq!(
        condition(&running, "Ready"),
        Some(("True".into(), "Running".into()))
    );
    assert_eq!(running.finalizers(), ["wrenn.dev/node-cleanup"]);
    let tpls: Api<CapsuleTemplate> = Api::namespaced(admin.clone(), &users);
    wait_for(
        "template Ready",
        async || tpls.get("base").await.unwrap().status,
        |s| s.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Ready),
    )
    .await;

    // Pause, suspend, resume: the user changes the spec, the operator follows.
    let vm_state = |uid: &str| {
        agents
            .iter()
            .find_map(|a| a.capsule(uid))
            .and_then(|c| pb::CapsuleState::try_from(c.state).ok())
    };
    for (mode, want, vm) in [
        ("Paused", CapsulePhase::Paused, pb::CapsuleState::Paused),
        (
            "Suspended",
            CapsulePhase::Suspended,
            pb::CapsuleState::Suspended,
        ),
        ("Running", CapsulePhase::Running, pb::CapsuleState::Running),
    ] {
        caps.patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"operatingMode": mode}})),
        )
        .await
        .unwrap();
        wait_for(
            mode,
            async || caps.get("c1").await.unwrap(),
            |c| phase(c) == Some(want),
        )
        .await;
        assert_eq!(vm_state(&uid), Some(vm), "agent state after {mode}");
    }

    // A snapshot of the running capsule.
    let _: CapsuleSnapshot = create(
        &admin,
        &users,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
            "metadata": {"name": "s1"},
            "spec": {"capsuleName": "c1"},
        }),
    )
    .await;
    let snaps: Api<CapsuleSnapshot> = Api::namespaced(admin.clone(), &users);
    let snap = wait_for(
        "snapshot Ready",
        async || snaps.get("s1").await.unwrap().status,
        |s| s.as_ref().and_then(|s| s.ready_to_use) == Some(true),
    )
    .await
    .unwrap();
    assert_eq!(snap.phase, Some(SnapshotPhase::Ready));
    assert_eq!(
        snap.node_name.as_deref(),
        Some(format!("{release}-b").as_str())
    );

    // Minimal: what the chart says the operator cannot do, it cannot.
    let mine: Api<Capsule> = Api::namespaced(op_client.clone(), &users);
    let err = refused_merge_patch(
        &mine,
        "c1",
        &PatchParams::default().dry_run(),
        json!({"spec": {"operatingMode": "Paused"}}),
    )
    .await;
    assert!(
        err.to_string()
            .contains("the operator may not change a spec"),
        "a spec write is refused by the chart's policy: {err}"
    );
    let err = mine
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
                "metadata": {"name": "c2"},
                "spec": {"source": {"templateRef": {"name": "base"}}},
            }))
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 403, "creates a capsule: {err}");
    for (what, err) in [
        (
            "lists Secrets in its namespace",
            Api::<Secret>::namespaced(op_client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .err(),
        ),
        (
            "lists Secrets anywhere",
            Api::<Secret>::all(op_client.clone())
                .list(&ListParams::default())
                .await
                .err(),
        ),
        (
            "reads a Pod's log",
            Api::<Pod>::namespaced(op_client.clone(), &users)
                .logs("any", &Default::default())
                .await
                .err(),
        ),
        (
            "labels a Node",
            Api::<Node>::all(op_client.clone())
                .patch(
                    &format!("{release}-a"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
                .err(),
        ),
        (
            "creates a Lease outside its namespace",
            Api::<Lease>::namespaced(op_client.clone(), &users)
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "wrenn-operator"}}))
                        .unwrap(),
                )
                .await
                .err(),
        ),
        // It lists and watches Pods and Namespaces for `from` selectors,
        // and writes neither.
        (
            "deletes a Pod",
            Api::<Pod>::namespaced(op_client.clone(), &users)
                .delete("any", &DeleteParams::default().dry_run())
                .await
                .err(),
        ),
        (
            "labels a Namespace",
            Api::<k8s_openapi::api::core::v1::Namespace>::all(op_client.clone())
                .patch(
                    &users,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
                .err(),
        ),
        (
            "deletes a template",
            Api::<CapsuleTemplate>::namespaced(op_client.clone(), &users)
                .delete("base", &DeleteParams::default().dry_run())
                .await
                .err(),
        ),
    ] {
        let err = err.unwrap_or_else(|| panic!("the operator {what}"));
        assert_eq!(api_code(&err), 403, "{what}: {err}");
    }

    // Deletion: the operator's finalizers let go once the node cleaned up.
    snaps.delete("s1", &DeleteParams::default()).await.unwrap();
    wait_for(
        "snapshot deleted",
        async || snaps.get_opt("s1").await.unwrap().map(|s| s.name_any()),
        Option::is_none,
    )
    .await;
    caps.delete("c1", &DeleteParams::default()).await.unwrap();
    wait_for(
        "capsule deleted",
        async || caps.get_opt("c1").await.unwrap().map(|c| c.name_any()),
        Option::is_none,
    )
    .await;
    let count = |call: &str| agents.iter().map(|a| a.count(call)).sum::<usize>();
    assert_eq!(count("DeleteSnapshot"), 1, "snapshot files removed");
    assert!(count("DeleteCapsule") >= 1, "VM removed");
    assert!(agents.iter().all(|a| a.uids().is_empty()), "no VM left");

    // Events about the capsule, written by the operator's account.
    let events: Api<Event> = Api::namespaced(admin.clone(), &users);
    let reasons: BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid.as_str()))
        .filter(|e| e.reporting_controller.as_deref() == Some("wrenn-operator"))
        .filter_map(|e| e.reason)
        .collect();
    for r in [Reason::Scheduled, Reason::Running] {
        assert!(reasons.contains(r.as_str()), "no {r} Event: {reasons:?}");
    }

    op.stop().await;
    // Giving up leadership frees the Lease for a standby at once.
    drop(leading);
    tokio::time::timeout(Duration::from_secs(10), lease_task)
        .await
        .expect("the Lease is released within 10 s")
        .unwrap()
        .unwrap();
    let lease = leases
        .get(wrenn_operator::leader::LEASE_NAME)
        .await
        .unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None);

    // Sufficient: not one call the operator made was refused.
    let log = log_since(mark);
    let refused = forbidden_lines(&log);
    assert!(
        refused.is_empty(),
        "the operator was refused under the chart's RBAC:\n{}",
        refused
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );

    delete_nodes(&admin, &release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_without_a_chart_permission_reports_forbidden() {
    let _serial = SERIAL.lock().await;
    let Some((_case, helm, cp)) =
        cluster_or_skip("chart_rbac::operator_without_a_chart_permission_reports_forbidden").await
    else {
        return;
    };
    let mark = log_mark();
    let admin = cp.client().await.unwrap();
    let ns = wrenn_e2e::temp_namespace(&admin, "wrenn").await.unwrap();
    let users = wrenn_e2e::temp_namespace(&admin, "users").await.unwrap();
    let release = unique_name("norbac");
    // The chart's RBAC with one permission dropped: writing Capsule status.
    let docs = install_rbac(cp, &helm, &release, &ns, &[], |docs| {
        let role = docs
            .iter_mut()
            .find(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
            })
            .unwrap();
        let mut dropped = 0;
        for rule in role["rules"].as_array_mut().unwrap() {
            let resources = rule["resources"].as_array_mut().unwrap();
            let before = resources.len();
            resources.retain(|r| r != "capsules/status");
            dropped += before - resources.len();
        }
        assert_eq!(dropped, 1, "the chart grants capsules/status in one rule");
    });
    let chart = read_chart(&docs, &ns);
    let (connector, _agents) = agents(&admin, &ns, &release, &chart.agent_labels).await;
    let op_client = client_as(cp, &chart.user).await;
    wait_for_rbac(&op_client, &ns).await;
    let op = RunningOperator::start(&op_client, &chart, &ns, Some(users.clone()), connector);

    let _: CapsuleTemplate = create(
        &admin,
        &users,
        json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": {"name": "base"},
            "spec": {"source": {"image": {"reference": "docker.io/library/debian:bookworm"}}},
        }),
    )
    .await;
    let _: Capsule = create(&admin, &users, capsule_of("base")).await;

    // The operator says which permission it lacks...
    let line = wait_for(
        "a Forbidden on capsules/status in the operator's log",
        async || {
            log_since(mark)
                .into_iter()
                .find(|l| l.contains("capsules/status") && l.contains("forbidden"))
        },
        Option::is_some,
    )
    .await
    .unwrap();
    assert!(line.contains(&chart.user), "names the account: {line}");
    // ...counts it where alerts look...
    let metrics = op.metrics();
    let failures: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "wrenn_operator_reconcile_errors_total{kind=\"Capsule\",category=\"status\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no status failures counted:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(failures >= 1.0);
    // ...and the user sees a capsule that never got a status, while what the
    // remaining rules allow still works (the template's status).
    let caps: Api<Capsule> = Api::namespaced(admin.clone(), &users);
    assert_eq!(phase(&caps.get("c1").await.unwrap()), None);
    let tpls: Api<CapsuleTemplate> = Api::namespaced(admin.clone(), &users);
    wait_for(
        "template Ready",
        async || tpls.get("base").await.unwrap().status,
        |s| s.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Ready),
    )
    .await;

    op.stop().await;
    // Nothing left for the other test's operator, which watches every namespace.
    purge(&caps, "c1").await;
    purge(&tpls, "base").await;
}

// ---- settings: the chart's env against the binaries' flags ----

/// Env name -> `--long` flag of every argument of a binary's command.
/// A `kubernetes.io/dockerconfigjson` Secret with one registry's entry.
fn pull_secret(name: &str, registry: &str, user: &str, password: &str) -> Secret {
    let config = json!({"auths": {registry: {"username": user, "password": password}}});
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    }))
    .unwrap()
}

/// Issue 13 point 6: the chart gives the operator no Secret access but a
/// `get` on each Secret named in `operator.pullSecretGrants`. As the chart's
/// ServiceAccount, the operator reads the granted pull Secret and sends its
/// registry entry with the template's PrepareTemplate (the template becomes
/// Ready, and a capsule of it runs on a node that holds it); it cannot read
/// or list any other Secret (the attack, made with its own identity), and a
/// template naming an ungranted Secret fails with `PullSecretForbidden` and
/// the two commands that grant exactly that Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reads_only_the_pull_secrets_it_is_granted() {
    let _serial = SERIAL.lock().await;
    let Some((_case, helm, cp)) =
        cluster_or_skip("chart_rbac::operator_reads_only_the_pull_secrets_it_is_granted").await
    else {
        return;
    };
    let admin = cp.client().await.unwrap();
    let ns = wrenn_e2e::temp_namespace(&admin, "wrenn").await.unwrap();
    let users = wrenn_e2e::temp_namespace(&admin, "users").await.unwrap();
    let release = unique_name("pull");
    let registry = "registry.example.com:5000";
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &users);
    for (name, password) in [("regcred", "granted-pw"), ("other", "never-read-pw")] {
        secrets
            .create(
                &PostParams::default(),
                &pull_secret(name, registry, "robot", password),
            )
            .await
            .unwrap();
    }
    let grant_ns = format!("operator.pullSecretGrants[0].namespace={users}");
    let docs = install_rbac(
        cp,
        &helm,
        &release,
        &ns,
        &[
            "--set",
            &grant_ns,
            "--set",
            "operator.pullSecretGrants[0].secret=regcred",
        ],
        |_| {},
    );
    let chart = read_chart(&docs, &ns);
    let (connector, agents) = agents(&admin, &ns, &release, &chart.agent_labels).await;
    let op_client = client_as(cp, &chart.user).await;
    wait_for_rbac(&op_client, &ns).await;

    // As the operator: the granted Secret, once the binding is in force...
    let as_operator: Api<Secret> = Api::namespaced(op_client.clone(), &users);
    wait_for(
        "the granted pull Secret readable by the operator",
        async || {
            as_operator
                .get("regcred")
                .await
                .map(|_| ())
                .map_err(|e| api_code(&e))
        },
        Result::is_ok,
    )
    .await
    .unwrap();
    // ...and nothing else: the unreferenced Secret, a list, a watch.
    assert_eq!(api_code(&as_operator.get("other").await.unwrap_err()), 403);
    assert_eq!(
        api_code(&as_operator.list(&ListParams::default()).await.unwrap_err()),
        403
    );
    let elsewhere: Api<Secret> = Api::namespaced(op_client.clone(), &ns);
    assert_eq!(
        api_code(&elsewhere.list(&ListParams::default()).await.unwrap_err()),
        403
    );

    let op = RunningOperator::start(&op_client, &chart, &ns, Some(users.clone()), connector);
    for (name, secret) in [("private", "regcred"), ("denied", "other")] {
        let _: CapsuleTemplate = create(
            &admin,
            &users,
            json!({
                "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
                "metadata": {"name": name},
                "spec": {"source": {"image": {
                    "reference": format!("{registry}/team/app:v1"),
                    "pullSecret": secret,
                }}},
            }),
        )
        .await;
    }
    let tpls: Api<CapsuleTemplate> = Api::namespaced(admin.clone(), &users);
    let ready = wait_for(
        "the private template Ready",
        async || tpls.get("private").await.unwrap(),
        |t| t.status.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Ready),
    )
    .await;
    let key = format!("{users}/private@{}", ready.uid().unwrap());
    for a in &agents {
        let sent = a.prepared_with(&key).flatten().expect("credentials sent");
        assert_eq!(
            (sent.username.as_str(), sent.password.as_str()),
            ("robot", "granted-pw")
        );
    }
    let denied = wait_for(
        "the ungranted template Failed",
        async || tpls.get("denied").await.unwrap(),
        |t| t.status.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Failed),
    )
    .await;
    let cond = denied.status.unwrap().conditions[0].clone();
    assert_eq!(cond.reason, "PullSecretForbidden");
    let sa = chart.user.trim_start_matches("system:serviceaccount:");
    let grant = format!(
        "kubectl -n {users} create role wrenn-pull-other --verb=get --resource=secrets --resource-name=other && kubectl -n {users} create rolebinding wrenn-pull-other --role=wrenn-pull-other --serviceaccount={sa}"
    );
    assert!(cond.message.contains(&grant), "{}", cond.message);
    assert!(agents.iter().all(|a| {
        a.prepared_with(&format!(
            "{users}/denied@{}",
            denied.metadata.uid.clone().unwrap()
        ))
        .is_none()
    }));

    // A capsule of the private template lands on a node holding it.
    let _: Capsule = create(&admin, &users, capsule_of("private")).await;
    let caps: Api<Capsule> = Api::namespaced(admin.clone(), &users);
    wait_for(
        "capsule of the private template Running",
        async || caps.get("c1").await.unwrap(),
        |c| phase(c) == Some(CapsulePhase::Running),
    )
    .await;

    op.stop().await;
    purge(&caps, "c1").await;
    for t in ["private", "denied"] {
        purge(&tpls, t).await;
    }
    delete_nodes(&admin, &release).await;
}

fn flags_by_env(cmd: &clap::Command) -> BTreeMap<String, String> {
    cmd.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((env, format!("--{}", a.get_long()?)))
        })
        .collect()
}

/// [`argv_of`] for the chart variant `what`, with a line in `wrong` for
/// every flag the chart sets that `bin` does not read.
fn chart_argv(
    wrong: &mut Vec<String>,
    what: &str,
    bin: &str,
    container: &Value,
    flags: &BTreeMap<String, String>,
) -> Vec<String> {
    let (argv, unknown) = argv_of(bin, container, flags);
    for name in unknown {
        wrong.push(format!(
            "{what}: the chart sets {name}, which no {bin} flag reads"
        ));
    }
    argv
}

/// A line in `wrong` when `bin` refused the chart's arguments `argv`.
fn refused(
    wrong: &mut Vec<String>,
    what: &str,
    bin: &str,
    argv: &[String],
    parsed: Result<(), clap::Error>,
) {
    if let Err(e) = parsed {
        wrong.push(format!(
            "{what}: {bin} refuses the chart's settings {argv:?}:\n{e}"
        ));
    }
}

/// The argv a container's env amounts to: its args, then each env var as
/// the flag that reads it, with downward-API values filled in and `$(VAR)`
/// expanded as the kubelet does. Env names no flag reads are returned apart.
fn argv_of(
    bin: &str,
    container: &Value,
    flags: &BTreeMap<String, String>,
) -> (Vec<String>, Vec<String>) {
    let mut argv = vec![bin.to_string()];
    argv.extend(
        container["args"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|v| v.as_str().unwrap().to_string()),
    );
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (name, v) in env_of(container) {
        let value = match v.as_str() {
            Some(s) => seen.iter().fold(s.to_string(), |s, (k, val)| {
                s.replace(&format!("$({k})"), val)
            }),
            None => format!("downward-{}", name.to_lowercase()),
        };
        match flags.get(&name) {
            Some(flag) => argv.extend([flag.clone(), value.clone()]),
            None => unknown.push(name.clone()),
        }
        seen.insert(name, value);
    }
    (argv, unknown)
}

#[test]
fn chart_env_is_what_the_binaries_accept() {
    use clap::{CommandFactory, Parser};
    let Some((_case, helm)) = helm_or_skip(case(
        Tier::Cluster,
        "chart_rbac::chart_env_is_what_the_binaries_accept",
    )) else {
        return;
    };
    let op_flags = flags_by_env(&wrenn_operator::args::Args::command());
    let agent_flags = flags_by_env(&wrenn_node_agent::args::Args::command());
    let gateway_flags = flags_by_env(&wrenn_gateway::args::Args::command());
    // Flags the chart leaves at their defaults, and why. A new flag fails
    // this test until the chart sets it or it is named here.
    let defaults: BTreeMap<&str, &[&str]> = BTreeMap::from([
        (
            "Deployment",
            // 300 s is the documented node-lost grace; no value needed yet.
            // The chart's ClusterRole serves one operator for the whole
            // cluster, so it watches every namespace.
            &["WRENN_NODE_LOST_TIMEOUT", "WRENN_WATCH_NAMESPACE"][..],
        ),
        (
            "DaemonSet",
            // QEMU and its vsock backend are found in PATH in the image;
            // one agent per node owns /run/netns and the `wrenn` cgroups;
            // the image carries wrenn-guest at the default path; no
            // registry is trusted over plain HTTP; 180 s covers a KVM
            // guest's boot with a wide margin (only TCG test beds raise it).
            &[
                "WRENN_QEMU_BINARY",
                "WRENN_VHOST_VSOCK",
                "WRENN_NETNS_DIR",
                "WRENN_CGROUP_PARENT",
                "WRENN_GUEST_BINARY",
                "WRENN_INSECURE_REGISTRIES",
                "WRENN_GUEST_READY_SECS",
            ][..],
        ),
        (
            "gateway Deployment",
            // Certificates and the front proxy's CA are re-read every 30 s.
            &["WRENN_RELOAD_SECONDS"][..],
        ),
    ]);

    let mut variants: Vec<(String, Vec<String>)> = vec![
        ("default values".into(), vec![]),
        (
            "no leader election".into(),
            vec!["--set".into(), "operator.leaderElection=false".into()],
        ),
        (
            // Empty by default (no cluster DNS known): the agent's flag is
            // unset then, so one variant names it.
            "cluster DNS".into(),
            vec!["--set".into(), "nodeAgent.clusterDNS=10.96.0.10".into()],
        ),
    ];
    let mut files: Vec<_> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        variants.push((
            f.file_name().unwrap().to_string_lossy().into_owned(),
            vec!["-f".into(), f.display().to_string()],
        ));
    }

    let mut wrong = Vec::new();
    let mut set_by_chart: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (what, extra) in &variants {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let docs = render(&helm, "wrenn", "wrenn-system", &extra);
        let container = |kind: &str, component: &str| {
            find_of(&docs, kind, component)["spec"]["template"]["spec"]["containers"][0].clone()
        };

        let op = container("Deployment", "operator");
        let argv = chart_argv(&mut wrong, what, "wrenn-operator", &op, &op_flags);
        match wrenn_operator::args::Args::try_parse_from(&argv) {
            // Leader election is what the values say, not the flag's default.
            Ok(args) => {
                let want = what != "no leader election";
                if args.leader_election != want {
                    wrong.push(format!(
                        "{what}: leader election {}, want {want}",
                        args.leader_election
                    ));
                }
                if args.pod_namespace.is_none() || args.pod_name.is_none() {
                    wrong.push(format!(
                        "{what}: the operator is not told its Pod's name and namespace"
                    ));
                }
            }
            Err(e) => wrong.push(format!(
                "{what}: the operator refuses the chart's settings {argv:?}:\n{e}"
            )),
        }

        let ag = container("DaemonSet", "node-agent");
        let argv = chart_argv(&mut wrong, what, "wrenn-node-agent", &ag, &agent_flags);
        let parsed = wrenn_node_agent::args::Args::try_parse_from(&argv).map(drop);
        refused(&mut wrong, what, "wrenn-node-agent", &argv, parsed);
        let gw = container("Deployment", "gateway");
        let argv = chart_argv(&mut wrong, what, "wrenn-gateway", &gw, &gateway_flags);
        let parsed = wrenn_gateway::args::Args::try_parse_from(&argv).map(drop);
        refused(&mut wrong, what, "wrenn-gateway", &argv, parsed);
        for (kind, c) in [
            ("Deployment", &op),
            ("DaemonSet", &ag),
            ("gateway Deployment", &gw),
        ] {
            set_by_chart
                .entry(kind)
                .or_default()
                .extend(env_of(c).into_iter().map(|(n, _)| n));
        }
    }
    for (kind, flags) in [
        ("Deployment", &op_flags),
        ("DaemonSet", &agent_flags),
        ("gateway Deployment", &gateway_flags),
    ] {
        let set = set_by_chart.get(kind).cloned().unwrap_or_default();
        for name in flags.keys() {
            if !set.contains(name) && !defaults[kind].contains(&name.as_str()) {
                wrong.push(format!(
                    "the {kind} never sets {name}: set it from values or name it in `defaults`"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
