//! `wrenn-local`: Wrenn on this machine, for `e2e/scripts/up.sh`. Against a
//! running control plane (with its front-proxy flags) it starts a node
//! agent in a network namespace playing the node, the operator, the
//! gateway behind an `APIService`, and one capsule from a template of the
//! guest image; runs `kubectl wrenn exec` in the capsule once it runs, then
//! keeps everything up until Ctrl-C, when it deletes the capsules and stops
//! what it started.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use wrenn_crds::Capsule;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_e2e::agent::{AgentOptions, GuestImage, NodeAgent, Pki};
use wrenn_e2e::local::{
    LocalGateway, OperatorOptions, OperatorProcess, apply, apply_once_admitted, capsule_manifest,
    ensure_namespace, register_agent, template_manifest,
};

/// Runs an operator, a node agent and a capsule against a control plane.
#[derive(Debug, Parser)]
struct Args {
    /// Admin kubeconfig of the control plane (`control-plane.sh start` prints it).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Where logs and certificates go.
    #[arg(long, default_value = ".wrenn/local")]
    dir: PathBuf,
    /// Namespace of the capsule.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Directory holding `kubectl` and `kubectl-wrenn` (up.sh links them
    /// there): the quick start's `kubectl wrenn exec` runs from it.
    #[arg(long, default_value = ".wrenn/bin")]
    bin_dir: PathBuf,
    /// Stop (and clean up) as soon as the capsule ran a command, instead of
    /// waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

const AGENT_NS: &str = "wrenn-system";
const NODE: &str = "local-node";
const MANAGER: &str = "wrenn-local";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wrenn-local: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn say(what: &str) {
    println!("==> {what}");
}

async fn run(args: Args) -> Result<()> {
    if !nix_is_root() {
        bail!("must run as root: the node agent makes network namespaces, TAPs and cgroups");
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::path::absolute(&args.dir).context("absolute state dir")?;
    std::fs::write(dir.join("pid"), std::process::id().to_string())
        .context("write the pid file")?;

    say("guest image (kernel, initramfs, root disk): images/build.sh");
    let image = tokio::task::spawn_blocking(GuestImage::build).await??;

    say("node agent in network namespace wrenn-node-l-node (QEMU backend)");
    let pki = Pki::create(&dir.join("pki"), std::net::Ipv4Addr::new(10, 251, 250, 2))?;
    let opts = AgentOptions {
        node_name: NODE.into(),
        index: 250,
        image: image.clone(),
        pki: Some(pki.clone()),
        guest_ready: None,
    };
    let mut agent = tokio::task::spawn_blocking(move || NodeAgent::start(&opts)).await??;
    println!("    agent {} log {}", agent.addr, agent.log.display());

    let outcome = run_with_agent(&args, &dir, &image, pki, &agent).await;
    agent.stop();
    if let Err(e) = &outcome {
        eprintln!("--- agent log (tail) ---\n{}", agent.log_tail());
        return Err(anyhow::anyhow!("{e:#}"));
    }
    say("stopped the agent and removed the node namespace");
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

async fn run_with_agent(
    args: &Args,
    dir: &std::path::Path,
    image: &GuestImage,
    pki: Pki,
    agent: &NodeAgent,
) -> Result<()> {
    let client = wrenn_e2e::client_from(&args.kubeconfig).await?;
    ensure_namespace(&client, AGENT_NS).await?;
    ensure_namespace(&client, &args.namespace).await?;
    register_agent(&client, AGENT_NS, agent).await?;

    say("operator");
    let mut operator = tokio::task::spawn_blocking({
        let opts = OperatorOptions {
            kubeconfig: args.kubeconfig.clone(),
            agent_namespace: AGENT_NS.into(),
            watch_namespace: None,
            pki: pki.clone(),
            log: dir.join("operator.log"),
            node_lost_timeout_secs: 60,
        };
        move || OperatorProcess::start(&opts)
    })
    .await??;
    println!(
        "    admin http://{}/metrics log {}",
        operator.admin,
        operator.log.display()
    );

    say("gateway (subresources.wrenn.dev: exec, files, console) behind an APIService");
    let gateway = LocalGateway::start(
        &client,
        &args.kubeconfig,
        &pki,
        AGENT_NS,
        ("wrenn-gw", std::net::Ipv4Addr::new(10, 252, 250, 1)),
        &dir.join("gateway.log"),
    )
    .await?;
    println!(
        "    https://{} log {}",
        gateway.listen,
        gateway.process.log.display()
    );

    let result = demo(args, &client, image, agent).await;
    drop(gateway);
    let cleanup = delete_capsules(&client).await;
    operator.stop();
    if result.is_err() {
        eprintln!("--- operator log (tail) ---\n{}", operator.log_tail());
    }
    result.and(cleanup)
}

async fn demo(args: &Args, client: &Client, _image: &GuestImage, _agent: &NodeAgent) -> Result<()> {
    let ns = &args.namespace;
    say("CapsuleTemplate local (the guest image's root disk) and Capsule hello");
    apply_once_admitted(
        client,
        ns,
        &template_manifest("local", GuestImage::ROOTFS),
        MANAGER,
        Duration::from_secs(30),
    )
    .await?;
    apply(client, ns, &capsule_manifest("hello", "local"), MANAGER).await?;

    let caps: Api<Capsule> = Api::namespaced(client.clone(), ns);
    let t0 = Instant::now();
    let cap = loop {
        let cap = caps.get("hello").await.context("get capsule hello")?;
        let status = cap.status.clone().unwrap_or_default();
        match status.phase {
            Some(CapsulePhase::Running) => break cap,
            Some(CapsulePhase::Failed) => bail!(
                "capsule hello failed: {:?}",
                status
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
            ),
            _ if t0.elapsed() > Duration::from_secs(300) => {
                bail!("capsule hello not Running after 5 min: {status:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    println!(
        "    Running on {} after {:.1} s (QEMU TCG boots slowly)",
        cap.status
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    );

    let bin_dir = std::path::absolute(&args.bin_dir).context("absolute bin dir")?;
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![bin_dir.clone()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).context("join PATH")?
        }
        None => bin_dir.clone().into_os_string(),
    };
    say(
        "kubectl wrenn exec hello -- uname -a (kubectl -> API server -> gateway -> agent -> guest)",
    );
    let ran = tokio::process::Command::new(bin_dir.join("kubectl"))
        .args(["wrenn", "exec", "-n", ns, "hello", "--", "uname", "-a"])
        .env("PATH", &path)
        .env("KUBECONFIG", &args.kubeconfig)
        .output()
        .await
        .context("run kubectl wrenn exec")?;
    print!("{}", String::from_utf8_lossy(&ran.stdout));
    if !ran.status.success() {
        bail!(
            "kubectl wrenn exec hello exited {}: {}",
            ran.status,
            String::from_utf8_lossy(&ran.stderr).trim()
        );
    }

    if args.once {
        return Ok(());
    }
    println!(
        "\nWrenn runs: an operator, a node agent and capsule {ns}/hello. Try:\n\n  \
         export KUBECONFIG={} PATH={}:$PATH\n  \
         kubectl wrenn exec hello -- uname -a\n  \
         kubectl wrenn shell hello\n  \
         kubectl wrenn cp ./some-dir hello:/tmp/some-dir\n  \
         kubectl wrenn console hello --tail=20\n  \
         kubectl get cap,ctpl -o wide\n  \
         kubectl patch cap hello --type merge -p '{{\"spec\":{{\"operatingMode\":\"Paused\"}}}}'\n  \
         kubectl patch cap hello --type merge -p '{{\"spec\":{{\"operatingMode\":\"Suspended\"}}}}'\n  \
         kubectl patch cap hello --type merge -p '{{\"spec\":{{\"operatingMode\":\"Running\"}}}}'\n  \
         kubectl get events --field-selector involvedObject.name=hello\n\n\
         Ctrl-C deletes the capsules and stops the operator and the agent;\n\
         e2e/scripts/down.sh then stops the control plane.",
        args.kubeconfig.display(),
        bin_dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    // down.sh sends SIGTERM: it cleans up like Ctrl-C.
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!();
    Ok(())
}

/// Deletes every Capsule and waits until the operator released them, so
/// their VMs are gone from the node before the agent stops.
async fn delete_capsules(client: &Client) -> Result<()> {
    say("deleting capsules");
    let all: Api<Capsule> = Api::all(client.clone());
    for cap in all.list(&ListParams::default()).await?.items {
        let ns = cap.namespace().unwrap_or_default();
        let api: Api<Capsule> = Api::namespaced(client.clone(), &ns);
        match api.delete(&cap.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context("delete a capsule"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = all.list(&ListParams::default()).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} capsules still present 120 s after delete");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
