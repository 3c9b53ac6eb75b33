//! `snapshot` and `fork`: a `CapsuleSnapshot` of a capsule, and a new
//! capsule restored from one. The objects are built here (pure) and created
//! under our field manager; the operator takes the snapshot and starts the
//! copy, and we watch for the result.

use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use kube::core::ObjectMeta;
use wrenn_crds::capsule::{CapsulePhase, CapsuleSource, OperatingMode, SnapshotRef};
use wrenn_crds::names::CLI_FIELD_MANAGER;
use wrenn_crds::snapshot::{CapsuleSnapshotSpec, SnapshotPhase};
use wrenn_crds::{Capsule, CapsuleSnapshot};

use crate::cluster::{self, Target};
use crate::wait::{self, WaitFor, plan_snapshot};

/// Why a snapshot or fork failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source capsule could not be read.
    #[error("read capsule {capsule:?}")]
    GetCapsule {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// A fork onto its own name.
    #[error("fork {capsule:?} needs a new name for the copy")]
    SameName {
        /// The capsule.
        capsule: String,
    },
    /// The copy's name is taken.
    #[error(
        "capsule {name:?} already exists in namespace {namespace:?}: choose another name for the copy"
    )]
    Exists {
        /// The name.
        name: String,
        /// Where.
        namespace: String,
    },
    /// The API server refused the new object.
    #[error("create {kind} {name:?}")]
    Create {
        /// `CapsuleSnapshot` or `capsule`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The object was created but did not become ready.
    #[error("{kind} {name:?} was created")]
    Wait {
        /// `CapsuleSnapshot` or `capsule`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Why waiting ended.
        #[source]
        source: wait::Error,
    },
}

/// Creates `object` (`kind` `name`) in the target's namespace under our
/// field manager.
async fn create<K>(target: &Target, kind: &'static str, name: &str, object: &K) -> Result<K, Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let params = PostParams {
        field_manager: Some(CLI_FIELD_MANAGER.into()),
        ..Default::default()
    };
    Api::<K>::namespaced(target.client.clone(), &target.namespace)
        .create(&params, object)
        .await
        .map_err(|e| Error::Create {
            kind,
            name: name.into(),
            source: target.refusal(e, kind, name),
        })
}

/// A snapshot `name` of `capsule`: memory and disk, or disk only (pure).
pub fn build_snapshot(name: &str, capsule: &str, memory: bool) -> CapsuleSnapshot {
    CapsuleSnapshot {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CapsuleSnapshotSpec {
            capsule_name: capsule.into(),
            memory,
            ..Default::default()
        },
        status: None,
    }
}

/// Capsule `name` restored from `snapshot`, with `source`'s spec but for
/// where it comes from, and running (pure). Labels, annotations and status
/// are the source's own and are not copied.
pub fn build_fork(source: &Capsule, name: &str, snapshot: &str) -> Capsule {
    let mut spec = source.spec.clone();
    spec.source = CapsuleSource {
        template_ref: None,
        snapshot_ref: Some(SnapshotRef {
            name: snapshot.into(),
        }),
    };
    spec.operating_mode = OperatingMode::Running;
    Capsule {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

async fn get_capsule(target: &Target, capsule: &str) -> Result<Capsule, Error> {
    Api::<Capsule>::namespaced(target.client.clone(), &target.namespace)
        .get(capsule)
        .await
        .map_err(|e| Error::GetCapsule {
            capsule: capsule.into(),
            source: target.refusal(e, "capsule", capsule),
        })
}

/// Creates snapshot `name` of `capsule` (which must exist: the API server
/// would take a snapshot of a missing capsule and leave it Pending) and,
/// with a `timeout`, waits until it is Ready.
pub async fn snapshot(
    target: &Target,
    capsule: &str,
    name: &str,
    memory: bool,
    timeout: Option<Duration>,
) -> Result<CapsuleSnapshot, Error> {
    get_capsule(target, capsule).await?;
    create_snapshot(target, capsule, name, memory, timeout).await
}

async fn create_snapshot(
    target: &Target,
    capsule: &str,
    name: &str,
    memory: bool,
    timeout: Option<Duration>,
) -> Result<CapsuleSnapshot, Error> {
    let snapshot = build_snapshot(name, capsule, memory);
    let created = create(target, "CapsuleSnapshot", name, &snapshot).await?;
    let Some(timeout) = timeout else {
        return Ok(created);
    };
    wait::until(
        target,
        "CapsuleSnapshot",
        name,
        &wait::phase_name(SnapshotPhase::Ready),
        timeout,
        plan_snapshot,
    )
    .await
    .map_err(|source| Error::Wait {
        kind: "CapsuleSnapshot",
        name: name.into(),
        source,
    })
}

/// Snapshots `capsule` as `name` (memory and disk) and creates capsule
/// `name` from it; with a `timeout`, waits for the snapshot to be Ready and
/// then for the copy to run. Without, both objects are created at once and
/// the operator starts the copy when the snapshot is ready.
pub async fn fork(
    target: &Target,
    capsule: &str,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Capsule, Error> {
    if capsule == name {
        return Err(Error::SameName {
            capsule: capsule.into(),
        });
    }
    let source = get_capsule(target, capsule).await?;
    // Refuse before taking a snapshot nobody would use.
    match get_capsule(target, name).await {
        Ok(_) => {
            return Err(Error::Exists {
                name: name.into(),
                namespace: target.namespace.clone(),
            });
        }
        Err(Error::GetCapsule {
            source: cluster::Error::NotFound { .. },
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    let started = tokio::time::Instant::now();
    create_snapshot(target, capsule, name, true, timeout).await?;
    let created = create(target, "capsule", name, &build_fork(&source, name, name)).await?;
    let Some(timeout) = timeout else {
        return Ok(created);
    };
    let left = timeout.saturating_sub(started.elapsed());
    let want = WaitFor::Phase(CapsulePhase::Running);
    wait::capsule(target, name, want, created.metadata.generation, left)
        .await
        .map_err(|source| Error::Wait {
            kind: "capsule",
            name: name.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_snapshot_names_its_capsule_and_what_it_keeps() {
        let s = serde_json::to_value(build_snapshot("before", "box", true)).unwrap();
        assert_eq!(
            s,
            json!({
                "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
                "metadata": { "name": "before" },
                "spec": { "capsuleName": "box", "memory": true, "deletionPolicy": "Delete" },
            })
        );
        let disk = build_snapshot("d", "box", false);
        assert!(!disk.spec.memory);
    }

    #[test]
    fn a_fork_keeps_the_sources_spec_but_comes_from_the_snapshot_and_runs() {
        let source: Capsule = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "box", "labels": { "team": "a" }, "uid": "u1", "resourceVersion": "7" },
            "spec": {
                "source": { "templateRef": { "name": "base" } },
                "resources": { "vcpus": 2, "memory": "1Gi" },
                "operatingMode": "Paused",
                "env": [{ "name": "K", "value": "v" }],
                "lifecycle": { "idleTimeout": "15m" },
                "network": { "egress": "Deny" },
                "nodeSelector": { "zone": "x" },
            },
            "status": { "phase": "Paused", "nodeName": "n1" },
        }))
        .unwrap();
        let fork = serde_json::to_value(build_fork(&source, "box-2", "box-2")).unwrap();
        assert_eq!(fork["metadata"], json!({ "name": "box-2" }));
        assert_eq!(
            fork["spec"]["source"],
            json!({ "snapshotRef": { "name": "box-2" } })
        );
        assert_eq!(fork["spec"]["operatingMode"], "Running");
        for kept in ["resources", "env", "lifecycle", "network", "nodeSelector"] {
            assert_eq!(
                fork["spec"][kept],
                serde_json::to_value(&source.spec).unwrap()[kept],
                "{kept}"
            );
        }
        assert!(fork.get("status").is_none_or(|s| s.is_null()), "{fork}");
    }
}
