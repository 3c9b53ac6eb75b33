//! Harness for tests against a real control plane: etcd + kube-apiserver
//! built from the Go module proxy by `e2e/scripts/build-control-plane.sh`
//! and run by `e2e/scripts/control-plane.sh` on loopback ports chosen at run
//! time.
//!
//! [`ControlPlane::shared`] reuses the cluster named by `WRENN_KUBECONFIG`
//! when set, and otherwise starts one for this test binary. The script runs
//! in the foreground holding our end of a pipe as its stdin; when the test
//! process exits, however it exits, the pipe closes and the script stops
//! etcd and the API server. CRDs and the admission policy from `crds/` are
//! installed once and waited for until served.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod build;
pub mod child;
pub mod gateway;
pub mod helm;
pub mod leaks;
pub mod local;
pub mod reclaim;
pub mod workloads;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// A running (or reused) control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// kubectl of the same minor version as the server.
    pub kubectl: PathBuf,
    /// Milliseconds from process start to `/readyz` (when this binary started it).
    pub start_ms: Option<u64>,
    // Held only so the pipe stays open for the life of the process.
    _supervisor: Option<Mutex<Child>>,
}

/// The error of a merge patch of `name` that the API server must refuse
/// (RBAC or an admission policy); panics when it takes it.
pub async fn refused_merge_patch<K>(
    api: &kube::Api<K>,
    name: &str,
    params: &kube::api::PatchParams,
    patch: serde_json::Value,
) -> kube::Error
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, params, &kube::api::Patch::Merge(patch))
        .await
    {
        Ok(o) => panic!("a patch of {name} that must be refused was taken: {o:?}"),
        Err(e) => e,
    }
}

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    wrenn_testkit::workspace_root()
}

fn script() -> PathBuf {
    workspace_root().join("e2e/scripts/control-plane.sh")
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// How [`ControlPlane::start_own`] starts a control plane; the default is
/// what [`ControlPlane::shared`] starts.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The front-proxy flags aggregated API servers need: a request-header
    /// CA and the proxy's client certificate (`pki/front-proxy-ca.crt`,
    /// `pki/front-proxy-client.{crt,key}`, CN `front-proxy-client`) and
    /// `--enable-aggregator-routing`.
    pub front_proxy: bool,
    /// Users besides the admin, each with a static token.
    pub tokens: Vec<StaticToken>,
}

/// API server flags a few tests change, beside [`Options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerFlags {
    /// `--request-timeout` (whole seconds; default 60 s): when the API
    /// server cuts requests that are not long-running.
    pub request_timeout: Option<Duration>,
}

/// A user of the static token file.
#[derive(Clone, Debug)]
pub struct StaticToken {
    /// Bearer token.
    pub token: String,
    /// User name.
    pub user: String,
    /// Groups (besides `system:authenticated`, which every user has).
    pub groups: Vec<String>,
}

impl ControlPlane {
    /// The control plane of this test process, started on first use with
    /// the CRDs installed. `Err` carries why it could not start, for the
    /// caller to turn into a skip (or failure, when the tier is required).
    pub fn shared() -> Result<&'static ControlPlane, String> {
        SHARED
            .get_or_init(|| Self::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn start() -> Result<ControlPlane> {
        let kubectl = kubectl_path()?;
        let cp = match std::env::var_os("WRENN_KUBECONFIG") {
            Some(path) => ControlPlane {
                kubeconfig: PathBuf::from(path),
                kubectl,
                start_ms: None,
                _supervisor: None,
            },
            None => Self::spawn(kubectl)?,
        };
        cp.install_crds()?;
        Ok(cp)
    }

    /// A control plane of the caller's own, started as `opts` asks, with
    /// the CRDs installed; never a reused one (`WRENN_KUBECONFIG`), whose
    /// flags the caller could not know. Stopped when dropped.
    pub fn start_own(opts: &Options) -> Result<ControlPlane> {
        Self::start_own_with(opts, ServerFlags::default())
    }

    /// [`Self::start_own`] with `flags` on the API server.
    pub fn start_own_with(opts: &Options, flags: ServerFlags) -> Result<ControlPlane> {
        let kubectl = kubectl_path()?;
        static OWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = OWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wrenn-cp-{}-own{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut env = Vec::new();
        if opts.front_proxy {
            env.push(("WRENN_CP_FRONT_PROXY", "1".into()));
        }
        if let Some(t) = flags.request_timeout {
            env.push((
                "WRENN_CP_REQUEST_TIMEOUT",
                format!("{}s", t.as_secs().max(1)),
            ));
        }
        if !opts.tokens.is_empty() {
            let file = dir.join("extra-tokens.csv");
            let lines: String = opts
                .tokens
                .iter()
                .map(|t| {
                    format!(
                        "{},{},{}-uid,\"{}\"\n",
                        t.token,
                        t.user,
                        t.user,
                        t.groups.join(",")
                    )
                })
                .collect();
            std::fs::write(&file, lines).context("write the extra tokens")?;
            env.push(("WRENN_CP_EXTRA_TOKENS", file.display().to_string()));
        }
        let cp = Self::spawn_in(kubectl, dir, &env)?;
        cp.install_crds()?;
        Ok(cp)
    }

    /// The directory of a control plane this process started (`pki/` holds
    /// its certificates); `None` for a reused one.
    pub fn dir(&self) -> Option<&Path> {
        self._supervisor
            .as_ref()
            .and_then(|_| self.kubeconfig.parent())
    }

    /// A kubeconfig for the static-token user `user` (see [`Options::tokens`]),
    /// written beside the admin's; an empty `token` sends no credentials.
    pub fn kubeconfig_for(&self, user: &str, token: &str) -> Result<PathBuf> {
        let admin = std::fs::read_to_string(&self.kubeconfig).context("read the kubeconfig")?;
        let mut kc: serde_json::Value =
            serde_saphyr::from_str(&admin).context("parse the kubeconfig")?;
        let credentials = if token.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::json!({ "token": token })
        };
        kc["users"] = serde_json::json!([{ "name": "admin", "user": credentials }]);
        let path = self.kubeconfig.with_file_name(format!("kubeconfig-{user}"));
        std::fs::write(&path, serde_json::to_string(&kc)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    fn spawn(kubectl: PathBuf) -> Result<ControlPlane> {
        let dir = std::env::temp_dir().join(format!("wrenn-cp-{}", std::process::id()));
        Self::spawn_in(kubectl, dir, &[])
    }

    fn spawn_in(kubectl: PathBuf, dir: PathBuf, env: &[(&str, String)]) -> Result<ControlPlane> {
        let mut child = Command::new("bash")
            .arg(script())
            .arg("run")
            .arg(&dir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start e2e/scripts/control-plane.sh")?;
        let stdout = child.stdout.take().context("control-plane.sh stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("read control-plane.sh output")?;
        let Some(kubeconfig) = line.trim().strip_prefix("ready ") else {
            let status = child.wait().ok();
            bail!("control plane did not start (script exit {status:?}); see its output above");
        };
        let start_ms = std::fs::read_to_string(dir.join("start-ms"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(ControlPlane {
            kubeconfig: PathBuf::from(kubeconfig),
            kubectl,
            start_ms,
            _supervisor: Some(Mutex::new(child)),
        })
    }

    /// The CRDs first, then the admission policy: a policy whose paramKind
    /// (CapsuleTemplate) is not served yet fails to configure, and with
    /// `failurePolicy: Fail` it then refuses every Capsule until the API
    /// server compiles it again.
    fn install_crds(&self) -> Result<()> {
        let crds = workspace_root().join("crds");
        let apply = |file: &str| {
            let applied = self.kubectl_ok(
                &["apply", "--server-side", "--force-conflicts", "-f"],
                Some(&crds.join(file)),
            );
            if let Err(e) = &applied {
                assert_not_refused(file, e);
            }
            applied
        };
        for file in [
            "capsule.yaml",
            "capsulesnapshot.yaml",
            "capsuletemplate.yaml",
        ] {
            apply(file)?;
        }
        self.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/capsules.wrenn.dev",
                "crd/capsulesnapshots.wrenn.dev",
                "crd/capsuletemplates.wrenn.dev",
            ],
            None,
        )?;
        // Established is not yet served through discovery: poll until it is.
        self.until_ok("CRDs served", || {
            self.kubectl_ok(&["get", "cap,csnap,ctpl", "-A"], None)
        })?;
        apply("policy.yaml")?;
        // A Capsule passes admission (no such template: the binding allows
        // it) once the validating policy is configured.
        // One file per install: several control planes of one test process
        // install their CRDs at once, and each removes its probe when done.
        static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe =
            std::env::temp_dir().join(format!("wrenn-probe-{}-{n}.json", std::process::id()));
        std::fs::write(
            &probe,
            r#"{"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "admission-probe", "namespace": "default"}, "spec": {"source": {"templateRef": {"name": "admission-probe"}}}}"#,
        )
        .context("write the admission probe")?;
        // It comes back with the operator's finalizer once the mutating
        // policy is configured too, so no test races its compilation.
        let admitted = self.until_ok("the admission policies take effect", || {
            let out = self.kubectl_ok(
                &[
                    "create",
                    "--dry-run=server",
                    "-o",
                    "jsonpath={.metadata.finalizers}",
                    "-f",
                ],
                Some(&probe),
            )?;
            if out.contains(wrenn_crds::names::FINALIZER) {
                Ok(out)
            } else {
                Err(anyhow!("created without the finalizer yet: {out:?}"))
            }
        });
        let _ = std::fs::remove_file(&probe);
        admitted.map(|_| ())
    }

    /// Retries `attempt` for up to 60 s ([`wrenn_testkit::wait_until`]).
    fn until_ok(&self, what: &str, attempt: impl Fn() -> Result<String>) -> Result<String> {
        wrenn_testkit::wait_until(Duration::from_secs(60), what, || {
            attempt().map_err(|e| format!("{e:#}"))
        })
        .map_err(|e| anyhow!(e))
    }

    /// Runs kubectl against this cluster; returns its output whatever the exit code.
    pub fn kubectl(&self, args: &[&str], file_arg: Option<&Path>) -> Result<std::process::Output> {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        if let Some(f) = file_arg {
            cmd.arg(f);
        }
        cmd.output()
            .with_context(|| format!("run kubectl {args:?}"))
    }

    /// Runs kubectl and returns stdout, failing with stderr on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str], file_arg: Option<&Path>) -> Result<String> {
        let out = self.kubectl(args, file_arg)?;
        if !out.status.success() {
            return Err(anyhow!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kube client for this cluster, bound to the caller's runtime.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }
}

/// Fails the test when the API server refused one of our own manifests
/// as invalid (a CEL rule over its cost budget, a schema it cannot
/// take): that is a defect in `crds/`, never a missing part to skip over.
fn assert_not_refused(file: &str, e: &anyhow::Error) {
    let why = format!("{e:#}");
    assert!(
        !why.contains(" is invalid"),
        "the API server refuses Wrenn's own {file}: {why}"
    );
}

/// A kube client for the cluster of `kubeconfig`, bound to the caller's runtime.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("load kubeconfig")?;
    wrenn_operator::kube_client::build(config).context("build client")
}

fn kubectl_path() -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script())
        .arg("kubectl-path")
        .output()
        .context("run control-plane.sh kubectl-path")?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.is_file() {
        // Building takes 10-20 minutes cold; the script does it, the test
        // only asks where the result is.
        let built = Command::new("bash")
            .arg(workspace_root().join("e2e/scripts/build-control-plane.sh"))
            .status()
            .context("run build-control-plane.sh")?;
        if !built.success() || !path.is_file() {
            bail!(
                "no kubectl at {} and build-control-plane.sh failed (needs Go and the Go module proxy)",
                path.display()
            );
        }
    }
    Ok(path)
}

/// Creates a namespace named `<prefix>-<random>` and returns its name. Test
/// namespaces are left behind: without kube-controller-manager a deleted
/// namespace never finishes terminating, and the cluster is thrown away.
pub async fn temp_namespace(client: &kube::Client, prefix: &str) -> Result<String> {
    create_namespace(client, prefix, serde_json::json!({})).await
}

/// [`temp_namespace`] labelled as a cluster admin labels a namespace whose
/// CapsuleTemplates may name files in node image directories (the guest
/// image's root disk). Labelled at creation: the admission policy reads
/// namespace labels from a cache that lags a later patch.
pub async fn node_images_namespace(client: &kube::Client, prefix: &str) -> Result<String> {
    use wrenn_crds::names::label::{NODE_IMAGES, NODE_IMAGES_ALLOWED};
    create_namespace(
        client,
        prefix,
        serde_json::json!({ NODE_IMAGES: NODE_IMAGES_ALLOWED }),
    )
    .await
}

async fn create_namespace(
    client: &kube::Client,
    prefix: &str,
    labels: serde_json::Value,
) -> Result<String> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "generateName": format!("{prefix}-"), "labels": labels }
    }))?;
    let created = api.create(&PostParams::default(), &ns).await?;
    created
        .metadata
        .name
        .context("created namespace has no name")
}
