//! `CapsuleSnapshot`: a point-in-time copy of a capsule's disk (and, by
//! default, its memory), kept on the node that took it.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::quantity::with;

fn default_true() -> bool {
    true
}

/// Desired snapshot.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wrenn.dev",
    version = "v1alpha1",
    kind = "CapsuleSnapshot",
    namespaced,
    shortname = "csnap",
    category = "wrenn",
    status = "CapsuleSnapshotStatus",
    derive = "PartialEq",
    doc = "A snapshot of a Capsule's disk and, by default, memory. New capsules can start from it.",
    printcolumn(name = "Capsule", type_ = "string", json_path = ".spec.capsuleName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.readyToUse"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        format = "int64",
        json_path = ".status.sizeBytes",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleSnapshotSpec {
    /// The Capsule to snapshot, in this namespace. Immutable.
    #[schemars(schema_with = "with::capsule_name")]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "capsuleName is immutable: create a new CapsuleSnapshot for another capsule"
    ))]
    pub capsule_name: String,

    /// true (default): memory and disk, so capsules resume where it was taken;
    /// false: disk only, so capsules boot from it. Immutable.
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "memory is immutable: create a new CapsuleSnapshot to change what it holds"
    ))]
    pub memory: bool,

    /// What deleting this object does to the files on the node: Delete
    /// (default) removes them; Retain leaves them for an administrator.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl Default for CapsuleSnapshotSpec {
    fn default() -> Self {
        Self {
            capsule_name: String::new(),
            memory: true,
            deletion_policy: DeletionPolicy::default(),
        }
    }
}

/// Fate of a snapshot's files when its object is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DeletionPolicy {
    /// Remove the files from the node.
    #[default]
    Delete,
    /// Keep the files on the node.
    Retain,
}

/// Observed state of a snapshot, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleSnapshotStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, InProgress, Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    /// True once capsules can start from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Node holding the snapshot's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Bytes the snapshot takes on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// When the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// What a capsule restoring it must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<Compatibility>,
    /// The capsule it was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_capsule: Option<SourceCapsule>,
    /// Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a snapshot.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPhase {
    /// Waiting for its capsule or node.
    Pending,
    /// The capsule is paused and files are being written.
    InProgress,
    /// Usable by new capsules.
    Ready,
    /// Could not be taken; the Ready condition says why.
    Failed,
}

/// Constraints on restoring a memory snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Compatibility {
    /// VMM name, e.g. `cloud-hypervisor`.
    #[serde(default)]
    pub vmm: String,
    /// VMM version that wrote it.
    #[serde(default)]
    pub vmm_version: String,
    /// CPU model of the node that took it.
    #[serde(default)]
    pub cpu_model: String,
    /// vCPUs of the capsule.
    #[serde(default)]
    pub vcpus: u32,
    /// Memory of the capsule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Identity of the source capsule at snapshot time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SourceCapsule {
    /// UID of the Capsule.
    pub uid: String,
    /// Its `metadata.generation` then.
    pub generation: i64,
}
