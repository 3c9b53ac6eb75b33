//! [`Refusal`]: what a registry said when a pull failed, as a class the
//! operator shows as the template's reason (401/403, 404, 429, the rest)
//! and the registry's own words, bounded and stripped of control
//! characters and of the credentials sent, so a hostile or chatty registry
//! cannot flood or forge a status.

use oci_client::errors::{OciDistributionError, OciErrorCode};
use wrenn_crds::reason::Reason;

use super::credentials::{Credentials, scrub};

/// Longest registry message kept, in characters.
pub const MAX_MESSAGE_CHARS: usize = 300;

/// How a registry refused a pull.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 401 or 403: no or wrong credentials, or no access to the repository.
    Unauthorized,
    /// 404: no such repository, tag or digest.
    NotFound,
    /// 429: too many pulls.
    RateLimited,
    /// Anything else: 5xx, unreachable, a broken answer.
    Other,
}

impl Class {
    /// The reason a template's status shows.
    pub fn reason(self) -> Reason {
        match self {
            Class::Unauthorized => Reason::RegistryUnauthorized,
            Class::NotFound => Reason::ImageNotFound,
            Class::RateLimited => Reason::RegistryRateLimited,
            Class::Other => Reason::RegistryFailed,
        }
    }

    fn from_status(code: u16) -> Self {
        match code {
            401 | 403 => Class::Unauthorized,
            404 => Class::NotFound,
            429 => Class::RateLimited,
            _ => Class::Other,
        }
    }

    fn from_code(code: &OciErrorCode) -> Self {
        match code {
            OciErrorCode::Unauthorized | OciErrorCode::Denied => Class::Unauthorized,
            OciErrorCode::ManifestUnknown
            | OciErrorCode::NameUnknown
            | OciErrorCode::NotFound
            | OciErrorCode::BlobUnknown
            | OciErrorCode::ManifestBlobUnknown => Class::NotFound,
            OciErrorCode::Toomanyrequests => Class::RateLimited,
            _ => Class::Other,
        }
    }
}

/// A registry's refusal of a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Its class.
    pub class: Class,
    /// What the registry said (bounded, sanitized).
    pub message: String,
}

/// Control characters become spaces, runs of blanks one space, and the
/// text is cut at [`MAX_MESSAGE_CHARS`].
pub fn sanitize(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut blank = false;
    for c in text.trim().chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' {
            if blank {
                continue;
            }
            blank = true;
        } else {
            blank = false;
        }
        if chars == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Classifies what `oci-client` reported for a pull that used `creds`.
pub fn classify(err: &OciDistributionError, creds: Option<&Credentials>) -> Refusal {
    use OciDistributionError as E;
    let (class, raw) = match err {
        E::UnauthorizedError { url } => {
            (Class::Unauthorized, format!("401 Unauthorized from {url}"))
        }
        // The token realm refused the credentials; its body says why.
        E::AuthenticationFailure(body) => (
            Class::Unauthorized,
            format!("the token service refused: {body}"),
        ),
        E::RegistryError { envelope, .. } => {
            let class = envelope
                .errors
                .first()
                .map_or(Class::Other, |e| Class::from_code(&e.code));
            let said: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            (class, said.join("; "))
        }
        E::ServerError { code, message, .. } => {
            (Class::from_status(*code), format!("HTTP {code}: {message}"))
        }
        E::ImageManifestNotFoundError(m) => (Class::NotFound, m.clone()),
        E::RequestError(e) => (
            e.status()
                .map_or(Class::Other, |s| Class::from_status(s.as_u16())),
            e.to_string(),
        ),
        other => (Class::Other, other.to_string()),
    };
    Refusal {
        class,
        message: sanitize(&scrub(&raw, creds)),
    }
}

#[cfg(test)]
mod tests {
    use oci_client::errors::{OciEnvelope, OciError};

    use super::*;

    fn envelope(code: OciErrorCode, message: &str) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: message.into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://r/v2/x/manifests/1".into(),
        }
    }

    #[test]
    fn each_refusal_has_its_class_and_the_registrys_words() {
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "http://r/v2/".into(),
            message: "slow down".into(),
        };
        assert_eq!(
            classify(&server(429), None),
            Refusal {
                class: Class::RateLimited,
                message: "HTTP 429: slow down".into()
            }
        );
        assert_eq!(classify(&server(403), None).class, Class::Unauthorized);
        assert_eq!(classify(&server(404), None).class, Class::NotFound);
        assert_eq!(classify(&server(502), None).class, Class::Other);
        let r = classify(&envelope(OciErrorCode::ManifestUnknown, "no tag v9"), None);
        assert_eq!(r.class, Class::NotFound);
        assert!(r.message.contains("no tag v9"), "{}", r.message);
        assert_eq!(
            classify(&envelope(OciErrorCode::Toomanyrequests, "limit"), None).class,
            Class::RateLimited
        );
        assert_eq!(
            classify(&envelope(OciErrorCode::Denied, "no access"), None).class,
            Class::Unauthorized
        );
        let unauth = OciDistributionError::UnauthorizedError {
            url: "http://r/v2/x/manifests/1".into(),
        };
        assert_eq!(classify(&unauth, None).class, Class::Unauthorized);
    }

    #[test]
    fn messages_are_bounded_clean_and_never_carry_the_password() {
        let creds = Credentials::new("u", "hunter2");
        let body = format!(
            "bad\r\nlogin\x1b[31m u:hunter2 {}",
            "x".repeat(10 * MAX_MESSAGE_CHARS)
        );
        let r = classify(
            &OciDistributionError::AuthenticationFailure(body),
            Some(&creds),
        );
        assert_eq!(r.class, Class::Unauthorized);
        assert!(!r.message.contains("hunter2"), "{}", r.message);
        assert!(!r.message.chars().any(char::is_control), "{}", r.message);
        assert!(
            r.message
                .starts_with("the token service refused: bad login")
        );
        assert!(r.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(r.message.ends_with('…'));
    }
}
