//! Prometheus metrics of the operator (prometheus-client), served on the
//! admin port: reconcile duration, errors by category, capsules by phase,
//! create-to-running latency, orphans removed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Capsule, CapsuleSnapshot or CapsuleTemplate.
    pub kind: &'static str,
}

/// Labels of errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Kind reconciled.
    pub kind: &'static str,
    /// `Error::category()`.
    pub category: &'static str,
}

/// Labels of the phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Capsule phase.
    pub phase: String,
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    /// `wrenn_operator_reconcile_duration_seconds`.
    pub reconcile_duration: Family<KindLabels, Histogram>,
    /// `wrenn_operator_reconcile_errors_total`.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// `wrenn_operator_capsules` by phase.
    pub capsules: Family<PhaseLabels, Gauge>,
    /// `wrenn_operator_capsule_create_to_running_seconds`.
    pub create_to_running: Histogram,
    /// `wrenn_operator_orphan_vms_deleted_total`.
    pub orphans_deleted: Counter,
    /// `wrenn_operator_status_writes_total`.
    pub status_writes: Family<KindLabels, Counter>,
}

impl Metrics {
    /// New metrics registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            reconcile_errors: Family::default(),
            capsules: Family::default(),
            create_to_running: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            orphans_deleted: Counter::default(),
            status_writes: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("wrenn_operator");
        r.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            m.reconcile_duration.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles by category",
            m.reconcile_errors.clone(),
        );
        r.register("capsules", "Capsules by phase", m.capsules.clone());
        r.register(
            "capsule_create_to_running_seconds",
            "From creation of the Capsule object to phase Running",
            m.create_to_running.clone(),
        );
        r.register(
            "orphan_vms_deleted",
            "VMs without a Capsule deleted during convergence",
            m.orphans_deleted.clone(),
        );
        r.register(
            "status_writes",
            "Status patches sent to the API server",
            m.status_writes.clone(),
        );
        m
    }
}
