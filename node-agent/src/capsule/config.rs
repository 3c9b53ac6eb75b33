//! What the supervisor is given: the host capabilities it drives
//! ([`Host`]), its settings ([`SupervisorConfig`]) and how guests are
//! reached ([`GuestSettings`]), with the agent's defaults (kernel command
//! line, image cache, warm build pacing). No I/O here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::network::NetOps;
use crate::storage::BlockStore;
use crate::vmm::cgroup::CgroupRoot;

/// The host capabilities the supervisor drives.
#[derive(Debug)]
pub struct Host<M> {
    /// The VMM backend.
    pub machine: Arc<M>,
    /// Capsule networks.
    pub net: Arc<dyn NetOps>,
    /// Capsule disks.
    pub store: Arc<dyn BlockStore>,
}

impl<M> Clone for Host<M> {
    fn clone(&self) -> Self {
        Self {
            machine: self.machine.clone(),
            net: self.net.clone(),
            store: self.store.clone(),
        }
    }
}

impl Host<crate::vmm::FakeMachine> {
    /// Fakes of the VMM, network and disks that record their calls: the
    /// whole supervisor and gRPC service without a host, for tests and
    /// benches.
    pub fn fakes() -> Self {
        Self {
            machine: Arc::new(crate::vmm::FakeMachine::new()),
            net: Arc::new(crate::network::FakeNet::new()),
            store: Arc::new(crate::storage::FakeBlockStore::new()),
        }
    }
}

/// Supervisor settings.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Kernel used when a spec names none.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Command line every guest gets before its own additions.
    pub base_cmdline: String,
    /// Events kept for `WatchEvents` cursors.
    pub event_history: usize,
    /// How to reach each guest's agent after boot and restore; `None`
    /// (unit tests over fake machines) skips the guest step and the guest
    /// memory figure.
    pub guest: Option<GuestSettings>,
    /// Where capsule histories, step durations and error counts go; the
    /// agent shares it with the sampler and the admin server.
    pub metrics: Arc<Metrics>,
    /// Where each VMM's CPU and RSS are read; `None` (fake machines, whose
    /// pids are not real) samples only disk, network and guest figures.
    pub figures: Option<HostFigures>,
    /// Builds template disks from OCI images.
    pub templates: Arc<crate::images::TemplateBuilder>,
    /// Warm template builds run at once; more wait their turn.
    pub warm_builds: usize,
    /// Pause between two readiness probes of a warm build.
    pub warm_probe_every: std::time::Duration,
    /// How a warm build starts and probes its guest; `None`: through the
    /// guest agent (with `guest`'s settings) and the capsule's namespace.
    pub build_guest: Option<Arc<dyn super::templates::BuildGuest>>,
}

/// Reaching the guest agent over the VMM's vsock socket.
#[derive(Clone, Copy, Debug)]
pub struct GuestSettings {
    /// vsock port `wrenn-guest` listens on.
    pub port: u32,
    /// Per-call bounds.
    pub timeouts: crate::guest::Timeouts,
    /// How long a boot or restore may take until the agent answers.
    pub ready_within: std::time::Duration,
    /// How long one guest memory reading may take (dial included). Well
    /// under the sampler's per-capsule deadline, so a hung guest costs
    /// only its own figure, not the host's.
    pub sample_within: std::time::Duration,
}

impl Default for GuestSettings {
    fn default() -> Self {
        Self {
            port: crate::guest::AGENT_PORT,
            timeouts: crate::guest::Timeouts::default(),
            // TCG boots take seconds to tens of seconds on a busy node.
            ready_within: std::time::Duration::from_secs(180),
            sample_within: std::time::Duration::from_millis(250),
        }
    }
}

impl SupervisorConfig {
    /// Defaults for `state_dir` and `kernel`.
    pub fn new(state_dir: &Path, kernel: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initramfs: None,
            // Template disks carry wrenn-guest at GUEST_PATH (images module).
            // no_timer_check: the kernel's PIT-through-IO-APIC check fails at
            // random under TCG on a busy node, and its fallback can stall boot.
            base_cmdline: format!(
                "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init={} reboot=k panic=1 init_on_free=1 no_timer_check",
                crate::images::GUEST_PATH
            ),
            event_history: 4096,
            guest: None,
            metrics: Metrics::new(),
            figures: None,
            templates: Arc::new(crate::images::TemplateBuilder::new(
                crate::images::TemplateSettings {
                    cache_dir: state_dir.join("images"),
                    // Where the node-agent container image carries it.
                    guest_binary: PathBuf::from("/opt/wrenn/share/wrenn-guest"),
                    pull: crate::images::PullOptions::default(),
                    cache_max_bytes: crate::images::quota::DEFAULT_MAX_BYTES,
                    // Set by the agent from --image-dir; none refuses
                    // every local image.
                    image_dirs: crate::images::ImageDirs::default(),
                },
            )),
            warm_builds: 1,
            warm_probe_every: std::time::Duration::from_secs(1),
            build_guest: None,
        }
    }
}

/// Where the host side of each capsule is read: its cgroup (CPU) and its
/// VMM processes' `status` (RSS).
#[derive(Clone, Debug)]
pub struct HostFigures {
    /// `/proc`, or a test's stand-in.
    pub proc_root: PathBuf,
    /// The capsule cgroups' root, the one the VMM backend spawns into.
    pub cgroups: CgroupRoot,
}
