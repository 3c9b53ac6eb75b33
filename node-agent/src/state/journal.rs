//! The on-disk journal: one JSON file per capsule,
//! `<state>/capsules/<uid>/journal.json`, rewritten whole before every side
//! effect the supervisor makes, so that a restarted agent knows what may
//! exist on the node for that capsule.
//!
//! Every write replaces the file atomically (a temp file renamed over the
//! journal), so a reader sees the old record or the new one, never a torn
//! file. Durability comes one of two ways: [`Journal::write_batch`]
//! fsyncs the temp file before the rename and the directory after it;
//! [`Journal::apply`] fsyncs nothing, for the agent's writer, whose
//! write-ahead log (`super::wal`) holds the change durably until a
//! checkpoint syncs the files ([`Journal::sync`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

use super::Error;
use super::wal::Change;

/// File name of a capsule's journal inside its directory.
pub const JOURNAL_FILE: &str = "journal.json";
const TEMP_FILE: &str = ".journal.json.tmp";
/// File name of the write-ahead log in the state directory.
const LOG_FILE: &str = "journal.wal";

/// What [`Journal::apply`] did.
#[derive(Debug)]
pub(super) struct Applied {
    /// One per entry, in order.
    pub results: Vec<Result<(), Error>>,
    /// Whether a capsule directory was made or removed (the root then
    /// needs an fsync before the log may forget the change).
    pub dirs_changed: bool,
}

/// What [`Journal::write_batch`] did.
#[derive(Debug)]
pub struct Batch {
    /// One per entry, in order.
    pub results: Vec<Result<(), Error>>,
    /// fsync calls made (files and directories).
    pub fsyncs: u64,
}

/// `record` as journal bytes.
pub fn encode<T: Serialize>(uid: &str, record: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec_pretty(record).map_err(|source| Error::Encode {
        uid: uid.to_string(),
        source,
    })
}

/// Each capsule directory with its journal, or why it has none.
pub type Listing<T> = Vec<(String, Result<T, Error>)>;

/// The journal directory tree under the agent's state directory.
#[derive(Clone, Debug)]
pub struct Journal {
    root: PathBuf,
    log: PathBuf,
}

impl Journal {
    /// Journals under `<state_dir>/capsules`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("capsules"),
            log: state_dir.join(LOG_FILE),
        }
    }

    /// `<state>/journal.wal`, the write-ahead log of the journal's writer
    /// ([`GroupCommit`](super::GroupCommit)).
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// `<state>/capsules`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A capsule's directory (journal, suspend image).
    pub fn capsule_dir(&self, uid: &str) -> PathBuf {
        self.root.join(uid)
    }

    /// Writes `record` as `uid`'s journal, atomically and durably, on the
    /// calling thread, as an agent that stopped would find it (tests,
    /// tools; the agent writes through [`GroupCommit`](super::GroupCommit)):
    /// when a journal log is there the record is appended to it as well,
    /// so the next agent's replay ends with this record rather than
    /// restoring an older one over it.
    pub fn write<T: Serialize>(&self, uid: &str, record: &T) -> Result<(), Error> {
        let body = encode(uid, record)?;
        let mut done = self.write_batch(&[(uid.to_string(), body.clone())]).results;
        done.pop().unwrap_or(Ok(()))?;
        super::wal::append_outside(&self.log, uid, &Change::Record(body))
            .map(|_| ())
            .map_err(|source| Error::Write {
                what: "append",
                path: self.log.clone(),
                source,
            })
    }

    /// Writes each `(uid, body)` as that capsule's journal, atomically and
    /// durably, as one batch: every temp file written, then fsynced, then
    /// renamed, then each directory fsynced once. On ext4 the fsyncs after
    /// the first find their changes in a journal commit already made, so
    /// a batch costs about one disk flush for data and one for the
    /// renames. One result per entry, in order; a failure of one capsule
    /// leaves the others' results alone.
    pub fn write_batch(&self, batch: &[(String, Vec<u8>)]) -> Batch {
        let mut fsyncs = 0;
        let mut new_dirs = false;
        // Phase 1: temp files written and fsynced.
        let mut staged: Vec<Result<PathBuf, Error>> = batch
            .iter()
            .map(|(uid, body)| {
                let dir = self.capsule_dir(uid);
                if !dir.is_dir() {
                    new_dirs = true;
                    std::fs::create_dir_all(&dir).map_err(write_error("create directory", &dir))?;
                }
                let tmp = dir.join(TEMP_FILE);
                let mut f = std::fs::File::create(&tmp).map_err(write_error("create", &tmp))?;
                f.write_all(body).map_err(write_error("write", &tmp))?;
                Ok(dir)
            })
            .collect();
        let tmps: Vec<PathBuf> = staged.iter().flatten().map(|d| d.join(TEMP_FILE)).collect();
        fsyncs += tmps.len() as u64;
        let mut synced = sync_all(&tmps, |p| std::fs::File::open(p)?.sync_all()).into_iter();
        for dir in staged.iter_mut() {
            let Ok(d) = dir else { continue };
            if let Some(Err(e)) = synced.next() {
                *dir = Err(write_error("fsync", &d.join(TEMP_FILE))(e));
            }
        }
        // Phase 2: renamed over the journals, directories fsynced (batches
        // hold one record per capsule, so each directory once).
        for dir in staged.iter_mut() {
            let Ok(d) = dir else { continue };
            let dest = d.join(JOURNAL_FILE);
            if let Err(e) = std::fs::rename(d.join(TEMP_FILE), &dest) {
                *dir = Err(write_error("rename", &dest)(e));
            }
        }
        let dirs: Vec<PathBuf> = staged.iter().flatten().cloned().collect();
        fsyncs += dirs.len() as u64;
        let mut synced = sync_all(&dirs, sync_dir).into_iter();
        let mut results: Vec<Result<(), Error>> = staged
            .into_iter()
            .map(|dir| {
                let d = dir?;
                match synced.next() {
                    Some(Err(e)) => Err(write_error("fsync directory", &d)(e)),
                    _ => Ok(()),
                }
            })
            .collect();
        // A capsule directory made in this batch is itself an entry of
        // the root.
        if new_dirs {
            fsyncs += 1;
            if let Err(e) = sync_dir(&self.root) {
                // Not durable: no entry of the batch is acknowledged.
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(write_error("fsync directory", &self.root)(e.kind().into()));
                }
            }
        }
        Batch { results, fsyncs }
    }

    /// Applies each change to the files without any fsync (the log makes
    /// them durable): a record written to a temp file and renamed over
    /// the journal, a removal deleting the capsule's directory. Readers
    /// see the change at once. One result per entry, in order.
    pub(super) fn apply(&self, batch: &[(String, Change)]) -> Applied {
        let mut dirs_changed = false;
        let results = batch
            .iter()
            .map(|(uid, change)| {
                let dir = self.capsule_dir(uid);
                let Change::Record(body) = change else {
                    dirs_changed = true;
                    return match std::fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(write_error("remove", &dir)(e))
                        }
                        _ => Ok(()),
                    };
                };
                if !dir.is_dir() {
                    dirs_changed = true;
                    std::fs::create_dir_all(&dir).map_err(write_error("create directory", &dir))?;
                }
                // After an exchange the temp file holds the previous
                // record: overwritten in place and cut to length, neither
                // truncated to zero (ext4 would flush it on close, see
                // sys::rename) nor made afresh (ext4's inode allocator
                // slows down as recently freed inodes pile up).
                let tmp = dir.join(TEMP_FILE);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&tmp)
                    .and_then(|f| {
                        use std::os::unix::fs::FileExt as _;
                        f.write_all_at(body, 0)?;
                        f.set_len(body.len() as u64)
                    })
                    .map_err(write_error("write", &tmp))?;
                let dest = dir.join(JOURNAL_FILE);
                crate::sys::rename::replace(&tmp, &dest).map_err(write_error("rename", &dest))
            })
            .collect();
        Applied {
            results,
            dirs_changed,
        }
    }

    /// Makes what [`Journal::apply`] did for `uids` durable without the
    /// log: their journal files and directories fsynced (in parallel),
    /// then the root when directories were made or removed. A capsule
    /// removed since has nothing to sync. Returns the fsyncs made.
    pub(super) fn sync(&self, uids: &[String], root: bool) -> Result<u64, Error> {
        let dirs: Vec<PathBuf> = uids
            .iter()
            .map(|u| self.capsule_dir(u))
            .filter(|d| d.is_dir())
            .collect();
        let files: Vec<PathBuf> = dirs.iter().map(|d| d.join(JOURNAL_FILE)).collect();
        let open_sync = |p: &Path| match std::fs::File::open(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            f => f?.sync_all(),
        };
        for (res, f) in sync_all(&files, open_sync).into_iter().zip(&files) {
            res.map_err(write_error("fsync", f))?;
        }
        for (res, d) in sync_all(&dirs, open_sync).into_iter().zip(&dirs) {
            res.map_err(write_error("fsync directory", d))?;
        }
        let mut fsyncs = (files.len() + dirs.len()) as u64;
        if root && self.root.is_dir() {
            sync_dir(&self.root).map_err(write_error("fsync directory", &self.root))?;
            fsyncs += 1;
        }
        Ok(fsyncs)
    }

    /// Reads `uid`'s journal; `None` when it has none.
    pub fn read<T: DeserializeOwned>(&self, uid: &str) -> Result<Option<T>, Error> {
        let path = self.capsule_dir(uid).join(JOURNAL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Decode { path, source })
    }

    /// `uid`'s journal as bytes, undecoded; `None` when it has none.
    /// Recovery decides from these whether it may use the record at all.
    pub fn read_bytes(&self, uid: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.capsule_dir(uid).join(JOURNAL_FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    /// Every capsule directory's name.
    pub fn uids(&self) -> Result<Vec<String>, Error> {
        let read = |source| Error::Read {
            path: self.root.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(read(source)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(read)?;
            if entry.path().is_dir() {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether `uid`'s directory holds nothing but (at most) a temp file:
    /// what a crash before the first journal write leaves, when nothing
    /// was done on the node yet for that capsule.
    pub fn never_written(&self, uid: &str) -> bool {
        match std::fs::read_dir(self.capsule_dir(uid)) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .all(|e| e.file_name() == TEMP_FILE),
            Err(_) => false,
        }
    }

    /// Every capsule directory present, with its journal (`Err` for a
    /// directory whose journal is missing or unreadable: recovery treats
    /// those as orphans). `decode` reads a record of any format the
    /// caller understands.
    pub fn list<T>(
        &self,
        decode: impl Fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Listing<T>, Error> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Read {
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read {
                path: self.root.clone(),
                source,
            })?;
            if !entry.path().is_dir() {
                continue;
            }
            let uid = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path().join(JOURNAL_FILE);
            let rec = match self.read_bytes(&uid) {
                Ok(Some(b)) => decode(&b).map_err(|source| Error::Decode { path, source }),
                Ok(None) => Err(Error::Missing { path }),
                Err(e) => Err(e),
            };
            out.push((uid, rec));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes `uid`'s directory and everything in it (the last step of a
    /// delete). Succeeds when it is already gone.
    pub fn remove(&self, uid: &str) -> Result<(), Error> {
        let dir = self.capsule_dir(uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Write {
                    what: "remove",
                    path: dir,
                    source,
                });
            }
        }
        sync_dir(&self.root).map_err(|source| Error::Write {
            what: "fsync directory",
            path: self.root.clone(),
            source,
        })
    }
}

/// Runs `sync` on every path, on up to [`SYNC_THREADS`] threads at once:
/// the filesystem merges concurrent fsyncs into one journal commit (ext4's
/// jbd2 does), where one thread's fsyncs would each wait for their own.
/// One result per path, in order.
fn sync_all(paths: &[PathBuf], sync: fn(&Path) -> std::io::Result<()>) -> Vec<std::io::Result<()>> {
    if paths.len() < 2 {
        return paths.iter().map(|p| sync(p)).collect();
    }
    let chunk = paths.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|s| {
        let running: Vec<_> = paths
            .chunks(chunk)
            .map(|c| {
                let run = move || c.iter().map(|p| sync(p)).collect::<Vec<_>>();
                // No thread to spare: this chunk runs here instead.
                std::thread::Builder::new()
                    .name("wrenn-fsync".into())
                    .spawn_scoped(s, run)
                    .map_err(|_| run())
            })
            .collect();
        running
            .into_iter()
            .zip(paths.chunks(chunk))
            .flat_map(|(r, c)| match r {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    c.iter()
                        .map(|_| Err(std::io::Error::other("fsync thread panicked")))
                        .collect()
                }),
                Err(done) => done,
            })
            .collect()
    })
}

/// An `Error::Write` of `what` on `path`, for `map_err`.
fn write_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Write { what, path, source }
}

/// Threads [`sync_all`] uses at most.
const SYNC_THREADS: usize = 16;

/// `fsync` of a directory, which makes a rename or unlink in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn write_replaces_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert_eq!(j.read::<Rec>("c1").unwrap(), None);
        j.write("c1", &Rec { n: 1 }).unwrap();
        j.write("c1", &Rec { n: 2 }).unwrap();
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 2 }));
        let names: Vec<String> = std::fs::read_dir(j.capsule_dir("c1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![JOURNAL_FILE.to_string()]);
    }

    #[test]
    fn a_crash_before_rename_keeps_the_old_record() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.write("c1", &Rec { n: 1 }).unwrap();
        // What a crash between write and rename leaves: a torn temp file.
        std::fs::write(j.capsule_dir("c1").join(TEMP_FILE), b"{\"n\": 9").unwrap();
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 1 }));
        // The next write replaces the stale temp file.
        j.write("c1", &Rec { n: 3 }).unwrap();
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 3 }));
    }

    #[test]
    fn list_reports_directories_without_a_readable_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.write("good", &Rec { n: 1 }).unwrap();
        std::fs::create_dir_all(j.capsule_dir("empty")).unwrap();
        std::fs::create_dir_all(j.capsule_dir("torn")).unwrap();
        std::fs::write(j.capsule_dir("torn").join(JOURNAL_FILE), b"{").unwrap();
        let list = j.list(|b| serde_json::from_slice::<Rec>(b)).unwrap();
        let summary: Vec<(&str, bool)> =
            list.iter().map(|(u, r)| (u.as_str(), r.is_ok())).collect();
        assert_eq!(
            summary,
            vec![("empty", false), ("good", true), ("torn", false)]
        );
        j.remove("good").unwrap();
        j.remove("good").unwrap();
        assert!(!j.capsule_dir("good").exists());
    }
}
