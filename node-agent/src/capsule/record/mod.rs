//! [`Record`]: a capsule's journal entry, written before every side effect,
//! so each field says what *may* exist on the node. Recovery reads it back
//! after a restart (`super::recovery`). No I/O here.
//!
//! What the node holds for a capsule is one [`Held`] (disk, network, VM),
//! a step that may be half done is one [`InFlight`], and the last error is
//! a typed [`Reason`] with its message: combinations the agent never makes
//! (an address without a network, a running VM that is also starting, a
//! snapshot and a suspend at once) cannot be written. The transitions
//! below are the only way steps change them; each refuses a combination
//! that would break that. Journals of format 1 (loose flags) are read
//! through [`v1`].

mod v1;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wrenn_crds::reason::Reason;

use super::model::{CapsuleSpec, CapsuleView, Error, State};
use crate::guest::GuestToken;
use crate::vmm::{BackendInfo, MachineHandle};

/// Current journal format: 2 (typed holdings); 1 is still read.
pub const RECORD_VERSION: u32 = 2;

/// A capsule's journal entry: written before every side effect, so each
/// field says what *may* exist on the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Format version.
    pub version: u32,
    /// Capsule UID.
    pub uid: String,
    /// The spec it was created with.
    pub spec: CapsuleSpec,
    /// Current (or in-progress) state: read with [`Record::state`],
    /// changed only by the transitions below.
    state: State,
    /// The state to return to when an in-progress step
    /// (suspending, snapshotting, resuming) is undone: read with
    /// [`Record::prior`], set only by the transitions.
    prior: Option<State>,
    /// The read-only image the disk is made over, once resolved: the
    /// template's rootfs, a built OCI template, or a snapshot's disk. Kept
    /// so a restore after suspend or restart uses the same base without
    /// resolving (or building) it again.
    pub base_image: Option<PathBuf>,
    /// What may exist on the node for this capsule.
    pub held: Held,
    /// A step whose files may be half written: read with
    /// [`Record::in_flight`], set only by the transitions.
    in_flight: Option<InFlight>,
    /// When the guest started (unix nanos).
    pub started_unix_nanos: i64,
    /// Why the last step failed or why the capsule is `Failed`.
    #[serde(with = "reason_text")]
    pub reason: Option<Reason>,
    /// The error (chain) behind `reason`.
    pub message: Option<String>,
    /// A warm template's build VM: hidden from list, get, events and
    /// metrics, and removed (never adopted) by recovery.
    pub internal: bool,
    /// The token its guest agent requires (sent on every `Init`);
    /// journaled before the first `Init` so a restarted agent still
    /// reaches the guest. `None` only in records of older agents.
    pub guest_token: Option<GuestToken>,
    /// Its resolver settings changed while the guest was paused: the
    /// guest's `/etc/resolv.conf` is rewritten at resume (an `Init`, at
    /// boot or restore, writes it anyway).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resolver_stale: bool,
}

/// What may exist on the node for a capsule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// Its disk, once claimed.
    pub disk: Option<DiskHeld>,
    /// Its network (at least a slot claim), once claimed.
    pub net: Option<NetHeld>,
    /// Its VMM.
    pub vm: VmHeld,
}

/// A disk that may exist.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskHeld {
    /// Its path once made; `None` while it is being made.
    pub path: Option<PathBuf>,
}

/// A network (or a slot claim) that may exist.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetHeld {
    /// What it is once made; `None` while it is being made.
    pub addr: Option<NetAddr>,
    /// Host ports of its published ports (they live as long as the slot
    /// claim), by guest port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<super::model::HostPort>,
}

/// A made network: where the node reaches the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetAddr {
    /// The node's address of the guest.
    pub ip: String,
    /// The slot.
    pub slot: u32,
    /// The network namespace; `None` only in records of agents that did
    /// not journal it.
    pub netns: Option<PathBuf>,
}

/// The capsule's VMM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum VmHeld {
    /// None runs.
    #[default]
    None,
    /// A launch or restore is under way: a VMM may exist that no handle
    /// names yet.
    Starting,
    /// This one runs.
    Running(MachineHandle),
}

/// A step whose files may be half written when the agent stops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InFlight {
    /// Writing the suspend image (`state` is `Suspending`).
    Suspend {
        /// The image is complete in the capsule's `suspend/` dir.
        image_written: bool,
    },
    /// Writing named snapshot `id` (its staging dir may exist).
    Snapshot {
        /// Snapshot id.
        id: String,
    },
}

/// A transition the record refuses: what was asked and why not. Steps
/// check the state first, so this means a bug in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The transition.
    pub what: &'static str,
    /// What the record holds that forbids it.
    pub because: &'static str,
}

impl Refused {
    /// As the capsule error a step returns.
    pub(crate) fn on(self, rec: &Record) -> Error {
        Error::WrongState {
            uid: rec.uid.clone(),
            state: rec.state,
            hint: self.because,
        }
    }
}

fn refuse<T>(what: &'static str, because: &'static str) -> Result<T, Refused> {
    Err(Refused { what, because })
}

impl Record {
    /// A fresh record for a create.
    pub fn new(uid: &str, spec: &CapsuleSpec) -> Self {
        Self {
            version: RECORD_VERSION,
            uid: uid.to_string(),
            spec: spec.clone(),
            state: State::Creating,
            prior: None,
            base_image: None,
            held: Held::default(),
            in_flight: None,
            started_unix_nanos: 0,
            reason: None,
            message: None,
            internal: false,
            guest_token: None,
            resolver_stale: false,
        }
    }

    /// Decodes a journal of any format this agent reads (1 or 2). The
    /// caller has refused newer versions already (`state::quarantine`).
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        match serde_json::from_slice::<Versioned>(bytes)?.version {
            1 => serde_json::from_slice::<v1::RecordV1>(bytes).map(Record::from),
            _ => serde_json::from_slice(bytes),
        }
    }

    /// The running VM's handle, if one runs.
    pub fn vm(&self) -> Option<&MachineHandle> {
        match &self.held.vm {
            VmHeld::Running(vm) => Some(vm),
            VmHeld::None | VmHeld::Starting => None,
        }
    }

    /// The made network's address, if any.
    pub fn net_addr(&self) -> Option<&NetAddr> {
        self.held.net.as_ref().and_then(|n| n.addr.as_ref())
    }

    /// The made disk's path, if any.
    pub fn disk_path(&self) -> Option<&PathBuf> {
        self.held.disk.as_ref().and_then(|d| d.path.as_ref())
    }

    /// Claims a disk before it is made; `false` when one is claimed
    /// already (nothing to journal).
    pub(crate) fn claim_disk(&mut self) -> bool {
        if self.held.disk.is_some() {
            return false;
        }
        self.held.disk = Some(DiskHeld::default());
        true
    }

    /// The claimed disk is made at `path`.
    pub(crate) fn disk_made(&mut self, path: PathBuf) -> Result<(), Refused> {
        match &mut self.held.disk {
            Some(d) => {
                d.path = Some(path);
                Ok(())
            }
            None => refuse("disk made", "no disk was claimed"),
        }
    }

    /// The disk is removed.
    pub(crate) fn disk_removed(&mut self) {
        self.held.disk = None;
    }

    /// Claims a network before it is made; `false` when one is claimed
    /// already.
    pub(crate) fn claim_net(&mut self) -> bool {
        if self.held.net.is_some() {
            return false;
        }
        self.held.net = Some(NetHeld::default());
        true
    }

    /// The claimed network is made.
    pub(crate) fn net_made(&mut self, addr: NetAddr) -> Result<(), Refused> {
        match &mut self.held.net {
            Some(n) => {
                n.addr = Some(addr);
                Ok(())
            }
            None => refuse("network made", "no network was claimed"),
        }
    }

    /// The capsule's published ports now have these host ports.
    pub(crate) fn ports_published(&mut self, ports: Vec<super::model::HostPort>) {
        if let Some(n) = &mut self.held.net {
            n.host_ports = ports;
        }
    }

    /// The network is torn down and its slot released.
    pub(crate) fn net_released(&mut self) {
        self.held.net = None;
    }

    /// A launch or restore starts: a VMM may exist from here on.
    pub(crate) fn vm_starting(&mut self) -> Result<(), Refused> {
        match self.held.vm {
            VmHeld::Running(_) => refuse("start a VM", "a VM runs already"),
            VmHeld::None | VmHeld::Starting => {
                self.held.vm = VmHeld::Starting;
                Ok(())
            }
        }
    }

    /// The starting VMM runs as `vm`.
    pub(crate) fn vm_started(&mut self, vm: MachineHandle) -> Result<(), Refused> {
        match self.held.vm {
            VmHeld::Starting => {
                self.held.vm = VmHeld::Running(vm);
                Ok(())
            }
            VmHeld::None => refuse("VM started", "no VM was starting"),
            VmHeld::Running(_) => refuse("VM started", "a VM runs already"),
        }
    }

    /// No VMM runs (stopped, forgotten, or a start given up).
    pub(crate) fn vm_gone(&mut self) {
        self.held.vm = VmHeld::None;
    }

    /// A start that never produced a VMM is over; a running one stays.
    pub(crate) fn vm_start_over(&mut self) {
        if self.held.vm == VmHeld::Starting {
            self.held.vm = VmHeld::None;
        }
    }

    /// The step `Suspending` starts from the current state (`Running` or
    /// `Paused`), which it returns to if undone. Returns that state.
    pub(crate) fn begin_suspend(&mut self) -> Result<State, Refused> {
        if self.in_flight.is_some() {
            return refuse("begin a suspend", "another step is in flight");
        }
        let prior = self.state;
        self.prior = Some(prior);
        self.state = State::Suspending;
        self.in_flight = Some(InFlight::Suspend {
            image_written: false,
        });
        Ok(prior)
    }

    /// The suspend image is complete in the capsule's `suspend/` dir.
    pub(crate) fn suspend_image_written(&mut self) -> Result<(), Refused> {
        match &mut self.in_flight {
            Some(InFlight::Suspend { image_written }) => {
                *image_written = true;
                Ok(())
            }
            _ => refuse("suspend image written", "no suspend is in flight"),
        }
    }

    /// Whether a suspend in flight has its image complete.
    pub fn suspend_image_complete(&self) -> bool {
        matches!(
            self.in_flight,
            Some(InFlight::Suspend {
                image_written: true
            })
        )
    }

    /// Starts writing snapshot `id`; returns the state to go back to.
    pub(crate) fn begin_snapshot(&mut self, id: &str) -> Result<State, Refused> {
        if self.in_flight.is_some() {
            return refuse("begin a snapshot", "another step is in flight");
        }
        let prior = self.state;
        self.prior = Some(prior);
        self.state = State::Snapshotting;
        self.in_flight = Some(InFlight::Snapshot { id: id.to_string() });
        Ok(prior)
    }

    /// The snapshot's staging dir is gone (renamed into place or removed).
    pub(crate) fn end_snapshot(&mut self) -> Result<(), Refused> {
        match self.in_flight {
            Some(InFlight::Snapshot { .. }) => {
                self.in_flight = None;
                Ok(())
            }
            _ => refuse("end a snapshot", "no snapshot is in flight"),
        }
    }

    /// The snapshot whose staging dir may exist, taken off the record.
    pub(crate) fn take_snapshot_in_flight(&mut self) -> Option<String> {
        match self.in_flight.take() {
            Some(InFlight::Snapshot { id }) => Some(id),
            other => {
                self.in_flight = other;
                None
            }
        }
    }

    /// Starts restoring from the suspend image.
    pub(crate) fn begin_resume(&mut self) -> Result<(), Refused> {
        if self.state != State::Suspended {
            return refuse("begin a resume", "only a suspended capsule resumes");
        }
        self.state = State::Resuming;
        self.prior = Some(State::Suspended);
        Ok(())
    }

    /// Current (or in-progress) state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The state an in-progress step returns to when undone.
    pub fn prior(&self) -> Option<State> {
        self.prior
    }

    /// The step whose files may be half written.
    pub fn in_flight(&self) -> Option<&InFlight> {
        self.in_flight.as_ref()
    }

    /// Recovery observed the node and acted on `prior`: it no longer
    /// applies.
    pub(crate) fn forget_prior(&mut self) {
        self.prior = None;
    }

    /// A delete (or a failed create's rollback) is under way.
    pub(crate) fn begin_delete(&mut self) {
        self.state = State::Deleting;
    }

    /// A pause is under way.
    pub(crate) fn begin_pause(&mut self) {
        self.state = State::Pausing;
    }

    /// The guest booted and answered: running since `now_nanos`.
    pub(crate) fn running_since(&mut self, now_nanos: i64) {
        self.state = State::Running;
        self.started_unix_nanos = now_nanos;
    }

    /// A step failed in a way that leaves the capsule unusable; the caller
    /// says why ([`Record::explain`]).
    pub(crate) fn fail(&mut self) {
        self.state = State::Failed;
    }

    /// Its VMM ended on its own: `state` (stopped or failed) and why.
    pub(crate) fn vm_ended(&mut self, state: State, reason: Reason, message: impl Into<String>) {
        self.state = state;
        self.explain(reason, message);
    }

    /// Back in `state` after an in-flight step ended (done or undone).
    pub(crate) fn back_to(&mut self, state: State) {
        self.state = state;
        self.prior = None;
        self.in_flight = None;
    }

    /// Settled in `state` after a step succeeded: no error shown.
    pub(crate) fn settle(&mut self, state: State) {
        self.back_to(state);
        self.reason = None;
        self.message = None;
    }

    /// A restored VM runs: the suspend image is spent.
    pub(crate) fn restored(&mut self, vm: MachineHandle, now_nanos: i64) -> Result<(), Refused> {
        self.vm_started(vm)?;
        self.started_unix_nanos = now_nanos;
        self.settle(State::Running);
        Ok(())
    }

    /// Shows `reason` and `message` as why the capsule is as it is.
    pub(crate) fn explain(&mut self, reason: Reason, message: impl Into<String>) {
        self.reason = Some(reason);
        self.message = Some(message.into());
    }

    /// What readers see.
    pub fn view(&self, vmm: &BackendInfo) -> CapsuleView {
        CapsuleView {
            uid: self.uid.clone(),
            spec: self.spec.clone(),
            state: self.state,
            ip: self.net_addr().map(|a| a.ip.clone()),
            vmm: vmm.clone(),
            started_unix_nanos: self.started_unix_nanos,
            message: self.message.clone(),
            reason: self.reason,
            vsock_socket: self.vm().map(|v| v.vsock_socket.clone()),
            netns: self.net_addr().and_then(|a| a.netns.clone()),
            host_ports: self
                .held
                .net
                .as_ref()
                .map(|n| n.host_ports.clone())
                .unwrap_or_default(),
            guest_token: self.guest_token.clone(),
        }
    }
}

/// `Option<Reason>` as its text (`null` for none).
mod reason_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use wrenn_crds::reason::Reason;

    pub(super) fn serialize<S: Serializer>(r: &Option<Reason>, s: S) -> Result<S::Ok, S::Error> {
        match r {
            Some(r) => s.serialize_some(r.as_str()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Reason>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(D::Error::custom))
            .transpose()
    }
}

/// The refusal of an operation `state` does not allow, with a hint of
/// what to do instead ([`super::plan::refusal_hint`] picks it).
pub(crate) fn wrong(uid: &str, state: State, hint: &'static str) -> Error {
    Error::WrongState {
        uid: uid.to_string(),
        state,
        hint: super::plan::refusal_hint(state, hint),
    }
}

/// Records a failed step's error on `rec` (shown in `Capsule.message`).
pub(crate) fn note(rec: &mut Record, e: &Error) {
    rec.explain(e.reason(), e.chain());
}

pub(crate) use wrenn_proto::unix_nanos_now as now_nanos;

#[cfg(test)]
mod tests;
