//! Host-tier tests of the namespace pool (`network::pool`), as root, in
//! namespaces made per test (`network_env`): a capsule given a pooled
//! namespace has the network a cold build gives (NAT out, DNAT in, the
//! node closed to it), a failure while claiming one leaves nothing, and the
//! startup sweep removes a crashed agent's pool but not its own.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod network_env;

use std::path::Path;
use std::time::Duration;

use network_env::*;
use wrenn_node_agent::network::{
    CapsuleId, EgressPolicy, Error, LinuxNet, NetOps, SetupStep, Teardown,
};
use wrenn_node_agent::sys::net as sys;
use wrenn_testkit::{Case, Tier, case, need_root};

fn id(s: &str) -> CapsuleId {
    CapsuleId::new(s).expect("valid capsule id")
}

/// The case, or `None` once it is skipped (which fails where the host
/// tier is required).
fn host_case(name: &str) -> Option<Case> {
    let case = case(Tier::Host, name);
    if let Err(why) = need_root() {
        case.skip(why);
        return None;
    }
    if !Path::new("/dev/net/tun").exists() {
        case.skip("needs /dev/net/tun");
        return None;
    }
    Some(case)
}

/// A bed with emulated guests (traffic can flow), what it holds before
/// any pool, and its network with a pool of `size`, filled.
fn pooled_bed(size: usize) -> (Bed, Leaks, LinuxNet) {
    let mut bed = Bed::new(false);
    bed.net().ensure_node().unwrap();
    let before = bed.snapshot();
    bed.cfg.pool = size;
    let net = bed.net();
    net.start_pool();
    wait_pooled(&net, size);
    (bed, before, net)
}

fn wait_pooled(net: &LinuxNet, n: usize) {
    wrenn_testkit::wait_until(Duration::from_secs(20), "the pool filled", || {
        match net.pooled() {
            ready if ready >= n => Ok(()),
            ready => Err(format!("{ready} of {n} ready")),
        }
    })
    .unwrap();
}

/// The names a pool's entries go by, in `dir`.
fn pooled_names(dir: &Path) -> Vec<String> {
    sys::list_netns(dir, "wrenn.").unwrap()
}

#[test]
fn a_pooled_namespace_gives_a_capsule_the_network_a_cold_build_gives() {
    let Some(_case) =
        host_case("a_pooled_namespace_gives_a_capsule_the_network_a_cold_build_gives")
    else {
        return;
    };
    let (bed, before, net) = pooled_bed(2);
    let c = id("p00l1111");
    let n = net.setup(&c, &EgressPolicy::Allow).unwrap();
    // The capsule took a pooled namespace: one fewer is ready (the
    // refill waits for creates to pause), and the capsule's names are
    // the only ones it goes by.
    assert_eq!(net.pooled(), 1);
    assert!(n.netns.exists());
    assert_eq!(pooled_names(&bed.cfg.netns_dir).len(), 1);
    let links = in_ns(&bed.node, |nl| nl.links()).unwrap();
    assert!(links.iter().any(|l| l.1 == c.resource_name()), "{links:?}");

    // Out through NAT, as the node's uplink address.
    let remote = listen(&bed.uplink, UPLINK_ADDR);
    let to = remote.local_addr().unwrap();
    assert_eq!(
        source_seen(&bed.guest(&c), &remote, to).unwrap(),
        NODE_UPLINK_ADDR
    );
    // In from the node, at the slot's host address (DNAT to the guest).
    let l = listen(&bed.guest(&c), n.guest);
    let port = l.local_addr().unwrap().port();
    assert_eq!(
        source_seen(&bed.node, &l, (n.addrs.host, port).into()).unwrap(),
        n.addrs.node_transit
    );
    // The capsule's table is loaded: the node is closed to the guest.
    let agent = listen(&bed.node, std::net::Ipv4Addr::UNSPECIFIED);
    let agent_port = agent.local_addr().unwrap().port();
    assert!(blocked(
        &bed.guest(&c),
        (n.addrs.node_transit, agent_port).into()
    ));

    // The pool refills once creates pause; teardown and a dropped pool
    // leave the bed as it was.
    wait_pooled(&net, 2);
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    drop(net);
    assert_eq!(bed.snapshot(), before);
}

#[test]
fn a_failure_while_claiming_a_pooled_namespace_leaves_nothing() {
    let Some(_case) = host_case("a_failure_while_claiming_a_pooled_namespace_leaves_nothing")
    else {
        return;
    };
    let (bed, before, net) = pooled_bed(1);
    let c = id("p00l2222");
    for step in [
        SetupStep::CreateNetns,
        SetupStep::MoveVeth,
        SetupStep::LoadCapsuleTable,
        SetupStep::ConfigureNodeSide,
        SetupStep::AddNodeRoute,
    ] {
        wait_pooled(&net, 1);
        net.fail_before(Some(step));
        match net.setup(&c, &EgressPolicy::Allow) {
            Err(Error::Injected { step: s, .. }) => assert_eq!(s, step),
            other => panic!("setup with a failure before {step:?}: {other:?}"),
        }
        // Neither the capsule's names nor the pooled entry it took are
        // left; only what the pool made since.
        assert!(!net.netns_path(&c).exists(), "{step:?}");
        let links = in_ns(&bed.node, |nl| nl.links()).unwrap();
        assert!(
            !links.iter().any(|l| l.1 == c.resource_name()),
            "{step:?}: {links:?}"
        );
        assert!(net.claims().is_empty(), "{step:?}: the slot stayed claimed");
    }
    net.fail_before(None);
    drop(net);
    assert_eq!(bed.snapshot(), before);
}

#[test]
fn the_startup_sweep_removes_a_crashed_agents_pool_but_not_its_own() {
    let Some(_case) = host_case("the_startup_sweep_removes_a_crashed_agents_pool_but_not_its_own")
    else {
        return;
    };
    let mut bed = Bed::new(false);
    bed.net().ensure_node().unwrap();
    let before = bed.snapshot();
    // What a crashed agent's pool leaves: a namespace and its emulated
    // guest under a pool name, and a node link under one.
    let guests = bed.dir.path().join("guests");
    for dir in [&bed.cfg.netns_dir, &guests] {
        sys::run_in_new_netns(&dir.join("wrenn.ab"), Path::new("/proc"), |_| {
            Ok::<(), std::io::Error>(())
        })
        .and_then(|r| r)
        .unwrap();
    }
    in_ns(&bed.node, |nl| nl.add_veth("wrenn.cd", "wrenn.ce")).unwrap();

    bed.cfg.pool = 1;
    let net = bed.net();
    net.ensure_node().unwrap();
    let report = net.sweep().unwrap();
    assert_eq!(report.namespaces, 1, "{report:?}");
    assert!(report.links >= 1, "{report:?}");
    // The sweep started this agent's pool; a later sweep keeps it.
    wait_pooled(&net, 1);
    let mine = pooled_names(&bed.cfg.netns_dir);
    assert_eq!(mine.len(), 1);
    assert!(!mine.contains(&"wrenn.ab".to_string()));
    assert!(!pooled_names(&guests).contains(&"wrenn.ab".to_string()));
    let again = net.sweep().unwrap();
    assert_eq!((again.namespaces, again.links), (0, 0), "{again:?}");
    assert_eq!(pooled_names(&bed.cfg.netns_dir), mine);
    assert_eq!(net.pooled(), 1);
    drop(net);
    assert_eq!(bed.snapshot(), before);
}
