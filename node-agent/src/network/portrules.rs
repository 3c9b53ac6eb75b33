//! The ports table: published capsule ports as nftables rules in the node
//! namespace. Pure: built from the host-port claims (`hostports.rs`) and
//! each owner's slot host address; loaded by `linux.rs` in one transaction
//! that replaces the whole table, so no moment has half a change.
//!
//! For a claim (host port `H` → guest port `P`, sources `from`) of a
//! capsule whose slot host address is `A`:
//! - `prerouting` (nat): a new TCP connection to one of the node's own
//!   addresses, port `H`, from a source in `from`, is DNATed to `A:P`; the
//!   capsule namespace then DNATs `A` to the guest as for any connection
//!   from the node. A source outside `from` is not translated and meets
//!   whatever the node has on `H` (nothing, in the range we own).
//! - `forward` (filter, before the node table's): of the connections
//!   DNATed into a capsule, only `A:P` from a source in `from` pass; any
//!   other (a DNAT made by something else on the node, such as a Service
//!   whose endpoint someone pointed at a slot address) is dropped, so only
//!   declared ports are reachable and only from their sources. A DNAT to a
//!   slot address whose capsule has no network right now (suspended) is
//!   dropped rather than routed out of the node.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::addr::Cidr;
use super::hostports::Claim;
use super::ruleset::{
    Action, Chain, ChainKind, Family, Hook, IfName, L4, Match, Rule, Table, Verdict,
};
use super::{CapsuleId, PREFIX};

/// Name of the ports table (family `ip`, node namespace). Not shaped like a
/// capsule resource, and kept by the startup sweep.
pub const PORTS_TABLE: &str = "wrenn_ports";

/// Builds the ports table. `host_of` gives a capsule's slot host address;
/// a claim whose capsule has no slot gets no rule.
pub fn build_ports_table(
    claims: &BTreeMap<u16, Claim>,
    host_of: impl Fn(&CapsuleId) -> Option<Ipv4Addr>,
    host_range: Cidr,
) -> Table {
    use Match::*;
    let caps = || IfName::Prefix(format!("{PREFIX}-"));
    let mut dnat = Vec::new();
    let mut forward = vec![Rule {
        matches: vec![Oif(caps()), CtEstablished],
        action: Action::Accept,
    }];
    for (host_port, c) in claims {
        let Some(addr) = host_of(&c.capsule) else {
            continue;
        };
        for src in &c.from {
            dnat.push(Rule {
                matches: vec![FibDaddrLocal, Saddr(*src), Dport(L4::Tcp, *host_port)],
                action: Action::DnatPort(addr, c.port),
            });
            forward.push(Rule {
                matches: vec![
                    Oif(caps()),
                    CtDnat,
                    Daddr(Cidr::host(addr)),
                    Saddr(*src),
                    Dport(L4::Tcp, c.port),
                ],
                action: Action::Accept,
            });
        }
    }
    forward.push(Rule {
        matches: vec![Oif(caps()), CtDnat],
        action: Action::Drop,
    });
    forward.push(Rule {
        matches: vec![Daddr(host_range), OifNot(caps()), CtDnat],
        action: Action::Drop,
    });
    Table {
        family: Family::Ip,
        name: PORTS_TABLE.to_string(),
        sets: Vec::new(),
        chains: vec![
            Chain {
                name: "prerouting",
                kind: ChainKind::Nat,
                hook: Hook::Prerouting,
                priority: -100,
                policy: Verdict::Accept,
                rules: dnat,
            },
            Chain {
                name: "forward",
                kind: ChainKind::Filter,
                hook: Hook::Forward,
                // Before the node table (0), whose accept of DNATed
                // connections relies on this chain's drops.
                priority: -10,
                policy: Verdict::Accept,
                rules: forward,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_of_each_claim_gets_a_dnat_and_a_forward_accept_and_nothing_else_passes() {
        let a = CapsuleId::new("aaa").unwrap();
        let b = CapsuleId::new("bbb").unwrap();
        let claims = BTreeMap::from([
            (
                29000,
                Claim {
                    capsule: a.clone(),
                    port: 8080,
                    from: vec![
                        "10.244.0.0/16".parse().unwrap(),
                        "192.0.2.7".parse().unwrap(),
                    ],
                },
            ),
            (
                29001,
                Claim {
                    capsule: b.clone(),
                    port: 22,
                    from: vec!["10.244.0.0/16".parse().unwrap()],
                },
            ),
        ]);
        // b has no slot (torn down): no rule for it.
        let t = build_ports_table(
            &claims,
            |c| (c == &a).then_some(Ipv4Addr::new(10, 11, 0, 3)),
            "10.11.0.0/16".parse().unwrap(),
        );
        assert_eq!(
            t.to_string(),
            r#"table ip wrenn_ports {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		fib daddr type local ip saddr 10.244.0.0/16 tcp dport 29000 dnat to 10.11.0.3:8080
		fib daddr type local ip saddr 192.0.2.7/32 tcp dport 29000 dnat to 10.11.0.3:8080
	}
	chain forward {
		type filter hook forward priority -10; policy accept;
		oifname "wrenn-*" ct state established,related accept
		oifname "wrenn-*" ct status dnat ip daddr 10.11.0.3/32 ip saddr 10.244.0.0/16 tcp dport 8080 accept
		oifname "wrenn-*" ct status dnat ip daddr 10.11.0.3/32 ip saddr 192.0.2.7/32 tcp dport 8080 accept
		oifname "wrenn-*" ct status dnat drop
		ip daddr 10.11.0.0/16 oifname != "wrenn-*" ct status dnat drop
	}
}
"#
        );
    }
}
