//! Schemas for the quantity, duration and name fields shared by the kinds.
//!
//! Each is a plain string in the OpenAPI schema with CEL rules attached, so
//! the API server refuses a bad value with a sentence a user understands
//! rather than a regular expression.

use schemars::Schema;
use serde_json::{Value, json};

/// Go-style duration such as `90s`, `30m` or `1h30m`, as the API server's
/// CEL `duration()` accepts it, without sign.
pub(crate) const DURATION_RE: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A DNS-1123 subdomain: what Kubernetes accepts as an object name. It can
/// never contain `/`, `..` or a leading dot, so it is safe in a node path.
pub(crate) const NAME_RE: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

fn rule(rule: &str, message: &str) -> Value {
    json!({ "rule": rule, "message": message })
}

fn string_with_rules(description: &str, max_len: u32, rules: Vec<Value>) -> Schema {
    let mut schema = json!({
        "type": "string",
        "description": description,
        "maxLength": max_len,
    });
    if !rules.is_empty() {
        schema["x-kubernetes-validations"] = Value::Array(rules);
    }
    Schema::try_from(schema).expect("a JSON object is always a schema")
}

/// `bytes` as a quantity in MiB (`128Mi`).
pub(crate) fn mebibytes(bytes: u64) -> String {
    format!("{}Mi", bytes >> 20)
}

/// A quantity no smaller than `min`, e.g. memory from 128Mi.
pub(crate) fn quantity_at_least(what: &str, min: &str, description: &str) -> Schema {
    string_with_rules(
        description,
        32,
        vec![
            rule(
                "isQuantity(self)",
                &format!("{what} must be a quantity such as 512Mi or 4Gi"),
            ),
            rule(
                &format!("!isQuantity(self) || quantity(self).compareTo(quantity('{min}')) >= 0"),
                &format!("{what} must be at least {min}"),
            ),
        ],
    )
}

/// A positive duration no shorter than one second.
pub(crate) fn duration(what: &str, description: &str) -> Schema {
    let re = DURATION_RE;
    string_with_rules(
        description,
        64,
        vec![
            rule(
                &format!("self.matches(r'{re}')"),
                &format!("{what} must be a duration such as 90s, 30m or 1h30m"),
            ),
            rule(
                &format!("!self.matches(r'{re}') || duration(self) >= duration('1s')"),
                &format!("{what} must be at least 1s"),
            ),
        ],
    )
}

/// The name of another object in the same namespace.
pub(crate) fn object_name(what: &str, description: &str) -> Schema {
    let re = NAME_RE;
    string_with_rules(
        description,
        253,
        vec![rule(
            &format!("self.matches(r'{re}')"),
            &format!(
                "{what} must be a Kubernetes object name: lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit"
            ),
        )],
    )
}

/// Schema generators with the signature `#[schemars(schema_with)]` wants.
pub(crate) mod with {
    use super::*;
    use schemars::SchemaGenerator;

    pub(crate) fn memory(_: &mut SchemaGenerator) -> Schema {
        let min = mebibytes(crate::limits::MIN_MEMORY_BYTES);
        quantity_at_least(
            "memory",
            &min,
            &format!(
                "Guest memory, a quantity such as 512Mi or 4Gi; at least {min}. Defaults to the template's."
            ),
        )
    }

    pub(crate) fn disk(_: &mut SchemaGenerator) -> Schema {
        quantity_at_least(
            "disk",
            &mebibytes(crate::limits::MIN_DISK_BYTES),
            "Root disk size, a quantity such as 10Gi; at least the template's disk. \
             Defaults to the template's. Immutable.",
        )
    }

    pub(crate) fn shutdown_after(_: &mut SchemaGenerator) -> Schema {
        duration(
            "shutdownAfter",
            "How long after creation the capsule expires, e.g. 2h.",
        )
    }

    pub(crate) fn idle_timeout(_: &mut SchemaGenerator) -> Schema {
        duration(
            "idleTimeout",
            "How long the capsule may go without activity before it expires, e.g. 15m. Activity is any exec, PTY, attach, file, process or console-follow call through its node agent, for as long as the call or stream stays open, and CPU use of its VM of at least a tenth of one CPU (sampled every second on the node).",
        )
    }

    pub(crate) fn readiness_timeout(_: &mut SchemaGenerator) -> Schema {
        duration(
            "readiness.timeout",
            "How long to wait for readiness before the template fails, e.g. 5m.",
        )
    }

    pub(crate) fn source_cidr(_: &mut SchemaGenerator) -> Schema {
        let schema = json!({
            "type": "string",
            "description": "An IPv4 network in CIDR form (a.b.c.d/n, host bits zero) allowed to reach the port, e.g. the cluster's Pod network, or one Pod's address as /32.",
            "maxLength": 64,
            "x-kubernetes-validations": [
                rule(
                    "isCIDR(self) && cidr(self).ip().family() == 4",
                    "from entries must be IPv4 CIDRs such as 10.244.0.0/16: capsules have no IPv6",
                ),
                rule(
                    "!isCIDR(self) || cidr(self).masked() == cidr(self)",
                    "from entries must have no host bits set, e.g. 10.244.0.0/16 rather than 10.244.1.2/16",
                ),
            ],
        });
        Schema::try_from(schema).expect("a JSON object is always a schema")
    }

    pub(crate) fn cidrs(_: &mut SchemaGenerator) -> Schema {
        let schema = json!({
            "type": "array",
            "description": "With egress: Deny, the only destinations the guest can reach: IPv4 networks in CIDR form (a.b.c.d/n, host bits zero). Capsules are IPv4 only. Cloud metadata addresses and what the node blocks stay unreachable even when listed. Changes apply to a running capsule in place.",
            "maxItems": 64,
            "x-kubernetes-list-type": "set",
            "items": {
                "type": "string",
                "maxLength": 64,
                "x-kubernetes-validations": [
                    rule(
                        "isCIDR(self) && cidr(self).ip().family() == 4",
                        "allowCidrs entries must be CIDRs of IPv4 networks such as 203.0.113.0/24: capsules have no IPv6, so IPv6 CIDRs are refused",
                    ),
                    rule(
                        "!isCIDR(self) || cidr(self).masked() == cidr(self)",
                        "allowCidrs entries must have no host bits set, e.g. 10.1.0.0/16 rather than 10.1.2.3/16",
                    ),
                    rule(&never_reachable_rule(), &never_reachable_message()),
                ],
            },
        });
        Schema::try_from(schema).expect("a JSON object is always a schema")
    }

    /// Refuses an entry inside a network every node blocks.
    fn never_reachable_rule() -> String {
        let inside: Vec<String> = crate::limits::NEVER_REACHABLE_CIDRS
            .iter()
            .map(|n| format!("cidr('{n}').containsCIDR(self)"))
            .collect();
        // IPv6 is refused by its own rule; containment is asked of IPv4 only.
        format!(
            "!isCIDR(self) || cidr(self).ip().family() != 4 || !({})",
            inside.join(" || ")
        )
    }

    fn never_reachable_message() -> String {
        format!(
            "allowCidrs entries inside {} are never reachable from a capsule: private, shared, link-local and cloud metadata ranges are blocked on every node; list public networks only",
            crate::limits::NEVER_REACHABLE_CIDRS.join(", ")
        )
    }

    pub(crate) fn template_name(_: &mut SchemaGenerator) -> Schema {
        object_name(
            "templateRef.name",
            "Name of a CapsuleTemplate in this namespace.",
        )
    }

    pub(crate) fn snapshot_name(_: &mut SchemaGenerator) -> Schema {
        object_name(
            "snapshotRef.name",
            "Name of a CapsuleSnapshot in this namespace.",
        )
    }

    pub(crate) fn capsule_name(_: &mut SchemaGenerator) -> Schema {
        object_name(
            "capsuleName",
            "Name of the Capsule to snapshot, in this namespace. Immutable.",
        )
    }
}
