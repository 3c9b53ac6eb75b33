//! When each capsule last served a data-plane call (exec, PTY, files), so
//! the operator can count `idleTimeout` from real use rather than from the
//! start. Kept in memory: after an agent restart a capsule counts as used
//! at that moment only once a call arrives, which errs toward keeping it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Last data-plane call per capsule UID, Unix nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    last: Arc<Mutex<HashMap<String, i64>>>,
}

impl Activity {
    /// Records a call on `uid` now.
    pub fn touch(&self, uid: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.lock().insert(uid.to_string(), now);
    }

    /// The last call on `uid`, 0 when none.
    pub fn last(&self, uid: &str) -> i64 {
        self.lock().get(uid).copied().unwrap_or(0)
    }

    /// Drops a deleted capsule.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // A panicked holder leaves a map that is still valid.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
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
}
