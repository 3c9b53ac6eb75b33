//! [`Layout`]: where things live under the agent's state directory. Paths
//! only; the code that writes them is elsewhere (journal, supervisor steps,
//! VMM backends).

use std::path::{Path, PathBuf};

/// Where things live under the state directory.
#[derive(Clone, Debug)]
pub struct Layout {
    state_dir: PathBuf,
}

impl Layout {
    /// File names inside a snapshot directory (written by the capsule's
    /// snapshot step): its metadata.
    pub const SNAPSHOT_META: &str = "snapshot.json";
    /// The snapshot's copy of a raw capsule disk (a dm-snapshot device).
    pub const SNAPSHOT_DISK: &str = "disk.img";
    /// The snapshot's copy of a qcow2 overlay. The name tells the store the
    /// format; it is never guessed from content (see `storage::qcow2`).
    pub const SNAPSHOT_DISK_QCOW2: &str = "disk.qcow2";
    /// The snapshot's VM state (empty for a disk-only snapshot).
    pub const SNAPSHOT_MEMORY: &str = "memory";
    /// The guest token held in that memory (mode 0600): a capsule restored
    /// from it authorizes its first `Init` with this and sets its own.
    pub const SNAPSHOT_GUEST_TOKEN: &str = "guest.token";

    /// The layout under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// Per-capsule VMM runtime dirs (`<state>/vmm`); `ChMachine`'s
    /// `HostPaths::state_dir` must be this.
    pub fn vmm_root(&self) -> PathBuf {
        self.state_dir.join("vmm")
    }

    /// A capsule's VMM runtime dir (sockets, logs).
    pub fn run_dir(&self, uid: &str) -> PathBuf {
        self.vmm_root().join(uid)
    }

    /// Where a suspended capsule's memory image lives.
    pub fn suspend_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("capsules").join(uid).join("suspend")
    }

    /// Hard links to the snapshot disks capsules are made over, kept while
    /// any capsule or snapshot depends on them (see `capsule::bases`).
    pub fn bases_root(&self) -> PathBuf {
        self.state_dir.join("bases")
    }

    /// Named snapshots (`<state>/snapshots`).
    pub fn snapshots_root(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// A named snapshot's directory.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_root().join(id)
    }

    /// Where a named snapshot is written before it is renamed into place.
    pub fn snapshot_staging(&self, id: &str) -> PathBuf {
        self.snapshots_root().join(format!(".{id}.tmp"))
    }
}
