//! Pure decisions for one capsule: from its spec and what its node agent
//! reports, the next action on the node and the status to show. No async,
//! no clients, no clocks (`now` is an argument); the controller gathers the
//! facts, acts on [`NodeAction`] and writes [`StatusDraft`].
//!
//! Why this file is long: 704 lines of code and 431 of unit tests kept beside
//! the code they check.

use std::time::Duration;

use wrenn_crds::capsule::VmmInfo;
use wrenn_crds::capsule::{CapsulePhase, Lifecycle, OnExpiry, OperatingMode};
use wrenn_crds::reason::{ConditionStatus, ConditionType, Reason};

use crate::resources::{Error as ResourceError, parse_duration};

/// State of a VM as its agent reports it (one definition with the
/// agent's, in `wrenn-crds`).
pub use wrenn_crds::VmState;

/// An egress policy as the spec asks for it and as an agent reports it
/// applied, in one comparable form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// `egress: Deny`.
    pub deny: bool,
    /// With `deny`, the CIDRs still reachable: sorted, without duplicates.
    pub allow_cidrs: Vec<String>,
    /// With `deny`, the host names still reachable: sorted, without
    /// duplicates.
    pub allow_hosts: Vec<String>,
    /// `spec.network.dns`; `None` when absent or empty (the node's
    /// defaults).
    pub dns: Option<DnsPolicy>,
    /// Published ports (TCP ports with `from`): by port, sources sorted.
    pub ports: Vec<PublishedPort>,
}

/// `spec.network.dns` in comparable form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsPolicy {
    /// Upstream nameservers, in order.
    pub nameservers: Vec<String>,
    /// Search domains, in order.
    pub searches: Vec<String>,
    /// resolv.conf options, in order.
    pub options: Vec<String>,
    /// Name resolution closed under deny.
    pub block_under_deny: bool,
}

/// A port the node publishes through a host port, and from where.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedPort {
    /// Guest port.
    pub port: u16,
    /// Source CIDRs, sorted, without duplicates.
    pub from: Vec<String>,
}

impl EgressPolicy {
    /// The policy, with the CIDR list in canonical order.
    pub fn new(deny: bool, mut allow_cidrs: Vec<String>) -> Self {
        allow_cidrs.sort();
        allow_cidrs.dedup();
        Self {
            deny,
            allow_cidrs,
            ..Self::default()
        }
    }

    /// With allowed host names (canonical order) and DNS settings (the
    /// empty settings read as `None`).
    pub fn with_names(mut self, mut allow_hosts: Vec<String>, dns: Option<DnsPolicy>) -> Self {
        allow_hosts.sort();
        allow_hosts.dedup();
        self.allow_hosts = allow_hosts;
        self.dns = dns.filter(|d| *d != DnsPolicy::default());
        self
    }

    /// With these published ports, in canonical order.
    pub fn with_ports(mut self, ports: impl IntoIterator<Item = PublishedPort>) -> Self {
        self.ports = ports
            .into_iter()
            .map(|mut p| {
                p.from.sort();
                p.from.dedup();
                p
            })
            .collect();
        self.ports.sort();
        self
    }
}

/// A VM on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// Its state.
    pub state: VmState,
    /// Node-reachable address, once networking is up.
    pub ip: Option<String>,
    /// VMM name, version and slowness note.
    pub vmm: Option<VmmInfo>,
    /// Start or last restore, Unix nanoseconds (0 when unknown).
    pub started_unix_nanos: i64,
    /// Why the agent failed it, or its last failed operation; `None`
    /// when the agent named no reason this operator knows.
    pub reason: Option<Reason>,
    /// The agent's last error.
    pub message: String,
    /// The egress policy the node enforces for it.
    pub egress: EgressPolicy,
    /// Host ports of its published ports: (guest port, node port).
    pub host_ports: Vec<(u16, u16)>,
}

/// What the operator knows about the capsule's VM.
#[derive(Clone, Copy, Debug)]
pub enum Observed<'a> {
    /// The node's agent is unreachable: nothing is known.
    Unknown,
    /// The agent answered and has no VM for this UID.
    Absent,
    /// The agent has this VM.
    Present(&'a Vm),
}

/// Whether the capsule's source can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Template present, or snapshot Ready.
    Usable,
    /// Blocked; (reason, message).
    Blocked(Reason, String),
}

/// Everything the plan reads.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// `spec.operatingMode`.
    pub mode: OperatingMode,
    /// `status.nodeName`: the placement already recorded.
    pub node: Option<&'a str>,
    /// `status.phase` as last written.
    pub phase: Option<CapsulePhase>,
    /// The VM on `node`.
    pub vm: Observed<'a>,
    /// Whether the source is usable (only matters before creation).
    pub source: SourceState,
    /// The lifecycle expired, with `onExpiry`.
    pub expired: Option<OnExpiry>,
    /// `spec.network`'s egress policy.
    pub egress: EgressPolicy,
}

/// One step on the node, or on the object itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// Nothing to do until something changes.
    None,
    /// Choose a node (legal only while `status.nodeName` is unset).
    Place,
    /// Create the VM on `status.nodeName`, starting in this state.
    Create(OperatingMode),
    /// Running → Paused.
    Pause,
    /// Paused or Suspended → Running.
    Resume,
    /// Running or Paused → Suspended.
    Suspend,
    /// Make the node enforce `spec.network`'s egress policy: live on a
    /// running or paused VM, recorded for a suspended, failed or stopped
    /// one. Legal once the VM settled in one of those states.
    UpdateNetwork,
    /// Lifecycle expired with `onExpiry: Delete`: delete the Capsule object
    /// (its finalizer then deletes the VM).
    DeleteObject,
}

/// One condition to show: (type, status, reason, message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionDraft {
    /// `Scheduled`, `Ready`, `Paused` or `Suspended`.
    pub type_: ConditionType,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Why.
    pub reason: Reason,
    /// Human sentence.
    pub message: String,
}

/// The status the plan wants, without times or generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusDraft {
    /// Phase.
    pub phase: CapsulePhase,
    /// Node, kept once set.
    pub node: Option<String>,
    /// Guest address.
    pub ip: Option<String>,
    /// Start time, Unix nanoseconds.
    pub started_unix_nanos: Option<i64>,
    /// VMM.
    pub vmm: Option<VmmInfo>,
    /// Conditions, one per type.
    pub conditions: Vec<ConditionDraft>,
    /// The node does not enforce the spec's network policy yet:
    /// `observedGeneration` stays where it was until it does.
    pub network_pending: bool,
}

/// The plan: an action and the status to show once it is under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Next step.
    pub action: NodeAction,
    /// Status to show; `None` keeps the current one (nothing is known).
    pub status: Option<StatusDraft>,
}

/// When to reconcile again after a pass that ends with no further step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// The VM runs: on the usage interval, which refreshes `status.usage`.
    Usage,
    /// Paused, suspended or failed: only a change moves it; look rarely.
    Settled,
    /// In a transition, or waiting for a source or a node: soon.
    Soon,
    /// The node's agent is unreachable: nothing is known yet.
    Unknown,
    /// The pool or the Node list is not complete yet: placing now could
    /// duplicate a VM or misjudge a nodeSelector; very soon.
    NotReady,
}

impl Requeue {
    /// The delay; `usage` is the usage refresh interval.
    pub fn after(self, usage: Duration) -> Duration {
        match self {
            Requeue::Usage => usage,
            Requeue::Settled => Duration::from_secs(300),
            Requeue::Soon => Duration::from_secs(10),
            Requeue::Unknown => Duration::from_secs(15),
            Requeue::NotReady => Duration::from_millis(500),
        }
    }
}

impl Plan {
    /// When to look again once this plan's step is the pass's last.
    pub fn requeue(&self) -> Requeue {
        match self.status.as_ref().map(|s| s.phase) {
            None => Requeue::Unknown,
            Some(CapsulePhase::Running) => Requeue::Usage,
            Some(CapsulePhase::Paused | CapsulePhase::Suspended | CapsulePhase::Failed) => {
                Requeue::Settled
            }
            Some(_) => Requeue::Soon,
        }
    }
}

/// The delay before the next reconcile: `requeue`, or just after the
/// lifecycle expires when that comes first.
pub fn plan_requeue(requeue: Requeue, expiry: Expiry, usage: Duration) -> Duration {
    let after = requeue.after(usage);
    match expiry {
        Expiry::In(left) => after.min(left + Duration::from_millis(200)),
        _ => after,
    }
}

/// The status once placement chose `node` (the [`NodeAction::Place`]
/// plan's status with `Scheduled` true). It rides on the status the
/// create ends in, or is written alone when the create fails, so that the
/// retry creates on this node, never another.
pub fn plan_placed(f: &Facts<'_>, node: &str) -> StatusDraft {
    let mut draft = placing(f);
    draft.phase = CapsulePhase::Scheduled;
    draft.node = Some(node.to_string());
    if let Some(c) = draft
        .conditions
        .iter_mut()
        .find(|c| c.type_ == ConditionType::Scheduled)
    {
        *c = cond(
            ConditionType::Scheduled,
            true,
            Reason::Placed,
            format!("placed on node {node}"),
        );
    }
    draft
}

/// No node fits: the capsule stays Pending with placement's reasons, and
/// is looked at again soon (nodes free up, join, or get labels).
pub fn plan_unschedulable(f: &Facts<'_>, why: String) -> Plan {
    let mut draft = placing(f);
    if let Some(c) = draft
        .conditions
        .iter_mut()
        .find(|c| c.type_ == ConditionType::Scheduled)
    {
        c.reason = Reason::Unschedulable;
        c.message = why;
    }
    Plan {
        action: NodeAction::None,
        status: Some(draft),
    }
}

/// The status shown while a capsule waits for placement.
fn placing(f: &Facts<'_>) -> StatusDraft {
    pending(suspend_reason(f))
}

fn suspend_reason(f: &Facts<'_>) -> Reason {
    if f.expired.is_some() {
        Reason::SuspendedOnExpiry
    } else {
        Reason::SuspendedByUser
    }
}

impl ConditionDraft {
    /// A condition that holds (`ok`) or not.
    pub fn new(type_: ConditionType, ok: bool, reason: Reason, message: String) -> Self {
        Self {
            type_,
            status: ok.into(),
            reason,
            message,
        }
    }
}

fn cond(type_: ConditionType, ok: bool, reason: Reason, message: String) -> ConditionDraft {
    ConditionDraft::new(type_, ok, reason, message)
}

/// Builds the four conditions for a phase. `scheduled` is Scheduled's
/// (ok, reason, message); `ready_reason`/`message` explain Ready when False.
fn conditions(
    scheduled: (bool, Reason, String),
    phase: CapsulePhase,
    ready_reason: Reason,
    ready_message: String,
    suspend_reason: Reason,
) -> Vec<ConditionDraft> {
    let running = phase == CapsulePhase::Running;
    let paused = phase == CapsulePhase::Paused;
    let suspended = phase == CapsulePhase::Suspended;
    let other_reason = if running {
        Reason::Running
    } else {
        ready_reason
    };
    vec![
        cond(
            ConditionType::Scheduled,
            scheduled.0,
            scheduled.1,
            scheduled.2,
        ),
        cond(
            ConditionType::Ready,
            running,
            if running {
                Reason::Running
            } else {
                ready_reason
            },
            if running {
                "the VM runs".to_string()
            } else {
                ready_message
            },
        ),
        cond(
            ConditionType::Paused,
            paused,
            if paused {
                Reason::PausedByUser
            } else {
                other_reason
            },
            if paused {
                "vCPUs stopped, memory kept".to_string()
            } else {
                String::new()
            },
        ),
        cond(
            ConditionType::Suspended,
            suspended,
            if suspended {
                suspend_reason
            } else {
                other_reason
            },
            if suspended {
                "memory written to disk on the node; VMM stopped".to_string()
            } else {
                String::new()
            },
        ),
    ]
}

fn draft(
    phase: CapsulePhase,
    node: Option<&str>,
    vm: Option<&Vm>,
    conditions: Vec<ConditionDraft>,
) -> StatusDraft {
    StatusDraft {
        phase,
        node: node.map(str::to_string),
        ip: vm.and_then(|v| v.ip.clone()),
        started_unix_nanos: vm.map(|v| v.started_unix_nanos).filter(|n| *n > 0),
        vmm: vm.and_then(|v| v.vmm.clone()),
        conditions,
        network_pending: false,
    }
}

/// The mode the capsule should be in, after lifecycle expiry.
fn desired_mode(f: &Facts<'_>) -> OperatingMode {
    match f.expired {
        Some(OnExpiry::Suspend) => OperatingMode::Suspended,
        _ => f.mode,
    }
}

/// Decides the next step for one capsule and the status to show.
pub fn plan_capsule(f: &Facts<'_>) -> Plan {
    let mode = desired_mode(f);
    let suspend_reason = suspend_reason(f);
    if f.expired == Some(OnExpiry::Delete) {
        return plan_expired(f, suspend_reason);
    }
    let Some(node) = f.node else {
        return plan_unplaced(f, suspend_reason);
    };
    let vm = match f.vm {
        // Nothing is known: keep what the status says until the agent is back.
        Observed::Unknown => {
            return Plan {
                action: NodeAction::None,
                status: None,
            };
        }
        Observed::Absent => {
            return plan_absent(f, node, mode, suspend_reason);
        }
        Observed::Present(vm) => vm,
    };
    let (phase, action, ready_reason, message) = plan_vm(vm, mode, suspend_reason);
    // The policy changes once the VM has settled (a mode change first);
    // until the node enforces it the status does not claim this generation.
    let network_pending = vm.egress != f.egress;
    let mut conds = conditions(placed(node), phase, ready_reason, message, suspend_reason);
    conds.extend(ports_condition(&f.egress.ports, vm));
    let settled = matches!(
        vm.state,
        VmState::Running
            | VmState::Paused
            | VmState::Suspended
            | VmState::Failed
            | VmState::Stopped
    );
    let action = if network_pending && settled && action == NodeAction::None {
        NodeAction::UpdateNetwork
    } else {
        action
    };
    Plan {
        action,
        status: Some(StatusDraft {
            network_pending,
            ..draft(phase, Some(node), Some(vm), conds)
        }),
    }
}

/// The Scheduled condition of a capsule placed on `node`.
fn placed(node: &str) -> (bool, Reason, String) {
    (true, Reason::Placed, format!("placed on node {node}"))
}

/// A capsule whose lifecycle expired with `onExpiry: Delete`: the object
/// goes, placed or not.
fn plan_expired(f: &Facts<'_>, suspend_reason: Reason) -> Plan {
    let sched = match f.node {
        Some(n) => placed(n),
        None => (false, Reason::Expired, "expired before placement".into()),
    };
    let vm = match f.vm {
        Observed::Present(vm) => Some(vm),
        _ => None,
    };
    Plan {
        action: NodeAction::DeleteObject,
        status: Some(draft(
            CapsulePhase::Expired,
            f.node,
            vm,
            conditions(
                sched,
                CapsulePhase::Expired,
                Reason::Expired,
                "lifecycle expired; deleting".into(),
                suspend_reason,
            ),
        )),
    }
}

/// A capsule on no node yet: place it, unless its source blocks it.
fn plan_unplaced(f: &Facts<'_>, suspend_reason: Reason) -> Plan {
    if let SourceState::Blocked(why, message) = &f.source {
        return Plan {
            action: NodeAction::None,
            status: Some(draft(
                CapsulePhase::Pending,
                None,
                None,
                conditions(
                    (false, *why, message.clone()),
                    CapsulePhase::Pending,
                    Reason::Pending,
                    "waiting for its source".into(),
                    suspend_reason,
                ),
            )),
        };
    }
    Plan {
        action: NodeAction::Place,
        status: Some(pending(suspend_reason)),
    }
}

/// Phase, node action, Ready reason and message for a VM the agent
/// reports in `vm.state` when the capsule should be in `mode`.
fn plan_vm(
    vm: &Vm,
    mode: OperatingMode,
    suspend_reason: Reason,
) -> (CapsulePhase, NodeAction, Reason, String) {
    match (vm.state, mode) {
        (VmState::Failed, _) => (
            CapsulePhase::Failed,
            NodeAction::None,
            vm.reason.unwrap_or(Reason::NodeError),
            vm.message.clone(),
        ),
        (VmState::Stopped, _) => (
            CapsulePhase::Failed,
            NodeAction::None,
            Reason::VmCrashed,
            "the guest powered itself off".to_string(),
        ),
        (VmState::Creating, _) => (
            CapsulePhase::Creating,
            NodeAction::None,
            Reason::Creating,
            "the VM is booting".to_string(),
        ),
        (VmState::Pausing, _) => transitional(CapsulePhase::Pausing, "pausing"),
        (VmState::Suspending, _) => transitional(CapsulePhase::Suspending, "suspending"),
        (VmState::Resuming, _) => transitional(CapsulePhase::Resuming, "resuming"),
        (VmState::Snapshotting, _) => transitional(CapsulePhase::Pausing, "snapshotting"),
        (VmState::Deleting, _) => transitional(CapsulePhase::Terminating, "deleting"),
        (VmState::Running, OperatingMode::Running) => (
            CapsulePhase::Running,
            NodeAction::None,
            Reason::Running,
            String::new(),
        ),
        (VmState::Running, OperatingMode::Paused) => (
            CapsulePhase::Pausing,
            NodeAction::Pause,
            Reason::PausedByUser,
            "pausing".to_string(),
        ),
        (VmState::Running | VmState::Paused, OperatingMode::Suspended) => (
            CapsulePhase::Suspending,
            NodeAction::Suspend,
            suspend_reason,
            "suspending".to_string(),
        ),
        (VmState::Paused, OperatingMode::Paused) => (
            CapsulePhase::Paused,
            NodeAction::None,
            Reason::PausedByUser,
            "paused at the user's request".to_string(),
        ),
        // Paused → Running, and Suspended → Running or Paused: resume first;
        // a Paused target pauses on the next pass.
        (VmState::Paused, OperatingMode::Running)
        | (VmState::Suspended, OperatingMode::Running | OperatingMode::Paused) => (
            CapsulePhase::Resuming,
            NodeAction::Resume,
            Reason::Creating,
            "resuming".to_string(),
        ),
        (VmState::Suspended, OperatingMode::Suspended) => (
            CapsulePhase::Suspended,
            NodeAction::None,
            suspend_reason,
            "suspended".to_string(),
        ),
    }
}

/// `PortsPublished`, for a capsule that wants ports published: True once
/// each has a host port on its node; False with the node's reason
/// (`HostPortsExhausted`) or while the node has not published them yet.
fn ports_condition(wanted: &[PublishedPort], vm: &Vm) -> Option<ConditionDraft> {
    if wanted.is_empty() {
        return None;
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|w| !vm.host_ports.iter().any(|(p, _)| *p == w.port))
        .map(|w| w.port.to_string())
        .collect();
    Some(if missing.is_empty() {
        let shown: Vec<String> = vm
            .host_ports
            .iter()
            .map(|(p, h)| format!("{p} on node port {h}"))
            .collect();
        cond(
            ConditionType::PortsPublished,
            true,
            Reason::PortsPublished,
            format!("published: {}", shown.join(", ")),
        )
    } else if vm.reason == Some(Reason::HostPortsExhausted) {
        cond(
            ConditionType::PortsPublished,
            false,
            Reason::HostPortsExhausted,
            vm.message.clone(),
        )
    } else {
        cond(
            ConditionType::PortsPublished,
            false,
            Reason::Pending,
            format!(
                "waiting for the node to publish port {}",
                missing.join(", ")
            ),
        )
    })
}

fn transitional(phase: CapsulePhase, what: &str) -> (CapsulePhase, NodeAction, Reason, String) {
    (
        phase,
        NodeAction::None,
        Reason::Pending,
        format!("the node agent is {what} the VM"),
    )
}

fn pending(suspend_reason: Reason) -> StatusDraft {
    draft(
        CapsulePhase::Pending,
        None,
        None,
        conditions(
            (false, Reason::Pending, "waiting for placement".into()),
            CapsulePhase::Pending,
            Reason::Pending,
            "not placed yet".into(),
            suspend_reason,
        ),
    )
}

/// The node answered and has no VM for this capsule.
fn plan_absent(f: &Facts<'_>, node: &str, mode: OperatingMode, suspend_reason: Reason) -> Plan {
    let placed = (true, Reason::Placed, format!("placed on node {node}"));
    let status = |phase, action, ready_reason, message: String| Plan {
        action,
        status: Some(draft(
            phase,
            Some(node),
            None,
            conditions(placed.clone(), phase, ready_reason, message, suspend_reason),
        )),
    };
    match f.phase {
        // Never created, or a create cut short (operator restart): create;
        // the agent returns the existing VM for a UID it already has.
        None | Some(CapsulePhase::Pending | CapsulePhase::Scheduled | CapsulePhase::Creating) => {
            status(
                CapsulePhase::Creating,
                NodeAction::Create(mode),
                Reason::Creating,
                format!("creating the VM on node {node}"),
            )
        }
        // Terminating without a deletion (this plan only runs for live
        // capsules): the agent rolled back a create that failed on the
        // node, e.g. a guest that never answered. Try again.
        Some(CapsulePhase::Terminating) => status(
            CapsulePhase::Creating,
            NodeAction::Create(mode),
            Reason::Creating,
            format!("the node {node} rolled back a failed create; creating the VM again"),
        ),
        Some(CapsulePhase::Failed | CapsulePhase::Expired) => Plan {
            action: NodeAction::None,
            status: None,
        },
        // A suspended capsule's memory lived only on that node: it is gone.
        Some(CapsulePhase::Suspended | CapsulePhase::Suspending) => status(
            CapsulePhase::Failed,
            NodeAction::None,
            Reason::VmCrashed,
            format!("the suspended VM vanished from node {node}; its memory is lost"),
        ),
        // It ran and vanished: boot it again from its source.
        Some(_) => status(
            CapsulePhase::Creating,
            NodeAction::Create(mode),
            Reason::VmCrashed,
            format!("the VM vanished from node {node}; recreating it"),
        ),
    }
}

/// When a capsule expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No lifecycle limit.
    Never,
    /// Expires after this much more time.
    In(Duration),
    /// Already expired; what to do.
    Now(OnExpiry),
}

/// Decides expiry from the lifecycle and ages (seconds since creation and
/// since the last activity: the VM's start, or the last data-plane call
/// the agent reports when asked).
pub fn plan_expiry(
    lifecycle: Option<&Lifecycle>,
    age: Duration,
    idle: Option<Duration>,
) -> Result<Expiry, ResourceError> {
    let Some(l) = lifecycle else {
        return Ok(Expiry::Never);
    };
    let mut left: Option<Duration> = None;
    if let Some(after) = &l.shutdown_after {
        let limit = parse_duration("shutdownAfter", after)?;
        left = Some(limit.saturating_sub(age));
    }
    if let (Some(timeout), Some(idle)) = (&l.idle_timeout, idle) {
        let limit = parse_duration("idleTimeout", timeout)?;
        let rest = limit.saturating_sub(idle);
        left = Some(left.map_or(rest, |l| l.min(rest)));
    }
    Ok(match left {
        None => Expiry::Never,
        Some(d) if d.is_zero() => Expiry::Now(l.on_expiry),
        Some(d) => Expiry::In(d),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ConditionType::*;

    fn vm(state: VmState) -> Vm {
        Vm {
            state,
            ip: Some("10.200.0.2".into()),
            vmm: Some(VmmInfo {
                name: "cloud-hypervisor".into(),
                version: "v44".into(),
                note: None,
            }),
            started_unix_nanos: 1_700_000_000_000_000_000,
            reason: None,
            message: String::new(),
            egress: EgressPolicy::default(),
            host_ports: Vec::new(),
        }
    }

    fn facts<'a>(
        mode: OperatingMode,
        node: Option<&'a str>,
        phase: Option<CapsulePhase>,
        vm: Observed<'a>,
    ) -> Facts<'a> {
        Facts {
            mode,
            node,
            phase,
            vm,
            source: SourceState::Usable,
            expired: None,
            egress: EgressPolicy::default(),
        }
    }

    /// The plan for a capsule placed on `n1` whose VM the agent reports.
    fn on_n1(mode: OperatingMode, phase: Option<CapsulePhase>, v: &Vm) -> Plan {
        plan_capsule(&facts(mode, Some("n1"), phase, Observed::Present(v)))
    }

    /// The plan for a capsule placed on `n1` whose agent holds no VM.
    fn vanished_on_n1(mode: OperatingMode, phase: Option<CapsulePhase>) -> Plan {
        plan_capsule(&facts(mode, Some("n1"), phase, Observed::Absent))
    }

    fn cond_of(p: &Plan, t: ConditionType) -> &ConditionDraft {
        p.status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    fn phase(p: &Plan) -> CapsulePhase {
        p.status.as_ref().unwrap().phase
    }

    #[test]
    fn unplaced_capsule_asks_for_placement() {
        let p = plan_capsule(&facts(OperatingMode::Running, None, None, Observed::Absent));
        assert_eq!(p.action, NodeAction::Place);
        assert_eq!(phase(&p), CapsulePhase::Pending);
        assert_eq!(cond_of(&p, Scheduled).status, ConditionStatus::False);
    }

    #[test]
    fn missing_template_blocks_placement_with_its_reason() {
        let mut f = facts(OperatingMode::Running, None, None, Observed::Absent);
        f.source = SourceState::Blocked(Reason::TemplateNotFound, "template base not found".into());
        let p = plan_capsule(&f);
        assert_eq!(p.action, NodeAction::None);
        let s = cond_of(&p, Scheduled);
        assert_eq!(s.reason, Reason::TemplateNotFound);
        assert_eq!(s.message, "template base not found");
    }

    #[test]
    fn placed_capsule_without_vm_is_created_in_its_mode() {
        for mode in [
            OperatingMode::Running,
            OperatingMode::Paused,
            OperatingMode::Suspended,
        ] {
            let p = vanished_on_n1(mode, Some(CapsulePhase::Scheduled));
            assert_eq!(p.action, NodeAction::Create(mode));
            assert_eq!(phase(&p), CapsulePhase::Creating);
            assert_eq!(cond_of(&p, Scheduled).message, "placed on node n1");
        }
    }

    #[test]
    fn running_vm_shows_running_with_ip_and_ready() {
        let v = vm(VmState::Running);
        let p = on_n1(OperatingMode::Running, Some(CapsulePhase::Creating), &v);
        assert_eq!(p.action, NodeAction::None);
        let s = p.status.as_ref().unwrap();
        assert_eq!(s.phase, CapsulePhase::Running);
        assert_eq!(s.ip.as_deref(), Some("10.200.0.2"));
        assert_eq!(cond_of(&p, Ready).status, ConditionStatus::True);
        assert_eq!(cond_of(&p, Paused).status, ConditionStatus::False);
    }

    #[test]
    fn mode_changes_map_to_node_actions_in_both_directions() {
        use OperatingMode as M;
        use VmState as S;
        let cases = [
            (
                S::Running,
                M::Paused,
                NodeAction::Pause,
                CapsulePhase::Pausing,
            ),
            (
                S::Running,
                M::Suspended,
                NodeAction::Suspend,
                CapsulePhase::Suspending,
            ),
            (
                S::Paused,
                M::Suspended,
                NodeAction::Suspend,
                CapsulePhase::Suspending,
            ),
            (
                S::Paused,
                M::Running,
                NodeAction::Resume,
                CapsulePhase::Resuming,
            ),
            (
                S::Suspended,
                M::Running,
                NodeAction::Resume,
                CapsulePhase::Resuming,
            ),
            (
                S::Suspended,
                M::Paused,
                NodeAction::Resume,
                CapsulePhase::Resuming,
            ),
            (S::Paused, M::Paused, NodeAction::None, CapsulePhase::Paused),
            (
                S::Suspended,
                M::Suspended,
                NodeAction::None,
                CapsulePhase::Suspended,
            ),
        ];
        for (state, mode, action, ph) in cases {
            let v = vm(state);
            let p = on_n1(mode, Some(CapsulePhase::Running), &v);
            assert_eq!((p.action, phase(&p)), (action, ph), "{state:?} -> {mode:?}");
        }
    }

    #[test]
    fn paused_and_suspended_conditions_follow_the_vm() {
        let v = vm(VmState::Paused);
        let p = on_n1(OperatingMode::Paused, None, &v);
        assert_eq!(cond_of(&p, Paused).status, ConditionStatus::True);
        assert_eq!(cond_of(&p, Paused).reason, Reason::PausedByUser);
        assert_eq!(cond_of(&p, Ready).status, ConditionStatus::False);
        let v = vm(VmState::Suspended);
        let p = on_n1(OperatingMode::Suspended, None, &v);
        assert_eq!(cond_of(&p, Suspended).status, ConditionStatus::True);
        assert_eq!(cond_of(&p, Suspended).reason, Reason::SuspendedByUser);
    }

    #[test]
    fn failed_vm_carries_the_agents_message() {
        let mut v = vm(VmState::Failed);
        v.reason = Some(Reason::VmFailed);
        v.message = "boot vm: kernel not found".into();
        let p = on_n1(OperatingMode::Running, Some(CapsulePhase::Creating), &v);
        assert_eq!(phase(&p), CapsulePhase::Failed);
        assert_eq!(cond_of(&p, Ready).reason, Reason::VmFailed);
        assert_eq!(cond_of(&p, Ready).message, "boot vm: kernel not found");
        assert_eq!(p.action, NodeAction::None);
    }

    #[test]
    fn unreachable_agent_changes_nothing() {
        let p = plan_capsule(&facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Unknown,
        ));
        assert_eq!(
            p,
            Plan {
                action: NodeAction::None,
                status: None
            }
        );
    }

    #[test]
    fn vanished_running_vm_is_recreated_and_marked() {
        let p = vanished_on_n1(OperatingMode::Running, Some(CapsulePhase::Running));
        assert_eq!(p.action, NodeAction::Create(OperatingMode::Running));
        assert_eq!(cond_of(&p, Ready).reason, Reason::VmCrashed);
    }

    #[test]
    fn a_create_rolled_back_by_the_node_is_tried_again() {
        let p = vanished_on_n1(OperatingMode::Running, Some(CapsulePhase::Terminating));
        assert_eq!(p.action, NodeAction::Create(OperatingMode::Running));
        assert_eq!(phase(&p), CapsulePhase::Creating);
    }

    #[test]
    fn vanished_suspended_vm_fails_for_its_memory_is_lost() {
        let p = vanished_on_n1(OperatingMode::Suspended, Some(CapsulePhase::Suspended));
        assert_eq!(p.action, NodeAction::None);
        assert_eq!(phase(&p), CapsulePhase::Failed);
    }

    #[test]
    fn failed_capsule_is_not_recreated() {
        let p = vanished_on_n1(OperatingMode::Running, Some(CapsulePhase::Failed));
        assert_eq!(p.action, NodeAction::None);
    }

    #[test]
    fn expiry_with_delete_deletes_the_object() {
        let v = vm(VmState::Running);
        let mut f = facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.expired = Some(OnExpiry::Delete);
        let p = plan_capsule(&f);
        assert_eq!(p.action, NodeAction::DeleteObject);
        assert_eq!(phase(&p), CapsulePhase::Expired);
        assert_eq!(cond_of(&p, Ready).reason, Reason::Expired);
    }

    #[test]
    fn expiry_with_suspend_suspends_with_its_own_reason() {
        let v = vm(VmState::Running);
        let mut f = facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.expired = Some(OnExpiry::Suspend);
        assert_eq!(plan_capsule(&f).action, NodeAction::Suspend);
        let v = vm(VmState::Suspended);
        f.vm = Observed::Present(&v);
        let p = plan_capsule(&f);
        assert_eq!(phase(&p), CapsulePhase::Suspended);
        assert_eq!(cond_of(&p, Suspended).reason, Reason::SuspendedOnExpiry);
    }

    fn published(port: u16) -> PublishedPort {
        PublishedPort {
            port,
            from: vec!["10.244.0.0/16".into()],
        }
    }

    #[test]
    fn published_ports_say_where_they_are_or_why_not() {
        let want = EgressPolicy::default().with_ports([published(8888)]);
        let running = |v: &Vm| {
            let mut f = facts(
                OperatingMode::Running,
                Some("n1"),
                Some(CapsulePhase::Running),
                Observed::Present(v),
            );
            f.egress = want.clone();
            plan_capsule(&f)
        };
        // Published: nothing to do, True with the node port.
        let mut v = vm(VmState::Running);
        v.egress = want.clone();
        v.host_ports = vec![(8888, 29000)];
        let p = running(&v);
        assert_eq!(p.action, NodeAction::None);
        let c = cond_of(&p, PortsPublished);
        assert_eq!(
            (c.status, c.reason),
            (ConditionStatus::True, Reason::PortsPublished)
        );
        assert!(
            c.message.contains("8888 on node port 29000"),
            "{}",
            c.message
        );

        // The node's range was full at create: it shows the port as not
        // enforced, so the node is asked again, and the condition says why.
        let mut v = vm(VmState::Running);
        v.reason = Some(Reason::HostPortsExhausted);
        v.message = "host-port range 29000-29009 has 0 free ports".into();
        let p = running(&v);
        assert_eq!(p.action, NodeAction::UpdateNetwork);
        let c = cond_of(&p, PortsPublished);
        assert_eq!(
            (c.status, c.reason),
            (ConditionStatus::False, Reason::HostPortsExhausted)
        );
        assert!(c.message.contains("29000-29009"));

        // No port with `from`: no such condition at all.
        let mut f = facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.egress = EgressPolicy::default();
        let p = plan_capsule(&f);
        let has = p
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == ConditionType::PortsPublished);
        assert!(!has);
    }

    #[test]
    fn a_changed_network_is_updated_on_the_node_and_holds_the_generation() {
        let deny = EgressPolicy::new(true, vec!["203.0.113.0/24".into()]);
        for state in [
            VmState::Running,
            VmState::Paused,
            VmState::Suspended,
            VmState::Failed,
        ] {
            let v = vm(state);
            let mode = match state {
                VmState::Paused => OperatingMode::Paused,
                VmState::Suspended => OperatingMode::Suspended,
                _ => OperatingMode::Running,
            };
            let mut f = facts(
                mode,
                Some("n1"),
                Some(CapsulePhase::Running),
                Observed::Present(&v),
            );
            f.egress = deny.clone();
            let p = plan_capsule(&f);
            assert_eq!(p.action, NodeAction::UpdateNetwork, "{state:?}");
            assert!(p.status.as_ref().unwrap().network_pending, "{state:?}");
        }

        // Applied: nothing more to do, and the generation may advance.
        let mut v = vm(VmState::Running);
        v.egress = EgressPolicy::new(true, vec!["203.0.113.0/24".into(), "203.0.113.0/24".into()]);
        let mut f = facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.egress = deny.clone();
        let p = plan_capsule(&f);
        assert_eq!(p.action, NodeAction::None);
        assert!(!p.status.as_ref().unwrap().network_pending);
    }

    #[test]
    fn a_changed_host_list_or_resolver_is_a_network_update() {
        let deny = EgressPolicy::new(true, vec![]);
        let dns = DnsPolicy {
            searches: vec!["corp.example".into()],
            ..DnsPolicy::default()
        };
        let mut v = vm(VmState::Running);
        v.egress = deny.clone();
        for wanted in [
            deny.clone().with_names(vec!["pypi.org".into()], None),
            deny.clone().with_names(vec![], Some(dns.clone())),
        ] {
            let mut f = facts(
                OperatingMode::Running,
                Some("n1"),
                Some(CapsulePhase::Running),
                Observed::Present(&v),
            );
            f.egress = wanted.clone();
            assert_eq!(
                plan_capsule(&f).action,
                NodeAction::UpdateNetwork,
                "{wanted:?}"
            );
        }
        // Same names in another order, and empty DNS settings, are no change.
        v.egress = deny.clone().with_names(
            vec!["b.example".into(), "a.example".into()],
            Some(DnsPolicy::default()),
        );
        let mut f = facts(
            OperatingMode::Running,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.egress = deny.with_names(vec!["a.example".into(), "b.example".into()], None);
        assert_eq!(plan_capsule(&f).action, NodeAction::None);
    }

    #[test]
    fn a_mode_change_goes_first_and_the_network_waits_for_a_settled_vm() {
        let deny = EgressPolicy::new(true, vec![]);
        let v = vm(VmState::Running);
        let mut f = facts(
            OperatingMode::Suspended,
            Some("n1"),
            Some(CapsulePhase::Running),
            Observed::Present(&v),
        );
        f.egress = deny.clone();
        let p = plan_capsule(&f);
        assert_eq!(p.action, NodeAction::Suspend);
        assert!(p.status.as_ref().unwrap().network_pending);

        let v = vm(VmState::Creating);
        f.vm = Observed::Present(&v);
        f.mode = OperatingMode::Running;
        let p = plan_capsule(&f);
        assert_eq!(p.action, NodeAction::None);
        assert!(p.status.as_ref().unwrap().network_pending);
    }

    #[test]
    fn expiry_takes_the_earlier_of_both_limits() {
        let l = Lifecycle {
            shutdown_after: Some("1h".into()),
            idle_timeout: Some("10m".into()),
            on_expiry: OnExpiry::Suspend,
        };
        let min = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(
            plan_expiry(Some(&l), min(5), Some(min(5))).unwrap(),
            Expiry::In(min(5))
        );
        assert_eq!(
            plan_expiry(Some(&l), min(50), None).unwrap(),
            Expiry::In(min(10))
        );
        assert_eq!(
            plan_expiry(Some(&l), min(61), None).unwrap(),
            Expiry::Now(OnExpiry::Suspend)
        );
        assert_eq!(
            plan_expiry(Some(&l), min(20), Some(min(10))).unwrap(),
            Expiry::Now(OnExpiry::Suspend)
        );
        assert_eq!(plan_expiry(None, min(1000), None).unwrap(), Expiry::Never);
    }
}
