//! Cloud Hypervisor, all of it: the typed API ([`api`]), its HTTP transport
//! with fd passing ([`http`]), error classification across CH versions
//! ([`error`]), version detection ([`version`]), the event monitor
//! ([`events`]), the per-VMM client ([`client`]), one CH process per
//! capsule ([`vmm`], `ChVmm`), the `vm.create` bodies for a machine spec
//! ([`config`]), snapshot staging for a restore (`restore`) and the
//! lifecycle steps of [`Machine`](crate::vmm::Machine) ([`machine`],
//! `ChMachine`). Spawning and supervising the process is `vmm::process`'s.

pub mod api;
pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod http;
pub mod machine;
mod restore;
pub mod version;
pub mod vmm;

pub use api::{Action, CallClass, Endpoint, endpoint};
pub use client::{ChClient, Timeouts};
pub use config::{build_machine_config, build_net_config};
pub use error::{ApiError, ErrorKind};
pub use events::{Event, EventFile, EventKind, EventParser, watch_exit};
pub use machine::ChMachine;
pub use version::ChVersion;
pub use vmm::{ChVmm, StartSpec, VmmHandle, build_ch_args};
