//! The orphan sweep at the end of recovery: whatever no journal (and no
//! quarantined capsule) accounts for is removed and counted: slot claims,
//! namespaces, links, nftables tables and conntrack entries (`NetOps`),
//! disks (`BlockStore`), cgroups and what still runs in them, VMM runtime
//! dirs and unfinished snapshot staging dirs.

use std::collections::BTreeSet;
use std::path::Path;

use super::{OrphanReport, OrphanSweep};
use crate::capsule::steps::Ctx;
use crate::network::Teardown;
use crate::storage;
use crate::vmm::Machine;

/// Removes what is not `known` (capsules) or `live` (their VMs).
pub(super) async fn sweep_orphans<M: Machine + 'static>(
    cx: &Ctx<M>,
    sweep: &OrphanSweep,
    known: &BTreeSet<String>,
    live: &BTreeSet<String>,
    report: &mut OrphanReport,
) {
    // Network: claims first (the sweep keeps whatever is claimed).
    let net = cx.host().net.clone();
    let known_net = known.clone();
    let net_res = tokio::task::spawn_blocking(move || {
            let mut claims = 0;
            for c in net.claims() {
                if !known_net.contains(c.as_str()) {
                    match net.teardown(&c, Teardown::ReleaseSlot) {
                        Ok(()) => claims += 1,
                        Err(e) => tracing::warn!(capsule = %c, error = &e as &dyn std::error::Error, "remove an orphan network"),
                    }
                }
            }
            (claims, net.sweep())
        })
        .await;
    match net_res {
        Ok((claims, Ok(r))) => {
            report.slot_claims = claims;
            report.network = r;
        }
        Ok((claims, Err(e))) => {
            report.slot_claims = claims;
            tracing::warn!(error = &e as &dyn std::error::Error, "network sweep");
        }
        Err(_) => tracing::warn!("network sweep aborted"),
    }

    // Disks.
    let keep: Vec<storage::CapsuleId> = known
        .iter()
        .filter_map(|u| storage::CapsuleId::new(u).ok())
        .collect();
    let store = cx.host().store.clone();
    match tokio::task::spawn_blocking(move || store.sweep(&keep)).await {
        Ok(Ok(r)) => report.storage = r,
        Ok(Err(e)) => tracing::warn!(error = &e as &dyn std::error::Error, "disk sweep"),
        Err(_) => tracing::warn!("disk sweep aborted"),
    }

    // cgroups of no live VM, and whatever still runs in them.
    if let Some(root) = &sweep.cgroups {
        for name in root.list().unwrap_or_default() {
            if live.contains(&name) {
                continue;
            }
            let cg = root.open_capsule(&name);
            let pids = cg.pids().unwrap_or_default();
            for pid in &pids {
                // In our cgroup, so ours: no pid-reuse concern.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            report.processes += pids.len();
            if remove_cgroup(&cg).await {
                report.cgroups += 1;
            }
        }
    }

    // VMM runtime dirs of unknown capsules, unfinished snapshots. A
    // staging dir may be a quarantined capsule's snapshot in progress;
    // with any quarantined, unfinished snapshots stay too.
    let (vmm_root, snapshots_root) = (cx.layout().vmm_root(), cx.layout().snapshots_root());
    let snapshots = cx.quarantine().is_empty();
    let known = known.clone();
    match tokio::task::spawn_blocking(move || {
        let mut n = remove_children(&vmm_root, |n| !known.contains(n));
        if snapshots {
            n += remove_children(&snapshots_root, |n| {
                n.starts_with('.') || n.ends_with(".old")
            });
        }
        n
    })
    .await
    {
        Ok(n) => report.dirs += n,
        Err(_) => tracing::warn!("directory sweep aborted"),
    }
}

/// Removes a cgroup once its killed processes are gone (rmdir fails while
/// any remains).
async fn remove_cgroup(cg: &crate::vmm::cgroup::CapsuleCgroup) -> bool {
    for _ in 0..50 {
        if cg.remove().is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(dirs = ?cg.dirs(), "orphan cgroup still busy");
    false
}

fn remove_children(dir: &Path, pick: impl Fn(&str) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if pick(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}
