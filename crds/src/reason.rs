//! Condition types, condition statuses and reasons as enums: the one
//! spelling of each, shared by the operator (conditions, Events) and the
//! node agent (`Capsule.reason` on the wire). A reason crosses gRPC and the
//! API server as its [`Reason::as_str`] text and is read back with
//! [`str::parse`]; it is never taken out of a message.

/// An enum whose variants are written as their own names.
macro_rules! named {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The text written to the API (CamelCase, stable).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = Unknown;

            fn from_str(s: &str) -> Result<Self, Unknown> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| Unknown {
                        kind: stringify!($name),
                        text: s.to_string(),
                    })
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }
    };
}

/// A text that names no value of the enum (from a newer peer, or garbage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unknown {
    /// The enum.
    pub kind: &'static str,
    /// The text.
    pub text: String,
}

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown {} {:?}", self.kind, self.text)
    }
}

impl std::error::Error for Unknown {}

/// The condition of type `t` in a status's `conditions`.
pub fn find_condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: ConditionType,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == t)
}

named! {
    /// `status.conditions[].type`.
    ConditionType {
        /// The capsule has been placed on a node.
        Scheduled,
        /// The object is usable: a capsule runs, a snapshot or template can be used.
        Ready,
        /// The capsule's vCPUs are stopped with its memory kept.
        Paused,
        /// The capsule's memory is on disk and its VMM has exited.
        Suspended,
        /// The capsule's ports with `from` are reachable in the cluster
        /// through its Service.
        PortsPublished,
    }
}

named! {
    /// `status.conditions[].status`.
    ConditionStatus {
        /// The condition holds.
        True,
        /// It does not.
        False,
        /// Not known.
        Unknown,
    }
}

impl From<bool> for ConditionStatus {
    fn from(ok: bool) -> Self {
        if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

named! {
    /// Why a condition, an Event or a node agent's capsule is as it is
    /// (CamelCase, stable: tools match on them).
    Reason {
        /// Waiting for the operator to act.
        Pending,
        /// Placed on a node.
        Placed,
        /// No node satisfies the capsule's constraints; the message says why per node.
        Unschedulable,
        /// The spec refers to a template that does not exist.
        TemplateNotFound,
        /// The spec refers to a snapshot that does not exist or is not ready.
        SnapshotNotReady,
        /// The spec passed the API server but cannot be honoured (for
        /// example disk below the template's); the agent refuses a spec it
        /// cannot honour with the same reason.
        InvalidSpec,
        /// The VM is being created.
        Creating,
        /// The VM runs and its guest agent answers.
        Running,
        /// Paused at the user's request.
        PausedByUser,
        /// Suspended at the user's request.
        SuspendedByUser,
        /// Suspended because its lifecycle expired with `onExpiry: Suspend`.
        SuspendedOnExpiry,
        /// Its lifecycle expired.
        Expired,
        /// The node agent reported a failure without a reason of its own;
        /// the message carries its error.
        NodeError,
        /// The node or its agent has been unreachable past the timeout.
        NodeLost,
        /// The VMM exited without being asked to.
        VmCrashed,
        /// The guest powered itself off.
        GuestPoweroff,
        /// The agent lost track of the VMM (it cannot tell how it ended).
        VmmLost,
        /// A resume was cut short by an agent restart.
        ResumeInterrupted,
        /// A snapshot's files are written and usable.
        SnapshotTaken,
        /// A snapshot is being written on its node.
        Snapshotting,
        /// A template's root disk is on at least one node.
        TemplateCached,
        /// A template's root disk is prepared on a node when a capsule first needs it.
        PreparedOnDemand,
        /// No node agent is connected.
        NoNodes,
        /// Nodes are preparing a template's root disk or building its warm snapshot.
        Preparing,
        /// A template's warm snapshot is on at least one node.
        WarmSnapshotReady,
        /// Every matching node failed to prepare the template; the message says why per node.
        PreparationFailed,
        /// A warm template's snapshot is not on any node that fits the capsule yet.
        WarmSnapshotNotReady,
        /// A node agent found a capsule journal it cannot use (unreadable,
        /// or from a newer agent) and left everything of that capsule alone
        /// for an admin (Warning Event on the Node).
        CapsuleQuarantined,
        /// A node's image cache, snapshots and suspend images fill its disk quota.
        DiskQuotaExceeded,
        /// Event: the capsule was placed.
        Scheduled,
        /// Event: no node fits the capsule.
        FailedScheduling,
        /// Event: the capsule's vCPUs stopped.
        Paused,
        /// Event: the capsule's memory is on disk.
        Suspended,
        /// Event: the capsule failed.
        Failed,
        /// Event: a snapshot became usable.
        Ready,
        /// Event: the guest looked up a name `spec.network.allowHosts` does
        /// not list; its resolver answered NXDOMAIN without asking upstream.
        NameNotAllowed,
        /// Event: no upstream nameserver answered a name the guest looked
        /// up; its resolver answered SERVFAIL.
        NameUnresolved,
        /// Agent: no capsule with that UID.
        NotFound,
        /// Agent: a capsule with that UID exists with another spec.
        AlreadyExists,
        /// Agent: the operation is not legal in the capsule's state.
        WrongState,
        /// Agent: a delete cancelled the operation.
        Cancelled,
        /// Agent: the capsule's journal could not be written.
        JournalFailed,
        /// Agent: setting up the capsule's network failed.
        NetworkFailed,
        /// Agent: the node's host-port range has too few free ports to
        /// publish the capsule's ports; the message names the range.
        HostPortsExhausted,
        /// The capsule's published ports are in a Service and EndpointSlice.
        PortsPublished,
        /// The capsule publishes no port (none has `from`), or is not running.
        NoPortsPublished,
        /// Agent: setting up the capsule's disk failed.
        StorageFailed,
        /// Agent: the VMM failed an operation.
        VmFailed,
        /// Agent: the guest agent did not answer in time.
        GuestNotReady,
        /// Agent: a file operation in the guest failed.
        FilesFailed,
        /// Agent: a snapshot with that id exists.
        SnapshotExists,
        /// Agent: a blocking task of the operation died.
        Aborted,
        /// Agent: no snapshot with that id.
        SnapshotNotFound,
        /// Agent: the snapshot cannot be restored here.
        SnapshotUnusable,
        /// Agent: pulling or unpacking the image failed.
        ImageFailed,
        /// Agent: the capsule is quarantined; create and delete are refused.
        Quarantined,
        /// Agent, quarantine: the capsule's journal is unreadable (an I/O
        /// error, not JSON, not a record, or a record of another UID).
        JournalUnreadable,
        /// Agent, quarantine: a newer agent wrote the capsule's journal.
        JournalNewerVersion,
        /// Agent, template build: writing the template's root disk failed.
        RootDiskFailed,
        /// Agent, template build: the build VM did not boot.
        BootFailed,
        /// Agent, template build: the warm template's startCommand did not start.
        StartFailed,
        /// Agent, template build: the warm snapshot could not be written.
        SnapshotFailed,
        /// Agent, template build: the warm template's readiness probe never passed.
        ReadinessTimeout,
        /// A template's `image.pullSecret` names no Secret in its namespace.
        PullSecretNotFound,
        /// The operator may not read the template's `image.pullSecret`: a
        /// namespace owner grants `get` on that one Secret (the message
        /// names the commands).
        PullSecretForbidden,
        /// The template's `image.pullSecret` is not a readable
        /// `kubernetes.io/dockerconfigjson` Secret.
        PullSecretInvalid,
        /// The template's `image.pullSecret` holds no credentials for the
        /// image's registry.
        PullSecretNoCredentials,
        /// Agent, image pull: the registry refused the pull (HTTP 401 or
        /// 403: no or wrong credentials, or no access to the repository).
        RegistryUnauthorized,
        /// Agent, image pull: the registry has no such repository, tag or
        /// digest (HTTP 404).
        ImageNotFound,
        /// Agent, image pull: the registry limits pulls (HTTP 429); retried later.
        RegistryRateLimited,
        /// Agent, image pull: the registry failed otherwise (5xx, an
        /// unreachable host, a broken answer).
        RegistryFailed,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_reason_reads_back_as_itself_and_nothing_else_reads() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), *r);
        }
        assert!("VmmCrashed".parse::<Reason>().is_err());
        assert!("".parse::<Reason>().is_err());
        assert_eq!(ConditionStatus::from(true).as_str(), "True");
        assert_eq!(ConditionType::Ready.as_str(), "Ready");
    }
}
