//! VMM confinement and the VMM cgroup cap, attacked for real (Tier::Host).
//!
//! A shell script stands in for a compromised VMM: it is started through
//! the agent's spawn path (`spawn_supervised`) with the production view
//! (`HostPaths::confined`: the state root, `/dev` and the cgroup mount
//! hidden) and tries what a VMM running as the agent's uid could try: read
//! another capsule's files, lift the hiding mount, mount cgroupfs, move
//! itself out of its cgroup, raise the parent's limits, outgrow them. Each
//! attempt's exit status and output are written to its own directory (the
//! only writable place it sees) and checked here, together with the
//! process's credentials from the host's `/proc/<pid>/status` and the
//! node's state afterwards. Everything is removed by guards.
// Test helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wrenn_node_agent::vmm::cgroup::{
    CgroupLimits, CgroupRoot, CgroupVersion, IoLimit, ParentLimits,
};
use wrenn_node_agent::vmm::process::{
    Confine, HostPaths, SpawnRequest, VmmProcess, spawn_supervised,
};
use wrenn_testkit::{Tier, unique_name, wait_until};

use cgroup_bed::CGROUP_MOUNT;
const SECRET: &str = "victim-secret-4711";

/// A unique VMM parent cgroup; kills what is left in it and removes it on
/// drop, also when an assertion failed.
struct Parent {
    name: String,
    root: CgroupRoot,
}

impl Parent {
    fn new() -> Self {
        let name = unique_name("wrenn-confine");
        let root = CgroupRoot::detect(Path::new(CGROUP_MOUNT), &name).unwrap();
        Self { name, root }
    }

    /// The parent's directory in `controller` (v1) or the unified one.
    fn dir(&self, controller: &str) -> PathBuf {
        cgroup_bed::parent_dir(&self.root, &self.name, controller)
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        cgroup_bed::remove_test_cgroups(&self.root, &self.name);
    }
}

/// A state root with a victim capsule's files next to the attacker's own
/// directory, laid out as the agent lays them out.
struct StateRoot {
    dir: tempfile::TempDir,
}

impl StateRoot {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "vmm/victim",
            "vmm/attacker",
            "capsules/victim",
            "snapshots/s1",
            "disks",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "vmm/victim/console.log",
            "capsules/victim/record.json",
            "snapshots/s1/memory.qemu",
            "disks/victim.qcow2",
        ] {
            std::fs::write(root.join(f), SECRET).unwrap();
        }
        Self { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn paths(&self) -> HostPaths {
        HostPaths::confined("/proc".into(), self.root().join("vmm"), self.root())
    }

    fn own(&self) -> PathBuf {
        self.root().join("vmm/attacker")
    }

    /// The victim's files as the host sees them, to prove nothing changed.
    fn victim_files(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for f in [
            "vmm/victim/console.log",
            "capsules/victim/record.json",
            "snapshots/s1/memory.qemu",
            "disks/victim.qcow2",
        ] {
            let p = self.root().join(f);
            out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
        }
        out
    }
}

/// Starts `script` as the attacker capsule's "VMM" with the production
/// confinement (own PID namespace, no capabilities).
fn spawn_attacker(
    state: &StateRoot,
    parent: &Parent,
    script: &str,
    limits: CgroupLimits,
) -> VmmProcess {
    spawn_supervised(
        &state.paths(),
        &parent.root,
        &SpawnRequest {
            capsule: "attacker",
            program: Path::new("/bin/sh"),
            args: vec![OsString::from("-c"), OsString::from(script)],
            netns: None,
            limits,
            inherit: Vec::new(),
            confine: Confine {
                new_pid_ns: true,
                show: Vec::new(),
                keep_caps: Vec::new(),
            },
        },
    )
    .unwrap()
}

/// Runs `cmd` in the script and records `<name>: <exit status>` plus its
/// output in `<own>/results`.
fn attempt(name: &str, cmd: &str) -> String {
    // Unquoted `$out` joins the output's lines with spaces.
    format!("out=$({cmd} 2>&1); rc=$?; echo \"{name}: $rc\" $out >> \"$OWN/results\"\n")
}

/// Runs `script` as the attacker under `limits` until it reports done: the
/// process (still running) and the attempts' results.
fn attack(
    state: &StateRoot,
    parent: &Parent,
    script: &str,
    limits: CgroupLimits,
) -> (VmmProcess, Vec<(String, i32, String)>) {
    let p = spawn_attacker(state, parent, script, limits);
    let results = wait_done(&state.own());
    (p, results)
}

fn wait_done(own: &Path) -> Vec<(String, i32, String)> {
    wait_until(Duration::from_secs(60), "attack script done", || {
        own.join("done")
            .exists()
            .then_some(())
            .ok_or("running".to_string())
    })
    .unwrap();
    std::fs::read_to_string(own.join("results"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(": ")?;
            let (code, out) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((name.to_string(), code.parse().ok()?, out.to_string()))
        })
        .collect()
}

fn result<'a>(all: &'a [(String, i32, String)], name: &str) -> &'a (String, i32, String) {
    all.iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no result for {name}: {all:?}"))
}

/// Asserts that every attempt in `names` failed; their outputs.
#[track_caller]
fn assert_failed<'a>(all: &'a [(String, i32, String)], names: &[&str]) -> Vec<&'a str> {
    let mut outs = Vec::new();
    for name in names {
        let (_, code, out) = result(all, name);
        assert_ne!(*code, 0, "{name} succeeded: {out}");
        outs.push(out.as_str());
    }
    outs
}

/// Stops the attacker (the test is sync; the stop is async).
fn stop(p: VmmProcess, grace: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(p.stop(grace)).unwrap();
}

fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in status"))
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_vmm_sees_only_its_own_capsule_and_holds_no_privilege() {
    let Some(_case) = cgroup_bed::host_case("vmm_confine_view_and_privileges") else {
        return;
    };
    let parent = Parent::new();
    let state = StateRoot::new();
    let root = state.root().display().to_string();
    let before = state.victim_files();
    let mounts_before = mount_count();
    // The test process's own pid, as an attacker would learn it from a
    // host-wide /proc: its /proc/<pid>/root is the host's view.
    let host_pid = std::process::id();
    let mut script = format!("OWN={}\n", state.own().display());
    for (name, cmd) in [
        (
            "read-victim-console",
            format!("cat {root}/vmm/victim/console.log"),
        ),
        (
            "read-victim-record",
            format!("cat {root}/capsules/victim/record.json"),
        ),
        (
            "read-snapshot",
            format!("cat {root}/snapshots/s1/memory.qemu"),
        ),
        ("read-victim-disk", format!("cat {root}/disks/victim.qcow2")),
        ("list-vmm-dir", format!("ls {root}/vmm")),
        ("list-state-root", format!("ls -A {root}")),
        (
            "via-host-proc-root",
            format!("cat /proc/{host_pid}/root{root}/vmm/victim/console.log"),
        ),
        (
            "via-proc-1-root",
            format!("cat /proc/1/root{root}/vmm/victim/console.log"),
        ),
        ("lift-the-hiding-mount", format!("umount -l {root}")),
        (
            "mount-over-own",
            format!("mount -t tmpfs x {root}/vmm/attacker"),
        ),
        ("write-hidden-root", format!("touch {root}/planted")),
        ("list-dev", "ls /dev".to_string()),
        (
            "write-own",
            format!("echo mine > {root}/vmm/attacker/own-file"),
        ),
    ] {
        script.push_str(&attempt(name, &cmd));
    }
    script.push_str("touch \"$OWN/done\"; exec sleep 60\n");
    let limits = CgroupLimits::build_for_vm(1, 128 << 20);
    let (p, results) = attack(&state, &parent, &script, limits);
    let pid = p.identity().pid;

    let escapes = [
        "read-victim-console",
        "read-victim-record",
        "read-snapshot",
        "read-victim-disk",
        "via-host-proc-root",
        "via-proc-1-root",
        "lift-the-hiding-mount",
        "mount-over-own",
        "write-hidden-root",
    ];
    let outs = assert_failed(&results, &escapes);
    for (name, out) in escapes.iter().zip(outs) {
        assert!(!out.contains(SECRET), "{name} read the secret: {out}");
    }
    // It sees its own directory and nothing else of the state root.
    assert_eq!(result(&results, "list-vmm-dir").2, "attacker");
    assert_eq!(result(&results, "list-state-root").2, "vmm");
    assert_eq!(result(&results, "write-own").1, 0);
    assert_eq!(
        std::fs::read_to_string(state.own().join("own-file")).unwrap(),
        "mine\n"
    );
    // Only the device nodes it needs.
    let devs: Vec<&str> = result(&results, "list-dev").2.split_whitespace().collect();
    assert!(devs.contains(&"null"), "{devs:?}");
    for forbidden in ["mem", "kmsg", "mapper", "loop0", "sda", "vda"] {
        assert!(
            !devs.contains(&forbidden),
            "/dev/{forbidden} visible: {devs:?}"
        );
    }

    // Credentials, as the host sees them.
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    assert_eq!(status_field(pid, "CapAmb"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its own PID namespace, in which it is init.
    let ns = |p: String| std::fs::metadata(p).unwrap().ino();
    assert_ne!(
        ns(format!("/proc/{pid}/ns/pid")),
        ns("/proc/self/ns/pid".into())
    );
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1")
    );

    // Nothing on the node changed: the victim's files, the host's mounts,
    // nothing planted in the state root.
    assert_eq!(state.victim_files(), before);
    assert!(!state.root().join("planted").exists());
    assert_eq!(mount_count(), mounts_before);
    stop(p, Duration::from_secs(1));
}

#[test]
fn a_capsule_cannot_leave_or_raise_the_vmm_cgroup_cap() {
    let Some(_case) = cgroup_bed::host_case("vmm_cgroup_escape") else {
        return;
    };
    let parent = Parent::new();
    let v1 = parent.root.version() == CgroupVersion::V1;
    // The cap: one CPU, 96 MiB, 24 tasks for all VMMs together.
    let cap = ParentLimits {
        cpu_quota_us: Some(100_000),
        memory_bytes: Some(96 << 20),
        pids: Some(24),
        io: None::<IoLimit>,
    };
    let applied = parent.root.ensure_parent(&cap).unwrap();
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap().trim().to_string();
    if v1 {
        assert_eq!(read(parent.dir("cpu").join("cpu.cfs_quota_us")), "100000");
        assert_eq!(
            read(parent.dir("memory").join("memory.limit_in_bytes")),
            (96u64 << 20).to_string()
        );
    } else {
        assert_eq!(read(parent.dir("").join("cpu.max")), "100000 100000");
        assert_eq!(
            read(parent.dir("").join("memory.max")),
            (96u64 << 20).to_string()
        );
    }
    let pids_enforced = !applied.unsupported.contains(&"pids");
    if pids_enforced {
        assert_eq!(read(parent.dir("pids").join("pids.max")), "24");
    } else {
        wrenn_testkit::case(Tier::Host, "vmm_cgroup_escape/pids")
            .skip("the host has no pids controller");
    }
    let state = StateRoot::new();
    let mem_dir = parent.dir("memory");
    let parent_limit_file = if v1 {
        mem_dir.join("memory.limit_in_bytes")
    } else {
        mem_dir.join("memory.max")
    };
    let limit_before = read(parent_limit_file.clone());
    let root_procs = if v1 {
        Path::new(CGROUP_MOUNT).join("memory/cgroup.procs")
    } else {
        Path::new(CGROUP_MOUNT).join("cgroup.procs")
    };
    let release_agent = Path::new(CGROUP_MOUNT).join("memory/release_agent");
    let own = state.own();
    let mut script = format!("OWN={}\n", own.display());
    for (name, cmd) in [
        // Move itself to the root cgroup: out of every cap.
        (
            "join-root-cgroup",
            format!("echo 1 > {}", root_procs.display()),
        ),
        // Lift the parent's cap from inside.
        (
            "raise-parent-limit",
            format!("echo -1 > {}", parent_limit_file.display()),
        ),
        // CVE-2022-0492: a release agent runs as root in the host.
        (
            "set-release-agent",
            format!("echo /bin/sh > {}", release_agent.display()),
        ),
        // Bring its own cgroupfs.
        (
            "mount-cgroupfs",
            "mkdir -p $OWN/cg && mount -t cgroup -o memory cgroup $OWN/cg".to_string(),
        ),
        (
            "mount-cgroup2",
            "mkdir -p $OWN/cg2 && mount -t cgroup2 none $OWN/cg2".to_string(),
        ),
        // Outgrow the cap: its own limit allows 1 GiB, the parent 96 MiB.
        // `tail` keeps a newline-free line whole in memory.
        (
            "outgrow-memory",
            "head -c 300m /dev/zero | tail -n 1 | wc -c".to_string(),
        ),
    ] {
        script.push_str(&attempt(name, &cmd));
    }
    // Last, fork as much as it can (in a child shell, which may die when a
    // fork fails; the sleeps it started stay), then idle.
    script.push_str("touch \"$OWN/done\"\n");
    script
        .push_str("sh -c 'i=0; while [ $i -lt 60 ]; do sleep 60 & i=$((i+1)); done; sleep 60' &\n");
    script.push_str("exec sleep 60\n");
    // The capsule's own limits are far above the parent's cap.
    let limits = CgroupLimits::build_for_vm(1, 1 << 30);
    let (p, results) = attack(&state, &parent, &script, limits);
    let pid = p.identity().pid;

    assert_failed(
        &results,
        &[
            "join-root-cgroup",
            "raise-parent-limit",
            "set-release-agent",
            "mount-cgroupfs",
            "mount-cgroup2",
        ],
    );
    // The allocation died at the parent's cap (SIGKILL from the OOM
    // killer: the pipeline reports tail's failure as no output).
    let (_, _, grown) = result(&results, "outgrow-memory");
    assert_eq!(grown.trim(), "0", "300 MiB fit under a 96 MiB cap: {grown}");

    // From the host: still in its capsule cgroup, parent cap unchanged,
    // not in the root cgroup, no release agent.
    let cgroup_file = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory_line = cgroup_file
        .lines()
        .find(|l| {
            if v1 {
                l.contains(":memory:")
            } else {
                l.starts_with("0::")
            }
        })
        .unwrap();
    assert!(
        memory_line.ends_with(&format!("/{}/attacker", parent.name)),
        "{memory_line}"
    );
    assert_eq!(read(parent_limit_file), limit_before);
    assert!(!read(root_procs).lines().any(|l| l == pid.to_string()));
    if v1 {
        assert_ne!(read(release_agent.clone()), "/bin/sh");
    }
    if pids_enforced {
        // The fork loop ran up to the cap and no further.
        let capsule = parent.root.open_capsule("attacker");
        wait_until(Duration::from_secs(20), "forks up to the cap", || {
            let n = capsule.pids().map_err(|e| e.to_string())?.len();
            (n >= 20).then_some(n).ok_or(format!("{n} tasks"))
        })
        .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let tasks = capsule.pids().unwrap().len();
        assert!(tasks <= 24, "{tasks} processes under a cap of 24");
    }
    stop(p, Duration::from_secs(1));
}

#[test]
fn qemu_runs_under_its_own_seccomp_filter_inside_the_confinement() {
    let Some(case) = cgroup_bed::host_case("vmm_confine_qemu_sandbox") else {
        return;
    };
    let qemu = match wrenn_testkit::need_program("qemu-system-x86_64") {
        Ok(q) => q,
        Err(why) => return case.skip(why),
    };
    let parent = Parent::new();
    let state = StateRoot::new();
    let qmp = state.own().join("qmp.sock");
    let args: Vec<OsString> = [
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-sandbox",
        wrenn_node_agent::vmm::qemu::SANDBOX,
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let p = spawn_supervised(
        &state.paths(),
        &parent.root,
        &SpawnRequest {
            capsule: "attacker",
            program: &qemu,
            args,
            netns: None,
            limits: CgroupLimits::build_for_vm(1, 256 << 20),
            inherit: Vec::new(),
            confine: Confine {
                new_pid_ns: true,
                show: Vec::new(),
                keep_caps: Vec::new(),
            },
        },
    )
    .unwrap();
    let pid = p.identity().pid;
    let log = state.own().join("vmm.log");
    wait_until(Duration::from_secs(20), "QMP socket", || {
        if let Some(status) = p.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "QEMU exited {status:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        qmp.exists().then_some(()).ok_or("not yet".to_string())
    })
    .unwrap();
    // It stays up under the filter (a denied syscall at start-up would kill it).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.try_wait().unwrap().is_none(),
        "QEMU died under its sandbox"
    );
    // Every thread is filtered (mode 2) and unprivileged.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = task.unwrap().file_name().to_string_lossy().parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "thread {tid}: {status}"
        );
    }
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    stop(p, Duration::from_secs(5));
}
