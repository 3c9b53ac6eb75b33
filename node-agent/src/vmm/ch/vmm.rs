//! [`ChVmm`]: one Cloud Hypervisor process per capsule and the API calls
//! on it. It binds the API socket and hands CH the listening fd, starts the
//! process through `vmm::process` (netns, cgroup, confinement), and adds
//! the rules that single calls lack: a failed boot or restore is deleted,
//! a restore is confirmed with `vm.info`. Lifecycle steps built from these
//! calls are [`ChMachine`](super::machine::ChMachine)'s.
//!
//! No trait stands over `ChVmm`: it has one implementation, backends differ
//! at [`Machine`](crate::vmm::Machine) (whose fake serves the supervisor's
//! tests), and its calls are checked against real sockets instead, a fake
//! CH API server (`tests/vmm_api.rs`) and a CH stand-in process
//! (`tests/vmm_ch_machine.rs`).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::api::{
    Action, NetConfig, PciDeviceInfo, RestoreConfig, VmConfig, VmCounters, VmInfo,
    VmSnapshotConfig, VmState, VmmPingResponse, build_file_url, endpoint,
};
use super::client::{ChClient, Timeouts};
use super::error::ErrorKind;
use super::version::ChVersion;
use crate::vmm::Error;
use crate::vmm::cgroup::{CgroupLimits, CgroupRoot};
use crate::vmm::process::{
    self, Confine, HostPaths, ProcessIdentity, SpawnRequest, VmmExit, VmmProcess,
};

/// Cloud Hypervisor's command line: the API on an inherited listener, the
/// event monitor, and its own seccomp filters stated explicitly (`true`:
/// a forbidden syscall kills the thread), so a changed default can never
/// turn them off. Landlock is per VM, in the `vm.create` body
/// ([`build_machine_config`](super::config::build_machine_config)).
pub fn build_ch_args(api_fd: std::os::fd::RawFd, event_file: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--api-socket".into(),
        format!("fd={api_fd}").into(),
        "--event-monitor".into(),
        format!("path={}", event_file.display()).into(),
        "--seccomp".into(),
        "true".into(),
    ]
}

/// What a VMM is started with.
#[derive(Clone, Debug, PartialEq)]
pub struct StartSpec {
    /// Capsule name (cgroup, state dir and log context).
    pub capsule: String,
    /// The capsule's network namespace file (`/run/netns/wrenn-<id>`).
    pub netns: Option<PathBuf>,
    /// cgroup limits.
    pub limits: CgroupLimits,
    /// Guest RAM (scales snapshot/restore timeouts).
    pub memory_bytes: u64,
    /// What the process may see and keep (`view::build_confine`).
    pub confine: Confine,
}

/// A started VMM, as the supervisor journals it: enough to reach and adopt
/// it after an agent restart.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmHandle {
    /// Capsule name.
    pub capsule: String,
    /// API socket path.
    pub api_socket: PathBuf,
    /// Event-monitor file.
    pub event_file: PathBuf,
    /// Process identity (pid + start time).
    pub process: ProcessIdentity,
    /// Guest RAM, for timeouts.
    pub memory_bytes: u64,
}

/// Cloud Hypervisor, started as a supervised process per capsule.
#[derive(Debug)]
pub struct ChVmm {
    binary: PathBuf,
    version: ChVersion,
    paths: HostPaths,
    cgroups: CgroupRoot,
    timeouts: Timeouts,
    procs: Mutex<std::collections::HashMap<String, Arc<VmmProcess>>>,
}

/// How long a fresh VMM may take to answer its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after `vmm.shutdown` before signalling.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl ChVmm {
    /// A backend for `binary`, whose version is detected once here.
    pub async fn new(binary: &Path, paths: HostPaths, cgroups: CgroupRoot) -> Result<Self, Error> {
        let binary = &process::resolve_program(binary, std::env::var_os("PATH").as_deref())?;
        let version = ChVersion::detect(binary, Duration::from_secs(10)).await?;
        Ok(Self::with_version(binary, version, paths, cgroups))
    }

    /// A backend whose version is already known.
    pub fn with_version(
        binary: &Path,
        version: ChVersion,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Self {
        Self {
            binary: binary.to_path_buf(),
            version,
            paths,
            cgroups,
            timeouts: Timeouts::default(),
            procs: Mutex::new(Default::default()),
        }
    }

    /// Overrides the per-class timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The detected version.
    pub fn version(&self) -> &ChVersion {
        &self.version
    }

    fn client(&self, vm: &VmmHandle) -> ChClient {
        ChClient::new(&vm.api_socket, &vm.capsule)
            .with_version(self.version.clone())
            .with_timeouts(self.timeouts)
            .with_guest_memory(vm.memory_bytes)
    }

    fn process(&self, capsule: &str) -> Option<Arc<VmmProcess>> {
        self.procs.lock().ok().and_then(|m| m.get(capsule).cloned())
    }

    fn remember(&self, capsule: &str, p: VmmProcess) {
        if let Ok(mut m) = self.procs.lock() {
            m.insert(capsule.to_string(), Arc::new(p));
        }
    }

    fn forget(&self, capsule: &str) {
        if let Ok(mut m) = self.procs.lock() {
            m.remove(capsule);
        }
    }

    /// Starts a VMM with no VM and waits until its API answers.
    pub async fn start(&self, spec: &StartSpec) -> Result<VmmHandle, Error> {
        let dir = process::capsule_dir(&self.paths, &spec.capsule);
        let prep = |what: &'static str, path: &Path| Error::prepare(&spec.capsule, what, path);
        std::fs::create_dir_all(&dir).map_err(prep("state dir", &dir))?;
        // The agent binds the API socket and hands CH the listening fd
        // (`--api-socket fd=`), so the first call needs no polling for the
        // path and a stale socket from a crash is replaced here.
        let api_socket = dir.join("api.sock");
        match std::fs::remove_file(&api_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(prep("stale API socket", &api_socket)(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&api_socket)
            .map_err(prep("API socket", &api_socket))?;
        // A regular file that CH appends to: unlike a pipe, nothing is lost
        // while the agent restarts.
        let event_file = dir.join("events.json");
        let args = build_ch_args(std::os::fd::AsRawFd::as_raw_fd(&listener), &event_file);
        let proc = process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule: &spec.capsule,
                program: &self.binary,
                args,
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: vec![listener.as_fd()],
                confine: spec.confine.clone(),
            },
        )?;
        drop(listener);
        let handle = VmmHandle {
            capsule: spec.capsule.clone(),
            api_socket,
            event_file,
            process: proc.identity(),
            memory_bytes: spec.memory_bytes,
        };
        let client = self.client(&handle);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            match client.call::<endpoint::VmmPing>(&()).await {
                Ok(_) => break,
                Err(e) => {
                    if let Some(status) = proc.try_wait()? {
                        let _ = proc.cgroup().remove();
                        return Err(Error::ExitedEarly {
                            capsule: spec.capsule.clone(),
                            status,
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let _ = proc.stop(Duration::from_secs(1)).await;
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        self.remember(&spec.capsule, proc);
        Ok(handle)
    }

    /// Re-attaches to a VMM started before an agent restart; fails if it is
    /// gone or its pid was reused.
    pub async fn adopt(&self, vm: &VmmHandle) -> Result<(), Error> {
        let proc = VmmProcess::adopt(&self.paths, &self.cgroups, &vm.capsule, vm.process)?;
        self.client(vm).call::<endpoint::VmmPing>(&()).await?;
        self.remember(&vm.capsule, proc);
        Ok(())
    }

    /// `vmm.ping`.
    pub async fn ping(&self, vm: &VmmHandle) -> Result<VmmPingResponse, Error> {
        self.client(vm).call::<endpoint::VmmPing>(&()).await
    }

    /// `vm.create`.
    pub async fn create(&self, vm: &VmmHandle, config: &VmConfig) -> Result<(), Error> {
        self.client(vm).call::<endpoint::VmCreate>(config).await
    }

    /// `vm.add-net` with one TAP fd per queue pair.
    pub async fn add_net(
        &self,
        vm: &VmmHandle,
        net: &NetConfig,
        taps: &[BorrowedFd<'_>],
    ) -> Result<Option<PciDeviceInfo>, Error> {
        self.client(vm)
            .call_with_fds::<endpoint::VmAddNet>(net, taps)
            .await
    }

    /// `vm.boot`. A failed boot leaves a half-built VM in CH (notes §5), so
    /// the VM is deleted before the error is returned; create again to
    /// retry.
    pub async fn boot(&self, vm: &VmmHandle) -> Result<(), Error> {
        let client = self.client(vm);
        let result = client.call::<endpoint::VmBoot>(&()).await;
        if let Err(e) = &result
            && e.api_kind() != Some(ErrorKind::Unreachable)
        {
            // Best effort: the boot error is what the caller needs to see.
            let _ = client.call::<endpoint::VmDelete>(&()).await;
        }
        result
    }

    /// `vm.pause`.
    pub async fn pause(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.client(vm).call::<endpoint::VmPause>(&()).await
    }

    /// `vm.resume`.
    pub async fn resume(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.client(vm).call::<endpoint::VmResume>(&()).await
    }

    /// `vm.snapshot` into `dir` (must exist and be empty; VM paused).
    pub async fn snapshot(&self, vm: &VmmHandle, dir: &Path) -> Result<(), Error> {
        let body = VmSnapshotConfig {
            destination_url: build_file_url(dir),
        };
        self.client(vm).call::<endpoint::VmSnapshot>(&body).await
    }

    /// `vm.restore` with new TAP fds in `net_fds` order. Returns only once
    /// `vm.info` confirms the expected state (`Paused`, or `Running` with
    /// `resume`): a broken restore must not register a zombie VM
    /// (wrenn-go-notes §11 #13). Before v44 a failed restore is deleted
    /// here; later CH does that itself.
    pub async fn restore(
        &self,
        vm: &VmmHandle,
        config: &RestoreConfig,
        net_fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let client = self.client(vm);
        if let Err(e) = client
            .call_with_fds::<endpoint::VmRestore>(config, net_fds)
            .await
        {
            if !self.version.cleans_failed_restore() && e.api_kind() != Some(ErrorKind::Unreachable)
            {
                let _ = client.call::<endpoint::VmDelete>(&()).await;
            }
            return Err(e);
        }
        let expected = if config.resume == Some(true) {
            VmState::Running
        } else {
            VmState::Paused
        };
        let found = client.call::<endpoint::VmInfo>(&()).await?.state;
        if found != expected {
            let _ = client.call::<endpoint::VmDelete>(&()).await;
            return Err(Error::UnexpectedState {
                capsule: vm.capsule.clone(),
                after: Action::VmRestore,
                expected,
                found,
            });
        }
        Ok(())
    }

    /// `vm.info`.
    pub async fn info(&self, vm: &VmmHandle) -> Result<VmInfo, Error> {
        self.client(vm).call::<endpoint::VmInfo>(&()).await
    }

    /// `vm.counters`.
    pub async fn counters(&self, vm: &VmmHandle) -> Result<VmCounters, Error> {
        self.client(vm).call::<endpoint::VmCounters>(&()).await
    }

    /// `vm.delete` (idempotent).
    pub async fn delete(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.client(vm).call::<endpoint::VmDelete>(&()).await
    }

    /// Ends the VMM: `vmm.shutdown`, then SIGTERM/SIGKILL if it lingers;
    /// removes its cgroup. Idempotent.
    pub async fn stop(&self, vm: &VmmHandle) -> Result<(), Error> {
        let proc = match self.process(&vm.capsule) {
            Some(p) => p,
            None => match VmmProcess::adopt(&self.paths, &self.cgroups, &vm.capsule, vm.process) {
                Ok(p) => Arc::new(p),
                // Already gone: only the cgroup may be left.
                Err(Error::AdoptVmm { .. }) => {
                    return self.cgroups.open_capsule(&vm.capsule).remove();
                }
                Err(e) => return Err(e),
            },
        };
        proc.mark_stop_requested();
        // Ask first; a VMM that does not answer gets signals from stop().
        let _ = self.client(vm).call::<endpoint::VmmShutdown>(&()).await;
        proc.stop(STOP_GRACE).await?;
        self.forget(&vm.capsule);
        Ok(())
    }

    /// Waits until the VMM exits and says why.
    pub async fn wait_exit(&self, vm: &VmmHandle) -> Result<VmmExit, Error> {
        let proc = match self.process(&vm.capsule) {
            Some(p) => p,
            None => Arc::new(VmmProcess::adopt(
                &self.paths,
                &self.cgroups,
                &vm.capsule,
                vm.process,
            )?),
        };
        super::events::watch_exit(&proc, &vm.event_file).await
    }
}
