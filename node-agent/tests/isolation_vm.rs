//! The isolation matrix of `docs/security.md`, attacked from inside a real
//! guest (Tier::Vm): the supervisor boots this tree's guest image under QEMU
//! (TCG) with the real `LinuxNet` (namespace, TAP, nftables) in a test-made
//! node namespace, and every probe runs as a shell inside that guest.
//!
//! One guest, egress `Deny` + an allow list naming the test's "internet"
//! address. Around it the test builds what a node has: another capsule
//! (a second network attachment made by the same network module, with a
//! listener where its guest would be), services in the node namespace on
//! the agent's gRPC and admin ports, a metadata server, an API server, a
//! pod with kube-proxy-style DNAT (ClusterIP and NodePort) and IPv6 on the
//! node and uplink. Each row is a TCP connect from the guest that must get
//! nothing, and from a namespace that should reach the same address it must
//! get the listener's answer: no row passes because its listener was
//! missing. The allow-listed address must answer the guest. Spoofed source
//! addresses and a spoofed MAC send UDP to the allowed address: the
//! packets leave the guest's NIC and nothing arrives. Then the policy is
//! switched live to `Allow`, and every row but the open internet must
//! still fail: isolation does not rest on the allow list.
//!
//! Everything lives in namespaces under the test's temp dir (dropping the
//! bed removes them, links and tables with them); nothing touches the
//! machine's own links, routes or firewall.
//!
//! Why this file is long: one guest bed and the whole isolation matrix of
//! docs/security.md, row by row.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod guest_exec;
mod network_env;
mod qemu_bed;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use network_env::{
    AZURE_METADATA, Bed as NetBed, METADATA, NODE_UPLINK_ADDR, OTHER_REMOTE, UPLINK, UPLINK_ADDR,
    in_ns,
};
use qemu_bed::{processes_mentioning, sh_as, vm_bed};
use wrenn_node_agent::capsule::{Egress, State};
use wrenn_node_agent::guest::GuestClient;
use wrenn_node_agent::network::{
    Action, CapsuleId, Chain, ChainKind, Cidr, EgressPolicy, Family, GUEST_GATEWAY, GUEST_MAC,
    GuestLink, Hook, LinuxNet, LinuxNetConfig, Match, NetOps, Rule, SlotAddrs, Table, Teardown,
    Verdict,
};
use wrenn_node_agent::sys::net as sys;
use wrenn_testkit::{Tier, case, unique_name};

const NAME: &str =
    "isolation_vm::every_isolation_row_fails_from_inside_a_guest_and_allowed_egress_works";

/// The guest capsule under attack, and the other capsule beside it.
const GUEST_UID: &str = "isoguest";
const OTHER_UID: &str = "isoother";

// Ports: the agent's defaults for gRPC and admin, a host service, the
// web-ish port of everything else, metadata and the API server.
const GRPC: u16 = 7443;
const ADMIN: u16 = 9090;
const HOST_SVC: u16 = 8000;
const WEB: u16 = 8080;
const META: u16 = 80;
const API: u16 = 6443;
const UDP: u16 = 9999;

/// An API server endpoint as kind or a cloud VPC would have it.
const API_SERVER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
/// The `kubernetes` Service's ClusterIP, DNATed to [`API_SERVER`].
const API_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// A Service's ClusterIP, DNATed to [`BACKEND_POD`].
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A pod on another node (behind the uplink), a Service's backend.
const BACKEND_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// A NodePort-style node address DNATed to [`BACKEND_POD`].
const NODE_PORT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// A NodePort-style node address DNATed to the node itself (a hostNetwork
/// backend).
const NODE_PORT_LOCAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 4);
/// A pod on this node, the positive control of the DNAT rows: its traffic
/// enters the node namespace through prerouting, as the guest's does.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const POD_LINK: &str = "isopod0";

const UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const METADATA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

// ---- listeners that say who reached them ----

/// What a listener saw: the address it was reached at, and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hit {
    listener: &'static str,
    local: SocketAddr,
    peer: SocketAddr,
    /// UDP only: what the datagram said.
    payload: String,
}

type Hits = Arc<Mutex<Vec<Hit>>>;

/// A socket bound inside a test namespace, served on a thread until dropped.
/// A TCP listener answers `tok <address it was reached at>`; both kinds
/// record every connection or datagram.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Listener {
    fn tcp(ns: &Path, label: &'static str, at: SocketAddr, hits: &Hits) -> Listener {
        let l = in_ns(ns, move |_| TcpListener::bind(at))
            .unwrap_or_else(|e| panic!("{label}: bind {at}: {e}"));
        l.set_nonblocking(true).unwrap();
        let (stop, hits) = (Arc::new(AtomicBool::new(false)), hits.clone());
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        let local = canonical(c.local_addr().unwrap());
                        hits.lock().unwrap().push(Hit {
                            listener: label,
                            local,
                            peer: canonical(peer),
                            payload: String::new(),
                        });
                        let _ = c.set_nonblocking(false);
                        let _ = writeln!(c, "tok {local}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Listener {
            stop,
            thread: Some(thread),
        }
    }

    fn udp(ns: &Path, label: &'static str, at: SocketAddr, hits: &Hits) -> Listener {
        let u = in_ns(ns, move |_| UdpSocket::bind(at))
            .unwrap_or_else(|e| panic!("{label}: bind {at}: {e}"));
        u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (stop, hits) = (Arc::new(AtomicBool::new(false)), hits.clone());
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = u.recv_from(&mut buf) {
                    hits.lock().unwrap().push(Hit {
                        listener: label,
                        local: canonical(u.local_addr().unwrap()),
                        peer: canonical(peer),
                        payload: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    });
                }
            }
        });
        Listener {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `ns` to `to` and returns the listener's answer.
fn reach(ns: &Path, to: SocketAddr) -> Result<String, String> {
    in_ns(ns, move |_| {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s.trim().to_string())
    })
    .map_err(|e| format!("{to} from {}: {e}", ns.display()))
}

// ---- the node around the guest ----

/// A row of the matrix: an address the guest must not reach, and a
/// namespace from which the same address answers (so a failure from the
/// guest is the policy's doing, not a missing listener).
struct Row {
    name: &'static str,
    target: SocketAddr,
    control: PathBuf,
}

/// Runs `ip` inside `ns` (IPv6 setup; the test's netlink helpers are
/// IPv4 only).
fn ip_in(ns: &Path, args: &str) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args} in {}: {}",
        ns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the node's surroundings: addresses in the uplink namespace
/// (metadata is there already), a pod namespace on a bridge-less veth,
/// kube-proxy-style DNAT in a table of the test's own, and IPv6.
fn build_surroundings(bed: &NetBed, pod_ns: &Path, dnat_table: &Table) {
    sys::run_in_netns(&bed.uplink, |nl| {
        for a in [API_SERVER, BACKEND_POD] {
            nl.add_addr("lo", a, 32)?;
        }
        // Replies to the pod go back through the node.
        nl.add_route(Cidr::new(POD, 24).unwrap(), Some(NODE_UPLINK_ADDR), "peer0")
    })
    .unwrap()
    .unwrap();
    let pod_ns_path = pod_ns.to_path_buf();
    sys::run_in_netns(&bed.node, move |nl| {
        for a in [NODE_PORT, NODE_PORT_LOCAL] {
            nl.add_addr(UPLINK, a, 32)?;
        }
        nl.add_veth(POD_LINK, "podpeer")?;
        nl.move_link("podpeer", &std::fs::File::open(&pod_ns_path)?)?;
        nl.add_addr(POD_LINK, POD_GATEWAY, 24)?;
        nl.set_up(POD_LINK, None, None)?;
        wrenn_node_agent::network::nft::load_table(nl, dnat_table)
    })
    .unwrap()
    .unwrap();
    sys::run_in_netns(pod_ns, |nl| {
        nl.set_up("lo", None, None)?;
        nl.add_addr("podpeer", POD, 24)?;
        nl.set_up("podpeer", None, None)?;
        nl.add_route(
            Cidr::new(Ipv4Addr::UNSPECIFIED, 0).unwrap(),
            Some(POD_GATEWAY),
            "podpeer",
        )
    })
    .unwrap()
    .unwrap();
    // IPv6: the uplink has a global address and the IPv6 metadata address,
    // the node a global address and a route; `nodad` so they answer at once.
    ip_in(
        &bed.uplink,
        &format!("-6 addr add {UPLINK6}/64 dev peer0 nodad"),
    );
    ip_in(&bed.uplink, &format!("-6 addr add {METADATA6}/128 dev lo"));
    ip_in(
        &bed.node,
        &format!("-6 addr add {NODE6}/64 dev {UPLINK} nodad"),
    );
    ip_in(
        &bed.node,
        &format!("-6 route add {METADATA6}/128 via {UPLINK6}"),
    );
}

/// kube-proxy in miniature: DNAT of a ClusterIP to a pod, of the API
/// server's ClusterIP to its endpoint, and of NodePort-style node
/// addresses to a pod and to the node itself. Address-only (ports kept):
/// the path through the node is the same as with a port match.
fn dnat_table(name: &str) -> Table {
    let dnat = |from: Ipv4Addr, to: Ipv4Addr| Rule {
        matches: vec![Match::Daddr(Cidr::host(from))],
        action: Action::Dnat(to),
    };
    Table {
        family: Family::Ip,
        name: name.to_string(),
        chains: vec![Chain {
            name: "prerouting",
            kind: ChainKind::Nat,
            hook: Hook::Prerouting,
            priority: -100,
            policy: Verdict::Accept,
            rules: vec![
                dnat(CLUSTER_IP, BACKEND_POD),
                dnat(API_CLUSTER_IP, API_SERVER),
                dnat(NODE_PORT, BACKEND_POD),
                dnat(NODE_PORT_LOCAL, NODE_UPLINK_ADDR),
            ],
        }],
        sets: vec![],
    }
}

// ---- the guest ----

/// The network bed with the production list of destinations no capsule
/// reaches (cluster and private ranges), not the bed's shorter one.
fn production_net() -> NetBed {
    let mut net = NetBed::new(true);
    net.cfg.blocked_egress = LinuxNetConfig::host(UPLINK, net.dir.path()).blocked_egress;
    net
}

/// The guest's vsock CID, from its vsock helper's command line (as nobody
/// in the guest cannot open `/dev/vsock` to ask).
fn guest_cid(state: &Path) -> u32 {
    for pid in processes_mentioning(&state.display().to_string()) {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(i) = args.iter().position(|a| a == "--guest-cid") {
            return args[i + 1].parse().unwrap();
        }
    }
    panic!("no vsock helper with --guest-cid under {}", state.display());
}

/// Runs `script` under `/bin/sh` in the guest; returns its output and code.
async fn sh(g: &GuestClient, script: &str) -> (String, Option<i32>) {
    sh_as(g, "", script, 150_000).await
}

/// Gives the guest an IPv6 address and an on-link default route, as a
/// tenant would to try IPv6 (the guest kernel has IPv6; the capsule
/// namespace and the node refuse it).
const GUEST_V6: &str = "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad && \
     ip -6 addr replace 2001:db8:5::21/64 dev eth0 && ip -6 route replace default dev eth0 && \
     ip -6 addr show dev eth0 | grep 2001:db8:5::21 | grep -qv tentative";

fn host_port(a: SocketAddr) -> String {
    format!("{} {}", a.ip(), a.port())
}

/// `probe I HOST PORT`: a TCP connect that writes `PROBE I <answer>` to a
/// file, the answer being the listener's first line or `none`. Its stdin
/// stays open a while, so `nc` reads the answer before it sees an EOF.
const PROBE_FN: &str = r#"rm -rf /tmp/iso && mkdir -p /tmp/iso
probe() {
  out=$(sleep 3 | nc -w 10 $2 $3 2>/dev/null)
  echo "PROBE $1 ${out:-none}" > /tmp/iso/$1.tmp && mv /tmp/iso/$1.tmp /tmp/iso/$1
}
"#;

/// Probes every target from the guest at once (a dropped SYN costs the
/// whole timeout, so one after another would take minutes under TCG) and
/// returns what each got back: the listener's token, or "none".
async fn probe_all(g: &GuestClient, targets: &[(&str, SocketAddr)]) -> BTreeMap<String, String> {
    // Each probe writes its answer to a file; the script polls for them
    // rather than `wait`ing for its jobs: a guest exec starts with SIGCHLD
    // blocked (PID 1's mask leaks through the agent), and busybox `wait`
    // then never returns.
    let n = targets.len();
    let mut script = String::from(PROBE_FN);
    for (i, (_, t)) in targets.iter().enumerate() {
        script.push_str(&format!(
            "probe {i} {} </dev/null >/dev/null 2>&1 &\n",
            host_port(*t)
        ));
    }
    script.push_str(&format!(
        "i=0\n\
         while [ $(ls /tmp/iso | grep -vc tmp) -lt {n} ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done\n\
         cat /tmp/iso/*\n"
    ));
    let t0 = Instant::now();
    let (out, code) = sh(g, &script).await;
    eprintln!(
        "  ({n} probes from the guest in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(code, Some(0), "{out}");
    let mut got = BTreeMap::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("PROBE ")
            && let Some((i, answer)) = rest.split_once(' ')
            && let Some((name, _)) = i.parse::<usize>().ok().and_then(|i| targets.get(i))
        {
            got.insert(name.to_string(), answer.to_string());
        }
    }
    assert_eq!(got.len(), targets.len(), "missing probe lines:\n{out}");
    got
}

/// `udp TAG`: UDP datagrams carrying TAG to the allowed internet address,
/// then `SENT TAG <frames that left eth0 meanwhile>`. The guest's busybox
/// `nc` has no UDP; its `tftp` sends a read request naming the file (the
/// tag) and retries it until killed. Killed with SIGKILL (SIGTERM is
/// blocked in guest execs, see [`probe_all`]) and before a spoofed address
/// goes: a retry from the real address would arrive carrying the spoof's
/// tag.
const UDP_FN: &str = r#"udp() {
  b=$(cat /sys/class/net/eth0/statistics/tx_packets)
  tftp -g -r "$1" -l - 198.51.100.1 9999 >/dev/null 2>&1 & p=$!
  sleep 3; kill -9 $p; sleep 1
  grep -q '^State:.*[ZX]' /proc/$p/status 2>/dev/null || [ ! -e /proc/$p ] || { echo "tftp $p still runs"; exit 1; }
  echo "SENT $1 $(( $(cat /sys/class/net/eth0/statistics/tx_packets) - b ))"
}"#;

/// Runs `script` (which calls `udp`) in the guest and returns, per tag,
/// how many frames left the guest's NIC while it was sent.
async fn run_udp(g: &GuestClient, script: &str) -> (BTreeMap<String, u64>, String) {
    let (out, code) = sh(g, &format!("set -e\n{UDP_FN}\n{script}")).await;
    assert_eq!(code, Some(0), "{out}");
    let sent = out
        .lines()
        .filter_map(|l| l.strip_prefix("SENT "))
        .filter_map(|l| l.split_once(' '))
        .map(|(tag, n)| (tag.to_string(), n.trim().parse().unwrap()))
        .collect();
    (sent, out)
}

/// Sends UDP per `(tag, source)` to the allowed internet address, each
/// from the given guest source address (added to eth0 and chosen by a host
/// route: a spoof as a tenant would script it) or from the guest's own.
async fn send_udp(
    g: &GuestClient,
    sends: &[(&str, Option<Ipv4Addr>)],
) -> (BTreeMap<String, u64>, String) {
    let dst = UPLINK_ADDR;
    let mut script = String::new();
    for (tag, src) in sends {
        match src {
            Some(s) => script.push_str(&format!(
                "ip addr add {s}/32 dev eth0\n\
                 ip route replace {dst}/32 via {GUEST_GATEWAY} dev eth0 src {s}\n\
                 udp {tag}\n\
                 ip route del {dst}/32\n\
                 ip addr del {s}/32 dev eth0\n"
            )),
            None => script.push_str(&format!("udp {tag}\n")),
        }
    }
    run_udp(g, &script).await
}

/// Sets the guest NIC's MAC (down and up again where the driver wants it;
/// that drops the default route, which goes back).
fn set_mac(mac: &str) -> String {
    format!(
        "ip link set dev eth0 address {mac} 2>/dev/null || \
         {{ ip link set eth0 down; ip link set dev eth0 address {mac}; ip link set eth0 up; \
            ip route replace default via {GUEST_GATEWAY}; }}\n\
         grep -qx {mac} /sys/class/net/eth0/address\n"
    )
}

fn wait_for_hits(hits: &Hits, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
    let t0 = Instant::now();
    loop {
        let h = hits.lock().unwrap().clone();
        if pred(&h) || t0.elapsed() > Duration::from_secs(5) {
            return h;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn take(hits: &Hits) -> Vec<Hit> {
    std::mem::take(&mut *hits.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_isolation_row_fails_from_inside_a_guest_and_allowed_egress_works() {
    let c = case(Tier::Vm, NAME);
    let t0 = Instant::now();
    let tools = ["nsenter", "ip"];
    let (w, turn) = match vm_bed(NAME, &tools, production_net, "wrenn-iso").await {
        Ok(b) => b,
        Err(reason) => return c.skip(reason),
    };
    let bed = &w.net;

    // The surroundings, before the leak baseline: they stay for the test.
    let infra = bed.dir.path().join("infra");
    let pod_ns = infra.join("pod");
    sys::run_in_new_netns(&pod_ns, Path::new("/proc"), |_| Ok::<_, std::io::Error>(()))
        .unwrap()
        .unwrap();
    let table = dnat_table(&unique_name("isodnat").replace('-', "_"));
    build_surroundings(bed, &pod_ns, &table);

    let hits: Hits = Arc::default();
    let any4 = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let any6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let mut listeners = vec![
        // The internet, metadata and the API server live behind the uplink
        // (dual-stack sockets: IPv4 and IPv6 addresses alike).
        Listener::tcp(&bed.uplink, "uplink", any6(WEB), &hits),
        Listener::tcp(&bed.uplink, "metadata", any6(META), &hits),
        Listener::tcp(&bed.uplink, "api-server", any6(API), &hits),
        Listener::udp(&bed.uplink, "udp", any4(UDP), &hits),
        // The node: the agent's ports and another host service.
        Listener::tcp(&bed.node, "grpc", any6(GRPC), &hits),
        Listener::tcp(&bed.node, "admin", any6(ADMIN), &hits),
        Listener::tcp(&bed.node, "host-service", any6(HOST_SVC), &hits),
    ];

    // The other capsule: a second attachment by the same network module,
    // an emulated guest where its VM would be, with a server in it and one
    // in its capsule namespace. Made after the supervisor's recovery, whose
    // sweep would take a network its own instance holds no claim for; the
    // two instances share the claim directory, so their slots differ.
    let mut other_cfg = bed.cfg.clone();
    other_cfg.guest_link = GuestLink::EmulatedGuest {
        netns_dir: bed.dir.path().join("guests"),
    };
    let other_net = LinuxNet::new(other_cfg).unwrap();
    let baseline = bed.snapshot();
    let other = CapsuleId::new(OTHER_UID).unwrap();
    let other_addrs = other_net.setup(&other, &EgressPolicy::Allow).unwrap().addrs;
    let other_guest_ns = other_net.emulated_guest_netns(&other).unwrap();
    listeners.push(Listener::tcp(
        &other_guest_ns,
        "other-guest",
        any4(WEB),
        &hits,
    ));
    listeners.push(Listener::tcp(
        &other_net.netns_path(&other),
        "other-capsule-ns",
        any4(GRPC),
        &hits,
    ));

    // The guest: Deny, but for the internet address.
    let boot = Instant::now();
    let v = w
        .sup
        .create(
            GUEST_UID,
            w.spec(
                "tenant",
                GUEST_UID,
                Egress::AllowList(vec![format!("{UPLINK_ADDR}/32").parse().unwrap()]),
            ),
            State::Running,
        )
        .await
        .unwrap();
    assert_eq!(v.state, State::Running);
    let boot = boot.elapsed();
    let gid = CapsuleId::new(GUEST_UID).unwrap();
    let own_ns = bed.cfg.netns_dir.join(gid.resource_name());
    // A fresh instance reads the claims the supervisor's wrote.
    let own: SlotAddrs = {
        let n = bed.net();
        bed.cfg
            .plan
            .slot_addrs(n.slots().get(&gid).unwrap())
            .unwrap()
    };
    // Something in the guest's own capsule namespace (where the VMM runs).
    listeners.push(Listener::tcp(&own_ns, "own-capsule-ns", any4(GRPC), &hits));

    let v4 = |ip: Ipv4Addr, port| SocketAddr::from((ip, port));
    let v6 = |ip: Ipv6Addr, port| SocketAddr::from((ip, port));
    let node = || bed.node.clone();
    let row = |name, target, control: PathBuf| Row {
        name,
        target,
        control,
    };
    let rows = vec![
        row(
            "other capsule: its address",
            v4(other_addrs.host, WEB),
            node(),
        ),
        row(
            "other capsule: its namespace",
            v4(other_addrs.capsule_transit, GRPC),
            node(),
        ),
        row(
            "own capsule namespace (gateway)",
            v4(GUEST_GATEWAY, GRPC),
            own_ns.clone(),
        ),
        row(
            "node agent gRPC: node address",
            v4(NODE_UPLINK_ADDR, GRPC),
            bed.uplink.clone(),
        ),
        row(
            "node agent gRPC: capsule veth",
            v4(own.node_transit, GRPC),
            node(),
        ),
        row(
            "node agent gRPC: other capsule veth",
            v4(other_addrs.node_transit, GRPC),
            node(),
        ),
        row(
            "node agent admin",
            v4(NODE_UPLINK_ADDR, ADMIN),
            bed.uplink.clone(),
        ),
        row(
            "host-namespace service",
            v4(NODE_UPLINK_ADDR, HOST_SVC),
            bed.uplink.clone(),
        ),
        row(
            "host service: pod gateway",
            v4(POD_GATEWAY, HOST_SVC),
            pod_ns.clone(),
        ),
        row("metadata 169.254.169.254", v4(METADATA, META), node()),
        row("metadata 168.63.129.16", v4(AZURE_METADATA, META), node()),
        row("API server", v4(API_SERVER, API), node()),
        row(
            "API server ClusterIP (DNAT)",
            v4(API_CLUSTER_IP, API),
            pod_ns.clone(),
        ),
        row(
            "ClusterIP (DNAT to a pod)",
            v4(CLUSTER_IP, WEB),
            pod_ns.clone(),
        ),
        row(
            "NodePort (DNAT to a pod)",
            v4(NODE_PORT, WEB),
            pod_ns.clone(),
        ),
        row(
            "NodePort (DNAT to the node)",
            v4(NODE_PORT_LOCAL, HOST_SVC),
            pod_ns.clone(),
        ),
        row("IPv6 internet", v6(UPLINK6, WEB), node()),
        row("IPv6 metadata fd00:ec2::254", v6(METADATA6, META), node()),
        row("IPv6 node address", v6(NODE6, HOST_SVC), bed.uplink.clone()),
    ];
    let internet = v4(UPLINK_ADDR, WEB);
    let unlisted = v4(OTHER_REMOTE, WEB);

    // Every listener answers at the row's address from its control
    // namespace, so a refusal below is the policy's.
    for r in &rows {
        let got =
            reach(&r.control, r.target).unwrap_or_else(|e| panic!("{}: control: {e}", r.name));
        assert!(got.starts_with("tok "), "{}: control got {got:?}", r.name);
    }
    reach(&bed.node, unlisted).unwrap();
    take(&hits);

    let g = w.guest(GUEST_UID, Duration::from_secs(180)).await;
    let (out, code) = sh(
        &g,
        "ip -4 addr show eth0 | grep -q 'inet 169.254.0.21/30' && grep ^SigBlk /proc/$$/status",
    )
    .await;
    eprintln!("guest exec signal mask: {out}");
    assert_eq!(code, Some(0), "the guest lacks its address: {out}");

    let mut results: Vec<(String, &'static str, bool)> = Vec::new();
    for (phase, egress) in [
        ("deny + allow list", None),
        ("allow (switched live)", Some(Egress::Allow)),
    ] {
        let unlisted_allowed = egress.is_some();
        if let Some(e) = egress {
            w.sup.update_network(GUEST_UID, e).await.unwrap();
        }
        // A link bounce (the MAC step) takes IPv6 addresses along.
        let (out, code) = sh(&g, GUEST_V6).await;
        assert_eq!(code, Some(0), "[{phase}] guest IPv6 setup: {out}");
        let mut targets: Vec<(&str, SocketAddr)> =
            rows.iter().map(|r| (r.name, r.target)).collect();
        if !unlisted_allowed {
            targets.push(("internet not on the allow list", unlisted));
        }
        take(&hits);
        let got = probe_all(&g, &targets).await;
        // Late SYNs of a probe that got through would show up here.
        std::thread::sleep(Duration::from_millis(500));
        let seen = take(&hits);
        for (name, target) in &targets {
            let answer = &got[*name];
            let reached = answer != "none" || seen.iter().any(|h| h.local == *target);
            eprintln!(
                "[{phase}] {name} ({target}): {}",
                if reached { "REACHED" } else { "blocked" }
            );
            results.push((format!("[{phase}] {name}"), "must fail", !reached));
        }
        if !seen.is_empty() {
            eprintln!("[{phase}] listeners reached by the guest: {seen:#?}");
        }
        results.push((
            format!("[{phase}] no listener saw the guest"),
            "must hold",
            seen.is_empty(),
        ));

        // Allowed egress works, through the node's masquerade.
        let mut allowed = vec![("internet (allowed)", internet)];
        if unlisted_allowed {
            allowed.push(("internet not on the old allow list", unlisted));
        }
        let got = probe_all(&g, &allowed).await;
        let seen = wait_for_hits(&hits, |h| {
            allowed.iter().all(|(_, t)| h.iter().any(|h| h.local == *t))
        });
        for (name, target) in &allowed {
            let ok = got[*name] == format!("tok {target}")
                && seen
                    .iter()
                    .any(|h| h.local == *target && h.peer.ip() == IpAddr::V4(NODE_UPLINK_ADDR));
            eprintln!(
                "[{phase}] {name} ({target}): {} (guest got {:?})",
                if ok { "reached" } else { "NOT REACHED" },
                got[*name]
            );
            if !ok {
                eprintln!("  listeners saw: {seen:?}");
            }
            results.push((format!("[{phase}] {name}"), "must work", ok));
        }
        take(&hits);

        // Spoofing: the packets leave the guest's NIC, none arrives. A
        // datagram from the real source before and after proves the path.
        let (sent, out) = send_udp(
            &g,
            &[
                ("real-before", None),
                ("spoof-linklocal", Some(Ipv4Addr::new(169, 254, 0, 25))),
                ("spoof-other-capsule", Some(other_addrs.host)),
                ("spoof-node", Some(NODE_UPLINK_ADDR)),
                ("spoof-internet-peer", Some(Ipv4Addr::new(198, 51, 100, 77))),
                ("real-after", None),
            ],
        )
        .await;
        let seen = wait_for_hits(&hits, |h| {
            h.iter().any(|h| h.payload.contains("real-after"))
        });
        // Each send put frames on the wire: a spoof that never left the
        // guest would pass for nothing.
        assert!(
            sent.len() == 6 && sent.values().all(|n| *n > 0),
            "[{phase}] frames sent per tag {sent:?}:\n{out}"
        );
        let arrived = |tag: &str| seen.iter().any(|h| h.payload.contains(tag));
        for tag in ["real-before", "real-after"] {
            results.push((
                format!("[{phase}] udp from the guest's address ({tag})"),
                "must work",
                arrived(tag),
            ));
        }
        for tag in [
            "spoof-linklocal",
            "spoof-other-capsule",
            "spoof-node",
            "spoof-internet-peer",
        ] {
            eprintln!(
                "[{phase}] {tag}: {}",
                if arrived(tag) { "ARRIVED" } else { "dropped" }
            );
            results.push((
                format!("[{phase}] source address {tag}"),
                "must fail",
                !arrived(tag),
            ));
        }
        take(&hits);

        // A spoofed MAC with the real address; then the real MAC again.
        let guest_mac: Vec<String> = GUEST_MAC.iter().map(|b| format!("{b:02x}")).collect();
        let guest_mac = guest_mac.join(":");
        let (sent, out) = run_udp(
            &g,
            &format!(
                "{}udp spoof-mac\n{}udp mac-restored\n",
                set_mac("02:fc:00:00:00:99"),
                set_mac(&guest_mac)
            ),
        )
        .await;
        assert!(
            sent.len() == 2 && sent.values().all(|n| *n > 0),
            "[{phase}] frames sent per tag {sent:?}:\n{out}"
        );
        let seen = wait_for_hits(&hits, |h| {
            h.iter().any(|h| h.payload.contains("mac-restored"))
        });
        let arrived = |tag: &str| seen.iter().any(|h| h.payload.contains(tag));
        eprintln!(
            "[{phase}] spoofed MAC: {}",
            if arrived("spoof-mac") {
                "ARRIVED"
            } else {
                "dropped"
            }
        );
        results.push((
            format!("[{phase}] spoofed MAC"),
            "must fail",
            !arrived("spoof-mac"),
        ));
        results.push((
            format!("[{phase}] udp after the MAC is restored"),
            "must work",
            arrived("mac-restored"),
        ));
        take(&hits);
    }

    // The guest agent from inside the guest: an unprivileged process that
    // dials the agent's vsock port (loopback CID or the guest's own) is
    // never served, and the node agent's connection keeps working.
    let own_cid = guest_cid(w.state.path());
    for target in ["vsock:1:1024".to_string(), format!("vsock:{own_cid}:1024")] {
        let probe = format!("{} --probe {target}", wrenn_node_agent::images::GUEST_PATH);
        let (out, code) = sh_as(&g, "nobody", &probe, 150_000).await;
        // Only the probe's own verdicts count: a probe that did not run
        // must not pass for a refusal.
        let refused = code == Some(1) && (out == "closed" || out.starts_with("unreachable:"));
        eprintln!("guest agent dialed as nobody at {target}: {out} (exit {code:?})");
        results.push((
            format!("guest agent dialed from inside as nobody ({target})"),
            "must fail",
            refused,
        ));
    }
    let (out, code) = sh(&g, "echo still-served").await;
    results.push((
        "node agent's exec after the in-guest dials".into(),
        "must work",
        code == Some(0) && out == "still-served",
    ));
    drop(g);

    assert!(w.sup.delete(GUEST_UID).await.unwrap());
    drop(listeners);
    other_net.teardown(&other, Teardown::ReleaseSlot).unwrap();
    assert_eq!(bed.snapshot(), baseline, "network leftovers");
    let procs = processes_mentioning(&w.state.path().display().to_string());
    assert!(procs.is_empty(), "VMM processes left: {procs:?}");
    // The test's own table goes last (the namespace would take it anyway).
    sys::run_in_netns(&bed.node, |nl| nl.delete_table(2, &table.name))
        .unwrap()
        .unwrap();

    eprintln!(
        "isolation matrix under QEMU TCG: guest boot {:.1} s, whole test {:.1} s (load {})",
        boot.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let failed: Vec<_> = results.iter().filter(|(_, _, ok)| !ok).collect();
    for (name, want, ok) in &results {
        eprintln!("  {:4} {want:9} {name}", if *ok { "ok" } else { "FAIL" });
    }
    assert!(failed.is_empty(), "rows that did not hold: {failed:#?}");
    drop(turn);
}
