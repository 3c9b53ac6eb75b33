//! Every string other components must agree on: API group, finalizer, field
//! manager and labels (condition types, statuses and reasons are enums in
//! [`crate::reason`]). Defined once here so the
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
/// Field manager of the `kubectl wrenn` plugin's writes (a capsule's
/// `operatingMode`, the snapshots and capsules it creates).
pub const CLI_FIELD_MANAGER: &str = "kubectl-wrenn";

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
    /// The Capsule a published Service and EndpointSlice belong to.
    pub const CAPSULE: &str = "wrenn.dev/capsule";
    /// `endpointslice.kubernetes.io/managed-by` of the operator's
    /// EndpointSlices: the cluster's EndpointSlice controller leaves them
    /// alone.
    pub const SLICE_MANAGER: &str = "wrenn-operator";
}
