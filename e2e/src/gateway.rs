//! The data-plane gateway for tests: a `wrenn-gateway` process registered
//! with the API server by an `APIService`, and what it needs around it.
//!
//! The aggregator refuses loopback endpoints, so the gateway listens on a
//! private address of a veth made for the test ([`LocalAddr`]): traffic to
//! it never leaves the machine. With `--enable-aggregator-routing`
//! the API server dials the address in the Service's endpoints directly.
//!
//! `wrenn-guest` as a host process behind a vsock shim ([`HostGuest`]) gives
//! a capsule a real guest agent without a VM.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::ip;
use crate::build::cargo_build;
use crate::child::{stop_child, tail};

/// A private IPv4 address on the host side of a veth pair of its own,
/// whose other end sits in a network namespace made for it (kernels
/// without the dummy link type have veth); both removed on drop.
#[derive(Debug)]
pub struct LocalAddr {
    /// The address.
    pub ip: Ipv4Addr,
    link: String,
    netns: String,
}

impl LocalAddr {
    /// Makes link `name` (at most 13 bytes) holding `addr`/32. Needs root.
    pub fn create(name: &str, addr: Ipv4Addr) -> Result<LocalAddr> {
        let netns = format!("{name}-ns");
        // Leftovers of a killed run of the same name are replaced.
        let _ = ip(&["link", "del", name]);
        let _ = ip(&["netns", "del", &netns]);
        ip(&["netns", "add", &netns])?;
        let local = LocalAddr {
            ip: addr,
            link: name.to_string(),
            netns: netns.clone(),
        };
        let peer = format!("{name}p");
        ip(&[
            "link", "add", name, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ])?;
        ip(&["addr", "add", &format!("{addr}/32"), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        ip(&["-n", &netns, "link", "set", &peer, "up"])?;
        Ok(local)
    }
}

impl Drop for LocalAddr {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.link]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// Files and flags of one gateway process.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Kubeconfig it uses (e.g. impersonating its ServiceAccount).
    pub kubeconfig: PathBuf,
    /// Address it listens on.
    pub listen: SocketAddr,
    /// Serving certificate and key (PEM).
    pub serving_cert: PathBuf,
    /// Serving key.
    pub serving_key: PathBuf,
    /// Client certificate towards agents, its key, and the agents' CA.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// Agents' CA.
    pub agent_ca: PathBuf,
    /// Namespace of the agent Pods.
    pub agent_namespace: String,
    /// The agents' gRPC port.
    pub agent_port: u16,
    /// Log file.
    pub log: PathBuf,
}

/// A running `wrenn-gateway`.
#[derive(Debug)]
pub struct GatewayProcess {
    /// Its log.
    pub log: PathBuf,
    child: Option<Child>,
}

impl GatewayProcess {
    /// Builds and starts the gateway, waiting until it accepts connections.
    pub fn start(o: &GatewayOptions) -> Result<GatewayProcess> {
        let binary = cargo_build("wrenn-gateway", "wrenn-gateway")?;
        let log =
            std::fs::File::create(&o.log).with_context(|| format!("create {}", o.log.display()))?;
        let child = Command::new(&binary)
            .env("KUBECONFIG", &o.kubeconfig)
            .args(["--listen", &o.listen.to_string()])
            .arg("--serving-cert")
            .arg(&o.serving_cert)
            .arg("--serving-key")
            .arg(&o.serving_key)
            .arg("--tls-cert")
            .arg(&o.client_cert)
            .arg("--tls-key")
            .arg(&o.client_key)
            .arg("--agent-ca")
            .arg(&o.agent_ca)
            .args(["--agent-namespace", &o.agent_namespace])
            .args(["--agent-port", &o.agent_port.to_string()])
            .args(["--log-level", "info,wrenn_gateway=debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut gw = GatewayProcess {
            log: o.log.clone(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect_timeout(&o.listen, Duration::from_millis(200)).is_err() {
            if let Some(child) = gw.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("gateway exited ({status}) during start:\n{}", gw.log_tail());
            }
            if Instant::now() > deadline {
                bail!("gateway not listening in 60 s:\n{}", gw.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(gw)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 60)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        stop_child(self.child.take(), "TERM", Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!("[gateway] log, last lines:\n{}", tail(&self.log, 100));
        }
    }
}

/// Registers the gateway at `addr` for `subresources.wrenn.dev/v1alpha1`:
/// a selector-less Service `service` in `ns` (port 443), its endpoints
/// (Endpoints and EndpointSlice, written here as no controller would for a
/// selector-less Service) and the `APIService` trusting `ca_pem`.
pub async fn register_apiservice(
    client: &kube::Client,
    ns: &str,
    service: &str,
    addr: SocketAddr,
    ca_pem: &str,
) -> Result<()> {
    use k8s_openapi::ByteString;
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let pp = PatchParams::apply("wrenn-e2e").force();
    let apply = |group: &str, version: &str, kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    };
    let ip = addr.ip().to_string();
    let port = i32::from(addr.port());
    let svc = apply("", "v1", "Service", "services");
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &svc)
        .patch(
            service,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": service },
                "spec": { "ports": [{ "name": "https", "port": 443, "targetPort": port }] },
            })),
        )
        .await
        .context("apply the gateway Service")?;
    let eps = apply("", "v1", "Endpoints", "endpoints");
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &eps)
        .patch(
            service,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": { "name": service },
                "subsets": [{ "addresses": [{ "ip": ip }], "ports": [{ "name": "https", "port": port }] }],
            })),
        )
        .await
        .context("apply the gateway Endpoints")?;
    let slices = apply("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices");
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &slices)
        .patch(
            service,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": service, "labels": { "kubernetes.io/service-name": service } },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
                "ports": [{ "name": "https", "port": port, "protocol": "TCP" }],
            })),
        )
        .await
        .context("apply the gateway EndpointSlice")?;
    let apisvc = apply("apiregistration.k8s.io", "v1", "APIService", "apiservices");
    let ca = ByteString(ca_pem.as_bytes().to_vec());
    Api::<DynamicObject>::all_with(client.clone(), &apisvc)
        .patch(
            "v1alpha1.subresources.wrenn.dev",
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                "metadata": { "name": "v1alpha1.subresources.wrenn.dev" },
                "spec": {
                    "group": "subresources.wrenn.dev", "version": "v1alpha1",
                    "service": { "namespace": ns, "name": service, "port": 443 },
                    "caBundle": ca,
                    "groupPriorityMinimum": 1000, "versionPriority": 15,
                },
            })),
        )
        .await
        .context("apply the APIService")?;
    Ok(())
}

/// `wrenn-guest` run as a host process on a Unix socket, behind a shim at
/// `vsock` that answers the VMM's hybrid-vsock handshake
/// (`CONNECT <port>\n` → `OK <port>\n`) and splices: a guest agent as a
/// node agent reaches it, without a VM. Stopped on drop.
#[derive(Debug)]
pub struct HostGuest {
    child: Option<Child>,
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl HostGuest {
    /// Builds `wrenn-guest`, starts it and the shim at `vsock`.
    pub fn start(vsock: &Path) -> Result<HostGuest> {
        let binary = cargo_build("wrenn-guest", "wrenn-guest")?;
        let dir = tempfile::Builder::new()
            .prefix("wrenn-host-guest-")
            .tempdir()
            .context("make the guest directory")?;
        let agent_sock = dir.path().join("agent.sock");
        let listener =
            UnixListener::bind(vsock).with_context(|| format!("listen on {}", vsock.display()))?;
        let target = agent_sock.clone();
        let accept = tokio::spawn(async move {
            while let Ok((host, _)) = listener.accept().await {
                tokio::spawn(splice(host, target.clone()));
            }
        });
        let child = Command::new(&binary)
            .arg("--listen")
            .arg(format!("unix:{}", agent_sock.display()))
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        Ok(HostGuest {
            child: Some(child),
            accept,
            _dir: dir,
        })
    }
}

/// One shim connection: the handshake, then bytes both ways.
async fn splice(mut host: UnixStream, agent: PathBuf) {
    let mut line = Vec::new();
    loop {
        match host.read_u8().await {
            Ok(b'\n') => break,
            Ok(b) if line.len() < 64 => line.push(b),
            _ => return,
        }
    }
    let Some(port) = line.strip_prefix(b"CONNECT ") else {
        return;
    };
    let port = port.to_vec();
    let Ok(mut guest) = UnixStream::connect(&agent).await else {
        return;
    };
    let mut ok = b"OK ".to_vec();
    ok.extend_from_slice(&port);
    ok.push(b'\n');
    if host.write_all(&ok).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
}

impl Drop for HostGuest {
    fn drop(&mut self) {
        self.accept.abort();
        stop_child(self.child.take(), "TERM", Duration::from_secs(5));
    }
}
