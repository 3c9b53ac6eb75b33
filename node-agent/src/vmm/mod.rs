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

pub mod cgroup;
pub mod ch;
mod error;
mod fake_machine;
pub mod logs;
pub mod machine;
pub mod process;
pub mod qemu;
pub mod view;

pub use ch::{
    ChMachine, ChVmm, StartSpec, VmmHandle, build_ch_args, build_machine_config, build_net_config,
};
pub use error::Error;
pub use fake_machine::{FAKE_IMAGE, FakeMachine, MachineCall, Step};
pub use machine::{
    BackendInfo, BackendKind, DiskFormat, Machine, MachineHandle, MachineSpec, MachineState,
    NetCounters, TapSpec,
};
