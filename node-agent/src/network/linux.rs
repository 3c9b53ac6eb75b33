//! [`LinuxNet`]: the real [`NetOps`], on netlink and nftables through
//! `sys::net`. This file decides order and rollback; it makes no syscall.
//!
//! Why this file is long: the numbered setup and teardown steps with the undo
//! recorded before each effect read top to bottom in one place.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use super::addr::{Cidr, GUEST_ADDR, GUEST_GATEWAY, GUEST_MAC, SlotAddrs};
use super::config::{GuestLink, LinuxNetConfig, SetupStep};
use super::dns::{ClusterDns, NameService, Names, NamesPlace};
use super::hostports::{HostPort, HostPortAllocator, PlanError, PortRule, Write};
use super::pool::{self, NetnsPool};
use super::portrules::{PORTS_TABLE, build_ports_table};
use super::prepare;
use super::reaper::{self, Job, Reaper};
use super::ruleset::{
    CapsuleRules, NodeRules, build_capsule_table, build_node_table, build_node_table6,
};
use super::slots::{ClaimError, SlotAllocator};
use super::{
    CAPSULE_VETH, CapsuleId, CapsuleNet, EgressPolicy, Error, NetOps, PREFIX, SweepReport,
    TAP_NAME, Teardown,
};
use crate::sys::net::{self as sys, Netlink};

/// A side effect of a setup in progress, recorded before it is made, so a
/// failure can undo exactly what was done, in reverse.
#[derive(Debug)]
enum Undo {
    Netns(PathBuf),
    NodeLink(String),
}

/// The Linux [`NetOps`].
#[derive(Debug)]
pub struct LinuxNet {
    cfg: LinuxNetConfig,
    slots: Arc<SlotAllocator>,
    names: NameService,
    ports: HostPortAllocator,
    reaper: Reaper,
    pool: NetnsPool,
    fail_before: Mutex<Option<SetupStep>>,
}

impl LinuxNet {
    /// Checks the configuration and loads the slot claims.
    pub fn new(cfg: LinuxNetConfig) -> Result<Self, Error> {
        cfg.plan
            .validate()
            .map_err(|reason| Error::InvalidConfig { reason })?;
        if cfg.uplink.is_empty() || cfg.uplink.len() > 15 || cfg.uplink.starts_with(PREFIX) {
            return Err(Error::InvalidConfig {
                reason: format!("unusable uplink name {:?}", cfg.uplink),
            });
        }
        let dir = cfg.state_dir.join("slots");
        let slots = SlotAllocator::open(&dir, cfg.plan.max_slots)
            .map(Arc::new)
            .map_err(|source| Error::OpenSlots { path: dir, source })?;
        let dir = cfg.state_dir.join("hostports");
        let ports = HostPortAllocator::open(&dir, cfg.host_ports)
            .map_err(|source| Error::OpenSlots { path: dir, source })?;
        Ok(Self {
            names: NameService::new(cfg.cluster_dns.clone()),
            reaper: Reaper::start(cfg.node_netns.clone(), slots.clone()),
            pool: NetnsPool::new(cfg.clone()),
            cfg,
            slots,
            ports,
            fail_before: Mutex::new(None),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LinuxNetConfig {
        &self.cfg
    }

    /// The slot claims.
    pub fn slots(&self) -> &SlotAllocator {
        &self.slots
    }

    /// Starts filling the namespace pool now rather than at the startup
    /// sweep or the first setup (benches and tests that wait for it).
    pub fn start_pool(&self) {
        self.pool.start();
    }

    /// Namespaces the pool holds ready now.
    pub fn pooled(&self) -> usize {
        self.pool.ready()
    }

    /// Tests: make every later setup fail just before `step` (`None` to stop).
    pub fn fail_before(&self, step: Option<SetupStep>) {
        *self.fail_before.lock().unwrap_or_else(|p| p.into_inner()) = step;
    }

    /// The capsule's namespace path.
    pub fn netns_path(&self, capsule: &CapsuleId) -> PathBuf {
        self.cfg.netns_dir.join(capsule.resource_name())
    }

    /// With [`GuestLink::EmulatedGuest`], the namespace playing the guest.
    pub fn emulated_guest_netns(&self, capsule: &CapsuleId) -> Option<PathBuf> {
        match &self.cfg.guest_link {
            GuestLink::Tap => None,
            GuestLink::EmulatedGuest { netns_dir } => Some(netns_dir.join(capsule.resource_name())),
        }
    }

    fn check(&self, capsule: &CapsuleId, step: SetupStep) -> Result<(), Error> {
        let armed = *self.fail_before.lock().unwrap_or_else(|p| p.into_inner());
        if armed == Some(step) {
            return Err(Error::Injected {
                capsule: capsule.clone(),
                step,
            });
        }
        Ok(())
    }

    fn in_node<T: Send>(
        &self,
        f: impl FnOnce(&Netlink) -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        in_ns(&self.cfg.node_netns, f)
    }

    /// The addresses of `slot`; one outside the address plan is refused.
    fn slot_addrs(&self, slot: u32) -> Result<SlotAddrs, Error> {
        self.cfg
            .plan
            .slot_addrs(slot)
            .ok_or_else(|| Error::InvalidConfig {
                reason: format!("slot {slot} outside the address plan"),
            })
    }

    fn net_of(&self, capsule: &CapsuleId, slot: u32, addrs: SlotAddrs) -> CapsuleNet {
        CapsuleNet {
            capsule: capsule.clone(),
            slot,
            netns: self.netns_path(capsule),
            tap: TAP_NAME.to_string(),
            node_veth: capsule.resource_name(),
            addrs,
            guest: GUEST_ADDR,
            gateway: GUEST_GATEWAY,
            mac: GUEST_MAC,
        }
    }

    fn capsule_table(&self, addrs: SlotAddrs, policy: &EgressPolicy) -> super::Table {
        build_capsule_table(&CapsuleRules {
            table: PREFIX,
            addrs,
            veth: CAPSULE_VETH,
            tap: TAP_NAME,
            policy,
            limits: self.cfg.limits,
        })
    }

    /// Deletes conntrack entries in the node namespace that mention one of
    /// the slot's addresses.
    fn flush_slot_conntrack(&self, slot: u32, addrs: SlotAddrs) -> Result<usize, Error> {
        let mine = [addrs.host, addrs.node_transit, addrs.capsule_transit].map(IpAddr::V4);
        let netns = self.cfg.node_netns.clone();
        self.in_node(move |nl| {
            nl.conntrack_flush(|e| e.addrs().iter().any(|a| mine.contains(a)))
                .map_err(|source| Error::FlushConntrack {
                    what: format!("slot {slot}"),
                    netns,
                    source,
                })
        })
    }

    /// Builds a capsule's network from nothing. Each side effect is
    /// recorded in `undo` before it is made.
    fn build(
        &self,
        capsule: &CapsuleId,
        addrs: SlotAddrs,
        policy: &EgressPolicy,
        undo: &mut Vec<Undo>,
    ) -> Result<(), Error> {
        let name = capsule.resource_name();
        let netns = self.netns_path(capsule);

        // No conntrack flush here: a slot is claimable only once its last
        // owner's NAT state is gone. Teardown flushes before it releases the
        // claim (and keeps the claim when the flush fails); a claim lost to a
        // crash is flushed by the startup sweep; a failed setup releases a
        // slot no guest ever used. A flush walks the kernel's whole
        // conntrack hash (262,144 buckets on a 24 GiB machine, empty or not),
        // which was the largest CPU cost of a setup.

        // 1. The emulated guest's namespace (tests), made first so the
        //    capsule side can move the guest end into it.
        let guest_ns = self.emulated_guest_netns(capsule);
        if let Some(g) = &guest_ns {
            undo.push(Undo::Netns(g.clone()));
            sys::run_in_new_netns(g, &self.cfg.proc_dir, |_| Ok::<(), Error>(())).map_err(
                |source| Error::CreateNetns {
                    capsule: capsule.clone(),
                    path: g.clone(),
                    source,
                },
            )??;
        }

        // 2. The capsule namespace and everything inside it, on one thread
        //    that lives in it. The node end of the veth is recorded before
        //    the veth exists: it ends up in the node namespace.
        self.check(capsule, SetupStep::CreateNetns)?;
        undo.push(Undo::Netns(netns.clone()));
        undo.push(Undo::NodeLink(name.clone()));
        let table = self.capsule_table(addrs, policy);
        let check = |step| self.check(capsule, step);
        sys::run_in_new_netns(&netns, &self.cfg.proc_dir, |nl| {
            prepare::prepare(
                &self.cfg,
                nl,
                capsule,
                &netns,
                &name,
                guest_ns.as_deref(),
                &check,
            )?;
            self.address_capsule_side(nl, capsule, addrs, &table)
        })
        .map_err(|source| Error::CreateNetns {
            capsule: capsule.clone(),
            path: netns.clone(),
            source,
        })??;

        // 3. The node end.
        self.configure_node_side(capsule, addrs)
    }

    /// Builds `capsule`'s network from `entry`, a namespace the pool made
    /// ahead: it takes the capsule's names (node link first, while it is
    /// down and unaddressed, then the namespace), then the capsule's
    /// addresses, routes and table as a cold build gives them. Each side
    /// effect is recorded in `undo` before it is made; what is left under
    /// the pool's names is the caller's to discard.
    fn build_from_pool(
        &self,
        capsule: &CapsuleId,
        entry: &pool::Entry,
        addrs: SlotAddrs,
        policy: &EgressPolicy,
        undo: &mut Vec<Undo>,
    ) -> Result<(), Error> {
        let netns = self.netns_path(capsule);
        self.check(capsule, SetupStep::CreateNetns)?;
        let moves = std::iter::once((self.pool.netns_path(entry), netns.clone())).chain(
            self.pool
                .guest_path(entry)
                .zip(self.emulated_guest_netns(capsule)),
        );
        for (from, to) in moves {
            undo.push(Undo::Netns(to.clone()));
            sys::move_netns(&from, &to).map_err(|source| Error::CreateNetns {
                capsule: capsule.clone(),
                path: to.clone(),
                source,
            })?;
        }
        let table = self.capsule_table(addrs, policy);
        in_ns(&netns, |nl| {
            self.address_capsule_side(nl, capsule, addrs, &table)
        })?;
        // The node end takes the capsule's name, then its address and
        // route, on one thread in the node namespace.
        let name = capsule.resource_name();
        undo.push(Undo::NodeLink(name.clone()));
        self.in_node(|nl| {
            nl.rename(&entry.name, &name)
                .map_err(|source| Error::ConfigureLink {
                    capsule: capsule.clone(),
                    device: entry.name.clone(),
                    source,
                })?;
            self.configure_node_end(nl, capsule, addrs)
        })
    }

    /// Runs inside the capsule's namespace: the veth's address, the
    /// default route through the node, the capsule's table.
    fn address_capsule_side(
        &self,
        nl: &Netlink,
        capsule: &CapsuleId,
        addrs: SlotAddrs,
        table: &super::Table,
    ) -> Result<(), Error> {
        self.check(capsule, SetupStep::MoveVeth)?;
        let link = |source| Error::ConfigureLink {
            capsule: capsule.clone(),
            device: CAPSULE_VETH.into(),
            source,
        };
        nl.add_addr(CAPSULE_VETH, addrs.capsule_transit, 31)
            .map_err(link)?;
        nl.set_up(CAPSULE_VETH, None, None).map_err(link)?;
        nl.add_route(
            Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("0 <= 32"),
            Some(addrs.node_transit),
            CAPSULE_VETH,
        )
        .map_err(|source| Error::AddRoute {
            capsule: capsule.clone(),
            dest: "default".into(),
            device: CAPSULE_VETH.into(),
            source,
        })?;
        self.check(capsule, SetupStep::LoadCapsuleTable)?;
        super::nft::load_table(nl, table).map_err(|source| Error::LoadTable {
            table: table.name.clone(),
            netns: self.netns_path(capsule),
            source,
        })
    }

    /// The node end: address, up, and the route that sends the slot's
    /// host address into the capsule. The route is a setup's last step
    /// ([`LinuxNet::is_built`]).
    fn configure_node_side(&self, capsule: &CapsuleId, addrs: SlotAddrs) -> Result<(), Error> {
        self.in_node(|nl| self.configure_node_end(nl, capsule, addrs))
    }

    /// [`LinuxNet::configure_node_side`] on a thread already in the node
    /// namespace.
    fn configure_node_end(
        &self,
        nl: &Netlink,
        capsule: &CapsuleId,
        addrs: SlotAddrs,
    ) -> Result<(), Error> {
        let name = capsule.resource_name();
        let link = |source| Error::ConfigureLink {
            capsule: capsule.clone(),
            device: name.clone(),
            source,
        };
        self.check(capsule, SetupStep::ConfigureNodeSide)?;
        nl.add_addr(&name, addrs.node_transit, 31).map_err(link)?;
        nl.set_up(&name, None, None).map_err(link)?;
        self.check(capsule, SetupStep::AddNodeRoute)?;
        nl.add_route(Cidr::host(addrs.host), Some(addrs.capsule_transit), &name)
            .map_err(|source| Error::AddRoute {
                capsule: capsule.clone(),
                dest: addrs.host.to_string(),
                device: name.clone(),
                source,
            })
    }

    /// Loads the ports table as the claims now are, in one transaction.
    fn load_ports_table(&self) -> Result<(), Error> {
        let claims = self.ports.claims();
        let table = build_ports_table(
            &claims,
            |c| {
                self.slots
                    .get(c)
                    .and_then(|s| self.cfg.plan.slot_addrs(s))
                    .map(|a| a.host)
            },
            self.cfg.plan.host_range,
        );
        let netns = self.cfg.node_netns.clone();
        self.in_node(|nl| {
            super::nft::load_table(nl, &table).map_err(|source| Error::LoadTable {
                table: PORTS_TABLE.into(),
                netns,
                source,
            })
        })
    }

    /// Makes `capsule`'s published ports match `rules`: each claim write is
    /// journaled (a file) before the table that uses it is loaded, and its
    /// inverse recorded before it is made, so a failed load puts the claims
    /// back as they were. Exhaustion is found before any write.
    fn set_ports(&self, capsule: &CapsuleId, rules: &[PortRule]) -> Result<(), Error> {
        let change = self.ports.plan(capsule, rules).map_err(|e| match e {
            PlanError::Exhausted { needed, free } => Error::HostPortsExhausted {
                capsule: capsule.clone(),
                range: self.ports.range().to_string(),
                needed,
                free,
            },
        })?;
        if change.writes.is_empty() {
            return Ok(());
        }
        let mut undo: Vec<Write> = Vec::new();
        let mut result = Ok(());
        for w in &change.writes {
            undo.push(self.ports.inverse(w));
            if let Err(source) = self.ports.apply(w) {
                undo.pop();
                result = Err(Error::HostPortClaim {
                    capsule: capsule.clone(),
                    source,
                });
                break;
            }
        }
        if result.is_ok() {
            result = self.load_ports_table();
        }
        if result.is_err() {
            for w in undo.iter().rev() {
                if let Err(e) = self.ports.apply(w) {
                    warn!(capsule = %capsule, error = &e as &dyn std::error::Error, "put a host port claim back after a failed change");
                }
            }
        }
        result
    }

    /// Undoes `undo` in reverse; whether every step took.
    fn run_undo(&self, capsule: &CapsuleId, undo: Vec<Undo>) -> bool {
        let mut clean = true;
        for step in undo.into_iter().rev() {
            let res = match &step {
                Undo::Netns(path) => {
                    sys::remove_netns(path)
                        .map(drop)
                        .map_err(|source| Error::RemoveNetns {
                            path: path.clone(),
                            source,
                        })
                }
                Undo::NodeLink(name) => self.delete_node_link(name).map(drop),
            };
            if let Err(e) = res {
                // The claim stays: the capsule's next setup removes what is
                // left, or its teardown, or the startup sweep.
                warn!(capsule = %capsule, ?step, error = &e as &dyn std::error::Error, "rollback step failed");
                clean = false;
            }
        }
        clean
    }

    fn delete_node_link(&self, name: &str) -> Result<bool, Error> {
        let netns = self.cfg.node_netns.clone();
        self.in_node(|nl| {
            nl.del_link(name).map_err(|source| Error::DeleteLink {
                device: name.to_string(),
                netns,
                source,
            })
        })
    }

    /// Takes link `name` out of service (down and without addresses: its
    /// routes go; renamed: the name is free again); returns its new name
    /// when it had one.
    fn retire_node_link(&self, name: &str) -> Result<Option<String>, Error> {
        let netns = self.cfg.node_netns.clone();
        let err = |source| Error::DeleteLink {
            device: name.to_string(),
            netns: netns.clone(),
            source,
        };
        let retired = self.in_node(|nl| {
            let Some(index) = nl.link_index(name).map_err(err)? else {
                return Ok(None);
            };
            nl.set_down(name).map_err(err)?;
            // Down keeps the local route of its address: the node would
            // still answer to it.
            nl.flush_addrs(name).map_err(err)?;
            let retired = reaper::retired_name(index);
            match nl.rename(name, &retired) {
                Ok(()) => Ok(Some(retired)),
                // The name is taken (not by us: indexes are unique):
                // delete it here instead.
                Err(_) => nl.del_link(name).map(|_| None).map_err(err),
            }
        })?;
        Ok(retired)
    }

    /// Leaves the deletion of retired link `name` to the reaper.
    fn reap_link(&self, name: Option<String>) -> Result<(), Error> {
        if let Some(name) = name
            && let Err(Job::Link(name)) = self.reaper.hand(Job::Link(name))
        {
            self.delete_node_link(&name)?;
        }
        Ok(())
    }

    /// Gives `capsule`'s slot up: the claim turns draining at once, and
    /// the reaper frees the slot once its conntrack entries are gone.
    fn release_slot(&self, capsule: &CapsuleId) -> Result<(), Error> {
        let claim = |source| Error::SlotClaim {
            action: "remove",
            capsule: capsule.clone(),
            source,
        };
        let Some(slot) = self.slots.begin_release(capsule).map_err(claim)? else {
            return Ok(());
        };
        let addrs = self.slot_addrs(slot)?;
        if let Err(Job::Drain(slot, addrs)) = self.reaper.hand(Job::Drain(slot, addrs)) {
            let netns = self.cfg.node_netns.clone();
            self.in_node(|nl| {
                reaper::drain(nl, &self.slots, &[(slot, addrs)]).map_err(|source| {
                    Error::FlushConntrack {
                        what: format!("slot {slot}"),
                        netns,
                        source,
                    }
                })
            })?;
        }
        Ok(())
    }

    /// The sweep's walk of the node namespace: links and tables of no
    /// claimed capsule, retired links, and conntrack entries of unclaimed
    /// slots; the counts removed.
    fn sweep_node(
        &self,
        kept: &HashSet<String>,
        claimed: &HashSet<u32>,
    ) -> Result<(usize, usize, usize), Error> {
        let netns = self.cfg.node_netns.clone();
        let plan = self.cfg.plan.clone();
        self.in_node(|nl| {
            let list = |source| Error::ListLinks {
                netns: netns.clone(),
                source,
            };
            let mut links = 0;
            for (_, name, _) in nl.links().map_err(list)? {
                let unkept = super::is_resource_name(&name) && !kept.contains(&name);
                let unpooled = pool::is_pool_name(&name) && !self.pool.holds(&name);
                if (unkept || unpooled || reaper::is_retired_name(&name))
                    && nl.del_link(&name).map_err(|source| Error::DeleteLink {
                        device: name.clone(),
                        netns: netns.clone(),
                        source,
                    })?
                {
                    links += 1;
                }
            }
            let tables_err = |action| {
                let netns = netns.clone();
                move |source| Error::Tables {
                    action,
                    netns,
                    source,
                }
            };
            let mut tables = 0;
            for (family, name) in nl.list_tables().map_err(tables_err("list"))? {
                // The node tables (ip and ip6) are ours to keep:
                // ensure_node replaces them atomically.
                let node_table = ((family == 2 || family == 10) && name == PREFIX)
                    || (family == 2 && name == PORTS_TABLE);
                if name.starts_with(PREFIX)
                    && !node_table
                    && nl
                        .delete_table(family, &name)
                        .map_err(tables_err("delete"))?
                {
                    tables += 1;
                }
            }
            let stale = |a: &IpAddr| match a {
                IpAddr::V4(v4) => plan.slot_of(*v4).is_some_and(|s| !claimed.contains(&s)),
                IpAddr::V6(_) => false,
            };
            let conntrack = nl
                .conntrack_flush(|e| e.addrs().iter().any(stale))
                .map_err(|source| Error::FlushConntrack {
                    what: "unclaimed slots".into(),
                    netns: netns.clone(),
                    source,
                })?;
            Ok((links, tables, conntrack))
        })
    }

    /// Whether the capsule's network is complete: its namespace exists and
    /// the node routes the slot's host address into its veth. That route is
    /// the last step of a setup, so a crash anywhere earlier reads as "not
    /// built" and the leftovers are cleared and rebuilt instead of adopted.
    fn is_built(&self, capsule: &CapsuleId, addrs: SlotAddrs) -> Result<bool, Error> {
        if !self.netns_path(capsule).exists() {
            return Ok(false);
        }
        let name = capsule.resource_name();
        let netns = self.cfg.node_netns.clone();
        self.in_node(|nl| {
            let list = |source| Error::ListLinks {
                netns: netns.clone(),
                source,
            };
            let Some(index) = nl.link_index(&name).map_err(list)? else {
                return Ok(false);
            };
            let routes = nl.routes_v4().map_err(list)?;
            Ok(routes
                .iter()
                .any(|(dest, len, oif)| *dest == addrs.host && *len == 32 && *oif == Some(index)))
        })
    }

    /// Removes every resource of a capsule, tolerating absence; collects
    /// errors rather than stopping at the first.
    /// Returns the node link it retired, for the caller to hand to the
    /// reaper ([`LinuxNet::reap_link`]) once more urgent work is queued.
    fn remove_resources(
        &self,
        capsule: &CapsuleId,
        flush: bool,
        errors: &mut Vec<Error>,
    ) -> Option<String> {
        // Retiring the node end takes its route; the reaper's delete takes
        // the capsule end along.
        let retired = self
            .retire_node_link(&capsule.resource_name())
            .unwrap_or_else(|e| {
                errors.push(e);
                None
            });
        let mut namespaces = vec![self.netns_path(capsule)];
        namespaces.extend(self.emulated_guest_netns(capsule));
        for path in namespaces {
            if let Err(source) = sys::remove_netns(&path) {
                errors.push(Error::RemoveNetns { path, source });
            }
        }
        if flush
            && let Some(slot) = self.slots.get(capsule)
            && let Some(addrs) = self.cfg.plan.slot_addrs(slot)
            && let Err(e) = self.flush_slot_conntrack(slot, addrs)
        {
            errors.push(e);
        }
        retired
    }
}

/// Runs `f` in the namespace at `netns` and flattens the two error layers.
fn in_ns<T: Send>(
    netns: &Path,
    f: impl FnOnce(&Netlink) -> Result<T, Error> + Send,
) -> Result<T, Error> {
    sys::run_in_netns(netns, f).map_err(|source| Error::EnterNetns {
        path: netns.to_path_buf(),
        source,
    })?
}

impl NetOps for LinuxNet {
    fn ensure_node(&self) -> Result<(), Error> {
        let table = build_node_table(&NodeRules {
            prefix: PREFIX,
            uplink: &self.cfg.uplink,
            host_range: self.cfg.plan.host_range,
            blocked: &self.cfg.blocked_egress,
        });
        let netns = self.cfg.node_netns.clone();
        // Published ports as the claims on disk say (after a restart the
        // same host ports reach the same capsules), and first: the node
        // table accepts DNATed connections into capsules because this
        // table has dropped every one that is not published.
        self.load_ports_table()?;
        self.in_node(|nl| {
            sys::write_sysctl(&self.cfg.proc_dir, "net/ipv4/ip_forward", "1").map_err(|source| {
                Error::SetSysctl {
                    key: "net/ipv4/ip_forward".into(),
                    netns: netns.clone(),
                    source,
                }
            })?;
            if nl.link_index(&self.cfg.uplink).ok().flatten().is_none() {
                warn!(uplink = %self.cfg.uplink, "uplink not found; capsules have no egress until it appears");
            }
            super::nft::load_table(nl, &table).map_err(|source| Error::LoadTable {
                table: table.name.clone(),
                netns: netns.clone(),
                source,
            })?;
            // A kernel without IPv6 has no IPv6 to keep from capsules.
            if self.cfg.proc_dir.join("sys/net/ipv6").exists() {
                let v6 = build_node_table6(PREFIX);
                super::nft::load_table(nl, &v6).map_err(|source| Error::LoadTable {
                    table: format!("ip6 {}", v6.name),
                    netns: netns.clone(),
                    source,
                })?;
            }
            Ok(())
        })
    }

    fn setup(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<CapsuleNet, Error> {
        let (slot, new_claim) = self.slots.claim(capsule).map_err(|e| match e {
            ClaimError::Exhausted => Error::SlotsExhausted {
                capsule: capsule.clone(),
            },
            ClaimError::ShortIdTaken(other) => Error::ShortIdTaken {
                capsule: capsule.clone(),
                other,
            },
            ClaimError::Io(source) => Error::SlotClaim {
                action: "write",
                capsule: capsule.clone(),
                source,
            },
        })?;
        let addrs = self.slot_addrs(slot)?;

        // Adopt what exists: a restarted agent, or a repeated call. The
        // table is reloaded so a changed policy takes effect.
        if self.is_built(capsule, addrs)? {
            let table = self.capsule_table(addrs, policy);
            let netns = self.netns_path(capsule);
            in_ns(&netns, |nl| {
                super::nft::load_table(nl, &table).map_err(|source| Error::LoadTable {
                    table: table.name.clone(),
                    netns: netns.clone(),
                    source,
                })
            })?;
            self.ensure_tap(capsule)?;
            debug!(capsule = %capsule, slot, "adopted existing network");
            return Ok(self.net_of(capsule, slot, addrs));
        }

        // Half-built leftovers of this capsule (a crash mid-setup) go first.
        // Any conntrack entries they left are this capsule's own, on the
        // slot it keeps: no other tenant's replies can be steered by them.
        // A capsule that held no claim has none: a setup claims before it
        // builds, and a teardown removes before it releases.
        if !new_claim {
            let mut errors = Vec::new();
            let retired = self.remove_resources(capsule, false, &mut errors);
            if let Err(e) = self.reap_link(retired) {
                errors.push(e);
            }
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
        }

        // The pool starts filling once the agent first needs it (after the
        // startup sweep, where there is one).
        self.pool.start();
        let mut undo = Vec::new();
        let mut built = None;
        // Whether every undo so far took: a claim is given back only then,
        // so a capsule without a claim never has leftovers (above).
        let mut clean = true;
        if let Some(entry) = self.pool.take() {
            match self.build_from_pool(capsule, &entry, addrs, policy, &mut undo) {
                Ok(()) => {
                    self.pool.claimed(entry);
                    built = Some(Ok(()));
                }
                Err(e) => {
                    clean = self.run_undo(capsule, std::mem::take(&mut undo));
                    self.pool.discard(entry);
                    if clean {
                        // Whatever the pooled namespace lacked, one made
                        // for the capsule may not.
                        warn!(capsule = %capsule, error = &e as &dyn std::error::Error, "set up from a pooled namespace; making one");
                    } else {
                        built = Some(Err(e));
                    }
                }
            }
        }
        let built = built.unwrap_or_else(|| self.build(capsule, addrs, policy, &mut undo));
        match built {
            Ok(()) => {
                info!(capsule = %capsule, slot, host = %addrs.host, "capsule network ready");
                Ok(self.net_of(capsule, slot, addrs))
            }
            Err(e) => {
                clean &= self.run_undo(capsule, undo);
                if new_claim
                    && clean
                    && let Err(re) = self.slots.release(capsule)
                {
                    warn!(capsule = %capsule, error = &re as &dyn std::error::Error, "release slot after failed setup");
                }
                Err(e)
            }
        }
    }

    fn update_policy(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<(), Error> {
        let netns = self.netns_path(capsule);
        let Some(slot) = self.slots.get(capsule) else {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        };
        let addrs = self.slot_addrs(slot)?;
        if !netns.exists() {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        let table = self.capsule_table(addrs, policy);
        let guest = IpAddr::V4(GUEST_ADDR);
        let flushed = in_ns(&netns, |nl| {
            // Loading replaces the table in one transaction: the old policy
            // holds until the new one does.
            super::nft::load_table(nl, &table).map_err(|source| Error::LoadTable {
                table: table.name.clone(),
                netns: netns.clone(),
                source,
            })?;
            // Connections the guest opened to what is now forbidden would
            // pass as established; forget them, so their next packet is
            // judged as new (and dropped). The node's own connections to
            // the guest stay.
            nl.conntrack_flush(|e| {
                e.orig.0 == guest
                    && match e.orig.1 {
                        IpAddr::V4(dst) => !policy.allows(dst),
                        IpAddr::V6(_) => true,
                    }
            })
            .map_err(|source| Error::FlushConntrack {
                what: format!("capsule {capsule}"),
                netns: netns.clone(),
                source,
            })
        })?;
        info!(capsule = %capsule, slot, flushed, "egress policy replaced");
        Ok(())
    }

    fn set_names(
        &self,
        capsule: &CapsuleId,
        policy: &EgressPolicy,
        names: &Names,
    ) -> Result<(), Error> {
        let netns = self.netns_path(capsule);
        if self.slots.get(capsule).is_none() || !netns.exists() {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        let mut blocked = self.cfg.blocked_egress.clone();
        blocked.extend(super::ALWAYS_BLOCKED);
        let place = NamesPlace {
            netns,
            node_netns: self.cfg.node_netns.clone(),
            tap: TAP_NAME.to_string(),
            blocked,
        };
        self.names.ensure(capsule, &place, policy, names)?;
        debug!(capsule = %capsule, "names applied");
        Ok(())
    }

    fn cluster_dns(&self) -> ClusterDns {
        self.names.cluster().clone()
    }

    fn take_name_refusals(&self) -> Option<tokio::sync::mpsc::Receiver<super::dns::NameRefused>> {
        self.names.take_refusals()
    }

    fn ensure_tap(&self, capsule: &CapsuleId) -> Result<(), Error> {
        let netns = self.netns_path(capsule);
        if !netns.exists() {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        if self.cfg.guest_link != GuestLink::Tap {
            return Ok(());
        }
        in_ns(&netns, |nl| {
            let present = nl.link_index(TAP_NAME).map_err(|source| Error::ListLinks {
                netns: netns.clone(),
                source,
            })?;
            if present.is_some() {
                return Ok(());
            }
            debug!(capsule = %capsule, "recreating tap");
            prepare::make_tap(&self.cfg, nl, capsule)
        })
    }

    fn publish(&self, capsule: &CapsuleId, rules: &[PortRule]) -> Result<Vec<HostPort>, Error> {
        if self.slots.get(capsule).is_none() {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        self.set_ports(capsule, rules)?;
        Ok(self.ports.of(capsule))
    }

    fn host_ports(&self, capsule: &CapsuleId) -> Vec<HostPort> {
        self.ports.of(capsule)
    }

    fn teardown(&self, capsule: &CapsuleId, mode: Teardown) -> Result<(), Error> {
        // The proxy's sockets would keep the namespace alive.
        self.names.remove(capsule);
        let mut errors = Vec::new();
        // A capsule gone for good gives its host ports back; a suspended
        // one keeps them (the ports table drops what reaches its missing
        // network) and comes back on the same ones.
        if mode == Teardown::ReleaseSlot
            && let Err(e) = self.set_ports(capsule, &[])
        {
            errors.push(e);
        }
        // A suspended capsule keeps its slot, flushed here; a slot given
        // up is flushed before its reuse, behind the teardown.
        let retired = self.remove_resources(capsule, mode == Teardown::KeepSlot, &mut errors);
        if mode == Teardown::ReleaseSlot
            && errors.is_empty()
            && let Err(e) = self.release_slot(capsule)
        {
            errors.push(e);
        }
        // After the drain: the slot is free again without waiting for a
        // veth delete.
        if let Err(e) = self.reap_link(retired) {
            errors.push(e);
        }
        let count = errors.len();
        match errors.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(Error::Teardown {
                capsule: capsule.clone(),
                count,
                source: Box::new(first),
            }),
        }
    }

    fn claims(&self) -> Vec<CapsuleId> {
        self.slots.claims().into_iter().map(|(_, c)| c).collect()
    }

    fn sweep(&self) -> Result<SweepReport, Error> {
        // Slots a crash left draining: not claimed, so the walk below
        // flushes their addresses; freed after it.
        let draining = self.slots.draining();
        let claims = self.slots.claims();
        let kept: HashSet<String> = claims.iter().map(|(_, c)| c.resource_name()).collect();
        let claimed: HashSet<u32> = claims.iter().map(|(s, _)| *s).collect();
        let ours = format!("{PREFIX}-");
        let mut report = SweepReport::default();

        // Host ports of capsules that hold no slot (a crash between a
        // teardown's two releases) serve nothing: give them back.
        let orphans: std::collections::BTreeSet<CapsuleId> = self
            .ports
            .claims()
            .into_values()
            .map(|c| c.capsule)
            .filter(|c| self.slots.get(c).is_none())
            .collect();
        for c in orphans {
            report.host_ports += self.ports.of(&c).len();
            self.set_ports(&c, &[])?;
        }

        let (links, tables, conntrack) = self.sweep_node(&kept, &claimed)?;
        report.links = links;
        report.tables = tables;
        report.conntrack = conntrack;
        for slot in draining {
            self.slots
                .end_release(slot)
                .map_err(|source| Error::FreeSlot { slot, source })?;
        }

        // Namespaces last: removing one destroys its veth, and the node end
        // with it, which the count above would then miss.
        let mut dirs = vec![self.cfg.netns_dir.clone()];
        if let GuestLink::EmulatedGuest { netns_dir } = &self.cfg.guest_link {
            dirs.push(netns_dir.clone());
        }
        for dir in dirs {
            let names = sys::list_netns(&dir, &ours).map_err(|source| Error::ListNetns {
                path: dir.clone(),
                source,
            })?;
            // A pooled namespace this pool does not hold is a crashed
            // agent's: it belongs to nobody.
            let pooled = sys::list_netns(&dir, &format!("{PREFIX}.")).map_err(|source| {
                Error::ListNetns {
                    path: dir.clone(),
                    source,
                }
            })?;
            let unpooled = pooled
                .into_iter()
                .filter(|n| pool::is_pool_name(n) && !self.pool.holds(n));
            for name in names
                .into_iter()
                .filter(|n| super::is_resource_name(n) && !kept.contains(n))
                .chain(unpooled)
            {
                let path = dir.join(&name);
                if sys::remove_netns(&path).map_err(|source| Error::RemoveNetns {
                    path: path.clone(),
                    source,
                })? && dir == self.cfg.netns_dir
                {
                    report.namespaces += 1;
                }
            }
        }

        if report != SweepReport::default() {
            info!(?report, "swept network leftovers");
        }
        self.pool.start();
        Ok(report)
    }
}
