//! Tier 3 (vm) end to end: the real `wrenn-operator` binary against the real
//! kube-apiserver, driving two real node agents, each playing a node in its
//! own network namespace and booting real guests under QEMU TCG. A user's
//! view: apply, watch the phase, exec, change `operatingMode`, survive
//! kill -9 of an agent and of the operator, delete — and nothing left over.
//!
//! Why this file is long: three long end-to-end scenarios on one two-node QEMU
//! bed, each read top to bottom as a user would drive it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::reason::{ConditionType, Reason, find_condition};
use wrenn_crds::template::TemplatePhase;
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};
use wrenn_e2e::ControlPlane;
use wrenn_e2e::agent::{AgentOptions, GuestImage, NodeAgent, Pki, exec};
use wrenn_e2e::leaks::{capsule_namespaces, processes_mentioning};
use wrenn_e2e::local::{
    OperatorOptions, OperatorProcess, agent_step_seconds, apply, capsule_manifest, register_agent,
    template_manifest,
};
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::vm::Turn;
use wrenn_testkit::{Case, Tier, case, need_program, need_root};

const MANAGER: &str = "e2e";

struct Cluster {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    agents: Vec<NodeAgent>,
    operator: OperatorProcess,
    opts: OperatorOptions,
    /// The vm tier's readiness budget for one guest boot (the agents'
    /// `--guest-ready-secs`).
    ready: Duration,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// How long an apply may take to reach a booted guest: two boots'
    /// budgets (a warm build and the restore from it), and never less than
    /// the 300 s these tests always allowed.
    fn boot_wait(&self) -> Duration {
        (self.ready * 2).max(Duration::from_secs(300))
    }

    /// Template `base` from the guest image's root filesystem, which
    /// every test here starts from.
    async fn apply_base_template(&self) {
        let manifest = template_manifest("base", GuestImage::ROOTFS);
        apply(&self.client, &self.ns, &manifest, MANAGER)
            .await
            .unwrap();
    }

    fn agent(&mut self, node: &str) -> &mut NodeAgent {
        self.agents
            .iter_mut()
            .find(|a| a.node_name == node)
            .unwrap_or_else(|| panic!("no agent for node {node:?}"))
    }

    fn logs(&self) -> String {
        let mut out = format!("--- operator ---\n{}\n", self.operator.log_tail());
        for a in &self.agents {
            out.push_str(&format!(
                "--- agent {} ---\n{}\n",
                a.node_name,
                a.log_tail()
            ));
        }
        out
    }

    fn caps(&self) -> Api<Capsule> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Polls capsule `name` until `check` holds.
    async fn wait(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&Capsule) -> bool,
    ) -> Capsule {
        let t0 = Instant::now();
        loop {
            let cap = self.caps().get_opt(name).await.unwrap();
            if let Some(cap) = &cap
                && check(cap)
            {
                eprintln!("{name}: {what} after {:.1} s", t0.elapsed().as_secs_f64());
                return cap.clone();
            }
            if t0.elapsed() > limit {
                panic!(
                    "{name}: {what} not reached in {limit:?}; status {:?}\n{}",
                    cap.map(|c| c.status),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until `api` lists nothing, at most 120 s after `since`.
    async fn wait_gone<K>(&self, api: &Api<K>, what: &str, since: Instant)
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        while !api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "{what} not released 120 s after delete\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_phase(&self, name: &str, phase: CapsulePhase) -> Capsule {
        self.wait(name, &format!("phase {phase:?}"), self.boot_wait(), |c| {
            c.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    async fn set_mode(&self, name: &str, mode: &str) {
        self.caps()
            .patch(
                name,
                &PatchParams::apply(MANAGER),
                &Patch::Merge(json!({ "spec": { "operatingMode": mode } })),
            )
            .await
            .unwrap();
    }

    /// Capsule UIDs each agent holds, by node.
    async fn held(&self) -> BTreeMap<String, Vec<(String, i32)>> {
        let mut out = BTreeMap::new();
        for a in &self.agents {
            let mut c = a.connect().await.unwrap();
            let list = c
                .list_capsules(pb::ListCapsulesRequest::default())
                .await
                .unwrap()
                .into_inner();
            out.insert(
                a.node_name.clone(),
                list.capsules
                    .into_iter()
                    .map(|c| (c.uid, c.state))
                    .collect(),
            );
        }
        out
    }

    /// Runs `script` in capsule `cap` through the agent of its node.
    async fn sh(&mut self, cap: &Capsule, script: &str) -> String {
        let node = cap
            .status
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap();
        let uid = cap.uid().unwrap();
        let mut c = self.agent(&node).connect().await.unwrap();
        let ran = exec(&mut c, &uid, &["/bin/sh", "-c", script], b"")
            .await
            .unwrap();
        assert_eq!(ran.code, Some(0), "{script}: {}", ran.stderr);
        ran.stdout
    }

    /// kubectl in the test namespace; (exit code, stdout, stderr).
    fn kubectl(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        let out = self.cp.kubectl(&all, None).unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl diff -f dir` finds nothing: exit 0, no output.
    fn assert_no_drift(&self, dir: &std::path::Path, when: &str) {
        let (code, out, err) = self.kubectl(&["diff", "-f", &dir.display().to_string()]);
        assert!(
            code == 0 && out.is_empty(),
            "kubectl diff {when}: exit {code}\n{out}{err}"
        );
    }

    /// Successful (sum, count) of agent step `step` on every node.
    fn agent_steps(&self, step: &str) -> BTreeMap<String, (f64, u64)> {
        self.agents
            .iter()
            .map(|a| (a.node_name.clone(), agent_step_seconds(a, step).unwrap()))
            .collect()
    }

    /// Polls `name` every 100 ms from `applied` until Running, then prints
    /// where the time went: until the operator recorded a node (placement),
    /// the agent's CreateCapsule (disk, network, VMM) and, inside it, the
    /// VM boot (VMM start until the guest agent answers), read from the
    /// agent's histograms as the difference across this create. Other
    /// creates on the same node at the same time would blur it: then the
    /// agent figures are averages, and the line says so.
    async fn running_with_figures(
        &self,
        name: &str,
        applied: Instant,
        before: &[BTreeMap<String, (f64, u64)>; 2],
    ) -> Capsule {
        let mut placed = None;
        let cap = loop {
            let cap = self.caps().get_opt(name).await.unwrap();
            let st = cap.as_ref().and_then(|c| c.status.clone());
            if placed.is_none() && st.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                placed = Some(applied.elapsed());
            }
            if let Some(cap) = cap
                && st.as_ref().and_then(|s| s.phase) == Some(CapsulePhase::Running)
            {
                break cap;
            }
            assert!(
                applied.elapsed() < self.boot_wait(),
                "{name}: not Running in {:?}; status {st:?}\n{}",
                self.boot_wait(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let total = applied.elapsed().as_secs_f64();
        let node = node_of(&cap);
        let delta = |b: &BTreeMap<String, (f64, u64)>, step: &str| {
            let (s0, n0) = b[&node];
            let (s1, n1) = self.agent_steps(step)[&node];
            ((s1 - s0) / (n1 - n0).max(1) as f64, n1 - n0)
        };
        let (create, creates) = delta(&before[0], "create");
        let (boot, boots) = delta(&before[1], "boot");
        let placed = placed.unwrap_or_default().as_secs_f64();
        eprintln!(
            "figure: create-to-Running of {name}: {total:.2} s from kubectl apply = \
             placement {placed:.2} s (apply until status.nodeName) + {:.2} s on the node: \
             agent CreateCapsule {create:.2} s (of which VM boot {boot:.2} s, disk and \
             network {:.2} s) and {:.2} s for the operator to write Running (±0.1 s polling){}",
            total - placed,
            create - boot,
            total - placed - create,
            if creates == 1 && boots == 1 {
                String::new()
            } else {
                format!(
                    "; agent figures averaged over {creates} creates and {boots} boots on {node}"
                )
            }
        );
        cap
    }

    /// Every capsule held once; the capsule `uid` on exactly one node, with
    /// one QEMU (and one vsock helper) and its namespace there alone; no
    /// node has a namespace more than the capsules it holds.
    async fn assert_single(&self, uid: &str) {
        let held = self.held().await;
        assert_no_duplicates(&held);
        let holders: Vec<&String> = held
            .iter()
            .filter(|(_, caps)| caps.iter().any(|(u, _)| u == uid))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(holders.len(), 1, "{uid} held by {holders:?}: {held:?}");
        let mut by_program: BTreeMap<String, usize> = BTreeMap::new();
        for pid in processes_mentioning(uid) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            *by_program.entry(comm.trim().to_string()).or_default() += 1;
        }
        assert!(
            by_program.get("qemu-system-x86").is_some_and(|n| *n == 1)
                && by_program.values().all(|n| *n == 1),
            "processes of {uid}: {by_program:?}"
        );
        let ns_name = capsule_netns(uid);
        for a in &self.agents {
            let here = capsule_namespaces(&a.netns_dir);
            let expect = usize::from(holders[0] == &a.node_name);
            assert_eq!(
                here.iter().filter(|n| **n == ns_name).count(),
                expect,
                "namespace {ns_name} on {}: {here:?}",
                a.node_name
            );
            assert_eq!(
                here.len(),
                held[&a.node_name].len(),
                "namespaces on {} against the capsules it holds: {here:?} / {held:?}",
                a.node_name
            );
        }
    }

    /// Waits until a process of capsule `uid` runs (its VMM), polling every
    /// 50 ms for at most `limit`.
    async fn wait_vmm(&self, uid: &str, limit: Duration) {
        let t0 = Instant::now();
        while processes_mentioning(uid).is_empty() {
            assert!(
                t0.elapsed() < limit,
                "no VMM for {uid} in {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes capsules `names` and waits until the API and both nodes let
    /// go of them: no VM, no process, no namespace.
    async fn delete_all(&self, names: &[&str]) {
        let mut uids = Vec::new();
        for name in names {
            let cap = self.caps().get(name).await.unwrap();
            uids.push(cap.uid().unwrap());
            self.caps()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        }
        let t0 = Instant::now();
        self.wait_gone(&self.caps(), "capsules", t0).await;
        let held = self.held().await;
        assert!(
            held.values().all(Vec::is_empty),
            "agents still hold {held:?}"
        );
        for uid in &uids {
            assert!(
                processes_mentioning(uid).is_empty(),
                "VMM of {uid} left running"
            );
        }
        for a in &self.agents {
            let left = capsule_namespaces(&a.netns_dir);
            assert!(
                left.is_empty(),
                "namespaces left on {}: {left:?}",
                a.node_name
            );
        }
    }
}

/// The namespace the agent names after a capsule UID: `wrenn-` and its
/// first nine letters and digits (node-agent's `CapsuleId::resource_name`).
fn capsule_netns(uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(9)
        .collect();
    format!("wrenn-{short}")
}

fn node_of(cap: &Capsule) -> String {
    cap.status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Every UID is held by exactly one agent, at most once.
fn assert_no_duplicates(held: &BTreeMap<String, Vec<(String, i32)>>) {
    let mut seen = BTreeMap::new();
    for (node, caps) in held {
        for (uid, _) in caps {
            if let Some(other) = seen.insert(uid.clone(), node.clone()) {
                panic!("capsule {uid} held twice: on {other} and {node}: {held:?}");
            }
        }
    }
}

/// What a test of this file needs, or why it skips; the guest image.
async fn prerequisites() -> Result<GuestImage, String> {
    need_root()
        .and_then(|_| need_program("qemu-system-x86_64"))
        .and_then(|_| need_program("vhost-device-vsock"))
        .and_then(|_| need_program("openssl"))
        .and_then(|_| need_program("curl"))
        .and_then(|_| need_program("diff"))?;
    ControlPlane::shared().map_err(|why| format!("no control plane: {why}"))?;
    tokio::task::spawn_blocking(GuestImage::build)
        .await
        .unwrap()
        .map_err(|e| format!("no guest image: {e:#}"))
}

/// Tests of this file boot guests under TCG on a small machine: one at a
/// time, or the boots of one time out for the load of the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The prologue of every test here: its case, its turn (the lock), the
/// guest image and a [`setup`] cluster; `None` after skipping when the host
/// cannot run the test.
async fn start(
    name: &str,
    slot: u8,
) -> Option<(
    Case,
    (tokio::sync::MutexGuard<'static, ()>, Turn),
    GuestImage,
    Cluster,
)> {
    let c = case(Tier::Vm, name);
    let image = match prerequisites().await {
        Ok(i) => i,
        Err(why) => {
            c.skip(why);
            return None;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let serial = SERIAL.lock().await;
    // This binary's turn among every vm-tier test process, taken after
    // its own lock so its waiting tests hold no slot.
    let who = format!("{name} (pid {})", std::process::id());
    let turn = tokio::task::spawn_blocking(move || wrenn_testkit::vm::turn(&who))
        .await
        .unwrap()
        .unwrap();
    let cl = setup(&image, slot, turn.ready).await;
    Some((c, (serial, turn), image, cl))
}

/// Starts two agents and the operator in a fresh namespace. `slot` (0, 1,
/// ...) keeps the node subnets of the tests of this binary apart.
async fn setup(image: &GuestImage, slot: u8, ready: Duration) -> Cluster {
    let cp = ControlPlane::shared().unwrap();
    let client = cp.client().await.unwrap();
    let ns = wrenn_e2e::node_images_namespace(&client, "opvm")
        .await
        .unwrap();
    // Certificates and the operator's log; removed with the Cluster (a
    // failure prints the log tails first).
    let tmp = tempfile::Builder::new()
        .prefix("wrenn-opvm-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    // One CA for the operator and both agents, as the chart makes it.
    let pki = Pki::create(&dir.join("pki"), std::net::Ipv4Addr::LOCALHOST).unwrap();
    let base = 1 + (std::process::id() % 40) as u8 * 6 + slot * 2;
    let mut agents = Vec::new();
    for (i, suffix) in ["a", "b"].iter().enumerate() {
        let opts = AgentOptions {
            node_name: format!("{}{suffix}", wrenn_testkit::unique_name("v")),
            index: base + i as u8,
            image: image.clone(),
            pki: Some(pki.clone()),
            guest_ready: Some(ready),
        };
        let agent = tokio::task::spawn_blocking(move || NodeAgent::start(&opts))
            .await
            .unwrap()
            .unwrap();
        register_agent(&client, &ns, &agent).await.unwrap();
        agents.push(agent);
    }
    let opts = OperatorOptions {
        kubeconfig: cp.kubeconfig.clone(),
        agent_namespace: ns.clone(),
        // The tests share one API server; each operator keeps to its own.
        watch_namespace: Some(ns.clone()),
        pki,
        log: dir.join("operator.log"),
        node_lost_timeout_secs: 30,
    };
    let operator = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || OperatorProcess::start(&opts))
            .await
            .unwrap()
            .unwrap()
    };
    Cluster {
        cp,
        client,
        ns,
        agents,
        operator,
        opts,
        ready,
        _dir: tmp,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drives_real_agents_through_a_capsules_life() {
    let Some((verdict, _serial, image, mut cl)) = start(
        "operator_vm::operator_drives_real_agents_through_a_capsules_life",
        0,
    )
    .await
    else {
        return;
    };
    let ns = cl.ns.clone();

    cl.apply_base_template().await;
    apply(&cl.client, &ns, &capsule_manifest("one", "base"), MANAGER)
        .await
        .unwrap();
    let one = cl.wait_phase("one", CapsulePhase::Running).await;
    let status = one.status.clone().unwrap();
    let node = node_of(&one);
    assert!(
        cl.agents.iter().any(|a| a.node_name == node),
        "placed on {node:?}"
    );
    assert_eq!(status.vmm.as_ref().map(|v| v.name.as_str()), Some("qemu"));
    assert!(
        status.ip.is_some(),
        "Running capsule without an IP: {status:?}"
    );
    let uid = one.uid().unwrap();
    assert_eq!(
        capsule_namespaces(&cl.agent(&node).netns_dir).len(),
        1,
        "the capsule's namespace is on its node"
    );

    // What a user would do inside: leave a file and a process behind.
    cl.sh(
        &one,
        "echo kept > /root/marker; (sleep 100000 &) ; echo started",
    )
    .await;

    // Pause and back: the agent holds it Paused meanwhile.
    cl.set_mode("one", "Paused").await;
    cl.wait_phase("one", CapsulePhase::Paused).await;
    let held = cl.held().await;
    assert!(
        held[&node].contains(&(uid.clone(), pb::CapsuleState::Paused as i32)),
        "agent view while Paused: {held:?}"
    );
    cl.set_mode("one", "Running").await;
    cl.wait_phase("one", CapsulePhase::Running).await;

    // Suspend to disk: the VMM goes away; resume brings back file and process.
    cl.set_mode("one", "Suspended").await;
    cl.wait_phase("one", CapsulePhase::Suspended).await;
    assert!(
        processes_mentioning(&uid).is_empty(),
        "a VMM still runs for a Suspended capsule"
    );
    cl.set_mode("one", "Running").await;
    let one = cl.wait_phase("one", CapsulePhase::Running).await;
    assert_eq!(cl.sh(&one, "cat /root/marker").await.trim(), "kept");
    assert!(cl.sh(&one, "ps").await.contains("sleep 100000"));

    // kill -9 of the agent: the VM keeps running, the restarted agent adopts
    // it, the operator reconnects, nothing is duplicated.
    let vmm_pids = processes_mentioning(&uid);
    assert!(!vmm_pids.is_empty());
    cl.agent(&node).kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        processes_mentioning(&uid),
        vmm_pids,
        "VMM died with the agent"
    );
    {
        let agent = cl.agent(&node);
        tokio::task::block_in_place(|| agent.spawn()).unwrap();
    }
    let one = cl.wait_phase("one", CapsulePhase::Running).await;
    assert_eq!(cl.sh(&one, "cat /root/marker").await.trim(), "kept");
    assert_eq!(
        processes_mentioning(&uid),
        vmm_pids,
        "VMM replaced after agent restart"
    );

    // kill -9 of the operator; a capsule applied while it is down starts
    // once it is back, and nothing is duplicated.
    cl.operator.kill9();
    apply(&cl.client, &ns, &capsule_manifest("two", "base"), MANAGER)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cl.operator = {
        let opts = cl.opts.clone();
        tokio::task::spawn_blocking(move || OperatorProcess::start(&opts))
            .await
            .unwrap()
            .unwrap()
    };
    let two = cl.wait_phase("two", CapsulePhase::Running).await;
    cl.wait_phase("one", CapsulePhase::Running).await;
    let held = cl.held().await;
    assert_no_duplicates(&held);
    let all: Vec<&String> = held.values().flatten().map(|(u, _)| u).collect();
    assert_eq!(all.len(), 2, "agents hold {held:?}");
    assert!(cl.sh(&two, "uname -r").await.trim() == image.kernel_release);

    // A snapshot of `one` with memory; `one` goes back to Running, and a
    // capsule from the snapshot lands on the node holding it, with the
    // file and the process `one` had, as a VM of its own.
    apply(
        &cl.client,
        &ns,
        &json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
            "metadata": { "name": "snap" },
            "spec": { "capsuleName": "one", "memory": true },
        }),
        MANAGER,
    )
    .await
    .unwrap();
    let snaps: Api<CapsuleSnapshot> = Api::namespaced(cl.client.clone(), &ns);
    let t0 = Instant::now();
    let snap = loop {
        let s = snaps.get("snap").await.unwrap();
        if s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "snapshot not ready: {:?}\n{}",
            s.status,
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("snapshot Ready after {:.1} s", t0.elapsed().as_secs_f64());
    let st = snap.status.unwrap();
    assert_eq!(st.node_name.as_deref(), Some(node.as_str()));
    assert!(st.size_bytes.unwrap_or(0) > 0, "snapshot size: {st:?}");
    let one = cl.wait_phase("one", CapsulePhase::Running).await;
    apply(
        &cl.client,
        &ns,
        &json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "three" },
            "spec": { "source": { "snapshotRef": { "name": "snap" } } },
        }),
        MANAGER,
    )
    .await
    .unwrap();
    let three = cl.wait_phase("three", CapsulePhase::Running).await;
    assert_eq!(
        node_of(&three),
        node,
        "lands on the node holding the snapshot"
    );
    assert_eq!(cl.sh(&three, "cat /root/marker").await.trim(), "kept");
    assert!(cl.sh(&three, "ps").await.contains("sleep 100000"));
    cl.sh(&three, "echo three > /root/marker").await;
    assert_eq!(cl.sh(&one, "cat /root/marker").await.trim(), "kept");
    assert_no_duplicates(&cl.held().await);

    // Delete: gone from the API once the node let go, and from the nodes.
    snaps
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    cl.delete_all(&["one", "two", "three"]).await;
    cl.wait_gone(&snaps, "snapshot", t0).await;
    drop(verdict);
}

/// Counts the writes to capsule `name` the API server makes visible (its
/// creation, then each change) until it shows phase Running. The watch is
/// open when this returns, so a create that follows is seen.
async fn count_writes(api: &Api<Capsule>, name: &str) -> tokio::task::JoinHandle<usize> {
    use futures::{StreamExt, TryStreamExt};
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(290);
    let mut stream = api.watch(&wp, "0").await.unwrap().boxed();
    tokio::spawn(async move {
        let mut writes = 0;
        while let Some(event) = stream.try_next().await.unwrap() {
            if let WatchEvent::Added(cap) | WatchEvent::Modified(cap) = event {
                writes += 1;
                if cap.status.and_then(|s| s.phase) == Some(CapsulePhase::Running) {
                    break;
                }
            }
        }
        writes
    })
}

/// What a user keeps in a directory and applies with kubectl, shaped like
/// `examples/01-template-image.yaml` and `examples/03-capsule.yaml`. The
/// examples themselves pull `docker.io/library/python:3.12-slim` (no
/// registry but the package ones is reachable here) and ask for 2 vCPUs and
/// 1Gi, slow to boot under TCG on a 2-CPU runner, and a 4Gi to 10Gi disk,
/// which placement reserves in full against the node's free space (a test
/// machine may have less); so the template boots the test's guest root disk
/// from the agents' image directory (by name, in a namespace allowed to) and
/// the capsule asks for 1 vCPU and a 1Gi disk. Every
/// other field (lifecycle, env, network egress and ports) is the example's.
fn write_examples(dir: &std::path::Path, rootfs: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("01-template.yaml"),
        format!(
            "apiVersion: wrenn.dev/v1alpha1
kind: CapsuleTemplate
metadata:
  name: python
spec:
  source:
    rootfs:
      path: {}
  defaults:
    vcpus: 1
    memory: 512Mi
    disk: 1Gi
",
            rootfs
        ),
    )
    .unwrap();
    // examples/02-template-warm.yaml with the test's disk and a server
    // busybox has (jupyter is not in the CI image), at a TCG-sized shape.
    std::fs::write(
        dir.join("02-template-warm.yaml"),
        format!(
            "apiVersion: wrenn.dev/v1alpha1
kind: CapsuleTemplate
metadata:
  name: jupyter-warm
spec:
  source:
    rootfs:
      path: {}
  defaults:
    vcpus: 1
    memory: 256Mi
    disk: 1Gi
  warm:
    startCommand: [\"/bin/sh\", \"-c\", \"mkdir -p /www && echo warm $$ > /www/marker && exec httpd -f -p 8888 -h /www\"]
    readiness:
      tcpPort: 8888
      timeout: 3m
---
apiVersion: wrenn.dev/v1alpha1
kind: Capsule
metadata:
  name: notebook-1
spec:
  source:
    templateRef:
      name: jupyter-warm
",
            rootfs
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("03-capsule.yaml"),
        "apiVersion: wrenn.dev/v1alpha1
kind: Capsule
metadata:
  name: sandbox-1
spec:
  source:
    templateRef:
      name: python
  resources:
    vcpus: 1
    memory: 512Mi
    disk: 1Gi
  lifecycle:
    shutdownAfter: 2h
    idleTimeout: 15m
    onExpiry: Delete
  env:
    - name: PYTHONUNBUFFERED
      value: \"1\"
  network:
    egress: Deny
    allowCidrs: [\"203.0.113.0/24\"]
    ports:
      - name: http
        port: 8000
",
    )
    .unwrap();
}

/// Two capsules that expire `after` their creation, one per `onExpiry`.
fn write_expiring(dir: &std::path::Path, after: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, on) in [("ttl-delete", "Delete"), ("ttl-suspend", "Suspend")] {
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "apiVersion: wrenn.dev/v1alpha1
kind: Capsule
metadata:
  name: {name}
spec:
  source:
    templateRef:
      name: python
  lifecycle:
    shutdownAfter: {after}
    onExpiry: {on}
"
            ),
        )
        .unwrap();
    }
}

/// The operator touched only status and its finalizer: no spec field, no
/// label, no annotation is owned by anyone but kubectl.
fn assert_operator_owns_only_status(obj: &kube::core::ObjectMeta, what: &str) {
    for entry in obj.managed_fields.iter().flatten() {
        let manager = entry.manager.as_deref().unwrap_or_default();
        if manager.starts_with("kubectl") {
            continue;
        }
        let fields = entry.fields_v1.as_ref().map(|f| &f.0);
        let top: Vec<&String> = fields
            .and_then(|f| f.as_object())
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        let meta: Vec<&String> = fields
            .and_then(|f| f.get("f:metadata"))
            .and_then(|m| m.as_object())
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert!(
            top.iter().all(|k| *k == "f:status" || *k == "f:metadata")
                && meta.iter().all(|k| *k == "f:finalizers"),
            "{what}: manager {manager} owns {top:?} / metadata {meta:?}"
        );
    }
    assert!(obj.labels.is_none(), "{what} labels: {:?}", obj.labels);
    let annotations: Vec<&String> = obj.annotations.iter().flatten().map(|(k, _)| k).collect();
    assert!(
        annotations
            .iter()
            .all(|k| *k == "kubectl.kubernetes.io/last-applied-configuration"),
        "{what} annotations: {annotations:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applied_manifests_run_without_drift_and_expire() {
    let Some((verdict, _serial, _image, mut cl)) = start(
        "operator_vm::kubectl_applied_manifests_run_without_drift_and_expire",
        1,
    )
    .await
    else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let examples = files.path().join("examples");
    write_examples(&examples, GuestImage::ROOTFS);
    let examples_arg = examples.display().to_string();

    // kubectl apply -f dir/, as a user does: template Ready, capsule Running.
    let before = [cl.agent_steps("create"), cl.agent_steps("boot")];
    let writes = count_writes(&cl.caps(), "sandbox-1").await;
    let applied = Instant::now();
    let (code, out, err) = cl.kubectl(&["apply", "-f", &examples_arg]);
    assert_eq!(code, 0, "kubectl apply: {out}{err}");
    let sandbox = cl.running_with_figures("sandbox-1", applied, &before).await;
    let writes = writes.await.unwrap();
    eprintln!(
        "figure: API-server writes to sandbox-1 from apply to Running: {writes} \
         (kubectl's create and {} by the operator)",
        writes - 1
    );
    assert!(
        sandbox
            .status
            .as_ref()
            .and_then(|s| s.ip.as_ref())
            .is_some(),
        "Running without an IP: {:?}",
        sandbox.status
    );
    let templates: Api<CapsuleTemplate> = Api::namespaced(cl.client.clone(), &cl.ns);
    // The template's controller writes its Ready on its own look, which
    // may come after its first capsule runs.
    let t0 = Instant::now();
    let tpl = loop {
        let tpl = templates.get("python").await.unwrap();
        if tpl.status.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Ready) {
            break tpl;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "template not Ready 30 s after its capsule ran: {:?}",
            tpl.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    cl.sh(&sandbox, "echo kept > /root/marker").await;
    let warm_id = warm_template_serves(&mut cl, applied).await;

    // No drift: the operator wrote status only.
    cl.assert_no_drift(&examples, "after reconcile");
    assert_operator_owns_only_status(&sandbox.metadata, "capsule");
    assert_operator_owns_only_status(&tpl.metadata, "template");

    // kubectl patch to Paused and back: still no drift, state kept.
    for (mode, phase) in [
        ("Paused", CapsulePhase::Paused),
        ("Running", CapsulePhase::Running),
    ] {
        let patch = format!(r#"{{"spec":{{"operatingMode":"{mode}"}}}}"#);
        let (code, out, err) = cl.kubectl(&[
            "patch",
            "capsule",
            "sandbox-1",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
        assert_eq!(code, 0, "kubectl patch {mode}: {out}{err}");
        cl.wait_phase("sandbox-1", phase).await;
    }
    let sandbox = cl.caps().get("sandbox-1").await.unwrap();
    assert_eq!(cl.sh(&sandbox, "cat /root/marker").await.trim(), "kept");
    cl.assert_no_drift(&examples, "after Paused and back");
    assert_operator_owns_only_status(&sandbox.metadata, "capsule after Paused and back");

    // Lifecycle expiry, counted from creation. Long enough for both to
    // boot under TCG before it strikes, so expiry meets a running VM.
    let expiring = files.path().join("ttl");
    write_expiring(&expiring, "60s");
    let (code, out, err) = cl.kubectl(&["apply", "-f", &expiring.display().to_string()]);
    assert_eq!(code, 0, "kubectl apply: {out}{err}");
    let del = cl.wait_phase("ttl-delete", CapsulePhase::Running).await;
    let sus = cl.wait_phase("ttl-suspend", CapsulePhase::Running).await;
    let (del_uid, sus_uid) = (del.uid().unwrap(), sus.uid().unwrap());
    cl.sh(&sus, "echo kept > /root/marker").await;

    // onExpiry: Delete: the object goes (after phase Expired, which the
    // Event records) and its VM with it, on every node.
    let t0 = Instant::now();
    while cl.caps().get_opt("ttl-delete").await.unwrap().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "ttl-delete still there\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events: Api<Event> = Api::namespaced(cl.client.clone(), &cl.ns);
    let expired: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(del_uid.as_str())
                && e.reason.as_deref() == Some(Reason::Expired.as_str())
        })
        .collect();
    assert!(!expired.is_empty(), "no Expired event for ttl-delete");
    assert!(
        processes_mentioning(&del_uid).is_empty(),
        "VMM of the expired capsule left running"
    );
    let held = cl.held().await;
    assert!(
        held.values().flatten().all(|(u, _)| *u != del_uid),
        "the expired capsule is still held: {held:?}"
    );
    for a in &cl.agents {
        let left = capsule_namespaces(&a.netns_dir);
        assert!(
            !left.contains(&capsule_netns(&del_uid)),
            "namespace of the expired capsule left on {}: {left:?}",
            a.node_name
        );
    }

    // onExpiry: Suspend: Suspended for that reason, the VMM gone, the
    // memory image kept on the node.
    let sus = cl
        .wait(
            "ttl-suspend",
            "Suspended on expiry",
            Duration::from_secs(180),
            |c| {
                c.status.as_ref().is_some_and(|s| {
                    s.phase == Some(CapsulePhase::Suspended)
                        && s.conditions.iter().any(|c| {
                            c.type_ == ConditionType::Suspended
                                && c.reason == Reason::SuspendedOnExpiry
                        })
                })
            },
        )
        .await;
    assert!(
        processes_mentioning(&sus_uid).is_empty(),
        "a VMM still runs for a capsule suspended on expiry"
    );
    let held = cl.held().await;
    assert!(
        held[&node_of(&sus)].contains(&(sus_uid.clone(), pb::CapsuleState::Suspended as i32)),
        "agent view of the suspended capsule: {held:?}"
    );
    // Its spec still says Running, so it stays expired until its lifecycle
    // allows more time; given more, it resumes with its state.
    let (code, out, err) = cl.kubectl(&[
        "patch",
        "capsule",
        "ttl-suspend",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"lifecycle":{"shutdownAfter":"2h"}}}"#,
    ]);
    assert_eq!(code, 0, "kubectl patch: {out}{err}");
    let sus = cl.wait_phase("ttl-suspend", CapsulePhase::Running).await;
    assert_eq!(cl.sh(&sus, "cat /root/marker").await.trim(), "kept");

    cl.delete_all(&["sandbox-1", "ttl-suspend", "notebook-1"])
        .await;
    for file in ["01-template.yaml", "02-template-warm.yaml"] {
        let file = examples.join(file).display().to_string();
        // The capsule in the warm file is deleted already.
        let (code, out, err) =
            cl.kubectl(&["delete", "-f", &file, "--wait=false", "--ignore-not-found"]);
        assert_eq!(code, 0, "kubectl delete: {out}{err}");
    }
    cl.wait_gone(&templates, "template", Instant::now()).await;
    // The warm template took its snapshots with it, on both nodes.
    for a in &cl.agents {
        let mut c = a.connect().await.unwrap();
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            !info.snapshots.contains(&warm_id),
            "warm snapshot left on {}: {:?}",
            a.node_name,
            info.snapshots
        );
    }
    drop(verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_in_the_middle_of_a_create_converges() {
    let Some((verdict, _serial, image, mut cl)) =
        start("operator_vm::kill9_in_the_middle_of_a_create_converges", 2).await
    else {
        return;
    };
    cl.apply_base_template().await;

    // Applies `name` and returns 1.5 s after its VMM started: the agent's
    // CreateCapsule is in flight, the guest still booting (about 7 s under
    // TCG). Returns the UID and the node.
    async fn create_in_flight(cl: &Cluster, name: &str) -> (String, String) {
        apply(&cl.client, &cl.ns, &capsule_manifest(name, "base"), MANAGER)
            .await
            .unwrap();
        let applied = Instant::now();
        let uid = cl.caps().get(name).await.unwrap().uid().unwrap();
        cl.wait_vmm(&uid, cl.boot_wait()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cap = cl.caps().get(name).await.unwrap();
        let phase = cap.status.as_ref().and_then(|s| s.phase);
        assert!(
            phase != Some(CapsulePhase::Running),
            "{name} Running before the kill: not a create in flight"
        );
        eprintln!(
            "{name}: {:.1} s after apply, VMM up, phase {phase:?}: killing",
            applied.elapsed().as_secs_f64()
        );
        (uid, node_of(&cap))
    }

    // (a) kill -9 of the agent creating it; restarted a moment later.
    let (a_uid, node) = create_in_flight(&cl, "mid-agent").await;
    assert!(!node.is_empty(), "a VMM runs, yet no node is recorded");
    let killed = Instant::now();
    cl.agent(&node).kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let agent = cl.agent(&node);
        tokio::task::block_in_place(|| agent.spawn()).unwrap();
    }
    let a = cl.wait_phase("mid-agent", CapsulePhase::Running).await;
    eprintln!(
        "figure: kill -9 of the agent mid-create (restarted after 1 s): Running {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    cl.assert_single(&a_uid).await;
    assert_eq!(
        cl.sh(&a, "uname -r").await.trim(),
        image.kernel_release,
        "mid-agent answers"
    );

    // (b) kill -9 of the operator while it waits on a create; restarted.
    let (b_uid, _) = create_in_flight(&cl, "mid-op").await;
    let killed = Instant::now();
    cl.operator.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cl.operator = {
        let opts = cl.opts.clone();
        tokio::task::spawn_blocking(move || OperatorProcess::start(&opts))
            .await
            .unwrap()
            .unwrap()
    };
    let b = cl.wait_phase("mid-op", CapsulePhase::Running).await;
    eprintln!(
        "figure: kill -9 of the operator mid-create (restarted after 2 s): Running {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    cl.wait_phase("mid-agent", CapsulePhase::Running).await;
    cl.assert_single(&b_uid).await;
    cl.assert_single(&a_uid).await;
    assert_eq!(
        cl.sh(&b, "uname -r").await.trim(),
        image.kernel_release,
        "mid-op answers"
    );
    let all: Vec<(String, i32)> = cl.held().await.into_values().flatten().collect();
    assert_eq!(all.len(), 2, "agents hold {all:?}");

    cl.delete_all(&["mid-agent", "mid-op"]).await;
    drop(verdict);
}

/// The warm example: built on both nodes (start command run, port open,
/// snapshot), Ready per node; its capsule restores the snapshot with the
/// server already running. Returns the warm snapshot's id.
async fn warm_template_serves(cl: &mut Cluster, applied: Instant) -> String {
    let templates: Api<CapsuleTemplate> = Api::namespaced(cl.client.clone(), &cl.ns);
    let t0 = Instant::now();
    let tpl = loop {
        let t = templates.get("jupyter-warm").await.unwrap();
        let st = t.status.clone().unwrap_or_default();
        if st.nodes.len() == 2 && st.nodes.iter().all(|n| n.snapshot_ready) {
            break t;
        }
        assert!(
            t0.elapsed() < cl.boot_wait(),
            "warm template not built on both nodes: {st:?}\n{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let st = tpl.status.unwrap();
    assert_eq!(st.phase, Some(TemplatePhase::Ready));
    let ready = find_condition(&st.conditions, ConditionType::Ready).unwrap();
    assert_eq!(
        (ready.reason.as_str(), ready.message.as_str()),
        ("WarmSnapshotReady", "warm snapshot on 2/2 nodes")
    );
    eprintln!(
        "figure: warm template built on both nodes {:.1} s after kubectl apply",
        applied.elapsed().as_secs_f64()
    );
    let nb = cl.wait_phase("notebook-1", CapsulePhase::Running).await;
    let since = nb
        .status
        .as_ref()
        .and_then(|s| s.started_at.as_ref())
        .map(|t| t.0)
        .unwrap();
    let made = nb.metadata.creation_timestamp.as_ref().unwrap().0;
    eprintln!(
        "figure: notebook-1 from the warm snapshot: started {:.1} s after apply (waits for the build)",
        since.duration_since(made).as_secs_f64()
    );
    // The server the start command launched is already up in the capsule,
    // started before the snapshot (its pid is in the marker).
    let marker = cl.sh(&nb, "wget -qO- http://127.0.0.1:8888/marker").await;
    let pid = marker
        .trim()
        .strip_prefix("warm ")
        .unwrap_or_else(|| panic!("marker: {marker:?}"));
    let ps = cl.sh(&nb, "ps").await;
    assert!(
        ps.lines()
            .any(|l| l.split_whitespace().next() == Some(pid) && l.contains("httpd")),
        "httpd (pid {pid}) not running: {ps}"
    );
    // Held by its node, once.
    let held = cl.held().await;
    let uid = nb.uid().unwrap();
    assert!(held[&node_of(&nb)].iter().any(|(u, _)| *u == uid));
    // The id the capsule restored from, for the cleanup check.
    let info = {
        let node = node_of(&nb);
        let mut c = cl.agent(&node).connect().await.unwrap();
        c.node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let tpl_uid = templates.get("jupyter-warm").await.unwrap().uid().unwrap();
    info.snapshots
        .iter()
        .find(|s| s.starts_with(&format!("w-{tpl_uid}-")))
        .cloned()
        .unwrap_or_else(|| panic!("no warm snapshot listed: {:?}", info.snapshots))
}
