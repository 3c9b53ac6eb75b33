//! `PrepareTemplate`: templates made ready on this node before a capsule
//! needs them. The root disk goes through the same code a create uses
//! (`images` for an OCI reference, a check of the file for a rootfs path),
//! so a later create of the same template finds it in the cache; a warm
//! template then gets its snapshot from a build VM ([`super::warm`]).
//!
//! One build per (template key, warm snapshot id), idempotent: the first
//! call starts it in the background and answers `Preparing`; later calls
//! answer where it stands. A `Ready` template is recorded under
//! `<state>/templates/`, so a restarted agent answers `Ready` at once while
//! the disk and the snapshot are still there, and `NodeInfo` lists it. A
//! `Failed` build is answered as such until a call asks to retry (so a
//! polling caller sees the failure, and a broken start command does not
//! boot a VM on every poll). Nothing about a build in
//! progress survives a restart: recovery removes its build VM, and the next
//! call starts over.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

mod guest;
mod warm;

pub use guest::{AgentGuest, BuildGuest, BuildVm, Error as GuestError, GuestFuture};
pub use warm::START_LOG;
#[cfg(test)]
pub(crate) use warm::build_uid;

use super::model::{CapsuleSpec, CapsuleView, Error, Resources, SnapshotInfo};
use crate::images::{ImageSource, TemplateBuilder};
use crate::metrics::Metrics;
use crate::state::Layout;
use warm::Failure;
use wrenn_crds::reason::Reason;

/// A boxed future of [`BuildVms`].
pub type VmFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// What a warm build asks of the supervisor that runs it: its build VM is
/// an internal capsule (journaled and recovered like any other, but never
/// shown by get, list, events or metrics). The supervisor implements it.
pub trait BuildVms: Send + Sync {
    /// Creates build VM `uid` running; its view and network namespace.
    fn boot<'a>(
        &'a self,
        uid: &'a str,
        spec: CapsuleSpec,
    ) -> VmFuture<'a, (CapsuleView, Option<PathBuf>)>;
    /// The build VM's latest view; `None` once it is gone.
    fn view(&self, uid: &str) -> Option<CapsuleView>;
    /// Snapshots the build VM with memory as `id`.
    fn snapshot<'a>(&'a self, uid: &'a str, id: &'a str) -> VmFuture<'a, SnapshotInfo>;
    /// Removes the build VM; `false` when it did not exist.
    fn remove<'a>(&'a self, uid: &'a str) -> VmFuture<'a, bool>;
}

/// A template build, for the caller to run in the background.
pub(crate) type BuildTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a template's root disk comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// A raw ext4 image already on the node.
    Rootfs(PathBuf),
    /// An OCI image reference (see [`ImageSource`]), built into the image
    /// cache.
    Image(String),
}

/// What `PrepareTemplate` asks for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareRequest {
    /// The template's stable key (namespace/name@digest).
    pub key: String,
    /// Root disk source.
    pub source: TemplateSource,
    /// Expected digest, when known; an image whose manifest differs fails.
    pub digest: String,
    /// Size an image is built at (the cache keys on it, as a create does).
    pub disk_bytes: u64,
    /// Kernel of the build VM; `None`: the agent's default.
    pub kernel: Option<PathBuf>,
    /// Extra kernel command line of the build VM.
    pub cmdline: String,
    /// Boot, start, wait, snapshot; `None`: the root disk only.
    pub warm: Option<WarmSpec>,
    /// Build again if the last build failed.
    pub retry: bool,
    /// Credentials for the image's registry: used by this build's pull,
    /// dropped with the request, never recorded.
    pub credentials: Option<crate::images::Credentials>,
}

/// A warm build: what the build VM runs and when it counts as ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmSpec {
    /// The snapshot it writes.
    pub snapshot_id: String,
    /// The build VM's shape, which capsules restoring the snapshot keep.
    pub resources: Resources,
    /// The guest's environment (`Init`).
    pub env: BTreeMap<String, String>,
    /// Started detached after boot.
    pub start_command: Vec<String>,
    /// When the guest is ready.
    pub readiness: Readiness,
    /// For start plus readiness.
    pub timeout: Duration,
}

/// How a warm build knows its guest is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// This argv exits 0 in the guest.
    Exec(Vec<String>),
    /// The guest accepts TCP connections on this port.
    TcpPort(u16),
}

/// Where a template stands on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplatePhase {
    /// Being built.
    Preparing,
    /// Root disk (and warm snapshot) on the node.
    Ready,
    /// The last build failed; the next call tries again.
    Failed,
}

/// `TemplateState` in domain form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateStatus {
    /// The template's key.
    pub key: String,
    /// Phase.
    pub phase: TemplatePhase,
    /// Digest of the root disk's source, once known.
    pub digest: Option<String>,
    /// The warm snapshot, once on the node.
    pub snapshot_id: Option<String>,
    /// Why it failed.
    pub reason: Option<Reason>,
    /// The cause of a failure, or what a build is doing; `None` once ready.
    pub message: Option<String>,
}

/// A ready template as recorded on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReadyTemplate {
    pub(crate) key: String,
    pub(crate) digest: String,
    /// The root disk capsules are made over.
    pub(crate) rootfs: PathBuf,
    /// Empty without a warm build.
    pub(crate) snapshot_id: String,
}

#[derive(Clone, Debug)]
enum Slot {
    Preparing(String),
    Ready(ReadyTemplate),
    /// Failed; answered as such until a call sets `retry`.
    Failed {
        failure: Failure,
    },
}

type BuildKey = (String, String);

/// The builds of this node: in memory, plus the ready ones on disk, and
/// what a build needs besides the build VM.
#[derive(Debug)]
pub(crate) struct Builds {
    dir: PathBuf,
    slots: Mutex<HashMap<BuildKey, Slot>>,
    /// One permit per warm build allowed to run.
    warm_gate: Arc<Semaphore>,
    /// Where snapshots live.
    layout: Layout,
    /// Builds template disks from OCI images (the cache a create uses).
    images: Arc<TemplateBuilder>,
    /// Counts failed builds.
    metrics: Arc<Metrics>,
    /// Pause between two readiness probes.
    probe_every: Duration,
    /// How a warm build starts and probes its guest.
    guest: Arc<dyn BuildGuest>,
}

/// What [`Builds::new`] takes.
#[derive(Debug)]
pub(crate) struct BuildSettings {
    /// The agent's state directory.
    pub(crate) state_dir: PathBuf,
    /// Warm builds run at once.
    pub(crate) warm_builds: usize,
    /// Builds template disks from OCI images.
    pub(crate) images: Arc<TemplateBuilder>,
    /// Counts failed builds.
    pub(crate) metrics: Arc<Metrics>,
    /// Pause between two readiness probes.
    pub(crate) probe_every: Duration,
    /// How a warm build starts and probes its guest.
    pub(crate) guest: Arc<dyn BuildGuest>,
}

impl Builds {
    /// Builds recording ready templates under `<state_dir>/templates`,
    /// running at most `warm_builds` warm builds at once.
    pub(crate) fn new(s: BuildSettings) -> Self {
        Self {
            dir: s.state_dir.join("templates"),
            slots: Mutex::new(HashMap::new()),
            warm_gate: Arc::new(Semaphore::new(s.warm_builds.max(1))),
            layout: Layout::new(&s.state_dir),
            images: s.images,
            metrics: s.metrics,
            probe_every: s.probe_every,
            guest: s.guest,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BuildKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_path(&self, key: &BuildKey) -> PathBuf {
        let mut h = Sha256::new();
        h.update(key.0.as_bytes());
        h.update([0]);
        h.update(key.1.as_bytes());
        self.dir
            .join(format!("{}.json", &format!("{:x}", h.finalize())[..32]))
    }

    fn read_record(&self, key: &BuildKey) -> Option<ReadyTemplate> {
        let body = std::fs::read(self.record_path(key)).ok()?;
        serde_json::from_slice::<ReadyTemplate>(&body)
            .ok()
            .filter(|r| r.key == key.0 && r.snapshot_id == key.1)
    }

    fn write_record(&self, key: &BuildKey, ready: &ReadyTemplate) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.record_path(key);
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(ready).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)?;
        crate::state::sync_dir(&self.dir)
    }

    fn forget_record(&self, key: &BuildKey) {
        let _ = std::fs::remove_file(self.record_path(key));
    }

    /// Ready templates on disk: key → digest.
    fn ready_on_disk(&self) -> Vec<ReadyTemplate> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<ReadyTemplate>(&b).ok())
            .collect()
    }
}

fn status(key: &str, slot: &Slot) -> TemplateStatus {
    let mut s = TemplateStatus {
        key: key.to_string(),
        phase: TemplatePhase::Preparing,
        digest: None,
        snapshot_id: None,
        reason: None,
        message: None,
    };
    match slot {
        Slot::Preparing(doing) => s.message = Some(doing.clone()),
        Slot::Ready(r) => {
            s.phase = TemplatePhase::Ready;
            s.digest = Some(r.digest.clone());
            // The on-disk record keeps "" for a template without a warm build.
            s.snapshot_id = Some(r.snapshot_id.clone()).filter(|id| !id.is_empty());
        }
        Slot::Failed { failure: f, .. } => {
            s.phase = TemplatePhase::Failed;
            s.reason = Some(f.reason);
            s.message = Some(f.message.clone());
        }
    }
    s
}

impl Builds {
    /// Whether what `ready` names is still on the node (a snapshot may
    /// have been deleted since, an image cache cleared).
    fn still_ready(&self, ready: &ReadyTemplate) -> bool {
        ready.rootfs.is_file()
            && (ready.snapshot_id.is_empty()
                || self.snapshot_owner(&ready.snapshot_id).as_deref()
                    == Some(warm::build_uid(&ready.snapshot_id).as_str()))
    }

    /// Records the progress of a running build (shown as its message).
    fn progress(&self, key: &BuildKey, doing: &str) {
        let mut slots = self.lock();
        if let Some(slot @ Slot::Preparing(_)) = slots.get_mut(key) {
            *slot = Slot::Preparing(doing.to_string());
        }
    }

    /// Which capsule wrote snapshot `id` (its metadata's `capsule_uid`);
    /// `None` when no complete snapshot has that id.
    fn snapshot_owner(&self, id: &str) -> Option<String> {
        let meta = self.layout.snapshot_dir(id).join(Layout::SNAPSHOT_META);
        let body = std::fs::read(meta).ok()?;
        serde_json::from_slice::<SnapshotInfo>(&body)
            .ok()
            .map(|i| i.capsule_uid)
    }

    /// Answers where the template of `req` stands; when none ran or the
    /// last one failed, also the build to run in the background (over
    /// `vms`). See the module docs.
    pub(crate) fn prepare(
        self: &Arc<Self>,
        vms: Arc<dyn BuildVms>,
        req: PrepareRequest,
    ) -> Result<(TemplateStatus, Option<BuildTask>), Error> {
        let snapshot_id = req
            .warm
            .as_ref()
            .map(|w| w.snapshot_id.clone())
            .unwrap_or_default();
        let key: BuildKey = (req.key.clone(), snapshot_id);
        if let TemplateSource::Image(r) = &req.source {
            ImageSource::parse(r).map_err(|e| Error::InvalidSpec {
                reason: format!("oci_reference: {e}"),
            })?;
        }
        {
            let mut slots = self.lock();
            match slots.get(&key) {
                Some(slot @ Slot::Preparing(_)) => return Ok((status(&req.key, slot), None)),
                Some(Slot::Ready(r)) if self.still_ready(r) => {
                    return Ok((status(&req.key, &Slot::Ready(r.clone())), None));
                }
                Some(Slot::Ready(_)) => self.forget_record(&key),
                Some(slot @ Slot::Failed { .. }) if !req.retry => {
                    return Ok((status(&req.key, slot), None));
                }
                Some(Slot::Failed { .. }) => {}
                None => {
                    if let Some(r) = self.read_record(&key) {
                        if self.still_ready(&r) {
                            let slot = Slot::Ready(r);
                            let st = status(&req.key, &slot);
                            slots.insert(key, slot);
                            return Ok((st, None));
                        }
                        self.forget_record(&key);
                    }
                }
            }
            slots.insert(key.clone(), Slot::Preparing("queued".into()));
        }
        tracing::info!(template = %req.key, snapshot = %key.1, "preparing template");
        let builds = self.clone();
        let task_key = key.clone();
        let task: BuildTask = Box::pin(async move {
            let key = task_key;
            let result = warm::build(&builds, vms.as_ref(), &key, &req).await;
            let slot = match result {
                Ok(ready) => {
                    if let Err(e) = builds.write_record(&key, &ready) {
                        tracing::warn!(template = %key.0, error = &e as &dyn std::error::Error, "record a ready template");
                    }
                    tracing::info!(template = %key.0, snapshot = %key.1, "template ready");
                    Slot::Ready(ready)
                }
                Err(f) => {
                    tracing::error!(template = %key.0, snapshot = %key.1, reason = f.reason.as_str(), message = %f.message, "template build failed");
                    builds.metrics.error("template");
                    Slot::Failed { failure: f }
                }
            };
            builds.lock().insert(key, slot);
        });
        Ok((
            status(&key.0, &Slot::Preparing("queued".into())),
            Some(task),
        ))
    }

    /// Templates ready on this node: key → digest.
    pub(crate) fn ready(&self) -> BTreeMap<String, String> {
        self.ready_on_disk()
            .into_iter()
            .filter(|r| self.still_ready(r))
            .map(|r| (r.key, r.digest))
            .collect()
    }
}
