//! Spawn latency of the VMM spawn path versus a plain `fork` of a large
//! process. The agent is made large first (1 GiB allocated and touched),
//! because the cost of `fork` grows with the parent's page tables while the
//! `CLONE_VM | CLONE_VFORK` path does not copy them.
//!
//! Measured, median over 50 runs each, spawning `/bin/true`:
//! - `spawn_supervised`: cgroup create + limits, open netns, clone into the
//!   netns + new mount ns + fresh sysfs + cgroup join, exec (returns once
//!   the child has exec'd);
//! - `sys::spawn` bare: the same clone/exec without namespaces or cgroup;
//! - `std fork+exec`: `std::process::Command` forced onto its `fork` path
//!   (setting a uid does that) — what a `pre_exec`-based spawner costs;
//! - `std posix_spawn`: `Command` on its default (vfork-like) path, for
//!   reference; it cannot enter namespaces or cgroups.
//!
//! Needs root (netns and cgroups); prints why otherwise. Run with
//! `cargo bench -p wrenn-node-agent --bench vmm`.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/rss.rs"]
mod rss;

use rss::rss_kib;
use wrenn_node_agent::sys::process::{self as sys, Pidfd};
use wrenn_node_agent::vmm::cgroup::{CgroupLimits, CgroupRoot};
use wrenn_node_agent::vmm::process::{HostPaths, SpawnRequest, spawn_supervised};

const RUNS: usize = 50;
const BALLAST_BYTES: usize = 1 << 30;

fn main() {
    if let Err(why) = wrenn_testkit::need_root() {
        println!("vmm spawn bench skipped: {why}");
        return;
    }
    let cgroup_mount = Path::new("/sys/fs/cgroup");
    let parent = format!("wrenn-bench-{}", std::process::id());
    let cgroups = match CgroupRoot::detect(cgroup_mount, &parent) {
        Ok(c) => c,
        Err(e) => {
            println!("vmm spawn bench skipped: no cgroup mount ({e})");
            return;
        }
    };
    let netns_name = format!("wbench{}", std::process::id() % 100_000);
    let netns_ok = Command::new("ip")
        .args(["netns", "add", &netns_name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !netns_ok {
        println!("vmm spawn bench skipped: `ip netns add` failed");
        return;
    }
    let netns = Path::new("/run/netns").join(&netns_name);
    let state = std::env::temp_dir().join(format!("wrenn-bench-{}", std::process::id()));
    let paths = HostPaths {
        proc_root: "/proc".into(),
        state_dir: state.clone(),
        hidden: Vec::new(),
        devices: Vec::new(),
    };

    // Make the process large: 1 GiB, every page touched.
    let mut ballast = vec![0u8; BALLAST_BYTES];
    for i in (0..ballast.len()).step_by(4096) {
        ballast[i] = 1;
    }
    std::hint::black_box(&ballast);
    println!(
        "agent RSS with ballast: {} MiB; {RUNS} runs each, spawning /bin/true",
        rss_kib() / 1024
    );

    let true_bin = Path::new("/bin/true");
    let supervised = measure(|i| {
        let capsule = format!("b{i}");
        let t = Instant::now();
        let p = spawn_supervised(
            &paths,
            &cgroups,
            &SpawnRequest {
                capsule: &capsule,
                program: true_bin,
                args: vec![],
                netns: Some(&netns),
                limits: CgroupLimits::build_for_vm(1, 256 << 20),
                inherit: vec![],
                confine: Default::default(),
            },
        )
        .expect("spawn_supervised");
        let d = t.elapsed();
        reap(p.identity().pid);
        let cg = p.cgroup().clone();
        let _ = wrenn_testkit::wait_until(Duration::from_secs(5), "cgroup empty", || {
            cg.remove().map_err(|e| e.to_string())
        });
        d
    });

    // The parts of spawn_supervised, to see where the time goes.
    let netns_file = std::fs::File::open(&netns).expect("open netns");
    let ns_only = measure(|_| time_spawn(Some(std::os::fd::AsFd::as_fd(&netns_file)), true, &[]));
    let cgroup_only = measure(|i| {
        let name = format!("c{i}");
        let t = Instant::now();
        let cg = cgroups
            .ensure_capsule(&name, &CgroupLimits::build_for_vm(1, 256 << 20))
            .expect("cgroup");
        let d = t.elapsed();
        let _ = cg.remove();
        d
    });
    let join_cg = cgroups
        .ensure_capsule("join", &CgroupLimits::build_for_vm(1, 256 << 20))
        .expect("cgroup");
    let procs: Vec<std::fs::File> = join_cg
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .expect("cgroup.procs")
        })
        .collect();
    let procs_fds: Vec<_> = procs.iter().map(std::os::fd::AsFd::as_fd).collect();
    let join_only = measure(|_| time_spawn(None, false, &procs_fds));
    drop(procs_fds);
    drop(procs);
    let _ = wrenn_testkit::wait_until(Duration::from_secs(5), "cgroup empty", || {
        join_cg.remove().map_err(|e| e.to_string())
    });

    let bare = measure(|_| time_spawn(None, false, &[]));

    let forked = measure(|_| {
        let t = Instant::now();
        // A uid makes std use fork() + exec instead of posix_spawn.
        let mut child = Command::new(true_bin).uid(0).spawn().expect("fork+exec");
        let d = t.elapsed();
        let _ = child.wait();
        d
    });

    let posix_spawn = measure(|_| {
        let t = Instant::now();
        let mut child = Command::new(true_bin).spawn().expect("posix_spawn");
        let d = t.elapsed();
        let _ = child.wait();
        d
    });

    report(
        "spawn_supervised (netns + mount ns + sysfs + cgroup)",
        &supervised,
    );
    report(
        "  of which: clone into netns + mount ns + sysfs, exec",
        &ns_only,
    );
    report(
        "  of which: cgroup mkdir + limits (v1: cpu, memory, cpuacct)",
        &cgroup_only,
    );
    report(
        "  of which: clone + join cgroup (write cgroup.procs), exec",
        &join_only,
    );
    report("sys::spawn bare (clone VM|VFORK + exec)", &bare);
    report("std fork+exec (copies page tables)", &forked);
    report("std posix_spawn (reference, no ns/cgroup)", &posix_spawn);
    std::hint::black_box(&ballast);

    let _ = Command::new("ip")
        .args(["netns", "del", &netns_name])
        .status();
    for c in ["cpu", "memory", "cpuacct", ""] {
        let _ = std::fs::remove_dir(cgroup_mount.join(c).join(&parent));
    }
    let _ = std::fs::remove_dir_all(&state);
}

fn reap(pid: i32) {
    if let Ok(p) = Pidfd::open(pid) {
        let _ = wrenn_testkit::wait_until(Duration::from_secs(5), "exit", || {
            p.try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_string())
        });
    }
}

/// Times `sys::spawn` of `/bin/true` with these parts of a VMM's spawn,
/// then reaps it.
fn time_spawn(
    netns: Option<std::os::fd::BorrowedFd<'_>>,
    new_mount_ns_with_sysfs: bool,
    cgroup_procs: &[std::os::fd::BorrowedFd<'_>],
) -> Duration {
    let t = Instant::now();
    let pid = sys::spawn(&sys::SpawnPlan {
        program: Path::new("/bin/true"),
        args: &[] as &[&OsStr],
        env: &[],
        new_session: true,
        netns,
        new_mount_ns_with_sysfs,
        cgroup_procs,
        stdio: [None, None, None],
        inherit: &[],
        confine: None,
    })
    .expect("spawn");
    let d = t.elapsed();
    reap(pid);
    d
}

fn measure(mut f: impl FnMut(usize) -> Duration) -> Vec<Duration> {
    let _ = f(usize::MAX); // warm-up
    let mut v: Vec<Duration> = (0..RUNS).map(&mut f).collect();
    v.sort();
    v
}

fn report(what: &str, sorted: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what:<60} median {:>8.3} ms   min {:>8.3} ms   p90 {:>8.3} ms",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(sorted[sorted.len() * 9 / 10]),
    );
}
