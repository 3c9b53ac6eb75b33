//! The Pty RPC: one process on a fresh pseudo-terminal as session leader,
//! input and resizes from the request stream, terminal output streamed back,
//! then how it ended.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::{
    ExecExit, PtyInput, PtyOutput, PtySize, PtyStart, pty_input, pty_output,
};

use crate::process::{self, CHUNK, Session, SpawnContext};
use crate::sys;

const DEFAULT_SIZE: (u16, u16) = (24, 80);

pub type OutputStream = ReceiverStream<Result<PtyOutput, Status>>;

fn out(o: pty_output::Output) -> Result<PtyOutput, Status> {
    Ok(PtyOutput { output: Some(o) })
}

/// Validates a terminal size: both sides in 1..=u16::MAX.
pub fn to_size(size: Option<&PtySize>) -> Result<(u16, u16), Status> {
    let Some(size) = size else {
        return Ok(DEFAULT_SIZE);
    };
    match (u16::try_from(size.rows), u16::try_from(size.cols)) {
        (Ok(r), Ok(c)) if r > 0 && c > 0 => Ok((r, c)),
        _ => Err(Status::invalid_argument(format!(
            "terminal size {}x{} is out of range",
            size.rows, size.cols
        ))),
    }
}

/// Starts the process described by the stream's first message on a PTY.
pub async fn pty(
    mut input: Streaming<PtyInput>,
    ctx: SpawnContext,
) -> Result<OutputStream, Status> {
    let start = process::first_start(&mut input, "Pty", |m| match m.input {
        Some(pty_input::Input::Start(start)) => Some(start),
        _ => None,
    })
    .await?;
    let PtyStart {
        argv,
        env,
        cwd,
        user,
        size,
    } = start;
    let (rows, cols) = to_size(size.as_ref())?;
    let user = process::resolve_user(&ctx.passwd, &user)?;
    let env = process::build_env(user.as_ref(), &ctx.env, &env, Some("xterm"))?;
    let mut cmd = process::build_command(&argv, &env, &cwd, user.as_ref())?;

    let winsize = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(&winsize, None)
        .map_err(|e| Status::internal(format!("open a pty: {e}")))?;
    let stdio = |fd: &OwnedFd| -> Result<Stdio, Status> {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| Status::internal(format!("duplicate the pty: {e}")))
    };
    cmd.stdin(stdio(&pty.slave)?)
        .stdout(stdio(&pty.slave)?)
        .stderr(stdio(&pty.slave)?)
        .kill_on_drop(true);
    sys::set_controlling_tty_on_spawn(&mut cmd);
    let child = cmd.spawn().map_err(|source| process::Error::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    // Only the child may hold the slave, so reads see EIO once it is gone.
    drop(cmd);
    drop(pty.slave);
    let pid = child.id().unwrap_or(0);
    let master = set_nonblocking(pty.master)
        .and_then(sys::register)
        .map_err(|e| Status::internal(format!("register the pty: {e}")))?;
    let master = std::sync::Arc::new(master);

    let (tx, rx) = mpsc::channel(32);
    let _ = tx.try_send(out(pty_output::Output::StartedPid(pid)));
    let session = Session {
        child,
        pid,
        readers: vec![tokio::spawn(read_loop(master.clone(), tx.clone()))],
        tx,
        feeder: tokio::spawn(feed(input, master, pid)),
        // A terminal session ends when its process does, or its caller.
        timeout: Duration::MAX,
    };
    tokio::spawn(async move {
        let exit = |e: ExecExit| PtyOutput {
            output: Some(pty_output::Output::Exit(e)),
        };
        // A background job may keep the terminal open; its output is cut.
        process::supervise(session, exit).await;
    });
    Ok(ReceiverStream::new(rx))
}

fn set_nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(fd)
}

async fn read_loop(
    master: std::sync::Arc<AsyncFd<OwnedFd>>,
    tx: mpsc::Sender<Result<PtyOutput, Status>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(io::Error::from))
        {
            // EIO: every slave fd is closed, the session is over.
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => {
                if tx
                    .send(out(pty_output::Output::Data(buf[..n].to_vec())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(_would_block) => {}
        }
    }
}

async fn write_all(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn feed(mut input: Streaming<PtyInput>, master: std::sync::Arc<AsyncFd<OwnedFd>>, pgid: u32) {
    while let Ok(Some(msg)) = input.message().await {
        match msg.input {
            Some(pty_input::Input::Data(data)) => {
                let written = write_all(&master, &data).await;
                if written.is_err() {
                    return;
                }
            }
            Some(pty_input::Input::Resize(size)) => match to_size(Some(&size)) {
                Ok((rows, cols)) => {
                    if let Err(e) = sys::set_window_size(master.get_ref().as_fd(), rows, cols) {
                        crate::warn_limited!(pgid, error = %e, "pty resize failed");
                    }
                }
                Err(status) => {
                    crate::warn_limited!(pgid, error = %status.message(), "pty resize refused");
                }
            },
            Some(pty_input::Input::Signal(sig)) => {
                if let Err(status) = process::signal_group(pgid, sig) {
                    crate::warn_limited!(pgid, error = %status.message(), "pty signal refused");
                }
            }
            Some(pty_input::Input::Start(_)) => {
                crate::warn_limited!(pgid, "second PtyStart ignored");
            }
            None => {}
        }
    }
}
