//! Every `unsafe` call of the guest: kernel ioctls (entropy, window size,
//! controlling terminal), `AF_VSOCK` sockets and the PID-1 signal handlers.
//! Each wrapper is small, owns or borrows its fds, and returns `io::Result`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool and credit it.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Builds the `struct rand_pool_info` words for `RNDADDENTROPY`: entropy
/// count in bits, buffer size in bytes, then the bytes (padded to words).
pub(crate) fn build_rand_pool_info(entropy: &[u8]) -> Vec<u32> {
    let bytes = entropy.len().min(i32::MAX as usize / 8);
    let mut words = vec![0u32; 2 + bytes.div_ceil(4)];
    words[0] = (bytes * 8) as u32;
    words[1] = bytes as u32;
    for (i, chunk) in entropy[..bytes].chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words[2 + i] = u32::from_ne_bytes(w);
    }
    words
}

/// Mixes `entropy` into the kernel input pool and credits it
/// (`RNDADDENTROPY` on an open `/dev/random`; needs CAP_SYS_ADMIN).
pub(crate) fn add_entropy(random: BorrowedFd<'_>, entropy: &[u8]) -> io::Result<()> {
    let info = build_rand_pool_info(entropy);
    // SAFETY: `info` is a live, word-aligned `struct rand_pool_info` whose
    // `buf_size` (info[1]) never exceeds the words that follow the header;
    // the kernel only reads from it.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    Ok(())
}

/// Reseeds the CRNG from the input pool (`RNDRESEEDCRNG`; CAP_SYS_ADMIN).
pub(crate) fn reseed_crng(random: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `RNDRESEEDCRNG` takes no argument and touches no user memory.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) })?;
    Ok(())
}

/// Sets a terminal's window size (`TIOCSWINSZ`); the kernel sends SIGWINCH
/// to the terminal's foreground process group.
pub(crate) fn set_window_size(tty: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `ws` is a valid `struct winsize` that outlives the call; the
    // kernel only reads it.
    check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Empties the signal mask in the child before `exec`. A mask survives
/// fork and exec, and PID 1 blocks the signals it takes with `sigwait`
/// (SIGCHLD, SIGTERM, SIGINT, SIGPWR): without this the agent, and every
/// process it starts, would inherit that mask (a shell's `wait` would never
/// return, `kill` would do nothing).
pub(crate) fn unblock_signals_on_spawn(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (sigemptyset, sigprocmask).
    unsafe {
        cmd.pre_exec(unblock_all);
    }
}

/// [`unblock_signals_on_spawn`] for a `std` command.
pub(crate) fn unblock_signals_on_std_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: as in `unblock_signals_on_spawn`.
    unsafe {
        cmd.pre_exec(unblock_all);
    }
}

fn unblock_all() -> io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `set` is initialised by sigemptyset before sigprocmask reads
    // it; both are async-signal-safe.
    unsafe {
        if libc::sigemptyset(set.as_mut_ptr()) < 0
            || libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the child a session leader whose controlling terminal is its
/// stdin (a PTY slave), before `exec`.
pub(crate) fn set_controlling_tty_on_spawn(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (setsid, ioctl); it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Opens a non-blocking `AF_VSOCK` stream socket listening on `port` of any
/// CID.
pub(crate) fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the fd is owned below.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid `sockaddr_vm`; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid `sockaddr_vm` and the length matches it.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: plain syscall on an fd we own.
    check(unsafe { libc::listen(sock.as_raw_fd(), 128) })?;
    Ok(sock)
}

/// This machine's vsock CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on
/// `/dev/vsock`).
pub(crate) fn vsock_local_cid() -> io::Result<u32> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`, which lives across the call.
    check(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &raw mut cid,
        )
    })?;
    Ok(cid)
}

/// Opens a blocking `AF_VSOCK` stream socket connected to `cid:port`.
pub(crate) fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the fd is owned below.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid `sockaddr_vm`; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid `sockaddr_vm` and the length matches it.
    check(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(sock)
}

/// Accepts one connection on a non-blocking `AF_VSOCK` listening socket;
/// the new fd is non-blocking and close-on-exec. Returns it with the
/// peer's CID, which the caller checks before serving anything on it.
/// `WouldBlock` when none is pending.
pub(crate) fn vsock_accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, u32)> {
    // SAFETY: all-zero is a valid `sockaddr_vm`; accept4 fills it in.
    let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `peer` and `len` are live and `len` is `peer`'s size, so the
    // kernel writes at most that many bytes into it.
    let fd = check(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut peer).cast::<libc::sockaddr>(),
            &raw mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by accept4(2) and nothing else owns it.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    if peer.svm_family != libc::AF_VSOCK as libc::sa_family_t {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "accepted a connection without a vsock peer address",
        ));
    }
    Ok((conn, peer.svm_cid))
}

/// Registers an owned fd with tokio's reactor.
pub(crate) fn register(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open fd that stays open, and always
    // returns the same number from `as_raw_fd`, until the `AsyncFd` drops it.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a no-op handler for `signals`. PID 1 needs a handler that is not
/// `SIG_DFL`, or the kernel drops those signals before `sigwait` sees them.
pub(crate) fn install_noop_handlers(signals: &[nix::sys::signal::Signal]) -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for &sig in signals {
        // SAFETY: the handler does nothing, so it is async-signal-safe, and
        // replacing a handler cannot invalidate any Rust state.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Makes `cmd` start its program as a daemon of its own: the child that
/// std forks forks once more and exits, and the grandchild calls `setsid` and
/// goes on to exec. The grandchild is re-parented to PID 1 (the guest's
/// reaper), so it outlives the agent call and leaves no zombie behind the
/// agent. Returns a pipe whose read end yields the grandchild's pid (a
/// native-endian `pid_t`) once `cmd.spawn()` returned; the caller drops the
/// write end right after spawning. An exec failure of the grandchild still
/// reaches `spawn()`: it holds std's error pipe open until it execs.
pub(crate) fn daemonize(cmd: &mut tokio::process::Command) -> io::Result<(OwnedFd, OwnedFd)> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let wr_fd = wr.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (fork, setsid, write, _exit) on
    // plain integers; `wr_fd` stays open in the parent until `spawn`
    // returned, because the caller holds `wr` until then.
    unsafe {
        cmd.pre_exec(move || match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            pid => {
                let bytes = pid.to_ne_bytes();
                let _ = libc::write(wr_fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        });
    }
    Ok((rd, wr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_counts_bits_and_pads_words() {
        let words = build_rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(words[0], 40);
        assert_eq!(words[1], 5);
        assert_eq!(words.len(), 4);
        assert_eq!(words[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(words[3], u32::from_ne_bytes([5, 0, 0, 0]));
    }
}
