//! The QEMU backend of [`Machine`](crate::vmm::Machine): for nodes without usable hardware
//! virtualization (development clusters, CI), and KVM nodes that prefer it.
//!
//! One capsule is two supervised processes in the capsule's netns and
//! cgroup: `vhost-device-vsock` (the guest's vsock, exposed on the host with
//! the same `CONNECT <port>` handshake as Cloud Hypervisor) and
//! `qemu-system-x86_64` (q35, virtio-pci like CH; KVM when [`probe_accel`]
//! finds it really works, TCG otherwise). Lifecycle steps go over QMP
//! ([`qmp`]).
//!
//! Snapshots are migrations to a file, streamed through a socket the agent
//! serves (`stream`). QEMU 7.2 refuses to migrate a
//! vhost-user-vsock device, so the device sits on its own PCIe root port
//! and is hot-unplugged for the migration and plugged again afterwards (on
//! the source after a snapshot, on the destination before it resumes). The
//! guest sees its vsock transport reset, as on Cloud Hypervisor after a
//! restore; its listening socket survives, so the node agent redials.
//!
//! Networks (the TAP, opened here by name inside the netns) and disks come
//! from `network` and `storage`.
//!
//! Files: `args` builds the command lines and run-dir layout, `probe`
//! reads the version and picks KVM or TCG, `procs` starts, adopts and
//! ends each capsule's two processes, `shape` keeps the machine's shape
//! file, `vsock` the vsock workaround, `migrate` snapshots as
//! migrations over `stream`, [`qmp`] the typed QMP client, `machine`
//! the [`Machine`](crate::vmm::Machine) steps, `error` what a step saw
//! go wrong, and `diagnose` what the host sees of a guest that did not
//! answer.

mod args;
mod diagnose;
mod error;
mod machine;
mod migrate;
mod probe;
mod procs;
pub mod qmp;
mod shape;
mod stream;
mod vsock;

pub use args::{Layout, SANDBOX, build_helper_args, build_qemu_args};
pub use error::QemuError;
pub use machine::{QemuMachine, parse_net_dev, to_machine_state};
pub use probe::{Accel, parse_version, probe_accel};
pub use procs::Timeouts;
pub use qmp::{Qmp, QmpError};
