//! Host-tier tests of capsule networking, as root, inside namespaces made
//! per test (see `network_env`): NAT to the uplink, isolation, egress
//! policy, teardown and rollback without leaks, the startup sweep, the TAP.
//!
//! The guest is emulated: a TAP has no peer to send from without a VMM, so
//! these tests run `LinuxNet` with `GuestLink::EmulatedGuest`, which puts a
//! veth named like the TAP where the TAP would be and its peer, configured
//! exactly as the guest configures itself, in a namespace of its own. The
//! TAP path is checked on its own (`tap_has_its_queue_length_and_is_recreated_by_name`).

mod network_env;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use network_env::*;
use wrenn_node_agent::network::{
    CapsuleId, Chain, ChainKind, Cidr, EgressPolicy, Error, Hook, NetOps, SetupStep, TAP_NAME,
    TAP_QUEUE_LEN, Table, Teardown, Verdict,
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

#[test]
fn two_capsules_built_in_parallel_reach_the_uplink_through_nat() {
    let _case = host_case!("two_capsules_built_in_parallel_reach_the_uplink_through_nat");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
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
        let l = listen(&bed.guest(c), n.guest);
        let port = l.local_addr().unwrap().port();
        let seen = source_seen(&bed.node, &l, addr(n.addrs.host, port)).unwrap();
        assert_eq!(seen, n.addrs.node_transit);
    }

    net.teardown(&a, Teardown::ReleaseSlot).unwrap();
    net.teardown(&b, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn capsules_cannot_reach_each_other_the_node_or_metadata() {
    let _case = host_case!("capsules_cannot_reach_each_other_the_node_or_metadata");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
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
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let other = listen(&bed.uplink, OTHER_REMOTE);
    let (to, to_other) = (remote.local_addr().unwrap(), other.local_addr().unwrap());

    let (c, d) = (id("eeee5555"), id("ffff6666"));
    let nc = net.setup(&c, &EgressPolicy::Deny).unwrap();
    let listed = EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().unwrap()]);
    net.setup(&d, &listed).unwrap();

    assert!(blocked(&bed.guest(&c), to), "Deny let a connection out");
    assert!(blocked(&bed.guest(&c), to_other));
    source_seen(&bed.guest(&d), &remote, to).unwrap();
    assert!(blocked(&bed.guest(&d), to_other), "unlisted CIDR reachable");

    // Under Deny the node still reaches the guest.
    let l = listen(&bed.guest(&c), nc.guest);
    let port = l.local_addr().unwrap().port();
    source_seen(&bed.node, &l, addr(nc.addrs.host, port)).unwrap();

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
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let c = id("half0001");
    let n = net.setup(&c, &EgressPolicy::Allow).unwrap();
    // As if the agent died just before the last step of setup.
    in_ns(&bed.node, |nl| nl.del_route(Cidr::host(n.addrs.host))).unwrap();
    let again = bed.net().setup(&c, &EgressPolicy::Allow).unwrap();
    assert_eq!(again.slot, n.slot);
    let l = listen(&bed.guest(&c), n.guest);
    let port = l.local_addr().unwrap().port();
    source_seen(&bed.node, &l, addr(n.addrs.host, port)).unwrap();
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn teardown_leaves_no_namespace_link_rule_or_conntrack_entry() {
    let _case = host_case!("teardown_leaves_no_namespace_link_rule_or_conntrack_entry");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
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
    assert_eq!(bed.snapshot(), before);
    // Teardown is idempotent.
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn fifty_create_teardown_cycles_leak_nothing() {
    let _case = host_case!("fifty_create_teardown_cycles_leak_nothing");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
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
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let before = bed.snapshot();
    let c = id("rollback1");
    for step in [
        SetupStep::FlushConntrack,
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
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
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
    let slots = bed.cfg.state_dir.join("slots");
    for claim in std::fs::read_dir(&slots).unwrap() {
        let p = claim.unwrap().path();
        if std::fs::read_to_string(&p).unwrap() == lost.as_str() {
            std::fs::remove_file(p).unwrap();
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
        nl.load_table(&Table {
            name: ours("old"),
            chains: vec![Chain {
                name: "input",
                kind: ChainKind::Filter,
                hook: Hook::Input,
                priority: 0,
                policy: Verdict::Accept,
                rules: vec![],
            }],
        })
    })
    .unwrap();

    let restarted = bed.net();
    restarted.ensure_node().unwrap();
    let report = restarted.sweep().unwrap();
    assert_eq!(report.namespaces, 2, "{report:?}");
    assert_eq!(report.links, 2, "{report:?}");
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
    assert_eq!(restarted.sweep().unwrap(), Default::default());
    assert_eq!(bed.snapshot(), before);
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
