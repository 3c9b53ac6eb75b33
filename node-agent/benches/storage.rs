//! qcow2 overlay creation: our header writer through `Qcow2Store` (what a
//! capsule pays), next to `qemu-img create` for the same overlay (what
//! shelling out would cost). Run: `cargo bench -p wrenn-node-agent --bench storage`.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use wrenn_node_agent::storage::{BlockStore, CapsuleId, DiskRequest, Qcow2Store, StorageConfig};

const RUNS: usize = 50;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name}: n={} median={:?} p99={:?} min={:?} max={:?}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        samples[0],
        samples[samples.len() - 1]
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("template.ext4");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let store = Qcow2Store::open(StorageConfig::new(dir.path().join("disks"))).unwrap();

    let mut ours = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let req = DiskRequest {
            capsule: CapsuleId::new(&format!("bench-{i}")).unwrap(),
            template: base.clone(),
            size_bytes: 4 << 30,
        };
        let t = Instant::now();
        store.ensure_disk(&req).unwrap();
        ours.push(t.elapsed());
    }
    summary(
        "qcow2 overlay create (Qcow2Store::ensure_disk, 4 GiB over 2 GiB raw)",
        ours,
    );
    let mut removes = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let id = CapsuleId::new(&format!("bench-{i}")).unwrap();
        let t = Instant::now();
        store.remove_disk(&id).unwrap();
        removes.push(t.elapsed());
    }
    summary("qcow2 overlay remove", removes);

    if Command::new("qemu-img").arg("--version").output().is_ok() {
        let mut qemu = Vec::with_capacity(RUNS);
        for i in 0..RUNS {
            let out = dir.path().join(format!("q{i}.qcow2"));
            let t = Instant::now();
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&out)
                .arg("4G")
                .status()
                .unwrap();
            qemu.push(t.elapsed());
            assert!(st.success());
        }
        summary(
            "qcow2 overlay create (qemu-img create, for comparison)",
            qemu,
        );
    } else {
        println!("qemu-img not found: comparison skipped");
    }
}
