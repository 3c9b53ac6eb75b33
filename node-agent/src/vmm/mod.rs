//! The only code that starts a VMM or talks to one: Cloud Hypervisor
//! ([`ch`]: typed API client, event monitor, `ChVmm` and `ChMachine`),
//! process supervision in the capsule's netns and cgroup ([`process`],
//! [`cgroup`]), and the QEMU backend ([`qemu`], QMP and vhost-user-vsock).
//! The capsule supervisor drives whole lifecycle steps through [`Machine`]:
//! [`ChMachine`], `QemuMachine`, and [`FakeMachine`], which records calls
//! for the supervisor's unit tests.
//!
//! Networking (netns, TAP) and disks (dm devices) belong to `network` and
//! `storage`; this module receives their results as paths and fds.
//!
//! [`Error`] is defined here, in the parent, because it carries the
//! backends' own errors (`ch::ApiError`, `qemu::QemuError`) while the
//! backends return it: a sibling `error` module and the backends would
//! import each other.

pub mod cgroup;
pub mod ch;
mod fake_machine;
pub mod logs;
pub mod machine;
pub mod process;
pub mod qemu;
pub mod view;

pub use ch::{
    ChMachine, ChVmm, StartSpec, VmmHandle, build_ch_args, build_machine_config, build_net_config,
};
pub use fake_machine::{FAKE_IMAGE, FakeMachine, MachineCall, Step};
pub use machine::{
    BackendInfo, BackendKind, DiskFormat, Machine, MachineHandle, MachineSpec, MachineState,
    NetCounters, TapSpec,
};

use std::path::PathBuf;

use crate::sys::process::{ExitStatus, SpawnError};
use ch::{Action, ApiError};

/// Errors of the `vmm` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Cloud Hypervisor API call failed; `source` says how and
    /// [`ApiError::kind`] classifies it.
    #[error("{action} for capsule {capsule} on {}", socket.display())]
    Api {
        /// The endpoint called.
        action: Action,
        /// The capsule whose VMM was called.
        capsule: String,
        /// The API socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: ApiError,
    },
    /// A call succeeded but `vm.info` then showed the wrong state (e.g. a
    /// restore that did not leave the VM paused); the VM was deleted.
    #[error("VM of capsule {capsule} is {found:?} after {after}, expected {expected:?}")]
    UnexpectedState {
        /// The capsule.
        capsule: String,
        /// The call that should have produced `expected`.
        after: Action,
        /// The state it should be in.
        expected: ch::api::VmState,
        /// The state it is in.
        found: ch::api::VmState,
    },
    /// Running `<binary> --version` failed.
    #[error("run {} --version", binary.display())]
    DetectVersion {
        /// The VMM binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--version` printed something we cannot read.
    #[error("parse the version printed by {}: {output:?}", binary.display())]
    ParseVersion {
        /// The VMM binary.
        binary: PathBuf,
        /// Its first line of output.
        output: String,
    },
    /// No cgroup v1 (`cpu` + `memory`) or v2 mount was found.
    #[error("detect the cgroup version under {}", mount.display())]
    DetectCgroup {
        /// The mount point examined.
        mount: PathBuf,
    },
    /// A capsule name that cannot be a cgroup directory.
    #[error("invalid cgroup name {name:?}")]
    InvalidCgroupName {
        /// The name.
        name: String,
    },
    /// Creating a cgroup directory failed.
    #[error("create cgroup {}", path.display())]
    CreateCgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing a cgroup control file failed.
    #[error("write {value:?} to {}", path.display())]
    WriteCgroup {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading a cgroup failed.
    #[error("read cgroup {}", path.display())]
    CgroupIo {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Removing a cgroup directory failed (e.g. still has processes).
    #[error("remove cgroup {}", path.display())]
    RemoveCgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program given by bare name is not in any `PATH` directory, or a
    /// path given is not an executable file.
    #[error("program {} not found: {why}", program.display())]
    ProgramNotFound {
        /// The name or path as configured.
        program: PathBuf,
        /// Where it was looked for.
        why: String,
    },
    /// Preparing a VMM's files (state dir, API socket, log, netns,
    /// cgroup.procs) failed.
    #[error("prepare {what} {} for capsule {capsule}", path.display())]
    PrepareSpawn {
        /// The capsule.
        capsule: String,
        /// What was being prepared.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Starting the VMM process failed.
    #[error("spawn {} for capsule {capsule}", program.display())]
    SpawnVmm {
        /// The capsule.
        capsule: String,
        /// The program.
        program: PathBuf,
        /// Which step failed.
        #[source]
        source: SpawnError,
    },
    /// The VMM exited before it was ready.
    #[error("VMM of capsule {capsule} exited during start-up ({status:?})")]
    ExitedEarly {
        /// The capsule.
        capsule: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// Signalling or waiting on a VMM process failed.
    #[error("{what} VMM of capsule {capsule} (pid {pid})")]
    Process {
        /// The capsule.
        capsule: String,
        /// The pid.
        pid: i32,
        /// `signal`, `wait` or `open pidfd for`.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process recorded for a capsule is not the one running under
    /// that pid any more (it exited and the pid was reused).
    #[error("VMM of capsule {capsule} (pid {pid}) is gone: {reason}")]
    AdoptVmm {
        /// The capsule.
        capsule: String,
        /// The recorded pid.
        pid: i32,
        /// What did not match.
        reason: String,
    },
    /// Reading the event-monitor file failed.
    #[error("read VMM events of capsule {capsule} from {}", path.display())]
    ReadEvents {
        /// The capsule.
        capsule: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A QMP exchange with a capsule's QEMU failed.
    #[error("QMP {step} for capsule {capsule}")]
    Qmp {
        /// The capsule.
        capsule: String,
        /// The lifecycle step (`pause`, `snapshot`, ...).
        step: &'static str,
        /// What went wrong.
        #[source]
        source: qemu::QmpError,
    },
    /// QEMU or its vsock helper did not come up, or a QEMU step did not
    /// reach the state it should.
    #[error("{what} for capsule {capsule}")]
    Qemu {
        /// The capsule.
        capsule: String,
        /// What was attempted.
        what: &'static str,
        /// What was seen.
        #[source]
        source: qemu::QemuError,
    },
    /// A snapshot's `config.json` is not CH's config, or its rewritten
    /// copy could not be encoded.
    #[error("rewrite snapshot config {} for capsule {capsule}", path.display())]
    SnapshotConfig {
        /// The capsule.
        capsule: String,
        /// The snapshot's config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Reading or writing a snapshot's files failed.
    #[error("{what} snapshot file {} for capsule {capsule}", path.display())]
    SnapshotFile {
        /// The capsule.
        capsule: String,
        /// `write` or `read`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// For `map_err`: the [`Error::PrepareSpawn`] of a file step on `path`
    /// for `capsule` that failed.
    pub fn prepare(
        capsule: &str,
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let (capsule, path) = (capsule.to_string(), path.to_path_buf());
        move |source| Error::PrepareSpawn {
            capsule,
            what,
            path,
            source,
        }
    }

    /// The classification of a failed API call, if this is one.
    pub fn api_kind(&self) -> Option<ch::ErrorKind> {
        match self {
            Error::Api { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}
