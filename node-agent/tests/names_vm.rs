//! Names from inside a real guest (Tier::Vm): the supervisor boots this
//! tree's guest image under QEMU with the real `LinuxNet` in a test-made
//! node namespace, and the guest's own busybox `nslookup` and `wget`
//! resolve and fetch by name from a test-made "internet" namespace (two
//! test DNS servers and an HTTP server on several addresses).
//!
//! What it shows, in order, on one capsule without a restart:
//! - the resolver file the agent writes at Init is the guest's: the image
//!   has none, the guest's lookups go to the node's proxy it names, and
//!   its namespace search path completes a short name;
//! - a live DNS change (own nameservers, searches, options) rewrites the
//!   file and the next lookup gets the other server's answer;
//! - under `egress: Deny` + `allowHosts`, the allowed name resolves and
//!   fetches (through glibc's resolver and through musl's, which walks the
//!   namespace search path differently), another name fails at once
//!   without reaching upstream, and a raw IP (the other name's address, or
//!   one no name has) gets nothing;
//! - a host added to `allowHosts` live works on the next connection;
//! - a search domain added while paused is in the file after resume;
//! - after a suspend and restore (with a names change recorded while
//!   suspended, and the file spoiled inside the guest before), the file
//!   is right again and names still fetch.
//!
//! Everything lives in namespaces under the test's temp dir; nothing
//! touches the machine's own links, routes or firewall.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod guest_exec;
mod network_env;
mod qemu_bed;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use network_env::dns::{Asked, dns_server};
use network_env::{Bed as NetBed, OTHER_REMOTE, UPLINK_ADDR, in_ns};
use qemu_bed::{QemuBed, VmTools, need_vm_tools, sh_as};
use wrenn_node_agent::capsule::{Egress, State};
use wrenn_node_agent::guest::GuestClient;
use wrenn_node_agent::network::Names;
use wrenn_node_agent::network::dns::{AllowHosts, ClusterDns, DnsConfig};
use wrenn_testkit::{Tier, case};

const NAME: &str =
    "names_vm::a_guest_resolves_and_fetches_by_name_and_allow_hosts_holds_live_and_after_restore";

const UID: &str = "names";
const NAMESPACE: &str = "tenant";

/// The node's cluster DNS: the uplink's own address.
const CLUSTER_DNS: Ipv4Addr = UPLINK_ADDR;
/// A second DNS server, named by `spec.network.dns.nameservers`.
const OWN_DNS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// Where `allowed.example.org` points (per the cluster DNS).
const ALLOWED_AT: Ipv4Addr = OTHER_REMOTE;
/// Where `other.example.org` points; also `allowed.example.org` per
/// [`OWN_DNS`].
const OTHER_AT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Where `later.example.net` points.
const LATER_AT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);
/// An internet address no name points to.
const RAW_AT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

static CLUSTER_RECORDS: [(&str, Ipv4Addr); 4] = [
    ("allowed.example.org", ALLOWED_AT),
    ("other.example.org", OTHER_AT),
    ("later.example.net", LATER_AT),
    // Found only through the capsule namespace's search path.
    ("web.tenant.svc.cluster.local", ALLOWED_AT),
];
static OWN_RECORDS: [(&str, Ipv4Addr); 2] = [
    ("allowed.example.org", OTHER_AT),
    ("web.example.com", LATER_AT),
];

/// The resolver file under the defaults (cluster DNS, the namespace's
/// search path), as docs/networking.md shows it.
const DEFAULT_RESOLV: &str = "# Written by wrenn: the node's DNS proxy for this capsule.\n\
nameserver 169.254.0.22\n\
search tenant.svc.cluster.local svc.cluster.local cluster.local\n\
options ndots:5\n";

// ---- the internet's web server ----

/// An HTTP server on port 80 of every address in the internet namespace:
/// answers `hello <address it was reached at>` and records that address.
struct Web {
    hits: Arc<Mutex<Vec<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Web {
    fn start(ns: &Path) -> Web {
        let l = in_ns(ns, |_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80))).unwrap();
        l.set_nonblocking(true).unwrap();
        let (hits, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(SocketAddr::V4(local)) = c.local_addr() else {
                    continue;
                };
                h.lock().unwrap().push(*local.ip());
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                // The request's head, then the answer; HTTP/1.0, closed.
                let mut head = Vec::new();
                let mut b = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let body = format!("hello {}\n", local.ip());
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Web {
            hits,
            stop,
            thread: Some(thread),
        }
    }

    /// The addresses reached since the last call.
    fn take(&self) -> Vec<Ipv4Addr> {
        std::mem::take(&mut *self.hits.lock().unwrap())
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- the guest ----

fn hosts(h: &[&str]) -> AllowHosts {
    AllowHosts::parse(&h.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

/// Runs `script` in the guest; its output, exit code and how long it took.
async fn sh(g: &GuestClient, script: &str) -> (String, Option<i32>, Duration) {
    let t = Instant::now();
    let (out, code) = sh_as(g, "", script, 60_000).await;
    (out, code, t.elapsed())
}

/// The guest's resolver file.
async fn resolv_conf(g: &GuestClient) -> String {
    let (out, code, _) = sh(g, "cat /etc/resolv.conf").await;
    assert_eq!(code, Some(0), "{out}");
    format!("{out}\n")
}

/// The guest's boot id: the same before and after a change means the
/// guest was not restarted (a restore keeps it too).
async fn boot_id(g: &GuestClient) -> String {
    let (out, code, _) = sh(g, "cat /proc/sys/kernel/random/boot_id").await;
    assert_eq!(code, Some(0), "{out}");
    out
}

/// `nslookup NAME [SERVER]` in the guest: the addresses it printed after
/// the name (empty when the lookup failed) and its whole output.
async fn nslookup(g: &GuestClient, args: &str) -> (Vec<Ipv4Addr>, String) {
    let (out, code, _) = sh(g, &format!("timeout -s KILL 20 nslookup {args}")).await;
    let mut ips = Vec::new();
    let mut answers = false;
    for line in out.lines() {
        if line.starts_with("Name:") {
            answers = true;
        }
        if answers
            && let Some(rest) = line.strip_prefix("Address:")
            && let Ok(ip) = rest.trim().parse::<Ipv4Addr>()
        {
            ips.push(ip);
        }
    }
    if code != Some(0) {
        ips.clear();
    }
    (ips, out)
}

/// `wget` of `http://HOST/` from the guest, killed after `secs` (a
/// dropped SYN is never answered; the image's busybox 1.35 `wget -T`
/// crashes, and SIGTERM is blocked in guest execs): the body on success,
/// else the error, and how long it took.
async fn fetch(g: &GuestClient, host: &str, secs: u32) -> (Result<String, String>, Duration) {
    let (out, code, took) = sh(
        g,
        &format!("timeout -s KILL {secs} wget -q -O - http://{host}/ 2>&1"),
    )
    .await;
    let res = if code == Some(0) {
        Ok(out)
    } else {
        Err(format!("{out} (exit {code:?})"))
    };
    (res, took)
}

/// A name lookup through musl's resolver (Alpine's libc; the image's
/// busybox uses glibc's): `getaddrinfo` for IPv4, one address a line, or
/// `error <gai_strerror>`. Built static with `musl-gcc` and copied into
/// the guest, because musl walks a search list differently: it stops at
/// the first answer that is neither addresses nor NXDOMAIN.
const MUSL_RESOLVE_C: &str = r#"#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
  struct addrinfo hints, *res, *p;
  char buf[INET_ADDRSTRLEN];
  int e;
  if (argc != 2) return 2;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  e = getaddrinfo(argv[1], "80", &hints, &res);
  if (e) { printf("error %s\n", gai_strerror(e)); return 1; }
  for (p = res; p; p = p->ai_next)
    printf("%s\n", inet_ntop(AF_INET, &((struct sockaddr_in *)p->ai_addr)->sin_addr, buf, sizeof buf));
  return 0;
}
"#;

/// Where [`MUSL_RESOLVE_C`]'s binary goes in the guest.
const MUSL_RESOLVE: &str = "/tmp/musl-resolve";

/// Builds [`MUSL_RESOLVE_C`] statically with musl and copies it into the
/// guest.
async fn install_musl_resolve(g: &GuestClient, dir: &Path) {
    let (src, bin) = (dir.join("resolve.c"), dir.join("musl-resolve"));
    std::fs::write(&src, MUSL_RESOLVE_C).unwrap();
    let out = std::process::Command::new("musl-gcc")
        .args(["-static", "-Os", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "musl-gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    g.put_file(MUSL_RESOLVE, 0o755, std::fs::read(&bin).unwrap())
        .await
        .unwrap();
}

/// [`MUSL_RESOLVE`] of `name` in the guest: the addresses, or the error.
async fn musl_resolve(g: &GuestClient, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let (out, code, _) = sh(g, &format!("timeout -s KILL 20 {MUSL_RESOLVE} {name}")).await;
    if code != Some(0) {
        return Err(format!("{out} (exit {code:?})"));
    }
    out.lines()
        .map(|l| l.trim().parse().map_err(|_| out.clone()))
        .collect()
}

fn hello(at: Ipv4Addr) -> Result<String, String> {
    Ok(format!("hello {at}"))
}

fn names_asked(asked: &Asked, prefix: &str) -> Vec<String> {
    asked
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_resolves_and_fetches_by_name_and_allow_hosts_holds_live_and_after_restore() {
    let c = case(Tier::Vm, NAME);
    let VmTools {
        qemu,
        helper,
        image,
    } = match need_vm_tools(&["musl-gcc"]) {
        Ok(t) => t,
        Err(reason) => return c.skip(reason),
    };
    let t0 = Instant::now();
    let turn = wrenn_testkit::vm::turn(NAME).unwrap();
    let mut net = NetBed::new(true);
    net.cfg.cluster_dns = ClusterDns {
        server: Some(CLUSTER_DNS),
        domain: "cluster.local".into(),
    };
    // The production list of destinations no capsule reaches.
    net.cfg.blocked_egress =
        wrenn_node_agent::network::LinuxNetConfig::host("up0", net.dir.path()).blocked_egress;
    in_ns(&net.uplink, |nl| {
        for a in [OWN_DNS, OTHER_AT, LATER_AT, RAW_AT] {
            nl.add_addr("lo", a, 32)?;
        }
        Ok(())
    })
    .unwrap();
    let cluster_asked = dns_server(&net.uplink, CLUSTER_DNS, &CLUSTER_RECORDS);
    let own_asked = dns_server(&net.uplink, OWN_DNS, &OWN_RECORDS);
    let web = Web::start(&net.uplink);
    let w = QemuBed::new(&qemu, &helper, image, turn.ready, net, "wrenn-names").await;

    let boot = Instant::now();
    let v = w
        .sup
        .create(UID, w.spec(NAMESPACE, UID, Egress::Allow), State::Running)
        .await
        .unwrap();
    assert_eq!(v.state, State::Running);
    let boot = boot.elapsed();
    let g = w.guest(UID, Duration::from_secs(60)).await;
    let booted = boot_id(&g).await;

    // 1. The file written at Init is what the guest resolves with: the
    // image has none of its own, the guest's lookups reach the test's
    // cluster DNS only through the proxy it names, and a short name is
    // completed by the namespace's search path from that file.
    assert_eq!(resolv_conf(&g).await, DEFAULT_RESOLV);
    let (ips, out) = nslookup(&g, "allowed.example.org").await;
    assert_eq!(ips, [ALLOWED_AT], "nslookup through the proxy:\n{out}");
    assert!(
        out.contains("169.254.0.22"),
        "nslookup did not use the gateway's proxy:\n{out}"
    );
    let (got, took) = fetch(&g, "allowed.example.org", 10).await;
    assert_eq!(got, hello(ALLOWED_AT), "wget by name");
    eprintln!("wget by name under Allow: {took:?}");
    let (got, _) = fetch(&g, "web", 10).await;
    assert_eq!(got, hello(ALLOWED_AT), "wget of a short name (search path)");
    install_musl_resolve(&g, w.state.path()).await;
    assert_eq!(
        musl_resolve(&g, "allowed.example.org").await,
        Ok(vec![ALLOWED_AT]),
        "musl's resolver in the guest"
    );
    assert!(cluster_asked.saw("web.tenant.svc.cluster.local"));
    assert_eq!(web.take(), [ALLOWED_AT, ALLOWED_AT]);

    // 2. A live DNS change: the capsule's own nameserver, searches and
    // options. The file is rewritten and the next lookup asks the other
    // server (which points the same name elsewhere).
    let own = Names {
        dns: DnsConfig {
            nameservers: vec![OWN_DNS],
            searches: vec!["example.com".into()],
            options: vec!["ndots:1".into()],
            block_under_deny: false,
        },
        allow_hosts: AllowHosts::default(),
    };
    let t = Instant::now();
    w.sup.update_names(UID, own).await.unwrap();
    eprintln!("live DNS change applied in {:?}", t.elapsed());
    assert_eq!(
        resolv_conf(&g).await,
        "# Written by wrenn: the node's DNS proxy for this capsule.\n\
         nameserver 169.254.0.22\nsearch example.com\noptions ndots:1\n"
    );
    let (ips, out) = nslookup(&g, "allowed.example.org").await;
    assert_eq!(
        ips,
        [OTHER_AT],
        "the next lookup asks the new server:\n{out}"
    );
    let (got, _) = fetch(&g, "web", 10).await;
    assert_eq!(got, hello(LATER_AT), "the new search path");
    assert!(own_asked.saw("web.example.com"));
    web.take();

    // 3. Deny + allowHosts (back to the cluster DNS): one name resolves
    // and fetches; another fails at once and never goes upstream; raw
    // addresses (the other name's, and one no name has) get nothing.
    w.sup.update_network(UID, Egress::Deny).await.unwrap();
    let allow = |h: &[&str]| Names {
        dns: DnsConfig::default(),
        allow_hosts: hosts(h),
    };
    w.sup
        .update_names(UID, allow(&["allowed.example.org"]))
        .await
        .unwrap();
    assert_eq!(resolv_conf(&g).await, DEFAULT_RESOLV);
    let (ips, out) = nslookup(&g, "allowed.example.org").await;
    assert_eq!(ips, [ALLOWED_AT], "allowed name under Deny:\n{out}");
    let (got, took) = fetch(&g, "allowed.example.org", 10).await;
    assert_eq!(got, hello(ALLOWED_AT), "allowed name fetched under Deny");
    eprintln!("wget of an allowed name under Deny: {took:?}");
    // musl asks `allowed.example.org.tenant.svc.cluster.local` first
    // (ndots:5) and goes on only past NXDOMAIN: a name outside the list
    // must not answer anything else.
    assert_eq!(
        musl_resolve(&g, "allowed.example.org").await,
        Ok(vec![ALLOWED_AT]),
        "musl's resolver walks the search path to an allowed name"
    );
    assert!(musl_resolve(&g, "other.example.org").await.is_err());

    let (ips, out) = nslookup(&g, "other.example.org").await;
    assert!(ips.is_empty(), "a name not allowed resolved:\n{out}");
    let (got, took) = fetch(&g, "other.example.org", 10).await;
    assert!(got.is_err(), "a name not allowed fetched: {got:?}");
    assert!(
        took < Duration::from_secs(5),
        "a name not allowed must fail at once, not hang: {took:?} ({got:?})"
    );
    eprintln!("wget of a name not allowed failed in {took:?}: {got:?}");
    assert_eq!(
        names_asked(&cluster_asked, "other.example.org"),
        Vec::<String>::new(),
        "a name not allowed went upstream"
    );
    // Refused by the node (a TCP reset), so wget fails well before its
    // 10 s bound; a dropped SYN would hold it to the bound.
    for raw in [OTHER_AT, RAW_AT] {
        let (got, took) = fetch(&g, &raw.to_string(), 10).await;
        assert!(got.is_err(), "raw IP {raw} fetched: {got:?}");
        assert!(
            took < Duration::from_secs(5),
            "raw IP {raw} must be refused at once, not hang: {took:?} ({got:?})"
        );
        eprintln!("wget of raw IP {raw} failed in {took:?}: {got:?}");
    }
    // DNS straight to an upstream is denied like any other traffic.
    let (ips, out) = nslookup(&g, &format!("allowed.example.org {CLUSTER_DNS}")).await;
    assert!(ips.is_empty(), "DNS to the upstream directly:\n{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        web.take(),
        [ALLOWED_AT],
        "only the allowed name's fetch arrived"
    );

    // 4. A host added live works on the next connection, the guest not
    // restarted.
    let (got, _) = fetch(&g, "later.example.net", 10).await;
    assert!(
        got.is_err(),
        "later.example.net before it is allowed: {got:?}"
    );
    w.sup
        .update_names(UID, allow(&["allowed.example.org", "*.example.net"]))
        .await
        .unwrap();
    let (got, _) = fetch(&g, "later.example.net", 10).await;
    assert_eq!(got, hello(LATER_AT), "a host added live");
    assert_eq!(boot_id(&g).await, booted, "the guest restarted");
    web.take();

    // 5. Pause, a search domain added while paused, resume: the guest
    // could not take the file while paused, and has it once it runs.
    assert_eq!(w.sup.pause(UID).await.unwrap().state, State::Paused);
    let mut paused = allow(&["allowed.example.org", "*.example.net"]);
    paused.dns.searches = vec!["paused.example".into()];
    w.sup.update_names(UID, paused).await.unwrap();
    assert_eq!(w.sup.resume(UID).await.unwrap().state, State::Running);
    assert_eq!(
        resolv_conf(&g).await,
        "# Written by wrenn: the node's DNS proxy for this capsule.\n\
         nameserver 169.254.0.22\nsearch paused.example\noptions ndots:5\n"
    );

    // 6. Suspend and restore. The file is spoiled inside the guest first,
    // and a search domain is added while suspended: the restored guest
    // has the current file, and names fetch again (the proxy starts with
    // an empty set, so the lookup reopens the address).
    let (out, code, _) = sh(&g, "echo 'nameserver 192.0.2.1' > /etc/resolv.conf").await;
    assert_eq!(code, Some(0), "{out}");
    drop(g);
    let t = Instant::now();
    assert_eq!(w.sup.suspend(UID).await.unwrap().state, State::Suspended);
    let suspended = t.elapsed();
    let mut restored = allow(&["allowed.example.org", "*.example.net"]);
    restored.dns.searches = vec!["example.org".into()];
    w.sup.update_names(UID, restored).await.unwrap();
    let t = Instant::now();
    assert_eq!(w.sup.resume(UID).await.unwrap().state, State::Running);
    let resumed = t.elapsed();
    let g = w.guest(UID, Duration::from_secs(60)).await;
    assert_eq!(boot_id(&g).await, booted, "a restore, not a boot");
    assert_eq!(
        resolv_conf(&g).await,
        "# Written by wrenn: the node's DNS proxy for this capsule.\n\
         nameserver 169.254.0.22\nsearch example.org\noptions ndots:5\n"
    );
    // The guest's ARP cache survives the restore; the recreated TAP
    // must answer at the MAC it holds.
    let (arp, _, _) = sh(&g, "cat /proc/net/arp").await;
    assert!(
        arp.contains("02:fc:00:00:00:06"),
        "the guest's gateway entry after restore:\n{arp}"
    );
    let (got, _) = fetch(&g, "allowed.example.org", 10).await;
    assert_eq!(got, hello(ALLOWED_AT), "allowed name after restore");
    let (got, _) = fetch(&g, "later.example.net", 10).await;
    assert_eq!(got, hello(LATER_AT), "live-added name after restore");
    let (got, _) = fetch(&g, "other.example.org", 10).await;
    assert!(got.is_err(), "a name not allowed after restore: {got:?}");
    drop(g);

    assert!(w.sup.delete(UID).await.unwrap());
    eprintln!(
        "names in a real guest: boot {:.1} s, suspend {:.1} s, restore {:.1} s, whole test {:.1} s (load {})",
        boot.as_secs_f64(),
        suspended.as_secs_f64(),
        resumed.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    drop(web);
    drop(turn);
}
