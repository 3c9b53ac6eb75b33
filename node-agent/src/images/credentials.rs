//! [`Credentials`]: a registry user name and password handed to one pull.
//! They live in memory for that pull only (the `oci-client` client that
//! carries them is made per pull and dropped with it), print as redacted,
//! and have no serialization, so nothing can journal or log them by
//! accident. [`scrub`] takes them out of any text a registry sent back.

use oci_client::secrets::RegistryAuth;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    /// Credentials from a pull request.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// What `oci-client` sends: basic credentials, which it trades for a
    /// bearer token when the registry names a token realm.
    pub(super) fn to_auth(&self) -> RegistryAuth {
        RegistryAuth::Basic(self.username.clone(), self.password.clone())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `text` with the password of `creds` replaced, in case a registry
/// echoes what it was sent.
pub(super) fn scrub(text: &str, creds: Option<&Credentials>) -> String {
    match creds {
        Some(c) if !c.password.is_empty() => text.replace(&c.password, "<redacted>"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_scrub_never_show_the_password() {
        let c = Credentials::new("robot", "s3cr3t-pass");
        let shown = format!("{c:?} {:?}", Some(&c));
        assert!(!shown.contains("s3cr3t-pass"), "{shown}");
        assert!(shown.contains("robot"), "{shown}");
        assert_eq!(
            scrub("bad login robot:s3cr3t-pass", Some(&c)),
            "bad login robot:<redacted>"
        );
        assert_eq!(scrub("as is", None), "as is");
    }
}
