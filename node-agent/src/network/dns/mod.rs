//! Names for capsules: the guest's resolver (`resolv`), the per-capsule
//! DNS proxy on the guest's gateway (`proxy`), `allowHosts` decisions
//! (`allow`) and the nftables table that opens DNS and allowed hosts'
//! addresses (`table`). [`NameService`] owns the running proxies; the
//! capsule's namespace owns the table (it dies with it). Writing the
//! resolver file into the guest belongs to the capsule steps.

mod allow;
mod proxy;
mod refusals;
mod resolv;
mod table;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use allow::{AllowHosts, QueryPlan, plan_query};
pub use proxy::{Proxy, ProxySettings};
pub use refusals::{NameRefused, Reporter, Throttle};
pub use resolv::{ClusterDns, DnsConfig, is_dns_name};
pub use table::{DNS_PORT, FQDN_SET, MAX_OPEN, MIN_OPEN, NAMES_TABLE, build_names_table, open_for};

use super::{CapsuleId, Cidr, EgressPolicy, Error};
use crate::sys::net as sys;

/// A capsule's name settings (`spec.network.dns`, `allowHosts`),
/// journaled with its spec; absent in older journals, which reads as the
/// defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Names {
    /// The resolver.
    pub dns: DnsConfig,
    /// Allowed host names under `egress: Deny`.
    pub allow_hosts: AllowHosts,
}

impl Names {
    /// Whether the guest may query its resolver under `policy`: always,
    /// unless the policy denies egress and the spec closes DNS too.
    pub fn dns_open(&self, policy: &EgressPolicy) -> bool {
        !self.dns.block_under_deny || matches!(policy, EgressPolicy::Allow)
    }

    /// The proxy's settings for this capsule on a node with `cluster` DNS.
    pub fn proxy_settings(&self, cluster: &ClusterDns) -> ProxySettings {
        ProxySettings {
            upstreams: self.dns.upstreams(cluster),
            allow: self.allow_hosts.clone(),
        }
    }
}

/// Where a capsule's proxy and table live.
#[derive(Clone, Debug)]
pub struct NamesPlace {
    /// The capsule namespace.
    pub netns: PathBuf,
    /// The namespace upstream queries leave from (the node's).
    pub node_netns: PathBuf,
    /// The guest's TAP in `netns`.
    pub tap: String,
    /// The node's blocked ranges: never opened, whatever a name resolves to.
    pub blocked: Vec<Cidr>,
}

/// The running DNS proxies of this node's capsules.
#[derive(Debug)]
pub struct NameService {
    cluster: ClusterDns,
    proxies: Mutex<HashMap<CapsuleId, Proxy>>,
    reports: tokio::sync::mpsc::Sender<NameRefused>,
    /// Until the agent takes it ([`NameService::take_refusals`]).
    refusals: Mutex<Option<tokio::sync::mpsc::Receiver<NameRefused>>>,
}

impl Default for NameService {
    fn default() -> Self {
        Self::new(ClusterDns::default())
    }
}

impl NameService {
    /// No proxies yet; capsules without nameservers of their own forward
    /// to `cluster`.
    pub fn new(cluster: ClusterDns) -> Self {
        let (reports, refusals) = tokio::sync::mpsc::channel(refusals::CHANNEL);
        Self {
            cluster,
            proxies: Mutex::new(HashMap::new()),
            reports,
            refusals: Mutex::new(Some(refusals)),
        }
    }

    /// The names every capsule's resolver refused, throttled (see
    /// `refusals`); `None` after the first call. Unread reports past the
    /// channel's bound are dropped.
    pub fn take_refusals(&self) -> Option<tokio::sync::mpsc::Receiver<NameRefused>> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The node's cluster DNS.
    pub fn cluster(&self) -> &ClusterDns {
        &self.cluster
    }

    /// Makes the capsule's names table and proxy match `names` under
    /// `policy`: the first call loads the table and starts the proxy; later
    /// calls replace the table (keeping the still-allowed open addresses)
    /// and the proxy's settings in place. Blocking; needs a tokio runtime
    /// to be current (the proxy runs on it).
    pub fn ensure(
        &self,
        capsule: &CapsuleId,
        place: &NamesPlace,
        policy: &EgressPolicy,
        names: &Names,
    ) -> Result<(), Error> {
        let settings = names.proxy_settings(&self.cluster);
        let dns_open = names.dns_open(policy);
        let err = |action| {
            move |source| Error::DnsProxy {
                action,
                capsule: capsule.clone(),
                source,
            }
        };
        let table = |elements| build_names_table(&place.tap, dns_open, elements);
        // An update holds the map's lock (a policy change is rare); a new
        // proxy is made without it, so creates do not wait on each other.
        {
            let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = proxies.get(capsule) {
                let load = |elements| {
                    sys::run_in_netns(&place.netns, |nl| {
                        super::nft::load_table(nl, &table(elements))
                    })
                    .and_then(|r| r)
                };
                return p.update(settings, load).map_err(err("update"));
            }
        }
        // Table first (the proxy's first answer may need the set), then
        // the proxy's sockets, on one thread in the capsule's namespace.
        let empty = table(Vec::new());
        let sockets = sys::run_in_netns(&place.netns, |nl| {
            super::nft::load_table(nl, &empty).map_err(err("load the names table for"))?;
            Proxy::bind().map_err(err("start"))
        })
        .map_err(err("start"))??;
        let proxy = Proxy::serve(
            capsule.clone(),
            place.netns.clone(),
            place.node_netns.clone(),
            place.blocked.clone(),
            settings,
            Reporter::new(capsule.clone(), self.reports.clone()),
            sockets,
        )
        .map_err(err("start"))?;
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(capsule.clone(), proxy);
        Ok(())
    }

    /// Stops the capsule's proxy, if it runs (its table goes with the
    /// namespace).
    pub fn remove(&self, capsule: &CapsuleId) {
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(capsule);
    }

    /// Capsules with a running proxy.
    pub fn running(&self) -> Vec<CapsuleId> {
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_stays_open_under_deny_unless_the_spec_closes_it() {
        let mut n = Names::default();
        for p in [
            EgressPolicy::Allow,
            EgressPolicy::Deny,
            EgressPolicy::AllowList(vec!["203.0.113.0/24".parse().unwrap()]),
        ] {
            assert!(n.dns_open(&p), "{p:?}");
        }
        n.dns.block_under_deny = true;
        assert!(n.dns_open(&EgressPolicy::Allow));
        assert!(!n.dns_open(&EgressPolicy::Deny));
        assert!(!n.dns_open(&EgressPolicy::AllowList(vec![
            "203.0.113.0/24".parse().unwrap()
        ])));
    }

    #[test]
    fn old_journals_without_names_read_as_defaults() {
        let n: Names = serde_json::from_str("{}").unwrap();
        assert_eq!(n, Names::default());
    }
}
