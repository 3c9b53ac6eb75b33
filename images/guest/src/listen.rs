//! Where the agent listens: `AF_VSOCK` inside a VM, a Unix socket on a host
//! (tests, development). Both yield byte streams that tonic serves.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// A listening address, parsed from `vsock:<port>` or `unix:<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `AF_VSOCK`, any CID, this port.
    Vsock(u32),
    /// A Unix socket at this path (removed first if it is a stale socket).
    Unix(PathBuf),
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen address {0:?} is neither vsock:<port> nor unix:<path>")]
    Parse(String),
    #[error("listen on vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("listen on unix socket {path:?}")]
    Unix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FromStr for Listen {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| Error::Parse(s.to_string()));
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Listen::Unix(PathBuf::from(path))),
            _ => Err(Error::Parse(s.to_string())),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Vsock(VsockListener),
    Unix(tokio::net::UnixListener),
}

impl Listen {
    /// Binds the address. A stale Unix socket file is replaced.
    pub fn bind(&self) -> Result<Listener, Error> {
        match self {
            Listen::Vsock(port) => {
                VsockListener::bind(*port)
                    .map(Listener::Vsock)
                    .map_err(|source| Error::Vsock {
                        port: *port,
                        source,
                    })
            }
            Listen::Unix(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                tokio::net::UnixListener::bind(path)
                    .map(Listener::Unix)
                    .map_err(|source| Error::Unix {
                        path: path.clone(),
                        source,
                    })
            }
        }
    }
}

/// A non-blocking `AF_VSOCK` listener registered with tokio.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    fn bind(port: u32) -> io::Result<Self> {
        Ok(Self {
            fd: sys::register(sys::vsock_listen(port)?)?,
        })
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::accept(fd.get_ref().as_fd())) {
                Ok(conn) => {
                    return Ok(VsockStream {
                        fd: sys::register(conn?)?,
                    });
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// One accepted vsock connection.
#[derive(Debug)]
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl tonic::transport::server::Connected for VsockStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

fn to_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(to_io)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(to_io)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(self.fd.get_ref()),
            nix::sys::socket::Shutdown::Write,
        );
        Poll::Ready(r.map_err(to_io))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_and_refuses_others() {
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/a.sock".into())
        );
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }
}
