//! [`Tasks`]: the background tasks started for capsules (crash watchers,
//! template builds), supervised: each runs inside [`Tasks::spawn`], which
//! logs a task that panicked (with the capsule it served) instead of
//! letting it vanish, and counts it as an `aborted` error. Such a task is
//! not restarted: a crash watcher that died leaves its capsule's last state
//! shown, and a delete still removes it; the agent keeps serving the other
//! capsules. Long-lived agent tasks (sampler, admin server, log sweeper)
//! are supervised in `main`, where one that ends stops the agent.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use futures::FutureExt as _;

/// Background tasks, aborted together by [`Tasks::abort_all`].
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    running: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Tasks {
    fn running(&self) -> MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut running = self.running();
        running.retain(|t| !t.is_finished());
        running.push(handle.abort_handle());
    }

    /// Stops every background task.
    pub(crate) fn abort_all(&self) {
        let running = std::mem::take(&mut *self.running());
        for t in running {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_reported() {
        let t = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.spawn(
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
