//! Facts about this node for `NodeInfo`: CPU model, capacity, free memory
//! and disk, whether KVM is usable; what its capsules hold of it
//! ([`plan_offer`]), so `free` never offers what a capsule may still claim;
//! and what the agent's own files (image cache, snapshots, suspend images)
//! hold against the node's disk quota.
//! Host paths are passed in so tests read a fake `/proc`.

use std::path::{Path, PathBuf};

use crate::capsule::{Resources, State};
use crate::vmm::cgroup::VMM_MEMORY_OVERHEAD_BYTES;

/// Where to read node facts from.
#[derive(Clone, Debug)]
pub struct NodePaths {
    /// Usually `/proc`.
    pub proc: PathBuf,
    /// Usually `/dev/kvm`.
    pub kvm: PathBuf,
    /// The agent's state directory; its filesystem holds capsule disks.
    pub state_dir: PathBuf,
}

/// What the node has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `model name` of the first CPU.
    pub cpu_model: String,
    /// Online logical CPUs.
    pub vcpus: u32,
    /// MemTotal.
    pub memory_total: u64,
    /// MemAvailable.
    pub memory_available: u64,
    /// Size of the state directory's filesystem.
    pub disk_total: u64,
    /// Space left on it for unprivileged writers.
    pub disk_free: u64,
    /// `/dev/kvm` exists and opens read-write.
    pub kvm: bool,
    /// Bytes the quota counts ([`quota_usage`]).
    pub quota_used: u64,
}

/// Share of the state filesystem the quota is when no `--disk-quota` is
/// given, in percent: the rest stays for capsule disks and the node.
pub const DEFAULT_QUOTA_PERCENT: u64 = 80;

/// The node's disk quota: `configured`, or [`DEFAULT_QUOTA_PERCENT`] of
/// the state filesystem's size.
pub fn plan_quota(configured: Option<u64>, disk_total: u64) -> u64 {
    configured.unwrap_or(disk_total / 100 * DEFAULT_QUOTA_PERCENT)
}

/// What the quota counts under `state_dir`: the image cache (`images/`),
/// snapshots (`snapshots/`, `bases/`) and suspend images
/// (`capsules/*/suspend/`), each block once. Blocking.
pub fn quota_usage(state_dir: &Path) -> u64 {
    let mut roots = vec![
        state_dir.join("images"),
        state_dir.join("snapshots"),
        state_dir.join("bases"),
    ];
    if let Ok(rd) = std::fs::read_dir(state_dir.join("capsules")) {
        roots.extend(rd.flatten().map(|e| e.path().join("suspend")));
    }
    crate::images::quota::allocated_in(&roots)
}

/// The CPU model alone (what a snapshot records), without the disk and
/// quota walk of [`read_facts`]. Blocking.
pub fn read_cpu_model(paths: &NodePaths) -> String {
    cpu_model(&std::fs::read_to_string(paths.proc.join("cpuinfo")).unwrap_or_default())
}

/// Reads the facts; a missing source leaves its fields at zero rather than
/// failing, since `NodeInfo` must answer even on odd hosts.
pub fn read_facts(paths: &NodePaths) -> NodeFacts {
    let cpuinfo = std::fs::read_to_string(paths.proc.join("cpuinfo")).unwrap_or_default();
    let meminfo = std::fs::read_to_string(paths.proc.join("meminfo")).unwrap_or_default();
    let (disk_total, disk_free) = disk(&paths.state_dir);
    NodeFacts {
        cpu_model: cpu_model(&cpuinfo),
        vcpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32,
        memory_total: meminfo_bytes(&meminfo, "MemTotal"),
        memory_available: meminfo_bytes(&meminfo, "MemAvailable"),
        disk_total,
        disk_free,
        kvm: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths.kvm)
            .is_ok(),
        quota_used: quota_usage(&paths.state_dir),
    }
}

/// The cap on all VMMs together (their parent cgroup), as configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmCap {
    /// Whole CPUs; `None` is the node's.
    pub vcpus: Option<u32>,
    /// Bytes; `None` is the node's memory.
    pub memory_bytes: Option<u64>,
}

/// What one capsule holds of the node: its declared resources as far as
/// its state keeps them, never what the guest happens to touch now.
pub fn held_by(state: State, declared: &Resources) -> Resources {
    // A VMM's cgroup may use guest RAM plus the VMM's own overhead.
    let memory = declared
        .memory_bytes
        .saturating_add(VMM_MEMORY_OVERHEAD_BYTES);
    match state {
        // A VMM exists or is about to (paused keeps RAM and must be able
        // to resume in place; snapshotting and pausing return to running).
        State::Creating
        | State::Running
        | State::Pausing
        | State::Paused
        | State::Resuming
        | State::Snapshotting
        | State::Suspending
        | State::Deleting => Resources {
            vcpus: declared.vcpus,
            memory_bytes: memory,
            disk_bytes: declared.disk_bytes,
        },
        // No VMM: the disk stays, and a suspend image as large as RAM.
        State::Suspended => Resources {
            vcpus: 0,
            memory_bytes: 0,
            disk_bytes: declared.disk_bytes.saturating_add(declared.memory_bytes),
        },
        // The VMM is gone; the disk stays until the capsule is deleted.
        State::Failed | State::Stopped => Resources {
            vcpus: 0,
            memory_bytes: 0,
            disk_bytes: declared.disk_bytes,
        },
    }
}

const NOTHING: Resources = Resources {
    vcpus: 0,
    memory_bytes: 0,
    disk_bytes: 0,
};

/// `capacity` and `free` as `NodeInfo` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// What capsules may use together: the node's, or the VMM cap if lower.
    pub capacity: Resources,
    /// Capacity minus what the capsules hold, bounded by what the host
    /// really has left (memory available, disk free).
    pub free: Resources,
}

/// Capacity and free resources from the node's facts, the VMM cap and the
/// capsules' states and declared resources. Free memory also leaves room
/// for the next VMM's overhead, since a capsule asks only for guest RAM.
///
/// Disk is thin (sparse CoW): what a capsule already wrote is in the
/// filesystem's used space *and* in its declared size here, so free disk is
/// conservative by that much, never generous.
pub fn plan_offer(facts: &NodeFacts, cap: &VmmCap, capsules: &[(State, Resources)]) -> Offer {
    let capacity = Resources {
        vcpus: cap.vcpus.map_or(facts.vcpus, |c| c.min(facts.vcpus)),
        memory_bytes: cap
            .memory_bytes
            .map_or(facts.memory_total, |m| m.min(facts.memory_total)),
        disk_bytes: facts.disk_total,
    };
    let held = capsules
        .iter()
        .map(|(state, r)| held_by(*state, r))
        .fold(NOTHING, |a, b| Resources {
            vcpus: a.vcpus.saturating_add(b.vcpus),
            memory_bytes: a.memory_bytes.saturating_add(b.memory_bytes),
            disk_bytes: a.disk_bytes.saturating_add(b.disk_bytes),
        });
    let free = Resources {
        vcpus: capacity.vcpus.saturating_sub(held.vcpus),
        memory_bytes: capacity
            .memory_bytes
            .saturating_sub(held.memory_bytes)
            .saturating_sub(VMM_MEMORY_OVERHEAD_BYTES)
            .min(facts.memory_available),
        disk_bytes: facts.disk_free.saturating_sub(held.disk_bytes),
    };
    Offer { capacity, free }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn disk(dir: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_given_proc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cpuinfo"),
            "processor\t: 0\nmodel name\t: Test CPU @ 3GHz\n\nprocessor\t: 1\nmodel name\t: Test CPU @ 3GHz\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n",
        )
        .unwrap();
        let facts = read_facts(&NodePaths {
            proc: dir.path().to_path_buf(),
            kvm: dir.path().join("no-kvm"),
            state_dir: dir.path().to_path_buf(),
        });
        assert_eq!(facts.cpu_model, "Test CPU @ 3GHz");
        assert_eq!(facts.vcpus, 2);
        assert_eq!(facts.memory_total, 16384 * 1024);
        assert_eq!(facts.memory_available, 8192 * 1024);
        assert!(!facts.kvm);
        assert!(facts.disk_total >= facts.disk_free && facts.disk_total > 0);
    }

    const GI: u64 = 1 << 30;

    fn facts() -> NodeFacts {
        NodeFacts {
            vcpus: 16,
            memory_total: 64 * GI,
            memory_available: 60 * GI,
            disk_total: 500 * GI,
            disk_free: 400 * GI,
            ..NodeFacts::default()
        }
    }

    fn res(vcpus: u32, memory: u64, disk: u64) -> Resources {
        Resources {
            vcpus,
            memory_bytes: memory,
            disk_bytes: disk,
        }
    }

    #[test]
    fn free_subtracts_what_capsules_declare_not_what_they_touch() {
        // Two fresh 4 GiB guests have touched almost nothing (memory
        // available is still 60 GiB), yet both hold their full size.
        let cap = VmmCap {
            vcpus: Some(14),
            memory_bytes: Some(56 * GI),
        };
        let held = [
            (State::Running, res(2, 4 * GI, 10 * GI)),
            (State::Creating, res(4, 4 * GI, 10 * GI)),
        ];
        let offer = plan_offer(&facts(), &cap, &held);
        assert_eq!(offer.capacity, res(14, 56 * GI, 500 * GI));
        let ovh = VMM_MEMORY_OVERHEAD_BYTES;
        assert_eq!(offer.free.vcpus, 8);
        assert_eq!(offer.free.memory_bytes, 56 * GI - 8 * GI - 3 * ovh);
        assert_eq!(offer.free.disk_bytes, 380 * GI);
    }

    #[test]
    fn paused_keeps_memory_and_suspended_keeps_disk_and_its_memory_image() {
        let ovh = VMM_MEMORY_OVERHEAD_BYTES;
        assert_eq!(
            held_by(State::Paused, &res(2, 4 * GI, 10 * GI)),
            res(2, 4 * GI + ovh, 10 * GI)
        );
        assert_eq!(
            held_by(State::Suspended, &res(2, 4 * GI, 10 * GI)),
            res(0, 0, 14 * GI)
        );
        assert_eq!(
            held_by(State::Failed, &res(2, 4 * GI, 10 * GI)),
            res(0, 0, 10 * GI)
        );
        let offer = plan_offer(
            &facts(),
            &VmmCap::default(),
            &[
                (State::Suspended, res(8, 32 * GI, 100 * GI)),
                (State::Paused, res(8, 16 * GI, 0)),
            ],
        );
        // The suspended capsule's vCPUs and RAM are free again; its disk
        // and memory image are not. The paused one holds everything.
        assert_eq!(offer.free.vcpus, 8);
        assert_eq!(offer.free.memory_bytes, 64 * GI - 16 * GI - 2 * ovh);
        assert_eq!(offer.free.disk_bytes, 400 * GI - 132 * GI);
    }

    #[test]
    fn the_host_bounds_free_memory_and_a_full_node_offers_nothing() {
        let mut f = facts();
        // Something outside the capsules ate memory: free follows the host.
        f.memory_available = 3 * GI;
        let offer = plan_offer(&f, &VmmCap::default(), &[]);
        assert_eq!(offer.free.memory_bytes, 3 * GI);
        // Held beyond capacity (cap lowered under running capsules) floors at 0.
        let cap = VmmCap {
            vcpus: Some(2),
            memory_bytes: Some(GI),
        };
        let offer = plan_offer(&facts(), &cap, &[(State::Running, res(4, 4 * GI, 0))]);
        assert_eq!((offer.free.vcpus, offer.free.memory_bytes), (0, 0));
        // A cap above the node is the node.
        let big = VmmCap {
            vcpus: Some(64),
            memory_bytes: Some(1 << 50),
        };
        assert_eq!(
            plan_offer(&facts(), &big, &[]).capacity,
            res(16, 64 * GI, 500 * GI)
        );
    }

    #[test]
    fn the_quota_counts_images_snapshots_and_suspend_images_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let put = |rel: &str, len: usize| {
            let p = s.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![1u8; len]).unwrap();
            p
        };
        let before = quota_usage(s);
        put("images/sha256-ab/rootfs-1-g0.ext4", 1 << 20);
        let snap = put("snapshots/s1/disk.img", 1 << 20);
        put("capsules/c1/suspend/memory", 1 << 20);
        // A capsule's own disk and journal are not the quota's.
        put("disks/c1.cow", 4 << 20);
        put("capsules/c1/record.json", 1 << 20);
        // A base is a hard link to a snapshot disk: no new blocks.
        std::fs::create_dir_all(s.join("bases/s1.1")).unwrap();
        std::fs::hard_link(&snap, s.join("bases/s1.1/disk.img")).unwrap();
        let used = quota_usage(s) - before;
        assert!((3 << 20..(3 << 20) + (64 << 10)).contains(&used), "{used}");
        assert_eq!(plan_quota(Some(5), 1000), 5);
        assert_eq!(plan_quota(None, 1000), 800);
    }
}
