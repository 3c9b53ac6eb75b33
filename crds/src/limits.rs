//! Limits the API server, the operator and the node agent all enforce,
//! defined once. `capsule` re-exports them where its fields use them;
//! `quantity` writes them into the schema's rules.

/// The smallest guest memory: the CRD's CEL rule, the node agent's
/// validation and the QEMU backend (which refuses less, never raises it)
/// all read this one value.
pub const MIN_MEMORY_BYTES: u64 = 128 << 20;

/// The smallest root disk the CRD accepts.
pub const MIN_DISK_BYTES: u64 = 128 << 20;

/// IPv4 networks no capsule reaches on any node, whatever its allow list:
/// private and shared address space (the node's and the cluster's own
/// networks), link-local (cloud metadata at 169.254.169.254) and Azure's
/// wireserver. An `allowCidrs` entry inside one of them could never work,
/// so the API server refuses it. The node agent checks its built-in blocked
/// set against this list.
pub const NEVER_REACHABLE_CIDRS: [&str; 6] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "168.63.129.16/32",
];
