//! Cloud Hypervisor backend: the typed API ([`api`]), its HTTP transport
//! with fd passing ([`http`]), error classification across CH versions
//! ([`error`]), version detection ([`version`]), the event monitor
//! ([`events`]) and the per-VMM client ([`client`]). Process start-up lives
//! in `vmm::process`; the `Vmm` impl, `ChVmm`, in `vmm`.

pub mod api;
pub mod client;
pub mod error;
pub mod events;
pub mod http;
pub mod version;

pub use api::{Action, CallClass, Endpoint, endpoint};
pub use client::{ChClient, Timeouts};
pub use error::{ApiError, ErrorKind};
pub use events::{Event, EventFile, EventKind, EventParser};
pub use version::ChVersion;
