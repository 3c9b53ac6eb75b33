//! Facts about this node for `NodeInfo`: CPU model, capacity, free memory
//! and disk, whether KVM is usable, and what the agent's own files (image
//! cache, snapshots, suspend images) hold against the node's disk quota.
//! Host paths are passed in so tests read a fake `/proc`.

use std::path::{Path, PathBuf};

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
