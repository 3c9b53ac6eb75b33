//! Conversions between `wrenn.agent.v1` messages and the supervisor's
//! domain types, with validation at the edge, and the one mapping of
//! supervisor errors to gRPC status codes.
//!
//! Requests name root disks, kernels and local images relative to the node
//! admin's image directories; `from_create` and `from_prepare` resolve
//! them through [`ImageDirs`] (blocking: a few `openat2`s), so the domain
//! only ever holds paths inside those directories, and refuse a template's
//! kernel command line outside the allow-list (`capsule::cmdline`). All
//! else here is pure.
//!
//! Why this file is long: it is the one edge between the wire and the
//! domain, a pair of small functions per message, kept together so that
//! every field's validation can be read in one place (tests are in
//! `convert/tests.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use tonic::Status;
use wrenn_proto::agent::v1 as pb;

use crate::capsule::cmdline;
use crate::capsule::{
    BootSource, CapsuleSpec, CapsuleView, Egress, Error, Event, EventKind, ImageTemplate, PortRule,
    PrepareRequest, Readiness, Resources, SnapshotInfo, State, TemplateDisk, TemplatePhase,
    TemplateSource, TemplateStatus, WarmSpec,
};
use crate::images::ImageSource;
use crate::images::dirs::{self, ImageDirs, Use};
use crate::network::Names;
use crate::network::dns::{AllowHosts, DnsConfig};
use crate::vmm::{BackendInfo, BackendKind};

/// Smallest guest the agent boots: the CRD's minimum.
pub use wrenn_crds::capsule::MIN_MEMORY_BYTES;

/// Checks a capsule UID: what the network and storage modules can name
/// resources after (1–63 of `[a-z0-9-]`, not starting with `-`).
pub fn validate_uid(uid: &str) -> Result<(), Status> {
    let ok = !uid.is_empty()
        && uid.len() <= 63
        && !uid.starts_with('-')
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "uid {uid:?} must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// Checks a snapshot id (a directory name on the node; no traversal).
pub fn validate_snapshot_id(id: &str) -> Result<(), Status> {
    validate_uid(id).map_err(|_| {
        Status::invalid_argument(format!(
            "snapshot id {id:?} must be 1 to 63 characters of a-z, 0-9 and '-'"
        ))
    })
}

/// `CreateCapsuleRequest` → (uid, spec, initial state). Blocking (node
/// file names are resolved in `dirs`).
pub fn from_create(
    req: pb::CreateCapsuleRequest,
    dirs: &ImageDirs,
) -> Result<(String, CapsuleSpec, State), Status> {
    validate_uid(&req.uid)?;
    let spec = req
        .spec
        .ok_or_else(|| Status::invalid_argument("spec is required"))?;
    let initial = match pb::CapsuleState::try_from(req.initial_state) {
        Ok(pb::CapsuleState::Unspecified | pb::CapsuleState::Running) => State::Running,
        Ok(pb::CapsuleState::Paused) => State::Paused,
        Ok(pb::CapsuleState::Suspended) => State::Suspended,
        _ => {
            return Err(Status::invalid_argument(
                "initial_state must be RUNNING, PAUSED or SUSPENDED",
            ));
        }
    };
    Ok((req.uid, from_spec(spec, dirs)?, initial))
}

/// A node file refusal as gRPC. A bad or hostile name, and one this node
/// does not hold, are the spec's fault here (`InvalidArgument`: the
/// operator shows the message as the template's or capsule's reason); a
/// lookup that failed otherwise (permissions, I/O) is the node's.
fn node_file_status(field: &str, e: &dirs::Error) -> Status {
    let msg = format!("{field}: {e}");
    match e {
        dirs::Error::BadName { .. }
        | dirs::Error::Refused { .. }
        | dirs::Error::NoDirs { .. }
        | dirs::Error::NotFound { .. } => Status::invalid_argument(msg),
        dirs::Error::Lookup { .. } | dirs::Error::Config { .. } => Status::internal(msg),
    }
}

/// The kernel a request names (`""`: the agent's default), resolved.
fn from_kernel(field: &str, name: &str, dirs: &ImageDirs) -> Result<Option<PathBuf>, Status> {
    match name {
        "" => Ok(None),
        n => dirs
            .resolve(Use::Kernel, n)
            .map(Some)
            .map_err(|e| node_file_status(field, &e)),
    }
}

/// A template's extra kernel command line, checked against the allow-list.
fn from_cmdline(field: &str, line: String) -> Result<String, Status> {
    cmdline::check(&line).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(line)
}

/// `TemplateDisk` → boot source. `rootfs_url` is refused: a download
/// would put unverified bytes under the guest's root, and the node can
/// already take the same disk as `rootfs_path` (placed in an image
/// directory by the node admin) or build it from an image as
/// `oci_reference`. A local image is resolved here to refuse it early, and
/// again by the builder right before it is read.
fn from_template(t: pb::TemplateDisk, dirs: &ImageDirs) -> Result<BootSource, Status> {
    const FIELD: &str = "spec.source.template";
    match t.disk {
        Some(pb::template_disk::Disk::RootfsPath(p)) => {
            let rootfs = dirs
                .resolve(Use::RootDisk, &p)
                .map_err(|e| node_file_status(&format!("{FIELD}.rootfs_path"), &e))?;
            Ok(BootSource::Template(TemplateDisk {
                key: t.key,
                rootfs,
                digest: t.digest,
            }))
        }
        Some(pb::template_disk::Disk::OciReference(r)) => {
            let field = format!("{FIELD}.oci_reference");
            let bad = |e: crate::images::Error| match e {
                crate::images::Error::NodeFile { source } => node_file_status(&field, &source),
                e => Status::invalid_argument(format!("{field}: {e}")),
            };
            if let ImageSource::Local(image) = ImageSource::parse(&r).map_err(bad)? {
                ImageSource::resolve_local(&image, dirs).map_err(bad)?;
            }
            Ok(BootSource::Image(ImageTemplate {
                key: t.key,
                reference: r,
                digest: t.digest,
            }))
        }
        Some(pb::template_disk::Disk::RootfsUrl(u)) => Err(Status::invalid_argument(format!(
            "{FIELD}.rootfs_url {u:?}: this agent does not download root disks; \
             give the image as oci_reference, or place the disk in an image directory \
             of the node and use rootfs_path"
        ))),
        None => Err(Status::invalid_argument(format!(
            "{FIELD} needs oci_reference or rootfs_path"
        ))),
    }
}

/// How long a warm build may take for start plus readiness when the
/// request says 0.
pub const DEFAULT_WARM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn from_resources(res: Option<pb::Resources>, field: &str) -> Result<Resources, Status> {
    let res = res.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    if res.vcpus == 0 {
        return Err(Status::invalid_argument(format!(
            "{field}.vcpus must be at least 1"
        )));
    }
    if res.memory_bytes < MIN_MEMORY_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field}.memory_bytes must be at least {MIN_MEMORY_BYTES}"
        )));
    }
    Ok(Resources {
        vcpus: res.vcpus,
        memory_bytes: res.memory_bytes,
        disk_bytes: res.disk_bytes,
    })
}

/// `PrepareTemplateRequest` → domain request. The disk is checked as a
/// create checks it; a warm build needs a snapshot id, a start command, a
/// readiness check and a shape.
pub fn from_prepare(
    req: pb::PrepareTemplateRequest,
    dirs: &ImageDirs,
) -> Result<PrepareRequest, Status> {
    let disk = req
        .disk
        .ok_or_else(|| Status::invalid_argument("disk is required"))?;
    if disk.key.is_empty() {
        return Err(Status::invalid_argument("disk.key is required"));
    }
    let disk_bytes = disk.disk_bytes;
    let key = disk.key.clone();
    let digest = disk.digest.clone();
    let source = match from_template(disk, dirs).map_err(|s| {
        Status::new(
            s.code(),
            s.message().replace("spec.source.template", "disk"),
        )
    })? {
        BootSource::Template(t) => TemplateSource::Rootfs(t.rootfs),
        BootSource::Image(i) => TemplateSource::Image(i.reference),
        BootSource::Snapshot { .. } => {
            return Err(Status::invalid_argument("disk must name a root disk"));
        }
    };
    let warm = req.warm.map(from_warm).transpose()?;
    // Credentials only mean something to a registry pull.
    if req.registry_credentials.is_some() && !is_registry(&source) {
        return Err(Status::invalid_argument(
            "registry_credentials apply only to a registry image in disk.oci_reference",
        ));
    }
    // The image is built at the size a capsule's create asks for, so the
    // cache entry is the one that create finds.
    let disk_bytes = match disk_bytes {
        0 => warm.as_ref().map_or(0, |w| w.resources.disk_bytes),
        n => n,
    };
    if matches!(source, TemplateSource::Image(_)) && disk_bytes == 0 {
        return Err(Status::invalid_argument(
            "disk.disk_bytes (or warm.resources.disk_bytes) must be set to build a template from oci_reference",
        ));
    }
    let kernel = from_kernel("kernel_path", &req.kernel_path, dirs)?;
    Ok(PrepareRequest {
        key,
        source,
        digest,
        disk_bytes,
        kernel,
        cmdline: from_cmdline("kernel_cmdline", req.kernel_cmdline)?,
        warm,
        retry: req.retry,
        credentials: req
            .registry_credentials
            .map(|c| crate::images::Credentials::new(c.username, c.password)),
    })
}

/// Whether a template's disk is pulled from a registry.
fn is_registry(source: &TemplateSource) -> bool {
    matches!(source, TemplateSource::Image(r)
        if matches!(ImageSource::parse(r), Ok(ImageSource::Registry(_))))
}

fn from_warm(w: pb::WarmBuild) -> Result<WarmSpec, Status> {
    validate_snapshot_id(&w.snapshot_id)
        .map_err(|s| Status::invalid_argument(format!("warm.{}", s.message())))?;
    if w.start_command.first().is_none_or(String::is_empty) {
        return Err(Status::invalid_argument(
            "warm.start_command must name a program",
        ));
    }
    if w.start_command.iter().any(|a| a.contains('\0')) {
        return Err(Status::invalid_argument(
            "warm.start_command contains a NUL byte",
        ));
    }
    let readiness = match w.readiness {
        Some(pb::warm_build::Readiness::Exec(p)) => {
            if p.argv.first().is_none_or(String::is_empty) {
                return Err(Status::invalid_argument(
                    "warm.exec.argv must name a program",
                ));
            }
            Readiness::Exec(p.argv)
        }
        Some(pb::warm_build::Readiness::TcpPort(port)) => match u16::try_from(port) {
            Ok(p) if p > 0 => Readiness::TcpPort(p),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "warm.tcp_port {port} must be 1 to 65535"
                )));
            }
        },
        None => {
            return Err(Status::invalid_argument(
                "warm needs a readiness check: exec or tcp_port",
            ));
        }
    };
    for k in w.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "warm.env name {k:?} is invalid"
            )));
        }
    }
    Ok(WarmSpec {
        snapshot_id: w.snapshot_id,
        resources: from_resources(w.resources, "warm.resources")?,
        env: w.env.into_iter().collect(),
        start_command: w.start_command,
        readiness,
        timeout: match w.timeout_seconds {
            0 => DEFAULT_WARM_TIMEOUT,
            s => std::time::Duration::from_secs(u64::from(s)),
        },
    })
}

/// Domain template status → `TemplateState`.
pub fn to_template_state(s: &TemplateStatus) -> pb::TemplateState {
    pb::TemplateState {
        key: s.key.clone(),
        phase: match s.phase {
            TemplatePhase::Preparing => pb::TemplatePhase::Preparing,
            TemplatePhase::Ready => pb::TemplatePhase::Ready,
            TemplatePhase::Failed => pb::TemplatePhase::Failed,
        } as i32,
        digest: s.digest.clone().unwrap_or_default(),
        snapshot_id: s.snapshot_id.clone().unwrap_or_default(),
        reason: s.reason.map(String::from).unwrap_or_default(),
        message: s.message.clone().unwrap_or_default(),
    }
}

/// `CapsuleSpec` → domain spec. Blocking (node file names are resolved in
/// `dirs`).
pub fn from_spec(spec: pb::CapsuleSpec, dirs: &ImageDirs) -> Result<CapsuleSpec, Status> {
    let resources = from_resources(spec.resources, "spec.resources")?;
    let source = match spec.source.and_then(|s| s.source) {
        Some(pb::boot_source::Source::Template(t)) => from_template(t, dirs)?,
        Some(pb::boot_source::Source::Snapshot(s)) => {
            validate_snapshot_id(&s.id)?;
            BootSource::Snapshot { id: s.id }
        }
        None => return Err(Status::invalid_argument("spec.source is required")),
    };
    // The image is built at the capsule's disk size (dm-snapshot shows the
    // guest exactly the template's size), so there must be one.
    if matches!(source, BootSource::Image(_)) && resources.disk_bytes == 0 {
        return Err(Status::invalid_argument(
            "spec.resources.disk_bytes must be set to build a template from oci_reference",
        ));
    }
    let kernel = from_kernel("spec.kernel_path", &spec.kernel_path, dirs)?;
    let cmdline = from_cmdline("spec.kernel_cmdline", spec.kernel_cmdline)?;
    let net = spec.network.unwrap_or_default();
    let names = from_names(&net)?;
    let ports = from_ports(&net.ports)?;
    let egress = from_network(net)?;
    Ok(CapsuleSpec {
        namespace: spec.namespace,
        name: spec.name,
        source,
        resources,
        kernel,
        cmdline,
        env: spec.env.into_iter().collect::<BTreeMap<_, _>>(),
        egress,
        names,
        ports,
    })
}

/// `NetworkPolicy`'s DNS settings and allowed host names → [`Names`].
/// Host names apply only under DENY, and need name resolution open.
pub fn from_names(net: &pb::NetworkPolicy) -> Result<Names, Status> {
    let dns = match &net.dns {
        None => DnsConfig::default(),
        Some(d) => DnsConfig::parse(&d.nameservers, &d.searches, &d.options, d.block_under_deny)
            .map_err(|e| Status::invalid_argument(format!("spec.network.{e}")))?,
    };
    let allow_hosts = AllowHosts::parse(&net.allow_hosts)
        .map_err(|e| Status::invalid_argument(format!("spec.network.{e}")))?;
    if !allow_hosts.is_empty() {
        if net.egress != pb::Egress::Deny as i32 {
            return Err(Status::invalid_argument(
                "spec.network.allow_hosts applies only with egress DENY",
            ));
        }
        if dns.block_under_deny {
            return Err(Status::invalid_argument(
                "spec.network.allow_hosts needs name resolution: dns.block_under_deny closes it",
            ));
        }
    }
    Ok(Names { dns, allow_hosts })
}

/// Most sources one published port may have: the CRD lists at most 16
/// peers, and the operator resolves Pod selectors to at most this many
/// addresses.
const MAX_PORT_SOURCES: usize = 1024;
/// Most ports a capsule may declare (the CRD's limit).
const MAX_PORTS: usize = 32;

/// `NetworkPolicy.ports` → the ports to publish: the TCP ports with
/// sources, sorted by port. A port without sources is not published (the
/// data plane still reaches it); UDP with sources, a duplicate port, port
/// 0 or a bad CIDR is refused.
pub fn from_ports(ports: &[pb::Port]) -> Result<Vec<PortRule>, Status> {
    if ports.len() > MAX_PORTS {
        return Err(Status::invalid_argument(format!(
            "spec.network.ports has {} entries, at most {MAX_PORTS}",
            ports.len()
        )));
    }
    let mut out: Vec<PortRule> = Vec::new();
    for p in ports {
        if p.from_cidrs.is_empty() {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "spec.network.ports: port {} is not 1-65535",
                    p.port
                ))
            })?;
        if p.protocol != "TCP" {
            return Err(Status::invalid_argument(format!(
                "spec.network.ports {port}: only TCP ports are published (protocol {:?})",
                p.protocol
            )));
        }
        if p.from_cidrs.len() > MAX_PORT_SOURCES {
            return Err(Status::invalid_argument(format!(
                "spec.network.ports {port}: {} sources, at most {MAX_PORT_SOURCES}",
                p.from_cidrs.len()
            )));
        }
        let mut from = Vec::with_capacity(p.from_cidrs.len());
        for c in &p.from_cidrs {
            let cidr = c.parse::<crate::network::Cidr>().map_err(|e| {
                Status::invalid_argument(format!(
                    "spec.network.ports {port} from {c:?}: {e} (capsules are IPv4 only)"
                ))
            })?;
            if !from.contains(&cidr) {
                from.push(cidr);
            }
        }
        if out.iter().any(|r| r.port == port) {
            return Err(Status::invalid_argument(format!(
                "spec.network.ports: TCP port {port} is listed twice"
            )));
        }
        out.push(PortRule { port, from });
    }
    out.sort_by_key(|r| r.port);
    Ok(out)
}

/// `NetworkPolicy` → egress policy. DENY with CIDRs allows exactly those;
/// CIDRs with ALLOW are refused (ALLOW already reaches them, and a list
/// the user thinks restricts something must not be dropped silently).
/// The one place the agent parses a CIDR a request carries: everything
/// after it holds [`Cidr`](crate::network::Cidr) values.
pub fn from_network(net: pb::NetworkPolicy) -> Result<Egress, Status> {
    let egress = pb::Egress::try_from(net.egress)
        .map_err(|_| Status::invalid_argument("spec.network.egress is unknown"))?;
    let mut cidrs = Vec::with_capacity(net.allow_cidrs.len());
    for c in &net.allow_cidrs {
        let cidr = c.parse::<crate::network::Cidr>().map_err(|e| {
            Status::invalid_argument(format!(
                "spec.network.allow_cidrs {c:?}: {e} (capsules are IPv4 only)"
            ))
        })?;
        // Listed but never reachable would be a list that lies.
        if let Some(blocked) = cidr.never_reachable() {
            return Err(Status::invalid_argument(format!(
                "spec.network.allow_cidrs {c:?} lies inside {blocked}, which every node blocks \
                 for capsules (private, shared, link-local and cloud metadata ranges)"
            )));
        }
        cidrs.push(cidr);
    }
    Ok(match (egress, cidrs.is_empty()) {
        (pb::Egress::Deny, true) => Egress::Deny,
        (pb::Egress::Deny, false) => Egress::AllowList(cidrs),
        (pb::Egress::Allow | pb::Egress::Unspecified, true) => Egress::Allow,
        (pb::Egress::Allow | pb::Egress::Unspecified, false) => {
            return Err(Status::invalid_argument(
                "spec.network.allow_cidrs applies only with egress DENY",
            ));
        }
    })
}

/// Domain spec → `CapsuleSpec`. Node files appear as the paths they
/// resolved to, for the operator's information; it never sends them back.
pub fn to_spec(spec: &CapsuleSpec) -> pb::CapsuleSpec {
    let source = match &spec.source {
        BootSource::Template(t) => pb::boot_source::Source::Template(pb::TemplateDisk {
            key: t.key.clone(),
            disk: Some(pb::template_disk::Disk::RootfsPath(
                t.rootfs.to_string_lossy().into_owned(),
            )),
            digest: t.digest.clone(),
            disk_bytes: spec.resources.disk_bytes,
        }),
        BootSource::Image(i) => pb::boot_source::Source::Template(pb::TemplateDisk {
            key: i.key.clone(),
            disk: Some(pb::template_disk::Disk::OciReference(i.reference.clone())),
            digest: i.digest.clone(),
            disk_bytes: spec.resources.disk_bytes,
        }),
        BootSource::Snapshot { id } => {
            pb::boot_source::Source::Snapshot(pb::SnapshotRef { id: id.clone() })
        }
    };
    let (egress, allow_cidrs) = match &spec.egress {
        Egress::Allow => (pb::Egress::Allow, Vec::new()),
        Egress::Deny => (pb::Egress::Deny, Vec::new()),
        Egress::AllowList(c) => (pb::Egress::Deny, c.iter().map(|c| c.to_string()).collect()),
    };
    pb::CapsuleSpec {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        source: Some(pb::BootSource {
            source: Some(source),
        }),
        resources: Some(to_resources(&spec.resources)),
        kernel_path: spec
            .kernel
            .as_ref()
            .map(|k| k.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel_cmdline: spec.cmdline.clone(),
        env: spec.env.clone().into_iter().collect(),
        network: Some(pb::NetworkPolicy {
            egress: egress as i32,
            allow_cidrs,
            dns: to_dns(&spec.names.dns),
            allow_hosts: spec.names.allow_hosts.clone().into(),
            ports: spec
                .ports
                .iter()
                .map(|r| pb::Port {
                    port: r.port.into(),
                    protocol: "TCP".into(),
                    from_cidrs: r.from.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        }),
    }
}

/// The resolver settings as the operator sent them; `None` for the
/// defaults, as the operator leaves an absent `dns` unset.
fn to_dns(d: &DnsConfig) -> Option<pb::DnsConfig> {
    (*d != DnsConfig::default()).then(|| pb::DnsConfig {
        nameservers: d.nameservers.iter().map(ToString::to_string).collect(),
        searches: d.searches.clone(),
        options: d.options.clone(),
        block_under_deny: d.block_under_deny,
    })
}

/// Domain resources → proto (the one conversion).
pub fn to_resources(r: &Resources) -> pb::Resources {
    pb::Resources {
        vcpus: r.vcpus,
        memory_bytes: r.memory_bytes,
        disk_bytes: r.disk_bytes,
    }
}

/// Domain state → proto.
pub fn to_state(s: State) -> pb::CapsuleState {
    match s {
        State::Creating => pb::CapsuleState::Creating,
        State::Running => pb::CapsuleState::Running,
        State::Pausing => pb::CapsuleState::Pausing,
        State::Paused => pb::CapsuleState::Paused,
        State::Suspending => pb::CapsuleState::Suspending,
        State::Suspended => pb::CapsuleState::Suspended,
        State::Resuming => pb::CapsuleState::Resuming,
        State::Snapshotting => pb::CapsuleState::Snapshotting,
        State::Deleting => pb::CapsuleState::Deleting,
        State::Failed => pb::CapsuleState::Failed,
        State::Stopped => pb::CapsuleState::Stopped,
    }
}

/// What NodeInfo and every capsule say of a VMM without hardware
/// virtualization (`status.vmm.note`).
pub const SLOW_VMM_NOTE: &str =
    "no hardware virtualization (QEMU TCG): much slower than production, for development and CI";

/// Backend → `VmmInfo`, for NodeInfo and capsules alike.
pub fn to_vmm(b: &BackendInfo) -> pb::VmmInfo {
    let name = match b.kind {
        BackendKind::CloudHypervisor => "cloud-hypervisor",
        BackendKind::Qemu => "qemu",
    };
    pb::VmmInfo {
        name: name.into(),
        version: b.version.clone(),
        note: if b.accelerated {
            String::new()
        } else {
            SLOW_VMM_NOTE.into()
        },
    }
}

/// Domain view → `Capsule`.
pub fn to_capsule(v: &CapsuleView) -> pb::Capsule {
    let mut spec = to_spec(&v.spec);
    // A running or paused capsule shows a port as enforced only once it has
    // a host port, so the operator asks again (UpdateNetwork) for one that
    // could not be published (host-port range full at create).
    if matches!(v.state, State::Running | State::Paused)
        && let Some(n) = spec.network.as_mut()
    {
        n.ports
            .retain(|p| v.host_ports.iter().any(|h| u32::from(h.port) == p.port));
    }
    pb::Capsule {
        uid: v.uid.clone(),
        spec: Some(spec),
        state: to_state(v.state) as i32,
        ip: v.ip.clone().unwrap_or_default(),
        vmm: Some(to_vmm(&v.vmm)),
        started_unix_nanos: v.started_unix_nanos,
        message: v.message.clone().unwrap_or_default(),
        reason: v.reason.map(String::from).unwrap_or_default(),
        last_activity_unix_nanos: 0,
        host_ports: v
            .host_ports
            .iter()
            .map(|h| pb::HostPort {
                port: h.port.into(),
                host_port: h.host_port.into(),
            })
            .collect(),
    }
}

/// Domain event → `Event`.
pub fn to_event(e: &Event) -> pb::Event {
    let kind = match e.kind {
        EventKind::Sync => pb::EventKind::Sync,
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::Deleted => pb::EventKind::Deleted,
        EventKind::Reset => pb::EventKind::Reset,
        EventKind::NameRefused => pb::EventKind::NameRefused,
    };
    pb::Event {
        sequence: e.sequence,
        kind: kind as i32,
        capsule: e.capsule.as_ref().map(to_capsule),
        unix_nanos: e.unix_nanos,
        name_refused: e.name_refused.as_ref().map(|r| pb::NameRefused {
            name: r.name.clone(),
            reason: r.reason.as_str().to_string(),
            queries: r.queries,
        }),
    }
}

/// Snapshot → proto.
pub fn to_snapshot(s: &SnapshotInfo, vmm: &BackendInfo, cpu_model: String) -> pb::Snapshot {
    pb::Snapshot {
        r#ref: Some(pb::SnapshotRef { id: s.id.clone() }),
        capsule_uid: s.capsule_uid.clone(),
        size_bytes: s.size_bytes,
        created_unix_nanos: s.created_unix_nanos,
        memory: s.memory,
        vmm: Some(to_vmm(vmm)),
        cpu_model,
        resources: Some(to_resources(&s.resources)),
    }
}

/// A quarantined capsule as `NodeInfo` lists it.
pub fn to_quarantined(q: &crate::state::Quarantined) -> pb::QuarantinedCapsule {
    pb::QuarantinedCapsule {
        uid: q.uid.clone(),
        reason: q.reason.reason().into(),
        message: q.message.clone(),
    }
}

/// The one mapping of supervisor errors to gRPC: the message is the whole
/// chain, so the operator can put it in a condition as it is.
pub fn to_status(e: &Error) -> Status {
    let msg = e.chain();
    match e {
        Error::NotFound { .. } | Error::SnapshotNotFound { .. } => Status::not_found(msg),
        Error::SnapshotUnusable { .. } | Error::Quarantined { .. } => {
            Status::failed_precondition(msg)
        }
        Error::Image { source, .. } if source.is_transient() => Status::unavailable(msg),
        Error::Image { .. } => Status::failed_precondition(msg),
        Error::AlreadyExists { .. } | Error::SnapshotExists { .. } => Status::already_exists(msg),
        Error::WrongState { .. } => Status::failed_precondition(msg),
        Error::InvalidSpec { .. } => Status::invalid_argument(msg),
        Error::Cancelled { .. } => Status::aborted(msg),
        Error::Aborted { .. } | Error::Guest { .. } => Status::unavailable(msg),
        Error::Network { source, .. }
            if matches!(**source, crate::network::Error::HostPortsExhausted { .. }) =>
        {
            Status::resource_exhausted(msg)
        }
        Error::Journal { .. }
        | Error::Network { .. }
        | Error::Storage { .. }
        | Error::Vm { .. }
        | Error::Files { .. } => Status::internal(msg),
    }
}

#[cfg(test)]
mod tests;
