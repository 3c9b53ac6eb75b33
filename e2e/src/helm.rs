//! Helm for chart tests: finds the binary that `e2e/scripts/build-helm.sh`
//! builds from the Go module proxy (building it when absent), runs it
//! against a [`ControlPlane`], and reads what `helm template` renders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use wrenn_testkit::Case;

use crate::{ControlPlane, workspace_root};

/// The Kubernetes version charts are rendered for: the control plane's.
pub const KUBE_VERSION_FLAG: &str = "--kube-version=1.36.3";

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/wrenn")
}

/// A helm binary.
#[derive(Debug, Clone)]
pub struct Helm {
    /// Path of the binary.
    pub bin: PathBuf,
}

impl Helm {
    /// The cached helm of `versions.sh`, built by `build-helm.sh helm` when absent.
    pub fn find() -> Result<Helm> {
        let bin = PathBuf::from(script_var("HELM_BIN_DIR")?).join("helm");
        if !bin.is_file() {
            let built = Command::new("bash")
                .arg(workspace_root().join("e2e/scripts/build-helm.sh"))
                .arg("helm")
                .status()
                .context("run build-helm.sh helm")?;
            if !built.success() || !bin.is_file() {
                bail!(
                    "no helm at {} and build-helm.sh failed (needs Go and the Go module proxy)",
                    bin.display()
                );
            }
        }
        Ok(Helm { bin })
    }

    /// Runs helm with no cluster; returns its output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .output()
            .with_context(|| format!("run helm {args:?}"))
    }

    /// Runs helm against `cp` (kubeconfig set, state kept in the control
    /// plane's directory so nothing of the user's helm setup is read or written).
    pub fn run_on(&self, cp: &ControlPlane, args: &[&str]) -> Result<Output> {
        let home = cp
            .kubeconfig
            .parent()
            .map(|d| d.join("helm"))
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("wrenn-helm-{}", std::process::id()))
            });
        Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .with_context(|| format!("run helm {args:?}"))
    }

    /// [`Helm::run_on`], failing with helm's stderr on a non-zero exit.
    pub fn ok_on(&self, cp: &ControlPlane, args: &[&str]) -> Result<String> {
        ok(self.run_on(cp, args)?, args)
    }

    /// [`Helm::run`], failing with helm's stderr on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        ok(self.run(args)?, args)
    }

    /// The chart rendered offline as `release` in `ns` with `extra` flags,
    /// one JSON value per document.
    pub fn template(
        &self,
        release: &str,
        ns: &str,
        extra: &[&str],
    ) -> Result<Vec<serde_json::Value>> {
        let chart = chart_dir().display().to_string();
        let mut args = vec![
            "template",
            release,
            chart.as_str(),
            "-n",
            ns,
            KUBE_VERSION_FLAG,
        ];
        args.extend_from_slice(extra);
        documents(&self.ok(&args)?)
    }
}

/// Helm, or `case` skipped naming why there is none.
pub fn helm_or_skip(case: Case) -> Option<(Case, Helm)> {
    match Helm::find() {
        Ok(h) => Some((case, h)),
        Err(e) => {
            case.skip(format!("no helm: {e:#}"));
            None
        }
    }
}

/// Helm and the shared control plane, or `case` skipped naming what is
/// missing (blocking: it may start the control plane).
pub fn cluster_or_skip(case: Case) -> Option<(Case, Helm, &'static ControlPlane)> {
    let (case, helm) = helm_or_skip(case)?;
    match ControlPlane::shared() {
        Ok(cp) => Some((case, helm, cp)),
        Err(e) => {
            case.skip(format!("no control plane: {e}"));
            None
        }
    }
}

fn ok(out: Output, args: &[&str]) -> Result<String> {
    if !out.status.success() {
        bail!(
            "helm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads a variable of `e2e/scripts/versions.sh` (after environment overrides).
pub fn script_var(name: &str) -> Result<String> {
    let versions = workspace_root().join("e2e/scripts/versions.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(". \"$1\" && printf %s \"${name}\""))
        .arg("bash")
        .arg(&versions)
        .output()
        .context("source versions.sh")?;
    let value = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || value.is_empty() {
        bail!("versions.sh does not define {name}");
    }
    Ok(value)
}

/// Parses a multi-document YAML stream (as `helm template` prints it) into
/// its non-empty documents.
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for (i, doc) in yaml.split("\n---\n").enumerate() {
        let value: Option<serde_json::Value> = serde_saphyr::from_str(doc)
            .with_context(|| format!("parse YAML document {i}:\n{doc}"))?;
        match value {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => docs.push(v),
        }
    }
    Ok(docs)
}

/// The one document of `kind`; panics (a failed test) unless there is
/// exactly one.
pub fn find_one<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    match found[..] {
        [one] => one,
        _ => panic!("expected one {kind}, got {}", found.len()),
    }
}

/// The one `kind` of `component` (label `app.kubernetes.io/component`);
/// panics unless there is exactly one.
pub fn find_of<'a>(
    docs: &'a [serde_json::Value],
    kind: &str,
    component: &str,
) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| {
            d["kind"] == kind && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .collect();
    match found[..] {
        [one] => one,
        _ => panic!("expected one {kind} of {component}, got {}", found.len()),
    }
}

/// (name, value or valueFrom) of a rendered container's env, in order.
pub fn env_of(container: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    container["env"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let v = if e["value"].is_null() {
                e["valueFrom"].clone()
            } else {
                e["value"].clone()
            };
            (e["name"].as_str().unwrap_or_default().to_string(), v)
        })
        .collect()
}

/// Copies the chart into `dest` (for tests that change a copy).
pub fn copy_chart(dest: &Path) -> Result<()> {
    copy_dir(&chart_dir(), dest)
}

fn copy_dir(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("create {}", dest.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("read {}", src.display()))? {
        let entry = entry?;
        let to = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}
