//! [`CapsuleApi`]: the supervisor as the gRPC server sees it, with the
//! backend type erased, so `server` (and the data plane) need no generic
//! parameter.

use std::future::Future;
use std::pin::Pin;

use super::{
    CapsuleSpec, CapsuleView, Egress, Error, PortRule, PrepareRequest, SnapshotInfo, State,
    TemplateStatus, Watch,
};
use crate::vmm::BackendInfo;

/// A boxed future of the API.
pub type ApiFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// A watch: backlog then live events.
pub type EventStream = Watch;

/// What the server may ask of the supervisor.
pub trait CapsuleApi: Send + Sync + std::fmt::Debug {
    /// The VMM backend.
    fn backend(&self) -> BackendInfo;
    /// Creates a capsule, or returns the existing one with the same spec.
    fn create<'a>(
        &'a self,
        uid: &'a str,
        spec: CapsuleSpec,
        initial: State,
    ) -> ApiFuture<'a, CapsuleView>;
    /// One capsule.
    fn get(&self, uid: &str) -> Result<CapsuleView, Error>;
    /// All capsules.
    fn list(&self) -> Vec<CapsuleView>;
    /// Deletes a capsule (cancelling an in-flight create); `false` when it
    /// did not exist.
    fn delete<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, bool>;
    /// Running → Paused.
    fn pause<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView>;
    /// Paused → Running, or Suspended → Running.
    fn resume<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView>;
    /// Running|Paused → Suspended.
    fn suspend<'a>(&'a self, uid: &'a str) -> ApiFuture<'a, CapsuleView>;
    /// Replaces the egress policy, live on a running or paused capsule.
    fn update_network<'a>(&'a self, uid: &'a str, egress: Egress) -> ApiFuture<'a, CapsuleView>;
    /// Replaces the resolver settings and allowed host names, live on a
    /// running or paused capsule.
    fn update_names<'a>(
        &'a self,
        uid: &'a str,
        names: crate::network::Names,
    ) -> ApiFuture<'a, CapsuleView>;
    /// Replaces the published ports, live on a running or paused capsule.
    fn update_ports<'a>(&'a self, uid: &'a str, ports: Vec<PortRule>)
    -> ApiFuture<'a, CapsuleView>;
    /// Writes a named snapshot; the capsule returns to its prior mode.
    fn snapshot<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        memory: bool,
    ) -> ApiFuture<'a, SnapshotInfo>;
    /// Removes a named snapshot; `false` when it did not exist.
    fn delete_snapshot<'a>(&'a self, id: &'a str) -> ApiFuture<'a, bool>;
    /// Snapshot ids on the node.
    fn snapshots(&self) -> Vec<String>;
    /// Starts a watch after `cursor`.
    fn watch(&self, cursor: u64) -> EventStream;
    /// Where a template stands on this node, starting its build when none
    /// ran or the last failed.
    fn prepare_template(&self, req: PrepareRequest) -> ApiFuture<'_, TemplateStatus>;
    /// Templates ready on this node: key → digest.
    fn templates(&self) -> std::collections::BTreeMap<String, String>;
    /// Capsules recovery quarantined.
    fn quarantined(&self) -> Vec<crate::state::Quarantined>;
    /// The directory the capsule's VMM writes its serial console to
    /// (`Layout::vmm_root`/uid), whether or not it exists yet.
    fn console_dir(&self, uid: &str) -> std::path::PathBuf;
}
