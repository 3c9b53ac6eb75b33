//! [`Supervisor`]: the capsules of this node, each behind its own lock, and
//! the steps that move them between states. Every step writes the journal
//! before its side effect and undoes what it did when a later step fails.
//!
//! Each operation runs in a task of its own: a gRPC caller that goes away
//! mid-create must not leave a half-made capsule behind, so the caller only
//! awaits the task's result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Mutex as AsyncMutex;

use super::api::{ApiFuture, CapsuleApi, EventStream, SnapshotInfo};
use super::events::{EventBus, EventKind};
use super::model::{CapsuleSpec, CapsuleView, Egress, Error, Record, State};
use super::telemetry::HostFigures;
use crate::guest::GuestToken;
use crate::metrics::{Metrics, Outcome, Step};
use crate::network::{self, CapsuleNet, EgressPolicy, NetOps, Teardown};
use crate::state::Journal;
use crate::storage::{self, BlockStore, CapsuleDisk, DiskRequest};
use crate::vmm::cgroup::CgroupLimits;
use crate::vmm::process::VmmExit;
use crate::vmm::{BackendInfo, DiskFormat, Machine, MachineHandle, MachineSpec, TapSpec};

/// The host capabilities the supervisor drives.
#[derive(Debug)]
pub struct Host<M> {
    /// The VMM backend.
    pub machine: Arc<M>,
    /// Capsule networks.
    pub net: Arc<dyn NetOps>,
    /// Capsule disks.
    pub store: Arc<dyn BlockStore>,
}

impl<M> Clone for Host<M> {
    fn clone(&self) -> Self {
        Self {
            machine: self.machine.clone(),
            net: self.net.clone(),
            store: self.store.clone(),
        }
    }
}

/// Supervisor settings.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Kernel used when a spec names none.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Command line every guest gets before its own additions.
    pub base_cmdline: String,
    /// Events kept for `WatchEvents` cursors.
    pub event_history: usize,
    /// How to reach each guest's agent after boot and restore; `None`
    /// (unit tests over fake machines) skips the guest step and the guest
    /// memory figure.
    pub guest: Option<GuestSettings>,
    /// Where capsule histories, step durations and error counts go; the
    /// agent shares it with the sampler and the admin server.
    pub metrics: Arc<Metrics>,
    /// Where each VMM's CPU and RSS are read; `None` (fake machines, whose
    /// pids are not real) samples only disk, network and guest figures.
    pub figures: Option<HostFigures>,
    /// Builds template disks from OCI images.
    pub templates: Arc<crate::images::TemplateBuilder>,
    /// Warm template builds run at once; more wait their turn.
    pub warm_builds: usize,
    /// Pause between two readiness probes of a warm build.
    pub warm_probe_every: std::time::Duration,
    /// How a warm build starts and probes its guest; `None`: through the
    /// guest agent (with `guest`'s settings) and the capsule's namespace.
    pub build_guest: Option<Arc<dyn super::warm::BuildGuest>>,
}

/// Reaching the guest agent over the VMM's vsock socket.
#[derive(Clone, Copy, Debug)]
pub struct GuestSettings {
    /// vsock port `wrenn-guest` listens on.
    pub port: u32,
    /// Per-call bounds.
    pub timeouts: crate::guest::Timeouts,
    /// How long a boot or restore may take until the agent answers.
    pub ready_within: std::time::Duration,
    /// How long one guest memory reading may take (dial included). Well
    /// under the sampler's per-capsule deadline, so a hung guest costs
    /// only its own figure, not the host's.
    pub sample_within: std::time::Duration,
}

impl Default for GuestSettings {
    fn default() -> Self {
        Self {
            port: crate::guest::AGENT_PORT,
            timeouts: crate::guest::Timeouts::default(),
            // TCG boots take seconds to tens of seconds on a busy node.
            ready_within: std::time::Duration::from_secs(180),
            sample_within: std::time::Duration::from_millis(250),
        }
    }
}

impl SupervisorConfig {
    /// Defaults for `state_dir` and `kernel`.
    pub fn new(state_dir: &Path, kernel: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initramfs: None,
            // Template disks carry wrenn-guest at GUEST_PATH (images module).
            // no_timer_check: the kernel's PIT-through-IO-APIC check fails at
            // random under TCG on a busy node, and its fallback can stall boot.
            base_cmdline: format!(
                "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init={} reboot=k panic=1 init_on_free=1 no_timer_check",
                crate::images::GUEST_PATH
            ),
            event_history: 4096,
            guest: None,
            metrics: Metrics::new(),
            figures: None,
            templates: Arc::new(crate::images::TemplateBuilder::new(
                crate::images::TemplateSettings {
                    cache_dir: state_dir.join("images"),
                    // Where the node-agent container image carries it.
                    guest_binary: PathBuf::from("/opt/wrenn/share/wrenn-guest"),
                    pull: crate::images::PullOptions::default(),
                    cache_max_bytes: crate::images::quota::DEFAULT_MAX_BYTES,
                    // Set by the agent from --image-dir; none refuses
                    // every local image.
                    image_dirs: crate::images::ImageDirs::default(),
                },
            )),
            warm_builds: 1,
            warm_probe_every: std::time::Duration::from_secs(1),
            build_guest: None,
        }
    }
}

/// Where things live under the state directory.
#[derive(Clone, Debug)]
pub struct Layout {
    state_dir: PathBuf,
}

impl Layout {
    /// The layout under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// Per-capsule VMM runtime dirs (`<state>/vmm`); `ChMachine`'s
    /// `HostPaths::state_dir` must be this.
    pub fn vmm_root(&self) -> PathBuf {
        self.state_dir.join("vmm")
    }

    /// A capsule's VMM runtime dir (sockets, logs).
    pub fn run_dir(&self, uid: &str) -> PathBuf {
        self.vmm_root().join(uid)
    }

    /// Where a suspended capsule's memory image lives.
    pub fn suspend_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("capsules").join(uid).join("suspend")
    }

    /// Hard links to the snapshot disks capsules are made over, kept while
    /// any capsule or snapshot depends on them (see `capsule::bases`).
    pub fn bases_root(&self) -> PathBuf {
        self.state_dir.join("bases")
    }

    /// Named snapshots (`<state>/snapshots`).
    pub fn snapshots_root(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// A named snapshot's directory.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_root().join(id)
    }

    /// Where a named snapshot is written before it is renamed into place.
    pub fn snapshot_staging(&self, id: &str) -> PathBuf {
        self.snapshots_root().join(format!(".{id}.tmp"))
    }
}

/// Per-capsule slot in the map.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The record; `None` once the capsule is gone (deleted, or its create
    /// rolled back). Held for the whole of every operation.
    pub(crate) lock: Arc<AsyncMutex<Option<Record>>>,
    /// The latest view, readable without waiting for an operation.
    pub(crate) view: Mutex<CapsuleView>,
    /// Raised by a delete: an in-flight create stops at its next step.
    pub(crate) cancel: AtomicBool,
    /// A warm template's build VM ([`Record::internal`]): reachable only
    /// through the template code, never through the capsule API.
    pub(crate) internal: bool,
}

impl Entry {
    pub(crate) fn view(&self) -> CapsuleView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The state last shown, without waiting for an operation.
    pub(crate) fn state(&self) -> State {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).state
    }
}

pub(crate) struct Shared<M> {
    pub(crate) host: Host<M>,
    pub(crate) cfg: SupervisorConfig,
    pub(crate) layout: Layout,
    pub(crate) journal: Journal,
    pub(crate) backend: BackendInfo,
    pub(crate) capsules: Mutex<BTreeMap<String, Arc<Entry>>>,
    pub(crate) bus: EventBus,
    /// Watchers and other background tasks, aborted by `shutdown`.
    pub(crate) tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Templates prepared ahead of time (`PrepareTemplate`).
    pub(crate) templates: super::prepare::Registry,
    /// Held from linking a base until the record naming it is journaled,
    /// and while bases are collected.
    pub(crate) bases: Mutex<()>,
    /// Capsules recovery could not read: nothing of theirs is touched.
    pub(crate) quarantine: crate::state::Quarantine,
}

impl<M> std::fmt::Debug for Shared<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("state_dir", &self.cfg.state_dir)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The node's capsules.
pub struct Supervisor<M> {
    pub(crate) shared: Arc<Shared<M>>,
}

impl<M> std::fmt::Debug for Supervisor<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt(f)
    }
}

impl<M> Clone for Supervisor<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

pub(crate) use wrenn_proto::unix_nanos_now as now_nanos;

pub(super) fn net_id(uid: &str) -> Result<network::CapsuleId, Error> {
    network::CapsuleId::new(uid).map_err(|e| Error::InvalidSpec {
        reason: e.to_string(),
    })
}

fn disk_id(uid: &str) -> Result<storage::CapsuleId, Error> {
    storage::CapsuleId::new(uid).map_err(|e| Error::InvalidSpec {
        reason: e.to_string(),
    })
}

pub(super) fn policy(egress: &Egress) -> Result<EgressPolicy, Error> {
    Ok(match egress {
        Egress::Allow => EgressPolicy::Allow,
        Egress::Deny => EgressPolicy::Deny,
        Egress::AllowList(cidrs) => EgressPolicy::AllowList(
            cidrs
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|e: network::ParseCidrError| Error::InvalidSpec {
                            reason: format!("egress CIDR {c:?}: {e}"),
                        })
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Runs blocking host work (netlink threads, loop ioctls) off the runtime.
pub(super) async fn blocking<T: Send + 'static>(
    uid: &str,
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Aborted {
            what,
            uid: uid.to_string(),
        })?
}

fn remove_dir(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Files {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn files(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Files {
        action,
        path,
        source,
    }
}

impl<M: Machine + 'static> Supervisor<M> {
    /// A supervisor with no capsules. Call
    /// [`recover`](Supervisor::recover) before serving.
    pub fn new(host: Host<M>, cfg: SupervisorConfig) -> Self {
        let backend = host.machine.info();
        let templates = super::prepare::Registry::new(&cfg.state_dir, cfg.warm_builds);
        let shared = Arc::new(Shared {
            layout: Layout::new(&cfg.state_dir),
            journal: Journal::new(&cfg.state_dir),
            bus: EventBus::starting_now(cfg.event_history),
            backend,
            host,
            cfg,
            capsules: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(Vec::new()),
            templates,
            bases: Mutex::new(()),
            quarantine: crate::state::Quarantine::default(),
        });
        // The image cache drops no template disk this supervisor's
        // capsules or snapshots reach.
        let weak = Arc::downgrade(&shared);
        let users: std::sync::Weak<dyn crate::images::CacheUsers> = weak;
        shared.cfg.templates.set_users(users);
        Self { shared }
    }

    /// The layout of the state directory.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// Where capsule histories and step durations are recorded.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.cfg.metrics
    }

    /// Ends every event watch and stops every background task (crash
    /// watchers). Capsules keep running: this is what an agent exit does to
    /// the supervisor.
    pub fn shutdown(&self) {
        self.shared.bus.close();
        let tasks = std::mem::take(&mut *self.shared.lock_tasks());
        for t in tasks {
            t.abort();
        }
    }

    /// The entry of `uid`, if it is a user capsule (`internal: false`) or
    /// a build VM (`internal: true`).
    pub(crate) fn entry(&self, uid: &str, internal: bool) -> Option<Arc<Entry>> {
        self.shared
            .lock_map()
            .get(uid)
            .filter(|e| e.internal == internal)
            .cloned()
    }

    /// Runs `op` on `uid`'s record under its lock, in a task of its own.
    /// `internal` picks build VMs instead of user capsules.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        uid: &str,
        what: &'static str,
        internal: bool,
        op: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared<M>>, Arc<Entry>, Record) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = (Option<Record>, Result<T, Error>)> + Send,
    {
        let entry = self.entry(uid, internal).ok_or_else(|| Error::NotFound {
            uid: uid.to_string(),
        })?;
        let shared = self.shared.clone();
        let owned_uid = uid.to_string();
        let task = tokio::spawn(async move {
            let mut guard = entry.lock.clone().lock_owned().await;
            let Some(rec) = guard.take() else {
                return Err(Error::NotFound { uid: owned_uid });
            };
            let (rec, result) = op(shared.clone(), entry.clone(), rec).await;
            *guard = rec;
            if let Err(e) = &result {
                shared.count_error(e);
            }
            result
        });
        task.await.map_err(|_| Error::Aborted {
            what,
            uid: uid.to_string(),
        })?
    }
}

impl<M> Shared<M> {
    pub(crate) fn lock_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.capsules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Journals `rec`, then updates the view and publishes a change.
    pub(crate) fn commit(&self, entry: &Entry, rec: &Record) -> Result<(), Error> {
        self.journal
            .write(&rec.uid, rec)
            .map_err(|source| Error::Journal {
                uid: rec.uid.clone(),
                source: Box::new(source),
            })?;
        self.show(entry, rec);
        Ok(())
    }

    /// Updates the view (and publishes) without journaling: for states
    /// that only exist in memory and for the final view of a gone capsule.
    pub(crate) fn show(&self, entry: &Entry, rec: &Record) {
        let view = rec.view(&self.backend);
        let changed = {
            let mut cur = entry.view.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *cur != view;
            *cur = view.clone();
            changed
        };
        if changed && !rec.internal {
            self.bus.publish(EventKind::StateChanged, view);
        }
    }

    /// Forgets a capsule that is gone, publishing `Deleted`.
    pub(crate) fn forget(&self, entry: &Entry, rec: &Record) {
        let mut map = self.lock_map();
        if map
            .get(&rec.uid)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
        {
            map.remove(&rec.uid);
        }
        drop(map);
        self.cfg.metrics.remove(&rec.uid);
        if !rec.internal {
            self.bus
                .publish(EventKind::Deleted, rec.view(&self.backend));
        }
    }

    pub(crate) fn track(&self, handle: tokio::task::AbortHandle) {
        let mut tasks = self.lock_tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }
}

impl<M: Machine + 'static> Shared<M> {
    /// The machine spec of `rec` with its network and disk.
    pub(crate) fn machine_spec(
        &self,
        rec: &Record,
        net: &CapsuleNet,
        disk: &CapsuleDisk,
    ) -> MachineSpec {
        let spec = &rec.spec;
        let mac = net
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let cmdline =
            super::cmdline::build(&self.cfg.base_cmdline, &net.kernel_ip_arg(), &spec.cmdline);
        let run_dir = self.layout.run_dir(&rec.uid);
        MachineSpec {
            capsule: rec.uid.clone(),
            vcpus: spec.resources.vcpus,
            memory_bytes: spec.resources.memory_bytes,
            kernel: spec
                .kernel
                .clone()
                .unwrap_or_else(|| self.cfg.kernel.clone()),
            initramfs: self.cfg.initramfs.clone(),
            cmdline,
            root_disk: disk.path.clone(),
            root_disk_format: match disk.format {
                storage::DiskFormat::Raw => DiskFormat::Raw,
                storage::DiskFormat::Qcow2 => DiskFormat::Qcow2,
            },
            netns: Some(net.netns.clone()),
            tap: Some(TapSpec {
                name: net.tap.clone(),
                mac,
            }),
            // Slots are unique per node and start at 1; CIDs start at 3.
            vsock_cid: net.slot.saturating_add(2),
            vsock_socket: run_dir.join("vsock.sock"),
            limits: CgroupLimits::build_for_vm(spec.resources.vcpus, spec.resources.memory_bytes),
            run_dir,
        }
    }

    /// Makes (or adopts) the disk and the network of `rec`, journaling each
    /// before it is made.
    async fn ensure_disk_and_net(
        &self,
        entry: &Entry,
        rec: &mut Record,
    ) -> Result<(CapsuleDisk, CapsuleNet), Error> {
        let uid = rec.uid.clone();
        let base = self.ensure_base(entry, rec).await?;
        // A template build can take minutes; a delete meanwhile wins.
        if entry.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled { uid });
        }
        if !rec.disk {
            rec.disk = true;
            self.commit(entry, rec)?;
        }
        let req = DiskRequest {
            capsule: disk_id(&uid)?,
            template: base,
            size_bytes: rec.spec.resources.disk_bytes,
        };
        let store = self.host.store.clone();
        let u = uid.clone();
        let disk = blocking(&uid, "create disk", move || {
            store.ensure_disk(&req).map_err(|source| Error::Storage {
                action: "create",
                uid: u,
                source: Box::new(source),
            })
        })
        .await?;
        rec.disk_path = Some(disk.path.clone());
        if entry.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled { uid });
        }
        if !rec.network {
            rec.network = true;
            self.commit(entry, rec)?;
        }
        let net = self.host.net.clone();
        let id = net_id(&uid)?;
        let pol = policy(&rec.spec.egress)?;
        let u = uid.clone();
        let capsule_net = blocking(&uid, "set up network", move || {
            let n = net.setup(&id, &pol).map_err(|source| Error::Network {
                action: "set up",
                uid: u.clone(),
                source: Box::new(source),
            })?;
            // A restore opens the TAP by name; make sure it is there.
            net.ensure_tap(&id).map_err(|source| Error::Network {
                action: "recreate tap of",
                uid: u,
                source: Box::new(source),
            })?;
            Ok(n)
        })
        .await?;
        rec.ip = Some(capsule_net.addrs.host.to_string());
        rec.slot = Some(capsule_net.slot);
        rec.netns = Some(capsule_net.netns.clone());
        Ok((disk, capsule_net))
    }

    /// Undoes what `rec` says may exist, newest first: the VM, the network
    /// (slot kept or released), and with `remove_disk` the disk and the
    /// VMM's runtime dir. Every step is tried; the first failure is
    /// returned.
    pub(crate) async fn release(
        &self,
        rec: &mut Record,
        net_mode: Teardown,
        remove_disk: bool,
    ) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let mut first: Option<Error> = None;
        if let Some(vm) = rec.vm.clone() {
            // First, so the sampler does not count a VMM going away as
            // failed readings. The history stays until the capsule goes.
            self.cfg.metrics.detach(&uid);
            match self.host.machine.stop(&vm).await {
                Ok(()) => rec.vm = None,
                Err(source) => {
                    first.get_or_insert(Error::Vm {
                        action: "stop",
                        uid: uid.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
        rec.vm_starting = false;
        if rec.network {
            let net = self.host.net.clone();
            let u = uid.clone();
            let res = blocking(&uid, "tear down network", move || {
                let id = net_id(&u)?;
                net.teardown(&id, net_mode)
                    .map_err(|source| Error::Network {
                        action: "tear down",
                        uid: u,
                        source: Box::new(source),
                    })
            })
            .await;
            match res {
                Ok(()) if net_mode == Teardown::ReleaseSlot => {
                    rec.network = false;
                    rec.ip = None;
                    rec.slot = None;
                }
                Ok(()) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if remove_disk && rec.disk {
            let store = self.host.store.clone();
            let u = uid.clone();
            let res = blocking(&uid, "remove disk", move || {
                let id = disk_id(&u)?;
                store.remove_disk(&id).map_err(|source| Error::Storage {
                    action: "remove",
                    uid: u,
                    source: Box::new(source),
                })
            })
            .await;
            match res {
                Ok(()) => {
                    rec.disk = false;
                    rec.disk_path = None;
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        // The VMM's log stays with a crashed or suspended capsule (it may
        // say why); it goes with the capsule.
        if remove_disk
            && rec.vm.is_none()
            && let Err(e) = remove_dir(&self.layout.run_dir(&uid))
        {
            first.get_or_insert(e);
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Removes everything of `rec` including its journal, or leaves it
    /// `Failed` (journaled, with what still exists) when an undo fails.
    async fn destroy(&self, entry: &Entry, mut rec: Record) -> (Option<Record>, Result<(), Error>) {
        let released = self.release(&mut rec, Teardown::ReleaseSlot, true).await;
        let removed = released.and_then(|()| {
            self.journal
                .remove(&rec.uid)
                .map_err(|source| Error::Journal {
                    uid: rec.uid.clone(),
                    source: Box::new(source),
                })
        });
        match removed {
            Ok(()) => {
                self.forget(entry, &rec);
                if rec.base_image.is_some() {
                    self.collect_bases();
                }
                (None, Ok(()))
            }
            Err(e) => {
                rec.state = State::Failed;
                rec.reason = e.reason().into();
                rec.message = e.chain();
                if let Err(j) = self.commit(entry, &rec) {
                    tracing::error!(capsule = %rec.uid, error = &j as &dyn std::error::Error, "journal a failed teardown");
                }
                (Some(rec), Err(e))
            }
        }
    }

    /// Starts the crash watcher of `vm`.
    pub(crate) fn watch_vm(self: &Arc<Self>, entry: Arc<Entry>, vm: MachineHandle) {
        let shared = self.clone();
        let task = tokio::spawn(async move {
            let exit = shared.host.machine.wait_exit(&vm).await;
            let mut guard = entry.lock.lock().await;
            let Some(rec) = guard.as_mut() else { return };
            // A VM stopped or replaced by an operation is not ours to judge.
            if rec.vm.as_ref() != Some(&vm) {
                return;
            }
            let (state, reason, message) = match exit {
                Ok(VmmExit::Requested) => return,
                Ok(VmmExit::GuestPoweroff) => (
                    State::Stopped,
                    wrenn_crds::reason::Reason::GuestPoweroff,
                    "the guest powered itself off".to_string(),
                ),
                Ok(VmmExit::Crashed(status)) => (
                    State::Failed,
                    wrenn_crds::reason::Reason::VmCrashed,
                    format!("the VMM exited unexpectedly ({status:?})"),
                ),
                Err(e) => (
                    State::Failed,
                    wrenn_crds::reason::Reason::VmmLost,
                    format!("lost track of the VMM: {e}"),
                ),
            };
            tracing::warn!(capsule = %rec.uid, %message, "VMM ended");
            if state == State::Failed {
                shared.cfg.metrics.error("vmm_exit");
            }
            // Release the runtime (cgroup, namespace); the slot and disk
            // stay until the capsule is deleted.
            if let Err(e) = shared.release(rec, Teardown::KeepSlot, false).await {
                tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "release a dead VM");
            }
            rec.state = state;
            rec.reason = reason.into();
            rec.message = message;
            if let Err(e) = shared.commit(&entry, rec) {
                tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "journal a dead VM");
            }
        });
        self.track(task.abort_handle());
    }
}

// ---- operations -------------------------------------------------------------

impl<M: Machine + 'static> Supervisor<M> {
    /// Creates `uid`, or returns it when it exists with an equal spec.
    pub async fn create(
        &self,
        uid: &str,
        spec: CapsuleSpec,
        initial: State,
    ) -> Result<CapsuleView, Error> {
        self.create_with(uid, spec, initial, false).await
    }

    /// [`create`](Self::create) of a user capsule or (`internal`) of a
    /// warm template's build VM.
    pub(crate) async fn create_with(
        &self,
        uid: &str,
        spec: CapsuleSpec,
        initial: State,
        internal: bool,
    ) -> Result<CapsuleView, Error> {
        if !matches!(initial, State::Running | State::Paused | State::Suspended) {
            return Err(Error::InvalidSpec {
                reason: format!("a capsule cannot start {initial}"),
            });
        }
        net_id(uid)?;
        disk_id(uid)?;
        policy(&spec.egress)?;
        self.refuse_quarantined(uid)?;
        let token = GuestToken::generate().map_err(|source| Error::Files {
            action: "read a guest token from",
            path: "/dev/urandom".into(),
            source,
        })?;
        let shared = self.shared.clone();
        let (entry, guard) = {
            let mut map = shared.lock_map();
            if let Some(e) = map.get(uid) {
                let view = e.view();
                if e.internal != internal {
                    return Err(Error::AlreadyExists {
                        uid: uid.to_string(),
                        field: "owner",
                    });
                }
                return match view.spec.first_difference(&spec) {
                    None => Ok(view),
                    Some(field) => Err(Error::AlreadyExists {
                        uid: uid.to_string(),
                        field,
                    }),
                };
            }
            let mut rec = Record::new(uid, &spec);
            rec.internal = internal;
            let lock = Arc::new(AsyncMutex::new(None));
            // Locked before it becomes visible, so no other operation can
            // run before the create.
            let guard = lock.clone().try_lock_owned().map_err(|_| Error::Aborted {
                what: "create",
                uid: uid.to_string(),
            })?;
            let entry = Arc::new(Entry {
                lock,
                view: Mutex::new(rec.view(&shared.backend)),
                cancel: AtomicBool::new(false),
                internal,
            });
            map.insert(uid.to_string(), entry.clone());
            (entry, guard)
        };
        let owned_uid = uid.to_string();
        let task = tokio::spawn(async move {
            let mut guard = guard;
            let mut rec = Record::new(&owned_uid, &spec);
            rec.internal = internal;
            rec.guest_token = Some(token);
            let (rec, result) = shared.create_steps(&entry, rec, initial).await;
            *guard = rec;
            if let Err(e) = &result {
                shared.count_error(e);
            }
            result
        });
        task.await.map_err(|_| Error::Aborted {
            what: "create",
            uid: uid.to_string(),
        })?
    }

    /// Capsules recovery quarantined (see `state::quarantine`).
    pub fn quarantined(&self) -> Vec<crate::state::Quarantined> {
        self.shared.quarantine.list()
    }

    /// A create or delete would write over or remove what a quarantined
    /// capsule's unreadable journal may name.
    fn refuse_quarantined(&self, uid: &str) -> Result<(), Error> {
        match self.shared.quarantine.get(uid) {
            Some(q) => Err(Error::Quarantined {
                uid: uid.to_string(),
                why: q.reason.as_str().to_string(),
            }),
            None => Ok(()),
        }
    }

    /// One capsule.
    pub fn get(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.entry(uid, false)
            .map(|e| e.view())
            .ok_or_else(|| Error::NotFound {
                uid: uid.to_string(),
            })
    }

    /// Every capsule, by UID.
    pub fn list(&self) -> Vec<CapsuleView> {
        let entries: Vec<Arc<Entry>> = self
            .shared
            .lock_map()
            .values()
            .filter(|e| !e.internal)
            .cloned()
            .collect();
        entries.iter().map(|e| e.view()).collect()
    }

    /// Deletes `uid`; `false` when it did not exist.
    pub async fn delete(&self, uid: &str) -> Result<bool, Error> {
        self.delete_with(uid, false).await
    }

    /// [`delete`](Self::delete) of a user capsule or (`internal`) of a
    /// build VM.
    pub(crate) async fn delete_with(&self, uid: &str, internal: bool) -> Result<bool, Error> {
        self.refuse_quarantined(uid)?;
        let Some(entry) = self.entry(uid, internal) else {
            return Ok(false);
        };
        // Raise the flag before queueing for the lock: a create holding it
        // stops at its next step and rolls back.
        entry.cancel.store(true, Ordering::SeqCst);
        let res = self
            .run(
                uid,
                "delete",
                internal,
                |shared, entry, mut rec| async move {
                    let timer = shared.cfg.metrics.start_step(Step::Delete);
                    rec.state = State::Deleting;
                    if let Err(e) = shared.commit(&entry, &rec) {
                        timer.finish(Outcome::Error);
                        return (Some(rec), Err(e));
                    }
                    let (rec, res) = shared.destroy(&entry, rec).await;
                    timer.finish(Outcome::of(&res));
                    (rec, res.map(|()| true))
                },
            )
            .await;
        match res {
            // Gone meanwhile (a cancelled create rolled itself back).
            Err(Error::NotFound { .. }) => Ok(true),
            other => other,
        }
    }

    /// Running → Paused; Paused: no-op.
    pub async fn pause(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "pause", false, |shared, entry, mut rec| async move {
            let res = match rec.state {
                State::Paused => Ok(()),
                State::Running => {
                    shared
                        .timed(Step::Pause, shared.pause_steps(&entry, &mut rec))
                        .await
                }
                other => Err(wrong(
                    &rec.uid,
                    other,
                    "only a running capsule can be paused",
                )),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Paused → Running, Suspended → Running; Running: no-op.
    pub async fn resume(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "resume", false, |shared, entry, mut rec| async move {
            let res = match rec.state {
                State::Running => Ok(()),
                State::Paused => {
                    shared
                        .timed(Step::Resume, shared.resume_paused(&entry, &mut rec))
                        .await
                }
                State::Suspended => {
                    shared
                        .timed(Step::Resume, shared.restore_steps(&entry, &mut rec))
                        .await
                }
                other => Err(wrong(
                    &rec.uid,
                    other,
                    "only a paused or suspended capsule can be resumed",
                )),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Running|Paused → Suspended; Suspended: no-op.
    pub async fn suspend(&self, uid: &str) -> Result<CapsuleView, Error> {
        self.run(uid, "suspend", false, |shared, entry, mut rec| async move {
            let res = match rec.state {
                State::Suspended => Ok(()),
                State::Running | State::Paused => {
                    shared
                        .timed(Step::Suspend, shared.suspend_steps(&entry, &mut rec))
                        .await
                }
                other => Err(wrong(
                    &rec.uid,
                    other,
                    "only a running or paused capsule can be suspended",
                )),
            };
            let view = entry.view();
            (Some(rec), res.map(|()| view))
        })
        .await
    }

    /// Writes snapshot `id` of `uid`; the capsule returns to its mode.
    pub async fn snapshot(&self, uid: &str, id: &str, memory: bool) -> Result<SnapshotInfo, Error> {
        self.snapshot_with(uid, id, memory, false).await
    }

    /// [`snapshot`](Self::snapshot) of a user capsule or (`internal`) of a
    /// build VM.
    pub(crate) async fn snapshot_with(
        &self,
        uid: &str,
        id: &str,
        memory: bool,
        internal: bool,
    ) -> Result<SnapshotInfo, Error> {
        let id = id.to_string();
        self.run(
            uid,
            "snapshot",
            internal,
            move |shared, entry, mut rec| async move {
                let res = match rec.state {
                    State::Running | State::Paused => {
                        shared
                            .timed(
                                Step::Snapshot,
                                shared.snapshot_steps(&entry, &mut rec, &id, memory),
                            )
                            .await
                    }
                    other => Err(wrong(
                        &rec.uid,
                        other,
                        "only a running or paused capsule can be snapshotted; resume it first",
                    )),
                };
                (Some(rec), res)
            },
        )
        .await
    }

    /// Removes snapshot `id`; `false` when absent.
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool, Error> {
        let dir = self.shared.layout.snapshot_dir(id);
        if !dir.exists() {
            return Ok(false);
        }
        remove_dir(&dir)?;
        self.shared.collect_bases();
        Ok(true)
    }

    /// Snapshot ids on the node.
    pub fn snapshots(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.shared.layout.snapshots_root())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Starts a watch after `cursor` (0: current state first).
    pub fn watch(&self, cursor: u64) -> EventStream {
        self.shared.bus.watch(cursor, || self.list())
    }
}

pub(super) fn wrong(uid: &str, state: State, hint: &'static str) -> Error {
    let hint = match state {
        State::Paused if hint.starts_with("only a running") => "resume it first",
        State::Suspended if hint.starts_with("only a running or paused capsule can be snap") => {
            "resume it first"
        }
        State::Failed | State::Stopped => "only delete is possible",
        State::Creating | State::Deleting | State::Resuming | State::Suspending => {
            "wait until it settles"
        }
        _ => hint,
    };
    Error::WrongState {
        uid: uid.to_string(),
        state,
        hint,
    }
}

/// Records a failed step's error on `rec` (shown in `Capsule.message`).
pub(super) fn note(rec: &mut Record, e: &Error) {
    rec.reason = e.reason().into();
    rec.message = e.chain();
}

impl<M: Machine + 'static> Shared<M> {
    async fn create_steps(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        mut rec: Record,
        initial: State,
    ) -> (Option<Record>, Result<CapsuleView, Error>) {
        let uid = rec.uid.clone();
        let timer = self.cfg.metrics.start_step(Step::Create);
        let res: Result<(), Error> = async {
            self.commit(entry, &rec)?;
            let (disk, net) = self.ensure_disk_and_net(entry, &mut rec).await?;
            if entry.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled { uid: uid.clone() });
            }
            rec.vm_starting = true;
            self.commit(entry, &rec)?;
            let spec = self.machine_spec(&rec, &net, &disk);
            self.timed(Step::Boot, async {
                // A snapshot with memory is restored (the guest resumes where
                // it was; guest_up below re-initialises it); anything else boots.
                // A restored guest holds the snapshot's token; a booted one
                // none yet.
                let (action, started, held) = match self.memory_image(&rec)? {
                    Some(image) => {
                        let held = match &rec.spec.source {
                            super::BootSource::Snapshot { id } => self.snapshot_guest_token(id),
                            _ => None,
                        };
                        let vm = self.host.machine.restore(&spec, &image).await;
                        ("restore", vm, held)
                    }
                    None => ("launch", self.host.machine.launch(&spec).await, None),
                };
                let vm = started.map_err(|source| Error::Vm {
                    action,
                    uid: uid.clone(),
                    source: Box::new(source),
                })?;
                rec.vm = Some(vm.clone());
                rec.vm_starting = false;
                self.commit(entry, &rec)?;
                self.guest_up(&rec, &vm, held.as_ref()).await
            })
            .await?;
            if entry.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled { uid: uid.clone() });
            }
            rec.state = State::Running;
            rec.started_unix_nanos = now_nanos();
            self.commit(entry, &rec)?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            if !matches!(e, Error::Cancelled { .. }) {
                tracing::error!(capsule = %uid, error = &e as &dyn std::error::Error, "create failed; rolling back");
            }
            rec.state = State::Deleting;
            self.show(entry, &rec);
            let (rec, undo) = self.destroy(entry, rec).await;
            if let Err(u) = undo {
                tracing::error!(capsule = %uid, error = &u as &dyn std::error::Error, "roll back a failed create");
            }
            // Timed after the rollback: what the caller waited for.
            let res = Err(e);
            timer.finish(super::telemetry::outcome(&res));
            return (rec, res);
        }
        timer.finish(Outcome::Ok);
        if let Some(vm) = rec.vm.clone() {
            self.start_sampling(entry, &rec);
            self.watch_vm(entry.clone(), vm);
        }
        let res = match initial {
            State::Paused => {
                self.timed(Step::Pause, self.pause_steps(entry, &mut rec))
                    .await
            }
            State::Suspended => {
                self.timed(Step::Suspend, self.suspend_steps(entry, &mut rec))
                    .await
            }
            _ => Ok(()),
        };
        let view = entry.view();
        (Some(rec), res.map(|()| view))
    }

    /// Waits until the guest agent answers, then sends `Init` (wall time,
    /// entropy, env, hostname, and the capsule's journaled token,
    /// authorized by `held`: the token the guest already holds, if any).
    /// Skipped when no guest settings are given.
    async fn guest_up(
        &self,
        rec: &Record,
        vm: &MachineHandle,
        held: Option<&GuestToken>,
    ) -> Result<(), Error> {
        let Some(g) = self.cfg.guest else {
            return Ok(());
        };
        let err = |action| {
            let uid = rec.uid.clone();
            move |source| Error::Guest {
                action,
                uid,
                source: Box::new(source),
            }
        };
        // Some VMMs' vsock must not be dialed before the guest set it up.
        let t0 = tokio::time::Instant::now();
        let token = held.map_or("", GuestToken::expose);
        let wait = |within| {
            crate::guest::GuestClient::wait_ready(
                &rec.uid,
                &vm.vsock_socket,
                g.port,
                token,
                g.timeouts,
                within,
            )
        };
        let ready = match self.host.machine.wait_vsock(vm, g.ready_within).await {
            // A third of the budget is many boots' worth; a guest silent
            // that long behind a wedged host-side vsock gets a fresh device
            // once (a no-op where the backend's vsock cannot wedge).
            Ok(()) => match wait(g.ready_within / 3).await {
                Ok(r) => Ok(r),
                Err(first) => match self.host.machine.heal_vsock(vm).await {
                    Ok(_) => wait(g.ready_within.saturating_sub(t0.elapsed())).await,
                    Err(e) => {
                        tracing::warn!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "healing the vsock failed");
                        Err(first)
                    }
                },
            }
            .map_err(err("reach")),
            Err(source) => Err(Error::Vm {
                action: "wait for the vsock of",
                uid: rec.uid.clone(),
                source: Box::new(source),
            }),
        };
        let (mut client, _) = match ready {
            Ok(r) => r,
            Err(e) => {
                // The rollback removes the VM and its run dir: keep what the
                // host saw of it (processes, run state, console, VMM logs) in
                // the agent log, or the cause is gone with it.
                let mut view = self.host.machine.diagnose(vm).await;
                if view.is_empty() {
                    // Only the tail: the guest decides how much it printed.
                    let run_dir = self.layout.run_dir(&rec.uid);
                    let text = tokio::task::spawn_blocking(move || {
                        crate::vmm::logs::console_tail(&run_dir, 16 << 10)
                    })
                    .await
                    .unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    view = lines[lines.len().saturating_sub(25)..].join("\n");
                }
                tracing::error!(capsule = %rec.uid, error = %e.chain(), "guest agent never answered; the host's view:\n{view}");
                return Err(e);
            }
        };
        client
            .init(&crate::guest::InitParams {
                env: rec
                    .spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                hostname: rec.spec.name.clone(),
                access_token: rec
                    .guest_token
                    .as_ref()
                    .map(|t| t.expose().to_string())
                    .ok_or_else(|| crate::guest::Error::NoToken {
                        capsule: rec.uid.clone(),
                    })
                    .map_err(err("init"))?,
                send_wall_time: true,
            })
            .await
            .map_err(err("init"))?;
        Ok(())
    }

    async fn pause_steps(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm.clone() else {
            return Err(wrong(&uid, rec.state, "it has no VM"));
        };
        rec.state = State::Pausing;
        self.show(entry, rec);
        match self.host.machine.pause(&vm).await {
            Ok(()) => {
                rec.state = State::Paused;
                rec.message.clear();
                rec.reason.clear();
                self.commit(entry, rec)
            }
            Err(source) => {
                let e = Error::Vm {
                    action: "pause",
                    uid,
                    source: Box::new(source),
                };
                // A pause that timed out may still have frozen the vCPUs:
                // thaw them, or the capsule is a frozen zombie that says
                // "running" (wrenn-go-notes §11 #18).
                let thawed = match self.host.machine.state(&vm).await {
                    Ok(crate::vmm::MachineState::Paused) => {
                        self.host.machine.resume(&vm).await.is_ok()
                    }
                    Ok(crate::vmm::MachineState::Running) => true,
                    _ => false,
                };
                rec.state = if thawed {
                    State::Running
                } else {
                    State::Failed
                };
                note(rec, &e);
                self.commit(entry, rec)?;
                Err(e)
            }
        }
    }

    async fn resume_paused(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm.clone() else {
            return Err(wrong(&uid, rec.state, "it has no VM"));
        };
        match self.host.machine.resume(&vm).await {
            Ok(()) => {
                rec.state = State::Running;
                rec.message.clear();
                rec.reason.clear();
                self.commit(entry, rec)
            }
            Err(source) => {
                // Still paused, and the call can be retried.
                let e = Error::Vm {
                    action: "resume",
                    uid,
                    source: Box::new(source),
                };
                note(rec, &e);
                self.commit(entry, rec)?;
                Err(e)
            }
        }
    }

    /// Pauses if running; the caller goes back to `prior` on failure.
    async fn freeze(&self, rec: &Record, vm: &MachineHandle, prior: State) -> Result<(), Error> {
        if prior == State::Running {
            self.host
                .machine
                .pause(vm)
                .await
                .map_err(|source| Error::Vm {
                    action: "pause",
                    uid: rec.uid.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Returns a VM frozen by [`freeze`] to `prior`; `Failed` if it will
    /// not thaw.
    async fn thaw(&self, entry: &Entry, rec: &mut Record, vm: &MachineHandle, prior: State) {
        rec.state = prior;
        rec.prior = None;
        if prior == State::Running
            && let Err(source) = self.host.machine.resume(vm).await
        {
            let e = Error::Vm {
                action: "resume",
                uid: rec.uid.clone(),
                source: Box::new(source),
            };
            rec.state = State::Failed;
            note(rec, &e);
        }
        if let Err(e) = self.commit(entry, rec) {
            tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "journal after undo");
        }
    }

    async fn suspend_steps(&self, entry: &Entry, rec: &mut Record) -> Result<(), Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm.clone() else {
            return Err(wrong(&uid, rec.state, "it has no VM"));
        };
        let prior = rec.state;
        rec.prior = Some(prior);
        rec.state = State::Suspending;
        // An image from an earlier suspend is stale from here on.
        rec.suspended_image = false;
        self.commit(entry, rec)?;
        let final_dir = self.layout.suspend_dir(&uid);
        let staging = final_dir.with_extension("tmp");
        let written: Result<(), Error> = async {
            self.freeze(rec, &vm, prior).await?;
            // A fresh directory every time: CH refuses to overwrite files,
            // and may still hold the previous image open (§11 #11).
            remove_dir(&staging)?;
            std::fs::create_dir_all(&staging).map_err(files("create", &staging))?;
            self.host
                .machine
                .snapshot(&vm, &staging)
                .await
                .map_err(|source| Error::Vm {
                    action: "snapshot",
                    uid: uid.clone(),
                    source: Box::new(source),
                })?;
            swap_into_place(&staging, &final_dir)
        }
        .await;
        if let Err(e) = written {
            let _ = remove_dir(&staging);
            note(rec, &e);
            self.thaw(entry, rec, &vm, prior).await;
            return Err(e);
        }
        rec.suspended_image = true;
        self.commit(entry, rec)?;
        // The image is safe: the VMM can go, and with it the RAM.
        if let Err(e) = self.release(rec, Teardown::KeepSlot, false).await {
            rec.state = State::Failed;
            note(rec, &e);
            self.commit(entry, rec)?;
            return Err(e);
        }
        rec.state = State::Suspended;
        rec.prior = None;
        rec.message.clear();
        rec.reason.clear();
        self.commit(entry, rec)
    }

    async fn restore_steps(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        rec: &mut Record,
    ) -> Result<(), Error> {
        let uid = rec.uid.clone();
        // Its own suspend image holds its own token; a record from before
        // tokens gets one now, journaled before the guest is re-keyed.
        let held = rec.guest_token.clone();
        if rec.guest_token.is_none() {
            rec.guest_token = Some(
                GuestToken::generate()
                    .map_err(files("read a guest token from", Path::new("/dev/urandom")))?,
            );
        }
        rec.state = State::Resuming;
        rec.prior = Some(State::Suspended);
        self.commit(entry, rec)?;
        let res: Result<MachineHandle, Error> = async {
            let (disk, net) = self.ensure_disk_and_net(entry, rec).await?;
            rec.vm_starting = true;
            self.commit(entry, rec)?;
            let spec = self.machine_spec(rec, &net, &disk);
            self.timed(Step::Restore, async {
                let vm = self
                    .host
                    .machine
                    .restore(&spec, &self.layout.suspend_dir(&uid))
                    .await
                    .map_err(|source| Error::Vm {
                        action: "restore",
                        uid: uid.clone(),
                        source: Box::new(source),
                    })?;
                // The VMM reset vsock: the guest is reached and
                // re-initialised (clock, entropy) before the capsule counts
                // as running again.
                if let Err(e) = self.guest_up(rec, &vm, held.as_ref()).await {
                    if let Err(stop) = self.host.machine.stop(&vm).await {
                        tracing::error!(capsule = %uid, error = &stop as &dyn std::error::Error, "stop a restored VM whose guest did not answer");
                    }
                    return Err(e);
                }
                Ok(vm)
            })
            .await
        }
        .await;
        match res {
            Ok(vm) => {
                rec.vm = Some(vm.clone());
                rec.vm_starting = false;
                rec.suspended_image = false;
                rec.state = State::Running;
                rec.prior = None;
                rec.started_unix_nanos = now_nanos();
                rec.message.clear();
                rec.reason.clear();
                self.commit(entry, rec)?;
                self.start_sampling(entry, rec);
                self.watch_vm(entry.clone(), vm);
                Ok(())
            }
            Err(e) => {
                // Back to Suspended, retryable: the image is untouched and
                // the slot still ours (§11 #19, #26).
                if let Err(u) = self.release(rec, Teardown::KeepSlot, false).await {
                    tracing::error!(capsule = %uid, error = &u as &dyn std::error::Error, "undo a failed restore");
                }
                rec.state = State::Suspended;
                rec.prior = None;
                note(rec, &e);
                self.commit(entry, rec)?;
                Err(e)
            }
        }
    }

    async fn snapshot_steps(
        &self,
        entry: &Entry,
        rec: &mut Record,
        id: &str,
        memory: bool,
    ) -> Result<SnapshotInfo, Error> {
        let uid = rec.uid.clone();
        let Some(vm) = rec.vm.clone() else {
            return Err(wrong(&uid, rec.state, "it has no VM"));
        };
        let dest = self.layout.snapshot_dir(id);
        if dest.exists() {
            return Err(Error::SnapshotExists { id: id.to_string() });
        }
        let prior = rec.state;
        rec.prior = Some(prior);
        rec.state = State::Snapshotting;
        rec.snapshot_in_progress = Some(id.to_string());
        self.commit(entry, rec)?;
        let staging = self.layout.snapshot_staging(id);
        let written: Result<SnapshotInfo, Error> = async {
            self.freeze(rec, &vm, prior).await?;
            remove_dir(&staging)?;
            let mem_dir = staging.join(super::sources::SNAPSHOT_MEMORY);
            std::fs::create_dir_all(&mem_dir).map_err(files("create", &mem_dir))?;
            if memory {
                self.host
                    .machine
                    .snapshot(&vm, &mem_dir)
                    .await
                    .map_err(|source| Error::Vm {
                        action: "snapshot",
                        uid: uid.clone(),
                        source: Box::new(source),
                    })?;
            }
            // The disk is copied while the vCPUs are stopped, so it matches
            // the memory image.
            if let Some(disk) = rec.disk_path.clone() {
                let to = staging.join(super::sources::snapshot_disk_name(&disk));
                let u = uid.clone();
                blocking(&u, "copy disk", move || {
                    copy_disk(&disk, &to).map_err(files("copy disk to", &to))
                })
                .await?;
            }
            let info = SnapshotInfo {
                id: id.to_string(),
                capsule_uid: uid.clone(),
                size_bytes: dir_allocated_bytes(&staging),
                created_unix_nanos: now_nanos(),
                memory,
                resources: rec.spec.resources,
            };
            // A capsule restored from this memory must prove it is the
            // host to the guest inside: keep the token that memory holds.
            if memory && let Some(token) = &rec.guest_token {
                let path = staging.join(super::sources::SNAPSHOT_GUEST_TOKEN);
                write_secret(&path, token.expose()).map_err(files("write", &path))?;
            }
            let meta = staging.join(super::sources::SNAPSHOT_META);
            let body = serde_json::to_vec_pretty(&info).map_err(|e| Error::Files {
                action: "encode",
                path: meta.clone(),
                source: std::io::Error::other(e),
            })?;
            std::fs::write(&meta, body).map_err(files("write", &meta))?;
            swap_into_place(&staging, &dest)?;
            Ok(info)
        }
        .await;
        rec.snapshot_in_progress = None;
        if let Err(e) = &written {
            let _ = remove_dir(&staging);
            note(rec, e);
        }
        self.thaw(entry, rec, &vm, prior).await;
        written
    }
}

/// Puts a complete `staging` directory at `dest`: the old `dest` (if any) is
/// renamed aside first and removed only after the swap, so a crash leaves
/// one complete directory either way.
fn swap_into_place(staging: &Path, dest: &Path) -> Result<(), Error> {
    crate::state::sync_tree(staging).map_err(files("fsync", staging))?;
    let old = dest.with_extension("old");
    remove_dir(&old)?;
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(files("move aside", dest))?;
    }
    std::fs::rename(staging, dest).map_err(files("rename into place", dest))?;
    if let Some(parent) = dest.parent() {
        crate::state::sync_dir(parent).map_err(files("fsync", parent))?;
    }
    remove_dir(&old)
}

/// Writes `secret` to a new file only root can read.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())
}

/// Copies a disk (a file or a block device) keeping holes where the source
/// reads zeros, so a sparse CoW stays sparse.
fn copy_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len: u64 = 0;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
        len += n as u64;
    }
    dst.set_len(len)?;
    dst.sync_all()
}

fn dir_allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

impl<M: Machine + 'static> CapsuleApi for Supervisor<M> {
    fn backend(&self) -> BackendInfo {
        self.shared.backend.clone()
    }
    fn create<'a>(
        &'a self,
        uid: &'a str,
        spec: CapsuleSpec,
        initial: State,
    ) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::create(self, uid, spec, initial))
    }
    fn get(&self, uid: &str) -> Result<CapsuleView, Error> {
        Supervisor::get(self, uid)
    }
    fn list(&self) -> Vec<CapsuleView> {
        Supervisor::list(self)
    }
    fn delete<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, bool> {
        Box::pin(Supervisor::delete(self, uid))
    }
    fn pause<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::pause(self, uid))
    }
    fn resume<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::resume(self, uid))
    }
    fn suspend<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::suspend(self, uid))
    }
    fn update_network<'a>(&'a self, uid: &'a str, egress: Egress) -> ApiFuture<'a, CapsuleView> {
        Box::pin(Supervisor::update_network(self, uid, egress))
    }
    fn snapshot<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        memory: bool,
    ) -> ApiFuture<'a, SnapshotInfo> {
        Box::pin(Supervisor::snapshot(self, uid, id, memory))
    }
    fn delete_snapshot<'a>(&'a self, id: &'a str) -> ApiFuture<'a, bool> {
        Box::pin(Supervisor::delete_snapshot(self, id))
    }
    fn snapshots(&self) -> Vec<String> {
        Supervisor::snapshots(self)
    }
    fn watch(&self, cursor: u64) -> EventStream {
        Supervisor::watch(self, cursor)
    }
    fn prepare_template(&self, req: super::PrepareRequest) -> ApiFuture<'_, super::TemplateStatus> {
        Box::pin(Supervisor::prepare_template(self, req))
    }
    fn templates(&self) -> BTreeMap<String, String> {
        Supervisor::templates(self)
    }
    fn quarantined(&self) -> Vec<crate::state::Quarantined> {
        Supervisor::quarantined(self)
    }
}
