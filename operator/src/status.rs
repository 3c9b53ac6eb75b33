//! Status of every kind: conditions with stable reasons and preserved
//! transition times, `observedGeneration`, and the one writer — a
//! server-side apply of the status subresource under the `wrenn-operator`
//! field manager. A status equal to the current one is never written, so a
//! reconcile that changes nothing costs no API write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wrenn_crds::capsule::{CapsuleResources, CapsuleStatus};
use wrenn_crds::names::FIELD_MANAGER;

use crate::plan::{ConditionDraft, StatusDraft};
use crate::resources::{Resources, format_bytes};

/// A status write failed.
#[derive(Debug, thiserror::Error)]
#[error("apply status of {kind} {namespace}/{name}")]
pub struct Error {
    kind: &'static str,
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

/// Builds conditions from drafts, keeping `lastTransitionTime` of those
/// whose status did not change.
pub fn build_conditions(
    drafts: &[ConditionDraft],
    current: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    // Whole seconds, as the API server stores them (see build_capsule_status).
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    drafts
        .iter()
        .map(|d| {
            let since = current
                .iter()
                .find(|c| c.type_ == d.type_.as_str() && c.status == d.status.as_str())
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: d.type_.into(),
                status: d.status.into(),
                reason: d.reason.into(),
                message: d.message.clone(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The Capsule status a draft describes, on top of the current one (usage
/// and effective resources carry over unless replaced).
pub fn build_capsule_status(
    draft: &StatusDraft,
    current: Option<&CapsuleStatus>,
    generation: Option<i64>,
    resources: Option<Resources>,
    now: Timestamp,
) -> CapsuleStatus {
    let cur = current.cloned().unwrap_or_default();
    // A spec the node does not enforce yet is not observed yet.
    let generation = if draft.network_pending {
        cur.observed_generation
    } else {
        generation
    };
    let started_at = draft
        .started_unix_nanos
        // metav1.Time keeps whole seconds: a finer value would never equal
        // what the API server returns, and every reconcile would write again.
        .and_then(|n| Timestamp::from_second(n.div_euclid(1_000_000_000)).ok())
        .map(Time)
        .or_else(|| cur.started_at.clone().filter(|_| draft.ip.is_some()));
    CapsuleStatus {
        observed_generation: generation,
        phase: Some(draft.phase),
        node_name: draft.node.clone(),
        ip: draft.ip.clone(),
        started_at,
        resources: resources
            .map(|r| CapsuleResources {
                vcpus: Some(r.vcpus),
                memory: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    format_bytes(r.memory_bytes),
                )),
                disk: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    format_bytes(r.disk_bytes),
                )),
            })
            .or(cur.resources),
        vmm: draft.vmm.clone().or(cur.vmm),
        usage: cur.usage,
        conditions: build_conditions(&draft.conditions, &cur.conditions, generation, now),
    }
}

/// Applies `status` to the object by SSA under the operator's field manager.
pub async fn apply_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error {
        kind: leak_kind::<K>(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        source,
    })
}

fn leak_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Capsule" => "Capsule",
        "CapsuleSnapshot" => "CapsuleSnapshot",
        "CapsuleTemplate" => "CapsuleTemplate",
        _ => "object",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wrenn_crds::capsule::CapsulePhase;
    use wrenn_crds::reason::{ConditionStatus, ConditionType, Reason};

    fn d(status: ConditionStatus) -> ConditionDraft {
        ConditionDraft {
            type_: ConditionType::Ready,
            status,
            reason: Reason::Running,
            message: String::new(),
        }
    }

    #[test]
    fn transition_time_kept_while_status_holds_and_reset_on_change() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = build_conditions(&[d(ConditionStatus::True)], &[], Some(1), t0);
        let again = build_conditions(&[d(ConditionStatus::True)], &first, Some(2), t1);
        assert_eq!(again[0].last_transition_time, Time(t0));
        assert_eq!(again[0].observed_generation, Some(2));
        let flipped = build_conditions(&[d(ConditionStatus::False)], &again, Some(2), t1);
        assert_eq!(flipped[0].last_transition_time, Time(t1));
    }

    #[test]
    fn rebuilding_the_same_draft_is_equal_so_nothing_is_written() {
        let draft = StatusDraft {
            phase: CapsulePhase::Running,
            node: Some("n1".into()),
            ip: Some("10.0.0.2".into()),
            started_unix_nanos: Some(1_700_000_000_123_456_789),
            vmm: Some(wrenn_crds::capsule::VmmInfo {
                name: "qemu".into(),
                version: "9".into(),
                note: Some("TCG".into()),
            }),
            conditions: vec![d(ConditionStatus::True)],
            network_pending: false,
        };
        let t0 = Timestamp::from_second(1_000).unwrap();
        let r = Resources {
            vcpus: 1,
            memory_bytes: 512 << 20,
            disk_bytes: 2 << 30,
        };
        let a = build_capsule_status(&draft, None, Some(3), Some(r), t0);
        let later = Timestamp::from_second(9_000).unwrap();
        // What the API server hands back: serialised and parsed again.
        let stored: CapsuleStatus =
            serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        let b = build_capsule_status(&draft, Some(&stored), Some(3), None, later);
        assert_eq!(a, b);
        assert_eq!(a.resources.unwrap().memory.unwrap().0, "512Mi".to_string());
        assert_eq!(a.vmm.unwrap().note.as_deref(), Some("TCG"));
    }

    #[test]
    fn observed_generation_waits_for_the_network_to_be_applied() {
        let mut draft = StatusDraft {
            phase: CapsulePhase::Running,
            node: Some("n1".into()),
            ip: Some("10.0.0.2".into()),
            started_unix_nanos: None,
            vmm: None,
            conditions: vec![d(ConditionStatus::True)],
            network_pending: false,
        };
        let t0 = Timestamp::from_second(1_000).unwrap();
        let applied = build_capsule_status(&draft, None, Some(3), None, t0);
        draft.network_pending = true;
        let pending = build_capsule_status(&draft, Some(&applied), Some(4), None, t0);
        assert_eq!(pending.observed_generation, Some(3));
        assert_eq!(pending.conditions[0].observed_generation, Some(3));
        draft.network_pending = false;
        let done = build_capsule_status(&draft, Some(&pending), Some(4), None, t0);
        assert_eq!(done.observed_generation, Some(4));
    }
}
