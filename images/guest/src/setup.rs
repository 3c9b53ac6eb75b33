//! What the Init RPC changes in the guest OS: entropy first (mixed in and
//! credited, then the CRNG reseeded), then the wall clock, then the
//! hostname. The clock and hostname are only touched when the agent owns
//! the OS (PID-1 mode); on a host they are decided but not applied.

use std::io;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::time::Duration;

use crate::sys;

/// Smallest `entropy` the node agent may send.
pub const MIN_ENTROPY: usize = 32;
/// Largest accepted, to bound the ioctl buffer.
pub const MAX_ENTROPY: usize = 4096;
/// A clock closer than this to the host's is left alone (E2B's rule).
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("entropy of {0} bytes is outside {MIN_ENTROPY}..={MAX_ENTROPY}")]
    EntropySize(usize),
    #[error("hostname {0:?} is invalid")]
    Hostname(String),
    #[error("open {path:?}")]
    OpenRandom {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("add entropy")]
    AddEntropy(#[source] io::Error),
    #[error("reseed the CRNG")]
    Reseed(#[source] io::Error),
    #[error("set the clock")]
    SetClock(#[source] nix::Error),
    #[error("set the hostname to {name:?}")]
    SetHostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = crate::report::chain(&e);
        match &e {
            Error::EntropySize(_) | Error::Hostname(_) => tonic::Status::invalid_argument(msg),
            Error::AddEntropy(s) | Error::Reseed(s) | Error::OpenRandom { source: s, .. }
                if s.kind() == io::ErrorKind::PermissionDenied =>
            {
                tonic::Status::permission_denied(msg)
            }
            Error::SetClock(nix::Error::EPERM)
            | Error::SetHostname {
                source: nix::Error::EPERM,
                ..
            } => tonic::Status::permission_denied(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// Checks `entropy`'s size; empty means "none sent".
pub fn check_entropy(entropy: &[u8]) -> Result<(), Error> {
    if entropy.is_empty() || (MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        Ok(())
    } else {
        Err(Error::EntropySize(entropy.len()))
    }
}

/// What happened to the entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    /// Mixed in, credited, CRNG reseeded.
    Reseeded,
    /// Not permitted (no CAP_SYS_ADMIN): nothing changed.
    NotPermitted,
    /// None was sent.
    None,
}

/// Mixes `entropy` into the pool behind `random` (normally `/dev/random`)
/// and reseeds the CRNG. Lacking the capability is not an error.
pub fn ensure_entropy(random: &Path, entropy: &[u8]) -> Result<Entropy, Error> {
    if entropy.is_empty() {
        return Ok(Entropy::None);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(random)
        .map_err(|source| Error::OpenRandom {
            path: random.display().to_string(),
            source,
        })?;
    match sys::add_entropy(file.as_fd(), entropy) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(Entropy::NotPermitted),
        Err(e) => return Err(Error::AddEntropy(e)),
    }
    match sys::reseed_crng(file.as_fd()) {
        Ok(()) => Ok(Entropy::Reseeded),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(Entropy::NotPermitted),
        Err(e) => Err(Error::Reseed(e)),
    }
}

/// The time to step the clock to, if `guest_now` is off from `host_now` by
/// more than [`CLOCK_TOLERANCE`]; both are nanoseconds since the epoch and
/// 0 from the host means "not sent".
pub fn plan_clock_step(guest_now: i64, host_now: i64) -> Option<i64> {
    if host_now <= 0 {
        return None;
    }
    let off = guest_now.abs_diff(host_now);
    (off > CLOCK_TOLERANCE.as_nanos() as u64).then_some(host_now)
}

/// Steps `CLOCK_REALTIME` to `unix_nanos`.
pub fn set_clock(unix_nanos: i64) -> Result<(), Error> {
    let ts = nix::sys::time::TimeSpec::new(
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(Error::SetClock)
}

/// Checks a hostname: 1..=64 bytes of letters, digits, '-' and '.'.
pub fn check_hostname(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(Error::Hostname(name.to_string()))
    }
}

pub fn set_hostname(name: &str) -> Result<(), Error> {
    nix::unistd::sethostname(name).map_err(|source| Error::SetHostname {
        name: name.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_stepped_only_past_the_tolerance() {
        let host = 1_700_000_000_000_000_000;
        assert_eq!(plan_clock_step(host + 10_000_000, host), None);
        assert_eq!(plan_clock_step(host - 60_000_000, host), Some(host));
        assert_eq!(plan_clock_step(host + 3_600_000_000_000, host), Some(host));
        assert_eq!(plan_clock_step(host, 0), None);
    }

    #[test]
    fn entropy_sizes() {
        assert!(check_entropy(&[]).is_ok());
        assert!(check_entropy(&[0; 31]).is_err());
        assert!(check_entropy(&[0; 32]).is_ok());
        assert!(check_entropy(&[0; MAX_ENTROPY + 1]).is_err());
    }

    #[test]
    fn hostnames() {
        assert!(check_hostname("capsule-1.wrenn").is_ok());
        for bad in ["", "-a", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
