//! [`FakeVmm`]: a [`Vmm`] that records every call and keeps the state
//! machine Cloud Hypervisor keeps (no VM → Created → Running ⇄ Paused), so
//! the capsule supervisor's tests see the same errors they would see from
//! CH. Failures can be scripted per action.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::ch::api::{
    Action, DiskConfig, NetConfig, PciDeviceInfo, RestoreConfig, VmConfig, VmCounters, VmInfo,
    VmResize, VmState, VmmPingResponse,
};
use super::ch::{ApiError, ErrorKind};
use super::process::{ProcessIdentity, VmmExit};
use super::{Error, StartSpec, Vmm, VmmHandle};
use crate::sys::process::ExitStatus;

/// One recorded call.
#[derive(Clone, Debug, PartialEq)]
pub enum FakeCall {
    /// `start`.
    Start(StartSpec),
    /// `adopt`.
    Adopt(String),
    /// An API call: action, capsule and, for fd-passing calls, how many
    /// fds came with it.
    Api {
        /// Capsule.
        capsule: String,
        /// Endpoint.
        action: Action,
        /// fds passed.
        fds: usize,
    },
    /// `stop`.
    Stop(String),
}

#[derive(Debug, Default)]
struct Vm {
    state: Option<VmState>,
    config: Option<VmConfig>,
    nics: Vec<String>,
    running: bool,
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<FakeCall>,
    vms: HashMap<String, Vm>,
    failures: HashMap<Action, VecDeque<ErrorKind>>,
    exits: HashMap<String, VmmExit>,
    next_pid: i32,
}

/// A recording fake VMM.
#[derive(Debug, Default)]
pub struct FakeVmm {
    inner: Mutex<Inner>,
    state_dir: PathBuf,
}

impl FakeVmm {
    /// A fake whose handles point into `state_dir` (nothing is written).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_pid: 10_000,
                ..Inner::default()
            }),
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// Makes the next call of `action` fail with `kind`.
    pub fn fail_next(&self, action: Action, kind: ErrorKind) {
        self.with(|i| i.failures.entry(action).or_default().push_back(kind));
    }

    /// Makes `wait_exit` of `capsule` return `exit` (as if the VMM ended).
    pub fn exit(&self, capsule: &str, exit: VmmExit) {
        self.with(|i| {
            i.exits.insert(capsule.to_string(), exit);
            if let Some(vm) = i.vms.get_mut(capsule) {
                vm.running = false;
            }
        });
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.with(|i| i.calls.clone())
    }

    /// The API actions called for `capsule`, in order.
    pub fn actions(&self, capsule: &str) -> Vec<Action> {
        self.with(|i| {
            i.calls
                .iter()
                .filter_map(|c| match c {
                    FakeCall::Api {
                        capsule: c, action, ..
                    } if c == capsule => Some(*action),
                    _ => None,
                })
                .collect()
        })
    }

    /// The VM state of `capsule` as CH would report it (`None`: no VM).
    pub fn state(&self, capsule: &str) -> Option<VmState> {
        self.with(|i| i.vms.get(capsule).and_then(|v| v.state))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            // A panicking test thread poisoned it; the data is still usable.
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// Records an API call, applies a scripted failure, then `step`.
    fn api<T>(
        &self,
        vm: &VmmHandle,
        action: Action,
        fds: usize,
        step: impl FnOnce(&mut Vm) -> Result<T, ErrorKind>,
    ) -> Result<T, Error> {
        let res = self.with(|i| {
            i.calls.push(FakeCall::Api {
                capsule: vm.capsule.clone(),
                action,
                fds,
            });
            if let Some(kind) = i.failures.get_mut(&action).and_then(VecDeque::pop_front) {
                return Err(kind);
            }
            match i.vms.get_mut(&vm.capsule) {
                Some(v) if v.running => step(v),
                _ => Err(ErrorKind::Unreachable),
            }
        });
        res.map_err(|kind| Error::Api {
            action,
            capsule: vm.capsule.clone(),
            socket: vm.api_socket.clone(),
            source: match kind {
                ErrorKind::Unreachable => {
                    ApiError::Connect(std::io::ErrorKind::ConnectionRefused.into())
                }
                kind => ApiError::Status {
                    status: 500,
                    kind,
                    chain: vec!["Error from API".into(), format!("fake {kind:?}")],
                },
            },
        })
    }
}

fn need(vm: &Vm, ok: &[VmState]) -> Result<(), ErrorKind> {
    match vm.state {
        None => Err(ErrorKind::NotCreated),
        Some(s) if ok.contains(&s) => Ok(()),
        Some(_) => Err(ErrorKind::InvalidState),
    }
}

impl Vmm for FakeVmm {
    async fn start(&self, spec: &StartSpec) -> Result<VmmHandle, Error> {
        let dir = self.state_dir.join(&spec.capsule);
        let pid = self.with(|i| {
            i.calls.push(FakeCall::Start(spec.clone()));
            i.next_pid += 1;
            i.vms.insert(
                spec.capsule.clone(),
                Vm {
                    running: true,
                    ..Vm::default()
                },
            );
            i.exits.remove(&spec.capsule);
            i.next_pid
        });
        Ok(VmmHandle {
            capsule: spec.capsule.clone(),
            api_socket: dir.join("api.sock"),
            event_file: dir.join("events.json"),
            process: ProcessIdentity {
                pid,
                start_time_ticks: 1,
            },
            memory_bytes: spec.memory_bytes,
        })
    }

    async fn adopt(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.with(|i| {
            i.calls.push(FakeCall::Adopt(vm.capsule.clone()));
            match i.vms.get(&vm.capsule) {
                Some(v) if v.running => Ok(()),
                _ => Err(Error::AdoptVmm {
                    capsule: vm.capsule.clone(),
                    pid: vm.process.pid,
                    reason: "fake: not running".into(),
                }),
            }
        })
    }

    async fn ping(&self, vm: &VmmHandle) -> Result<VmmPingResponse, Error> {
        self.api(vm, Action::VmmPing, 0, |_| {
            Ok(VmmPingResponse {
                version: "0.0.0-fake".into(),
                ..VmmPingResponse::default()
            })
        })
    }

    async fn create(&self, vm: &VmmHandle, config: &VmConfig) -> Result<(), Error> {
        self.api(vm, Action::VmCreate, 0, |v| {
            if v.state.is_some() {
                return Err(ErrorKind::AlreadyExists);
            }
            v.state = Some(VmState::Created);
            v.config = Some(config.clone());
            Ok(())
        })
    }

    async fn add_net(
        &self,
        vm: &VmmHandle,
        net: &NetConfig,
        taps: &[BorrowedFd<'_>],
    ) -> Result<Option<PciDeviceInfo>, Error> {
        self.api(vm, Action::VmAddNet, taps.len(), |v| {
            need(v, &[VmState::Created, VmState::Running, VmState::Paused])?;
            let id = net
                .id
                .clone()
                .unwrap_or_else(|| format!("_net{}", v.nics.len()));
            if v.nics.contains(&id) {
                return Err(ErrorKind::Conflict);
            }
            v.nics.push(id.clone());
            Ok((v.state != Some(VmState::Created)).then(|| PciDeviceInfo {
                id,
                bdf: "0000:00:05.0".into(),
            }))
        })
    }

    async fn add_disk(
        &self,
        vm: &VmmHandle,
        disk: &DiskConfig,
    ) -> Result<Option<PciDeviceInfo>, Error> {
        self.api(vm, Action::VmAddDisk, 0, |v| {
            need(v, &[VmState::Created, VmState::Running, VmState::Paused])?;
            Ok((v.state != Some(VmState::Created)).then(|| PciDeviceInfo {
                id: disk.id.clone().unwrap_or_else(|| "_disk1".into()),
                bdf: "0000:00:06.0".into(),
            }))
        })
    }

    async fn remove_device(&self, vm: &VmmHandle, id: &str) -> Result<(), Error> {
        self.api(vm, Action::VmRemoveDevice, 0, |v| {
            need(v, &[VmState::Running])?;
            let before = v.nics.len();
            v.nics.retain(|n| n != id);
            if v.nics.len() == before {
                return Err(ErrorKind::DeviceNotFound);
            }
            Ok(())
        })
    }

    async fn boot(&self, vm: &VmmHandle) -> Result<(), Error> {
        let result = self.api(vm, Action::VmBoot, 0, |v| {
            need(v, &[VmState::Created])?;
            v.state = Some(VmState::Running);
            Ok(())
        });
        if result.is_err() {
            // As ChVmm does: a failed boot is followed by vm.delete.
            let _ = self.delete(vm).await;
        }
        result
    }

    async fn pause(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.api(vm, Action::VmPause, 0, |v| {
            need(v, &[VmState::Running])?;
            v.state = Some(VmState::Paused);
            Ok(())
        })
    }

    async fn resume(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.api(vm, Action::VmResume, 0, |v| {
            need(v, &[VmState::Paused])?;
            v.state = Some(VmState::Running);
            Ok(())
        })
    }

    async fn snapshot(&self, vm: &VmmHandle, _dir: &Path) -> Result<(), Error> {
        self.api(vm, Action::VmSnapshot, 0, |v| need(v, &[VmState::Paused]))
    }

    async fn resize(&self, vm: &VmmHandle, _resize: &VmResize) -> Result<(), Error> {
        self.api(vm, Action::VmResize, 0, |v| {
            need(v, &[VmState::Running, VmState::Paused])
        })
    }

    async fn shutdown_vm(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.api(vm, Action::VmShutdown, 0, |v| {
            need(v, &[VmState::Running, VmState::Paused])?;
            v.state = Some(VmState::Created);
            Ok(())
        })
    }

    async fn restore(
        &self,
        vm: &VmmHandle,
        config: &RestoreConfig,
        net_fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        self.api(vm, Action::VmRestore, net_fds.len(), |v| {
            if v.state.is_some() {
                return Err(ErrorKind::AlreadyExists);
            }
            let wanted: u32 = config.net_fds.iter().map(|n| n.num_fds).sum();
            if wanted as usize != net_fds.len() {
                return Err(ErrorKind::InvalidRequest);
            }
            v.state = Some(if config.resume == Some(true) {
                VmState::Running
            } else {
                VmState::Paused
            });
            Ok(())
        })
    }

    async fn info(&self, vm: &VmmHandle) -> Result<VmInfo, Error> {
        self.api(vm, Action::VmInfo, 0, |v| {
            let state = v.state.ok_or(ErrorKind::NotCreated)?;
            Ok(VmInfo {
                config: serde_json::to_value(&v.config).unwrap_or_default(),
                state,
                memory_actual_size: v
                    .config
                    .as_ref()
                    .and_then(|c| c.memory.as_ref())
                    .map(|m| m.size),
                device_tree: Default::default(),
            })
        })
    }

    async fn counters(&self, vm: &VmmHandle) -> Result<VmCounters, Error> {
        self.api(vm, Action::VmCounters, 0, |v| {
            v.state.ok_or(ErrorKind::NotCreated)?;
            Ok(v.nics
                .iter()
                .map(|n| {
                    let c = [
                        ("rx_bytes", 0),
                        ("rx_frames", 0),
                        ("tx_bytes", 0),
                        ("tx_frames", 0),
                    ];
                    (
                        n.clone(),
                        c.iter().map(|(k, x)| (k.to_string(), *x)).collect(),
                    )
                })
                .collect())
        })
    }

    async fn delete(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.api(vm, Action::VmDelete, 0, |v| {
            v.state = None;
            v.config = None;
            v.nics.clear();
            Ok(())
        })
    }

    async fn stop(&self, vm: &VmmHandle) -> Result<(), Error> {
        self.with(|i| {
            i.calls.push(FakeCall::Stop(vm.capsule.clone()));
            i.vms.remove(&vm.capsule);
            i.exits.insert(vm.capsule.clone(), VmmExit::Requested);
        });
        Ok(())
    }

    async fn wait_exit(&self, vm: &VmmHandle) -> Result<VmmExit, Error> {
        loop {
            if let Some(exit) = self.with(|i| i.exits.get(&vm.capsule).copied()) {
                return Ok(exit);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

impl FakeVmm {
    /// Simulates a VMM crash of `capsule` (killed by `signal`).
    pub fn crash(&self, capsule: &str, signal: i32) {
        self.exit(
            capsule,
            VmmExit::Crashed(ExitStatus::Signaled {
                signal,
                core_dumped: false,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::cgroup::CgroupLimits;

    fn spec(name: &str) -> StartSpec {
        StartSpec {
            capsule: name.into(),
            netns: None,
            limits: CgroupLimits::build_for_vm(1, 1 << 28),
            memory_bytes: 1 << 28,
            confine: Default::default(),
        }
    }

    #[tokio::test]
    async fn records_calls_and_keeps_ch_state_rules() {
        let fake = FakeVmm::new(Path::new("/state"));
        let vm = fake.start(&spec("a")).await.unwrap();
        fake.create(&vm, &VmConfig::default()).await.unwrap();
        let err = fake.pause(&vm).await.unwrap_err();
        assert_eq!(err.api_kind(), Some(ErrorKind::InvalidState));
        fake.boot(&vm).await.unwrap();
        fake.pause(&vm).await.unwrap();
        fake.fail_next(Action::VmResume, ErrorKind::Failed);
        assert_eq!(
            fake.resume(&vm).await.unwrap_err().api_kind(),
            Some(ErrorKind::Failed)
        );
        fake.resume(&vm).await.unwrap();
        assert_eq!(fake.state("a"), Some(VmState::Running));
        assert_eq!(
            fake.actions("a"),
            vec![
                Action::VmCreate,
                Action::VmPause,
                Action::VmBoot,
                Action::VmPause,
                Action::VmResume,
                Action::VmResume
            ]
        );
        fake.crash("a", libc::SIGKILL);
        assert!(matches!(
            fake.wait_exit(&vm).await.unwrap(),
            VmmExit::Crashed(_)
        ));
        assert_eq!(
            fake.ping(&vm).await.unwrap_err().api_kind(),
            Some(ErrorKind::Unreachable)
        );
    }
}
