//! The agent pool: one client per node, found from the node-agent
//! DaemonSet's Pods (node name → pod IP : port); per agent a task that
//! fetches NodeInfo, lists capsules and follows `WatchEvents`, reconnecting
//! with backoff. Controllers read the pool's cached view and get a trigger
//! for each capsule an agent reports on, and a [`AgentSynced`] when an agent has
//! (re)connected and listed its capsules, for convergence.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wrenn_crds::Capsule;
use wrenn_proto::agent::v1 as pb;

use crate::agent::{Connector, NodeAgent, to_vm};
use crate::placement::NodeView;
use crate::plan::{Vm, VmState};
use crate::resources::Resources;

/// An agent has connected (or reconnected) and listed its capsules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSynced {
    /// Node of the agent.
    pub node: String,
}

#[derive(Default)]
struct Entry {
    addr: Option<SocketAddr>,
    client: Option<Arc<dyn NodeAgent>>,
    task: Option<JoinHandle<()>>,
    info: Option<pb::NodeInfoResponse>,
    capsules: BTreeMap<String, pb::Capsule>,
    /// UIDs whose view in `capsules` came from an RPC answer
    /// ([`AgentPool::note`]) that no event or list has reported since.
    noted: BTreeSet<String>,
    synced: bool,
    /// Since when the agent is unreachable (or unknown since start).
    lost_since: Option<Instant>,
}

struct Inner {
    connector: Arc<dyn Connector>,
    nodes: RwLock<HashMap<String, Entry>>,
    /// Placements made but not yet listed as held by the agent (so not yet
    /// subtracted from its `free`).
    placements: RwLock<HashMap<String, (String, Resources)>>,
    triggers: mpsc::UnboundedSender<ObjectRef<Capsule>>,
    syncs: mpsc::UnboundedSender<AgentSynced>,
    /// Counts agent syncs, for controllers that look at every ready node
    /// (templates) rather than at the capsules an agent reported.
    synced: tokio::sync::watch::Sender<u64>,
    refusals: mpsc::Sender<pb::Event>,
    refresh: Duration,
    started: Instant,
    /// Set once the agent list is complete (discovery's first list of the
    /// agent Pods): before it, "every known agent synced" holds of none.
    discovered: AtomicBool,
}

/// `NameRefused` events waiting for their Kubernetes Event.
pub const REFUSALS_QUEUED: usize = 1024;

/// Shared handle to every node agent.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPool")
            .field("nodes", &self.read().len())
            .finish()
    }
}

/// The receiving ends the controllers consume.
#[derive(Debug)]
pub struct PoolStreams {
    /// Capsules an agent reported on.
    pub triggers: mpsc::UnboundedReceiver<ObjectRef<Capsule>>,
    /// Agents that (re)synced.
    pub syncs: mpsc::UnboundedReceiver<AgentSynced>,
    /// `NameRefused` events, as the agents sent them (each agent throttles
    /// its own); past [`REFUSALS_QUEUED`] waiting, more are dropped.
    pub refusals: mpsc::Receiver<pb::Event>,
}

impl AgentPool {
    /// A pool that connects through `connector` and refreshes NodeInfo every `refresh`.
    pub fn new(connector: Arc<dyn Connector>, refresh: Duration) -> (Self, PoolStreams) {
        let (tx, triggers) = mpsc::unbounded_channel();
        let (stx, syncs) = mpsc::unbounded_channel();
        let (rtx, refusals) = mpsc::channel(REFUSALS_QUEUED);
        let pool = Self {
            inner: Arc::new(Inner {
                connector,
                nodes: RwLock::new(HashMap::new()),
                placements: RwLock::new(HashMap::new()),
                triggers: tx,
                syncs: stx,
                synced: tokio::sync::watch::Sender::new(0),
                refusals: rtx,
                refresh,
                started: Instant::now(),
                discovered: AtomicBool::new(false),
            }),
        };
        (
            pool,
            PoolStreams {
                triggers,
                syncs,
                refusals,
            },
        )
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.inner.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.inner.nodes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or moves) the agent of `node` at `addr`.
    pub fn upsert(&self, node: &str, addr: SocketAddr) {
        let mut nodes = self.write();
        let entry = nodes.entry(node.to_string()).or_default();
        if entry.addr == Some(addr) && entry.task.is_some() {
            return;
        }
        if let Some(task) = entry.task.take() {
            task.abort();
        }
        entry.addr = Some(addr);
        entry.synced = false;
        entry.lost_since.get_or_insert_with(Instant::now);
        match self.inner.connector.connect(node, addr) {
            Ok(client) => {
                entry.client = Some(client.clone());
                let pool = self.clone();
                let node = node.to_string();
                entry.task = Some(tokio::spawn(async move { pool.follow(node, client).await }));
            }
            Err(err) => {
                tracing::warn!(%node, error = &err as &dyn std::error::Error, "agent client");
                entry.client = None;
            }
        }
    }

    /// Forgets the agent of `node` (its Pod is gone).
    pub fn remove(&self, node: &str) {
        let mut nodes = self.write();
        if let Some(entry) = nodes.get_mut(node) {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            entry.client = None;
            entry.synced = false;
            entry.addr = None;
            entry.lost_since.get_or_insert_with(Instant::now);
        }
    }

    /// Stops every agent task.
    pub fn shutdown(&self) {
        for entry in self.write().values_mut() {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
        }
    }

    /// The client for `node`, when its agent is synced.
    pub fn client(&self, node: &str) -> Option<Arc<dyn NodeAgent>> {
        self.read()
            .get(node)
            .filter(|e| e.synced)
            .and_then(|e| e.client.clone())
    }

    /// What `node`'s agent says about `uid`: `None` when the agent is not
    /// synced, `Some(None)` when it has no such VM.
    pub fn observe(&self, node: &str, uid: &str) -> Option<Option<Vm>> {
        let nodes = self.read();
        let e = nodes.get(node).filter(|e| e.synced)?;
        Some(e.capsules.get(uid).map(to_vm))
    }

    /// What `node`'s event stream (or its last list) reported about `uid`:
    /// `None` when the agent is not synced, holds no such VM, or the view
    /// is an RPC answer ([`AgentPool::note`]) no event has reported since.
    pub fn reported(&self, node: &str, uid: &str) -> Option<Vm> {
        let nodes = self.read();
        let e = nodes.get(node).filter(|e| e.synced)?;
        if e.noted.contains(uid) {
            return None;
        }
        e.capsules.get(uid).map(to_vm)
    }

    /// Node of the VM with this UID, on any synced agent.
    pub fn find(&self, uid: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|(_, e)| e.synced && e.capsules.contains_key(uid))
            .map(|(n, _)| n.clone())
    }

    /// True once the agent list is complete and every agent on it has
    /// synced at least once, or `grace` passed since start: placing before
    /// then could duplicate a VM that an agent not yet listed already holds.
    pub fn settled(&self, grace: Duration) -> bool {
        self.inner.started.elapsed() >= grace
            || (self.inner.discovered.load(Ordering::Acquire)
                && self.read().values().all(|e| e.synced))
    }

    /// Marks the agent list complete: every agent there is has been
    /// [`upsert`](Self::upsert)ed. Until then [`settled`](Self::settled)
    /// waits for its grace, so an operator that starts before it has
    /// listed the agent Pods does not call every capsule unschedulable.
    pub fn discovered(&self) {
        self.inner.discovered.store(true, Ordering::Release);
    }

    /// How long `node`'s agent has been unreachable (`None`: reachable).
    pub fn lost_for(&self, node: &str) -> Option<Duration> {
        match self.read().get(node) {
            Some(e) if e.synced => None,
            Some(e) => Some(
                e.lost_since
                    .map_or(self.inner.started.elapsed(), |t| t.elapsed()),
            ),
            None => Some(self.inner.started.elapsed()),
        }
    }

    /// UIDs of the VMs on `node`.
    pub fn uids(&self, node: &str) -> Vec<(String, String, String)> {
        self.read()
            .get(node)
            .map(|e| {
                e.capsules
                    .values()
                    .map(|c| {
                        let (ns, name) = c
                            .spec
                            .as_ref()
                            .map(|s| (s.namespace.clone(), s.name.clone()))
                            .unwrap_or_default();
                        (c.uid.clone(), ns, name)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records what an RPC just returned, ahead of the event stream, unless
    /// the stream already reported the capsule. An answer and the events
    /// travel apart (on the wire, two HTTP/2 streams), so an answer can
    /// arrive after a later event: writing it over the stream's view would
    /// roll the VM back (Creating over Running) with no event left to
    /// correct it. The agent publishes every change before it answers, so
    /// the stream reports the answer's state, or a later one, anyway.
    pub fn note(&self, node: &str, c: pb::Capsule) {
        self.with_entry(node, |e| {
            if plan_note(e.capsules.contains_key(&c.uid), e.noted.contains(&c.uid)) {
                e.noted.insert(c.uid.clone());
                e.capsules.insert(c.uid.clone(), c);
            }
        });
    }

    /// Forgets a VM the operator just deleted.
    pub fn forget(&self, node: &str, uid: &str) {
        self.with_entry(node, |e| {
            e.capsules.remove(uid);
            e.noted.remove(uid);
        });
    }

    /// Records a placement so the next decisions count it before the agent
    /// does. It stays until the agent's NodeInfo lists the UID as held
    /// ([`plan_reserved`]), so at no moment is the capsule counted by
    /// neither side.
    pub fn reserve(&self, uid: &str, node: &str, r: Resources) {
        self.inner
            .placements
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), (node.to_string(), r));
    }

    /// The node reserved for `uid` whose agent does not count it yet.
    pub fn reserved(&self, uid: &str) -> Option<String> {
        self.inner
            .placements
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .map(|(node, _)| node.clone())
    }

    /// Drops a placement (the capsule is gone).
    pub fn release(&self, uid: &str) {
        self.inner
            .placements
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Every node as placement sees it. `labels` gives each node's labels;
    /// `placed` adds placements recorded in capsule statuses (uid → node,
    /// resources), for those made before this process started.
    pub fn views(
        &self,
        labels: impl Fn(&str) -> BTreeMap<String, String>,
        placed: &[(String, String, Resources)],
    ) -> Vec<NodeView> {
        let nodes = self.read();
        let placements = self
            .inner
            .placements
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut all: HashMap<&str, (&str, Resources)> = placed
            .iter()
            .map(|(u, n, r)| (u.as_str(), (n.as_str(), *r)))
            .collect();
        for (u, (n, r)) in placements.iter() {
            all.insert(u, (n, *r));
        }
        let mut out: Vec<NodeView> = nodes
            .iter()
            .map(|(name, e)| {
                let res = |r: Option<&pb::Resources>| r.map(Resources::from).unwrap_or_default();
                let info = e.info.as_ref();
                let held: BTreeSet<&str> = info
                    .map(|i| i.held.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                let mine: Vec<(&str, Resources)> = all
                    .iter()
                    .filter(|(_, (n, _))| *n == name.as_str())
                    .map(|(u, (_, r))| (*u, *r))
                    .collect();
                let reserved = plan_reserved(&mine, &held);
                let count = e.capsules.len()
                    + mine
                        .iter()
                        .filter(|(u, _)| !held.contains(u) && !e.capsules.contains_key(*u))
                        .count();
                NodeView {
                    name: name.clone(),
                    ready: e.synced && info.is_some(),
                    labels: labels(name),
                    vmm: info
                        .and_then(|i| i.vmm.as_ref())
                        .filter(|v| !v.name.is_empty())
                        .map(|v| v.name.clone()),
                    capacity: res(info.and_then(|i| i.capacity.as_ref())),
                    free: res(info.and_then(|i| i.free.as_ref())),
                    reserved,
                    templates: info
                        .map(|i| i.templates.keys().cloned().collect())
                        .unwrap_or_default(),
                    snapshots: info
                        .map(|i| i.snapshots.iter().cloned().collect())
                        .unwrap_or_default(),
                    capsules: count,
                    disk_quota: crate::placement::DiskQuota {
                        quota: info.map_or(0, |i| i.disk_quota_bytes),
                        used: info.map_or(0, |i| i.disk_quota_used_bytes),
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Fetches every synced agent's NodeInfo now, at once, instead of
    /// waiting for the periodic refresh: placement asks before it calls a
    /// capsule unschedulable, since a template or snapshot that became
    /// ready since the last refresh would otherwise keep it Pending until
    /// its next retry.
    pub async fn refresh_infos(&self) {
        let clients: Vec<(String, Arc<dyn NodeAgent>)> = self
            .read()
            .iter()
            .filter(|(_, e)| e.synced)
            .filter_map(|(n, e)| Some((n.clone(), e.client.clone()?)))
            .collect();
        futures::future::join_all(
            clients
                .iter()
                .map(|(node, client)| self.refresh_info(node, client)),
        )
        .await;
    }

    /// NodeInfo of `node`, as last fetched.
    pub fn info(&self, node: &str) -> Option<pb::NodeInfoResponse> {
        self.read().get(node).and_then(|e| e.info.clone())
    }

    /// Yields each time an agent (re)syncs from now on; bursts may yield
    /// once.
    pub fn syncs_from_now(&self) -> tokio_stream::wrappers::WatchStream<u64> {
        tokio_stream::wrappers::WatchStream::from_changes(self.inner.synced.subscribe())
    }

    /// Names of every synced node.
    pub fn ready_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .read()
            .iter()
            .filter(|(_, e)| e.synced)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn trigger(&self, c: &pb::Capsule) {
        if let Some(spec) = &c.spec
            && !spec.name.is_empty()
        {
            let _ = self
                .inner
                .triggers
                .send(ObjectRef::new(&spec.name).within(&spec.namespace));
        }
    }

    /// Drops the reservations the agent now counts itself.
    fn release_held(&self, info: &pb::NodeInfoResponse) {
        self.inner
            .placements
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|uid, _| !info.held.contains(uid));
    }

    fn with_entry(&self, node: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.write().get_mut(node) {
            f(e);
        }
    }

    async fn refresh_info(&self, node: &str, client: &Arc<dyn NodeAgent>) -> bool {
        match client.node_info().await {
            Ok(info) => {
                // Info first: until it is in, the reservation is what
                // counts the capsule (releasing first would open a window
                // in which neither side does).
                self.with_entry(node, |e| e.info = Some(info.clone()));
                self.release_held(&info);
                true
            }
            Err(err) => {
                tracing::debug!(%node, error = &err as &dyn std::error::Error, "node info");
                false
            }
        }
    }

    /// One agent's life: connect, sync, follow events; on any failure mark
    /// it unsynced and retry with exponential backoff (0.5 s to 30 s). A
    /// stream the agent reset (this operator fell behind its events) is
    /// listed again at once: the agent is fine, only the view is stale.
    async fn follow(self, node: String, client: Arc<dyn NodeAgent>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let ended = self.session(&node, &client).await;
            self.with_entry(&node, |e| {
                if e.synced && !matches!(ended, Ok(Ended::Reset)) {
                    e.lost_since = Some(Instant::now());
                }
                e.synced = false;
            });
            match ended {
                Ok(Ended::Reset) => {
                    tracing::info!(%node, "agent reset its event stream; listing again");
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(Ended::Closed) => backoff = Duration::from_millis(500),
                Err(err) => {
                    tracing::warn!(%node, error = &*err as &dyn std::error::Error, "agent session ended");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn session(
        &self,
        node: &str,
        client: &Arc<dyn NodeAgent>,
    ) -> Result<Ended, Box<crate::agent::Error>> {
        let mut events = client.watch_events(0).await.map_err(Box::new)?;
        let listed = client.list_capsules().await.map_err(Box::new)?;
        let info = client.node_info().await.map_err(Box::new)?;
        let before: Vec<pb::Capsule> = {
            let mut nodes = self.write();
            let Some(e) = nodes.get_mut(node) else {
                return Ok(Ended::Closed);
            };
            let before = e.capsules.values().cloned().collect();
            e.capsules = listed.iter().map(|c| (c.uid.clone(), c.clone())).collect();
            e.noted.clear();
            e.info = Some(info.clone());
            e.synced = true;
            e.lost_since = None;
            before
        };
        self.release_held(&info);
        tracing::info!(%node, capsules = listed.len(), "agent synced");
        for c in before.iter().chain(listed.iter()) {
            self.trigger(c);
        }
        let _ = self.inner.syncs.send(AgentSynced {
            node: node.to_string(),
        });
        self.inner.synced.send_modify(|n| *n += 1);
        let mut tick = tokio::time::interval(self.inner.refresh);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = events.next() => {
                    let Some(ev) = ev else { return Ok(Ended::Closed) };
                    let ev = ev.map_err(Box::new)?;
                    if let Some(ended) = self.apply_event(node, ev) {
                        return Ok(ended);
                    }
                }
                _ = tick.tick() => {
                    if !self.refresh_info(node, client).await {
                        return Ok(Ended::Closed);
                    }
                }
            }
        }
    }

    /// Applies one event; `Some` when it ends the session.
    fn apply_event(&self, node: &str, ev: pb::Event) -> Option<Ended> {
        let kind = pb::EventKind::try_from(ev.kind).unwrap_or(pb::EventKind::Unspecified);
        if kind == pb::EventKind::Reset {
            // Events were lost (the agent's buffer overran, or the cursor
            // is too old): the stream cannot resume, so list again.
            return Some(Ended::Reset);
        }
        if kind == pb::EventKind::NameRefused {
            // Not a state change: the capsule's view stays as it is. Their
            // names come from guests: a full queue drops, never grows.
            let _ = self.inner.refusals.try_send(ev);
            return None;
        }
        let c = ev.capsule?;
        self.with_entry(node, |e| {
            e.noted.remove(&c.uid);
            if kind == pb::EventKind::Deleted {
                e.capsules.remove(&c.uid);
            } else {
                e.capsules.insert(c.uid.clone(), c.clone());
            }
        });
        self.trigger(&c);
        None
    }
}

/// How an agent session ended without an error.
enum Ended {
    /// The stream or the NodeInfo refresh ended: reconnect after a pause.
    Closed,
    /// The agent reset the stream (events were lost): list again at once.
    Reset,
}

/// Whether an RPC answer about a capsule goes into the pool's view: only
/// while no event or list has reported the capsule (it is absent, or its
/// view is itself an earlier answer). Pure; see [`AgentPool::note`].
pub fn plan_note(known: bool, noted: bool) -> bool {
    !known || noted
}

/// Which view of a VM to plan on: what an RPC just `answer`ed, or what
/// the event stream `reported` since. An agent reports a new VM as
/// Creating before it answers the create; so when the answer says
/// Creating, any other state the stream holds came after it (a boot that
/// finished meanwhile) and is the fresher one: planning on the answer would
/// write a Creating the capsule has already left. Any other answer
/// stands, since the stream may still be behind it (a pause answers Paused
/// before the stream has delivered Pausing). Pure.
pub fn plan_fresher<'a>(answer: &'a Vm, reported: Option<&'a Vm>) -> &'a Vm {
    match reported {
        Some(r) if answer.state == VmState::Creating && r.state != VmState::Creating => r,
        _ => answer,
    }
}

/// What a node's `free` does not yet count: the placements on it (`uid`,
/// resources) whose UID the agent's last NodeInfo did not list as held.
/// Pure; the hand-off rule between operator and agent.
pub fn plan_reserved(placed: &[(&str, Resources)], held: &BTreeSet<&str>) -> Resources {
    placed
        .iter()
        .filter(|(uid, _)| !held.contains(uid))
        .fold(Resources::default(), |sum, (_, r)| sum.plus(*r))
}

/// Follows the node-agent Pods and keeps the pool's clients in step.
/// Returns when the watch ends (never, in practice).
pub async fn discover(pool: AgentPool, pods: Api<Pod>, selector: String, port: u16) {
    let cfg = watcher::Config::default().labels(&selector);
    let stream = watcher(pods, cfg).default_backoff();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        let (pod, deleted) = match item {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
            Ok(watcher::Event::Delete(p)) => (p, true),
            Ok(watcher::Event::InitDone) => {
                pool.discovered();
                continue;
            }
            Ok(watcher::Event::Init) => continue,
            Err(err) => {
                tracing::warn!(error = &err as &dyn std::error::Error, "watch agent pods");
                continue;
            }
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let ip: Option<IpAddr> = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        match ip {
            Some(ip) if !deleted && pod.metadata.deletion_timestamp.is_none() => {
                pool.upsert(&node, SocketAddr::new(ip, port));
            }
            _ if deleted || pod.metadata.deletion_timestamp.is_some() => pool.remove(&node),
            _ => {}
        }
    }
}

/// Labels of a node from a Node reflector store (empty when unknown).
pub fn node_labels(nodes: &Store<Node>, name: &str) -> BTreeMap<String, String> {
    nodes
        .get(&ObjectRef::new(name))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
