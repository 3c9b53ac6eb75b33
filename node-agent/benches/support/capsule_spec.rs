//! The capsule spec the supervisor benches create, the supervisor they
//! create it on and the runtime they drive it from (shared by `supervisor`
//! and `journal`).

use std::sync::Arc;

use wrenn_node_agent::capsule::{
    BootSource, CapsuleSpec, Host, Resources, Supervisor, SupervisorConfig, TemplateDisk,
};
use wrenn_node_agent::network::{FakeNet, NetOps};
use wrenn_node_agent::storage::BlockStore;
use wrenn_node_agent::vmm::FakeMachine;

/// Capsule `i` over the template disk at `template`.
pub fn spec(i: usize, template: &std::path::Path) -> CapsuleSpec {
    CapsuleSpec {
        env: [("APP".to_string(), "bench".to_string())].into(),
        ..CapsuleSpec::new(
            "bench",
            format!("c{i}"),
            BootSource::Template(TemplateDisk {
                key: "bench/base@sha256:0".into(),
                rootfs: template.to_path_buf(),
                digest: "sha256:0".into(),
            }),
            Resources {
                vcpus: 1,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
            },
        )
    }
}

/// A supervisor over the fakes and `store`, its state in `dir`.
#[allow(dead_code)] // `journal` picks its network with `supervisor_on`.
pub fn supervisor(
    dir: &std::path::Path,
    machine: &Arc<FakeMachine>,
    net: &Arc<FakeNet>,
    store: &Arc<dyn BlockStore>,
) -> Supervisor<FakeMachine> {
    supervisor_on(dir, machine, net.clone(), store)
}

/// A supervisor over the fake VMM, `net` and `store`, its state in `dir`.
pub fn supervisor_on(
    dir: &std::path::Path,
    machine: &Arc<FakeMachine>,
    net: Arc<dyn NetOps>,
    store: &Arc<dyn BlockStore>,
) -> Supervisor<FakeMachine> {
    Supervisor::new(
        Host {
            machine: machine.clone(),
            net,
            store: store.clone(),
        },
        SupervisorConfig::new(dir, std::path::Path::new("/k/vmlinux")),
    )
}
