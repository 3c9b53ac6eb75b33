//! Cloud Hypervisor version detection, once per binary, from `--version`,
//! and the feature gates the agent needs (notes §1 and §12).

use std::path::Path;
use std::time::Duration;

use crate::vmm::Error;

/// A CH release, `MAJOR.MINOR`, plus the raw `git describe` text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChVersion {
    /// Release major (the releases are `vNN.0`).
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// As printed, e.g. `v53.0-246-gae44c2971-dirty`.
    pub raw: String,
}

impl ChVersion {
    /// Parses `--version` output: only the first line counts (v53 prints a
    /// second one), `cloud-hypervisor v53.0-246-g…` → 53.0.
    pub fn parse_version_output(output: &str) -> Option<Self> {
        let first = output.lines().next()?.trim();
        let rest = first.strip_prefix("cloud-hypervisor")?.trim();
        Self::parse_build_version(rest)
    }

    /// Parses a `build_version` from `vmm.ping` (`v53.0-246-g…`) or a bare
    /// `53.0`.
    pub fn parse_build_version(s: &str) -> Option<Self> {
        let s = s.trim();
        let digits = s.strip_prefix('v').unwrap_or(s);
        let numeric: String = digits
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = numeric.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        Some(Self {
            major,
            minor,
            raw: s.to_string(),
        })
    }

    /// Runs `<binary> --version` (bounded by `timeout`).
    pub async fn detect(binary: &Path, timeout: Duration) -> Result<Self, Error> {
        let run = tokio::process::Command::new(binary)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| Error::DetectVersion {
                binary: binary.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
            })?
            .map_err(|source| Error::DetectVersion {
                binary: binary.to_path_buf(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Self::parse_version_output(&text).ok_or_else(|| Error::ParseVersion {
            binary: binary.to_path_buf(),
            output: text.lines().next().unwrap_or_default().to_string(),
        })
    }

    fn at_least(&self, major: u32) -> bool {
        self.major >= major
    }

    /// Error bodies are JSON arrays of strings (v47+).
    pub fn has_json_error_chain(&self) -> bool {
        self.at_least(47)
    }

    /// "VM is not created" answers 404 instead of 500 (v53+).
    pub fn has_not_created_404(&self) -> bool {
        self.at_least(53)
    }

    /// `vm.restore` takes new TAP fds (`net_fds`, v40+).
    pub fn has_restore_net_fds(&self) -> bool {
        self.at_least(40)
    }

    /// `memory_restore_mode: OnDemand` and `resume` on restore (v52+).
    pub fn has_on_demand_restore(&self) -> bool {
        self.at_least(52)
    }

    /// CH removes a stale API socket itself (v53+); before, the agent must.
    pub fn cleans_stale_api_socket(&self) -> bool {
        self.at_least(53)
    }

    /// A failed restore deletes the half-made VM (v44+).
    pub fn cleans_failed_restore(&self) -> bool {
        self.at_least(44)
    }
}

impl std::fmt::Display for ChVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_line_output_of_main() {
        let v = ChVersion::parse_version_output(
            "cloud-hypervisor v53.0-246-gae44c2971-dirty\nMigration Protocol Versions: 0\n",
        )
        .unwrap();
        assert_eq!((v.major, v.minor), (53, 0));
        assert_eq!(v.raw, "v53.0-246-gae44c2971-dirty");
        assert!(v.has_not_created_404() && v.has_json_error_chain());
    }

    #[test]
    fn release_and_old_outputs() {
        let v = ChVersion::parse_version_output("cloud-hypervisor v43.0\n").unwrap();
        assert_eq!((v.major, v.minor), (43, 0));
        assert!(!v.has_json_error_chain() && v.has_restore_net_fds());
        let v = ChVersion::parse_version_output("cloud-hypervisor v40.0-extra").unwrap();
        assert_eq!(v.major, 40);
        assert!(ChVersion::parse_version_output("qemu 9.0").is_none());
        assert!(ChVersion::parse_version_output("").is_none());
    }

    #[test]
    fn build_version_from_ping() {
        let v = ChVersion::parse_build_version("v52.1-3-gabc").unwrap();
        assert_eq!((v.major, v.minor), (52, 1));
    }
}
