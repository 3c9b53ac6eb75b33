//! The baseline for `benches/network.rs`: a capsule network's kernel
//! steps done the way a careful shell script would, through the
//! `ip`, `nft` and `conntrack` tools: one `ip -batch` per namespace, one
//! `nft -f` for the capsule's table (the same table, as `nft` text), and
//! `conntrack -D` by source and by destination for each slot address.
//! Capsule namespaces live in `/run/netns` under names unique to this run;
//! the node side runs in the bed's node namespace through `nsenter`.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wrenn_node_agent::network::{
    CapsuleLimits, CapsuleRules, EgressPolicy, GATEWAY_MAC, GUEST_GATEWAY, GUEST_PREFIX, SlotAddrs,
    build_capsule_table,
};

/// Names of one capsule's CLI-made resources.
pub struct CliCapsule {
    pub netns: String,
    pub node_link: String,
    pub addrs: SlotAddrs,
}

impl CliCapsule {
    pub fn new(run: u32, i: usize, addrs: SlotAddrs) -> Self {
        Self {
            netns: format!("wrenn-bench-{run}-{i}"),
            node_link: format!("wrcli{i:04}"),
            addrs,
        }
    }
}

/// Whether the tools are here; why not otherwise.
pub fn available() -> Result<(), String> {
    for tool in ["ip", "nft", "conntrack", "nsenter"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(format!("{tool} not installed"));
        }
    }
    Ok(())
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{what}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_node(node: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", node.display()));
    c
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// The capsule's network as the agent builds it, through the tools.
pub fn setup(node: &Path, c: &CliCapsule, policy: &EgressPolicy) -> Result<(), String> {
    let a = &c.addrs;
    run(Command::new("ip").args(["netns", "add", &c.netns]), None)?;
    let ns = netns_path(&c.netns);
    run(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["sh", "-c"])
            .arg(
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            ),
        None,
    )?;
    let node_side = format!(
        "link add {link} type veth peer name veth0 netns {ns}\n\
         addr add {nt}/31 dev {link}\n\
         link set {link} up\n\
         route add {host}/32 via {ct} dev {link}\n",
        link = c.node_link,
        ns = c.netns,
        nt = a.node_transit,
        ct = a.capsule_transit,
        host = a.host,
    );
    run(in_node(node).args(["ip", "-batch", "-"]), Some(&node_side))?;
    let mac = GATEWAY_MAC.map(|b| format!("{b:02x}")).join(":");
    let capsule_side = format!(
        "link set lo up\n\
         addr add {ct}/31 dev veth0\n\
         link set veth0 up\n\
         tuntap add dev tap0 mode tap vnet_hdr\n\
         addr add {gw}/{prefix} dev tap0\n\
         link set tap0 address {mac} txqueuelen 1000 up\n\
         route add default via {nt} dev veth0\n",
        ct = a.capsule_transit,
        nt = a.node_transit,
        gw = GUEST_GATEWAY,
        prefix = GUEST_PREFIX,
    );
    run(
        Command::new("ip").args(["-n", &c.netns, "-batch", "-"]),
        Some(&capsule_side),
    )?;
    let table = build_capsule_table(&CapsuleRules {
        table: "wrenn",
        addrs: c.addrs,
        veth: "veth0",
        tap: "tap0",
        policy,
        limits: CapsuleLimits::default(),
    });
    run(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["nft", "-f", "-"]),
        Some(&table.to_string()),
    )
}

/// Removes what [`setup`] made, as the agent's teardown does.
pub fn teardown(node: &Path, c: &CliCapsule) -> Result<(), String> {
    run(
        in_node(node).args(["ip", "link", "del", &c.node_link]),
        None,
    )?;
    run(Command::new("ip").args(["netns", "del", &c.netns]), None)?;
    let a = &c.addrs;
    for addr in [a.host, a.node_transit, a.capsule_transit] {
        for side in ["-s", "-d"] {
            conntrack_delete(node, side, addr)?;
        }
    }
    Ok(())
}

/// `conntrack -D` exits 1 when nothing matched, which is not a failure.
fn conntrack_delete(node: &Path, side: &str, addr: Ipv4Addr) -> Result<(), String> {
    let status = in_node(node)
        .args(["conntrack", "-D", side, &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("conntrack: {e}"))?;
    match status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(format!("conntrack -D {side} {addr}: {status}")),
    }
}

/// Best-effort removal after a failed cycle.
pub fn cleanup(node: &Path, c: &CliCapsule) {
    let _ = run(
        in_node(node).args(["ip", "link", "del", &c.node_link]),
        None,
    );
    let _ = run(Command::new("ip").args(["netns", "del", &c.netns]), None);
}
