//! Command-line flags of `wrenn-node-agent`, each with an environment
//! fallback and a default. The Helm chart sets these by name (e2e's
//! chart_rbac test checks every one it sets); renaming one breaks it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::storage::BackendChoice;

/// Which VMM backend runs capsules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmBackend {
    /// Cloud Hypervisor (needs KVM).
    CloudHypervisor,
    /// QEMU (KVM or TCG).
    Qemu,
}

/// Flags of `wrenn-node-agent`.
#[derive(Debug, Parser)]
#[command(name = "wrenn-node-agent", version, about = "Wrenn node agent")]
pub struct Args {
    /// Kubernetes node name (downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address of the gRPC server.
    #[arg(long, env = "WRENN_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long, env = "WRENN_TLS_CERT", default_value = "/etc/wrenn/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// Server key (PEM).
    #[arg(long, env = "WRENN_TLS_KEY", default_value = "/etc/wrenn/tls/tls.key")]
    pub tls_key: PathBuf,
    /// CA that signs the operator's client certificate (PEM).
    #[arg(long, env = "WRENN_CLIENT_CA", default_value = "/etc/wrenn/tls/ca.crt")]
    pub client_ca: PathBuf,
    /// State directory: journals, disks, snapshots.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn")]
    pub state_dir: PathBuf,
    /// Log filter, e.g. `info` or `wrenn_node_agent=debug`.
    #[arg(long, env = "WRENN_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WRENN_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
    /// VMM backend.
    #[arg(
        long,
        env = "WRENN_VMM",
        value_enum,
        default_value = "cloud-hypervisor"
    )]
    pub vmm: VmmBackend,
    /// Cloud Hypervisor binary.
    #[arg(
        long,
        env = "WRENN_CH_BINARY",
        default_value = "/usr/local/bin/cloud-hypervisor"
    )]
    pub ch_binary: PathBuf,
    /// QEMU binary for `--vmm qemu` (looked up in PATH when bare).
    #[arg(long, env = "WRENN_QEMU_BINARY", default_value = "qemu-system-x86_64")]
    pub qemu_binary: PathBuf,
    /// vhost-device-vsock, QEMU's vsock backend (looked up in PATH when bare).
    #[arg(long, env = "WRENN_VHOST_VSOCK", default_value = "vhost-device-vsock")]
    pub vhost_vsock: PathBuf,
    /// A directory the node admin fills with root disks, kernels and local
    /// images that templates may name (relative to it); repeat for several,
    /// searched in order. Templates can name nothing else on the node.
    /// Default: `<state-dir>/node-images`, created if missing. Must not
    /// hold or be inside the state directory (that one subdirectory aside).
    #[arg(long = "image-dir", env = "WRENN_IMAGE_DIRS", value_delimiter = ',')]
    pub image_dirs: Vec<PathBuf>,
    /// Default guest kernel.
    #[arg(
        long,
        env = "WRENN_KERNEL",
        default_value = "/var/lib/wrenn/kernels/vmlinux"
    )]
    pub kernel: PathBuf,
    /// Optional initramfs for every guest.
    #[arg(long, env = "WRENN_INITRAMFS")]
    pub initramfs: Option<PathBuf>,
    /// Root-disk backend: `auto`, `dm-snapshot` or `qcow2`.
    #[arg(long, env = "WRENN_STORAGE", default_value = "auto")]
    pub storage: BackendChoice,
    /// The node's uplink interface, the only one capsule traffic may leave by.
    #[arg(long, env = "WRENN_UPLINK", default_value = "eth0")]
    pub uplink: String,
    /// Where capsule network namespaces are mounted. Only agents sharing a
    /// host with other agents (tests, the local run) need their own.
    #[arg(long, env = "WRENN_NETNS_DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// The cgroup (under each controller's mount) VMMs are placed in, one
    /// child per capsule. The startup sweep kills whatever runs in a child
    /// it does not know, so agents sharing a host need their own.
    #[arg(
        long,
        env = "WRENN_CGROUP_PARENT",
        default_value = "wrenn",
        value_parser = cgroup_parent
    )]
    pub cgroup_parent: String,
    /// `wrenn-guest`, injected into template disks built from OCI images.
    #[arg(
        long,
        env = "WRENN_GUEST_BINARY",
        default_value = "/opt/wrenn/share/wrenn-guest"
    )]
    pub guest_binary: PathBuf,
    /// Registries pulled from over plain HTTP (local mirrors), comma-separated.
    #[arg(long, env = "WRENN_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Admin server (Prometheus `/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "WRENN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
}

/// One path segment of letters, digits, '-', '_' and '.': never `..` or a
/// path that climbs out of the cgroup mount.
fn cgroup_parent(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: one name of letters, digits, '-', '_' or '.' (at most 64)"
        ))
    }
}
