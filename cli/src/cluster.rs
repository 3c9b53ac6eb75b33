//! The connection to the cluster, chosen as kubectl chooses it: the
//! kubeconfig from `--kubeconfig`, else `$KUBECONFIG`, else
//! `~/.kube/config`; its current context unless `--context`; the namespace
//! from `-n`, else the context's, else `default`. Also the one place that
//! turns API refusals into what a user needs to read. What to ask the API
//! is left to the verbs.

use std::path::{Path, PathBuf};

use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where requests go, chosen as kubectl chooses it.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAME")]
    pub namespace: Option<String>,
}

/// Why talking to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig named by `--kubeconfig` could not be read.
    #[error("read the kubeconfig {}", path.display())]
    ReadKubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig from `$KUBECONFIG` or `~/.kube/config`.
    #[error("read the kubeconfig ($KUBECONFIG or ~/.kube/config; or pass --kubeconfig)")]
    FindKubeconfig(#[source] kube::config::KubeconfigError),
    /// The kubeconfig has no usable context, cluster or user.
    #[error("use the kubeconfig's context{}", context.as_ref().map(|c| format!(" {c:?}")).unwrap_or_default())]
    LoadContext {
        /// The context asked for (`None`: the current one).
        context: Option<String>,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The HTTP client could not be built (TLS material, proxy).
    #[error("build the Kubernetes client")]
    BuildClient(#[source] kube::Error),
    /// The object does not exist.
    #[error("{kind} {name:?} not found in namespace {namespace:?}")]
    NotFound {
        /// `capsule`, `capsulesnapshot`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Where it was looked for.
        namespace: String,
    },
    /// RBAC refused; the API server's message says who may not do what.
    #[error("{message}")]
    Forbidden {
        /// The API server's message.
        message: String,
    },
    /// Any other refusal, in the API server's words.
    #[error("{message} ({code})")]
    Refused {
        /// HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// The request did not get an answer (network, TLS, authentication plugin).
    #[error("reach the API server")]
    Transport(#[source] kube::Error),
}

/// A client and the namespace verbs act in.
#[derive(Clone)]
pub struct Target {
    /// Authenticated as the kubeconfig's user.
    pub client: kube::Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Loads the kubeconfig and context `args` choose.
    pub async fn connect(args: &TargetArgs) -> Result<Target, Error> {
        let TargetArgs {
            kubeconfig,
            context,
            namespace,
        } = args;
        let kc = read_kubeconfig(kubeconfig.as_deref())?;
        let options = KubeConfigOptions {
            context: context.clone(),
            ..Default::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|source| Error::LoadContext {
                context: context.clone(),
                source,
            })?;
        let namespace = namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = wrenn_operator::kube_client::build(config).map_err(Error::BuildClient)?;
        Ok(Target { client, namespace })
    }

    /// Classifies `err` from a request about `kind` `name` in this namespace.
    pub fn refusal(&self, err: kube::Error, kind: &'static str, name: &str) -> Error {
        classify(err, kind, name, &self.namespace)
    }
}

/// `--kubeconfig`, else `$KUBECONFIG` (a list, merged as kubectl merges
/// it), else `~/.kube/config`: blocking reads of small files, done once
/// before any request.
fn read_kubeconfig(path: Option<&Path>) -> Result<Kubeconfig, Error> {
    match path {
        Some(path) => Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig {
            path: path.to_path_buf(),
            source,
        }),
        None => Kubeconfig::read().map_err(Error::FindKubeconfig),
    }
}

/// What a refusal means to the user (pure). A 404 names the object only
/// when the API server said which object it did not find (`details.name`):
/// a bare 404 means the path itself is not served.
pub fn classify(err: kube::Error, kind: &'static str, name: &str, namespace: &str) -> Error {
    let status = match err {
        kube::Error::Api(status) => status,
        other => return Error::Transport(other),
    };
    let names_object = status.details.as_ref().is_some_and(|d| !d.name.is_empty());
    match status.code {
        404 if names_object => Error::NotFound {
            kind,
            name: name.to_string(),
            namespace: namespace.to_string(),
        },
        403 => Error::Forbidden {
            message: status.message,
        },
        code => Error::Refused {
            code,
            message: status.message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn api(code: u16, message: &str, name: Option<&str>) -> kube::Error {
        let mut status = json!({ "status": "Failure", "code": code, "message": message });
        if let Some(n) = name {
            status["details"] = json!({ "name": n, "kind": "capsules" });
        }
        kube::Error::Api(Box::new(
            serde_json::from_value(status).unwrap_or_else(|e| panic!("{e}")),
        ))
    }

    #[test]
    fn not_found_names_the_object_and_the_namespace() {
        let e = classify(
            api(
                404,
                "capsules.wrenn.dev \"nosuch\" not found",
                Some("nosuch"),
            ),
            "capsule",
            "nosuch",
            "team-a",
        );
        assert_eq!(
            e.to_string(),
            "capsule \"nosuch\" not found in namespace \"team-a\""
        );
    }

    #[test]
    fn a_404_without_an_object_is_an_unserved_path_not_a_missing_capsule() {
        let e = classify(
            api(
                404,
                "the server could not find the requested resource",
                None,
            ),
            "capsule",
            "box",
            "team-a",
        );
        assert!(matches!(e, Error::Refused { code: 404, .. }), "{e:?}");
    }

    #[test]
    fn forbidden_is_the_api_servers_own_sentence() {
        let msg = "capsules.wrenn.dev \"box\" is forbidden: User \"bob\" cannot patch resource \"capsules\"";
        let e = classify(api(403, msg, Some("box")), "capsule", "box", "a");
        assert_eq!(e.to_string(), msg);
    }

    #[test]
    fn other_refusals_keep_the_message_and_code() {
        let e = classify(
            api(409, "capsule box is Paused", Some("box")),
            "capsule",
            "box",
            "a",
        );
        assert_eq!(e.to_string(), "capsule box is Paused (409)");
    }
}
