//! Kernel calls for `network`: network namespaces (create, enter, remove),
//! links, addresses and routes over rtnetlink, TAP devices through
//! `/dev/net/tun`, nftables transactions and conntrack over nfnetlink,
//! sysctls. The nftables messages themselves are built by `network::nft`.
//!
//! `setns` changes the namespace of the calling thread only, so every call
//! that acts inside a namespace runs on a thread spawned for it
//! ([`run_in_netns`], [`run_in_new_netns`]); its netlink sockets are opened on
//! that thread after it entered the namespace, which is what binds them to
//! it. Policy (what to create, names, order, rollback) lives in `network`.

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use futures::TryStreamExt as _;
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, Tuple};
use netlink_packet_netfilter::nftables::{
    NfTablesMessage, RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::{NetfilterMessageInner, NetfilterProtoFamily};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Runs `f` on a new thread inside the network namespace at `netns`. The
/// outer error is about entering the namespace; the inner one is `f`'s.
pub fn run_in_netns<T: Send, E: Send>(
    netns: &Path,
    f: impl FnOnce(&Netlink) -> Result<T, E> + Send,
) -> io::Result<Result<T, E>> {
    on_thread(move || {
        let ns = File::open(netns)?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
        let nl = Netlink::new()?;
        Ok(f(&nl))
    })
}

/// Creates a named network namespace: a new thread unshares its network
/// namespace and bind-mounts it on `path` (as `ip netns add` does), then runs
/// `f` inside it. Fails with `AlreadyExists` if `path` exists.
pub fn run_in_new_netns<T: Send, E: Send>(
    path: &Path,
    proc_dir: &Path,
    f: impl FnOnce(&Netlink) -> Result<T, E> + Send,
) -> io::Result<Result<T, E>> {
    on_thread(move || {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // The mount point: an empty file, created exclusively so two
        // callers never share a name.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let mounted = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
            .and_then(|()| {
                let tid = nix::unistd::gettid();
                let own = proc_dir.join(format!("self/task/{tid}/ns/net"));
                nix::mount::mount(
                    Some(&own),
                    path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(io::Error::from)
            });
        if let Err(e) = mounted {
            let _ = fs::remove_file(path);
            return Err(e);
        }
        let nl = Netlink::new()?;
        Ok(f(&nl))
    })
}

fn on_thread<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("wrenn-netns".into())
            .spawn_scoped(s, f)?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace thread panicked")))
    })
}

/// Opens and closes a TCP connection to `addr` from inside the network
/// namespace at `netns`, within `timeout`: a readiness check that reaches
/// only that one address, on a thread of its own.
pub fn tcp_connect_in_netns(
    netns: &Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> io::Result<()> {
    on_thread(move || {
        let ns = File::open(netns)?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
        std::net::TcpStream::connect_timeout(&addr, timeout).map(drop)
    })
}

/// A TCP connection to `addr` made from inside the network namespace at
/// `netns`, within `timeout`. The socket stays in that namespace after the
/// thread that made it ends, so it can be used from anywhere. Blocking.
pub fn tcp_stream_in_netns(
    netns: &Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> io::Result<std::net::TcpStream> {
    on_thread(move || {
        let ns = File::open(netns)?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
        std::net::TcpStream::connect_timeout(&addr, timeout)
    })
}

/// Runs `make` on a thread inside the network namespace at `netns`: the
/// sockets it opens (a listener, a UDP socket) belong to that namespace
/// for their whole life, wherever they are used afterwards. Blocking.
pub fn sockets_in_netns<T: Send>(
    netns: &Path,
    make: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    // Already there (the node's namespace for an agent on the host
    // network, once per upstream DNS query): no thread needed.
    if is_own_netns(netns) {
        return make();
    }
    on_thread(move || {
        let ns = File::open(netns)?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
        make()
    })
}

/// Whether `netns` is the calling thread's network namespace (same nsfs
/// inode, as `ip netns identify` compares).
fn is_own_netns(netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        fs::metadata(netns),
        fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Unmounts and removes a named namespace. The namespace itself, with its
/// links, TAP, nftables tables and conntrack entries, goes away once no
/// process or mount holds it. `Ok(false)` if there was nothing to remove.
pub fn remove_netns(path: &Path) -> io::Result<bool> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a half-made namespace file).
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the namespace mounted at `from` the name `to` instead: bound at
/// `to` (created exclusively, so two callers never share a name), then
/// unmounted and removed at `from`. What runs or is linked inside it never
/// notices. On failure `to` may remain mounted; `from` remains unless the
/// bind was made.
pub fn move_netns(from: &Path, to: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    if let Err(e) = nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
    {
        let _ = fs::remove_file(to);
        return Err(e.into());
    }
    remove_netns(from).map(drop)
}

/// Names of the namespaces in `dir` starting with `prefix`.
pub fn list_netns(dir: &Path, prefix: &str) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Writes a sysctl (`key` relative to `<proc>/sys`) for the calling
/// thread's network namespace: `net.*` sysctls resolve per namespace.
pub fn write_sysctl(proc_dir: &Path, key: &str, value: &str) -> io::Result<()> {
    fs::write(proc_dir.join("sys").join(key), value)
}

/// A conntrack entry, reduced to what cleanup needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Original direction source and destination.
    pub orig: (IpAddr, IpAddr),
    /// Reply direction source and destination.
    pub reply: (IpAddr, IpAddr),
    orig_tuple: Vec<Tuple>,
}

impl CtEntry {
    /// Every address the entry mentions.
    pub fn addrs(&self) -> [IpAddr; 4] {
        [self.orig.0, self.orig.1, self.reply.0, self.reply.1]
    }
}

/// Netlink access for the namespace of the thread that made it.
#[derive(Debug)]
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

fn nl_err(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

impl Netlink {
    fn new() -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection()?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    /// Index of link `name`, `None` if there is none.
    pub fn link_index(&self, name: &str) -> io::Result<Option<u32>> {
        let req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match self.rt.block_on(async {
            futures::pin_mut!(req);
            req.try_next().await
        }) {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = nl_err(e);
                if is_errno(&e, libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn index(&self, name: &str) -> io::Result<u32> {
        self.link_index(name)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}")))
    }

    /// Every link: index, name, transmit queue length.
    pub fn links(&self) -> io::Result<Vec<(u32, String, u32)>> {
        let req = self.handle.link().get().execute();
        let msgs: Vec<_> = self.rt.block_on(req.try_collect()).map_err(nl_err)?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut name = String::new();
                let mut qlen = 0;
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => name = n,
                        LinkAttribute::TxQueueLen(q) => qlen = q,
                        _ => {}
                    }
                }
                (m.header.index, name, qlen)
            })
            .collect())
    }

    /// Creates a veth pair, both ends here.
    pub fn add_veth(&self, name: &str, peer: &str) -> io::Result<()> {
        let msg = LinkVeth::new(name, peer).build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl_err)
    }

    /// Creates a veth pair whose peer is born in the namespace open as
    /// `netns`: cheaper than creating both ends here and moving one, since
    /// a move waits for an RCU grace period.
    pub fn add_veth_peer_in(&self, name: &str, peer: &str, netns: &File) -> io::Result<()> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl_err)
    }

    /// Moves link `name` into the namespace open as `netns`.
    pub fn move_link(&self, name: &str, netns: &File) -> io::Result<()> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(nl_err)
    }

    /// Sets a link up, optionally with a transmit queue length and MAC.
    pub fn set_up(&self, name: &str, txqlen: Option<u32>, mac: Option<[u8; 6]>) -> io::Result<()> {
        let mut b = LinkUnspec::new_with_index(self.index(name)?);
        if let Some(q) = txqlen {
            b = b.txqueuelen(q);
        }
        if let Some(m) = mac {
            b = b.address(m.to_vec());
        }
        let msg = b.up().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(nl_err)
    }

    /// Sets link `name` down: IPv4 routes through it go at once.
    pub fn set_down(&self, name: &str) -> io::Result<()> {
        let msg = LinkUnspec::new_with_index(self.index(name)?).down().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(nl_err)
    }

    /// Renames a link (down links only).
    pub fn rename(&self, name: &str, new_name: &str) -> io::Result<()> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .name(new_name.to_string())
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(nl_err)
    }

    /// Adds `addr/prefix` to link `name`.
    pub fn add_addr(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let idx = self.index(name)?;
        self.rt
            .block_on(
                self.handle
                    .address()
                    .add(idx, IpAddr::V4(addr), prefix)
                    .execute(),
            )
            .map_err(nl_err)
    }

    /// Removes every address of link `name`, and with them their local
    /// routes (which a link's going down keeps).
    pub fn flush_addrs(&self, name: &str) -> io::Result<()> {
        let idx = self.index(name)?;
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute();
        let addrs: Vec<_> = self.rt.block_on(req.try_collect()).map_err(nl_err)?;
        for a in addrs {
            match self
                .rt
                .block_on(self.handle.address().del(a).execute())
                .map_err(nl_err)
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Adds a route to `dest` through link `dev`, via `gateway` if given.
    pub fn add_route(
        &self,
        dest: impl Into<(Ipv4Addr, u8)>,
        gateway: Option<Ipv4Addr>,
        dev: &str,
    ) -> io::Result<()> {
        let (addr, prefix) = dest.into();
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, prefix)
            .output_interface(self.index(dev)?);
        if let Some(gw) = gateway {
            b = b.gateway(gw);
        }
        self.rt
            .block_on(self.handle.route().add(b.build()).execute())
            .map_err(nl_err)
    }

    /// IPv4 routes of every table (the kernel answers a dump without
    /// strict checking with all of them, `local` included): destination,
    /// prefix length, output link index.
    pub fn routes_v4(&self) -> io::Result<Vec<(Ipv4Addr, u8, Option<u32>)>> {
        let req = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let msgs: Vec<_> = self.rt.block_on(req.try_collect()).map_err(nl_err)?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut dest = Ipv4Addr::UNSPECIFIED;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = *d,
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                (dest, m.header.destination_prefix_length, oif)
            })
            .collect())
    }

    /// Deletes the main-table route to `dest`.
    pub fn del_route(&self, dest: impl Into<(Ipv4Addr, u8)>) -> io::Result<()> {
        let (addr, prefix) = dest.into();
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, prefix)
            .build();
        self.rt
            .block_on(self.handle.route().del(msg).execute())
            .map_err(nl_err)
    }

    /// Deletes link `name` (a veth takes its peer along). `Ok(false)` if
    /// there was none.
    pub fn del_link(&self, name: &str) -> io::Result<bool> {
        let Some(idx) = self.link_index(name)? else {
            return Ok(false);
        };
        match self
            .rt
            .block_on(self.handle.link().del(idx).execute())
            .map_err(nl_err)
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a persistent TAP named `name` through the clone device at
    /// `tun` (`/dev/net/tun`), with the flags Cloud Hypervisor opens it with
    /// (single queue, no packet info, virtio-net header).
    pub fn create_tap(&self, tun: &Path, name: &str) -> io::Result<()> {
        super::tap::create_persistent(tun, name)
    }

    /// Sends one nftables transaction (`network::nft` builds it) and
    /// waits for every part's answer.
    pub fn nft_transaction(
        &self,
        family: NetfilterProtoFamily,
        msgs: Vec<(NfTablesMessage, u16)>,
    ) -> io::Result<()> {
        nfnl::Channel::open()?.transaction(family, msgs)
    }

    /// Every nftables table here: family number and name.
    pub fn list_tables(&self) -> io::Result<Vec<(u8, String)>> {
        let msg = NfTablesMessage::GetTable(TableMessage { attributes: vec![] });
        let mut out = Vec::new();
        for reply in nfnl::Channel::open()?.dump(NetfilterProtoFamily::Unspec, msg.into())? {
            if let NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(t)) = reply.inner {
                for a in t.attributes {
                    if let TableAttribute::Name(n) = a {
                        out.push((u8::from(reply.header.family), n));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Number of nftables rules here, in every table.
    pub fn count_rules(&self) -> io::Result<usize> {
        let msg = NfTablesMessage::GetRule(RuleMessage { attributes: vec![] });
        Ok(nfnl::Channel::open()?
            .dump(NetfilterProtoFamily::Unspec, msg.into())?
            .into_iter()
            .filter(|r| {
                matches!(
                    r.inner,
                    NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(_))
                )
            })
            .count())
    }

    /// Deletes table `name` of family number `family`. `Ok(false)` if absent.
    pub fn delete_table(&self, family: u8, name: &str) -> io::Result<bool> {
        let msg = NfTablesMessage::DeleteTable(TableMessage {
            attributes: vec![TableAttribute::Name(name.to_string())],
        });
        match nfnl::Channel::open()?.transaction(NetfilterProtoFamily::from(family), vec![(msg, 0)])
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// IPv4 conntrack entries here.
    pub fn conntrack_list(&self) -> io::Result<Vec<CtEntry>> {
        conntrack_list(&nfnl::Channel::open()?)
    }

    /// Deletes every IPv4 conntrack entry for which `pred` holds; returns
    /// how many went. Entries that expire meanwhile are not an error.
    pub fn conntrack_flush(&self, pred: impl Fn(&CtEntry) -> bool) -> io::Result<usize> {
        let nf = nfnl::Channel::open()?;
        let mut n = 0;
        for entry in conntrack_list(&nf)?.into_iter().filter(|e| pred(e)) {
            let msg =
                ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(entry.orig_tuple)]);
            match nf.request(NetfilterProtoFamily::IPv4, msg.into()) {
                Ok(()) => n += 1,
                Err(e) if is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// IPv4 conntrack entries in `nf`'s namespace.
fn conntrack_list(nf: &nfnl::Channel) -> io::Result<Vec<CtEntry>> {
    let mut out = Vec::new();
    for reply in nf.dump(
        NetfilterProtoFamily::IPv4,
        ConntrackMessage::Get(vec![]).into(),
    )? {
        let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = reply.inner else {
            continue;
        };
        let (mut orig, mut rep) = (None, None);
        for a in attrs {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
                ConntrackAttribute::CtaTupleReply(t) => rep = Some(t),
                _ => {}
            }
        }
        if let (Some(o), Some(r)) = (orig, rep)
            && let (Some(oa), Some(ra)) = (tuple_addrs(&o), tuple_addrs(&r))
        {
            out.push(CtEntry {
                orig: oa,
                reply: ra,
                orig_tuple: o,
            });
        }
    }
    Ok(out)
}

fn tuple_addrs(t: &[Tuple]) -> Option<(IpAddr, IpAddr)> {
    let ip = t.iter().find_map(|x| match x {
        Tuple::Ip(ip) => Some(ip),
        _ => None,
    })?;
    let src = ip.iter().find_map(|x| match x {
        IPTuple::SourceAddress(a) => Some(*a),
        _ => None,
    })?;
    let dst = ip.iter().find_map(|x| match x {
        IPTuple::DestinationAddress(a) => Some(*a),
        _ => None,
    })?;
    Some((src, dst))
}

/// Path of the calling process's own network namespace under `proc_dir`.
pub fn own_netns(proc_dir: &Path) -> PathBuf {
    proc_dir.join("self/ns/net")
}

mod nfnl;
#[cfg(test)]
mod tests;
