//! Controllers, one module per kind, and what they share: the [`Context`]
//! (API client, agent pool, Event recorder, metrics, settings) and the
//! backoff of failed reconciles.

pub mod capsule;
mod events;
pub mod snapshot;
pub mod template;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use wrenn_crds::capsule::CapsuleStatus;
use wrenn_crds::reason::Reason;
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};

use crate::metrics::{ErrorLabels, KindLabels, Metrics};
use crate::pool::AgentPool;
pub use events::EventQueue;

/// Tunables of the controllers (flags in `main`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// After this long unreachable, a deleted capsule's finalizer is
    /// released with a Warning Event.
    pub node_lost_timeout: Duration,
    /// Placement waits at most this long after start for every known agent
    /// to list its capsules (so a VM it already holds is not duplicated).
    pub settle_grace: Duration,
    /// `status.usage` is refreshed at most this often per capsule.
    pub usage_interval: Duration,
    /// Convergence (orphan sweep) also runs this often on every synced
    /// agent, not only when one (re)connects.
    pub converge_interval: Duration,
    /// Capsules reconciled at once.
    pub concurrency: u16,
    /// The operator's user as the API server knows it
    /// (`system:serviceaccount:NS:NAME`), named in the command a template's
    /// status gives for granting it a pull Secret.
    pub identity: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_lost_timeout: Duration::from_secs(300),
            settle_grace: Duration::from_secs(10),
            usage_interval: Duration::from_secs(30),
            converge_interval: Duration::from_secs(60),
            concurrency: 32,
            identity: None,
        }
    }
}

/// What every reconcile gets.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Node agents.
    pub pool: AgentPool,
    /// Node labels, for `nodeSelector`.
    pub nodes: Store<Node>,
    /// Every Capsule, for reservations and convergence.
    pub capsules: Store<Capsule>,
    /// CapsuleTemplates as last watched (a capsule's source is read from
    /// here, from the API server when absent). Empty until the Capsule
    /// controller runs its reflector.
    pub templates: Store<CapsuleTemplate>,
    /// CapsuleSnapshots as last watched, like `templates`.
    pub snapshots: Store<CapsuleSnapshot>,
    /// Pods as last watched (labels, addresses), for `from` selectors.
    /// Empty until the Capsule controller runs its reflector.
    pub pods: Store<k8s_openapi::api::core::v1::Pod>,
    /// Namespaces as last watched (labels), for `from` selectors.
    pub namespaces: Store<k8s_openapi::api::core::v1::Namespace>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Capsule phase Events, published beside the reconciles.
    pub events: EventQueue,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: Settings,
    failures: Mutex<HashMap<String, u32>>,
    /// The last Capsule status this process wrote, by UID. The operator is
    /// the only writer of Capsule status, so this is at least as fresh as
    /// a cached object, which may not have seen that write yet: deciding
    /// on the cache alone would place twice or write a status again.
    written: Mutex<HashMap<String, CapsuleStatus>>,
    /// By capsule UID, the resourceVersion this process added the
    /// finalizer over: a cached object still at that version is stale,
    /// not without the finalizer.
    finalized_over: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("pool", &self.pool)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Everything a [`Context`] needs but the Capsule store, which exists only
/// once the Capsule controller is built.
pub struct Parts {
    /// API client.
    pub client: Client,
    /// Node agents.
    pub pool: AgentPool,
    /// Node labels.
    pub nodes: Store<Node>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: Settings,
    /// This replica's name, for Events.
    pub instance: Option<String>,
}

/// `Api::all`, or namespaced when a namespace is given.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> kube::Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    }
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Parts {
    /// The context, with the Capsule store.
    pub fn into_context(self, capsules: Store<Capsule>) -> Context {
        let recorder = recorder(self.client.clone(), self.instance);
        Context {
            client: self.client,
            pool: self.pool,
            nodes: self.nodes,
            capsules,
            templates: kube::runtime::reflector::store().0,
            snapshots: kube::runtime::reflector::store().0,
            pods: kube::runtime::reflector::store().0,
            namespaces: kube::runtime::reflector::store().0,
            events: EventQueue::start(recorder.clone()),
            recorder,
            metrics: self.metrics,
            settings: self.settings,
            failures: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            finalized_over: Mutex::new(HashMap::new()),
        }
    }
}

/// The Event recorder every controller reports as.
pub fn recorder(client: Client, instance: Option<String>) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "wrenn-operator".into(),
            instance,
        },
    )
}

/// Publishes an Event about `reference`; a failure is logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: Reason,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&ev, reference).await {
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            %reason,
            "publish event"
        );
    }
}

impl Context {
    /// Calls `f` with the Pods and Namespaces `from` selectors choose from;
    /// both empty when no port of `cap` has a selector (no copy of the
    /// stores is made then).
    pub fn with_cluster<T>(
        &self,
        cap: &Capsule,
        f: impl FnOnce(crate::peers::Cluster<'_>) -> T,
    ) -> T {
        let selects = cap
            .spec
            .network
            .as_ref()
            .is_some_and(|n| n.ports.iter().any(|p| crate::peers::selects_pods(&p.from)));
        let (pods, namespaces) = if selects {
            (self.pods.state(), self.namespaces.state())
        } else {
            (Vec::new(), Vec::new())
        };
        f(crate::peers::Cluster {
            pods: &pods,
            namespaces: &namespaces,
        })
    }

    /// Publishes an Event; a failure is logged, never fatal.
    pub async fn event(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: Reason,
        note: String,
    ) {
        publish(&self.recorder, reference, type_, reason, note).await;
    }

    /// Clears the failure count of an object after a good reconcile.
    pub fn succeeded(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// The freshest status of the capsule: the one this process last wrote,
    /// else the one `cached` carries.
    pub fn capsule_status(
        &self,
        uid: &str,
        cached: Option<&CapsuleStatus>,
    ) -> Option<CapsuleStatus> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
            .or_else(|| cached.cloned())
    }

    /// Records a status the API server accepted for the capsule.
    pub fn wrote_status(&self, uid: &str, status: &CapsuleStatus) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), status.clone());
    }

    /// Forgets what this process wrote of the capsule (it is being
    /// deleted).
    pub fn forget_status(&self, uid: &str) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.finalized_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Records that this process added the capsule's finalizer over
    /// `version`.
    pub fn added_finalizer(&self, uid: &str, version: &str) {
        self.finalized_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), version.to_string());
    }

    /// Whether this process added the capsule's finalizer over `version`.
    pub fn finalized_over(&self, uid: &str, version: &str) -> bool {
        self.finalized_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|v| v == version)
    }

    /// Exponential backoff per object: 0.5 s doubling to 60 s.
    pub fn backoff(&self, uid: &str) -> Action {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(uid.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_millis(500)
            .saturating_mul(1u32 << (*n - 1).min(7))
            .min(Duration::from_secs(60));
        Action::requeue(delay)
    }
}

/// Everything [`run_all`] runs with.
pub struct Operator {
    /// API client.
    pub client: Client,
    /// Node agents.
    pub pool: AgentPool,
    /// The pool's triggers and sync notices.
    pub streams: crate::pool::PoolStreams,
    /// Node-agent Pods: (namespace, label selector, gRPC port).
    pub discovery: (String, String, u16),
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: Settings,
    /// This replica's name, for Events.
    pub instance: Option<String>,
    /// Watch only this namespace (tests); every namespace when `None`.
    pub namespace: Option<String>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("discovery", &self.discovery)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How long in-flight reconciles may run on once the controllers are told
/// to stop: inside the kubelet's default 30 s termination grace.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs every controller, agent discovery and the Node reflector until
/// `shutdown` resolves. `discovery` is (namespace, label selector, port) of
/// the node-agent Pods.
pub async fn run_all(
    op: Operator,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let Operator {
        client,
        pool,
        streams,
        discovery,
        metrics,
        settings,
        instance,
        namespace,
    } = op;
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (nodes, writer) = reflector::store();
    let node_api: kube::Api<Node> = kube::Api::all(client.clone());
    let node_task = tokio::spawn(
        reflector(writer, watcher(node_api, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| futures::future::ready(())),
    );
    let (ns, selector, port) = discovery;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), &ns);
    let discover = tokio::spawn(crate::pool::discover(pool.clone(), pods, selector, port));
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stop = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let template_nodes = nodes.clone();
    let identity = settings.identity.clone();
    let parts = Parts {
        client: client.clone(),
        pool: pool.clone(),
        nodes,
        metrics: metrics.clone(),
        settings,
        instance,
    };
    let capsules = capsule::run(
        parts,
        namespace.clone(),
        streams.triggers,
        streams.syncs,
        streams.refusals,
        stop(&stop_tx),
    );
    let side = (
        snapshot::run(
            client.clone(),
            namespace.clone(),
            pool.clone(),
            metrics.clone(),
            stop(&stop_tx),
        ),
        template::run(
            client.clone(),
            namespace.clone(),
            pool.clone(),
            template_nodes,
            metrics.clone(),
            identity,
            stop(&stop_tx),
        ),
    );
    let all = async move { futures::join!(capsules, side.0, side.1) };
    tokio::pin!(all);
    tokio::pin!(discover);
    tokio::pin!(node_task);
    // Discovery and the Node reflector never end on their own: if one does
    // (a panic, a closed stream), the controllers stop too and `main`
    // exits, so the kubelet restarts the operator instead of it running
    // blind.
    let reason = tokio::select! {
        _ = &mut all => None,
        _ = shutdown => Some("shutdown asked"),
        end = &mut discover => {
            tracing::error!(outcome = ?end, "agent discovery stopped; stopping the controllers");
            Some("agent discovery stopped")
        }
        end = &mut node_task => {
            tracing::error!(outcome = ?end, "Node reflector stopped; stopping the controllers");
            Some("Node reflector stopped")
        }
    };
    if let Some(reason) = reason {
        let _ = stop_tx.send(());
        // Reconciles in flight may finish, but not for longer than the
        // kubelet would wait: one stuck on an agent call must not keep a
        // stopping operator (and its leader lease) alive.
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut all)
            .await
            .is_err()
        {
            tracing::warn!(
                reason,
                grace = ?SHUTDOWN_GRACE,
                "reconciles still running after the shutdown grace; dropping them"
            );
        }
    }
    discover.abort();
    node_task.abort();
    pool.shutdown();
}

/// Runs one reconcile of `kind` and records how long it took, whatever it
/// returned.
pub async fn timed<T>(
    metrics: &Metrics,
    kind: &'static str,
    reconcile: impl std::future::Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    let r = reconcile.await;
    metrics
        .reconcile_duration
        .get_or_create(&KindLabels { kind })
        .observe(started.elapsed().as_secs_f64());
    r
}

/// What a failed reconcile of a snapshot or a template does: counted by
/// `category`, logged once as `what`, retried after a pause.
pub fn requeue_failed(
    metrics: &Metrics,
    kind: &'static str,
    category: &'static str,
    err: &(dyn std::error::Error + 'static),
    what: &'static str,
) -> Action {
    metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind, category })
        .inc();
    tracing::warn!(error = err, "{what}");
    Action::requeue(Duration::from_secs(5))
}
