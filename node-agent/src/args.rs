//! Command-line flags of `wrenn-node-agent`, each with an environment
//! fallback and a default. The Helm chart sets these by name (e2e's
//! chart_rbac test checks every one it sets); renaming one breaks it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::metrics::admin::{AdminArgs, AdminListen};
use crate::storage::BackendChoice;
use crate::tls::PortArgs;

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
    /// Logging.
    #[command(flatten)]
    pub log: wrenn_runtime::log::LogArgs,
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
    /// CPUs kept from the VMMs for the kubelet, system daemons and this
    /// agent: all VMMs together are capped (their parent cgroup) at the
    /// node's CPUs minus this, and NodeInfo offers no more. At least the
    /// kubelet's system-reserved + kube-reserved.
    #[arg(long, env = "WRENN_RESERVED_CPUS", default_value_t = 1.0)]
    pub reserved_cpus: f64,
    /// Memory kept from the VMMs, like `--reserved-cpus` (bytes, or with
    /// `Ki`/`Mi`/`Gi`/`Ti`). At least system-reserved + kube-reserved + the
    /// eviction threshold.
    #[arg(long, env = "WRENN_RESERVED_MEMORY", default_value = "1Gi", value_parser = bytes)]
    pub reserved_memory: u64,
    /// Processes and threads of all VMMs together; 0 is unlimited.
    #[arg(long, env = "WRENN_VMM_PIDS_MAX", default_value_t = 65536)]
    pub vmm_pids_max: u64,
    /// Read bytes/s of all VMMs together on the state directory's disk
    /// (where the host has the io/blkio controller); 0 is unlimited.
    #[arg(long, env = "WRENN_VMM_IO_READ_BPS", default_value_t = 0)]
    pub vmm_io_read_bps: u64,
    /// Write bytes/s, like `--vmm-io-read-bps`.
    #[arg(long, env = "WRENN_VMM_IO_WRITE_BPS", default_value_t = 0)]
    pub vmm_io_write_bps: u64,
    /// Read operations/s, like `--vmm-io-read-bps`.
    #[arg(long, env = "WRENN_VMM_IO_READ_IOPS", default_value_t = 0)]
    pub vmm_io_read_iops: u64,
    /// Write operations/s, like `--vmm-io-read-bps`.
    #[arg(long, env = "WRENN_VMM_IO_WRITE_IOPS", default_value_t = 0)]
    pub vmm_io_write_iops: u64,
    /// Admin server (Prometheus `/metrics`, `/healthz`, `/readyz`), without
    /// authentication: `IP:PORT` or `pod-ip:PORT` (see `--pod-ip`).
    #[arg(long, env = "WRENN_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: AdminListen,
    /// Admin port settings.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// gRPC port settings: client names, handshake deadline, cap, reload.
    #[command(flatten)]
    pub grpc: PortArgs,
    /// Seconds a booting or restored guest may take until its agent
    /// answers; past it the create fails and is rolled back. TCG guests on
    /// a busy node need tens of seconds.
    #[arg(
        long,
        env = "WRENN_GUEST_READY_SECS",
        default_value_t = 180,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub guest_ready_secs: u64,
    /// Blocked destinations and per-capsule traffic limits.
    #[command(flatten)]
    pub egress: crate::network::EgressFlags,
    /// Bounds on what images, guests and snapshots may put on the disk.
    #[command(flatten)]
    pub disk: DiskArgs,
}

/// Bytes, plain or with a binary suffix (`512Mi`, `2Gi`).
fn bytes(s: &str) -> Result<u64, String> {
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ]
    .iter()
    .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: bytes, e.g. 1073741824 or 1Gi"))
}

/// Disk bounds. Sizes take a plain byte count or a `Ki`/`Mi`/`Gi`/`Ti`
/// suffix; the defaults are `images::unpack::Limits::default()` and the
/// caps documented in docs/security.md.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskArgs {
    /// Largest compressed layer blob an image may have.
    #[arg(long, env = "WRENN_IMAGE_MAX_LAYER_COMPRESSED_BYTES", default_value = "8Gi", value_parser = byte_size)]
    pub image_max_layer_compressed_bytes: u64,
    /// Largest sum of an image's compressed layer blobs.
    #[arg(long, env = "WRENN_IMAGE_MAX_COMPRESSED_BYTES", default_value = "16Gi", value_parser = byte_size)]
    pub image_max_compressed_bytes: u64,
    /// Largest unpacked layer (tar stream, and file sizes as declared:
    /// sparse files count in full).
    #[arg(long, env = "WRENN_IMAGE_MAX_LAYER_BYTES", default_value = "16Gi", value_parser = byte_size)]
    pub image_max_layer_bytes: u64,
    /// Largest unpacked image, all layers together.
    #[arg(long, env = "WRENN_IMAGE_MAX_BYTES", default_value = "32Gi", value_parser = byte_size)]
    pub image_max_bytes: u64,
    /// Most tar entries an image may have, all layers together.
    #[arg(long, env = "WRENN_IMAGE_MAX_FILES", default_value_t = 1_000_000)]
    pub image_max_files: u64,
    /// Largest unpacked-to-compressed ratio of a layer (past its first
    /// 16 MiB): a gzip bomb stops there.
    #[arg(long, env = "WRENN_IMAGE_MAX_RATIO", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub image_max_ratio: u64,
    /// Quota of the image cache; least recently used templates no capsule
    /// or snapshot uses are dropped to stay under it.
    #[arg(long, env = "WRENN_IMAGE_CACHE_MAX_BYTES", default_value = "100Gi", value_parser = byte_size)]
    pub image_cache_max_bytes: u64,
    /// Cap of each serial console, VMM log and event file on disk; past
    /// it the oldest half is dropped.
    #[arg(long, env = "WRENN_VMM_LOG_MAX_BYTES", default_value = "4Mi", value_parser = byte_size)]
    pub vmm_log_max_bytes: u64,
    /// Quota of the image cache, snapshots and suspend images together,
    /// reported in NodeInfo; placement avoids a node at or over it.
    /// Unset: 80% of the state directory's filesystem.
    #[arg(long, env = "WRENN_DISK_QUOTA", value_parser = byte_size)]
    pub disk_quota: Option<u64>,
}

impl DiskArgs {
    /// The image limits these flags set.
    pub fn image_limits(&self) -> crate::images::unpack::Limits {
        crate::images::unpack::Limits {
            layer_compressed_bytes: self.image_max_layer_compressed_bytes,
            image_compressed_bytes: self.image_max_compressed_bytes,
            layer_bytes: self.image_max_layer_bytes,
            image_bytes: self.image_max_bytes,
            files: self.image_max_files,
            ratio: self.image_max_ratio,
        }
    }
}

/// A positive byte count (see [`bytes`]).
fn byte_size(s: &str) -> Result<u64, String> {
    bytes(s).and_then(|n| {
        (n > 0)
            .then_some(n)
            .ok_or_else(|| format!("{s:?}: a positive byte count such as 4096, 512Mi or 20Gi"))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_binary_units() {
        assert_eq!(byte_size("4096"), Ok(4096));
        assert_eq!(byte_size("512Mi"), Ok(512 << 20));
        assert_eq!(byte_size("20Gi"), Ok(20 << 30));
        for bad in ["", "0", "1GB", "Gi", "-1", "99999999999Ti"] {
            assert!(byte_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_flags_are_the_documented_defaults() {
        let args = Args::try_parse_from(["wrenn-node-agent", "--node-name", "n"]).unwrap();
        assert_eq!(
            args.disk.image_limits(),
            crate::images::unpack::Limits::default()
        );
        assert_eq!(
            args.disk.image_cache_max_bytes,
            crate::images::quota::DEFAULT_MAX_BYTES
        );
        assert_eq!(
            args.disk.vmm_log_max_bytes,
            crate::vmm::logs::DEFAULT_MAX_BYTES
        );
        assert_eq!(args.disk.disk_quota, None);
    }
}
