//! [`QemuError`]: what went wrong inside a QEMU step, as the source of
//! `vmm::Error::Qemu` (which names the step and the capsule). QMP failures
//! are `vmm::Error::Qmp` with a [`QmpError`](super::qmp::QmpError).

use std::path::PathBuf;
use std::time::Duration;

use crate::sys::process::ExitStatus;

/// A QEMU step that did not reach the state it should.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The machine asks for less memory than any guest gets
    /// ([`wrenn_crds::capsule::MIN_MEMORY_BYTES`]); refused, never raised.
    #[error("{bytes} bytes of memory is below the minimum of {min}")]
    MemoryTooSmall {
        /// What the spec asked for.
        bytes: u64,
        /// The minimum.
        min: u64,
    },
    /// QEMU or the vsock helper ended before its socket appeared.
    #[error("exited during start-up ({status:?}); vmm.log ends: {log_tail}")]
    ExitedAtStart {
        /// How it ended.
        status: ExitStatus,
        /// The end of the capsule's `vmm.log` (the processes' output).
        log_tail: String,
    },
    /// A socket a process creates at start did not appear.
    #[error("{} did not appear within {within:?}", path.display())]
    NoSocket {
        /// The socket.
        path: PathBuf,
        /// How long it was waited for.
        within: Duration,
    },
    /// The running vsock helper's command line has no readable CID.
    #[error("cannot read --guest-cid of the running helper")]
    HelperCid,
    /// A stale socket could not be removed before a respawn.
    #[error("remove {}", path.display())]
    RemoveStale {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record of the running vsock helper could not be encoded.
    #[error("encode the helper record")]
    EncodeHelperRecord(#[source] serde_json::Error),
    /// The record of the running vsock helper could not be written.
    #[error("write {}", path.display())]
    WriteHelperRecord {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not release its vsock device after `device_del`.
    #[error("guest did not release {id} within {within:?}")]
    Unplug {
        /// The device id.
        id: String,
        /// How long it was waited for.
        within: Duration,
    },
    /// The vsock device's vhost backend did not start.
    #[error("the guest did not set up its vsock device within {within:?}")]
    VsockSetup {
        /// How long it was waited for.
        within: Duration,
    },
    /// QEMU reports the migration failed or cancelled.
    #[error("migration {status} ({}): {desc}", file.display())]
    Migration {
        /// `failed` or `cancelled`.
        status: String,
        /// The snapshot's memory file.
        file: PathBuf,
        /// QEMU's `error-desc`.
        desc: String,
    },
    /// The migration did not complete in time.
    #[error("migration via {} did not finish in time", file.display())]
    MigrationTimeout {
        /// The snapshot's memory file.
        file: PathBuf,
    },
    /// Copying the migration stream to or from the file failed.
    #[error("stream {}", file.display())]
    Stream {
        /// The snapshot's memory file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM is not running after `cont`.
    #[error("VM is {state} after cont")]
    NotRunning {
        /// QEMU's run state.
        state: String,
    },
    /// A snapshot of another shape than the spec asks for. The shapes are
    /// kept as text: `shape` reports its errors through this enum.
    #[error("snapshot was taken with {taken}, spec asks for {wanted}")]
    ShapeMismatch {
        /// The snapshot's shape.
        taken: String,
        /// The spec's.
        wanted: String,
    },
    /// A shape file is not JSON of a shape.
    #[error("{} is unreadable", path.display())]
    ReadShape {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A shape could not be encoded.
    #[error("encode the machine shape")]
    EncodeShape(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::Error;

    #[test]
    fn the_chain_reads_as_one_sentence_with_the_cause_last() {
        let e = Error::Qemu {
            capsule: "c1".into(),
            what: "snapshot",
            source: QemuError::Stream {
                file: "/s/memory.qemu".into(),
                source: std::io::Error::other("disk full"),
            },
        };
        let source = std::error::Error::source(&e).unwrap();
        let cause = source.source().unwrap();
        assert_eq!(
            format!("{e}: {source}: {cause}"),
            "snapshot for capsule c1: stream /s/memory.qemu: disk full"
        );
    }
}
