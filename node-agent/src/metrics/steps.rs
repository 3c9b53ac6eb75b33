//! Capsule lifecycle steps as duration histograms
//! (`wrenn_agent_<step>_seconds{outcome}`), timed by the supervisor.

use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;

use super::Metrics;

/// A timed lifecycle step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// CreateCapsule end to end (disk, network, launch, guest ready).
    Create,
    /// VMM start until the guest agent answers.
    Boot,
    /// Pause.
    Pause,
    /// Resume (of a paused capsule, or of a suspended one up to Running).
    Resume,
    /// Suspend: snapshot to disk and stop the VMM.
    Suspend,
    /// Restore of a VM from a snapshot directory.
    Restore,
    /// Snapshot into a named snapshot directory.
    Snapshot,
    /// DeleteCapsule end to end.
    Delete,
}

impl Step {
    /// Every step, in the order of their histograms.
    pub const ALL: [Step; 8] = [
        Step::Create,
        Step::Boot,
        Step::Pause,
        Step::Resume,
        Step::Suspend,
        Step::Restore,
        Step::Snapshot,
        Step::Delete,
    ];

    /// The name inside the metric name.
    pub fn name(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Boot => "boot",
            Step::Pause => "pause",
            Step::Resume => "resume",
            Step::Suspend => "suspend",
            Step::Restore => "restore",
            Step::Snapshot => "snapshot",
            Step::Delete => "delete",
        }
    }
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It did what was asked.
    Ok,
    /// It failed.
    Error,
    /// It was abandoned (delete during create, agent shutdown), or its
    /// timer was dropped unfinished.
    Cancelled,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// `Ok` or `Error` from a result.
    pub fn of<T, E>(result: &Result<T, E>) -> Self {
        if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        }
    }
}

/// Buckets from 5 ms (a pause) to 5 min (a large snapshot or a create that
/// pulls an image).
pub(super) fn histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ])
}

/// Times one step from its creation. Record with [`StepTimer::finish`];
/// dropped unfinished (an early `?` return, a cancelled future) it records
/// [`Outcome::Cancelled`], so no step goes uncounted.
#[derive(Debug)]
#[must_use = "a step timer records when finished"]
pub struct StepTimer<'a> {
    metrics: &'a Metrics,
    step: Step,
    start: Instant,
    done: bool,
}

impl<'a> StepTimer<'a> {
    pub(super) fn new(metrics: &'a Metrics, step: Step) -> Self {
        Self {
            metrics,
            step,
            start: Instant::now(),
            done: false,
        }
    }

    /// Records the step with `outcome` and returns how long it took.
    pub fn finish(mut self, outcome: Outcome) -> Duration {
        self.done = true;
        let took = self.start.elapsed();
        self.metrics.observe_step(self.step, took, outcome);
        took
    }

    /// Records `Ok` or `Error` from `result` and hands the result back.
    pub fn finish_with<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        self.finish(Outcome::of(&result));
        result
    }
}

impl Drop for StepTimer<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .observe_step(self.step, self.start.elapsed(), Outcome::Cancelled);
        }
    }
}
