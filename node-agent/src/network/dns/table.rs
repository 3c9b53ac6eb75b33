//! The names table: one nftables table per capsule namespace, beside the
//! capsule table, that marks what the capsule table then accepts (see
//! `ruleset::DNS_MARK`, `ruleset::FQDN_MARK`):
//! - the guest's DNS queries to its gateway (where the proxy listens),
//!   unless `dns.blockUnderDeny` closes them under `egress: Deny`;
//! - guest packets towards an address in the `fqdn` set, which the proxy
//!   fills from the answers to allowed names, each element timing out with
//!   its answer's TTL.
//!
//! It is a table of its own so that an egress policy change, which
//! replaces the capsule table, keeps the set; and a names change replaces
//! this table with the set's still-allowed elements in the same
//! transaction. It dies with the namespace.

use std::time::Duration;

use crate::network::addr::{Cidr, GUEST_GATEWAY};
use crate::network::ruleset::{AddrSet, DNS_MARK, FQDN_MARK, L4, SetElement};
use crate::network::{Action, Chain, ChainKind, Family, Hook, IfName, Match, Rule, Table, Verdict};

/// Name of the names table in a capsule namespace.
pub const NAMES_TABLE: &str = "wrenn_names";
/// The set of addresses allowed host names resolved to.
pub const FQDN_SET: &str = "fqdn";
/// Shortest time an answer's addresses stay open, whatever its TTL: a
/// TTL of 0 must still let the connection that follows the lookup open.
pub const MIN_OPEN: Duration = Duration::from_secs(5);
/// Longest time an answer's addresses stay open: a name that moves away
/// from an address stops opening it within this.
pub const MAX_OPEN: Duration = Duration::from_secs(3600);
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// How long an answer with `ttl` seconds opens its addresses.
pub fn open_for(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_OPEN, MAX_OPEN)
}

/// Builds the names table for the guest behind `tap`: DNS to the gateway
/// marked when `dns_open`, and `elements` in the `fqdn` set.
pub fn build_names_table(tap: &str, dns_open: bool, elements: Vec<SetElement>) -> Table {
    use Match::*;
    let tap = || Iif(IfName::Exact(tap.to_string()));
    let mut dns = Vec::new();
    if dns_open {
        for proto in [L4::Udp, L4::Tcp] {
            dns.push(Rule {
                matches: vec![
                    tap(),
                    Daddr(Cidr::host(GUEST_GATEWAY)),
                    Dport(proto, DNS_PORT),
                ],
                action: Action::SetMark(DNS_MARK),
            });
        }
    }
    // Before the capsule table's chains (priority 0) on the same hooks.
    let chain = |name, hook, rules| Chain {
        name,
        kind: ChainKind::Filter,
        hook,
        priority: -10,
        policy: Verdict::Accept,
        rules,
    };
    Table {
        family: Family::Ip,
        name: NAMES_TABLE.into(),
        chains: vec![
            chain("dns", Hook::Input, dns),
            chain(
                "fqdn",
                Hook::Forward,
                vec![Rule {
                    matches: vec![tap(), DaddrInSet(FQDN_SET)],
                    action: Action::SetMark(FQDN_MARK),
                }],
            ),
        ],
        sets: vec![AddrSet {
            name: FQDN_SET,
            timeouts: true,
            elements,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table_marks_dns_to_the_gateway_and_allowed_addresses() {
        let t = build_names_table("tap0", true, vec![]);
        assert_eq!(
            t.to_string(),
            r#"table ip wrenn_names {
	set fqdn { type ipv4_addr; flags timeout; }
	chain dns {
		type filter hook input priority -10; policy accept;
		iifname "tap0" ip daddr 169.254.0.22/32 udp dport 53 meta mark set 0x57720001
		iifname "tap0" ip daddr 169.254.0.22/32 tcp dport 53 meta mark set 0x57720001
	}
	chain fqdn {
		type filter hook forward priority -10; policy accept;
		iifname "tap0" ip daddr @fqdn meta mark set 0x57720002
	}
}
"#
        );
        let closed = build_names_table("tap0", false, vec![]);
        assert!(closed.chains[0].rules.is_empty());
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(open_for(0), MIN_OPEN);
        assert_eq!(open_for(300), Duration::from_secs(300));
        assert_eq!(open_for(u32::MAX), MAX_OPEN);
    }
}
