//! What the supervisor reports to `crate::metrics`: capsules sampled while
//! their VMM exists, history kept until delete, every step timed with its
//! outcome, failures counted by class, orphans counted by kind.

use std::path::Path;

use wrenn_proto::agent::v1::GetMetricsRequest;

use super::*;
use crate::metrics::{Metrics, sampler};
use crate::vmm::cgroup::CgroupRoot;

/// RSS every fake VMM process reports.
const RSS_KIB: u64 = 2048;

/// Host figures from a fake `/proc` (the fake machine's pids, start time
/// one) and a fake cgroup v2 tree whose capsules `c1` and `run` used 1.5 s
/// of CPU.
fn fake_host(cfg: &mut SupervisorConfig, dir: &Path) {
    let proc_root = dir.join("proc");
    for pid in 20_001..20_020 {
        let d = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("status"),
            format!("Name:\tvmm\nVmRSS:\t{RSS_KIB} kB\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("stat"),
            format!("{pid} (fake vmm) S {}1 0\n", "1 ".repeat(18)),
        )
        .unwrap();
    }
    let cg = dir.join("cgroup");
    for capsule in ["c1", "run"] {
        let d = cg.join("wrenn").join(capsule);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500000\n").unwrap();
    }
    std::fs::write(cg.join("cgroup.controllers"), "cpu memory\n").unwrap();
    cfg.figures = Some(HostFigures {
        proc_root,
        cgroups: CgroupRoot::detect(&cg, "wrenn").unwrap(),
    });
}

fn metrics(b: &Bed) -> Arc<Metrics> {
    b.sup.metrics().clone()
}

fn attached(b: &Bed) -> Vec<String> {
    let mut v: Vec<String> = metrics(b).attached().into_iter().map(|(c, _)| c).collect();
    v.sort();
    v
}

fn history(b: &Bed, uid: &str) -> Option<Vec<wrenn_proto::agent::v1::MetricsSample>> {
    metrics(b)
        .get_metrics(&GetMetricsRequest {
            uid: uid.into(),
            ..Default::default()
        })
        .ok()
        .map(|r| r.samples)
}

/// The value of the sample line starting with `series ` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn step_count(b: &Bed, step: &str, outcome: &str) -> u64 {
    let text = metrics(b).encode();
    value(
        &text,
        &format!("wrenn_agent_{step}_seconds_count{{outcome=\"{outcome}\"}}"),
    )
    .map_or(0, |v| v as u64)
}

fn errors(b: &Bed, class: &str) -> u64 {
    value(
        &metrics(b).encode(),
        &format!("wrenn_agent_errors_total{{class=\"{class}\"}}"),
    )
    .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn a_running_capsule_is_sampled_and_its_history_lives_until_delete() {
    let b = Bed::with(fake_host);
    assert_eq!(history(&b, "c1"), None, "nothing before create");
    create(&b, "c1").await;
    b.store.set_allocated(&DiskId::new("c1").unwrap(), 3 << 20);
    assert_eq!(attached(&b), vec!["c1".to_string()]);

    let tick = sampler::tick(&metrics(&b), Duration::from_secs(1)).await;
    assert_eq!((tick.stored, tick.errors), (1, 0), "{tick:?}");
    let points = history(&b, "c1").expect("GetMetrics answers for a capsule");
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].host_rss_bytes, RSS_KIB * 1024);
    assert_eq!(points[0].disk_allocated_bytes, 3 << 20);
    let text = metrics(&b).encode();
    for (series, want) in [
        ("wrenn_agent_capsule_cpu_seconds_total{capsule=\"c1\"}", 1.5),
        (
            "wrenn_agent_capsule_memory_bytes{capsule=\"c1\"}",
            (RSS_KIB * 1024) as f64,
        ),
        (
            "wrenn_agent_capsule_disk_allocated_bytes{capsule=\"c1\"}",
            (3u64 << 20) as f64,
        ),
        (
            "wrenn_agent_capsule_network_receive_bytes_total{capsule=\"c1\"}",
            0.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }

    // A paused VMM still holds its memory on the host: still sampled.
    b.sup.pause("c1").await.unwrap();
    assert_eq!(attached(&b), vec!["c1".to_string()]);
    b.sup.resume("c1").await.unwrap();

    // Suspended: no VMM, no sampling, history kept.
    b.sup.suspend("c1").await.unwrap();
    assert!(attached(&b).is_empty());
    assert_eq!(
        sampler::tick(&metrics(&b), Duration::from_secs(1))
            .await
            .stored,
        0
    );
    assert_eq!(history(&b, "c1").map(|p| p.len()), Some(1));
    assert!(!metrics(&b).encode().contains("capsule=\"c1\""));

    // The restored VMM is sampled again, into the same history.
    b.sup.resume("c1").await.unwrap();
    assert_eq!(attached(&b), vec!["c1".to_string()]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    sampler::tick(&metrics(&b), Duration::from_secs(1)).await;
    assert_eq!(history(&b, "c1").map(|p| p.len()), Some(2));

    assert!(b.sup.delete("c1").await.unwrap());
    assert!(attached(&b).is_empty());
    assert_eq!(history(&b, "c1"), None, "history goes with the capsule");
    assert!(!metrics(&b).encode().contains("capsule=\"c1\""));
}

#[tokio::test]
async fn a_vmm_that_dies_is_no_longer_sampled() {
    let b = Bed::new();
    create(&b, "c1").await;
    sampler::tick(&metrics(&b), Duration::from_secs(1)).await;
    b.machine.crash("c1");
    wrenn_testkit::eventually(Duration::from_secs(5), "crash not seen", || {
        b.sup.get("c1").unwrap().state == State::Failed
    })
    .await;
    assert!(attached(&b).is_empty());
    assert_eq!(history(&b, "c1").map(|p| p.len()), Some(1));
    assert_eq!(errors(&b, "vmm_exit"), 1);
    b.sup.delete("c1").await.unwrap();
    assert_eq!(history(&b, "c1"), None);
}

#[tokio::test]
async fn a_failed_or_cancelled_create_is_timed_and_leaves_no_history() {
    let b = Bed::new();
    b.machine.fail_next(Step::Launch, "no kvm");
    b.sup
        .create("c1", spec("c1"), State::Running)
        .await
        .unwrap_err();
    assert_eq!(step_count(&b, "create", "error"), 1);
    assert_eq!(step_count(&b, "boot", "error"), 1);
    assert_eq!(errors(&b, "vmm"), 1, "counted once, not per step");
    assert_eq!(history(&b, "c1"), None);

    b.machine.delay(Step::Launch, Duration::from_secs(2));
    let sup = b.sup.clone();
    let creating = tokio::spawn(async move { sup.create("c2", spec("c2"), State::Running).await });
    entered(&b, "c2", Step::Launch).await;
    assert!(b.sup.delete("c2").await.unwrap());
    assert!(creating.await.unwrap().is_err());
    assert_eq!(step_count(&b, "create", "cancelled"), 1);
    assert_eq!(errors(&b, "vmm"), 1, "a cancelled create is no error");
    assert_eq!(history(&b, "c2"), None);
    assert!(attached(&b).is_empty());
}

#[tokio::test]
async fn every_step_is_timed_with_its_outcome() {
    // A real qcow2 store (plain files), so the snapshot's disk copy works.
    let (b, template) = Bed::with_qcow2();
    let s = from_template("c1", &template);

    let ok = |step| step_count(&b, step, "ok");
    b.sup.create("c1", s, State::Running).await.unwrap();
    assert_eq!((ok("create"), ok("boot")), (1, 1));
    b.sup.pause("c1").await.unwrap();
    assert_eq!(ok("pause"), 1);
    b.sup.pause("c1").await.unwrap();
    assert_eq!(ok("pause"), 1, "a no-op is no step");
    b.sup.resume("c1").await.unwrap();
    assert_eq!(ok("resume"), 1);
    b.sup.suspend("c1").await.unwrap();
    assert_eq!(ok("suspend"), 1);
    b.sup.resume("c1").await.unwrap();
    assert_eq!((ok("resume"), ok("restore")), (2, 1));
    b.sup.snapshot("c1", "s1", true).await.unwrap();
    assert_eq!(ok("snapshot"), 1);

    // Failures are labelled and counted by class; refusals are neither.
    b.machine.fail_next(Step::Pause, "timeout");
    b.sup.pause("c1").await.unwrap_err();
    assert_eq!((ok("pause"), step_count(&b, "pause", "error")), (1, 1));
    assert_eq!(errors(&b, "vmm"), 1);
    b.machine.fail_next(Step::Snapshot, "disk full");
    b.sup.snapshot("c1", "s2", true).await.unwrap_err();
    assert_eq!(step_count(&b, "snapshot", "error"), 1);
    b.sup.suspend("c1").await.unwrap();
    b.machine.fail_next(Step::Restore, "bad image");
    b.sup.resume("c1").await.unwrap_err();
    assert_eq!(step_count(&b, "resume", "error"), 1);
    assert_eq!(step_count(&b, "restore", "error"), 1);
    assert_eq!(errors(&b, "vmm"), 3);
    b.sup.pause("c1").await.unwrap_err();
    assert_eq!(step_count(&b, "pause", "error"), 1, "wrong state: no step");
    assert_eq!(errors(&b, "vmm"), 3);

    assert!(b.sup.delete("c1").await.unwrap());
    assert_eq!(ok("delete"), 1);
    let text = metrics(&b).encode();
    assert!(
        text.contains("wrenn_agent_delete_seconds_bucket{le=\"+Inf\",outcome=\"ok\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn recovery_counts_orphans_by_kind_and_samples_adopted_vms() {
    let mut b = Bed::with(fake_host);
    create(&b, "run").await;
    create(&b, "dead").await;
    b.leave_orphans();

    b.restart();
    b.machine.vanish("dead");
    let before = metrics(&b).encode();
    assert!(!before.contains("wrenn_agent_orphans_removed_total{"));
    b.sup.recover(&OrphanSweep::default()).await.unwrap();

    let text = metrics(&b).encode();
    for (kind, want) in [
        ("journal", 1.0),
        ("file", 1.0),
        ("netns", 0.0),
        ("cgroup", 0.0),
    ] {
        let series = format!("wrenn_agent_orphans_removed_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&text, &series), Some(want), "{series} in\n{text}");
    }
    // The adopted VMM is sampled; the lost one is not.
    assert_eq!(attached(&b), vec!["run".to_string()]);
    let tick = sampler::tick(&metrics(&b), Duration::from_secs(1)).await;
    assert_eq!((tick.stored, tick.errors), (1, 0), "{tick:?}");
    assert!(
        metrics(&b)
            .encode()
            .contains("wrenn_agent_capsule_memory_bytes{capsule=\"run\"} 2097152")
    );
    assert_eq!(errors(&b, "vmm"), 1, "the lost VMM");
}

/// The source the supervisor would attach to `uid`, with guest reads
/// bounded by `within`.
async fn source_with_guest(
    b: &Bed,
    uid: &str,
    within: Duration,
) -> (
    super::super::steps::telemetry::CapsuleSource<FakeMachine>,
    std::path::PathBuf,
) {
    let entry = b.sup.entry(uid, false).unwrap();
    let rec = entry.lock().await.clone().unwrap();
    let socket = rec.vm().unwrap().vsock_socket.clone();
    let guest = GuestSettings {
        sample_within: within,
        ..GuestSettings::default()
    };
    let source = b.sup.ctx().source(&entry, &rec, Some(guest)).unwrap();
    (source, socket)
}

#[tokio::test]
async fn a_silent_guest_costs_only_its_own_figure() {
    let b = Bed::new();
    create(&b, "c1").await;
    b.store.set_allocated(&DiskId::new("c1").unwrap(), 1 << 20);
    let within = Duration::from_millis(100);
    let (source, socket) = source_with_guest(&b, "c1", within).await;
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();

    // Nothing listens: the dial fails at once.
    let (reading, errs) = crate::metrics::source::read_all(&source).await;
    assert_eq!(reading.disk_allocated_bytes, Some(1 << 20));
    assert_eq!(reading.guest_memory_used_bytes, None);
    assert_eq!(errs.len(), 1, "{errs:?}");

    // A VMM that accepts but never completes the handshake (a guest that
    // hangs): bounded, and the host figures still arrive.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let started = std::time::Instant::now();
    let (reading, errs) = crate::metrics::source::read_all(&source).await;
    assert!(started.elapsed() < within * 5, "{:?}", started.elapsed());
    assert_eq!(reading.disk_allocated_bytes, Some(1 << 20));
    assert!(reading.net.is_some());
    assert_eq!(reading.guest_memory_used_bytes, None);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].to_string().contains("guest_memory_used_bytes"),
        "{}",
        errs[0]
    );

    // A paused guest is not asked at all.
    b.sup.pause("c1").await.unwrap();
    let started = std::time::Instant::now();
    let (reading, errs) = crate::metrics::source::read_all(&source).await;
    assert!(errs.is_empty(), "{errs:?}");
    assert!(started.elapsed() < within, "{:?}", started.elapsed());
    assert_eq!(reading.disk_allocated_bytes, Some(1 << 20));
    held.abort();
}
