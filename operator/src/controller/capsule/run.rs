//! The Capsule controller's wiring: its watches (Capsules; templates and
//! snapshots through reflectors whose stores the reconciles read), the
//! agents' triggers, and the convergence and name-refusal tasks that run
//! beside it.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::mpsc;
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};

use super::converge::{converge, report_quarantined};
use super::{error_policy, reconcile};
use crate::pool::AgentSynced;

/// A watched object, or `None` after logging why the watch failed (it
/// retries with backoff).
fn watched<K>(item: Result<K, watcher::Error>) -> Option<K> {
    item.map_err(|err| {
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "watch capsule sources"
        )
    })
    .ok()
}

/// Follows the source objects `api` lists into `writer`'s store and yields,
/// after each change is stored, the capsules whose `source` names it.
fn source_triggers<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    capsules: Store<Capsule>,
    source: fn(&Capsule) -> Option<&str>,
) -> impl futures::Stream<Item = ObjectRef<Capsule>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .touched_objects()
    .filter_map(|o| futures::future::ready(watched(o)))
    .flat_map(move |o| {
        let (ns, name) = (o.namespace(), o.name_any());
        futures::stream::iter(users(&capsules, |c| {
            c.namespace() == ns && source(c) == Some(name.as_str())
        }))
    })
}

/// Follows Pods and Namespaces into the stores `from` selectors read, and
/// yields, after each change (deletes too), the capsules whose selectors
/// it may concern. Pods are kept slim: labels, addresses, phase and
/// whether they use the host's network.
fn peer_triggers(
    pods: Api<Pod>,
    namespaces: Api<Namespace>,
    writers: (
        reflector::store::Writer<Pod>,
        reflector::store::Writer<Namespace>,
    ),
    capsules: Store<Capsule>,
) -> (
    impl futures::Stream<Item = ObjectRef<Capsule>> + Send + 'static,
    impl futures::Stream<Item = ObjectRef<Capsule>> + Send + 'static,
) {
    let by_pod = capsules.clone();
    let pod_triggers = reflector(
        writers.0,
        watcher(pods, watcher::Config::default())
            .default_backoff()
            .modify(slim_pod),
    )
    .touched_objects()
    .filter_map(|o| futures::future::ready(watched(o)))
    .flat_map(move |pod| {
        let pod_ns = pod.namespace().unwrap_or_default();
        futures::stream::iter(users(&by_pod, |c| {
            ports_from(c).any(|from| {
                crate::peers::may_choose(&c.namespace().unwrap_or_default(), from, &pod_ns)
            })
        }))
    });
    let namespace_triggers = reflector(
        writers.1,
        watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .modify(|n| {
                n.managed_fields_mut().clear();
                n.annotations_mut().clear();
            }),
    )
    .touched_objects()
    .filter_map(|o| futures::future::ready(watched(o)))
    .flat_map(move |_| {
        futures::stream::iter(users(&capsules, |c| {
            ports_from(c).any(|from| from.iter().any(|p| p.namespace_selector.is_some()))
        }))
    });
    (pod_triggers, namespace_triggers)
}

/// The `from` lists of a capsule's ports.
fn ports_from(c: &Capsule) -> impl Iterator<Item = &[wrenn_crds::capsule::PortPeer]> {
    c.spec
        .network
        .iter()
        .flat_map(|n| n.ports.iter().map(|p| p.from.as_slice()))
}

/// What `from` selectors read of a Pod, and nothing else (a Pod's spec
/// and status are most of its size, and carry what the operator has no
/// business holding).
fn slim_pod(p: &mut Pod) {
    p.managed_fields_mut().clear();
    p.annotations_mut().clear();
    let host_network = p.spec.as_ref().and_then(|s| s.host_network);
    p.spec = Some(PodSpec {
        host_network,
        ..PodSpec::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..PodStatus::default()
    });
}

/// The capsules in `store` that `uses` selects, as triggers.
fn users(store: &Store<Capsule>, uses: impl Fn(&Capsule) -> bool) -> Vec<ObjectRef<Capsule>> {
    store
        .state()
        .iter()
        .filter(|c| uses(c))
        .map(|c| ObjectRef::from_obj(&**c))
        .collect()
}

/// Runs the Capsule controller until `shutdown` resolves.
pub async fn run(
    ctx_parts: crate::controller::Parts,
    namespace: Option<String>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Capsule>>,
    mut syncs: mpsc::UnboundedReceiver<AgentSynced>,
    refusals: mpsc::Receiver<wrenn_proto::agent::v1::Event>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx_parts.client.clone();
    let ns = namespace.as_deref();
    let caps: Api<Capsule> = crate::controller::scoped(&client, ns);
    let templates: Api<CapsuleTemplate> = crate::controller::scoped(&client, ns);
    let snapshots: Api<CapsuleSnapshot> = crate::controller::scoped(&client, ns);
    let concurrency = ctx_parts.settings.concurrency;
    let controller = Controller::new(caps, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    let store = controller.store();
    let (template_cache, template_writer) = reflector::store();
    let (snapshot_cache, snapshot_writer) = reflector::store();
    let (pod_cache, pod_writer) = reflector::store();
    let (namespace_cache, namespace_writer) = reflector::store();
    let mut ctx = ctx_parts.into_context(store.clone());
    ctx.templates = template_cache;
    ctx.snapshots = snapshot_cache;
    ctx.pods = pod_cache;
    ctx.namespaces = namespace_cache;
    let ctx = Arc::new(ctx);
    let reporter = tokio::spawn(super::names::report_refusals(ctx.clone(), refusals));
    let (retrigger, retriggered) = mpsc::unbounded_channel();
    let by_template = store.clone();
    let by_snapshot = store.clone();
    let conv_ctx = ctx.clone();
    let conv_api: Api<Capsule> = crate::controller::scoped(&client, ns);
    let converger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(conv_ctx.settings.converge_interval);
        tick.tick().await;
        loop {
            let nodes = tokio::select! {
                sync = syncs.recv() => match sync {
                    Some(s) => {
                        report_quarantined(&conv_ctx, &s.node).await;
                        vec![s]
                    }
                    None => return,
                },
                _ = tick.tick() => conv_ctx
                    .pool
                    .ready_nodes()
                    .into_iter()
                    .map(|node| AgentSynced { node })
                    .collect(),
            };
            for sync in &nodes {
                converge(&conv_ctx, &conv_api, sync, &retrigger).await;
            }
        }
    });
    // Templates and snapshots through reflectors whose stores the
    // reconciles read: a change is in the store before the capsules that
    // use it are triggered.
    let tpl_triggers = source_triggers(templates, template_writer, by_template, |c| {
        c.spec.source.template_ref.as_ref().map(|r| r.name.as_str())
    });
    let snap_triggers = source_triggers(snapshots, snapshot_writer, by_snapshot, |c| {
        c.spec.source.snapshot_ref.as_ref().map(|r| r.name.as_str())
    });
    let (pod_triggers, namespace_triggers) = peer_triggers(
        crate::controller::scoped(&client, ns),
        Api::all(client.clone()),
        (pod_writer, namespace_writer),
        store.clone(),
    );
    let merged = futures::stream::select_all([
        tokio_stream::wrappers::UnboundedReceiverStream::new(triggers).boxed(),
        tokio_stream::wrappers::UnboundedReceiverStream::new(retriggered).boxed(),
        tpl_triggers.boxed(),
        snap_triggers.boxed(),
        pod_triggers.boxed(),
        namespace_triggers.boxed(),
    ]);
    let controller = controller
        .reconcile_on(merged)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let mut converger = converger;
    // Convergence runs as long as the controller: if it ends first (a
    // panic), the controller stops too and the operator exits loudly.
    tokio::select! {
        _ = controller => {}
        end = &mut converger => {
            tracing::error!(outcome = ?end, "capsule convergence stopped; stopping the Capsule controller");
        }
    }
    converger.abort();
    reporter.abort();
}
