//! Capsule and agent metrics (DESIGN.md §4 `metrics`): a 1 s sampler per
//! capsule with a VMM ([`sampler`]) feeding per-capsule ring buffers
//! ([`ring`]), range queries for `GetMetrics` ([`proto`]), and Prometheus
//! text plus health and readiness on the admin port ([`admin`]).
//!
//! [`Metrics`] is the one shared handle. The supervisor attaches a
//! [`SampleSource`] when a capsule's VMM exists, detaches it when the VMM
//! is gone (suspended, stopped) and removes the capsule when it is deleted;
//! it times its steps with [`Metrics::start_step`] and counts orphans and
//! errors. Reading the figures belongs to the modules that own them
//! (cgroups in `vmm`, disks in `storage`); this module only asks.
//!
//! Why this file is long: ~500 lines of code (the one shared handle and
//! the collector that renders it) and ~230 of unit tests kept beside them.

pub mod admin;
pub mod proto;
pub mod ring;
pub mod sampler;
pub mod source;
mod steps;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

pub use ring::{Point, Range, Recorded, Series, TIERS, Tier};
pub use source::{ProcSource, Reading, SampleSource, SourceFuture, read_rss_bytes};
pub use steps::{Outcome, Step, StepTimer};

/// Errors of the metrics module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No history for the capsule (never attached, or removed).
    #[error("no metrics for capsule {capsule}")]
    UnknownCapsule {
        /// Capsule UID.
        capsule: String,
    },
    /// Reading the cgroup's CPU usage failed.
    #[error("read cgroup cpu usage")]
    ReadCgroupCpu {
        /// Why.
        #[source]
        source: crate::vmm::Error,
    },
    /// Reading a `/proc` file failed.
    #[error("read {path}")]
    ReadProc {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pid now belongs to another process: ours has exited.
    #[error("process {pid} is gone")]
    ProcessGone {
        /// The pid.
        pid: i32,
    },
    /// A source plugged in by another module failed.
    #[error("read {figure}")]
    Source {
        /// Which figure (`disk_allocated_bytes`, `net_counters`, ...).
        figure: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A capsule's figures did not arrive within the sampling deadline.
    #[error("sample capsule {capsule}: no answer within {deadline:?}")]
    SampleTimeout {
        /// Capsule UID.
        capsule: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The admin server could not accept a connection.
    #[error("accept admin connection")]
    Accept {
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps another module's error for `figure`, for [`SampleSource`]
    /// impls outside this module.
    pub fn source(
        figure: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Source {
            figure,
            source: Box::new(source),
        }
    }
}

/// Error class counted when a figure cannot be read.
pub const ERROR_CLASS_SAMPLE: &str = "metrics_sample";

struct Capsule {
    series: Series,
    source: Option<Arc<dyn SampleSource>>,
}

#[derive(Default)]
struct Shared {
    capsules: Mutex<HashMap<String, Capsule>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Capsule>> {
        // A panic while holding the lock leaves plain data behind; the
        // history is still consistent enough to serve.
        self.capsules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: Debug may run while this thread holds the lock.
        let capsules = self.capsules.try_lock().map(|c| c.len()).ok();
        f.debug_struct("Shared")
            .field("capsules", &capsules)
            .finish()
    }
}

type OutcomeLabels = [(&'static str, &'static str); 1];
type StringLabels = [(&'static str, String); 1];

/// The agent's metrics: capsule histories, step histograms, counters and
/// the readiness flag. Shared as `Arc<Metrics>`.
pub struct Metrics {
    shared: Arc<Shared>,
    registry: Registry,
    /// The per-capsule series (labelled with capsule UIDs), apart so the
    /// admin port can leave them out.
    per_capsule: Registry,
    /// What the admin port shows without them: the count of capsules.
    capsule_count: Registry,
    steps: Vec<Family<OutcomeLabels, prometheus_client::metrics::histogram::Histogram>>,
    orphans: Family<StringLabels, Counter>,
    errors: Family<StringLabels, Counter>,
    quarantined: prometheus_client::metrics::gauge::Gauge,
    ready: AtomicBool,
    origin: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("shared", &self.shared)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Empty metrics, not ready.
    pub fn new() -> Arc<Self> {
        let shared = Arc::new(Shared::default());
        let mut registry = Registry::default();
        let steps = Step::ALL
            .iter()
            .map(|step| {
                let family = Family::<OutcomeLabels, _>::new_with_constructor(
                    steps::histogram as fn() -> prometheus_client::metrics::histogram::Histogram,
                );
                registry.register(
                    format!("wrenn_agent_{}_seconds", step.name()),
                    format!("Duration of capsule {} steps by outcome", step.name()),
                    family.clone(),
                );
                family
            })
            .collect();
        let orphans = Family::<StringLabels, Counter>::default();
        registry.register(
            "wrenn_agent_orphans_removed",
            "Leftovers of dead capsules removed at startup, by kind",
            orphans.clone(),
        );
        let errors = Family::<StringLabels, Counter>::default();
        registry.register("wrenn_agent_errors", "Errors by class", errors.clone());
        let quarantined = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "wrenn_agent_quarantined_capsules",
            "Capsules whose journal recovery could not use, left untouched for an admin",
            quarantined.clone(),
        );
        let mut per_capsule = Registry::default();
        per_capsule.register_collector(Box::new(CapsuleCollector {
            shared: shared.clone(),
            per_capsule: true,
        }));
        let mut capsule_count = Registry::default();
        capsule_count.register_collector(Box::new(CapsuleCollector {
            shared: shared.clone(),
            per_capsule: false,
        }));
        Arc::new(Self {
            shared,
            registry,
            per_capsule,
            capsule_count,
            steps,
            orphans,
            errors,
            quarantined,
            ready: AtomicBool::new(false),
            origin: Instant::now(),
        })
    }

    /// Starts sampling `capsule` from `source` (a VMM now exists: after
    /// launch, resume from suspend, restore or adoption). Keeps its history
    /// if it has one; counters start new deltas, since a new VMM restarts
    /// its counters. Replaces an earlier source.
    pub fn attach(&self, capsule: &str, source: Arc<dyn SampleSource>) {
        let mut capsules = self.shared.lock();
        let entry = capsules
            .entry(capsule.to_string())
            .or_insert_with(|| Capsule {
                series: Series::new(),
                source: None,
            });
        entry.series.rebase();
        entry.source = Some(source);
    }

    /// Stops sampling `capsule` (its VMM is gone: suspended or stopped).
    /// The history stays for `GetMetrics`; its Prometheus series go away
    /// until it is attached again.
    pub fn detach(&self, capsule: &str) {
        if let Some(c) = self.shared.lock().get_mut(capsule) {
            c.source = None;
        }
    }

    /// Forgets `capsule` (deleted): history and Prometheus series.
    pub fn remove(&self, capsule: &str) {
        self.shared.lock().remove(capsule);
    }

    /// Capsules being sampled, with their sources.
    pub fn attached(&self) -> Vec<(String, Arc<dyn SampleSource>)> {
        self.shared
            .lock()
            .iter()
            .filter_map(|(k, c)| c.source.clone().map(|s| (k.clone(), s)))
            .collect()
    }

    /// Records a reading taken now for `capsule`, if `from` is still its
    /// source (a reading of a source detached or replaced meanwhile is
    /// dropped).
    pub fn record_from(
        &self,
        capsule: &str,
        from: &Arc<dyn SampleSource>,
        reading: &Reading,
    ) -> Option<Recorded> {
        let (at, mono) = self.now();
        let mut capsules = self.shared.lock();
        let c = capsules.get_mut(capsule)?;
        if !c.source.as_ref().is_some_and(|s| Arc::ptr_eq(s, from)) {
            return None;
        }
        Some(c.series.record(at, mono, reading))
    }

    /// Points of `capsule` in `[from, to]` (unix nanos) at the finest
    /// resolution of at least `min_step` that holds the range.
    pub fn range(
        &self,
        capsule: &str,
        from: i64,
        to: i64,
        min_step: Duration,
    ) -> Result<Range, Error> {
        self.shared
            .lock()
            .get(capsule)
            .map(|c| c.series.range(from, to, min_step))
            .ok_or_else(|| Error::UnknownCapsule {
                capsule: capsule.to_string(),
            })
    }

    /// Answers `GetMetrics`: the request's range (defaults as in
    /// [`proto::from_request`]) at the finest resolution holding it.
    pub fn get_metrics(
        &self,
        req: &wrenn_proto::agent::v1::GetMetricsRequest,
    ) -> Result<wrenn_proto::agent::v1::GetMetricsResponse, Error> {
        let (from, to) = proto::from_request(req, self.now().0);
        let range = self.range(&req.uid, from, to, Duration::ZERO)?;
        Ok(proto::to_proto(&range))
    }

    /// When `capsule` last used at least `millicores` of CPU in a 1 s
    /// sample of the finest history (the last 10 minutes); `None` when it
    /// did not, or has no history.
    pub fn last_busy(&self, capsule: &str, millicores: u64) -> Option<i64> {
        let (now, _) = self.now();
        let from = now.saturating_sub(TIERS[0].span_nanos());
        let range = self.range(capsule, from, now, Duration::ZERO).ok()?;
        plan_last_busy(&range.points, millicores)
    }

    /// Starts timing `step`; the timer records when finished or dropped.
    pub fn start_step(&self, step: Step) -> StepTimer<'_> {
        StepTimer::new(self, step)
    }

    /// Records one `step` that took `duration` and ended with `outcome`.
    pub fn observe_step(&self, step: Step, duration: Duration, outcome: Outcome) {
        self.steps[step as usize]
            .get_or_create(&[("outcome", outcome.name())])
            .observe(duration.as_secs_f64());
    }

    /// Counts `count` orphans of `kind` (`netns`, `tap`, `cgroup`, `loop`,
    /// `dm`, `file`, `process`, ...) removed by the startup sweep.
    pub fn orphans_removed(&self, kind: &str, count: u64) {
        self.orphans
            .get_or_create(&[("kind", kind.to_string())])
            .inc_by(count);
    }

    /// Sets how many capsules recovery quarantined.
    pub fn set_quarantined(&self, count: usize) {
        self.quarantined
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one error of `class` (a stable, low-cardinality name such as
    /// `vmm_api`, `journal`, [`ERROR_CLASS_SAMPLE`]).
    pub fn error(&self, class: &str) {
        self.errors
            .get_or_create(&[("class", class.to_string())])
            .inc();
    }

    /// Sets readiness (`/readyz`): true once recovery is done.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the agent said it is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Prometheus (OpenMetrics) text of every metric, per-capsule series
    /// included.
    pub fn encode(&self) -> String {
        self.encode_with(&self.per_capsule)
    }

    /// The same without per-capsule series: nothing in it names a capsule,
    /// for a port anyone on the node network may reach.
    pub fn encode_without_capsules(&self) -> String {
        self.encode_with(&self.capsule_count)
    }

    fn encode_with(&self, capsules: &Registry) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, capsules))
            .and_then(|()| encode_eof(&mut out));
        out
    }

    /// Wall time (unix nanos) and monotonic nanos since this was made.
    fn now(&self) -> (i64, u64) {
        let at = wrenn_proto::unix_nanos_now();
        let mono = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (at, mono)
    }
}

/// Exports the latest reading of every attached capsule at scrape time, so
/// a detached or removed capsule's series vanish with it. Without
/// `per_capsule`, only how many capsules are sampled.
#[derive(Debug)]
struct CapsuleCollector {
    shared: Arc<Shared>,
    per_capsule: bool,
}

impl Collector for CapsuleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut latest: Vec<(String, Reading)> = self
            .shared
            .lock()
            .iter()
            .filter(|(_, c)| c.source.is_some())
            .map(|(k, c)| (k.clone(), *c.series.latest()))
            .collect();
        latest.sort_by(|a, b| a.0.cmp(&b.0));
        let sampled = ConstGauge::new(latest.len() as i64);
        sampled.encode(encoder.encode_descriptor(
            "wrenn_agent_capsules_sampled",
            "Capsules whose VMM is being sampled",
            None,
            MetricType::Gauge,
        )?)?;
        if !self.per_capsule {
            return Ok(());
        }

        type Pick = fn(&Reading) -> Option<u64>;
        let counters: [(&str, &str, Pick, f64); 3] = [
            (
                "wrenn_agent_capsule_cpu_seconds",
                "CPU time used by the capsule's cgroup",
                |r| r.cpu_usage_ns,
                1e-9,
            ),
            (
                "wrenn_agent_capsule_network_receive_bytes",
                "Bytes sent to the guest NIC since its VMM started",
                |r| r.net.map(|n| n.rx_bytes),
                1.0,
            ),
            (
                "wrenn_agent_capsule_network_transmit_bytes",
                "Bytes sent by the guest NIC since its VMM started",
                |r| r.net.map(|n| n.tx_bytes),
                1.0,
            ),
        ];
        for (name, help, pick, scale) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (capsule, r) in &latest {
                if let Some(v) = pick(r) {
                    let labels = [("capsule", capsule.as_str())];
                    ConstCounter::new(v as f64 * scale).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, Pick); 3] = [
            (
                "wrenn_agent_capsule_memory_bytes",
                "Resident memory of the capsule's VMM process on the host",
                |r| r.host_rss_bytes,
            ),
            (
                "wrenn_agent_capsule_guest_memory_used_bytes",
                "Memory in use inside the guest (total - available)",
                |r| r.guest_memory_used_bytes,
            ),
            (
                "wrenn_agent_capsule_disk_allocated_bytes",
                "Bytes allocated by the capsule's writable disk",
                |r| r.disk_allocated_bytes,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (capsule, r) in &latest {
                if let Some(v) = pick(r) {
                    let labels = [("capsule", capsule.as_str())];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The time of the newest point using at least `millicores` (pure).
pub fn plan_last_busy(points: &[Point], millicores: u64) -> Option<i64> {
    points
        .iter()
        .rev()
        .find(|p| p.cpu_millicores.is_some_and(|c| c >= millicores))
        .map(|p| p.at_unix_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::NetCounters;

    #[test]
    fn the_last_busy_point_is_the_newest_at_or_above_the_threshold() {
        let p = |at, cpu| Point {
            at_unix_nanos: at,
            cpu_millicores: cpu,
            ..Default::default()
        };
        let points = [p(1, Some(900)), p(2, Some(100)), p(3, Some(20)), p(4, None)];
        assert_eq!(plan_last_busy(&points, 100), Some(2));
        assert_eq!(plan_last_busy(&points, 500), Some(1));
        assert_eq!(plan_last_busy(&points, 1000), None);
        assert_eq!(plan_last_busy(&[], 1), None);
    }

    /// A source with fixed figures; `hang` makes CPU never answer, `fail`
    /// makes the disk figure fail.
    #[derive(Debug, Default)]
    struct FixedSource {
        cpu_ns: u64,
        hang: bool,
        fail: bool,
    }

    impl SampleSource for FixedSource {
        fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
            if self.hang {
                Box::pin(std::future::pending())
            } else {
                Box::pin(std::future::ready(Ok(Some(self.cpu_ns))))
            }
        }
        fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
            Box::pin(std::future::ready(Ok(Some(8 << 20))))
        }
        fn disk_allocated_bytes(&self) -> SourceFuture<'_, u64> {
            let r = if self.fail {
                Err(Error::source(
                    "disk_allocated_bytes",
                    std::io::Error::other("gone"),
                ))
            } else {
                Ok(Some(1 << 30))
            };
            Box::pin(std::future::ready(r))
        }
        fn net_counters(&self) -> SourceFuture<'_, NetCounters> {
            Box::pin(std::future::ready(Ok(Some(NetCounters {
                rx_bytes: 10,
                tx_bytes: 20,
            }))))
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[tokio::test]
    async fn sampled_capsules_export_series_until_detached_or_removed() {
        let m = Metrics::new();
        m.attach(
            "c1",
            Arc::new(FixedSource {
                cpu_ns: 2_500_000_000,
                ..Default::default()
            }),
        );
        m.attach("c2", Arc::new(FixedSource::default()));
        let report = sampler::tick(&m, Duration::from_secs(1)).await;
        assert_eq!(report.stored, 2);
        let text = m.encode();
        assert_eq!(
            line(
                &text,
                "wrenn_agent_capsule_cpu_seconds_total{capsule=\"c1\"}"
            ),
            Some("wrenn_agent_capsule_cpu_seconds_total{capsule=\"c1\"} 2.5")
        );
        assert_eq!(
            line(&text, "wrenn_agent_capsule_memory_bytes{capsule=\"c2\"}"),
            Some("wrenn_agent_capsule_memory_bytes{capsule=\"c2\"} 8388608")
        );
        assert!(
            text.contains("wrenn_agent_capsule_network_transmit_bytes_total{capsule=\"c1\"} 20")
        );
        assert!(text.contains("wrenn_agent_capsules_sampled 2"));

        m.detach("c1");
        let text = m.encode();
        assert!(!text.contains("capsule=\"c1\""), "{text}");
        // The history of a detached capsule is still served.
        assert_eq!(
            m.range("c1", 0, i64::MAX, Duration::ZERO)
                .unwrap()
                .points
                .len(),
            1
        );

        m.remove("c2");
        assert!(!m.encode().contains("capsule=\"c2\""));
        assert!(matches!(
            m.range("c2", 0, i64::MAX, Duration::ZERO),
            Err(Error::UnknownCapsule { capsule }) if capsule == "c2"
        ));
        assert!(
            m.get_metrics(&wrenn_proto::agent::v1::GetMetricsRequest {
                uid: "c2".into(),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[tokio::test]
    async fn a_hung_or_failing_source_is_counted_and_does_not_stall_others() {
        let m = Metrics::new();
        m.attach(
            "hung",
            Arc::new(FixedSource {
                hang: true,
                ..Default::default()
            }),
        );
        m.attach(
            "failing",
            Arc::new(FixedSource {
                fail: true,
                ..Default::default()
            }),
        );
        let report = sampler::tick(&m, Duration::from_millis(50)).await;
        assert_eq!(report.stored, 1);
        assert_eq!(report.errors, 2);
        assert!(
            m.range("hung", 0, i64::MAX, Duration::ZERO)
                .unwrap()
                .points
                .is_empty()
        );
        let failing = m.range("failing", 0, i64::MAX, Duration::ZERO).unwrap();
        assert_eq!(failing.points[0].disk_allocated_bytes, None);
        assert_eq!(failing.points[0].host_rss_bytes, Some(8 << 20));
        assert!(
            m.encode()
                .contains("wrenn_agent_errors_total{class=\"metrics_sample\"} 2")
        );
    }

    #[tokio::test]
    async fn the_sampler_ticks_until_shutdown() {
        let m = Metrics::new();
        m.attach("c", Arc::new(FixedSource::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = sampler::SamplerConfig {
            interval: Duration::from_millis(20),
            deadline: Duration::from_millis(10),
        };
        let task = tokio::spawn(sampler::run(m.clone(), config, async move {
            let _ = stopped.await;
        }));
        let count = || {
            m.range("c", 0, i64::MAX, Duration::ZERO)
                .unwrap()
                .points
                .len()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while count() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "sampler stored {}",
                count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
        let after = count();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(count(), after, "sampled after shutdown");
    }

    #[test]
    fn a_reading_from_a_replaced_source_is_dropped() {
        let m = Metrics::new();
        let old: Arc<dyn SampleSource> = Arc::new(FixedSource::default());
        m.attach("c", old.clone());
        m.attach("c", Arc::new(FixedSource::default()));
        assert_eq!(m.record_from("c", &old, &Reading::default()), None);
        m.remove("c");
        assert_eq!(m.record_from("c", &old, &Reading::default()), None);
        assert!(m.attached().is_empty());
    }

    #[test]
    fn steps_orphans_errors_and_readiness() {
        let m = Metrics::new();
        assert!(!m.is_ready());
        m.set_ready(true);
        assert!(m.is_ready());
        m.observe_step(Step::Pause, Duration::from_millis(20), Outcome::Ok);
        m.start_step(Step::Pause).finish(Outcome::Error);
        let r: Result<(), ()> = m.start_step(Step::Snapshot).finish_with(Ok(()));
        assert!(r.is_ok());
        drop(m.start_step(Step::Create));
        m.orphans_removed("netns", 2);
        m.orphans_removed("netns", 1);
        m.error("vmm_api");
        let text = m.encode();
        for want in [
            "wrenn_agent_pause_seconds_bucket{le=\"0.025\",outcome=\"ok\"} 1",
            "wrenn_agent_pause_seconds_count{outcome=\"ok\"} 1",
            "wrenn_agent_pause_seconds_count{outcome=\"error\"} 1",
            "wrenn_agent_snapshot_seconds_count{outcome=\"ok\"} 1",
            "wrenn_agent_create_seconds_count{outcome=\"cancelled\"} 1",
            "wrenn_agent_orphans_removed_total{kind=\"netns\"} 3",
            "wrenn_agent_errors_total{class=\"vmm_api\"} 1",
            "# TYPE wrenn_agent_create_seconds histogram",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
