//! The Wrenn node agent: one per node, privileged. It serves `agent.proto`
//! over mutual TLS to the operator and owns everything on the host — VMM
//! processes, copy-on-write root disks, capsule network namespaces, the vsock
//! link to each guest, metrics and the on-disk journal used for recovery. It
//! never reads or writes Capsule objects in Kubernetes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use wrenn_node_agent::args::{Args, DiskArgs, VmmBackend};
use wrenn_node_agent::capsule::OrphanSweep;
use wrenn_node_agent::capsule::{GuestSettings, Host, HostFigures, Supervisor, SupervisorConfig};
use wrenn_node_agent::images::{ImageDirs, PullOptions, TemplateBuilder, TemplateSettings};
use wrenn_node_agent::metrics::admin::{AdminArgs, AdminListen};
use wrenn_node_agent::metrics::{self, Metrics};
use wrenn_node_agent::network::{EgressFlags, LinuxNet, LinuxNetConfig};
use wrenn_node_agent::node::{NodePaths, VmmCap, read_facts};
use wrenn_node_agent::server::{self, AgentIdentity, AgentService};
use wrenn_node_agent::storage::{self, BackendChoice, StorageConfig};
use wrenn_node_agent::tls::{PortArgs, PortConfig, TlsFiles};
use wrenn_node_agent::vmm::cgroup::{
    CPU_PERIOD_US, CgroupRoot, VmmBudget, plan_parent_limits, whole_disk_of,
};
use wrenn_node_agent::vmm::process::HostPaths;
use wrenn_node_agent::vmm::qemu::QemuMachine;
use wrenn_node_agent::vmm::{ChMachine, ChVmm, Machine};

/// Exit codes, one per failure class, so a crash loop says what is wrong.
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_LISTEN: u8 = 3;
const EXIT_SERVE: u8 = 4;
/// The VMM, network or storage of this host cannot be used.
const EXIT_HOST: u8 = 5;
/// Start-up recovery failed.
const EXIT_RECOVERY: u8 = 6;
/// A long-lived background task (admin server, sampler, log sweeper,
/// journal writer thread) ended or panicked: the agent exits so the kubelet restarts it whole, rather
/// than serving on with no metrics, no readiness or an unbounded log.
const EXIT_TASK: u8 = 7;

/// The agent's long-lived background tasks, each named for the log line
/// that reports its end.
type Background = tokio::task::JoinSet<&'static str>;

fn main() -> ExitCode {
    let args = Args::parse();
    wrenn_node_agent::tls::install_crypto_provider();
    if let Err(err) = args.log.init() {
        eprintln!("wrenn-node-agent: {err}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "start async runtime"
            );
            return ExitCode::from(EXIT_SERVE);
        }
    };
    runtime.block_on(run(args))
}

/// What every backend's run path needs.
struct Common {
    guest_ready: std::time::Duration,
    netns_dir: PathBuf,
    node_name: String,
    listen: SocketAddr,
    tls: PortConfig,
    state_dir: PathBuf,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    storage: BackendChoice,
    uplink: String,
    egress: EgressFlags,
    cgroups: CgroupRoot,
    vmm_cap: VmmCap,
    metrics: Arc<Metrics>,
    templates: TemplateSettings,
    disk: DiskArgs,
    /// Supervised until the agent exits (see [`EXIT_TASK`]).
    background: Background,
}

/// Start-up stopped: why was logged where it was found, and the code names
/// its class (see the `EXIT_*` constants).
type Started<T> = Result<T, ExitCode>;

async fn run(args: Args) -> ExitCode {
    start(args).await.unwrap_or_else(|code| code)
}

/// The start-up sequence, in the order it must run: refuse bad flags, open
/// the admin port, cap the VMMs, then hand over to a backend.
async fn start(args: Args) -> Started<ExitCode> {
    let Args {
        node_name,
        listen,
        tls_cert,
        tls_key,
        client_ca,
        state_dir,
        vmm,
        ch_binary,
        qemu_binary,
        vhost_vsock,
        kernel,
        initramfs,
        storage,
        uplink,
        netns_dir,
        cgroup_parent,
        admin_listen,
        admin,
        grpc,
        guest_binary,
        insecure_registries,
        guest_ready_secs,
        reserved_cpus,
        reserved_memory,
        vmm_pids_max,
        vmm_io_read_bps,
        vmm_io_write_bps,
        vmm_io_read_iops,
        vmm_io_write_iops,
        egress,
        disk,
        image_dirs,
        ..
    } = args;
    // 1. Refused here, before recovery, so a bad Secret is named at once.
    let tls = check_tls(
        grpc,
        TlsFiles {
            cert: tls_cert,
            key: tls_key,
            client_ca,
        },
    )
    .await?;
    // 2. The admin port answers /healthz at once and /readyz after recovery.
    let metrics = Metrics::new();
    let mut background = Background::new();
    serve_admin(admin_listen, admin, &metrics, &mut background).await?;
    // 3. The cap on all VMMs together, before any VMM starts.
    let cgroups = detect_cgroups(&cgroup_parent)?;
    let budget = VmmBudget {
        reserved_cpus,
        reserved_memory_bytes: reserved_memory,
        pids_max: vmm_pids_max,
        io_read_bps: vmm_io_read_bps,
        io_write_bps: vmm_io_write_bps,
        io_read_iops: vmm_io_read_iops,
        io_write_iops: vmm_io_write_iops,
    };
    let vmm_cap = cap_vmms(&cgroups, &state_dir, budget).await?;
    // 4. What templates may build from.
    let templates = TemplateSettings {
        cache_dir: state_dir.join("images"),
        guest_binary,
        pull: PullOptions {
            insecure_registries,
            limits: disk.image_limits(),
        },
        cache_max_bytes: disk.image_cache_max_bytes,
        image_dirs: open_image_dirs(image_dirs, &state_dir).await?,
    };
    let common = Common {
        guest_ready: std::time::Duration::from_secs(guest_ready_secs),
        templates,
        disk,
        node_name,
        listen,
        tls,
        state_dir,
        kernel,
        initramfs,
        storage,
        uplink,
        egress,
        netns_dir,
        cgroups,
        vmm_cap,
        metrics,
        background,
    };
    // 5. The backend, and the agent over it.
    let binaries = Binaries {
        ch: ch_binary,
        qemu: qemu_binary,
        vhost_vsock,
    };
    Ok(run_backend(vmm, binaries, common).await)
}

/// The gRPC port's settings, with the TLS files read and checked.
async fn check_tls(grpc: PortArgs, files: TlsFiles) -> Started<PortConfig> {
    let tls = match grpc.config(files) {
        Ok(port) => port,
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "bad gRPC port flags"
            );
            return Err(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let check = tls.clone();
    let checked = tokio::task::spawn_blocking(move || {
        check.files.server_config(&check.client_names).map(|_| ())
    })
    .await;
    if let Ok(Err(err)) = checked {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "bad TLS configuration"
        );
        return Err(ExitCode::from(EXIT_BAD_CONFIG));
    }
    Ok(tls)
}

/// Binds the admin port and starts, under `background`, its server and
/// the metrics sampler.
async fn serve_admin(
    listen: AdminListen,
    admin: AdminArgs,
    metrics: &Arc<Metrics>,
    background: &mut Background,
) -> Started<()> {
    let admin_listen = match listen.resolve(admin.pod_ip.as_deref()) {
        Ok(a) => a,
        Err(err) => {
            tracing::error!(%err, "bad --admin-listen");
            return Err(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let admin_listener = match tokio::net::TcpListener::bind(admin_listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%admin_listen, error = &err as &dyn std::error::Error, "bind admin listener");
            return Err(ExitCode::from(EXIT_LISTEN));
        }
    };
    let state = metrics::admin::AdminState {
        capsule_labels: admin.metrics_capsule_labels,
        ..metrics::admin::AdminState::new(metrics.clone())
    };
    background.spawn(async move {
        if let Err(err) = metrics::admin::serve(admin_listener, state, std::future::pending()).await
        {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "admin server failed"
            );
        }
        "admin server"
    });
    let sampler = metrics::sampler::run(
        metrics.clone(),
        metrics::sampler::SamplerConfig::default(),
        std::future::pending(),
    );
    background.spawn(async move {
        sampler.await;
        "metrics sampler"
    });
    Ok(())
}

/// The cgroup tree VMMs are placed under.
fn detect_cgroups(parent: &str) -> Started<CgroupRoot> {
    CgroupRoot::detect(Path::new("/sys/fs/cgroup"), parent).map_err(|err| {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "find the cgroup mount"
        );
        ExitCode::from(EXIT_HOST)
    })
}

/// Caps the VMMs' parent cgroup at what the node can give after
/// `budget`'s reservations; the cap is what NodeInfo reports.
async fn cap_vmms(cgroups: &CgroupRoot, state_dir: &Path, budget: VmmBudget) -> Started<VmmCap> {
    let cgroups = cgroups.clone();
    let state_dir = state_dir.to_path_buf();
    let (limits, applied) = blocking(EXIT_HOST, "cap the VMM parent cgroup", move || {
        let facts = read_facts(&NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir: state_dir.clone(),
        });
        let disk = whole_disk_of(&state_dir, Path::new("/sys"));
        let limits = plan_parent_limits(facts.vcpus, facts.memory_total, &budget, disk);
        cgroups.ensure_parent(&limits).map(|a| (limits, a))
    })
    .await?;
    for controller in &applied.unsupported {
        tracing::warn!(
            controller,
            "the host has no such cgroup controller; that VMM cap is not enforced"
        );
    }
    tracing::info!(?limits, "VMM parent cgroup capped");
    Ok(VmmCap {
        vcpus: limits
            .cpu_quota_us
            .map(|q| u32::try_from(q / CPU_PERIOD_US).unwrap_or(u32::MAX)),
        memory_bytes: limits.memory_bytes,
    })
}

/// Runs blocking start-up work off the async workers. Its error is logged
/// as `what` and stops start-up with `code`.
async fn blocking<T, E>(
    code: u8,
    what: &'static str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Started<T>
where
    T: Send + 'static,
    E: std::error::Error + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => {
            tracing::error!(error = &err as &dyn std::error::Error, "{what}");
            Err(ExitCode::from(code))
        }
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "{what}: panicked");
            Err(ExitCode::from(code))
        }
    }
}

/// The VMM binaries the flags name, one per backend.
struct Binaries {
    ch: PathBuf,
    qemu: PathBuf,
    vhost_vsock: PathBuf,
}

/// Starts the chosen VMM backend and runs the agent over it.
async fn run_backend(vmm: VmmBackend, binaries: Binaries, common: Common) -> ExitCode {
    // Every VMM sees only its own files: see `HostPaths::confined`.
    let paths = HostPaths::confined(
        "/proc".into(),
        wrenn_node_agent::capsule::Layout::new(&common.state_dir).vmm_root(),
        &common.state_dir,
    );
    match vmm {
        VmmBackend::CloudHypervisor => {
            match ChVmm::new(&binaries.ch, paths, common.cgroups.clone()).await {
                Ok(vmm) => run_with(ChMachine::new(vmm), common).await,
                Err(err) => {
                    tracing::error!(binary = %binaries.ch.display(), error = &err as &dyn std::error::Error, "start the Cloud Hypervisor backend");
                    ExitCode::from(EXIT_HOST)
                }
            }
        }
        VmmBackend::Qemu => {
            match QemuMachine::new(
                &binaries.qemu,
                &binaries.vhost_vsock,
                paths,
                common.cgroups.clone(),
            )
            .await
            {
                Ok(qemu) => run_with(qemu, common).await,
                Err(err) => {
                    tracing::error!(binary = %binaries.qemu.display(), error = &err as &dyn std::error::Error, "start the QEMU backend");
                    ExitCode::from(EXIT_HOST)
                }
            }
        }
    }
}

/// The agent over any VMM backend: host modules, recovery, then serving.
async fn run_with<M: Machine + 'static>(machine: M, common: Common) -> ExitCode {
    start_with(machine, common)
        .await
        .unwrap_or_else(|code| code)
}

/// [`run_with`]'s steps: the host modules, the supervisor, recovery (before
/// the gRPC port opens, so no call meets a half-recovered node), then
/// serving until a stop signal or a background task's end.
async fn start_with<M: Machine + 'static>(machine: M, common: Common) -> Started<ExitCode> {
    let Common {
        guest_ready,
        node_name,
        listen,
        tls,
        state_dir,
        kernel,
        initramfs,
        storage: storage_choice,
        uplink,
        egress,
        netns_dir,
        cgroups,
        vmm_cap,
        metrics,
        templates,
        disk,
        mut background,
    } = common;
    // 1. Host modules.
    let store = open_store(storage_choice, &state_dir).await?;
    let net = open_network(netns_dir, &uplink, egress, &state_dir)?;
    let storage_backend = store.backend().to_string();
    let vmm_info = wrenn_node_agent::server::convert::to_vmm(&machine.info());
    // 2. The supervisor over them.
    let mut cfg = SupervisorConfig::new(&state_dir, &kernel);
    cfg.initramfs = initramfs;
    cfg.guest = Some(GuestSettings {
        ready_within: guest_ready,
        ..GuestSettings::default()
    });
    // The sampler and the admin server read what the supervisor records.
    cfg.metrics = metrics.clone();
    cfg.figures = Some(HostFigures {
        proc_root: "/proc".into(),
        cgroups: cgroups.clone(),
    });
    let templates = Arc::new(TemplateBuilder::new(templates));
    cfg.templates = templates.clone();
    let supervisor = Supervisor::new(
        Host {
            machine: Arc::new(machine),
            net: Arc::new(net),
            store,
        },
        cfg,
    );
    // 3. Recovery, and what interrupted image builds left.
    recover(&supervisor, cgroups).await?;
    sweep_image_builds(&templates).await;
    // 4. The gRPC port, and the tasks that must outlive nothing.
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%listen, error = &err as &dyn std::error::Error, "bind gRPC listener");
            return Err(ExitCode::from(EXIT_LISTEN));
        }
    };
    watch_logs_and_journal(&supervisor, &state_dir, &disk, &mut background);
    let activity_file = state_dir.join("activity.json");
    let service = AgentService::new(
        AgentIdentity {
            node_name,
            vmm: Some(vmm_info),
            storage_backend,
        },
        NodePaths {
            proc: "/proc".into(),
            kvm: "/dev/kvm".into(),
            state_dir,
        },
        Arc::new(supervisor.clone()),
        metrics.clone(),
    )
    .with_vmm_cap(vmm_cap)
    .with_activity_file(&activity_file)
    .with_disk_quota(disk.disk_quota)
    .with_image_dirs(templates.settings().image_dirs.clone());
    metrics.set_ready(true);
    tracing::info!(%listen, "serving wrenn.agent.v1 with mutual TLS");
    // 5. Serve.
    Ok(serve(listener, tls, service, &supervisor, background).await)
}

/// Opens the disk store `choice` names under `<state>/disks`.
async fn open_store(
    choice: BackendChoice,
    state_dir: &Path,
) -> Started<Arc<dyn storage::BlockStore>> {
    let store_cfg = StorageConfig::new(state_dir.join("disks"));
    let store = blocking(EXIT_HOST, "open the disk store", move || {
        storage::open_store(choice, store_cfg)
    })
    .await?;
    Ok(Arc::<dyn storage::BlockStore>::from(store))
}

/// Capsule networking over `uplink`, with the egress flags' limits and
/// blocked destinations.
fn open_network(
    netns_dir: PathBuf,
    uplink: &str,
    egress: EgressFlags,
    state_dir: &Path,
) -> Started<LinuxNet> {
    let mut net_cfg = LinuxNetConfig {
        netns_dir,
        limits: egress.limits(),
        cluster_dns: egress.cluster_dns(),
        host_ports: egress.host_port_range,
        pool: usize::from(egress.netns_pool),
        ..LinuxNetConfig::host(uplink, state_dir)
    };
    net_cfg.blocked_egress.extend(egress.blocked);
    LinuxNet::new(net_cfg).map_err(|err| {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "set up capsule networking"
        );
        ExitCode::from(EXIT_HOST)
    })
}

/// Adopts what the journal and the host say is running; removes orphans.
async fn recover<M: Machine + 'static>(
    supervisor: &Supervisor<M>,
    cgroups: CgroupRoot,
) -> Started<()> {
    match supervisor
        .recover(&OrphanSweep {
            cgroups: Some(cgroups),
        })
        .await
    {
        Ok(report) => {
            tracing::info!(
                adopted = report.adopted.len(),
                suspended = report.suspended.len(),
                lost = report.lost.len(),
                orphans_removed = report.orphans.total(),
                "recovered capsules"
            );
            Ok(())
        }
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "recover capsules");
            Err(ExitCode::from(EXIT_RECOVERY))
        }
    }
}

/// Removes image builds a previous run left half done. A failure is only
/// logged: the next build of the same image starts over.
async fn sweep_image_builds(templates: &Arc<TemplateBuilder>) {
    let builder = templates.clone();
    match tokio::task::spawn_blocking(move || builder.sweep()).await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(removed = removed.len(), "removed interrupted image builds");
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(
            error = &err as &dyn std::error::Error,
            "sweep the image cache"
        ),
    }
}

/// Starts the VMM log sweeper and the name refusal reports, and watches
/// the journal writer thread, all under `background`.
fn watch_logs_and_journal<M: Machine + 'static>(
    supervisor: &Supervisor<M>,
    state_dir: &Path,
    disk: &DiskArgs,
    background: &mut Background,
) {
    // A guest flooding its console, or a VMM its log, fills no disk.
    let logs = wrenn_node_agent::vmm::logs::run(
        wrenn_node_agent::capsule::Layout::new(state_dir).vmm_root(),
        disk.vmm_log_max_bytes,
        wrenn_node_agent::vmm::logs::SWEEP_EVERY,
        std::future::pending(),
    );
    background.spawn(async move {
        logs.await;
        "VMM log sweeper"
    });
    let journal_writer = supervisor.journal_writer_ended();
    background.spawn(async move {
        journal_writer.await;
        "journal writer thread"
    });
    let refusals = supervisor.report_name_refusals();
    background.spawn(async move {
        refusals.await;
        "name refusal reports"
    });
}

/// Serves gRPC until a stop signal, or until a background task ends.
async fn serve<M: Machine + 'static>(
    listener: tokio::net::TcpListener,
    tls: PortConfig,
    service: AgentService,
    supervisor: &Supervisor<M>,
    mut background: Background,
) -> ExitCode {
    let sup = supervisor.clone();
    let shutdown = async move {
        wrenn_runtime::stop_signal().await;
        // Running capsules are left alone: they outlive the agent by design.
        tracing::info!("stop signal received; capsules keep running");
        // Ends open WatchEvents streams, so the graceful stop completes.
        sup.shutdown();
    };
    // A background task that ends (they run until the process exits) or
    // panics stops the agent: the kubelet restarts it, and capsules keep
    // running meanwhile.
    let res = tokio::select! {
        res = server::serve_with(listener, tls, service, shutdown) => res,
        Some(ended) = background.join_next() => {
            match ended {
                Ok(task) => tracing::error!(task, "background task ended; exiting"),
                Err(err) => tracing::error!(error = &err as &dyn std::error::Error, "background task panicked; exiting"),
            }
            supervisor.shutdown();
            return ExitCode::from(EXIT_TASK);
        }
    };
    supervisor.shutdown();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "gRPC server failed");
            ExitCode::from(EXIT_SERVE)
        }
    }
}

/// The image directories from `--image-dir`, or `<state>/node-images`
/// (made if missing) when none is given.
async fn open_image_dirs(dirs: Vec<PathBuf>, state_dir: &Path) -> Started<ImageDirs> {
    let state_dir = state_dir.to_path_buf();
    let dirs = blocking(EXIT_BAD_CONFIG, "bad --image-dir", move || {
        image_dirs_blocking(dirs, &state_dir)
    })
    .await?;
    tracing::info!(dirs = ?dirs.dirs(), "templates may name files in these image directories only");
    Ok(dirs)
}

/// [`open_image_dirs`]' file work. Blocking.
fn image_dirs_blocking(
    dirs: Vec<PathBuf>,
    state_dir: &Path,
) -> Result<ImageDirs, wrenn_node_agent::images::dirs::Error> {
    let dirs = if dirs.is_empty() {
        let default = state_dir.join(wrenn_node_agent::images::dirs::NODE_IMAGES_SUBDIR);
        std::fs::create_dir_all(&default).map_err(|e| {
            wrenn_node_agent::images::dirs::Error::Config {
                dir: default.clone(),
                why: format!("create it: {e}"),
            }
        })?;
        vec![default]
    } else {
        dirs
    };
    ImageDirs::new(&dirs, state_dir)
}
