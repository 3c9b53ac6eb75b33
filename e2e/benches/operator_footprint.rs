//! The operator's resident memory with 5,000 Capsules: the shipped
//! `wrenn-operator` binary as its own process on the Go-built
//! kube-apiserver, watching a namespace that holds one CapsuleTemplate and
//! 5,000 Capsules of it and no node agent. Every Capsule is reconciled
//! (placement finds no node and says so in its status) and stays in the
//! operator's caches and work queue, so what is measured is the operator's
//! footprint per object it tracks, not an agent connection per node.
//! Prints RSS idle (operator started on the empty namespace), with every
//! Capsule reconciled, and the peak (`VmHWM`); aim: at most 150 MiB.
//!
//! `cargo bench -p wrenn-e2e --bench operator_footprint` (as root; needs
//! the control plane binaries, like the cluster tier).
//! `WRENN_BENCH_OBJECTS` changes the count; `WRENN_E2E_RELEASE=1` runs the
//! operator built as it ships (release).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kube::api::{Api, ListParams, PostParams};
use wrenn_crds::{Capsule, CapsuleTemplate};
use wrenn_e2e::ControlPlane;
use wrenn_e2e::agent::Pki;
use wrenn_e2e::local::{OperatorOptions, OperatorProcess, capsule_manifest, template_manifest};
use wrenn_testkit::status_kib;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// How many Capsules of `ns` carry a status the operator wrote.
async fn reconciled(api: &Api<Capsule>) -> usize {
    let mut n = 0;
    let mut lp = ListParams::default().limit(1000);
    loop {
        let Ok(page) = api.list(&lp).await else {
            return n;
        };
        n += page
            .items
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
            .count();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => return n,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let objects: usize = std::env::var("WRENN_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let cp = match ControlPlane::shared() {
        Ok(cp) => cp,
        Err(why) => {
            println!("operator footprint bench skipped: {why}");
            return;
        }
    };
    let client = cp.client().await.unwrap();
    let ns = wrenn_e2e::node_images_namespace(&client, "opfoot")
        .await
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("wrenn-opfoot-")
        .tempdir()
        .unwrap();
    let pki = Pki::create(&dir.path().join("pki"), std::net::Ipv4Addr::LOCALHOST).unwrap();
    let opts = OperatorOptions {
        kubeconfig: cp.kubeconfig.clone(),
        agent_namespace: ns.clone(),
        watch_namespace: Some(ns.clone()),
        pki,
        log: dir.path().join("operator.log"),
        node_lost_timeout_secs: 30,
    };
    let op = tokio::task::spawn_blocking(move || OperatorProcess::start(&opts))
        .await
        .unwrap()
        .unwrap();
    let pid = op.pid().unwrap().to_string();
    // Its caches filled (empty) and the first watches open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = status_kib(&pid, "VmRSS");

    let tpl: CapsuleTemplate =
        serde_json::from_value(template_manifest("base", "rootfs.ext4")).unwrap();
    Api::<CapsuleTemplate>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &tpl)
        .await
        .unwrap();
    let caps: Api<Capsule> = Api::namespaced(client.clone(), &ns);
    let t = Instant::now();
    futures::stream::iter(0..objects)
        .for_each_concurrent(32, |i| {
            let caps = caps.clone();
            async move {
                let body: Capsule =
                    serde_json::from_value(capsule_manifest(&format!("c{i:05}"), "base")).unwrap();
                caps.create(&PostParams::default(), &body).await.unwrap();
            }
        })
        .await;
    let created = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done = reconciled(&caps).await;
    while done < objects && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        done = reconciled(&caps).await;
    }
    let all = t.elapsed();
    // Settled: the status writes done, the requeues of unplaced capsules
    // ticking.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let full = status_kib(&pid, "VmRSS");
    let peak = status_kib(&pid, "VmHWM");
    let build = if wrenn_e2e::build::release_binaries() {
        "release"
    } else {
        "debug"
    };
    println!(
        "operator footprint bench ({build} build of wrenn-operator, its own process; {objects} Capsules created in {:.1} s, {done} reconciled after {:.1} s)",
        created.as_secs_f64(),
        all.as_secs_f64()
    );
    println!(
        "  operator RSS idle (empty namespace)        {:>7.1} MiB",
        mib(idle)
    );
    println!(
        "  operator RSS with {objects} Capsules tracked  {:>7.1} MiB (+{:.1} KiB per Capsule)",
        mib(full),
        full.saturating_sub(idle) as f64 / objects as f64
    );
    println!(
        "  operator peak RSS (VmHWM)                  {:>7.1} MiB",
        mib(peak)
    );
    if done < objects {
        println!(
            "  only {done} of {objects} Capsules reconciled in 600 s; operator log tail:\n{}",
            op.log_tail()
        );
    }
    drop(op);
}
