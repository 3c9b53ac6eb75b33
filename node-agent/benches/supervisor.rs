//! Supervisor overheads with the fake VMM and network and real qcow2
//! overlay files for disks: agent RSS
//! idle and with 1,000 capsules tracked (aim: at most 40 MiB), the time each lifecycle step costs
//! the supervisor itself (journal writes with fsync included, VMM time
//! excluded), and recovery of 1,000 capsules. The state dir is a temp dir on
//! the machine's disk, so fsync costs are real.
//!
//! `cargo bench -p wrenn-node-agent --bench supervisor`

use std::sync::Arc;
use std::time::{Duration, Instant};

use wrenn_node_agent::capsule::OrphanSweep;
#[path = "support/capsule_spec.rs"]
mod capsule_spec;

use capsule_spec::{spec, supervisor};
#[path = "support/rss.rs"]
mod rss;
use rss::rss_kib;
use wrenn_node_agent::capsule::State;
use wrenn_node_agent::network::FakeNet;
use wrenn_node_agent::storage::{BlockStore, Qcow2Store, StorageConfig};
use wrenn_node_agent::vmm::FakeMachine;

const CAPSULES: usize = 1000;

struct Samples(Vec<Duration>);

impl Samples {
    fn report(&mut self, what: &str) {
        self.0.sort();
        let n = self.0.len();
        let pct = |p: usize| self.0[(n * p / 100).min(n - 1)];
        println!(
            "  {what:<28} n={n:<4} median {:>8.3} ms   p95 {:>8.3} ms",
            pct(50).as_secs_f64() * 1e3,
            pct(95).as_secs_f64() * 1e3
        );
    }
}

fn main() {
    let rt = wrenn_testkit::runtime();
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let machine = Arc::new(FakeMachine::new());
    let net = Arc::new(FakeNet::new());
    let template = dir.path().join("base.ext4");
    std::fs::write(&template, vec![0u8; 1 << 20]).expect("template");
    let store: Arc<dyn BlockStore> =
        Arc::new(Qcow2Store::open(StorageConfig::new(dir.path().join("disks"))).expect("store"));
    let sup = supervisor(dir.path(), &machine, &net, &store);
    let idle = rss_kib();
    println!(
        "supervisor bench (fake VMM and network, qcow2 disk files; state on {})",
        dir.path().display()
    );
    println!("  agent RSS idle (supervisor built)     {idle} KiB");

    let uids: Vec<String> = (0..CAPSULES).map(|i| format!("cap-{i:04}")).collect();
    let mut create = Samples(Vec::new());
    for (i, uid) in uids.iter().enumerate() {
        let t = Instant::now();
        rt.block_on(sup.create(uid, spec(i, &template), State::Running))
            .expect("create");
        create.0.push(t.elapsed());
    }
    let full = rss_kib();
    println!(
        "  agent RSS with {CAPSULES} capsules tracked   {full} KiB (+{} KiB, {:.1} KiB per capsule)",
        full.saturating_sub(idle),
        full.saturating_sub(idle) as f64 / CAPSULES as f64
    );

    println!("per-step supervisor overhead:");
    create.report("create");
    let mut steps: Vec<(&str, Samples)> = [
        "pause",
        "resume (paused)",
        "suspend",
        "resume (suspended)",
        "snapshot",
        "delete",
    ]
    .into_iter()
    .map(|s| (s, Samples(Vec::new())))
    .collect();
    for (i, uid) in uids.iter().enumerate() {
        let t = Instant::now();
        rt.block_on(sup.pause(uid)).expect("pause");
        steps[0].1.0.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(sup.resume(uid)).expect("resume");
        steps[1].1.0.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(sup.suspend(uid)).expect("suspend");
        steps[2].1.0.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(sup.resume(uid)).expect("restore");
        steps[3].1.0.push(t.elapsed());
        if i % 4 == 0 {
            let t = Instant::now();
            rt.block_on(sup.snapshot(uid, &format!("snap-{i}"), true))
                .expect("snapshot");
            steps[4].1.0.push(t.elapsed());
        }
    }

    // Recovery of every capsule by a fresh supervisor.
    sup.shutdown();
    drop(sup);
    let sup = supervisor(dir.path(), &machine, &net, &store);
    let t = Instant::now();
    let report = rt
        .block_on(sup.recover(&OrphanSweep::default()))
        .expect("recover");
    let recovery = t.elapsed();
    println!(
        "  recovery of {} capsules          {:.1} ms ({} adopted)",
        CAPSULES,
        recovery.as_secs_f64() * 1e3,
        report.adopted.len()
    );

    for uid in &uids {
        let t = Instant::now();
        rt.block_on(sup.delete(uid)).expect("delete");
        steps[5].1.0.push(t.elapsed());
    }
    for (name, mut s) in steps {
        s.report(name);
    }
    println!("  agent RSS after deleting all          {} KiB", rss_kib());
}
