//! A real `wrenn-node-agent` process playing one node, for tests and the
//! local run. The node is a network namespace made for the purpose: the
//! agent runs inside it (its nftables rules, capsule namespaces and uplink
//! stay there), reached from the host over a veth pair the harness made.
//! Certificates are made per node: a CA, the agent's server certificate and
//! an operator client certificate, as the chart makes them.
//!
//! Dropping a [`NodeAgent`] stops the agent (SIGTERM, then SIGKILL) and
//! removes the namespace and the veth. Capsules outlive their agent by
//! design, so a test deletes its capsules through the API first and checks
//! for leaks itself; whatever is still there when the agent is dropped (a
//! failed test) is killed and unmounted by [`crate::reclaim`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_proto::guest::v1 as gpb;

use crate::workspace_root;

/// TLS material of one node, as PEM files in a directory.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (signs both sides here).
    pub ca: PathBuf,
    /// Agent server certificate and key.
    pub server_cert: PathBuf,
    /// Agent server key.
    pub server_key: PathBuf,
    /// Operator client certificate.
    pub client_cert: PathBuf,
    /// Operator client key.
    pub client_key: PathBuf,
}

/// The name agents' certificates carry (the chart's default).
pub const SERVER_NAME: &str = "wrenn-node-agent";

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run_ok(Command::new("openssl").current_dir(dir), "openssl", args)
}

/// Runs `cmd` (named `program`) with `args`, failing with its stderr.
fn run_ok(cmd: &mut Command, program: &str, args: &[&str]) -> Result<()> {
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `openssl req`'s arguments for a new unencrypted P-256 key.
const NEW_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

impl Pki {
    /// Makes a CA and the two leaf certificates in `dir` with openssl.
    pub fn create(dir: &Path, node_ip: Ipv4Addr) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        openssl(
            dir,
            &[
                &["req", "-x509"],
                NEW_KEY,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=wrenn test CA",
                ],
            ]
            .concat(),
        )?;
        let leaf = |name: &str, cn: &str, ext: String| leaf(dir, name, cn, &ext);
        leaf(
            "server",
            SERVER_NAME,
            format!(
                "subjectAltName=DNS:{SERVER_NAME},DNS:localhost,IP:{node_ip},IP:127.0.0.1\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )?;
        leaf(
            "client",
            "wrenn-operator",
            "extendedKeyUsage=clientAuth\n".into(),
        )?;
        Ok(Pki {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        })
    }
}

/// A key and a certificate `name.{key,crt}` for `cn` in `dir`, signed by
/// the CA there (`ca.{crt,key}`), with the extensions `ext`.
fn leaf(dir: &Path, name: &str, cn: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            &["req"],
            NEW_KEY,
            &[
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

/// The gateway's certificates, signed by a node [`Pki`]'s CA: its client
/// certificate towards the agents and its serving certificate for the
/// API server's front proxy (the APIService's caBundle is that CA).
#[derive(Clone, Debug)]
pub struct GatewayPki {
    /// Client certificate (CN `wrenn-gateway`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Serving certificate for `service_dns`.
    pub serving_cert: PathBuf,
    /// Its key.
    pub serving_key: PathBuf,
}

impl Pki {
    /// Makes the gateway's certificates beside this PKI's, the serving one
    /// for the Service name `service_dns` (`NAME.NAMESPACE.svc`).
    pub fn gateway(&self, service_dns: &str) -> Result<GatewayPki> {
        let dir = self.ca.parent().context("the CA has a directory")?;
        leaf(
            dir,
            "gateway-client",
            "wrenn-gateway",
            "extendedKeyUsage=clientAuth\n",
        )?;
        leaf(
            dir,
            "gateway-serving",
            service_dns,
            &format!("subjectAltName=DNS:{service_dns}\nextendedKeyUsage=serverAuth\n"),
        )?;
        Ok(GatewayPki {
            client_cert: dir.join("gateway-client.crt"),
            client_key: dir.join("gateway-client.key"),
            serving_cert: dir.join("gateway-serving.crt"),
            serving_key: dir.join("gateway-serving.key"),
        })
    }
}

/// The guest kernel, initramfs and root disk from `images/build.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Artifact directory.
    pub dir: PathBuf,
    /// Kernel release the image carries (`uname -r` in the guest).
    pub kernel_release: String,
}

impl GuestImage {
    /// `images/build.sh` output, building it when absent (cached by inputs).
    pub fn build() -> Result<GuestImage> {
        let out = Command::new(workspace_root().join("images/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .context("run images/build.sh")?;
        if !out.status.success() {
            bail!("images/build.sh failed: {}", out.status);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json"))
                .with_context(|| format!("read {}/manifest.json", dir.display()))?,
        )
        .context("parse the guest image manifest")?;
        let kernel_release = manifest["kernel"]["release"]
            .as_str()
            .context("manifest has no kernel.release")?
            .to_string();
        Ok(GuestImage {
            dir,
            kernel_release,
        })
    }

    /// Kernel image.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// Initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }
    /// The root disk's name in [`Self::dir`], which agents take as their
    /// image directory: what templates name as `rootfs.path`.
    pub const ROOTFS: &'static str = "rootfs.ext4";

    /// Root disk (raw ext4).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(Self::ROOTFS)
    }
}

/// Builds the agent binary (debug) and returns its path.
pub fn agent_binary() -> Result<PathBuf> {
    crate::build::cargo_build("wrenn-node-agent", "wrenn-node-agent")
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run_ok(&mut Command::new("ip"), "ip", args)
}

/// Options of one agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Node name (also names the namespace).
    pub node_name: String,
    /// Index 1..=250: picks the veth subnet 10.251.<index>.0/30.
    pub index: u8,
    /// Guest image whose kernel and initramfs the agent uses.
    pub image: GuestImage,
    /// Certificates shared with other nodes (one operator talks to all);
    /// `None` makes a CA for this node alone.
    pub pki: Option<Pki>,
    /// How long a guest may take until its agent answers
    /// (`--guest-ready-secs`); `None` keeps the agent's default. The vm
    /// tier passes its calibrated budget (`wrenn_testkit::vm`).
    pub guest_ready: Option<Duration>,
}

/// A running agent in its node namespace.
#[derive(Debug)]
pub struct NodeAgent {
    /// Node name.
    pub node_name: String,
    /// Namespace playing the node.
    pub netns: String,
    /// Address the agent serves on (node side of the veth), port 7443.
    pub addr: std::net::SocketAddr,
    /// TLS material.
    pub pki: Pki,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Where this agent mounts capsule namespaces: its own, so agents
    /// sharing this host never sweep each other's.
    pub netns_dir: PathBuf,
    /// The agent's log file.
    pub log: PathBuf,
    host_veth: String,
    node_veth: String,
    binary: PathBuf,
    image: GuestImage,
    guest_ready: Option<Duration>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl NodeAgent {
    /// Makes the node namespace and starts the agent in it (`--vmm qemu`,
    /// `--storage qcow2`), waiting until its port accepts connections.
    pub fn start(opts: &AgentOptions) -> Result<NodeAgent> {
        let binary = agent_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("wrenn-node-")
            .tempdir()
            .context("make the node directory")?;
        let suffix = &opts.node_name[opts.node_name.len().saturating_sub(6)..];
        let netns = format!("wrenn-node-{suffix}");
        let host_veth = format!("wnh-{suffix}");
        let node_veth = format!("wnn-{suffix}");
        let host_ip = Ipv4Addr::new(10, 251, opts.index, 1);
        let node_ip = Ipv4Addr::new(10, 251, opts.index, 2);
        let mut agent = NodeAgent {
            node_name: opts.node_name.clone(),
            netns: netns.clone(),
            addr: (node_ip, 7443).into(),
            pki: match &opts.pki {
                Some(p) => p.clone(),
                None => Pki::create(&dir.path().join("pki"), node_ip)?,
            },
            state_dir: dir.path().join("state"),
            netns_dir: dir.path().join("netns"),
            log: dir.path().join("agent.log"),
            host_veth: host_veth.clone(),
            node_veth: node_veth.clone(),
            binary,
            image: opts.image.clone(),
            guest_ready: opts.guest_ready,
            child: None,
            dir,
        };
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &node_veth, "netns", &netns,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth])?;
        ip(&["link", "set", &host_veth, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{node_ip}/30"),
            "dev",
            &node_veth,
        ])?;
        ip(&["-n", &netns, "link", "set", &node_veth, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ])?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process in the node (again, after [`Self::stop`] or
    /// [`Self::kill9`]: same state directory, so it adopts its capsules),
    /// waiting until its port accepts connections.
    pub fn spawn(&mut self) -> Result<()> {
        let agent = self;
        // Appends: a restart keeps the earlier log for failure messages.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log)
            .context("open the agent log")?;
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the
        // cgroup hierarchy the agent places VMMs in.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", agent.netns))
            .arg(&agent.binary)
            .args(["--node-name", &agent.node_name, "--listen", "0.0.0.0:7443"])
            .arg("--tls-cert")
            .arg(&agent.pki.server_cert)
            .arg("--tls-key")
            .arg(&agent.pki.server_key)
            .arg("--client-ca")
            .arg(&agent.pki.ca)
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .arg("--netns-dir")
            .arg(&agent.netns_dir)
            // Its own cgroup parent: a starting agent kills what runs in
            // cgroups it does not know, other agents' VMs included.
            .arg("--cgroup-parent")
            .arg(format!("wrenn-{}", agent.node_name))
            .args([
                "--vmm",
                "qemu",
                "--storage",
                "qcow2",
                "--uplink",
                &agent.node_veth,
            ])
            .arg("--kernel")
            .arg(agent.image.kernel())
            // Templates name the guest image's root disk relative to it.
            .arg("--image-dir")
            .arg(&agent.image.dir)
            .arg("--initramfs")
            .arg(agent.image.initramfs())
            .args(["--admin-listen", "127.0.0.1:9090", "--log-level", "info"])
            // As the chart: the operator and the gateway may call it.
            .env("WRENN_CLIENT_NAMES", "wrenn-operator,wrenn-gateway")
            // A test bed is no kubelet node: the VMMs may use every CPU and
            // all memory (two agents share this machine's cores already).
            .args(["--reserved-cpus", "0", "--reserved-memory", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log handle")?)
            .stderr(log);
        if let Some(ready) = agent.guest_ready {
            cmd.arg(format!("--guest-ready-secs={}", ready.as_secs().max(1)));
        }
        let child = cmd.spawn().context("start wrenn-node-agent")?;
        agent.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect_timeout(&agent.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if let Some(child) = agent.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "agent exited ({status}) during start:\n{}",
                    agent.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("agent not listening within 30 s:\n{}", agent.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        crate::child::tail(&self.log, 40)
    }

    /// Stops the agent process (SIGTERM, then SIGKILL after 10 s); capsules
    /// keep running, as in production. nsenter execs the agent, so the
    /// child is the agent itself.
    pub fn stop(&mut self) {
        crate::child::stop_child(self.child.take(), "TERM", Duration::from_secs(10));
    }

    /// Kills the agent with SIGKILL, as a crash or OOM kill would.
    pub fn kill9(&mut self) {
        crate::child::stop_child(self.child.take(), "KILL", Duration::from_secs(5));
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
        // A failed test's message names the symptom; the agent log has the
        // cause (a guest that never answered logs the host's view of it:
        // processes, QMP run state, console and VMM log tails).
        if std::thread::panicking() {
            eprintln!(
                "[node {}] agent log, last lines:\n{}",
                self.node_name,
                crate::child::tail(&self.log, 150)
            );
        }
        // Capsules still here (a test that failed before deleting them)
        // would hold QEMU processes, cgroups and mounted namespaces past
        // the test; a test that passed checked for leaks already, so this
        // finds nothing but the empty cgroup parent.
        let left =
            crate::reclaim::reclaim(&format!("wrenn-{}", self.node_name), &[self.dir.path()]);
        if !left.killed.is_empty() || !left.unmounted.is_empty() {
            eprintln!(
                "[node {}] reclaimed after the agent: killed {:?}, unmounted {:?}",
                self.node_name, left.killed, left.unmounted
            );
        }
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// A gRPC client of one agent, as the operator holds it.
pub type AgentClient = NodeAgentClient<Channel>;

/// Dials `addr` over mutual TLS with the operator's client certificate.
pub async fn connect(pki: &Pki, addr: std::net::SocketAddr) -> Result<AgentClient> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&pki.ca)?))
        .identity(Identity::from_pem(
            read(&pki.client_cert)?,
            read(&pki.client_key)?,
        ))
        .domain_name(SERVER_NAME);
    let channel = Channel::from_shared(format!("https://{addr}"))
        .context("agent URL")?
        .tls_config(tls)
        .context("TLS config")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connect to the agent at {addr}"))?;
    Ok(NodeAgentClient::new(channel).max_decoding_message_size(16 << 20))
}

impl NodeAgent {
    /// A client of this agent.
    pub async fn connect(&self) -> Result<AgentClient> {
        connect(&self.pki, self.addr).await
    }
}

/// What a finished exec printed and how it ended.
#[derive(Debug, Default)]
pub struct Ran {
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
}

/// Runs `argv` in capsule `uid` with `stdin`, collecting its output,
/// through the agent's Exec stream.
pub async fn exec(
    c: &mut AgentClient,
    uid: &str,
    argv: &[&str],
    stdin: &[u8],
) -> Result<Ran, tonic::Status> {
    let input = |i: gpb::exec_input::Input, uid: &str| pb::ExecInput {
        uid: uid.into(),
        input: Some(gpb::ExecInput { input: Some(i) }),
    };
    let mut msgs = vec![input(
        gpb::exec_input::Input::Start(gpb::ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 60_000,
            ..Default::default()
        }),
        uid,
    )];
    if !stdin.is_empty() {
        msgs.push(input(gpb::exec_input::Input::Stdin(stdin.to_vec()), ""));
    }
    msgs.push(input(gpb::exec_input::Input::CloseStdin(true), ""));
    let (tx, rx) = mpsc::channel(msgs.len());
    for m in msgs {
        tx.send(m)
            .await
            .map_err(|_| tonic::Status::internal("exec input channel closed"))?;
    }
    drop(tx);
    let mut out = c.exec(ReceiverStream::new(rx)).await?.into_inner();
    let mut ran = Ran::default();
    while let Some(msg) = out.message().await? {
        match msg.output {
            Some(gpb::exec_output::Output::Stdout(b)) => {
                ran.stdout.push_str(&String::from_utf8_lossy(&b))
            }
            Some(gpb::exec_output::Output::Stderr(b)) => {
                ran.stderr.push_str(&String::from_utf8_lossy(&b))
            }
            Some(gpb::exec_output::Output::Exit(e)) => ran.code = e.code,
            _ => {}
        }
    }
    Ok(ran)
}
