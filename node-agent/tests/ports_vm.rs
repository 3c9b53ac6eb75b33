//! Published ports into a real guest (Tier::Vm): the supervisor boots this
//! tree's guest image under QEMU with the real `LinuxNet` in a test-made
//! node namespace; busybox `httpd` in the guest serves the ports; the
//! uplink namespace plays a Pod on another node reaching
//! `node address:host port`, as the capsule's EndpointSlice says.
//!
//! What it shows, on one capsule without a restart: the allowed source
//! reaches the guest's server through its host port; another source, another
//! host port of the range and a declared port without `from` get nothing;
//! a live change of the sources swaps who gets in (same host port), a port
//! added live gets a host port of its own and answers, a removed one stops;
//! the capsule's delete gives the host ports back and they answer nothing.
//!
//! The node keeps namespaces ready as the chart runs it (a pool of 2), and
//! the capsule takes the first one: the guest's TAP, veth and namespace
//! were made before the capsule existed.
//!
//! Everything lives in namespaces under the test's temp dir; nothing
//! touches the machine's own links, routes or firewall.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod guest_exec;
mod network_env;
mod qemu_bed;

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use network_env::{Bed as NetBed, NODE_UPLINK_ADDR, OTHER_REMOTE, UPLINK_ADDR, connect_from};
use qemu_bed::{sh_as, vm_bed};
use wrenn_node_agent::capsule::{Egress, HostPort, PortRule, State};
use wrenn_node_agent::network::{CapsuleId, Cidr};
use wrenn_testkit::{Tier, case};

const NAME: &str =
    "ports_vm::a_pod_reaches_a_real_guest_through_its_host_port_and_nothing_else_gets_in";
const UID: &str = "ports";
/// Published from the Pod.
const WEB: u16 = 8080;
/// Declared without `from` at first: served in the guest, not published.
const ADMIN: u16 = 9090;

fn from(port: u16, src: Ipv4Addr) -> PortRule {
    PortRule {
        port,
        from: vec![Cidr::host(src)],
    }
}

fn host_port(ports: &[HostPort], port: u16) -> u16 {
    ports
        .iter()
        .find(|h| h.port == port)
        .map(|h| h.host_port)
        .unwrap_or_else(|| panic!("port {port} not published: {ports:?}"))
}

/// An HTTP/1.0 GET of `/` from `src` in the uplink namespace to the node's
/// `port`: the body's first line, or why it failed.
fn get(bed: &NetBed, src: Ipv4Addr, port: u16) -> io::Result<String> {
    let mut s = connect_from(&bed.uplink, src, SocketAddr::from((NODE_UPLINK_ADDR, port)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_a_real_guest_through_its_host_port_and_nothing_else_gets_in() {
    let c = case(Tier::Vm, NAME);
    let pooled = || {
        let mut net = NetBed::new(true);
        net.cfg.pool = 2;
        net
    };
    let (w, turn) = match vm_bed(NAME, &[], pooled, "wrenn-ports").await {
        Ok(b) => b,
        Err(reason) => return c.skip(reason),
    };
    // The namespace (its inode names it) the pool holds first, once the
    // pool the startup sweep started is full.
    let ns_dir = w.net.cfg.netns_dir.clone();
    wrenn_testkit::eventually(Duration::from_secs(30), "the pool filled", || {
        ns_dir.join("wrenn.0").exists() && ns_dir.join("wrenn.1").exists()
    })
    .await;
    let first = std::fs::metadata(ns_dir.join("wrenn.0")).unwrap().ino();
    let mut spec = w.spec("tenant", UID, Egress::Deny);
    spec.ports = vec![from(WEB, UPLINK_ADDR)];
    let v = w.sup.create(UID, spec, State::Running).await.unwrap();
    assert_eq!(v.state, State::Running);
    let own = ns_dir.join(CapsuleId::new(UID).unwrap().resource_name());
    assert_eq!(
        std::fs::metadata(&own).unwrap().ino(),
        first,
        "the capsule did not get the pooled namespace"
    );
    let hp = host_port(&v.host_ports, WEB);
    let g = w.guest(UID, Duration::from_secs(60)).await;
    for (port, body) in [(WEB, "web in the guest"), (ADMIN, "admin in the guest")] {
        let (out, code) = sh_as(
            &g,
            "",
            &format!(
                "mkdir -p /tmp/{port} && echo '{body}' > /tmp/{port}/index.html && \
                 httpd -p {port} -h /tmp/{port} && echo started"
            ),
            10_000,
        )
        .await;
        assert_eq!((out.as_str(), code), ("started", Some(0)));
    }
    let net = &w.net;

    // The Pod reaches the guest's server; httpd may still be starting.
    let t0 = Instant::now();
    loop {
        match get(net, UPLINK_ADDR, hp) {
            Ok(body) if body == "web in the guest" => break,
            other => assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the Pod through host port {hp}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The attacks: a source outside `from`, another host port of the
    // range, and the declared port without `from` (it has no host port:
    // one next to the web's answers nothing either).
    assert!(
        get(net, OTHER_REMOTE, hp).is_err(),
        "a source outside from got in"
    );
    for other in [29000, 29001, 29002].into_iter().filter(|p| *p != hp) {
        assert!(
            get(net, UPLINK_ADDR, other).is_err(),
            "host port {other} answered"
        );
    }

    // A live change of sources: the other address gets in, the Pod no
    // longer does; the host port stays.
    let v = w
        .sup
        .update_ports(UID, vec![from(WEB, OTHER_REMOTE)])
        .await
        .unwrap();
    assert_eq!(host_port(&v.host_ports, WEB), hp);
    assert_eq!(get(net, OTHER_REMOTE, hp).unwrap(), "web in the guest");
    assert!(
        get(net, UPLINK_ADDR, hp).is_err(),
        "a removed source still got in"
    );

    // A port published live gets a host port of its own; dropping the web
    // port closes its host port at once.
    let v = w
        .sup
        .update_ports(UID, vec![from(ADMIN, UPLINK_ADDR)])
        .await
        .unwrap();
    let admin = host_port(&v.host_ports, ADMIN);
    assert_eq!(get(net, UPLINK_ADDR, admin).unwrap(), "admin in the guest");
    assert!(
        get(net, OTHER_REMOTE, hp).is_err(),
        "an unpublished port answered"
    );

    // Delete: the host ports go back and answer nothing.
    assert!(w.sup.delete(UID).await.unwrap());
    assert!(get(net, UPLINK_ADDR, admin).is_err());
    drop(turn);
}
