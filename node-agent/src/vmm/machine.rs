//! The backend-neutral VM capability the capsule supervisor drives.
//!
//! [`ChVmm`](super::ChVmm) mirrors Cloud Hypervisor's API one call per
//! endpoint; QEMU has no such API (it speaks QMP and takes most of the
//! machine on its command line). The supervisor therefore works in whole
//! lifecycle steps — launch, pause, resume, snapshot, suspend, restore,
//! stop — and each backend turns a step into its own calls: `ChMachine`
//! over `ChVmm`, `QemuMachine` over QMP. A fake that
//! records calls serves the supervisor's unit tests.
//!
//! Every step is idempotent where the backend allows it and leaves nothing
//! behind on failure: a launch that fails has stopped its process and
//! removed its cgroup before it returns.

use std::future::Future;
use std::path::PathBuf;

use super::Error;
use super::cgroup::CgroupLimits;
use super::process::{ProcessIdentity, VmmExit};

/// Which VMM runs a capsule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendKind {
    /// Cloud Hypervisor (needs KVM).
    CloudHypervisor,
    /// QEMU: KVM when it really runs guests, TCG otherwise.
    Qemu,
}

/// What a backend is, for `NodeInfo` and `status.vmm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Which backend.
    pub kind: BackendKind,
    /// The VMM binary's version string.
    pub version: String,
    /// Hardware virtualization in use (false: QEMU TCG, slow).
    pub accelerated: bool,
}

/// Format of the root disk the storage module produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskFormat {
    /// A block device or raw file (dm-snapshot device).
    Raw,
    /// A qcow2 overlay whose backing file is the template's raw image.
    Qcow2,
}

/// The guest's network interface: a TAP the network module made inside the
/// capsule's namespace, opened by name by the VMM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapSpec {
    /// TAP name inside the capsule's netns.
    pub name: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// Everything a backend needs to launch (or restore) one capsule's VM. The
/// capsule supervisor builds it from the capsule spec and the results of
/// the network and storage modules.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    /// Capsule id (the Capsule's UID): names the cgroup and log context.
    pub capsule: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Optional initramfs (the CI kernel loads virtio modules from it).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk from the storage module.
    pub root_disk: PathBuf,
    /// Its format.
    pub root_disk_format: DiskFormat,
    /// The capsule's network namespace (`/run/netns/wrenn-<id>`); the VMM
    /// process runs inside it.
    pub netns: Option<PathBuf>,
    /// The guest NIC, when the capsule has a network.
    pub tap: Option<TapSpec>,
    /// Guest vsock CID (≥ 3).
    pub vsock_cid: u32,
    /// Host Unix socket through which the guest agent is reached with the
    /// `CONNECT <port>\n` handshake (CH's vsock socket, or
    /// vhost-device-vsock's for QEMU).
    pub vsock_socket: PathBuf,
    /// cgroup limits of the VMM process.
    pub limits: CgroupLimits,
    /// Per-capsule runtime directory for sockets, logs and pid files; the
    /// backend owns the files it puts there.
    pub run_dir: PathBuf,
}

/// A running VM as the supervisor journals it: enough to reach it and adopt
/// it after an agent restart.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineHandle {
    /// Which backend runs it.
    pub backend: BackendKind,
    /// Capsule id.
    pub capsule: String,
    /// The VMM process (pid + start time, so a reused pid is not adopted).
    pub process: ProcessIdentity,
    /// Helper processes the backend started (QEMU's vhost-device-vsock).
    pub helpers: Vec<ProcessIdentity>,
    /// Control socket: CH's API socket or QEMU's QMP socket.
    pub control_socket: PathBuf,
    /// Host side of the guest agent's vsock.
    pub vsock_socket: PathBuf,
    /// Guest RAM, which scales snapshot and restore timeouts.
    pub memory_bytes: u64,
}

/// What the VM is doing, as the VMM reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// vCPUs running.
    Running,
    /// vCPUs stopped, memory kept.
    Paused,
    /// The VMM runs but the VM has shut down.
    Shutdown,
}

/// Network counters of the guest NIC as the VMM counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes from the guest.
    pub tx_bytes: u64,
    /// Bytes to the guest.
    pub rx_bytes: u64,
}

/// The lifecycle steps of one capsule's VM.
pub trait Machine: Send + Sync {
    /// Backend, version and whether it is accelerated.
    fn info(&self) -> BackendInfo;

    /// Starts the VMM (and its helpers) in the capsule's netns and cgroup
    /// and boots the guest. On error nothing of it is left running.
    fn launch(
        &self,
        spec: &MachineSpec,
    ) -> impl Future<Output = Result<MachineHandle, Error>> + Send;

    /// Re-attaches to a VM started before an agent restart. Fails when a
    /// process is gone or its pid now belongs to another process.
    fn adopt(&self, vm: &MachineHandle) -> impl Future<Output = Result<(), Error>> + Send;

    /// Stops the vCPUs; memory stays.
    fn pause(&self, vm: &MachineHandle) -> impl Future<Output = Result<(), Error>> + Send;

    /// Starts paused vCPUs again.
    fn resume(&self, vm: &MachineHandle) -> impl Future<Output = Result<(), Error>> + Send;

    /// Writes the VM's memory and device state into `dir` (existing and
    /// empty). The VM must be paused; it stays paused.
    fn snapshot(
        &self,
        vm: &MachineHandle,
        dir: &std::path::Path,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Starts a new VMM from the state in `dir` with `spec`'s netns, TAP,
    /// disk and cgroup, and resumes the guest. TAPs are opened by name, so
    /// the network module recreates them before this is called.
    fn restore(
        &self,
        spec: &MachineSpec,
        dir: &std::path::Path,
    ) -> impl Future<Output = Result<MachineHandle, Error>> + Send;

    /// What the VM is doing now.
    fn state(&self, vm: &MachineHandle)
    -> impl Future<Output = Result<MachineState, Error>> + Send;

    /// Guest NIC counters.
    fn counters(
        &self,
        vm: &MachineHandle,
    ) -> impl Future<Output = Result<NetCounters, Error>> + Send;

    /// Ends the VM and its processes and removes their cgroup. Idempotent:
    /// stopping a VM that is already gone succeeds.
    fn stop(&self, vm: &MachineHandle) -> impl Future<Output = Result<(), Error>> + Send;

    /// Waits until the VMM exits and says why (requested, guest poweroff or
    /// crash).
    fn wait_exit(&self, vm: &MachineHandle) -> impl Future<Output = Result<VmmExit, Error>> + Send;

    /// Waits until host connections may reach the guest's vsock device,
    /// for at most `within`; called before the first dial to a booting or
    /// restored guest. Backends whose vsock takes connections at any time
    /// return at once.
    fn wait_vsock(
        &self,
        vm: &MachineHandle,
        within: std::time::Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = (vm, within);
        std::future::ready(Ok(()))
    }

    /// Gives a running guest a fresh vsock device session, with a fresh
    /// host-side helper, when the host side stopped answering while the
    /// guest runs; the guest sees a transport reset and callers redial.
    /// `Ok(false)`: the backend's vsock has no such failure, nothing done.
    fn heal_vsock(&self, vm: &MachineHandle) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = vm;
        std::future::ready(Ok(false))
    }

    /// What the host sees of a VM whose guest did not answer in time
    /// (processes, run state, logs), one fact per line, for the log line
    /// that reports it before the rollback removes the VM. Best effort;
    /// empty where a backend has nothing to add.
    fn diagnose(&self, vm: &MachineHandle) -> impl Future<Output = String> + Send {
        let _ = vm;
        std::future::ready(String::new())
    }
}
