//! The steps of one template build (`build`), in order:
//! 1. the root disk, through the code path a create uses (image cache or a
//!    rootfs path on the node);
//! 2. for a warm template, one at a time per node (`warm_builds`):
//!    boot an internal build VM through the supervisor (journaled like any
//!    capsule, so recovery removes it, but hidden from the capsule API),
//!    start `start_command` detached in the guest, probe readiness about
//!    every second until the timeout, snapshot the VM with memory as
//!    `snapshot_id` (the same steps `SnapshotCapsule` takes), and remove
//!    the build VM, whatever happened.
//!
//! The build VM is made, snapshotted and removed through [`BuildVms`], the
//! supervisor's API for its internal capsules; its guest is reached
//! through a [`BuildGuest`] (`super::guest`).

use crate::error_chain as chain;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wrenn_crds::reason::Reason;

use super::guest::BuildVm;
use super::{BuildVms, Builds, PrepareRequest, ReadyTemplate, TemplateSource, WarmSpec};
use crate::capsule::model::{BootSource, CapsuleSpec, SnapshotInfo, State, TemplateDisk};
use crate::images::{ImageSource, Pull};
use crate::network::GUEST_ADDR;

/// Where the start command's stdout and stderr go in the guest.
pub const START_LOG: &str = "/var/log/wrenn-start.log";
/// Bound of one readiness probe.
const PROBE_BOUND: Duration = Duration::from_secs(10);

/// Why a build failed, as `TemplateState` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Why it failed.
    pub(crate) reason: Reason,
    /// The cause.
    pub(crate) message: String,
}

fn fail(reason: Reason, message: impl Into<String>) -> Failure {
    Failure {
        reason,
        message: message.into(),
    }
}

/// The internal capsule id of the build VM of snapshot `snapshot_id`: not
/// a UUID, so it never meets an operator's capsule. Agents sharing a host
/// keep their build VMs apart by their own state dir and cgroup parent.
pub(crate) fn build_uid(snapshot_id: &str) -> String {
    let h = format!("{:x}", Sha256::digest(snapshot_id.as_bytes()));
    format!("warm-{}", &h[..20])
}

/// Runs the build of `req` (see the module docs).
pub(crate) async fn build(
    builds: &Builds,
    vms: &dyn BuildVms,
    key: &(String, String),
    req: &PrepareRequest,
) -> Result<ReadyTemplate, Failure> {
    builds.progress(key, "preparing the root disk");
    let (rootfs, digest) = root_disk(builds, req).await?;
    let ready = ReadyTemplate {
        key: req.key.clone(),
        digest: digest.clone(),
        rootfs: rootfs.clone(),
        snapshot_id: String::new(),
    };
    let Some(warm) = &req.warm else {
        return Ok(ready);
    };
    builds.progress(key, "waiting for another warm build to finish");
    let _permit = builds
        .warm_gate
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| fail(Reason::Aborted, "the agent is shutting down"))?;
    let uid = build_uid(&warm.snapshot_id);
    match builds.snapshot_owner(&warm.snapshot_id) {
        // Built before (an agent restart between the snapshot and the
        // answer): nothing to do.
        Some(owner) if owner == uid => {
            return Ok(ReadyTemplate {
                snapshot_id: warm.snapshot_id.clone(),
                ..ready
            });
        }
        Some(owner) => {
            return Err(fail(
                Reason::SnapshotExists,
                format!(
                    "snapshot {} already exists on this node, taken from capsule {owner}",
                    warm.snapshot_id
                ),
            ));
        }
        None => {}
    }
    builds.progress(key, "booting the build VM");
    let spec = build_spec(req, warm, &rootfs, &digest);
    let vm = boot(vms, &uid, spec).await?;
    let built = warm_up(builds, vms, key, warm, &vm).await;
    // The build VM goes whatever happened; its snapshot (if any) stays.
    match vms.remove(&uid).await {
        Ok(_) => {}
        Err(e) => {
            tracing::error!(vm = %uid, error = &e as &dyn std::error::Error, "remove a build VM; the next agent start removes it");
        }
    }
    built?;
    Ok(ReadyTemplate {
        snapshot_id: warm.snapshot_id.clone(),
        ..ready
    })
}

/// Makes the root disk exist: the image cache entry a create of the same
/// template would use, or the rootfs file. Returns it and its digest.
async fn root_disk(builds: &Builds, req: &PrepareRequest) -> Result<(PathBuf, String), Failure> {
    let failed = |m: String| fail(Reason::RootDiskFailed, m);
    match &req.source {
        TemplateSource::Rootfs(path) => {
            let p = path.clone();
            let meta = tokio::task::spawn_blocking(move || std::fs::metadata(p))
                .await
                .map_err(|_| failed("the root disk check was aborted".into()))?;
            match meta {
                Ok(m) if m.is_file() => Ok((path.clone(), req.digest.clone())),
                Ok(_) => Err(failed(format!(
                    "rootfs {} is not a regular file",
                    path.display()
                ))),
                Err(e) => Err(failed(format!("rootfs {}: {e}", path.display()))),
            }
        }
        TemplateSource::Image(reference) => {
            let image_failed = |e: crate::images::Error| {
                failed(format!(
                    "build template disk from {reference}: {}",
                    chain(&e)
                ))
            };
            let source = ImageSource::parse(reference).map_err(image_failed)?;
            let pull = Pull {
                credentials: req.credentials.clone(),
                pinned: Some(req.digest.clone()),
            };
            let disk = builds
                .images
                .ensure_with(&source, req.disk_bytes, &pull)
                .await
                .map_err(|e| match e {
                    // The registry's refusal, as its own reason.
                    crate::images::Error::Pull { refusal, .. } => fail(
                        refusal.class.reason(),
                        format!("pull {reference}: {}", refusal.message),
                    ),
                    e => image_failed(e),
                })?;
            if !req.digest.is_empty() && req.digest != disk.manifest_digest {
                return Err(failed(format!(
                    "image {reference} has manifest digest {}, the template pins {}",
                    disk.manifest_digest, req.digest
                )));
            }
            Ok((disk.path, disk.manifest_digest))
        }
    }
}

/// The build VM's spec: the prepared disk as a plain template, the warm
/// shape and environment.
fn build_spec(
    req: &PrepareRequest,
    warm: &WarmSpec,
    rootfs: &std::path::Path,
    digest: &str,
) -> CapsuleSpec {
    CapsuleSpec {
        kernel: req.kernel.clone(),
        cmdline: req.cmdline.clone(),
        env: warm.env.clone(),
        ..CapsuleSpec::new(
            String::new(),
            "warm-build",
            BootSource::Template(TemplateDisk {
                key: req.key.clone(),
                rootfs: rootfs.to_path_buf(),
                digest: digest.to_string(),
            }),
            warm.resources,
        )
    }
}

/// Creates the build VM and returns how its guest is reached.
async fn boot(vms: &dyn BuildVms, uid: &str, spec: CapsuleSpec) -> Result<BuildVm, Failure> {
    let (view, netns) = vms
        .boot(uid, spec)
        .await
        .map_err(|e| fail(Reason::BootFailed, e.chain()))?;
    Ok(BuildVm {
        uid: uid.to_string(),
        vsock_socket: view.vsock_socket.unwrap_or_default(),
        netns,
        guest_addr: GUEST_ADDR,
        guest_token: view.guest_token,
    })
}

/// Start, readiness, snapshot. The caller removes the VM.
async fn warm_up(
    builds: &Builds,
    vms: &dyn BuildVms,
    key: &(String, String),
    warm: &WarmSpec,
    vm: &BuildVm,
) -> Result<SnapshotInfo, Failure> {
    let guest = &builds.guest;
    let deadline = tokio::time::Instant::now() + warm.timeout;
    builds.progress(key, "starting the start command");
    let started =
        tokio::time::timeout_at(deadline, guest.start(vm, &warm.start_command, START_LOG))
            .await
            .map_err(|_| {
                fail(
                    Reason::StartFailed,
                    format!(
                        "start {:?} did not answer within the timeout",
                        warm.start_command
                    ),
                )
            })?;
    let pid = started.map_err(|e| fail(Reason::StartFailed, chain(&e)))?;
    tracing::info!(vm = %vm.uid, pid, "warm build started its process");
    builds.progress(key, "waiting for readiness");
    let mut probes = 0u32;
    let mut last: Option<String> = None;
    loop {
        // A VM that died will never get ready.
        match vms.view(&vm.uid) {
            Some(v) if v.state == State::Running => {}
            Some(v) => {
                return Err(fail(
                    Reason::BootFailed,
                    format!(
                        "the build VM is {}: {} {}",
                        v.state,
                        v.reason.map_or("", Reason::as_str),
                        v.message.as_deref().unwrap_or_default()
                    ),
                ));
            }
            None => return Err(fail(Reason::BootFailed, "the build VM is gone")),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let within = PROBE_BOUND.min(deadline - now);
        probes += 1;
        let outcome = tokio::time::timeout(
            within + Duration::from_secs(2),
            guest.probe(vm, &warm.readiness, within),
        )
        .await;
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(vm = %vm.uid, probes, "warm build ready");
                builds.progress(key, "snapshotting the build VM");
                return vms
                    .snapshot(&vm.uid, &warm.snapshot_id)
                    .await
                    .map_err(|e| fail(Reason::SnapshotFailed, e.chain()));
            }
            Ok(Err(e)) => last = Some(chain(&e)),
            Err(_) => last = Some(format!("the probe did not answer within {within:?}")),
        }
        let pause = builds.probe_every;
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let mut message = format!(
        "not ready after {}s ({probes} probes); last probe: {}",
        warm.timeout.as_secs(),
        last.unwrap_or_else(|| "none ran".into())
    );
    if let Some(log) = guest.log_tail(vm, START_LOG).await
        && !log.is_empty()
    {
        message.push_str(&format!("; {START_LOG}: {log:?}"));
    }
    Err(fail(Reason::ReadinessTimeout, message))
}
