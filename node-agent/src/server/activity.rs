//! When each capsule last served a data-plane call (exec, PTY, files,
//! detached processes, console), so the operator can count `idleTimeout`
//! from real use rather than from the start. A call or stream counts for
//! as long as it is open ([`Activity::hold`]): a capsule with an open exec,
//! attach or console follow reads as active now, however long the stream
//! has been quiet. So does guest CPU use above [`BUSY_MILLICORES`].
//!
//! Kept in a file in the state directory as well, written at most every
//! [`FLUSH_EVERY`], on every forget and when the agent stops, so an agent
//! restart does not make a capsule in use look idle since its start and
//! expire it: a crash loses at most that much of its latest use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// CPU use of a capsule's VMM (sampled every second by `metrics`) that
/// counts as activity: a tenth of one CPU. An idle guest and its VMM stay
/// well below it; a build or a long job is above.
pub const BUSY_MILLICORES: u64 = 100;

/// Longest a touch waits before it reaches the file.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Largest activity file read back: one entry per capsule on the node is
/// far less; anything bigger is not ours to trust.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

fn read_bounded(file: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// Last data-plane call per capsule UID, Unix nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    last: HashMap<String, i64>,
    /// Calls and streams open per capsule.
    open: HashMap<String, usize>,
    file: Option<PathBuf>,
    flushed_at: i64,
    /// Touched since the last flush.
    dirty: bool,
}

use wrenn_proto::unix_nanos_now as now_nanos;

impl Activity {
    /// Activity kept in `file` too, starting from what it holds. An
    /// unreadable file starts empty, with a warning: activity only delays
    /// an expiry, it never keeps anything alive for good.
    pub fn persisted(file: &Path) -> Self {
        let last = match read_bounded(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e, "unreadable activity file; starting empty");
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = &e as &dyn std::error::Error, "read the activity file; starting empty");
                HashMap::new()
            }
        };
        Self {
            inner: Arc::new(Mutex::new(Inner {
                last,
                open: HashMap::new(),
                file: Some(file.to_path_buf()),
                flushed_at: 0,
                dirty: false,
            })),
        }
    }

    /// Records a call on `uid` now.
    pub fn touch(&self, uid: &str) {
        let now = now_nanos();
        let mut inner = self.lock();
        inner.last.insert(uid.to_string(), now);
        inner.dirty = true;
        let due = i64::try_from(FLUSH_EVERY.as_nanos()).unwrap_or(i64::MAX);
        if now.saturating_sub(inner.flushed_at) >= due {
            inner.flush(now);
        }
    }

    /// The last call on `uid`, 0 when none; now while one is open.
    pub fn last(&self, uid: &str) -> i64 {
        let inner = self.lock();
        if inner.open.get(uid).is_some_and(|n| *n > 0) {
            return now_nanos();
        }
        inner.last.get(uid).copied().unwrap_or(0)
    }

    /// Records a call on `uid` that stays open until the guard drops (and
    /// is touched again then).
    pub fn hold(&self, uid: &str) -> Held {
        self.touch(uid);
        *self.lock().open.entry(uid.to_string()).or_default() += 1;
        Held {
            activity: self.clone(),
            uid: uid.to_string(),
        }
    }

    /// Drops a deleted capsule.
    pub fn forget(&self, uid: &str) {
        let mut inner = self.lock();
        if inner.last.remove(uid).is_some() {
            inner.flush(now_nanos());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicked holder leaves a map that is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An open call or stream on a capsule (see [`Activity::hold`]).
#[derive(Debug)]
pub struct Held {
    activity: Activity,
    uid: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        {
            let mut inner = self.activity.lock();
            if let Some(n) = inner.open.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.open.remove(&self.uid);
                }
            }
        }
        self.activity.touch(&self.uid);
    }
}

/// `stream`, keeping `held` until the stream is dropped (ended, or its
/// client went away).
pub fn keep_open<T: Send + 'static>(
    stream: super::BoxStream<T>,
    held: std::sync::Arc<Held>,
) -> super::BoxStream<T> {
    use tokio_stream::StreamExt as _;
    Box::pin(stream.map(move |item| {
        let _open = &held;
        item
    }))
}

impl Inner {
    /// Writes the map beside the file and renames it over, so a crash
    /// leaves the old or the new map, never half of one.
    fn flush(&mut self, now: i64) {
        let Some(file) = &self.file else { return };
        self.flushed_at = now;
        self.dirty = false;
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&self.last)
            .map_err(std::io::Error::other)
            .and_then(|body| std::fs::write(&tmp, body))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = &e as &dyn std::error::Error, "write the activity file");
        }
    }
}

impl Drop for Inner {
    /// The agent stopping writes what the last window touched.
    fn drop(&mut self) {
        if self.dirty {
            self.flush(now_nanos());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_are_kept_per_capsule_and_forgotten() {
        let a = Activity::default();
        assert_eq!(a.last("c1"), 0);
        a.touch("c1");
        let first = a.last("c1");
        assert!(first > 0);
        a.touch("c1");
        assert!(a.last("c1") >= first);
        assert_eq!(a.last("c2"), 0);
        a.forget("c1");
        assert_eq!(a.last("c1"), 0);
    }

    #[test]
    fn an_open_call_is_activity_now_until_it_drops() {
        let a = Activity::default();
        let held = a.hold("c1");
        let second = a.hold("c1");
        let before = a.last("c1");
        std::thread::sleep(Duration::from_millis(5));
        // Still open: "now", not the time it started.
        assert!(a.last("c1") > before);
        drop(held);
        assert!(a.last("c1") > before, "one of two calls is still open");
        drop(second);
        let closed = a.last("c1");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(a.last("c1"), closed, "closed calls stop counting");
        assert_eq!(a.last("c2"), 0);
    }

    #[test]
    fn activity_survives_a_restart_and_a_forget_too() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let file = dir.path().join("activity.json");
        let a = Activity::persisted(&file);
        a.touch("c1");
        a.touch("c2");
        a.forget("c2");
        // Within the flush window: written when the agent stops.
        a.touch("c1");
        let c1 = a.last("c1");
        assert!(c1 > 0);
        drop(a);

        // A new agent reads what the old one saw.
        let b = Activity::persisted(&file);
        assert_eq!(b.last("c1"), c1);
        assert_eq!(b.last("c2"), 0, "a forgotten capsule came back");

        // A torn file starts empty instead of failing the agent.
        std::fs::write(&file, b"{\"c1\": ").unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!(Activity::persisted(&file).last("c1"), 0);
    }

    #[test]
    fn an_oversized_activity_file_is_not_read_whole() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let file = dir.path().join("activity.json");
        // 64 GiB of (sparse) JSON whitespace would parse; it is not read.
        let f = std::fs::File::create(&file).unwrap_or_else(|e| panic!("create: {e}"));
        f.set_len(64 << 30)
            .unwrap_or_else(|e| panic!("set_len: {e}"));
        let started = std::time::Instant::now();
        assert_eq!(Activity::persisted(&file).last("c1"), 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
