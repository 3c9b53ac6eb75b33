//! The steps of one template build (`build`), in order:
//! 1. the root disk, through the code path a create uses (image cache or a
//!    rootfs path on the node);
//! 2. for a warm template, one at a time per node (`warm_builds`):
//!    boot an internal build VM through the supervisor (journaled like any
//!    capsule, so recovery removes it, but hidden from the capsule API),
//!    start `start_command` detached in the guest, probe readiness about
//!    every second until the timeout, snapshot the VM with memory as
//!    `snapshot_id` (the same steps `SnapshotCapsule` takes), and remove
//!    the build VM, whatever happened.
//!
//! How the build reaches its guest is a [`BuildGuest`]: [`AgentGuest`]
//! talks to `wrenn-guest` over vsock and opens TCP probes from inside the
//! capsule's network namespace; tests use a fake.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio_stream::StreamExt as _;
use wrenn_proto::guest::v1 as gpb;

use super::api::SnapshotInfo;
use super::model::{BootSource, CapsuleSpec, Egress, State, TemplateDisk};
use super::prepare::{PrepareRequest, Readiness, ReadyTemplate, TemplateSource, WarmSpec};
use super::supervisor::{GuestSettings, Shared, Supervisor};
use crate::images::ImageSource;
use crate::network::GUEST_ADDR;
use crate::vmm::Machine;

/// Where the start command's stdout and stderr go in the guest.
pub const START_LOG: &str = "/var/log/wrenn-start.log";
/// Longest output tail a failure message quotes.
const TAIL_BYTES: usize = 1024;
/// Bound of one readiness probe.
const PROBE_BOUND: Duration = Duration::from_secs(10);

/// Why a build failed, as `TemplateState` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// CamelCase reason.
    pub(crate) reason: &'static str,
    /// The cause.
    pub(crate) message: String,
}

fn fail(reason: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        reason,
        message: message.into(),
    }
}

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

/// The internal capsule id of the build VM of snapshot `snapshot_id`: not
/// a UUID, so it never meets an operator's capsule. Agents sharing a host
/// keep their build VMs apart by their own state dir and cgroup parent.
pub(crate) fn build_uid(snapshot_id: &str) -> String {
    let h = format!("{:x}", Sha256::digest(snapshot_id.as_bytes()));
    format!("warm-{}", &h[..20])
}

fn tail(bytes: &[u8]) -> String {
    let from = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[from..]).trim().to_string()
}

impl<M: Machine + 'static> Shared<M> {
    /// Which capsule wrote snapshot `id` (its metadata's `capsule_uid`);
    /// `None` when no complete snapshot has that id.
    pub(crate) fn warm_snapshot_owner(&self, id: &str) -> Option<String> {
        let meta = self
            .layout
            .snapshot_dir(id)
            .join(super::sources::SNAPSHOT_META);
        let body = std::fs::read(meta).ok()?;
        serde_json::from_slice::<SnapshotInfo>(&body)
            .ok()
            .map(|i| i.capsule_uid)
    }
}

/// Runs the build of `req` (see the module docs).
pub(crate) async fn build<M: Machine + 'static>(
    shared: &std::sync::Arc<Shared<M>>,
    key: &(String, String),
    req: &PrepareRequest,
) -> Result<ReadyTemplate, Failure> {
    shared.progress(key, "preparing the root disk");
    let (rootfs, digest) = root_disk(shared, req).await?;
    let ready = ReadyTemplate {
        key: req.key.clone(),
        digest: digest.clone(),
        rootfs: rootfs.clone(),
        snapshot_id: String::new(),
    };
    let Some(warm) = &req.warm else {
        return Ok(ready);
    };
    shared.progress(key, "waiting for another warm build to finish");
    let _permit = shared
        .templates
        .warm_gate
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| fail("Aborted", "the agent is shutting down"))?;
    let uid = build_uid(&warm.snapshot_id);
    match shared.warm_snapshot_owner(&warm.snapshot_id) {
        // Built before (an agent restart between the snapshot and the
        // answer): nothing to do.
        Some(owner) if owner == uid => {
            return Ok(ReadyTemplate {
                snapshot_id: warm.snapshot_id.clone(),
                ..ready
            });
        }
        Some(owner) => {
            return Err(fail(
                "SnapshotExists",
                format!(
                    "snapshot {} already exists on this node, taken from capsule {owner}",
                    warm.snapshot_id
                ),
            ));
        }
        None => {}
    }
    let sup = Supervisor {
        shared: shared.clone(),
    };
    shared.progress(key, "booting the build VM");
    let spec = build_spec(req, warm, &rootfs, &digest);
    let vm = boot(&sup, &uid, spec).await?;
    let built = warm_up(&sup, key, warm, &vm).await;
    // The build VM goes whatever happened; its snapshot (if any) stays.
    match sup.delete_with(&uid, true).await {
        Ok(_) => {}
        Err(e) => {
            tracing::error!(vm = %uid, error = &e as &dyn std::error::Error, "remove a build VM; the next agent start removes it");
        }
    }
    built?;
    Ok(ReadyTemplate {
        snapshot_id: warm.snapshot_id.clone(),
        ..ready
    })
}

/// Makes the root disk exist: the image cache entry a create of the same
/// template would use, or the rootfs file. Returns it and its digest.
async fn root_disk<M: Machine + 'static>(
    shared: &Shared<M>,
    req: &PrepareRequest,
) -> Result<(PathBuf, String), Failure> {
    let failed = |m: String| fail("RootDiskFailed", m);
    match &req.source {
        TemplateSource::Rootfs(path) => {
            let p = path.clone();
            let meta = tokio::task::spawn_blocking(move || std::fs::metadata(p))
                .await
                .map_err(|_| failed("the root disk check was aborted".into()))?;
            match meta {
                Ok(m) if m.is_file() => Ok((path.clone(), req.digest.clone())),
                Ok(_) => Err(failed(format!(
                    "rootfs {} is not a regular file",
                    path.display()
                ))),
                Err(e) => Err(failed(format!("rootfs {}: {e}", path.display()))),
            }
        }
        TemplateSource::Image(reference) => {
            let image_failed = |e: crate::images::Error| {
                failed(format!(
                    "build template disk from {reference}: {}",
                    chain(&e)
                ))
            };
            let source = ImageSource::parse(reference).map_err(image_failed)?;
            let disk = shared
                .cfg
                .templates
                .ensure(&source, req.disk_bytes)
                .await
                .map_err(image_failed)?;
            if !req.digest.is_empty() && req.digest != disk.manifest_digest {
                return Err(failed(format!(
                    "image {reference} has manifest digest {}, the template pins {}",
                    disk.manifest_digest, req.digest
                )));
            }
            Ok((disk.path, disk.manifest_digest))
        }
    }
}

/// The build VM's spec: the prepared disk as a plain template, the warm
/// shape and environment.
fn build_spec(
    req: &PrepareRequest,
    warm: &WarmSpec,
    rootfs: &std::path::Path,
    digest: &str,
) -> CapsuleSpec {
    CapsuleSpec {
        namespace: String::new(),
        name: "warm-build".into(),
        source: BootSource::Template(TemplateDisk {
            key: req.key.clone(),
            rootfs: rootfs.to_path_buf(),
            digest: digest.to_string(),
        }),
        resources: warm.resources,
        kernel: req.kernel.clone(),
        cmdline: req.cmdline.clone(),
        env: warm.env.clone(),
        egress: Egress::Allow,
    }
}

/// Creates the build VM and returns how its guest is reached.
async fn boot<M: Machine + 'static>(
    sup: &Supervisor<M>,
    uid: &str,
    spec: CapsuleSpec,
) -> Result<BuildVm, Failure> {
    let view = sup
        .create_with(uid, spec, State::Running, true)
        .await
        .map_err(|e| fail("BootFailed", e.chain()))?;
    let netns = match sup.entry(uid, true) {
        Some(entry) => entry
            .lock
            .lock()
            .await
            .as_ref()
            .and_then(|r| r.netns.clone()),
        None => None,
    };
    Ok(BuildVm {
        uid: uid.to_string(),
        vsock_socket: view.vsock_socket.unwrap_or_default(),
        netns,
        guest_addr: GUEST_ADDR,
        guest_token: view.guest_token,
    })
}

/// Start, readiness, snapshot. The caller removes the VM.
async fn warm_up<M: Machine + 'static>(
    sup: &Supervisor<M>,
    key: &(String, String),
    warm: &WarmSpec,
    vm: &BuildVm,
) -> Result<SnapshotInfo, Failure> {
    let shared = &sup.shared;
    let guest = shared.build_guest();
    let deadline = tokio::time::Instant::now() + warm.timeout;
    shared.progress(key, "starting the start command");
    let started =
        tokio::time::timeout_at(deadline, guest.start(vm, &warm.start_command, START_LOG))
            .await
            .map_err(|_| {
                fail(
                    "StartFailed",
                    format!(
                        "start {:?} did not answer within the timeout",
                        warm.start_command
                    ),
                )
            })?;
    let pid = started.map_err(|e| fail("StartFailed", chain(&e)))?;
    tracing::info!(vm = %vm.uid, pid, "warm build started its process");
    shared.progress(key, "waiting for readiness");
    let mut probes = 0u32;
    let mut last: Option<String> = None;
    loop {
        // A VM that died will never get ready.
        match sup
            .entry(&vm.uid, true)
            .map(|e| e.view.lock().unwrap_or_else(|p| p.into_inner()).clone())
        {
            Some(v) if v.state == State::Running => {}
            Some(v) => {
                return Err(fail(
                    "BootFailed",
                    format!("the build VM is {}: {} {}", v.state, v.reason, v.message),
                ));
            }
            None => return Err(fail("BootFailed", "the build VM is gone")),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let within = PROBE_BOUND.min(deadline - now);
        probes += 1;
        let outcome = tokio::time::timeout(
            within + Duration::from_secs(2),
            guest.probe(vm, &warm.readiness, within),
        )
        .await;
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(vm = %vm.uid, probes, "warm build ready");
                shared.progress(key, "snapshotting the build VM");
                return sup
                    .snapshot_with(&vm.uid, &warm.snapshot_id, true, true)
                    .await
                    .map_err(|e| fail("SnapshotFailed", e.chain()));
            }
            Ok(Err(e)) => last = Some(chain(&e)),
            Err(_) => last = Some(format!("the probe did not answer within {within:?}")),
        }
        let pause = shared.cfg.warm_probe_every;
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let mut message = format!(
        "not ready after {}s ({probes} probes); last probe: {}",
        warm.timeout.as_secs(),
        last.unwrap_or_else(|| "none ran".into())
    );
    if let Some(log) = guest.log_tail(vm, START_LOG).await
        && !log.is_empty()
    {
        message.push_str(&format!("; {START_LOG}: {log:?}"));
    }
    Err(fail("ReadinessTimeout", message))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl<M: Machine + 'static> Shared<M> {
    fn build_guest(&self) -> std::sync::Arc<dyn BuildGuest> {
        match &self.cfg.build_guest {
            Some(g) => g.clone(),
            None => std::sync::Arc::new(AgentGuest {
                settings: self.cfg.guest.unwrap_or_default(),
            }),
        }
    }
}

/// The real [`BuildGuest`]: the guest agent over vsock for the start and
/// exec probes, a TCP connection from inside the capsule's namespace for
/// port probes.
#[derive(Clone, Copy, Debug)]
pub struct AgentGuest {
    /// How the guest agent is reached.
    pub settings: GuestSettings,
}

impl AgentGuest {
    async fn client(&self, vm: &BuildVm) -> Result<crate::guest::GuestClient, crate::guest::Error> {
        crate::guest::GuestClient::connect_with(
            &vm.uid,
            &vm.vsock_socket,
            self.settings.port,
            self.settings.timeouts,
        )
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
                        crate::sys::net::tcp_connect_in_netns(&ns, addr, within)
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
