//! Passing file descriptors over Unix sockets (SCM_RIGHTS): what the VMM
//! API client sends a TAP or a memory file with, and what tests receive
//! them with.
#![allow(unsafe_code)]

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most descriptors one message may carry (Cloud Hypervisor's micro_http and
/// the kernel's `SCM_MAX_FD` both stop at 253).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Sends `data` with `fds` attached as SCM_RIGHTS in one `sendmsg`. Returns
/// the number of bytes of `data` written; the descriptors ride with the
/// first byte, so a short write still delivered all of them. Never raises
/// SIGPIPE. A non-blocking socket may give `WouldBlock`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors exceed the limit of {MAX_FDS_PER_MESSAGE} per message",
                fds.len()
            ),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// Receives into `buf` and takes ownership of any descriptors that came
/// with it (marked close-on-exec). Returns `(bytes, fds)`; zero bytes and no
/// descriptors means the peer closed.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel has just installed `fd` in our table for
                // this message; nothing else in the process knows about it,
                // so this is its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let bytes = msg.bytes;
    if truncated {
        return Err(io::Error::other(
            "control data truncated: descriptors were lost",
        ));
    }
    Ok((bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"hi", &[file.as_fd()]).unwrap(), 2);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 1));
        let sent = nix::sys::stat::fstat(file.as_fd()).unwrap();
        let got = nix::sys::stat::fstat(fds[0].as_fd()).unwrap();
        assert_eq!((sent.st_dev, sent.st_ino), (got.st_dev, got.st_ino));
    }
}
