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

use std::collections::BTreeMap;
use std::path::PathBuf;

use tonic::Status;
use wrenn_proto::agent::v1 as pb;

use crate::capsule::cmdline;
use crate::capsule::{
    BootSource, CapsuleSpec, CapsuleView, Egress, Error, Event, EventKind, ImageTemplate,
    PrepareRequest, Readiness, Resources, SnapshotInfo, State, TemplateDisk, TemplatePhase,
    TemplateSource, TemplateStatus, WarmSpec,
};
use crate::images::ImageSource;
use crate::images::dirs::{self, ImageDirs, Use};
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
    })
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
        digest: s.digest.clone(),
        snapshot_id: s.snapshot_id.clone(),
        reason: s.reason.clone(),
        message: s.message.clone(),
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
    let egress = from_network(spec.network.unwrap_or_default())?;
    Ok(CapsuleSpec {
        namespace: spec.namespace,
        name: spec.name,
        source,
        resources,
        kernel,
        cmdline,
        env: spec.env.into_iter().collect::<BTreeMap<_, _>>(),
        egress,
    })
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
            ports: Vec::new(),
        }),
    }
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
    pb::Capsule {
        uid: v.uid.clone(),
        spec: Some(to_spec(&v.spec)),
        state: to_state(v.state) as i32,
        ip: v.ip.clone(),
        vmm: Some(to_vmm(&v.vmm)),
        started_unix_nanos: v.started_unix_nanos,
        message: v.message.clone(),
        reason: v.reason.clone(),
        last_activity_unix_nanos: 0,
    }
}

/// Domain event → `Event`.
pub fn to_event(e: &Event) -> pb::Event {
    let kind = match e.kind {
        EventKind::Sync => pb::EventKind::Sync,
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::Deleted => pb::EventKind::Deleted,
        EventKind::Reset => pb::EventKind::Reset,
    };
    pb::Event {
        sequence: e.sequence,
        kind: kind as i32,
        capsule: e.capsule.as_ref().map(to_capsule),
        unix_nanos: e.unix_nanos,
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
        Error::Journal { .. }
        | Error::Network { .. }
        | Error::Storage { .. }
        | Error::Vm { .. }
        | Error::Files { .. } => Status::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image directory with a root disk, a kernel, an OCI layout
    /// directory and an archive, as a node admin would fill it.
    struct Dirs {
        _root: tempfile::TempDir,
        dir: PathBuf,
        dirs: ImageDirs,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("images");
        std::fs::create_dir_all(dir.join("kernels")).unwrap();
        std::fs::create_dir_all(dir.join("base")).unwrap();
        std::fs::write(dir.join("base.ext4"), b"ext4").unwrap();
        std::fs::write(dir.join("kernels/vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("a.tar"), b"tar").unwrap();
        let dirs = ImageDirs::new(std::slice::from_ref(&dir), &root.path().join("state")).unwrap();
        let dir = dir.canonicalize().unwrap();
        Dirs {
            _root: root,
            dir,
            dirs,
        }
    }

    fn prepare() -> pb::PrepareTemplateRequest {
        pb::PrepareTemplateRequest {
            disk: Some(pb::TemplateDisk {
                key: "ns/web@sha256:1".into(),
                disk: Some(pb::template_disk::Disk::OciReference(
                    "registry.example/web:1".into(),
                )),
                digest: String::new(),
                disk_bytes: 0,
            }),
            warm: Some(pb::WarmBuild {
                snapshot_id: "warm-ns-web-1".into(),
                resources: Some(pb::Resources {
                    vcpus: 1,
                    memory_bytes: 256 << 20,
                    disk_bytes: 1 << 30,
                }),
                env: Default::default(),
                start_command: vec!["/srv/app".into()],
                readiness: Some(pb::warm_build::Readiness::TcpPort(8080)),
                timeout_seconds: 0,
            }),
            kernel_path: String::new(),
            kernel_cmdline: String::new(),
            retry: false,
        }
    }

    #[test]
    fn prepare_requests_take_defaults_and_refuse_what_cannot_build() {
        let d = dirs();
        let ok = from_prepare(prepare(), &d.dirs).unwrap();
        // The image is built at the warm shape's disk size, the timeout
        // defaults to 300 s.
        assert_eq!(ok.disk_bytes, 1 << 30);
        let warm = ok.warm.unwrap();
        assert_eq!(warm.timeout, DEFAULT_WARM_TIMEOUT);
        assert_eq!(warm.readiness, Readiness::TcpPort(8080));
        let refused = |edit: fn(&mut pb::PrepareTemplateRequest), needle: &str| {
            let mut r = prepare();
            edit(&mut r);
            let e = from_prepare(r, &d.dirs).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        };
        refused(|r| r.disk = None, "disk is required");
        refused(
            |r| r.disk.as_mut().unwrap().key.clear(),
            "disk.key is required",
        );
        refused(
            |r| {
                r.disk.as_mut().unwrap().disk = Some(pb::template_disk::Disk::RootfsUrl(
                    "https://x/r.ext4".into(),
                ))
            },
            "does not download",
        );
        refused(
            |r| r.warm.as_mut().unwrap().start_command.clear(),
            "start_command",
        );
        refused(
            |r| r.warm.as_mut().unwrap().snapshot_id = "../etc".into(),
            "snapshot id",
        );
        refused(|r| r.warm.as_mut().unwrap().readiness = None, "readiness");
        refused(
            |r| r.warm.as_mut().unwrap().readiness = Some(pb::warm_build::Readiness::TcpPort(0)),
            "tcp_port",
        );
        refused(
            |r| {
                r.warm.as_mut().unwrap().readiness =
                    Some(pb::warm_build::Readiness::Exec(pb::ExecProbe {
                        argv: vec![],
                    }))
            },
            "exec.argv",
        );
        refused(
            |r| r.warm.as_mut().unwrap().resources = None,
            "warm.resources",
        );
        refused(
            |r| {
                r.warm = None;
            },
            "disk_bytes",
        );
        refused(|r| r.kernel_path = "/boot/vmlinuz".into(), "kernel_path");
        refused(|r| r.kernel_path = "../vmlinux".into(), "kernel_path");
        refused(
            |r| r.kernel_cmdline = "rdinit=/bin/sh".into(),
            "\"rdinit=/bin/sh\"",
        );
        refused(
            |r| {
                r.disk.as_mut().unwrap().disk =
                    Some(pb::template_disk::Disk::RootfsPath("/dev/vda".into()))
            },
            "disk.rootfs_path",
        );
        let mut with_kernel = prepare();
        with_kernel.kernel_path = "kernels/vmlinux".into();
        with_kernel.kernel_cmdline = "quiet console=hvc0".into();
        let ok = from_prepare(with_kernel, &d.dirs).unwrap();
        assert_eq!(ok.kernel, Some(d.dir.join("kernels/vmlinux")));
        assert_eq!(ok.cmdline, "quiet console=hvc0");
        // A root disk alone needs no warm part.
        let mut disk_only = prepare();
        disk_only.warm = None;
        disk_only.disk.as_mut().unwrap().disk_bytes = 1 << 30;
        assert!(from_prepare(disk_only, &d.dirs).unwrap().warm.is_none());
    }

    fn request() -> pb::CreateCapsuleRequest {
        pb::CreateCapsuleRequest {
            uid: "3f2a9c1e-77b0".into(),
            spec: Some(pb::CapsuleSpec {
                namespace: "ns".into(),
                name: "web".into(),
                source: Some(pb::BootSource {
                    source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                        key: "ns/base@sha256:1".into(),
                        disk: Some(pb::template_disk::Disk::RootfsPath("base.ext4".into())),
                        digest: "sha256:1".into(),
                        disk_bytes: 1 << 30,
                    })),
                }),
                resources: Some(pb::Resources {
                    vcpus: 2,
                    memory_bytes: 512 << 20,
                    disk_bytes: 1 << 30,
                }),
                kernel_path: String::new(),
                kernel_cmdline: "quiet".into(),
                env: [("A".to_string(), "1".to_string())].into(),
                network: Some(pb::NetworkPolicy {
                    egress: pb::Egress::Deny as i32,
                    allow_cidrs: vec!["198.51.100.0/24".into()],
                    ports: vec![],
                }),
            }),
            initial_state: 0,
        }
    }

    #[test]
    fn the_guest_token_never_reaches_the_wire() {
        let (uid, spec, _) = from_create(request(), &dirs().dirs).unwrap();
        let mut rec = crate::capsule::Record::new(&uid, &spec);
        let token = crate::guest::GuestToken::generate().unwrap();
        rec.guest_token = Some(token.clone());
        let view = rec.view(&BackendInfo {
            kind: crate::vmm::BackendKind::CloudHypervisor,
            version: "v1".into(),
            accelerated: true,
        });
        assert_eq!(view.guest_token.as_ref(), Some(&token));
        let event = Event {
            sequence: 1,
            kind: EventKind::StateChanged,
            capsule: Some(view.clone()),
            unix_nanos: 0,
        };
        for shown in [
            format!("{:?}", to_capsule(&view)),
            format!("{:?}", to_event(&event)),
            format!("{view:?}"),
            format!("{rec:?}"),
        ] {
            assert!(!shown.contains(token.expose()), "token shown: {shown}");
        }
    }

    #[test]
    fn spec_converts_with_node_files_resolved() {
        let d = dirs();
        let mut req = request();
        req.spec.as_mut().unwrap().kernel_path = "kernels/vmlinux".into();
        let (uid, spec, initial) = from_create(req, &d.dirs).unwrap();
        assert_eq!((uid.as_str(), initial), ("3f2a9c1e-77b0", State::Running));
        assert_eq!(
            spec.egress,
            Egress::AllowList(vec!["198.51.100.0/24".parse().unwrap()])
        );
        assert_eq!(spec.kernel, Some(d.dir.join("kernels/vmlinux")));
        let BootSource::Template(t) = &spec.source else {
            panic!("{spec:?}")
        };
        assert_eq!(t.rootfs, d.dir.join("base.ext4"));
        // Shown back with the resolved paths; everything else as sent.
        let shown = to_spec(&spec);
        assert_eq!(
            shown.kernel_path,
            d.dir.join("kernels/vmlinux").display().to_string()
        );
        assert_eq!(shown.kernel_cmdline, "quiet");
        assert_eq!(shown.env, request().spec.unwrap().env);
        let net = shown.network.unwrap();
        assert_eq!(
            (net.egress, net.allow_cidrs),
            (pb::Egress::Deny as i32, vec!["198.51.100.0/24".to_string()])
        );
    }

    #[test]
    fn deny_with_cidrs_allows_exactly_those_and_allow_with_cidrs_is_refused() {
        let net = |egress: pb::Egress, cidrs: &[&str]| pb::NetworkPolicy {
            egress: egress as i32,
            allow_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            ports: vec![],
        };
        assert_eq!(
            from_network(net(pb::Egress::Deny, &["203.0.113.0/24"])).unwrap(),
            Egress::AllowList(vec!["203.0.113.0/24".parse().unwrap()])
        );
        assert_eq!(
            from_network(net(pb::Egress::Deny, &[])).unwrap(),
            Egress::Deny
        );
        assert_eq!(
            from_network(net(pb::Egress::Unspecified, &[])).unwrap(),
            Egress::Allow
        );
        let e = from_network(net(pb::Egress::Allow, &["203.0.113.0/24"])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("only with egress DENY"), "{e:?}");
        let e = from_network(net(pb::Egress::Deny, &["2001:db8::/32"])).unwrap_err();
        assert!(e.message().contains("IPv4 only"), "{e:?}");
        for (listed, inside) in [
            ("10.20.0.0/16", "10.0.0.0/8"),
            ("192.168.1.0/24", "192.168.0.0/16"),
            ("169.254.169.254/32", "169.254.0.0/16"),
            ("168.63.129.16/32", "168.63.129.16/32"),
        ] {
            let e = from_network(net(pb::Egress::Deny, &["203.0.113.0/24", listed])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains(&format!("lies inside {inside}")),
                "{e:?}"
            );
        }
        // Wider than a blocked range is fine: the rest of it is reachable.
        assert_eq!(
            from_network(net(pb::Egress::Deny, &["0.0.0.0/0"])).unwrap(),
            Egress::AllowList(vec!["0.0.0.0/0".parse().unwrap()])
        );
    }

    type Mutation = Box<dyn Fn(&mut pb::CreateCapsuleRequest)>;

    fn set_disk(r: &mut pb::CreateCapsuleRequest, disk: pb::template_disk::Disk) {
        let source = r.spec.as_mut().unwrap().source.as_mut().unwrap();
        if let Some(pb::boot_source::Source::Template(t)) = source.source.as_mut() {
            t.disk = Some(disk);
        }
    }

    #[test]
    fn image_and_snapshot_sources_round_trip() {
        let d = dirs();
        for disk in [
            pb::template_disk::Disk::OciReference("oci:base:v1".into()),
            pb::template_disk::Disk::OciReference("docker-archive:a.tar".into()),
            pb::template_disk::Disk::OciReference("ghcr.io/wrenn/base:1".into()),
        ] {
            let mut r = request();
            set_disk(&mut r, disk);
            let (_, spec, _) = from_create(r, &d.dirs).unwrap();
            assert!(matches!(spec.source, BootSource::Image(_)), "{spec:?}");
            assert_eq!(from_spec(to_spec(&spec), &d.dirs).unwrap(), spec);
        }
        let mut r = request();
        r.spec.as_mut().unwrap().source = Some(pb::BootSource {
            source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
                id: "snap-1".into(),
            })),
        });
        let (_, spec, _) = from_create(r, &d.dirs).unwrap();
        assert_eq!(
            spec.source,
            BootSource::Snapshot {
                id: "snap-1".into()
            }
        );
        assert_eq!(from_spec(to_spec(&spec), &d.dirs).unwrap(), spec);
        assert_eq!(
            to_status(&Error::SnapshotNotFound { id: "s".into() }).code(),
            tonic::Code::NotFound
        );
        let image = |source| Error::Image {
            uid: "c1".into(),
            reference: "oci:img".into(),
            source: Box::new(source),
        };
        let hostile = to_status(&image(crate::images::Error::UnsafeEntry {
            layer: "sha256:1".into(),
            entry: "dev/sda".into(),
            why: "device node".into(),
        }));
        assert_eq!(hostile.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            hostile.message(),
            "build template disk of capsule c1 from oci:img: \
             refuse entry \"dev/sda\" of layer sha256:1: device node"
        );
        let busy = to_status(&image(crate::images::Error::Lock {
            path: "/l".into(),
            source: std::io::ErrorKind::WouldBlock.into(),
        }));
        assert_eq!(busy.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.uid = "Bad/Uid".into()), "uid"),
            (Box::new(|r| r.spec = None), "spec is required"),
            (
                Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsPath("/dev/vda".into()))),
                "absolute paths are not allowed",
            ),
            (
                Box::new(|r| r.spec.as_mut().unwrap().resources.as_mut().unwrap().vcpus = 0),
                "vcpus",
            ),
            (
                Box::new(|r| {
                    r.spec
                        .as_mut()
                        .unwrap()
                        .network
                        .as_mut()
                        .unwrap()
                        .allow_cidrs = vec!["300.1.1.1/8".into()]
                }),
                "allow_cidrs",
            ),
            (
                Box::new(|r| r.spec.as_mut().unwrap().kernel_path = "/boot/vmlinux".into()),
                "spec.kernel_path",
            ),
            (
                Box::new(|r| r.spec.as_mut().unwrap().kernel_cmdline = "quiet -- x".into()),
                "\"--\"",
            ),
            (
                Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsPath("../x".into()))),
                "rootfs_path",
            ),
            (
                Box::new(|r| set_disk(r, pb::template_disk::Disk::OciReference("/srv/img".into()))),
                "oci_reference",
            ),
            (Box::new(|r| r.initial_state = 9), "initial_state"),
            (
                Box::new(|r| {
                    set_disk(
                        r,
                        pb::template_disk::Disk::OciReference("oci:/srv/img".into()),
                    )
                }),
                "oci_reference",
            ),
            (
                Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsUrl("https://x/r".into()))),
                "use rootfs_path",
            ),
            (
                Box::new(|r| {
                    set_disk(r, pb::template_disk::Disk::OciReference("alpine:3".into()));
                    r.spec
                        .as_mut()
                        .unwrap()
                        .resources
                        .as_mut()
                        .unwrap()
                        .disk_bytes = 0;
                }),
                "disk_bytes",
            ),
        ];
        let d = dirs();
        for (mutate, field) in cases {
            let mut r = request();
            mutate(&mut r);
            let st = from_create(r, &d.dirs).unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            assert!(st.message().contains(field), "{field}: {}", st.message());
        }
    }

    #[test]
    fn errors_map_to_codes_users_can_act_on() {
        let paused = Error::WrongState {
            uid: "c1".into(),
            state: State::Paused,
            hint: "resume it first",
        };
        let st = to_status(&paused);
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert_eq!(st.message(), "capsule c1 is paused; resume it first");
        assert_eq!(
            to_status(&Error::NotFound { uid: "x".into() }).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            to_status(&Error::AlreadyExists {
                uid: "x".into(),
                field: "env"
            })
            .code(),
            tonic::Code::AlreadyExists
        );
    }
}
