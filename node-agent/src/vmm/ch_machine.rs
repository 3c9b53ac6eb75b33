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

use super::ch::api::{
    ImageType, LandlockConfig, NetConfig, RestoreConfig, VmConfig, VmSpec, VmState, build_file_url,
    build_vm_config,
};
use super::ch_restore::{remove_staged, stage_restore};
use super::machine::{
    BackendInfo, BackendKind, DiskFormat, Machine, MachineHandle, MachineSpec, MachineState,
    NetCounters,
};
use super::process::VmmExit;
use super::view::qcow2_backing_chain;
use super::{ChVmm, Error, StartSpec, Vmm, VmmHandle};

/// Queues of the guest NIC: one RX/TX pair (CH's default; a single-queue
/// TAP needs exactly 2).
const NET_QUEUES: u32 = 2;

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
            confine: super::view::build_confine(spec),
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

/// The `vm.create` body for `spec`: the shared builder
/// ([`api::build_vm_config`](super::ch::api::build_vm_config)) plus the
/// initramfs and the disk format. The NIC is added separately, see
/// [`build_net_config`].
pub fn build_machine_config(spec: &MachineSpec) -> VmConfig {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut config = build_vm_config(&VmSpec {
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
        kernel: path(&spec.kernel),
        cmdline: spec.cmdline.clone(),
        root_disk: path(&spec.root_disk),
        serial_file: Some(path(&spec.run_dir.join("serial.log"))),
        vsock: Some((u64::from(spec.vsock_cid), path(&spec.vsock_socket))),
        system_uuid: None,
    });
    config.payload.initramfs = spec.initramfs.as_deref().map(path);
    if spec.root_disk_format == DiskFormat::Qcow2
        && let Some(root) = config.disks.first_mut()
    {
        root.image_type = Some(ImageType::Qcow2);
        // The template is the overlay's backing file (off by default
        // since v51).
        root.backing_files = Some(true);
    }
    // Landlock covers the paths of this config by itself (disks, kernel,
    // serial file, vsock socket). Beyond them: the run dir (snapshots are
    // written there, see `snapshot`), the TAP device for the NIC added
    // after `vm.create`, and the qcow2 backing chain.
    let rule = |path: &Path, access: &str| LandlockConfig {
        path: path.to_string_lossy().into_owned(),
        access: access.to_string(),
    };
    config.landlock_enable = Some(true);
    config.landlock_rules.push(rule(&spec.run_dir, "rw"));
    if spec.tap.is_some() {
        config
            .landlock_rules
            .push(rule(Path::new("/dev/net/tun"), "rw"));
    }
    if spec.root_disk_format == DiskFormat::Qcow2 {
        for backing in qcow2_backing_chain(&spec.root_disk) {
            config.landlock_rules.push(rule(&backing, "r"));
        }
    }
    config
}

/// The `vm.add-net` body: the TAP by name, in CH's netns.
pub fn build_net_config(spec: &MachineSpec) -> Option<NetConfig> {
    spec.tap.as_ref().map(|tap| NetConfig {
        id: Some("net0".into()),
        tap: Some(tap.name.clone()),
        mac: Some(tap.mac.clone()),
        num_queues: Some(NET_QUEUES),
        ..NetConfig::default()
    })
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
        // names this capsule's disk and sockets (see `ch_restore`).
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

fn snapshot_err(
    capsule: &str,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> Error {
    let (capsule, path) = (capsule.to_string(), path.to_path_buf());
    move |source| Error::PrepareSpawn {
        capsule,
        what,
        path,
        source,
    }
}

/// An empty `dir`, whatever a failed earlier snapshot left there.
fn reset_dir(capsule: &str, dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(snapshot_err(capsule, "snapshot output dir", dir)(e)),
    }
    std::fs::create_dir_all(dir).map_err(snapshot_err(capsule, "snapshot output dir", dir))
}

/// Moves every file of `from` into `to` (created if absent), then removes
/// `from`.
fn move_files(capsule: &str, from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(to).map_err(snapshot_err(capsule, "snapshot dir", to))?;
    let entries =
        std::fs::read_dir(from).map_err(snapshot_err(capsule, "snapshot output dir", from))?;
    for entry in entries {
        let entry = entry.map_err(snapshot_err(capsule, "snapshot output dir", from))?;
        let target = to.join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(snapshot_err(
            capsule,
            "move snapshot file",
            &target,
        ))?;
    }
    std::fs::remove_dir(from).map_err(snapshot_err(capsule, "snapshot output dir", from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::TapSpec;
    use crate::vmm::cgroup::CgroupLimits;

    fn spec(format: DiskFormat) -> MachineSpec {
        MachineSpec {
            capsule: "c1".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            kernel: "/k/vmlinux".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            root_disk: "/dev/mapper/wrenn-c1".into(),
            root_disk_format: format,
            netns: Some("/run/netns/wrenn-c1".into()),
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: "02:fc:00:00:00:05".into(),
            }),
            vsock_cid: 3,
            vsock_socket: "/s/vmm/c1/vsock.sock".into(),
            limits: CgroupLimits::build_for_vm(2, 512 << 20),
            run_dir: "/s/vmm/c1".into(),
        }
    }

    #[test]
    fn vm_config_sets_what_ch_defaults_wrong() {
        let c = build_machine_config(&spec(DiskFormat::Raw));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["memory"]["thp"], false);
        assert_eq!(json["cpus"]["nested"], false);
        assert_eq!(json["console"]["mode"], "Off");
        assert_eq!(json["disks"][0]["image_type"], "Raw");
        assert!(json["disks"][0].get("backing_files").is_none());
        assert!(json.get("net").is_none(), "the NIC goes through vm.add-net");
        let q = serde_json::to_value(build_machine_config(&spec(DiskFormat::Qcow2))).unwrap();
        assert_eq!(q["disks"][0]["backing_files"], true);
        let net = serde_json::to_value(build_net_config(&spec(DiskFormat::Raw))).unwrap();
        assert_eq!(net["tap"], "tap0");
        assert_eq!(net["num_queues"], 2);
    }

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
