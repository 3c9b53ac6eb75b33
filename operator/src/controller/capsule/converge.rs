//! Convergence after a node agent (re)synced: VMs without a Capsule are
//! deleted, capsules placed on the node are reconciled again, and the
//! capsules the agent quarantined are reported as Events on the Node.

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use wrenn_crds::Capsule;
use wrenn_crds::reason::Reason;
use wrenn_proto::agent::v1 as pb;

use crate::controller::Context;
use crate::pool::AgentSynced;

/// Convergence after an agent (re)synced: VMs without a Capsule are deleted;
/// capsules placed on that node are reconciled (a vanished VM is noticed),
/// and so are unplaced ones (placement may have waited for this agent).
/// Capsules are listed from the API server, not the cache: deleting a VM
/// is decided on the freshest view there is.
pub async fn converge(
    ctx: &Context,
    caps: &Api<Capsule>,
    sync: &AgentSynced,
    retrigger: &mpsc::UnboundedSender<ObjectRef<Capsule>>,
) {
    let Some(client) = ctx.pool.client(&sync.node) else {
        tracing::debug!(node = %sync.node, "agent gone before convergence");
        return;
    };
    // Taken before the list: a VM created after the list belongs to a
    // Capsule the list may miss, and must not be swept.
    let vms = ctx.pool.uids(&sync.node);
    let listed = match caps.list(&kube::api::ListParams::default()).await {
        Ok(l) => l.items,
        Err(err) => {
            tracing::warn!(node = %sync.node, error = &err as &dyn std::error::Error, "list capsules for convergence");
            return;
        }
    };
    let owners: std::collections::HashSet<String> = listed.iter().filter_map(|c| c.uid()).collect();
    for (uid, ns, name) in vms {
        if owners.contains(&uid) {
            continue;
        }
        match client.delete_capsule(uid.clone()).await {
            Ok(_) => {
                ctx.pool.forget(&sync.node, &uid);
                ctx.metrics.orphans_deleted.inc();
                tracing::info!(node = %sync.node, %uid, capsule = %format!("{ns}/{name}"), "deleted VM without a Capsule");
            }
            Err(err) => {
                tracing::warn!(node = %sync.node, %uid, error = &err as &dyn std::error::Error, "delete orphan VM");
            }
        }
    }
    for c in &listed {
        // Unplaced capsules too: placement waits for every agent to list
        // its VMs, and this one just did.
        let node = c.status.as_ref().and_then(|s| s.node_name.as_deref());
        if node.is_none_or(|n| n == sync.node) {
            let _ = retrigger.send(ObjectRef::from_obj(c));
        }
    }
}

/// After an agent (re)synced: one Warning Event on its Node per capsule the
/// agent quarantined at start-up, so an admin sees it without reading agent
/// logs. Once per sync, not per refresh: the list only changes when the
/// agent restarts.
pub(super) async fn report_quarantined(ctx: &Context, node: &str) {
    let Some(info) = ctx.pool.info(node) else {
        return;
    };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_string()),
        ..Default::default()
    };
    for q in &info.quarantined {
        ctx.event(
            &reference,
            EventType::Warning,
            Reason::CapsuleQuarantined,
            quarantine_note(q),
        )
        .await;
    }
}

/// The Event note for one quarantined capsule.
pub(super) fn quarantine_note(q: &pb::QuarantinedCapsule) -> String {
    format!(
        "capsule {} quarantined by the node agent ({}: {}); its VM, disk and network are left untouched and create/delete of it are refused until an admin releases it (docs/security.md, Recovery)",
        q.uid, q.reason, q.message
    )
}
