//! The per-capsule ceilings (conntrack entries, new connections, packets,
//! bytes) that keep one capsule from exhausting the node's conntrack table
//! or uplink, and their defaults. The flags that set them are in `flags`;
//! the rules that enforce them are built in `ruleset`.

/// Ceilings every capsule's table enforces on its own traffic. Zero turns
/// one off. The defaults are what the chart ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleLimits {
    /// Connections (conntrack entries) the guest may have open at once.
    pub max_connections: u32,
    /// Connections the guest may open per second (a burst of one second's
    /// worth is allowed).
    pub new_connections_per_second: u32,
    /// Packets the guest may send per second.
    pub packets_per_second: u32,
    /// Bytes per second in each direction (guest to uplink, and to guest).
    pub bandwidth_bytes_per_second: u64,
}

impl CapsuleLimits {
    /// No ceiling at all.
    pub const UNLIMITED: Self = Self {
        max_connections: 0,
        new_connections_per_second: 0,
        packets_per_second: 0,
        bandwidth_bytes_per_second: 0,
    };
}

impl Default for CapsuleLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            new_connections_per_second: DEFAULT_NEW_CONNECTIONS_PER_SECOND,
            packets_per_second: DEFAULT_PACKETS_PER_SECOND,
            bandwidth_bytes_per_second: DEFAULT_BANDWIDTH_BYTES_PER_SECOND,
        }
    }
}

pub(super) const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
pub(super) const DEFAULT_NEW_CONNECTIONS_PER_SECOND: u32 = 200;
pub(super) const DEFAULT_PACKETS_PER_SECOND: u32 = 50_000;
/// 1 Gbit/s.
pub(super) const DEFAULT_BANDWIDTH_BYTES_PER_SECOND: u64 = 125_000_000;
