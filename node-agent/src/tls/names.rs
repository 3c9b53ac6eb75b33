//! Which clients the agent serves: a certificate from the client CA is not
//! enough, it must also name an allowed client (the operator, later the
//! gateway) in a SAN DNS name or its subject CN. A CA that also signs other
//! clients (a shared cluster CA, a future identity) then still cannot reach
//! the agent with them.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::extensions::GeneralName;

use super::Error;

/// The name the chart gives the operator's client certificate.
pub const DEFAULT_CLIENT_NAME: &str = "wrenn-operator";

/// Allow-list of client certificate names. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNames(Vec<String>);

impl Default for ClientNames {
    /// Only the operator.
    fn default() -> Self {
        Self(vec![DEFAULT_CLIENT_NAME.to_string()])
    }
}

impl ClientNames {
    /// The names given, refusing an empty list or an empty or wildcard name
    /// (a wildcard would match names the admin never listed).
    pub fn new<I, S>(names: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.is_empty() {
            return Err(Error::ClientName {
                name: String::new(),
                reason: "at least one client name is required",
            });
        }
        for n in &names {
            if n.trim().is_empty() {
                return Err(Error::ClientName {
                    name: n.clone(),
                    reason: "empty",
                });
            }
            if n.contains('*') {
                return Err(Error::ClientName {
                    name: n.clone(),
                    reason: "wildcards are not allowed",
                });
            }
        }
        Ok(Self(names))
    }

    /// The allowed names.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Wraps a CA verifier so that it also requires an allowed name.
    pub(super) fn verifier(&self, ca: Arc<dyn ClientCertVerifier>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(NamedClients {
            ca,
            names: self.clone(),
        })
    }

    /// Whether the (CA-verified) certificate names an allowed client.
    fn allows(&self, cert: &CertificateDer<'_>) -> Result<(), NameRefused> {
        let presented = presented_names(cert)?;
        // DNS names compare case-insensitively; CNs are compared the same way.
        if presented
            .iter()
            .any(|p| self.0.iter().any(|n| n.eq_ignore_ascii_case(p)))
        {
            Ok(())
        } else {
            Err(NameRefused::NotAllowed { presented })
        }
    }
}

/// SAN DNS names and subject CNs of a DER certificate.
fn presented_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, NameRefused> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| NameRefused::Unparsable)?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    for cn in parsed.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_string());
        }
    }
    Ok(names)
}

/// Why a certificate from the right CA was still refused.
#[derive(Debug, thiserror::Error)]
enum NameRefused {
    #[error("client certificate names {presented:?}, none of them an allowed client")]
    NotAllowed { presented: Vec<String> },
    #[error("client certificate cannot be parsed for its names")]
    Unparsable,
}

#[derive(Debug)]
struct NamedClients {
    ca: Arc<dyn ClientCertVerifier>,
    names: ClientNames,
}

impl ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The CA first: names in a certificate nobody vouches for mean nothing.
        let verified = self.ca.verify_client_cert(end_entity, intermediates, now)?;
        self.names.allows(end_entity).map_err(|refused| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(refused),
            )))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> CertificateDer<'static> {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_listed_name_in_the_cn_or_a_san_is_allowed() {
        let names = ClientNames::new(["wrenn-operator", "wrenn-gateway"]).unwrap();
        assert!(names.allows(&cert("wrenn-operator", &[])).is_ok());
        assert!(names.allows(&cert("x", &["wrenn-gateway"])).is_ok());
        assert!(names.allows(&cert("x", &["WRENN-Gateway"])).is_ok());
    }

    #[test]
    fn an_unlisted_name_is_refused_and_named() {
        let names = ClientNames::default();
        let err = names
            .allows(&cert("wrenn-node-agent", &["evil", "wrenn-operator.evil"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wrenn-node-agent") && err.contains("wrenn-operator.evil"),
            "{err}"
        );
    }

    #[test]
    fn empty_lists_and_wildcards_are_refused() {
        assert!(ClientNames::new(Vec::<String>::new()).is_err());
        assert!(ClientNames::new([""]).is_err());
        assert!(ClientNames::new(["*.wrenn"]).is_err());
    }
}
