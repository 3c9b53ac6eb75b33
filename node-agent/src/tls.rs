//! Mutual TLS for the agent's gRPC server: the agent presents its own
//! certificate and accepts only clients whose certificate the configured CA
//! signed (the operator's). There is no way to turn client verification off.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read.
    #[error("read {what} from {path}")]
    Read {
        /// Which file: certificate, key or client CA.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path} holds no PEM {what}")]
    NotPem {
        /// What was expected.
        what: &'static str,
        /// The file.
        path: PathBuf,
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

fn read_pem(what: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    // tonic accepts anything and fails at the first handshake; refusing a
    // wrong file at start-up tells the operator which flag is wrong.
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(Error::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Builds the server TLS configuration, requiring client certificates.
    pub fn server_config(&self) -> Result<ServerTlsConfig, Error> {
        let cert = read_pem("certificate", &self.cert, "-----BEGIN CERTIFICATE-----")?;
        let key = read_pem("private key", &self.key, "PRIVATE KEY-----")?;
        let ca = read_pem("client CA", &self.client_ca, "-----BEGIN CERTIFICATE-----")?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false))
    }
}

/// Makes ring the process's rustls provider. tonic, kube and the registry
/// client all use rustls; with the choice explicit, a dependency that
/// enables a second provider cannot make the first handshake panic.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
