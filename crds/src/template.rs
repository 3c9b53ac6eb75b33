//! `CapsuleTemplate`: where capsules' root disks come from, their default
//! resources and, optionally, a warm snapshot to restore instead of booting.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::capsule::SnapshotRef;
use crate::quantity::with;

/// Desired template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "wrenn.dev",
    version = "v1alpha1",
    kind = "CapsuleTemplate",
    namespaced,
    shortname = "ctpl",
    category = "wrenn",
    status = "CapsuleTemplateStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A root disk, kernel and default resources that capsules boot from.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "VCPUs", type_ = "integer", json_path = ".spec.defaults.vcpus"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.defaults.memory"),
    printcolumn(name = "Disk", type_ = "string", json_path = ".spec.defaults.disk"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleTemplateSpec {
    /// Where the root disk comes from. Immutable: capsules already running
    /// share its base image.
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "source is immutable: running capsules share this template's disk; create a new template"
    ))]
    pub source: TemplateSource,

    /// Kernel override; the node agent's default kernel otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelSpec>,

    /// Resources capsules get when they do not set their own.
    #[serde(default)]
    pub defaults: TemplateDefaults,

    /// Boot once, run a command, wait until it is ready and snapshot: later
    /// capsules restore from that snapshot instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmSpec>,

    /// When nodes get the template ready: `OnDemand` (default) when the
    /// first capsule lands on a node, `AllNodes` on every matching node as
    /// soon as it is applied. A warm template, and one whose image has a
    /// `pullSecret`, is always prepared on every matching node: its
    /// snapshot or its private image must be there before a capsule can
    /// use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preparation: Option<Preparation>,

    /// Only nodes whose labels match all of these prepare the template and
    /// run capsules from it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// When nodes get a template ready.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Preparation {
    /// On a node when the first capsule from the template lands there.
    #[default]
    OnDemand,
    /// On every matching node as soon as the template is applied.
    AllNodes,
}

impl CapsuleTemplateSpec {
    /// Whether every matching node prepares the template ahead of capsules.
    /// A private image is: its credentials go to the nodes with the
    /// template's own pull only, never with a capsule's create.
    pub fn prepares_everywhere(&self) -> bool {
        self.warm.is_some()
            || self.preparation == Some(Preparation::AllNodes)
            || self.pull_secret().is_some()
    }

    /// The Secret holding the registry credentials of the template's image.
    pub fn pull_secret(&self) -> Option<&str> {
        self.source
            .image
            .as_ref()
            .and_then(|i| i.pull_secret.as_deref())
    }
}

/// Exactly one of `image`, `rootfs` or `snapshotRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.image), has(self.rootfs), has(self.snapshotRef)].filter(x, x).size() == 1")
    .message("source needs exactly one of image, rootfs or snapshotRef"))]
pub struct TemplateSource {
    /// An OCI image, unpacked into an ext4 root disk by the node agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// A ready ext4 root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsSource>,
    /// A CapsuleSnapshot: capsules restore from its memory instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ref: Option<SnapshotRef>,
}

/// An OCI image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.pullSecret) || !(self.reference.startsWith('oci:') || self.reference.startsWith('docker-archive:'))")
    .message("image.pullSecret applies to registry images only: an oci: or docker-archive: image is read from the node's image directory"))]
pub struct ImageSource {
    /// Image reference, e.g. `docker.io/library/debian:bookworm` or one
    /// pinned by `@sha256:` digest; or an image the node admin placed in
    /// an image directory of every node, as `oci:<layout dir>[:<tag>]` or
    /// `docker-archive:<file>[:<repo:tag>]`, named relative to that
    /// directory (only in namespaces a cluster admin allows, see
    /// `docs/security.md`).
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(format!(
        r"self.matches(r'^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})?(@sha256:[a-f0-9]{{64}})?$') || self.matches(r'{LOCAL_IMAGE_PATTERN}')"
    )).message("image.reference must be an OCI reference such as registry.example.com/team/image:tag or image@sha256:<64 hex digits>, or oci:<name>[:<tag>] / docker-archive:<name>[:<repo:tag>] naming an image in a node image directory"))]
    pub reference: String,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret in this namespace
    /// holding credentials for the image's registry (a registry image only,
    /// not `oci:`/`docker-archive:`). The operator reads it with a `get` by
    /// name, which a namespace owner grants for this Secret alone (see
    /// `docs/private-registries.md`), and passes the registry's entry to
    /// the node agents for that pull only; nodes never store it. Such a
    /// template is prepared on every matching node when applied, and its
    /// capsules start only on nodes that hold its disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
        .message("image.pullSecret must be a Secret name (lowercase DNS subdomain)"))]
    pub pull_secret: Option<String>,
}

/// A ready root disk: exactly one of `url` or `path`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.path)")
    .message("rootfs needs exactly one of url or path"))]
pub struct RootfsSource {
    /// An http or https URL of a raw ext4 image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https']")
        .message("rootfs.url must be an http or https URL"))]
    pub url: Option<String>,
    /// A raw ext4 image the node admin placed in an image directory of
    /// every node, named relative to that directory (`debian-12.ext4`,
    /// `team/base.ext4`); never an absolute path or one with `..`. Only
    /// namespaces a cluster admin allows may name one (see
    /// `docs/security.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{NODE_FILE_NAME_PATTERN}')"))
        .message("rootfs.path must be a name relative to a node image directory: segments of letters, digits and ._+- separated by '/', none starting with '.' (no absolute paths, no '..')"))]
    pub path: Option<String>,
}

/// Kernel override.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct KernelSpec {
    /// An uncompressed kernel the node admin placed in an image directory
    /// of every node, named relative to that directory
    /// (`kernels/vmlinux-6.1`).
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{NODE_FILE_NAME_PATTERN}')"))
        .message("kernel.path must be a name relative to a node image directory: segments of letters, digits and ._+- separated by '/', none starting with '.' (no absolute paths, no '..')"))]
    pub path: String,
    /// Extra kernel command-line arguments, separated by spaces, from an
    /// allow-list: `quiet`, `debug`, `loglevel=0`..`7`, `panic=<seconds>`,
    /// `console=ttyS0`..`3` or `hvc0`..`7` with an optional `,<baud>`. The
    /// node agent builds the rest (root disk, init, network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    // One regex over the whole line: a rule that splits it into tokens is
    // estimated over the API server's CEL cost budget at this length.
    #[x_kube(validation = Rule::new(format!(
        "self.matches(r'{KERNEL_CMDLINE_PATTERN}')"
    )).message(Message::Message(
        "kernel.cmdline may only hold quiet, debug, loglevel=N, panic=N and console=ttyS0-3|hvc0-7[,baud], separated by spaces: init=, rdinit=, root=, -- and every other argument are refused (the node agent builds the rest)".into()
    )))]
    pub cmdline: Option<String>,
}

/// A file name inside a node image directory: `/`-separated segments of
/// letters, digits and `._+-`, none starting with `.` (so no `.`, `..` or
/// hidden files) and no leading `/`. The node agent applies the same rule
/// (`images::dirs`) and resolves the name without following symlinks.
pub const NODE_FILE_NAME_PATTERN: &str =
    "^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$";

/// A local image reference: `oci:` or `docker-archive:`, a node file name
/// (as [`NODE_FILE_NAME_PATTERN`]) and an optional tag.
pub const LOCAL_IMAGE_PATTERN: &str = "^(oci|docker-archive):[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*(:[A-Za-z0-9_][A-Za-z0-9._/:-]{0,254})?$";

/// One kernel command-line token a template may add. The node agent keeps
/// the same allow-list (`capsule::cmdline`); a test checks both agree.
pub const KERNEL_ARG_PATTERN: &str =
    "^(quiet|debug|loglevel=[0-7]|panic=-?[0-9]{1,4}|console=(ttyS[0-3]|hvc[0-7])(,[0-9]{1,7})?)$";

/// A whole `kernel.cmdline`: [`KERNEL_ARG_PATTERN`] tokens separated by
/// spaces, or nothing (a unit test checks the two agree).
pub const KERNEL_CMDLINE_PATTERN: &str = "^ *((quiet|debug|loglevel=[0-7]|panic=-?[0-9]{1,4}|console=(ttyS[0-3]|hvc[0-7])(,[0-9]{1,7})?)( +(quiet|debug|loglevel=[0-7]|panic=-?[0-9]{1,4}|console=(ttyS[0-3]|hvc[0-7])(,[0-9]{1,7})?))*)? *$";

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> Quantity {
    Quantity("512Mi".into())
}

fn default_disk() -> Quantity {
    Quantity("2Gi".into())
}

/// Default resources of capsules from this template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TemplateDefaults {
    /// vCPUs, 1 to 64 (default 1).
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: u32,
    /// Memory, at least 128Mi (default 512Mi).
    #[serde(default = "default_memory")]
    #[schemars(schema_with = "with::memory")]
    pub memory: Quantity,
    /// Root disk size, at least 128Mi (default 2Gi). Capsules may ask for
    /// more, never less.
    #[serde(default = "default_disk")]
    #[schemars(schema_with = "with::disk")]
    pub disk: Quantity,
}

impl Default for TemplateDefaults {
    fn default() -> Self {
        Self {
            vcpus: default_vcpus(),
            memory: default_memory(),
            disk: default_disk(),
        }
    }
}

/// A warm template: boot, start, wait, snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WarmSpec {
    /// argv started in the guest after boot.
    #[schemars(length(min = 1, max = 64))]
    pub start_command: Vec<String>,
    /// How to tell that the started process is ready.
    pub readiness: Readiness,
}

/// Readiness check of a warm template: exactly one of `exec` or `tcpPort`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.exec) != has(self.tcpPort)")
    .message("readiness needs exactly one of exec or tcpPort"))]
pub struct Readiness {
    /// argv that exits 0 when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub exec: Option<Vec<String>>,
    /// A guest TCP port that accepts connections when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp_port: Option<u16>,
    /// Give up after this long (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::readiness_timeout")]
    pub timeout: Option<String>,
}

/// Observed state of a template, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleTemplateStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Preparing, Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TemplatePhase>,
    /// Digest of the prepared root disk (the image manifest digest for images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Per-node readiness.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub nodes: Vec<TemplateNode>,
    /// Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a template.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplatePhase {
    /// Nothing prepared yet.
    Pending,
    /// A node is building the root disk or warm snapshot.
    Preparing,
    /// At least one node can start capsules from it.
    Ready,
    /// Preparation failed; the Ready condition says why.
    Failed,
}

/// The template on one node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateNode {
    /// Node name.
    pub name: String,
    /// The root disk is on the node.
    #[serde(default)]
    pub ready: bool,
    /// Digest of the disk on that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The warm snapshot is on the node.
    #[serde(default)]
    pub snapshot_ready: bool,
    /// Why the node is not ready: what it is doing, or why preparation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
