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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::model::{Error, Resources};
use super::supervisor::{Shared, Supervisor};
use super::warm::{self, Failure};
use crate::images::ImageSource;
use crate::vmm::Machine;

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
    pub digest: String,
    /// The warm snapshot, once on the node.
    pub snapshot_id: String,
    /// Why it failed (CamelCase), or empty.
    pub reason: String,
    /// The cause of a failure, or what a build is doing.
    pub message: String,
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

/// The builds of this node: in memory, plus the ready ones on disk.
#[derive(Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
    slots: Mutex<HashMap<BuildKey, Slot>>,
    /// One permit per warm build allowed to run.
    pub(crate) warm_gate: Arc<Semaphore>,
}

impl Registry {
    /// A registry recording ready templates under `<state_dir>/templates`,
    /// running at most `warm_builds` warm builds at once.
    pub(crate) fn new(state_dir: &Path, warm_builds: usize) -> Self {
        Self {
            dir: state_dir.join("templates"),
            slots: Mutex::new(HashMap::new()),
            warm_gate: Arc::new(Semaphore::new(warm_builds.max(1))),
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
        digest: String::new(),
        snapshot_id: String::new(),
        reason: String::new(),
        message: String::new(),
    };
    match slot {
        Slot::Preparing(doing) => s.message = doing.clone(),
        Slot::Ready(r) => {
            s.phase = TemplatePhase::Ready;
            s.digest = r.digest.clone();
            s.snapshot_id = r.snapshot_id.clone();
        }
        Slot::Failed { failure: f, .. } => {
            s.phase = TemplatePhase::Failed;
            s.reason = f.reason.to_string();
            s.message = f.message.clone();
        }
    }
    s
}

impl<M: Machine + 'static> Shared<M> {
    /// Whether what `ready` names is still on the node (a snapshot may
    /// have been deleted since, an image cache cleared).
    pub(crate) fn still_ready(&self, ready: &ReadyTemplate) -> bool {
        ready.rootfs.is_file()
            && (ready.snapshot_id.is_empty()
                || self.warm_snapshot_owner(&ready.snapshot_id).as_deref()
                    == Some(warm::build_uid(&ready.snapshot_id).as_str()))
    }

    /// Records the progress of a running build (shown as its message).
    pub(crate) fn progress(&self, key: &BuildKey, doing: &str) {
        let mut slots = self.templates.lock();
        if let Some(slot @ Slot::Preparing(_)) = slots.get_mut(key) {
            *slot = Slot::Preparing(doing.to_string());
        }
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// Answers where the template of `req` stands, starting its build when
    /// none ran or the last one failed. See the module docs.
    pub async fn prepare_template(&self, req: PrepareRequest) -> Result<TemplateStatus, Error> {
        let shared = self.shared.clone();
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
        let registry = &shared.templates;
        {
            let mut slots = registry.lock();
            match slots.get(&key) {
                Some(slot @ Slot::Preparing(_)) => return Ok(status(&req.key, slot)),
                Some(Slot::Ready(r)) if shared.still_ready(r) => {
                    return Ok(status(&req.key, &Slot::Ready(r.clone())));
                }
                Some(Slot::Ready(_)) => registry.forget_record(&key),
                Some(slot @ Slot::Failed { .. }) if !req.retry => {
                    return Ok(status(&req.key, slot));
                }
                Some(Slot::Failed { .. }) => {}
                None => {
                    if let Some(r) = registry.read_record(&key) {
                        if shared.still_ready(&r) {
                            let slot = Slot::Ready(r);
                            let st = status(&req.key, &slot);
                            slots.insert(key, slot);
                            return Ok(st);
                        }
                        registry.forget_record(&key);
                    }
                }
            }
            slots.insert(key.clone(), Slot::Preparing("queued".into()));
        }
        tracing::info!(template = %req.key, snapshot = %key.1, "preparing template");
        let task_shared = shared.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let shared = task_shared;
            let key = task_key;
            let result = warm::build(&shared, &key, &req).await;
            let slot = match result {
                Ok(ready) => {
                    if let Err(e) = shared.templates.write_record(&key, &ready) {
                        tracing::warn!(template = %key.0, error = &e as &dyn std::error::Error, "record a ready template");
                    }
                    tracing::info!(template = %key.0, snapshot = %key.1, "template ready");
                    Slot::Ready(ready)
                }
                Err(f) => {
                    tracing::error!(template = %key.0, snapshot = %key.1, reason = f.reason, message = %f.message, "template build failed");
                    shared.cfg.metrics.error("template");
                    Slot::Failed { failure: f }
                }
            };
            shared.templates.lock().insert(key, slot);
        });
        shared.track(task.abort_handle());
        Ok(status(&key.0, &Slot::Preparing("queued".into())))
    }

    /// Templates ready on this node: key → digest.
    pub fn templates(&self) -> BTreeMap<String, String> {
        let shared = &self.shared;
        shared
            .templates
            .ready_on_disk()
            .into_iter()
            .filter(|r| shared.still_ready(r))
            .map(|r| (r.key, r.digest))
            .collect()
    }
}
