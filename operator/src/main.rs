//! The Wrenn operator: watches `Capsule`, `CapsuleSnapshot` and
//! `CapsuleTemplate`, places capsules on nodes, drives each node's agent over
//! mutual-TLS gRPC and writes status by server-side apply under the
//! `wrenn-operator` field manager. It never execs processes and never touches
//! host networking or disks: that is the node agent's job.
//!
//! Controllers land with the operator issue; until then this binary only says
//! so, rather than pretending to reconcile.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "wrenn-operator {}: controllers are not implemented yet; \
         install the CRDs with `crdgen` and see README.md",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
