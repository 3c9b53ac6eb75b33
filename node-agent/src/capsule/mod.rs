//! Per-capsule lifecycle over [`Machine`](crate::vmm::Machine),
//! [`NetOps`](crate::network::NetOps) and
//! [`BlockStore`](crate::storage::BlockStore). The journal and the on-disk
//! layout live in `crate::state`; the gRPC edge (validation, proto
//! conversion) in `crate::server`.
//!
//! | module | owns |
//! |---|---|
//! | `supervisor` | [`Supervisor`], the public API: checks a request, takes the capsule's lock, runs its steps in a task of its own |
//! | `registry` | the map of capsules, each an entry behind its own lock; only the supervisor and recovery hold it |
//! | `tasks` | the supervised background tasks of capsules (crash watchers, template builds) |
//! | `record` | the journaled [`Record`] and the pure helpers that note errors on it |
//! | `steps` | one file per operation over the step context (host, settings, journal, events, tasks: never the map of capsules); every side effect journaled first |
//! | `recovery` | start-up recovery: a pure `plan_recovery` per journal, the executor, the orphan sweep |
//! | `templates` | `PrepareTemplate`: ready records, warm builds through the supervisor's `BuildVms` API |
//! | `model`, `config`, `ids`, `files` | domain types, settings, host ids of a UID, file work of images and snapshots |
//! | `events`, `api`, `cmdline` | the `WatchEvents` bus, the type-erased API the server uses, kernel command lines |
//!
//! Imports run one way: `supervisor` → (`recovery`, `templates`, `steps`);
//! `recovery` → `steps` → (`registry`'s `Entry`, `tasks`, `record`, `files`, `ids`, `model`).
//! `templates` reaches its build VMs through the `BuildVms` trait the
//! supervisor implements, so it never imports the supervisor.
//!
//! States and the operations legal in each:
//!
//! ```text
//! Creating ──> Running ⇄ Paused            (pause / resume; a create from a
//!                                          snapshot with memory restores it)
//! Running|Paused ──> Suspending ──> Suspended ──> Resuming ──> Running
//! Running|Paused ──> Snapshotting ──> (the mode it was in)
//! any ──> Deleting ──> gone ;  VMM crash ──> Failed ; guest poweroff ──> Stopped
//! ```
//!
//! A warm template's build VM is an *internal* capsule, made and removed by
//! the same steps and journal as any other, but never shown by get, list,
//! events or metrics, and removed rather than adopted by recovery.
//!
//! Every operation on one capsule holds that capsule's lock for its whole
//! run, so a pause and a delete can never interleave; a delete first raises
//! the capsule's cancel flag so an in-flight create stops at its next step
//! and rolls back.

mod api;
pub mod cmdline;
mod config;
mod events;
mod files;
mod ids;
mod model;
mod plan;
mod record;
mod recovery;
mod registry;
mod steps;
mod supervisor;
mod tasks;
pub mod templates;
#[cfg(test)]
mod tests;

pub use crate::state::Layout;
pub use api::{ApiFuture, CapsuleApi, EventStream};
pub use config::{GuestSettings, Host, HostFigures, SupervisorConfig};
pub use events::{Event, EventBus, EventKind, Watch};
pub use model::{
    BootSource, CapsuleSpec, CapsuleView, Egress, Error, HostPort, ImageTemplate, PortRule,
    Resources, SnapshotInfo, State, TemplateDisk,
};
pub use record::{
    DiskHeld, Held, InFlight, NetAddr, NetHeld, RECORD_VERSION, Record, Refused, VmHeld,
};
pub use recovery::{OrphanReport, OrphanSweep, RecoveryReport};
pub use supervisor::Supervisor;
pub use templates::{
    PrepareRequest, Readiness, TemplatePhase, TemplateSource, TemplateStatus, WarmSpec,
};
