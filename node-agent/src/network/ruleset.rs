//! nftables rulesets as plain values: what the node table and each capsule
//! table contain. Built here (pure, unit-tested, printable in `nft` syntax);
//! encoded into netlink messages and loaded by `sys::net`.
//!
//! Three tables here (the node's ports table, for published capsule
//! ports, is built in `portrules.rs`):
//! - the **node table** (family `ip`, one per node, in the node namespace):
//!   isolation that holds for every capsule, matched by interface-name
//!   prefix, the destinations no capsule may reach, plus the MASQUERADE out
//!   of the uplink. It has no per-capsule rules, so creating or removing a
//!   capsule never touches it.
//! - the **node IPv6 table** (family `ip6`, same name): drops every IPv6
//!   packet from or to a capsule link. Capsule namespaces disable IPv6; this
//!   holds even if one did not (IPv6 metadata such as `fd00:ec2::254`).
//! - a **capsule table** (in each capsule namespace): DNAT/SNAT between the
//!   fixed guest address and the slot's host address, the per-capsule
//!   limits, the capsule's egress policy, and a drop of every frame from
//!   the TAP whose source MAC is not the guest's. It dies with the namespace, so
//!   it cannot leak; a policy change replaces it in one transaction.
//!
//! Why this file is long: 567 lines of code and 218 of unit tests kept beside
//! the code they check.

use std::fmt;
use std::net::Ipv4Addr;

use super::EgressPolicy;
use super::addr::{ALWAYS_BLOCKED, Cidr, GUEST_ADDR, GUEST_MAC, SlotAddrs};
use super::limits::CapsuleLimits;

/// A table to load, replacing any table of the same name and family
/// atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Address family.
    pub family: Family,
    /// Table name.
    pub name: String,
    /// Base chains, each hooked into the stack.
    pub chains: Vec<Chain>,
    /// Named IPv4 address sets, created before the chains that look in them.
    pub sets: Vec<AddrSet>,
}

/// A named set of IPv4 addresses, optionally with per-element timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrSet {
    /// Set name, unique in its table.
    pub name: &'static str,
    /// Whether elements expire (`flags timeout`).
    pub timeouts: bool,
    /// Elements loaded with the table.
    pub elements: Vec<SetElement>,
}

/// One address in an [`AddrSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetElement {
    /// The address.
    pub addr: Ipv4Addr,
    /// When it leaves the set; `None`: never (sets without timeouts).
    pub timeout: Option<std::time::Duration>,
}

/// Packet mark the names table (`network::dns`) sets on a guest's DNS
/// query to its resolver: the capsule table's input chain accepts it.
pub const DNS_MARK: u32 = 0x5772_0001;
/// Packet mark the names table sets on a guest packet towards an address
/// an allowed host name resolved to: the capsule table's forward chain
/// accepts it (metadata and the node's blocked ranges still drop first).
pub const FQDN_MARK: u32 = 0x5772_0002;

/// Transport protocol of a [`Match::Dport`] or [`Match::Proto`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A base chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: &'static str,
    /// `filter` or `nat`.
    pub kind: ChainKind,
    /// Netfilter hook.
    pub hook: Hook,
    /// Hook priority (`filter` = 0, `dstnat` = -100, `srcnat` = 100).
    pub priority: i32,
    /// Verdict for packets no rule decided.
    pub policy: Verdict,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// nftables address family of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `ip`: IPv4.
    Ip,
    /// `ip6`: IPv6 (interface matches only).
    Ip6,
}

/// Chain type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainKind {
    /// Filtering.
    Filter,
    /// Address translation (first packet of a connection only).
    Nat,
}

/// Netfilter hooks we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Before routing.
    Prerouting,
    /// To a local socket.
    Input,
    /// Routed through.
    Forward,
    /// After routing, leaving.
    Postrouting,
}

/// Chain policies and terminal verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the packet through this chain.
    Accept,
    /// Drop it.
    Drop,
}

/// A rule: all matches must hold, then the action runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Conditions, all required.
    pub matches: Vec<Match>,
    /// What to do with a matching packet.
    pub action: Action,
}

/// An interface name, exact or by prefix (`"wrenn-*"` in nft syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfName {
    /// This exact name.
    Exact(String),
    /// Any name starting with this.
    Prefix(String),
}

/// One condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Input interface is.
    Iif(IfName),
    /// Output interface is.
    Oif(IfName),
    /// Output interface is not.
    OifNot(IfName),
    /// Source address in.
    Saddr(Cidr),
    /// Source address not in.
    SaddrNot(Cidr),
    /// Destination address in.
    Daddr(Cidr),
    /// Source MAC address (link-layer header) is not; only for packets
    /// that came in on an Ethernet device, such as a TAP.
    EtherSaddrNot([u8; 6]),
    /// Connection tracking state is established or related.
    CtEstablished,
    /// More connections than this are tracked for packets that reach the
    /// rule (`ct count over`); the one being opened counts.
    CtCountOver(u32),
    /// The rule's token bucket is empty (`limit rate over`).
    LimitOver(Limit),
    /// Transport protocol is, and its destination port is (`tcp dport
    /// 80`): the one way to match a port, since a port means nothing
    /// without its protocol.
    Dport(L4, u16),
    /// Transport protocol is (`meta l4proto tcp`).
    Proto(L4),
    /// Destination address is in this set of the same table.
    DaddrInSet(&'static str),
    /// Packet mark is.
    Mark(u32),
    /// The connection's destination was rewritten by a DNAT in this
    /// namespace (`ct status dnat`).
    CtDnat,
    /// The destination is an address of this namespace (`fib daddr type
    /// local`), not one merely routed through it.
    FibDaddrLocal,
}

/// A token bucket: `rate` per second, holding up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Refill per second.
    pub rate: u64,
    /// Bucket size.
    pub burst: u32,
    /// What the bucket counts.
    pub unit: LimitUnit,
}

/// What a [`Limit`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitUnit {
    /// Packets.
    Packets,
    /// Bytes.
    Bytes,
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Accept.
    Accept,
    /// Drop.
    Drop,
    /// Rewrite the source to this address.
    Snat(Ipv4Addr),
    /// Rewrite the destination to this address.
    Dnat(Ipv4Addr),
    /// Rewrite the destination to this address and port.
    DnatPort(Ipv4Addr, u16),
    /// Rewrite the source to the output interface's address.
    Masquerade,
    /// Set the packet mark and go on with the next rule.
    SetMark(u32),
    /// Refuse with a TCP reset (a TCP packet only: the kernel sends
    /// nothing for another protocol, and drops it).
    RejectTcpReset,
    /// Refuse with ICMP "administratively prohibited".
    RejectAdminProhibited,
}

fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule { matches, action }
}

/// What the node table needs to know.
#[derive(Clone, Debug)]
pub struct NodeRules<'a> {
    /// Table name; also the prefix of every link and namespace we own.
    pub prefix: &'a str,
    /// The node's uplink, the only interface capsules may leave through.
    pub uplink: &'a str,
    /// All host addresses of slots.
    pub host_range: Cidr,
    /// Destinations no capsule may reach through the uplink, whatever its
    /// policy (cluster and private networks); [`ALWAYS_BLOCKED`] comes first
    /// whatever this says.
    pub blocked: &'a [Cidr],
}

/// Builds the node table: isolation for every capsule, and masquerade.
pub fn build_node_table(r: &NodeRules<'_>) -> Table {
    use Match::*;
    let caps = || IfName::Prefix(format!("{}-", r.prefix));
    let uplink = IfName::Exact(r.uplink.to_string());

    let input = vec![
        // Replies to connections the node opened to a capsule.
        rule(vec![Iif(caps()), CtEstablished], Action::Accept),
        // Nothing else from a capsule reaches a local socket: not the
        // agent's ports, not any other host service, on any node address.
        rule(vec![Iif(caps())], Action::Drop),
    ];

    let mut forward = vec![
        // No capsule reaches another capsule (guest agents trust their link).
        rule(vec![Iif(caps()), Oif(caps())], Action::Drop),
        // Towards a capsule only replies pass, and connections DNATed in
        // this namespace: the ports table (`portrules.rs`, hook priority
        // before this one) has already dropped every such connection that
        // is not to a published port from an allowed source. Other new
        // connections into a capsule come from the node itself (OUTPUT),
        // never through it.
        rule(vec![Oif(caps()), CtEstablished], Action::Accept),
        rule(vec![Oif(caps()), CtDnat], Action::Accept),
        rule(vec![Oif(caps())], Action::Drop),
        // Replies of those published connections go back wherever the
        // client is (a Pod interface, the cluster's private network).
        rule(vec![Iif(caps()), CtDnat, CtEstablished], Action::Accept),
        // Capsules leave through the uplink only, and only from their own
        // host address (the capsule namespace SNATs the guest to it).
        rule(vec![Iif(caps()), OifNot(uplink.clone())], Action::Drop),
        rule(vec![Iif(caps()), SaddrNot(r.host_range)], Action::Drop),
    ];
    for net in ALWAYS_BLOCKED.iter().chain(r.blocked) {
        forward.push(rule(vec![Iif(caps()), Daddr(*net)], Action::Drop));
    }
    forward.push(rule(vec![Iif(caps())], Action::Accept));

    Table {
        family: Family::Ip,
        name: r.prefix.to_string(),
        chains: vec![
            Chain {
                name: "input",
                kind: ChainKind::Filter,
                hook: Hook::Input,
                priority: 0,
                // The node's own traffic is not ours to judge.
                policy: Verdict::Accept,
                rules: input,
            },
            Chain {
                name: "forward",
                kind: ChainKind::Filter,
                hook: Hook::Forward,
                priority: 0,
                policy: Verdict::Accept,
                rules: forward,
            },
            Chain {
                name: "postrouting",
                kind: ChainKind::Nat,
                hook: Hook::Postrouting,
                priority: 100,
                policy: Verdict::Accept,
                // Matches the host address, i.e. after the capsule's SNAT
                // (notes §11.35: matching anything else masquerades nothing).
                rules: vec![rule(
                    vec![Oif(uplink), Saddr(r.host_range)],
                    Action::Masquerade,
                )],
            },
        ],
        sets: Vec::new(),
    }
}

/// Builds the node's IPv6 table: no IPv6 packet from or to a capsule link,
/// to the node or through it. Capsules are IPv4 only; this is the second
/// wall should a capsule namespace ever have IPv6 on.
pub fn build_node_table6(prefix: &str) -> Table {
    use Match::*;
    let caps = || IfName::Prefix(format!("{prefix}-"));
    let filter = |name, hook, rules| Chain {
        name,
        kind: ChainKind::Filter,
        hook,
        priority: 0,
        policy: Verdict::Accept,
        rules,
    };
    Table {
        family: Family::Ip6,
        name: prefix.to_string(),
        chains: vec![
            filter(
                "input",
                Hook::Input,
                vec![rule(vec![Iif(caps())], Action::Drop)],
            ),
            filter(
                "forward",
                Hook::Forward,
                vec![
                    rule(vec![Iif(caps())], Action::Drop),
                    rule(vec![Oif(caps())], Action::Drop),
                ],
            ),
        ],
        sets: Vec::new(),
    }
}

/// What a capsule table needs to know.
#[derive(Clone, Debug)]
pub struct CapsuleRules<'a> {
    /// Table name.
    pub table: &'a str,
    /// The slot's addresses.
    pub addrs: SlotAddrs,
    /// Capsule-side veth (towards the node).
    pub veth: &'a str,
    /// The guest's TAP.
    pub tap: &'a str,
    /// Egress policy from the capsule's spec.
    pub policy: &'a EgressPolicy,
    /// The node's per-capsule ceilings.
    pub limits: CapsuleLimits,
}

/// Builds a capsule table: NAT between the fixed guest address and the
/// slot's host address, and the egress policy.
pub fn build_capsule_table(r: &CapsuleRules<'_>) -> Table {
    use ChainKind::{Filter, Nat};
    use Match::*;
    let veth = || IfName::Exact(r.veth.to_string());
    let tap = || IfName::Exact(r.tap.to_string());
    let guest = Cidr::host(GUEST_ADDR);
    let chain = |name, kind, hook, priority, policy, rules| Chain {
        name,
        kind,
        hook,
        priority,
        policy,
        rules,
    };
    Table {
        family: Family::Ip,
        name: r.table.to_string(),
        chains: vec![
            // Before NAT and before either filter chain: a frame with a
            // forged source MAC goes nowhere, not even to the capsule
            // namespace itself.
            chain(
                "guest_mac",
                Filter,
                Hook::Prerouting,
                -150,
                Verdict::Accept,
                vec![rule(
                    vec![Iif(tap()), EtherSaddrNot(GUEST_MAC)],
                    Action::Drop,
                )],
            ),
            chain(
                "prerouting",
                Nat,
                Hook::Prerouting,
                -100,
                Verdict::Accept,
                vec![rule(
                    vec![Iif(veth()), Daddr(Cidr::host(r.addrs.host))],
                    Action::Dnat(GUEST_ADDR),
                )],
            ),
            chain(
                "postrouting",
                Nat,
                Hook::Postrouting,
                100,
                Verdict::Accept,
                vec![rule(
                    vec![Oif(veth()), Saddr(guest)],
                    Action::Snat(r.addrs.host),
                )],
            ),
            // The guest reaches nothing in its own namespace.
            // Nor anything but its resolver when the names table opened it.
            chain(
                "input",
                Filter,
                Hook::Input,
                0,
                Verdict::Accept,
                vec![
                    rule(vec![Iif(tap()), CtEstablished], Action::Accept),
                    rule(vec![Iif(tap()), Mark(DNS_MARK)], Action::Accept),
                    rule(vec![Iif(tap())], Action::Drop),
                ],
            ),
            chain(
                "forward",
                Filter,
                Hook::Forward,
                0,
                Verdict::Drop,
                build_forward_rules(r),
            ),
        ],
        sets: Vec::new(),
    }
}

/// The forward chain: ceilings, established traffic, the node's own
/// connections to the guest, connection limits, then egress.
fn build_forward_rules(r: &CapsuleRules<'_>) -> Vec<Rule> {
    use Match::*;
    let veth = || IfName::Exact(r.veth.to_string());
    let tap = || IfName::Exact(r.tap.to_string());
    let l = r.limits;
    let mut forward = Vec::new();
    // Ceilings on every packet, before established traffic is waved
    // through: a flood on an open connection is still a flood.
    if l.packets_per_second > 0 {
        let pps = u64::from(l.packets_per_second);
        forward.push(rule(
            vec![
                Iif(tap()),
                LimitOver(packets(pps, l.packets_per_second / 10)),
            ],
            Action::Drop,
        ));
    }
    if l.bandwidth_bytes_per_second > 0 {
        let b = bytes(l.bandwidth_bytes_per_second);
        forward.push(rule(vec![Iif(tap()), LimitOver(b)], Action::Drop));
        forward.push(rule(vec![Oif(tap()), LimitOver(b)], Action::Drop));
    }
    forward.push(rule(vec![CtEstablished], Action::Accept));
    // The node (agent, port forwarding) may open connections to the guest.
    forward.push(rule(
        vec![Iif(veth()), Oif(tap()), Daddr(Cidr::host(GUEST_ADDR))],
        Action::Accept,
    ));
    // Only packets opening a connection get here: count and rate them.
    if l.max_connections > 0 {
        forward.push(rule(
            vec![Iif(tap()), CtCountOver(l.max_connections)],
            Action::Drop,
        ));
    }
    if l.new_connections_per_second > 0 {
        let n = u64::from(l.new_connections_per_second);
        forward.push(rule(
            vec![
                Iif(tap()),
                LimitOver(packets(n, l.new_connections_per_second)),
            ],
            Action::Drop,
        ));
    }
    forward.extend(build_egress_rules(r));
    forward
}

/// Egress: only from the guest's own address (no spoofing), never to
/// metadata, then whatever the policy allows. A connection the policy
/// does not allow is refused at once (a TCP reset, else ICMP
/// administratively prohibited) rather than dropped: a program in the
/// guest fails fast with "connection refused" instead of hanging until
/// its own timeout, and learns nothing it could not learn from a drop.
fn build_egress_rules(r: &CapsuleRules<'_>) -> Vec<Rule> {
    use Match::*;
    let egress = || {
        vec![
            Iif(IfName::Exact(r.tap.to_string())),
            Oif(IfName::Exact(r.veth.to_string())),
            Saddr(Cidr::host(GUEST_ADDR)),
        ]
    };
    let mut out: Vec<Rule> = ALWAYS_BLOCKED
        .iter()
        .map(|net| rule(vec![Daddr(*net)], Action::Drop))
        .collect();
    let fqdn = || {
        let mut m = egress();
        m.push(Mark(FQDN_MARK));
        rule(m, Action::Accept)
    };
    let refuse = || {
        let mut tcp = egress();
        tcp.push(Proto(L4::Tcp));
        [
            rule(tcp, Action::RejectTcpReset),
            rule(egress(), Action::RejectAdminProhibited),
        ]
    };
    match r.policy {
        EgressPolicy::Deny => {
            out.push(fqdn());
            out.extend(refuse());
        }
        EgressPolicy::Allow => out.push(rule(egress(), Action::Accept)),
        EgressPolicy::AllowList(nets) => {
            for net in nets {
                let mut m = egress();
                m.push(Daddr(*net));
                out.push(rule(m, Action::Accept));
            }
            out.push(fqdn());
            out.extend(refuse());
        }
    }
    out
}

/// A packet bucket; at least the kernel's default burst of 5.
fn packets(rate: u64, burst: u32) -> Limit {
    Limit {
        rate,
        burst: burst.max(5),
        unit: LimitUnit::Packets,
    }
}

/// A byte bucket holding one second's worth, and never less than the
/// largest packet the stack may forward (64 KiB with GRO): a smaller bucket
/// would drop such a packet however idle the capsule is.
fn bytes(rate: u64) -> Limit {
    Limit {
        rate,
        burst: u32::try_from(rate).unwrap_or(u32::MAX).max(1 << 16),
        unit: LimitUnit::Bytes,
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IfName::Exact(n) => write!(f, "\"{n}\""),
            IfName::Prefix(p) => write!(f, "\"{p}*\""),
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Iif(n) => write!(f, "iifname {n}"),
            Match::Oif(n) => write!(f, "oifname {n}"),
            Match::OifNot(n) => write!(f, "oifname != {n}"),
            Match::Saddr(c) => write!(f, "ip saddr {c}"),
            Match::SaddrNot(c) => write!(f, "ip saddr != {c}"),
            Match::Daddr(c) => write!(f, "ip daddr {c}"),
            Match::EtherSaddrNot(m) => write!(
                f,
                "ether saddr != {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            Match::CtEstablished => f.write_str("ct state established,related"),
            Match::CtDnat => f.write_str("ct status dnat"),
            Match::FibDaddrLocal => f.write_str("fib daddr type local"),
            Match::CtCountOver(n) => write!(f, "ct count over {n}"),
            Match::Dport(L4::Tcp, p) => write!(f, "tcp dport {p}"),
            Match::Dport(L4::Udp, p) => write!(f, "udp dport {p}"),
            Match::Proto(L4::Tcp) => f.write_str("meta l4proto tcp"),
            Match::Proto(L4::Udp) => f.write_str("meta l4proto udp"),
            Match::DaddrInSet(set) => write!(f, "ip daddr @{set}"),
            Match::Mark(m) => write!(f, "meta mark {m:#010x}"),
            Match::LimitOver(Limit {
                rate,
                burst,
                unit: LimitUnit::Packets,
            }) => write!(f, "limit rate over {rate}/second burst {burst} packets"),
            Match::LimitOver(Limit {
                rate,
                burst,
                unit: LimitUnit::Bytes,
            }) => write!(f, "limit rate over {rate} bytes/second burst {burst} bytes"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Accept => f.write_str("accept"),
            Action::Drop => f.write_str("drop"),
            Action::Snat(a) => write!(f, "snat to {a}"),
            Action::Dnat(a) => write!(f, "dnat to {a}"),
            Action::DnatPort(a, p) => write!(f, "dnat to {a}:{p}"),
            Action::Masquerade => f.write_str("masquerade"),
            Action::SetMark(m) => write!(f, "meta mark set {m:#010x}"),
            Action::RejectTcpReset => f.write_str("reject with tcp reset"),
            Action::RejectAdminProhibited => f.write_str("reject with icmp admin-prohibited"),
        }
    }
}

/// `nft` syntax, as `nft list table` would print it (minus handles): for
/// logs, and for tests to read.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        };
        writeln!(f, "table {family} {} {{", self.name)?;
        for s in &self.sets {
            let flags = if s.timeouts { " flags timeout;" } else { "" };
            writeln!(f, "\tset {} {{ type ipv4_addr;{flags} }}", s.name)?;
        }
        for c in &self.chains {
            let kind = match c.kind {
                ChainKind::Filter => "filter",
                ChainKind::Nat => "nat",
            };
            let hook = match c.hook {
                Hook::Prerouting => "prerouting",
                Hook::Input => "input",
                Hook::Forward => "forward",
                Hook::Postrouting => "postrouting",
            };
            let policy = match c.policy {
                Verdict::Accept => "accept",
                Verdict::Drop => "drop",
            };
            writeln!(f, "\tchain {} {{", c.name)?;
            writeln!(
                f,
                "\t\ttype {kind} hook {hook} priority {}; policy {policy};",
                c.priority
            )?;
            for r in &c.rules {
                f.write_str("\t\t")?;
                for m in &r.matches {
                    write!(f, "{m} ")?;
                }
                writeln!(f, "{}", r.action)?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::addr::AddressPlan;

    fn addrs() -> SlotAddrs {
        AddressPlan::default().slot_addrs(7).unwrap()
    }

    fn capsule(policy: &EgressPolicy, limits: CapsuleLimits) -> Table {
        build_capsule_table(&CapsuleRules {
            table: "wrenn",
            addrs: addrs(),
            veth: "veth0",
            tap: "tap0",
            policy,
            limits,
        })
    }

    #[test]
    fn node_table_isolates_capsules_and_masquerades_host_addresses() {
        let blocked = ["10.0.0.0/8".parse().unwrap()];
        let t = build_node_table(&NodeRules {
            prefix: "wrenn",
            uplink: "eth0",
            host_range: "10.11.0.0/16".parse().unwrap(),
            blocked: &blocked,
        });
        let text = t.to_string();
        assert_eq!(
            text,
            r#"table ip wrenn {
	chain input {
		type filter hook input priority 0; policy accept;
		iifname "wrenn-*" ct state established,related accept
		iifname "wrenn-*" drop
	}
	chain forward {
		type filter hook forward priority 0; policy accept;
		iifname "wrenn-*" oifname "wrenn-*" drop
		oifname "wrenn-*" ct state established,related accept
		oifname "wrenn-*" ct status dnat accept
		oifname "wrenn-*" drop
		iifname "wrenn-*" ct status dnat ct state established,related accept
		iifname "wrenn-*" oifname != "eth0" drop
		iifname "wrenn-*" ip saddr != 10.11.0.0/16 drop
		iifname "wrenn-*" ip daddr 169.254.0.0/16 drop
		iifname "wrenn-*" ip daddr 168.63.129.16/32 drop
		iifname "wrenn-*" ip daddr 10.0.0.0/8 drop
		iifname "wrenn-*" accept
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		oifname "eth0" ip saddr 10.11.0.0/16 masquerade
	}
}
"#
        );
    }

    #[test]
    fn node_table_blocks_metadata_even_with_an_empty_blocked_list() {
        let t = build_node_table(&NodeRules {
            prefix: "wrenn",
            uplink: "eth0",
            host_range: "10.11.0.0/16".parse().unwrap(),
            blocked: &[],
        });
        let text = t.to_string();
        for md in ["169.254.0.0/16", "168.63.129.16/32"] {
            assert!(
                text.contains(&format!(r#"iifname "wrenn-*" ip daddr {md} drop"#)),
                "{text}"
            );
        }
    }

    #[test]
    fn node_ipv6_table_drops_everything_on_capsule_links() {
        assert_eq!(
            build_node_table6("wrenn").to_string(),
            r#"table ip6 wrenn {
	chain input {
		type filter hook input priority 0; policy accept;
		iifname "wrenn-*" drop
	}
	chain forward {
		type filter hook forward priority 0; policy accept;
		iifname "wrenn-*" drop
		oifname "wrenn-*" drop
	}
}
"#
        );
    }

    fn forward_of(t: &Table) -> Vec<String> {
        t.chains
            .iter()
            .find(|c| c.name == "forward")
            .unwrap()
            .rules
            .iter()
            .map(|r| {
                let m: Vec<String> = r.matches.iter().map(ToString::to_string).collect();
                format!("{} {}", m.join(" "), r.action)
            })
            .collect()
    }

    #[test]
    fn capsule_table_translates_between_guest_and_slot_address() {
        let t = capsule(&EgressPolicy::Allow, CapsuleLimits::UNLIMITED);
        let text = t.to_string();
        assert!(
            text.contains(r#"iifname "veth0" ip daddr 10.11.0.7/32 dnat to 169.254.0.21"#),
            "{text}"
        );
        assert!(
            text.contains(r#"oifname "veth0" ip saddr 169.254.0.21/32 snat to 10.11.0.7"#),
            "{text}"
        );
        assert_eq!(
            forward_of(&t),
            vec![
                " ct state established,related accept"
                    .trim_start()
                    .to_string(),
                r#"iifname "veth0" oifname "tap0" ip daddr 169.254.0.21/32 accept"#.into(),
                "ip daddr 169.254.0.0/16 drop".into(),
                "ip daddr 168.63.129.16/32 drop".into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 accept"#.into(),
            ]
        );
    }

    #[test]
    fn frames_from_the_tap_with_another_source_mac_are_dropped_first() {
        let t = capsule(&EgressPolicy::Allow, CapsuleLimits::UNLIMITED);
        let text = t.to_string();
        assert!(
            text.contains(
                "\tchain guest_mac {\n\t\ttype filter hook prerouting priority -150; policy accept;\n\t\tiifname \"tap0\" ether saddr != 02:fc:00:00:00:05 drop\n"
            ),
            "{text}"
        );
        // Ahead of the NAT prerouting chain (and so of every other chain).
        let prio = |name| t.chains.iter().find(|c| c.name == name).unwrap().priority;
        assert!(prio("guest_mac") < prio("prerouting"));
    }

    #[test]
    fn deny_leaves_only_replies_and_inbound_from_the_node() {
        let t = capsule(&EgressPolicy::Deny, CapsuleLimits::UNLIMITED);
        let fwd = t.chains.iter().find(|c| c.name == "forward").unwrap();
        assert_eq!(fwd.policy, Verdict::Drop);
        // Replies, the node's own connections, metadata drops, then only
        // what the names table marked as an allowed host's address; the
        // guest's other attempts are refused, not left to time out.
        assert_eq!(
            forward_of(&t)[2..],
            [
                "ip daddr 169.254.0.0/16 drop".to_string(),
                "ip daddr 168.63.129.16/32 drop".into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 meta mark 0x57720002 accept"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 meta l4proto tcp reject with tcp reset"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 reject with icmp admin-prohibited"#.into(),
            ]
        );
    }

    #[test]
    fn the_guest_reaches_its_own_namespace_only_for_marked_dns() {
        let t = capsule(&EgressPolicy::Allow, CapsuleLimits::UNLIMITED);
        let text = t.to_string();
        assert!(
            text.contains("\t\tiifname \"tap0\" ct state established,related accept\n\t\tiifname \"tap0\" meta mark 0x57720001 accept\n\t\tiifname \"tap0\" drop\n"),
            "{text}"
        );
    }

    #[test]
    fn allow_list_accepts_each_listed_network_only_and_never_metadata() {
        let nets = vec![
            "198.51.100.0/24".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
            // Listing metadata opens nothing: the drops come first.
            "168.63.129.16".parse().unwrap(),
        ];
        let t = capsule(&EgressPolicy::AllowList(nets), CapsuleLimits::UNLIMITED);
        let fwd = forward_of(&t);
        assert_eq!(
            fwd[2..],
            [
                "ip daddr 169.254.0.0/16 drop".to_string(),
                "ip daddr 168.63.129.16/32 drop".into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 ip daddr 198.51.100.0/24 accept"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 ip daddr 203.0.113.9/32 accept"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 ip daddr 168.63.129.16/32 accept"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 meta mark 0x57720002 accept"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 meta l4proto tcp reject with tcp reset"#.into(),
                r#"iifname "tap0" oifname "veth0" ip saddr 169.254.0.21/32 reject with icmp admin-prohibited"#.into(),
            ]
        );
    }

    #[test]
    fn limits_cap_every_packet_and_only_new_connections_are_counted() {
        let limits = CapsuleLimits {
            max_connections: 64,
            new_connections_per_second: 20,
            packets_per_second: 1000,
            bandwidth_bytes_per_second: 1_000_000,
        };
        let fwd = forward_of(&capsule(&EgressPolicy::Allow, limits));
        assert_eq!(
            fwd[..7],
            [
                r#"iifname "tap0" limit rate over 1000/second burst 100 packets drop"#.to_string(),
                r#"iifname "tap0" limit rate over 1000000 bytes/second burst 1000000 bytes drop"#
                    .into(),
                r#"oifname "tap0" limit rate over 1000000 bytes/second burst 1000000 bytes drop"#
                    .into(),
                "ct state established,related accept".into(),
                r#"iifname "veth0" oifname "tap0" ip daddr 169.254.0.21/32 accept"#.into(),
                // After the established accept: only opening packets count.
                r#"iifname "tap0" ct count over 64 drop"#.into(),
                r#"iifname "tap0" limit rate over 20/second burst 20 packets drop"#.into(),
            ]
        );
    }

    #[test]
    fn small_buckets_still_pass_a_whole_packet() {
        let limits = CapsuleLimits {
            packets_per_second: 10,
            bandwidth_bytes_per_second: 1000,
            ..CapsuleLimits::UNLIMITED
        };
        let fwd = forward_of(&capsule(&EgressPolicy::Deny, limits));
        assert!(fwd[0].contains("burst 5 packets"), "{}", fwd[0]);
        assert!(fwd[1].contains("burst 65536 bytes"), "{}", fwd[1]);
    }
}
