//! A network namespace of one test: made with `ip netns add` under a
//! unique name, deleted on drop (also after a failed assertion), so a test
//! never touches the machine's own namespace and two tests never share one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

/// A named namespace under `/run/netns`, deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// A fresh namespace named `<prefix>-<pid>-<n>` (`prefix` at most 4
    /// characters keeps it a valid interface-name suffix too), or why not.
    pub fn new(prefix: &str) -> Result<Self, String> {
        Self::named(&crate::unique_name(prefix))
    }

    /// The namespace at `/run/netns/NAME`, made here (a name the code under
    /// test chose, e.g. the one a fake network gave a capsule); deleted on
    /// drop like any other.
    pub fn named(name: &str) -> Result<Self, String> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .map_err(|e| format!("needs `ip` (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Self {
            name: name.to_string(),
        })
    }

    /// A TCP listener bound to `addr` inside the namespace (made on a
    /// thread that enters it; the socket stays there once that ends).
    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<std::net::TcpListener, String> {
        let path = self.path();
        std::thread::spawn(move || {
            let f =
                std::fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("enter {}: {e}", path.display()))?;
            std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
        })
        .join()
        .map_err(|_| "the listening thread panicked".to_string())?
    }

    /// Its name, for `ip -n NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind mount, which `setns` and the VMM spawn path open.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS` inside it, or says what failed.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .map_err(|e| format!("run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip -n {} {args:?}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
