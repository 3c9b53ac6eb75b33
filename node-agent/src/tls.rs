//! Mutual TLS for the agent's gRPC port. The agent presents its own
//! certificate and accepts a client only when the configured CA signed its
//! certificate AND the certificate names an allowed client ([`ClientNames`]:
//! the operator, later the gateway). There is no way to turn either check off.
//!
//! The port is exposed on the node's address, so it also defends itself
//! before any certificate is seen ([`accept`]): a handshake must finish
//! within a deadline, and the connections held at once are capped.
//! Certificates are re-read from disk while the agent runs ([`reload`]), so
//! a rotated Secret takes effect without a restart.
//!
//! The gRPC service itself lives in `server`; this module hands it
//! authenticated streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use wrenn_runtime::pem::{self, Kind};

pub mod accept;
mod names;
pub mod reload;

pub use accept::{Limits, TlsConn};
pub use names::{ClientNames, DEFAULT_CLIENT_NAME};
use reload::Reloader;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read, holds no section of the kind wanted,
    /// or a broken one; the error names the file and what it should hold.
    #[error(transparent)]
    Pem(#[from] pem::Error),
    /// The client CA file holds no usable CA certificate.
    #[error("trust the client CA in {path}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Certificate and key do not make a server identity (e.g. the key is
    /// not the certificate's, as while a rotation is half written).
    #[error("use the certificate {cert} with the key {key}")]
    Identity {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Why rustls refused them.
        #[source]
        source: rustls::Error,
    },
    /// The task reading the files died.
    #[error("load TLS material")]
    Load(#[source] tokio::task::JoinError),
    /// The allow-list of client names is empty or holds an unusable name.
    #[error("client name {name:?}: {reason}")]
    ClientName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Paths of the server's certificate, its key and the CA that signs clients.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA whose signature a client certificate must carry (PEM).
    pub client_ca: PathBuf,
}

/// The bytes of the three files as read at one moment; compared between
/// polls to tell a rotation from nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key bytes.
        f.debug_struct("Material")
            .field("cert_len", &self.cert.len())
            .field("ca_len", &self.ca.len())
            .finish_non_exhaustive()
    }
}

/// The one crypto provider the agent uses (see [`install_crypto_provider`]).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// Reads the three files (blocking).
    pub fn read(&self) -> Result<Material, Error> {
        Ok(Material {
            // A wrong file is refused by name, so the operator learns which
            // flag (or which Secret key) is wrong.
            cert: pem::read_kind("certificate", &self.cert, Kind::Certificate)?,
            key: pem::read_kind("private key", &self.key, Kind::PrivateKey)?,
            ca: pem::read_kind("client CA", &self.client_ca, Kind::Certificate)?,
        })
    }

    /// Reads the files and builds the server configuration: this
    /// certificate, client certificates required, signed by the client CA
    /// and naming one of `names`. Blocking.
    pub fn server_config(&self, names: &ClientNames) -> Result<Arc<ServerConfig>, Error> {
        self.build(&self.read()?, names)
    }

    /// Builds the server configuration from material read earlier.
    pub fn build(&self, m: &Material, names: &ClientNames) -> Result<Arc<ServerConfig>, Error> {
        let chain = pem::certs("certificate", &self.cert, &m.cert)?;
        let key = pem::private_key("private key", &self.key, &m.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in pem::certs("client CA", &self.client_ca, &m.ca)? {
            // A bad certificate among several is skipped; none usable is
            // refused by the verifier builder below.
            let _ = roots.add(ca);
        }
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|source| Error::ClientCa {
                    path: self.client_ca.clone(),
                    source,
                })?;
        let identity_err = |source| Error::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(identity_err)?
            .with_client_cert_verifier(names.verifier(verifier))
            // Also checks that the key is the certificate's.
            .with_single_cert(chain, key)
            .map_err(identity_err)?;
        // gRPC clients (tonic) insist on negotiating HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Makes ring the process's rustls provider. tonic, kube and the registry
/// client all use rustls; with the choice explicit, a dependency that
/// enables a second provider cannot make the first handshake panic.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Everything the gRPC port needs besides the service.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Certificate, key and client CA.
    pub files: TlsFiles,
    /// Client certificate names served.
    pub client_names: ClientNames,
    /// Handshake deadline and connection cap.
    pub limits: Limits,
    /// How often the files are re-read for a rotation.
    pub reload_every: Duration,
}

impl PortConfig {
    /// The defaults: only the operator's name, [`Limits::default`], a
    /// reload check every 10 s.
    pub fn new(files: TlsFiles) -> Self {
        Self {
            files,
            client_names: ClientNames::default(),
            limits: Limits::default(),
            reload_every: Duration::from_secs(10),
        }
    }
}

/// An open gRPC port: authenticated connections for the server, and the
/// task accepting them and watching the certificate files.
#[derive(Debug)]
pub struct Listening {
    /// Authenticated connections, for `serve_with_incoming`.
    pub incoming: ReceiverStream<std::io::Result<TlsConn>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Listening {
    /// Loads the certificates (refusing bad ones now) and starts accepting.
    pub async fn start(listener: TcpListener, port: PortConfig) -> Result<Self, Error> {
        let PortConfig {
            files,
            client_names,
            limits,
            reload_every,
        } = port;
        let tls = tokio::task::spawn_blocking(move || Reloader::load(files, client_names))
            .await
            .map_err(Error::Load)??;
        let tls = Arc::new(tls);
        // Room for a burst of finished handshakes while tonic catches up.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let watch = tls.clone().watch(reload_every, std::future::pending());
        let task = tokio::spawn(async move {
            // The watch ends with the accept loop (it never ends by itself).
            tokio::select! {
                res = accept::run(listener, tls, limits, tx) => res,
                () = watch => Ok(()),
            }
        });
        Ok(Self {
            incoming: ReceiverStream::new(rx),
            task,
        })
    }

    /// Splits into the connection stream and a handle resolving when
    /// accepting ended: `Ok` once the stream was dropped, `Err` for an
    /// accept error that ended it.
    pub fn split(self) -> (ReceiverStream<std::io::Result<TlsConn>>, AcceptTask) {
        (self.incoming, AcceptTask(self.task))
    }
}

/// The accept loop of a [`Listening`] port.
#[derive(Debug)]
pub struct AcceptTask(JoinHandle<std::io::Result<()>>);

impl AcceptTask {
    /// Waits for the loop to end (it ends once the connection stream is
    /// dropped) and returns its error, if it failed.
    pub async fn finish(self) -> std::io::Result<()> {
        match self.0.await {
            Ok(res) => res,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Flags of the gRPC port beyond its address and files (flattened into the
/// agent's flags).
#[derive(Clone, Debug, clap::Args)]
pub struct PortArgs {
    /// A name a client certificate must carry (SAN DNS name or subject CN)
    /// besides the client CA's signature; repeat (or comma-separate) for
    /// each client: the operator, later the gateway.
    #[arg(
        long = "client-name",
        env = "WRENN_CLIENT_NAMES",
        value_delimiter = ',',
        default_value = DEFAULT_CLIENT_NAME
    )]
    pub client_names: Vec<String>,
    /// Seconds a peer has from TCP connect to a finished TLS handshake.
    #[arg(
        long,
        env = "WRENN_TLS_HANDSHAKE_TIMEOUT_SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub tls_handshake_timeout_seconds: u64,
    /// gRPC connections held at once (handshaking or established); more are
    /// closed at once.
    #[arg(
        long,
        env = "WRENN_MAX_CONNECTIONS",
        default_value_t = 128,
        value_parser = clap::value_parser!(u32).range(1..=65536)
    )]
    pub max_connections: u32,
    /// Seconds between checks of the certificate files for a rotation.
    #[arg(
        long,
        env = "WRENN_TLS_RELOAD_SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub tls_reload_seconds: u64,
}

impl PortArgs {
    /// The port configuration for `files`.
    pub fn config(self, files: TlsFiles) -> Result<PortConfig, Error> {
        let Self {
            client_names,
            tls_handshake_timeout_seconds,
            max_connections,
            tls_reload_seconds,
        } = self;
        Ok(PortConfig {
            files,
            client_names: ClientNames::new(client_names)?,
            limits: Limits {
                handshake_timeout: Duration::from_secs(tls_handshake_timeout_seconds),
                max_connections: max_connections as usize,
            },
            reload_every: Duration::from_secs(tls_reload_seconds),
        })
    }
}
