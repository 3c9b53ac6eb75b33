//! Host-tier tests of capsule networking, as root, inside namespaces made
//! per test (see `network_env`): NAT to the uplink, isolation, egress
//! policy, teardown and rollback without leaks, the startup sweep, the TAP.
//!
//! The guest is emulated: a TAP has no peer to send from without a VMM, so
//! these tests run `LinuxNet` with `GuestLink::EmulatedGuest`, which puts a
//! veth named like the TAP where the TAP would be and its peer, configured
//! exactly as the guest configures itself, in a namespace of its own. The
//! TAP path is checked on its own (`tap_has_its_queue_length_and_is_recreated_by_name`).
//!
//! Why this file is long: seventeen host-tier network tests over the namespaces
//! `network_env` makes.

mod network_env;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use network_env::*;
use wrenn_node_agent::network::{
    CapsuleId, CapsuleLimits, CapsuleNet, Chain, ChainKind, Cidr, EgressFlags, EgressPolicy, Error,
    Family, Hook, LinuxNet, NetOps, SetupStep, TAP_NAME, TAP_QUEUE_LEN, Table, Teardown, Verdict,
};
use wrenn_node_agent::sys::net as sys;
use wrenn_testkit::{Tier, case, need_root};

fn id(s: &str) -> CapsuleId {
    CapsuleId::new(s).expect("valid capsule id")
}

fn addr(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

macro_rules! host_case {
    ($name:literal) => {{
        let case = case(Tier::Host, $name);
        if let Err(why) = need_root() {
            return case.skip(why);
        }
        if !Path::new("/dev/net/tun").exists() {
            return case.skip("needs /dev/net/tun");
        }
        case
    }};
}

/// A bed without TAP devices and its node network, set up.
fn node_bed() -> (Bed, LinuxNet) {
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().expect("node network set up");
    (bed, net)
}

/// Connects from the node to capsule `c`'s guest at its host address (the
/// DNAT to the guest): the source address the guest saw.
fn node_to_guest(bed: &Bed, c: &CapsuleId, n: &CapsuleNet) -> Ipv4Addr {
    let l = listen(&bed.guest(c), n.guest);
    let port = l.local_addr().expect("a bound listener").port();
    source_seen(&bed.node, &l, addr(n.addrs.host, port)).expect("the node reaches the guest")
}

#[test]
fn two_capsules_built_in_parallel_reach_the_uplink_through_nat() {
    let _case = host_case!("two_capsules_built_in_parallel_reach_the_uplink_through_nat");
    let (bed, net) = node_bed();
    let (a, b) = (id("aaaa1111"), id("bbbb2222"));
    let (na, nb) = std::thread::scope(|s| {
        let ha = s.spawn(|| net.setup(&a, &EgressPolicy::Allow));
        let hb = s.spawn(|| net.setup(&b, &EgressPolicy::Allow));
        (ha.join().unwrap().unwrap(), hb.join().unwrap().unwrap())
    });
    assert_ne!(na.slot, nb.slot);
    assert_ne!(na.addrs.host, nb.addrs.host);

    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    for (c, n) in [(&a, &na), (&b, &nb)] {
        // The uplink sees the node's address (masquerade) ...
        let seen = source_seen(&bed.guest(c), &remote, to).unwrap();
        assert_eq!(seen, NODE_UPLINK_ADDR, "capsule {c}");
        // ... and the node saw the capsule arrive as its slot's host
        // address: the capsule namespace SNATed the fixed guest address.
        let entries = in_ns(&bed.node, |nl| nl.conntrack_list()).unwrap();
        assert!(
            entries.iter().any(|e| e.orig.0 == IpAddr::V4(n.addrs.host)
                && e.reply.1 == IpAddr::V4(NODE_UPLINK_ADDR)),
            "no NAT entry for {} in {entries:?}",
            n.addrs.host
        );
    }

    // The node reaches each guest on its host address (DNAT to the guest).
    for (c, n) in [(&a, &na), (&b, &nb)] {
        let seen = node_to_guest(&bed, c, n);
        assert_eq!(seen, n.addrs.node_transit);
    }

    net.teardown(&a, Teardown::ReleaseSlot).unwrap();
    net.teardown(&b, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn capsules_cannot_reach_each_other_the_node_or_metadata() {
    let _case = host_case!("capsules_cannot_reach_each_other_the_node_or_metadata");
    let (bed, net) = node_bed();
    let (a, b) = (id("cccc3333"), id("dddd4444"));
    let na = net.setup(&a, &EgressPolicy::Allow).unwrap();
    let nb = net.setup(&b, &EgressPolicy::Allow).unwrap();
    let ga = bed.guest(&a);

    // B's guest listens; A cannot reach it, the node can.
    let lb = listen(&bed.guest(&b), nb.guest);
    let pb = lb.local_addr().unwrap().port();
    assert!(
        blocked(&ga, addr(nb.addrs.host, pb)),
        "capsule reached capsule"
    );
    assert!(blocked(&ga, addr(nb.addrs.capsule_transit, pb)));
    source_seen(&bed.node, &lb, addr(nb.addrs.host, pb)).unwrap();

    // The agent's port on the node: unreachable from a capsule on any node
    // address, reachable from elsewhere (so the listener is really there).
    let agent = listen(&bed.node, std::net::Ipv4Addr::UNSPECIFIED);
    let port = agent.local_addr().unwrap().port();
    for ip in [
        na.addrs.node_transit,
        NODE_UPLINK_ADDR,
        nb.addrs.node_transit,
    ] {
        assert!(
            blocked(&ga, addr(ip, port)),
            "capsule reached the node at {ip}"
        );
    }
    source_seen(&bed.uplink, &agent, addr(NODE_UPLINK_ADDR, port)).unwrap();

    // Link-local metadata, even though the uplink routes it.
    let md = listen(&bed.uplink, METADATA);
    let mport = md.local_addr().unwrap().port();
    assert!(
        blocked(&ga, addr(METADATA, mport)),
        "capsule reached metadata"
    );
    // The capsule namespace itself (its gateway address) is closed too.
    assert!(blocked(&ga, addr(na.gateway, 22)));

    // A still has the internet.
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    source_seen(&ga, &remote, remote.local_addr().unwrap()).unwrap();

    net.teardown(&a, Teardown::ReleaseSlot).unwrap();
    net.teardown(&b, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn deny_blocks_egress_and_an_allow_listed_cidr_passes() {
    let _case = host_case!("deny_blocks_egress_and_an_allow_listed_cidr_passes");
    let (bed, net) = node_bed();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let other = listen(&bed.uplink, OTHER_REMOTE);
    let (to, to_other) = (remote.local_addr().unwrap(), other.local_addr().unwrap());

    let (c, d) = (id("eeee5555"), id("ffff6666"));
    let nc = net.setup(&c, &EgressPolicy::Deny).unwrap();
    let listed = EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().unwrap()]);
    net.setup(&d, &listed).unwrap();

    // Refused at once by the node (both remotes listen, so a reset can
    // only come from the policy), not dropped into a hang.
    assert!(refused(&bed.guest(&c), to), "Deny let a connection out");
    assert!(refused(&bed.guest(&c), to_other));
    source_seen(&bed.guest(&d), &remote, to).unwrap();
    assert!(refused(&bed.guest(&d), to_other), "unlisted CIDR reachable");

    // Under Deny the node still reaches the guest.
    node_to_guest(&bed, &c, &nc);

    // A repeated setup adopts the network and applies the new policy.
    let again = net.setup(&c, &EgressPolicy::Allow).unwrap();
    assert_eq!(again.slot, nc.slot);
    source_seen(&bed.guest(&c), &remote, to).unwrap();

    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    net.teardown(&d, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn a_half_built_network_is_rebuilt_not_adopted() {
    let _case = host_case!("a_half_built_network_is_rebuilt_not_adopted");
    let (bed, net) = node_bed();
    let c = id("half0001");
    let n = net.setup(&c, &EgressPolicy::Allow).unwrap();
    // As if the agent died just before the last step of setup.
    in_ns(&bed.node, |nl| nl.del_route(Cidr::host(n.addrs.host))).unwrap();
    let again = bed.net().setup(&c, &EgressPolicy::Allow).unwrap();
    assert_eq!(again.slot, n.slot);
    node_to_guest(&bed, &c, &n);
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn teardown_leaves_no_namespace_link_rule_or_conntrack_entry() {
    let _case = host_case!("teardown_leaves_no_namespace_link_rule_or_conntrack_entry");
    let (bed, net) = node_bed();
    let before = bed.snapshot();
    assert!(before.node_rules > 0, "node table not loaded: {before:?}");

    let c = id("abcd0001");
    let n = net.setup(&c, &EgressPolicy::Allow).unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    source_seen(&bed.guest(&c), &remote, remote.local_addr().unwrap()).unwrap();
    let during = bed.snapshot();
    assert!(during.slot_conntrack > 0, "{during:?}");
    assert!(during.node_links.contains(&n.node_veth));
    assert_eq!(during.namespaces, vec![c.resource_name()]);

    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    // At once: the name is free and no route of the node leads to the
    // slot's addresses, whether or not what is left of the link (deleted
    // behind the teardown) is still there. A link's going down keeps the
    // local route of its address; the teardown removes it too.
    let slot_addrs = [n.addrs.host, n.addrs.node_transit, n.addrs.capsule_transit];
    let (named, routed) = in_ns(&bed.node, |nl| {
        let routed: Vec<_> = nl
            .routes_v4()?
            .into_iter()
            .filter(|(dest, len, _)| {
                slot_addrs.iter().any(|a| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    u32::from(*a) & mask == u32::from(*dest) & mask && *len > 0
                })
            })
            .collect();
        Ok((nl.link_index(&n.node_veth)?, routed))
    })
    .unwrap();
    assert_eq!(named, None);
    assert!(
        routed.is_empty(),
        "routes still lead to a torn-down capsule's addresses: {routed:?}"
    );
    assert_eq!(bed.snapshot(), before);
    // Teardown is idempotent.
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn fifty_create_teardown_cycles_leak_nothing() {
    let _case = host_case!("fifty_create_teardown_cycles_leak_nothing");
    let (bed, net) = node_bed();
    let before = bed.snapshot();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    for i in 0..50 {
        let c = id(&format!("cycle{i:04}"));
        net.setup(&c, &EgressPolicy::Allow).unwrap();
        if i % 10 == 0 {
            source_seen(&bed.guest(&c), &remote, to).unwrap();
        }
        net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    }
    assert_eq!(bed.snapshot(), before);
}

#[test]
fn rollback_after_an_injected_failure_leaks_nothing() {
    let _case = host_case!("rollback_after_an_injected_failure_leaks_nothing");
    let (bed, net) = node_bed();
    let before = bed.snapshot();
    let c = id("rollback1");
    for step in [
        SetupStep::CreateNetns,
        SetupStep::CreateVeth,
        SetupStep::MoveVeth,
        SetupStep::CreateTap,
        SetupStep::LoadCapsuleTable,
        SetupStep::ConfigureNodeSide,
        SetupStep::AddNodeRoute,
    ] {
        net.fail_before(Some(step));
        match net.setup(&c, &EgressPolicy::Allow) {
            Err(Error::Injected { step: s, .. }) => assert_eq!(s, step),
            other => panic!("setup with a failure before {step:?}: {other:?}"),
        }
        assert_eq!(
            bed.snapshot(),
            before,
            "leak after a failure before {step:?}"
        );
    }
    net.fail_before(None);
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    assert_eq!(bed.snapshot(), before);
}

#[test]
fn startup_sweep_removes_planted_leftovers_and_counts_them() {
    let _case = host_case!("startup_sweep_removes_planted_leftovers_and_counts_them");
    let (bed, net) = node_bed();
    let before = bed.snapshot();

    // A capsule that survives the restart (its claim is kept) ...
    let keep = id("keep0001");
    let nk = net.setup(&keep, &EgressPolicy::Allow).unwrap();
    // ... and one whose claim is lost, as if the agent died mid-teardown,
    // after it made traffic (conntrack entries in the node).
    let lost = id("lost0001");
    net.setup(&lost, &EgressPolicy::Allow).unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    source_seen(&bed.guest(&lost), &remote, to).unwrap();
    drop(net);
    // Its claim was turned draining (the teardown's first durable step);
    // the flush and the rest never happened.
    let slots = bed.cfg.state_dir.join("slots");
    for claim in std::fs::read_dir(&slots).unwrap() {
        let p = claim.unwrap().path();
        // A claim is a symlink to its owner's name.
        if std::fs::read_link(&p).unwrap() == Path::new(lost.as_str()) {
            let mut drain = p.clone().into_os_string();
            drain.push(".drain");
            std::fs::rename(&p, drain).unwrap();
        }
    }
    // Planted by hand: a namespace, a node link, an nftables table.
    sys::run_in_new_netns(
        &bed.cfg.netns_dir.join(ours("stale1")),
        Path::new("/proc"),
        |_| Ok::<_, std::io::Error>(()),
    )
    .unwrap()
    .unwrap();
    // Not ours though it starts with the prefix: another agent's node
    // namespace on a shared host. The sweep must leave it alone.
    let foreign = bed.cfg.netns_dir.join("wrenn-node-x1");
    sys::run_in_new_netns(
        &foreign,
        Path::new("/proc"),
        |_| Ok::<_, std::io::Error>(()),
    )
    .unwrap()
    .unwrap();
    in_ns(&bed.node, |nl| {
        nl.add_veth(&ours("stale2"), "stalepeer")?;
        // A link a teardown retired, left by a crash before its deletion.
        nl.add_veth("wrenn+7f", "retiredpeer")?;
        wrenn_node_agent::network::nft::load_table(
            nl,
            &Table {
                family: Family::Ip,
                name: ours("old"),
                chains: vec![Chain {
                    name: "input",
                    kind: ChainKind::Filter,
                    hook: Hook::Input,
                    priority: 0,
                    policy: Verdict::Accept,
                    rules: vec![],
                }],
                sets: vec![],
            },
        )
    })
    .unwrap();

    let restarted = bed.net();
    assert_eq!(restarted.slots().draining().len(), 1);
    restarted.ensure_node().unwrap();
    let report = restarted.sweep().unwrap();
    assert!(
        restarted.slots().draining().is_empty(),
        "the drain was not finished"
    );
    assert_eq!(report.namespaces, 2, "{report:?}");
    assert_eq!(report.links, 3, "{report:?}");
    assert_eq!(report.tables, 1, "{report:?}");
    assert!(report.conntrack >= 1, "{report:?}");

    assert!(
        foreign.exists(),
        "the sweep removed another agent's namespace"
    );
    assert!(sys::remove_netns(&foreign).unwrap());

    // The kept capsule is untouched and still works.
    let after = bed.snapshot();
    assert_eq!(after.namespaces, vec![keep.resource_name()]);
    source_seen(&bed.guest(&keep), &remote, to).unwrap();
    assert_eq!(
        restarted.setup(&keep, &EgressPolicy::Allow).unwrap().slot,
        nk.slot
    );
    restarted.teardown(&keep, Teardown::ReleaseSlot).unwrap();
    assert_eq!(bed.snapshot(), before);
    assert_eq!(restarted.sweep().unwrap(), Default::default());
}

#[test]
fn tap_has_its_queue_length_and_is_recreated_by_name() {
    let _case = host_case!("tap_has_its_queue_length_and_is_recreated_by_name");
    let bed = Bed::new(true);
    let net = bed.net();
    net.ensure_node().unwrap();
    let before = bed.snapshot();
    let c = id("tap00001");
    let n = net.setup(&c, &EgressPolicy::Allow).unwrap();
    assert_eq!(n.tap, TAP_NAME);
    let tap_qlen = |ns: &Path| {
        in_ns(ns, |nl| {
            Ok(nl
                .links()?
                .into_iter()
                .find(|l| l.1 == TAP_NAME)
                .map(|l| l.2))
        })
        .unwrap()
    };
    assert_eq!(tap_qlen(&n.netns), Some(TAP_QUEUE_LEN));
    // IPv6 is off on the guest's link (when the kernel has IPv6 at all).
    let v6 = in_ns(&n.netns, |_| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6"))
    });
    if let Ok(v) = v6 {
        assert_eq!(v.trim(), "1");
    }

    // Restore path: the TAP is gone (or never made on this node); it comes
    // back under the same name.
    in_ns(&n.netns, |nl| nl.del_link(TAP_NAME)).unwrap();
    assert_eq!(tap_qlen(&n.netns), None);
    net.ensure_tap(&c).unwrap();
    assert_eq!(tap_qlen(&n.netns), Some(TAP_QUEUE_LEN));
    // A setup that adopts the network does the same (the agent's create
    // and restore rely on it).
    in_ns(&n.netns, |nl| nl.del_link(TAP_NAME)).unwrap();
    let adopted = net.setup(&c, &EgressPolicy::Allow).unwrap();
    assert_eq!(adopted.slot, n.slot);
    assert_eq!(tap_qlen(&n.netns), Some(TAP_QUEUE_LEN));

    // Suspend keeps the slot; resume on a restarted agent gets it back.
    net.teardown(&c, Teardown::KeepSlot).unwrap();
    assert!(!n.netns.exists());
    assert!(matches!(net.ensure_tap(&c), Err(Error::NotSetUp { .. })));
    let resumed = bed.net().setup(&c, &EgressPolicy::Deny).unwrap();
    assert_eq!(resumed.slot, n.slot);
    assert_eq!(tap_qlen(&resumed.netns), Some(TAP_QUEUE_LEN));
    bed.net().teardown(&c, Teardown::ReleaseSlot).unwrap();
    assert_eq!(bed.snapshot(), before);
}

/// Node-side facts that change only if a capsule network is rebuilt: the
/// namespace's inode, the TAP's and the node veth's interface indexes.
fn identity(bed: &Bed, c: &CapsuleId) -> (u64, Option<u32>, Option<u32>) {
    use std::os::unix::fs::MetadataExt;
    let netns = bed.cfg.netns_dir.join(c.resource_name());
    let ino = std::fs::metadata(&netns).expect("netns inode").ino();
    let tap = in_ns(&netns, |nl| nl.link_index(TAP_NAME)).expect("tap index");
    let veth = in_ns(&bed.node, |nl| nl.link_index(&c.resource_name())).expect("veth index");
    (ino, tap, veth)
}

#[test]
fn an_allow_list_reaches_exactly_its_networks_and_never_metadata() {
    let _case = host_case!("an_allow_list_reaches_exactly_its_networks_and_never_metadata");
    let (bed, net) = node_bed();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let other = listen(&bed.uplink, OTHER_REMOTE);
    let md = listen(&bed.uplink, METADATA);
    let azure = listen(&bed.uplink, AZURE_METADATA);

    // What a tenant writes: Deny, plus the network it needs and, hoping
    // for credentials, both metadata services.
    let c = id("list0001");
    let listed = EgressPolicy::AllowList(vec![
        "198.51.100.0/24".parse().unwrap(),
        "169.254.169.254/32".parse().unwrap(),
        "168.63.129.16/32".parse().unwrap(),
    ]);
    net.setup(&c, &listed).unwrap();
    let g = bed.guest(&c);
    assert_eq!(source_seen(&g, &remote, to).unwrap(), NODE_UPLINK_ADDR);
    assert!(
        blocked(&g, other.local_addr().unwrap()),
        "a network not on the list was reachable"
    );
    assert!(
        blocked(&g, md.local_addr().unwrap()),
        "listing 169.254.169.254 opened it"
    );
    assert!(
        blocked(&g, azure.local_addr().unwrap()),
        "listing 168.63.129.16 opened it"
    );
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn metadata_stays_blocked_under_egress_allow() {
    let _case = host_case!("metadata_stays_blocked_under_egress_allow");
    let (bed, net) = node_bed();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let md = listen(&bed.uplink, METADATA);
    let azure = listen(&bed.uplink, AZURE_METADATA);
    let c = id("meta0001");
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    let g = bed.guest(&c);
    source_seen(&g, &remote, remote.local_addr().unwrap()).unwrap();
    assert!(
        blocked(&g, md.local_addr().unwrap()),
        "reached 169.254.169.254"
    );
    assert!(
        blocked(&g, azure.local_addr().unwrap()),
        "reached 168.63.129.16"
    );
    // The node itself still reaches them: only capsule traffic is judged.
    source_seen(&bed.node, &azure, azure.local_addr().unwrap()).unwrap();
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn a_cidr_the_node_blocks_by_flag_is_blocked_under_every_policy() {
    let _case = host_case!("a_cidr_the_node_blocks_by_flag_is_blocked_under_every_policy");
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        egress: EgressFlags,
    }
    let flags = <Flags as clap::Parser>::try_parse_from([
        "agent",
        "--blocked-egress-cidrs",
        "203.0.113.0/24",
    ])
    .unwrap();
    let mut bed = Bed::new(false);
    bed.cfg.blocked_egress.extend(flags.egress.blocked);
    let net = bed.net();
    net.ensure_node().unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let other = listen(&bed.uplink, OTHER_REMOTE);

    let (a, l) = (id("flag0001"), id("flag0002"));
    net.setup(&a, &EgressPolicy::Allow).unwrap();
    net.setup(
        &l,
        &EgressPolicy::AllowList(vec!["203.0.113.0/24".parse().unwrap()]),
    )
    .unwrap();
    for c in [&a, &l] {
        assert!(
            blocked(&bed.guest(c), other.local_addr().unwrap()),
            "capsule {c} reached a blocked network"
        );
    }
    // Not a blanket block: the rest of the uplink still works.
    source_seen(&bed.guest(&a), &remote, remote.local_addr().unwrap()).unwrap();
    net.teardown(&a, Teardown::ReleaseSlot).unwrap();
    net.teardown(&l, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn a_live_policy_update_flips_reachability_without_rebuilding_the_network() {
    let _case =
        host_case!("a_live_policy_update_flips_reachability_without_rebuilding_the_network");
    use std::io::{Read, Write};
    let (bed, net) = node_bed();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let c = id("live0001");
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    let g = bed.guest(&c);
    let before = identity(&bed, &c);
    let leaks = bed.snapshot();

    // A connection opened while egress was allowed ...
    let mut open = connect(&g, to).unwrap();
    let (mut far, _) = remote.accept().unwrap();
    open.write_all(b"a").unwrap();
    let mut buf = [0u8; 1];
    far.read_exact(&mut buf).unwrap();

    net.update_policy(&c, &EgressPolicy::Deny).unwrap();
    assert!(blocked(&g, to), "a new connection passed after Deny");
    // ... carries nothing once its permission is gone.
    far.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let _ = open.write_all(b"b");
    assert!(
        far.read(&mut buf).is_err(),
        "an open connection outlived the Deny"
    );

    net.update_policy(
        &c,
        &EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().unwrap()]),
    )
    .unwrap();
    source_seen(&g, &remote, to).unwrap();

    // The same namespace, TAP and veth throughout: the VM never noticed.
    assert_eq!(identity(&bed, &c), before);
    let after = bed.snapshot();
    assert_eq!(
        (after.namespaces, after.node_links, after.node_tables),
        (leaks.namespaces, leaks.node_links, leaks.node_tables)
    );

    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    assert!(matches!(
        net.update_policy(&c, &EgressPolicy::Allow),
        Err(Error::NotSetUp { .. })
    ));
}

#[test]
fn connections_over_the_conntrack_limit_are_refused() {
    let _case = host_case!("connections_over_the_conntrack_limit_are_refused");
    let mut bed = Bed::new(false);
    bed.cfg.limits = CapsuleLimits {
        max_connections: 3,
        ..CapsuleLimits::UNLIMITED
    };
    let net = bed.net();
    net.ensure_node().unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let c = id("ctct0001");
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    let g = bed.guest(&c);

    let mut held: Vec<_> = (0..3)
        .map(|i| {
            let near =
                connect(&g, to).unwrap_or_else(|e| panic!("connection {i} under the limit: {e}"));
            (near, remote.accept().unwrap().0)
        })
        .collect();
    assert!(blocked(&g, to), "a fourth connection passed a limit of 3");
    // Another capsule has its own count.
    let d = id("ctct0002");
    net.setup(&d, &EgressPolicy::Allow).unwrap();
    source_seen(&bed.guest(&d), &remote, to).unwrap();

    // A connection closed at both ends frees its place.
    drop(held.pop());
    wrenn_testkit::wait_until(
        std::time::Duration::from_secs(10),
        "a place under the limit",
        || connect(&g, to).map(drop).map_err(|e| e.to_string()),
    )
    .unwrap();
    drop(held);
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    net.teardown(&d, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn new_connections_over_the_rate_limit_are_refused() {
    let _case = host_case!("new_connections_over_the_rate_limit_are_refused");
    let mut bed = Bed::new(false);
    bed.cfg.limits = CapsuleLimits {
        new_connections_per_second: 1,
        ..CapsuleLimits::UNLIMITED
    };
    let net = bed.net();
    net.ensure_node().unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let c = id("rate0001");
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    let g = bed.guest(&c);
    // A burst of 5 passes, then about one a second.
    let mut ok = 0;
    let mut refused = 0;
    let started = std::time::Instant::now();
    for _ in 0..12 {
        match in_ns(&g, |_| {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(300))
        }) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    let secs = started.elapsed().as_secs();
    assert!(ok >= 1, "nothing passed");
    assert!(
        ok <= 5 + secs as usize + 1,
        "{ok} connections in {secs}s at 1/s with a burst of 5"
    );
    assert!(refused > 0);
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn bandwidth_over_the_limit_is_held_back() {
    let _case = host_case!("bandwidth_over_the_limit_is_held_back");
    use std::io::{Read, Write};
    let mut bed = Bed::new(false);
    // Floor of the byte bucket: 64 KiB.
    bed.cfg.limits = CapsuleLimits {
        bandwidth_bytes_per_second: 256 << 10,
        ..CapsuleLimits::UNLIMITED
    };
    let net = bed.net();
    net.ensure_node().unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    let c = id("band0001");
    net.setup(&c, &EgressPolicy::Allow).unwrap();
    let g = bed.guest(&c);

    // 1 MiB at 256 KiB/s with a 256 KiB bucket: about 3 s of policing
    // (measured: 2.2 s; socket buffers in flight when the bucket is full
    // blur it). Unlimited, a veth moves it in milliseconds.
    let total = 1usize << 20;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = remote.accept().unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 << 10];
        while got < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let started = std::time::Instant::now();
    let mut s = connect(&g, to).unwrap();
    s.write_all(&vec![7u8; total]).unwrap();
    drop(s);
    let got = reader.join().unwrap();
    let took = started.elapsed();
    assert_eq!(got, total);
    assert!(
        took >= std::time::Duration::from_millis(1500),
        "1 MiB passed a 256 KiB/s limit in {took:?}"
    );
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn the_node_drops_ipv6_on_every_capsule_link() {
    let _case = host_case!("the_node_drops_ipv6_on_every_capsule_link");
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return _case.skip("needs a kernel with IPv6");
    }
    let (bed, net) = node_bed();
    let tables = in_ns(&bed.node, |nl| nl.list_tables()).unwrap();
    assert!(
        tables.contains(&(10, "wrenn".to_string())),
        "no ip6 node table: {tables:?}"
    );
    // The sweep keeps it; a restarted agent replaces it in place.
    assert_eq!(net.sweep().unwrap().tables, 0);
    bed.net().ensure_node().unwrap();
    let again = in_ns(&bed.node, |nl| nl.list_tables()).unwrap();
    assert_eq!(again, tables);
}
