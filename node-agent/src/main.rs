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
use wrenn_node_agent::capsule::{GuestSettings, Host, HostFigures, Supervisor, SupervisorConfig};
use wrenn_node_agent::images::{PullOptions, TemplateBuilder, TemplateSettings};
use wrenn_node_agent::metrics::{self, Metrics};
use wrenn_node_agent::network::{LinuxNet, LinuxNetConfig};
use wrenn_node_agent::node::NodePaths;
use wrenn_node_agent::server::{self, AgentIdentity, AgentService};
use wrenn_node_agent::state::OrphanSweep;
use wrenn_node_agent::storage::{self, BackendChoice, StorageConfig};
use wrenn_node_agent::tls::TlsFiles;
use wrenn_node_agent::vmm::cgroup::CgroupRoot;
use wrenn_node_agent::vmm::process::HostPaths;
use wrenn_node_agent::vmm::qemu::QemuMachine;
use wrenn_node_agent::vmm::{BackendKind, ChMachine, ChVmm, Machine};

/// Exit codes, one per failure class, so a crash loop says what is wrong.
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_LISTEN: u8 = 3;
const EXIT_SERVE: u8 = 4;
/// The VMM, network or storage of this host cannot be used.
const EXIT_HOST: u8 = 5;
/// Start-up recovery failed.
const EXIT_RECOVERY: u8 = 6;

/// Which VMM backend runs capsules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum VmmBackend {
    /// Cloud Hypervisor (needs KVM).
    CloudHypervisor,
    /// QEMU (KVM or TCG).
    Qemu,
}

#[derive(Debug, Parser)]
#[command(version, about = "Wrenn node agent")]
struct Args {
    /// Kubernetes node name (downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Address of the gRPC server.
    #[arg(long, env = "WRENN_LISTEN", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long, env = "WRENN_TLS_CERT", default_value = "/etc/wrenn/tls/tls.crt")]
    tls_cert: PathBuf,
    /// Server key (PEM).
    #[arg(long, env = "WRENN_TLS_KEY", default_value = "/etc/wrenn/tls/tls.key")]
    tls_key: PathBuf,
    /// CA that signs the operator's client certificate (PEM).
    #[arg(long, env = "WRENN_CLIENT_CA", default_value = "/etc/wrenn/tls/ca.crt")]
    client_ca: PathBuf,
    /// State directory: journals, disks, snapshots.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn")]
    state_dir: PathBuf,
    /// Log filter, e.g. `info` or `wrenn_node_agent=debug`.
    #[arg(long, env = "WRENN_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WRENN_LOG_FORMAT", default_value = "plain")]
    log_format: String,
    /// VMM backend.
    #[arg(
        long,
        env = "WRENN_VMM",
        value_enum,
        default_value = "cloud-hypervisor"
    )]
    vmm: VmmBackend,
    /// Cloud Hypervisor binary.
    #[arg(
        long,
        env = "WRENN_CH_BINARY",
        default_value = "/usr/local/bin/cloud-hypervisor"
    )]
    ch_binary: PathBuf,
    /// QEMU binary for `--vmm qemu` (looked up in PATH when bare).
    #[arg(long, env = "WRENN_QEMU_BINARY", default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
    /// vhost-device-vsock, QEMU's vsock backend (looked up in PATH when bare).
    #[arg(long, env = "WRENN_VHOST_VSOCK", default_value = "vhost-device-vsock")]
    vhost_vsock: PathBuf,
    /// Default guest kernel.
    #[arg(
        long,
        env = "WRENN_KERNEL",
        default_value = "/var/lib/wrenn/kernels/vmlinux"
    )]
    kernel: PathBuf,
    /// Optional initramfs for every guest.
    #[arg(long, env = "WRENN_INITRAMFS")]
    initramfs: Option<PathBuf>,
    /// Root-disk backend: `auto`, `dm-snapshot` or `qcow2`.
    #[arg(long, env = "WRENN_STORAGE", default_value = "auto")]
    storage: BackendChoice,
    /// The node's uplink interface, the only one capsule traffic may leave by.
    #[arg(long, env = "WRENN_UPLINK", default_value = "eth0")]
    uplink: String,
    /// Where capsule network namespaces are mounted. Only agents sharing a
    /// host with other agents (tests, the local run) need their own.
    #[arg(long, env = "WRENN_NETNS_DIR", default_value = "/run/netns")]
    netns_dir: PathBuf,
    /// `wrenn-guest`, injected into template disks built from OCI images.
    #[arg(
        long,
        env = "WRENN_GUEST_BINARY",
        default_value = "/opt/wrenn/share/wrenn-guest"
    )]
    guest_binary: PathBuf,
    /// Registries pulled from over plain HTTP (local mirrors), comma-separated.
    #[arg(long, env = "WRENN_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// Admin server (Prometheus `/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "WRENN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    wrenn_node_agent::tls::install_crypto_provider();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(err) => {
            eprintln!("wrenn-node-agent: --log-level {:?}: {err}", args.log_level);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format.as_str() {
        "json" => builder.json().init(),
        "plain" => builder.init(),
        other => {
            eprintln!("wrenn-node-agent: --log-format must be plain or json, not {other:?}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
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
    netns_dir: PathBuf,
    node_name: String,
    listen: SocketAddr,
    tls: TlsFiles,
    state_dir: PathBuf,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    storage: BackendChoice,
    uplink: String,
    cgroups: CgroupRoot,
    metrics: Arc<Metrics>,
    templates: TemplateSettings,
}

async fn run(args: Args) -> ExitCode {
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
        admin_listen,
        guest_binary,
        insecure_registries,
        ..
    } = args;
    let tls = TlsFiles {
        cert: tls_cert,
        key: tls_key,
        client_ca,
    };
    if let Err(err) = tls.server_config() {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "bad TLS configuration"
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    // The admin port answers /healthz at once and /readyz after recovery.
    let metrics = Metrics::new();
    let admin = match tokio::net::TcpListener::bind(admin_listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%admin_listen, error = &err as &dyn std::error::Error, "bind admin listener");
            return ExitCode::from(EXIT_LISTEN);
        }
    };
    {
        let state = metrics::admin::AdminState {
            metrics: metrics.clone(),
        };
        tokio::spawn(async move {
            if let Err(err) = metrics::admin::serve(admin, state, std::future::pending()).await {
                tracing::error!(
                    error = &err as &dyn std::error::Error,
                    "admin server failed"
                );
            }
        });
    }
    tokio::spawn(metrics::sampler::run(
        metrics.clone(),
        metrics::sampler::SamplerConfig::default(),
        std::future::pending(),
    ));
    let cgroups = match CgroupRoot::detect(Path::new("/sys/fs/cgroup"), "wrenn") {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "find the cgroup mount"
            );
            return ExitCode::from(EXIT_HOST);
        }
    };
    let templates = TemplateSettings {
        cache_dir: state_dir.join("images"),
        guest_binary,
        pull: PullOptions {
            auth: None,
            insecure_registries,
        },
    };
    let common = Common {
        templates,
        node_name,
        listen,
        tls,
        state_dir,
        kernel,
        initramfs,
        storage,
        uplink,
        netns_dir,
        cgroups,
        metrics,
    };
    let paths = HostPaths {
        proc_root: "/proc".into(),
        state_dir: wrenn_node_agent::capsule::Layout::new(&common.state_dir).vmm_root(),
    };
    match vmm {
        VmmBackend::CloudHypervisor => {
            match ChVmm::new(&ch_binary, paths, common.cgroups.clone()).await {
                Ok(vmm) => run_with(ChMachine::new(vmm), common).await,
                Err(err) => {
                    tracing::error!(binary = %ch_binary.display(), error = &err as &dyn std::error::Error, "start the Cloud Hypervisor backend");
                    ExitCode::from(EXIT_HOST)
                }
            }
        }
        VmmBackend::Qemu => {
            match QemuMachine::new(&qemu_binary, &vhost_vsock, paths, common.cgroups.clone()).await
            {
                Ok(qemu) => run_with(qemu, common).await,
                Err(err) => {
                    tracing::error!(binary = %qemu_binary.display(), error = &err as &dyn std::error::Error, "start the QEMU backend");
                    ExitCode::from(EXIT_HOST)
                }
            }
        }
    }
}

/// The agent over any VMM backend: host modules, recovery, then serving.
async fn run_with<M: Machine + 'static>(machine: M, common: Common) -> ExitCode {
    let Common {
        node_name,
        listen,
        tls,
        state_dir,
        kernel,
        initramfs,
        storage: storage_choice,
        uplink,
        netns_dir,
        cgroups,
        metrics,
        templates,
    } = common;
    let store_cfg = StorageConfig::new(state_dir.join("disks"));
    let store =
        match tokio::task::spawn_blocking(move || storage::open_store(storage_choice, store_cfg))
            .await
        {
            Ok(Ok(s)) => Arc::<dyn storage::BlockStore>::from(s),
            Ok(Err(err)) => {
                tracing::error!(
                    error = &err as &dyn std::error::Error,
                    "open the disk store"
                );
                return ExitCode::from(EXIT_HOST);
            }
            Err(_) => return ExitCode::from(EXIT_HOST),
        };
    let net_cfg = LinuxNetConfig {
        netns_dir,
        ..LinuxNetConfig::host(&uplink, &state_dir)
    };
    let net = match LinuxNet::new(net_cfg) {
        Ok(n) => n,
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "set up capsule networking"
            );
            return ExitCode::from(EXIT_HOST);
        }
    };
    let storage_backend = store.backend().to_string();
    let backend = machine.info();
    let vmm_info = wrenn_proto::agent::v1::VmmInfo {
        name: match backend.kind {
            BackendKind::CloudHypervisor => "cloud-hypervisor",
            BackendKind::Qemu => "qemu",
        }
        .into(),
        version: backend.version.clone(),
        note: if backend.accelerated {
            String::new()
        } else {
            "QEMU under TCG (no hardware virtualization): slow, for development and CI".into()
        },
    };
    let mut cfg = SupervisorConfig::new(&state_dir, &kernel);
    cfg.initramfs = initramfs;
    cfg.guest = Some(GuestSettings::default());
    // The sampler and the admin server read what the supervisor records.
    cfg.metrics = metrics.clone();
    cfg.figures = Some(HostFigures {
        proc_root: "/proc".into(),
        cgroups: cgroups.clone(),
    });
    let cfg_templates = Arc::new(TemplateBuilder::new(templates));
    cfg.templates = cfg_templates.clone();
    let supervisor = Supervisor::new(
        Host {
            machine: Arc::new(machine),
            net: Arc::new(net),
            store,
        },
        cfg,
    );
    match supervisor
        .recover(&OrphanSweep {
            cgroups: Some(cgroups),
        })
        .await
    {
        Ok(report) => tracing::info!(
            adopted = report.adopted.len(),
            suspended = report.suspended.len(),
            lost = report.lost.len(),
            orphans_removed = report.orphans.total(),
            "recovered capsules"
        ),
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "recover capsules");
            return ExitCode::from(EXIT_RECOVERY);
        }
    }
    let builder = cfg_templates.clone();
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
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%listen, error = &err as &dyn std::error::Error, "bind gRPC listener");
            return ExitCode::from(EXIT_LISTEN);
        }
    };
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
    )
    .with_capsules(Arc::new(supervisor.clone()))
    .with_metrics(metrics.clone());
    metrics.set_ready(true);
    tracing::info!(%listen, "serving wrenn.agent.v1 with mutual TLS");
    let sup = supervisor.clone();
    let shutdown = async move {
        stop_signal().await;
        // Ends open WatchEvents streams, so the graceful stop completes.
        sup.shutdown();
    };
    let res = server::serve(listener, &tls, service, shutdown).await;
    supervisor.shutdown();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = &err as &dyn std::error::Error, "gRPC server failed");
            ExitCode::from(EXIT_SERVE)
        }
    }
}

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT. Running capsules
/// are left alone: they outlive the agent by design.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "no SIGTERM handler; stopping on SIGINT only"
            );
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stop signal received; capsules keep running");
}
