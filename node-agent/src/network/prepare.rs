//! What every capsule namespace holds before it belongs to a capsule:
//! loopback up, IPv6 off, forwarding on, the veth whose node end is born
//! in the node namespace, and the guest's side of the link (the TAP, or in
//! tests the emulated guest). None of it depends on a capsule's slot or
//! policy, so the pool ([`super::pool`]) makes it ahead of need and
//! `LinuxNet` only addresses it once a capsule claims it.
//!
//! These run inside the namespace being prepared; they make no decision
//! about order or rollback (the caller records its undo first).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;

use super::addr::{Cidr, GATEWAY_MAC, GUEST_ADDR, GUEST_GATEWAY, GUEST_MAC, GUEST_PREFIX};
use super::config::{LinuxNetConfig, SetupStep};
use super::{CAPSULE_VETH, CapsuleId, Error, TAP_NAME, TAP_QUEUE_LEN};
use crate::sys::net::{self as sys, Netlink};

/// A test's chance to fail just before a step; `Ok` in production.
pub(super) type Check<'a> = &'a (dyn Fn(SetupStep) -> Result<(), Error> + Sync);

/// Prepares the namespace `nl` is in (mounted at `netns`) for `who`: the
/// node end of its veth is `node_link`; `guest_ns` is the emulated guest's
/// namespace (tests), `None` for a TAP.
pub(super) fn prepare(
    cfg: &LinuxNetConfig,
    nl: &Netlink,
    who: &CapsuleId,
    netns: &Path,
    node_link: &str,
    guest_ns: Option<&Path>,
    check: Check<'_>,
) -> Result<(), Error> {
    let sysctl = |key: &str, source| Error::SetSysctl {
        key: key.into(),
        netns: netns.to_path_buf(),
        source,
    };
    nl.set_up("lo", None, None)
        .map_err(|source| Error::ConfigureLink {
            capsule: who.clone(),
            device: "lo".into(),
            source,
        })?;
    // Guests are IPv4 only; with IPv6 off in their namespace (before any
    // link exists, so `default` covers them all) nothing is reachable
    // over link-local IPv6 either. A kernel without IPv6 has no such
    // sysctl, and nothing to turn off.
    for key in [
        "net/ipv6/conf/all/disable_ipv6",
        "net/ipv6/conf/default/disable_ipv6",
    ] {
        match sys::write_sysctl(&cfg.proc_dir, key, "1") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(sysctl(key, source)),
        }
    }

    // The veth is born here with its node end born in the node
    // namespace: the capsule end never shares a name space with the
    // node's links, and no link has to move (a move waits for an RCU
    // grace period).
    check(SetupStep::CreateVeth)?;
    let veth = |source| Error::CreateVeth {
        capsule: who.clone(),
        device: node_link.to_string(),
        source,
    };
    let node = File::open(&cfg.node_netns).map_err(veth)?;
    nl.add_veth_peer_in(CAPSULE_VETH, node_link, &node)
        .map_err(veth)?;

    check(SetupStep::CreateTap)?;
    match guest_ns {
        None => make_tap(cfg, nl, who)?,
        Some(g) => make_emulated_guest(nl, who, g)?,
    }
    let key = "net/ipv4/ip_forward";
    sys::write_sysctl(&cfg.proc_dir, key, "1").map_err(|source| sysctl(key, source))
}

/// The TAP: persistent, named [`TAP_NAME`], the guest's gateway address,
/// a long transmit queue.
pub(super) fn make_tap(cfg: &LinuxNetConfig, nl: &Netlink, who: &CapsuleId) -> Result<(), Error> {
    nl.create_tap(&cfg.tun_path, TAP_NAME)
        .map_err(|source| Error::CreateTap {
            capsule: who.clone(),
            device: TAP_NAME.into(),
            source,
        })?;
    configure_guest_side(nl, who)
}

fn configure_guest_side(nl: &Netlink, who: &CapsuleId) -> Result<(), Error> {
    let link = |source| Error::ConfigureLink {
        capsule: who.clone(),
        device: TAP_NAME.into(),
        source,
    };
    nl.add_addr(TAP_NAME, GUEST_GATEWAY, GUEST_PREFIX)
        .map_err(link)?;
    nl.set_up(TAP_NAME, Some(TAP_QUEUE_LEN), Some(GATEWAY_MAC))
        .map_err(link)
}

/// Tests: a veth named like the TAP, its peer playing the guest's NIC in
/// the guest namespace.
fn make_emulated_guest(nl: &Netlink, who: &CapsuleId, guest_ns: &Path) -> Result<(), Error> {
    let err = |source| Error::CreateTap {
        capsule: who.clone(),
        device: TAP_NAME.into(),
        source,
    };
    let g = File::open(guest_ns).map_err(err)?;
    nl.add_veth_peer_in(TAP_NAME, "guest0", &g).map_err(err)?;
    configure_guest_side(nl, who)?;
    let any = Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("0 <= 32");
    sys::run_in_netns(guest_ns, |gl| {
        gl.set_up("lo", None, None)
            .and_then(|()| gl.rename("guest0", "eth0"))
            .and_then(|()| gl.add_addr("eth0", GUEST_ADDR, GUEST_PREFIX))
            .and_then(|()| gl.set_up("eth0", None, Some(GUEST_MAC)))
            .and_then(|()| gl.add_route(any, Some(GUEST_GATEWAY), "eth0"))
    })
    .and_then(|r| r)
    .map_err(err)
}
