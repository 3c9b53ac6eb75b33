//! The benchmark's peer: `sigs.k8s.io/agent-sandbox`'s controller, built by
//! `e2e/scripts/build-agent-sandbox.sh`, started with its documented
//! defaults against the same API server as Wrenn, and kwok fake nodes on
//! which kube-scheduler binds its Pods and kwok makes them Ready.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;

use crate::ControlPlane;
use crate::bench::driver::{condition_true, wait_for};
use crate::helm::script_var;
use crate::workloads::{FAKE_NODE_ANNOTATION, Workloads, supervise};

/// agent-sandbox's `Sandbox`.
pub fn sandbox_kind() -> ApiResource {
    kind("agents.x-k8s.io", "Sandbox", "sandboxes")
}

/// agent-sandbox's `SandboxClaim`.
pub fn claim_kind() -> ApiResource {
    kind(
        "extensions.agents.x-k8s.io",
        "SandboxClaim",
        "sandboxclaims",
    )
}

/// agent-sandbox's `SandboxTemplate`.
pub fn template_kind() -> ApiResource {
    kind(
        "extensions.agents.x-k8s.io",
        "SandboxTemplate",
        "sandboxtemplates",
    )
}

/// agent-sandbox's `SandboxWarmPool`.
pub fn pool_kind() -> ApiResource {
    kind(
        "extensions.agents.x-k8s.io",
        "SandboxWarmPool",
        "sandboxwarmpools",
    )
}

fn kind(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1beta1", kind), plural)
}

/// A running agent-sandbox controller; stopped when dropped.
#[derive(Debug)]
pub struct Peer {
    /// `AGENT_SANDBOX_VERSION`.
    pub version: String,
    /// The controller's log.
    pub log: PathBuf,
    _child: Mutex<Child>,
}

impl Peer {
    /// Builds (or finds cached) agent-sandbox, installs its CRDs on `cp`,
    /// starts kube-controller-manager, kube-scheduler and kwok
    /// ([`Workloads`]) and then the controller with every extension.
    pub fn start(cp: &ControlPlane) -> Result<Peer> {
        let built = Command::new("bash")
            .arg(crate::workspace_root().join("e2e/scripts/build-agent-sandbox.sh"))
            .status()
            .context("run build-agent-sandbox.sh")?;
        if !built.success() {
            bail!("build-agent-sandbox.sh failed");
        }
        let dir = PathBuf::from(script_var("AGENT_SANDBOX_BIN_DIR")?);
        let version = script_var("AGENT_SANDBOX_VERSION")?;
        let crds = dir.join("crds");
        cp.kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f"],
            Some(&crds),
        )?;
        cp.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/sandboxes.agents.x-k8s.io",
                "crd/sandboxclaims.extensions.agents.x-k8s.io",
                "crd/sandboxtemplates.extensions.agents.x-k8s.io",
                "crd/sandboxwarmpools.extensions.agents.x-k8s.io",
            ],
            None,
        )?;
        let workloads = Workloads::shared(cp).map_err(anyhow::Error::msg)?;
        let log = workloads.dir.join("agent-sandbox.log");
        // The documented defaults (k8s/extensions.controller.yaml and the
        // chart's values: 100 Sandbox workers, 50 claim workers, no client
        // QPS limit), except: one replica needs no leader election (it
        // would only delay the start), and the metrics and probe ports are
        // off so two runs cannot collide on :8080.
        let args = vec![
            format!("--kubeconfig={}", cp.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--extensions".into(),
            "--metrics-bind-address=0".into(),
            "--health-probe-bind-address=0".into(),
        ];
        let child = supervise(&dir.join("agent-sandbox-controller"), &args, &log)?;
        Ok(Peer {
            version,
            log,
            _child: Mutex::new(child),
        })
    }
}

/// Creates `n` kwok Nodes named `prefix-N` with room for the whole run
/// (10,000 Pods, a /16 of Pod addresses each) and waits until kwok has
/// made every one Ready. Returns their names.
pub async fn add_nodes(client: &kube::Client, prefix: &str, n: usize) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "type": "kwok",
                },
                "annotations": { FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0" },
            },
            "spec": { "podCIDR": format!("10.{}.0.0/16", 64 + i) },
            "status": {
                "capacity": { "cpu": "1000", "memory": "4Ti", "pods": "10000" },
                "allocatable": { "cpu": "1000", "memory": "4Ti", "pods": "10000" },
            },
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {name}"))?;
        names.push(name);
    }
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<Node>(&()));
    for name in &names {
        wait_for(&api, name, Duration::from_secs(60), |n| {
            condition_true(n, "Ready")
        })
        .await
        .context("kwok never made the node Ready")?;
    }
    Ok(names)
}

/// The Pod every peer sandbox runs: one container (kwok never pulls it).
fn pod_template() -> serde_json::Value {
    json!({ "spec": { "containers": [{ "name": "sandbox", "image": "registry.k8s.io/pause:3.10" }] } })
}

/// A `Sandbox` called `name`.
pub fn sandbox(name: &str) -> DynamicObject {
    object(
        &sandbox_kind(),
        name,
        json!({ "podTemplate": pod_template() }),
    )
}

/// A `SandboxTemplate` called `name`.
pub fn template(name: &str) -> DynamicObject {
    object(
        &template_kind(),
        name,
        json!({ "podTemplate": pod_template() }),
    )
}

/// A `SandboxWarmPool` called `name` of `replicas` sandboxes of `template`.
pub fn warm_pool(name: &str, template: &str, replicas: usize) -> DynamicObject {
    object(
        &pool_kind(),
        name,
        json!({ "replicas": replicas, "sandboxTemplateRef": { "name": template } }),
    )
}

/// A `SandboxClaim` called `name` on warm pool `pool`.
pub fn claim(name: &str, pool: &str) -> DynamicObject {
    object(
        &claim_kind(),
        name,
        json!({ "warmPoolRef": { "name": pool } }),
    )
}

fn object(kind: &ApiResource, name: &str, spec: serde_json::Value) -> DynamicObject {
    let mut o = DynamicObject::new(name, kind);
    o.data = json!({ "spec": spec });
    o
}

/// True when a `Sandbox` or `SandboxClaim` is Ready.
pub fn is_ready(obj: &DynamicObject) -> bool {
    condition_true(obj, "Ready")
}

/// Waits until warm pool `name` has `replicas` Ready sandboxes.
pub async fn wait_pool_full(
    client: &kube::Client,
    ns: &str,
    name: &str,
    replicas: usize,
    timeout: Duration,
) -> Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &pool_kind());
    wait_for(&api, name, timeout, |p| {
        p.data
            .pointer("/status/readyReplicas")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|r| r as usize >= replicas)
    })
    .await
    .map(|_| ())
}
