//! What this node's QEMU is: its version (read once from `--version`) and
//! whether it runs guests under KVM or TCG ([`probe_accel`], which starts
//! a throwaway QEMU to find out).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qmp::{self, Qmp};
use crate::vmm::Error;

/// How QEMU runs guests on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation; the reason KVM is not used.
    Tcg {
        /// Why not KVM.
        reason: String,
    },
}

/// Decides between KVM and TCG. `/dev/kvm` alone proves nothing: on PVM
/// hosts `KVM_CREATE_VM` succeeds but stock guests cannot run
/// (guest-notes §5.1), so KVM needs the CPU's vmx/svm flag and a QEMU that
/// starts with `-accel kvm -cpu host` and reports KVM enabled.
pub async fn probe_accel(qemu: &Path, proc_root: &Path, dev_kvm: &Path) -> Accel {
    let tcg = |reason: String| Accel::Tcg { reason };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
    {
        return tcg(format!("cannot open {}: {e}", dev_kvm.display()));
    }
    let cpuinfo = std::fs::read_to_string(proc_root.join("cpuinfo")).unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return tcg(
            "the CPU has no vmx/svm flag (a paravirtual /dev/kvm cannot run stock guests)".into(),
        );
    }
    match probe_kvm_start(qemu).await {
        Ok(()) => Accel::Kvm,
        Err(reason) => tcg(format!("QEMU cannot start a KVM vCPU: {reason}")),
    }
}

/// How long the throwaway QEMU gets to answer on QMP.
const PROBE_WITHIN: Duration = Duration::from_secs(10);

/// Why the throwaway QEMU could not run a KVM vCPU. It ends up as the text
/// of [`Accel::Tcg`], so each message carries its cause inline rather than
/// as a `source()`.
#[derive(Debug, thiserror::Error)]
enum KvmProbeError {
    #[error("{0}")]
    TempDir(std::io::Error),
    #[error("{0}")]
    Spawn(std::io::Error),
    #[error("qemu exited with {0}")]
    Exited(std::process::ExitStatus),
    #[error("query-kvm reports KVM disabled")]
    Disabled,
    #[error("{0}")]
    Qmp(qmp::QmpError),
    #[error("no QMP answer within {0:?}")]
    NoAnswer(Duration),
}

async fn probe_kvm_start(qemu: &Path) -> Result<(), KvmProbeError> {
    let dir = tempfile_dir().map_err(KvmProbeError::TempDir)?;
    let sock = dir.join("probe-qmp.sock");
    let mut child = tokio::process::Command::new(qemu)
        .args(["-machine", "q35", "-accel", "kvm", "-cpu", "host", "-S"])
        .args(["-nodefaults", "-display", "none", "-m", "64M", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(KvmProbeError::Spawn)?;
    let deadline = tokio::time::Instant::now() + PROBE_WITHIN;
    let result = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Err(KvmProbeError::Exited(status));
        }
        if let Ok(mut q) = Qmp::connect(&sock, Duration::from_secs(2)).await {
            break match q.execute(&qmp::QueryKvm).await {
                Ok(k) if k.enabled => Ok(()),
                Ok(_) => Err(KvmProbeError::Disabled),
                Err(e) => Err(KvmProbeError::Qmp(e)),
            };
        }
        if tokio::time::Instant::now() > deadline {
            break Err(KvmProbeError::NoAnswer(PROBE_WITHIN));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wrenn-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub(super) async fn detect_version(qemu: &Path) -> Result<String, Error> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(qemu).arg("--version").output(),
    )
    .await
    .map_err(|_| Error::DetectVersion {
        binary: qemu.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    })?
    .map_err(|source| Error::DetectVersion {
        binary: qemu.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    parse_version(first).ok_or_else(|| Error::ParseVersion {
        binary: qemu.to_path_buf(),
        output: first.to_string(),
    })
}

/// `QEMU emulator version 7.2.22 (Debian ...)` → `7.2.22`.
pub fn parse_version(line: &str) -> Option<String> {
    let rest = line.strip_prefix("QEMU emulator version ")?;
    let v = rest.split_whitespace().next()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some("7.2.22".into())
        );
        assert_eq!(parse_version("qemu: unknown"), None);
    }
}
