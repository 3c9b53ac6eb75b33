//! `spec.network.dns` and `spec.network.allowHosts`: the guest's resolver
//! and the host names a capsule under `egress: Deny` may still reach. The
//! limits here are the ones the node agent checks again where a request
//! enters it.

use schemars::{Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Most nameservers a resolver reads (glibc's `MAXNS`).
pub const MAX_NAMESERVERS: usize = 3;
/// Most search domains (glibc's `MAXDNSRCH`).
pub const MAX_SEARCHES: usize = 6;
/// Most resolver options.
pub const MAX_OPTIONS: usize = 16;
/// Most entries in `allowHosts`.
pub const MAX_ALLOW_HOSTS: usize = 64;
/// Longest DNS name in text form.
pub const MAX_NAME_LEN: usize = 253;
/// A DNS name: lowercase labels of letters, digits and `-`.
pub const NAME_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// An `allowHosts` entry: a name, or `*.` and a name of at least two labels.
pub const HOST_PATTERN: &str = r"^(\*\.([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// A resolver option: `name` or `name:value` (`ndots:2`, `edns0`).
pub const OPTION_PATTERN: &str = r"^[a-z][a-z0-9-]{0,31}(:[0-9]{1,4})?$";

/// The guest's resolver. Without it (or with its lists empty) the guest
/// uses the node's cluster DNS with the capsule's namespace search path,
/// like a Pod's `ClusterFirst`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// Upstream nameservers, IPv4, at most 3. Empty: the node's cluster DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "nameservers")]
    pub nameservers: Vec<String>,
    /// Search domains, at most 6. Empty with nameservers empty: the
    /// namespace search path (`NS.svc.DOMAIN svc.DOMAIN DOMAIN`); empty with
    /// nameservers set: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "searches")]
    pub searches: Vec<String>,
    /// resolv.conf options such as `ndots:2` or `edns0`. Empty with
    /// nameservers empty: `ndots:5`, as for Pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "options")]
    pub options: Vec<String>,
    /// With `egress: Deny`, name resolution stays open by default (the
    /// guest's resolver is the node's DNS proxy on its gateway). `true`
    /// closes it too. Not allowed together with `allowHosts`, which needs
    /// resolution.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_under_deny: bool,
}

fn list(description: &str, max_items: usize, items: serde_json::Value) -> Schema {
    let schema = json!({
        "type": "array",
        "description": description,
        "maxItems": max_items,
        "items": items,
    });
    Schema::try_from(schema).expect("a JSON object is always a schema")
}

fn nameservers(_: &mut SchemaGenerator) -> Schema {
    let inside: Vec<String> = crate::limits::NEVER_REACHABLE_CIDRS
        .iter()
        .map(|n| format!("cidr('{n}').containsIP(self)"))
        .collect();
    list(
        "Upstream nameservers, IPv4 addresses, at most 3. Empty: the node's cluster DNS. \
         The guest always asks the node's DNS proxy on its gateway, which forwards here.",
        MAX_NAMESERVERS,
        json!({
            "type": "string",
            "maxLength": 15,
            "x-kubernetes-validations": [
                { "rule": "isIP(self) && ip(self).family() == 4",
                  "message": "dns.nameservers entries must be IPv4 addresses such as 1.1.1.1: capsules have no IPv6" },
                { "rule": format!("!isIP(self) || ip(self).family() != 4 || !({})", inside.join(" || ")),
                  "message": format!("dns.nameservers entries may not lie in a network every node blocks for capsules ({}); leave nameservers empty to use the cluster DNS", crate::limits::NEVER_REACHABLE_CIDRS.join(", ")) },
            ],
        }),
    )
}

fn searches(_: &mut SchemaGenerator) -> Schema {
    list(
        "Search domains, at most 6, lowercase DNS names.",
        MAX_SEARCHES,
        json!({
            "type": "string",
            "maxLength": MAX_NAME_LEN,
            "pattern": NAME_PATTERN,
        }),
    )
}

fn options(_: &mut SchemaGenerator) -> Schema {
    list(
        "resolv.conf options, `name` or `name:number`, at most 16.",
        MAX_OPTIONS,
        json!({
            "type": "string",
            "maxLength": 40,
            "pattern": OPTION_PATTERN,
        }),
    )
}

/// Schema of `allowHosts`.
pub(crate) fn allow_hosts(_: &mut SchemaGenerator) -> Schema {
    let schema = json!({
        "type": "array",
        "description": "With egress: Deny, host names the guest may connect to: exact names (pypi.org) or one leading wildcard label (*.github.com matches api.github.com and a.b.github.com, not github.com). Lowercase, at most 64. The guest's DNS queries go through the node's DNS proxy, which refuses other names and opens each allowed name's IPv4 answers for their TTL (clamped to 5 s .. 1 h). Changes apply to a running capsule in place. See docs/networking.md for the limits (shared CDN addresses, TTL window).",
        "maxItems": MAX_ALLOW_HOSTS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": MAX_NAME_LEN,
            "pattern": HOST_PATTERN,
        },
    });
    Schema::try_from(schema).expect("a JSON object is always a schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pattern_takes_names_and_one_leading_wildcard() {
        let re = regex_lite(HOST_PATTERN);
        for ok in [
            "pypi.org",
            "*.github.com",
            "a-b.c.d",
            "localhost",
            "*.a.b.c",
        ] {
            assert!(re(ok), "{ok}");
        }
        for bad in [
            "*",
            "*.com",
            "a.*.com",
            "PyPI.org",
            "-a.com",
            "a..b",
            "*github.com",
            "a.com.",
        ] {
            assert!(!re(bad), "{bad}");
        }
    }

    #[test]
    fn option_pattern() {
        let re = regex_lite(OPTION_PATTERN);
        for ok in ["ndots:2", "edns0", "timeout:1", "single-request-reopen"] {
            assert!(re(ok), "{ok}");
        }
        for bad in ["", "ndots 2", "ndots:", "a:b", "\nnameserver 1.2.3.4"] {
            assert!(!re(bad), "{bad}");
        }
    }

    fn regex_lite(p: &str) -> impl Fn(&str) -> bool {
        let re = regex::Regex::new(p).unwrap();
        move |s| re.is_match(s)
    }
}
