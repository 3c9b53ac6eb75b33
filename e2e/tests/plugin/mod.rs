//! `kubectl-wrenn` as a user runs it: built once per test process, started
//! with a kubeconfig of its own (never `$KUBECONFIG`), its output collected
//! within a deadline. Shared by the plugin's cluster tests (`cli`,
//! `cli_cp`, `processes`) so each says only what it checks.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use wrenn_testkit::{Case, Tier, case};

use super::gateway_bed::{Bed, BedOptions};

/// How long one run may take before the test fails: long enough for the
/// biggest copy the tests make on a busy machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// What one run of the plugin gave.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The plugin binary, built with the pinned toolchain.
pub fn plugin() -> PathBuf {
    wrenn_e2e::build::cargo_build("kubectl-wrenn", "kubectl-wrenn").unwrap()
}

/// Cluster case `name` with the plugin built and the bed `o` asks for, or
/// the case recorded as skipped naming what this machine lacks.
pub async fn plugin_bed(name: &str, o: BedOptions) -> Option<(Case, PathBuf, Bed)> {
    let c = case(Tier::Cluster, name);
    let bin = tokio::task::spawn_blocking(plugin).await.unwrap();
    let (c, bed) = Bed::or_skip(c, o).await?;
    Some((c, bin, bed))
}

/// Starts the plugin with `--kubeconfig kc` and `args`; stdin is piped
/// (see [`finish`]), stdout and stderr are collected.
pub fn start(bin: &Path, kc: &Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(kc)
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Writes `stdin` (then closes it) and waits for the end.
pub async fn finish(mut child: tokio::process::Child, stdin: &[u8]) -> Ran {
    if let Some(mut input) = child.stdin.take() {
        if !stdin.is_empty() {
            input.write_all(stdin).await.unwrap();
        }
        drop(input);
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl-wrenn ends within {DEADLINE:?}"))
        .unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One run with no input.
pub async fn run(bin: &Path, kc: &Path, args: &[&str]) -> Ran {
    finish(start(bin, kc, args), b"").await
}

/// Reads the child's stdout until it holds `want`; answers what it read.
pub async fn read_until(child: &mut tokio::process::Child, want: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !String::from_utf8_lossy(&seen).contains(want) {
            let n = out.read(&mut buf).await.unwrap();
            assert!(n > 0, "output ended before {want:?}: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {want:?} within 30 s: {seen:?}"));
    String::from_utf8_lossy(&seen).into_owned()
}

/// Starts `kubectl wrenn port-forward CAPSULE :P…` (a free local port for
/// each remote one) and waits until it says where it listens; answers the
/// plugin (killed on drop) and each remote port's local one.
pub async fn port_forward(
    bin: &Path,
    kc: &Path,
    capsule: &str,
    remote: &[u16],
) -> (tokio::process::Child, std::collections::BTreeMap<u16, u16>) {
    let mut child = tokio::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(kc)
        .args(["port-forward", capsule])
        .args(remote.iter().map(|p| format!(":{p}")))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut local = std::collections::BTreeMap::new();
    while local.len() < remote.len() {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("port-forward prints where it listens")
            .unwrap()
            .expect("port-forward is running");
        // "Forwarding from 127.0.0.1:LOCAL -> REMOTE"
        let (from, to) = line
            .strip_prefix("Forwarding from ")
            .and_then(|l| l.split_once(" -> "))
            .unwrap_or_else(|| panic!("{line}"));
        let from: std::net::SocketAddr = from.parse().unwrap();
        local.insert(to.parse::<u16>().unwrap(), from.port());
    }
    (child, local)
}
