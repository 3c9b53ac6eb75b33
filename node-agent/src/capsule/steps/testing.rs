//! The test bed the network steps' tests share: a supervisor over fakes
//! whose network fake the test reads, journaling into a temporary directory.

use std::sync::Arc;

use crate::capsule::{Host, Supervisor, SupervisorConfig};
use crate::network::FakeNet;
use crate::storage::FakeBlockStore;
use crate::vmm::FakeMachine;

/// A supervisor over fakes; `dir` holds its journal.
pub(crate) struct NetBed {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) net: Arc<FakeNet>,
    pub(crate) sup: Supervisor<FakeMachine>,
}

/// A fresh [`NetBed`].
pub(crate) fn net_bed() -> NetBed {
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(FakeNet::new());
    let sup = Supervisor::new(
        Host {
            machine: Arc::new(FakeMachine::new()),
            net: net.clone(),
            store: Arc::new(FakeBlockStore::new()),
        },
        SupervisorConfig::new(dir.path(), std::path::Path::new("/k/vmlinux")),
    );
    NetBed { dir, net, sup }
}
