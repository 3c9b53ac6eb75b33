//! The guest's `/etc/resolv.conf`: which upstreams the node's DNS proxy
//! asks for a capsule, and the file the agent writes into the guest. Pure.
//!
//! The guest's only nameserver is always its gateway, where the proxy
//! listens: the cluster DNS sits in a range no capsule may reach, and
//! `allowHosts` needs to see every answer.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use wrenn_crds::dns::{MAX_NAME_LEN, MAX_NAMESERVERS, MAX_OPTIONS, MAX_SEARCHES};

use crate::network::Cidr;
use crate::network::addr::GUEST_GATEWAY;

/// `spec.network.dns` as the agent keeps it (journaled). Empty lists mean
/// the node's defaults, as documented on the CRD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsConfig {
    /// Upstreams; empty: the node's cluster DNS.
    pub nameservers: Vec<Ipv4Addr>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
    /// Under `egress: Deny`, no name resolution either.
    pub block_under_deny: bool,
}

/// The node's cluster DNS (`--cluster-dns`, `--cluster-domain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterDns {
    /// The cluster DNS Service address; `None`: the node has none, and
    /// capsules without nameservers of their own resolve nothing.
    pub server: Option<Ipv4Addr>,
    /// The cluster domain, e.g. `cluster.local`.
    pub domain: String,
}

impl Default for ClusterDns {
    fn default() -> Self {
        Self {
            server: None,
            domain: "cluster.local".into(),
        }
    }
}

impl DnsConfig {
    /// Checks a request's lists against the CRD's limits: IPv4
    /// nameservers outside every network the node blocks for capsules,
    /// DNS names as searches, `name[:number]` options. The error names the
    /// field and the entry.
    pub fn parse(
        nameservers: &[String],
        searches: &[String],
        options: &[String],
        block_under_deny: bool,
    ) -> Result<Self, String> {
        if nameservers.len() > MAX_NAMESERVERS {
            return Err(format!(
                "dns.nameservers has {} entries; at most {MAX_NAMESERVERS}",
                nameservers.len()
            ));
        }
        if searches.len() > MAX_SEARCHES {
            return Err(format!(
                "dns.searches has {} entries; at most {MAX_SEARCHES}",
                searches.len()
            ));
        }
        if options.len() > MAX_OPTIONS {
            return Err(format!(
                "dns.options has {} entries; at most {MAX_OPTIONS}",
                options.len()
            ));
        }
        let mut servers = Vec::with_capacity(nameservers.len());
        for n in nameservers {
            let ip: Ipv4Addr = n.parse().map_err(|_| {
                format!("dns.nameservers {n:?} is not an IPv4 address (capsules are IPv4 only)")
            })?;
            if let Some(net) = Cidr::host(ip).never_reachable() {
                return Err(format!(
                    "dns.nameservers {n:?} lies inside {net}, which every node blocks for capsules"
                ));
            }
            servers.push(ip);
        }
        for s in searches {
            if !is_dns_name(s) {
                return Err(format!("dns.searches {s:?} is not a lowercase DNS name"));
            }
        }
        for o in options {
            if !is_option(o) {
                return Err(format!(
                    "dns.options {o:?} is not `name` or `name:number` (e.g. ndots:2)"
                ));
            }
        }
        Ok(Self {
            nameservers: servers,
            searches: searches.to_vec(),
            options: options.to_vec(),
            block_under_deny,
        })
    }

    /// Where the proxy forwards this capsule's queries.
    pub fn upstreams(&self, cluster: &ClusterDns) -> Vec<Ipv4Addr> {
        if self.nameservers.is_empty() {
            cluster.server.into_iter().collect()
        } else {
            self.nameservers.clone()
        }
    }

    /// The guest's `/etc/resolv.conf` for a capsule in `namespace`.
    pub fn render(&self, namespace: &str, cluster: &ClusterDns) -> String {
        let defaults = self.nameservers.is_empty();
        let searches: Vec<String> = if defaults && self.searches.is_empty() {
            let d = &cluster.domain;
            let mut s = Vec::new();
            if is_dns_name(namespace) {
                s.push(format!("{namespace}.svc.{d}"));
            }
            s.extend([format!("svc.{d}"), d.clone()]);
            s
        } else {
            self.searches.clone()
        };
        let options: Vec<String> = if defaults && self.options.is_empty() {
            vec!["ndots:5".into()]
        } else {
            self.options.clone()
        };
        let mut out = String::from("# Written by wrenn: the node's DNS proxy for this capsule.\n");
        out.push_str(&format!("nameserver {GUEST_GATEWAY}\n"));
        if !searches.is_empty() {
            out.push_str(&format!("search {}\n", searches.join(" ")));
        }
        if !options.is_empty() {
            out.push_str(&format!("options {}\n", options.join(" ")));
        }
        out
    }
}

/// A lowercase DNS name (the CRD's `NAME_PATTERN`), checked by hand so the
/// agent needs no regex engine.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn is_option(s: &str) -> bool {
    let (name, value) = match s.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    let name_ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let value_ok =
        value.is_none_or(|v| (1..=4).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()));
    name_ok && value_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterDns {
        ClusterDns {
            server: Some(Ipv4Addr::new(10, 96, 0, 10)),
            domain: "cluster.local".into(),
        }
    }

    #[test]
    fn default_resolver_is_the_proxy_with_the_namespace_search_path() {
        let c = DnsConfig::default();
        assert_eq!(
            c.render("team-a", &cluster()),
            "# Written by wrenn: the node's DNS proxy for this capsule.\n\
             nameserver 169.254.0.22\n\
             search team-a.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5\n"
        );
        assert_eq!(c.upstreams(&cluster()), [Ipv4Addr::new(10, 96, 0, 10)]);
        assert!(c.upstreams(&ClusterDns::default()).is_empty());
    }

    #[test]
    fn own_nameservers_take_only_the_searches_and_options_given() {
        let c = DnsConfig::parse(&["1.1.1.1".into()], &[], &["edns0".into()], false).unwrap();
        assert_eq!(
            c.render("team-a", &cluster()),
            "# Written by wrenn: the node's DNS proxy for this capsule.\n\
             nameserver 169.254.0.22\n\
             options edns0\n"
        );
        assert_eq!(c.upstreams(&cluster()), [Ipv4Addr::new(1, 1, 1, 1)]);
        let c = DnsConfig::parse(&[], &["corp.example".into()], &[], false).unwrap();
        assert!(c.render("ns", &cluster()).contains("search corp.example\n"));
    }

    #[test]
    fn parse_refuses_what_the_crd_refuses() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let bad = [
            (
                s(&["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]),
                s(&[]),
                s(&[]),
                "at most 3",
            ),
            (s(&["2001:db8::1"]), s(&[]), s(&[]), "IPv4"),
            (s(&["10.96.0.10"]), s(&[]), s(&[]), "10.0.0.0/8"),
            (s(&["169.254.169.254"]), s(&[]), s(&[]), "169.254.0.0/16"),
            (s(&[]), s(&["Bad.Name"]), s(&[]), "dns.searches"),
            (s(&[]), s(&["a b"]), s(&[]), "dns.searches"),
            (
                s(&[]),
                s(&[]),
                s(&["ndots:2\nnameserver 6.6.6.6"]),
                "dns.options",
            ),
            (
                s(&[]),
                s(&["a", "b", "c", "d", "e", "f", "g"]),
                s(&[]),
                "at most 6",
            ),
        ];
        for (n, se, o, want) in bad {
            let err = DnsConfig::parse(&n, &se, &o, false).unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }
}
