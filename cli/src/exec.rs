//! `exec` and `shell`: one command in a capsule over the gateway's
//! `capsules/exec` WebSocket, through the API server as the user. Output
//! goes to our stdout and stderr as it arrives; our stdin (with `-i`) goes
//! to the command and its end closes the command's stdin; with a terminal,
//! raw mode and window size changes (SIGWINCH). The message formats are
//! [`crate::channel`]'s, the terminal calls [`crate::terminal`]'s.

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use wrenn_gateway::exec::{ExecOptions, build_request_path};

use crate::channel::{self, ServerFrame};
use crate::cluster::{self, Target};
use crate::terminal::{self, RawMode};

/// Why a command could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be built (a name no URL can carry).
    #[error("build the exec request for capsule {capsule:?}")]
    Request {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The API server or the gateway refused the exec.
    #[error("exec in capsule {capsule:?}")]
    Connect {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The API server does not serve `subresources.wrenn.dev`.
    #[error(
        "exec in capsule {capsule:?}: the API server does not serve subresources.wrenn.dev \
         (is wrenn-gateway installed? kubectl get apiservice v1alpha1.subresources.wrenn.dev)"
    )]
    NotServed {
        /// The capsule.
        capsule: String,
    },
    /// The connection ended before the exit status came.
    #[error("the connection to capsule {capsule:?} ended before the command's exit status")]
    NoStatus {
        /// The capsule.
        capsule: String,
    },
    /// The command could not run or ended without an exit code.
    #[error("exec in capsule {capsule:?}: {message}")]
    Failed {
        /// The capsule.
        capsule: String,
        /// The gateway's message.
        message: String,
    },
}

/// One command to run.
#[derive(Debug)]
pub struct Request {
    /// The capsule.
    pub capsule: String,
    /// Command and arguments.
    pub command: Vec<String>,
    /// Pass our stdin.
    pub stdin: bool,
    /// Ask for a terminal.
    pub tty: bool,
}

/// Messages queued towards the server before stdin reading waits.
const OUTGOING: usize = 16;
/// Bytes read from stdin per message (the gateway takes up to 1 MiB).
const STDIN_CHUNK: usize = 32 << 10;

/// Runs the command and returns its exit code.
pub async fn run(target: &Target, req: Request) -> Result<u8, Error> {
    let Request {
        capsule,
        command,
        stdin,
        tty,
    } = req;
    let stdin_fd = rustix::stdio::stdin();
    // As kubectl: a terminal only when there is one to drive it.
    let tty = tty && {
        let ok = terminal::is_terminal(stdin_fd);
        if !ok {
            eprintln!("Unable to use a TTY - input is not a terminal");
        }
        ok
    };
    let options = ExecOptions {
        command,
        stdin,
        stdout: true,
        // A terminal merges both outputs.
        stderr: !tty,
        tty,
        ..Default::default()
    };
    let http_req = http::Request::get(build_request_path(&target.namespace, &capsule, &options))
        .body(Vec::new())
        .map_err(|source| Error::Request {
            capsule: capsule.clone(),
            source,
        })?;
    let conn = match target.client.connect(http_req).await {
        Ok(c) => c,
        Err(e) => {
            return Err(match target.refusal(e, "capsule", &capsule) {
                cluster::Error::Refused { code: 404, .. } => Error::NotServed { capsule },
                source => Error::Connect { capsule, source },
            });
        }
    };
    let closable = conn.supports_stream_close();
    let (mut sink, mut source) = conn.into_stream().split();
    // Raw only when our stdin feeds the terminal; restored when this drops.
    let raw = (tty && stdin)
        .then(|| RawMode::enter(stdin_fd).ok())
        .flatten();

    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTGOING);
    if tty && let Some((cols, rows)) = terminal::window_size(rustix::stdio::stdout()) {
        let _ = tx.send(channel::build_resize(cols, rows)).await;
    }
    if stdin {
        tokio::spawn(pump_stdin(tx.clone(), closable));
    }
    if tty {
        tokio::spawn(follow_window_size(tx.clone()));
    }
    drop(tx);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::binary(m)).await.is_err() {
                return;
            }
        }
    });

    let status = print_until_status(&mut source).await;
    drop(raw);
    let status = status.ok_or_else(|| Error::NoStatus {
        capsule: capsule.clone(),
    })?;
    channel::plan_exit(&status).map_err(|message| Error::Failed { capsule, message })
}

/// Writes the server's stdout and stderr messages to ours as they come,
/// until the connection ends; answers the final `Status`, if one came.
pub async fn print_until_status<S>(source: &mut S) -> Option<serde_json::Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut status = None;
    while let Some(msg) = source.next().await {
        let data = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue,
            Err(_) => break,
        };
        // A reader that went away (`| head`) must not stop us from
        // reading the exit status, so write errors are dropped.
        match channel::parse_server(&data) {
            ServerFrame::Stdout(b) => {
                let _ = stdout.write_all(b).await;
                let _ = stdout.flush().await;
            }
            ServerFrame::Stderr(b) => {
                let _ = stderr.write_all(b).await;
                let _ = stderr.flush().await;
            }
            ServerFrame::Status(b) => status = serde_json::from_slice(b).ok(),
            ServerFrame::Ignore => {}
        }
    }
    status
}

/// Copies our stdin to the command; at its end, closes the command's stdin
/// (v5; an older protocol cannot say it).
async fn pump_stdin(tx: mpsc::Sender<Vec<u8>>, closable: bool) {
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match input.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(channel::build_stdin(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
    if closable {
        let _ = tx.send(channel::build_close_stdin()).await;
    }
}

/// Sends the terminal's size each time it changes.
async fn follow_window_size(tx: mpsc::Sender<Vec<u8>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some((cols, rows)) = terminal::window_size(rustix::stdio::stdout())
            && tx.send(channel::build_resize(cols, rows)).await.is_err()
        {
            return;
        }
    }
}
