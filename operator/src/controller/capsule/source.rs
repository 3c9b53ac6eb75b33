//! Where a capsule boots from: resolve (read the template or snapshot its
//! spec names), validate (pure: resources, warm shape, readiness) into a
//! [`Source`], and the node agent's view of the spec built from it.

use std::collections::BTreeMap;

use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use wrenn_crds::reason::{ConditionType, Reason, find_condition};
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::template::{TemplateDefaults, TemplatePhase};
use wrenn_crds::{Capsule, CapsuleSnapshot, CapsuleTemplate};
use wrenn_proto::agent::v1 as pb;

use super::Error;
use crate::controller::Context;
use crate::peers::Cluster;
use crate::placement::{Request, SnapshotNeed, TemplateNeed};
use crate::plan::SourceState;
use crate::resources::{Resources, effective, format_bytes};
use crate::templates;

/// What a node must hold, or be able to make, for the capsule to boot there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Need {
    /// A template's root disk.
    Template {
        /// Key prefix shared by every digest of the template.
        key_prefix: String,
        /// Any node can prepare it on demand; false for a private image,
        /// whose credentials go with the template's own preparation only.
        preparable: bool,
    },
    /// A warm template's snapshot: any node holding it will do.
    Warm {
        /// Snapshot id.
        id: String,
    },
    /// A CapsuleSnapshot's files, which live on one node.
    Snapshot {
        /// The node holding them.
        node: String,
        /// Snapshot id.
        id: String,
    },
    /// Nothing (the source is blocked).
    Nothing,
}

/// Where a capsule boots from, resolved and validated.
#[derive(Clone, Debug)]
pub(super) struct Source {
    pub(super) state: SourceState,
    pub(super) resources: Resources,
    pub(super) boot: Option<pb::BootSource>,
    pub(super) need: Need,
    /// The template's own nodeSelector.
    pub(super) template_selector: BTreeMap<String, String>,
    pub(super) kernel: templates::Kernel,
}

impl Source {
    pub(super) fn blocked(why: Reason, message: String) -> Self {
        Self {
            state: SourceState::Blocked(why, message),
            resources: Resources::default(),
            boot: None,
            need: Need::Nothing,
            template_selector: BTreeMap::new(),
            kernel: templates::Kernel::default(),
        }
    }

    /// Boots from the snapshot with this id.
    pub(super) fn snapshot(
        resources: Resources,
        id: &str,
        need: Need,
        selector: BTreeMap<String, String>,
    ) -> Self {
        Self {
            state: SourceState::Usable,
            resources,
            boot: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
                    id: id.to_string(),
                })),
            }),
            need,
            template_selector: selector,
            kernel: templates::Kernel::default(),
        }
    }

    /// What placement is asked for.
    pub(super) fn request<'a>(&'a self, cap: &'a Capsule) -> Request<'a> {
        Request {
            resources: self.resources,
            node_selector: Some(&cap.spec.node_selector),
            template: match &self.need {
                Need::Template {
                    key_prefix,
                    preparable,
                } => Some(TemplateNeed {
                    key_prefix,
                    preparable: *preparable,
                }),
                _ => None,
            },
            template_selector: Some(&self.template_selector),
            warm: match &self.need {
                Need::Warm { id } => Some(id),
                _ => None,
            },
            snapshot: match &self.need {
                Need::Snapshot { node, id } => Some(SnapshotNeed { node, id }),
                _ => None,
            },
        }
    }
}

/// The object the capsule's source names, as read from the API server
/// (`None`: it does not exist).
pub(super) enum Fetched {
    Template(String, Option<CapsuleTemplate>),
    Snapshot(String, Option<CapsuleSnapshot>),
    Neither,
}

/// Resolve: reads the template or snapshot the spec names.
#[tracing::instrument(name = "capsule.resolve", skip_all)]
pub(super) async fn fetch_source(cap: &Capsule, ns: &str, ctx: &Context) -> Result<Fetched, Error> {
    // The watched copy is enough: every change of the object reaches the
    // store before it triggers this capsule again. One not (yet) in the
    // store is read from the API server, which has the last word on absence.
    let src = &cap.spec.source;
    if let Some(t) = &src.template_ref {
        let tpl = match ctx.templates.get(&ObjectRef::new(&t.name).within(ns)) {
            Some(tpl) => Some((*tpl).clone()),
            None => get_opt(ctx, ns, "CapsuleTemplate", &t.name).await?,
        };
        return Ok(Fetched::Template(t.name.clone(), tpl));
    }
    if let Some(s) = &src.snapshot_ref {
        let snap = match ctx.snapshots.get(&ObjectRef::new(&s.name).within(ns)) {
            Some(snap) => Some((*snap).clone()),
            None => get_opt(ctx, ns, "CapsuleSnapshot", &s.name).await?,
        };
        return Ok(Fetched::Snapshot(s.name.clone(), snap));
    }
    Ok(Fetched::Neither)
}

/// One object of the capsule's namespace, `None` when absent.
pub(super) async fn get_opt<K>(
    ctx: &Context,
    ns: &str,
    kind: &'static str,
    name: &str,
) -> Result<Option<K>, Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name).await.map_err(|source| Error::Get {
        kind,
        name: name.to_string(),
        source,
    })
}

/// A referenced object without a UID (never from the API server).
#[derive(Debug)]
pub(super) struct NoUid;

/// Validate: what the capsule boots from, or why it cannot yet. Pure.
pub(super) fn validate_source(cap: &Capsule, ns: &str, fetched: Fetched) -> Result<Source, NoUid> {
    match fetched {
        Fetched::Template(name, tpl) => validate_template(cap, ns, &name, tpl),
        Fetched::Snapshot(name, snap) => Ok(validate_snapshot(cap, &name, snap)),
        Fetched::Neither => Ok(Source::blocked(Reason::InvalidSpec, "no source".into())),
    }
}

pub(super) fn validate_template(
    cap: &Capsule,
    ns: &str,
    name: &str,
    tpl: Option<CapsuleTemplate>,
) -> Result<Source, NoUid> {
    let Some(tpl) = tpl else {
        return Ok(Source::blocked(
            Reason::TemplateNotFound,
            format!("CapsuleTemplate {name} not found in namespace {ns}"),
        ));
    };
    let st = tpl.status.as_ref();
    if st.and_then(|s| s.phase) == Some(TemplatePhase::Failed) {
        return Ok(Source::blocked(
            Reason::TemplateNotFound,
            format!("CapsuleTemplate {name} failed to prepare"),
        ));
    }
    let resources = match effective(cap.spec.resources.as_ref(), &tpl.spec.defaults) {
        Ok(r) => r,
        Err(e) => return Ok(Source::blocked(Reason::InvalidSpec, e.to_string())),
    };
    let Some(disk) = templates::disk_source(&tpl) else {
        return Ok(Source::blocked(
            Reason::InvalidSpec,
            format!("CapsuleTemplate {name} restores a snapshot; use snapshotRef on the capsule"),
        ));
    };
    let tpl_uid = tpl.uid().ok_or(NoUid)?;
    let selector = tpl.spec.node_selector.clone();
    let Some(id) = templates::warm_snapshot_id(&tpl, &tpl_uid) else {
        return Ok(Source {
            state: SourceState::Usable,
            resources,
            boot: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: templates::template_key(ns, name, &tpl_uid),
                    disk: Some(disk),
                    digest: st.and_then(|s| s.digest.clone()).unwrap_or_default(),
                    disk_bytes: resources.disk_bytes,
                })),
            }),
            need: Need::Template {
                key_prefix: templates::key_prefix(ns, name),
                preparable: tpl.spec.pull_secret().is_none(),
            },
            template_selector: selector,
            kernel: templates::kernel(&tpl),
        });
    };
    if st.and_then(|s| s.phase) != Some(TemplatePhase::Ready) {
        let why = st
            .and_then(|s| find_condition(&s.conditions, ConditionType::Ready))
            .map(|c| format!(": {}", c.message))
            .unwrap_or_default();
        return Ok(Source::blocked(
            Reason::WarmSnapshotNotReady,
            format!("CapsuleTemplate {name} has no warm snapshot yet{why}"),
        ));
    }
    // A warm template's capsules restore its snapshot, whose memory fixes
    // vCPUs and memory; booting cold instead would silently skip the
    // startCommand the user asked for.
    let shape = match effective(None, &tpl.spec.defaults) {
        Ok(r) => r,
        Err(e) => return Ok(Source::blocked(Reason::InvalidSpec, e.to_string())),
    };
    if (resources.vcpus, resources.memory_bytes) != (shape.vcpus, shape.memory_bytes) {
        return Ok(Source::blocked(
            Reason::InvalidSpec,
            format!(
                "CapsuleTemplate {name} is warm: its capsules restore a snapshot taken with {} vCPUs and {} of memory; leave spec.resources.vcpus and memory unset or equal",
                shape.vcpus,
                format_bytes(shape.memory_bytes)
            ),
        ));
    }
    Ok(Source::snapshot(
        resources,
        &id,
        Need::Warm { id: id.clone() },
        selector,
    ))
}

pub(super) fn validate_snapshot(
    cap: &Capsule,
    name: &str,
    snap: Option<CapsuleSnapshot>,
) -> Source {
    let ready = snap.as_ref().and_then(|snap| {
        let st = snap.status.as_ref()?;
        (st.phase == Some(SnapshotPhase::Ready))
            .then(|| (snap.uid(), st.node_name.clone(), st.compatibility.clone()))
    });
    let Some((Some(id), Some(node), compat)) = ready else {
        return Source::blocked(
            Reason::SnapshotNotReady,
            format!("CapsuleSnapshot {name} is not Ready"),
        );
    };
    let compat = compat.unwrap_or_default();
    let defaults = TemplateDefaults {
        vcpus: compat.vcpus.max(1),
        memory: compat
            .memory
            .unwrap_or_else(|| TemplateDefaults::default().memory),
        ..TemplateDefaults::default()
    };
    match effective(cap.spec.resources.as_ref(), &defaults) {
        Ok(resources) => Source::snapshot(
            resources,
            &id,
            Need::Snapshot {
                node,
                id: id.clone(),
            },
            BTreeMap::new(),
        ),
        Err(e) => Source::blocked(Reason::InvalidSpec, e.to_string()),
    }
}
/// `spec.network` as the agent takes it: DENY with `allowCidrs` reaches
/// exactly those CIDRs, and `allowHosts` the addresses those names
/// resolve to; a port's `from` selectors are the addresses of the Pods
/// they choose in `cluster` now.
pub(super) fn to_proto_network(cap: &Capsule, cluster: Cluster<'_>) -> pb::NetworkPolicy {
    let net = cap.spec.network.clone().unwrap_or_default();
    let ns = cap.namespace().unwrap_or_default();
    pb::NetworkPolicy {
        egress: match net.egress {
            wrenn_crds::capsule::Egress::Allow => pb::Egress::Allow as i32,
            wrenn_crds::capsule::Egress::Deny => pb::Egress::Deny as i32,
        },
        allow_cidrs: net.allow_cidrs.clone(),
        dns: net.dns.as_ref().map(|d| pb::DnsConfig {
            nameservers: d.nameservers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
            block_under_deny: d.block_under_deny,
        }),
        allow_hosts: net.allow_hosts.clone(),
        ports: net
            .ports
            .iter()
            .map(|p| pb::Port {
                port: p.port.into(),
                protocol: format!("{:?}", p.protocol),
                from_cidrs: crate::peers::resolve(&ns, &p.from, cluster),
            })
            .collect(),
    }
}

pub(super) fn to_proto_spec(
    cap: &Capsule,
    ns: &str,
    src: &Source,
    network: pb::NetworkPolicy,
) -> pb::CapsuleSpec {
    pb::CapsuleSpec {
        namespace: ns.to_string(),
        name: cap.name_any(),
        source: src.boot.clone(),
        resources: Some(src.resources.into()),
        kernel_path: src.kernel.path.clone(),
        kernel_cmdline: src.kernel.cmdline.clone(),
        env: cap
            .spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        network: Some(network),
    }
}

pub(super) fn proto_state(mode: wrenn_crds::capsule::OperatingMode) -> i32 {
    use wrenn_crds::capsule::OperatingMode as M;
    match mode {
        M::Running => pb::CapsuleState::Running as i32,
        M::Paused => pb::CapsuleState::Paused as i32,
        M::Suspended => pb::CapsuleState::Suspended as i32,
    }
}
