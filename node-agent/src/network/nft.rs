//! The nftables encoder: a [`Table`] as the nfnetlink messages of one
//! transaction that loads it, atomically replacing any table of that name.
//! Pure; `sys::net` sends the transaction and owns the socket.

use std::net::Ipv4Addr;

use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook as NlHook,
    Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute,
    SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute, TableMessage,
    Verdict as NlVerdict, VerdictAttribute,
};
use rtnetlink::packet_core::{DefaultNla, NLM_F_APPEND, NLM_F_CREATE};

use super::ruleset::{AddrSet, L4, SetElement};
use super::{
    Action, ChainKind, Cidr, Family, Hook, IfName, Limit, LimitUnit, Match, Table, Verdict,
};
use crate::sys::net::Netlink;

/// Loads `table` (family `ip` or `ip6`) through `nl`, atomically replacing
/// any table of that name.
pub fn load_table(nl: &Netlink, table: &Table) -> std::io::Result<()> {
    let (family, msgs) = build_load(table);
    nl.nft_transaction(family, msgs)
}

/// The transaction that loads `table`: create it if absent, delete it, and
/// build it anew, each message with its netlink flags.
pub fn build_load(table: &Table) -> (NetfilterProtoFamily, Vec<(NfTablesMessage, u16)>) {
    let mut msgs = vec![
        (new_table(&table.name), NLM_F_CREATE),
        (
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(table.name.clone())],
            }),
            0,
        ),
        (new_table(&table.name), NLM_F_CREATE),
    ];
    // Sets before the rules that look in them.
    for (i, set) in table.sets.iter().enumerate() {
        let id = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(1);
        msgs.push((new_set(&table.name, set, id), NLM_F_CREATE));
        if !set.elements.is_empty() {
            msgs.push((
                new_elements(&table.name, set.name, &set.elements),
                NLM_F_CREATE,
            ));
        }
    }
    msgs.extend(encode_chains(table).into_iter().map(|m| (m, NLM_F_CREATE)));
    msgs.extend(
        encode_rules(table)
            .into_iter()
            .map(|m| (m, NLM_F_CREATE | NLM_F_APPEND)),
    );
    let family = match table.family {
        Family::Ip => NetfilterProtoFamily::IPv4,
        Family::Ip6 => NetfilterProtoFamily::IPv6,
    };
    (family, msgs)
}

/// Adds `elements` to set `set` of table `table` (family `ip`) in one
/// transaction. An element already there gets the new timeout.
pub fn add_elements(
    nl: &Netlink,
    table: &str,
    set: &str,
    elements: &[SetElement],
) -> std::io::Result<()> {
    nl.nft_transaction(
        NetfilterProtoFamily::IPv4,
        vec![(new_elements(table, set, elements), NLM_F_CREATE)],
    )
}

/// nft's type number for `ipv4_addr` (informational for the kernel; `nft
/// list` prints the set with it).
const NFT_TYPE_IPADDR: u32 = 7;

fn new_set(table: &str, set: &AddrSet, id: u32) -> NfTablesMessage {
    let mut flags = SetFlags::empty();
    if set.timeouts {
        flags |= SetFlags::Timeout;
    }
    NfTablesMessage::NewSet(SetMessage {
        attributes: vec![
            SetAttribute::Table(table.to_string()),
            SetAttribute::Name(set.name.to_string()),
            SetAttribute::Flags(flags),
            SetAttribute::KeyType(NFT_TYPE_IPADDR),
            SetAttribute::KeyLen(4),
            SetAttribute::Id(id),
        ],
    })
}

fn new_elements(table: &str, set: &str, elements: &[SetElement]) -> NfTablesMessage {
    let list = elements
        .iter()
        .map(|e| {
            let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(
                e.addr.octets().to_vec(),
            ))];
            if let Some(t) = e.timeout {
                // Milliseconds; at least one, as zero would mean "never".
                let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
                attrs.push(SetElementAttribute::Timeout(ms));
            }
            ListAttribute::Element(attrs)
        })
        .collect();
    NfTablesMessage::NewSetElement(SetElementMessage {
        attributes: vec![
            SetElementList::Table(table.to_string()),
            SetElementList::Set(set.to_string()),
            SetElementList::Elements(list),
        ],
    })
}

const NFT_PAYLOAD_LL_HEADER: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the destination port in a TCP or UDP header.
const DPORT_OFFSET: u32 = 2;
const NFT_CT_STATUS: u32 = 2;
/// `IPS_DST_NAT`.
const CT_STATUS_DST_NAT: u32 = 1 << 5;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const RTN_LOCAL: u32 = 2;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NFT_REG_2: u32 = 2;
/// Offset of the source address in an Ethernet header.
const ETHER_SADDR_OFFSET: u32 = 6;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
/// `NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)`.
const CT_STATE_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_SNAT: u32 = 0;
const NFT_NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u32 = 2;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NFT_REG_1: u32 = 1;
const IFNAMSIZ: usize = 16;
const NFTA_CONNLIMIT_COUNT: u16 = 1;
const NFTA_CONNLIMIT_FLAGS: u16 = 2;
// linux/netfilter/nf_tables.h, `enum nft_reject_attributes` and
// `enum nft_reject_types`; ICMP_PKT_FILTERED from linux/icmp.h.
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
const ICMP_PKT_FILTERED: u8 = 13;
const NFT_CONNLIMIT_F_INV: u32 = 1;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;
const NFT_LIMIT_PKTS: u32 = 0;
const NFT_LIMIT_PKT_BYTES: u32 = 1;
const NFT_LIMIT_F_INV: u32 = 1;

fn new_table(name: &str) -> NfTablesMessage {
    NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name(name.to_string())],
    })
}

fn verdict_code(v: Verdict) -> u32 {
    match v {
        Verdict::Accept => NF_ACCEPT,
        Verdict::Drop => NF_DROP,
    }
}

fn encode_chains(table: &Table) -> Vec<NfTablesMessage> {
    table
        .chains
        .iter()
        .map(|c| {
            let hook = match c.hook {
                Hook::Prerouting => InetHookNumber::PreRouting,
                Hook::Input => InetHookNumber::LocalIn,
                Hook::Forward => InetHookNumber::Forward,
                Hook::Postrouting => InetHookNumber::PostRouting,
            };
            let kind = match c.kind {
                ChainKind::Filter => "filter",
                ChainKind::Nat => "nat",
            };
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.name.clone()),
                    ChainAttribute::Name(c.name.to_string()),
                    ChainAttribute::Hook(vec![
                        NlHook::Number(hook.into()),
                        // Negative priorities travel as their two's complement.
                        NlHook::Priority(c.priority as u32),
                    ]),
                    ChainAttribute::Policy(verdict_code(c.policy)),
                    ChainAttribute::Type(kind.to_string()),
                ],
            })
        })
        .collect()
}

fn encode_rules(table: &Table) -> Vec<NfTablesMessage> {
    let mut out = Vec::new();
    for c in &table.chains {
        for r in &c.rules {
            let mut exprs: Vec<Expressions> = Vec::new();
            for m in &r.matches {
                encode_match(m, &mut exprs);
            }
            encode_action(r.action, &mut exprs);
            out.push(NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table.name.clone()),
                    RuleAttribute::Chain(c.name.to_string()),
                    RuleAttribute::Expressions(exprs.into_iter().map(Into::into).collect()),
                ],
            }));
        }
    }
    out
}

fn be(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn cmp(op: Operator, data: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
}

fn ifname(key: MetaKey, name: &IfName, op: Operator, out: &mut Vec<Expressions>) {
    out.push(Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ]));
    let data = match name {
        // An exact name compares all IFNAMSIZ bytes, NUL padding included;
        // a prefix compares only its own bytes.
        IfName::Exact(n) => {
            let mut b = n.as_bytes().to_vec();
            b.resize(IFNAMSIZ, 0);
            b
        }
        IfName::Prefix(p) => p.as_bytes().to_vec(),
    };
    out.push(cmp(op, data));
}

fn addr(offset: u32, net: Cidr, op: Operator, out: &mut Vec<Expressions>) {
    out.push(Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
        Payload::Offset(offset),
        Payload::Len(4),
    ]));
    if net.prefix() < 32 {
        out.push(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(net.netmask().octets().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]));
    }
    out.push(cmp(op, net.addr().octets().to_vec()));
}

/// Conntrack `key` (state or status) has one of the bits of `mask` set.
fn ct_any_bit(key: u32, mask: u32, out: &mut Vec<Expressions>) {
    out.push(Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(NFTA_CT_KEY, be(key)),
            DefaultNla::new(NFTA_CT_DREG, be(NFT_REG_1)),
        ],
    });
    out.push(Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::Reg1),
        Bitwise::DestinationRegister(Register::Reg1),
        Bitwise::Length(4),
        // Registers hold state and status in host byte order.
        Bitwise::Mask(DataAttribute::Value(mask.to_ne_bytes().to_vec())),
        Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
    ]));
    out.push(cmp(Operator::NotEqual, vec![0; 4]));
}

fn encode_match(m: &Match, out: &mut Vec<Expressions>) {
    match m {
        Match::Iif(n) => ifname(MetaKey::Iifname, n, Operator::Equal, out),
        Match::Oif(n) => ifname(MetaKey::Oifname, n, Operator::Equal, out),
        Match::OifNot(n) => ifname(MetaKey::Oifname, n, Operator::NotEqual, out),
        Match::Saddr(c) => addr(12, *c, Operator::Equal, out),
        Match::SaddrNot(c) => addr(12, *c, Operator::NotEqual, out),
        Match::Daddr(c) => addr(16, *c, Operator::Equal, out),
        Match::EtherSaddrNot(mac) => {
            out.push(Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NFT_PAYLOAD_LL_HEADER),
                Payload::Offset(ETHER_SADDR_OFFSET),
                Payload::Len(6),
            ]));
            out.push(cmp(Operator::NotEqual, mac.to_vec()));
        }
        Match::CtEstablished => ct_any_bit(NFT_CT_STATE, CT_STATE_ESTABLISHED_RELATED, out),
        Match::CtDnat => ct_any_bit(NFT_CT_STATUS, CT_STATUS_DST_NAT, out),
        Match::FibDaddrLocal => {
            out.push(Expressions::Other {
                expression_type: "fib".into(),
                attributes: vec![
                    DefaultNla::new(NFTA_FIB_DREG, be(NFT_REG_1)),
                    DefaultNla::new(NFTA_FIB_RESULT, be(NFT_FIB_RESULT_ADDRTYPE)),
                    DefaultNla::new(NFTA_FIB_FLAGS, be(NFTA_FIB_F_DADDR)),
                ],
            });
            out.push(cmp(Operator::Equal, RTN_LOCAL.to_ne_bytes().to_vec()));
        }
        // `over` is the inverted match: the rule applies past the ceiling.
        Match::CtCountOver(n) => out.push(Expressions::Other {
            expression_type: "connlimit".into(),
            attributes: vec![
                DefaultNla::new(NFTA_CONNLIMIT_COUNT, be(*n)),
                DefaultNla::new(NFTA_CONNLIMIT_FLAGS, be(NFT_CONNLIMIT_F_INV)),
            ],
        }),
        // What `nft` sends for `tcp dport 80`: the protocol as a
        // dependency, then the port from the transport header.
        Match::Dport(p, port) => {
            out.push(Expressions::Meta(vec![
                Meta::Key(MetaKey::L4Proto),
                Meta::DestinationRegister(Register::Reg1),
            ]));
            out.push(cmp(Operator::Equal, vec![l4_number(*p)]));
            out.push(Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NFT_PAYLOAD_TRANSPORT_HEADER),
                Payload::Offset(DPORT_OFFSET),
                Payload::Len(2),
            ]));
            out.push(cmp(Operator::Equal, port.to_be_bytes().to_vec()));
        }
        Match::Proto(p) => {
            out.push(Expressions::Meta(vec![
                Meta::Key(MetaKey::L4Proto),
                Meta::DestinationRegister(Register::Reg1),
            ]));
            out.push(cmp(Operator::Equal, vec![l4_number(*p)]));
        }
        Match::DaddrInSet(set) => {
            out.push(Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
                Payload::Offset(16),
                Payload::Len(4),
            ]));
            out.push(Expressions::Lookup(vec![
                Lookup::Set(set.to_string()),
                Lookup::SourceRegister(Register::Reg1),
            ]));
        }
        Match::Mark(mark) => {
            out.push(Expressions::Meta(vec![
                Meta::Key(MetaKey::Mark),
                Meta::DestinationRegister(Register::Reg1),
            ]));
            // Registers hold the mark in host byte order.
            out.push(cmp(Operator::Equal, mark.to_ne_bytes().to_vec()));
        }
        Match::LimitOver(Limit { rate, burst, unit }) => out.push(Expressions::Other {
            expression_type: "limit".into(),
            attributes: vec![
                DefaultNla::new(NFTA_LIMIT_RATE, rate.to_be_bytes().to_vec()),
                // Seconds per `rate`.
                DefaultNla::new(NFTA_LIMIT_UNIT, 1u64.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_LIMIT_BURST, be(*burst)),
                DefaultNla::new(
                    NFTA_LIMIT_TYPE,
                    be(match unit {
                        LimitUnit::Packets => NFT_LIMIT_PKTS,
                        LimitUnit::Bytes => NFT_LIMIT_PKT_BYTES,
                    }),
                ),
                DefaultNla::new(NFTA_LIMIT_FLAGS, be(NFT_LIMIT_F_INV)),
            ],
        }),
    }
}

fn verdict(code: u32) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            NlVerdict::Other(code),
        )])),
    ])
}

/// NAT to `to`, and to `port` when given (the port travels in register 2,
/// in network byte order).
fn nat(kind: u32, to: Ipv4Addr, port: Option<u16>, out: &mut Vec<Expressions>) {
    out.push(Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Reg1),
        Immediate::Data(DataAttribute::Value(to.octets().to_vec())),
    ]));
    let mut attributes = vec![
        DefaultNla::new(NFTA_NAT_TYPE, be(kind)),
        DefaultNla::new(NFTA_NAT_FAMILY, be(NFPROTO_IPV4)),
        DefaultNla::new(NFTA_NAT_REG_ADDR_MIN, be(NFT_REG_1)),
        DefaultNla::new(NFTA_NAT_REG_ADDR_MAX, be(NFT_REG_1)),
    ];
    let mut flags = NF_NAT_RANGE_MAP_IPS;
    if let Some(p) = port {
        out.push(Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg2),
            Immediate::Data(DataAttribute::Value(p.to_be_bytes().to_vec())),
        ]));
        attributes.push(DefaultNla::new(NFTA_NAT_REG_PROTO_MIN, be(NFT_REG_2)));
        attributes.push(DefaultNla::new(NFTA_NAT_REG_PROTO_MAX, be(NFT_REG_2)));
        flags |= NF_NAT_RANGE_PROTO_SPECIFIED;
    }
    attributes.push(DefaultNla::new(NFTA_NAT_FLAGS, be(flags)));
    out.push(Expressions::Other {
        expression_type: "nat".into(),
        attributes,
    });
}

/// The IP protocol number of `p`.
fn l4_number(p: L4) -> u8 {
    match p {
        L4::Tcp => IPPROTO_TCP,
        L4::Udp => IPPROTO_UDP,
    }
}

/// A `reject` expression of `kind`, with `icmp_code` where the kind
/// needs one.
fn reject(kind: u32, icmp_code: Option<u8>) -> Expressions {
    let mut attributes = vec![DefaultNla::new(NFTA_REJECT_TYPE, be(kind))];
    if let Some(code) = icmp_code {
        attributes.push(DefaultNla::new(NFTA_REJECT_ICMP_CODE, vec![code]));
    }
    Expressions::Other {
        expression_type: "reject".into(),
        attributes,
    }
}

fn encode_action(a: Action, out: &mut Vec<Expressions>) {
    match a {
        Action::Accept => out.push(verdict(NF_ACCEPT)),
        Action::Drop => out.push(verdict(NF_DROP)),
        Action::Snat(to) => nat(NFT_NAT_SNAT, to, None, out),
        Action::Dnat(to) => nat(NFT_NAT_DNAT, to, None, out),
        Action::DnatPort(to, port) => nat(NFT_NAT_DNAT, to, Some(port), out),
        Action::Masquerade => out.push(Expressions::Other {
            expression_type: "masq".into(),
            attributes: vec![],
        }),
        Action::RejectTcpReset => out.push(reject(NFT_REJECT_TCP_RST, None)),
        Action::RejectAdminProhibited => {
            out.push(reject(NFT_REJECT_ICMP_UNREACH, Some(ICMP_PKT_FILTERED)))
        }
        Action::SetMark(mark) => {
            out.push(Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Reg1),
                Immediate::Data(DataAttribute::Value(mark.to_ne_bytes().to_vec())),
            ]));
            out.push(Expressions::Meta(vec![
                Meta::Key(MetaKey::Mark),
                Meta::SourceRegister(Register::Reg1),
            ]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Chain as C, Rule};
    use std::net::Ipv4Addr;

    #[test]
    fn rules_encode_to_the_expressions_nft_would_send() {
        let t = Table {
            family: crate::network::Family::Ip,
            name: "t".into(),
            chains: vec![C {
                name: "f",
                kind: ChainKind::Filter,
                hook: Hook::Forward,
                priority: 0,
                policy: Verdict::Accept,
                rules: vec![
                    Rule {
                        matches: vec![Match::Iif(IfName::Prefix("x".into())), Match::CtEstablished],
                        action: Action::Accept,
                    },
                    Rule {
                        matches: vec![Match::Daddr("10.0.0.0/8".parse().unwrap())],
                        action: Action::Snat(Ipv4Addr::new(5, 6, 7, 8)),
                    },
                ],
            }],
            sets: Vec::new(),
        };
        let rules = encode_rules(&t);
        assert_eq!(rules.len(), 2);
        let exprs = |r: &NfTablesMessage| match r {
            NfTablesMessage::NewRule(m) => m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RuleAttribute::Expressions(e) => Some(e.len()),
                    _ => None,
                })
                .unwrap(),
            _ => panic!(),
        };
        // meta+cmp, ct+bitwise+cmp, verdict
        assert_eq!(exprs(&rules[0]), 6);
        // payload+bitwise+cmp, immediate+nat
        assert_eq!(exprs(&rules[1]), 5);
        let chains = encode_chains(&t);
        assert_eq!(chains.len(), 1);
    }

    #[test]
    fn refusals_encode_as_the_kernel_reads_reject() {
        let encoded = |a| {
            let mut out = Vec::new();
            encode_action(a, &mut out);
            match out.as_slice() {
                [
                    Expressions::Other {
                        expression_type,
                        attributes,
                    },
                ] => (
                    expression_type.clone(),
                    attributes
                        .iter()
                        .map(|a| {
                            let mut v = vec![0; a.value_len()];
                            a.emit_value(&mut v);
                            (a.kind(), v)
                        })
                        .collect::<Vec<_>>(),
                ),
                other => panic!("{other:?}"),
            }
        };
        use rtnetlink::packet_core::Nla as _;
        // A TCP reset needs no code; the ICMP kind carries one (13,
        // "communication administratively prohibited").
        assert_eq!(
            encoded(Action::RejectTcpReset),
            ("reject".to_string(), vec![(1, vec![0, 0, 0, 1])])
        );
        assert_eq!(
            encoded(Action::RejectAdminProhibited),
            (
                "reject".to_string(),
                vec![(1, vec![0, 0, 0, 0]), (2, vec![13])]
            )
        );
    }
}
