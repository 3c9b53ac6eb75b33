//! Every string other components must agree on: API group, finalizer, field
//! manager, labels, condition types and reasons. Defined once here so the
//! operator, node agent, chart and tests cannot drift apart.

/// API group of every Wrenn kind.
pub const GROUP: &str = "wrenn.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get wrenn` lists every kind in this category.
pub const CATEGORY: &str = "wrenn";

/// Finalizer the operator puts on objects whose real resources live on nodes.
pub const FINALIZER: &str = "wrenn.dev/node-cleanup";
/// Field manager of every status write (server-side apply).
pub const FIELD_MANAGER: &str = "wrenn-operator";

/// Condition types, as written in `status.conditions[].type`.
pub mod condition {
    /// The capsule has been placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// The object is usable: a capsule runs, a snapshot or template can be used.
    pub const READY: &str = "Ready";
    /// The capsule's vCPUs are stopped with its memory kept.
    pub const PAUSED: &str = "Paused";
    /// The capsule's memory is on disk and its VMM has exited.
    pub const SUSPENDED: &str = "Suspended";
}

/// Condition reasons (CamelCase, stable: tools match on them).
pub mod reason {
    /// Waiting for the operator to act.
    pub const PENDING: &str = "Pending";
    /// Placed on a node.
    pub const PLACED: &str = "Placed";
    /// No node satisfies the capsule's constraints; the message says why per node.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The spec refers to a template that does not exist.
    pub const TEMPLATE_NOT_FOUND: &str = "TemplateNotFound";
    /// The spec refers to a snapshot that does not exist or is not ready.
    pub const SNAPSHOT_NOT_READY: &str = "SnapshotNotReady";
    /// The spec passed the API server but cannot be honoured (for example disk below the template's).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The VM is being created.
    pub const CREATING: &str = "Creating";
    /// The VM runs and its guest agent answers.
    pub const RUNNING: &str = "Running";
    /// Paused at the user's request.
    pub const PAUSED_BY_USER: &str = "PausedByUser";
    /// Suspended at the user's request.
    pub const SUSPENDED_BY_USER: &str = "SuspendedByUser";
    /// Suspended because its lifecycle expired with `onExpiry: Suspend`.
    pub const SUSPENDED_ON_EXPIRY: &str = "SuspendedOnExpiry";
    /// Its lifecycle expired.
    pub const EXPIRED: &str = "Expired";
    /// The node agent reported a failure; the message carries its error.
    pub const NODE_ERROR: &str = "NodeError";
    /// The node or its agent has been unreachable past the timeout.
    pub const NODE_LOST: &str = "NodeLost";
    /// The VMM exited without being asked to.
    pub const VM_CRASHED: &str = "VmCrashed";
    /// A snapshot's files are written and usable.
    pub const SNAPSHOT_TAKEN: &str = "SnapshotTaken";
    /// A snapshot is being written on its node.
    pub const SNAPSHOTTING: &str = "Snapshotting";
    /// A template's root disk is on at least one node.
    pub const TEMPLATE_CACHED: &str = "TemplateCached";
    /// A template's root disk is prepared on a node when a capsule first needs it.
    pub const PREPARED_ON_DEMAND: &str = "PreparedOnDemand";
    /// No node agent is connected.
    pub const NO_NODES: &str = "NoNodes";
    /// Nodes are preparing a template's root disk or building its warm snapshot.
    pub const PREPARING: &str = "Preparing";
    /// A template's warm snapshot is on at least one node.
    pub const WARM_SNAPSHOT_READY: &str = "WarmSnapshotReady";
    /// Every matching node failed to prepare the template; the message says why per node.
    pub const PREPARATION_FAILED: &str = "PreparationFailed";
    /// A warm template's snapshot is not on any node that fits the capsule yet.
    pub const WARM_SNAPSHOT_NOT_READY: &str = "WarmSnapshotNotReady";
    /// A node agent found a capsule journal it cannot use (unreadable, or
    /// from a newer agent) and left everything of that capsule alone for
    /// an admin (Warning Event on the Node).
    pub const CAPSULE_QUARANTINED: &str = "CapsuleQuarantined";
    /// A node's image cache, snapshots and suspend images fill its disk quota.
    pub const DISK_QUOTA_EXCEEDED: &str = "DiskQuotaExceeded";
}

/// Labels the chart and the operator use to find node agents.
pub mod label {
    /// `app.kubernetes.io/name` of node-agent Pods.
    pub const AGENT_NAME: &str = "wrenn-node-agent";
    /// Standard name label key.
    pub const APP_NAME: &str = "app.kubernetes.io/name";
    /// Namespace label, set by a cluster admin, that lets the namespace's
    /// CapsuleTemplates name files in node image directories (a root disk,
    /// a kernel, a local image). Only the value [`NODE_IMAGES_ALLOWED`]
    /// counts.
    pub const NODE_IMAGES: &str = "wrenn.dev/node-images";
    /// The value of [`NODE_IMAGES`] that allows node files.
    pub const NODE_IMAGES_ALLOWED: &str = "allowed";
}
