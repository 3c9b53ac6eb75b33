//! Wrenn end to end on one machine: the real `wrenn-operator` binary against
//! a control plane, driving real node agents that each play a node in their
//! own network namespace (see [`crate::agent`]). The local run (`up.sh`) and
//! the scenario tests use this, so what a user starts is what CI tests.
//!
//! Agents are found the way the chart makes them found: a Pod per agent
//! carrying the DaemonSet's label, with the node name and the Pod IP (the
//! node side of the agent's veth). No kubelet runs, so the harness writes
//! the Pod's status itself.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::agent::{NodeAgent, Pki, SERVER_NAME};
use crate::build::cargo_build;
use crate::child::stop_child;
pub use crate::child::tail;

/// The label the chart's DaemonSet gives node-agent Pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=wrenn-node-agent";

/// A running `wrenn-operator` process.
#[derive(Debug)]
pub struct OperatorProcess {
    /// Its log file.
    pub log: PathBuf,
    /// Its admin address (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    child: Option<Child>,
}

/// Everything the operator process needs.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// Admin kubeconfig of the control plane.
    pub kubeconfig: PathBuf,
    /// Namespace of the node-agent Pods.
    pub agent_namespace: String,
    /// Reconcile only this namespace's objects (tests sharing one API
    /// server each run an operator); every namespace when `None`.
    pub watch_namespace: Option<String>,
    /// Client certificate and the CA of the agents.
    pub pki: Pki,
    /// Where the log goes.
    pub log: PathBuf,
    /// Seconds before a deleted capsule on a lost node is released.
    pub node_lost_timeout_secs: u64,
}

fn free_loopback_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("pick a free loopback port")?;
    l.local_addr().context("local address")
}

impl OperatorProcess {
    /// Builds (debug) and starts the operator, waiting until `/healthz` answers.
    pub fn start(opts: &OperatorOptions) -> Result<OperatorProcess> {
        let binary = cargo_build("wrenn-operator", "wrenn-operator")?;
        let admin = free_loopback_port()?;
        // Appended, so a restarted operator's log follows the killed one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log)
            .with_context(|| format!("open {}", opts.log.display()))?;
        let child = Command::new(&binary)
            .env("KUBECONFIG", &opts.kubeconfig)
            .args(["--agent-namespace", &opts.agent_namespace])
            .args(
                opts.watch_namespace
                    .iter()
                    .flat_map(|ns| ["--watch-namespace", ns.as_str()]),
            )
            .args(["--agent-selector", AGENT_SELECTOR])
            .args(["--agent-server-name", SERVER_NAME])
            .arg("--tls-cert")
            .arg(&opts.pki.client_cert)
            .arg("--tls-key")
            .arg(&opts.pki.client_key)
            .arg("--agent-ca")
            .arg(&opts.pki.ca)
            .args(["--admin-listen", &admin.to_string()])
            .args(["--leader-election", "false"])
            .args([
                "--node-lost-timeout",
                &opts.node_lost_timeout_secs.to_string(),
            ])
            .args(["--log-level", "info,wrenn_operator=debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut op = OperatorProcess {
            log: opts.log.clone(),
            admin,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_err() {
            if let Some(child) = op.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "operator exited ({status}) during start:\n{}",
                    op.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("operator admin port not open in 30 s:\n{}", op.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(op)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of the operator's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 60)
    }

    /// Stops it: SIGTERM (graceful), SIGKILL after 15 s.
    pub fn stop(&mut self) {
        stop_child(self.child.take(), "TERM", Duration::from_secs(15));
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        stop_child(self.child.take(), "KILL", Duration::from_secs(5));
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `ns` unless it exists, labelled so its templates may name the
/// agents' image files (the local run boots the guest image's disk).
pub async fn ensure_namespace(client: &kube::Client, ns: &str) -> Result<()> {
    use wrenn_crds::names::label::{NODE_IMAGES, NODE_IMAGES_ALLOWED};
    let api: Api<Namespace> = Api::all(client.clone());
    let body: Namespace = serde_json::from_value(json!({
        "metadata": { "name": ns, "labels": { NODE_IMAGES: NODE_IMAGES_ALLOWED } }
    }))?;
    match api.create(&PostParams::default(), &body).await {
        Ok(_) => Ok(()),
        // An existing namespace (`default` always exists) gets the label
        // too, as a cluster admin would set it.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let labels = json!({ "metadata": { "labels": { NODE_IMAGES: NODE_IMAGES_ALLOWED } } });
            api.patch(ns, &PatchParams::default(), &Patch::Merge(&labels))
                .await
                .with_context(|| format!("label namespace {ns} {NODE_IMAGES}"))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("create namespace {ns}")),
    }
}

/// [`apply`], retried while the API server's admission still refuses it
/// (403) for up to `within`: the admission policies read namespace labels
/// from a cache that lags a label set by [`ensure_namespace`] on an
/// existing namespace.
pub async fn apply_once_admitted(
    client: &kube::Client,
    ns: &str,
    body: &serde_json::Value,
    who: &str,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match apply(client, ns, body, who).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && is_forbidden(&e) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_forbidden(e: &anyhow::Error) -> bool {
    e.chain().any(
        |c| matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 403),
    )
}

fn agent_pod_name(agent: &NodeAgent) -> String {
    format!("wrenn-node-agent-{}", agent.node_name)
}

/// Publishes `agent` as the DaemonSet and kubelet would: a labelled Pod on
/// its node, Running and Ready, with the agent's address as Pod IP.
pub async fn register_agent(client: &kube::Client, ns: &str, agent: &NodeAgent) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = agent_pod_name(agent);
    let (key, value) = AGENT_SELECTOR
        .split_once('=')
        .context("selector is key=value")?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { key: value } },
        "spec": {
            "nodeName": agent.node_name,
            "containers": [{ "name": "node-agent", "image": "wrenn/node-agent:local" }],
        },
    }))?;
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("create Pod {ns}/{name}")),
    }
    let ip = agent.addr.ip().to_string();
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": "True" }],
        } })),
    )
    .await
    .with_context(|| format!("write the status of Pod {ns}/{name}"))?;
    Ok(())
}

/// Removes the agent's Pod, as a drained node would.
pub async fn unregister_agent(client: &kube::Client, ns: &str, agent: &NodeAgent) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pods
        .delete(
            &agent_pod_name(agent),
            &DeleteParams::default().grace_period(0),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).context("delete the agent Pod"),
    }
}

/// A CapsuleTemplate booting the root disk `rootfs` names in the agents'
/// image directory (`rootfs.path`; the namespace must allow node images).
pub fn template_manifest(name: &str, rootfs: &str) -> serde_json::Value {
    json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
        "metadata": { "name": name },
        "spec": {
            "source": { "rootfs": { "path": rootfs } },
            "defaults": { "vcpus": 1, "memory": "256Mi", "disk": "1Gi" },
        },
    })
}

/// A Capsule from template `template`.
pub fn capsule_manifest(name: &str, template: &str) -> serde_json::Value {
    json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": { "name": name },
        "spec": {
            "source": { "templateRef": { "name": template } },
            "env": [{ "name": "WRENN_LOCAL", "value": "1" }],
        },
    })
}

/// Server-side applies `body` (any namespaced kind) as field manager `who`.
pub async fn apply(
    client: &kube::Client,
    ns: &str,
    body: &serde_json::Value,
    who: &str,
) -> Result<()> {
    let kind = body["kind"].as_str().context("manifest without kind")?;
    let name = body["metadata"]["name"]
        .as_str()
        .context("manifest without name")?;
    let (group, version) = body["apiVersion"]
        .as_str()
        .context("manifest without apiVersion")?
        .split_once('/')
        .context("apiVersion is group/version")?;
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let (ar, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {kind}"))?;
    let api: Api<kube::core::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(name, &PatchParams::apply(who).force(), &Patch::Apply(body))
        .await
        .with_context(|| format!("apply {kind} {ns}/{name}"))?;
    Ok(())
}

/// The gateway as the local run starts it: `wrenn-gateway` on a private
/// address of this machine (the aggregator refuses loopback), registered
/// by an `APIService`, with certificates from the node's [`Pki`]. It runs
/// with the admin kubeconfig (no chart, so no ServiceAccount); users'
/// requests are still authorized as the user, by SubjectAccessReview.
/// The API server needs its front-proxy flags (`control-plane.sh` with
/// `WRENN_CP_FRONT_PROXY=1`).
#[derive(Debug)]
pub struct LocalGateway {
    /// The process.
    pub process: crate::gateway::GatewayProcess,
    /// Where it listens.
    pub listen: SocketAddr,
    _addr: crate::gateway::LocalAddr,
}

/// The Service the APIService names, in the agents' namespace.
pub const GATEWAY_SERVICE: &str = "wrenn-gateway";

impl LocalGateway {
    /// Starts it in front of the agents of `agent_namespace` (port 7443),
    /// listening on `ip` of a link named `link`, and waits until the API
    /// server serves its discovery document.
    pub async fn start(
        client: &kube::Client,
        kubeconfig: &Path,
        pki: &Pki,
        agent_namespace: &str,
        (link, ip): (&str, std::net::Ipv4Addr),
        log: &Path,
    ) -> Result<LocalGateway> {
        use crate::gateway::{GatewayOptions, GatewayProcess, LocalAddr, register_apiservice};
        let dns = format!("{GATEWAY_SERVICE}.{agent_namespace}.svc");
        let certs = tokio::task::spawn_blocking({
            let (pki, dns) = (pki.clone(), dns.clone());
            move || pki.gateway(&dns)
        })
        .await??;
        let addr = LocalAddr::create(link, ip)?;
        let listen = {
            let l = TcpListener::bind((ip, 0)).context("pick a port for the gateway")?;
            l.local_addr().context("local address")?
        };
        let opts = GatewayOptions {
            kubeconfig: kubeconfig.to_path_buf(),
            listen,
            serving_cert: certs.serving_cert,
            serving_key: certs.serving_key,
            client_cert: certs.client_cert,
            client_key: certs.client_key,
            agent_ca: pki.ca.clone(),
            agent_namespace: agent_namespace.to_string(),
            agent_port: 7443,
            log: log.to_path_buf(),
        };
        let process = tokio::task::spawn_blocking(move || GatewayProcess::start(&opts)).await??;
        let ca = std::fs::read_to_string(&pki.ca).context("read the CA")?;
        register_apiservice(client, agent_namespace, GATEWAY_SERVICE, listen, &ca).await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let req =
                http::Request::get(format!("/apis/{}/{}", "subresources.wrenn.dev", "v1alpha1"))
                    .body(Vec::new())
                    .context("discovery request")?;
            match client.request::<serde_json::Value>(req).await {
                Ok(list) if list["resources"][0]["name"] == "capsules/exec" => break,
                Ok(other) if Instant::now() > deadline => {
                    bail!("the APIService serves an unexpected document: {other}")
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "the API server does not serve subresources.wrenn.dev after 90 s: {e}\n{}",
                        tail(log, 30)
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        Ok(LocalGateway {
            process,
            listen,
            _addr: addr,
        })
    }
}

/// Sum (seconds) and count of the successful `step` observations
/// (`wrenn_agent_<step>_seconds{outcome="ok"}`) on `agent`'s admin port.
/// The port listens on loopback inside the node's namespace, so the scrape
/// runs there too.
pub fn agent_step_seconds(agent: &NodeAgent, step: &str) -> Result<(f64, u64)> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", agent.netns))
        .args([
            "curl",
            "-sf",
            "--max-time",
            "5",
            "http://127.0.0.1:9090/metrics",
        ])
        .output()
        .context("run curl in the node namespace")?;
    if !out.status.success() {
        bail!(
            "scrape the metrics of agent {}: {}",
            agent.node_name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    histogram_ok(
        &String::from_utf8_lossy(&out.stdout),
        &format!("wrenn_agent_{step}_seconds"),
    )
}

/// Sum and count of histogram `name` with `outcome="ok"` in Prometheus text.
fn histogram_ok(text: &str, name: &str) -> Result<(f64, u64)> {
    let value = |suffix: &str| -> Result<Option<f64>> {
        let prefix = format!("{name}_{suffix}{{");
        for line in text.lines() {
            if line.starts_with(&prefix) && line.contains("outcome=\"ok\"") {
                let v = line
                    .rsplit(' ')
                    .next()
                    .context("metric line without value")?;
                return Ok(Some(
                    v.parse()
                        .with_context(|| format!("parse {name}_{suffix} value {v:?}"))?,
                ));
            }
        }
        Ok(None)
    };
    // An agent that has not finished a step yet has no series for it.
    let sum = value("sum")?.unwrap_or(0.0);
    let count = value("count")?.unwrap_or(0.0);
    Ok((sum, count as u64))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::histogram_ok;

    #[test]
    fn histogram_ok_reads_the_ok_series_only() {
        let text = "\
# TYPE wrenn_agent_boot_seconds histogram
wrenn_agent_boot_seconds_sum{outcome=\"error\"} 9.0
wrenn_agent_boot_seconds_count{outcome=\"error\"} 3
wrenn_agent_boot_seconds_sum{outcome=\"ok\"} 7.25
wrenn_agent_boot_seconds_count{outcome=\"ok\"} 2
wrenn_agent_boot_seconds_bucket{le=\"1.0\",outcome=\"ok\"} 0
";
        assert_eq!(
            histogram_ok(text, "wrenn_agent_boot_seconds").unwrap(),
            (7.25, 2)
        );
        assert_eq!(
            histogram_ok(text, "wrenn_agent_create_seconds").unwrap(),
            (0.0, 0)
        );
    }
}
