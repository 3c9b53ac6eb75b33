//! How a warm build reaches its guest: a [`BuildGuest`] starts the build's
//! process and probes readiness. [`AgentGuest`] talks to `wrenn-guest` over
//! vsock and opens TCP probes from inside the capsule's network namespace;
//! tests use a fake.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::StreamExt as _;
use wrenn_proto::guest::v1 as gpb;

use super::Readiness;

/// Longest output tail a failure message quotes.
pub(crate) const TAIL_BYTES: usize = 1024;

/// Errors of the guest side of a build. Display names the step and the
/// build VM; the cause is in `source()` or the fields.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest call failed.
    #[error("{action} in build VM {uid}")]
    Guest {
        /// `start the start command`, `run the readiness probe`, ...
        action: &'static str,
        /// Build VM.
        uid: String,
        /// Why.
        #[source]
        source: Box<crate::guest::Error>,
    },
    /// The guest ended a start without saying the process started.
    #[error("start {program:?} in build VM {uid}: the guest reported no pid")]
    NoPid {
        /// Build VM.
        uid: String,
        /// argv\[0\].
        program: String,
    },
    /// The readiness command ran and did not exit 0.
    #[error("probe {argv:?} exited with {how}; output: {tail:?}")]
    ProbeExit {
        /// The probe.
        argv: Vec<String>,
        /// `code 1`, `signal 9`, `a timeout`.
        how: String,
        /// The end of its stdout and stderr.
        tail: String,
    },
    /// Nothing accepted the TCP probe.
    #[error("connect to {addr} in {}", netns.display())]
    Connect {
        /// Guest address and port.
        addr: SocketAddr,
        /// The capsule's namespace.
        netns: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The build VM has no network namespace to probe from.
    #[error("build VM {uid} has no network namespace")]
    NoNetns {
        /// Build VM.
        uid: String,
    },
}

/// The build VM as its guest is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildVm {
    /// Its internal capsule id.
    pub uid: String,
    /// Host side of its guest agent's vsock.
    pub vsock_socket: PathBuf,
    /// Its network namespace.
    pub netns: Option<PathBuf>,
    /// The guest's address inside that namespace.
    pub guest_addr: Ipv4Addr,
    /// What its guest agent requires.
    pub guest_token: Option<crate::guest::GuestToken>,
}

/// A boxed future of a [`BuildGuest`].
pub type GuestFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Capability: start the build's process and probe its readiness.
pub trait BuildGuest: Send + Sync + std::fmt::Debug {
    /// Starts `argv` detached, its output appended to `log_path`; returns
    /// its pid.
    fn start<'a>(
        &'a self,
        vm: &'a BuildVm,
        argv: &'a [String],
        log_path: &'a str,
    ) -> GuestFuture<'a, Result<u32, Error>>;
    /// One readiness probe, bounded by `within`.
    fn probe<'a>(
        &'a self,
        vm: &'a BuildVm,
        readiness: &'a Readiness,
        within: Duration,
    ) -> GuestFuture<'a, Result<(), Error>>;
    /// The end of the start command's log, for a failure message.
    fn log_tail<'a>(
        &'a self,
        vm: &'a BuildVm,
        log_path: &'a str,
    ) -> GuestFuture<'a, Option<String>>;
}

pub(crate) fn tail(bytes: &[u8]) -> String {
    let from = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[from..]).trim().to_string()
}

/// The real [`BuildGuest`]: the guest agent over vsock for the start and
/// exec probes, a TCP connection from inside the capsule's namespace for
/// port probes.
#[derive(Clone, Copy, Debug)]
pub struct AgentGuest {
    /// vsock port `wrenn-guest` listens on.
    pub port: u32,
    /// Per-call bounds.
    pub timeouts: crate::guest::Timeouts,
}

impl AgentGuest {
    async fn client(&self, vm: &BuildVm) -> Result<crate::guest::GuestClient, crate::guest::Error> {
        crate::guest::GuestClient::connect_with(&vm.uid, &vm.vsock_socket, self.port, self.timeouts)
            .await?
            .with_token(vm.guest_token.as_ref().map_or("", |t| t.expose()))
    }

    /// Runs `start` and collects its output, pid and exit.
    async fn run(
        &self,
        vm: &BuildVm,
        start: gpb::ExecStart,
        action: &'static str,
    ) -> Result<(Option<u32>, Vec<u8>, Option<gpb::ExecExit>), Error> {
        let err = |source| Error::Guest {
            action,
            uid: vm.uid.clone(),
            source: Box::new(source),
        };
        let client = self.client(vm).await.map_err(err)?;
        let input = [
            gpb::ExecInput {
                input: Some(gpb::exec_input::Input::Start(start)),
            },
            gpb::ExecInput {
                input: Some(gpb::exec_input::Input::CloseStdin(true)),
            },
        ];
        let mut out = client.exec(tokio_stream::iter(input)).await.map_err(err)?;
        let (mut pid, mut output, mut exit) = (None, Vec::new(), None);
        while let Some(msg) = out.next().await {
            let msg = msg.map_err(|status| {
                err(crate::guest::Error::Call {
                    capsule: vm.uid.clone(),
                    rpc: "Exec",
                    source: status,
                })
            })?;
            match msg.output {
                Some(gpb::exec_output::Output::StartedPid(p)) => pid = Some(p),
                Some(gpb::exec_output::Output::Stdout(b) | gpb::exec_output::Output::Stderr(b)) => {
                    output.extend(b);
                    let excess = output.len().saturating_sub(TAIL_BYTES);
                    output.drain(..excess);
                }
                Some(gpb::exec_output::Output::Exit(e)) => exit = Some(e),
                None => {}
            }
        }
        Ok((pid, output, exit))
    }
}

impl BuildGuest for AgentGuest {
    fn start<'a>(
        &'a self,
        vm: &'a BuildVm,
        argv: &'a [String],
        log_path: &'a str,
    ) -> GuestFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            let start = gpb::ExecStart {
                argv: argv.to_vec(),
                detach: true,
                log_path: log_path.to_string(),
                ..Default::default()
            };
            let (pid, _, _) = self.run(vm, start, "start the start command").await?;
            pid.ok_or_else(|| Error::NoPid {
                uid: vm.uid.clone(),
                program: argv.first().cloned().unwrap_or_default(),
            })
        })
    }

    fn probe<'a>(
        &'a self,
        vm: &'a BuildVm,
        readiness: &'a Readiness,
        within: Duration,
    ) -> GuestFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            match readiness {
                Readiness::Exec(argv) => {
                    let start = gpb::ExecStart {
                        argv: argv.clone(),
                        timeout_ms: u64::try_from(within.as_millis()).unwrap_or(u64::MAX),
                        ..Default::default()
                    };
                    let (_, output, exit) = self.run(vm, start, "run the readiness probe").await?;
                    let how = match exit {
                        Some(gpb::ExecExit { code: Some(0), .. }) => return Ok(()),
                        Some(gpb::ExecExit {
                            timed_out: true, ..
                        }) => format!("a timeout after {within:?}"),
                        Some(gpb::ExecExit { code: Some(c), .. }) => format!("code {c}"),
                        Some(gpb::ExecExit {
                            signal: Some(s), ..
                        }) => format!("signal {s}"),
                        _ => "no exit status".to_string(),
                    };
                    Err(Error::ProbeExit {
                        argv: argv.clone(),
                        how,
                        tail: tail(&output),
                    })
                }
                Readiness::TcpPort(port) => {
                    let netns = vm.netns.clone().ok_or_else(|| Error::NoNetns {
                        uid: vm.uid.clone(),
                    })?;
                    let addr = SocketAddr::from((vm.guest_addr, *port));
                    let ns = netns.clone();
                    let res = tokio::task::spawn_blocking(move || {
                        crate::network::probe_tcp(&ns, addr, within)
                    })
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("probe thread died")));
                    res.map_err(|source| Error::Connect {
                        addr,
                        netns,
                        source,
                    })
                }
            }
        })
    }

    fn log_tail<'a>(
        &'a self,
        vm: &'a BuildVm,
        log_path: &'a str,
    ) -> GuestFuture<'a, Option<String>> {
        Box::pin(async move {
            let client = self.client(vm).await.ok()?;
            let mut chunks = client
                .read_file(gpb::ReadFileRequest {
                    path: log_path.to_string(),
                    max_bytes: 1 << 20,
                })
                .await
                .ok()?;
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = chunks.next().await {
                data.extend(chunk.data);
            }
            Some(tail(&data))
        })
    }
}
