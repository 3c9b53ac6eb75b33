//! `wrenn-guest`: the one static binary inside a capsule's VM. As PID 1 it
//! mounts the pseudo filesystems, reaps zombies, forwards signals and powers
//! off cleanly; as the guest agent it serves `guest.proto` on vsock (exec,
//! PTY, files, metrics). It knows nothing about Kubernetes.
//!
//! The agent lands with the guest issue; until then this binary says so.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "wrenn-guest {}: the guest agent is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
