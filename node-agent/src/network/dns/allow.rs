//! `allowHosts`: which names a capsule's DNS proxy answers, and what it
//! does with a query. Pure: the proxy (`proxy.rs`) asks [`plan_query`] and
//! acts on the answer.

use serde::{Deserialize, Serialize};
use wrenn_crds::dns::MAX_ALLOW_HOSTS;

use super::resolv::is_dns_name;

/// One `allowHosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// This name only.
    Exact(String),
    /// Names ending in this suffix (with its leading dot): `*.github.com`
    /// is `.github.com`, matching `api.github.com`, not `github.com`.
    Suffix(String),
}

/// The parsed `allowHosts` list, journaled as the strings it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct AllowHosts(Vec<HostPattern>);

impl AllowHosts {
    /// Checks and parses a request's list: lowercase DNS names, each
    /// optionally behind one `*.` wildcard label over at least two labels.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        if list.len() > MAX_ALLOW_HOSTS {
            return Err(format!(
                "allow_hosts has {} entries; at most {MAX_ALLOW_HOSTS}",
                list.len()
            ));
        }
        let mut out = Vec::with_capacity(list.len());
        for h in list {
            let p = match h.strip_prefix("*.") {
                Some(rest) if is_dns_name(rest) && rest.contains('.') => {
                    HostPattern::Suffix(format!(".{rest}"))
                }
                None if is_dns_name(h) => HostPattern::Exact(h.clone()),
                _ => {
                    return Err(format!(
                        "allow_hosts {h:?} is not a lowercase DNS name or `*.` and a name of two labels or more"
                    ));
                }
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(Self(out))
    }

    /// No entries: no name filtering.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `name` (any case, with or without the root dot) is allowed.
    pub fn allows(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.0.iter().any(|p| match p {
            HostPattern::Exact(e) => *e == name,
            HostPattern::Suffix(s) => name.len() > s.len() && name.ends_with(s.as_str()),
        })
    }
}

impl TryFrom<Vec<String>> for AllowHosts {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Self, String> {
        Self::parse(&v)
    }
}

impl From<AllowHosts> for Vec<String> {
    fn from(a: AllowHosts) -> Self {
        a.0.into_iter()
            .map(|p| match p {
                HostPattern::Exact(e) => e,
                HostPattern::Suffix(s) => format!("*{s}"),
            })
            .collect()
    }
}

/// What the proxy does with one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryPlan {
    /// Forward upstream and return the answer as it is (no filtering).
    Forward,
    /// Forward upstream; open every IPv4 address in the answer for its
    /// TTL before the guest sees it.
    ForwardAndOpen,
    /// Answer `NXDOMAIN` without asking upstream: a name outside
    /// `allowHosts`. Not `REFUSED`: a stub resolver walking its search
    /// list (`pypi.org.NS.svc.cluster.local` first, under `ndots:5`)
    /// must go on to the next candidate, and musl's stops at the first
    /// answer that is neither an address nor `NXDOMAIN`, so an allowed
    /// name would never resolve in a musl guest (Alpine).
    NotAllowed,
    /// Answer `REFUSED` without asking upstream: a query that is not one
    /// plain question, under `allowHosts`.
    Refuse,
}

/// Decides on a query with `questions` (names as sent) under `allow`
/// (empty: no filtering). Only a standard query of exactly one question
/// may pass a filter: a second question could carry a name the first one
/// hides.
pub fn plan_query(questions: &[&str], standard_query: bool, allow: &AllowHosts) -> QueryPlan {
    if allow.is_empty() {
        return QueryPlan::Forward;
    }
    match questions {
        [name] if standard_query && allow.allows(name) => QueryPlan::ForwardAndOpen,
        [_] if standard_query => QueryPlan::NotAllowed,
        _ => QueryPlan::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(v: &[&str]) -> AllowHosts {
        AllowHosts::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_names_and_wildcards_decide_each_query() {
        let a = allow(&["pypi.org", "*.github.com"]);
        for (q, plan) in [
            ("pypi.org", QueryPlan::ForwardAndOpen),
            ("PyPI.org.", QueryPlan::ForwardAndOpen),
            ("files.pypi.org", QueryPlan::NotAllowed),
            ("api.github.com", QueryPlan::ForwardAndOpen),
            ("a.b.github.com", QueryPlan::ForwardAndOpen),
            ("github.com", QueryPlan::NotAllowed),
            ("evilgithub.com", QueryPlan::NotAllowed),
            ("github.com.evil.net", QueryPlan::NotAllowed),
            ("example.org", QueryPlan::NotAllowed),
            // A search-list candidate of an allowed name.
            ("pypi.org.ns.svc.cluster.local", QueryPlan::NotAllowed),
        ] {
            assert_eq!(plan_query(&[q], true, &a), plan, "{q}");
        }
    }

    #[test]
    fn only_one_plain_question_passes_a_filter() {
        let a = allow(&["pypi.org"]);
        assert_eq!(plan_query(&[], true, &a), QueryPlan::Refuse);
        assert_eq!(
            plan_query(&["pypi.org", "evil.net"], true, &a),
            QueryPlan::Refuse
        );
        assert_eq!(plan_query(&["pypi.org"], false, &a), QueryPlan::Refuse);
        // No list: a plain forwarder.
        let none = AllowHosts::default();
        assert_eq!(plan_query(&["evil.net"], true, &none), QueryPlan::Forward);
    }

    #[test]
    fn parse_refuses_bad_entries_and_round_trips_through_the_journal() {
        for bad in [
            "*",
            "*.com",
            "a.*.com",
            "Bad.org",
            "a..b",
            "-a.org",
            "*github.com",
        ] {
            assert!(AllowHosts::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        let a = allow(&["pypi.org", "*.github.com", "pypi.org"]);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"["pypi.org","*.github.com"]"#);
        assert_eq!(serde_json::from_str::<AllowHosts>(&json).unwrap(), a);
        assert!(serde_json::from_str::<AllowHosts>(r#"["*"]"#).is_err());
    }
}
