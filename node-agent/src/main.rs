//! The Wrenn node agent: one per node, privileged. It serves `agent.proto`
//! over mutual TLS to the operator and owns everything on the host — VMM
//! processes, copy-on-write root disks, capsule network namespaces, the vsock
//! link to each guest, metrics and the on-disk journal used for recovery. It
//! never reads or writes Capsule objects in Kubernetes.
//!
//! Modules are listed in DESIGN.md §4 and arrive with the node-agent issues.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "wrenn-node-agent {}: the gRPC server is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
