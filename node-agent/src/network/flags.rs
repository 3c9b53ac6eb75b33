//! What a node admin tunes about capsule networks, as `wrenn-node-agent`
//! flags: destinations blocked on top of the built-in set, the per-capsule
//! ceilings ([`CapsuleLimits`]), the cluster DNS, the node ports
//! published capsule ports are taken from, and how many namespaces are
//! kept ready ahead of creates.

use super::addr::Cidr;
use super::limits::{
    CapsuleLimits, DEFAULT_BANDWIDTH_BYTES_PER_SECOND, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_NEW_CONNECTIONS_PER_SECOND, DEFAULT_PACKETS_PER_SECOND,
};

/// Egress flags of `wrenn-node-agent` (flattened into its `Args`).
#[derive(Clone, Debug, clap::Args)]
pub struct EgressFlags {
    /// IPv4 destinations no capsule may reach, whatever its policy, on top
    /// of the built-in private, shared-address and link-local ranges and
    /// the cloud metadata addresses. Comma-separated CIDRs.
    #[arg(
        long = "blocked-egress-cidrs",
        env = "WRENN_BLOCKED_EGRESS_CIDRS",
        value_delimiter = ',',
        value_parser = blocked_cidr
    )]
    pub blocked: Vec<Cidr>,
    /// Open connections (conntrack entries) per capsule; 0: no limit.
    #[arg(
        long,
        env = "WRENN_CAPSULE_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS
    )]
    pub capsule_max_connections: u32,
    /// New connections per second per capsule; 0: no limit.
    #[arg(
        long,
        env = "WRENN_CAPSULE_NEW_CONNECTIONS_PER_SECOND",
        default_value_t = DEFAULT_NEW_CONNECTIONS_PER_SECOND
    )]
    pub capsule_new_connections_per_second: u32,
    /// Packets per second a capsule may send; 0: no limit.
    #[arg(
        long,
        env = "WRENN_CAPSULE_PACKETS_PER_SECOND",
        default_value_t = DEFAULT_PACKETS_PER_SECOND
    )]
    pub capsule_packets_per_second: u32,
    /// Bytes per second per capsule, each direction; 0: no limit.
    #[arg(
        long,
        env = "WRENN_CAPSULE_BANDWIDTH_BYTES_PER_SECOND",
        default_value_t = DEFAULT_BANDWIDTH_BYTES_PER_SECOND
    )]
    pub capsule_bandwidth_bytes_per_second: u64,
    /// The cluster DNS Service address capsules' DNS proxies forward to
    /// when a capsule names no nameservers (the kubelet's `clusterDNS`).
    /// Unset: such capsules resolve nothing.
    #[arg(long, env = "WRENN_CLUSTER_DNS")]
    pub cluster_dns: Option<std::net::Ipv4Addr>,
    /// The cluster domain of capsules' default search path
    /// (`NS.svc.DOMAIN svc.DOMAIN DOMAIN`).
    #[arg(
        long,
        env = "WRENN_CLUSTER_DOMAIN",
        default_value = "cluster.local",
        value_parser = cluster_domain
    )]
    pub cluster_domain: String,
    /// Node ports published capsule ports are taken from, `FIRST-LAST`.
    /// Keep it clear of the NodePort range, the ephemeral port range and
    /// every service listening on the node: the agent DNATs new
    /// connections to these ports on every node address.
    #[arg(
        long,
        env = "WRENN_HOST_PORT_RANGE",
        default_value_t = super::HostPortRange::default()
    )]
    pub host_port_range: super::HostPortRange,
    /// Capsule network namespaces kept ready ahead of creates (with their
    /// veth and TAP, unaddressed), so a create does not wait for the
    /// kernel to make one; refilled once creates pause. 0: every create
    /// makes its own. The chart sets 8.
    #[arg(
        long,
        env = "WRENN_NETNS_POOL",
        default_value_t = 0,
        value_parser = clap::value_parser!(u16).range(0..=256)
    )]
    pub netns_pool: u16,
}

fn cluster_domain(s: &str) -> Result<String, String> {
    if super::dns::is_dns_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a lowercase DNS name"))
    }
}

impl EgressFlags {
    /// The cluster DNS the flags name.
    pub fn cluster_dns(&self) -> super::dns::ClusterDns {
        super::dns::ClusterDns {
            server: self.cluster_dns,
            domain: self.cluster_domain.clone(),
        }
    }

    /// The per-capsule limits the flags ask for.
    pub fn limits(&self) -> CapsuleLimits {
        CapsuleLimits {
            max_connections: self.capsule_max_connections,
            new_connections_per_second: self.capsule_new_connections_per_second,
            packets_per_second: self.capsule_packets_per_second,
            bandwidth_bytes_per_second: self.capsule_bandwidth_bytes_per_second,
        }
    }
}

/// An IPv4 CIDR; an IPv6 one is refused with the reason (capsules have no
/// IPv6 at all, so there is nothing to block).
fn blocked_cidr(s: &str) -> Result<Cidr, String> {
    if s.contains(':') {
        return Err(format!(
            "{s:?}: capsules have no IPv6 (their namespaces disable it and the node drops any IPv6 from them), so IPv6 destinations need no entry"
        ));
    }
    s.trim().parse::<Cidr>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        egress: EgressFlags,
    }

    #[test]
    fn flags_parse_cidrs_and_limits_and_refuse_ipv6() {
        let t = T::try_parse_from([
            "t",
            "--blocked-egress-cidrs",
            "203.0.113.0/24,198.51.100.7",
            "--capsule-max-connections",
            "0",
        ])
        .unwrap();
        assert_eq!(
            t.egress.blocked,
            vec![
                "203.0.113.0/24".parse().unwrap(),
                "198.51.100.7/32".parse().unwrap()
            ]
        );
        let l = t.egress.limits();
        assert_eq!(l.max_connections, 0);
        assert_eq!(l.packets_per_second, DEFAULT_PACKETS_PER_SECOND);

        let err = T::try_parse_from(["t", "--blocked-egress-cidrs", "2001:db8::/32"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("capsules have no IPv6"), "{err}");
        assert!(T::try_parse_from(["t", "--blocked-egress-cidrs", "10.1.2.3/8"]).is_err());
    }
}
