//! Placement: which node a capsule goes to. Pure functions over what the
//! agents reported ([`NodeView`]) and what the capsule asks for
//! ([`Request`]); the controller gathers both and records the choice.
//!
//! Filter, then score. A node is rejected with one [`Rejection`] (the first
//! that applies, in the order a user would fix them); when every node is
//! rejected the [`Unschedulable`] error says why per node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::resources::{Resources, format_bytes};

/// One node as the operator last saw its agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// The agent is connected and its NodeInfo is fresh.
    pub ready: bool,
    /// The Node's labels (as discovered with the agent Pod's node).
    pub labels: BTreeMap<String, String>,
    /// Name of the VMM the agent runs, `None` when it has none.
    pub vmm: Option<String>,
    /// Total resources the agent offers.
    pub capacity: Resources,
    /// Free resources the agent reported.
    pub free: Resources,
    /// Held by capsules placed here that the agent does not count yet.
    pub reserved: Resources,
    /// Template keys whose disks the node holds.
    pub templates: BTreeSet<String>,
    /// Snapshot ids whose files the node holds.
    pub snapshots: BTreeSet<String>,
    /// Capsules on this node (running or placed), for spreading.
    pub capsules: usize,
    /// The node's quota for its image cache, snapshots and suspend images
    /// (0: none), and what those hold.
    pub disk_quota: DiskQuota,
}

/// A node's disk quota as its agent reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskQuota {
    /// Bytes allowed; 0 when the agent reports none.
    pub quota: u64,
    /// Bytes held.
    pub used: u64,
}

/// What a capsule needs from a node.
#[derive(Clone, Debug, Default)]
pub struct Request<'a> {
    /// Effective resources.
    pub resources: Resources,
    /// Labels the node must carry.
    pub node_selector: Option<&'a BTreeMap<String, String>>,
    /// The template the capsule boots from, when it boots from one.
    pub template: Option<TemplateNeed<'a>>,
    /// The snapshot it restores, when it restores one.
    pub snapshot: Option<SnapshotNeed<'a>>,
    /// Labels its template limits it to (the template's nodeSelector).
    pub template_selector: Option<&'a BTreeMap<String, String>>,
    /// A warm template's snapshot id: only nodes holding it qualify.
    pub warm: Option<&'a str>,
}

/// A template the node must hold or be able to prepare.
#[derive(Clone, Copy, Debug)]
pub struct TemplateNeed<'a> {
    /// Key prefix of the template on nodes (`namespace/name@`).
    pub key_prefix: &'a str,
    /// Any node can prepare it on demand (image or rootfs source); false
    /// when only nodes that already hold it qualify.
    pub preparable: bool,
}

/// A snapshot that pins the capsule to the node holding it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotNeed<'a> {
    /// Node holding the snapshot's files.
    pub node: &'a str,
    /// Snapshot id on that node.
    pub id: &'a str,
}

/// Why one node cannot take the capsule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The agent is disconnected or has not answered NodeInfo.
    AgentNotReady,
    /// A `nodeSelector` label is absent or different.
    SelectorMismatch {
        /// The label key.
        key: String,
    },
    /// The agent found no VMM on the node.
    NoVmm,
    /// The template is not on the node and cannot be prepared there.
    TemplateUnavailable,
    /// The template's nodeSelector leaves the node out.
    TemplateSelectorMismatch {
        /// The label key.
        key: String,
    },
    /// The warm template's snapshot is not (yet) built on the node.
    WarmSnapshotMissing,
    /// The snapshot lives on another node.
    SnapshotElsewhere {
        /// Where it lives.
        node: String,
    },
    /// The node should hold the snapshot but its agent does not list it.
    SnapshotMissing,
    /// The node's image cache, snapshots and suspend images fill its disk
    /// quota: a capsule there could not be suspended or snapshotted.
    DiskQuotaExceeded {
        /// Bytes held.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// Not enough of one resource after reservations.
    Insufficient {
        /// `vcpus`, `memory` or `disk`.
        what: &'static str,
        /// Asked for.
        need: u64,
        /// Free after reservations.
        free: u64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::AgentNotReady => f.write_str("node agent not ready"),
            Rejection::SelectorMismatch { key } => {
                write!(f, "nodeSelector {key} does not match")
            }
            Rejection::NoVmm => f.write_str("no VMM on the node"),
            Rejection::TemplateUnavailable => {
                f.write_str("template not on the node and not preparable")
            }
            Rejection::TemplateSelectorMismatch { key } => {
                write!(f, "the template's nodeSelector {key} does not match")
            }
            Rejection::WarmSnapshotMissing => {
                f.write_str("the template's warm snapshot is not built on the node yet")
            }
            Rejection::SnapshotElsewhere { node } => write!(f, "snapshot is on node {node}"),
            Rejection::SnapshotMissing => f.write_str("snapshot files missing on the node"),
            Rejection::DiskQuotaExceeded { used, quota } => write!(
                f,
                "{}: images, snapshots and suspend images hold {} of the node's {} quota",
                wrenn_crds::reason::Reason::DiskQuotaExceeded,
                format_bytes(*used),
                format_bytes(*quota)
            ),
            Rejection::Insufficient { what, need, free } if *what == "vcpus" => {
                write!(f, "not enough vcpus (need {need}, free {free})")
            }
            Rejection::Insufficient { what, need, free } => write!(
                f,
                "not enough {what} (need {}, free {})",
                format_bytes(*need),
                format_bytes(*free)
            ),
        }
    }
}

/// No node fits; carries one reason per node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// (node, why), sorted by node name.
    pub reasons: Vec<(String, Rejection)>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reasons.is_empty() {
            return f.write_str("no node agents are registered");
        }
        write!(f, "0/{} nodes fit:", self.reasons.len())?;
        for (i, (node, why)) in self.reasons.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            write!(f, "{sep}{node}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unschedulable {}

/// Checks one node; `Ok` carries whether it already holds the template.
pub fn plan_filter(req: &Request<'_>, node: &NodeView) -> Result<bool, Rejection> {
    if !node.ready {
        return Err(Rejection::AgentNotReady);
    }
    if let Some(selector) = req.node_selector {
        for (key, value) in selector {
            if node.labels.get(key) != Some(value) {
                return Err(Rejection::SelectorMismatch { key: key.clone() });
            }
        }
    }
    if let Some(selector) = req.template_selector {
        for (key, value) in selector {
            if node.labels.get(key) != Some(value) {
                return Err(Rejection::TemplateSelectorMismatch { key: key.clone() });
            }
        }
    }
    if node.vmm.is_none() {
        return Err(Rejection::NoVmm);
    }
    if let Some(id) = req.warm
        && !node.snapshots.contains(id)
    {
        return Err(Rejection::WarmSnapshotMissing);
    }
    if let Some(snap) = req.snapshot {
        if snap.node != node.name {
            return Err(Rejection::SnapshotElsewhere {
                node: snap.node.to_string(),
            });
        }
        if !node.snapshots.contains(snap.id) {
            return Err(Rejection::SnapshotMissing);
        }
    }
    let cached = req
        .template
        .is_some_and(|t| node.templates.iter().any(|k| k.starts_with(t.key_prefix)));
    if let Some(t) = req.template
        && !cached
        && !t.preparable
    {
        return Err(Rejection::TemplateUnavailable);
    }
    let q = node.disk_quota;
    if q.quota > 0 && q.used >= q.quota {
        return Err(Rejection::DiskQuotaExceeded {
            used: q.used,
            quota: q.quota,
        });
    }
    let free = node.free.minus(node.reserved);
    let need = req.resources;
    if need.vcpus > free.vcpus {
        return Err(Rejection::Insufficient {
            what: "vcpus",
            need: need.vcpus.into(),
            free: free.vcpus.into(),
        });
    }
    if need.memory_bytes > free.memory_bytes {
        return Err(Rejection::Insufficient {
            what: "memory",
            need: need.memory_bytes,
            free: free.memory_bytes,
        });
    }
    if need.disk_bytes > free.disk_bytes {
        return Err(Rejection::Insufficient {
            what: "disk",
            need: need.disk_bytes,
            free: free.disk_bytes,
        });
    }
    Ok(cached)
}

/// Score of a node that passed the filter; higher is better.
///
/// - least allocated (0..=100): the mean share of CPU and memory left free
///   after this capsule, so load spreads by size;
/// - spread (0..=10): fewer capsules than the busiest candidate, so many
///   tiny capsules do not pile onto one big node;
/// - template cached (20): booting from a disk already on the node skips a
///   pull and unpack that takes far longer than any imbalance costs.
pub fn plan_score(req: &Request<'_>, node: &NodeView, cached: bool, most_capsules: usize) -> u64 {
    let free = node.free.minus(node.reserved).minus(req.resources);
    let share = |left: u64, cap: u64| (left.min(cap) * 100).checked_div(cap).unwrap_or(0);
    let cpu = share(free.vcpus.into(), node.capacity.vcpus.into());
    let mem = share(free.memory_bytes, node.capacity.memory_bytes);
    let least_allocated = (cpu + mem) / 2;
    let spread = (most_capsules.saturating_sub(node.capsules) * 10)
        .checked_div(most_capsules)
        .unwrap_or(10) as u64;
    let template = if cached { 20 } else { 0 };
    least_allocated + spread + template
}

/// Picks the node for a capsule, or says per node why none fits.
pub fn plan_placement(req: &Request<'_>, nodes: &[NodeView]) -> Result<String, Unschedulable> {
    let mut fits = Vec::new();
    let mut reasons = Vec::new();
    for node in nodes {
        match plan_filter(req, node) {
            Ok(cached) => fits.push((node, cached)),
            Err(why) => reasons.push((node.name.clone(), why)),
        }
    }
    let most = fits.iter().map(|(n, _)| n.capsules).max().unwrap_or(0);
    // Highest score wins; the name breaks ties so the choice is repeatable.
    fits.iter()
        .max_by(|(a, ac), (b, bc)| {
            plan_score(req, a, *ac, most)
                .cmp(&plan_score(req, b, *bc, most))
                .then_with(|| b.name.cmp(&a.name))
        })
        .map(|(n, _)| n.name.clone())
        .ok_or_else(|| {
            reasons.sort_by(|a, b| a.0.cmp(&b.0));
            Unschedulable { reasons }
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            vmm: Some("cloud-hypervisor".into()),
            capacity: Resources {
                vcpus: 16,
                memory_bytes: 64 * GI,
                disk_bytes: 500 * GI,
            },
            free: Resources {
                vcpus: 16,
                memory_bytes: 64 * GI,
                disk_bytes: 500 * GI,
            },
            ..NodeView::default()
        }
    }

    fn small() -> Request<'static> {
        Request {
            resources: Resources {
                vcpus: 1,
                memory_bytes: GI,
                disk_bytes: 2 * GI,
            },
            ..Request::default()
        }
    }

    #[test]
    fn no_agents_is_unschedulable_with_a_plain_message() {
        let err = plan_placement(&small(), &[]).unwrap_err();
        assert_eq!(err.to_string(), "no node agents are registered");
    }

    #[test]
    fn every_rejection_is_named_per_node() {
        let mut down = node("a-down");
        down.ready = false;
        let mut novmm = node("b-novmm");
        novmm.vmm = None;
        let mut full = node("c-full");
        full.free.memory_bytes = GI / 2;
        let mut zone = node("d-zone");
        zone.labels.insert("zone".into(), "west".into());
        let selector = BTreeMap::from([("zone".to_string(), "east".to_string())]);
        let mut req = small();
        req.node_selector = Some(&selector);
        // c-full matches the selector so memory is the reason given.
        full.labels.insert("zone".into(), "east".into());
        novmm.labels.insert("zone".into(), "east".into());
        let err = plan_placement(&req, &[zone, full, novmm, down]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/4 nodes fit: a-down: node agent not ready; b-novmm: no VMM on the node; \
             c-full: not enough memory (need 1Gi, free 512Mi); d-zone: nodeSelector zone does not match"
        );
    }

    #[test]
    fn reservations_of_placed_capsules_count_against_free_capacity() {
        let mut a = node("a");
        a.free.vcpus = 2;
        a.reserved.vcpus = 2;
        let err = plan_placement(&small(), &[a.clone()]).unwrap_err();
        assert_eq!(
            err.reasons,
            vec![(
                "a".to_string(),
                Rejection::Insufficient {
                    what: "vcpus",
                    need: 1,
                    free: 0
                }
            )]
        );
        a.reserved.vcpus = 1;
        assert_eq!(plan_placement(&small(), &[a]).unwrap(), "a");
    }

    #[test]
    fn least_allocated_node_wins() {
        let mut busy = node("busy");
        busy.free.vcpus = 4;
        busy.free.memory_bytes = 8 * GI;
        let idle = node("idle");
        assert_eq!(plan_placement(&small(), &[busy, idle]).unwrap(), "idle");
    }

    #[test]
    fn spread_breaks_near_ties_toward_fewer_capsules() {
        let mut crowded = node("crowded");
        crowded.capsules = 10;
        let empty = node("empty");
        assert_eq!(
            plan_placement(&small(), &[crowded.clone(), empty.clone()]).unwrap(),
            "empty"
        );
        // Order of the input does not matter.
        assert_eq!(
            plan_placement(&small(), &[empty, crowded]).unwrap(),
            "empty"
        );
    }

    #[test]
    fn a_node_caching_the_template_is_preferred() {
        let mut cached = node("cached");
        cached.templates.insert("ns/base@sha256:abc".into());
        cached.free.vcpus = 12; // somewhat busier, still preferred
        let cold = node("cold");
        let mut req = small();
        req.template = Some(TemplateNeed {
            key_prefix: "ns/base@",
            preparable: true,
        });
        assert_eq!(plan_placement(&req, &[cold, cached]).unwrap(), "cached");
    }

    #[test]
    fn unpreparable_template_only_lands_where_it_is_held() {
        let mut holder = node("holder");
        holder.templates.insert("ns/warm@".into());
        let other = node("other");
        let mut req = small();
        req.template = Some(TemplateNeed {
            key_prefix: "ns/warm@",
            preparable: false,
        });
        assert_eq!(
            plan_placement(&req, &[other.clone(), holder]).unwrap(),
            "holder"
        );
        let err = plan_placement(&req, &[other]).unwrap_err();
        assert_eq!(err.reasons[0].1, Rejection::TemplateUnavailable);
    }

    #[test]
    fn snapshot_pins_the_capsule_to_its_node() {
        let mut holder = node("holder");
        holder.snapshots.insert("snap-uid".into());
        let mut bigger = node("bigger");
        bigger.capacity.vcpus = 64;
        bigger.free.vcpus = 64;
        let mut req = small();
        req.snapshot = Some(SnapshotNeed {
            node: "holder",
            id: "snap-uid",
        });
        assert_eq!(
            plan_placement(&req, &[bigger.clone(), holder.clone()]).unwrap(),
            "holder"
        );
        holder.snapshots.clear();
        let err = plan_placement(&req, &[bigger, holder]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes fit: bigger: snapshot is on node holder; holder: snapshot files missing on the node"
        );
    }

    #[test]
    fn warm_capsules_land_only_where_the_warm_snapshot_is_built() {
        let mut built = node("built");
        built.snapshots.insert("w-t-1".into());
        let mut roomier = node("roomier");
        roomier.free.vcpus = 64;
        let mut req = small();
        req.warm = Some("w-t-1");
        assert_eq!(
            plan_placement(&req, &[roomier.clone(), built.clone()]).unwrap(),
            "built"
        );
        built.snapshots.clear();
        let err = plan_placement(&req, &[roomier, built]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes fit: built: the template's warm snapshot is not built on the node yet; \
             roomier: the template's warm snapshot is not built on the node yet"
        );
    }

    #[test]
    fn the_templates_node_selector_limits_its_capsules() {
        let mut gpu = node("gpu");
        gpu.labels.insert("pool".into(), "gpu".into());
        let plain = node("plain");
        let selector = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let mut req = small();
        req.template_selector = Some(&selector);
        assert_eq!(plan_placement(&req, &[plain.clone(), gpu]).unwrap(), "gpu");
        let err = plan_placement(&req, &[plain]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes fit: plain: the template's nodeSelector pool does not match"
        );
    }

    #[test]
    fn disk_is_checked_too() {
        let mut a = node("a");
        a.free.disk_bytes = GI;
        let err = plan_placement(&small(), &[a]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes fit: a: not enough disk (need 2Gi, free 1Gi)"
        );
    }

    #[test]
    fn a_node_over_its_disk_quota_is_refused_with_the_reason() {
        let mut full = node("full");
        full.disk_quota = DiskQuota {
            quota: 100 * GI,
            used: 100 * GI,
        };
        let mut roomy = node("roomy");
        roomy.free.vcpus = 2; // busier, yet the only fit
        roomy.disk_quota = DiskQuota {
            quota: 100 * GI,
            used: 99 * GI,
        };
        assert_eq!(
            plan_placement(&small(), &[full.clone(), roomy]).unwrap(),
            "roomy"
        );
        let err = plan_placement(&small(), &[full.clone()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes fit: full: DiskQuotaExceeded: images, snapshots and suspend images \
             hold 100Gi of the node's 100Gi quota"
        );
        // No quota reported (an older agent): no refusal.
        full.disk_quota.quota = 0;
        assert_eq!(plan_placement(&small(), &[full]).unwrap(), "full");
    }
}
