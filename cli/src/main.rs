//! `kubectl wrenn`: reach inside Wrenn capsules with your own kubeconfig.
//! Requests go to the Kubernetes API server only (`subresources.wrenn.dev`,
//! served by wrenn-gateway), so RBAC decides who may do what, as for Pods.
//!
//! ```text
//! kubectl wrenn exec hello -- uname -a
//! kubectl wrenn exec -it hello -- sh
//! echo 'print(6*7)' | kubectl wrenn exec -i -n team-a hello -- python3
//! ```
//!
//! The command's exit code is the plugin's exit code.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::Message;
use wrenn_gateway::exec::{ExecOptions, build_request_path, exit_code_of};

/// kubectl plugin for Wrenn capsules.
#[derive(Debug, Parser)]
#[command(name = "kubectl-wrenn", version, about)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command in a capsule, as `kubectl exec` does in a Pod.
    ///
    /// Examples:
    ///   kubectl wrenn exec hello -- uname -a
    ///   kubectl wrenn exec -it hello -- sh
    ///   echo hi | kubectl wrenn exec -i hello -- cat
    #[command(verbatim_doc_comment)]
    Exec {
        /// Pass stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Run it on a terminal (with -i: an interactive shell).
        #[arg(short = 't', long)]
        tty: bool,
        /// The capsule.
        capsule: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kubectl-wrenn: start async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let Cli {
        namespace,
        context,
        command,
    } = cli;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .context("load the kubeconfig")?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("build the Kubernetes client")?;
    match command {
        Command::Exec {
            stdin,
            tty,
            capsule,
            command,
        } => exec(&client, &namespace, &capsule, &command, stdin, tty).await,
    }
}

/// Puts the terminal in raw mode until dropped.
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        let stdin = rustix::stdio::stdin();
        match rustix::termios::tcgetattr(stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                raw.make_raw();
                let ok =
                    rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw)
                        .is_ok();
                Self(ok.then_some(saved))
            }
            Err(_) => Self(None),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                rustix::stdio::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn resize_frame() -> Option<Message> {
    let ws = rustix::termios::tcgetwinsize(rustix::stdio::stdout()).ok()?;
    let mut m = vec![4u8];
    m.extend_from_slice(
        serde_json::json!({ "Width": ws.ws_col, "Height": ws.ws_row })
            .to_string()
            .as_bytes(),
    );
    Some(Message::binary(m))
}

async fn exec(
    client: &kube::Client,
    ns: &str,
    capsule: &str,
    command: &[String],
    stdin: bool,
    tty: bool,
) -> Result<u8> {
    let tty = tty && rustix::termios::isatty(rustix::stdio::stdin());
    let options = ExecOptions {
        command: command.to_vec(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
        ..Default::default()
    };
    let req = http::Request::get(build_request_path(ns, capsule, &options))
        .body(Vec::new())
        .context("build the request")?;
    let conn = match client.connect(req).await {
        Ok(c) => c,
        Err(kube::Error::Api(s)) => anyhow::bail!("{}", s.message),
        Err(e) => return Err(e).context(format!("exec in capsule {capsule}")),
    };
    let closable = conn.supports_stream_close();
    let (mut sink, mut source) = conn.into_stream().split();
    let _raw = tty.then(RawTerminal::enter);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    if tty && let Some(m) = resize_frame() {
        let _ = tx.send(m).await;
    }
    if stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut m = Vec::with_capacity(n + 1);
                        m.push(0u8);
                        m.extend_from_slice(&buf[..n]);
                        if tx.send(Message::binary(m)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if closable {
                let _ = tx.send(Message::binary(vec![255u8, 0])).await;
            }
        });
    }
    if tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(m) = resize_frame()
                    && tx.send(m).await.is_err()
                {
                    return;
                }
            }
        });
    }
    drop(tx);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut status = None;
    while let Some(msg) = source.next().await {
        let Ok(Message::Binary(b)) = msg else {
            if msg.is_err() {
                break;
            }
            continue;
        };
        let Some((&ch, data)) = b.split_first() else {
            continue;
        };
        match ch {
            1 => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(data);
                let _ = out.flush();
            }
            2 => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(data);
                let _ = err.flush();
            }
            3 => status = serde_json::from_slice::<serde_json::Value>(data).ok(),
            _ => {}
        }
    }
    drop(_raw);
    let Some(status) = status else {
        anyhow::bail!("the connection ended before the command's exit status");
    };
    match exit_code_of(&status) {
        Some(code) => Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        None => anyhow::bail!(
            "{}",
            status["message"].as_str().unwrap_or("the command failed")
        ),
    }
}
