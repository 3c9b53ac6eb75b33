//! Journal writes under concurrency: 50 capsules created at once on the
//! fake VMM and network with real qcow2 overlay files, the state dir on the
//! machine's disk so fsyncs are real. Prints create p50/p99, journal
//! records per second and fsyncs per create through the group committer,
//! then the journal layer alone, before/after: the same records written
//! one fsync pair each on the tokio workers (what `Ctx::commit` did) and
//! through `GroupCommit` (a batch applied to the files and made durable by
//! one `fdatasync` of the journal's write-ahead log).
//!
//! `cargo bench -p wrenn-node-agent --bench journal`

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/capsule_spec.rs"]
mod capsule_spec;

use capsule_spec::{spec, supervisor};
use wrenn_node_agent::capsule::State;
use wrenn_node_agent::network::FakeNet;
use wrenn_node_agent::state::{GroupCommit, Journal};
use wrenn_node_agent::storage::{BlockStore, Qcow2Store, StorageConfig};
use wrenn_node_agent::vmm::FakeMachine;

const CONCURRENT: usize = 50;
const ROUNDS: usize = 4;
/// Records per capsule in the journal-only comparison (a create writes
/// about this many).
const RECORDS_PER_CAPSULE: usize = 6;

fn pct(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    let n = v.len();
    v[(n * p / 100).min(n - 1)].as_secs_f64() * 1e3
}

#[derive(serde::Serialize)]
struct Rec<'a> {
    uid: &'a str,
    n: usize,
    pad: &'a str,
}

fn main() {
    let rt = capsule_spec::runtime();
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let template = dir.path().join("base.ext4");
    std::fs::write(&template, vec![0u8; 1 << 20]).expect("template");
    let store: Arc<dyn BlockStore> =
        Arc::new(Qcow2Store::open(StorageConfig::new(dir.path().join("disks"))).expect("store"));
    let sup = supervisor(
        dir.path(),
        &Arc::new(FakeMachine::new()),
        &Arc::new(FakeNet::new()),
        &store,
    );
    println!(
        "journal bench: {CONCURRENT} concurrent creates x {ROUNDS} rounds (fake VMM and network, qcow2 files; state on {})",
        dir.path().display()
    );
    let mut lat = Vec::new();
    let before = sup.journal_stats();
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let sup = sup.clone();
                let spec = spec(i, &template);
                rt.spawn(async move {
                    let t = Instant::now();
                    sup.create(&format!("r{round}-c{i:02}"), spec, State::Running)
                        .await
                        .expect("create");
                    t.elapsed()
                })
            })
            .collect();
        for t in tasks {
            lat.push(rt.block_on(t).expect("task"));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let s = sup.journal_stats();
    let creates = (CONCURRENT * ROUNDS) as f64;
    let records = (s.records - before.records) as f64;
    println!(
        "  create (group commit)   p50 {:>7.2} ms   p99 {:>7.2} ms",
        pct(&mut lat, 50),
        pct(&mut lat, 99)
    );
    println!(
        "  journal                 {:.0} records/s, {:.1} records, {:.2} batches and {:.1} fsyncs per create",
        records / wall,
        records / creates,
        (s.batches - before.batches) as f64 / creates,
        (s.fsyncs - before.fsyncs) as f64 / creates
    );
    sup.shutdown();

    // The journal layer alone, same records, before and after.
    let pad = "x".repeat(1500);
    let total = CONCURRENT * RECORDS_PER_CAPSULE;
    let inline = Journal::new(&dir.path().join("inline"));
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let j = inline.clone();
            let pad = pad.clone();
            rt.spawn_blocking(move || {
                let uid = format!("c{i}");
                for n in 0..RECORDS_PER_CAPSULE {
                    j.write(
                        &uid,
                        &Rec {
                            uid: &uid,
                            n,
                            pad: &pad,
                        },
                    )
                    .expect("write");
                }
            })
        })
        .collect();
    for task in tasks {
        rt.block_on(task).expect("task");
    }
    let one_by_one = t.elapsed().as_secs_f64();
    let gc = GroupCommit::start(Journal::new(&dir.path().join("grouped")));
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let gc = gc.clone();
            let pad = pad.clone();
            rt.spawn(async move {
                let uid = format!("c{i}");
                for n in 0..RECORDS_PER_CAPSULE {
                    gc.write(
                        &uid,
                        &Rec {
                            uid: &uid,
                            n,
                            pad: &pad,
                        },
                    )
                    .await
                    .expect("write");
                }
            })
        })
        .collect();
    for task in tasks {
        rt.block_on(task).expect("task");
    }
    let grouped = t.elapsed().as_secs_f64();
    let g = gc.stats();
    println!(
        "  {total} records from {CONCURRENT} writers, before (fsync pair each, on the 2 tokio workers): {:.0} records/s, 2.0 fsyncs per record",
        total as f64 / one_by_one
    );
    println!(
        "  {total} records from {CONCURRENT} writers, after (group commit + log):        {:.0} records/s, {:.2} fsyncs per record, {:.1} records per batch",
        total as f64 / grouped,
        g.fsyncs as f64 / total as f64,
        g.records as f64 / g.batches.max(1) as f64
    );
}
