//! Detached processes: started with an optional tag, owned by the agent
//! rather than by any call (a connection that ends or breaks stops
//! nothing), their stdout and stderr kept in a bounded ring
//! ([`crate::output_ring`]) that any number of attachers replay and then
//! follow. Exited entries stay listed, a bounded number of them, so their
//! exit status can be read.
//!
//! Everything a caller controls is bounded: running processes
//! ([`Limits::max_running`]), kept exited entries ([`Limits::max_exited`]),
//! ring size ([`Limits::ring_bytes`]) and tag length ([`MAX_TAG_BYTES`]).
//! Each process is its own process group; signals go to the group.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use wrenn_proto::guest::v1::{
    ExecExit, ProcessInfo, ProcessOutput, ProcessRef, StartProcessRequest, process_output,
};

use crate::output_ring::{Ring, Stream};
use crate::process::{self, SpawnContext};

/// Longest tag.
pub const MAX_TAG_BYTES: usize = 63;
/// Output read from a pipe at once, and most bytes one output message
/// carries.
const CHUNK: usize = 64 * 1024;
/// Most bytes an attacher takes from the ring per pass.
const PASS: usize = 4 * CHUNK;
/// How long output may keep flowing after the process exited (a background
/// child can hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);

/// What the agent keeps at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Output bytes kept per process.
    pub ring_bytes: usize,
    /// Processes running at once.
    pub max_running: usize,
    /// Exited processes kept listed (the oldest go first).
    pub max_exited: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ring_bytes: 1 << 20,
            max_running: 32,
            max_exited: 32,
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tag {0:?} is invalid: use 1 to {MAX_TAG_BYTES} of A-Z a-z 0-9 . _ -")]
    BadTag(String),
    #[error("tag {tag:?} is held by running process {pid}")]
    TagInUse { tag: String, pid: u32 },
    #[error("{0} detached processes are running, the most this agent keeps")]
    TooMany(usize),
    #[error("no process tagged {0:?}")]
    UnknownTag(String),
    #[error("no process with pid {0}")]
    UnknownPid(u32),
    #[error("name the process by pid or tag")]
    NoRef,
    #[error("process {pid} ({tag:?}) already exited")]
    Exited { pid: u32, tag: String },
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::BadTag(_) | Error::NoRef => Status::invalid_argument(msg),
            Error::TagInUse { .. } => Status::already_exists(msg),
            Error::TooMany(_) => Status::resource_exhausted(msg),
            Error::UnknownTag(_) | Error::UnknownPid(_) => Status::not_found(msg),
            Error::Exited { .. } => Status::failed_precondition(msg),
        }
    }
}

/// A tag a process may carry (empty: none).
pub fn check_tag(tag: &str) -> Result<(), Error> {
    let ok = tag.len() <= MAX_TAG_BYTES
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadTag(tag.chars().take(MAX_TAG_BYTES + 1).collect()))
    }
}

#[derive(Debug)]
struct Entry {
    pid: u32,
    tag: String,
    argv: Vec<String>,
    started_unix_nanos: i64,
    state: Mutex<EntryState>,
    /// Bumped on new output and on exit; attachers wait on it.
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct EntryState {
    ring: Ring,
    /// How it ended and when.
    exit: Option<(ExecExit, i64)>,
}

impl Entry {
    fn state(&self) -> MutexGuard<'_, EntryState> {
        // A panicked holder leaves a ring that is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> bool {
        self.state().exit.is_none()
    }

    fn push(&self, stream: Stream, data: &[u8]) {
        self.state().ring.push(stream, data);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn finish(&self, exit: ExecExit) {
        self.state().exit = Some((exit, wrenn_proto::unix_nanos_now()));
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn info(&self) -> ProcessInfo {
        let st = self.state();
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            argv: self.argv.clone(),
            started_unix_nanos: self.started_unix_nanos,
            running: st.exit.is_none(),
            exit: st.exit.as_ref().map(|(e, _)| *e),
            output_bytes: st.ring.written(),
            dropped_bytes: st.ring.dropped(),
            exited_unix_nanos: st.exit.as_ref().map_or(0, |(_, at)| *at),
        }
    }
}

/// The agent's detached processes.
#[derive(Clone, Debug, Default)]
pub struct Table {
    limits: Limits,
    /// Oldest first.
    entries: Arc<Mutex<VecDeque<Arc<Entry>>>>,
}

/// An attacher's output.
pub type OutputStream = ReceiverStream<Result<ProcessOutput, Status>>;

fn out(o: process_output::Output) -> Result<ProcessOutput, Status> {
    Ok(ProcessOutput { output: Some(o) })
}

impl Table {
    /// An empty table keeping at most `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            entries: Arc::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, VecDeque<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `req` detached and answers what `ListProcesses` will show.
    pub async fn start(
        &self,
        req: StartProcessRequest,
        ctx: SpawnContext,
    ) -> Result<ProcessInfo, Status> {
        let StartProcessRequest {
            tag,
            argv,
            env,
            cwd,
            user,
        } = req;
        check_tag(&tag)?;
        let passwd = ctx.passwd.clone();
        // Reading /etc/passwd is file work: off the async workers.
        let user = tokio::task::spawn_blocking(move || process::resolve_user(&passwd, &user))
            .await
            .map_err(|e| Status::internal(format!("resolve the user: {e}")))??;
        let env = process::build_env(user.as_ref(), &ctx.env, &env, None)?;
        let mut cmd = process::build_command(&argv, &env, &cwd, user.as_ref())?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        // The table stays locked from the checks to the insert, so two
        // starts cannot both take one tag or the last slot.
        let entry = {
            let mut entries = self.entries();
            let running: Vec<&Arc<Entry>> = entries.iter().filter(|e| e.running()).collect();
            if let Some(e) = running.iter().find(|e| !tag.is_empty() && e.tag == tag) {
                return Err(Error::TagInUse { tag, pid: e.pid }.into());
            }
            if running.len() >= self.limits.max_running {
                return Err(Error::TooMany(running.len()).into());
            }
            let mut child = cmd.spawn().map_err(|source| process::Error::Spawn {
                program: argv[0].clone(),
                source,
            })?;
            let pid = child.id().unwrap_or(0);
            let entry = Arc::new(Entry {
                pid,
                tag,
                argv,
                started_unix_nanos: wrenn_proto::unix_nanos_now(),
                state: Mutex::new(EntryState {
                    ring: Ring::new(self.limits.ring_bytes),
                    exit: None,
                }),
                changed: watch::channel(0).0,
            });
            entries.push_back(entry.clone());
            plan_eviction(&mut entries, self.limits.max_exited);
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let done = Evict {
                entries: self.entries.clone(),
                max_exited: self.limits.max_exited,
            };
            tokio::spawn(supervise(entry.clone(), child, stdout, stderr, done));
            entry
        };
        tracing::debug!(pid = entry.pid, tag = %entry.tag, "detached process started");
        Ok(entry.info())
    }

    /// Every process kept, oldest first.
    pub fn list(&self) -> Vec<ProcessInfo> {
        self.entries().iter().map(|e| e.info()).collect()
    }

    /// The process `r` names: by pid, else the running process with the
    /// tag, else the latest exited one with it.
    fn find(&self, r: &ProcessRef) -> Result<Arc<Entry>, Error> {
        let entries = self.entries();
        if r.pid != 0 {
            return entries
                .iter()
                .rev()
                .find(|e| e.pid == r.pid)
                .cloned()
                .ok_or(Error::UnknownPid(r.pid));
        }
        if r.tag.is_empty() {
            return Err(Error::NoRef);
        }
        let tagged = || entries.iter().rev().filter(|e| e.tag == r.tag);
        tagged()
            .find(|e| e.running())
            .or_else(|| tagged().next())
            .cloned()
            .ok_or_else(|| Error::UnknownTag(r.tag.clone()))
    }

    /// Sends `signal` to the group of the running process `r` names.
    pub fn signal(&self, r: &ProcessRef, signal: i32) -> Result<ProcessInfo, Status> {
        let entry = self.find(r)?;
        if !entry.running() {
            return Err(Error::Exited {
                pid: entry.pid,
                tag: entry.tag.clone(),
            }
            .into());
        }
        process::signal_group(entry.pid, signal)?;
        Ok(entry.info())
    }

    /// The output of the process `r` names, as the AttachProcess call
    /// describes it.
    pub fn attach(&self, r: &ProcessRef, follow: bool) -> Result<OutputStream, Status> {
        let entry = self.find(r)?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(relay(entry, follow, tx));
        Ok(ReceiverStream::new(rx))
    }
}

/// Drops the oldest exited entries beyond `max_exited` (pure on the list).
fn plan_eviction(entries: &mut VecDeque<Arc<Entry>>, max_exited: usize) {
    let mut exited = entries.iter().filter(|e| !e.running()).count();
    while exited > max_exited {
        let Some(i) = entries.iter().position(|e| !e.running()) else {
            return;
        };
        entries.remove(i);
        exited -= 1;
    }
}

/// What an exit does to the table: the oldest exited entries beyond the
/// bound go.
struct Evict {
    entries: Arc<Mutex<VecDeque<Arc<Entry>>>>,
    max_exited: usize,
}

/// Pumps the output into the ring, waits for the exit and records it.
async fn supervise(
    entry: Arc<Entry>,
    mut child: tokio::process::Child,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    done: Evict,
) {
    let pumps = [
        stdout.map(|r| tokio::spawn(pump(r, entry.clone(), Stream::Stdout))),
        stderr.map(|r| tokio::spawn(pump(r, entry.clone(), Stream::Stderr))),
    ];
    let status = child.wait().await;
    // Output written just before the exit comes before the exit status.
    for mut pump in pumps.into_iter().flatten() {
        if tokio::time::timeout(DRAIN, &mut pump).await.is_err() {
            pump.abort();
            crate::warn_limited!(
                pid = entry.pid,
                "detached process output still open after exit; no longer kept"
            );
        }
    }
    let exit = match status {
        Ok(s) => process::to_exit(s, false),
        Err(e) => {
            crate::warn_limited!(pid = entry.pid, error = %e, "wait for a detached process");
            ExecExit::default()
        }
    };
    tracing::debug!(pid = entry.pid, tag = %entry.tag, ?exit, "detached process exited");
    entry.finish(exit);
    let mut entries = done.entries.lock().unwrap_or_else(|p| p.into_inner());
    plan_eviction(&mut entries, done.max_exited);
}

async fn pump(mut reader: impl AsyncRead + Unpin, entry: Arc<Entry>, stream: Stream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => entry.push(stream, &buf[..n]),
        }
    }
}

/// One attacher: what was dropped, the replay, then (with `follow`) live
/// output, then the exit once every byte went out.
async fn relay(entry: Arc<Entry>, follow: bool, tx: mpsc::Sender<Result<ProcessOutput, Status>>) {
    let mut changed = entry.changed.subscribe();
    let mut cursor = 0u64;
    let mut first = true;
    loop {
        // Marked seen before reading: a push after the read wakes us.
        changed.borrow_and_update();
        let (read, exit) = {
            let st = entry.state();
            (
                st.ring.read_from(cursor, PASS),
                st.exit.as_ref().map(|(e, _)| *e),
            )
        };
        if (first || read.dropped > 0)
            && tx
                .send(out(process_output::Output::Dropped(read.dropped)))
                .await
                .is_err()
        {
            return;
        }
        first = false;
        for (stream, data) in read.chunks {
            let o = match stream {
                Stream::Stdout => process_output::Output::Stdout(data),
                Stream::Stderr => process_output::Output::Stderr(data),
            };
            if tx.send(out(o)).await.is_err() {
                return;
            }
        }
        if read.next != cursor {
            cursor = read.next;
            continue;
        }
        if let Some(exit) = exit {
            let _ = tx.send(out(process_output::Output::Exit(exit))).await;
            return;
        }
        if !follow {
            return;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_and_plain() {
        for ok in ["", "web", "job-1.2_x", &"a".repeat(MAX_TAG_BYTES)] {
            assert!(check_tag(ok).is_ok(), "{ok:?}");
        }
        for bad in ["a b", "x/y", "é", &"a".repeat(MAX_TAG_BYTES + 1), "a\n"] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
