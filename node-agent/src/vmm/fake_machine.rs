//! [`FakeMachine`]: a [`Machine`] that records every call and keeps a VM
//! state per capsule (running, paused, gone), for the capsule supervisor's
//! unit tests. Failures and delays can be injected per step; `crash` and
//! `poweroff` end a VM as a real VMM exit would.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::Error;
use super::machine::{
    BackendInfo, BackendKind, Machine, MachineHandle, MachineSpec, MachineState, NetCounters,
};
use super::process::{ProcessIdentity, VmmExit};
use crate::sys::process::ExitStatus;

/// A step of the [`Machine`] trait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// `launch`.
    Launch,
    /// `adopt`.
    Adopt,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `snapshot`.
    Snapshot,
    /// `restore`.
    Restore,
    /// `state`.
    State,
    /// `stop`.
    Stop,
}

/// One recorded call: the step, the capsule and, for snapshot and restore,
/// the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineCall {
    /// Step.
    pub step: Step,
    /// Capsule.
    pub capsule: String,
    /// Directory of a snapshot or restore.
    pub dir: Option<PathBuf>,
}

#[derive(Debug)]
struct Vm {
    pid: i32,
    paused: bool,
    exit: watch::Sender<Option<VmmExit>>,
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<MachineCall>,
    vms: HashMap<String, Vm>,
    failures: HashMap<Step, VecDeque<String>>,
    delays: HashMap<Step, Duration>,
    next_pid: i32,
    /// Snapshot dirs written, so a restore from an unwritten one fails.
    images: Vec<PathBuf>,
}

/// The marker file a fake snapshot writes.
pub const FAKE_IMAGE: &str = "fake-vm-state.json";

/// A recording fake backend.
#[derive(Debug, Default)]
pub struct FakeMachine {
    inner: Mutex<Inner>,
}

impl FakeMachine {
    /// A fake with no VMs.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_pid: 20_000,
                ..Inner::default()
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Makes the next call of `step` fail.
    pub fn fail_next(&self, step: Step, why: &str) {
        self.with(|i| {
            i.failures
                .entry(step)
                .or_default()
                .push_back(why.to_string())
        });
    }

    /// Makes every call of `step` take `delay` first (for races).
    pub fn delay(&self, step: Step, delay: Duration) {
        self.with(|i| i.delays.insert(step, delay));
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<MachineCall> {
        self.with(|i| i.calls.clone())
    }

    /// The steps called for `capsule`, in order.
    pub fn steps(&self, capsule: &str) -> Vec<Step> {
        self.with(|i| {
            i.calls
                .iter()
                .filter(|c| c.capsule == capsule)
                .map(|c| c.step)
                .collect()
        })
    }

    /// Capsules with a VM now, sorted.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.with(|i| i.vms.keys().cloned().collect());
        v.sort();
        v
    }

    /// Whether `capsule`'s VM is paused (`None`: no VM).
    pub fn paused(&self, capsule: &str) -> Option<bool> {
        self.with(|i| i.vms.get(capsule).map(|v| v.paused))
    }

    /// Ends `capsule`'s VM as a crash (killed by SIGKILL).
    pub fn crash(&self, capsule: &str) {
        self.end(
            capsule,
            VmmExit::Crashed(ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false,
            }),
        );
    }

    /// Ends `capsule`'s VM as a guest poweroff.
    pub fn poweroff(&self, capsule: &str) {
        self.end(capsule, VmmExit::GuestPoweroff);
    }

    /// Makes `capsule`'s VM vanish without an exit being observed (as
    /// across an agent restart).
    pub fn vanish(&self, capsule: &str) {
        self.with(|i| i.vms.remove(capsule));
    }

    fn end(&self, capsule: &str, exit: VmmExit) {
        if let Some(vm) = self.with(|i| i.vms.remove(capsule)) {
            vm.exit.send_replace(Some(exit));
        }
    }

    async fn call(&self, step: Step, capsule: &str, dir: Option<&Path>) -> Result<(), Error> {
        let delay = self.with(|i| {
            i.calls.push(MachineCall {
                step,
                capsule: capsule.to_string(),
                dir: dir.map(Path::to_path_buf),
            });
            i.delays.get(&step).copied()
        });
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        match self.with(|i| i.failures.get_mut(&step).and_then(VecDeque::pop_front)) {
            Some(why) => Err(Error::AdoptVmm {
                capsule: capsule.to_string(),
                pid: 0,
                reason: format!("fake {step:?} failure: {why}"),
            }),
            None => Ok(()),
        }
    }

    fn gone(vm: &MachineHandle) -> Error {
        Error::AdoptVmm {
            capsule: vm.capsule.clone(),
            pid: vm.process.pid,
            reason: "fake: no such VM".into(),
        }
    }

    fn start_vm(&self, spec: &MachineSpec, paused: bool) -> MachineHandle {
        let (tx, _) = watch::channel(None);
        let pid = self.with(|i| {
            i.next_pid += 1;
            let pid = i.next_pid;
            i.vms.insert(
                spec.capsule.clone(),
                Vm {
                    pid,
                    paused,
                    exit: tx,
                },
            );
            pid
        });
        MachineHandle {
            backend: BackendKind::CloudHypervisor,
            capsule: spec.capsule.clone(),
            process: ProcessIdentity {
                pid,
                start_time_ticks: 1,
            },
            helpers: Vec::new(),
            control_socket: spec.run_dir.join("api.sock"),
            vsock_socket: spec.vsock_socket.clone(),
            memory_bytes: spec.memory_bytes,
        }
    }

    fn with_vm<T>(
        &self,
        vm: &MachineHandle,
        f: impl FnOnce(&mut Vm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.with(|i| match i.vms.get_mut(&vm.capsule) {
            Some(v) if v.pid == vm.process.pid => f(v),
            _ => Err(Self::gone(vm)),
        })
    }
}

impl Machine for FakeMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::CloudHypervisor,
            version: "v0.0-fake".into(),
            accelerated: true,
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        self.call(Step::Launch, &spec.capsule, None).await?;
        Ok(self.start_vm(spec, false))
    }

    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.call(Step::Adopt, &vm.capsule, None).await?;
        self.with_vm(vm, |_| Ok(()))
    }

    async fn pause(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.call(Step::Pause, &vm.capsule, None).await?;
        self.with_vm(vm, |v| {
            v.paused = true;
            Ok(())
        })
    }

    async fn resume(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.call(Step::Resume, &vm.capsule, None).await?;
        self.with_vm(vm, |v| {
            v.paused = false;
            Ok(())
        })
    }

    async fn snapshot(&self, vm: &MachineHandle, dir: &Path) -> Result<(), Error> {
        self.call(Step::Snapshot, &vm.capsule, Some(dir)).await?;
        self.with_vm(vm, |v| {
            if v.paused {
                Ok(())
            } else {
                Err(Error::AdoptVmm {
                    capsule: vm.capsule.clone(),
                    pid: vm.process.pid,
                    reason: "fake: snapshot of a running VM".into(),
                })
            }
        })?;
        let file = dir.join(FAKE_IMAGE);
        std::fs::write(&file, vm.capsule.as_bytes()).map_err(|source| Error::PrepareSpawn {
            capsule: vm.capsule.clone(),
            what: "fake snapshot",
            path: file,
            source,
        })?;
        self.with(|i| i.images.push(dir.to_path_buf()));
        Ok(())
    }

    async fn restore(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        self.call(Step::Restore, &spec.capsule, Some(dir)).await?;
        // Any capsule's image will do: a capsule created from a snapshot
        // restores another capsule's memory.
        let image = dir.join(FAKE_IMAGE);
        if !image.is_file() {
            return Err(Error::PrepareSpawn {
                capsule: spec.capsule.clone(),
                what: "fake restore image",
                path: image,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(self.start_vm(spec, false))
    }

    async fn state(&self, vm: &MachineHandle) -> Result<MachineState, Error> {
        self.call(Step::State, &vm.capsule, None).await?;
        self.with_vm(vm, |v| {
            Ok(if v.paused {
                MachineState::Paused
            } else {
                MachineState::Running
            })
        })
    }

    async fn counters(&self, vm: &MachineHandle) -> Result<NetCounters, Error> {
        self.with_vm(vm, |_| Ok(NetCounters::default()))
    }

    async fn stop(&self, vm: &MachineHandle) -> Result<(), Error> {
        self.call(Step::Stop, &vm.capsule, None).await?;
        let ended = self.with(|i| match i.vms.get(&vm.capsule) {
            Some(v) if v.pid == vm.process.pid => i.vms.remove(&vm.capsule),
            _ => None,
        });
        if let Some(v) = ended {
            v.exit.send_replace(Some(VmmExit::Requested));
        }
        Ok(())
    }

    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        let rx = self.with(|i| match i.vms.get(&vm.capsule) {
            Some(v) if v.pid == vm.process.pid => Some(v.exit.subscribe()),
            _ => None,
        });
        let Some(mut rx) = rx else {
            return Err(Self::gone(vm));
        };
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return Ok(exit);
            }
            if rx.changed().await.is_err() {
                return Ok(VmmExit::Requested);
            }
        }
    }
}
