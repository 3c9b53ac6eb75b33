//! The `wrenn.dev/node-cleanup` finalizer around a reconcile, with kube's
//! semantics (`kube::runtime::finalizer`: apply only once the finalizer is
//! on, right after adding it; cleanup before it comes off; a deleted
//! object without it is done)
//! but every write under the `wrenn-operator` field manager, which kube's
//! helper does not name. Adding and removing are merge patches carrying
//! the object's `resourceVersion`, so a concurrent change of the list
//! fails with a conflict instead of being overwritten; an add that
//! conflicts reads the object again and goes on when the finalizer is on.

use std::sync::Arc;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use wrenn_crds::names::{FIELD_MANAGER, FINALIZER};

/// What the reconcile is asked to do.
#[derive(Debug)]
pub enum Event<K> {
    /// The object lives: make the world match it (idempotent).
    Apply(Arc<K>),
    /// The object is being deleted: remove what it owns (idempotent,
    /// tolerates `Apply` never having run).
    Cleanup(Arc<K>),
}

/// A finalized reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    /// The apply step failed.
    #[error("apply failed")]
    ApplyFailed(#[source] E),
    /// The cleanup step failed; the finalizer stays.
    #[error("cleanup failed")]
    CleanupFailed(#[source] E),
    /// Adding the finalizer failed.
    #[error("add finalizer")]
    AddFinalizer(#[source] kube::Error),
    /// Removing the finalizer failed.
    #[error("remove finalizer")]
    RemoveFinalizer(#[source] kube::Error),
}

impl<E: std::error::Error + 'static> Error<E> {
    /// The metrics category: the reconcile's own error's (`inner`), or
    /// `finalizer` for the finalizer's own writes.
    pub fn category(&self, inner: impl Fn(&E) -> &'static str) -> &'static str {
        match self {
            Error::ApplyFailed(e) | Error::CleanupFailed(e) => inner(e),
            Error::AddFinalizer(_) | Error::RemoveFinalizer(_) => "finalizer",
        }
    }
}

/// The patch parameters of every finalizer write.
fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    }
}

/// The merge patch that sets the object's finalizers to `list`, valid only
/// against the version `obj` was read at.
fn build_patch<K: Resource>(obj: &K, list: Vec<String>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "finalizers": list,
            "resourceVersion": obj.meta().resource_version,
        }
    })
}

/// Whether `obj` carries the `wrenn.dev/node-cleanup` finalizer.
pub fn has<K: Resource>(obj: &K) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// The write lost to a change of the object since it was read.
fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 409)
}

/// Runs `reconcile` inside the finalizer.
pub async fn finalizer<K, F, Fut, E>(
    api: &Api<K>,
    obj: Arc<K>,
    reconcile: F,
) -> Result<Action, Error<E>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    F: FnOnce(Event<K>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, E>>,
    E: std::error::Error + 'static,
{
    let on = has(&*obj);
    let deleting = obj.meta().deletion_timestamp.is_some();
    match (on, deleting) {
        (true, false) => reconcile(Event::Apply(obj))
            .await
            .map_err(Error::ApplyFailed),
        (true, true) => {
            let action = reconcile(Event::Cleanup(obj.clone()))
                .await
                .map_err(Error::CleanupFailed)?;
            let rest = obj
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            api.patch(
                &obj.name_any(),
                &params(),
                &Patch::Merge(build_patch(&*obj, rest)),
            )
            .await
            .map_err(Error::RemoveFinalizer)?;
            Ok(action)
        }
        (false, false) => {
            let mut list = obj.finalizers().to_vec();
            list.push(FINALIZER.to_string());
            let patched = match api
                .patch(
                    &obj.name_any(),
                    &params(),
                    &Patch::Merge(build_patch(&*obj, list)),
                )
                .instrument(tracing::info_span!("finalizer.add"))
                .await
            {
                Ok(patched) => patched,
                Err(err) if is_conflict(&err) => {
                    // Most often this process's own add, which the cached
                    // object does not show yet (a reconcile queued behind
                    // the one that added it): read it rather than back off.
                    let fresh = api
                        .get(&obj.name_any())
                        .instrument(tracing::info_span!("finalizer.reread"))
                        .await
                        .map_err(Error::AddFinalizer)?;
                    let on = has(&fresh);
                    if !on || fresh.meta().deletion_timestamp.is_some() {
                        return Err(Error::AddFinalizer(err));
                    }
                    fresh
                }
                Err(err) => return Err(Error::AddFinalizer(err)),
            };
            // Apply at once on the object the write returned: waiting for
            // the write to come back through the watch would cost a whole
            // reconcile round trip on every create.
            reconcile(Event::Apply(Arc::new(patched)))
                .await
                .map_err(Error::ApplyFailed)
        }
        (false, true) => Ok(Action::await_change()),
    }
}
