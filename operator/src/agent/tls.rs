//! The operator's side of mutual TLS to node agents: its client
//! certificate, and the CA and name every agent's server certificate must
//! carry. The channel to each agent dials through [`AgentConnector`], which
//! re-reads the files before every new connection, so a rotated Secret
//! (cert-manager renewal, a re-issued Helm Secret) is used from the next
//! connection on without a restart. Bytes are compared, not mtimes: a
//! Secret volume rotates by swapping its `..data` symlink.
//!
//! An established connection keeps the identity it was opened with; TLS
//! checks certificates only at the handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::Service;
use tonic::codegen::http::Uri;
use wrenn_runtime::pem::{self, memory};

/// Bytes read from an agent's socket at once.
const READ_BUFFER: usize = 128 << 10;

/// Errors loading TLS material or dialling an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or decoded; the error names the file
    /// and what it should hold.
    #[error(transparent)]
    Pem(#[from] pem::Error),
    /// The agent CA holds no usable certificate.
    #[error("trust the agent CA in {path}: no usable certificate")]
    AgentCa {
        /// File, or `<memory>`.
        path: PathBuf,
    },
    /// Certificate and key do not make a client identity (e.g. the key is
    /// not the certificate's, as while a rotation is half written).
    #[error("use the client certificate {cert} with its key")]
    Identity {
        /// Certificate file, or `<memory>`.
        cert: PathBuf,
        /// Why rustls refused them.
        #[source]
        source: rustls::Error,
    },
    /// The expected agent name is not a DNS name.
    #[error("agent server name {name:?} is not a DNS name")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// The agent's address is not `http://IP:PORT`.
    #[error("agent address {uri} is not IP:PORT")]
    Address {
        /// What the channel asked for.
        uri: String,
    },
    /// TCP connect or TLS handshake failed.
    #[error("connect to the agent at {addr}")]
    Dial {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The task reading the files died.
    #[error("read TLS material")]
    Load(#[source] tokio::task::JoinError),
}

/// The three PEM blobs, compared between connections.
#[derive(Clone, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn read(&self) -> Result<Material, Error> {
        Ok(Material {
            cert: pem::read("client certificate", &self.cert)?,
            key: pem::read("client key", &self.key)?,
            ca: pem::read("agent CA", &self.ca)?,
        })
    }
}

/// The operator's TLS identity and the CA and name that identify agents.
/// Clones share one reloading state.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where the material comes from; `None` for fixed PEM bytes.
    files: Option<Files>,
    server_name: ServerName<'static>,
    /// The material in use and the configuration built from it.
    current: Mutex<(Material, Arc<ClientConfig>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key bytes.
        f.debug_struct("ClientTls")
            .field("files", &self.inner.files)
            .field("server_name", &self.inner.server_name)
            .finish_non_exhaustive()
    }
}

/// Builds a client configuration: `m.cert`/`m.key` as identity, trusting
/// only `m.ca`, speaking HTTP/2.
fn build(m: &Material, files: Option<&Files>) -> Result<Arc<ClientConfig>, Error> {
    let path = |pick: fn(&Files) -> &PathBuf| files.map_or_else(memory, |f| pick(f).clone());
    let chain = pem::certs("client certificate", &path(|f| &f.cert), &m.cert)?;
    let key = pem::private_key("client key", &path(|f| &f.key), &m.key)?;
    let mut roots = rustls::RootCertStore::empty();
    let cas = pem::certs("agent CA", &path(|f| &f.ca), &m.ca)?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(Error::AgentCa {
            path: path(|f| &f.ca),
        });
    }
    let identity = |source| Error::Identity {
        cert: path(|f| &f.cert),
        source,
    };
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_root_certificates(roots)
            // Also checks that the key is the certificate's.
            .with_client_auth_cert(chain, key)
            .map_err(identity)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl ClientTls {
    /// Loads the client certificate, its key and the agents' CA (PEM files)
    /// and keeps watching them. `server_name` is the name every agent
    /// certificate carries. Blocking.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        ca: &Path,
        server_name: &str,
    ) -> Result<Self, Error> {
        let files = Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
        };
        let material = files.read()?;
        let config = build(&material, Some(&files))?;
        Self::new(Some(files), material, config, server_name)
    }

    /// The same from fixed PEM bytes (never reloaded).
    pub fn from_pem(
        cert: Vec<u8>,
        key: Vec<u8>,
        ca: Vec<u8>,
        server_name: &str,
    ) -> Result<Self, Error> {
        let material = Material { cert, key, ca };
        let config = build(&material, None)?;
        Self::new(None, material, config, server_name)
    }

    fn new(
        files: Option<Files>,
        material: Material,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<Self, Error> {
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|_| Error::ServerName {
                name: server_name.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                server_name,
                current: Mutex::new((material, config)),
            }),
        })
    }

    /// The configuration for a new connection: the files' current content
    /// when it changed and is usable, else what was in use.
    async fn config(&self) -> Arc<ClientConfig> {
        let inner = self.inner.clone();
        let fresh = tokio::task::spawn_blocking(move || inner.refresh())
            .await
            .map_err(Error::Load)
            .and_then(|r| r);
        match fresh {
            Ok(config) => config,
            Err(err) => {
                // Rotation half written, a file briefly missing: the
                // previous identity is still valid; retried next dial.
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "rotated TLS material not usable yet; keeping the loaded certificates"
                );
                self.inner.lock().1.clone()
            }
        }
    }

    /// A connector for tonic's `Endpoint::connect_with_connector_lazy`.
    pub fn connector(&self) -> AgentConnector {
        AgentConnector { tls: self.clone() }
    }

    async fn dial(&self, uri: Uri) -> Result<TokioIo<TlsStream<BufReader<TcpStream>>>, Error> {
        let addr: SocketAddr = uri
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| Error::Address {
                uri: uri.to_string(),
            })?;
        let dial = |source| Error::Dial { addr, source };
        let config = self.config().await;
        let tcp = TcpStream::connect(addr).await.map_err(dial)?;
        tcp.set_nodelay(true).map_err(dial)?;
        // rustls reads 4 to 16 KiB per call: a buffer under it turns a
        // download's hundreds of reads per MiB (each a syscall) into a few.
        let tcp = BufReader::with_capacity(READ_BUFFER, tcp);
        let tls = TlsConnector::from(config)
            .connect(self.inner.server_name.clone(), tcp)
            .await
            .map_err(dial)?;
        Ok(TokioIo::new(tls))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Material, Arc<ClientConfig>)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the files (blocking); rebuilds when they changed.
    fn refresh(&self) -> Result<Arc<ClientConfig>, Error> {
        let Some(files) = &self.files else {
            return Ok(self.lock().1.clone());
        };
        let material = files.read()?;
        let mut current = self.lock();
        if material != current.0 {
            let config = build(&material, Some(files))?;
            tracing::info!(cert = %files.cert.display(), "reloaded rotated TLS certificates");
            *current = (material, config);
        }
        Ok(current.1.clone())
    }
}

/// Dials an agent: TCP, then TLS with the operator's current identity,
/// checking the agent's certificate against the agent CA and name.
#[derive(Clone, Debug)]
pub struct AgentConnector {
    tls: ClientTls,
}

impl Service<Uri> for AgentConnector {
    type Response = TokioIo<TlsStream<BufReader<TcpStream>>>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Self::Response, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move { tls.dial(uri).await })
    }
}
