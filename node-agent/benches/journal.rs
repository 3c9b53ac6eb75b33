//! Capsule creates on the fake VMM with real qcow2 disk files and the
//! journal on a fresh journaled ext4 (a loop device over a file on the
//! machine's disk, so fsyncs are real; `testkit::ScratchExt4` says why not
//! the root filesystem), three times: on the fake network, on the real one
//! (TAP, namespace, nftables, routes in a node namespace made for the run,
//! `tests/network_env`), and on the real one with pooled namespaces. For
//! each: creates one after the other, then 50 at once x 4 rounds: p50/p99,
//! throughput, CPU per create (and the kernel's part of it), the least
//! median a burst of 50 can have at that throughput (the burst's median
//! create finishes after half of the 50 are done), and the least median
//! and last any code could reach with that much CPU on this machine's
//! cores. Then the journal layer alone, before/after: the same records
//! written one fsync pair each on the tokio workers (what `Ctx::commit`
//! did) and through `GroupCommit` (a batch applied to the files and made
//! durable by one `fdatasync` of the journal's write-ahead log).
//!
//! `JOURNAL_BENCH_ONLY=pooled` runs only the scenarios so named;
//! `PERF_CTL=<fifo>` with `perf record -D -1 --control fifo:<fifo>`
//! profiles the bursts only.
//!
//! `cargo bench -p wrenn-node-agent --bench journal`

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/capsule_spec.rs"]
mod capsule_spec;
#[path = "../tests/network_env/mod.rs"]
mod network_env;

use capsule_spec::{spec, supervisor_on};
use wrenn_node_agent::capsule::{State, Supervisor};
use wrenn_node_agent::network::{FakeNet, NetOps};
use wrenn_node_agent::state::{GroupCommit, Journal};
use wrenn_node_agent::storage::{BlockStore, Qcow2Store, StorageConfig};
use wrenn_node_agent::vmm::FakeMachine;

const CONCURRENT: usize = 50;
const ROUNDS: usize = 4;
const SEQUENTIAL: usize = 30;
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

/// The records one writer writes for capsule `uid`, in order.
fn records<'a>(uid: &'a str, pad: &'a str) -> impl Iterator<Item = Rec<'a>> {
    (0..RECORDS_PER_CAPSULE).map(move |n| Rec { uid, n, pad })
}

/// CPU time this process used so far, every thread: (user, kernel).
fn cpu_time() -> (Duration, Duration) {
    use nix::sys::resource::{UsageWho, getrusage};
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().unsigned_abs())
            + Duration::from_micros(t.tv_usec().unsigned_abs())
    };
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| (tv(u.user_time()), tv(u.system_time())))
        .unwrap_or_default()
}

/// Whether scenario `what` runs: all, unless `JOURNAL_BENCH_ONLY` names
/// some (comma-separated words of their names, e.g. `pooled`), so one
/// scenario can be profiled alone.
fn wanted(what: &str) -> bool {
    std::env::var("JOURNAL_BENCH_ONLY")
        .map(|only| only.split(',').any(|w| what.contains(w.trim())))
        .unwrap_or(true)
}

/// Sends `cmd` to the `perf record --control fifo:` FIFO that
/// `PERF_CTL` names, so a profile started with `-D -1` covers the bursts
/// only.
fn perf_ctl(cmd: &str) {
    if let Ok(fifo) = std::env::var("PERF_CTL") {
        std::fs::write(&fifo, format!("{cmd}\n")).expect("write to perf's control FIFO");
    }
}

/// Creates one after the other, then bursts of [`CONCURRENT`], each
/// after `settle` (waits for a namespace pool to refill); deletes them
/// all after.
fn scenario(
    rt: &tokio::runtime::Runtime,
    sup: &Supervisor<FakeMachine>,
    what: &str,
    template: &std::path::Path,
    settle: &dyn Fn(),
) {
    let mut uids = Vec::new();
    let mut one = Vec::new();
    settle();
    for i in 0..SEQUENTIAL {
        let uid = format!("s-{i:02}");
        let t = Instant::now();
        rt.block_on(sup.create(&uid, spec(i, template), State::Running))
            .expect("create");
        one.push(t.elapsed());
        uids.push(uid);
    }
    println!(
        "  {what:<13} 1 in flight    p50 {:>7.2} ms   p99 {:>7.2} ms",
        pct(&mut one, 50),
        pct(&mut one, 99)
    );
    let mut lat = Vec::new();
    let before = sup.journal_stats();
    // The bursts only: a pool's refill between them is left out.
    let (mut wall, mut user, mut sys) = (0.0, Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        settle();
        perf_ctl("enable");
        let (t0, cpu0) = (Instant::now(), cpu_time());
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let sup = sup.clone();
                let spec = spec(SEQUENTIAL + round * CONCURRENT + i, template);
                let uid = format!("r{round}-c{i:02}");
                uids.push(uid.clone());
                rt.spawn(async move {
                    let t = Instant::now();
                    sup.create(&uid, spec, State::Running)
                        .await
                        .expect("create");
                    t.elapsed()
                })
            })
            .collect();
        for t in tasks {
            lat.push(rt.block_on(t).expect("task"));
        }
        wall += t0.elapsed().as_secs_f64();
        perf_ctl("disable");
        let (u, k) = cpu_time();
        user += u - cpu0.0;
        sys += k - cpu0.1;
    }
    let s = sup.journal_stats();
    let creates = (CONCURRENT * ROUNDS) as f64;
    let records = (s.records - before.records) as f64;
    let rate = creates / wall;
    println!(
        "  {what:<13} {CONCURRENT} at once     p50 {:>7.2} ms   p99 {:>7.2} ms   {rate:.0} creates/s, {:.2} ms CPU per create ({:.2} ms of it in the kernel); at this rate a burst's median is at least {:.1} ms",
        pct(&mut lat, 50),
        pct(&mut lat, 99),
        (user + sys).as_secs_f64() * 1e3 / creates,
        sys.as_secs_f64() * 1e3 / creates,
        (CONCURRENT as f64 / 2.0) / rate * 1e3,
    );
    // What the CPU alone allows, whatever the code waits for: the burst's
    // median create cannot finish before half the burst's CPU time has
    // run on every core, nor its last before all of it.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floor = |cpu: Duration, share: f64| {
        cpu.as_secs_f64() * 1e3 / creates * CONCURRENT as f64 * share / cores
    };
    println!(
        "  {what:<13} CPU floor      on {cores} cores a burst's median is at least {:.1} ms and its last create {:.1} ms ({:.1} / {:.1} ms from the kernel's part alone)",
        floor(user + sys, 0.5),
        floor(user + sys, 1.0),
        floor(sys, 0.5),
        floor(sys, 1.0),
    );
    println!(
        "  {what:<13} journal        {:.0} records/s, {:.1} records, {:.2} batches and {:.1} fsyncs per create",
        records / wall,
        records / creates,
        (s.batches - before.batches) as f64 / creates,
        (s.fsyncs - before.fsyncs) as f64 / creates
    );
    for uid in &uids {
        rt.block_on(sup.delete(uid)).expect("delete");
    }
}

fn main() {
    let rt = wrenn_testkit::runtime();
    // State and disks on a journaled ext4 made for the run, as on a node;
    // the machine's own root filesystem has no journal (see `ScratchExt4`).
    let scratch = wrenn_testkit::ScratchExt4::new(4096);
    let fallback;
    let (root, on) = match &scratch {
        Ok(fs) => (
            fs.path().to_path_buf(),
            "a fresh journaled ext4 on a direct-I/O loop device".to_string(),
        ),
        Err(why) => {
            fallback = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
            (
                fallback.path().to_path_buf(),
                format!("the machine's temp dir (no scratch ext4: {why})"),
            )
        }
    };
    let dir = root.as_path();
    let template = dir.join("base.ext4");
    std::fs::write(&template, vec![0u8; 1 << 20]).expect("template");
    let store: Arc<dyn BlockStore> =
        Arc::new(Qcow2Store::open(StorageConfig::new(dir.join("disks"))).expect("store"));
    let machine = Arc::new(FakeMachine::new());
    println!(
        "journal bench: creates on the fake VMM with qcow2 disk files (state on {on}, {}); {SEQUENTIAL} one after the other, then {CONCURRENT} at once x {ROUNDS} rounds",
        dir.display()
    );
    let fake: Arc<dyn NetOps> = Arc::new(FakeNet::new());
    if wanted("fake network") {
        let sup = supervisor_on(&dir.join("fake"), &machine, fake, &store);
        scenario(&rt, &sup, "fake network", &template, &|| {});
        sup.shutdown();
    }
    let real = wrenn_testkit::need_root().and_then(|()| {
        if std::path::Path::new("/dev/net/tun").exists() {
            Ok(())
        } else {
            Err("needs /dev/net/tun".to_string())
        }
    });
    match real {
        Ok(()) => {
            // Where a node keeps them: namespace files on a tmpfs (as
            // `/run/netns`), slot claims beside the journal. The bed's
            // default, a temp dir on the machine's root filesystem, would
            // charge each create the allocator cost `ScratchExt4` avoids.
            let run = tempfile::tempdir_in("/dev/shm").ok();
            let mut bed = network_env::Bed::new(true);
            if let Some(run) = &run {
                bed.cfg.netns_dir = run.path().join("netns");
            }
            bed.cfg.state_dir = dir.join("network");
            // Each create makes its namespace, then each takes one the
            // pool made ahead (refilled between bursts, as it is once
            // creates pause).
            for (what, pool) in [("real network", 0), ("real, pooled", CONCURRENT)] {
                if !wanted(what) {
                    continue;
                }
                bed.cfg.pool = pool;
                let net = Arc::new(bed.net());
                net.ensure_node().expect("ensure node");
                net.start_pool();
                let dyn_net: Arc<dyn NetOps> = net.clone();
                let state = dir.join(what.replace([' ', ','], ""));
                let sup = supervisor_on(&state, &machine, dyn_net, &store);
                let settle = || {
                    while net.pooled() < pool {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                };
                scenario(&rt, &sup, what, &template, &settle);
                sup.shutdown();
                drop(sup);
                drop(net);
            }
            // The reaper finishes the teardowns before the bed goes.
            let _ = bed.snapshot();
        }
        Err(why) => println!("  real network  skipped: {why}"),
    }

    // The journal layer alone, same records, before and after.
    let pad = "x".repeat(1500);
    let total = CONCURRENT * RECORDS_PER_CAPSULE;
    let inline = Journal::new(&dir.join("inline"));
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let j = inline.clone();
            let pad = pad.clone();
            rt.spawn_blocking(move || {
                let uid = format!("c{i}");
                for rec in records(&uid, &pad) {
                    j.write(&uid, &rec).expect("write");
                }
            })
        })
        .collect();
    for task in tasks {
        rt.block_on(task).expect("task");
    }
    let one_by_one = t.elapsed().as_secs_f64();
    let gc = GroupCommit::start(Journal::new(&dir.join("grouped")));
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let gc = gc.clone();
            let pad = pad.clone();
            rt.spawn(async move {
                let uid = format!("c{i}");
                for rec in records(&uid, &pad) {
                    gc.write(&uid, &rec).await.expect("write");
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
