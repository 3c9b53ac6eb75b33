//! Host-process harness: the real `wrenn-guest` binary on a temp Unix
//! socket, reached through a shim that speaks Cloud Hypervisor's hybrid
//! vsock handshake (`CONNECT <port>\n` -> `OK <port>\n`), the way the node
//! agent will reach it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use wrenn_proto::guest::v1::guest_agent_client::GuestAgentClient;
use wrenn_testkit::VsockShim;
use wrenn_testkit::vsock_shim::read_line;

/// The guest agent's vsock port, as on a VM.
pub const PORT: u32 = 1024;

/// The access token [`started`] hands the guest at `Init`.
pub const TOKEN: &str = "t0ken-for-guest-tests";

/// `msg` with the bearer token [`started`] set.
pub fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

/// A guest started with `extra` arguments and initialised with [`TOKEN`].
pub async fn started(extra: &[&str]) -> Guest {
    let mut g = Guest::start(extra).await;
    g.client
        .init(wrenn_proto::guest::v1::InitRequest {
            unix_time_nanos: 0,
            entropy: (0..64u8).collect(),
            env: Default::default(),
            hostname: String::new(),
            access_token: TOKEN.to_string(),
        })
        .await
        .unwrap();
    g
}

/// A running agent, its handshake shim and a connected client.
pub struct Guest {
    pub dir: tempfile::TempDir,
    pub client: GuestAgentClient<Channel>,
    pub vsock: PathBuf,
    agent: Child,
    shim: VsockShim,
}

impl Guest {
    /// Starts `wrenn-guest --listen unix:...` with `extra` arguments.
    pub async fn start(extra: &[&str]) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vsock = dir.path().join("vm.vsock");
        let agent = Command::new(env!("CARGO_BIN_EXE_wrenn-guest"))
            .arg("--listen")
            .arg(format!("unix:{}", agent_sock.display()))
            .args(extra)
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&agent_sock).await;
        let shim = shim(&vsock, agent_sock);
        let client = GuestAgentClient::new(connect(&vsock).await);
        Guest {
            dir,
            client,
            vsock,
            agent,
            shim,
        }
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.shim.stop();
        let _ = Command::new("kill")
            .args(["-TERM", &self.agent.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(_)) = self.agent.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.agent.kill();
                let _ = self.agent.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts the handshake shim on `vsock`, forwarding port [`PORT`] to `agent`.
pub fn shim(vsock: &Path, agent: PathBuf) -> VsockShim {
    VsockShim::start(vsock, PORT, agent).unwrap()
}

/// Waits until `path` exists.
pub async fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The node agent's dialer: connect to the VMM's socket and do the
/// handshake.
pub async fn dial(vsock: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(vsock).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let line = read_line(&mut s)
        .await
        .ok_or_else(|| std::io::Error::other("vsock handshake: no answer"))?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::other(format!("vsock handshake: {line:?}")));
    }
    Ok(s)
}

/// A tonic channel whose every connection goes through [`dial`].
pub async fn try_connect(vsock: &Path) -> Result<Channel, tonic::transport::Error> {
    let vsock = vsock.to_path_buf();
    Endpoint::from_static("http://guest.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let vsock = vsock.clone();
            async move { dial(&vsock, PORT).await.map(TokioIo::new) }
        }))
        .await
}

/// [`try_connect`], which must succeed.
pub async fn connect(vsock: &Path) -> Channel {
    try_connect(vsock).await.unwrap()
}
