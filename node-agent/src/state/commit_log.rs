//! [`Log`]: how the journal writer makes a batch durable. Normally each
//! change is applied to the capsule's files without an fsync and the
//! batch appended to the write-ahead log ([`super::wal`]) with one
//! `fdatasync`; a checkpoint (the log grown past [`CHECKPOINT_BYTES`], the
//! writer idle, or shutdown) fsyncs the files the log covers and starts a
//! fresh log. On start the log is replayed over the files before anything
//! reads or writes them.
//!
//! Whatever goes wrong, no record is acknowledged that a restarted agent
//! would not read back: a log that cannot be appended to is replaced
//! after the files are synced, a log that cannot be replaced is removed
//! and records are then written file by file as before the log existed,
//! and when even that is unsafe (an old log that would replay stale
//! records over newer files) every write fails.
//!
//! One writer owns a state directory at a time: the replay first takes
//! an exclusive lock on `journal.lock` beside the log, held until the
//! last handle of this [`Log`] is gone. A second agent on the same node
//! (a surge during a rolling update, a restart before the old writer
//! finished its last checkpoint) waits for it rather than replaying a
//! log the other one is still appending to and checkpointing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Error;
use super::journal::{Batch, Journal, sync_dir};
use super::wal::{AppendError, Change, Wal};

/// Log size past which a batch is followed by a checkpoint. Replay reads
/// it whole at start, so it stays small; a create appends about 10 KiB.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

/// How long a replay waits for another writer to let go of the state
/// directory before it gives up (and no journal write is made).
pub const OWNER_WAIT: Duration = Duration::from_secs(30);

/// How changes are made durable now.
#[derive(Debug)]
enum Mode {
    /// Appended to this log.
    Logged(Wal),
    /// Written durably file by file: no log could be made, and none is
    /// left to replay.
    Direct,
    /// No write is safe; the message says why.
    Broken(String),
}

/// The writer's durable state. One exists per journal, behind a mutex the
/// writer thread and the fallback path share.
#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    /// `None` until the log was replayed.
    mode: Option<Mode>,
    /// The replay's outcome: changes replayed, or why it failed.
    replayed: Option<Result<u64, Error>>,
    /// Capsules whose files the log covers and no fsync has reached.
    unsynced: BTreeSet<String>,
    /// A capsule directory was made or removed since the last checkpoint.
    dirs_changed: bool,
    /// The exclusive lock on the state directory, from the replay on.
    owner: Option<std::fs::File>,
}

impl Log {
    /// The log at `path`, not yet replayed.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            mode: None,
            replayed: None,
            unsynced: BTreeSet::new(),
            dirs_changed: false,
            owner: None,
        }
    }

    /// `journal.lock` beside the log.
    fn owner_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    /// Replays the log over the journal files, once: the newest change of
    /// each capsule written durably, then a fresh log. Later calls answer
    /// with the first one's outcome.
    pub fn replay(&mut self, journal: &Journal) -> Result<u64, Error> {
        if let Some(done) = &self.replayed {
            return done.as_ref().map(|n| *n).map_err(copy_error);
        }
        let done = self.replay_now(journal);
        if let Err(e) = &done {
            tracing::error!(
                error = e as &dyn std::error::Error,
                "replay the journal log; no journal write will be made"
            );
        }
        let answer = done.as_ref().map(|n| *n).map_err(copy_error);
        self.replayed = Some(done);
        answer
    }

    fn replay_now(&mut self, journal: &Journal) -> Result<u64, Error> {
        self.owner = Some(take_owner(&self.owner_path(), OWNER_WAIT)?);
        let changes = super::wal::read(&self.path).map_err(|source| Error::Read {
            path: self.path.clone(),
            source,
        })?;
        let count = changes.len() as u64;
        let newest: BTreeMap<String, Change> = changes.into_iter().collect();
        let batch: Vec<(String, Change)> = newest.into_iter().collect();
        let written = durable(journal, &batch);
        if let Some(e) = written.results.into_iter().find_map(Result::err) {
            return Err(e);
        }
        if count > 0 {
            tracing::info!(
                changes = count,
                capsules = batch.len(),
                "journal log replayed"
            );
        }
        self.mode = Some(self.fresh_log());
        Ok(count)
    }

    /// Makes `batch` durable; one result per entry, in order.
    pub fn commit(&mut self, journal: &Journal, batch: &[(String, Change)]) -> Batch {
        let refuse = |why: &str| Batch {
            results: batch
                .iter()
                .map(|_| {
                    Err(Error::Unsafe {
                        why: why.to_string(),
                    })
                })
                .collect(),
            fsyncs: 0,
        };
        let wal = match &mut self.mode {
            Some(Mode::Logged(wal)) => wal,
            Some(Mode::Direct) => return durable(journal, batch),
            Some(Mode::Broken(why)) => return refuse(why),
            None => return refuse("the journal log was not replayed"),
        };
        let applied = journal.apply(batch);
        let appended = wal.append(
            batch
                .iter()
                .zip(&applied.results)
                .filter(|(_, r)| r.is_ok())
                .map(|((uid, change), _)| (uid.as_str(), change)),
        );
        let mut done = match appended {
            Ok(()) => {
                for ((uid, change), res) in batch.iter().zip(&applied.results) {
                    if res.is_ok() && matches!(change, Change::Record(_)) {
                        self.unsynced.insert(uid.clone());
                    }
                }
                self.dirs_changed |= applied.dirs_changed;
                Batch {
                    results: applied.results,
                    fsyncs: 1,
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "journal log append failed; writing the batch file by file and replacing the log"
                );
                let mut done = durable(journal, batch);
                let (ok, fsyncs) = self.checkpoint(journal);
                done.fsyncs += fsyncs;
                if !ok {
                    // The log still holds older records of this batch's
                    // capsules: a replay would put them back over the
                    // files just written, so nothing of it counts.
                    let why = match e {
                        AppendError::Torn(_) => {
                            "the journal log ends in a torn frame and could not be replaced"
                        }
                        AppendError::Failed(_) => {
                            "the journal log could be neither appended to nor replaced"
                        }
                    };
                    self.mode = Some(Mode::Broken(why.into()));
                    for r in &mut done.results {
                        *r = Err(Error::Unsafe { why: why.into() });
                    }
                }
                return done;
            }
        };
        if wal.bytes() > CHECKPOINT_BYTES {
            done.fsyncs += self.checkpoint(journal).1;
        }
        done
    }

    /// Whether changes await a checkpoint.
    pub fn pending(&self) -> bool {
        !self.unsynced.is_empty() || self.dirs_changed
    }

    /// Syncs every file the log covers, then replaces the log with an
    /// empty one (or, when none can be made, removes it). Returns whether
    /// the files are durable without the old log, and the fsyncs made. A
    /// failed sync keeps the log, which still covers those files.
    pub fn checkpoint(&mut self, journal: &Journal) -> (bool, u64) {
        if !matches!(self.mode, Some(Mode::Logged(_))) {
            return (false, 0);
        }
        let uids: Vec<String> = self.unsynced.iter().cloned().collect();
        match journal.sync(&uids, self.dirs_changed) {
            Ok(fsyncs) => (self.restart_log(), fsyncs + 3),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "journal checkpoint; the log keeps covering its records"
                );
                (false, 0)
            }
        }
    }

    /// After the writer died while holding the log: the files it touched
    /// are unknown, so every journal is synced before a fresh log.
    pub fn recover_after_panic(&mut self, journal: &Journal) {
        if !matches!(self.mode, Some(Mode::Logged(_))) {
            return;
        }
        let synced = journal.uids().and_then(|uids| journal.sync(&uids, true));
        match synced {
            Ok(_) => {
                self.restart_log();
            }
            Err(e) => {
                self.mode = Some(Mode::Broken(format!(
                    "the journal writer died mid-write and the journals could not be synced: {}",
                    crate::error_chain(&e)
                )));
            }
        }
    }

    /// Forgets what the old log covered (durable in the files now) and
    /// starts an empty one; whether the old one is gone.
    fn restart_log(&mut self) -> bool {
        self.unsynced.clear();
        self.dirs_changed = false;
        let mode = self.fresh_log();
        let replaced = !matches!(mode, Mode::Broken(_));
        self.mode = Some(mode);
        replaced
    }

    /// An empty log in place of the current one. Every change the old one
    /// held must be durable in the files already.
    fn fresh_log(&self) -> Mode {
        match Wal::create(&self.path) {
            Ok(wal) => Mode::Logged(wal),
            Err(e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, path = %self.path.display(), "create the journal log; writing journals file by file");
                // An old log left behind would replay stale records over
                // the files written from now on.
                match remove_durably(&self.path) {
                    Ok(()) => Mode::Direct,
                    Err(e) => Mode::Broken(format!(
                        "the journal log {} can be neither replaced nor removed: {e}",
                        self.path.display()
                    )),
                }
            }
        }
    }
}

/// Takes the exclusive lock at `path`, waiting up to `wait` for the
/// writer holding it to end.
fn take_owner(path: &Path, wait: Duration) -> Result<std::fs::File, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            what: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| Error::Write {
            what: "open the writer lock",
            path: path.to_path_buf(),
            source,
        })?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Unsafe {
                    why: format!(
                        "another journal writer still holds {} after {} s (a second agent on this state directory?)",
                        path.display(),
                        wait.as_secs()
                    ),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(Error::Write {
                    what: "lock",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Writes `batch` durably file by file (temp file fsynced, renamed, the
/// directory fsynced; a removal with its root fsynced).
fn durable(journal: &Journal, batch: &[(String, Change)]) -> Batch {
    let records: Vec<(String, Vec<u8>)> = batch
        .iter()
        .filter_map(|(uid, c)| match c {
            Change::Record(body) => Some((uid.clone(), body.clone())),
            Change::Removed => None,
        })
        .collect();
    let written = journal.write_batch(&records);
    let mut records = written.results.into_iter();
    let mut fsyncs = written.fsyncs;
    let results = batch
        .iter()
        .map(|(uid, c)| match c {
            Change::Record(_) => records.next().unwrap_or(Ok(())),
            Change::Removed => {
                fsyncs += 1;
                journal.remove(uid)
            }
        })
        .collect();
    Batch { results, fsyncs }
}

fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// A copy of `e` for a second caller (errors carry an `io::Error`, which
/// does not clone).
pub fn copy_error(e: &Error) -> Error {
    let io = |s: &std::io::Error| std::io::Error::new(s.kind(), s.to_string());
    match e {
        Error::Write { what, path, source } => Error::Write {
            what,
            path: path.clone(),
            source: io(source),
        },
        Error::Read { path, source } => Error::Read {
            path: path.clone(),
            source: io(source),
        },
        other => Error::Unsafe {
            why: crate::error_chain(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::JOURNAL_FILE;

    fn rec(n: usize) -> Change {
        Change::Record(format!("{{\"n\":{n}}}").into_bytes())
    }

    fn entry(uid: &str, c: Change) -> (String, Change) {
        (uid.to_string(), c)
    }

    fn on_disk(j: &Journal, uid: &str) -> Option<String> {
        std::fs::read_to_string(j.capsule_dir(uid).join(JOURNAL_FILE)).ok()
    }

    fn all_ok(b: &Batch) {
        for r in &b.results {
            assert!(r.is_ok(), "{r:?}");
        }
    }

    #[test]
    fn a_batch_costs_one_fsync_and_a_crash_before_the_checkpoint_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut log = Log::new(j.log_path());
        assert_eq!(log.replay(&j).unwrap(), 0);
        let first = log.commit(
            &j,
            &[
                entry("c1", rec(1)),
                entry("c2", rec(1)),
                entry("c3", rec(1)),
            ],
        );
        all_ok(&first);
        assert_eq!(first.fsyncs, 1);
        all_ok(&log.commit(&j, &[entry("c1", rec(2)), entry("c3", Change::Removed)]));
        // Readers see every change at once.
        assert_eq!(on_disk(&j, "c1").as_deref(), Some("{\"n\":2}"));
        assert!(!j.capsule_dir("c3").exists());

        // A power cut before any file's own fsync: a rename that reached
        // the disk without its data, a directory never made durable, an
        // unlink lost.
        drop(log);
        std::fs::write(j.capsule_dir("c1").join(JOURNAL_FILE), b"").unwrap();
        std::fs::remove_dir_all(j.capsule_dir("c2")).unwrap();
        std::fs::create_dir_all(j.capsule_dir("c3")).unwrap();
        std::fs::write(j.capsule_dir("c3").join(JOURNAL_FILE), b"{\"n\":1}").unwrap();

        let mut log = Log::new(j.log_path());
        assert_eq!(log.replay(&j).unwrap(), 5);
        assert_eq!(on_disk(&j, "c1").as_deref(), Some("{\"n\":2}"));
        assert_eq!(on_disk(&j, "c2").as_deref(), Some("{\"n\":1}"));
        assert!(!j.capsule_dir("c3").exists());
        // Replayed changes are in the files durably: the log starts empty.
        assert_eq!(super::super::wal::read(&j.log_path()).unwrap(), vec![]);
        // A second call answers from the first replay.
        assert_eq!(log.replay(&j).unwrap(), 5);
    }

    #[test]
    fn a_second_writer_waits_for_the_first_to_end_and_then_owns_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut first = Log::new(j.log_path());
        first.replay(&j).unwrap();
        all_ok(&first.commit(&j, &[entry("c1", rec(1))]));

        // While the first lives, a second one gives up with a clear error
        // and touches nothing.
        let mut log = Log::new(j.log_path());
        let lock = log.owner_path();
        let refused = take_owner(&lock, Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(&refused, Error::Unsafe { why } if why.contains("another journal writer")),
            "{refused:?}"
        );
        // One that waits replays only once the first ended, after its
        // last checkpoint: what it then finds is the file as left.
        let (j2, started) = (j.clone(), Instant::now());
        let second = std::thread::spawn(move || (log.replay(&j2), log));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !second.is_finished(),
            "the second writer replayed beside the first"
        );
        std::fs::write(j.capsule_dir("c1").join(JOURNAL_FILE), b"torn").unwrap();
        first.checkpoint(&j);
        drop(first);
        let (replayed, mut log) = second.join().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(replayed.unwrap(), 0);
        assert_eq!(on_disk(&j, "c1").as_deref(), Some("torn"));
        // The second now owns it.
        assert!(take_owner(&lock, Duration::ZERO).is_err());
        all_ok(&log.commit(&j, &[entry("c1", rec(2))]));
        drop(log);
        assert!(take_owner(&lock, Duration::ZERO).is_ok());
    }

    #[test]
    fn a_checkpoint_syncs_the_files_and_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut log = Log::new(j.log_path());
        log.replay(&j).unwrap();
        assert!(!log.pending());
        all_ok(&log.commit(&j, &[entry("c1", rec(1)), entry("c2", rec(1))]));
        assert!(log.pending());
        let (done, fsyncs) = log.checkpoint(&j);
        assert!(done);
        // Two files, two directories, the root, and the fresh log's file,
        // rename and directory.
        assert_eq!(fsyncs, 8);
        assert!(!log.pending());
        assert_eq!(super::super::wal::read(&j.log_path()).unwrap(), vec![]);
        assert_eq!(on_disk(&j, "c2").as_deref(), Some("{\"n\":1}"));
    }

    #[test]
    fn a_log_past_its_size_is_checkpointed_by_the_batch_that_grew_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut log = Log::new(j.log_path());
        log.replay(&j).unwrap();
        let big = Change::Record(vec![b' '; 256 << 10]);
        let mut checkpointed = false;
        for _ in 0..(CHECKPOINT_BYTES / (256 << 10)) + 2 {
            let done = log.commit(&j, &[entry("c1", big.clone())]);
            all_ok(&done);
            checkpointed |= done.fsyncs > 1;
        }
        assert!(checkpointed);
        let held = std::fs::metadata(j.log_path()).unwrap().len();
        assert!(held < CHECKPOINT_BYTES, "{held}");
    }

    #[test]
    fn a_log_that_cannot_be_read_refuses_every_write_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        std::fs::write(j.log_path(), b"something else").unwrap();
        let mut log = Log::new(j.log_path());
        assert!(matches!(log.replay(&j), Err(Error::Read { .. })));
        let done = log.commit(&j, &[entry("c1", rec(1))]);
        assert!(matches!(&done.results[..], [Err(Error::Unsafe { .. })]));
        assert!(!j.capsule_dir("c1").exists());
        assert_eq!(std::fs::read(j.log_path()).unwrap(), b"something else");
    }

    #[test]
    fn without_a_log_records_are_written_durably_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        // A directory where the fresh log's temp file would go.
        let mut tmp = j.log_path().into_os_string();
        tmp.push(".tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut log = Log::new(j.log_path());
        log.replay(&j).unwrap();
        let done = log.commit(&j, &[entry("c1", rec(1))]);
        all_ok(&done);
        // The temp file, the directory.
        assert_eq!(done.fsyncs, 3);
        assert_eq!(on_disk(&j, "c1").as_deref(), Some("{\"n\":1}"));
        assert!(!j.log_path().exists());
        all_ok(&log.commit(&j, &[entry("c1", Change::Removed)]));
        assert!(!j.capsule_dir("c1").exists());
    }
}
