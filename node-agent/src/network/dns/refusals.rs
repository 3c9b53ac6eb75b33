//! Reports of names a capsule's resolver refused, for the operator to show
//! as Events. A guest controls how many names it asks for, so reports are
//! throttled per name and per capsule, the names remembered are bounded,
//! and a report that finds the channel full is dropped: a guest can make
//! its own reports sparse, never the agent's memory or event stream grow.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use wrenn_crds::reason::Reason;

use crate::network::CapsuleId;

/// One report per name and reason at most this often.
pub const PER_NAME: Duration = Duration::from_secs(60);
/// Reports one capsule may cause per [`PER_NAME`].
pub const PER_CAPSULE: usize = 6;
/// Names one capsule's throttle remembers; past it, every name not inside
/// its report window is forgotten (with the refusals it held), and when
/// all are, new names go unreported until a window ends.
const MAX_NAMES: usize = 256;
/// Reports of every capsule waiting for the agent to publish them.
pub const CHANNEL: usize = 256;

/// A name the resolver refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRefused {
    /// Whose resolver.
    pub capsule: CapsuleId,
    /// The name as asked, without the final dot.
    pub name: String,
    /// [`Reason::NameNotAllowed`] or [`Reason::NameUnresolved`].
    pub reason: Reason,
    /// Queries refused for this name and reason since the last report.
    pub queries: u32,
}

/// What the throttle remembers of one name and reason.
#[derive(Clone, Copy, Debug)]
struct Seen {
    reported: Option<Instant>,
    held: u32,
}

/// Per-capsule throttle. Pure: time comes in.
#[derive(Debug, Default)]
pub struct Throttle {
    names: HashMap<(String, Reason), Seen>,
    recent: VecDeque<Instant>,
}

impl Throttle {
    /// Counts one refusal of `name` for `reason` at `now`; `Some(queries)`
    /// when a report is due, with the refusals it covers.
    pub fn note(&mut self, name: &str, reason: Reason, now: Instant) -> Option<u32> {
        let window_over = |t: Instant| now.saturating_duration_since(t) >= PER_NAME;
        while self.recent.front().is_some_and(|t| window_over(*t)) {
            self.recent.pop_front();
        }
        let key = (name.to_string(), reason);
        if !self.names.contains_key(&key) && self.names.len() >= MAX_NAMES {
            // Only names reported inside their window still throttle.
            self.names
                .retain(|_, s| s.reported.is_some_and(|t| !window_over(t)));
            if self.names.len() >= MAX_NAMES {
                return None;
            }
        }
        let seen = self.names.entry(key).or_insert(Seen {
            reported: None,
            held: 0,
        });
        seen.held = seen.held.saturating_add(1);
        let quiet = seen.reported.is_none_or(window_over);
        if !quiet || self.recent.len() >= PER_CAPSULE {
            return None;
        }
        let queries = seen.held;
        *seen = Seen {
            reported: Some(now),
            held: 0,
        };
        self.recent.push_back(now);
        Some(queries)
    }
}

/// A capsule's end of the reports channel.
#[derive(Debug)]
pub struct Reporter {
    capsule: CapsuleId,
    throttle: std::sync::Mutex<Throttle>,
    tx: mpsc::Sender<NameRefused>,
}

impl Reporter {
    /// Reports of `capsule` into `tx`.
    pub fn new(capsule: CapsuleId, tx: mpsc::Sender<NameRefused>) -> Self {
        Self {
            capsule,
            throttle: std::sync::Mutex::new(Throttle::default()),
            tx,
        }
    }

    /// Counts a refusal of `name` (a query's name, final dot and all) and
    /// sends a report when one is due.
    pub fn refused(&self, name: &str, reason: Reason) {
        let name = shown(name);
        let due = self
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(&name, reason, Instant::now());
        if let Some(queries) = due {
            let _ = self.tx.try_send(NameRefused {
                capsule: self.capsule.clone(),
                name,
                reason,
                queries,
            });
        }
    }
}

/// A guest's query name as reports show it: lowercase, without the final
/// dot, at most a DNS name's 253 characters, and anything but letters,
/// digits, `-`, `_`, `.` and `*` as `?` (the name ends up in an Event a
/// person reads).
fn shown(name: &str) -> String {
    name.strip_suffix('.')
        .unwrap_or(name)
        .chars()
        .take(253)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' | '.' | '*' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: Reason = Reason::NameNotAllowed;

    #[test]
    fn a_name_is_reported_once_a_minute_with_the_queries_in_between() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.note("evil.example", NO, t0), Some(1));
        for s in 1..=5 {
            assert_eq!(
                t.note("evil.example", NO, t0 + Duration::from_secs(s)),
                None
            );
        }
        assert_eq!(t.note("evil.example", NO, t0 + PER_NAME), Some(5 + 1));
        // Another reason for the same name is its own report.
        assert_eq!(
            t.note("evil.example", Reason::NameUnresolved, t0 + PER_NAME),
            Some(1)
        );
    }

    #[test]
    fn a_guest_asking_many_names_gets_a_few_reports_a_minute() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let sent = (0..1000)
            .filter(|i| t.note(&format!("n{i}.example"), NO, t0).is_some())
            .count();
        assert_eq!(sent, PER_CAPSULE);
        assert!(t.names.len() <= MAX_NAMES);
        // A minute on, the budget is back; a name held then is reported
        // with its count.
        let later = t0 + PER_NAME;
        assert_eq!(t.note("n0.example", NO, later), Some(1));
        assert!(t.note("fresh.example", NO, later).is_some());
    }

    #[test]
    fn a_hostile_name_is_shown_tame() {
        assert_eq!(shown("PyPI.org."), "pypi.org");
        assert_eq!(shown("a\nb\u{1b}[31m.example"), "a?b??31m.example");
        assert_eq!(shown(&"x".repeat(300)).len(), 253);
    }

    #[test]
    fn reports_past_a_full_channel_are_dropped_not_queued() {
        let (tx, mut rx) = mpsc::channel(1);
        let r = Reporter::new(CapsuleId::new("c1").unwrap(), tx);
        r.refused("a.example.", NO);
        r.refused("b.example.", NO);
        let first = rx.try_recv().unwrap();
        assert_eq!(
            first,
            NameRefused {
                capsule: CapsuleId::new("c1").unwrap(),
                name: "a.example".into(),
                reason: NO,
                queries: 1,
            }
        );
        assert!(rx.try_recv().is_err());
    }
}
