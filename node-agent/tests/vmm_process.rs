//! Process supervision as root (Tier::Host): stand-in programs (`sleep`,
//! `sh`, a tiny Python API stub) go through the real spawn path into a
//! test-made network namespace and cgroup. Checks the namespaces, the
//! fresh sysfs, the cgroup limits, that the child outlives the process that
//! spawned it, adoption with the pid-reuse guard, and the crash watcher.
//! Everything is removed by guards, also when an assertion fails.
// Test helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wrenn_node_agent::sys::process::ExitStatus;
use wrenn_node_agent::vmm::cgroup::{
    CgroupLimits, CgroupRoot, CgroupVersion, VMM_MEMORY_OVERHEAD_BYTES,
};
use wrenn_node_agent::vmm::ch::{ChVersion, watch_exit};
use wrenn_node_agent::vmm::process::{
    HostPaths, ProcessIdentity, SpawnRequest, VmmExit, VmmProcess, spawn_supervised,
};
use wrenn_node_agent::vmm::{ChVmm, StartSpec};
use wrenn_testkit::{TestNetns, Tier, wait_until};

use cgroup_bed::{CGROUP_MOUNT, ProcessBed};

/// A unique cgroup parent and state dir; kills leftover processes and
/// removes both on drop.
struct Env {
    bed: ProcessBed,
    pids: std::cell::RefCell<Vec<i32>>,
}

impl Env {
    fn new() -> Self {
        Self {
            bed: ProcessBed::new("wrenn-test"),
            pids: Default::default(),
        }
    }

    fn track(&self, pid: i32) {
        self.pids.borrow_mut().push(pid);
    }

    fn spawn(
        &self,
        capsule: &str,
        program: &str,
        args: &[&str],
        netns: Option<&Path>,
    ) -> VmmProcess {
        let p = spawn_supervised(
            &self.bed.paths,
            &self.bed.cgroups,
            &SpawnRequest {
                capsule,
                program: Path::new(program),
                args: args.iter().map(OsString::from).collect(),
                netns,
                limits: CgroupLimits::build_for_vm(2, 256 << 20),
                inherit: vec![],
                confine: Default::default(),
            },
        )
        .unwrap();
        self.track(p.identity().pid);
        p
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.pids.borrow().iter() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid), None);
        }
        // Then `bed` kills whatever is left in its cgroups (e.g. spawned
        // by a helper that panicked before we learnt its pid) and removes
        // them.
    }
}

fn ns_inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn spawn_enters_netns_mount_ns_and_cgroup_with_limits() {
    let Some(_case) = cgroup_bed::host_case("vmm_spawn_netns_cgroup") else {
        return;
    };
    let env = Env::new();
    let netns = match TestNetns::new("wvt") {
        Ok(n) => n,
        Err(why) => {
            return wrenn_testkit::case(Tier::Host, "vmm_spawn_netns_cgroup/netns").skip(why);
        }
    };
    let out = env.bed.paths.state_dir.join("seen-links");
    let script = format!("ls /sys/class/net > {}; exec sleep 30", out.display());
    let p = env.spawn("c1", "/bin/sh", &["-c", &script], Some(&netns.path()));
    let pid = p.identity().pid;

    // Network namespace: the test-made one. Mount namespace: its own.
    wait_until(Duration::from_secs(5), "netns entered", || {
        (ns_inode(format!("/proc/{pid}/ns/net")) == ns_inode(netns.path()))
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .unwrap();
    assert_ne!(
        ns_inode(format!("/proc/{pid}/ns/mnt")),
        ns_inode("/proc/self/ns/mnt")
    );
    assert_ne!(
        ns_inode(format!("/proc/{pid}/ns/net")),
        ns_inode("/proc/self/ns/net")
    );

    // Fresh sysfs: the new netns has only `lo`.
    let links = wait_until(Duration::from_secs(5), "links listed", || {
        std::fs::read_to_string(&out)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or("no output yet".to_string())
    })
    .unwrap();
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        vec!["lo"],
        "sysfs shows the capsule netns"
    );

    // New session: it leads it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "session id is its own pid");

    // cgroup membership and limits.
    assert!(p.cgroup().pids().unwrap().contains(&pid));
    let cgroup_file = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = format!("/{}/c1", env.bed.parent);
    match env.bed.cgroups.version() {
        CgroupVersion::V1 => {
            assert!(
                cgroup_file
                    .lines()
                    .any(|l| l.contains(":memory:") && l.ends_with(&rel)),
                "{cgroup_file}"
            );
            assert!(
                cgroup_file
                    .lines()
                    .any(|l| l.contains("cpu") && l.ends_with(&rel)),
                "{cgroup_file}"
            );
            let dirs = p.cgroup().dirs();
            let quota = std::fs::read_to_string(dirs[0].join("cpu.cfs_quota_us")).unwrap();
            assert_eq!(quota.trim(), "200000");
            let mem = std::fs::read_to_string(dirs[1].join("memory.limit_in_bytes")).unwrap();
            assert_eq!(
                mem.trim(),
                ((256u64 << 20) + VMM_MEMORY_OVERHEAD_BYTES).to_string()
            );
        }
        CgroupVersion::V2 => {
            assert!(
                cgroup_file.lines().any(|l| l == format!("0::{rel}")),
                "{cgroup_file}"
            );
            let dir = &p.cgroup().dirs()[0];
            assert_eq!(
                std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
                "200000 100000"
            );
        }
    }

    // Usage is readable for metrics (v1: from cpuacct where it is separate).
    p.cgroup().cpu_usage_ns().unwrap();
    assert!(p.cgroup().memory_bytes().unwrap() > 0);

    // Stopping removes the cgroup.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(p.stop(Duration::from_secs(5))).unwrap();
    assert_eq!(
        status,
        ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
    assert!(p.cgroup().dirs().iter().all(|d| !d.exists()));
}

/// Spawner half of `child_outlives_its_spawner`: run in a child process of
/// the test binary, spawns `sleep` through the real path, prints its
/// identity and exits at once, like an agent that dies.
#[test]
#[ignore = "helper: run by child_outlives_its_spawner in a separate process"]
fn spawner_helper() {
    let Ok(state) = std::env::var("WRENN_VMM_SPAWNER_STATE") else {
        return;
    };
    let parent = std::env::var("WRENN_VMM_SPAWNER_CGROUP").unwrap();
    let netns = std::env::var("WRENN_VMM_SPAWNER_NETNS").unwrap();
    let cgroups = CgroupRoot::detect(Path::new(CGROUP_MOUNT), &parent).unwrap();
    let paths = HostPaths {
        proc_root: "/proc".into(),
        state_dir: state.into(),
        hidden: Vec::new(),
        devices: Vec::new(),
    };
    let p = spawn_supervised(
        &paths,
        &cgroups,
        &SpawnRequest {
            capsule: "orphan",
            program: Path::new("/bin/sleep"),
            args: vec!["60".into()],
            netns: Some(Path::new(&netns)),
            limits: CgroupLimits::build_for_vm(1, 64 << 20),
            inherit: vec![],
            confine: Default::default(),
        },
    )
    .unwrap();
    let id = p.identity();
    println!("SPAWNED {} {}", id.pid, id.start_time_ticks);
    std::process::exit(0);
}

#[test]
fn child_outlives_its_spawner_and_is_adopted() {
    let Some(_case) = cgroup_bed::host_case("vmm_child_outlives_spawner") else {
        return;
    };
    let env = Env::new();
    let netns = match TestNetns::new("wvt") {
        Ok(n) => n,
        Err(why) => {
            return wrenn_testkit::case(Tier::Host, "vmm_child_outlives_spawner/netns").skip(why);
        }
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "spawner_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WRENN_VMM_SPAWNER_STATE", &env.bed.paths.state_dir)
        .env("WRENN_VMM_SPAWNER_CGROUP", &env.bed.parent)
        .env("WRENN_VMM_SPAWNER_NETNS", netns.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split("SPAWNED ").nth(1))
        .unwrap_or_else(|| {
            panic!(
                "spawner printed no pid: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut it = line.split_whitespace();
    let identity = ProcessIdentity {
        pid: it.next().unwrap().parse().unwrap(),
        start_time_ticks: it.next().unwrap().parse().unwrap(),
    };
    env.track(identity.pid);
    assert!(out.status.success(), "spawner exited with {:?}", out.status);

    // The spawner is gone; the VMM stand-in runs on, reparented.
    let status = std::fs::read_to_string(format!("/proc/{}/status", identity.pid)).unwrap();
    assert!(!status.contains("State:\tZ"), "{status}");
    assert_ne!(
        ns_inode(format!("/proc/{}/ns/net", identity.pid)),
        ns_inode("/proc/self/ns/net")
    );

    // A wrong start time (pid reuse) is refused; the right one adopts.
    let wrong = ProcessIdentity {
        start_time_ticks: identity.start_time_ticks + 1,
        ..identity
    };
    assert!(matches!(
        VmmProcess::adopt(&env.bed.paths, &env.bed.cgroups, "orphan", wrong),
        Err(wrenn_node_agent::vmm::Error::AdoptVmm { .. })
    ));
    let adopted = VmmProcess::adopt(&env.bed.paths, &env.bed.cgroups, "orphan", identity).unwrap();
    assert!(adopted.cgroup().pids().unwrap().contains(&identity.pid));

    // Not our child: the exit is seen through the pidfd, status unknown.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(adopted.stop(Duration::from_secs(5))).unwrap();
    assert_eq!(status, ExitStatus::Unknown);
    assert!(adopted.cgroup().dirs().iter().all(|d| !d.exists()));
}

#[test]
fn crash_watcher_tells_exit_code_signal_poweroff_and_requested_stop() {
    let Some(_case) = cgroup_bed::host_case("vmm_crash_watcher") else {
        return;
    };
    let env = Env::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = env.bed.paths.state_dir.join("events.json");

    // Non-zero exit: a crash with its code.
    let p = env.spawn("exit3", "/bin/sh", &["-c", "exit 3"], None);
    let exit = rt.block_on(watch_exit(&p, &events)).unwrap();
    assert_eq!(exit, VmmExit::Crashed(ExitStatus::Exited(3)));

    // Killed by a signal nobody asked for: a crash with the signal.
    let p = env.spawn("killed", "/bin/sleep", &["30"], None);
    p.signal(libc::SIGKILL).unwrap();
    let exit = rt.block_on(watch_exit(&p, &events)).unwrap();
    assert_eq!(
        exit,
        VmmExit::Crashed(ExitStatus::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false
        })
    );

    // Guest poweroff: CH writes vmm/shutdown and exits 0.
    let shutdown_event = "{\n  \"timestamp\": {\n    \"secs\": 1,\n    \"nanos\": 0\n  },\n  \"source\": \"vmm\",\n  \"event\": \"shutdown\",\n  \"properties\": null\n}\n\n";
    let script = format!(
        "printf '%s' '{shutdown_event}' >> {}; exit 0",
        events.display()
    );
    let p = env.spawn("poweroff", "/bin/sh", &["-c", &script], None);
    let exit = rt.block_on(watch_exit(&p, &events)).unwrap();
    assert_eq!(exit, VmmExit::GuestPoweroff);

    // Requested stop: not a crash even though it died by SIGTERM.
    let p = env.spawn("stopped", "/bin/sleep", &["30"], None);
    p.mark_stop_requested();
    p.signal(libc::SIGTERM).unwrap();
    let exit = rt.block_on(watch_exit(&p, &events)).unwrap();
    assert_eq!(exit, VmmExit::Requested);
}

/// A stand-in for cloud-hypervisor that serves `vmm.ping` and
/// `vmm.shutdown` on the listening fd passed as `--api-socket fd=N`.
const API_STUB: &str = concat!(
    include_str!("data/ch/stub_api.py"),
    r#"ev = flag("--event-monitor")
for conn, method, ep, body in requests():
    if ep == "vmm.ping":
        reply(conn, 200, ('{"build_version":"v53.0-stub","version":"54.0.0","pid":%d,"features":[]}' % os.getpid()).encode())
    elif ep == "vmm.shutdown":
        with open(ev, "a") as f:
            f.write('{\n  "timestamp": {\n    "secs": 0,\n    "nanos": 1\n  },\n  "source": "vmm",\n  "event": "shutdown",\n  "properties": null\n}\n\n')
        reply(conn, 200)
        sys.exit(0)
    else:
        reply(conn, 404, b'["Not Found"]')
"#
);

#[test]
fn ch_vmm_start_passes_the_api_listener_and_stops_in_order() {
    let Some(case) = cgroup_bed::host_case("vmm_chvmm_start_stub") else {
        return;
    };
    if let Err(why) = wrenn_testkit::need_program("python3") {
        return case.skip(format!("the API stub {why}"));
    }
    let env = Env::new();
    let netns = match TestNetns::new("wvt") {
        Ok(n) => n,
        Err(why) => return case.skip(why),
    };
    let stub = env.bed.paths.state_dir.join("ch-stub");
    std::fs::write(&stub, API_STUB).unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let rt = wrenn_testkit::runtime();
    rt.block_on(async {
        let version = ChVersion::detect(&stub, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(version.major, 53);
        let vmm = ChVmm::with_version(
            &stub,
            version,
            env.bed.paths.clone(),
            env.bed.cgroups.clone(),
        );
        let spec = StartSpec {
            capsule: "stub1".into(),
            netns: Some(netns.path()),
            limits: CgroupLimits::build_for_vm(1, 128 << 20),
            memory_bytes: 128 << 20,
            confine: Default::default(),
        };
        let started = std::time::Instant::now();
        let vm = vmm.start(&spec).await.unwrap();
        eprintln!("start → first ping answered: {:?}", started.elapsed());
        env.track(vm.process.pid);
        let ping = vmm.ping(&vm).await.unwrap();
        assert_eq!(
            ping.pid,
            Some(i64::from(vm.process.pid)),
            "the spawned pid is the API server"
        );
        assert_eq!(
            ns_inode(format!("/proc/{}/ns/net", vm.process.pid)),
            ns_inode(netns.path())
        );
        // An unsupported route maps to its kind.
        let err = vmm.pause(&vm).await.unwrap_err();
        assert_eq!(
            err.api_kind(),
            Some(wrenn_node_agent::vmm::ch::ErrorKind::UnsupportedEndpoint)
        );
        // Orderly stop: vmm.shutdown, exit 0, cgroup removed.
        let watcher = {
            let exit = vmm.wait_exit(&vm);
            let stop = vmm.stop(&vm);
            let (exit, stop) = tokio::join!(exit, stop);
            stop.unwrap();
            exit.unwrap()
        };
        assert_eq!(watcher, VmmExit::Requested);
        assert!(env.bed.cgroups.list().unwrap().is_empty());
    });
}
