//! Capsule networking: per-capsule network namespace, veth pair, TAP, fixed
//! guest address with SNAT/DNAT to a per-slot host address, egress policy in
//! nftables, slot allocation. Netlink and nftables calls go through
//! `sys::net`; this module decides what to create and in which order.
//!
//! Layout, per capsule with slot `i` and short id `s`:
//!
//! ```text
//!  uplink ── node namespace ──────── wrenn-<s> (veth) ── capsule namespace wrenn-<s> ─── tap0 ── guest
//!            table ip wrenn:                    10.12.0.2i/31      veth0 10.12.0.2i+1/31      169.254.0.22/30   169.254.0.21/30
//!            isolation + masquerade             route 10.11.0.i    table ip wrenn: DNAT/SNAT 10.11.0.i <-> guest,
//!                                                                  egress policy
//! ```
//!
//! The supervisor drives it through [`NetOps`]: [`LinuxNet`] for real,
//! [`FakeNet`] in unit tests. Everything that runs inside a namespace runs on
//! a thread made for it, never on a shared tokio worker: the trait is
//! blocking, call it from `spawn_blocking`.

mod addr;
mod config;
pub mod dns;
mod fake;
mod flags;
mod hostports;
mod limits;
mod linux;
pub mod nft;
mod pool;
mod portrules;
mod prepare;
mod reaper;
mod ruleset;
mod slots;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use addr::{
    ALWAYS_BLOCKED, AZURE_WIRESERVER, AddressPlan, Cidr, GATEWAY_MAC, GUEST_ADDR, GUEST_GATEWAY,
    GUEST_MAC, GUEST_PREFIX, LINK_LOCAL, MAX_SLOTS, PRIVATE_RANGES, ParseCidrError, SlotAddrs,
};
pub use config::{GuestLink, LinuxNetConfig, SetupStep};
pub use dns::Names;
pub use fake::{FakeNet, NetCall};
pub use flags::EgressFlags;
pub use hostports::{HostPort, HostPortRange, PortRule};
pub use limits::CapsuleLimits;
pub use linux::LinuxNet;
pub use portrules::PORTS_TABLE;
pub use reaper::is_retired_name;
pub use ruleset::{
    Action, AddrSet, CapsuleRules, Chain, ChainKind, DNS_MARK, FQDN_MARK, Family, Hook, IfName, L4,
    Limit, LimitUnit, Match, NodeRules, Rule, SetElement, Table, Verdict, build_capsule_table,
    build_node_table, build_node_table6,
};
pub use slots::SlotAllocator;

/// Prefix of every namespace, link and nftables table we create.
pub const PREFIX: &str = "wrenn";
/// Name of the guest's TAP inside every capsule namespace. Fixed, because
/// Cloud Hypervisor snapshots record it and a restore opens it by name.
pub const TAP_NAME: &str = "tap0";
/// TAP transmit queue length (notes §11.42: bursty guests dropped packets).
pub const TAP_QUEUE_LEN: u32 = 5000;
/// Capsule-side end of the veth pair.
pub const CAPSULE_VETH: &str = "veth0";
/// Length of the short id in resource names: `wrenn-` plus 9 characters is
/// the 15 an interface name may have.
pub const SHORT_ID_LEN: usize = 9;

/// A capsule's identity (its UID): lowercase letters, digits and `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapsuleId(String);

impl CapsuleId {
    /// Validates `id`: 1 to 63 characters of `[a-z0-9-]`, at least one of
    /// them a letter or digit.
    pub fn new(id: &str) -> Result<Self, Error> {
        let ok = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && id.bytes().any(|b| b != b'-');
        if ok {
            Ok(Self(id.to_string()))
        } else {
            Err(Error::InvalidCapsuleId { id: id.to_string() })
        }
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first [`SHORT_ID_LEN`] letters and digits: names the namespace
    /// and the node-side veth. Two live capsules never share one (the slot
    /// allocator refuses the second).
    pub fn short(&self) -> String {
        self.0
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(SHORT_ID_LEN)
            .collect()
    }

    /// `wrenn-<short id>`: the capsule's namespace and node-side veth.
    pub fn resource_name(&self) -> String {
        format!("{PREFIX}-{}", self.short())
    }
}

/// `wrenn<kind><n in hex>`: a node resource that belongs to no capsule
/// (`+` a retired link, `.` a pooled namespace), at most 14 bytes, under
/// the kernel's 15, and never shaped like [`is_resource_name`].
fn serial_name(kind: char, n: u32) -> String {
    format!("{PREFIX}{kind}{n:x}")
}

/// Whether `name` has the shape of [`serial_name`] for `kind`.
fn is_serial_name(name: &str, kind: char) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix(kind))
        .is_some_and(|hex| {
            (1..=8).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
}

/// Whether `name` has the shape of a [`CapsuleId::resource_name`]: the
/// sweep removes only such names, never a `wrenn-node-*` namespace or any
/// other that merely starts with the prefix.
pub fn is_resource_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|id| {
            (1..=SHORT_ID_LEN).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric())
        })
}

/// Written as its text (host-port claims); read back through
/// [`CapsuleId::new`], so a claim file cannot name an invalid id.
impl serde::Serialize for CapsuleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for CapsuleId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        CapsuleId::new(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a capsule may send traffic through the uplink. Isolation from other
/// capsules, the node and link-local metadata holds under every policy.
/// Serialized (the capsule journal) as `"Allow"`, `"Deny"` or
/// `{"AllowList": ["198.51.100.0/24", …]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EgressPolicy {
    /// Anywhere the node's guard allows.
    #[default]
    Allow,
    /// Nowhere; the node can still open connections to the guest.
    Deny,
    /// Only to these networks.
    AllowList(Vec<Cidr>),
}

impl EgressPolicy {
    /// Whether the policy lets the guest open a connection to `ip`
    /// ([`ALWAYS_BLOCKED`] and the node's blocked list aside).
    pub fn allows(&self, ip: Ipv4Addr) -> bool {
        if ALWAYS_BLOCKED.iter().any(|n| n.contains(ip)) {
            return false;
        }
        match self {
            EgressPolicy::Allow => true,
            EgressPolicy::Deny => false,
            EgressPolicy::AllowList(nets) => nets.iter().any(|n| n.contains(ip)),
        }
    }
}

/// What the rest of the agent needs to know about a capsule's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleNet {
    /// The capsule.
    pub capsule: CapsuleId,
    /// Its slot.
    pub slot: u32,
    /// Its namespace, for the VMM to run in.
    pub netns: PathBuf,
    /// The TAP for the VMM, inside `netns`.
    pub tap: String,
    /// Node-side veth, in the node namespace.
    pub node_veth: String,
    /// The slot's addresses; `host` is how the node reaches the guest.
    pub addrs: SlotAddrs,
    /// Guest address (the same in every capsule).
    pub guest: Ipv4Addr,
    /// Guest gateway.
    pub gateway: Ipv4Addr,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

impl CapsuleNet {
    /// The kernel `ip=` argument configuring the guest's interface.
    pub fn kernel_ip_arg(&self) -> String {
        let mask =
            Cidr::new(self.guest, GUEST_PREFIX).map_or(Ipv4Addr::UNSPECIFIED, |c| c.netmask());
        format!(
            "ip={}::{}:{}:capsule:eth0:off",
            self.guest, self.gateway, mask
        )
    }
}

/// How much of a capsule's network a teardown removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Everything, and the slot goes back to the pool: the capsule is gone.
    ReleaseSlot,
    /// Everything but the slot claim: the capsule is suspended and will come
    /// back on the same host address.
    KeepSlot,
}

/// What a startup sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Namespaces with our prefix and no claim.
    pub namespaces: usize,
    /// Node links with our prefix and no claim.
    pub links: usize,
    /// nftables tables with our prefix other than the node table.
    pub tables: usize,
    /// Conntrack entries for slot addresses without a claim.
    pub conntrack: usize,
    /// Host-port claims of capsules without a slot claim.
    pub host_ports: usize,
}

/// Capability: wire and unwire capsule networks. Every method is idempotent
/// and blocking.
pub trait NetOps: Send + Sync + fmt::Debug {
    /// Makes the node namespace ready: forwarding on, the node table loaded
    /// (replacing an older one atomically). Call once at startup, before
    /// [`NetOps::sweep`].
    fn ensure_node(&self) -> Result<(), Error>;

    /// Creates the capsule's network, or adopts the one it has (updating
    /// the egress policy, and recreating its TAP by name if it is gone: a
    /// restore opens the TAP its snapshot names). Legal for a new capsule
    /// and for a suspended one being restored, which gets its old slot
    /// back. On failure nothing is left behind but a slot claim the capsule
    /// already held.
    fn setup(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<CapsuleNet, Error>;

    /// Replaces the egress policy of a capsule whose network exists, in one
    /// nftables transaction (no moment without a policy), and drops the
    /// guest's tracked connections the new policy forbids, so an open
    /// connection does not outlive its permission. The namespace, links and
    /// TAP stay as they are: the VM keeps running. Legal after `setup`.
    fn update_policy(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<(), Error>;

    /// Makes the capsule's names (`spec.network.dns`, `allowHosts`) hold
    /// under `policy`: its DNS proxy runs on the guest's gateway with these
    /// settings, and its names table opens DNS (unless closed under deny)
    /// and the addresses allowed names resolved to. A repeated call
    /// changes the running proxy and table in place, dropping addresses
    /// only names no longer allowed opened. Legal after `setup`; the
    /// teardown stops the proxy. Needs a current tokio runtime.
    fn set_names(
        &self,
        capsule: &CapsuleId,
        policy: &EgressPolicy,
        names: &Names,
    ) -> Result<(), Error>;

    /// The cluster DNS the node's proxies forward to by default (renders
    /// the guest's resolver file).
    fn cluster_dns(&self) -> dns::ClusterDns {
        dns::ClusterDns::default()
    }

    /// The names capsules' resolvers refused, throttled; `None` after the
    /// first call, and from a network without resolvers.
    fn take_name_refusals(&self) -> Option<tokio::sync::mpsc::Receiver<dns::NameRefused>> {
        None
    }

    /// Makes the capsule's published ports exactly `rules`: a port already
    /// published keeps its host port (its sources may change), a new one
    /// gets a free host port, a port left out gives its host port back.
    /// The claims are on disk before the node's ports table, replaced in
    /// one transaction, uses them; on failure the previous ports hold.
    /// New connections see the change; open ones run on. Legal while the
    /// capsule holds a slot (running, paused or suspended). Returns the
    /// capsule's host ports.
    fn publish(&self, capsule: &CapsuleId, rules: &[PortRule]) -> Result<Vec<HostPort>, Error>;

    /// The capsule's host ports, by guest port; empty when none.
    fn host_ports(&self, capsule: &CapsuleId) -> Vec<HostPort>;

    /// Recreates the TAP by name inside an existing capsule namespace (a
    /// restore opens the TAP the snapshot names). Legal after `setup`.
    fn ensure_tap(&self, capsule: &CapsuleId) -> Result<(), Error>;

    /// Removes the capsule's namespace, links, routes and conntrack
    /// entries; releases the slot and the host ports, or keeps both
    /// (suspend). Legal in any state,
    /// including after a failed or never-run setup.
    fn teardown(&self, capsule: &CapsuleId, mode: Teardown) -> Result<(), Error>;

    /// Removes every leftover with our prefix that no slot claim accounts
    /// for, and counts what it removed. Call at startup after `ensure_node`.
    fn sweep(&self) -> Result<SweepReport, Error>;

    /// Capsules holding a slot claim (running or suspended). Recovery
    /// tears down the network of any claim no journal accounts for, before
    /// [`NetOps::sweep`], which keeps whatever is claimed.
    fn claims(&self) -> Vec<CapsuleId>;
}

/// Errors of the network module. Each names the action that failed and
/// carries the capsule and device involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The capsule id cannot name resources.
    #[error("invalid capsule id {id:?}")]
    InvalidCapsuleId {
        /// The id as given.
        id: String,
    },
    /// The configuration is unusable.
    #[error("invalid network configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The slot claims could not be read.
    #[error("open slot claims in {path}")]
    OpenSlots {
        /// Claim directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The host-port range has too few free ports.
    #[error(
        "publish ports of capsule {capsule}: host-port range {range} has {free} free ports, {needed} needed"
    )]
    HostPortsExhausted {
        /// Capsule.
        capsule: CapsuleId,
        /// The range, as configured.
        range: String,
        /// New ports asked for.
        needed: usize,
        /// Free ports left.
        free: usize,
    },
    /// Writing or removing a host-port claim failed.
    #[error("write host port claim of capsule {capsule}")]
    HostPortClaim {
        /// Capsule.
        capsule: CapsuleId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Every slot is taken.
    #[error("claim a slot for capsule {capsule}: all slots are taken")]
    SlotsExhausted {
        /// Capsule.
        capsule: CapsuleId,
    },
    /// Another capsule's resources would have the same names.
    #[error("claim a slot for capsule {capsule}: short id taken by {other}")]
    ShortIdTaken {
        /// Capsule.
        capsule: CapsuleId,
        /// Capsule holding the short id.
        other: CapsuleId,
    },
    /// Writing or removing a claim failed.
    #[error("{action} slot claim of capsule {capsule}")]
    SlotClaim {
        /// `write` or `remove`.
        action: &'static str,
        /// Capsule.
        capsule: CapsuleId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A drained slot's claim could not be removed.
    #[error("free drained slot {slot}")]
    FreeSlot {
        /// The slot.
        slot: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A namespace could not be entered.
    #[error("enter network namespace {path}")]
    EnterNetns {
        /// Namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating a capsule's namespace failed.
    #[error("create network namespace {path} for capsule {capsule}")]
    CreateNetns {
        /// Capsule.
        capsule: CapsuleId,
        /// Namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Removing a namespace failed.
    #[error("remove network namespace {path}")]
    RemoveNetns {
        /// Namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating the veth pair failed.
    #[error("create veth {device} for capsule {capsule}")]
    CreateVeth {
        /// Capsule.
        capsule: CapsuleId,
        /// Node-side name.
        device: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating the TAP failed.
    #[error("create tap {device} for capsule {capsule}")]
    CreateTap {
        /// Capsule.
        capsule: CapsuleId,
        /// TAP name.
        device: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting addresses, state or queue length of a link failed.
    #[error("configure link {device} of capsule {capsule}")]
    ConfigureLink {
        /// Capsule.
        capsule: CapsuleId,
        /// Link.
        device: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Adding a route failed.
    #[error("add route to {dest} via {device} for capsule {capsule}")]
    AddRoute {
        /// Capsule.
        capsule: CapsuleId,
        /// Destination.
        dest: String,
        /// Link.
        device: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing links failed.
    #[error("list links in {netns}")]
    ListLinks {
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Deleting a link failed.
    #[error("delete link {device} in {netns}")]
    DeleteLink {
        /// Link.
        device: String,
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing a sysctl failed.
    #[error("set sysctl {key} in {netns}")]
    SetSysctl {
        /// Sysctl path under `/proc/sys`.
        key: String,
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Loading an nftables table failed.
    #[error("load nftables table {table} in {netns}")]
    LoadTable {
        /// Table.
        table: String,
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing or deleting nftables tables failed.
    #[error("{action} nftables tables in {netns}")]
    Tables {
        /// `list` or `delete`.
        action: &'static str,
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Flushing conntrack entries failed.
    #[error("flush conntrack entries of {what} in {netns}")]
    FlushConntrack {
        /// Whose entries.
        what: String,
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing namespaces failed.
    #[error("list network namespaces in {path}")]
    ListNetns {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The capsule has no network to act on.
    #[error("capsule {capsule} has no network namespace")]
    NotSetUp {
        /// Capsule.
        capsule: CapsuleId,
    },
    /// Starting, changing or loading the table of a capsule's DNS proxy
    /// failed.
    #[error("{action} the DNS proxy of capsule {capsule}")]
    DnsProxy {
        /// What was being done.
        action: &'static str,
        /// Capsule.
        capsule: CapsuleId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A failure injected by a test ([`LinuxNet::fail_before`]).
    #[error("injected failure before {step:?} of capsule {capsule}")]
    Injected {
        /// Capsule.
        capsule: CapsuleId,
        /// The step that was not run.
        step: SetupStep,
    },
    /// Teardown hit several errors; the first is the source.
    #[error("tear down network of capsule {capsule} ({count} errors)")]
    Teardown {
        /// Capsule.
        capsule: CapsuleId,
        /// How many steps failed.
        count: usize,
        /// The first failure.
        #[source]
        source: Box<Error>,
    },
}

/// Opens and closes a TCP connection to `addr` from inside the capsule
/// namespace at `netns`, within `timeout`: a readiness probe that reaches
/// only that one address. Blocking (a thread of its own enters the
/// namespace).
pub fn probe_tcp(
    netns: &std::path::Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    crate::sys::net::tcp_connect_in_netns(netns, addr, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_never_allow_metadata() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let listed = EgressPolicy::AllowList(vec![
            "198.51.100.0/24".parse().unwrap(),
            "168.63.129.16".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
        ]);
        assert!(listed.allows(ip("198.51.100.9")));
        assert!(!listed.allows(ip("198.51.101.9")));
        for md in ["169.254.169.254", "168.63.129.16"] {
            for p in [&EgressPolicy::Allow, &EgressPolicy::Deny, &listed] {
                assert!(!p.allows(ip(md)), "{p:?} allows {md}");
            }
        }
        assert!(EgressPolicy::Allow.allows(ip("203.0.113.1")));
        assert!(!EgressPolicy::Deny.allows(ip("203.0.113.1")));
    }

    #[test]
    fn sweep_takes_only_names_shaped_like_capsule_resources() {
        let id = CapsuleId::new("3f2a9c1e-77b0-4c1d-9e0a-5b6c7d8e9f00").unwrap();
        assert!(is_resource_name(&id.resource_name()));
        assert!(is_resource_name("wrenn-ab"));
        for other in [
            "wrenn",
            "wrenn-",
            "wrenn-node-a1",
            "wrenn-0123456789",
            "wrennab",
            "x-ab",
        ] {
            assert!(!is_resource_name(other), "{other:?}");
        }
    }

    #[test]
    fn capsule_ids_name_resources_within_ifnamsiz() {
        let id = CapsuleId::new("3f2a9c1e-77b0-4c1d-9e0a-5b6c7d8e9f00").unwrap();
        assert_eq!(id.short(), "3f2a9c1e7");
        assert_eq!(id.resource_name(), "wrenn-3f2a9c1e7");
        assert!(id.resource_name().len() <= 15);
        assert_eq!(CapsuleId::new("ab").unwrap().resource_name(), "wrenn-ab");
        for bad in ["", "-", "A", "a b", "a/b", &"a".repeat(64)] {
            assert!(CapsuleId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_ip_argument_matches_the_fixed_guest_link() {
        let net = CapsuleNet {
            capsule: CapsuleId::new("c1").unwrap(),
            slot: 1,
            netns: "/run/netns/wrenn-c1".into(),
            tap: TAP_NAME.into(),
            node_veth: "wrenn-c1".into(),
            addrs: AddressPlan::default().slot_addrs(1).unwrap(),
            guest: GUEST_ADDR,
            gateway: GUEST_GATEWAY,
            mac: GUEST_MAC,
        };
        assert_eq!(
            net.kernel_ip_arg(),
            "ip=169.254.0.21::169.254.0.22:255.255.255.252:capsule:eth0:off"
        );
    }
}
