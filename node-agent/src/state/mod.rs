//! What survives an agent restart: the per-capsule journal ([`Journal`],
//! written by the one batching writer [`GroupCommit`] through a
//! write-ahead log),
//! where things live under the state directory ([`Layout`]), and the
//! verdict on journals recovery must not touch ([`quarantine`]). Recovery
//! itself, which reads them back, is `crate::capsule`'s.

mod commit_log;
mod group_commit;
mod journal;
mod layout;
pub mod quarantine;
mod wal;

use std::path::{Path, PathBuf};

pub use group_commit::{CommitStats, GroupCommit};
pub use journal::{Batch, JOURNAL_FILE, Journal, sync_dir};
pub use layout::Layout;
pub use quarantine::{Quarantine, QuarantineReason, Quarantined};

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing (or renaming, or removing) a journal file failed.
    #[error("{what} {}", path.display())]
    Write {
        /// The step.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading a journal failed.
    #[error("read journal {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A journal is not valid JSON of the expected shape.
    #[error("decode journal {}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("encode journal of capsule {uid}")]
    Encode {
        /// The capsule.
        uid: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The journal writer is gone (its thread died): nothing was written.
    #[error("journal writer gone before capsule {uid}'s record was durable")]
    WriterGone {
        /// The capsule.
        uid: String,
    },
    /// No journal write is safe now (the log could not be replayed, or
    /// neither kept nor removed): nothing was written.
    #[error("journal not writable: {why}")]
    Unsafe {
        /// Why.
        why: String,
    },
    /// A capsule directory without a journal.
    #[error("no journal at {}", path.display())]
    Missing {
        /// Where it should be.
        path: PathBuf,
    },
}

/// `fsync` of every file under `dir` and of the directories themselves, so
/// a snapshot renamed into place is complete on disk.
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                std::fs::File::open(e.path())?.sync_all()?;
            }
        }
        sync_dir(&d)?;
    }
    Ok(())
}
