//! An in-memory node agent for tests: it keeps capsules per UID with the
//! agent's idempotency rules, boots them after a configurable delay (a
//! zero delay boots inside the create call, as the real agent answers a
//! create once the guest booted),
//! streams events like the real agent and records every call. It can be
//! taken "down" (calls fail Unavailable, streams end) to test reconnects.
//!
//! Why this file is long: it answers every call of the `NodeAgent` trait,
//! each with the real agent's idempotency and error codes; split by call,
//! the shared state and its rules would be spread over many files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::StreamExt;
use tokio::sync::broadcast;
use wrenn_crds::reason::Reason;
use wrenn_proto::agent::v1 as pb;

use super::{Call, Connector, Error, Events, NodeAgent};

/// A recorded call: (RPC name, UID or id).
pub type Recorded = (&'static str, String);

#[derive(Debug, Default)]
struct State {
    capsules: BTreeMap<String, pb::Capsule>,
    snapshots: BTreeMap<String, pb::Snapshot>,
    templates: BTreeMap<String, pb::TemplateState>,
    template_failures: BTreeMap<String, String>,
    calls: Vec<Recorded>,
    down: bool,
    refuse_network: bool,
    refuse_creates: bool,
    /// How long `CreateCapsule` takes to answer.
    create_delay: Duration,
    sequence: u64,
    created: BTreeSet<String>,
    quarantined: Vec<pb::QuarantinedCapsule>,
    /// Template key → the registry credentials of its last PrepareTemplate.
    credentials: BTreeMap<String, Option<pb::RegistryCredentials>>,
    /// Host ports handed out: node port → (capsule UID, guest port).
    host_ports: BTreeMap<u16, (String, u32)>,
    /// The host-port range, when not the default 29000-29999.
    host_port_range: Option<(u16, u16)>,
}

impl State {
    /// Gives `uid` a host port for each TCP port with sources, keeping the
    /// ones it has and releasing the ones it no longer lists, all or
    /// nothing, as the real agent does. `Err` names the range when full.
    fn publish(&mut self, uid: &str, ports: &[pb::Port]) -> Result<Vec<pb::HostPort>, String> {
        let (first, last) = self.host_port_range.unwrap_or((29000, 29999));
        let wanted: Vec<u32> = ports
            .iter()
            .filter(|p| p.protocol == "TCP" && !p.from_cidrs.is_empty())
            .map(|p| p.port)
            .collect();
        let mut next: BTreeMap<u16, (String, u32)> = self
            .host_ports
            .iter()
            .filter(|(_, (u, p))| u != uid || wanted.contains(p))
            .map(|(h, v)| (*h, v.clone()))
            .collect();
        for p in &wanted {
            if next.values().any(|(u, q)| u == uid && q == p) {
                continue;
            }
            let free = (first..=last).find(|h| !next.contains_key(h));
            let Some(h) = free else {
                return Err(format!(
                    "publish ports of capsule {uid}: host-port range {first}-{last} has 0 free ports"
                ));
            };
            next.insert(h, (uid.to_string(), *p));
        }
        self.host_ports = next;
        Ok(self.host_ports_of(uid))
    }

    fn host_ports_of(&self, uid: &str) -> Vec<pb::HostPort> {
        let mut v: Vec<pb::HostPort> = self
            .host_ports
            .iter()
            .filter(|(_, (u, _))| u == uid)
            .map(|(h, (_, p))| pb::HostPort {
                port: *p,
                host_port: u32::from(*h),
            })
            .collect();
        v.sort_by_key(|h| h.port);
        v
    }
}

/// Shows only the ports that have a host port as enforced, as the real
/// agent does for a running capsule.
fn show_published(c: &mut pb::Capsule) {
    let held: Vec<u32> = c.host_ports.iter().map(|h| h.port).collect();
    if let Some(n) = c.spec.as_mut().and_then(|s| s.network.as_mut()) {
        n.ports
            .retain(|p| p.from_cidrs.is_empty() || held.contains(&p.port));
    }
}

/// A fake agent for one node.
#[derive(Debug)]
pub struct FakeNodeAgent {
    node: String,
    capacity: pb::Resources,
    boot_delay: Duration,
    state: Mutex<State>,
    events: broadcast::Sender<pb::Event>,
}

use wrenn_proto::unix_nanos_now as now_nanos;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread poisons the lock; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeNodeAgent {
    /// A node with this capacity; capsules reach Running after `boot_delay`.
    pub fn new(node: &str, capacity: pb::Resources, boot_delay: Duration) -> Arc<Self> {
        Self::with_event_buffer(node, capacity, boot_delay, 4096)
    }

    /// [`new`](Self::new) keeping only `buffer` undelivered events per
    /// watcher: one that falls further behind gets a `Reset`, as from the
    /// real agent.
    pub fn with_event_buffer(
        node: &str,
        capacity: pb::Resources,
        boot_delay: Duration,
        buffer: usize,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(buffer.max(1));
        Arc::new(Self {
            node: node.into(),
            capacity,
            boot_delay,
            state: Mutex::new(State::default()),
            events,
        })
    }

    /// The node this agent serves.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Recorded> {
        lock(&self.state).calls.clone()
    }

    /// How many times `call` was made.
    pub fn count(&self, call: &str) -> usize {
        lock(&self.state)
            .calls
            .iter()
            .filter(|(c, _)| *c == call)
            .count()
    }

    /// UIDs of the capsules the node holds.
    pub fn uids(&self) -> Vec<String> {
        lock(&self.state).capsules.keys().cloned().collect()
    }

    /// The capsule with this UID.
    pub fn capsule(&self, uid: &str) -> Option<pb::Capsule> {
        lock(&self.state).capsules.get(uid).cloned()
    }

    /// UIDs for which a VM was ever really created (not returned as existing).
    pub fn created(&self) -> BTreeSet<String> {
        lock(&self.state).created.clone()
    }

    /// Puts a VM on the node behind the operator's back (an orphan, or one
    /// left by a create the operator did not see finish).
    pub fn insert(&self, uid: &str, namespace: &str, name: &str, state: pb::CapsuleState) {
        let c = pb::Capsule {
            uid: uid.into(),
            spec: Some(pb::CapsuleSpec {
                namespace: namespace.into(),
                name: name.into(),
                ..Default::default()
            }),
            state: state as i32,
            ip: "10.201.0.9".into(),
            ..Default::default()
        };
        lock(&self.state).capsules.insert(uid.into(), c);
    }

    /// The calls made to this agent beyond its session (WatchEvents,
    /// ListCapsules, NodeInfo): what a reconcile asked of the node.
    pub fn work_calls(&self) -> Vec<Recorded> {
        self.calls()
            .into_iter()
            .filter(|(c, _)| !matches!(*c, "WatchEvents" | "ListCapsules" | "NodeInfo"))
            .collect()
    }

    /// Adds a snapshot's files with this id (as a finished build leaves them).
    pub fn insert_snapshot(&self, id: &str) {
        let snap = pb::Snapshot {
            r#ref: Some(pb::SnapshotRef { id: id.into() }),
            memory: true,
            ..Default::default()
        };
        lock(&self.state).snapshots.insert(id.into(), snap);
    }

    /// Makes every later preparation of templates whose key starts with
    /// `prefix` fail with `message` (ReadinessTimeout), as a warm build
    /// whose readiness never succeeds.
    pub fn fail_templates(&self, prefix: &str, message: &str) {
        let mut st = lock(&self.state);
        st.template_failures.insert(prefix.into(), message.into());
        st.templates.retain(|k, _| !k.starts_with(prefix));
    }

    /// The registry credentials the last PrepareTemplate of `key` carried
    /// (`None` when never asked; `Some(None)` when asked without).
    pub fn prepared_with(&self, key: &str) -> Option<Option<pb::RegistryCredentials>> {
        lock(&self.state).credentials.get(key).cloned()
    }

    /// The template states the node holds, by key.
    pub fn templates(&self) -> BTreeMap<String, pb::TemplateState> {
        lock(&self.state).templates.clone()
    }

    /// Records a data-plane call on the capsule now, as the agent does for
    /// exec, PTY and file calls (no event).
    pub fn touch(&self, uid: &str) {
        if let Some(c) = lock(&self.state).capsules.get_mut(uid) {
            c.last_activity_unix_nanos = now_nanos();
        }
    }

    /// Reports `uid` as quarantined in `NodeInfo`, as an agent that found
    /// its journal unreadable at start-up does.
    pub fn quarantine(&self, uid: &str, reason: Reason, message: &str) {
        lock(&self.state).quarantined.push(pb::QuarantinedCapsule {
            uid: uid.into(),
            reason: reason.into(),
            message: message.into(),
        });
    }

    /// Sends a `NameRefused` event about `uid`, as an agent whose resolver
    /// refused `name` for `reason` does.
    pub fn refuse_name(&self, uid: &str, name: &str, reason: Reason, queries: u32) {
        let mut st = lock(&self.state);
        let Some(c) = st.capsules.get(uid).cloned() else {
            return;
        };
        st.sequence += 1;
        let _ = self.events.send(pb::Event {
            sequence: st.sequence,
            kind: pb::EventKind::NameRefused as i32,
            capsule: Some(c),
            unix_nanos: 0,
            name_refused: Some(pb::NameRefused {
                name: name.into(),
                reason: reason.into(),
                queries,
            }),
        });
    }

    /// Removes a VM without an event (it "vanished", e.g. the host rebooted).
    pub fn vanish(&self, uid: &str) {
        lock(&self.state).capsules.remove(uid);
    }

    /// Hands out host ports from `first..=last` from now on.
    pub fn set_host_port_range(&self, first: u16, last: u16) {
        lock(&self.state).host_port_range = Some((first, last));
    }

    /// Makes `UpdateNetwork` fail Unavailable (as an agent that cannot load
    /// the table) until called again with `false`.
    pub fn refuse_network_updates(&self, refuse: bool) {
        lock(&self.state).refuse_network = refuse;
    }

    /// Makes `CreateCapsule` fail Unavailable (as an agent that lost its
    /// disk or answers too late) while its stream stays up, until called
    /// again with `false`.
    pub fn refuse_creates(&self, refuse: bool) {
        lock(&self.state).refuse_creates = refuse;
    }

    /// Makes `CreateCapsule` answer only after `delay` (as an agent that
    /// answers once the guest booted).
    pub fn slow_creates(&self, delay: Duration) {
        lock(&self.state).create_delay = delay;
    }

    /// Takes the agent down (calls fail, streams end) or brings it back.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
        if down {
            // Ends every stream: receivers see the sentinel below.
            let _ = self.events.send(pb::Event {
                sequence: u64::MAX,
                ..Default::default()
            });
        }
    }

    fn enter(&self, call: &'static str, key: &str) -> Result<MutexGuard<'_, State>, Error> {
        let mut st = lock(&self.state);
        st.calls.push((call, key.to_string()));
        if st.down {
            return Err(Error::Call {
                call,
                node: self.node.clone(),
                status: tonic::Status::unavailable("agent down"),
            });
        }
        Ok(st)
    }

    fn emit(&self, st: &mut State, kind: pb::EventKind, c: &pb::Capsule) {
        st.sequence += 1;
        let _ = self.events.send(pb::Event {
            sequence: st.sequence,
            kind: kind as i32,
            capsule: Some(c.clone()),
            unix_nanos: 0,
            name_refused: None,
        });
    }

    fn used(st: &State) -> pb::Resources {
        let mut used = pb::Resources::default();
        for c in st.capsules.values() {
            let suspended = c.state == pb::CapsuleState::Suspended as i32;
            if let Some(r) = c.spec.as_ref().and_then(|s| s.resources.as_ref()) {
                if !suspended {
                    used.vcpus += r.vcpus;
                    used.memory_bytes += r.memory_bytes;
                }
                used.disk_bytes += r.disk_bytes;
            }
        }
        used
    }

    fn transition(
        self: &Arc<Self>,
        call: &'static str,
        uid: String,
        allowed: &[pb::CapsuleState],
        to: pb::CapsuleState,
    ) -> Call<'static, pb::Capsule> {
        let this = self.clone();
        let allowed = allowed.to_vec();
        Box::pin(async move {
            let mut st = this.enter(call, &uid)?;
            let Some(c) = st.capsules.get(&uid).cloned() else {
                return Err(Error::Call {
                    call,
                    node: this.node.clone(),
                    status: tonic::Status::not_found(format!("capsule {uid}")),
                });
            };
            if c.state == to as i32 {
                return Ok(c);
            }
            if !allowed.iter().any(|s| *s as i32 == c.state) {
                return Err(Error::Call {
                    call,
                    node: this.node.clone(),
                    status: tonic::Status::failed_precondition(format!(
                        "capsule {uid} is {:?}",
                        pb::CapsuleState::try_from(c.state)
                    )),
                });
            }
            let mut c = c;
            c.state = to as i32;
            st.capsules.insert(uid, c.clone());
            this.emit(&mut st, pb::EventKind::StateChanged, &c);
            Ok(c)
        })
    }
}

/// Shares fakes by node so tests keep a handle to each.
#[derive(Debug, Default)]
pub struct FakeConnector {
    agents: Mutex<BTreeMap<String, Arc<FakeNodeAgent>>>,
}

impl FakeConnector {
    /// Registers the fake serving `node`.
    pub fn add(&self, agent: Arc<FakeNodeAgent>) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.node.clone(), agent);
    }
}

impl Connector for FakeConnector {
    fn connect(&self, node: &str, _addr: SocketAddr) -> Result<Arc<dyn NodeAgent>, Error> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        match agents.get(node) {
            Some(a) => Ok(Arc::new(Handle(a.clone()))),
            None => Err(Error::NoAgent { node: node.into() }),
        }
    }
}

/// `NodeAgent` needs `&self`, the fake's timers need an `Arc`.
struct Handle(Arc<FakeNodeAgent>);

impl NodeAgent for Handle {
    fn node_info(&self) -> Call<'_, pb::NodeInfoResponse> {
        let a = &self.0;
        Box::pin(async move {
            let st = a.enter("NodeInfo", "")?;
            let used = FakeNodeAgent::used(&st);
            Ok(pb::NodeInfoResponse {
                node_name: a.node.clone(),
                agent_version: "fake".into(),
                kvm: true,
                vmm: Some(pb::VmmInfo {
                    name: "fake-vmm".into(),
                    version: "1".into(),
                    note: String::new(),
                }),
                cpu_model: "fake cpu".into(),
                capacity: Some(a.capacity),
                free: Some(pb::Resources {
                    vcpus: a.capacity.vcpus.saturating_sub(used.vcpus),
                    memory_bytes: a.capacity.memory_bytes.saturating_sub(used.memory_bytes),
                    disk_bytes: a.capacity.disk_bytes.saturating_sub(used.disk_bytes),
                }),
                templates: st
                    .templates
                    .values()
                    .filter(|t| t.phase == pb::TemplatePhase::Ready as i32)
                    .map(|t| (t.key.clone(), t.digest.clone()))
                    .collect(),
                snapshots: st.snapshots.keys().cloned().collect(),
                storage_backend: "fake".into(),
                // Every capsule counts in `used` above, as on the real agent.
                held: st.capsules.keys().cloned().collect(),
                quarantined: st.quarantined.clone(),
                ..Default::default()
            })
        })
    }

    fn create_capsule(&self, req: pb::CreateCapsuleRequest) -> Call<'_, pb::Capsule> {
        let a = self.0.clone();
        Box::pin(async move {
            let delay = lock(&a.state).create_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut st = a.enter("CreateCapsule", &req.uid)?;
            if let Some(c) = st.capsules.get(&req.uid) {
                return Ok(c.clone());
            }
            if st.refuse_creates {
                return Err(Error::Call {
                    call: "CreateCapsule",
                    node: a.node.clone(),
                    status: tonic::Status::unavailable("create capsule: disk busy"),
                });
            }
            let target = match pb::CapsuleState::try_from(req.initial_state) {
                Ok(pb::CapsuleState::Paused) => pb::CapsuleState::Paused,
                Ok(pb::CapsuleState::Suspended) => pb::CapsuleState::Suspended,
                _ => pb::CapsuleState::Running,
            };
            let n = st.created.len() + 2;
            let c = pb::Capsule {
                uid: req.uid.clone(),
                spec: req.spec,
                state: pb::CapsuleState::Creating as i32,
                ip: format!("10.201.{}.{}", n / 250, n % 250 + 2),
                vmm: Some(pb::VmmInfo {
                    name: "fake-vmm".into(),
                    version: "1".into(),
                    note: String::new(),
                }),
                started_unix_nanos: 0,
                message: String::new(),
                reason: String::new(),
                last_activity_unix_nanos: 0,
                host_ports: Vec::new(),
            };
            let mut c = c;
            let ports = c
                .spec
                .as_ref()
                .and_then(|s| s.network.as_ref())
                .map(|n| n.ports.clone())
                .unwrap_or_default();
            match st.publish(&req.uid, &ports) {
                Ok(h) => c.host_ports = h,
                Err(m) => {
                    c.reason = "HostPortsExhausted".into();
                    c.message = m;
                }
            }
            show_published(&mut c);
            // The real agent answers a create once the guest booted: a VM
            // that boots in no time is in its target state in the answer.
            if a.boot_delay.is_zero() {
                c.state = target as i32;
                c.started_unix_nanos = now_nanos();
            }
            st.created.insert(req.uid.clone());
            st.capsules.insert(req.uid.clone(), c.clone());
            a.emit(&mut st, pb::EventKind::StateChanged, &c);
            drop(st);
            if a.boot_delay.is_zero() {
                return Ok(c);
            }
            let boot = a.clone();
            let uid = req.uid;
            tokio::spawn(async move {
                tokio::time::sleep(boot.boot_delay).await;
                let mut st = lock(&boot.state);
                let booted = st.capsules.get_mut(&uid).map(|c| {
                    c.state = target as i32;
                    c.started_unix_nanos = now_nanos();
                    c.clone()
                });
                if let Some(c) = booted {
                    boot.emit(&mut st, pb::EventKind::StateChanged, &c);
                }
            });
            Ok(c)
        })
    }

    fn get_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        Box::pin(async move {
            let st = self.0.enter("GetCapsule", &uid)?;
            st.capsules.get(&uid).cloned().ok_or_else(|| Error::Call {
                call: "GetCapsule",
                node: self.0.node.clone(),
                status: tonic::Status::not_found(format!("capsule {uid}")),
            })
        })
    }

    fn list_capsules(&self) -> Call<'_, Vec<pb::Capsule>> {
        Box::pin(async move {
            let st = self.0.enter("ListCapsules", "")?;
            Ok(st.capsules.values().cloned().collect())
        })
    }

    fn delete_capsule(&self, uid: String) -> Call<'_, bool> {
        Box::pin(async move {
            let mut st = self.0.enter("DeleteCapsule", &uid)?;
            st.host_ports.retain(|_, (u, _)| *u != uid);
            match st.capsules.remove(&uid) {
                Some(c) => {
                    self.0.emit(&mut st, pb::EventKind::Deleted, &c);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn pause_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        use pb::CapsuleState as S;
        self.0
            .transition("PauseCapsule", uid, &[S::Running], S::Paused)
    }

    fn resume_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        use pb::CapsuleState as S;
        self.0
            .transition("ResumeCapsule", uid, &[S::Paused, S::Suspended], S::Running)
    }

    fn suspend_capsule(&self, uid: String) -> Call<'_, pb::Capsule> {
        use pb::CapsuleState as S;
        self.0.transition(
            "SuspendCapsule",
            uid,
            &[S::Running, S::Paused],
            S::Suspended,
        )
    }

    fn update_network(&self, req: pb::UpdateNetworkRequest) -> Call<'_, pb::Capsule> {
        use pb::CapsuleState as S;
        Box::pin(async move {
            let call = "UpdateNetwork";
            let mut st = self.0.enter(call, &req.uid)?;
            let fail = |status| Error::Call {
                call,
                node: self.0.node.clone(),
                status,
            };
            if st.refuse_network {
                return Err(fail(tonic::Status::unavailable("load nftables table")));
            }
            let Some(mut c) = st.capsules.get(&req.uid).cloned() else {
                return Err(fail(tonic::Status::not_found(format!(
                    "capsule {}",
                    req.uid
                ))));
            };
            let settled = [S::Running, S::Paused, S::Suspended, S::Failed, S::Stopped];
            if !settled.iter().any(|s| *s as i32 == c.state) {
                return Err(fail(tonic::Status::failed_precondition(format!(
                    "capsule {} is {:?}; wait until it settles",
                    req.uid,
                    S::try_from(c.state)
                ))));
            }
            let network = req.network.unwrap_or_default();
            match st.publish(&req.uid, &network.ports) {
                Ok(h) => {
                    c.host_ports = h;
                    c.reason.clear();
                    c.message.clear();
                }
                Err(m) => {
                    c.reason = "HostPortsExhausted".into();
                    c.message = m.clone();
                    st.capsules.insert(req.uid.clone(), c.clone());
                    return Err(fail(tonic::Status::resource_exhausted(m)));
                }
            }
            c.spec.get_or_insert_with(Default::default).network = Some(network);
            show_published(&mut c);
            st.capsules.insert(req.uid, c.clone());
            self.0.emit(&mut st, pb::EventKind::StateChanged, &c);
            Ok(c)
        })
    }

    fn snapshot_capsule(&self, req: pb::SnapshotCapsuleRequest) -> Call<'_, pb::Snapshot> {
        Box::pin(async move {
            let id = req.snapshot.map(|s| s.id).unwrap_or_default();
            let mut st = self.0.enter("SnapshotCapsule", &id)?;
            if let Some(s) = st.snapshots.get(&id) {
                return Ok(s.clone());
            }
            let Some(c) = st.capsules.get(&req.uid) else {
                return Err(Error::Call {
                    call: "SnapshotCapsule",
                    node: self.0.node.clone(),
                    status: tonic::Status::not_found(format!("capsule {}", req.uid)),
                });
            };
            let snap = pb::Snapshot {
                r#ref: Some(pb::SnapshotRef { id: id.clone() }),
                capsule_uid: req.uid.clone(),
                size_bytes: if req.memory { 600 << 20 } else { 80 << 20 },
                created_unix_nanos: 1_700_000_000_000_000_000,
                memory: req.memory,
                vmm: c.vmm.clone(),
                cpu_model: "fake cpu".into(),
                resources: c.spec.as_ref().and_then(|s| s.resources),
            };
            st.snapshots.insert(id, snap.clone());
            Ok(snap)
        })
    }

    fn prepare_template(&self, req: pb::PrepareTemplateRequest) -> Call<'_, pb::TemplateState> {
        let a = self.0.clone();
        Box::pin(async move {
            let key = req.disk.as_ref().map(|d| d.key.clone()).unwrap_or_default();
            let mut st = a.enter("PrepareTemplate", &key)?;
            st.credentials
                .insert(key.clone(), req.registry_credentials.clone());
            if let Some(t) = st.templates.get(&key)
                && (t.phase != pb::TemplatePhase::Failed as i32 || !req.retry)
            {
                return Ok(t.clone());
            }
            let preparing = pb::TemplateState {
                key: key.clone(),
                phase: pb::TemplatePhase::Preparing as i32,
                message: "building".into(),
                ..Default::default()
            };
            st.templates.insert(key.clone(), preparing.clone());
            drop(st);
            // Like the real agent: the call answers at once, the build
            // finishes later (after the boot delay).
            let build = a.clone();
            tokio::spawn(async move {
                tokio::time::sleep(build.boot_delay).await;
                let mut st = lock(&build.state);
                let failure = st
                    .template_failures
                    .iter()
                    .find(|(p, _)| key.starts_with(p.as_str()))
                    .map(|(_, m)| m.clone());
                let mut done = pb::TemplateState {
                    key: key.clone(),
                    digest: "sha256:fake".into(),
                    ..Default::default()
                };
                if let Some(message) = failure {
                    done.phase = pb::TemplatePhase::Failed as i32;
                    done.reason = "ReadinessTimeout".into();
                    done.message = message;
                } else {
                    done.phase = pb::TemplatePhase::Ready as i32;
                    if let Some(w) = req.warm {
                        done.snapshot_id = w.snapshot_id.clone();
                        let snap = pb::Snapshot {
                            r#ref: Some(pb::SnapshotRef {
                                id: w.snapshot_id.clone(),
                            }),
                            memory: true,
                            resources: w.resources,
                            ..Default::default()
                        };
                        st.snapshots.insert(w.snapshot_id, snap);
                    }
                }
                st.templates.insert(key, done);
            });
            Ok(preparing)
        })
    }

    fn delete_snapshot(&self, id: String) -> Call<'_, bool> {
        Box::pin(async move {
            let mut st = self.0.enter("DeleteSnapshot", &id)?;
            Ok(st.snapshots.remove(&id).is_some())
        })
    }

    fn watch_events(&self, after: u64) -> Call<'_, Events> {
        Box::pin(async move {
            let st = self.0.enter("WatchEvents", &after.to_string())?;
            let rx = self.0.events.subscribe();
            let sync: Vec<_> = st
                .capsules
                .values()
                .cloned()
                .map(|c| pb::Event {
                    sequence: 0,
                    kind: pb::EventKind::Sync as i32,
                    capsule: Some(c),
                    unix_nanos: 0,
                    name_refused: None,
                })
                .collect();
            drop(st);
            let live = tokio_stream::wrappers::BroadcastStream::new(rx)
                .take_while(|e| {
                    let end = matches!(e, Ok(ev) if ev.sequence == u64::MAX);
                    futures::future::ready(!end)
                })
                // A watcher that fell behind lost events: like the real
                // agent, tell it to list again.
                .map(|e| {
                    Ok(e.unwrap_or_else(|_lagged| pb::Event {
                        kind: pb::EventKind::Reset as i32,
                        ..Default::default()
                    }))
                });
            Ok(futures::stream::iter(sync.into_iter().map(Ok))
                .chain(live)
                .boxed())
        })
    }

    fn get_metrics(&self, req: pb::GetMetricsRequest) -> Call<'_, pb::GetMetricsResponse> {
        Box::pin(async move {
            let _st = self.0.enter("GetMetrics", &req.uid)?;
            Ok(pb::GetMetricsResponse {
                resolution_seconds: 1,
                samples: vec![pb::MetricsSample {
                    unix_nanos: req.to_unix_nanos,
                    cpu_millicores: 250,
                    guest_memory_used_bytes: 100 << 20,
                    host_rss_bytes: 150 << 20,
                    disk_allocated_bytes: 20 << 20,
                    net_rx_bytes: 0,
                    net_tx_bytes: 0,
                }],
            })
        })
    }
}
