//! The per-capsule DNS proxy: listens on the guest's gateway (UDP and TCP
//! port 53, sockets made inside the capsule namespace), forwards each
//! query to the capsule's upstreams from the node namespace, and, when the
//! capsule has `allowHosts`, answers `NXDOMAIN` for names outside it and
//! opens every IPv4 address of an allowed name's answer in the names
//! table's `fqdn` set (for the answer's TTL, clamped) before the guest
//! sees the answer.
//!
//! Everything from the guest is hostile: queries are bounded in size,
//! in-flight queries and TCP connections are capped per capsule, logs a
//! guest can cause are rate limited, and a query that does not parse is
//! dropped. What to do with a query is decided by `allow::plan_query`.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use simple_dns::rdata::RData;
use simple_dns::{OPCODE, Packet, PacketFlag, RCODE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use wrenn_crds::reason::Reason;

use super::allow::{AllowHosts, QueryPlan, plan_query};
use super::refusals::Reporter;
use super::table::{DNS_PORT, FQDN_SET, NAMES_TABLE, open_for};
use crate::network::addr::{Cidr, GUEST_GATEWAY};
use crate::network::ruleset::SetElement;
use crate::network::{CapsuleId, nft};
use crate::sys::net as sys;

/// Largest query accepted from the guest (EDNS's usual buffer).
const MAX_QUERY: usize = 4096;
/// Largest answer read from an upstream over UDP.
const MAX_UDP_ANSWER: usize = 4096;
/// Queries of one capsule being answered at once; more are dropped.
const MAX_IN_FLIGHT: usize = 64;
/// TCP connections of one capsule open at once; more are closed.
const MAX_TCP_CONNS: usize = 16;
/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a guest's TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Log lines a capsule's guest can cause per minute.
const LOGS_PER_MINUTE: u32 = 10;

/// What the proxy of one capsule does; replaced in place on a live change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySettings {
    /// Upstream nameservers, tried in order.
    pub upstreams: Vec<Ipv4Addr>,
    /// Names the guest may resolve and reach; empty: no filtering.
    pub allow: AllowHosts,
}

/// An address the proxy opened, with the names whose answers opened it.
#[derive(Clone, Debug)]
struct Opened {
    until: Instant,
    names: BTreeSet<String>,
}

/// State shared by a proxy's tasks.
#[derive(Debug)]
struct Shared {
    capsule: CapsuleId,
    netns: PathBuf,
    node_netns: PathBuf,
    blocked: Vec<Cidr>,
    settings: RwLock<ProxySettings>,
    /// Held across "is this name allowed" and the set insert, and by a
    /// settings change across its table rebuild, so an answer to a name
    /// just removed never lands in the rebuilt set.
    opened: Mutex<HashMap<Ipv4Addr, Opened>>,
    in_flight: Arc<Semaphore>,
    tcp_conns: Arc<Semaphore>,
    log: LogLimit,
    refusals: Reporter,
}

/// A proxy's guest-facing sockets, bound in its capsule's namespace.
#[derive(Debug)]
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// A running proxy; its tasks end when it is dropped.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Proxy {
    /// The guest-facing sockets, bound on the guest's gateway. Must run
    /// inside the capsule's namespace (that is what binds them to it).
    pub fn bind() -> std::io::Result<Sockets> {
        let at = SocketAddr::V4(SocketAddrV4::new(GUEST_GATEWAY, DNS_PORT));
        let udp = std::net::UdpSocket::bind(at)?;
        let tcp = std::net::TcpListener::bind(at)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Sockets { udp, tcp })
    }

    /// Starts serving, on the calling task's runtime, from `sockets`
    /// ([`Proxy::bind`] in the capsule namespace `netns`). Upstream sockets
    /// are made per query in `node_netns`.
    pub fn serve(
        capsule: CapsuleId,
        netns: PathBuf,
        node_netns: PathBuf,
        blocked: Vec<Cidr>,
        settings: ProxySettings,
        refusals: Reporter,
        sockets: Sockets,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            capsule,
            netns,
            node_netns,
            blocked,
            settings: RwLock::new(settings),
            opened: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tcp_conns: Arc::new(Semaphore::new(MAX_TCP_CONNS)),
            log: LogLimit::default(),
            refusals,
        });
        let _guard = rt.enter();
        let udp = Arc::new(tokio::net::UdpSocket::from_std(sockets.udp)?);
        let tcp = tokio::net::TcpListener::from_std(sockets.tcp)?;
        let tasks = vec![
            rt.spawn(serve_udp(shared.clone(), udp)),
            rt.spawn(serve_tcp(shared.clone(), tcp)),
        ];
        Ok(Self { shared, tasks })
    }

    /// Replaces the settings. Addresses opened only by names no longer
    /// allowed leave the set; the rest keep their remaining time. `reload`
    /// loads the given elements as the new table (one transaction), with
    /// the insert lock held so no answer slips in between. Blocking.
    pub fn update(
        &self,
        settings: ProxySettings,
        reload: impl FnOnce(Vec<SetElement>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut opened = lock(&self.shared.opened);
        let now = Instant::now();
        opened.retain(|_, o| {
            o.names.retain(|n| settings.allow.allows(n));
            o.until > now && !o.names.is_empty()
        });
        let keep = opened
            .iter()
            .map(|(addr, o)| SetElement {
                addr: *addr,
                timeout: Some(o.until.saturating_duration_since(now)),
            })
            .collect();
        reload(keep)?;
        *self
            .shared
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = settings;
        Ok(())
    }

    /// The current settings.
    pub fn settings(&self) -> ProxySettings {
        self.shared
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// Each query and TCP connection runs in the serving task's `JoinSet`, so
// the proxy's drop (which aborts the serving task) ends them too: a
// connection outliving its proxy would keep the torn-down capsule's
// namespace alive until it idled out.

async fn serve_udp(shared: Arc<Shared>, sock: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; MAX_QUERY + 1];
    let mut queries = tokio::task::JoinSet::new();
    loop {
        while queries.try_join_next().is_some() {}
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                shared.warn(format_args!("dns proxy: receive failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if n > MAX_QUERY {
            continue;
        }
        let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
            shared.warn(format_args!(
                "dns proxy: too many queries in flight; dropping"
            ));
            continue;
        };
        let query = buf[..n].to_vec();
        let (shared, sock) = (shared.clone(), sock.clone());
        queries.spawn(async move {
            if let Some(answer) = answer(&shared, &query, Transport::Udp).await {
                let _ = sock.send_to(&answer, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = shared.tcp_conns.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            // Length-prefixed messages (RFC 7766) until idle or closed.
            loop {
                let len = match tokio::time::timeout(TCP_IDLE, conn.read_u16()).await {
                    Ok(Ok(l)) => usize::from(l),
                    _ => break,
                };
                if len > MAX_QUERY {
                    break;
                }
                let mut q = vec![0u8; len];
                match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut q)).await {
                    Ok(Ok(_)) => {}
                    _ => break,
                }
                let Some(a) = answer(&shared, &q, Transport::Tcp).await else {
                    break;
                };
                let Ok(alen) = u16::try_from(a.len()) else {
                    break;
                };
                if conn.write_u16(alen).await.is_err() || conn.write_all(&a).await.is_err() {
                    break;
                }
            }
            drop(permit);
        });
    }
}

/// How a query reached the proxy, and so how it goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The reply to one guest query; `None` drops it.
async fn answer(shared: &Arc<Shared>, query: &[u8], via: Transport) -> Option<Vec<u8>> {
    let parsed = match Packet::parse(query) {
        Ok(p) => p,
        Err(e) => {
            shared.warn(format_args!("dns proxy: unparsable query dropped: {e}"));
            return None;
        }
    };
    let names: Vec<String> = parsed
        .questions
        .iter()
        .map(|q| q.qname.to_string())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let standard =
        parsed.opcode() == OPCODE::StandardQuery && !parsed.has_flags(PacketFlag::RESPONSE);
    let settings = shared
        .settings
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let plan = plan_query(&refs, standard, &settings.allow);
    match plan {
        QueryPlan::NotAllowed => {
            tracing::debug!(capsule = %shared.capsule, names = ?names, "dns proxy: name not allowed");
            for n in &names {
                if !settings.allow.allows(n) {
                    shared.refusals.refused(n, Reason::NameNotAllowed);
                }
            }
            return reply_with(&parsed, RCODE::NameError);
        }
        QueryPlan::Refuse => {
            tracing::debug!(capsule = %shared.capsule, names = ?names, "dns proxy: refused");
            return reply_with(&parsed, RCODE::Refused);
        }
        QueryPlan::Forward | QueryPlan::ForwardAndOpen => {}
    }
    let Some(reply) = forward(shared, &settings.upstreams, query, via).await else {
        for n in &names {
            shared.refusals.refused(n, Reason::NameUnresolved);
        }
        return reply_with(&parsed, RCODE::ServerFailure);
    };
    if plan == QueryPlan::Forward {
        return Some(reply);
    }
    let Some(name) = names.first().cloned() else {
        return reply_with(&parsed, RCODE::Refused);
    };
    match open_answer(shared, &name, parsed.id(), &reply).await {
        Ok(()) => Some(reply),
        Err(e) => {
            shared.warn(format_args!("dns proxy: open addresses of {name}: {e}"));
            reply_with(&parsed, RCODE::ServerFailure)
        }
    }
}

/// A reply to `query` with no answers and `rcode`.
fn reply_with(query: &Packet<'_>, rcode: RCODE) -> Option<Vec<u8>> {
    let mut r = Packet::new_reply(query.id());
    r.questions = query.questions.clone();
    *r.rcode_mut() = rcode;
    r.build_bytes_vec().ok()
}

/// Asks each upstream in turn; the first answer wins.
async fn forward(
    shared: &Arc<Shared>,
    upstreams: &[Ipv4Addr],
    query: &[u8],
    via: Transport,
) -> Option<Vec<u8>> {
    for up in upstreams {
        let addr = SocketAddr::V4(SocketAddrV4::new(*up, DNS_PORT));
        let attempt = async {
            match via {
                Transport::Udp => exchange_udp(shared, addr, query).await,
                Transport::Tcp => exchange_tcp(shared, addr, query).await,
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Ok(a)) => return Some(a),
            Ok(Err(e)) => shared.warn(format_args!("dns proxy: upstream {addr}: {e}")),
            Err(_) => shared.warn(format_args!("dns proxy: upstream {addr} timed out")),
        }
    }
    None
}

async fn exchange_udp(
    shared: &Arc<Shared>,
    to: SocketAddr,
    query: &[u8],
) -> std::io::Result<Vec<u8>> {
    // A fresh socket per query: a random source port, and only `to`'s
    // datagrams are read (connected).
    let ns = shared.node_netns.clone();
    let sock = tokio::task::spawn_blocking(move || {
        sys::sockets_in_netns(&ns, || {
            let s = std::net::UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                0,
            )))?;
            s.connect(to)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(std::io::Error::other)??;
    let sock = tokio::net::UdpSocket::from_std(sock)?;
    sock.send(query).await?;
    let id = query.get(..2);
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Another id is a stray or a spoof: keep waiting for ours.
        if buf.get(..2) == id && n >= 12 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(
    shared: &Arc<Shared>,
    to: SocketAddr,
    query: &[u8],
) -> std::io::Result<Vec<u8>> {
    let ns = shared.node_netns.clone();
    let stream = tokio::task::spawn_blocking(move || {
        let s = sys::tcp_stream_in_netns(&ns, to, UPSTREAM_TIMEOUT)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(s)
    })
    .await
    .map_err(std::io::Error::other)??;
    let mut s = tokio::net::TcpStream::from_std(stream)?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    s.write_u16(len).await?;
    s.write_all(query).await?;
    let n = usize::from(s.read_u16().await?);
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Opens the IPv4 addresses of `reply` (the upstream's answer to `name`)
/// in the capsule's `fqdn` set, then records them. Addresses no capsule
/// may reach stay closed: an allowed name's owner could point it at
/// metadata or the node's networks.
async fn open_answer(
    shared: &Arc<Shared>,
    name: &str,
    id: u16,
    reply: &[u8],
) -> Result<(), String> {
    let parsed = Packet::parse(reply).map_err(|e| format!("unparsable answer: {e}"))?;
    if parsed.id() != id || !parsed.has_flags(PacketFlag::RESPONSE) {
        return Err("answer does not match the query".into());
    }
    let mut elements: Vec<(Ipv4Addr, Duration)> = Vec::new();
    for rr in &parsed.answers {
        if let RData::A(a) = &rr.rdata {
            let ip = Ipv4Addr::from(a.address);
            if shared.reachable(ip) {
                elements.push((ip, open_for(rr.ttl)));
            }
        }
    }
    if elements.is_empty() {
        return Ok(());
    }
    let shared = shared.clone();
    let name = name.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name).to_string();
    tokio::task::spawn_blocking(move || {
        let mut opened = lock(&shared.opened);
        // Settings may have changed while upstream answered.
        let allowed = shared
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allow
            .allows(&name);
        if !allowed {
            return Err(format!("{name} is no longer allowed"));
        }
        let els: Vec<SetElement> = elements
            .iter()
            .map(|(addr, t)| SetElement {
                addr: *addr,
                timeout: Some(*t),
            })
            .collect();
        sys::run_in_netns(&shared.netns, |nl| {
            nft::add_elements(nl, NAMES_TABLE, FQDN_SET, &els)
        })
        .and_then(|r| r)
        .map_err(|e| format!("add to set {FQDN_SET}: {e}"))?;
        let now = Instant::now();
        for (addr, t) in elements {
            let o = opened.entry(addr).or_insert_with(|| Opened {
                until: now,
                names: BTreeSet::new(),
            });
            // The kernel element now expires at now + t.
            o.until = now + t;
            o.names.insert(name.clone());
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("insert task: {e}"))?
}

impl Shared {
    fn reachable(&self, ip: Ipv4Addr) -> bool {
        Cidr::host(ip).never_reachable().is_none()
            && !self.blocked.iter().any(|b| b.contains(ip))
            && !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_broadcast()
            && !ip.is_multicast()
    }

    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(capsule = %self.capsule, suppressed, "{msg}");
        }
    }
}

/// At most [`LOGS_PER_MINUTE`] lines a minute per capsule; the next line
/// allowed says how many were suppressed (firecracker's rate-limited
/// logger, by the minute).
#[derive(Debug, Default)]
struct LogLimit {
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl LogLimit {
    /// `Some(suppressed so far)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let (start, count, suppressed) = &mut *st;
        if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60)) {
            *start = Some(now);
            *count = 0;
        }
        if *count < LOGS_PER_MINUTE {
            *count += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}
