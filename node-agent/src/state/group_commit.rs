//! [`GroupCommit`]: the agent's one journal writer. Steps hand it a change
//! (a capsule's new record, or its removal) and await its durability; a
//! dedicated thread takes every change pending at that moment as one
//! batch and makes it durable through the [`Log`] (applied to the files,
//! appended to the write-ahead log with one `fdatasync`), so concurrent
//! capsules share one disk flush and no fsync runs on a tokio worker. A
//! change is acknowledged only once it is durable, so "journal before side
//! effect" holds for every caller that awaits.
//!
//! The thread first replays the log left by the last run; callers that
//! read journals (recovery) wait for it with [`GroupCommit::replayed`].
//! It is one of the agent's watched background tasks:
//! [`GroupCommit::ended`] resolves when it is gone, and `main` exits on it
//! as on any other. Until then (and in tests, with no one watching)
//! changes are made durable one by one on a blocking thread through the
//! same log, so a dead writer never turns a journal write into an error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::Error;
use super::commit_log::{Log, copy_error};
use super::journal::{Journal, encode};
use super::wal::Change;

/// Answers one caller once its change is durable (or failed).
type Waiter = oneshot::Sender<Result<(), Error>>;

/// How long the writer waits for more changes before it checkpoints the
/// log (so a quiet agent restarts with an empty one).
const IDLE_CHECKPOINT: Duration = Duration::from_millis(500);

/// One change waiting for the writer.
struct Pending {
    uid: String,
    change: Change,
    done: Waiter,
}

/// What the writer did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Changes acknowledged (successfully or not).
    pub records: u64,
    /// Journal files written or removed (changes of one capsule pending
    /// together are applied once, the newest).
    pub writes: u64,
    /// Batches.
    pub batches: u64,
    /// fsync calls (the log's, checkpoints', file by file).
    pub fsyncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    writes: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
}

/// The journal's group committer. Cloning shares the writer; the thread
/// ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct GroupCommit {
    /// `None` when the thread could not be started: each change is then
    /// made durable alone on a blocking thread.
    tx: Option<mpsc::Sender<Pending>>,
    journal: Journal,
    log: Arc<Mutex<Log>>,
    counters: Arc<Counters>,
    /// Turns `true` when the writer thread is gone (or never started).
    ended: watch::Receiver<bool>,
}

/// Owned by the writer thread: dropped when the thread ends, by return or
/// panic, which tells [`GroupCommit::ended`].
struct Alive(watch::Sender<bool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// What the writer thread runs.
type Writer = fn(&Journal, &Mutex<Log>, &mpsc::Receiver<Pending>, &Counters);

impl GroupCommit {
    /// Starts the writer thread for `journal`.
    pub fn start(journal: Journal) -> Self {
        Self::start_with(journal, run)
    }

    /// Starts `writer` as the writer thread (tests give one that dies).
    fn start_with(journal: Journal, writer: Writer) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>();
        let counters = Arc::new(Counters::default());
        let log = Arc::new(Mutex::new(Log::new(journal.log_path())));
        let (alive, ended) = watch::channel(false);
        let alive = Alive(alive);
        let (j, l, c) = (journal.clone(), log.clone(), counters.clone());
        // When the spawn fails the closure, and `alive` with it, is
        // dropped: `ended` shows that too.
        let started = std::thread::Builder::new()
            .name("wrenn-journal".into())
            .spawn(move || {
                let _alive = alive;
                // Dropped before `_alive`: once `ended` fires, the
                // thread's share of the log (and its lock) is gone.
                let (j, l, c, rx) = (j, l, c, rx);
                writer(&j, &l, &rx, &c);
            });
        let tx = match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "start the journal writer thread; writing records one by one"
                );
                None
            }
        };
        Self {
            tx,
            journal,
            log,
            counters,
            ended,
        }
    }

    /// Resolves once the writer thread is gone (panicked, or never
    /// started). The agent watches it with its other background tasks; it
    /// holds no sender, so it does not keep the thread alive.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.ended.clone();
        async move {
            // An error means the sender is gone, which happens only after
            // it sent `true`.
            let _ = ended.wait_for(|gone| *gone).await;
        }
    }

    /// Resolves once the last run's log was replayed over the journal
    /// files, with the number of changes replayed. Read journals only
    /// after it; an error means they may be stale and no write will be
    /// made.
    pub async fn replayed(&self) -> Result<u64, Error> {
        let (journal, log) = (self.journal.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || lock(&log, &journal).replay(&journal))
            .await
            .map_err(|_| Error::Unsafe {
                why: "the journal replay panicked".into(),
            })?
    }

    /// Writes `record` as `uid`'s journal; returns once it is durable.
    pub async fn write<T: Serialize>(&self, uid: &str, record: &T) -> Result<(), Error> {
        let body = encode(uid, record)?;
        self.send(uid, Change::Record(body), || {
            encode(uid, record).map(Change::Record)
        })
        .await
    }

    /// Removes `uid`'s directory and everything in it (the last step of a
    /// delete); returns once the removal is durable. Succeeds when it is
    /// already gone.
    pub async fn remove(&self, uid: &str) -> Result<(), Error> {
        self.send(uid, Change::Removed, || Ok(Change::Removed))
            .await
    }

    /// Hands `change` to the writer; `again` makes it anew when the writer
    /// died holding it.
    async fn send(
        &self,
        uid: &str,
        change: Change,
        again: impl FnOnce() -> Result<Change, Error>,
    ) -> Result<(), Error> {
        let Some(tx) = &self.tx else {
            return self.commit_alone(uid, change).await;
        };
        let (done, wait) = oneshot::channel();
        let sent = tx.send(Pending {
            uid: uid.to_string(),
            change,
            done,
        });
        // When the writer died holding this change, applying it again is
        // safe (a record replaces the file whole, a removal of a missing
        // directory succeeds).
        let change = match sent {
            Ok(()) => match wait.await {
                Ok(res) => return res,
                Err(_) => again()?,
            },
            Err(mpsc::SendError(p)) => p.change,
        };
        // A dead writer must not turn every later journal write into an
        // error until the agent exits (`ended`): each change is then made
        // durable alone, as when the thread never started.
        tracing::error!(capsule = %uid, "the journal writer thread is gone; writing this change alone");
        self.commit_alone(uid, change).await
    }

    /// Commits one change on a blocking thread, without the writer.
    async fn commit_alone(&self, uid: &str, change: Change) -> Result<(), Error> {
        let (journal, log) = (self.journal.clone(), self.log.clone());
        let batch = vec![(uid.to_string(), change)];
        let mut done = tokio::task::spawn_blocking(move || {
            let mut log = lock(&log, &journal);
            match log.replay(&journal) {
                Ok(_) => log.commit(&journal, &batch).results,
                Err(e) => vec![Err(e)],
            }
        })
        .await
        .map_err(|_| Error::WriterGone {
            uid: uid.to_string(),
        })?;
        done.pop().unwrap_or(Ok(()))
    }

    /// Counts so far.
    pub fn stats(&self) -> CommitStats {
        let c = &self.counters;
        CommitStats {
            records: c.records.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
        }
    }
}

/// The log, taken from a writer that died holding it: what it touched is
/// unknown, so every journal is synced before the log is used again.
fn lock<'a>(log: &'a Mutex<Log>, journal: &Journal) -> MutexGuard<'a, Log> {
    match log.lock() {
        Ok(g) => g,
        Err(poisoned) => {
            log.clear_poison();
            let mut g = poisoned.into_inner();
            g.recover_after_panic(journal);
            g
        }
    }
}

/// The writer: the replay, then one batch of everything pending, until
/// every sender is gone; a checkpoint when idle and at the end.
fn run(journal: &Journal, log: &Mutex<Log>, rx: &mpsc::Receiver<Pending>, counters: &Counters) {
    // Its error reaches every caller through `commit`, and recovery
    // through `replayed`.
    let _ = lock(log, journal).replay(journal);
    loop {
        let first = match rx.recv_timeout(IDLE_CHECKPOINT) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let mut l = lock(log, journal);
                if l.pending() {
                    let (_, fsyncs) = l.checkpoint(journal);
                    counters.fsyncs.fetch_add(fsyncs, Ordering::Relaxed);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let mut l = lock(log, journal);
                if l.pending() {
                    l.checkpoint(journal);
                }
                return;
            }
        };
        // Newest change per capsule; every waiter of that capsule is
        // answered by it (a newer record or a removal supersedes an older
        // change whole).
        let mut by_uid: BTreeMap<String, (Change, Vec<Waiter>)> = BTreeMap::new();
        let mut records = 0u64;
        for p in std::iter::once(first).chain(rx.try_iter()) {
            records += 1;
            let slot = by_uid
                .entry(p.uid)
                .or_insert_with(|| (Change::Removed, Vec::new()));
            slot.0 = p.change;
            slot.1.push(p.done);
        }
        let mut waiters = Vec::with_capacity(by_uid.len());
        let batch: Vec<(String, Change)> = by_uid
            .into_iter()
            .map(|(uid, (change, w))| {
                waiters.push(w);
                (uid, change)
            })
            .collect();
        let done = lock(log, journal).commit(journal, &batch);
        counters.records.fetch_add(records, Ordering::Relaxed);
        counters
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.fsyncs.fetch_add(done.fsyncs, Ordering::Relaxed);
        for (res, ws) in done.results.into_iter().zip(waiters) {
            answer(res, ws);
        }
    }
}

/// Sends `res` to every waiter of one capsule: the newest gets it, older
/// ones a copy.
fn answer(res: Result<(), Error>, mut waiters: Vec<Waiter>) {
    let newest = waiters.pop();
    for w in waiters {
        let copy = match &res {
            Ok(()) => Ok(()),
            Err(e) => Err(copy_error(e)),
        };
        // A caller that stopped waiting (cancelled) needs no answer.
        let _ = w.send(copy);
    }
    if let Some(w) = newest {
        let _ = w.send(res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_are_all_durable_and_readable_and_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let gc = GroupCommit::start(j.clone());
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                let uid = format!("c{i}");
                for n in 0..5 {
                    gc.write(&uid, &Rec { n: i * 10 + n }).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 0..64u32 {
            let got: Rec = j.read(&format!("c{i}")).unwrap().unwrap();
            assert_eq!(got, Rec { n: i * 10 + 4 }, "the last acknowledged record");
        }
        let s = gc.stats();
        assert_eq!(s.records, 64 * 5);
        assert!(
            s.batches < s.records,
            "concurrent writes share batches: {s:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_write_reaches_its_caller_as_a_typed_error_and_only_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        std::fs::create_dir_all(j.root()).unwrap();
        // A file where the capsule's directory should be.
        std::fs::write(j.capsule_dir("bad"), b"x").unwrap();
        let gc = GroupCommit::start(j.clone());
        let (bad, good) = tokio::join!(
            gc.write("bad", &Rec { n: 1 }),
            gc.write("good", &Rec { n: 2 })
        );
        match bad {
            Err(Error::Write { what, path, .. }) => {
                assert_eq!((what, path), ("create directory", j.capsule_dir("bad")));
            }
            other => panic!("{other:?}"),
        }
        good.unwrap();
        assert_eq!(j.read::<Rec>("good").unwrap(), Some(Rec { n: 2 }));
    }

    #[tokio::test]
    async fn records_stay_durable_after_the_writer_thread_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        // A writer whose thread has ended: its receiver is gone.
        let (tx, rx) = mpsc::channel::<Pending>();
        drop(rx);
        let gc = GroupCommit {
            tx: Some(tx),
            journal: j.clone(),
            log: Arc::new(Mutex::new(Log::new(j.log_path()))),
            counters: Arc::default(),
            ended: watch::channel(true).1,
        };
        gc.write("c1", &Rec { n: 7 }).await.unwrap();
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 7 }));
    }

    #[tokio::test]
    async fn a_writer_thread_that_dies_is_seen_ended_and_records_stay_durable() {
        use futures::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        // A healthy writer is not ended after it wrote.
        let healthy = GroupCommit::start(j.clone());
        healthy.write("c0", &Rec { n: 1 }).await.unwrap();
        let healthy_ended = healthy.ended();
        assert!(healthy.ended().now_or_never().is_none());
        // The state directory has one writer at a time.
        drop(healthy);
        healthy_ended.await;

        // One that panics on its first record.
        fn dies(_: &Journal, _: &Mutex<Log>, rx: &mpsc::Receiver<Pending>, _: &Counters) {
            let _first = rx.recv();
            panic!("writer thread dies (test)");
        }
        let gc = GroupCommit::start_with(j.clone(), dies);
        let ended = gc.ended();
        gc.write("c1", &Rec { n: 7 }).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), ended)
            .await
            .expect("the writer's death is visible");
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 7 }));
        gc.write("c1", &Rec { n: 8 }).await.unwrap();
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 8 }));
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_encoded_never_reaches_the_disk() {
        struct Bad;
        impl serde::Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let gc = GroupCommit::start(Journal::new(dir.path()));
        assert!(matches!(
            gc.write("c1", &Bad).await,
            Err(Error::Encode { .. })
        ));
        assert_eq!(gc.stats().records, 0);
    }

    #[tokio::test]
    async fn a_restarted_writer_replays_the_last_runs_log_before_journals_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        // What a run that died left: c1's record in the log only.
        let mut wal = super::super::wal::Wal::create(&j.log_path()).unwrap();
        let body = encode("c1", &Rec { n: 5 }).unwrap();
        wal.append([("c1", &Change::Record(body))]).unwrap();
        drop(wal);
        assert_eq!(j.read::<Rec>("c1").unwrap(), None);

        let gc = GroupCommit::start(j.clone());
        assert_eq!(gc.replayed().await.unwrap(), 1);
        assert_eq!(j.read::<Rec>("c1").unwrap(), Some(Rec { n: 5 }));
    }

    #[tokio::test]
    async fn a_removal_goes_through_the_log_and_an_idle_writer_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let gc = GroupCommit::start(j.clone());
        gc.write("c1", &Rec { n: 1 }).await.unwrap();
        gc.remove("c1").await.unwrap();
        gc.remove("c1").await.unwrap();
        assert!(!j.capsule_dir("c1").exists());
        let log = j.log_path();
        let empty = super::super::wal::read(&log).unwrap().is_empty();
        assert!(!empty, "the removal is in the log until a checkpoint");
        wrenn_testkit::eventually(Duration::from_secs(10), "an empty log", || {
            super::super::wal::read(&log).is_ok_and(|c| c.is_empty())
        })
        .await;
        assert!(!j.capsule_dir("c1").exists());
    }
}
