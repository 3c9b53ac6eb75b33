//! Where the agent listens: `AF_VSOCK` inside a VM, a Unix socket on a host
//! (tests, development). Both yield byte streams that tonic serves, and
//! both admit only the node agent's side before a byte is read: on vsock
//! the host's CID ([`admit_vsock`]), on a Unix socket a peer with the
//! agent's own uid or root ([`admit_unix`]). A process inside the guest
//! that dials the agent's port over vsock loopback arrives with CID 1 or
//! the guest's own CID and is closed at once.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// `VMADDR_CID_HOST`: connections the VMM forwards from the host's vsock
/// socket (Cloud Hypervisor's hybrid vsock, vhost-vsock) carry it.
pub const HOST_CID: u32 = 2;

/// Why a connection was closed unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("vsock peer CID {0} is not the host (2)")]
    NotHost(u32),
    #[error("unix socket peer uid {peer} is neither root nor the agent's uid {own}")]
    OtherUser { peer: u32, own: u32 },
    #[error("unix socket peer credentials are unavailable")]
    NoCredentials,
}

/// Only the host may talk to the agent over vsock. Inside the guest,
/// `connect(VMADDR_CID_LOCAL | own CID, port)` goes through the loopback
/// transport and the agent sees that CID here; a sibling VM cannot reach
/// us at all (vsock never routes guest to guest).
pub fn admit_vsock(peer_cid: u32) -> Result<(), Refused> {
    if peer_cid == HOST_CID {
        Ok(())
    } else {
        Err(Refused::NotHost(peer_cid))
    }
}

/// On a Unix socket (host tests, development), the stand-in for "the
/// host": a peer running as root or as the agent's own user. Any other
/// user is an unprivileged process that must not reach an agent which
/// runs commands as root.
pub fn admit_unix(peer_uid: Option<u32>, own_uid: u32) -> Result<(), Refused> {
    match peer_uid {
        Some(0) => Ok(()),
        Some(peer) if peer == own_uid => Ok(()),
        Some(peer) => Err(Refused::OtherUser { peer, own: own_uid }),
        None => Err(Refused::NoCredentials),
    }
}

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

    /// Waits for the next connection from the host; connections from any
    /// other CID are closed unread (see [`admit_vsock`]).
    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::vsock_accept(fd.get_ref().as_fd())) {
                Ok(accepted) => {
                    let (conn, peer_cid) = accepted?;
                    if let Err(refused) = admit_vsock(peer_cid) {
                        crate::warn_limited!(peer_cid, reason = %refused, "vsock connection refused");
                        drop(conn);
                        continue;
                    }
                    return Ok(VsockStream {
                        fd: sys::register(conn)?,
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
    fn vsock_admits_only_the_host() {
        assert_eq!(admit_vsock(HOST_CID), Ok(()));
        // VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL (loopback inside the
        // guest), a guest's own CID, VMADDR_CID_ANY: all refused.
        for cid in [0, 1, 3, 42, u32::MAX] {
            assert_eq!(admit_vsock(cid), Err(Refused::NotHost(cid)), "{cid}");
        }
    }

    #[test]
    fn unix_admits_root_and_the_agents_user_only() {
        assert_eq!(admit_unix(Some(0), 1000), Ok(()));
        assert_eq!(admit_unix(Some(1000), 1000), Ok(()));
        assert_eq!(admit_unix(Some(0), 0), Ok(()));
        assert_eq!(
            admit_unix(Some(65534), 0),
            Err(Refused::OtherUser {
                peer: 65534,
                own: 0
            })
        );
        assert_eq!(admit_unix(None, 0), Err(Refused::NoCredentials));
    }

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
