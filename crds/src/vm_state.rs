//! [`VmState`]: where a capsule's VM stands on its node, as the node agent
//! journals it and reports it on `agent.proto`, and as the operator plans
//! from it. One definition for both sides; the journal stores the variant
//! names, so renaming one is a journal format change.

use serde::{Deserialize, Serialize};

/// Where a capsule's VM stands on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Disk, network and VM being made (booting, or restoring for the
    /// first time).
    Creating,
    /// vCPUs running.
    Running,
    /// vCPUs being stopped.
    Pausing,
    /// vCPUs stopped, memory kept.
    Paused,
    /// Memory being written to the node; the VMM will exit.
    Suspending,
    /// Memory and disk on the node, no VMM, slot kept.
    Suspended,
    /// Being restored from its suspend image.
    Resuming,
    /// Being written to a named snapshot.
    Snapshotting,
    /// Being removed.
    Deleting,
    /// The VMM died or an undo failed; only delete is legal.
    Failed,
    /// The guest powered itself off; only delete is legal.
    Stopped,
}

impl VmState {
    /// Lowercase name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Pausing => "pausing",
            VmState::Paused => "paused",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Resuming => "resuming",
            VmState::Snapshotting => "snapshotting",
            VmState::Deleting => "deleting",
            VmState::Failed => "failed",
            VmState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_journal_spelling_is_the_variant_name() {
        // Journals written by every agent so far hold these strings.
        assert_eq!(
            serde_json::to_string(&VmState::Snapshotting).unwrap(),
            "\"Snapshotting\""
        );
        assert_eq!(
            serde_json::from_str::<VmState>("\"Suspended\"").unwrap(),
            VmState::Suspended
        );
    }
}
