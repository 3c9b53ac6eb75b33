//! The capsule spec the supervisor benches create (shared by
//! `supervisor` and `journal`).

use wrenn_node_agent::capsule::{BootSource, CapsuleSpec, Egress, Resources, TemplateDisk};

/// Capsule `i` over the template disk at `template`.
pub fn spec(i: usize, template: &std::path::Path) -> CapsuleSpec {
    CapsuleSpec {
        namespace: "bench".into(),
        name: format!("c{i}"),
        source: BootSource::Template(TemplateDisk {
            key: "bench/base@sha256:0".into(),
            rootfs: template.to_path_buf(),
            digest: "sha256:0".into(),
        }),
        resources: Resources {
            vcpus: 1,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
        },
        kernel: None,
        cmdline: String::new(),
        env: [("APP".to_string(), "bench".to_string())].into(),
        egress: Egress::Allow,
    }
}
