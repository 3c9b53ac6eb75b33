//! What an operation does in a capsule's current state, decided without
//! I/O: [`plan_op`] maps a requested [`Op`] and the journaled [`State`] to
//! the steps to run, a no-op, or a refusal with its hint; [`plan_vm_exit`]
//! maps how a VMM ended to the state its capsule is left in. The
//! supervisor and the steps carry the decisions out; the tests below are
//! the spec of which operation is legal where.

use super::model::State;
use crate::vmm::process::VmmExit;
use wrenn_crds::reason::Reason;

/// An operation on an existing capsule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `PauseCapsule`.
    Pause,
    /// `ResumeCapsule`.
    Resume,
    /// `SuspendCapsule`.
    Suspend,
    /// `SnapshotCapsule`.
    Snapshot,
    /// `UpdateNetwork` with a policy other than the current one.
    UpdateEgress,
}

/// What [`plan_op`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Already where the operation leads: nothing to do.
    Noop,
    /// Stop the vCPUs of a running VM.
    Pause,
    /// Start the vCPUs of a paused VM.
    ResumePaused,
    /// Restore a suspended capsule from its image.
    Restore,
    /// Write the memory to the node and release the VMM.
    Suspend,
    /// Write a named snapshot, then return to the mode it was in.
    Snapshot,
    /// Swap the policy of the live network.
    ApplyEgress,
    /// No network exists: journal the policy, applied when one is made.
    RecordEgress,
    /// Refused; the hint says what to do instead (see `record::wrong`).
    Refuse(&'static str),
}

/// Decides what `op` does to a capsule in `state`.
pub(crate) fn plan_op(op: Op, state: State) -> Decision {
    use State as S;
    match (op, state) {
        (Op::Pause, S::Paused) => Decision::Noop,
        (Op::Pause, S::Running) => Decision::Pause,
        (Op::Pause, _) => Decision::Refuse("only a running capsule can be paused"),
        (Op::Resume, S::Running) => Decision::Noop,
        (Op::Resume, S::Paused) => Decision::ResumePaused,
        (Op::Resume, S::Suspended) => Decision::Restore,
        (Op::Resume, _) => Decision::Refuse("only a paused or suspended capsule can be resumed"),
        (Op::Suspend, S::Suspended) => Decision::Noop,
        (Op::Suspend, S::Running | S::Paused) => Decision::Suspend,
        (Op::Suspend, _) => Decision::Refuse("only a running or paused capsule can be suspended"),
        (Op::Snapshot, S::Running | S::Paused) => Decision::Snapshot,
        (Op::Snapshot, S::Suspended) => Decision::Refuse("resume it first"),
        (Op::Snapshot, _) => {
            Decision::Refuse("only a running or paused capsule can be snapshotted; resume it first")
        }
        (Op::UpdateEgress, S::Running | S::Paused) => Decision::ApplyEgress,
        (Op::UpdateEgress, S::Suspended | S::Failed | S::Stopped) => Decision::RecordEgress,
        (Op::UpdateEgress, _) => Decision::Refuse("wait until it settles"),
    }
}

/// The hint a refusal in `state` shows: the state's own when it says
/// more (a capsule in flight waits, a dead one can only be deleted),
/// otherwise the operation's `hint`. Decided by state, never by reading
/// the hint's text.
pub(crate) fn refusal_hint(state: State, hint: &'static str) -> &'static str {
    match state {
        State::Failed | State::Stopped => "only delete is possible",
        State::Creating | State::Deleting | State::Resuming | State::Suspending => {
            "wait until it settles"
        }
        _ => hint,
    }
}

/// The state a capsule is left in when its VMM ended on its own, with the
/// reason and message it shows; `None` when the end was asked for (an
/// operation stopped it, and judges it itself).
pub(crate) fn plan_vm_exit<E: std::fmt::Display>(
    exit: &Result<VmmExit, E>,
) -> Option<(State, Reason, String)> {
    match exit {
        Ok(VmmExit::Requested) => None,
        Ok(VmmExit::GuestPoweroff) => Some((
            State::Stopped,
            Reason::GuestPoweroff,
            "the guest powered itself off".to_string(),
        )),
        Ok(VmmExit::Crashed(status)) => Some((
            State::Failed,
            Reason::VmCrashed,
            format!("the VMM exited unexpectedly ({status:?})"),
        )),
        Err(e) => Some((
            State::Failed,
            Reason::VmmLost,
            format!("lost track of the VMM: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 11] = [
        State::Creating,
        State::Running,
        State::Pausing,
        State::Paused,
        State::Suspending,
        State::Suspended,
        State::Resuming,
        State::Snapshotting,
        State::Deleting,
        State::Failed,
        State::Stopped,
    ];

    /// The states where `op` is not refused.
    fn legal(op: Op) -> Vec<State> {
        ALL.into_iter()
            .filter(|s| !matches!(plan_op(op, *s), Decision::Refuse(_)))
            .collect()
    }

    #[test]
    fn pause_stops_a_running_capsule_and_leaves_a_paused_one() {
        assert_eq!(plan_op(Op::Pause, State::Running), Decision::Pause);
        assert_eq!(plan_op(Op::Pause, State::Paused), Decision::Noop);
        assert_eq!(legal(Op::Pause), [State::Running, State::Paused]);
    }

    #[test]
    fn resume_thaws_a_paused_capsule_and_restores_a_suspended_one() {
        assert_eq!(plan_op(Op::Resume, State::Paused), Decision::ResumePaused);
        assert_eq!(plan_op(Op::Resume, State::Suspended), Decision::Restore);
        assert_eq!(plan_op(Op::Resume, State::Running), Decision::Noop);
        assert_eq!(
            legal(Op::Resume),
            [State::Running, State::Paused, State::Suspended]
        );
    }

    #[test]
    fn suspend_and_snapshot_need_a_vm() {
        assert_eq!(plan_op(Op::Suspend, State::Paused), Decision::Suspend);
        assert_eq!(plan_op(Op::Suspend, State::Suspended), Decision::Noop);
        assert_eq!(
            legal(Op::Suspend),
            [State::Running, State::Paused, State::Suspended]
        );
        assert_eq!(legal(Op::Snapshot), [State::Running, State::Paused]);
        assert_eq!(
            plan_op(Op::Snapshot, State::Suspended),
            Decision::Refuse("resume it first")
        );
        assert_eq!(
            plan_op(Op::Snapshot, State::Stopped),
            Decision::Refuse(
                "only a running or paused capsule can be snapshotted; resume it first"
            )
        );
    }

    #[test]
    fn a_refusal_shows_the_states_hint_where_it_says_more() {
        let hint = "only a running capsule can be paused";
        assert_eq!(refusal_hint(State::Suspended, hint), hint);
        assert_eq!(refusal_hint(State::Paused, hint), hint);
        assert_eq!(refusal_hint(State::Failed, hint), "only delete is possible");
        assert_eq!(
            refusal_hint(State::Stopped, hint),
            "only delete is possible"
        );
        for s in [
            State::Creating,
            State::Deleting,
            State::Resuming,
            State::Suspending,
        ] {
            assert_eq!(refusal_hint(s, hint), "wait until it settles", "{s}");
        }
    }

    #[test]
    fn egress_is_swapped_live_or_recorded_for_later() {
        assert_eq!(
            plan_op(Op::UpdateEgress, State::Running),
            Decision::ApplyEgress
        );
        assert_eq!(
            plan_op(Op::UpdateEgress, State::Suspended),
            Decision::RecordEgress
        );
        assert_eq!(
            plan_op(Op::UpdateEgress, State::Resuming),
            Decision::Refuse("wait until it settles")
        );
    }

    #[test]
    fn nothing_but_delete_reaches_a_capsule_in_flight() {
        for op in [
            Op::Pause,
            Op::Resume,
            Op::Suspend,
            Op::Snapshot,
            Op::UpdateEgress,
        ] {
            for s in [
                State::Creating,
                State::Pausing,
                State::Suspending,
                State::Resuming,
                State::Snapshotting,
                State::Deleting,
            ] {
                assert!(
                    matches!(plan_op(op, s), Decision::Refuse(_)),
                    "{op:?} in {s}"
                );
            }
        }
    }

    #[test]
    fn a_vmm_that_ends_on_its_own_leaves_its_capsule_stopped_or_failed() {
        let lost: Result<VmmExit, &str> = Err("pidfd closed");
        assert_eq!(
            plan_vm_exit(&lost),
            Some((
                State::Failed,
                Reason::VmmLost,
                "lost track of the VMM: pidfd closed".to_string()
            ))
        );
        let off: Result<VmmExit, &str> = Ok(VmmExit::GuestPoweroff);
        assert_eq!(plan_vm_exit(&off).map(|p| p.0), Some(State::Stopped));
        let asked: Result<VmmExit, &str> = Ok(VmmExit::Requested);
        assert_eq!(plan_vm_exit(&asked), None);
    }
}
