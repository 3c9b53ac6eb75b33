//! Host-tier tests of published capsule ports, as root, inside namespaces
//! made per test (`network_env`): the uplink namespace plays a Pod reaching
//! `node address:host port`, the emulated guest runs the server. What a user
//! would notice: the declared port answers from an allowed source, and
//! nothing else does (another source, an undeclared port, a DNAT someone
//! else planted on the node); host ports come back after release, run out
//! honestly, survive an agent restart, and follow live changes.

mod network_env;

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use network_env::*;
use wrenn_node_agent::network::{
    Action, CapsuleId, Chain, ChainKind, Cidr, EgressPolicy, Error, Family, Hook, HostPort, L4,
    Match, NetOps, PortRule, Rule, Table, Teardown, Verdict,
};
use wrenn_testkit::host_case;

fn id(s: &str) -> CapsuleId {
    CapsuleId::new(s).expect("valid capsule id")
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("cidr")
}

/// The "Pod": the uplink namespace's own address, allowed by the rules below.
fn pod() -> Cidr {
    Cidr::host(UPLINK_ADDR)
}

fn rule(port: u16, from: Cidr) -> PortRule {
    PortRule {
        port,
        from: vec![from],
    }
}

/// A server in the guest that answers each connection with `tag`.
fn serve(bed: &Bed, c: &CapsuleId, port: u16, tag: &'static str) -> std::thread::JoinHandle<()> {
    let l: TcpListener = in_ns(&bed.guest(c), move |_| {
        TcpListener::bind((Ipv4Addr::new(169, 254, 0, 21), port))
    })
    .expect("guest listener");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let peer = s
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = s.write_all(format!("{tag} {peer}").as_bytes());
        }
    })
}

/// What the guest's server said to a connection from `src` in the uplink
/// namespace to the node's `host_port`; `Err` when the connection failed.
fn ask(bed: &Bed, src: Ipv4Addr, host_port: u16) -> io::Result<String> {
    let mut s = connect_from(
        &bed.uplink,
        src,
        SocketAddr::from((NODE_UPLINK_ADDR, host_port)),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn host_port(ports: &[HostPort], port: u16) -> u16 {
    ports
        .iter()
        .find(|h| h.port == port)
        .map(|h| h.host_port)
        .expect("port published")
}

#[test]
fn a_pod_reaches_the_declared_port_and_nothing_else_gets_in() {
    let _case = host_case!("a_pod_reaches_the_declared_port_and_nothing_else_gets_in");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let c = id("port1111");
    let n = net.setup(&c, &EgressPolicy::Deny).unwrap();
    let _web = serve(&bed, &c, 8080, "web");
    let _ssh = serve(&bed, &c, 2222, "undeclared");

    let ports = net.publish(&c, &[rule(8080, pod())]).unwrap();
    let hp = host_port(&ports, 8080);
    assert!((29000..=29009).contains(&hp), "{hp}");
    // The Pod reaches the guest, which sees the Pod's own address.
    assert_eq!(
        ask(&bed, UPLINK_ADDR, hp).unwrap(),
        format!("web {UPLINK_ADDR}")
    );

    // The attack: the same port from a source outside `from`.
    assert!(
        ask(&bed, OTHER_REMOTE, hp).is_err(),
        "a source outside from reached the capsule"
    );
    // Another host port of the range reaches nothing.
    let other = if hp == 29000 { 29001 } else { 29000 };
    assert!(ask(&bed, UPLINK_ADDR, other).is_err());

    // The attack: something else on the node DNATs into the capsule's
    // undeclared port (as a Service endpoint pointed at the slot address
    // would). The ports table drops it, and the declared port still works.
    let planted = Table {
        family: Family::Ip,
        name: "planted".into(),
        sets: Vec::new(),
        chains: vec![Chain {
            name: "pre",
            kind: ChainKind::Nat,
            hook: Hook::Prerouting,
            priority: -110,
            policy: Verdict::Accept,
            rules: vec![Rule {
                matches: vec![Match::Dport(L4::Tcp, 5555)],
                action: Action::DnatPort(n.addrs.host, 2222),
            }],
        }],
    };
    in_ns(&bed.node, |nl| {
        wrenn_node_agent::network::nft::load_table(nl, &planted)
    })
    .unwrap();
    assert!(
        ask(&bed, UPLINK_ADDR, 5555).is_err(),
        "a foreign DNAT reached an undeclared port"
    );
    assert_eq!(
        ask(&bed, UPLINK_ADDR, hp).unwrap(),
        format!("web {UPLINK_ADDR}")
    );

    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
    assert!(net.host_ports(&c).is_empty());
    assert!(ask(&bed, UPLINK_ADDR, hp).is_err());
}

#[test]
fn host_ports_are_released_reused_and_run_out_without_side_effects() {
    let _case = host_case!("host_ports_are_released_reused_and_run_out_without_side_effects");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let (a, b) = (id("fill1111"), id("late2222"));
    net.setup(&a, &EgressPolicy::Deny).unwrap();
    net.setup(&b, &EgressPolicy::Deny).unwrap();
    let _web = serve(&bed, &b, 80, "b");

    // Ten ports in the bed's range, all taken by a.
    let all: Vec<PortRule> = (1..=10).map(|p| rule(p, pod())).collect();
    let pa = net.publish(&a, &all).unwrap();
    let mut taken: Vec<u16> = pa.iter().map(|h| h.host_port).collect();
    taken.sort();
    assert_eq!(taken, (29000..=29009).collect::<Vec<_>>());

    match net.publish(&b, &[rule(80, pod())]) {
        Err(Error::HostPortsExhausted { needed, free, .. }) => {
            assert_eq!((needed, free), (1, 0));
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    assert!(net.host_ports(&b).is_empty());
    assert_eq!(net.host_ports(&a), pa);
    let claims = bed.cfg.state_dir.join("hostports");
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 10);

    // a goes: its ports come back, and b gets one that answers.
    net.teardown(&a, Teardown::ReleaseSlot).unwrap();
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
    let pb = net.publish(&b, &[rule(80, pod())]).unwrap();
    let hp = host_port(&pb, 80);
    assert!(taken.contains(&hp));
    assert_eq!(
        ask(&bed, UPLINK_ADDR, hp).unwrap(),
        format!("b {UPLINK_ADDR}")
    );
    net.teardown(&b, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn a_restarted_agent_keeps_the_same_host_ports_working() {
    let _case = host_case!("a_restarted_agent_keeps_the_same_host_ports_working");
    let bed = Bed::new(false);
    let c = id("keep1111");
    let before = {
        let net = bed.net();
        net.ensure_node().unwrap();
        net.setup(&c, &EgressPolicy::Deny).unwrap();
        net.publish(&c, &[rule(8080, pod()), rule(9090, pod())])
            .unwrap()
    };
    let _web = serve(&bed, &c, 8080, "web");
    let rules_before = in_ns(&bed.node, |nl| nl.count_rules()).unwrap();

    // A new agent: node tables reloaded from the claims on disk, the
    // capsule's network adopted.
    let net = bed.net();
    net.ensure_node().unwrap();
    net.setup(&c, &EgressPolicy::Deny).unwrap();
    assert_eq!(net.host_ports(&c), before);
    assert_eq!(
        net.publish(&c, &[rule(8080, pod()), rule(9090, pod())])
            .unwrap(),
        before
    );
    net.sweep().unwrap();
    assert_eq!(
        in_ns(&bed.node, |nl| nl.count_rules()).unwrap(),
        rules_before
    );
    let hp = host_port(&before, 8080);
    assert_eq!(
        ask(&bed, UPLINK_ADDR, hp).unwrap(),
        format!("web {UPLINK_ADDR}")
    );
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn live_changes_take_effect_on_the_next_connection() {
    let _case = host_case!("live_changes_take_effect_on_the_next_connection");
    let bed = Bed::new(false);
    let net = bed.net();
    net.ensure_node().unwrap();
    let c = id("live1111");
    net.setup(&c, &EgressPolicy::Deny).unwrap();
    let _a = serve(&bed, &c, 8080, "a");
    let _b = serve(&bed, &c, 9090, "b");

    let p1 = net.publish(&c, &[rule(8080, pod())]).unwrap();
    let h8080 = host_port(&p1, 8080);
    assert!(ask(&bed, UPLINK_ADDR, h8080).is_ok());

    // Add a port: the old one keeps its host port, the new one answers.
    let p2 = net
        .publish(&c, &[rule(8080, pod()), rule(9090, pod())])
        .unwrap();
    assert_eq!(host_port(&p2, 8080), h8080);
    let h9090 = host_port(&p2, 9090);
    assert_eq!(
        ask(&bed, UPLINK_ADDR, h9090).unwrap(),
        format!("b {UPLINK_ADDR}")
    );

    // Change `from`: the Pod is out, the other source is in.
    net.publish(
        &c,
        &[rule(8080, Cidr::host(OTHER_REMOTE)), rule(9090, pod())],
    )
    .unwrap();
    assert!(ask(&bed, UPLINK_ADDR, h8080).is_err());
    assert_eq!(
        ask(&bed, OTHER_REMOTE, h8080).unwrap(),
        format!("a {OTHER_REMOTE}")
    );

    // Remove a port: refused on the next connection; the other stays.
    net.publish(&c, &[rule(9090, cidr("198.51.100.0/24"))])
        .unwrap();
    assert!(ask(&bed, OTHER_REMOTE, h8080).is_err());
    assert!(ask(&bed, UPLINK_ADDR, h9090).is_ok());
    assert_eq!(net.host_ports(&c).len(), 1);

    // Nothing published: nothing answers.
    net.publish(&c, &[]).unwrap();
    assert!(ask(&bed, UPLINK_ADDR, h9090).is_err());
    net.teardown(&c, Teardown::ReleaseSlot).unwrap();
}

#[test]
fn the_startup_sweep_gives_back_host_ports_of_capsules_without_a_slot() {
    let _case = host_case!("the_startup_sweep_gives_back_host_ports_of_capsules_without_a_slot");
    let bed = Bed::new(false);
    let claims = bed.cfg.state_dir.join("hostports");
    std::fs::create_dir_all(&claims).unwrap();
    // A claim left by an agent that died after releasing the slot.
    std::fs::write(
        claims.join("29004"),
        r#"{"capsule":"gone1111","port":80,"from":["198.51.100.1/32"]}"#,
    )
    .unwrap();
    let net = bed.net();
    net.ensure_node().unwrap();
    assert_eq!(net.host_ports(&id("gone1111")).len(), 1);
    let report = net.sweep().unwrap();
    assert_eq!(report.host_ports, 1);
    assert!(net.host_ports(&id("gone1111")).is_empty());
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
}
