//! `wrenn-guest`: the one static binary inside a capsule's VM. As PID 1 it
//! mounts the pseudo filesystems, sets the hostname, starts the agent (a
//! child running this same binary), reaps zombies, forwards SIGTERM/SIGINT
//! and powers off cleanly; as the guest agent it serves `guest.proto`
//! (package `wrenn.guest.v1`) on vsock: Init, Exec, Pty, files, metrics,
//! health, Quiesce, detached processes and TCP connections to loopback
//! ports (Dial). It knows nothing about Kubernetes.
//!
//! Modes:
//! - `wrenn-guest` as PID 1 (or `--init`, which insists on being PID 1):
//!   init, then the agent on `vsock:<--vsock-port>` with `--owns-os`.
//! - `wrenn-guest --listen unix:/path` (or `vsock:1024`): the agent only.
//!   Without `--owns-os` it never touches the clock, hostname or caches.
//! - `wrenn-guest --probe vsock:CID:PORT` (or `unix:/path`): dials an agent
//!   as any process could and prints `served`, `closed` or `unreachable`;
//!   exits 0 only when served. The isolation tests' in-guest checker.
//!
//! Static build (the guest image has no libc). `ring` (pulled in by the
//! workspace's tonic TLS feature) compiles C, so the musl target needs the
//! Debian package `musl-tools` for `musl-gcc`:
//! ```text
//! rustup target add x86_64-unknown-linux-musl
//! CC_x86_64_unknown_linux_musl=musl-gcc \
//!   cargo build --release -p wrenn-guest --target x86_64-unknown-linux-musl
//! file target/x86_64-unknown-linux-musl/release/wrenn-guest  # static-pie linked
//! ldd  target/x86_64-unknown-linux-musl/release/wrenn-guest  # statically linked
//! # where the musl target cannot be installed, glibc linked statically:
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!   cargo build --release -p wrenn-guest --target x86_64-unknown-linux-gnu
//! ```
//! Users are resolved from `/etc/passwd` directly, so no NSS module is
//! needed at run time.

mod archive;
mod dial;
mod exec;
mod files;
mod init;
mod listen;
mod metrics;
mod output_ring;
mod probe;
mod process;
mod processes;
mod pty;
mod ratelimit;
mod report;
mod server;
mod setup;
mod sys;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wrenn_proto::guest::v1::guest_agent_server::GuestAgentServer;

use crate::listen::{Listen, Listener};

/// How long open calls may run on after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// PID 1 and guest agent inside a Wrenn capsule.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Run the PID-1 duties (needs to be PID 1; implied when it is).
    #[arg(long)]
    init: bool,
    /// vsock port the agent listens on when --listen is not given.
    #[arg(long, default_value_t = 1024)]
    vsock_port: u32,
    /// Where the agent listens: vsock:<port> or unix:<path>.
    #[arg(long)]
    listen: Option<Listen>,
    /// The agent owns the guest OS: Init may set the clock and hostname,
    /// Quiesce drops caches. Set by PID 1 for its agent child.
    #[arg(long)]
    owns_os: bool,
    /// Largest file a read or write may move, in bytes.
    #[arg(long, default_value_t = 4 << 30)]
    max_file_bytes: u64,
    /// Output bytes kept per detached process (the oldest are dropped).
    #[arg(long, default_value_t = 1 << 20)]
    process_ring_bytes: usize,
    /// Detached processes running at once, and exited ones kept listed.
    #[arg(long, default_value_t = 32)]
    max_processes: usize,
    /// PID 1: hostname until Init sets another.
    #[arg(long, default_value = "capsule")]
    hostname: String,
    /// PID 1: where the filesystems are mounted.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Dial an agent at vsock:CID:PORT or unix:PATH, say whether it served
    /// us, and exit (0 only when served).
    #[arg(long, conflicts_with_all = ["init", "listen", "owns_os"])]
    probe: Option<probe::Target>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(target) = &args.probe {
        let outcome = probe::run(target, std::time::Duration::from_secs(5));
        println!("{outcome}");
        return if outcome == probe::Outcome::Served {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listen = args
        .listen
        .clone()
        .unwrap_or(Listen::Vsock(args.vsock_port));
    if args.init || nix::unistd::getpid().as_raw() == 1 {
        let mut agent_args: Vec<OsString> = vec![
            "--owns-os".into(),
            "--listen".into(),
            match &listen {
                Listen::Vsock(port) => format!("vsock:{port}").into(),
                Listen::Unix(path) => {
                    let mut s = OsString::from("unix:");
                    s.push(path);
                    s
                }
            },
        ];
        agent_args.extend([
            "--max-file-bytes".into(),
            args.max_file_bytes.to_string().into(),
            "--process-ring-bytes".into(),
            args.process_ring_bytes.to_string().into(),
            "--max-processes".into(),
            args.max_processes.to_string().into(),
        ]);
        let config = init::InitConfig {
            root: args.root.clone(),
            hostname: args.hostname.clone(),
            agent_args,
        };
        let Err(e) = init::run(&config);
        tracing::error!(error = %report::chain(&e), "init failed");
        return ExitCode::from(1);
    }
    let config = server::Config {
        owns_os: args.owns_os,
        max_file_bytes: args.max_file_bytes,
        passwd: PathBuf::from("/etc/passwd"),
        proc: PathBuf::from("/proc"),
        random: PathBuf::from("/dev/random"),
        processes: processes::Limits {
            ring_bytes: args.process_ring_bytes,
            max_running: args.max_processes,
            max_exited: args.max_processes,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "start the runtime");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(&listen, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %report::chain(e.as_ref()), "agent failed");
            ExitCode::from(1)
        }
    }
}

async fn serve(listen: &Listen, config: server::Config) -> Result<(), Box<dyn std::error::Error>> {
    let listener = listen.bind()?;
    tracing::info!(?listen, version = server::VERSION, "guest agent listening");
    let service = GuestAgentServer::new(server::Agent::new(config));
    let router = tonic::transport::Server::builder().add_service(service);
    // On SIGTERM stop accepting, let calls finish for a moment, then go
    // even if a client keeps its connection open (the node agent does).
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        let _ = stopping_tx.send(());
    };
    let grace = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = match listener {
        Listener::Unix(l) => {
            let serve = router.serve_with_incoming_shutdown(unix_accept(l), shutdown);
            tokio::select! {
                r = serve => r,
                () = grace => Ok(()),
            }
        }
        Listener::Vsock(l) => {
            let serve = router.serve_with_incoming_shutdown(async_stream_accept(l), shutdown);
            tokio::select! {
                r = serve => r,
                () = grace => Ok(()),
            }
        }
    };
    if let Listen::Unix(path) = listen {
        let _ = std::fs::remove_file(path);
    }
    served?;
    Ok(())
}

/// Accepted Unix connections of admitted peers (see
/// [`listen::admit_unix`]) as a stream for tonic; others are closed unread.
fn unix_accept(
    l: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    let own_uid = nix::unistd::geteuid().as_raw();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let conn = match l.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    warn_limited!(error = %e, "unix accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer_uid = conn.peer_cred().ok().map(|c| c.uid());
            if let Err(refused) = listen::admit_unix(peer_uid, own_uid) {
                warn_limited!(reason = %refused, "unix connection refused");
                continue;
            }
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Accepted vsock connections (from the host only) as a stream for tonic.
fn async_stream_accept(
    l: listen::VsockListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<listen::VsockStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let conn = l.accept().await;
            if let Err(e) = &conn {
                warn_limited!(error = %e, "vsock accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            if tx.send(conn).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
