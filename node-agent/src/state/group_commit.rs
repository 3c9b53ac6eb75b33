//! [`GroupCommit`]: the agent's one journal writer. Steps hand it a record
//! and await its durability; a dedicated thread takes every record pending
//! at that moment as one batch ([`Journal::write_batch`]: temp files
//! written and fsynced, renamed, each directory fsynced once), so
//! concurrent capsules share disk flushes and no fsync runs on a tokio
//! worker. A record is acknowledged only once it is durable, so "journal
//! before side effect" holds for every caller that awaits.
//!
//! The thread is one of the agent's watched background tasks:
//! [`GroupCommit::ended`] resolves when it is gone, and `main` exits on it
//! as on any other. Until then (and in tests, with no one watching) records
//! are written one by one on a blocking thread, so a dead writer never
//! turns a journal write into an error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::Error;
use super::journal::{Journal, encode};

/// Answers one caller once its record is durable (or failed).
type Waiter = oneshot::Sender<Result<(), Error>>;

/// One record waiting for the writer.
struct Pending {
    uid: String,
    body: Vec<u8>,
    done: Waiter,
}

/// What the writer did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Records acknowledged (successfully or not).
    pub records: u64,
    /// Journal files written (records of one capsule pending together
    /// are written once, the newest).
    pub writes: u64,
    /// Batches.
    pub batches: u64,
    /// fsync calls.
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
    /// `None` when the thread could not be started: each record is then
    /// written alone on a blocking thread.
    tx: Option<mpsc::Sender<Pending>>,
    journal: Journal,
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
type Writer = fn(&Journal, &mpsc::Receiver<Pending>, &Counters);

impl GroupCommit {
    /// Starts the writer thread for `journal`.
    pub fn start(journal: Journal) -> Self {
        Self::start_with(journal, run)
    }

    /// Starts `writer` as the writer thread (tests give one that dies).
    fn start_with(journal: Journal, writer: Writer) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>();
        let counters = Arc::new(Counters::default());
        let (alive, ended) = watch::channel(false);
        let alive = Alive(alive);
        let (j, c) = (journal.clone(), counters.clone());
        // When the spawn fails the closure, and `alive` with it, is
        // dropped: `ended` shows that too.
        let started = std::thread::Builder::new()
            .name("wrenn-journal".into())
            .spawn(move || {
                let _alive = alive;
                writer(&j, &rx, &c);
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

    /// Writes `record` as `uid`'s journal; returns once it is durable.
    pub async fn write<T: Serialize>(&self, uid: &str, record: &T) -> Result<(), Error> {
        let body = encode(uid, record)?;
        let Some(tx) = &self.tx else {
            return self.write_alone(uid, body).await;
        };
        let (done, wait) = oneshot::channel();
        let sent = tx.send(Pending {
            uid: uid.to_string(),
            body,
            done,
        });
        let body = match sent {
            Ok(()) => match wait.await {
                Ok(res) => return res,
                // The writer died holding this record; its write is a
                // temp file and a rename, so writing it again is safe.
                Err(_) => encode(uid, record)?,
            },
            Err(mpsc::SendError(p)) => p.body,
        };
        // A dead writer must not turn every later journal write into an
        // error until the agent exits (`ended`): each record is then
        // written alone, as when the thread never started.
        tracing::error!(capsule = %uid, "the journal writer thread is gone; writing this record alone");
        self.write_alone(uid, body).await
    }

    /// Writes one record on a blocking thread, without the writer.
    async fn write_alone(&self, uid: &str, body: Vec<u8>) -> Result<(), Error> {
        let (journal, batch) = (self.journal.clone(), vec![(uid.to_string(), body)]);
        let mut done = tokio::task::spawn_blocking(move || journal.write_batch(&batch))
            .await
            .map_err(|_| Error::WriterGone {
                uid: uid.to_string(),
            })?;
        done.results.pop().unwrap_or(Ok(()))
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

/// The writer: one batch of everything pending, until every sender is
/// gone.
fn run(journal: &Journal, rx: &mpsc::Receiver<Pending>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        // Newest body per capsule; every waiter of that capsule is answered
        // by its write (a newer record supersedes an older one whole).
        let mut by_uid: BTreeMap<String, (Vec<u8>, Vec<Waiter>)> = BTreeMap::new();
        let mut records = 0u64;
        for p in std::iter::once(first).chain(rx.try_iter()) {
            records += 1;
            let slot = by_uid.entry(p.uid).or_default();
            slot.0 = p.body;
            slot.1.push(p.done);
        }
        let mut waiters = Vec::with_capacity(by_uid.len());
        let batch: Vec<(String, Vec<u8>)> = by_uid
            .into_iter()
            .map(|(uid, (body, w))| {
                waiters.push(w);
                (uid, body)
            })
            .collect();
        let done = journal.write_batch(&batch);
        counters.records.fetch_add(records, Ordering::Relaxed);
        counters
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.fsyncs.fetch_add(done.fsyncs, Ordering::Relaxed);
        for ((res, ws), (uid, _)) in done.results.into_iter().zip(waiters).zip(&batch) {
            answer(uid, res, ws);
        }
    }
}

/// Sends `res` to every waiter of one capsule: the newest gets it, older
/// ones a copy (`write_batch` fails only with `Error::Write`).
fn answer(uid: &str, res: Result<(), Error>, mut waiters: Vec<Waiter>) {
    let newest = waiters.pop();
    for w in waiters {
        let copy = match &res {
            Err(Error::Write { what, path, source }) => Err(Error::Write {
                what,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            }),
            Err(_) => Err(Error::WriterGone {
                uid: uid.to_string(),
            }),
            Ok(()) => Ok(()),
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
        assert!(healthy.ended().now_or_never().is_none());

        // One that panics on its first record.
        fn dies(_: &Journal, rx: &mpsc::Receiver<Pending>, _: &Counters) {
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
}
