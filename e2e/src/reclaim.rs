//! Takes back what a node agent's capsules hold on the host when the agent
//! goes away for good with capsules left: a test that failed before it
//! deleted them, or the local run ending. Capsules outlive a stopped agent
//! by design, so nobody else would: their VMMs keep running in the agent's
//! cgroup parent and their network namespaces stay mounted in its netns
//! dir, which then cannot be removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What [`reclaim`] found and undid, for a line on stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Processes killed.
    pub killed: Vec<i32>,
    /// Mounts detached.
    pub unmounted: Vec<PathBuf>,
    /// Cgroups removed.
    pub cgroups: Vec<PathBuf>,
}

impl Reclaimed {
    /// Nothing was left.
    pub fn is_empty(&self) -> bool {
        *self == Reclaimed::default()
    }
}

/// Kills every process in `cgroup_parent` (each hierarchy under
/// `/sys/fs/cgroup`), removes its cgroups, and detaches every mount under
/// `dirs`. Call it after the agent stopped.
pub fn reclaim(cgroup_parent: &str, dirs: &[&Path]) -> Reclaimed {
    let mut done = Reclaimed::default();
    let roots = cgroup_roots(cgroup_parent);
    // On cgroup v1 a process is in every hierarchy: kill it once.
    let pids: std::collections::BTreeSet<i32> = roots
        .iter()
        .flat_map(|root| subtree(root))
        .flat_map(|cg| procs(&cg))
        .collect();
    for pid in pids {
        // A pid that exited meanwhile fails with ESRCH: fine.
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            done.killed.push(pid);
        }
    }
    // A killed process leaves its cgroup once it is reaped (QEMU's parent
    // is gone, so init reaps it at once).
    let deadline = Instant::now() + Duration::from_secs(5);
    for root in &roots {
        for cg in subtree(root).into_iter().rev() {
            while !procs(&cg).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if std::fs::remove_dir(&cg).is_ok() {
                done.cgroups.push(cg);
            }
        }
    }
    for mount in mounts_under(dirs) {
        if umount2(&mount, MntFlags::MNT_DETACH).is_ok() {
            done.unmounted.push(mount);
        }
    }
    done
}

/// `/sys/fs/cgroup/<parent>` on cgroup v2, `/sys/fs/cgroup/<ctl>/<parent>`
/// on v1, whichever exist.
fn cgroup_roots(parent: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.join(parent)];
    for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
        roots.push(entry.path().join(parent));
    }
    roots.retain(|p| p.join("cgroup.procs").exists());
    roots
}

/// `root` and every cgroup below it, parents before children.
fn subtree(root: &Path) -> Vec<PathBuf> {
    let mut all = vec![root.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        for entry in std::fs::read_dir(&all[i]).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() && !p.is_symlink() {
                all.push(p);
            }
        }
        i += 1;
    }
    all
}

fn procs(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Mount points at or below any of `dirs`, deepest first.
fn mounts_under(dirs: &[&Path]) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_read_back() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape(r"/tmp/x\134y"), r"/tmp/x\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/odd\9"), r"/odd\9");
    }
}
