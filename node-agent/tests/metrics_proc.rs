//! `ProcSource` against real processes (Tier::Host, root): a busy loop and
//! a sleeper go through the real VMM spawn path into their own test-made
//! cgroups; sampling them through `Metrics` shows the busy one's CPU rise
//! and the sleeper's stay near zero, and both report host RSS. The
//! processes and cgroups are removed by a guard, also when a check fails.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cgroup_bed::ProcessBed;
use wrenn_node_agent::metrics::{Metrics, ProcSource, SampleSource, sampler};
use wrenn_node_agent::vmm::cgroup::CgroupLimits;
use wrenn_node_agent::vmm::process::{SpawnRequest, VmmProcess, spawn_supervised};
use wrenn_testkit::wait_until;

/// A unique cgroup parent; kills what is left in it and removes it on drop.
struct Env {
    bed: ProcessBed,
}

impl Env {
    fn new() -> Self {
        Self {
            bed: ProcessBed::new("wrenn-mtest"),
        }
    }

    fn spawn(&self, capsule: &str, script: &str) -> VmmProcess {
        spawn_supervised(
            &self.bed.paths,
            &self.bed.cgroups,
            &SpawnRequest {
                capsule,
                program: Path::new("/bin/sh"),
                args: vec![OsString::from("-c"), OsString::from(script)],
                netns: None,
                // One CPU at most, so the busy loop cannot starve the host.
                limits: CgroupLimits::build_for_vm(1, 64 << 20),
                inherit: vec![],
                confine: Default::default(),
            },
        )
        .unwrap()
    }
}

#[tokio::test]
async fn cpu_of_a_busy_cgroup_rises_and_rss_is_read() {
    let Some(_case) = cgroup_bed::host_case("metrics_proc_source_real_cgroup") else {
        return;
    };
    let env = Env::new();
    let busy = env.spawn("busy", "while :; do :; done");
    let idle = env.spawn("idle", "exec sleep 60");
    let source = |p: &VmmProcess| -> Arc<dyn SampleSource> {
        Arc::new(ProcSource::new(
            Path::new("/proc"),
            p.identity(),
            p.cgroup().clone(),
        ))
    };

    // Direct reads: the counter moves, RSS is a plausible size.
    let direct = ProcSource::new(Path::new("/proc"), busy.identity(), busy.cgroup().clone());
    let before = direct.read_cpu_usage_ns().unwrap();
    wait_until(Duration::from_secs(10), "busy loop uses CPU", || {
        let now = direct.read_cpu_usage_ns().map_err(|e| e.to_string())?;
        (now > before + 100_000_000)
            .then_some(())
            .ok_or(format!("{} ns since the first read", now - before))
    })
    .unwrap();
    let rss = direct.read_host_rss_bytes().unwrap();
    assert!((64 << 10..64 << 20).contains(&rss), "sh has RSS {rss}");

    // Through the sampler: two ticks a second apart give a rate.
    let metrics = Metrics::new();
    metrics.attach("busy", source(&busy));
    metrics.attach("idle", source(&idle));
    for _ in 0..3 {
        let report = sampler::tick(&metrics, Duration::from_millis(800)).await;
        assert_eq!((report.stored, report.errors), (2, 0), "{report:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let points = |c: &str| {
        metrics
            .range(c, 0, i64::MAX, Duration::ZERO)
            .unwrap()
            .points
    };
    let busy_points = points("busy");
    let idle_points = points("idle");
    assert_eq!(busy_points.len(), 3);
    for p in &busy_points[1..] {
        // The loop is capped at one CPU; other builds share the host.
        let mc = p.cpu_millicores.unwrap();
        assert!((100..=1100).contains(&mc), "busy loop at {mc} millicores");
        assert!(p.host_rss_bytes.unwrap() > 0);
    }
    for p in &idle_points[1..] {
        let mc = p.cpu_millicores.unwrap();
        assert!(mc < 50, "sleep at {mc} millicores");
    }

    // A process that is gone fails its figures; the error is counted.
    busy.stop(Duration::from_secs(2)).await.unwrap();
    let report = sampler::tick(&metrics, Duration::from_millis(800)).await;
    assert!(report.errors >= 1, "{report:?}");
    assert!(
        metrics
            .encode()
            .contains("wrenn_agent_errors_total{class=\"metrics_sample\"}")
    );
    idle.stop(Duration::from_secs(2)).await.unwrap();
}
