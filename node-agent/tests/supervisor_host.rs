//! The supervisor as root on this host (Tier::Host), with everything real
//! but the guest: capsule networks from `LinuxNet` (netns, veth, TAP,
//! nftables) in a test-made node namespace, qcow2 disks from `Qcow2Store`,
//! cgroups, and a VMM stand-in — `sleep` started through the real
//! `vmm::process` spawn path, paused with SIGSTOP — behind the `Machine`
//! trait. An "agent restart" drops the tokio runtime and every in-memory
//! structure and builds new ones from the journal.
//!
//! Why this file is long: five host-tier scenarios over one real network, disk
//! and cgroup bed.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod network_env;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use network_env::Bed as NetBed;
use wrenn_crds::reason::Reason;
use wrenn_node_agent::capsule::{
    BootSource, CapsuleSpec, Egress, Host, HostFigures, Resources, State, Supervisor,
    SupervisorConfig, TemplateDisk,
};
use wrenn_node_agent::capsule::{OrphanSweep, RecoveryReport, VmHeld};
use wrenn_node_agent::metrics::sampler;
use wrenn_node_agent::network::{CapsuleId as NetId, EgressPolicy, LinuxNet, NetOps};
use wrenn_node_agent::storage::{BlockStore, DiskRequest, Qcow2Store, StorageConfig};
use wrenn_node_agent::vmm::cgroup::CgroupRoot;
use wrenn_node_agent::vmm::process::{
    HostPaths, ProcessIdentity, SpawnRequest, VmmExit, VmmProcess, spawn_supervised,
};
use wrenn_node_agent::vmm::{
    BackendInfo, BackendKind, Error, Machine, MachineHandle, MachineSpec, MachineState, NetCounters,
};
use wrenn_testkit::{process_alive, process_state, runtime, unique_name};

use cgroup_bed::CGROUP_MOUNT;

/// A VMM stand-in: `sleep` in the capsule's netns and cgroup. Pause is
/// SIGSTOP, a snapshot a file, restore a fresh process.
#[derive(Debug)]
struct ProcessMachine {
    paths: HostPaths,
    cgroups: CgroupRoot,
    procs: Mutex<HashMap<String, Arc<VmmProcess>>>,
    /// Launch spawns, then never returns: a create the agent dies in.
    hang_after_spawn: bool,
}

impl ProcessMachine {
    fn new(paths: HostPaths, cgroups: CgroupRoot) -> Self {
        Self {
            paths,
            cgroups,
            procs: Mutex::new(HashMap::new()),
            hang_after_spawn: false,
        }
    }

    fn spawn(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        let p = spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule: &spec.capsule,
                program: Path::new("/bin/sleep"),
                args: vec![OsString::from("3600")],
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: vec![],
                confine: Default::default(),
            },
        )?;
        let handle = MachineHandle {
            backend: BackendKind::CloudHypervisor,
            capsule: spec.capsule.clone(),
            process: p.identity(),
            helpers: vec![],
            control_socket: spec.run_dir.join("api.sock"),
            vsock_socket: spec.vsock_socket.clone(),
            memory_bytes: spec.memory_bytes,
        };
        self.procs
            .lock()
            .unwrap()
            .insert(spec.capsule.clone(), Arc::new(p));
        Ok(handle)
    }

    fn proc(&self, vm: &MachineHandle) -> Result<Arc<VmmProcess>, Error> {
        if let Some(p) = self.procs.lock().unwrap().get(&vm.capsule)
            && p.identity() == vm.process
        {
            return Ok(p.clone());
        }
        let p = Arc::new(VmmProcess::adopt(
            &self.paths,
            &self.cgroups,
            &vm.capsule,
            vm.process,
        )?);
        self.procs
            .lock()
            .unwrap()
            .insert(vm.capsule.clone(), p.clone());
        Ok(p)
    }
}

impl Machine for ProcessMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::CloudHypervisor,
            version: "sleep".into(),
            accelerated: true,
        }
    }
    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        let h = self.spawn(spec)?;
        if self.hang_after_spawn {
            std::future::pending::<()>().await;
        }
        Ok(h)
    }
    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.procs.lock().unwrap().remove(&vm.capsule);
        self.proc(vm).map(|_| ())
    }
    async fn pause(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.proc(vm)?.signal(libc::SIGSTOP)?;
        settled(vm.process.pid, true).await;
        Ok(())
    }
    async fn resume(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.proc(vm)?.signal(libc::SIGCONT)?;
        settled(vm.process.pid, false).await;
        Ok(())
    }
    async fn snapshot(&self, vm: &MachineHandle, dir: &Path) -> Result<(), Error> {
        std::fs::write(dir.join("state.json"), vm.capsule.as_bytes()).unwrap();
        Ok(())
    }
    async fn restore(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        assert!(dir.join("state.json").exists());
        self.spawn(spec)
    }
    async fn state(&self, vm: &MachineHandle) -> Result<MachineState, Error> {
        self.proc(vm)?;
        Ok(if process_state(vm.process.pid) == Some('T') {
            MachineState::Paused
        } else {
            MachineState::Running
        })
    }
    async fn counters(&self, _: &MachineHandle) -> Result<NetCounters, Error> {
        Ok(NetCounters::default())
    }
    async fn stop(&self, vm: &MachineHandle) -> Result<(), Error> {
        let p = match self.proc(vm) {
            Ok(p) => p,
            Err(Error::AdoptVmm { .. }) => return self.cgroups.open_capsule(&vm.capsule).remove(),
            Err(e) => return Err(e),
        };
        // A stopped process only dies of SIGTERM once continued.
        let _ = p.signal(libc::SIGCONT);
        p.stop(Duration::from_secs(5)).await?;
        self.procs.lock().unwrap().remove(&vm.capsule);
        Ok(())
    }
    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        let p = self.proc(vm)?;
        wrenn_node_agent::vmm::ch::watch_exit(&p, &vm.control_socket.with_file_name("events.json"))
            .await
    }
}

/// Host pieces of one test, removed on drop even when the test fails.
struct World {
    net: NetBed,
    state: tempfile::TempDir,
    cgroups: CgroupRoot,
    parent: String,
    template: PathBuf,
    extra_pids: Vec<i32>,
}

impl World {
    fn new() -> Self {
        Self::with_net(NetBed::new(true))
    }

    /// [`World::new`] with the node's network set up, as an agent's start
    /// leaves it.
    fn ready() -> Self {
        let w = Self::new();
        w.net.net().ensure_node().unwrap();
        w
    }

    /// [`World::ready`] with an emulated guest (see `network_env`) instead
    /// of a TAP, so traffic from the guest's side can be tried.
    fn with_guest() -> Self {
        let w = Self::with_net(NetBed::new(false));
        w.net.net().ensure_node().unwrap();
        w
    }

    fn with_net(net: NetBed) -> Self {
        let state = tempfile::tempdir().unwrap();
        let parent = unique_name("wrenn-sup");
        let template = state.path().join("base.ext4");
        std::fs::write(&template, vec![1u8; 1 << 20]).unwrap();
        Self {
            net,
            cgroups: CgroupRoot::detect(Path::new(CGROUP_MOUNT), &parent).unwrap(),
            parent,
            template,
            state,
            extra_pids: vec![],
        }
    }

    fn store(&self) -> Qcow2Store {
        Qcow2Store::open(StorageConfig::new(self.state.path().join("disks"))).unwrap()
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("agent")
    }

    /// A fresh agent over this world: new network, store and machine
    /// objects, nothing carried over but the disk.
    fn agent(&self, hang: bool) -> (Supervisor<ProcessMachine>, Arc<LinuxNet>) {
        let layout = wrenn_node_agent::capsule::Layout::new(&self.state_dir());
        let mut m = ProcessMachine::new(
            HostPaths {
                proc_root: "/proc".into(),
                state_dir: layout.vmm_root(),
                hidden: Vec::new(),
                devices: Vec::new(),
            },
            self.cgroups.clone(),
        );
        m.hang_after_spawn = hang;
        let net = Arc::new(self.net.net());
        let mut cfg = SupervisorConfig::new(&self.state_dir(), Path::new("/k/vmlinux"));
        cfg.figures = Some(HostFigures {
            proc_root: "/proc".into(),
            cgroups: self.cgroups.clone(),
        });
        let sup = Supervisor::new(
            Host {
                machine: Arc::new(m),
                net: net.clone(),
                store: Arc::new(self.store()),
            },
            cfg,
        );
        (sup, net)
    }

    fn spec(&self) -> CapsuleSpec {
        CapsuleSpec::new(
            "default",
            "c",
            BootSource::Template(TemplateDisk {
                key: "t".into(),
                rootfs: self.template.clone(),
                digest: String::new(),
            }),
            Resources {
                vcpus: 1,
                memory_bytes: 64 << 20,
                disk_bytes: 1 << 20,
            },
        )
    }

    fn sweep(&self) -> OrphanSweep {
        OrphanSweep {
            cgroups: Some(self.cgroups.clone()),
        }
    }

    fn cgroup_names(&self) -> Vec<String> {
        self.cgroups.list().unwrap()
    }

    fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir().join(sub))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for pid in &self.extra_pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::SIGKILL);
        }
        cgroup_bed::remove_test_cgroups(&self.cgroups, &self.parent);
    }
}

fn host_case(name: &str) -> Option<wrenn_testkit::Case> {
    let c = cgroup_bed::host_case(name)?;
    if !Path::new("/dev/net/tun").exists() {
        c.skip("needs /dev/net/tun");
        return None;
    }
    Some(c)
}

/// Samples once and returns the value of `name{capsule="<uid>"}` in the
/// Prometheus text.
fn sampled(
    sup: &Supervisor<ProcessMachine>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    uid: &str,
) -> Option<f64> {
    let report = rt.block_on(sampler::tick(sup.metrics(), Duration::from_secs(1)));
    assert_eq!(report.errors, 0, "{report:?}");
    let series = format!("{name}{{capsule=\"{uid}\"}} ");
    sup.metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
}

/// A signal lands asynchronously; a VMM's pause or resume returns once
/// the guest is stopped or running, and so does the stand-in's.
async fn settled(pid: i32, stopped: bool) {
    let what = if stopped { "stopped" } else { "continued" };
    wrenn_testkit::eventually(Duration::from_secs(5), what, || {
        (process_state(pid) == Some('T')) == stopped
    })
    .await;
}

fn recover(
    w: &World,
    rt: &tokio::runtime::Runtime,
) -> (Supervisor<ProcessMachine>, RecoveryReport) {
    let (sup, _) = w.agent(false);
    let report = rt.block_on(sup.recover(&w.sweep())).unwrap();
    (sup, report)
}

#[test]
fn a_supervised_vmm_survives_an_agent_restart_and_is_adopted() {
    let Some(_c) = host_case("supervisor_host::vmm_survives_agent_restart") else {
        return;
    };
    let w = World::ready();
    let baseline = w.net.snapshot();

    // Agent 1 creates and pauses a capsule, then dies.
    let rt = runtime();
    let (sup, _) = w.agent(false);
    rt.block_on(sup.create("c1", w.spec(), State::Running))
        .unwrap();
    // The real VMM stand-in's RSS (from /proc) and its cgroup's CPU.
    let rss = sampled(&sup, &rt, "wrenn_agent_capsule_memory_bytes", "c1");
    assert!(rss.is_some_and(|v| v > 0.0), "{rss:?}");
    let cpu = sampled(&sup, &rt, "wrenn_agent_capsule_cpu_seconds_total", "c1");
    assert!(cpu.is_some_and(|v| v >= 0.0), "{cpu:?}");
    let pid = {
        let rec: wrenn_node_agent::capsule::Record =
            wrenn_node_agent::state::Journal::new(&w.state_dir())
                .read("c1")
                .unwrap()
                .unwrap();
        rec.vm().unwrap().process.pid
    };
    rt.block_on(sup.pause("c1")).unwrap();
    assert_eq!(process_state(pid), Some('T'), "really stopped");
    sup.shutdown();
    drop(sup);
    drop(rt);
    assert!(process_alive(pid), "the VMM outlives the agent");

    // Agent 2 rebuilds everything from the journal and adopts it.
    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    assert_eq!(report.adopted, vec!["c1".to_string()]);
    assert_eq!(report.orphans.total(), 0, "{:?}", report.orphans);
    assert_eq!(sup.get("c1").unwrap().state, State::Paused);
    assert_eq!(w.cgroup_names(), vec!["c1".to_string()]);
    let rss = sampled(&sup, &rt, "wrenn_agent_capsule_memory_bytes", "c1");
    assert!(rss.is_some_and(|v| v > 0.0), "adopted VMM sampled: {rss:?}");
    rt.block_on(sup.resume("c1")).unwrap();
    assert!(matches!(process_state(pid), Some('S' | 'R')), "continued");

    // And it can still be removed completely.
    assert!(rt.block_on(sup.delete("c1")).unwrap());
    assert!(!process_alive(pid));
    assert!(w.cgroup_names().is_empty());
    assert!(w.files("capsules").is_empty());
    assert!(w.files("vmm").is_empty());
    assert_eq!(w.net.snapshot(), baseline);
    assert!(w.store().sweep(&[]).unwrap().files.is_empty(), "disk left");
}

#[test]
fn a_reused_pid_is_not_adopted_or_signalled() {
    let Some(_c) = host_case("supervisor_host::reused_pid_not_adopted") else {
        return;
    };
    let mut w = World::new();
    let rt = runtime();
    let (sup, _) = w.agent(false);
    rt.block_on(sup.create("c1", w.spec(), State::Running))
        .unwrap();
    sup.shutdown();
    drop(sup);
    drop(rt);
    // While the agent is down the VMM dies and an unrelated process gets a
    // pid; make the journal point at it with the old start time, as a
    // recycled pid would.
    let journal = wrenn_node_agent::state::Journal::new(&w.state_dir());
    let mut rec: wrenn_node_agent::capsule::Record = journal.read("c1").unwrap().unwrap();
    let old = rec.vm().cloned().unwrap().process;
    // Start times count clock ticks (10 ms): a stranger started in the
    // VMM's own tick would be indistinguishable, as it would be for the
    // kernel's pid reuse too.
    std::thread::sleep(Duration::from_millis(50));
    let mut stranger = std::process::Command::new("/bin/sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let spid = stranger.id() as i32;
    w.extra_pids.push(spid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.pid),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let VmHeld::Running(vm) = &mut rec.held.vm else {
        panic!("no VM journaled: {rec:?}")
    };
    vm.process = ProcessIdentity {
        pid: spid,
        start_time_ticks: old.start_time_ticks,
    };
    journal.write("c1", &rec).unwrap();

    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    assert_eq!(report.lost, vec!["c1".to_string()]);
    assert!(report.adopted.is_empty());
    let v = sup.get("c1").unwrap();
    assert_eq!((v.state, v.reason), (State::Failed, Some(Reason::VmmLost)));
    assert!(process_alive(spid), "the stranger was signalled");
    assert!(
        w.cgroup_names().is_empty(),
        "the dead VMM's cgroup was left"
    );
    assert!(rt.block_on(sup.delete("c1")).unwrap());
    assert!(process_alive(spid));
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[test]
fn orphans_of_a_crash_mid_create_are_removed() {
    let Some(_c) = host_case("supervisor_host::orphans_after_crash") else {
        return;
    };
    let w = World::ready();
    let baseline = w.net.snapshot();

    // Agent 1 dies in the middle of a create: disk, network, process and
    // cgroup exist, the journal says Creating, no VM handle was recorded.
    let rt = runtime();
    let (sup, net) = w.agent(true);
    let s2 = sup.clone();
    let spec = w.spec();
    rt.spawn(async move { s2.create("c1", spec, State::Running).await });
    // The cgroup appears just before the VMM is moved into it: wait for both.
    let pid = wrenn_testkit::wait_until(Duration::from_secs(10), "VMM spawned", || {
        let pids = w.cgroups.open_capsule("c1").pids().unwrap_or_default();
        match (w.cgroup_names() == vec!["c1".to_string()], pids.first()) {
            (true, Some(pid)) => Ok(*pid),
            _ => Err(format!("{:?} {pids:?}", w.cgroup_names())),
        }
    })
    .unwrap();
    // Leftovers no journal knows: a claimed network, a disk, a directory.
    net.setup(&NetId::new("ghost").unwrap(), &EgressPolicy::Deny)
        .unwrap();
    w.store()
        .ensure_disk(&DiskRequest {
            capsule: wrenn_node_agent::storage::CapsuleId::new("ghost2").unwrap(),
            template: w.template.clone(),
            size_bytes: 1 << 20,
        })
        .unwrap();
    std::fs::create_dir_all(w.state_dir().join("capsules/ghost3")).unwrap();
    assert_ne!(w.net.snapshot(), baseline);
    sup.shutdown();
    drop(sup);
    drop(net);
    rt.shutdown_timeout(Duration::from_secs(1));

    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    let o = &report.orphans;
    assert_eq!(o.rolled_back, 1, "{o:?}");
    assert_eq!(o.slot_claims, 1, "{o:?}");
    assert_eq!(o.journals, 1, "{o:?}");
    assert_eq!(o.storage.files.len(), 1, "{o:?}");
    assert_eq!((o.cgroups, o.processes), (1, 1), "{o:?}");
    // The same counts, by kind, on the admin port.
    let text = sup.metrics().encode();
    for want in [
        "wrenn_agent_orphans_removed_total{kind=\"capsule\"} 1",
        "wrenn_agent_orphans_removed_total{kind=\"cgroup\"} 1",
        "wrenn_agent_orphans_removed_total{kind=\"process\"} 1",
        "wrenn_agent_orphans_removed_total{kind=\"journal\"} 1",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    assert!(sup.list().is_empty());
    assert!(!process_alive(pid), "the half-started VMM was killed");
    assert!(w.cgroup_names().is_empty());
    assert_eq!(w.net.snapshot(), baseline, "network leftovers");
    assert!(w.files("capsules").is_empty());
    assert!(w.files("vmm").is_empty());
    assert!(
        std::fs::read_dir(w.state.path().join("disks"))
            .unwrap()
            .next()
            .is_none(),
        "disk leftovers"
    );
}

#[test]
fn egress_from_the_wire_is_enforced_and_changes_live_and_across_a_restart() {
    let Some(_c) = host_case("supervisor_host::egress_changes_live") else {
        return;
    };
    use network_env::{OTHER_REMOTE, UPLINK_ADDR, blocked, listen, source_seen};
    use wrenn_node_agent::server::convert::from_network;
    use wrenn_proto::agent::v1 as pb;
    let w = World::with_guest();
    let remote = listen(&w.net.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let other = listen(&w.net.uplink, OTHER_REMOTE);
    let guest = w.net.guest(&NetId::new("c1").unwrap());
    let wire = |egress: pb::Egress, cidrs: &[&str]| {
        from_network(pb::NetworkPolicy {
            egress: egress as i32,
            allow_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            ports: vec![],
            ..Default::default()
        })
        .unwrap()
    };

    // Deny plus one allowed network, as the operator sends a Capsule's
    // `egress: Deny` with `allowCidrs`.
    let rt = runtime();
    let (sup, _) = w.agent(false);
    let mut spec = w.spec();
    spec.egress = wire(pb::Egress::Deny, &["198.51.100.0/24"]);
    rt.block_on(sup.create("c1", spec, State::Running)).unwrap();
    source_seen(&guest, &remote, to).unwrap();
    assert!(
        blocked(&guest, other.local_addr().unwrap()),
        "unlisted network reached"
    );

    // A change on the running capsule: the same VMM, the new policy.
    let journal = wrenn_node_agent::state::Journal::new(&w.state_dir());
    let read = || -> wrenn_node_agent::capsule::Record { journal.read("c1").unwrap().unwrap() };
    let pid = read().vm().unwrap().process.pid;
    let view = rt
        .block_on(sup.update_network("c1", wire(pb::Egress::Deny, &[])))
        .unwrap();
    assert_eq!(view.spec.egress, Egress::Deny);
    assert_eq!(read().spec.egress, Egress::Deny, "journaled");
    assert!(blocked(&guest, to), "egress still open after Deny");
    assert_eq!(read().vm().unwrap().process.pid, pid);
    assert!(process_alive(pid));
    // An invalid policy is refused where it enters the agent and changes
    // nothing.
    assert!(
        from_network(pb::NetworkPolicy {
            egress: pb::Egress::Deny as i32,
            allow_cidrs: vec!["2001:db8::/32".into()],
            ports: Vec::new(),
            ..Default::default()
        })
        .is_err()
    );
    assert_eq!(read().spec.egress, Egress::Deny);

    // An agent that journaled Allow and died before loading the table:
    // the next one enforces what the journal says.
    sup.shutdown();
    drop(sup);
    drop(rt);
    let mut rec = read();
    rec.spec.egress = Egress::Allow;
    journal.write("c1", &rec).unwrap();
    assert!(blocked(&guest, to), "the table changed before the restart");
    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    assert_eq!(report.adopted, vec!["c1".to_string()]);
    source_seen(&guest, &remote, to).unwrap();
    assert_eq!(sup.get("c1").unwrap().spec.egress, Egress::Allow);
    assert!(rt.block_on(sup.delete("c1")).unwrap());
}

/// Recovery meets a torn journal and one from a newer agent, next to their
/// capsules' live VMMs, cgroups, networks and disks: it must remove and
/// kill nothing of them, adopt neither, report both, and refuse create and
/// delete of their UIDs. Then the admin releases them as docs/security.md
/// says: the newer record is readable again (the newer agent came back)
/// and is adopted; the torn one's directory is removed, and its resources
/// go as orphans.
#[test]
fn unusable_journals_quarantine_their_capsules_untouched() {
    let Some(_c) = host_case("supervisor_host::unusable_journals_quarantine") else {
        return;
    };
    let w = World::ready();
    let rt = runtime();
    let (sup, _) = w.agent(false);
    for uid in ["torn", "newer"] {
        rt.block_on(sup.create(uid, w.spec(), State::Running))
            .unwrap();
    }
    let journal = wrenn_node_agent::state::Journal::new(&w.state_dir());
    let pid = |uid: &str| {
        let rec: wrenn_node_agent::capsule::Record = journal.read(uid).unwrap().unwrap();
        rec.vm().unwrap().process.pid
    };
    let (torn_pid, newer_pid) = (pid("torn"), pid("newer"));
    sup.shutdown();
    drop(sup);
    drop(rt);

    // What the node holds for both, before the restart.
    let net = w.net.snapshot();
    let cgroups = w.cgroup_names();
    assert_eq!(cgroups, vec!["newer".to_string(), "torn".to_string()]);
    let disks = std::fs::read_dir(w.state.path().join("disks"))
        .unwrap()
        .count();
    assert_eq!(disks, 2);
    let (capsule_dirs, vmm_dirs) = (w.files("capsules"), w.files("vmm"));

    // The attack: a torn record, and one a newer agent wrote.
    let torn = w.state_dir().join("capsules/torn/journal.json");
    let good = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &good[..good.len() / 2]).unwrap();
    let newer = w.state_dir().join("capsules/newer/journal.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&newer).unwrap()).unwrap();
    v["version"] = serde_json::json!(99);
    std::fs::write(&newer, serde_json::to_vec(&v).unwrap()).unwrap();

    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    let mut got: Vec<(String, Reason)> = report
        .quarantined
        .iter()
        .map(|q| (q.uid.clone(), q.reason.reason()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("newer".to_string(), Reason::JournalNewerVersion),
            ("torn".to_string(), Reason::JournalUnreadable),
        ]
    );
    assert!(report.adopted.is_empty() && report.lost.is_empty());
    assert_eq!(report.orphans.total(), 0, "{:?}", report.orphans);
    // Nothing of either was touched.
    assert!(
        process_alive(torn_pid) && process_alive(newer_pid),
        "a quarantined VMM was killed"
    );
    assert_eq!(w.cgroup_names(), cgroups);
    assert_eq!(w.net.snapshot(), net, "a quarantined network changed");
    assert_eq!(
        std::fs::read_dir(w.state.path().join("disks"))
            .unwrap()
            .count(),
        disks
    );
    assert_eq!(w.files("capsules"), capsule_dirs);
    assert_eq!(w.files("vmm"), vmm_dirs);
    assert_eq!(std::fs::read(&torn).unwrap(), &good[..good.len() / 2]);
    // Reported: the API, the metric.
    assert_eq!(sup.quarantined().len(), 2);
    assert!(sup.list().is_empty());
    assert!(
        sup.metrics()
            .encode()
            .contains("wrenn_agent_quarantined_capsules 2"),
        "{}",
        sup.metrics().encode()
    );
    // The operator's converge or a user cannot write over or delete them.
    for uid in ["torn", "newer"] {
        let e = rt
            .block_on(sup.create(uid, w.spec(), State::Running))
            .unwrap_err();
        assert_eq!(e.reason().as_str(), "Quarantined", "{e}");
        let e = rt.block_on(sup.delete(uid)).unwrap_err();
        assert_eq!(e.reason().as_str(), "Quarantined", "{e}");
    }
    assert!(process_alive(torn_pid) && process_alive(newer_pid));
    assert_eq!(w.files("capsules"), capsule_dirs);
    sup.shutdown();
    drop(sup);
    drop(rt);

    // Release, as an admin would: the newer record becomes readable (here:
    // its version put back, as a roll-forward of the agent would read it),
    // and the torn capsule is given up by removing its directory.
    v["version"] = serde_json::json!(wrenn_node_agent::capsule::RECORD_VERSION);
    std::fs::write(&newer, serde_json::to_vec(&v).unwrap()).unwrap();
    std::fs::remove_dir_all(w.state_dir().join("capsules/torn")).unwrap();
    let rt = runtime();
    let (sup, report) = recover(&w, &rt);
    assert!(report.quarantined.is_empty());
    assert_eq!(report.adopted, vec!["newer".to_string()]);
    assert!(process_alive(newer_pid));
    assert!(
        !process_alive(torn_pid),
        "the released capsule's VMM is an orphan now"
    );
    assert_eq!(w.cgroup_names(), vec!["newer".to_string()]);
    assert_eq!(
        report.orphans.storage.files.len(),
        1,
        "{:?}",
        report.orphans
    );
    assert!(
        sup.metrics()
            .encode()
            .contains("wrenn_agent_quarantined_capsules 0")
    );
    assert!(rt.block_on(sup.delete("newer")).unwrap());
    assert!(!process_alive(newer_pid));
}
