//! The cgroup side of the host-tier beds (`metrics_proc`, `vmm_process`,
//! `vmm_confine`, `vmm_ch_machine`, `supervisor_host`): a case that skips
//! without root or a cgroup mount, and the cleanup each bed runs on drop,
//! also after a failed assertion: kill what is left in every capsule
//! cgroup under the test's own parent, remove them, then the parent.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use wrenn_node_agent::vmm::cgroup::{CgroupRoot, CgroupVersion};
use wrenn_node_agent::vmm::process::HostPaths;
use wrenn_testkit::{Case, Tier, unique_name, wait_until};

/// Where the host mounts its cgroups.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// The v1 controllers a parent may have been made in (a missing one is
/// passed over).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "memory", "cpuacct", "pids", "blkio"];

/// A host-tier case, or `None` once it is recorded as skipped for want of
/// root or a cgroup mount.
pub fn host_case(name: &str) -> Option<Case> {
    let case = wrenn_testkit::case(Tier::Host, name);
    if let Err(why) = wrenn_testkit::need_root() {
        case.skip(why);
        return None;
    }
    if let Err(why) = CgroupRoot::detect(Path::new(CGROUP_MOUNT), "wrenn") {
        case.skip(format!("needs a cgroup mount: {why}"));
        return None;
    }
    Some(case)
}

/// The test parent's directory in `controller` (v1) or the unified one.
pub fn parent_dir(root: &CgroupRoot, parent: &str, controller: &str) -> PathBuf {
    match root.version() {
        CgroupVersion::V1 => Path::new(CGROUP_MOUNT).join(controller).join(parent),
        CgroupVersion::V2 => Path::new(CGROUP_MOUNT).join(parent),
    }
}

/// Kills every process left in the capsule cgroups under `root`, removes
/// them (retrying while the kernel still counts the dying ones) and then
/// the test's `parent` in every controller.
pub fn remove_test_cgroups(root: &CgroupRoot, parent: &str) {
    for name in root.list().unwrap_or_default() {
        let cg = root.open_capsule(&name);
        for pid in cg.pids().unwrap_or_default() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let _ = wait_until(Duration::from_secs(10), "capsule cgroup empty", || {
            cg.remove().map_err(|e| e.to_string())
        });
    }
    for c in V1_CONTROLLERS {
        let _ = std::fs::remove_dir(parent_dir(root, parent, c));
    }
}

/// A unique cgroup parent and the host paths `spawn_supervised` takes,
/// with a temp state dir; removes the cgroups it made on drop.
pub struct ProcessBed {
    pub cgroups: CgroupRoot,
    pub parent: String,
    pub paths: HostPaths,
    _state: tempfile::TempDir,
}

impl ProcessBed {
    /// `prefix` names the parent (`<prefix>-<pid>-<n>`).
    pub fn new(prefix: &str) -> Self {
        let parent = unique_name(prefix);
        let state = tempfile::tempdir().unwrap();
        Self {
            cgroups: CgroupRoot::detect(Path::new(CGROUP_MOUNT), &parent).unwrap(),
            paths: HostPaths {
                proc_root: "/proc".into(),
                state_dir: state.path().to_path_buf(),
                hidden: Vec::new(),
                devices: Vec::new(),
            },
            parent,
            _state: state,
        }
    }
}

impl Drop for ProcessBed {
    fn drop(&mut self) {
        remove_test_cgroups(&self.cgroups, &self.parent);
    }
}
