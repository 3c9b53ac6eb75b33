//! What a CapsuleTemplate means on a node, as pure functions: its key and
//! root-disk source in `agent.proto` terms, the id and build request of its
//! warm snapshot, and its status from what each node reported.
//!
//! The warm snapshot id is derived from everything that shapes the
//! snapshot (source, kernel, defaults, warm spec), so an edited template
//! gets a new snapshot and capsules never restore a stale one; ids of the
//! same template share a prefix, so stale ones can be found and removed.

use std::collections::BTreeMap;
use std::time::Duration;

use wrenn_crds::CapsuleTemplate;
use wrenn_crds::reason::Reason;
use wrenn_crds::template::{CapsuleTemplateStatus, TemplateNode, TemplatePhase};
use wrenn_proto::agent::v1 as pb;

use crate::plan::ConditionDraft;
use crate::resources::{self, Resources};

/// Key prefix of a template on nodes: `namespace/name@`.
pub fn key_prefix(ns: &str, name: &str) -> String {
    format!("{ns}/{name}@")
}

/// The template's key on nodes. The UID keeps a template re-created under
/// the same name from reusing the old one's disk.
pub fn template_key(ns: &str, name: &str, uid: &str) -> String {
    format!("{}{uid}", key_prefix(ns, name))
}

/// Where the root disk comes from; `None` for a template that restores a
/// CapsuleSnapshot (it has no disk of its own).
pub fn disk_source(tpl: &CapsuleTemplate) -> Option<pb::template_disk::Disk> {
    use pb::template_disk::Disk;
    let s = &tpl.spec.source;
    if let Some(i) = &s.image {
        return Some(Disk::OciReference(i.reference.clone()));
    }
    let r = s.rootfs.as_ref()?;
    r.path
        .clone()
        .map(Disk::RootfsPath)
        .or_else(|| r.url.clone().map(Disk::RootfsUrl))
}

/// A template's kernel override as the agent takes it; empty fields for
/// the agent's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel image in the node's image directory.
    pub path: String,
    /// Extra command line (allow-listed keys only).
    pub cmdline: String,
}

/// The template's kernel override.
pub fn kernel(tpl: &CapsuleTemplate) -> Kernel {
    tpl.spec
        .kernel
        .as_ref()
        .map(|k| Kernel {
            path: k.path.clone(),
            cmdline: k.cmdline.clone().unwrap_or_default(),
        })
        .unwrap_or_default()
}

/// FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Prefix shared by every warm snapshot id of the template with this UID.
pub fn warm_id_prefix(uid: &str) -> String {
    format!("w-{uid}-")
}

/// The warm snapshot's id (at most 55 characters of `a-z0-9-`, within the
/// agent's 63), or `None` when the template is not warm.
pub fn warm_snapshot_id(tpl: &CapsuleTemplate, uid: &str) -> Option<String> {
    let warm = tpl.spec.warm.as_ref()?;
    let shape = serde_json::json!([tpl.spec.source, tpl.spec.kernel, tpl.spec.defaults, warm]);
    let hash = fnv64(shape.to_string().as_bytes());
    Some(format!(
        "{}{hash:016x}",
        warm_id_prefix(&uid.to_ascii_lowercase())
    ))
}

/// The readiness timeout the agent gets; the CRD's default is 5m.
fn readiness_timeout(text: Option<&str>) -> Result<Duration, resources::Error> {
    match text {
        Some(t) => resources::parse_duration("readiness.timeout", t),
        None => Ok(Duration::from_secs(300)),
    }
}

/// The request that makes `tpl` ready on a node: its disk, and for a warm
/// template the build of snapshot `warm_id` at the template's default shape.
pub fn prepare_request(
    tpl: &CapsuleTemplate,
    key: &str,
    shape: Resources,
    warm_id: Option<&str>,
) -> Result<Option<pb::PrepareTemplateRequest>, resources::Error> {
    let Some(disk) = disk_source(tpl) else {
        return Ok(None);
    };
    let digest = tpl
        .status
        .as_ref()
        .and_then(|s| s.digest.clone())
        .unwrap_or_default();
    let warm = match (&tpl.spec.warm, warm_id) {
        (Some(w), Some(id)) => {
            let timeout = readiness_timeout(w.readiness.timeout.as_deref())?;
            use pb::warm_build::Readiness;
            let readiness = match (&w.readiness.exec, w.readiness.tcp_port) {
                (Some(argv), _) => Some(Readiness::Exec(pb::ExecProbe { argv: argv.clone() })),
                (None, Some(port)) => Some(Readiness::TcpPort(port.into())),
                (None, None) => None,
            };
            Some(pb::WarmBuild {
                snapshot_id: id.to_string(),
                resources: Some(shape.into()),
                env: Default::default(),
                start_command: w.start_command.clone(),
                readiness,
                timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            })
        }
        _ => None,
    };
    let Kernel {
        path: kernel_path,
        cmdline: kernel_cmdline,
    } = kernel(tpl);
    Ok(Some(pb::PrepareTemplateRequest {
        disk: Some(pb::TemplateDisk {
            key: key.to_string(),
            disk: Some(disk),
            digest,
            disk_bytes: shape.disk_bytes,
        }),
        warm,
        kernel_path,
        kernel_cmdline,
        retry: false,
        // The controller adds the pull Secret's, for each call.
        registry_credentials: None,
    }))
}

/// Whether `labels` carry every pair of `selector`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The template on one node, as the operator learnt it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnNode {
    /// Not prepared ahead of time (on demand), and not held.
    Absent,
    /// The agent is preparing it; what it is doing.
    Preparing(String),
    /// The root disk (and, when warm, its snapshot) is there.
    Ready {
        /// Digest of the disk's source.
        digest: String,
        /// The warm snapshot is there.
        snapshot: bool,
    },
    /// Preparation failed: reason and message from the agent, or why the
    /// agent could not be asked.
    Failed(Reason, String),
}

/// The status from each node's state. `warm` tells whether readiness
/// means the warm snapshot; `snapshot_ready` is `Some` for a template that
/// restores a CapsuleSnapshot.
pub fn build_template_status(
    nodes: &[(String, OnNode)],
    warm: bool,
    snapshot_ready: Option<bool>,
) -> (CapsuleTemplateStatus, ConditionDraft) {
    let rows: Vec<TemplateNode> = nodes
        .iter()
        .map(|(name, on)| {
            let (ready, digest, snapshot_ready, message) = match on {
                OnNode::Absent => (false, None, false, None),
                OnNode::Preparing(m) => (false, None, false, Some(format!("preparing: {m}"))),
                OnNode::Ready { digest, snapshot } => (
                    !warm || *snapshot,
                    Some(digest.clone()).filter(|d| !d.is_empty()),
                    *snapshot,
                    None,
                ),
                OnNode::Failed(r, m) => (false, None, false, Some(format!("{r}: {m}"))),
            };
            TemplateNode {
                name: name.clone(),
                ready,
                digest,
                snapshot_ready,
                message,
            }
        })
        .collect();
    let ready = rows.iter().filter(|n| n.ready).count();
    let preparing = nodes
        .iter()
        .filter(|(_, o)| matches!(o, OnNode::Preparing(_)))
        .count();
    let failed: Vec<String> = nodes
        .iter()
        .filter_map(|(n, o)| match o {
            OnNode::Failed(r, m) => Some(format!("{n}: {r}: {m}")),
            _ => None,
        })
        .collect();
    let total = rows.len();
    let failures = if failed.is_empty() {
        String::new()
    } else {
        format!("; failed on {}", failed.join("; "))
    };
    let digest = rows.iter().find_map(|n| n.digest.clone());
    let (phase, ok, why, msg) = match snapshot_ready {
        Some(true) => (
            TemplatePhase::Ready,
            true,
            Reason::SnapshotTaken,
            "restores its snapshot".to_string(),
        ),
        Some(false) => (
            TemplatePhase::Pending,
            false,
            Reason::SnapshotNotReady,
            "its CapsuleSnapshot is not Ready".to_string(),
        ),
        None if total == 0 => (
            TemplatePhase::Pending,
            false,
            Reason::NoNodes,
            "no node agent is ready on a matching node".to_string(),
        ),
        None if ready > 0 && warm => (
            TemplatePhase::Ready,
            true,
            Reason::WarmSnapshotReady,
            format!("warm snapshot on {ready}/{total} nodes{failures}"),
        ),
        None if ready > 0 => (
            TemplatePhase::Ready,
            true,
            Reason::TemplateCached,
            format!("root disk on {ready}/{total} nodes{failures}"),
        ),
        None if preparing > 0 => (
            TemplatePhase::Preparing,
            false,
            Reason::Preparing,
            format!(
                "{} on {preparing}/{total} nodes{failures}",
                if warm {
                    "building the warm snapshot"
                } else {
                    "preparing the root disk"
                }
            ),
        ),
        None if failed.len() == total => (
            TemplatePhase::Failed,
            false,
            failed_reason(nodes),
            format!("failed on every node: {}", failed.join("; ")),
        ),
        None => (
            TemplatePhase::Ready,
            true,
            Reason::PreparedOnDemand,
            format!(
                "prepared on a node when a capsule first needs it ({total} nodes ready){failures}"
            ),
        ),
    };
    (
        CapsuleTemplateStatus {
            phase: Some(phase),
            digest,
            nodes: rows,
            ..Default::default()
        },
        ConditionDraft::new(wrenn_crds::reason::ConditionType::Ready, ok, why, msg),
    )
}

/// Reasons an agent gives for an image its registry refused: when every
/// node failed for the same one, it is the template's reason, since the
/// fix (credentials, reference, waiting) is the template's, not a node's.
const REGISTRY_REASONS: [Reason; 4] = [
    Reason::RegistryUnauthorized,
    Reason::ImageNotFound,
    Reason::RegistryRateLimited,
    Reason::RegistryFailed,
];

/// The reason of a template that failed on every node: the registry's
/// refusal when all nodes share it, else [`Reason::PreparationFailed`].
fn failed_reason(nodes: &[(String, OnNode)]) -> Reason {
    let mut reasons = nodes.iter().filter_map(|(_, o)| match o {
        OnNode::Failed(r, _) => Some(*r),
        _ => None,
    });
    match reasons.next() {
        Some(first) if REGISTRY_REASONS.contains(&first) && reasons.all(|r| r == first) => first,
        _ => Reason::PreparationFailed,
    }
}

/// The status of a template no node is asked about: its pull Secret is
/// absent, forbidden or unusable (`reason`, `message`).
pub fn build_blocked_status(
    reason: Reason,
    message: String,
) -> (CapsuleTemplateStatus, ConditionDraft) {
    (
        CapsuleTemplateStatus {
            phase: Some(TemplatePhase::Failed),
            ..Default::default()
        },
        ConditionDraft::new(
            wrenn_crds::reason::ConditionType::Ready,
            false,
            reason,
            message,
        ),
    )
}

/// What an agent answered, as [`OnNode`].
pub fn on_node(state: &pb::TemplateState) -> OnNode {
    match pb::TemplatePhase::try_from(state.phase) {
        Ok(pb::TemplatePhase::Ready) => OnNode::Ready {
            digest: state.digest.clone(),
            snapshot: !state.snapshot_id.is_empty(),
        },
        Ok(pb::TemplatePhase::Failed) => match state.reason.parse::<Reason>() {
            Ok(reason) => OnNode::Failed(reason, state.message.clone()),
            // No reason, or one from an agent newer than this operator:
            // its spelling stays readable in the message.
            Err(_) if state.reason.is_empty() => {
                OnNode::Failed(Reason::NodeError, state.message.clone())
            }
            Err(_) => OnNode::Failed(
                Reason::NodeError,
                format!("{}: {}", state.reason, state.message),
            ),
        },
        _ => OnNode::Preparing(if state.message.is_empty() {
            "started".into()
        } else {
            state.message.clone()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_crds::template::{CapsuleTemplateSpec, Readiness, RootfsSource, WarmSpec};

    fn tpl(warm: bool) -> CapsuleTemplate {
        let mut spec = CapsuleTemplateSpec::default();
        spec.source.rootfs = Some(RootfsSource {
            url: None,
            path: Some("/srv/root.ext4".into()),
        });
        if warm {
            spec.warm = Some(WarmSpec {
                start_command: vec!["httpd".into(), "-f".into()],
                readiness: Readiness {
                    exec: None,
                    tcp_port: Some(8080),
                    timeout: Some("2m".into()),
                },
            });
        }
        CapsuleTemplate::new("web", spec)
    }

    fn ready(snapshot: bool) -> OnNode {
        OnNode::Ready {
            digest: "sha256:1".into(),
            snapshot,
        }
    }

    #[test]
    fn warm_ids_fit_the_agent_and_change_with_the_spec() {
        let uid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let a = warm_snapshot_id(&tpl(true), uid).unwrap();
        assert!(a.len() <= 63, "{a}");
        assert!(a.starts_with(&warm_id_prefix(uid)));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_eq!(warm_snapshot_id(&tpl(true), uid).unwrap(), a, "stable");
        let mut edited = tpl(true);
        edited.spec.warm.as_mut().unwrap().start_command[0] = "nginx".into();
        assert_ne!(warm_snapshot_id(&edited, uid).unwrap(), a);
        let mut bigger = tpl(true);
        bigger.spec.defaults.vcpus = 2;
        assert_ne!(warm_snapshot_id(&bigger, uid).unwrap(), a);
        assert_eq!(warm_snapshot_id(&tpl(false), uid), None);
    }

    #[test]
    fn the_prepare_request_carries_disk_shape_and_warm_build() {
        let shape = Resources {
            vcpus: 2,
            memory_bytes: 1 << 30,
            disk_bytes: 4 << 30,
        };
        let req = prepare_request(&tpl(true), "ns/web@u", shape, Some("w-u-1"))
            .unwrap()
            .unwrap();
        let disk = req.disk.unwrap();
        assert_eq!(disk.key, "ns/web@u");
        assert_eq!(
            disk.disk,
            Some(pb::template_disk::Disk::RootfsPath("/srv/root.ext4".into()))
        );
        assert_eq!(disk.disk_bytes, 4 << 30);
        let warm = req.warm.unwrap();
        assert_eq!(warm.snapshot_id, "w-u-1");
        assert_eq!(warm.timeout_seconds, 120);
        assert_eq!(
            warm.readiness,
            Some(pb::warm_build::Readiness::TcpPort(8080))
        );
        assert_eq!(warm.resources.unwrap().vcpus, 2);
        let cold = prepare_request(&tpl(false), "k", shape, None)
            .unwrap()
            .unwrap();
        assert!(cold.warm.is_none());
    }

    #[test]
    fn a_warm_template_is_ready_only_where_its_snapshot_is() {
        let nodes = vec![
            ("a".to_string(), ready(false)),
            ("b".to_string(), OnNode::Preparing("booting".into())),
        ];
        let (s, c) = build_template_status(&nodes, true, None);
        assert_eq!(s.phase, Some(TemplatePhase::Preparing));
        assert_eq!(c.reason, Reason::Preparing);
        assert!(!s.nodes[0].ready && !s.nodes[0].snapshot_ready);
        assert_eq!(s.nodes[1].message.as_deref(), Some("preparing: booting"));
        let nodes = vec![
            ("a".to_string(), ready(true)),
            (
                "b".to_string(),
                OnNode::Failed(Reason::ReadinessTimeout, "port 8080 closed after 2m".into()),
            ),
        ];
        let (s, c) = build_template_status(&nodes, true, None);
        assert_eq!(s.phase, Some(TemplatePhase::Ready));
        assert_eq!(c.reason, Reason::WarmSnapshotReady);
        assert_eq!(
            c.message,
            "warm snapshot on 1/2 nodes; failed on b: ReadinessTimeout: port 8080 closed after 2m"
        );
        assert!(s.nodes[0].snapshot_ready && s.nodes[0].ready);
    }

    #[test]
    fn failing_everywhere_fails_the_template_naming_each_node() {
        let nodes = vec![
            (
                "a".to_string(),
                OnNode::Failed(Reason::RootDiskFailed, "no such file".into()),
            ),
            (
                "b".to_string(),
                OnNode::Failed(Reason::RootDiskFailed, "no such file".into()),
            ),
        ];
        let (s, c) = build_template_status(&nodes, false, None);
        assert_eq!(s.phase, Some(TemplatePhase::Failed));
        assert_eq!(c.status, wrenn_crds::reason::ConditionStatus::False);
        assert_eq!(
            c.message,
            "failed on every node: a: RootDiskFailed: no such file; b: RootDiskFailed: no such file"
        );
    }

    #[test]
    fn a_registry_refusal_on_every_node_is_the_templates_reason() {
        let refused = |r: Reason| OnNode::Failed(r, "pull x: HTTP 429: slow down".into());
        for reason in REGISTRY_REASONS {
            let nodes = vec![
                ("a".to_string(), refused(reason)),
                ("b".to_string(), refused(reason)),
            ];
            let (s, c) = build_template_status(&nodes, false, None);
            assert_eq!(s.phase, Some(TemplatePhase::Failed));
            assert_eq!(c.reason, reason);
            assert!(
                c.message.contains("a: ") && c.message.contains("slow down"),
                "{}",
                c.message
            );
        }
        let mixed = vec![
            ("a".to_string(), refused(Reason::RegistryUnauthorized)),
            ("b".to_string(), refused(Reason::RegistryRateLimited)),
        ];
        assert_eq!(
            build_template_status(&mixed, false, None).1.reason,
            Reason::PreparationFailed
        );
        let (s, c) = build_blocked_status(Reason::PullSecretForbidden, "grant it".into());
        assert_eq!(
            (s.phase, c.reason),
            (Some(TemplatePhase::Failed), Reason::PullSecretForbidden)
        );
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn on_demand_and_cached_and_snapshot_templates() {
        let nodes = vec![
            ("a".to_string(), ready(false)),
            ("b".to_string(), OnNode::Absent),
        ];
        let (s, c) = build_template_status(&nodes, false, None);
        assert_eq!(
            (s.phase, c.reason),
            (Some(TemplatePhase::Ready), Reason::TemplateCached)
        );
        assert_eq!(c.message, "root disk on 1/2 nodes");
        assert_eq!(s.digest.as_deref(), Some("sha256:1"));
        let nodes = vec![("b".to_string(), OnNode::Absent)];
        assert_eq!(
            build_template_status(&nodes, false, None).1.reason,
            Reason::PreparedOnDemand
        );
        assert_eq!(
            build_template_status(&[], false, None).0.phase,
            Some(TemplatePhase::Pending)
        );
        assert_eq!(
            build_template_status(&nodes, false, Some(false)).0.phase,
            Some(TemplatePhase::Pending)
        );
        assert_eq!(
            build_template_status(&nodes, false, Some(true)).0.phase,
            Some(TemplatePhase::Ready)
        );
    }

    #[test]
    fn agent_answers_map_to_node_states() {
        let st = pb::TemplateState {
            phase: pb::TemplatePhase::Ready as i32,
            digest: "sha256:2".into(),
            snapshot_id: "w-x-1".into(),
            ..Default::default()
        };
        assert_eq!(
            on_node(&st),
            OnNode::Ready {
                digest: "sha256:2".into(),
                snapshot: true
            }
        );
        let st = pb::TemplateState {
            phase: pb::TemplatePhase::Failed as i32,
            reason: "StartFailed".into(),
            message: "exec: no such file".into(),
            ..Default::default()
        };
        assert_eq!(
            on_node(&st),
            OnNode::Failed(Reason::StartFailed, "exec: no such file".into())
        );
        let newer = pb::TemplateState {
            reason: "FromANewerAgent".into(),
            ..st
        };
        assert_eq!(
            on_node(&newer),
            OnNode::Failed(
                Reason::NodeError,
                "FromANewerAgent: exec: no such file".into()
            ),
            "an unknown reason is kept readable, never dropped"
        );
    }
}
