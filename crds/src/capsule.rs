//! `Capsule`: one microVM sandbox. All intent is in the spec; the operator
//! writes only the status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub use crate::dns::DnsSpec;
pub use crate::limits::{MIN_DISK_BYTES, MIN_MEMORY_BYTES, NEVER_REACHABLE_CIDRS};
use crate::quantity::with;

/// Desired state of a capsule.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "wrenn.dev",
    version = "v1alpha1",
    kind = "Capsule",
    namespaced,
    shortname = "cap",
    category = "wrenn",
    status = "CapsuleStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A microVM sandbox booted from a CapsuleTemplate or restored from a CapsuleSnapshot.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ip"),
    printcolumn(name = "VCPUs", type_ = "integer", json_path = ".status.resources.vcpus"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".status.resources.memory"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 63").message(
        "capsule names are at most 63 characters: the name becomes the guest's hostname"
    ),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "has(self.resources) && has(self.resources.disk) ? (has(oldSelf.resources) && has(oldSelf.resources.disk) && self.resources.disk == oldSelf.resources.disk) : !(has(oldSelf.resources) && has(oldSelf.resources.disk))"
    ).message("resources.disk is immutable: a capsule's root disk cannot be resized; create a new capsule"),
    validation = Rule::new(
        "!has(self.network) || !has(self.network.allowCidrs) || size(self.network.allowCidrs) == 0 || self.network.egress == 'Deny'"
    ).message("network.allowCidrs applies only with network.egress: Deny (Allow already permits everything)"),
    validation = Rule::new(
        "!has(self.network) || !has(self.network.allowHosts) || size(self.network.allowHosts) == 0 || self.network.egress == 'Deny'"
    ).message("network.allowHosts applies only with network.egress: Deny (Allow already permits every host)"),
    validation = Rule::new(
        "!has(self.network) || !has(self.network.allowHosts) || size(self.network.allowHosts) == 0 || !has(self.network.dns) || !has(self.network.dns.blockUnderDeny) || !self.network.dns.blockUnderDeny"
    ).message("network.allowHosts needs name resolution: remove network.dns.blockUnderDeny or allowHosts"),
)]
pub struct CapsuleSpec {
    /// Where the root disk (and, for a snapshot, the memory) comes from. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "source is immutable: delete the capsule and create a new one from the other source"
    ))]
    pub source: CapsuleSource,

    /// vCPUs, memory and disk; each defaults to the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<CapsuleResources>,

    /// Running (default), Paused (vCPUs stopped, memory kept) or Suspended
    /// (memory written to disk on the node, VMM exited, RAM and CPU released).
    #[serde(default)]
    pub operating_mode: OperatingMode,

    /// When the capsule expires and what happens then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,

    /// Environment variables for every process started in the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<EnvVar>,

    /// Egress policy and exposed ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,

    /// Only nodes whose labels match all of these are considered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// Exactly one of `templateRef` or `snapshotRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.templateRef) != has(self.snapshotRef)")
    .message("source needs exactly one of templateRef or snapshotRef"))]
pub struct CapsuleSource {
    /// Boot from this CapsuleTemplate's root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Restore from this CapsuleSnapshot (the capsule lands on the node that holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ref: Option<SnapshotRef>,
}

/// A reference to a CapsuleTemplate in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TemplateRef {
    /// Name of the CapsuleTemplate.
    #[schemars(schema_with = "with::template_name")]
    pub name: String,
}

/// A reference to a CapsuleSnapshot in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SnapshotRef {
    /// Name of the CapsuleSnapshot.
    #[schemars(schema_with = "with::snapshot_name")]
    pub name: String,
}

/// Resources of one capsule. Unset fields take the template's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleResources {
    /// Number of vCPUs, 1 to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: Option<u32>,
    /// Guest memory, at least 128Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::memory")]
    pub memory: Option<Quantity>,
    /// Root disk size, at least the template's. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::disk")]
    pub disk: Option<Quantity>,
}

/// What the VM should be doing.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum OperatingMode {
    /// vCPUs run.
    #[default]
    Running,
    /// vCPUs stopped, memory kept in RAM; resumes in milliseconds.
    Paused,
    /// Memory and device state written to disk on the node and the VMM
    /// stopped; RAM and CPU are released. Back to Running restores it.
    Suspended,
}

/// Automatic expiry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// Expire this long after creation, e.g. `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::shutdown_after")]
    pub shutdown_after: Option<String>,
    /// Expire after this long without activity, e.g. `15m`: any exec, PTY,
    /// attach, file, process or console-follow call through the node agent
    /// counts for as long as it stays open, and so does CPU use of the VM of
    /// at least a tenth of one CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::idle_timeout")]
    pub idle_timeout: Option<String>,
    /// What expiry does: Delete (default) removes the capsule; Suspend
    /// suspends it on its node, memory and disk kept, for as long as the
    /// lifecycle says it has expired: raise or remove shutdownAfter or
    /// idleTimeout to run it again.
    #[serde(default)]
    pub on_expiry: OnExpiry,
}

/// Action taken when a capsule's lifecycle expires.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum OnExpiry {
    /// Delete the Capsule object and its VM.
    #[default]
    Delete,
    /// Suspend the VM to disk and keep the object.
    Suspend,
}

/// One environment variable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct EnvVar {
    /// Variable name: letters, digits and `_`, not starting with a digit.
    #[x_kube(validation = Rule::new("self.matches(r'^[A-Za-z_][A-Za-z0-9_]*$')")
        .message("env names are letters, digits and '_', not starting with a digit"))]
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Value; empty is allowed.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Network policy of a capsule. Isolation from other capsules, the node,
/// cloud metadata addresses and the node's blocked ranges always applies.
/// `egress`, `allowCidrs`, `dns` and `allowHosts` may change on a running capsule: the node
/// swaps its rules in place, and `status.observedGeneration` advances once
/// it has.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Allow (default): any destination outside the node that the node
    /// does not block. Deny: only `allowCidrs`.
    #[serde(default)]
    pub egress: Egress,
    /// With `egress: Deny`, the only destinations still reachable: IPv4
    /// CIDRs (capsules are IPv4 only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "with::cidrs")]
    pub allow_cidrs: Vec<String>,
    /// Guest ports reachable through port forwarding and the data plane.
    /// A TCP port with `from` is also published in the cluster: a Service
    /// named like the capsule (port = this port) reaches it through a host
    /// port on the capsule's node, from the listed sources only. Ports may
    /// be added, removed or given other sources on a running capsule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["port".into(), "protocol".into()]))]
    #[x_kube(
        validation = Rule::new("self.all(p, !has(p.name) || self.filter(q, has(q.name) && q.name == p.name).size() == 1)")
            .message("port names must be unique")
    )]
    pub ports: Vec<PortSpec>,
    /// The guest's resolver; absent: the node's cluster DNS with the
    /// namespace search path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,
    /// With `egress: Deny`, host names the guest may still connect to
    /// (`pypi.org`, `*.github.com`). A lookup of any other name fails at
    /// once and gives the capsule a `NameNotAllowed` Warning Event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::dns::allow_hosts")]
    pub allow_hosts: Vec<String>,
}

/// Egress policy.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Egress {
    /// Everything outside the node is reachable.
    #[default]
    Allow,
    /// Nothing is reachable but `allowCidrs`.
    Deny,
}

/// A guest port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.name) || !self.name.matches(r'^tcp-[0-9]+$') || int(self.name.substring(4)) == self.port")
    .message("a port name tcp-N is the name an unnamed published port N gets: it may only name port N"))]
#[x_kube(validation = Rule::new("!has(self.protocol) || self.protocol == 'TCP'")
    .message("only TCP ports are supported: port forwarding and the proxy carry TCP, and only TCP is published in the cluster"))]
pub struct PortSpec {
    /// Optional name, shown by tools and used as the Service port's name
    /// when the port is published: a Service port name (lowercase letters,
    /// digits and single `-` inside, at least one letter, at most 15
    /// characters). Unnamed published ports are named `tcp-PORT`, so a
    /// name of that form must name its own port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    #[x_kube(
        validation = Rule::new("self.matches(r'^[a-z0-9]([a-z0-9-]*[a-z0-9])?$') && self.matches(r'[a-z]') && !self.contains('--')")
            .message("a port name is lowercase letters, digits and single '-' inside, with at least one letter (a Service port name)")
    )]
    pub name: Option<String>,
    /// Port number in the guest, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// TCP (the default, and the only protocol accepted today: port
    /// forwarding, the proxy and publishing in the cluster carry TCP).
    #[serde(default)]
    pub protocol: Protocol,
    /// Who in the cluster may reach this port, like a NetworkPolicy's
    /// ingress `from`, enforced on the capsule's node: only these sources,
    /// only this port. Absent or empty (the default): nobody; the port is
    /// not published in the cluster and is reached only through port
    /// forwarding and the proxy. Sources are matched as they arrive at the
    /// node: a CNI that masquerades Pod traffic to node addresses makes
    /// Pods appear as their node's address, which a selector does not list.
    /// At most 1024 addresses per port after selectors are resolved. A Pod on the capsule's own node
    /// connecting to the Service's ClusterIP is refused (kube-proxy
    /// translates it to the node's own address first); it can use the
    /// node address and port in the EndpointSlice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<PortPeer>,
}

/// A source allowed to reach a published port, like a NetworkPolicy peer:
/// an IPv4 CIDR, or Pods chosen by label (`podSelector` alone: Pods in the
/// capsule's namespace; `namespaceSelector` alone: every Pod in the chosen
/// namespaces; both: the chosen Pods in the chosen namespaces). The
/// operator resolves selectors to the Pods' IPv4 addresses and keeps the
/// node's rules following them as Pods come, go and change labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cidr) != (has(self.podSelector) || has(self.namespaceSelector))")
    .message("a from entry is either a cidr or a podSelector and/or namespaceSelector"))]
pub struct PortPeer {
    /// An IPv4 network in CIDR form (a.b.c.d/n, host bits zero), e.g. the
    /// cluster's Pod network or one address as /32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "with::source_cidr")]
    pub cidr: Option<String>,
    /// Pods whose labels match (`{}`: every Pod), in the capsule's namespace
    /// unless `namespaceSelector` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces whose labels match (`{}`: every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Transport protocol of an exposed port.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// Observed state, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Coarse lifecycle phase; conditions carry the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CapsulePhase>,
    /// Node the capsule is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Node-reachable address of the capsule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// When the VM last started or was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Resources in effect after template defaults were applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<CapsuleResources>,
    /// The VMM running this capsule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmInfo>,
    /// Coarse usage, sampled at most every 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Scheduled, Ready, Paused, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Lifecycle phase of a capsule.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum CapsulePhase {
    Pending,
    Scheduled,
    Creating,
    Running,
    Pausing,
    Paused,
    Suspending,
    Suspended,
    Resuming,
    Terminating,
    Failed,
    Expired,
}

/// Which VMM runs the capsule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmmInfo {
    /// `cloud-hypervisor` or `qemu`.
    pub name: String,
    /// Version string the VMM reported.
    #[serde(default)]
    pub version: String,
    /// Why this VMM is slower than production, e.g. QEMU without KVM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Coarse resource usage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU in use, as a quantity of cores (e.g. `250m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Guest memory in use (total minus available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Bytes allocated by the copy-on-write disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Quantity>,
    /// When the sample was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<Time>,
}
