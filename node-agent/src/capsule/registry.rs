//! [`Registry`]: the capsules this agent knows, each an [`Entry`] behind its
//! own lock, and the background tasks started for them (crash watchers,
//! template builds). It owns the map and the task list; what an operation
//! does with a record is the steps' business (`super::steps`).
//!
//! Tasks are supervised: each runs inside [`Registry::spawn`], which logs a
//! task that panicked (with the capsule it served) instead of letting it
//! vanish, and counts it as an `aborted` error. Such a task is not
//! restarted: a crash watcher that died leaves its capsule's last state
//! shown, and a delete still removes it; the agent keeps serving the other
//! capsules. Long-lived agent tasks (sampler, admin server, log sweeper)
//! are supervised in `main`, where one that ends stops the agent.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt as _;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::model::{CapsuleView, State};
use super::record::Record;

/// The lock of one capsule's record, held for the whole of an operation.
pub(crate) type RecordGuard = OwnedMutexGuard<Option<Record>>;

/// Per-capsule slot in the map.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The record; `None` once the capsule is gone (deleted, or its create
    /// rolled back). Held for the whole of every operation.
    lock: Arc<AsyncMutex<Option<Record>>>,
    /// The latest view, readable without waiting for an operation.
    view: Mutex<CapsuleView>,
    /// Raised by a delete: an in-flight create stops at its next step.
    cancel: AtomicBool,
    /// A warm template's build VM ([`Record::internal`]): reachable only
    /// through the template code, never through the capsule API.
    internal: bool,
}

impl Entry {
    fn new(rec: Option<Record>, view: CapsuleView, internal: bool) -> Self {
        Self {
            lock: Arc::new(AsyncMutex::new(rec)),
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            internal,
        }
    }

    /// The latest view.
    pub(crate) fn view(&self) -> CapsuleView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The state last shown, without waiting for an operation.
    pub(crate) fn state(&self) -> State {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    /// Replaces the view; whether it changed.
    pub(crate) fn set_view(&self, view: CapsuleView) -> bool {
        let mut cur = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *cur != view;
        *cur = view;
        changed
    }

    /// Waits for the record's lock.
    pub(crate) async fn lock(&self) -> RecordGuard {
        self.lock.clone().lock_owned().await
    }

    /// Raises the cancel flag (a delete is queued).
    pub(crate) fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether a delete is queued behind the running operation.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Whether this is a build VM rather than a user capsule.
    pub(crate) fn internal(&self) -> bool {
        self.internal
    }
}

/// What [`Registry::claim`] found.
pub(crate) enum Claim {
    /// A new entry, locked before anyone else could see it.
    New(Arc<Entry>, RecordGuard),
    /// An entry with this UID exists already.
    Exists(Arc<Entry>),
    /// The fresh entry's lock was taken (cannot happen: nobody else saw it).
    Busy,
}

/// The capsules and their background tasks.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    capsules: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Watchers and other background tasks, aborted by `abort_all`.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.capsules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tasks(&self) -> MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `uid` if it is a user capsule (`internal: false`) or a
    /// build VM (`internal: true`).
    pub(crate) fn get(&self, uid: &str, internal: bool) -> Option<Arc<Entry>> {
        self.map()
            .get(uid)
            .filter(|e| e.internal == internal)
            .cloned()
    }

    /// Every entry, by UID.
    pub(crate) fn entries(&self) -> Vec<(String, Arc<Entry>)> {
        self.map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The views of every user capsule, by UID.
    pub(crate) fn views(&self) -> Vec<CapsuleView> {
        let entries: Vec<Arc<Entry>> = self
            .map()
            .values()
            .filter(|e| !e.internal)
            .cloned()
            .collect();
        entries.iter().map(|e| e.view()).collect()
    }

    /// Adds an empty, locked entry for a create of `uid` showing `view`,
    /// unless one exists.
    pub(crate) fn claim(&self, uid: &str, view: CapsuleView, internal: bool) -> Claim {
        let mut map = self.map();
        if let Some(e) = map.get(uid) {
            return Claim::Exists(e.clone());
        }
        let entry = Arc::new(Entry::new(None, view, internal));
        // Locked before it becomes visible, so no other operation can run
        // before the create.
        let Ok(guard) = entry.lock.clone().try_lock_owned() else {
            return Claim::Busy;
        };
        map.insert(uid.to_string(), entry.clone());
        Claim::New(entry, guard)
    }

    /// Adds the entry of a record recovery read from the journal.
    pub(crate) fn adopt(&self, rec: &Record, view: CapsuleView) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(Some(rec.clone()), view, rec.internal));
        self.map().insert(rec.uid.clone(), entry.clone());
        entry
    }

    /// Removes `uid` if its entry is still `entry` (a create may have
    /// claimed the UID again meanwhile).
    pub(crate) fn remove(&self, uid: &str, entry: &Entry) {
        let mut map = self.map();
        if map
            .get(uid)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
        {
            map.remove(uid);
        }
    }

    /// Runs `task` in the background until it ends or
    /// [`abort_all`](Self::abort_all); a panic is logged with `what` and
    /// `capsule` and reported to `on_panic`.
    pub(crate) fn spawn(
        &self,
        what: &'static str,
        capsule: &str,
        on_panic: impl FnOnce() + Send + 'static,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let capsule = capsule.to_string();
        let handle = tokio::spawn(async move {
            if std::panic::AssertUnwindSafe(task)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(%capsule, task = what, "background task panicked; not restarted");
                on_panic();
            }
        });
        let mut tasks = self.tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle.abort_handle());
    }

    /// Stops every background task.
    pub(crate) fn abort_all(&self) {
        let tasks = std::mem::take(&mut *self.tasks());
        for t in tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::testing::spec;
    use super::*;
    use crate::vmm::{FakeMachine, Machine as _};

    fn view(uid: &str) -> CapsuleView {
        Record::new(uid, &spec(uid)).view(&FakeMachine::new().info())
    }

    #[tokio::test]
    async fn a_claimed_entry_is_locked_until_its_create_lets_go() {
        let r = Registry::default();
        let Claim::New(entry, guard) = r.claim("c1", view("c1"), false) else {
            panic!("fresh uid")
        };
        assert!(entry.lock.try_lock().is_err());
        assert!(matches!(r.claim("c1", view("c1"), false), Claim::Exists(_)));
        drop(guard);
        assert!(entry.lock.try_lock().is_ok());
    }

    #[test]
    fn build_vms_are_apart_from_user_capsules() {
        let r = Registry::default();
        let _ = r.claim("warm-1", view("warm-1"), true);
        assert!(r.get("warm-1", false).is_none());
        assert!(r.get("warm-1", true).is_some());
        assert!(r.views().is_empty());
    }

    #[test]
    fn remove_spares_a_newer_entry_of_the_same_uid() {
        let r = Registry::default();
        let Claim::New(old, _g) = r.claim("c1", view("c1"), false) else {
            panic!()
        };
        r.remove("c1", &old);
        let Claim::New(_new, _g2) = r.claim("c1", view("c1"), false) else {
            panic!()
        };
        r.remove("c1", &old);
        assert!(r.get("c1", false).is_some());
    }

    #[tokio::test]
    async fn a_panicking_task_is_reported() {
        let r = Registry::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        r.spawn(
            "test",
            "c1",
            move || {
                let _ = tx.send(());
            },
            async { panic!("boom") },
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
    }
}
