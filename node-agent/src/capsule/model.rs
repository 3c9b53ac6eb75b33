//! Domain types of a capsule: what was asked for ([`CapsuleSpec`]), where it
//! stands ([`State`]) and what readers see ([`CapsuleView`]); the journal's
//! record is in `record`. No I/O here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wrenn_crds::reason::Reason;

use crate::guest::GuestToken;
use crate::vmm::BackendInfo;

/// Where a capsule's root disk comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootSource {
    /// A template's raw ext4 image already on the node.
    Template(TemplateDisk),
    /// An OCI image the agent builds into a template disk (cached by
    /// manifest digest) before the capsule's disk is made over it.
    Image(ImageTemplate),
    /// A named snapshot on the node.
    Snapshot {
        /// Snapshot id.
        id: String,
    },
}

/// A template given as an OCI image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageTemplate {
    /// Stable key (namespace/name@digest).
    pub key: String,
    /// The reference as the operator sent it; see
    /// [`ImageSource`](crate::images::ImageSource) for the syntax.
    pub reference: String,
    /// Manifest digest, when known.
    pub digest: String,
}

/// A template disk on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDisk {
    /// Stable key (namespace/name@digest).
    pub key: String,
    /// Absolute path of the raw image.
    pub rootfs: PathBuf,
    /// Digest, when known.
    pub digest: String,
}

/// Egress policy: the network module's own type, its CIDRs parsed once
/// where they enter the agent (`server::convert::from_network`) and
/// journaled as their text.
pub use crate::network::EgressPolicy as Egress;

/// A published port (a declared TCP port with sources): the network
/// module's own type, its CIDRs parsed where they enter the agent
/// (`server::convert::from_ports`).
pub use crate::network::{HostPort, PortRule};

/// vCPUs, RAM and disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Root disk size in bytes.
    pub disk_bytes: u64,
}

/// What the operator asked for. Two creates with the same UID must carry an
/// equal spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleSpec {
    /// Kubernetes namespace of the Capsule.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Root disk source.
    pub source: BootSource,
    /// Resources.
    pub resources: Resources,
    /// Kernel; `None` uses the agent's default.
    pub kernel: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Environment for the guest's `Init`.
    pub env: BTreeMap<String, String>,
    /// Egress policy.
    pub egress: Egress,
    /// Resolver and allowed host names (absent in older journals).
    #[serde(default)]
    pub names: crate::network::Names,
    /// Ports published through host ports, by guest port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRule>,
}

impl CapsuleSpec {
    /// A capsule booting `source` with `resources` and the defaults for
    /// the rest: the agent's kernel and command line, no environment,
    /// egress allowed, no names or ports.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        source: BootSource,
        resources: Resources,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            source,
            resources,
            kernel: None,
            cmdline: String::new(),
            env: BTreeMap::new(),
            egress: Egress::Allow,
            names: Default::default(),
            ports: Vec::new(),
        }
    }

    /// The first field that differs from `other`, for a conflict message.
    pub fn first_difference(&self, other: &CapsuleSpec) -> Option<&'static str> {
        let pairs: [(&'static str, bool); 8] = [
            ("namespace", self.namespace == other.namespace),
            ("name", self.name == other.name),
            ("source", self.source == other.source),
            ("resources", self.resources == other.resources),
            ("kernel", self.kernel == other.kernel),
            ("cmdline", self.cmdline == other.cmdline),
            ("env", self.env == other.env),
            (
                "network",
                self.egress == other.egress
                    && self.names == other.names
                    && self.ports == other.ports,
            ),
        ];
        pairs.into_iter().find(|(_, same)| !same).map(|(f, _)| f)
    }
}

/// Where a capsule stands (one definition with the operator's, in
/// `wrenn-crds`).
pub use wrenn_crds::VmState as State;

/// A named snapshot on the node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: String,
    /// Capsule it came from.
    pub capsule_uid: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Created at (unix nanos).
    pub created_unix_nanos: i64,
    /// Whether memory is included.
    pub memory: bool,
    /// vCPUs, RAM and disk of the source.
    pub resources: Resources,
}

/// A capsule as `Get`/`List`/events show it.
#[derive(Clone, Debug, PartialEq)]
pub struct CapsuleView {
    /// UID.
    pub uid: String,
    /// Spec.
    pub spec: CapsuleSpec,
    /// State.
    pub state: State,
    /// Guest address as the node reaches it, once it has a network.
    pub ip: Option<String>,
    /// Backend.
    pub vmm: BackendInfo,
    /// Guest start (unix nanos), 0 before.
    pub started_unix_nanos: i64,
    /// Last error, if any.
    pub message: Option<String>,
    /// Its reason, if any.
    pub reason: Option<Reason>,
    /// Host socket of the guest's vsock while a VMM runs.
    pub vsock_socket: Option<PathBuf>,
    /// Host ports of its published ports, by guest port.
    pub host_ports: Vec<HostPort>,
    /// The capsule's network namespace, where the guest's address answers
    /// (port forwarding dials from inside it).
    pub netns: Option<PathBuf>,
    /// What the guest agent requires, for the node agent's own calls
    /// (data plane, sampler, warm builds). Never converted to the wire.
    pub guest_token: Option<GuestToken>,
}

/// Errors of the capsule supervisor. Display names the failed action and
/// the capsule; the cause is in `source()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No capsule with this UID.
    #[error("capsule {uid} not found")]
    NotFound {
        /// UID.
        uid: String,
    },
    /// A create with this UID and another spec exists.
    #[error("capsule {uid} already exists with a different {field}")]
    AlreadyExists {
        /// UID.
        uid: String,
        /// The first field that differs.
        field: &'static str,
    },
    /// The request cannot be served in the capsule's state.
    #[error("capsule {uid} is {state}; {hint}")]
    WrongState {
        /// UID.
        uid: String,
        /// Its state.
        state: State,
        /// What to do instead.
        hint: &'static str,
    },
    /// The spec cannot be served by this agent.
    #[error("invalid capsule spec: {reason}")]
    InvalidSpec {
        /// Why.
        reason: String,
    },
    /// A delete cancelled this create.
    #[error("create of capsule {uid} cancelled by a delete")]
    Cancelled {
        /// UID.
        uid: String,
    },
    /// The journal could not be written or read.
    #[error("journal of capsule {uid}")]
    Journal {
        /// UID.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::state::Error>,
    },
    /// A network step failed.
    #[error("{action} network of capsule {uid}")]
    Network {
        /// `set up`, `tear down`, `recreate tap of`.
        action: &'static str,
        /// UID.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::network::Error>,
    },
    /// A disk step failed.
    #[error("{action} disk of capsule {uid}")]
    Storage {
        /// `create`, `remove`.
        action: &'static str,
        /// UID.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::storage::Error>,
    },
    /// A VM step failed.
    #[error("{action} VM of capsule {uid}")]
    Vm {
        /// `launch`, `pause`, `resume`, `snapshot`, `restore`, `stop`.
        action: &'static str,
        /// UID.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::vmm::Error>,
    },
    /// The guest agent did not come up or refused `Init`.
    #[error("{action} guest agent of capsule {uid}")]
    Guest {
        /// `reach` or `init`.
        action: &'static str,
        /// UID.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::guest::Error>,
    },
    /// A file of a suspend image or snapshot could not be handled.
    #[error("{action} {}", path.display())]
    Files {
        /// What was done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot with this id already exists on the node.
    #[error("snapshot {id} already exists")]
    SnapshotExists {
        /// Snapshot id.
        id: String,
    },
    /// No snapshot with this id on this node.
    #[error("snapshot {id} not found on this node")]
    SnapshotNotFound {
        /// Snapshot id.
        id: String,
    },
    /// A snapshot exists but cannot start this capsule.
    #[error("snapshot {id} cannot start capsule {uid}: {why}")]
    SnapshotUnusable {
        /// Snapshot id.
        id: String,
        /// UID.
        uid: String,
        /// Why.
        why: String,
    },
    /// The template disk of an OCI image could not be made.
    #[error("build template disk of capsule {uid} from {reference}")]
    Image {
        /// UID.
        uid: String,
        /// The image reference.
        reference: String,
        /// Why.
        #[source]
        source: Box<crate::images::Error>,
    },
    /// Recovery quarantined this capsule: its journal could not be read
    /// (or was written by a newer agent), so the agent touches nothing of
    /// it until an admin releases it (docs/security.md, "Recovery").
    #[error("capsule {uid} is quarantined on this node ({why}); an admin must release it")]
    Quarantined {
        /// UID.
        uid: String,
        /// What recovery found (`JournalUnreadable`, `JournalNewerVersion`).
        why: Reason,
    },
    /// A blocking task of the supervisor died.
    #[error("{what} of capsule {uid} was aborted")]
    Aborted {
        /// What.
        what: &'static str,
        /// UID.
        uid: String,
    },
}

impl Error {
    /// A stable CamelCase reason for `Capsule.reason`.
    pub fn reason(&self) -> Reason {
        match self {
            Error::NotFound { .. } => Reason::NotFound,
            Error::AlreadyExists { .. } => Reason::AlreadyExists,
            Error::WrongState { .. } => Reason::WrongState,
            Error::InvalidSpec { .. } => Reason::InvalidSpec,
            Error::Cancelled { .. } => Reason::Cancelled,
            Error::Journal { .. } => Reason::JournalFailed,
            Error::Network { source, .. }
                if matches!(**source, crate::network::Error::HostPortsExhausted { .. }) =>
            {
                Reason::HostPortsExhausted
            }
            Error::Network { .. } => Reason::NetworkFailed,
            Error::Storage { .. } => Reason::StorageFailed,
            Error::Vm { .. } => Reason::VmFailed,
            Error::Guest { .. } => Reason::GuestNotReady,
            Error::Files { .. } => Reason::FilesFailed,
            Error::SnapshotExists { .. } => Reason::SnapshotExists,
            Error::Aborted { .. } => Reason::Aborted,
            Error::SnapshotNotFound { .. } => Reason::SnapshotNotFound,
            Error::SnapshotUnusable { .. } => Reason::SnapshotUnusable,
            Error::Image { .. } => Reason::ImageFailed,
            Error::Quarantined { .. } => Reason::Quarantined,
        }
    }

    /// The `class` label of `wrenn_agent_errors_total` for a failed
    /// operation; `None` for refusals of the request itself (unknown
    /// capsule, wrong state, bad spec) and for a create a delete
    /// cancelled, which say nothing about the node's health.
    pub fn class(&self) -> Option<&'static str> {
        match self {
            Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::WrongState { .. }
            | Error::InvalidSpec { .. }
            | Error::SnapshotExists { .. }
            | Error::SnapshotNotFound { .. }
            | Error::SnapshotUnusable { .. }
            | Error::Quarantined { .. }
            | Error::Cancelled { .. } => None,
            // A registry, cache or unpack failure on this node.
            Error::Image { .. } => Some("image"),
            Error::Journal { .. } => Some("journal"),
            Error::Network { .. } => Some("network"),
            Error::Storage { .. } => Some("storage"),
            Error::Vm { .. } => Some("vmm"),
            Error::Guest { .. } => Some("guest"),
            Error::Files { .. } => Some("files"),
            Error::Aborted { .. } => Some("aborted"),
        }
    }

    /// The whole chain on one line, for `Capsule.message`.
    pub fn chain(&self) -> String {
        crate::error_chain(self)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A small valid spec.
    pub fn spec(name: &str) -> CapsuleSpec {
        CapsuleSpec::new(
            "default",
            name,
            BootSource::Template(TemplateDisk {
                key: "default/base@sha256:00".into(),
                rootfs: "/var/lib/wrenn/templates/base.ext4".into(),
                digest: "sha256:00".into(),
            }),
            Resources {
                vcpus: 1,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::spec;
    use super::*;

    #[test]
    fn spec_difference_names_the_field() {
        let a = spec("a");
        let mut b = a.clone();
        assert_eq!(a.first_difference(&b), None);
        b.resources.vcpus = 4;
        assert_eq!(a.first_difference(&b), Some("resources"));
        b.egress = Egress::Deny;
        assert_eq!(a.first_difference(&b), Some("resources"));
    }
}
