//! [`ChMachine`]: the [`Machine`] steps over Cloud Hypervisor's API
//! ([`ChVmm`]). Launch is start → `vm.create` → `vm.add-net` (TAP by name:
//! CH runs inside the capsule's netns with a fresh sysfs) → `vm.boot`;
//! restore is start → `vm.restore` (which checks the VM is `Paused`) →
//! `vm.resume`. Any failure after the process started stops it (which also
//! removes its cgroup) before the error is returned.
//!
//! `ChVmm` keeps each VMM's files in `<HostPaths::state_dir>/<capsule>`; the
//! supervisor's `MachineSpec::run_dir` is that same directory (see
//! `capsule::Layout::vmm_root`).

use std::path::{Path, PathBuf};

use super::api::{RestoreConfig, VmState, build_file_url};
use super::config::{build_machine_config, build_net_config};
use super::restore::{remove_staged, stage_restore};
use super::vmm::{ChVmm, StartSpec, VmmHandle};
use crate::vmm::Error;
use crate::vmm::machine::{
    BackendInfo, BackendKind, Machine, MachineHandle, MachineSpec, MachineState, NetCounters,
};
use crate::vmm::process::VmmExit;
use crate::vmm::view::build_confine;

/// Cloud Hypervisor as a [`Machine`].
#[derive(Debug)]
pub struct ChMachine {
    vmm: ChVmm,
}

impl ChMachine {
    /// Wraps a `ChVmm`.
    pub fn new(vmm: ChVmm) -> Self {
        Self { vmm }
    }

    /// The wrapped client.
    pub fn vmm(&self) -> &ChVmm {
        &self.vmm
    }

    fn start_spec(spec: &MachineSpec) -> StartSpec {
        StartSpec {
            capsule: spec.capsule.clone(),
            netns: spec.netns.clone(),
            limits: spec.limits,
            memory_bytes: spec.memory_bytes,
            confine: build_confine(spec),
        }
    }

    fn handle(&self, vm: &VmmHandle, spec: &MachineSpec) -> MachineHandle {
        MachineHandle {
            backend: BackendKind::CloudHypervisor,
            capsule: vm.capsule.clone(),
            process: vm.process,
            helpers: Vec::new(),
            control_socket: vm.api_socket.clone(),
            vsock_socket: spec.vsock_socket.clone(),
            memory_bytes: spec.memory_bytes,
        }
    }

    fn vmm_handle(vm: &MachineHandle) -> VmmHandle {
        // ChVmm puts the event file next to the API socket.
        let dir = vm.control_socket.parent().unwrap_or(Path::new("/"));
        VmmHandle {
            capsule: vm.capsule.clone(),
            api_socket: vm.control_socket.clone(),
            event_file: dir.join("events.json"),
            process: vm.process,
            memory_bytes: vm.memory_bytes,
        }
    }

    /// CH binds the vsock socket itself and refuses an existing path.
    fn clear_vsock(spec: &MachineSpec) -> Result<(), Error> {
        match std::fs::remove_file(&spec.vsock_socket) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::PrepareSpawn {
                capsule: spec.capsule.clone(),
                what: "stale vsock socket",
                path: spec.vsock_socket.clone(),
                source,
            }),
        }
    }

    /// Starts a VMM and restores the staged snapshot in `dir` into it.
    async fn restore_staged(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        let vm = self.vmm.start(&Self::start_spec(spec)).await?;
        // The NIC was TAP-by-name when snapshotted, so CH reopens it by name
        // in its netns: no fds to pass. Copy mode: the image is read whole,
        // so nothing keeps it open once the restore returns.
        let config = RestoreConfig {
            source_url: build_file_url(dir),
            prefault: None,
            memory_restore_mode: None,
            resume: None,
            net_fds: Vec::new(),
        };
        let steps = async {
            self.vmm.restore(&vm, &config, &[]).await?;
            self.vmm.resume(&vm).await
        };
        match steps.await {
            Ok(()) => Ok(self.handle(&vm, spec)),
            Err(e) => Err(self.stop_after_failure(&vm, e).await),
        }
    }

    async fn stop_after_failure(&self, vm: &VmmHandle, err: Error) -> Error {
        if let Err(stop) = self.vmm.stop(vm).await {
            tracing::error!(capsule = %vm.capsule, error = &stop as &dyn std::error::Error, "stop a VMM after a failed step");
        }
        err
    }
}

impl Machine for ChMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::CloudHypervisor,
            version: self.vmm.version().raw.clone(),
            accelerated: true,
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        Self::clear_vsock(spec)?;
        let vm = self.vmm.start(&Self::start_spec(spec)).await?;
        let steps = async {
            self.vmm.create(&vm, &build_machine_config(spec)).await?;
            if let Some(net) = build_net_config(spec) {
                self.vmm.add_net(&vm, &net, &[]).await?;
            }
            // A failed boot is followed by vm.delete inside ChVmm::boot.
            self.vmm.boot(&vm).await
        };
        match steps.await {
            Ok(()) => Ok(self.handle(&vm, spec)),
            Err(e) => Err(self.stop_after_failure(&vm, e).await),
        }
    }

    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.vmm.adopt(&Self::vmm_handle(vm)).await
    }

    async fn pause(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.vmm.pause(&Self::vmm_handle(vm)).await
    }

    async fn resume(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.vmm.resume(&Self::vmm_handle(vm)).await
    }

    async fn snapshot(&self, vm: &MachineHandle, dir: &Path) -> Result<(), Error> {
        // CH writes snapshots by path, and sees only its own run dir (mount
        // namespace and Landlock): it writes there and the agent moves the
        // files into `dir`. Same filesystem (the state dir), so renames.
        let handle = Self::vmm_handle(vm);
        let out = handle
            .event_file
            .parent()
            .unwrap_or(Path::new("/"))
            .join(SNAPSHOT_OUT);
        let capsule = vm.capsule.clone();
        let (o, d) = (out.clone(), dir.to_path_buf());
        let reset = o.clone();
        run_blocking(move || reset_dir(&capsule, &reset)).await?;
        self.vmm.snapshot(&handle, &out).await?;
        let capsule = vm.capsule.clone();
        run_blocking(move || move_files(&capsule, &o, &d)).await
    }

    async fn restore(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        Self::clear_vsock(spec)?;
        // The snapshot may be another capsule's: restore from a copy that
        // names this capsule's disk and sockets (see `restore`).
        let staged = stage_restore(spec, dir)?;
        let restored = self.restore_staged(spec, &staged).await;
        if let Err(e) = remove_staged(spec) {
            tracing::warn!(capsule = %spec.capsule, error = &e as &dyn std::error::Error, "remove a staged restore source");
        }
        restored
    }

    async fn state(&self, vm: &MachineHandle) -> Result<MachineState, Error> {
        let info = self.vmm.info(&Self::vmm_handle(vm)).await?;
        Ok(match info.state {
            VmState::Running => MachineState::Running,
            VmState::Paused | VmState::BreakPoint => MachineState::Paused,
            VmState::Created | VmState::Shutdown => MachineState::Shutdown,
        })
    }

    async fn counters(&self, vm: &MachineHandle) -> Result<NetCounters, Error> {
        let all = self.vmm.counters(&Self::vmm_handle(vm)).await?;
        // Block devices report read/write counters; NICs rx/tx.
        let mut c = NetCounters::default();
        for dev in all.values() {
            c.rx_bytes += dev.get("rx_bytes").copied().unwrap_or(0);
            c.tx_bytes += dev.get("tx_bytes").copied().unwrap_or(0);
        }
        Ok(c)
    }

    async fn stop(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.vmm.stop(&Self::vmm_handle(vm)).await
    }

    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        self.vmm.wait_exit(&Self::vmm_handle(vm)).await
    }
}

/// The run-dir subdirectory CH writes a snapshot into.
const SNAPSHOT_OUT: &str = "snapshot-out";

async fn run_blocking(f: impl FnOnce() -> Result<(), Error> + Send + 'static) -> Result<(), Error> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::PrepareSpawn {
            capsule: String::new(),
            what: "snapshot file task",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// An empty `dir`, whatever a failed earlier snapshot left there.
fn reset_dir(capsule: &str, dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::prepare(capsule, "snapshot output dir", dir)(e)),
    }
    std::fs::create_dir_all(dir).map_err(Error::prepare(capsule, "snapshot output dir", dir))
}

/// Moves every file of `from` into `to` (created if absent), then removes
/// `from`.
fn move_files(capsule: &str, from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(to).map_err(Error::prepare(capsule, "snapshot dir", to))?;
    let entries =
        std::fs::read_dir(from).map_err(Error::prepare(capsule, "snapshot output dir", from))?;
    for entry in entries {
        let entry = entry.map_err(Error::prepare(capsule, "snapshot output dir", from))?;
        let target = to.join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(Error::prepare(
            capsule,
            "move snapshot file",
            &target,
        ))?;
    }
    std::fs::remove_dir(from).map_err(Error::prepare(capsule, "snapshot output dir", from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_maps_to_the_vmm_files_next_to_the_api_socket() {
        let h = MachineHandle {
            backend: BackendKind::CloudHypervisor,
            capsule: "c1".into(),
            process: crate::vmm::process::ProcessIdentity {
                pid: 7,
                start_time_ticks: 9,
            },
            helpers: vec![],
            control_socket: "/s/vmm/c1/api.sock".into(),
            vsock_socket: "/s/vmm/c1/vsock.sock".into(),
            memory_bytes: 1,
        };
        let v = ChMachine::vmm_handle(&h);
        assert_eq!(v.event_file, Path::new("/s/vmm/c1/events.json"));
        assert_eq!(v.process.pid, 7);
    }
}
