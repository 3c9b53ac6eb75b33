//! The address plan: which addresses a slot gets. Pure arithmetic, no I/O.
//!
//! Every guest sees the same fixed link (`169.254.0.21/30`, gateway
//! `169.254.0.22`) inside its own namespace, so snapshots restore anywhere.
//! What differs per slot is the host-side address the guest is NATed to and
//! the `/31` transit link between the node and the capsule namespace.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The guest's own address, the same in every capsule.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The TAP's address inside the capsule namespace: the guest's gateway.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// MAC address of the guest's interface, the same in every capsule.
pub const GUEST_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x05];
/// MAC address of the guest's gateway (the TAP), the same in every capsule
/// and across restores: a restore recreates the TAP, and a guest whose ARP
/// cache still held a random old MAC reached nothing past its gateway (DNS
/// included) until the entry went stale, half a minute or more.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x06];
/// Link-local range, where cloud metadata services live; never reachable.
pub const LINK_LOCAL: Cidr = Cidr {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};
/// Azure's wireserver (metadata and agent channel): outside link-local,
/// so it needs its own entry.
pub const AZURE_WIRESERVER: Cidr = Cidr {
    addr: Ipv4Addr::new(168, 63, 129, 16),
    prefix: 32,
};
/// Destinations no capsule reaches under any policy or allow list, on any
/// node: link-local (AWS, GCP, OpenStack metadata at 169.254.169.254, and
/// the guest link itself) and Azure's wireserver. IPv6 metadata
/// (`fd00:ec2::254`) needs no entry: capsules have no IPv6 at all.
pub const ALWAYS_BLOCKED: [Cidr; 2] = [LINK_LOCAL, AZURE_WIRESERVER];
/// Private and shared address space (the node's and the cluster's own
/// networks often live there): every node blocks it for capsules on top
/// of [`ALWAYS_BLOCKED`], whatever its `--blocked-egress-cidrs`.
pub const PRIVATE_RANGES: [Cidr; 4] = [
    Cidr {
        addr: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 8,
    },
    Cidr {
        addr: Ipv4Addr::new(172, 16, 0, 0),
        prefix: 12,
    },
    Cidr {
        addr: Ipv4Addr::new(192, 168, 0, 0),
        prefix: 16,
    },
    Cidr {
        addr: Ipv4Addr::new(100, 64, 0, 0),
        prefix: 10,
    },
];
/// Highest slot the plan supports: a `/31` per slot must fit in a `/16`
/// (the Go implementation overflowed past 32767, notes §11.34).
pub const MAX_SLOTS: u32 = 32767;

/// An IPv4 network, `addr/prefix`, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// The network containing `addr`; `None` when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// A single address, `/32`.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, prefix: 32 }
    }

    /// First address of the network.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as an address, e.g. `255.255.0.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether all of `other` lies inside this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The built-in range ([`ALWAYS_BLOCKED`], [`PRIVATE_RANGES`]) holding
    /// all of this network, if one does: no capsule can reach it.
    pub fn never_reachable(&self) -> Option<Cidr> {
        ALWAYS_BLOCKED
            .iter()
            .chain(PRIVATE_RANGES.iter())
            .find(|b| b.covers(self))
            .copied()
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a CIDR string was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 CIDR {0:?}")]
pub struct ParseCidrError(String);

impl FromStr for Cidr {
    type Err = ParseCidrError;

    /// Parses `a.b.c.d/n` or a bare address (`/32`). Host bits must be zero,
    /// so a typo such as `10.1.2.3/8` is refused instead of widened.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCidrError(s.to_string());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| err())?),
            None => (s, 32),
        };
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let cidr = Cidr::new(ip, prefix).ok_or_else(err)?;
        if cidr.addr != ip {
            return Err(err());
        }
        Ok(cidr)
    }
}

/// Written as its text (`198.51.100.0/24`), read back through [`FromStr`]:
/// a record holding anything else does not decode.
impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which host-side addresses slots get. Both ranges must be `/16`s that
/// nothing else on the node uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPlan {
    /// Slot `i` is NATed to `host_range + i`.
    pub host_range: Cidr,
    /// Slot `i` gets the transit link `transit_range + 2i` (node side) and
    /// `+ 2i + 1` (capsule side), a `/31`.
    pub transit_range: Cidr,
    /// Slots are `1..=max_slots`; at most [`MAX_SLOTS`].
    pub max_slots: u32,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self {
            host_range: Cidr::new(Ipv4Addr::new(10, 11, 0, 0), 16).expect("16 <= 32"),
            transit_range: Cidr::new(Ipv4Addr::new(10, 12, 0, 0), 16).expect("16 <= 32"),
            max_slots: MAX_SLOTS,
        }
    }
}

/// The addresses of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotAddrs {
    /// The guest as the node and the outside world see it.
    pub host: Ipv4Addr,
    /// Node end of the transit `/31` (the capsule namespace's gateway).
    pub node_transit: Ipv4Addr,
    /// Capsule-namespace end of the transit `/31`.
    pub capsule_transit: Ipv4Addr,
}

impl AddressPlan {
    /// Refuses plans whose slots would run out of their ranges or overlap.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_slots == 0 || self.max_slots > MAX_SLOTS {
            return Err(format!("max_slots must be in 1..={MAX_SLOTS}"));
        }
        let host_room = 1u64 << (32 - u32::from(self.host_range.prefix));
        if u64::from(self.max_slots) >= host_room {
            return Err(format!("host range {} is too small", self.host_range));
        }
        let transit_room = 1u64 << (32 - u32::from(self.transit_range.prefix));
        if 2 * u64::from(self.max_slots) + 1 >= transit_room {
            return Err(format!("transit range {} is too small", self.transit_range));
        }
        let (a, b) = (self.host_range, self.transit_range);
        if a.contains(b.addr) || b.contains(a.addr) {
            return Err(format!("host range {a} overlaps transit range {b}"));
        }
        if a.contains(GUEST_ADDR) || b.contains(GUEST_ADDR) {
            return Err("ranges must not contain the guest link".into());
        }
        Ok(())
    }

    /// The addresses of `slot`; `None` outside `1..=max_slots`.
    pub fn slot_addrs(&self, slot: u32) -> Option<SlotAddrs> {
        if slot == 0 || slot > self.max_slots {
            return None;
        }
        let host = u32::from(self.host_range.addr).checked_add(slot)?;
        let transit = u32::from(self.transit_range.addr).checked_add(slot.checked_mul(2)?)?;
        Some(SlotAddrs {
            host: Ipv4Addr::from(host),
            node_transit: Ipv4Addr::from(transit),
            capsule_transit: Ipv4Addr::from(transit.checked_add(1)?),
        })
    }

    /// The slot whose host or transit address is `ip`, if any.
    pub fn slot_of(&self, ip: Ipv4Addr) -> Option<u32> {
        let raw = u32::from(ip);
        let slot = if self.host_range.contains(ip) {
            raw - u32::from(self.host_range.addr)
        } else if self.transit_range.contains(ip) {
            (raw - u32::from(self.transit_range.addr)) / 2
        } else {
            return None;
        };
        (1..=self.max_slots).contains(&slot).then_some(slot)
    }
}

/// A network as the kernel wrappers take it: first address and prefix.
impl From<Cidr> for (Ipv4Addr, u8) {
    fn from(c: Cidr) -> Self {
        (c.addr, c.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_refuses_exactly_the_ranges_every_node_blocks() {
        let agent: Vec<String> = ALWAYS_BLOCKED
            .iter()
            .chain(PRIVATE_RANGES.iter())
            .map(|c| c.to_string())
            .collect();
        let mut crd: Vec<String> = wrenn_crds::capsule::NEVER_REACHABLE_CIDRS
            .iter()
            .map(|c| c.parse::<Cidr>().unwrap().to_string())
            .collect();
        let mut sorted = agent.clone();
        sorted.sort();
        crd.sort();
        assert_eq!(sorted, crd);
        let net = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(
            net("10.1.0.0/16").never_reachable(),
            Some(net("10.0.0.0/8"))
        );
        assert_eq!(net("10.0.0.0/8").never_reachable(), Some(net("10.0.0.0/8")));
        assert_eq!(net("8.0.0.0/7").never_reachable(), None);
        assert_eq!(net("0.0.0.0/0").never_reachable(), None);
        assert_eq!(net("203.0.113.0/24").never_reachable(), None);
    }

    #[test]
    fn slot_addresses_follow_the_plan() {
        let plan = AddressPlan::default();
        plan.validate().unwrap();
        let a = plan.slot_addrs(1).unwrap();
        assert_eq!(a.host, Ipv4Addr::new(10, 11, 0, 1));
        assert_eq!(a.node_transit, Ipv4Addr::new(10, 12, 0, 2));
        assert_eq!(a.capsule_transit, Ipv4Addr::new(10, 12, 0, 3));
        // 300 crosses a byte boundary: the Go byte math got this wrong.
        let b = plan.slot_addrs(300).unwrap();
        assert_eq!(b.host, Ipv4Addr::new(10, 11, 1, 44));
        assert_eq!(b.node_transit, Ipv4Addr::new(10, 12, 2, 88));
        let last = plan.slot_addrs(MAX_SLOTS).unwrap();
        assert_eq!(last.capsule_transit, Ipv4Addr::new(10, 12, 255, 255));
        assert_eq!(plan.slot_addrs(0), None);
        assert_eq!(plan.slot_addrs(MAX_SLOTS + 1), None);
    }

    #[test]
    fn every_slot_address_maps_back_to_its_slot() {
        let plan = AddressPlan::default();
        for slot in [1, 2, 255, 256, 4097, MAX_SLOTS] {
            let a = plan.slot_addrs(slot).unwrap();
            assert_eq!(plan.slot_of(a.host), Some(slot));
            assert_eq!(plan.slot_of(a.node_transit), Some(slot));
            assert_eq!(plan.slot_of(a.capsule_transit), Some(slot));
        }
        assert_eq!(plan.slot_of(Ipv4Addr::new(10, 11, 0, 0)), None);
        assert_eq!(plan.slot_of(Ipv4Addr::new(192, 0, 2, 1)), None);
    }

    #[test]
    fn bad_plans_are_refused() {
        let plan = AddressPlan {
            max_slots: MAX_SLOTS + 1,
            ..AddressPlan::default()
        };
        assert!(plan.validate().is_err());
        let mut plan = AddressPlan::default();
        plan.transit_range = plan.host_range;
        assert!(plan.validate().is_err());
        let mut plan = AddressPlan {
            transit_range: "10.12.0.0/24".parse().unwrap(),
            ..AddressPlan::default()
        };
        assert!(plan.validate().is_err());
        plan.max_slots = 100;
        plan.validate().unwrap();
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c: Cidr = "198.51.100.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(198, 51, 100, 7)));
        assert!(!c.contains(Ipv4Addr::new(198, 51, 101, 7)));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().prefix(), 32);
        assert!("10.1.2.3/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
    }

    #[test]
    fn a_policy_is_journaled_as_cidr_text_and_only_valid_text_reads_back() {
        use super::super::EgressPolicy;
        let listed = EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().unwrap()]);
        let text = serde_json::to_string(&listed).unwrap();
        assert_eq!(text, r#"{"AllowList":["198.51.100.0/24"]}"#);
        assert_eq!(serde_json::from_str::<EgressPolicy>(&text).unwrap(), listed);
        assert_eq!(
            serde_json::from_str::<EgressPolicy>(r#""Deny""#).unwrap(),
            EgressPolicy::Deny
        );
        for bad in ["2001:db8::/32", "10.1.2.3/8", "nonsense"] {
            let text = format!(r#"{{"AllowList":["{bad}"]}}"#);
            assert!(
                serde_json::from_str::<EgressPolicy>(&text).is_err(),
                "{bad}"
            );
        }
    }
}
