//! Test bed for the network module, shared by the network tests, the vm
//! tier's beds and `benches/network.rs`: a "node" namespace and an "uplink" namespace joined
//! by a veth, made fresh per test in a temp dir, so nothing touches the
//! machine's own links, routes or firewall. Dropping the bed removes every
//! namespace it or the code under test made (all links die with them).
#![allow(dead_code)]

pub mod dns;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use wrenn_node_agent::network::{
    AddressPlan, CapsuleId, CapsuleLimits, Cidr, GuestLink, LinuxNet, LinuxNetConfig, PREFIX,
    is_retired_name,
};
use wrenn_node_agent::sys::net as sys;

/// The node's address on the test uplink.
pub const NODE_UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The uplink namespace's address: the "internet" the capsules reach.
pub const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A second address in the uplink namespace, not on any allow list.
pub const OTHER_REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A metadata-service address, also in the uplink namespace.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Azure's wireserver address, also in the uplink namespace.
pub const AZURE_METADATA: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The uplink's name in the node namespace.
pub const UPLINK: &str = "up0";

/// Namespaces, temp dirs and the network code pointed at them.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub node: PathBuf,
    pub uplink: PathBuf,
    pub cfg: LinuxNetConfig,
}

fn infra(dir: &Path) -> PathBuf {
    dir.join("infra")
}

impl Bed {
    /// Builds node and uplink namespaces; `tap` picks a real TAP (no
    /// traffic possible) over the emulated guest.
    pub fn new(tap: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = infra(dir.path()).join("node");
        let uplink = infra(dir.path()).join("uplink");
        let cfg = LinuxNetConfig {
            node_netns: node.clone(),
            netns_dir: dir.path().join("netns"),
            state_dir: dir.path().join("state"),
            proc_dir: PathBuf::from("/proc"),
            tun_path: PathBuf::from("/dev/net/tun"),
            uplink: UPLINK.to_string(),
            plan: AddressPlan::default(),
            blocked_egress: vec!["10.0.0.0/8".parse().expect("cidr")],
            limits: CapsuleLimits::default(),
            cluster_dns: Default::default(),
            host_ports: "29000-29009".parse().expect("range"),
            pool: 0,
            guest_link: if tap {
                GuestLink::Tap
            } else {
                GuestLink::EmulatedGuest {
                    netns_dir: dir.path().join("guests"),
                }
            },
        };
        let bed = Bed {
            dir,
            node,
            uplink,
            cfg,
        };
        sys::run_in_new_netns(&bed.uplink, Path::new("/proc"), |nl| {
            nl.set_up("lo", None, None)?;
            for a in [OTHER_REMOTE, METADATA, AZURE_METADATA] {
                nl.add_addr("lo", a, 32)?;
            }
            Ok::<_, io::Error>(())
        })
        .and_then(|r| r)
        .expect("uplink namespace");
        let uplink_ns = bed.uplink.clone();
        sys::run_in_new_netns(&bed.node, Path::new("/proc"), move |nl| {
            nl.set_up("lo", None, None)?;
            nl.add_veth(UPLINK, "peer0")?;
            nl.move_link("peer0", &std::fs::File::open(&uplink_ns)?)?;
            nl.add_addr(UPLINK, NODE_UPLINK_ADDR, 24)?;
            nl.set_up(UPLINK, None, None)?;
            nl.add_route(
                Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("cidr"),
                Some(UPLINK_ADDR),
                UPLINK,
            )
        })
        .and_then(|r| r)
        .expect("node namespace");
        in_ns(&bed.uplink, |nl| {
            nl.add_addr("peer0", UPLINK_ADDR, 24)?;
            nl.set_up("peer0", None, None)
        })
        .expect("uplink link");
        bed
    }

    /// The network code for this bed (a new instance = a restarted agent).
    pub fn net(&self) -> LinuxNet {
        LinuxNet::new(self.cfg.clone()).expect("LinuxNet")
    }

    /// Where capsule `c`'s emulated guest lives.
    pub fn guest(&self, c: &CapsuleId) -> PathBuf {
        match &self.cfg.guest_link {
            GuestLink::EmulatedGuest { netns_dir } => netns_dir.join(c.resource_name()),
            GuestLink::Tap => panic!("no emulated guest with a real TAP"),
        }
    }

    /// What could leak, as seen now, once the work teardowns leave
    /// behind is done (see `network::reaper`): retired links deleted,
    /// draining slots flushed and freed. It must end by itself within a
    /// few seconds; what is still there after that shows as a leak.
    pub fn snapshot(&self) -> Leaks {
        let plan = self.cfg.plan.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let slots = self.cfg.state_dir.join("slots");
        let draining = || {
            std::fs::read_dir(&slots).is_ok_and(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".drain"))
            })
        };
        while draining() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (links, tables, rules, conntrack) = in_ns(&self.node, |nl| {
            let mut links: Vec<String> = nl.links()?.into_iter().map(|l| l.1).collect();
            while links.iter().any(|l| is_retired_name(l)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                links = nl.links()?.into_iter().map(|l| l.1).collect();
            }
            links.sort();
            let mut tables = nl.list_tables()?;
            tables.sort();
            let rules = nl.count_rules()?;
            let conntrack = nl
                .conntrack_list()?
                .iter()
                .filter(|e| {
                    e.addrs().iter().any(|a| match a {
                        std::net::IpAddr::V4(v4) => plan.slot_of(*v4).is_some(),
                        std::net::IpAddr::V6(_) => false,
                    })
                })
                .count();
            Ok((links, tables, rules, conntrack))
        })
        .expect("node snapshot");
        let list = |d: &Path| sys::list_netns(d, "").expect("list netns");
        Leaks {
            namespaces: list(&self.cfg.netns_dir),
            guests: list(&self.dir.path().join("guests")),
            node_links: links,
            node_tables: tables,
            node_rules: rules,
            slot_conntrack: conntrack,
            claims: list(&self.cfg.state_dir.join("slots")),
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Capsule and guest namespaces first, then node and uplink: every
        // link the test made lives in one of them and dies with it.
        for d in [
            self.cfg.netns_dir.clone(),
            self.dir.path().join("guests"),
            infra(self.dir.path()),
        ] {
            for name in sys::list_netns(&d, "").unwrap_or_default() {
                if let Err(e) = sys::remove_netns(&d.join(&name)) {
                    eprintln!("cleanup: remove {}: {e}", d.join(name).display());
                }
            }
        }
    }
}

/// Everything that could leak.
#[derive(Debug, PartialEq, Eq)]
pub struct Leaks {
    pub namespaces: Vec<String>,
    pub guests: Vec<String>,
    pub node_links: Vec<String>,
    pub node_tables: Vec<(u8, String)>,
    pub node_rules: usize,
    pub slot_conntrack: usize,
    pub claims: Vec<String>,
}

/// Runs `f` in namespace `ns`.
pub fn in_ns<T: Send>(
    ns: &Path,
    f: impl FnOnce(&sys::Netlink) -> io::Result<T> + Send,
) -> io::Result<T> {
    sys::run_in_netns(ns, f)?
}

/// A TCP listener bound inside `ns`.
pub fn listen(ns: &Path, addr: Ipv4Addr) -> TcpListener {
    in_ns(ns, |_| {
        let l = TcpListener::bind((addr, 0))?;
        Ok(l)
    })
    .expect("listen")
}

/// A TCP connection opened from inside `ns`; generous, for paths that
/// must work even on a loaded machine.
pub fn connect(ns: &Path, to: SocketAddr) -> io::Result<TcpStream> {
    in_ns(ns, |_| {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })
}

/// Connects from `ns` with source address `src` to `to`, giving up after a
/// second (an unanswered SYN), so a refused source fails fast either way.
pub fn connect_from(ns: &Path, src: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    in_ns(ns, move |_| {
        // The socket is made on this thread, so it lives in `ns`.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from((src, 0)))?;
            let s = tokio::time::timeout(Duration::from_secs(1), sock.connect(to))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok(s)
        })
    })
}

/// Whether a connection from `ns` to `to` fails, with a shorter wait: a
/// dropped SYN is never answered, so this waits the whole second.
pub fn blocked(ns: &Path, to: SocketAddr) -> bool {
    in_ns(ns, |_| {
        TcpStream::connect_timeout(&to, Duration::from_secs(1))
    })
    .is_err()
}

/// Whether a connection from `ns` to `to` is refused (a TCP reset), as
/// the egress policy answers what it does not allow: within 2 s (slack
/// for a loaded machine), where a dropped SYN would wait out the 3 s.
pub fn refused(ns: &Path, to: SocketAddr) -> bool {
    let started = std::time::Instant::now();
    let got = in_ns(ns, |_| {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    });
    matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
        && started.elapsed() < Duration::from_secs(2)
}

/// Connects from `ns` to `to` and returns the source address `listener`
/// saw; the listener must be the one bound at `to`.
pub fn source_seen(ns: &Path, listener: &TcpListener, to: SocketAddr) -> io::Result<Ipv4Addr> {
    let _c = connect(ns, to)?;
    let (_s, peer) = listener.accept()?;
    match peer {
        SocketAddr::V4(v4) => Ok(*v4.ip()),
        SocketAddr::V6(_) => Err(io::Error::other("v6 peer")),
    }
}

/// Resource name prefix, for tests that plant leftovers.
pub fn ours(name: &str) -> String {
    format!("{PREFIX}-{name}")
}
