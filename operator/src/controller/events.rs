//! Capsule phase Events, published by one task beside the reconciles.
//!
//! A phase's Event is a write like its status, but nothing waits on it: a
//! reconcile that awaited it held its slot one more API round trip, and in
//! a burst the Events competed with the status writes that bring the other
//! capsules to Running. So they go out one at a time from a queue, as
//! client-go's recorder sends them from its own goroutine, and under a
//! burst they trail the statuses instead of slowing them. A full queue
//! drops the Event with a warning rather than grow without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{EventType, Recorder};
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;
use wrenn_crds::reason::Reason;

/// Events waiting at most; beyond it new ones are dropped (client-go's
/// recorder keeps 1,000).
const CAPACITY: usize = 1024;

/// One queued Event.
struct Queued {
    reference: ObjectReference,
    type_: EventType,
    reason: Reason,
    note: String,
}

/// Events queued and not yet answered, and a wake-up when that reaches 0.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

/// The queue's sending side (see the module text).
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<Queued>,
    pending: Arc<Pending>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("pending", &self.pending.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl EventQueue {
    /// Starts the publishing task on the current runtime; it ends when the
    /// last handle is dropped.
    pub fn start(recorder: Recorder) -> Self {
        let (tx, mut rx) = mpsc::channel::<Queued>(CAPACITY);
        let pending = Arc::new(Pending::default());
        let done = pending.clone();
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                super::publish(&recorder, &q.reference, q.type_, q.reason, q.note)
                    .instrument(tracing::info_span!("capsule.publish_event"))
                    .await;
                if done.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                    done.idle.notify_waiters();
                }
            }
        });
        EventQueue { tx, pending }
    }

    /// Queues an Event; never waits.
    pub fn push(&self, reference: ObjectReference, type_: EventType, reason: Reason, note: String) {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        let queued = Queued {
            reference,
            type_,
            reason,
            note,
        };
        if let Err(err) = self.tx.try_send(queued) {
            self.pending.count.fetch_sub(1, Ordering::AcqRel);
            let dropped = match err {
                mpsc::error::TrySendError::Full(q) | mpsc::error::TrySendError::Closed(q) => q,
            };
            tracing::warn!(
                reason = %dropped.reason,
                object = dropped.reference.name.as_deref().unwrap_or_default(),
                "event queue full or closed: event dropped"
            );
        }
    }

    /// Resolves once every queued Event has been answered.
    pub async fn idle(&self) {
        loop {
            let woken = self.pending.idle.notified();
            if self.pending.count.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    }
}
