//! [`Registry`]: the capsules this agent knows, each an [`Entry`] behind its
//! own lock. It owns the map; what an operation does with a record is the
//! steps' business (`super::steps`), and the steps never see the map: a
//! step is handed its capsule's entry, and an entry can only take itself
//! out of the map ([`Entry::leave`]), once its capsule is gone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

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
    /// Its UID and the map it is in, for [`Entry::leave`].
    uid: String,
    home: Weak<Mutex<Map>>,
}

type Map = BTreeMap<String, Arc<Entry>>;

impl Entry {
    fn new(
        uid: &str,
        rec: Option<Record>,
        view: CapsuleView,
        internal: bool,
        home: Weak<Mutex<Map>>,
    ) -> Self {
        Self {
            lock: Arc::new(AsyncMutex::new(rec)),
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            internal,
            uid: uid.to_string(),
            home,
        }
    }

    /// Takes this entry out of its registry: its capsule is gone. A newer
    /// entry of the same UID (a create that claimed it again) stays.
    pub(crate) fn leave(&self) {
        let Some(home) = self.home.upgrade() else {
            return;
        };
        let mut map = home.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.uid)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), self))
        {
            map.remove(&self.uid);
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

/// The capsules; clones share one map.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    capsules: Arc<Mutex<Map>>,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, Map> {
        self.capsules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, uid: &str, rec: Option<Record>, view: CapsuleView, internal: bool) -> Entry {
        Entry::new(uid, rec, view, internal, Arc::downgrade(&self.capsules))
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
        let entry = Arc::new(self.entry(uid, None, view, internal));
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
        let entry = Arc::new(self.entry(&rec.uid, Some(rec.clone()), view, rec.internal));
        self.map().insert(rec.uid.clone(), entry.clone());
        entry
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
    fn leaving_spares_a_newer_entry_of_the_same_uid() {
        let r = Registry::default();
        let Claim::New(old, _g) = r.claim("c1", view("c1"), false) else {
            panic!()
        };
        old.leave();
        assert!(r.get("c1", false).is_none());
        let Claim::New(_new, _g2) = r.claim("c1", view("c1"), false) else {
            panic!()
        };
        old.leave();
        assert!(r.get("c1", false).is_some());
    }
}
