//! The Exec RPC: one process in its own process group, stdin fed from the
//! request stream, stdout and stderr streamed back, then how it ended.
//! A timeout or a vanished caller kills the whole group. A detached
//! process (`ExecStart.detach`) is the exception: it gets a session of its
//! own, its output goes to a log file, and the call ends once it started.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::{ExecExit, ExecInput, ExecOutput, ExecStart, exec_input, exec_output};

use crate::process::{self, CHUNK, Session, SpawnContext};

pub type OutputStream = ReceiverStream<Result<ExecOutput, Status>>;

fn out(o: exec_output::Output) -> Result<ExecOutput, Status> {
    Ok(ExecOutput { output: Some(o) })
}

/// Starts the process described by the stream's first message.
pub async fn exec(
    mut input: Streaming<ExecInput>,
    ctx: SpawnContext,
) -> Result<OutputStream, Status> {
    let start = process::first_start(&mut input, "Exec", |m| match m.input {
        Some(exec_input::Input::Start(start)) => Some(start),
        _ => None,
    })
    .await?;
    let ExecStart {
        argv,
        env,
        cwd,
        user,
        timeout_ms,
        detach,
        log_path,
    } = start;
    let user = process::resolve_user(&ctx.passwd, &user)?;
    let env = process::build_env(user.as_ref(), &ctx.env, &env, None)?;
    let mut cmd = process::build_command(&argv, &env, &cwd, user.as_ref())?;
    if detach {
        return detached(cmd, &argv[0], &log_path).await;
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| process::Error::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::debug!(pid, program = %argv[0], "exec started");

    let (tx, rx) = mpsc::channel(32);
    let _ = tx.try_send(out(exec_output::Output::StartedPid(pid)));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stdin = child.stdin.take();
    let readers = [
        stdout.map(|r| tokio::spawn(pump(r, tx.clone(), exec_output::Output::Stdout))),
        stderr.map(|r| tokio::spawn(pump(r, tx.clone(), exec_output::Output::Stderr))),
    ];
    let session = Session {
        child,
        pid,
        tx,
        feeder: tokio::spawn(feed(input, stdin, pid)),
        readers: readers.into_iter().flatten().collect(),
        timeout: match timeout_ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        },
    };
    tokio::spawn(async move {
        let exit = |e: ExecExit| ExecOutput {
            output: Some(exec_output::Output::Exit(e)),
        };
        if process::supervise(session, exit).await > 0 {
            crate::warn_limited!(pid, "exec output still open after exit; dropped");
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Starts `cmd` detached (see [`crate::sys::daemonize`]): stdin from
/// `/dev/null`, stdout and stderr appended to `log_path` (created with its
/// parents; discarded when empty). Answers the pid, then an exit without
/// code or signal: the process runs on, reaped by PID 1.
async fn detached(
    mut cmd: tokio::process::Command,
    program: &str,
    log_path: &str,
) -> Result<OutputStream, Status> {
    let (stdout, stderr) = if log_path.is_empty() {
        (Stdio::null(), Stdio::null())
    } else {
        let log = open_log(log_path)?;
        let dup = log
            .try_clone()
            .map_err(|e| Status::internal(format!("duplicate log file {log_path}: {e}")))?;
        (Stdio::from(log), Stdio::from(dup))
    };
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let (pid_rd, pid_wr) = crate::sys::daemonize(&mut cmd)
        .map_err(|e| Status::internal(format!("prepare detached start: {e}")))?;
    let mut child = cmd.spawn().map_err(|source| process::Error::Spawn {
        program: program.to_string(),
        source,
    })?;
    drop(pid_wr);
    // The intermediate child wrote the pid before exiting; `spawn` only
    // returned once the grandchild exec'd, so the pipe holds it now.
    let pid = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 4];
        std::fs::File::from(pid_rd)
            .read_exact(&mut buf)
            .map(|()| i32::from_ne_bytes(buf))
    })
    .await
    .map_err(|e| Status::internal(format!("read detached pid: {e}")))?
    .map_err(|e| Status::internal(format!("read detached pid: {e}")))?;
    let _ = child.wait().await;
    let pid = u32::try_from(pid)
        .map_err(|_| Status::internal(format!("detached start reported pid {pid}")))?;
    tracing::debug!(pid, %program, "detached exec started");
    let msgs = [
        out(exec_output::Output::StartedPid(pid)),
        out(exec_output::Output::Exit(ExecExit::default())),
    ];
    let (tx, rx) = mpsc::channel(msgs.len());
    for m in msgs {
        let _ = tx.try_send(m);
    }
    Ok(ReceiverStream::new(rx))
}

/// Opens `path` for appending, creating it and its parents.
fn open_log(path: &str) -> Result<std::fs::File, Status> {
    let p = std::path::Path::new(path);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "log_path {path:?} must be absolute"
        )));
    }
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| Status::internal(format!("open log file {path}: {e}")))
}

async fn pump(
    mut reader: impl AsyncRead + Unpin,
    tx: mpsc::Sender<Result<ExecOutput, Status>>,
    wrap: fn(Vec<u8>) -> exec_output::Output,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(out(wrap(buf[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn feed(
    mut input: Streaming<ExecInput>,
    mut stdin: Option<tokio::process::ChildStdin>,
    pgid: u32,
) {
    loop {
        let msg = match input.message().await {
            Ok(Some(m)) => m,
            // The caller half-closed (or broke) its side: no more stdin.
            Ok(None) | Err(_) => {
                drop(stdin.take());
                // Keep honouring nothing else; the output side goes on.
                return;
            }
        };
        match msg.input {
            Some(exec_input::Input::Stdin(data)) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(&data).await.is_err()
                {
                    // The process closed its stdin; later input is dropped.
                    stdin = None;
                }
            }
            Some(exec_input::Input::CloseStdin(true)) => {
                if let Some(mut w) = stdin.take() {
                    let _ = w.shutdown().await;
                }
            }
            Some(exec_input::Input::Signal(sig)) => {
                if let Err(status) = process::signal_group(pgid, sig) {
                    crate::warn_limited!(pgid, error = %status.message(), "exec signal refused");
                }
            }
            Some(exec_input::Input::Start(_)) => {
                crate::warn_limited!(pgid, "second ExecStart ignored");
            }
            Some(exec_input::Input::CloseStdin(false)) | None => {}
        }
    }
}
