//! A template's pull Secret, as pure functions: the registry an image
//! reference names, the credentials a `kubernetes.io/dockerconfigjson`
//! Secret holds for it, and the words that tell a namespace owner how to
//! let the operator read the Secret. The `get` itself is the template
//! controller's; nothing here does I/O.
//!
//! Credentials print redacted: they go from the Secret into one
//! `PrepareTemplate` request and nowhere else.
//!
//! Matching follows the kubelet's for the common cases: an `auths` key is
//! a host (`registry.example.com`, `localhost:5000`), optionally with a
//! scheme and a path (`https://index.docker.io/v1/`), and Docker Hub's
//! aliases (`index.docker.io`, `registry-1.docker.io`) are `docker.io`.
//! Keys with wildcards or a repository path are matched by host only.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use wrenn_crds::reason::Reason;
use wrenn_proto::agent::v1 as pb;

/// The only Secret type a pull Secret may have.
pub const SECRET_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Its data key.
pub const DATA_KEY: &str = ".dockerconfigjson";

/// A user name and password for one registry, as the agent takes them
/// (its `Debug` redacts the password).
pub type Credentials = pb::RegistryCredentials;

/// Why a pull Secret cannot be used. Messages never quote Secret data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    /// The Secret is of another type.
    #[error("Secret {name} has type {actual:?}; a pull Secret must be {SECRET_TYPE}")]
    WrongType {
        /// Secret name.
        name: String,
        /// Its type.
        actual: String,
    },
    /// The Secret's `.dockerconfigjson` is missing or unreadable.
    #[error("Secret {name}: {DATA_KEY} {why}")]
    Malformed {
        /// Secret name.
        name: String,
        /// What is wrong (never the data).
        why: String,
    },
    /// No entry for the image's registry.
    #[error(
        "Secret {name} holds no credentials for registry {registry} (it has entries for: {hosts})"
    )]
    NoEntry {
        /// Secret name.
        name: String,
        /// The image's registry.
        registry: String,
        /// The registries it has entries for.
        hosts: String,
    },
}

impl Invalid {
    /// The template's reason.
    pub fn reason(&self) -> Reason {
        match self {
            Invalid::NoEntry { .. } => Reason::PullSecretNoCredentials,
            Invalid::WrongType { .. } | Invalid::Malformed { .. } => Reason::PullSecretInvalid,
        }
    }
}

/// Docker Hub's canonical host.
const DOCKER_HUB: &str = "docker.io";

fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

/// The registry host (`host[:port]`) of an image reference, as Docker
/// reads it: the first path segment when it has a `.` or a `:` or is
/// `localhost`, else Docker Hub.
pub fn registry_host(reference: &str) -> String {
    let r = reference.strip_prefix("docker://").unwrap_or(reference);
    match r.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            canonical_host(first)
        }
        _ => DOCKER_HUB.to_string(),
    }
}

/// The host an `auths` key names: scheme and path stripped.
fn key_host(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    canonical_host(k.split('/').next().unwrap_or(k))
}

#[derive(Deserialize)]
struct DockerConfig {
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The credentials `secret` (named `name`) holds for `reference`'s registry.
pub fn credentials_for(
    name: &str,
    secret: &Secret,
    reference: &str,
) -> Result<Credentials, Invalid> {
    let malformed = |why: String| Invalid::Malformed {
        name: name.to_string(),
        why,
    };
    let actual = secret.type_.clone().unwrap_or_default();
    if actual != SECRET_TYPE {
        return Err(Invalid::WrongType {
            name: name.to_string(),
            actual,
        });
    }
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .ok_or_else(|| malformed("is missing".into()))?;
    // serde_json's message can quote the input; only its position is shown.
    let config: DockerConfig = serde_json::from_slice(&data.0).map_err(|e| {
        malformed(format!(
            "is not a docker config with an \"auths\" object (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let registry = registry_host(reference);
    let Some((key, entry)) = config.auths.iter().find(|(k, _)| key_host(k) == registry) else {
        let hosts: Vec<String> = config.auths.keys().map(|k| key_host(k)).collect();
        return Err(Invalid::NoEntry {
            name: name.to_string(),
            registry,
            hosts: if hosts.is_empty() {
                "none".into()
            } else {
                hosts.join(", ")
            },
        });
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Credentials {
            username: u.clone(),
            password: p.clone(),
        });
    }
    let auth = entry.auth.as_deref().ok_or_else(|| {
        malformed(format!(
            "entry {key:?} has neither auth nor username and password"
        ))
    })?;
    let bad_auth = || {
        malformed(format!(
            "entry {key:?}: auth is not base64 of user:password"
        ))
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad_auth())?;
    let text = String::from_utf8(decoded).map_err(|_| bad_auth())?;
    let (u, p) = text.split_once(':').ok_or_else(bad_auth)?;
    Ok(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    })
}

/// What a namespace owner runs so that the operator, acting as
/// `identity` (`system:serviceaccount:NS:SA`), may read Secret `secret` of
/// namespace `ns` and nothing else.
pub fn grant_hint(ns: &str, secret: &str, identity: Option<&str>) -> String {
    let role = grant_role_name(secret);
    let subject = match identity.and_then(|i| i.strip_prefix("system:serviceaccount:")) {
        Some(sa) => format!("--serviceaccount={sa}"),
        None => match identity {
            Some(user) => format!("--user={user}"),
            None => "--serviceaccount=<operator namespace>:<operator service account>".into(),
        },
    };
    format!(
        "kubectl -n {ns} create role {role} --verb=get --resource=secrets --resource-name={secret} && kubectl -n {ns} create rolebinding {role} --role={role} {subject}"
    )
}

/// The Role (and RoleBinding) that grants reading one pull Secret.
pub fn grant_role_name(secret: &str) -> String {
    // Role names are DNS subdomains of at most 253 characters.
    let name = format!("wrenn-pull-{secret}");
    name.chars().take(253).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, json: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(DATA_KEY.to_string(), ByteString(json.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn registries_are_read_as_docker_reads_them() {
        assert_eq!(registry_host("alpine:3.20"), "docker.io");
        assert_eq!(registry_host("library/alpine"), "docker.io");
        assert_eq!(registry_host("index.docker.io/library/alpine"), "docker.io");
        assert_eq!(registry_host("ghcr.io/wrenn/base:1"), "ghcr.io");
        assert_eq!(registry_host("localhost/x"), "localhost");
        assert_eq!(
            registry_host("127.0.0.1:5000/x@sha256:ab"),
            "127.0.0.1:5000"
        );
        assert_eq!(
            registry_host("docker://Reg.Example.com/x"),
            "reg.example.com"
        );
    }

    #[test]
    fn the_entry_of_the_images_registry_is_picked_in_either_form() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "reg.example.com:5000": {{"username": "robot", "password": "p:w"}},
                "other.example.com": {{"auth": "{}"}}
            }}}}"#,
            b64("hub-user:hub:pass"),
            b64("o:o")
        );
        let s = secret(SECRET_TYPE, &json);
        let hub = credentials_for("pull", &s, "alpine:3.20").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub-user", "hub:pass")
        );
        let reg = credentials_for("pull", &s, "reg.example.com:5000/team/app:v1").unwrap();
        assert_eq!(
            (reg.username.as_str(), reg.password.as_str()),
            ("robot", "p:w")
        );
        let err = credentials_for("pull", &s, "ghcr.io/x/y:1").unwrap_err();
        assert_eq!(err.reason(), Reason::PullSecretNoCredentials);
        assert_eq!(
            err.to_string(),
            "Secret pull holds no credentials for registry ghcr.io (it has entries for: docker.io, other.example.com, reg.example.com:5000)"
        );
    }

    #[test]
    fn bad_secrets_are_refused_without_quoting_their_data() {
        let opaque = secret("Opaque", r#"{"auths":{}}"#);
        let err = credentials_for("pull", &opaque, "alpine").unwrap_err();
        assert_eq!(err.reason(), Reason::PullSecretInvalid);
        assert!(err.to_string().contains("has type \"Opaque\""), "{err}");
        for (json, shown) in [
            (r#"{"auths": "topsecret"}"#, "docker config"),
            (
                r#"{"auths": {"docker.io": {"auth": "!!topsecret"}}}"#,
                "base64",
            ),
            (
                r#"{"auths": {"docker.io": {"identitytoken": "topsecret"}}}"#,
                "neither",
            ),
        ] {
            let err = credentials_for("pull", &secret(SECRET_TYPE, json), "alpine").unwrap_err();
            let text = err.to_string();
            assert_eq!(err.reason(), Reason::PullSecretInvalid, "{text}");
            assert!(text.contains(shown), "{text}");
            assert!(!text.contains("topsecret"), "{text}");
        }
        let creds = Credentials {
            username: "u".into(),
            password: "topsecret".into(),
        };
        assert!(!format!("{creds:?}").contains("topsecret"));
    }

    #[test]
    fn the_grant_hint_is_two_commands_for_that_secret_only() {
        assert_eq!(
            grant_hint(
                "team",
                "regcred",
                Some("system:serviceaccount:wrenn:wrenn-operator")
            ),
            "kubectl -n team create role wrenn-pull-regcred --verb=get --resource=secrets --resource-name=regcred && kubectl -n team create rolebinding wrenn-pull-regcred --role=wrenn-pull-regcred --serviceaccount=wrenn:wrenn-operator"
        );
        assert!(grant_hint("team", "regcred", None).contains("<operator service account>"));
    }
}
