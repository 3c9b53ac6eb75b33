//! Authorization: one `SubjectAccessReview` per request, on resource
//! `capsules`, the subresource, group `subresources.wrenn.dev` and the
//! capsule's namespace, for the user the front proxy named. Allow
//! decisions are cached for a few seconds (never denials, so a new
//! RoleBinding works at once); a revoked right lasts at most that long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::frontproxy::User;
use crate::route::{Reason, Refusal, Subresource};
use crate::{GROUP, RESOURCE};

/// Cached allow decisions at most; older ones are dropped first.
const CACHE_ENTRIES: usize = 4096;

/// Errors asking the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SubjectAccessReview could not be created.
    #[error("create a SubjectAccessReview")]
    Review(#[source] kube::Error),
}

/// What is asked: `verb` on `capsules/<sub>` named `name` in `namespace`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Verb (`create` for exec, as for `pods/exec`).
    pub verb: &'static str,
    /// Namespace.
    pub namespace: String,
    /// Capsule name.
    pub name: String,
    /// Subresource.
    pub sub: Subresource,
}

/// The review to send (pure).
pub fn build_review(user: &User, access: &Access) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.to_string()),
                resource: Some(RESOURCE.to_string()),
                subresource: Some(access.sub.as_str().to_string()),
                verb: Some(access.verb.to_string()),
                namespace: Some(access.namespace.clone()),
                name: Some(access.name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The message of a denial, as the API server words its own (pure).
pub fn plan_denial(user: &User, access: &Access, reason: &str) -> Refusal {
    let mut message = format!(
        "{RESOURCE}.{GROUP} \"{}\" is forbidden: User \"{}\" cannot {} resource \"{RESOURCE}/{}\" in API group \"{GROUP}\" in the namespace \"{}\"",
        access.name,
        user.name,
        access.verb,
        access.sub.as_str(),
        access.namespace
    );
    if !reason.is_empty() {
        message.push_str(": ");
        message.push_str(reason);
    }
    Refusal::capsule(Reason::Forbidden, &access.name, message)
}

/// Asks the API server whether a user may do something.
pub trait Reviewer: Send + Sync + 'static {
    /// `(allowed, reason)`.
    fn review(&self, sar: SubjectAccessReview) -> BoxFuture<'_, Result<(bool, String), Error>>;
}

/// Reviews through the API server.
#[derive(Clone)]
pub struct KubeReviewer(pub Api<SubjectAccessReview>);

impl std::fmt::Debug for KubeReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeReviewer").finish_non_exhaustive()
    }
}

impl Reviewer for KubeReviewer {
    fn review(&self, sar: SubjectAccessReview) -> BoxFuture<'_, Result<(bool, String), Error>> {
        Box::pin(async move {
            let done = self
                .0
                .create(&PostParams::default(), &sar)
                .await
                .map_err(Error::Review)?;
            let status = done.status.unwrap_or_default();
            Ok((
                status.allowed && !status.denied.unwrap_or(false),
                status.reason.unwrap_or_default(),
            ))
        })
    }
}

/// The authorizer: reviews with a short cache of allow decisions.
#[derive(Clone)]
pub struct Authorizer {
    reviewer: Arc<dyn Reviewer>,
    ttl: Duration,
    allowed: Arc<Mutex<HashMap<(User, Access), Instant>>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Caches allow decisions for `ttl` (zero: no cache).
    pub fn new(reviewer: Arc<dyn Reviewer>, ttl: Duration) -> Self {
        Self {
            reviewer,
            ttl,
            allowed: Arc::default(),
        }
    }

    fn cached(&self, key: &(User, Access)) -> bool {
        let mut map = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(t) if t.elapsed() < self.ttl => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: (User, Access)) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_ENTRIES {
            let ttl = self.ttl;
            map.retain(|_, t| t.elapsed() < ttl);
            if map.len() >= CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, Instant::now());
    }

    /// Allows or refuses (403 naming what was denied; 503 when the API
    /// server could not be asked).
    pub async fn authorize(&self, user: &User, access: &Access) -> Result<(), Refusal> {
        let key = (user.clone(), access.clone());
        if self.cached(&key) {
            return Ok(());
        }
        match self.reviewer.review(build_review(user, access)).await {
            Ok((true, _)) => {
                self.remember(key);
                Ok(())
            }
            Ok((false, reason)) => Err(plan_denial(user, access, &reason)),
            Err(err) => {
                tracing::warn!(error = &err as &dyn std::error::Error, "authorize");
                Err(Refusal::new(
                    Reason::ServiceUnavailable,
                    "could not ask the API server whether this is allowed; try again",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting {
        allow: bool,
        calls: AtomicUsize,
    }

    impl Reviewer for Counting {
        fn review(&self, sar: SubjectAccessReview) -> BoxFuture<'_, Result<(bool, String), Error>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let ra = sar.spec.resource_attributes.unwrap();
            assert_eq!(ra.group.as_deref(), Some("subresources.wrenn.dev"));
            assert_eq!(ra.resource.as_deref(), Some("capsules"));
            assert_eq!(ra.subresource.as_deref(), Some("exec"));
            assert_eq!(ra.namespace.as_deref(), Some("a"));
            let allow = self.allow;
            Box::pin(async move { Ok((allow, String::new())) })
        }
    }

    fn user() -> User {
        User {
            name: "alice".into(),
            uid: None,
            groups: vec!["system:authenticated".into()],
            extra: Default::default(),
        }
    }

    fn access() -> Access {
        Access {
            verb: "create",
            namespace: "a".into(),
            name: "web".into(),
            sub: Subresource::Exec,
        }
    }

    #[tokio::test]
    async fn allows_are_cached_and_denials_are_not() {
        let yes = Arc::new(Counting {
            allow: true,
            calls: AtomicUsize::new(0),
        });
        let a = Authorizer::new(yes.clone(), Duration::from_secs(5));
        a.authorize(&user(), &access()).await.unwrap();
        a.authorize(&user(), &access()).await.unwrap();
        assert_eq!(yes.calls.load(Ordering::SeqCst), 1);

        let no = Arc::new(Counting {
            allow: false,
            calls: AtomicUsize::new(0),
        });
        let a = Authorizer::new(no.clone(), Duration::from_secs(5));
        let err = a.authorize(&user(), &access()).await.unwrap_err();
        assert_eq!(err.reason, Reason::Forbidden);
        assert!(
            err.message
                .contains("cannot create resource \"capsules/exec\""),
            "{}",
            err.message
        );
        let _ = a.authorize(&user(), &access()).await;
        assert_eq!(no.calls.load(Ordering::SeqCst), 2);
    }
}
