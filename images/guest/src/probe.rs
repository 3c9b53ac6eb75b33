//! `wrenn-guest --probe ADDR`: dials a guest agent the way a process inside
//! the guest (or another host user) would, and says whether it was served.
//! It is the in-guest checker of the isolation tests: an unprivileged
//! process that dials the agent's port must never get an answer.
//!
//! "Served" means the listener answered an HTTP/2 client preface with
//! bytes (tonic sends its SETTINGS frame); an admission check closes the
//! connection unread instead, and without a vsock loopback transport the
//! connect itself fails.

use std::io::{self, Read, Write};
use std::str::FromStr;
use std::time::Duration;

/// A vsock CID to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cid {
    Number(u32),
    /// This machine's own CID, asked of `/dev/vsock`.
    Own,
}

/// What `--probe` dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `vsock:CID:PORT`; `vsock:self:PORT` is the guest's own CID.
    Vsock { cid: Cid, port: u32 },
    /// `unix:PATH`.
    Unix(std::path::PathBuf),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("probe address {s:?} is neither vsock:<cid>:<port> nor unix:<path>");
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid = match cid {
                "self" => Cid::Own,
                n => Cid::Number(n.parse().map_err(|_| bad())?),
            };
            return Ok(Target::Vsock {
                cid,
                port: port.parse().map_err(|_| bad())?,
            });
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Target::Unix(path.into())),
            _ => Err(bad()),
        }
    }
}

/// The probe's verdict, printed as one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The listener answered the preface.
    Served,
    /// Connected, then closed (or reset) without a byte.
    Closed,
    /// The connect itself failed.
    Unreachable(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Served => f.write_str("served"),
            Outcome::Closed => f.write_str("closed"),
            Outcome::Unreachable(e) => write!(f, "unreachable: {e}"),
        }
    }
}

/// HTTP/2 client connection preface plus an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Dials `target`, sends the preface and waits up to `wait` for an answer.
pub fn run(target: &Target, wait: Duration) -> Outcome {
    let stream = match connect(target) {
        Ok(s) => s,
        Err(e) => return Outcome::Unreachable(e.to_string()),
    };
    answer(stream, wait)
}

fn connect(target: &Target) -> io::Result<std::os::unix::net::UnixStream> {
    match target {
        Target::Unix(path) => std::os::unix::net::UnixStream::connect(path),
        Target::Vsock { cid, port } => {
            let cid = match cid {
                Cid::Number(n) => *n,
                Cid::Own => crate::sys::vsock_local_cid()?,
            };
            let fd = crate::sys::vsock_connect(cid, *port)?;
            // A connected stream socket reads and writes like a Unix stream;
            // only the address family differs, which we never ask for.
            Ok(std::os::unix::net::UnixStream::from(fd))
        }
    }
}

fn answer(mut stream: std::os::unix::net::UnixStream, wait: Duration) -> Outcome {
    if stream.set_read_timeout(Some(wait)).is_err() || stream.write_all(PREFACE).is_err() {
        return Outcome::Closed;
    }
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(n) if n > 0 => Outcome::Served,
        // EOF, reset, or silence until the deadline: nothing was served.
        _ => Outcome::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_are_refused_by_name() {
        assert_eq!(
            "vsock:1:1024".parse::<Target>(),
            Ok(Target::Vsock {
                cid: Cid::Number(1),
                port: 1024
            })
        );
        assert_eq!(
            "vsock:self:1024".parse::<Target>(),
            Ok(Target::Vsock {
                cid: Cid::Own,
                port: 1024
            })
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<Target>(),
            Ok(Target::Unix("/run/a.sock".into()))
        );
        for bad in ["vsock:1", "vsock:x:1", "unix:", "tcp:1.2.3.4:5"] {
            let err = bad.parse::<Target>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_listener_that_answers_is_served_and_one_that_hangs_up_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let talks = dir.path().join("talks.sock");
        let hangs = dir.path().join("hangs.sock");
        let l1 = std::os::unix::net::UnixListener::bind(&talks).unwrap();
        let l2 = std::os::unix::net::UnixListener::bind(&hangs).unwrap();
        let t1 = std::thread::spawn(move || {
            let (mut c, _) = l1.accept().unwrap();
            c.write_all(b"\x00").unwrap();
        });
        let t2 = std::thread::spawn(move || drop(l2.accept().unwrap()));
        let wait = Duration::from_secs(5);
        assert_eq!(run(&Target::Unix(talks), wait), Outcome::Served);
        assert_eq!(run(&Target::Unix(hangs), wait), Outcome::Closed);
        t1.join().unwrap();
        t2.join().unwrap();
        let gone = run(&Target::Unix(dir.path().join("none.sock")), wait);
        assert!(matches!(gone, Outcome::Unreachable(_)), "{gone}");
    }
}
