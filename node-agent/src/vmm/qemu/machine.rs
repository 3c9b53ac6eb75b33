//! [`QemuMachine`]: the [`Machine`] steps for QEMU. One capsule is two
//! supervised processes, the vsock helper and QEMU, which
//! [`procs`](super::procs) starts, adopts and ends; this file sequences
//! each step over QMP, using the shape file of [`shape`](super::shape), the
//! migrations of [`migrate`] and the vsock workaround of
//! [`vsock`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::args::{Layout, QMP_SOCKET, VHOST_SOCKET, run_dir};
use super::diagnose;
use super::error::QemuError;
use super::migrate;
use super::probe::{Accel, detect_version, probe_accel};
use super::procs::{HELPER_STOP, Processes, Procs, Timeouts};
use super::qmp::{self, Qmp};
use super::shape::{MACHINE_FILE, read_shape, shape_of, write_shape};
use super::stream;
use super::vsock;
use crate::vmm::Error;
use crate::vmm::cgroup::CgroupRoot;
use crate::vmm::machine::{
    BackendInfo, BackendKind, Machine, MachineHandle, MachineSpec, MachineState, NetCounters,
};
use crate::vmm::process::{self, HostPaths, VmmExit, VmmProcess};

/// How long the vsock may take to answer a handshake after resume.
const VSOCK_PROBE: Duration = Duration::from_secs(2);
/// Guest memory and device state in a snapshot directory.
const MEMORY_FILE: &str = "memory.qemu";

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

/// QEMU behind [`Machine`].
#[derive(Debug)]
pub struct QemuMachine {
    version: String,
    timeouts: Timeouts,
    procs: Processes,
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
            version,
            timeouts: Timeouts::default(),
            procs: Processes::new(qemu, helper, accel, paths, cgroups),
        }
    }

    /// Overrides the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self.procs.set_timeouts(timeouts);
        self
    }

    /// The accelerator in use.
    pub fn accel(&self) -> &Accel {
        self.procs.accel()
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
            self.procs.fresh_helper(vm).await?;
        }
        let n = self.procs.next_plug(capsule);
        vsock::plug(q, capsule, vhost, n, self.timeouts.start).await
    }

    /// Unplugs the vsock device of a running guest and plugs a new one
    /// behind a new helper, then waits for the guest to set it up: the
    /// caller dials next, and a dial while the guest is still setting the
    /// hot-plugged device up ends the new helper's worker for good (see
    /// [`vsock::wait_started`]; seen in about one CI run in six as
    /// `vmm_qemu`'s guest silent for good after its resume, behind a fresh
    /// helper that had used no CPU). A guest slower than
    /// `timeouts.start` is logged and left to the caller's own wait.
    async fn replug_fresh(&self, q: &mut Qmp, vm: &MachineHandle) -> Result<(), Error> {
        vsock::unplug(q, &vm.capsule, self.timeouts.unplug).await?;
        self.procs.fresh_helper(vm).await?;
        let n = self.procs.next_plug(&vm.capsule);
        vsock::plug(
            q,
            &vm.capsule,
            &run_dir(vm).join(VHOST_SOCKET),
            n,
            self.timeouts.start,
        )
        .await?;
        // The VM runs either way: a guest that takes longer is the guest
        // link's to wait for, not a failed resume.
        if let Err(e) = vsock::wait_started(q, &vm.capsule, self.timeouts.start).await {
            tracing::warn!(capsule = %vm.capsule, error = &e as &dyn std::error::Error, "the replugged vsock device is not set up yet");
        }
        Ok(())
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
}

impl Machine for QemuMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Qemu,
            version: self.version.clone(),
            accelerated: *self.procs.accel() == Accel::Kvm,
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        let (handle, procs) = self.procs.start(spec, false).await?;
        self.procs.remember(&spec.capsule, procs);
        Ok(handle)
    }

    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        let (qemu, helpers) = self.procs.adopt_procs(vm)?;
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
        self.procs.remember(
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
        // A helper that left a dial unanswered is not trusted again: one
        // that still accepts its vhost-user socket can be wedged for good
        // (seen in the vm-tier soak: the old helper replugged after a
        // resume, and no dial was answered for 30 s).
        tracing::info!(capsule = %vm.capsule, "vsock silent after resume; plugging a fresh device with a fresh helper");
        self.replug_fresh(&mut q, vm).await
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
                source: QemuError::ShapeMismatch {
                    taken: format!("{taken:?}"),
                    wanted: format!("{wanted:?}"),
                },
            });
        }
        let (handle, procs) = self.procs.start(spec, true).await?;
        if let Err(e) = self.restore_inner(spec, dir, &handle).await {
            self.procs
                .kill_all(capsule, std::slice::from_ref(&procs.qemu), &procs.helpers)
                .await;
            return Err(e);
        }
        self.procs.remember(capsule, procs);
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
            .procs
            .paths()
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
        let procs = match self.procs.procs_of(vm) {
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
                        VmmProcess::adopt(self.procs.paths(), self.procs.cgroups(), &vm.capsule, *h)
                            .ok()
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
            self.procs.end(p, libc::SIGTERM).await?;
        }
        for p in helpers.iter() {
            self.procs.end(p, HELPER_STOP).await?;
        }
        helpers.clear();
        self.procs.cgroups().open_capsule(&vm.capsule).remove()?;
        let dir = run_dir(vm);
        for f in [QMP_SOCKET, VHOST_SOCKET, MACHINE_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_file(&vm.vsock_socket);
        self.procs.forget(&vm.capsule);
        Ok(())
    }

    /// QEMU exits 0 both when the guest powers off (or reboots, with
    /// `-no-reboot`) and on `quit`; the agent's own stops are marked
    /// before they happen, so a 0 it did not ask for is the guest's.
    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        let (qemu, _) = self.procs.procs_of(vm)?;
        let status = qemu.wait().await?;
        let requested = qemu.stop_was_requested();
        Ok(process::classify_exit(status, false, requested))
    }

    /// Waits until QEMU reports the vsock's vhost backend started (see
    /// `vsock::wait_started` for why a dial before that breaks the helper).
    async fn wait_vsock(&self, vm: &MachineHandle, within: Duration) -> Result<(), Error> {
        let mut q = self.qmp(vm, "wait for vsock").await?;
        vsock::wait_started(&mut q, &vm.capsule, within).await
    }

    /// vhost-device-vsock 0.3 can stop serving for good even after the
    /// guest set its device up (seen at boot: helper idle, guest agent
    /// listening, no handshake answered). A new helper behind a freshly
    /// plugged device serves again, as after a silent resume.
    async fn heal_vsock(&self, vm: &MachineHandle) -> Result<bool, Error> {
        let mut q = self.qmp(vm, "heal vsock").await?;
        tracing::warn!(capsule = %vm.capsule, "vsock silent while the guest runs; plugging a fresh device with a fresh helper");
        self.replug_fresh(&mut q, vm).await?;
        Ok(true)
    }

    async fn diagnose(&self, vm: &MachineHandle) -> String {
        diagnose::report(self.procs.paths(), self.procs.cgroups(), vm).await
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
