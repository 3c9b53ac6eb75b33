//! The CapsuleTemplate controller: per-node readiness from the agents'
//! NodeInfo (the template keys each node holds) and the phase. Root disks
//! are prepared by the agent on demand, when the first capsule on a node
//! asks for one; `agent.proto` has no call to prepare or remove a template
//! ahead of time, so this controller only observes and needs no finalizer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use wrenn_crds::names::{condition, reason};
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::{CapsuleTemplateStatus, TemplateNode, TemplatePhase};
use wrenn_crds::{CapsuleSnapshot, CapsuleTemplate};

use crate::metrics::{ErrorLabels, KindLabels, Metrics};
use crate::plan::ConditionDraft;
use crate::pool::AgentPool;
use crate::status::{self, build_conditions};

/// Errors of one CapsuleTemplate reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a namespace.
    #[error("template without namespace")]
    MissingMetadata,
    /// Reading the referenced snapshot failed.
    #[error("read snapshot {name}")]
    GetSnapshot {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("write template status")]
    Status(#[source] status::Error),
}

impl Error {
    /// Label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingMetadata => "invalid",
            Error::GetSnapshot { .. } => "api",
            Error::Status(_) => "status",
        }
    }
}

/// What the template controller needs.
pub struct Ctx {
    client: Client,
    pool: AgentPool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("template::Ctx").finish_non_exhaustive()
    }
}

/// `spec.warm` is accepted by the API but not carried out yet: say so
/// where the user looks, rather than boot cold in silence.
pub fn with_warm_caveat(message: &str) -> String {
    format!(
        "{message}; spec.warm is not implemented yet: capsules boot cold and run no startCommand"
    )
}

/// Pure: the status from what each ready node holds.
/// `held` is (node, digest when it holds the template).
pub fn build_template_status(
    held: &[(String, Option<String>)],
    snapshot_ready: Option<bool>,
    on_demand: bool,
) -> (CapsuleTemplateStatus, ConditionDraft) {
    let nodes: Vec<TemplateNode> = held
        .iter()
        .map(|(name, digest)| TemplateNode {
            name: name.clone(),
            ready: digest.is_some(),
            digest: digest.clone().filter(|d| !d.is_empty()),
            snapshot_ready: false,
        })
        .collect();
    let cached = nodes.iter().filter(|n| n.ready).count();
    let digest = nodes.iter().find_map(|n| n.digest.clone());
    let (phase, ok, why, msg) = match snapshot_ready {
        Some(true) => (
            TemplatePhase::Ready,
            true,
            reason::SNAPSHOT_TAKEN,
            "restores its snapshot".to_string(),
        ),
        Some(false) => (
            TemplatePhase::Pending,
            false,
            reason::SNAPSHOT_NOT_READY,
            "its CapsuleSnapshot is not Ready".to_string(),
        ),
        None if cached > 0 => (
            TemplatePhase::Ready,
            true,
            reason::TEMPLATE_CACHED,
            format!("root disk on {cached}/{} nodes", nodes.len()),
        ),
        None if on_demand && !nodes.is_empty() => (
            TemplatePhase::Ready,
            true,
            reason::PREPARED_ON_DEMAND,
            format!(
                "prepared on a node when a capsule first needs it ({} nodes ready)",
                nodes.len()
            ),
        ),
        None => (
            TemplatePhase::Pending,
            false,
            reason::NO_NODES,
            "no node agent is ready".to_string(),
        ),
    };
    (
        CapsuleTemplateStatus {
            phase: Some(phase),
            digest,
            nodes,
            ..Default::default()
        },
        ConditionDraft {
            type_: condition::READY,
            status: if ok { "True" } else { "False" },
            reason: why,
            message: msg,
        },
    )
}

async fn reconcile(tpl: Arc<CapsuleTemplate>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = tpl.namespace().ok_or(Error::MissingMetadata)?;
    let prefix = format!("{ns}/{}@", tpl.name_any());
    let held: Vec<(String, Option<String>)> = ctx
        .pool
        .ready_nodes()
        .into_iter()
        .map(|n| {
            let digest = ctx.pool.info(&n).and_then(|i| {
                i.templates
                    .iter()
                    .find(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, d)| d.clone())
            });
            (n, digest)
        })
        .collect();
    let snapshot_ready = match &tpl.spec.source.snapshot_ref {
        Some(r) => {
            let api: Api<CapsuleSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
            let s = api
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::GetSnapshot {
                    name: r.name.clone(),
                    source,
                })?;
            Some(
                s.and_then(|s| s.status)
                    .is_some_and(|st| st.phase == Some(SnapshotPhase::Ready)),
            )
        }
        None => None,
    };
    let (mut next, mut cond) = build_template_status(&held, snapshot_ready, true);
    if tpl.spec.warm.is_some() {
        cond.message = with_warm_caveat(&cond.message);
    }
    let current = tpl.status.clone().unwrap_or_default();
    next.observed_generation = tpl.metadata.generation;
    next.conditions = build_conditions(
        &[cond],
        &current.conditions,
        tpl.metadata.generation,
        Timestamp::now(),
    );
    if tpl.status.as_ref() != Some(&next) {
        let api: Api<CapsuleTemplate> = Api::namespaced(ctx.client.clone(), &ns);
        status::apply_status(&api, &*tpl, &next)
            .await
            .map_err(Error::Status)?;
        ctx.metrics
            .status_writes
            .get_or_create(&KindLabels {
                kind: "CapsuleTemplate",
            })
            .inc();
    }
    ctx.metrics
        .reconcile_duration
        .get_or_create(&KindLabels {
            kind: "CapsuleTemplate",
        })
        .observe(started.elapsed().as_secs_f64());
    // Node readiness changes without an event on the template: look again.
    Ok(Action::requeue(Duration::from_secs(15)))
}

fn error_policy(_: Arc<CapsuleTemplate>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: "CapsuleTemplate",
            category: err.category(),
        })
        .inc();
    tracing::warn!(
        error = err as &dyn std::error::Error,
        "template reconcile failed"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Runs the CapsuleTemplate controller until `shutdown`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    pool: AgentPool,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pool,
        metrics,
    });
    let api: Api<CapsuleTemplate> = super::scoped(&client, namespace.as_deref());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_nodes_make_it_ready_with_per_node_readiness() {
        let held = vec![
            ("a".to_string(), Some("sha256:1".to_string())),
            ("b".to_string(), None),
        ];
        let (s, c) = build_template_status(&held, None, true);
        assert_eq!(s.phase, Some(TemplatePhase::Ready));
        assert_eq!(c.reason, "TemplateCached");
        assert_eq!(c.message, "root disk on 1/2 nodes");
        assert!(s.nodes[0].ready && !s.nodes[1].ready);
        assert_eq!(s.digest.as_deref(), Some("sha256:1"));
    }

    #[test]
    fn no_agents_leaves_it_pending() {
        let (s, c) = build_template_status(&[], None, true);
        assert_eq!(s.phase, Some(TemplatePhase::Pending));
        assert_eq!(c.status, "False");
    }

    #[test]
    fn a_warm_template_says_it_boots_cold() {
        let m = with_warm_caveat("root disk on 1/2 nodes");
        assert!(m.starts_with("root disk on 1/2 nodes; "), "{m}");
        assert!(m.contains("spec.warm is not implemented yet"), "{m}");
    }

    #[test]
    fn snapshot_templates_follow_their_snapshot() {
        let held = vec![("a".to_string(), None)];
        assert_eq!(
            build_template_status(&held, Some(false), true).0.phase,
            Some(TemplatePhase::Pending)
        );
        assert_eq!(
            build_template_status(&held, Some(true), true).0.phase,
            Some(TemplatePhase::Ready)
        );
    }
}
