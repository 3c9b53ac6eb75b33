//! Reading PEM files (certificates, keys, CAs) with errors that name the
//! file and what it should hold, so an operator learns which flag or
//! Secret key is wrong. Blocking: callers run it off async workers.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors reading or decoding PEM material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("read {what} from {path}")]
    Read {
        /// What the file holds: certificate, key or CA.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM section of the kind wanted.
    #[error("{path} holds no PEM {what}")]
    NotPem {
        /// What was expected.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A PEM section could not be decoded.
    #[error("decode the {what} in {path}")]
    Decode {
        /// What was expected.
        what: &'static str,
        /// The file, or `<memory>` for bytes given directly.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
}

/// A PEM section's label, checked by [`read_kind`] before decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `-----BEGIN CERTIFICATE-----`.
    Certificate,
    /// Any `... PRIVATE KEY-----` (PKCS#8, PKCS#1, SEC1).
    PrivateKey,
}

impl Kind {
    fn marker(self) -> &'static str {
        match self {
            Kind::Certificate => "-----BEGIN CERTIFICATE-----",
            Kind::PrivateKey => "PRIVATE KEY-----",
        }
    }
}

/// The path errors name for PEM bytes that came from no file.
pub fn memory() -> PathBuf {
    PathBuf::from("<memory>")
}

/// Reads `path`, whatever it holds. Blocking.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `path` and refuses it by name unless it holds a PEM section of
/// `kind`. Blocking.
pub fn read_kind(what: &'static str, path: &Path, kind: Kind) -> Result<Vec<u8>, Error> {
    let bytes = read(what, path)?;
    if !String::from_utf8_lossy(&bytes).contains(kind.marker()) {
        return Err(Error::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Every certificate in `pem` (read from `path`).
pub fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Decode {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// The first private key in `pem` (read from `path`).
pub fn private_key(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| Error::Decode {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.crt");
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let err = read_kind("certificate", &path, Kind::Certificate).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotPem {
                    what: "certificate",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("{} holds no PEM certificate", path.display())
        );
        assert!(read_kind("key", &path, Kind::PrivateKey).is_ok());

        let missing = dir.path().join("none");
        let err = read("client CA", &missing).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("read client CA from {}", missing.display())
        );
    }

    #[test]
    fn broken_pem_names_what_it_should_hold() {
        let err = certs(
            "agent CA",
            &memory(),
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "decode the agent CA in <memory>");
        assert!(private_key("client key", &memory(), b"nothing").is_err());
    }
}
