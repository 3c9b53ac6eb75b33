//! The event bus behind `WatchEvents`: every state change gets a sequence
//! number, kept in a bounded ring so a watcher can resume after the last
//! event it saw. Sequence numbers start at the agent's start time in
//! microseconds, so they keep growing across agent restarts and a cursor
//! from a previous agent is recognised as too old rather than mistaken for
//! a recent one.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::CapsuleView;
use crate::network::dns::NameRefused;

/// Kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Current state, sent when a watch starts from 0.
    Sync,
    /// A capsule changed state.
    StateChanged,
    /// A capsule is gone.
    Deleted,
    /// The cursor is too old (or from another agent run): list capsules
    /// again and watch from 0.
    Reset,
    /// The capsule's resolver refused a name (`Event::name_refused`); not
    /// a state change.
    NameRefused,
}

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Sequence number (monotonic on this node).
    pub sequence: u64,
    /// Kind.
    pub kind: EventKind,
    /// The capsule (absent for `Reset`).
    pub capsule: Option<CapsuleView>,
    /// When (unix nanos).
    pub unix_nanos: i64,
    /// With [`EventKind::NameRefused`]: which name, why, how often.
    pub name_refused: Option<NameRefused>,
}

#[derive(Debug)]
struct Ring {
    next: u64,
    events: VecDeque<Event>,
}

/// Sequenced events with a bounded history.
#[derive(Debug)]
pub struct EventBus {
    ring: Mutex<Ring>,
    capacity: usize,
    tx: broadcast::Sender<Event>,
    closed: tokio::sync::watch::Sender<bool>,
}

/// What a watcher gets: the backlog to send first, then live events.
#[derive(Debug)]
pub struct Watch {
    /// Events to send before the live ones.
    pub backlog: Vec<Event>,
    /// Live events after the backlog.
    pub live: broadcast::Receiver<Event>,
    /// Turns `true` when the agent stops: end the stream then, or a
    /// graceful shutdown waits for the watcher to hang up.
    pub closed: tokio::sync::watch::Receiver<bool>,
}

use wrenn_proto::unix_nanos_now as now_nanos;

impl EventBus {
    /// A bus keeping the last `capacity` events, numbering from `first`.
    pub fn new(first: u64, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Self {
            ring: Mutex::new(Ring {
                next: first.max(1),
                events: VecDeque::with_capacity(capacity),
            }),
            capacity: capacity.max(1),
            tx,
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    /// Ends every watch (agent shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A bus numbering from the current time in microseconds.
    pub fn starting_now(capacity: usize) -> Self {
        let micros = u64::try_from(now_nanos() / 1000).unwrap_or(1);
        Self::new(micros, capacity)
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Every mutation below is complete before a panic could happen.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and broadcasts an event.
    pub fn publish(&self, kind: EventKind, capsule: CapsuleView) -> u64 {
        self.record(kind, capsule, None)
    }

    /// Records and broadcasts that `capsule`'s resolver refused a name.
    pub fn publish_refusal(&self, capsule: CapsuleView, refused: NameRefused) -> u64 {
        self.record(EventKind::NameRefused, capsule, Some(refused))
    }

    fn record(
        &self,
        kind: EventKind,
        capsule: CapsuleView,
        name_refused: Option<NameRefused>,
    ) -> u64 {
        let mut ring = self.ring();
        let event = Event {
            sequence: ring.next,
            kind,
            capsule: Some(capsule),
            unix_nanos: now_nanos(),
            name_refused,
        };
        ring.next += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the lock, so live order equals sequence order and a
        // watcher subscribing under the same lock misses nothing.
        let _ = self.tx.send(event.clone());
        event.sequence
    }

    /// The last sequence number handed out (0: none yet).
    pub fn head(&self) -> u64 {
        self.ring().next - 1
    }

    /// Starts a watch. `after == 0`: a `Sync` event per capsule from
    /// `snapshot` (numbered with the current head), then live events.
    /// Otherwise the retained events after `after`, then live ones; a
    /// cursor older than the history (or from the future: another agent
    /// run) gets a single `Reset` instead of the backlog.
    pub fn watch(&self, after: u64, snapshot: impl FnOnce() -> Vec<CapsuleView>) -> Watch {
        let ring = self.ring();
        let live = self.tx.subscribe();
        let head = ring.next - 1;
        let now = now_nanos();
        let backlog = if after == 0 {
            snapshot()
                .into_iter()
                .map(|c| Event {
                    sequence: head,
                    kind: EventKind::Sync,
                    capsule: Some(c),
                    unix_nanos: now,
                    name_refused: None,
                })
                .collect()
        } else {
            let oldest = ring.events.front().map_or(ring.next, |e| e.sequence);
            // `after == oldest - 1` still resumes exactly: nothing is lost.
            if after > head || after + 1 < oldest {
                vec![Event {
                    sequence: head,
                    kind: EventKind::Reset,
                    capsule: None,
                    unix_nanos: now,
                    name_refused: None,
                }]
            } else {
                ring.events
                    .iter()
                    .filter(|e| e.sequence > after)
                    .cloned()
                    .collect()
            }
        };
        Watch {
            backlog,
            live,
            closed: self.closed.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsule::model::testing::spec;
    use crate::capsule::{Record, State};
    use crate::vmm::{BackendInfo, BackendKind};

    fn view(uid: &str, state: State) -> CapsuleView {
        let mut r = Record::new(uid, &spec(uid));
        r.back_to(state);
        r.view(&BackendInfo {
            kind: BackendKind::CloudHypervisor,
            version: "v53.0".into(),
            accelerated: true,
        })
    }

    #[test]
    fn resumes_after_a_cursor_and_resets_an_expired_one() {
        let bus = EventBus::new(100, 3);
        for (i, s) in [
            State::Creating,
            State::Running,
            State::Paused,
            State::Running,
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(
                bus.publish(EventKind::StateChanged, view("a", s)),
                100 + i as u64
            );
        }
        // Retained: 101..=103.
        let w = bus.watch(101, Vec::new);
        let seqs: Vec<u64> = w.backlog.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, vec![102, 103]);
        // 100 is the last one dropped: resuming after it loses nothing.
        assert_eq!(bus.watch(100, Vec::new).backlog.len(), 3);
        for stale in [50, 99, 1_000] {
            let w = bus.watch(stale, Vec::new);
            assert_eq!(w.backlog.len(), 1, "cursor {stale}");
            assert_eq!(w.backlog[0].kind, EventKind::Reset);
            assert!(w.backlog[0].capsule.is_none());
        }
    }

    #[tokio::test]
    async fn watch_from_zero_syncs_then_streams_live() {
        let bus = EventBus::new(1, 8);
        bus.publish(EventKind::StateChanged, view("a", State::Running));
        let mut w = bus.watch(0, || {
            vec![view("a", State::Running), view("b", State::Paused)]
        });
        assert_eq!(w.backlog.len(), 2);
        assert!(
            w.backlog
                .iter()
                .all(|e| e.kind == EventKind::Sync && e.sequence == 1)
        );
        let seq = bus.publish(EventKind::Deleted, view("a", State::Deleting));
        let ev = w.live.recv().await.unwrap();
        assert_eq!((ev.sequence, ev.kind), (seq, EventKind::Deleted));
    }
}
