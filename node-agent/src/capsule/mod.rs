//! Per-capsule lifecycle: the state machine, the step executor over
//! [`Machine`](crate::vmm::Machine), [`NetOps`](crate::network::NetOps) and
//! [`BlockStore`](crate::storage::BlockStore), and the event bus behind
//! `WatchEvents`. The journal and restart recovery live in `crate::state`;
//! the gRPC edge (validation, proto conversion) in `crate::server`. What
//! the supervisor reports to `crate::metrics` (a sample source per capsule
//! whose VMM exists, step timings, error classes) is in `telemetry`.
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
//! `PrepareTemplate` lives in `prepare` (phases, idempotency, ready
//! records) and [`warm`] (the build steps): a warm template's build VM is
//! an *internal* capsule, made and removed by the same steps and journal
//! as any other, but never shown by get, list, events or metrics, and
//! removed rather than adopted by recovery.
//!
//! Every operation on one capsule holds that capsule's lock for its whole
//! run, so a pause and a delete can never interleave; a delete first raises
//! the capsule's cancel flag so an in-flight create stops at its next step
//! and rolls back.

mod api;
mod bases;
pub mod cmdline;
mod egress;
mod events;
mod model;
mod prepare;
mod sources;
pub(crate) mod supervisor;
mod telemetry;
#[cfg(test)]
mod tests;
pub mod warm;

pub use api::{CapsuleApi, EventStream, SnapshotInfo};
pub use events::{Event, EventBus, EventKind, Watch};
pub use model::{
    BootSource, CapsuleSpec, CapsuleView, Egress, Error, ImageTemplate, RECORD_VERSION, Record,
    Resources, State, TemplateDisk,
};
pub use prepare::{
    PrepareRequest, Readiness, TemplatePhase, TemplateSource, TemplateStatus, WarmSpec,
};
pub use supervisor::{GuestSettings, Host, Layout, Supervisor, SupervisorConfig};
pub use telemetry::HostFigures;
