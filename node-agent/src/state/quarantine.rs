//! Capsules recovery leaves alone: a journal it cannot read, or one a newer
//! agent wrote. Such a record might name a running VM, a disk holding the
//! tenant's data, or a suspend image; guessing wrong deletes them. So the
//! agent deletes nothing of that capsule, kills nothing, keeps every
//! resource whose name derives from its UID out of orphan collection,
//! refuses create and delete for the UID, and reports it (`NodeInfo`,
//! `wrenn_agent_quarantined_capsules`), until an admin releases it (see
//! docs/security.md, "Recovery").
//!
//! [`plan_journal`] decides, from the journal bytes alone, whether a
//! capsule directory's record is usable; the [`Quarantine`] list holds the
//! verdicts for the rest of the agent's life.

use crate::error_chain as chain;
use std::collections::BTreeMap;
use std::sync::Mutex;

use wrenn_crds::reason::Reason;

use super::Error;

/// Why a capsule is quarantined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuarantineReason {
    /// The journal is unreadable: an I/O error, not JSON, not a record, or
    /// a record of another UID.
    Unreadable,
    /// A newer agent wrote it; this one may misread what it names.
    NewerVersion,
}

impl QuarantineReason {
    /// The reason `NodeInfo` and Events carry (one spelling, in
    /// `wrenn_crds::reason`).
    pub fn reason(self) -> Reason {
        match self {
            QuarantineReason::Unreadable => Reason::JournalUnreadable,
            QuarantineReason::NewerVersion => Reason::JournalNewerVersion,
        }
    }
}

/// One quarantined capsule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The capsule directory's name (its UID).
    pub uid: String,
    /// Why.
    pub reason: QuarantineReason,
    /// What was found, for the admin.
    pub message: String,
}

/// What recovery does with one capsule directory.
#[derive(Debug)]
pub enum Verdict<T> {
    /// A record this agent understands: recover it.
    Use(T),
    /// Leave everything of it alone and report it.
    Quarantine(Quarantined),
    /// A directory a crash left before its first journal write: nothing
    /// was done on the node for it, so it may go.
    Discard,
}

/// Decides what to do with directory `uid`, whose journal read gave
/// `bytes`. `version` and `uid_of` read the record's format version and
/// UID; `decode` reads any older format; records newer than `current`
/// are never decoded into `T`, since an
/// older shape may still parse while meaning something else.
pub fn plan_journal<T>(
    uid: &str,
    bytes: Result<Option<Vec<u8>>, Error>,
    never_written: bool,
    current: u32,
    decode: impl Fn(&[u8]) -> Result<T, serde_json::Error>,
    uid_of: impl Fn(&T) -> &str,
) -> Verdict<T> {
    let quarantine = |reason, message: String| {
        Verdict::Quarantine(Quarantined {
            uid: uid.to_string(),
            reason,
            message,
        })
    };
    let unreadable = |message| quarantine(QuarantineReason::Unreadable, message);
    let bytes = match bytes {
        Ok(Some(b)) => b,
        Ok(None) if never_written => return Verdict::Discard,
        Ok(None) => {
            return unreadable("the capsule directory holds files but no journal".to_string());
        }
        Err(e) => return unreadable(chain(&e)),
    };
    #[derive(serde::Deserialize)]
    struct Versioned {
        version: u32,
    }
    match serde_json::from_slice::<Versioned>(&bytes) {
        Ok(v) if v.version > current => {
            return quarantine(
                QuarantineReason::NewerVersion,
                format!(
                    "journal format version {} is newer than this agent's {current}",
                    v.version
                ),
            );
        }
        Ok(_) => {}
        Err(e) => return unreadable(format!("decode journal: {e}")),
    }
    match decode(&bytes) {
        Ok(rec) if uid_of(&rec) == uid => Verdict::Use(rec),
        Ok(rec) => unreadable(format!(
            "the journal names capsule {:?}, not its directory's",
            uid_of(&rec)
        )),
        Err(e) => unreadable(format!("decode journal: {e}")),
    }
}

/// The quarantined capsules of this agent's life, by UID.
#[derive(Debug, Default)]
pub struct Quarantine {
    capsules: Mutex<BTreeMap<String, Quarantined>>,
}

impl Quarantine {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Quarantined>> {
        self.capsules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) one.
    pub fn insert(&self, q: Quarantined) {
        self.lock().insert(q.uid.clone(), q);
    }

    /// `uid`'s entry, if quarantined.
    pub fn get(&self, uid: &str) -> Option<Quarantined> {
        self.lock().get(uid).cloned()
    }

    /// Every entry, by UID.
    pub fn list(&self) -> Vec<Quarantined> {
        self.lock().values().cloned().collect()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Rec {
        version: u32,
        uid: String,
        state: String,
    }

    fn plan(uid: &str, bytes: Result<Option<Vec<u8>>, Error>, never: bool) -> Verdict<Rec> {
        plan_journal(
            uid,
            bytes,
            never,
            1,
            |b| serde_json::from_slice(b),
            |r: &Rec| r.uid.as_str(),
        )
    }

    /// The verdict on capsule `c1`'s journal holding `bytes`.
    fn plan_read(bytes: &[u8]) -> Verdict<Rec> {
        plan("c1", Ok(Some(bytes.to_vec())), false)
    }

    fn reason(v: Verdict<Rec>) -> Option<QuarantineReason> {
        match v {
            Verdict::Quarantine(q) => Some(q.reason),
            _ => None,
        }
    }

    #[test]
    fn a_current_record_is_used() {
        let v = plan_read(br#"{"version":1,"uid":"c1","state":"Running"}"#);
        assert!(matches!(v, Verdict::Use(r) if r.state == "Running"));
    }

    #[test]
    fn a_newer_record_is_quarantined_even_when_it_would_parse() {
        let v = plan_read(br#"{"version":2,"uid":"c1","state":"Running"}"#);
        assert_eq!(reason(v), Some(QuarantineReason::NewerVersion));
    }

    #[test]
    fn torn_foreign_or_unreadable_records_are_quarantined() {
        for bytes in [
            br#"{"version":1,"uid":"c1""#.to_vec(),
            b"\x00\x01garbage".to_vec(),
            br#"{"version":1,"uid":"other","state":"Running"}"#.to_vec(),
            br#"{"version":1,"uid":"c1","state":7}"#.to_vec(),
            br#"{"uid":"c1","state":"Running"}"#.to_vec(),
        ] {
            let v = plan_read(&bytes);
            assert_eq!(
                reason(v),
                Some(QuarantineReason::Unreadable),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let io = Error::Read {
            path: "/x/journal.json".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(
            reason(plan("c1", Err(io), false)),
            Some(QuarantineReason::Unreadable)
        );
        // No journal but files in the directory: something was done.
        assert_eq!(
            reason(plan("c1", Ok(None), false)),
            Some(QuarantineReason::Unreadable)
        );
    }

    #[test]
    fn only_a_never_written_directory_is_discarded() {
        assert!(matches!(plan("c1", Ok(None), true), Verdict::Discard));
    }
}
