//! `ChMachine` as root (Tier::Host) against a stand-in for
//! cloud-hypervisor: a small Python API server started through the real
//! spawn path (netns, cgroup, `--api-socket fd=N`) that keeps CH's VM state
//! machine and logs every request. Checks the order of calls a launch,
//! pause, snapshot, restore and stop make, the bodies that matter (a
//! restore hands CH a copy of the snapshot config naming the new capsule's
//! files), and that a failed boot leaves no process or cgroup behind. A
//! real CH needs KVM, which this host lacks.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;

use std::path::Path;

use wrenn_node_agent::vmm::cgroup::{CgroupLimits, CgroupRoot};
use wrenn_node_agent::vmm::ch::ChVersion;
use wrenn_node_agent::vmm::process::{HostPaths, VmmExit};
use wrenn_node_agent::vmm::{
    ChMachine, ChVmm, DiskFormat, Machine, MachineSpec, MachineState, TapSpec,
};
use wrenn_testkit::{TestNetns, Tier, case, need_program, need_root, unique_name};

/// The stand-in: the shared API server (`data/ch/stub_api.py`) answering
/// as CH does, with its VM state machine, logging each request.
const STUB: &str = concat!(
    include_str!("data/ch/stub_api.py"),
    r#"log = open(os.path.join(os.path.dirname(flag("--event-monitor")), "requests.log"), "a")
fail_boot = os.path.exists(os.environ.get("STUB_FAIL_BOOT", "/nonexistent"))
state = None
for conn, method, ep, body in requests():
    log.write("%s %s %s\n" % (method, ep, body.decode())); log.flush()
    err = b'["fake CH error"]'
    if ep == "vmm.ping":
        reply(conn, 200, json.dumps({"build_version": "v53.0-stub", "version": "54.0.0", "pid": os.getpid()}).encode())
    elif ep == "vm.create":
        state = "Created"; config = json.loads(body); reply(conn, 204)
    elif ep == "vm.add-net":
        if state == "Created": config["net"] = [json.loads(body)]
        reply(conn, 204 if state == "Created" else 500, b"" if state == "Created" else err)
    elif ep == "vm.boot":
        if fail_boot: reply(conn, 500, b'["Error from API","The VM could not boot","Cannot open kernel file"]')
        else: state = "Running"; reply(conn, 204)
    elif ep == "vm.delete":
        state = None; reply(conn, 204)
    elif ep == "vm.pause":
        ok = state == "Running"; state = "Paused" if ok else state; reply(conn, 204 if ok else 500, b"" if ok else err)
    elif ep == "vm.resume":
        ok = state == "Paused"; state = "Running" if ok else state; reply(conn, 204 if ok else 500, b"" if ok else err)
    elif ep == "vm.snapshot":
        dest = json.loads(body)["destination_url"][len("file://"):]
        if state == "Paused":
            open(os.path.join(dest, "state.json"), "w").write("{}")
            # A field CH may add in a later version: a restore must keep it.
            open(os.path.join(dest, "config.json"), "w").write(json.dumps(dict(config, x_later={"kept": True})))
            reply(conn, 204)
        else: reply(conn, 500, b'["Trying to snapshot while VM is running"]')
    elif ep == "vm.restore":
        src = json.loads(body)["source_url"][len("file://"):]
        restored = open(os.path.join(src, "config.json")).read()
        open(os.path.join(os.path.dirname(log.name), "restored-config.json"), "w").write(restored)
        state = "Paused"; reply(conn, 204)
    elif ep == "vm.info":
        if state: reply(conn, 200, json.dumps({"config": {}, "state": state}).encode())
        else: reply(conn, 404, b'["VM is not created"]')
    elif ep == "vmm.shutdown":
        reply(conn, 200); sys.exit(0)
    else:
        reply(conn, 404, b'["Not Found"]')
"#
);

struct Env {
    dir: tempfile::TempDir,
    netns: TestNetns,
    cgroups: CgroupRoot,
    parent: String,
}

impl Env {
    fn new() -> Result<Self, String> {
        need_root()?;
        need_program("python3")?;
        let netns = TestNetns::new("wcm")?;
        let parent = unique_name("wrenn-chm");
        let cgroups = CgroupRoot::detect(Path::new("/sys/fs/cgroup"), &parent)
            .map_err(|e| format!("needs a cgroup mount: {e}"))?;
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("cloud-hypervisor");
        std::fs::write(&stub, STUB).unwrap();
        std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Ok(Self {
            dir,
            netns,
            cgroups,
            parent,
        })
    }

    fn machine(&self) -> ChMachine {
        let paths = HostPaths {
            proc_root: "/proc".into(),
            state_dir: self.dir.path().join("vmm"),
            hidden: Vec::new(),
            devices: Vec::new(),
        };
        ChMachine::new(ChVmm::with_version(
            &self.dir.path().join("cloud-hypervisor"),
            ChVersion::parse_build_version("v53.0").unwrap(),
            paths,
            self.cgroups.clone(),
        ))
    }

    fn spec(&self, capsule: &str) -> MachineSpec {
        let run_dir = self.dir.path().join("vmm").join(capsule);
        MachineSpec {
            capsule: capsule.into(),
            vcpus: 1,
            memory_bytes: 128 << 20,
            kernel: "/k/vmlinux".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            root_disk: "/d/root.img".into(),
            root_disk_format: DiskFormat::Raw,
            netns: Some(self.netns.path()),
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: "02:fc:00:00:00:05".into(),
            }),
            vsock_cid: 3,
            vsock_socket: run_dir.join("vsock.sock"),
            limits: CgroupLimits::build_for_vm(1, 128 << 20),
            run_dir,
        }
    }

    fn requests(&self, capsule: &str) -> Vec<String> {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("vmm")
                .join(capsule)
                .join("requests.log"),
        )
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        cgroup_bed::remove_test_cgroups(&self.cgroups, &self.parent);
    }
}

fn endpoints(reqs: &[String]) -> Vec<&str> {
    reqs.iter()
        .map(|r| r.split(' ').nth(1).unwrap_or(""))
        .filter(|e| *e != "vmm.ping")
        .collect()
}

/// A host case named `name` with its [`Env`]; `None` once the case is
/// recorded as skipped.
fn env_case(name: &str) -> Option<(wrenn_testkit::Case, Env)> {
    let c = case(Tier::Host, name);
    match Env::new() {
        Ok(env) => Some((c, env)),
        Err(why) => {
            c.skip(why);
            None
        }
    }
}

/// What a launch asks of CH, in order, before anything else.
const LAUNCH: [&str; 3] = ["vm.create", "vm.add-net", "vm.boot"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_pause_snapshot_and_stop_in_chs_order() {
    let Some((_c, env)) = env_case("vmm_ch_machine::launch_pause_snapshot_stop") else {
        return;
    };
    let m = env.machine();
    let spec = env.spec("c1");
    let vm = m.launch(&spec).await.unwrap();
    assert_eq!(m.state(&vm).await.unwrap(), MachineState::Running);
    m.pause(&vm).await.unwrap();
    assert_eq!(m.state(&vm).await.unwrap(), MachineState::Paused);
    let snap = env.dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    m.snapshot(&vm, &snap).await.unwrap();
    assert!(snap.join("state.json").exists());
    m.resume(&vm).await.unwrap();
    let (exit, stop) = tokio::join!(m.wait_exit(&vm), m.stop(&vm));
    stop.unwrap();
    assert_eq!(exit.unwrap(), VmmExit::Requested);
    assert!(env.cgroups.list().unwrap().is_empty(), "cgroup removed");

    let reqs = env.requests("c1");
    assert_eq!(
        endpoints(&reqs),
        [
            &LAUNCH[..],
            &[
                "vm.info",
                "vm.pause",
                "vm.info",
                "vm.snapshot",
                "vm.resume",
                "vmm.shutdown"
            ]
        ]
        .concat()
    );
    let create = reqs.iter().find(|r| r.contains("vm.create")).unwrap();
    assert!(
        create.contains("\"thp\":false") && create.contains("\"mode\":\"Off\""),
        "{create}"
    );
    let net = reqs.iter().find(|r| r.contains("vm.add-net")).unwrap();
    assert!(net.contains("\"tap\":\"tap0\""), "{net}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_boot_leaves_no_process_or_cgroup() {
    let Some((_c, env)) = env_case("vmm_ch_machine::failed_boot_leaves_nothing") else {
        return;
    };
    let flag = env.dir.path().join("fail-boot");
    std::fs::write(&flag, "").unwrap();
    let m = env.machine();
    let spec = env.spec("c2");
    // The spawn path gives the stub a fixed environment, so the failure is
    // signalled by a file the stub looks for at a fixed place instead.
    std::fs::create_dir_all(&spec.run_dir).unwrap();
    let stub = env.dir.path().join("cloud-hypervisor");
    let text = STUB.replace(
        "os.environ.get(\"STUB_FAIL_BOOT\", \"/nonexistent\")",
        &format!("{:?}", flag.display().to_string()),
    );
    std::fs::write(&stub, text).unwrap();
    let err = m.launch(&spec).await.unwrap_err();
    assert!(
        format!("{err}").contains("vm.boot") || format!("{err:?}").contains("could not boot"),
        "{err:?}"
    );
    assert!(env.cgroups.list().unwrap().is_empty(), "cgroup left");
    let reqs = env.requests("c2");
    assert_eq!(
        endpoints(&reqs),
        [&LAUNCH[..], &["vm.delete", "vmm.shutdown"]].concat()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_stages_another_capsules_snapshot_then_resumes() {
    let Some((_c, env)) = env_case("vmm_ch_machine::restore_stages_then_resumes") else {
        return;
    };
    let m = env.machine();
    let vm = m.launch(&env.spec("c1")).await.unwrap();
    m.pause(&vm).await.unwrap();
    let snap = env.dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    m.snapshot(&vm, &snap).await.unwrap();
    m.stop(&vm).await.unwrap();

    let spec = env.spec("c3");
    let restored = m.restore(&spec, &snap).await.unwrap();
    assert_eq!(m.state(&restored).await.unwrap(), MachineState::Running);
    m.stop(&restored).await.unwrap();
    assert!(env.cgroups.list().unwrap().is_empty(), "cgroup removed");
    assert_eq!(
        endpoints(&env.requests("c3")),
        vec![
            "vm.restore",
            "vm.info",
            "vm.resume",
            "vm.info",
            "vmm.shutdown"
        ]
    );
    // CH got a copy naming c3's files, with what it wrote kept.
    let text = std::fs::read_to_string(spec.run_dir.join("restored-config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let path = |p: &Path| p.display().to_string();
    assert_eq!(config["vsock"]["socket"], path(&spec.vsock_socket));
    assert_eq!(
        config["serial"]["file"],
        path(&spec.run_dir.join("serial.log"))
    );
    assert_eq!(config["net"][0]["mac"], "02:fc:00:00:00:05");
    assert_eq!(config["x_later"]["kept"], true);
    assert!(
        !spec.run_dir.join("restore-source").exists(),
        "staging removed"
    );
    let original = std::fs::read_to_string(snap.join("config.json")).unwrap();
    assert!(
        original.contains("/vmm/c1/"),
        "snapshot untouched: {original}"
    );
}
