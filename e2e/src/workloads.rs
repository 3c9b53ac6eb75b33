//! Tier C of the cluster tests: kube-controller-manager, kube-scheduler and
//! kwok fake kubelets beside the tier-A control plane, so Deployments and
//! DaemonSets get Pods, the Pods get bound to Nodes and become Ready, and
//! `helm install --wait` means what it says. Binaries come from
//! `e2e/scripts/build-helm.sh` (built from the Go module proxy, cached).
//!
//! Each process runs under a small shell that holds our end of a pipe as its
//! stdin and kills the process when the pipe closes, so nothing outlives the
//! test binary however it exits (as `control-plane.sh run` does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::ControlPlane;
use crate::helm::script_var;

/// Annotation that marks the Nodes kwok keeps alive.
pub const FAKE_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// Controllers, scheduler and fake kubelets of one test process.
#[derive(Debug)]
pub struct Workloads {
    /// Logs of the three processes.
    pub dir: PathBuf,
    _children: Vec<Mutex<Child>>,
}

static SHARED: OnceLock<Result<Workloads, String>> = OnceLock::new();

impl Workloads {
    /// Started on first use for this process, against `cp`.
    pub fn shared(cp: &ControlPlane) -> Result<&'static Workloads, String> {
        SHARED
            .get_or_init(|| Self::start(cp).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn start(cp: &ControlPlane) -> Result<Workloads> {
        build_tools("all", "kube-controller-manager, kube-scheduler or kwok")?;
        let ctrl = PathBuf::from(script_var("K8S_CTRL_BIN_DIR")?);
        let kwok = PathBuf::from(script_var("KWOK_BIN_DIR")?);
        let cp_dir = cp_dir(cp)?;
        let pki = cp_dir.join("pki");
        for f in ["sa.key", "apiserver.crt"] {
            if !pki.join(f).is_file() {
                bail!("control plane in {} has no pki/{f}", cp_dir.display());
            }
        }
        // Logs live beside the control plane's, and go with it.
        let dir = cp_dir.join("workloads");
        std::fs::create_dir_all(&dir)?;
        let kc = cp.kubeconfig.display().to_string();
        let mut stages = Vec::new();
        for entry in std::fs::read_dir(kwok.join("stages")).context("kwok stages")? {
            stages.push(format!("--config={}", entry?.path().display()));
        }
        let kcm = vec![
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ),
            format!("--root-ca-file={}", pki.join("apiserver.crt").display()),
            "--use-service-account-credentials=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ];
        let sched = vec![
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ];
        let mut kwok_args = vec![
            format!("--kubeconfig={kc}"),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake"),
            "--server-address=".into(),
            // Heartbeats through node Leases, as kubelets do, so the node
            // lifecycle controller never marks a fake node NotReady.
            "--node-lease-duration-seconds=40".into(),
        ];
        kwok_args.extend(stages);
        let children = vec![
            supervise(
                &ctrl.join("kube-controller-manager"),
                &kcm,
                &dir.join("kcm.log"),
            )?,
            supervise(
                &ctrl.join("kube-scheduler"),
                &sched,
                &dir.join("scheduler.log"),
            )?,
            supervise(&kwok.join("kwok"), &kwok_args, &dir.join("kwok.log"))?,
        ];
        // A bad flag ends a process at once: report it with its log.
        std::thread::sleep(Duration::from_millis(1500));
        for (name, log) in [
            ("kube-controller-manager", "kcm.log"),
            ("kube-scheduler", "scheduler.log"),
            ("kwok", "kwok.log"),
        ] {
            let log = dir.join(log);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("wrenn-supervise: exited") {
                bail!(
                    "{name} exited at start; log {}:\n{}",
                    log.display(),
                    tail(&text, 20)
                );
            }
        }
        Ok(Workloads {
            dir,
            _children: children.into_iter().map(Mutex::new).collect(),
        })
    }

    /// Creates (or replaces) a fake Node that kwok keeps Ready, with `labels`.
    pub fn add_node(&self, cp: &ControlPlane, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let mut l = serde_json::Map::new();
        l.insert("kubernetes.io/hostname".into(), json!(name));
        l.insert("kubernetes.io/os".into(), json!("linux"));
        l.insert("kubernetes.io/arch".into(), json!("amd64"));
        l.insert("type".into(), json!("kwok"));
        for (k, v) in labels {
            l.insert((*k).into(), json!(v));
        }
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": l,
                "annotations": { FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0" },
            },
            "status": {
                "capacity": { "cpu": "32", "memory": "256Gi", "pods": "110" },
                "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            },
        });
        let file = self.dir.join(format!("node-{name}.json"));
        std::fs::write(&file, node.to_string())?;
        cp.kubectl_ok(&["apply", "-f"], Some(&file))?;
        // kwok marks it Ready; the scheduler ignores it until then.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = cp.kubectl_ok(
                &[
                    "get",
                    "node",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
                None,
            )?;
            if ready.trim() == "True" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kwok never made node {name} Ready; log {}",
                    self.dir.join("kwok.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// kube-controller-manager running its garbage collector and nothing else,
/// against `cp`, for as long as this lives: for cluster tests that show an
/// object going with its owner through `ownerReferences` alone, without
/// the node lifecycle and workload controllers acting on the shared
/// cluster's other tests.
#[derive(Debug)]
pub struct GarbageCollector {
    /// Its log.
    pub log: PathBuf,
    _child: Child,
}

impl GarbageCollector {
    /// Builds kube-controller-manager when not cached, and starts it.
    pub fn start(cp: &ControlPlane) -> Result<Self> {
        build_tools("ctrl", "kube-controller-manager")?;
        let ctrl = PathBuf::from(script_var("K8S_CTRL_BIN_DIR")?);
        let log = cp_dir(cp)?.join(format!("{}.log", wrenn_testkit::unique_name("gc")));
        let args = vec![
            format!("--kubeconfig={}", cp.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--controllers=garbage-collector-controller".into(),
            "--use-service-account-credentials=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ];
        let child = supervise(&ctrl.join("kube-controller-manager"), &args, &log)?;
        // A bad flag ends it at once: report that with its log.
        std::thread::sleep(Duration::from_millis(1500));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("wrenn-supervise: exited") {
            bail!(
                "kube-controller-manager exited at start; log {}:\n{}",
                log.display(),
                tail(&text, 20)
            );
        }
        Ok(Self { log, _child: child })
    }
}

/// Runs `build-helm.sh what` (cached builds return at once); `missing`
/// names what a failure leaves unbuilt.
fn build_tools(what: &str, missing: &str) -> Result<()> {
    let built = Command::new("bash")
        .arg(crate::workspace_root().join("e2e/scripts/build-helm.sh"))
        .arg(what)
        .status()
        .with_context(|| format!("run build-helm.sh {what}"))?;
    if !built.success() {
        bail!("build-helm.sh {what} failed: no {missing}");
    }
    Ok(())
}

/// The control plane's directory (its kubeconfig's): logs of what runs
/// beside it go there, and with it.
fn cp_dir(cp: &ControlPlane) -> Result<PathBuf> {
    Ok(cp
        .kubeconfig
        .parent()
        .context("kubeconfig has no directory")?
        .to_path_buf())
}

/// Fake Nodes a test made; deleted when dropped, even when the test fails
/// (Nodes are cluster-scoped and would outlive the test's namespace).
#[derive(Debug)]
pub struct FakeNodes<'a> {
    cp: &'a ControlPlane,
    /// Names of the Nodes.
    pub names: Vec<String>,
}

impl<'a> FakeNodes<'a> {
    /// Creates each `(name, labels)` Node through `workloads` and waits for it to be Ready.
    pub fn add(
        workloads: &Workloads,
        cp: &'a ControlPlane,
        nodes: &[(&str, &[(&str, &str)])],
    ) -> Result<FakeNodes<'a>> {
        let mut made = FakeNodes {
            cp,
            names: Vec::new(),
        };
        for (name, labels) in nodes {
            made.names.push((*name).to_string());
            workloads.add_node(cp, name, labels)?;
        }
        Ok(made)
    }
}

impl Drop for FakeNodes<'_> {
    fn drop(&mut self) {
        let mut args = vec!["delete", "node", "--ignore-not-found", "--wait=false"];
        args.extend(self.names.iter().map(String::as_str));
        if let Err(e) = self.cp.kubectl_ok(&args, None) {
            eprintln!("leaving fake nodes {:?}: {e:#}", self.names);
        }
    }
}

/// Starts `bin args` under a shell that kills it when our pipe closes, and
/// waits for the shell to say it started.
pub fn supervise(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    if !bin.is_file() {
        bail!("{} is missing", bin.display());
    }
    // The watcher polls rather than `wait`s: only the parent shell can wait,
    // and it is busy holding the pipe. Its last line may find the log's
    // directory already removed by the owner's cleanup: not worth a message.
    let script = r#"log=$1; shift
"$@" >>"$log" 2>&1 & pid=$!
echo started
( while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done; echo "wrenn-supervise: exited" 2>/dev/null >>"$log" ) &
cat >/dev/null
kill "$pid" 2>/dev/null; sleep 0.5; kill -9 "$pid" 2>/dev/null; true"#;
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("wrenn-supervise")
        .arg(log)
        .arg(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let stdout = child.stdout.take().context("supervisor stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "started" {
        bail!("could not start {}", bin.display());
    }
    Ok(child)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
