//! [`Record`]: a capsule's journal entry, written before every side effect,
//! so each field says what *may* exist on the node. Recovery reads it back
//! after a restart (`super::recovery`). No I/O here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::model::{CapsuleSpec, CapsuleView, Error, State};
use crate::guest::GuestToken;
use crate::vmm::{BackendInfo, MachineHandle};

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
    /// Current (or in-progress) state.
    pub state: State,
    /// The state to return to when an in-progress step
    /// (suspending, snapshotting) is undone.
    pub prior: Option<State>,
    /// A disk may exist.
    pub disk: bool,
    /// The disk's path once made.
    pub disk_path: Option<PathBuf>,
    /// The read-only image the disk is made over, once resolved: the
    /// template's rootfs, a built OCI template, or a snapshot's disk. Kept
    /// so a restore after suspend or restart uses the same base without
    /// resolving (or building) it again.
    #[serde(default)]
    pub base_image: Option<PathBuf>,
    /// A network (or at least a slot claim) may exist.
    pub network: bool,
    /// The node's address of the guest.
    pub ip: Option<String>,
    /// The slot.
    pub slot: Option<u32>,
    /// A VMM may be starting (launch or restore under way).
    pub vm_starting: bool,
    /// The running VM.
    pub vm: Option<MachineHandle>,
    /// The suspend image is complete in the capsule's `suspend/` dir.
    pub suspended_image: bool,
    /// A named snapshot being written (its staging dir may exist).
    pub snapshot_in_progress: Option<String>,
    /// When the guest started (unix nanos).
    pub started_unix_nanos: i64,
    /// Last error or why Failed.
    pub message: String,
    /// CamelCase reason for `message`.
    pub reason: String,
    /// A warm template's build VM: hidden from list, get, events and
    /// metrics, and removed (never adopted) by recovery.
    #[serde(default)]
    pub internal: bool,
    /// The capsule's network namespace once made.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The token its guest agent requires (sent on every `Init`);
    /// journaled before the first `Init` so a restarted agent still
    /// reaches the guest. `None` only in records of older agents.
    #[serde(default)]
    pub guest_token: Option<GuestToken>,
}

/// Current journal format.
pub const RECORD_VERSION: u32 = 1;

impl Record {
    /// A fresh record for a create.
    pub fn new(uid: &str, spec: &CapsuleSpec) -> Self {
        Self {
            version: RECORD_VERSION,
            uid: uid.to_string(),
            spec: spec.clone(),
            state: State::Creating,
            prior: None,
            disk: false,
            disk_path: None,
            base_image: None,
            network: false,
            ip: None,
            slot: None,
            vm_starting: false,
            vm: None,
            suspended_image: false,
            snapshot_in_progress: None,
            started_unix_nanos: 0,
            message: String::new(),
            reason: String::new(),
            internal: false,
            netns: None,
            guest_token: None,
        }
    }

    /// The step `Suspending` or `Snapshotting` starts from the current
    /// state (`Running` or `Paused`), which it returns to if undone; an
    /// earlier suspend image is stale from here on. Returns that state.
    pub(crate) fn begin_suspend(&mut self) -> State {
        let prior = self.state;
        self.prior = Some(prior);
        self.state = State::Suspending;
        self.suspended_image = false;
        prior
    }

    /// The suspend image is complete in the capsule's `suspend/` dir.
    pub(crate) fn suspend_image_written(&mut self) {
        self.suspended_image = true;
    }

    /// Starts writing snapshot `id`; returns the state to go back to.
    pub(crate) fn begin_snapshot(&mut self, id: &str) -> State {
        let prior = self.state;
        self.prior = Some(prior);
        self.state = State::Snapshotting;
        self.snapshot_in_progress = Some(id.to_string());
        prior
    }

    /// The snapshot's staging dir is gone (renamed into place or removed).
    pub(crate) fn end_snapshot(&mut self) {
        self.snapshot_in_progress = None;
    }

    /// Starts restoring from the suspend image.
    pub(crate) fn begin_resume(&mut self) {
        self.state = State::Resuming;
        self.prior = Some(State::Suspended);
    }

    /// Back in `state` after an in-flight step ended (done or undone).
    pub(crate) fn back_to(&mut self, state: State) {
        self.state = state;
        self.prior = None;
    }

    /// Settled in `state` after a step succeeded: no error shown.
    pub(crate) fn settle(&mut self, state: State) {
        self.back_to(state);
        self.message.clear();
        self.reason.clear();
    }

    /// A restored VM runs: the suspend image is spent.
    pub(crate) fn restored(&mut self, vm: MachineHandle, now_nanos: i64) {
        self.vm = Some(vm);
        self.vm_starting = false;
        self.suspended_image = false;
        self.started_unix_nanos = now_nanos;
        self.settle(State::Running);
    }

    /// What readers see.
    pub fn view(&self, vmm: &BackendInfo) -> CapsuleView {
        CapsuleView {
            uid: self.uid.clone(),
            spec: self.spec.clone(),
            state: self.state,
            ip: self.ip.clone().unwrap_or_default(),
            vmm: vmm.clone(),
            started_unix_nanos: self.started_unix_nanos,
            message: self.message.clone(),
            reason: self.reason.clone(),
            vsock_socket: self.vm.as_ref().map(|v| v.vsock_socket.clone()),
            guest_token: self.guest_token.clone(),
        }
    }
}

/// The refusal of an operation `state` does not allow, with a hint of
/// what to do instead.
pub(crate) fn wrong(uid: &str, state: State, hint: &'static str) -> Error {
    let hint = match state {
        State::Paused if hint.starts_with("only a running") => "resume it first",
        State::Suspended if hint.starts_with("only a running or paused capsule can be snap") => {
            "resume it first"
        }
        State::Failed | State::Stopped => "only delete is possible",
        State::Creating | State::Deleting | State::Resuming | State::Suspending => {
            "wait until it settles"
        }
        _ => hint,
    };
    Error::WrongState {
        uid: uid.to_string(),
        state,
        hint,
    }
}

/// Records a failed step's error on `rec` (shown in `Capsule.message`).
pub(crate) fn note(rec: &mut Record, e: &Error) {
    rec.reason = e.reason().into();
    rec.message = e.chain();
}

pub(crate) use wrenn_proto::unix_nanos_now as now_nanos;

#[cfg(test)]
mod tests {
    use super::super::model::testing::spec;
    use super::*;

    #[test]
    fn a_suspend_returns_to_the_mode_it_started_from() {
        let mut r = Record::new("c1", &spec("a"));
        r.state = State::Paused;
        r.suspended_image = true;
        assert_eq!(r.begin_suspend(), State::Paused);
        assert_eq!((r.state, r.prior), (State::Suspending, Some(State::Paused)));
        assert!(!r.suspended_image, "an earlier image is stale");
        r.back_to(State::Paused);
        assert_eq!((r.state, r.prior), (State::Paused, None));
    }

    #[test]
    fn a_finished_step_clears_the_last_error() {
        let mut r = Record::new("c1", &spec("a"));
        r.reason = "VmFailed".into();
        r.message = "pause VM of capsule c1".into();
        r.begin_suspend();
        r.suspend_image_written();
        r.settle(State::Suspended);
        assert_eq!((r.state, r.prior), (State::Suspended, None));
        assert!(r.suspended_image && r.reason.is_empty() && r.message.is_empty());
    }

    #[test]
    fn a_snapshot_names_its_staging_dir_until_it_ends() {
        let mut r = Record::new("c1", &spec("a"));
        r.state = State::Running;
        assert_eq!(r.begin_snapshot("s1"), State::Running);
        assert_eq!(r.snapshot_in_progress.as_deref(), Some("s1"));
        r.end_snapshot();
        r.back_to(State::Running);
        assert_eq!(
            (r.state, r.prior, r.snapshot_in_progress),
            (State::Running, None, None)
        );
    }

    #[test]
    fn record_round_trips_through_json() {
        let r = Record::new("c1", &spec("a"));
        let text = serde_json::to_string(&r).unwrap();
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
