//! Capsule phase Events, published by one task beside the reconciles.
//!
//! A phase's Event is a write like its status, but nothing waits on it: a
//! reconcile that awaited it held its slot one more API round trip, and in
//! a burst the Events competed with the status writes that bring the other
//! capsules to Running. So they go out one at a time from a queue, as
//! client-go's recorder sends them from its own goroutine, and each waits
//! while a capsule's finalizer or status write is in flight (at most
//! [`MAX_DEFER`]): under a burst they trail the statuses instead of slowing
//! them, one at a time they go out at once. A full queue drops the Event
//! with a warning rather than grow without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{EventType, Recorder};
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;
use wrenn_crds::reason::Reason;

/// Events waiting at most; beyond it new ones are dropped (client-go's
/// recorder keeps 1,000).
const CAPACITY: usize = 1024;

/// How long an Event yields to writes in flight before it goes out anyway.
pub const MAX_DEFER: Duration = Duration::from_secs(2);

/// One queued Event.
struct Queued {
    queued: Instant,
    reference: ObjectReference,
    type_: EventType,
    reason: Reason,
    note: String,
}

/// Events queued and not yet answered, and a wake-up when that reaches 0;
/// capsule writes in flight, and a wake-up when that reaches 0.
#[derive(Debug, Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
    writes: AtomicUsize,
    quiet: Notify,
}

/// A capsule write in flight (see [`EventQueue::writing`]).
#[derive(Debug)]
pub struct Writing(Arc<Pending>);

impl Drop for Writing {
    fn drop(&mut self) {
        if self.0.writes.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet.notify_waiters();
        }
    }
}

/// Waits until no capsule write is in flight, or `deadline`.
async fn yield_to_writes(pending: &Pending, deadline: Instant) {
    loop {
        let quiet = pending.quiet.notified();
        if pending.writes.load(Ordering::Acquire) == 0 {
            return;
        }
        if tokio::time::timeout_at(deadline, quiet).await.is_err() {
            return;
        }
    }
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
                yield_to_writes(&done, q.queued + MAX_DEFER).await;
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
            queued: Instant::now(),
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

    /// Marks a capsule write in flight until the guard is dropped: queued
    /// Events wait for it.
    pub fn writing(&self) -> Writing {
        self.pending.writes.fetch_add(1, Ordering::AcqRel);
        Writing(self.pending.clone())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use http::Method;

    use super::*;
    use crate::fixtures::{ApiServer, Reply};

    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

    /// A queue on `server`, and when its one expected Event arrived.
    fn queue(server: &ApiServer) -> (EventQueue, Arc<Mutex<Option<Instant>>>) {
        let arrived = Arc::new(Mutex::new(None));
        let at = arrived.clone();
        server.expect(
            Method::POST,
            EVENTS,
            move |body| {
                assert_eq!(body["reason"], "Running", "{body:#}");
                *at.lock().unwrap() = Some(Instant::now());
            },
            Reply::Echo,
        );
        let q = EventQueue::start(crate::controller::recorder(server.client(), None));
        (q, arrived)
    }

    fn push(q: &EventQueue) {
        let reference = ObjectReference {
            api_version: Some("wrenn.dev/v1alpha1".into()),
            kind: Some("Capsule".into()),
            namespace: Some("ns".into()),
            name: Some("c1".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        q.push(
            reference,
            EventType::Normal,
            Reason::Running,
            "running".into(),
        );
    }

    #[tokio::test]
    async fn an_event_waits_while_a_capsule_write_is_in_flight() {
        let server = ApiServer::default();
        let (q, arrived) = queue(&server);
        let writing = q.writing();
        push(&q);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            arrived.lock().unwrap().is_none(),
            "published during a write"
        );
        let released = Instant::now();
        drop(writing);
        q.idle().await;
        server.done();
        assert!(arrived.lock().unwrap().unwrap() >= released);
    }

    #[tokio::test]
    async fn an_event_yields_to_writes_for_at_most_max_defer() {
        let server = ApiServer::default();
        let (q, arrived) = queue(&server);
        let _writing = q.writing();
        let pushed = Instant::now();
        push(&q);
        tokio::time::timeout(MAX_DEFER * 3, q.idle())
            .await
            .expect("the Event was held past MAX_DEFER");
        server.done();
        let waited = arrived.lock().unwrap().unwrap() - pushed;
        assert!(waited >= MAX_DEFER, "{waited:?}");
    }

    #[tokio::test]
    async fn with_no_write_in_flight_an_event_goes_out_at_once() {
        let server = ApiServer::default();
        let (q, arrived) = queue(&server);
        let pushed = Instant::now();
        push(&q);
        q.idle().await;
        server.done();
        let waited = arrived.lock().unwrap().unwrap() - pushed;
        assert!(waited < MAX_DEFER / 2, "{waited:?}");
    }
}
