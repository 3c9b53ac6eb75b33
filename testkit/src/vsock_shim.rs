//! The VMM's hybrid-vsock muxer, imitated for tests that reach a guest agent
//! run as a host process (the guest crate's tests, the node agent's guest
//! link tests): on each connection to the VMM's socket, read one
//! `CONNECT <port>\n` line, connect to the agent's socket, answer
//! `OK <port>\n` and splice both ways. A connection for another port is
//! closed, as Cloud Hypervisor does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

type Conns = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// A running shim; dropping it stops it and every connection it carries.
#[derive(Debug)]
pub struct VsockShim {
    conns: Conns,
    accept: JoinHandle<()>,
}

impl VsockShim {
    /// Listens at `vsock` (bound before this returns, so a dial never races
    /// it) and forwards `port` to the agent's socket `agent`. Needs a tokio
    /// runtime.
    pub fn start(vsock: &Path, port: u32, agent: PathBuf) -> std::io::Result<VsockShim> {
        let listener = UnixListener::bind(vsock)?;
        let conns = Conns::default();
        let live = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((host, _)) = listener.accept().await {
                let task = tokio::spawn(splice(host, port, agent.clone()));
                lock(&live).push(task);
            }
        });
        Ok(VsockShim { conns, accept })
    }

    /// Drops every live connection, as a VMM does on restore; new ones are
    /// still accepted.
    pub fn reset(&self) {
        for t in lock(&self.conns).drain(..) {
            t.abort();
        }
    }

    /// Stops accepting and drops every live connection.
    pub fn stop(&self) {
        self.accept.abort();
        self.reset();
    }
}

impl Drop for VsockShim {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(conns: &Conns) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection: the handshake, then bytes both ways until either side
/// closes.
async fn splice(mut host: UnixStream, port: u32, agent: PathBuf) {
    let Some(line) = read_line(&mut host).await else {
        return;
    };
    if line.strip_prefix("CONNECT ").and_then(|p| p.parse().ok()) != Some(port) {
        return;
    }
    let Ok(mut guest) = UnixStream::connect(&agent).await else {
        return;
    };
    if host
        .write_all(format!("OK {port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
}

/// Reads one `\n`-terminated line (at most 64 bytes) byte by byte, so
/// nothing after it is consumed.
pub async fn read_line(s: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.ok()?;
        if b == b'\n' {
            return String::from_utf8(line).ok();
        }
        line.push(b);
        if line.len() > 64 {
            return None;
        }
    }
}
