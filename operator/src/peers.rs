//! A published port's `from` peers → the sources its node enforces: CIDRs
//! as written, Pod and namespace selectors as the /32s of the Pods they
//! choose right now (NetworkPolicy's peer rules). Pure: the Pods and
//! Namespaces come in from the operator's reflectors.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt as _;
use kube::core::{Selector, SelectorExt as _};
use wrenn_crds::capsule::PortPeer;

/// Most sources one port may have once selectors are resolved (the node
/// agent's limit): beyond it the lowest addresses are kept.
pub const MAX_SOURCES: usize = 1024;

/// The cluster's Pods and Namespaces as last watched.
#[derive(Clone, Copy, Debug)]
pub struct Cluster<'a> {
    /// Pods (every namespace the operator watches).
    pub pods: &'a [Arc<Pod>],
    /// Namespaces.
    pub namespaces: &'a [Arc<Namespace>],
}

/// Whether any peer chooses Pods by label (so Pod and Namespace changes
/// can change the port's sources).
pub fn selects_pods(from: &[PortPeer]) -> bool {
    from.iter()
        .any(|p| p.pod_selector.is_some() || p.namespace_selector.is_some())
}

/// Whether a change to a Pod in `pod_ns` can change the sources of a
/// capsule in `capsule_ns` with these peers.
pub fn may_choose(capsule_ns: &str, from: &[PortPeer], pod_ns: &str) -> bool {
    from.iter()
        .any(|p| match (&p.namespace_selector, &p.pod_selector) {
            (Some(_), _) => true,
            (None, Some(_)) => capsule_ns == pod_ns,
            (None, None) => false,
        })
}

/// The sources of one port of a capsule in `capsule_ns`: sorted, each once,
/// at most [`MAX_SOURCES`] (written CIDRs first, they are never dropped).
pub fn resolve(capsule_ns: &str, from: &[PortPeer], cluster: Cluster<'_>) -> Vec<String> {
    let mut cidrs: BTreeSet<String> = BTreeSet::new();
    let mut pods: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for peer in from {
        if let Some(c) = &peer.cidr {
            cidrs.insert(c.clone());
            continue;
        }
        let Some(in_ns) = namespaces(capsule_ns, peer.namespace_selector.as_ref(), cluster) else {
            continue;
        };
        let Some(chosen) = selector(peer.pod_selector.as_ref()) else {
            continue;
        };
        for pod in cluster.pods {
            let ns = pod.namespace().unwrap_or_default();
            if in_ns.contains(ns.as_str()) && chosen.matches(pod.labels()) {
                pods.extend(addresses(pod));
            }
        }
    }
    let room = MAX_SOURCES.saturating_sub(cidrs.len());
    if pods.len() > room {
        tracing::warn!(
            namespace = capsule_ns,
            chosen = pods.len(),
            kept = room,
            "a port's selectors choose more Pods than a node enforces; the lowest addresses are kept"
        );
    }
    let mut out: Vec<String> = cidrs.into_iter().collect();
    out.extend(pods.into_iter().take(room).map(|ip| format!("{ip}/32")));
    out
}

/// The namespaces a peer looks in: the capsule's own without a selector.
/// `None` for a selector that does not parse (it chooses nothing).
fn namespaces<'a>(
    capsule_ns: &'a str,
    sel: Option<&LabelSelector>,
    cluster: Cluster<'a>,
) -> Option<BTreeSet<&'a str>> {
    let Some(sel) = sel else {
        return Some(BTreeSet::from([capsule_ns]));
    };
    let sel = selector(Some(sel))?;
    Some(
        cluster
            .namespaces
            .iter()
            .filter(|n| sel.matches(n.labels()))
            .filter_map(|n| n.metadata.name.as_deref())
            .collect(),
    )
}

/// A label selector; absent chooses everything. `None` when it does not
/// parse (an unknown operator).
fn selector(sel: Option<&LabelSelector>) -> Option<Selector> {
    match sel {
        None => Some(Selector::default()),
        Some(s) => match Selector::try_from(s.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "a from selector does not parse; it chooses nothing");
                None
            }
        },
    }
}

/// A Pod's IPv4 addresses while it can send: not host-network (its address
/// is its node's), not finished.
fn addresses(pod: &Pod) -> Vec<Ipv4Addr> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if host_network || finished {
        return Vec::new();
    }
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .collect()
}

#[cfg(test)]
mod tests;
