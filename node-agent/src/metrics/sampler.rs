//! The 1 s sampling loop: every tick, every attached capsule's figures are
//! read concurrently, each capsule under a deadline so one hung VMM API
//! cannot hold up the rest, and recorded into its history.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::source::read_all;
use super::{ERROR_CLASS_SAMPLE, Error, Metrics, Recorded};

/// How often and how patiently to sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerConfig {
    /// Time between ticks.
    pub interval: Duration,
    /// How long one capsule's figures may take.
    pub deadline: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            deadline: Duration::from_millis(800),
        }
    }
}

/// What one tick did, for tests and the bench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Readings stored.
    pub stored: usize,
    /// Figures that failed, plus capsules that missed the deadline.
    pub errors: usize,
    /// Readings dropped (the capsule was detached meanwhile, or the clock
    /// went back).
    pub dropped: usize,
}

/// Samples every attached capsule once.
pub async fn tick(metrics: &Metrics, deadline: Duration) -> TickReport {
    let attached = metrics.attached();
    let reads = attached.iter().map(|(capsule, source)| async move {
        let outcome = tokio::time::timeout(deadline, read_all(source.as_ref())).await;
        (capsule, source, outcome)
    });
    let mut report = TickReport::default();
    for (capsule, source, outcome) in futures::future::join_all(reads).await {
        let (reading, errors) = match outcome {
            Ok(r) => r,
            Err(_) => {
                let err = Error::SampleTimeout {
                    capsule: capsule.clone(),
                    deadline,
                };
                tracing::debug!(error = &err as &dyn std::error::Error, "metrics sample");
                metrics.error(ERROR_CLASS_SAMPLE);
                report.errors += 1;
                continue;
            }
        };
        for err in &errors {
            // Debug only: a VMM that just exited fails every figure until
            // the supervisor detaches it; the error counter shows it.
            tracing::debug!(capsule = %capsule, error = err as &dyn std::error::Error, "metrics sample");
            metrics.error(ERROR_CLASS_SAMPLE);
        }
        report.errors += errors.len();
        match metrics.record_from(capsule, source, &reading) {
            Some(Recorded::Stored | Recorded::HistoryReset) => report.stored += 1,
            Some(Recorded::ClockBehind) | None => report.dropped += 1,
        }
    }
    report
}

/// Samples every `config.interval` until `shutdown` resolves. Ticks that
/// fall behind are skipped rather than bunched, so points stay about one
/// interval apart.
pub async fn run(metrics: Arc<Metrics>, config: SamplerConfig, shutdown: impl Future<Output = ()>) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticks.tick() => {
                tick(&metrics, config.deadline).await;
            }
        }
    }
}
