//! What recovery does with one journaled capsule, decided without I/O:
//! [`plan_recovery`] maps what the journal says and what the adopted VMM
//! reports ([`Facts`]) to one [`Plan`]. The executor in `super` carries it
//! out (release, adopt, thaw, journal); the tests below are the spec.

use crate::capsule::State;
use crate::vmm::MachineState;

/// What recovery knows about one capsule when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    /// The journaled state.
    pub(crate) state: State,
    /// The state an interrupted suspend or snapshot returns to.
    pub(crate) prior: Option<State>,
    /// A warm template's build VM.
    pub(crate) internal: bool,
    /// The suspend image was complete when the journal was written.
    pub(crate) suspended_image: bool,
    /// What the adopted VMM reports; `None` when the record names no VM,
    /// the VMM is gone, or it did not answer. Only asked for where
    /// [`observes_vm`] says so.
    pub(crate) vm: Option<MachineState>,
}

/// The one thing recovery does with a capsule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Undo everything (VM, network and slot, disk), journal last so a
    /// crash meanwhile retries on the next start. `adopt_first`: a VM the
    /// record names is adopted before it is stopped, so a stop never
    /// signals a reused pid; one that cannot be adopted is forgotten.
    Remove {
        /// Adopt the VMM before stopping it.
        adopt_first: bool,
    },
    /// Nothing should run: release the runtime (slot and disk kept) and
    /// keep the state. `suspended`: the capsule counts as suspended in the
    /// report, and a failed release is worth a warning.
    Quiesce {
        /// A suspended capsule (not a failed or stopped one).
        suspended: bool,
    },
    /// The suspend image was complete: release the VMM, `Suspended`.
    FinishSuspend,
    /// A restore that did not finish: release, `Suspended` again with
    /// reason `ResumeInterrupted`; the resume can be retried.
    ResumeInterrupted,
    /// The VMM is alive: resume its vCPUs when `thaw`, then show `state`.
    Keep {
        /// Resume a VM an interrupted step left paused.
        thaw: bool,
        /// The state to show.
        state: State,
    },
    /// The VMM is gone: release the runtime, `Failed` with reason
    /// `VmmLost` (the disk stays for the delete).
    Lost,
}

/// Whether recovery adopts the record's VMM and asks its state before
/// planning: a user capsule that had (or was getting) a VM.
pub(crate) fn observes_vm(state: State, internal: bool) -> bool {
    !internal
        && matches!(
            state,
            State::Running
                | State::Pausing
                | State::Paused
                | State::Suspending
                | State::Resuming
                | State::Snapshotting
        )
}

/// Decides what recovery does with one capsule (see the module docs).
pub(crate) fn plan_recovery(f: &Facts) -> Plan {
    if f.internal {
        // A warm template's build VM never outlives the agent that ran the
        // build; the next PrepareTemplate builds again.
        return Plan::Remove { adopt_first: true };
    }
    match f.state {
        // The operator creates again (calls are idempotent), or the delete
        // it asked for finishes here.
        State::Creating | State::Deleting => Plan::Remove { adopt_first: false },
        State::Suspended => Plan::Quiesce { suspended: true },
        State::Failed | State::Stopped => Plan::Quiesce { suspended: false },
        State::Suspending if f.suspended_image => Plan::FinishSuspend,
        State::Resuming if f.vm.is_none() => Plan::ResumeInterrupted,
        state => match f.vm {
            None => Plan::Lost,
            Some(vm) => {
                let want = match state {
                    State::Suspending | State::Snapshotting => f.prior.unwrap_or(State::Running),
                    State::Resuming => State::Running,
                    s => s,
                };
                // Whatever the interrupted step froze, thaw it if the
                // capsule should run.
                let thaw = want == State::Running && vm == MachineState::Paused;
                let state = match (want, vm) {
                    (State::Pausing, MachineState::Paused) => State::Paused,
                    (State::Pausing, _) => State::Running,
                    (State::Paused, MachineState::Running) => State::Running,
                    (w, _) => w,
                };
                Plan::Keep { thaw, state }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: State) -> Facts {
        Facts {
            state,
            prior: None,
            internal: false,
            suspended_image: false,
            vm: None,
        }
    }

    fn alive(state: State, vm: MachineState) -> Facts {
        Facts {
            vm: Some(vm),
            ..facts(state)
        }
    }

    #[test]
    fn a_build_vm_is_removed_whatever_it_was_doing() {
        for state in [
            State::Creating,
            State::Running,
            State::Snapshotting,
            State::Failed,
        ] {
            let f = Facts {
                internal: true,
                ..alive(state, MachineState::Running)
            };
            assert_eq!(plan_recovery(&f), Plan::Remove { adopt_first: true });
            assert!(!observes_vm(state, true));
        }
    }

    #[test]
    fn an_interrupted_create_or_delete_is_rolled_back() {
        assert_eq!(
            plan_recovery(&facts(State::Creating)),
            Plan::Remove { adopt_first: false }
        );
        assert_eq!(
            plan_recovery(&facts(State::Deleting)),
            Plan::Remove { adopt_first: false }
        );
        assert!(!observes_vm(State::Creating, false));
    }

    #[test]
    fn settled_capsules_without_a_vm_only_lose_their_runtime() {
        assert_eq!(
            plan_recovery(&facts(State::Suspended)),
            Plan::Quiesce { suspended: true }
        );
        assert_eq!(
            plan_recovery(&facts(State::Failed)),
            Plan::Quiesce { suspended: false }
        );
        assert_eq!(
            plan_recovery(&facts(State::Stopped)),
            Plan::Quiesce { suspended: false }
        );
        assert!(!observes_vm(State::Suspended, false));
    }

    #[test]
    fn a_live_vm_is_kept_in_the_state_it_really_is() {
        let keep = |state| Plan::Keep { thaw: false, state };
        assert_eq!(
            plan_recovery(&alive(State::Running, MachineState::Running)),
            keep(State::Running)
        );
        assert_eq!(
            plan_recovery(&alive(State::Paused, MachineState::Paused)),
            keep(State::Paused)
        );
        // A resume that reached the VMM before the journal did.
        assert_eq!(
            plan_recovery(&alive(State::Paused, MachineState::Running)),
            keep(State::Running)
        );
        // An interrupted pause ends where the VMM is.
        assert_eq!(
            plan_recovery(&alive(State::Pausing, MachineState::Paused)),
            keep(State::Paused)
        );
        assert_eq!(
            plan_recovery(&alive(State::Pausing, MachineState::Running)),
            keep(State::Running)
        );
        assert!(observes_vm(State::Pausing, false));
    }

    #[test]
    fn a_running_capsule_frozen_by_an_interrupted_step_is_thawed() {
        assert_eq!(
            plan_recovery(&alive(State::Running, MachineState::Paused)),
            Plan::Keep {
                thaw: true,
                state: State::Running
            }
        );
    }

    #[test]
    fn an_interrupted_suspend_or_snapshot_returns_to_the_prior_mode() {
        for state in [State::Suspending, State::Snapshotting] {
            let paused = Facts {
                prior: Some(State::Paused),
                ..alive(state, MachineState::Paused)
            };
            assert_eq!(
                plan_recovery(&paused),
                Plan::Keep {
                    thaw: false,
                    state: State::Paused
                }
            );
            let running = Facts {
                prior: Some(State::Running),
                ..alive(state, MachineState::Paused)
            };
            assert_eq!(
                plan_recovery(&running),
                Plan::Keep {
                    thaw: true,
                    state: State::Running
                }
            );
            // No prior journaled: back to running.
            assert_eq!(
                plan_recovery(&alive(state, MachineState::Running)),
                Plan::Keep {
                    thaw: false,
                    state: State::Running
                }
            );
        }
    }

    #[test]
    fn a_suspend_whose_image_was_complete_finishes() {
        for vm in [None, Some(MachineState::Paused)] {
            let f = Facts {
                suspended_image: true,
                vm,
                ..facts(State::Suspending)
            };
            assert_eq!(plan_recovery(&f), Plan::FinishSuspend);
        }
    }

    #[test]
    fn a_restore_that_did_not_finish_is_suspended_again() {
        assert_eq!(
            plan_recovery(&facts(State::Resuming)),
            Plan::ResumeInterrupted
        );
        // One that did is running.
        assert_eq!(
            plan_recovery(&alive(State::Resuming, MachineState::Paused)),
            Plan::Keep {
                thaw: true,
                state: State::Running
            }
        );
    }

    #[test]
    fn a_vm_that_died_while_the_agent_was_down_is_lost() {
        for state in [
            State::Running,
            State::Paused,
            State::Pausing,
            State::Snapshotting,
            State::Suspending,
        ] {
            assert_eq!(plan_recovery(&facts(state)), Plan::Lost, "{state}");
        }
    }
}
