//! Authentication: the gateway trusts only the kube-apiserver's front
//! proxy. A request is from a user only when its TLS client certificate was
//! signed by the request-header CA and names an allowed proxy, and then the
//! user is what the `X-Remote-*` headers say. Everything else is refused:
//! no certificate, another CA (checked in the handshake), another name, no
//! user header.
//!
//! The CA, the allowed names and the header names come from the ConfigMap
//! `kube-system/extension-apiserver-authentication`, which the API server
//! publishes; [`FrontProxy::watch`] re-reads it (and the gateway's own
//! serving certificate) so a rotation needs no restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::HeaderMap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use wrenn_runtime::pem;

use crate::route::{Reason, Refusal};

/// Namespace of the API server's authentication ConfigMap.
pub const CONFIGMAP_NAMESPACE: &str = "kube-system";
/// Name of the API server's authentication ConfigMap.
pub const CONFIGMAP_NAME: &str = "extension-apiserver-authentication";

/// Errors loading the front-proxy trust or the serving certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ConfigMap could not be read.
    #[error("read ConfigMap {CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME}")]
    ReadConfigMap(#[source] kube::Error),
    /// The API server publishes no request-header CA: it runs without
    /// `--requestheader-client-ca-file`, so no request can be trusted.
    #[error(
        "ConfigMap {CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME} has no requestheader-client-ca-file (start kube-apiserver with --requestheader-client-ca-file)"
    )]
    NoRequestHeaderCa,
    /// A key of the ConfigMap is not the JSON list of strings it should be.
    #[error("ConfigMap key {key} is not a JSON list of strings")]
    BadList {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The request-header CA holds no usable certificate.
    #[error("trust the request-header CA")]
    Ca(#[source] rustls::server::VerifierBuilderError),
    /// A PEM file could not be read or decoded.
    #[error("load the serving TLS files")]
    Pem(#[source] wrenn_runtime::pem::Error),
    /// Certificate and key do not make a server identity.
    #[error("use the serving certificate {cert} with its key")]
    Identity {
        /// Certificate file.
        cert: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The task reading files died.
    #[error("load TLS material")]
    Load(#[source] tokio::task::JoinError),
}

/// What the API server says about its front proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// The CA signing the proxy's client certificate (PEM).
    pub ca_pem: String,
    /// Names (CN) the proxy certificate may carry; empty allows any the CA signed.
    pub allowed_names: Vec<String>,
    /// Headers naming the user, first non-empty wins.
    pub username_headers: Vec<String>,
    /// Headers naming the user's UID.
    pub uid_headers: Vec<String>,
    /// Headers naming groups, each value one group.
    pub group_headers: Vec<String>,
    /// Prefixes of headers carrying extra attributes.
    pub extra_prefixes: Vec<String>,
}

fn list(data: &BTreeMap<String, String>, key: &'static str) -> Result<Vec<String>, Error> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(s) if s.trim().is_empty() => Ok(Vec::new()),
        Some(s) => serde_json::from_str(s).map_err(|source| Error::BadList { key, source }),
    }
}

impl RequestHeader {
    /// From the ConfigMap's data (pure).
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, Error> {
        let ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|s| !s.trim().is_empty())
            .ok_or(Error::NoRequestHeaderCa)?
            .clone();
        Ok(Self {
            ca_pem,
            allowed_names: list(data, "requestheader-allowed-names")?,
            username_headers: list(data, "requestheader-username-headers")?,
            uid_headers: list(data, "requestheader-uid-headers")?,
            group_headers: list(data, "requestheader-group-headers")?,
            extra_prefixes: list(data, "requestheader-extra-headers-prefix")?,
        })
    }
}

/// An authenticated user, as the front proxy named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct User {
    /// User name.
    pub name: String,
    /// UID, when the proxy sends one.
    pub uid: Option<String>,
    /// Groups, sorted.
    pub groups: Vec<String>,
    /// Extra attributes (keys lowercased and percent-decoded).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Names of the verified client certificate's subject (CNs), empty when
/// there was none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Whether a certificate was presented (and verified by the CA in the handshake).
    pub verified: bool,
    /// Its subject CNs.
    pub common_names: Vec<String>,
}

impl Peer {
    /// The peer of a finished handshake.
    pub fn from_certs(certs: Option<&[CertificateDer<'static>]>) -> Self {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Self::default();
        };
        let common_names = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, c)| {
                c.subject()
                    .iter_common_name()
                    .filter_map(|cn| cn.as_str().ok().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            verified: true,
            common_names,
        }
    }
}

fn values<'a>(headers: &'a HeaderMap, names: &'a [String]) -> impl Iterator<Item = &'a str> + 'a {
    names
        .iter()
        .flat_map(move |n| headers.get_all(n.as_str()).iter())
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// `%XX` sequences decoded; anything malformed kept as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who sent the request: refused unless it came from the front proxy
/// (`peer` verified by the request-header CA and carrying an allowed name)
/// naming a user (pure).
pub fn identify(rh: &RequestHeader, peer: &Peer, headers: &HeaderMap) -> Result<User, Refusal> {
    let refuse = |m: &str| Err(Refusal::new(Reason::Unauthorized, m));
    if !peer.verified {
        return refuse(
            "only the Kubernetes API server's front proxy may call this server: no client certificate (use the API server, e.g. kubectl)",
        );
    }
    if !rh.allowed_names.is_empty()
        && !peer
            .common_names
            .iter()
            .any(|cn| rh.allowed_names.iter().any(|a| a == cn))
    {
        return refuse(
            "the client certificate is not the front proxy's (requestheader-allowed-names)",
        );
    }
    let Some(name) = values(headers, &rh.username_headers).next() else {
        return refuse("the front proxy named no user");
    };
    let uid = values(headers, &rh.uid_headers).next().map(str::to_string);
    let mut groups: Vec<String> = values(headers, &rh.group_headers)
        .map(str::to_string)
        .collect();
    groups.sort();
    groups.dedup();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (h, v) in headers {
        let lower = h.as_str().to_ascii_lowercase();
        let Some(key) = rh.extra_prefixes.iter().find_map(|p| {
            lower
                .strip_prefix(&p.to_ascii_lowercase())
                .filter(|k| !k.is_empty())
        }) else {
            continue;
        };
        if let Ok(v) = v.to_str() {
            extra
                .entry(percent_decode(key))
                .or_default()
                .push(v.to_string());
        }
    }
    Ok(User {
        name: name.to_string(),
        uid,
        groups,
        extra,
    })
}

/// Where the gateway's serving certificate is.
#[derive(Clone, Debug)]
pub struct ServingFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Key (PEM).
    pub key: PathBuf,
}

/// The TLS configuration: this serving certificate; client certificates
/// optional (a request without one gets a clear 401 rather than a failed
/// handshake) but verified against the request-header CA when presented.
/// Blocking.
pub fn build_tls(files: &ServingFiles, ca_pem: &str) -> Result<Arc<ServerConfig>, Error> {
    let (cert, key) = ("serving certificate", "serving key");
    let chain = pem::read(cert, &files.cert)
        .and_then(|b| pem::certs(cert, &files.cert, &b))
        .map_err(Error::Pem)?;
    let key = pem::read(key, &files.key)
        .and_then(|b| pem::private_key(key, &files.key, &b))
        .map_err(Error::Pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        // A bad certificate among several is skipped; none usable is
        // refused by the verifier builder.
        let _ = roots.add(ca);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(Error::Ca)?;
    let identity = |source| Error::Identity {
        cert: files.cert.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(identity)?;
    // The aggregator speaks HTTP/2, and HTTP/1.1 for WebSocket upgrades.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What is in force: the front proxy's description and the TLS
/// configuration built from it.
#[derive(Debug)]
pub struct Loaded {
    /// Request-header settings.
    pub request_header: RequestHeader,
    /// TLS for new connections.
    pub tls: Arc<ServerConfig>,
}

/// The shared, reloading front-proxy trust.
#[derive(Clone, Debug)]
pub struct FrontProxy {
    current: Arc<RwLock<Option<Arc<Loaded>>>>,
    files: ServingFiles,
}

impl FrontProxy {
    /// Nothing loaded yet: every connection is refused until [`Self::load`] succeeds.
    pub fn new(files: ServingFiles) -> Self {
        Self {
            current: Arc::new(RwLock::new(None)),
            files,
        }
    }

    /// What is in force, if anything.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the ConfigMap and the serving files and puts them in force.
    pub async fn load(&self, configmaps: &Api<ConfigMap>) -> Result<(), Error> {
        let cm = configmaps
            .get(CONFIGMAP_NAME)
            .await
            .map_err(Error::ReadConfigMap)?;
        let rh = RequestHeader::from_data(&cm.data.unwrap_or_default())?;
        let files = self.files.clone();
        let ca = rh.ca_pem.clone();
        let tls = tokio::task::spawn_blocking(move || build_tls(&files, &ca))
            .await
            .map_err(Error::Load)??;
        let changed = self.current().is_none_or(|c| c.request_header != rh);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Loaded {
            request_header: rh,
            tls,
        }));
        if changed {
            tracing::info!("front-proxy trust loaded");
        }
        Ok(())
    }

    /// Reloads every `every`; a failure keeps what is in force.
    pub async fn watch(self, configmaps: Api<ConfigMap>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(err) = self.load(&configmaps).await {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "reload front-proxy trust; keeping the loaded one"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    fn rh() -> RequestHeader {
        let mut d = BTreeMap::new();
        d.insert("requestheader-client-ca-file".into(), "PEM".into());
        d.insert(
            "requestheader-allowed-names".into(),
            r#"["front-proxy-client"]"#.into(),
        );
        d.insert(
            "requestheader-username-headers".into(),
            r#"["X-Remote-User"]"#.into(),
        );
        d.insert(
            "requestheader-group-headers".into(),
            r#"["X-Remote-Group"]"#.into(),
        );
        d.insert(
            "requestheader-extra-headers-prefix".into(),
            r#"["X-Remote-Extra-"]"#.into(),
        );
        RequestHeader::from_data(&d).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn proxy() -> Peer {
        Peer {
            verified: true,
            common_names: vec!["front-proxy-client".into()],
        }
    }

    #[test]
    fn the_front_proxy_names_user_groups_and_extra() {
        let u = identify(
            &rh(),
            &proxy(),
            &headers(&[
                ("X-Remote-User", "alice"),
                ("X-Remote-Group", "system:authenticated"),
                ("X-Remote-Group", "devs"),
                ("X-Remote-Extra-Scopes%2fa", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, vec!["devs", "system:authenticated"]);
        assert_eq!(u.extra.get("scopes/a"), Some(&vec!["x".to_string()]));
    }

    #[test]
    fn no_certificate_another_name_or_no_user_is_refused() {
        let h = headers(&[("X-Remote-User", "alice")]);
        let no_cert = identify(&rh(), &Peer::default(), &h).unwrap_err();
        assert_eq!(no_cert.reason, Reason::Unauthorized);
        assert!(
            no_cert.message.contains("front proxy"),
            "{}",
            no_cert.message
        );
        let other = Peer {
            verified: true,
            common_names: vec!["someone".into()],
        };
        assert!(identify(&rh(), &other, &h).is_err());
        assert!(identify(&rh(), &proxy(), &headers(&[])).is_err());
    }

    #[test]
    fn a_configmap_without_the_ca_is_refused() {
        assert!(matches!(
            RequestHeader::from_data(&BTreeMap::new()),
            Err(Error::NoRequestHeaderCa)
        ));
    }
}
