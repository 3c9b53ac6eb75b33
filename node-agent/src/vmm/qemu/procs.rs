//! The processes behind each capsule's QEMU: the vsock helper and QEMU
//! itself, spawned supervised in the capsule's netns and cgroup (helper
//! first: QEMU connects to its socket at start), adopted after an agent
//! restart, ended in order, and the helper respawned when it stops
//! listening. Which capsule runs which processes is kept here; what QMP
//! does with them is [`QemuMachine`](super::machine::QemuMachine)'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::args::{Layout, VHOST_SOCKET, build_helper_args, build_qemu_args, helper_args, run_dir};
use super::error::QemuError;
use super::probe::Accel;
use super::qmp::Qmp;
use super::shape::{MACHINE_FILE, read_shape, shape_of, write_shape};
use super::vsock::{self, HELPER_FILE};
use crate::vmm::Error;
use crate::vmm::cgroup::{CgroupLimits, CgroupRoot};
use crate::vmm::logs;
use crate::vmm::machine::{BackendKind, MachineHandle, MachineSpec};
use crate::vmm::process::{self, HostPaths, SpawnRequest, VmmProcess};
use crate::vmm::view;
use wrenn_crds::capsule::MIN_MEMORY_BYTES;

/// How the vsock helper is stopped: it keeps no state, and as init of its
/// own PID namespace it would ignore SIGTERM (it has no handler).
pub(super) const HELPER_STOP: i32 = libc::SIGKILL;

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

/// One capsule's processes.
#[derive(Debug)]
pub(super) struct Procs {
    pub(super) qemu: Arc<VmmProcess>,
    pub(super) helpers: Vec<Arc<VmmProcess>>,
    /// Sequence for hot-plugged chardev/device ids.
    pub(super) plugs: u32,
}

/// Starts, adopts and ends the processes of every capsule's QEMU.
#[derive(Debug)]
pub(super) struct Processes {
    qemu: PathBuf,
    helper: PathBuf,
    accel: Accel,
    paths: HostPaths,
    cgroups: CgroupRoot,
    timeouts: Timeouts,
    running: Mutex<HashMap<String, Procs>>,
}

impl Processes {
    /// Processes of `qemu` (run under `accel`) and `helper`.
    pub(super) fn new(
        qemu: &Path,
        helper: &Path,
        accel: Accel,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Self {
        Self {
            qemu: qemu.to_path_buf(),
            helper: helper.to_path_buf(),
            accel,
            paths,
            cgroups,
            timeouts: Timeouts::default(),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `timeouts` for start-up, QMP and stops.
    pub(super) fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// The accelerator QEMU is started with.
    pub(super) fn accel(&self) -> &Accel {
        &self.accel
    }

    /// The host paths processes are started under.
    pub(super) fn paths(&self) -> &HostPaths {
        &self.paths
    }

    /// The cgroups processes are started in.
    pub(super) fn cgroups(&self) -> &CgroupRoot {
        &self.cgroups
    }

    /// Drops what is known of `capsule`'s processes (they ended).
    pub(super) fn forget(&self, capsule: &str) {
        if let Ok(mut m) = self.running.lock() {
            m.remove(capsule);
        }
    }

    pub(super) fn remember(&self, capsule: &str, procs: Procs) {
        if let Ok(mut m) = self.running.lock() {
            m.insert(capsule.to_string(), procs);
        }
    }

    pub(super) fn next_plug(&self, capsule: &str) -> u32 {
        self.running
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
    pub(super) async fn start(
        &self,
        spec: &MachineSpec,
        incoming: bool,
    ) -> Result<(MachineHandle, Procs), Error> {
        let capsule = spec.capsule.as_str();
        if spec.memory_bytes < MIN_MEMORY_BYTES {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: "check the machine's memory",
                source: QemuError::MemoryTooSmall {
                    bytes: spec.memory_bytes,
                    min: MIN_MEMORY_BYTES,
                },
            });
        }
        let prep = |what: &'static str, path: &Path| Error::prepare(capsule, what, path);
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
    pub(super) async fn fresh_helper(&self, vm: &MachineHandle) -> Result<(), Error> {
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
        if let Ok(mut m) = self.running.lock()
            && let Some(p) = m.get_mut(capsule)
        {
            p.helpers = vec![helper];
        }
        Ok(())
    }

    /// Ends processes (QEMU first: the helper must outlive its frontend)
    /// and removes the shared cgroup once it is empty.
    pub(super) async fn kill_all(
        &self,
        capsule: &str,
        qemu: &[Arc<VmmProcess>],
        helpers: &[Arc<VmmProcess>],
    ) {
        for p in qemu {
            let _ = self.end(p, libc::SIGTERM).await;
        }
        for p in helpers {
            let _ = self.end(p, HELPER_STOP).await;
        }
        let _ = self.cgroups.open_capsule(capsule).remove();
    }

    /// Stops `p` with `first`, then SIGKILL after the grace time.
    pub(super) async fn end(&self, p: &VmmProcess, first: i32) -> Result<(), Error> {
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

    pub(super) fn procs_of(
        &self,
        vm: &MachineHandle,
    ) -> Result<(Arc<VmmProcess>, Vec<Arc<VmmProcess>>), Error> {
        if let Some(p) = self.running.lock().ok().and_then(|m| {
            m.get(&vm.capsule)
                .map(|p| (p.qemu.clone(), p.helpers.clone()))
        }) {
            return Ok(p);
        }
        self.adopt_procs(vm)
    }

    /// Re-attaches to the QEMU and helpers of `vm` started before an agent
    /// restart.
    pub(super) fn adopt_procs(
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
