//! Wrenn's side of the benchmarks: the operator running in this process on
//! in-process fake node agents (no VMM; the boot delay is a parameter),
//! against a real kube-apiserver, and a `tracing` layer that times the
//! operator's spans. Shared by `operator_throughput` and `compare`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;
use wrenn_crds::{Capsule, CapsuleTemplate};
use wrenn_operator::agent::fake::{FakeConnector, FakeNodeAgent};
use wrenn_operator::controller::{Operator, Settings, run_all};
use wrenn_operator::metrics::Metrics;
use wrenn_operator::pool::AgentPool;
use wrenn_proto::agent::v1 as pb;

/// Template of cold capsules: an image, prepared on a node when a capsule
/// first needs it (the fake agent never pulls it).
pub const COLD_TEMPLATE: &str = "base";
/// Template of warm capsules: booted once, snapshotted on every node ahead.
pub const WARM_TEMPLATE: &str = "warm";

/// The operator and its fake agents, in namespace `ns`.
pub struct Wrenn {
    /// Namespace of the agents' Pods, the templates and the capsules.
    pub ns: String,
    /// How many fake agents serve it.
    pub agents: usize,
    stop: tokio::sync::oneshot::Sender<()>,
    op: tokio::task::JoinHandle<()>,
}

impl Wrenn {
    /// Creates a namespace, `agents` fake agents (each with a discovery
    /// Pod), the operator watching that namespace, and the cold template;
    /// returns once every agent has synced, so what follows measures
    /// reconciles, not start-up.
    pub async fn start(client: &Client, agents: usize, boot: Duration) -> Result<Wrenn> {
        let ns = wrenn_e2e::temp_namespace(client, "bench").await?;
        let connector = Arc::new(FakeConnector::default());
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        for i in 0..agents {
            let node = format!("{ns}-n{i}");
            let agent = FakeNodeAgent::new(
                &node,
                pb::Resources {
                    vcpus: 1024,
                    memory_bytes: 4 << 40,
                    disk_bytes: 64 << 40,
                },
                boot,
            );
            connector.add(agent);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": { "name": format!("agent-{i}"), "labels": { "app.kubernetes.io/name": "wrenn-node-agent" } },
                "spec": { "nodeName": node, "containers": [{ "name": "a", "image": "x" }] },
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
            pods.patch_status(
                &format!("agent-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "podIP": format!("127.0.1.{}", i + 1) } })),
            )
            .await?;
        }
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (pool, streams) = AgentPool::new(connector, Duration::from_secs(1));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let op = tokio::spawn(run_all(
            Operator {
                client: client.clone(),
                pool: pool.clone(),
                streams,
                discovery: (
                    ns.clone(),
                    "app.kubernetes.io/name=wrenn-node-agent".into(),
                    7443,
                ),
                metrics,
                settings: Settings {
                    usage_interval: Duration::from_secs(3600),
                    ..Settings::default()
                },
                instance: None,
                namespace: Some(ns.clone()),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let tpl: CapsuleTemplate = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": { "name": COLD_TEMPLATE },
            "spec": { "source": { "image": { "reference": "docker.io/library/debian:bookworm" } } },
        }))?;
        let tpls: Api<CapsuleTemplate> = Api::namespaced(client.clone(), &ns);
        tpls.create(&PostParams::default(), &tpl).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.ready_nodes().len() < agents {
            if Instant::now() > deadline {
                bail!("fake agents never synced");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Wrenn {
            ns,
            agents,
            stop,
            op,
        })
    }

    /// Creates the warm template and waits until its snapshot is on every
    /// agent, so warm capsules restore wherever they are placed.
    pub async fn prepare_warm(&self, client: &Client) -> Result<()> {
        let tpl: CapsuleTemplate = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
            "metadata": { "name": WARM_TEMPLATE },
            "spec": {
                "source": { "image": { "reference": "docker.io/library/debian:bookworm" } },
                "defaults": { "vcpus": 1, "memory": "256Mi", "disk": "1Gi" },
                "warm": {
                    "startCommand": ["httpd", "-f", "-p", "8080"],
                    "readiness": { "tcpPort": 8080 },
                },
            },
        }))?;
        let tpls: Api<CapsuleTemplate> = Api::namespaced(client.clone(), &self.ns);
        tpls.create(&PostParams::default(), &tpl).await?;
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &self.ns,
            &kube::api::ApiResource::erase::<CapsuleTemplate>(&()),
        );
        let agents = self.agents;
        wrenn_e2e::bench::driver::wait_for(&api, WARM_TEMPLATE, Duration::from_secs(120), |t| {
            t.data
                .pointer("/status/nodes")
                .and_then(|n| n.as_array())
                .is_some_and(|n| {
                    n.len() == agents
                        && n.iter()
                            .all(|n| n.get("snapshotReady").and_then(|r| r.as_bool()) == Some(true))
                })
        })
        .await
        .context("warm template never had its snapshot on every node")?;
        Ok(())
    }

    /// Stops the operator.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.op).await;
    }
}

/// A Capsule called `name` of `template` (the cold one asks for its shape;
/// a warm one takes the template's, which its snapshot was made with).
pub fn capsule(name: &str, template: &str) -> Capsule {
    let mut spec = json!({ "source": { "templateRef": { "name": template } } });
    if template == COLD_TEMPLATE {
        spec["resources"] = json!({ "vcpus": 1, "memory": "256Mi" });
    }
    serde_json::from_value(json!({
        "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a literal Capsule deserialises")
}

/// Wall time of every closed operator span, by span name.
#[derive(Clone, Default)]
pub struct Stages(Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>);

struct Opened(Instant);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Stages {
    fn on_new_span(
        &self,
        _: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Opened(Instant::now()));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(took) = span.extensions().get::<Opened>().map(|o| o.0.elapsed()) else {
            return;
        };
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(span.name())
            .or_default()
            .push(took);
    }
}

/// One span's figures: name, count, p50, p99, total (ms).
pub type SpanFigures = (&'static str, usize, f64, f64, f64);

impl Stages {
    /// Installs this layer as the process's subscriber, for the operator's spans.
    pub fn install(&self) -> Result<()> {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(
            self.clone().with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("wrenn_operator", tracing::Level::TRACE),
            ),
        );
        tracing::subscriber::set_global_default(subscriber).context("install the span layer")
    }

    /// The spans closed since the last call, the busiest first.
    pub fn take(&self) -> Vec<SpanFigures> {
        use wrenn_e2e::bench::figures::percentile;
        let spans = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut rows: Vec<SpanFigures> = spans
            .into_iter()
            .map(|(name, v)| {
                let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                ms.sort_by(f64::total_cmp);
                let total = ms.iter().sum();
                (
                    name,
                    ms.len(),
                    percentile(&ms, 50.0),
                    percentile(&ms, 99.0),
                    total,
                )
            })
            .collect();
        rows.sort_by(|a, b| b.4.total_cmp(&a.4));
        rows
    }
}
