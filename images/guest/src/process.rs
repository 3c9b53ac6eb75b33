//! What Exec and Pty share: the start message, turning a request's argv,
//! env, cwd and user into a command, resolving users from `/etc/passwd` (no
//! NSS, so the static binary needs no libc plugins), watching the process
//! until it ends ([`supervise`]) and reporting how it ended.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::ExecExit;

/// Output chunk size; well under gRPC's 4 MiB message limit.
pub const CHUNK: usize = 64 * 1024;
/// How long output may keep flowing after the process exited (a background
/// child can hold the pipes or the terminal open).
const DRAIN: Duration = Duration::from_secs(2);

/// `PATH` when neither Init nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("environment variable name {0:?} is invalid")]
    BadEnv(String),
    #[error("argument or environment contains a NUL byte")]
    Nul,
    #[error("user {0:?} is unknown")]
    UnknownUser(String),
    #[error("read {path}")]
    ReadPasswd {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("spawn {program:?}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = crate::report::chain(&e);
        match &e {
            Error::EmptyArgv | Error::BadEnv(_) | Error::Nul | Error::UnknownUser(_) => {
                Status::invalid_argument(msg)
            }
            Error::ReadPasswd { .. } => Status::internal(msg),
            Error::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Status::not_found(msg),
                io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                io::ErrorKind::InvalidInput => Status::invalid_argument(msg),
                _ => Status::internal(msg),
            },
        }
    }
}

/// What a spawned process needs from the agent's state: the environment
/// Init set, and the passwd file users are resolved from.
#[derive(Debug, Clone)]
pub struct SpawnContext {
    pub env: BTreeMap<String, String>,
    pub passwd: PathBuf,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
}

/// Finds `user` (a name or a numeric uid) in passwd-format `text`. A numeric
/// uid missing from the file still resolves, with gid = uid.
pub fn parse_user(text: &str, user: &str) -> Option<User> {
    let numeric: Option<u32> = user.parse().ok();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == user || numeric == Some(uid) {
            return Some(User {
                uid,
                gid,
                name: f[0].to_string(),
                home: f[5].to_string(),
            });
        }
    }
    numeric.map(|uid| User {
        uid,
        gid: uid,
        name: user.to_string(),
        home: "/".to_string(),
    })
}

/// Resolves `user` against `passwd`; `None` for an empty name (run as the
/// agent's own user).
pub fn resolve_user(passwd: &Path, user: &str) -> Result<Option<User>, Error> {
    if user.is_empty() {
        return Ok(None);
    }
    let text = match std::fs::read_to_string(passwd) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(Error::ReadPasswd {
                path: passwd.display().to_string(),
                source,
            });
        }
    };
    parse_user(&text, user)
        .map(Some)
        .ok_or_else(|| Error::UnknownUser(user.to_string()))
}

/// The environment of a new process: defaults, then Init's env, then the
/// request's, later ones winning.
pub fn build_env(
    user: Option<&User>,
    init_env: &BTreeMap<String, String>,
    request_env: &std::collections::HashMap<String, String>,
    term: Option<&str>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    let (home, name) = user.map_or(("/root", "root"), |u| (u.home.as_str(), u.name.as_str()));
    env.insert("HOME".to_string(), home.to_string());
    env.insert("USER".to_string(), name.to_string());
    if let Some(term) = term {
        env.insert("TERM".to_string(), term.to_string());
    }
    for (k, v) in init_env.iter().chain(request_env.iter()) {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::BadEnv(k.clone()));
        }
        if v.contains('\0') {
            return Err(Error::Nul);
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

/// A command for `argv` with exactly `env`, in `cwd` ("/" when empty), as
/// `user` when given.
pub fn build_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: &str,
    user: Option<&User>,
) -> Result<tokio::process::Command, Error> {
    let (program, args) = argv.split_first().ok_or(Error::EmptyArgv)?;
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::Nul);
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .current_dir(if cwd.is_empty() { "/" } else { cwd });
    if let Some(u) = user {
        // std drops supplementary groups when it changes uid as root.
        cmd.uid(u.uid).gid(u.gid);
    }
    crate::sys::unblock_signals_on_spawn(&mut cmd);
    Ok(cmd)
}

/// The start message of a `call` (`Exec`, `Pty`): its first message, which
/// `start` picks out; anything else is refused.
pub async fn first_start<M, S>(
    input: &mut Streaming<M>,
    call: &str,
    start: impl FnOnce(M) -> Option<S>,
) -> Result<S, Status> {
    input.message().await?.and_then(start).ok_or_else(|| {
        Status::invalid_argument(format!("the first {call} message must be {call}Start"))
    })
}

/// A started process and the tasks around it, handed to [`supervise`].
pub struct Session<T> {
    /// The process; its pid leads its process group.
    pub child: tokio::process::Child,
    pub pid: u32,
    /// Where output and the exit go; closed when the caller went away.
    pub tx: mpsc::Sender<Result<T, Status>>,
    /// Feeds the request stream to the process.
    pub feeder: JoinHandle<()>,
    /// Copy the process's output to `tx`.
    pub readers: Vec<JoinHandle<()>>,
    /// Killed past this; `Duration::MAX` for never.
    pub timeout: Duration,
}

/// Waits for the session's process to end, killing its group past the
/// timeout or as soon as the caller went away (nobody would read the
/// result). Then it stops the feeder, gives the readers [`DRAIN`] to
/// finish, and sends how the process ended, wrapped by `exit`. Answers how
/// many readers were cut off with output still open.
pub async fn supervise<T>(s: Session<T>, exit: fn(ExecExit) -> T) -> usize {
    let Session {
        mut child,
        pid,
        tx,
        feeder,
        readers,
        timeout,
    } = s;
    let ended = tokio::select! {
        status = child.wait() => status.map(|s| (s, false)),
        () = sleep(timeout) => {
            let _ = signal_group(pid, libc::SIGKILL);
            child.wait().await.map(|s| (s, true))
        }
        () = tx.closed() => {
            let _ = signal_group(pid, libc::SIGKILL);
            let _ = child.wait().await;
            feeder.abort();
            return 0;
        }
    };
    feeder.abort();
    let mut cut = 0;
    for mut reader in readers {
        if tokio::time::timeout(DRAIN, &mut reader).await.is_err() {
            reader.abort();
            cut += 1;
        }
    }
    let msg = match ended {
        Ok((status, timed_out)) => Ok(exit(to_exit(status, timed_out))),
        Err(e) => Err(Status::internal(format!("wait for pid {pid}: {e}"))),
    };
    let _ = tx.send(msg).await;
    cut
}

/// Sleeps for `d`; forever when `d` is too large to add to now.
async fn sleep(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How a process ended, in wire form.
pub fn to_exit(status: std::process::ExitStatus, timed_out: bool) -> ExecExit {
    ExecExit {
        code: status.code(),
        signal: status.signal(),
        timed_out,
    }
}

/// Sends `signal` to process group `pgid`; a group already gone is fine.
/// Signal 0 only checks that the group exists.
pub fn signal_group(pgid: u32, signal: i32) -> Result<(), Status> {
    let sig = match signal {
        0 => None,
        s => Some(
            nix::sys::signal::Signal::try_from(s)
                .map_err(|_| Status::invalid_argument(format!("signal {signal} is invalid")))?,
        ),
    };
    // 0 would mean our own group and 1 init's: never a process we spawned.
    let pgid = match i32::try_from(pgid) {
        Ok(p) if p > 1 => p,
        _ => return Ok(()),
    };
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "signal process group {pgid}: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nbroken\n";

    #[test]
    fn resolves_names_and_uids() {
        assert_eq!(parse_user(PASSWD, "nobody").unwrap().uid, 65534);
        assert_eq!(parse_user(PASSWD, "0").unwrap().name, "root");
        let n = parse_user(PASSWD, "1234").unwrap();
        assert_eq!((n.uid, n.gid), (1234, 1234));
        assert!(parse_user(PASSWD, "ghost").is_none());
    }

    #[test]
    fn request_env_wins_and_bad_names_are_refused() {
        let init: BTreeMap<_, _> = [("A".to_string(), "1".to_string())].into();
        let req = [("A".to_string(), "2".to_string())].into();
        let env = build_env(None, &init, &req, None).unwrap();
        assert_eq!(env["A"], "2");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        let bad = [("A=B".to_string(), "x".to_string())].into();
        assert!(build_env(None, &init, &bad, None).is_err());
    }
}
