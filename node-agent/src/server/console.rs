//! `ReadConsole`: a capsule's serial console log as the node keeps it in
//! the capsule's VMM run directory (capped in place by `vmm::logs`): the
//! tail, then with `follow` what the guest prints next. The file is polled
//! every [`FOLLOW_EVERY`] (no inotify: the VMM writes without telling
//! anyone, and a quarter second is as fresh as a person reads); the stream
//! ends when the client goes away or the capsule leaves the node.

use std::io::{self, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::{Request, Response, Status};
use wrenn_proto::agent::v1 as pb;

use super::convert::{to_status, validate_uid};
use super::{AgentService, BoxStream};
use crate::vmm::logs;

/// How often a following reader looks for new bytes.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Most bytes one read sends: the tail (the file keeps about this much
/// after capping) or one follow step.
pub const MAX_READ: u64 = logs::DEFAULT_MAX_BYTES;

/// The last `lines` lines of `text` (all of it for 0), pure.
pub fn plan_tail(text: &[u8], lines: u32) -> &[u8] {
    if lines == 0 {
        return text;
    }
    // A final newline ends the last line; it does not start another.
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// The console file in run directory `dir`, whichever VMM writes it.
fn console_file(dir: &Path) -> Option<PathBuf> {
    [logs::CH_SERIAL_LOG, logs::QEMU_CONSOLE_LOG]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Bytes `from..` of `path` (at most [`MAX_READ`], the newest when more),
/// without the zeros of a punched-out head, and the offset read to.
/// Blocking.
fn read_from(path: &Path, from: u64) -> io::Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // A shorter file is a new one (the VMM started again): from its start.
    let from = if len < from { 0 } else { from };
    let start = from.max(len.saturating_sub(MAX_READ));
    f.seek(io::SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(len - start).read_to_end(&mut bytes)?;
    let skip = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.drain(..skip);
    Ok((bytes, len))
}

pub(super) async fn read_console(
    svc: &AgentService,
    req: Request<pb::ReadConsoleRequest>,
) -> Result<Response<BoxStream<pb::ConsoleChunk>>, Status> {
    let req = req.into_inner();
    validate_uid(&req.uid)?;
    let capsules = svc.capsules.clone();
    capsules.get(&req.uid).map_err(|e| to_status(&e))?;
    let dir = match &svc.console_root {
        Some(root) => root.join(&req.uid),
        None => capsules.console_dir(&req.uid),
    };
    let uid = req.uid.clone();
    let first = tokio::task::spawn_blocking(move || {
        let Some(file) = console_file(&dir) else {
            return Ok((dir, None, Vec::new(), 0));
        };
        let (bytes, offset) = read_from(&file, 0)?;
        Ok::<_, io::Error>((dir, Some(file), bytes, offset))
    })
    .await
    .map_err(|e| Status::internal(format!("read the console of capsule {uid}: {e}")))?
    .map_err(|e| Status::internal(format!("read the console of capsule {uid}: {e}")))?;
    let (dir, mut file, bytes, mut offset) = first;
    let tail = plan_tail(&bytes, req.tail_lines).to_vec();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let follow = req.follow;
    // A follower counts as activity on the capsule until it goes away.
    let open = follow.then(|| svc.activity.hold(&req.uid));
    tokio::spawn(async move {
        let _open = open;
        if !tail.is_empty() && tx.send(Ok(pb::ConsoleChunk { data: tail })).await.is_err() {
            return;
        }
        if !follow {
            return;
        }
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = tick.tick() => {}
            }
            if capsules.get(&uid).is_err() {
                return;
            }
            let (d, f, from) = (dir.clone(), file.clone(), offset);
            let step = tokio::task::spawn_blocking(move || {
                let Some(f) = f.or_else(|| console_file(&d)) else {
                    return Ok((None, Vec::new(), 0));
                };
                let (bytes, to) = read_from(&f, from)?;
                Ok::<_, io::Error>((Some(f), bytes, to))
            })
            .await;
            match step {
                Ok(Ok((f, bytes, to))) => {
                    (file, offset) = (f, to);
                    if !bytes.is_empty()
                        && tx.send(Ok(pb::ConsoleChunk { data: bytes })).await.is_err()
                    {
                        return;
                    }
                }
                // The run directory went with the VM: nothing more to read.
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => return,
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "read the console of capsule {uid}: {e}"
                        ))))
                        .await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_last_lines() {
        assert_eq!(plan_tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(plan_tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(plan_tail(b"a\nb\nc\n", 0), b"a\nb\nc\n");
        assert_eq!(plan_tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(plan_tail(b"", 3), b"");
    }

    #[test]
    fn reads_skip_a_punched_head_and_restart_on_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(logs::CH_SERIAL_LOG);
        std::fs::write(&f, b"\0\0\0boot\n").unwrap();
        let (b, to) = read_from(&f, 0).unwrap();
        assert_eq!((b.as_slice(), to), (&b"boot\n"[..], 8));
        std::fs::write(&f, b"new\n").unwrap();
        let (b, to) = read_from(&f, 8).unwrap();
        assert_eq!((b.as_slice(), to), (&b"new\n"[..], 4));
        assert_eq!(console_file(dir.path()), Some(f));
    }
}
