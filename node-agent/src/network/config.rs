//! How the Linux network is set up on a node ([`LinuxNetConfig`]) and
//! the steps of a capsule's setup ([`SetupStep`]), shared by `linux`
//! (which orders them), `prepare` and `pool`.

use std::path::{Path, PathBuf};

use super::addr::{AddressPlan, Cidr};
use super::dns::ClusterDns;
use super::hostports::HostPortRange;
use super::limits::CapsuleLimits;

/// What sits where the guest will be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestLink {
    /// A persistent TAP for the VMM: production.
    Tap,
    /// Tests only: no VMM, so instead of a TAP (which has no peer to send
    /// from) the guest side is a veth named like the TAP whose peer, `eth0`
    /// with the guest's address and route, lives in a namespace of its own
    /// under `netns_dir`, named like the capsule's. Test traffic runs there.
    EmulatedGuest {
        /// Directory for the guest namespaces.
        netns_dir: PathBuf,
    },
}

/// Host paths and node facts [`LinuxNet`] works with. Everything is passed
/// in, so tests can point it at a namespace and temp dirs of their own.
#[derive(Clone, Debug)]
pub struct LinuxNetConfig {
    /// The namespace playing the node: the host's in production
    /// (`/proc/self/ns/net` of an agent on the host network).
    pub node_netns: PathBuf,
    /// Where named capsule namespaces are mounted (`/run/netns`).
    pub netns_dir: PathBuf,
    /// The agent's state directory; slot claims go in `slots/` under it.
    pub state_dir: PathBuf,
    /// procfs (`/proc`).
    pub proc_dir: PathBuf,
    /// The tun clone device (`/dev/net/tun`).
    pub tun_path: PathBuf,
    /// The node's uplink, the one interface capsule traffic may leave by.
    pub uplink: String,
    /// Address ranges of slots.
    pub plan: AddressPlan,
    /// Destinations no capsule may reach whatever its policy, besides
    /// [`ALWAYS_BLOCKED`](super::ALWAYS_BLOCKED).
    pub blocked_egress: Vec<Cidr>,
    /// Ceilings on each capsule's traffic.
    pub limits: CapsuleLimits,
    /// TAP (production) or emulated guest (tests).
    pub guest_link: GuestLink,
    /// The cluster DNS capsules' proxies forward to by default.
    pub cluster_dns: ClusterDns,
    /// Node ports that published capsule ports are taken from.
    pub host_ports: HostPortRange,
    /// Capsule namespaces kept ready ahead of creates (`super::pool`);
    /// 0 makes each create make its own.
    pub pool: usize,
}

impl LinuxNetConfig {
    /// The production layout for a node whose uplink is `uplink`.
    pub fn host(uplink: &str, state_dir: &Path) -> Self {
        Self {
            node_netns: PathBuf::from("/proc/self/ns/net"),
            netns_dir: PathBuf::from("/run/netns"),
            state_dir: state_dir.to_path_buf(),
            proc_dir: PathBuf::from("/proc"),
            tun_path: PathBuf::from("/dev/net/tun"),
            uplink: uplink.to_string(),
            plan: AddressPlan::default(),
            blocked_egress: super::PRIVATE_RANGES.to_vec(),
            limits: CapsuleLimits::default(),
            guest_link: GuestLink::Tap,
            cluster_dns: ClusterDns::default(),
            host_ports: HostPortRange::default(),
            pool: 0,
        }
    }
}

/// Steps of a capsule setup, in order; a test can make one fail
/// ([`LinuxNet::fail_before`]) to check the rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupStep {
    /// Create the capsule namespace.
    CreateNetns,
    /// Create the veth pair inside it.
    CreateVeth,
    /// Address the capsule end (the node end is born in the node namespace).
    MoveVeth,
    /// Create the TAP (or emulated guest).
    CreateTap,
    /// Load the capsule's nftables table.
    LoadCapsuleTable,
    /// Address and bring up the node end.
    ConfigureNodeSide,
    /// Route the slot's host address to the capsule.
    AddNodeRoute,
}
