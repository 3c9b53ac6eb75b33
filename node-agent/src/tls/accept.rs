//! The gRPC port's accept loop: every connection needs a slot (at most
//! [`Limits::max_connections`] at once, counted from TCP accept to close)
//! and must finish its TLS handshake within [`Limits::handshake_timeout`].
//! A connection beyond the cap is closed at once; connections already held
//! keep working. Handshakes run in their own tasks, so one peer that never
//! speaks delays nobody else.
//!
//! The handshake deadline bounds how long an unauthenticated peer holds a
//! slot, so a flood of them delays the operator by at most that long.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::reload::Reloader;

/// Limits of the gRPC port.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time from TCP accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections held at once, handshaking or established.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 128,
        }
    }
}

/// An authenticated connection. It holds its slot until dropped.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().0.connect_info()
    }
}

/// Accepts on `listener` and sends each authenticated connection to `out`,
/// until `out` is closed (the server stopped). Returns only an accept error
/// that retrying cannot fix.
pub async fn run(
    listener: TcpListener,
    tls: Arc<Reloader>,
    limits: Limits,
    out: mpsc::Sender<io::Result<TlsConn>>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused = Refusals::default();
    loop {
        let accepted = tokio::select! {
            _ = out.closed() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, "gRPC accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        configure_accepted(&tcp);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closing at once tells the peer; queueing would let a flood
            // hold memory and sockets without bound.
            drop(tcp);
            refused.note(peer, limits.max_connections);
            continue;
        };
        let acceptor = TlsAcceptor::from(tls.config());
        let out = out.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(inner)) => {
                    let _ = out.send(Ok(TlsConn { inner, _slot: slot })).await;
                }
                // Peers are anyone on the node network: their failures are
                // for debugging, never a warning a stranger can trigger.
                Ok(Err(e)) => tracing::debug!(
                    %peer,
                    error = &e as &dyn std::error::Error,
                    "TLS handshake refused"
                ),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Socket options of every accepted connection: no Nagle delay, as
/// tonic's own listener sets. gRPC writes small frames in a row (response
/// headers, each output chunk, trailers): with Nagle on, one written
/// behind an unacknowledged one waits for the client's delayed ACK (40 ms
/// on Linux), which every exec through the gateway paid.
fn configure_accepted(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = &e as &dyn std::error::Error, "set TCP_NODELAY");
    }
}

/// Connections closed at the cap, reported at most every 30 s.
#[derive(Debug, Default)]
struct Refusals {
    since_report: u64,
    last_report: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: std::net::SocketAddr, cap: usize) {
        self.since_report += 1;
        if self
            .last_report
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            tracing::warn!(
                %peer,
                refused = self.since_report,
                max_connections = cap,
                "gRPC connection cap reached; closing new connections"
            );
            self.since_report = 0;
            self.last_report = Some(Instant::now());
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn accepted_connections_write_small_frames_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        assert!(!tcp.nodelay().unwrap(), "the kernel's default has Nagle on");
        configure_accepted(&tcp);
        assert!(tcp.nodelay().unwrap());
    }
}
