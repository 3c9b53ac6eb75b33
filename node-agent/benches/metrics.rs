//! Cost of the metrics module for 100 capsules:
//! - memory of one capsule's history with all three rings full (24 h of
//!   1 s samples), and of 100 such histories, counted by the rings
//!   themselves and seen as the process's RSS growth;
//! - one sampling tick over 100 capsules with real sources: CPU from a
//!   real cgroup each (made under a unique parent, removed after), host RSS
//!   from `/proc/<pid>/status`, allocated bytes of a real file (`stat`, as
//!   the qcow2 store does) — reported per tick and per capsule;
//! - a `/metrics` encode and a 24 h `GetMetrics` with 100 capsules.
//!
//! Measured on the 2-CPU CI host (cgroup v1, other builds running): a full
//! history is 63,760 B per capsule (6.1 MiB for 100, matching RSS growth);
//! `record` 100-150 ns; a tick over 100 capsules ~3.4 ms median (~34 us
//! per capsule, mostly the cgroupfs and `/proc` reads, including the
//! start-time check against pid reuse); `/metrics` for 100
//! capsules ~19 KB in ~0.1 ms.
//!
//! The cgroup part needs root and prints why it is skipped otherwise. Run
//! with `cargo bench -p wrenn-node-agent --bench metrics`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wrenn_node_agent::metrics::{
    Error, Metrics, ProcSource, Reading, SampleSource, Series, SourceFuture, sampler,
};
use wrenn_node_agent::vmm::NetCounters;
use wrenn_node_agent::vmm::cgroup::{CgroupLimits, CgroupRoot};
use wrenn_node_agent::vmm::process::ProcessIdentity;

const CAPSULES: usize = 100;
const TICKS: usize = 50;

fn main() {
    history_memory();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("metrics bench: no tokio runtime: {e}");
            return;
        }
    };
    rt.block_on(sampling_cost());
}

fn rss_bytes() -> u64 {
    wrenn_testkit::status_kib("self", "VmRSS") * 1024
}

fn reading(t: u64) -> Reading {
    Reading {
        cpu_usage_ns: Some(t * 300_000_000),
        host_rss_bytes: Some(512 << 20),
        disk_allocated_bytes: Some(1 << 30),
        net: Some(NetCounters {
            rx_bytes: t * 1000,
            tx_bytes: t * 500,
        }),
        guest_memory_used_bytes: Some(200 << 20),
    }
}

fn history_memory() {
    const S: i64 = 1_000_000_000;
    let t0 = 1_800_000_000 * S;
    let mut one = Series::new();
    let empty = one.memory_bytes();
    let start = Instant::now();
    let samples = 2 * 86_400u64;
    for t in 0..samples {
        one.record(t0 + t as i64 * S, t * S as u64, &reading(t));
    }
    let record_ns = start.elapsed().as_nanos() as f64 / samples as f64;
    let full = one.memory_bytes();
    let rss_before = rss_bytes();
    let many: Vec<Series> = (0..CAPSULES).map(|_| one.clone()).collect();
    let rss_after = rss_bytes();
    let counted: usize = many.iter().map(Series::memory_bytes).sum();
    println!("metrics history: empty series {empty} B, full (24 h) series {full} B per capsule");
    println!(
        "metrics history: {CAPSULES} full series {:.2} MiB counted, process RSS +{:.2} MiB",
        counted as f64 / (1 << 20) as f64,
        rss_after.saturating_sub(rss_before) as f64 / (1 << 20) as f64
    );
    println!("metrics history: record() {record_ns:.0} ns per sample");
    let start = Instant::now();
    let day = one.range(t0, t0 + samples as i64 * S, Duration::ZERO);
    let q = start.elapsed();
    let start = Instant::now();
    let resp = wrenn_node_agent::metrics::proto::to_proto(&day);
    println!(
        "metrics history: 48 h range -> {} points at {} s in {:?}, to_proto in {:?}",
        resp.samples.len(),
        resp.resolution_seconds,
        q,
        start.elapsed()
    );
    drop(many);
}

/// CPU and RSS from a real cgroup and process, disk from a real file.
#[derive(Debug)]
struct BenchSource {
    proc: ProcSource,
    disk: PathBuf,
}

impl SampleSource for BenchSource {
    fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
        self.proc.cpu_usage_ns()
    }
    fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
        self.proc.host_rss_bytes()
    }
    fn disk_allocated_bytes(&self) -> SourceFuture<'_, u64> {
        let r = wrenn_node_agent::storage::file_allocated_bytes(&self.disk)
            .map(Some)
            .map_err(|e| Error::source("disk_allocated_bytes", e));
        Box::pin(std::future::ready(r))
    }
}

async fn sampling_cost() {
    if let Err(why) = wrenn_testkit::need_root() {
        println!("metrics sampling bench skipped: {why}");
        return;
    }
    let parent = format!("wrenn-mbench-{}", std::process::id());
    let cgroups = match CgroupRoot::detect(Path::new("/sys/fs/cgroup"), &parent) {
        Ok(c) => c,
        Err(e) => {
            println!("metrics sampling bench skipped: no cgroup mount ({e})");
            return;
        }
    };
    let dir = std::env::temp_dir().join(&parent);
    let unlimited = CgroupLimits {
        cpu_quota_us: None,
        memory_bytes: None,
    };
    let metrics = Metrics::new();
    let pid = std::process::id() as i32;
    let me = match wrenn_node_agent::sys::process::start_time_ticks(Path::new("/proc"), pid) {
        Ok(start_time_ticks) => ProcessIdentity {
            pid,
            start_time_ticks,
        },
        Err(e) => {
            println!("metrics sampling bench skipped: no /proc ({e})");
            return;
        }
    };
    let mut made = Vec::new();
    let setup = (|| -> Result<(), String> {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![1u8; 1 << 20]).map_err(|e| e.to_string())?;
        for i in 0..CAPSULES {
            let name = format!("c{i}");
            let cg = cgroups
                .ensure_capsule(&name, &unlimited)
                .map_err(|e| e.to_string())?;
            made.push(cg.clone());
            let source = BenchSource {
                proc: ProcSource::new(Path::new("/proc"), me, cg),
                disk: disk.clone(),
            };
            metrics.attach(&name, Arc::new(source));
        }
        Ok(())
    })();
    if let Err(why) = setup {
        println!("metrics sampling bench failed to set up: {why}");
    } else {
        let mut ticks = Vec::with_capacity(TICKS);
        for _ in 0..TICKS {
            let start = Instant::now();
            let report = sampler::tick(&metrics, Duration::from_secs(1)).await;
            ticks.push(start.elapsed());
            if report.errors > 0 {
                println!("metrics sampling bench: {report:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ticks.sort();
        let median = ticks[TICKS / 2];
        println!(
            "metrics sampling: {CAPSULES} capsules, tick median {median:?} (min {:?}, max {:?}), {:.1} us per capsule",
            ticks[0],
            ticks[TICKS - 1],
            median.as_secs_f64() * 1e6 / CAPSULES as f64
        );
        let start = Instant::now();
        let text = metrics.encode();
        println!(
            "metrics scrape: /metrics for {CAPSULES} capsules, {} bytes in {:?}",
            text.len(),
            start.elapsed()
        );
    }
    for cg in made {
        let _ = cg.remove();
    }
    for c in ["cpu", "memory", "cpuacct"] {
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(c).join(&parent));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
    let _ = std::fs::remove_dir_all(&dir);
}
