//! `kubectl wrenn`: reach inside Wrenn capsules and drive their lifecycle
//! with your own kubeconfig. Requests go to the Kubernetes API server only
//! (`wrenn.dev` for capsules and snapshots, `subresources.wrenn.dev`,
//! served by wrenn-gateway, for exec and processes), so RBAC decides who may do what, as
//! for Pods. This file parses the command line, runs the verb and turns
//! the outcome into output and an exit code; each verb lives in its module.
//!
//! ```text
//! kubectl wrenn exec hello -- uname -a
//! kubectl wrenn cp ./data hello:/srv/data
//! kubectl wrenn pause hello
//! kubectl wrenn fork hello hello-2
//! ```
#![forbid(unsafe_code)]

mod args;
mod attach;
mod channel;
mod cluster;
mod console;
mod cp;
mod exec;
mod lifecycle;
mod portforward;
mod processes;
mod snapshot;
mod status;
mod terminal;
mod transfer;
mod wait;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use wrenn_crds::capsule::{CapsulePhase, OperatingMode};
use wrenn_crds::snapshot::SnapshotPhase;

use crate::args::{Cli, Command, ModeArgs};
use crate::cluster::Target;
use crate::wait::WaitFor;

/// Exit code of every failure other than a command's own.
const FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: start the async runtime: {err}");
            return ExitCode::from(FAILURE);
        }
    };
    let outcome = runtime.block_on(run(cli));
    // A read of a terminal stdin may still be blocked; it must not keep
    // the finished command from exiting.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(FAILURE)
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let Cli { target, command } = cli;
    let target = Target::connect(&target).await?;
    match command {
        Command::Exec {
            detach: true,
            tag,
            capsule,
            command,
            ..
        } => start_detached(&target, &capsule, tag.as_deref(), &command).await,
        Command::Exec {
            stdin,
            tty,
            capsule,
            command,
            ..
        } => {
            let req = exec::Request {
                capsule,
                command,
                stdin,
                tty,
            };
            Ok(exec::run(&target, req).await?)
        }
        Command::PortForward {
            address,
            capsule,
            ports,
        } => {
            let mappings = ports
                .iter()
                .map(|p| portforward::parse_mapping(p))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(portforward::run(&target, &capsule, &mappings, address).await?)
        }
        Command::Shell { capsule } => {
            let req = exec::Request {
                capsule,
                command: vec!["/bin/sh".into()],
                stdin: true,
                tty: true,
            };
            Ok(exec::run(&target, req).await?)
        }
        Command::Ps { capsule } => {
            print!(
                "{}",
                processes::build_table(&processes::list(&target, &capsule).await?)
            );
            Ok(0)
        }
        Command::Kill {
            capsule,
            process,
            signal,
        } => {
            processes::kill(&target, &capsule, &process, &signal).await?;
            println!("signal {signal} sent to process {process} in capsule/{capsule}");
            Ok(0)
        }
        Command::Logs {
            follow,
            capsule,
            process,
        } => {
            processes::logs(&target, &capsule, &process, follow).await?;
            Ok(0)
        }
        Command::Attach { capsule, process } => Ok(attach::run(&target, &capsule, &process).await?),
        Command::Cp { src, dst } => {
            println!("{}", cp::copy(&target, &src, &dst).await?);
            Ok(0)
        }
        Command::Console {
            follow,
            tail,
            capsule,
        } => show_console(&target, &capsule, follow, tail).await,
        Command::Pause(m) => set_mode(&target, m, OperatingMode::Paused).await,
        Command::Resume(m) => set_mode(&target, m, OperatingMode::Running).await,
        Command::Suspend(m) => set_mode(&target, m, OperatingMode::Suspended).await,
        Command::Snapshot {
            capsule,
            name,
            disk_only,
            wait,
        } => {
            let timeout = wait.timeout();
            snapshot::snapshot(&target, &capsule, &name, !disk_only, timeout).await?;
            let state = reached(timeout, wait::phase_name(SnapshotPhase::Ready));
            println!("capsulesnapshot/{name} of capsule/{capsule}: {state}");
            Ok(0)
        }
        Command::Fork {
            capsule,
            name,
            wait,
        } => {
            let timeout = wait.timeout();
            snapshot::fork(&target, &capsule, &name, timeout).await?;
            let state = reached(timeout, wait::phase_name(CapsulePhase::Running));
            println!("capsule/{name} forked from capsule/{capsule} (snapshot {name}): {state}");
            Ok(0)
        }
        Command::Wait {
            capsule,
            wait_for,
            timeout,
        } => wait_for_capsule(&target, &capsule, wait_for, timeout).await,
        Command::Status { capsule } => {
            print!("{}", status::show(&target, &capsule).await?);
            Ok(0)
        }
    }
}

/// `console [-f]`: the serial console log, or its tail, and what follows.
async fn show_console(
    target: &Target,
    capsule: &str,
    follow: bool,
    tail: Option<u32>,
) -> Result<u8> {
    console::show(target, capsule, follow, tail)
        .await
        .with_context(|| format!("console of capsule {capsule:?}"))?;
    Ok(0)
}

/// `wait --for`: until the capsule reaches the state asked for.
async fn wait_for_capsule(
    target: &Target,
    capsule: &str,
    wait_for: WaitFor,
    timeout: std::time::Duration,
) -> Result<u8> {
    wait::capsule(target, capsule, wait_for, None, timeout)
        .await
        .with_context(|| format!("wait for capsule {capsule:?}"))?;
    println!("capsule/{capsule}: {wait_for}");
    Ok(0)
}

/// `exec --detach`: starts a tagged process and says which.
async fn start_detached(
    target: &Target,
    capsule: &str,
    tag: Option<&str>,
    command: &[String],
) -> Result<u8> {
    let p = processes::start(target, capsule, tag, command).await?;
    let tag = p["tag"].as_str().filter(|t| !t.is_empty());
    println!(
        "process {} ({}) started in capsule/{capsule}",
        p["pid"],
        tag.unwrap_or("no tag")
    );
    Ok(0)
}

/// What a verb that may wait reports: the state waited for, else that the
/// object was created.
fn reached(timeout: Option<std::time::Duration>, waited: String) -> String {
    match timeout {
        Some(_) => waited,
        None => "created".to_string(),
    }
}

async fn set_mode(target: &Target, m: ModeArgs, mode: OperatingMode) -> Result<u8> {
    let ModeArgs { capsule, wait } = m;
    let timeout = wait.timeout();
    lifecycle::set_mode(target, &capsule, mode, timeout).await?;
    match timeout {
        Some(_) => println!(
            "capsule/{capsule}: {}",
            WaitFor::Phase(lifecycle::plan_phase(mode))
        ),
        None => println!("capsule/{capsule}: operatingMode set to {mode:?}"),
    }
    Ok(0)
}
