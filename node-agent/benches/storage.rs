//! A capsule's copy-on-write root disk over a 1 GiB template (its data
//! written, not sparse): our qcow2 header writer through `Qcow2Store`
//! (what a capsule pays), next to `qemu-img create` for the same overlay
//! (what shelling out would cost) and a full copy of the template made
//! durable (what a disk without copy-on-write would cost), in one run.
//! Run: `cargo bench -p wrenn-node-agent --bench storage`.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use wrenn_node_agent::storage::{BlockStore, CapsuleId, DiskRequest, Qcow2Store, StorageConfig};

const RUNS: usize = 50;
const COPIES: usize = 3;
const TEMPLATE_BYTES: usize = 1 << 30;

/// A template of `TEMPLATE_BYTES` of written data, durable.
fn template(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..(8usize << 20)).map(|i| (i % 251) as u8 | 1).collect();
    for _ in 0..TEMPLATE_BYTES / chunk.len() {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// Full copies of `base`, each made durable; removed after.
fn full_copies(dir: &std::path::Path, base: &std::path::Path) -> Vec<Duration> {
    (0..COPIES)
        .map(|i| {
            let to = dir.join(format!("copy{i}.ext4"));
            let t = Instant::now();
            std::fs::copy(base, &to).unwrap();
            std::fs::File::open(&to).unwrap().sync_all().unwrap();
            let took = t.elapsed();
            std::fs::remove_file(&to).unwrap();
            took
        })
        .collect()
}

/// Prints the figures of `samples`; returns the median.
fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
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
    pct(0.5)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("template.ext4");
    template(&base);
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
    let ours = summary(
        "qcow2 overlay create (Qcow2Store::ensure_disk, 4 GiB over 1 GiB raw)",
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

    let copies = summary(
        "full copy of the 1 GiB template (std::fs::copy + fsync)",
        full_copies(dir.path(), &base),
    );
    println!(
        "copy-on-write create vs full copy (medians, same run): {:.0}x faster",
        copies.as_secs_f64() / ours.as_secs_f64()
    );
}
