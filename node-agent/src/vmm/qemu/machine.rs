//! [`QemuMachine`]: the [`Machine`] steps for QEMU. One capsule is two
//! supervised processes in its netns and cgroup, the vsock helper and QEMU;
//! this file starts, adopts and ends them and sequences each step over QMP,
//! using the command lines of [`args`](super::args), the shape file of
//! [`shape`](super::shape), the migrations of [`migrate`](super::migrate)
//! and the vsock workaround of [`vsock`](super::vsock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::args::{
    Layout, QMP_SOCKET, VHOST_SOCKET, build_helper_args, build_qemu_args, helper_args, run_dir,
};
use super::diagnose;
use super::error::QemuError;
use super::migrate;
use super::probe::{Accel, detect_version, probe_accel};
use super::qmp::{self, Qmp};
use super::shape::{MACHINE_FILE, read_shape, shape_of, write_shape};
use super::stream;
use super::vsock::{self, HELPER_FILE};
use crate::vmm::cgroup::{CgroupLimits, CgroupRoot};
use crate::vmm::error::Error;
use crate::vmm::logs;
use crate::vmm::machine::{
    BackendInfo, BackendKind, Machine, MachineHandle, MachineSpec, MachineState, NetCounters,
};
use crate::vmm::process::{self, HostPaths, SpawnRequest, VmmExit, VmmProcess};
use crate::vmm::view;

/// How the vsock helper is stopped: it keeps no state, and as init of its
/// own PID namespace it would ignore SIGTERM (it has no handler).
const HELPER_STOP: i32 = libc::SIGKILL;
/// How long the vsock may take to answer a handshake after resume.
const VSOCK_PROBE: Duration = Duration::from_secs(2);
/// Guest memory and device state in a snapshot directory.
const MEMORY_FILE: &str = "memory.qemu";

/// Bounds on QEMU steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Process start until QMP (or the helper's socket) answers.
    pub start: Duration,
    /// One QMP command.
    pub command: Duration,
    /// vsock hot-unplug (the guest must acknowledge it).
    pub unplug: Duration,
    /// Migration to or from a file, per GiB of guest RAM.
    pub migrate_per_gib: Duration,
    /// SIGTERM to SIGKILL.
    pub stop_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(10),
            command: Duration::from_secs(5),
            unplug: Duration::from_secs(20),
            migrate_per_gib: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// Maps QEMU's run state onto [`MachineState`].
pub fn to_machine_state(status: &str) -> MachineState {
    match status {
        "running" => MachineState::Running,
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" => MachineState::Shutdown,
        // paused, postmigrate, prelaunch, inmigrate, finish-migrate,
        // suspended, save-vm, restore-vm, debug, watchdog, colo.
        _ => MachineState::Paused,
    }
}

/// Guest NIC counters from `/proc/<pid>/net/dev` of a process inside the
/// capsule's netns. The TAP receives what the guest sends.
pub fn parse_net_dev(text: &str, tap: &str) -> Option<NetCounters> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != tap {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes ...
        return Some(NetCounters {
            tx_bytes: *f.first()?,
            rx_bytes: *f.get(8)?,
        });
    }
    None
}

#[derive(Debug)]
struct Procs {
    qemu: Arc<VmmProcess>,
    helpers: Vec<Arc<VmmProcess>>,
    /// Sequence for hot-plugged chardev/device ids.
    plugs: u32,
}

/// QEMU behind [`Machine`].
#[derive(Debug)]
pub struct QemuMachine {
    qemu: PathBuf,
    helper: PathBuf,
    version: String,
    accel: Accel,
    paths: HostPaths,
    cgroups: CgroupRoot,
    timeouts: Timeouts,
    procs: Mutex<HashMap<String, Procs>>,
}

impl QemuMachine {
    /// A backend running `qemu` with `helper` (vhost-device-vsock); the
    /// version is read once and the accelerator probed once.
    pub async fn new(
        qemu: &Path,
        helper: &Path,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Result<Self, Error> {
        let path_var = std::env::var_os("PATH");
        let qemu = &process::resolve_program(qemu, path_var.as_deref())?;
        let helper = &process::resolve_program(helper, path_var.as_deref())?;
        let version = detect_version(qemu).await?;
        let accel = probe_accel(qemu, &paths.proc_root, Path::new("/dev/kvm")).await;
        if let Accel::Tcg { reason } = &accel {
            tracing::warn!(%reason, "QEMU runs guests under TCG (slow)");
        }
        Ok(Self::with_accel(
            qemu, helper, version, accel, paths, cgroups,
        ))
    }

    /// A backend whose version and accelerator are already known.
    pub fn with_accel(
        qemu: &Path,
        helper: &Path,
        version: String,
        accel: Accel,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Self {
        Self {
            qemu: qemu.to_path_buf(),
            helper: helper.to_path_buf(),
            version,
            accel,
            paths,
            cgroups,
            timeouts: Timeouts::default(),
            procs: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The accelerator in use.
    pub fn accel(&self) -> &Accel {
        &self.accel
    }

    async fn qmp(&self, vm: &MachineHandle, step: &'static str) -> Result<Qmp, Error> {
        Qmp::connect(&vm.control_socket, self.timeouts.command)
            .await
            .map_err(|source| Error::Qmp {
                capsule: vm.capsule.clone(),
                step,
                source,
            })
    }

    fn remember(&self, capsule: &str, procs: Procs) {
        if let Ok(mut m) = self.procs.lock() {
            m.insert(capsule.to_string(), procs);
        }
    }

    fn next_plug(&self, capsule: &str) -> u32 {
        self.procs
            .lock()
            .ok()
            .and_then(|mut m| {
                m.get_mut(capsule).map(|p| {
                    p.plugs += 1;
                    p.plugs
                })
            })
            .unwrap_or_else(|| {
                // Adopted after a restart: ids only need to be fresh.
                u32::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() % 100_000)
                        .unwrap_or(0),
                )
                .unwrap_or(0)
                    + 1000
            })
    }

    /// Starts the helper and QEMU; on error both are gone again.
    async fn start(
        &self,
        spec: &MachineSpec,
        incoming: bool,
    ) -> Result<(MachineHandle, Procs), Error> {
        let capsule = spec.capsule.as_str();
        let prep = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::PrepareSpawn {
                capsule: capsule.to_string(),
                what,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(prep("run dir", &spec.run_dir))?;
        let layout = Layout::build(spec);
        write_shape(capsule, &spec.run_dir.join(MACHINE_FILE), &shape_of(spec))?;
        let helper_record = spec.run_dir.join(HELPER_FILE);
        for stale in [
            &layout.qmp,
            &layout.vhost,
            &spec.vsock_socket,
            &helper_record,
        ] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(prep("stale socket", stale)(e)),
            }
        }

        // 1. The vsock helper first: QEMU connects to its socket at start.
        let helper = process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.helper,
                args: build_helper_args(spec, &layout),
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: Vec::new(),
                confine: view::build_helper_confine(),
            },
        )?;
        let helper = Arc::new(helper);
        if let Err(e) = self
            .wait_path(capsule, &helper, &layout.vhost, "vhost-device-vsock")
            .await
        {
            self.kill_all(capsule, &[], std::slice::from_ref(&helper))
                .await;
            return Err(e);
        }

        // 2. QEMU in the same netns and cgroup.
        let qemu = match process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.qemu,
                args: build_qemu_args(spec, &self.accel, &layout, incoming),
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: Vec::new(),
                confine: view::build_confine(spec),
            },
        ) {
            Ok(q) => Arc::new(q),
            Err(e) => {
                self.kill_all(capsule, &[], std::slice::from_ref(&helper))
                    .await;
                return Err(e);
            }
        };
        let handle = MachineHandle {
            backend: BackendKind::Qemu,
            capsule: capsule.to_string(),
            process: qemu.identity(),
            helpers: vec![helper.identity()],
            control_socket: layout.qmp.clone(),
            vsock_socket: spec.vsock_socket.clone(),
            memory_bytes: spec.memory_bytes,
        };
        let procs = Procs {
            qemu,
            helpers: vec![helper],
            plugs: 0,
        };
        if let Err(e) = self.wait_qmp(&handle, &procs.qemu).await {
            self.kill_all(capsule, std::slice::from_ref(&procs.qemu), &procs.helpers)
                .await;
            return Err(e);
        }
        Ok((handle, procs))
    }

    async fn wait_path(
        &self,
        capsule: &str,
        proc: &VmmProcess,
        path: &Path,
        what: &'static str,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.timeouts.start;
        while !path.exists() {
            if let Some(status) = proc.try_wait()? {
                let log = process::capsule_dir(&self.paths, capsule).join(logs::VMM_LOG);
                let tail = tokio::task::spawn_blocking(move || {
                    logs::read_tail(&log, 2048).unwrap_or_default()
                })
                .await
                .unwrap_or_default();
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what,
                    source: QemuError::ExitedAtStart {
                        status,
                        log_tail: tail.trim().to_string(),
                    },
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what,
                    source: QemuError::NoSocket {
                        path: path.to_path_buf(),
                        within: self.timeouts.start,
                    },
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn wait_qmp(&self, vm: &MachineHandle, qemu: &VmmProcess) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.timeouts.start;
        loop {
            match Qmp::connect(&vm.control_socket, self.timeouts.command).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(status) = qemu.try_wait()? {
                        return Err(Error::ExitedEarly {
                            capsule: vm.capsule.clone(),
                            status,
                        });
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(Error::Qmp {
                            capsule: vm.capsule.clone(),
                            step: "start",
                            source: e,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Replaces the vsock helper of a running VM: same guest CID and
    /// sockets, QEMU's network namespace and cgroup. Records the new one in
    /// the run dir for adoption after an agent restart.
    async fn fresh_helper(&self, vm: &MachineHandle) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        let fail = |source| Error::Qemu {
            capsule: capsule.to_string(),
            what: "restart the vsock helper",
            source,
        };
        let (qemu, helpers) = self.procs_of(vm)?;
        let cid = helpers
            .iter()
            .find_map(|h| vsock::helper_cid(&self.paths.proc_root, h.identity().pid))
            .ok_or_else(|| fail(QemuError::HelperCid))?;
        let dir = run_dir(vm);
        let shape = read_shape(capsule, &dir.join(MACHINE_FILE))?;
        let netns = self
            .paths
            .proc_root
            .join(qemu.identity().pid.to_string())
            .join("ns/net");
        for h in &helpers {
            self.end(h, HELPER_STOP).await?;
        }
        let vhost = dir.join(VHOST_SOCKET);
        for stale in [&vhost, &vm.vsock_socket] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(fail(QemuError::RemoveStale {
                        path: stale.clone(),
                        source,
                    }));
                }
            }
        }
        let helper = Arc::new(process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.helper,
                args: helper_args(cid, &vm.vsock_socket, &vhost),
                netns: Some(&netns),
                limits: CgroupLimits::build_for_vm(shape.vcpus, shape.memory_bytes),
                inherit: Vec::new(),
                confine: view::build_helper_confine(),
            },
        )?);
        self.wait_path(capsule, &helper, &vhost, "vhost-device-vsock")
            .await?;
        vsock::record_helper(vm, helper.identity())?;
        if let Ok(mut m) = self.procs.lock()
            && let Some(p) = m.get_mut(capsule)
        {
            p.helpers = vec![helper];
        }
        Ok(())
    }

    /// Ends processes (QEMU first: the helper must outlive its frontend)
    /// and removes the shared cgroup once it is empty.
    async fn kill_all(&self, capsule: &str, qemu: &[Arc<VmmProcess>], helpers: &[Arc<VmmProcess>]) {
        for p in qemu {
            let _ = self.end(p, libc::SIGTERM).await;
        }
        for p in helpers {
            let _ = self.end(p, HELPER_STOP).await;
        }
        let _ = self.cgroups.open_capsule(capsule).remove();
    }

    /// Stops `p` with `first`, then SIGKILL after the grace time.
    async fn end(&self, p: &VmmProcess, first: i32) -> Result<(), Error> {
        p.mark_stop_requested();
        if p.try_wait()?.is_none() {
            let _ = p.signal(first);
            if tokio::time::timeout(self.timeouts.stop_grace, p.wait())
                .await
                .is_err()
            {
                let _ = p.signal(libc::SIGKILL);
                p.wait().await?;
            }
        }
        Ok(())
    }

    async fn run_state(
        &self,
        q: &mut Qmp,
        capsule: &str,
        step: &'static str,
    ) -> Result<String, Error> {
        q.execute(&qmp::QueryStatus)
            .await
            .map(|s| s.status)
            .map_err(|source| Error::Qmp {
                capsule: capsule.to_string(),
                step,
                source,
            })
    }

    /// Plugs a vsock device into the root port. A helper that does not
    /// listen again after an unplug is replaced first.
    async fn plug_vsock(&self, q: &mut Qmp, vm: &MachineHandle, vhost: &Path) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        if !vsock::relistens(vhost).await {
            tracing::info!(
                capsule,
                "vsock helper did not listen again; starting a fresh one"
            );
            self.fresh_helper(vm).await?;
        }
        let n = self.next_plug(capsule);
        vsock::plug(q, capsule, vhost, n, self.timeouts.start).await
    }

    fn migrate_timeout(&self, memory_bytes: u64) -> Duration {
        migrate::timeout(self.timeouts.migrate_per_gib, memory_bytes)
    }

    async fn restore_inner(
        &self,
        spec: &MachineSpec,
        dir: &Path,
        vm: &MachineHandle,
    ) -> Result<(), Error> {
        let capsule = spec.capsule.as_str();
        let memory = dir.join(MEMORY_FILE);
        let transfer = stream::load(&spec.run_dir, &memory, self.timeouts.start)
            .map_err(migrate::stream_err(capsule, "restore", &memory))?;
        let mut q = self.qmp(vm, "restore").await?;
        let within = self.migrate_timeout(spec.memory_bytes);
        migrate::load(
            &mut q,
            capsule,
            transfer,
            &memory,
            within,
            self.timeouts.command,
        )
        .await?;
        self.plug_vsock(&mut q, vm, &Layout::build(spec).vhost)
            .await?;
        self.cont(&mut q, capsule, "restore").await
    }

    async fn cont(&self, q: &mut Qmp, capsule: &str, step: &'static str) -> Result<(), Error> {
        q.execute(&qmp::Cont).await.map_err(|source| Error::Qmp {
            capsule: capsule.to_string(),
            step,
            source,
        })?;
        let state = self.run_state(q, capsule, step).await?;
        if state != "running" {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: step,
                source: QemuError::NotRunning { state },
            });
        }
        Ok(())
    }

    fn procs_of(
        &self,
        vm: &MachineHandle,
    ) -> Result<(Arc<VmmProcess>, Vec<Arc<VmmProcess>>), Error> {
        if let Some(p) = self.procs.lock().ok().and_then(|m| {
            m.get(&vm.capsule)
                .map(|p| (p.qemu.clone(), p.helpers.clone()))
        }) {
            return Ok(p);
        }
        self.adopt_procs(vm)
    }

    /// Re-attaches to the QEMU and helpers of `vm` started before an agent
    /// restart.
    fn adopt_procs(
        &self,
        vm: &MachineHandle,
    ) -> Result<(Arc<VmmProcess>, Vec<Arc<VmmProcess>>), Error> {
        let qemu = Arc::new(VmmProcess::adopt(
            &self.paths,
            &self.cgroups,
            &vm.capsule,
            vm.process,
        )?);
        let mut helpers = Vec::new();
        for h in vsock::current_helpers(vm) {
            helpers.push(Arc::new(VmmProcess::adopt(
                &self.paths,
                &self.cgroups,
                &vm.capsule,
                h,
            )?));
        }
        Ok((qemu, helpers))
    }
}

impl Machine for QemuMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Qemu,
            version: self.version.clone(),
            accelerated: self.accel == Accel::Kvm,
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        let (handle, procs) = self.start(spec, false).await?;
        self.remember(&spec.capsule, procs);
        Ok(handle)
    }

    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        let (qemu, helpers) = self.adopt_procs(vm)?;
        let mut q = self.qmp(vm, "adopt").await?;
        self.run_state(&mut q, &vm.capsule, "adopt").await?;
        // Later plugs must not reuse the id of the device plugged now.
        let plugs = vsock::current(&mut q)
            .await
            .map_err(|source| Error::Qmp {
                capsule: vm.capsule.clone(),
                step: "adopt",
                source,
            })?
            .and_then(|(id, _)| id.trim_start_matches("vsock").parse().ok())
            .unwrap_or(0);
        self.remember(
            &vm.capsule,
            Procs {
                qemu,
                helpers,
                plugs,
            },
        );
        Ok(())
    }

    async fn pause(&self, vm: &MachineHandle) -> Result<(), Error> {
        let mut q = self.qmp(vm, "pause").await?;
        q.execute(&qmp::Stop).await.map_err(|source| Error::Qmp {
            capsule: vm.capsule.clone(),
            step: "pause",
            source,
        })?;
        Ok(())
    }

    /// `cont`, then a vsock check: vhost-device-vsock 0.3 stops serving
    /// for good if host traffic reached it while the vCPUs were stopped (a
    /// dial or a keepalive during the pause), and a fresh device session
    /// heals it. So when the guest agent's port does not answer the
    /// handshake, the vsock device is plugged anew; the guest then sees a
    /// transport reset, as after a restore, and callers redial.
    async fn resume(&self, vm: &MachineHandle) -> Result<(), Error> {
        let mut q = self.qmp(vm, "resume").await?;
        self.cont(&mut q, &vm.capsule, "resume").await?;
        // The probe itself must not reach the device mid-restart; a device
        // that does not come back is plugged anew below.
        let _ = self.wait_vsock(vm, VSOCK_PROBE).await;
        let probe = crate::guest::dial_through_refusals(&vm.vsock_socket, crate::guest::AGENT_PORT);
        if matches!(tokio::time::timeout(VSOCK_PROBE, probe).await, Ok(Ok(_))) {
            return Ok(());
        }
        tracing::info!(capsule = %vm.capsule, "vsock silent after resume; plugging a fresh device");
        vsock::unplug(&mut q, &vm.capsule, self.timeouts.unplug).await?;
        self.plug_vsock(&mut q, vm, &run_dir(vm).join(VHOST_SOCKET))
            .await
    }

    /// Runs the guest for the moment it takes to release its vsock device
    /// (QEMU cannot migrate one), pauses it again, writes memory and device
    /// state to `dir/memory.qemu`, and plugs a vsock device back so a later
    /// resume has one. Leaves the VM paused.
    async fn snapshot(&self, vm: &MachineHandle, dir: &Path) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        let memory = dir.join(MEMORY_FILE);
        let qerr = |step| {
            move |source| Error::Qmp {
                capsule: capsule.to_string(),
                step,
                source,
            }
        };
        let mut q = self.qmp(vm, "snapshot").await?;
        q.execute(&qmp::Cont).await.map_err(qerr("snapshot"))?;
        let unplugged = vsock::unplug(&mut q, capsule, self.timeouts.unplug).await;
        q.execute(&qmp::Stop).await.map_err(qerr("snapshot"))?;
        unplugged?;
        let transfer = migrate::start_save(&mut q, capsule, &run_dir(vm), &memory).await?;
        let within = self.migrate_timeout(vm.memory_bytes);
        let migrated =
            migrate::complete(&mut q, capsule, transfer, &memory, "snapshot", within).await;
        // Whatever happened, the running VM gets its vsock back.
        let plugged = self
            .plug_vsock(&mut q, vm, &run_dir(vm).join(VHOST_SOCKET))
            .await;
        migrated?;
        plugged?;
        let shape = read_shape(capsule, &run_dir(vm).join(MACHINE_FILE))?;
        write_shape(capsule, &dir.join(MACHINE_FILE), &shape)
    }

    async fn restore(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        let capsule = spec.capsule.as_str();
        let taken = read_shape(capsule, &dir.join(MACHINE_FILE))?;
        let wanted = shape_of(spec);
        if !taken.restorable_as(&wanted) {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: "restore",
                source: QemuError::ShapeMismatch { taken, wanted },
            });
        }
        let (handle, procs) = self.start(spec, true).await?;
        if let Err(e) = self.restore_inner(spec, dir, &handle).await {
            self.kill_all(capsule, std::slice::from_ref(&procs.qemu), &procs.helpers)
                .await;
            return Err(e);
        }
        self.remember(capsule, procs);
        Ok(handle)
    }

    async fn state(&self, vm: &MachineHandle) -> Result<MachineState, Error> {
        let mut q = self.qmp(vm, "state").await?;
        let s = self.run_state(&mut q, &vm.capsule, "state").await?;
        Ok(to_machine_state(&s))
    }

    async fn counters(&self, vm: &MachineHandle) -> Result<NetCounters, Error> {
        let shape = read_shape(&vm.capsule, &run_dir(vm).join(MACHINE_FILE))?;
        let Some(tap) = shape.tap else {
            return Ok(NetCounters::default());
        };
        let path = self
            .paths
            .proc_root
            .join(vm.process.pid.to_string())
            .join("net/dev");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Process {
            capsule: vm.capsule.clone(),
            pid: vm.process.pid,
            what: "read net/dev of",
            source,
        })?;
        Ok(parse_net_dev(&text, &tap).unwrap_or_default())
    }

    async fn stop(&self, vm: &MachineHandle) -> Result<(), Error> {
        let procs = match self.procs_of(vm) {
            Ok(p) => Some(p),
            Err(Error::AdoptVmm { .. }) => None,
            Err(e) => return Err(e),
        };
        let (qemu, mut helpers) = match procs {
            Some((q, h)) => (vec![q], h),
            // QEMU is gone; a helper may still run.
            None => (
                Vec::new(),
                vm.helpers
                    .iter()
                    .filter_map(|h| {
                        VmmProcess::adopt(&self.paths, &self.cgroups, &vm.capsule, *h).ok()
                    })
                    .map(Arc::new)
                    .collect(),
            ),
        };
        if let Some(q) = qemu.first() {
            q.mark_stop_requested();
            // Ask first; a QEMU that does not answer gets signals.
            if let Ok(mut c) = Qmp::connect(&vm.control_socket, Duration::from_secs(1)).await {
                let _ = c.execute(&qmp::Quit).await;
            }
        }
        for p in qemu.iter() {
            self.end(p, libc::SIGTERM).await?;
        }
        for p in helpers.iter() {
            self.end(p, HELPER_STOP).await?;
        }
        helpers.clear();
        self.cgroups.open_capsule(&vm.capsule).remove()?;
        let dir = run_dir(vm);
        for f in [QMP_SOCKET, VHOST_SOCKET, MACHINE_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_file(&vm.vsock_socket);
        if let Ok(mut m) = self.procs.lock() {
            m.remove(&vm.capsule);
        }
        Ok(())
    }

    /// QEMU exits 0 both when the guest powers off (or reboots, with
    /// `-no-reboot`) and on `quit`; the agent's own stops are marked
    /// before they happen, so a 0 it did not ask for is the guest's.
    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        let (qemu, _) = self.procs_of(vm)?;
        let status = qemu.wait().await?;
        let requested = qemu.stop_was_requested();
        Ok(process::classify_exit(status, &[], requested))
    }

    /// Waits until QEMU reports the vsock's vhost backend started (see
    /// `vsock::wait_started` for why a dial before that breaks the helper).
    async fn wait_vsock(&self, vm: &MachineHandle, within: Duration) -> Result<(), Error> {
        let mut q = self.qmp(vm, "wait for vsock").await?;
        vsock::wait_started(&mut q, &vm.capsule, within).await
    }

    async fn diagnose(&self, vm: &MachineHandle) -> String {
        diagnose::report(&self.paths, &self.cgroups, vm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_counters_parse() {
        assert_eq!(to_machine_state("running"), MachineState::Running);
        assert_eq!(to_machine_state("postmigrate"), MachineState::Paused);
        assert_eq!(to_machine_state("paused"), MachineState::Paused);
        assert_eq!(to_machine_state("guest-panicked"), MachineState::Shutdown);
        let dev = "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
             tap0:    1500      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(dev, "tap0"),
            Some(NetCounters {
                tx_bytes: 1500,
                rx_bytes: 9000
            })
        );
        assert_eq!(parse_net_dev(dev, "tap1"), None);
    }
}
