//! Tier 3 (vm) end to end: the real `wrenn-operator` binary against the real
//! kube-apiserver, driving two real node agents, each playing a node in its
//! own network namespace and booting real guests under QEMU TCG. A user's
//! view: apply, watch the phase, exec, change `operatingMode`, survive
//! kill -9 of an agent and of the operator, delete — and nothing left over.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::{Capsule, CapsuleSnapshot};
use wrenn_e2e::ControlPlane;
use wrenn_e2e::agent::{AgentOptions, GuestImage, NodeAgent, Pki, exec};
use wrenn_e2e::leaks::{capsule_namespaces, processes_mentioning};
use wrenn_e2e::local::{
    OperatorOptions, OperatorProcess, apply, capsule_manifest, register_agent, template_manifest,
};
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::{Tier, case, need_program, need_root};

const MANAGER: &str = "e2e";

struct Cluster {
    client: Client,
    ns: String,
    agents: Vec<NodeAgent>,
    operator: OperatorProcess,
    opts: OperatorOptions,
    _dir: tempfile::TempDir,
}

impl Cluster {
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
        self.wait(
            name,
            &format!("phase {phase:?}"),
            Duration::from_secs(300),
            |c| c.status.as_ref().and_then(|s| s.phase) == Some(phase),
        )
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

async fn setup(image: &GuestImage) -> Cluster {
    let cp = ControlPlane::shared().unwrap();
    let client = cp.client().await.unwrap();
    let ns = wrenn_e2e::temp_namespace(&client, "opvm").await.unwrap();
    // Certificates and the operator's log; removed with the Cluster (a
    // failure prints the log tails first).
    let tmp = tempfile::Builder::new()
        .prefix("wrenn-opvm-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    // One CA for the operator and both agents, as the chart makes it.
    let pki = Pki::create(&dir.join("pki"), std::net::Ipv4Addr::LOCALHOST).unwrap();
    let base = 1 + (std::process::id() % 120) as u8 * 2;
    let mut agents = Vec::new();
    for (i, suffix) in ["a", "b"].iter().enumerate() {
        let opts = AgentOptions {
            node_name: format!("{}{suffix}", wrenn_testkit::unique_name("v")),
            index: base + i as u8,
            image: image.clone(),
            pki: Some(pki.clone()),
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
        client,
        ns,
        agents,
        operator,
        opts,
        _dir: tmp,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drives_real_agents_through_a_capsules_life() {
    let c = case(
        Tier::Vm,
        "operator_vm::operator_drives_real_agents_through_a_capsules_life",
    );
    if let Err(why) = need_root()
        .and_then(|_| need_program("qemu-system-x86_64"))
        .and_then(|_| need_program("vhost-device-vsock"))
        .and_then(|_| need_program("openssl"))
    {
        return c.skip(why);
    }
    if let Err(why) = ControlPlane::shared() {
        return c.skip(format!("no control plane: {why}"));
    }
    let image = match tokio::task::spawn_blocking(GuestImage::build)
        .await
        .unwrap()
    {
        Ok(i) => i,
        Err(e) => return c.skip(format!("no guest image: {e:#}")),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cl = setup(&image).await;
    let ns = cl.ns.clone();

    apply(
        &cl.client,
        &ns,
        &template_manifest("base", &image.rootfs()),
        MANAGER,
    )
    .await
    .unwrap();
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
    let uids = [uid.clone(), two.uid().unwrap(), three.uid().unwrap()];
    for name in ["one", "two", "three"] {
        cl.caps()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    snaps
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    cl.wait_gone(&cl.caps(), "capsules", t0).await;
    cl.wait_gone(&snaps, "snapshot", t0).await;
    let held = cl.held().await;
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
    for a in &cl.agents {
        let left = capsule_namespaces(&a.netns_dir);
        assert!(
            left.is_empty(),
            "namespaces left on {}: {left:?}",
            a.node_name
        );
    }
    drop(c);
}
