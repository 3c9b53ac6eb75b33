//! Test support for every Wrenn crate (a dev-dependency only).
//!
//! Tests that need something this machine may lack (root, a control plane,
//! KVM, device-mapper, a VMM binary) open a [`Case`] for their tier and call
//! [`Case::skip`] with a reason naming what is missing. A skip is never a
//! pass in disguise:
//! - it is printed to stderr and appended to the file named by
//!   `WRENN_TIER_REPORT`, which `.ci/run` summarises per tier;
//! - a tier listed in `WRENN_REQUIRE_TIERS` (comma separated, e.g.
//!   `host,cluster`) turns the skip into a failure, so CI cannot go green on
//!   a tier that silently did nothing.
#![forbid(unsafe_code)]

pub mod guest_vm;
mod netns;
pub mod registry;
mod scratch_fs;
mod secret_volume;
pub mod vm;
pub mod vsock_shim;

pub use netns::TestNetns;
pub use scratch_fs::ScratchExt4;
pub use secret_volume::SecretVolume;
pub use vsock_shim::VsockShim;

use std::fmt;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Test tiers of DESIGN.md §6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Pure logic.
    Unit,
    /// Root on Linux: netns, TAP, nftables, cgroups, loop devices, processes.
    Host,
    /// A real etcd + kube-apiserver.
    Cluster,
    /// A real guest under QEMU.
    Vm,
    /// Cloud Hypervisor, KVM and device-mapper for real.
    Kvm,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Unit => "unit",
            Tier::Host => "host",
            Tier::Cluster => "cluster",
            Tier::Vm => "vm",
            Tier::Kvm => "kvm",
        })
    }
}

/// One test case's bookkeeping. Dropping it without a skip records that the
/// case ran (or failed, when dropped during a panic).
#[derive(Debug)]
#[must_use = "a Case records its outcome when dropped"]
pub struct Case {
    tier: Tier,
    name: String,
    skipped: bool,
}

/// Opens a case of `tier` named `name`.
pub fn case(tier: Tier, name: &str) -> Case {
    Case {
        tier,
        name: name.to_string(),
        skipped: false,
    }
}

impl Case {
    /// Records a skip naming what is missing. Panics instead when the tier is
    /// required by `WRENN_REQUIRE_TIERS`.
    pub fn skip(mut self, reason: impl fmt::Display) {
        self.skipped = true;
        let reason = reason.to_string();
        record(self.tier, "skipped", &self.name, &reason);
        eprintln!("SKIPPED [{}] {}: {reason}", self.tier, self.name);
        if required(self.tier) {
            panic!(
                "tier {} is required here (WRENN_REQUIRE_TIERS) but {} cannot run: {reason}",
                self.tier, self.name
            );
        }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if !self.skipped {
            let outcome = if std::thread::panicking() {
                "failed"
            } else {
                "ran"
            };
            record(self.tier, outcome, &self.name, "");
        }
    }
}

fn required(tier: Tier) -> bool {
    std::env::var("WRENN_REQUIRE_TIERS")
        .map(|v| v.split(',').any(|t| t.trim() == tier.to_string()))
        .unwrap_or(false)
}

fn record(tier: Tier, outcome: &str, name: &str, reason: &str) {
    if let Ok(path) = std::env::var("WRENN_TIER_REPORT") {
        record_to(std::path::Path::new(&path), tier, outcome, name, reason);
    }
}

fn record_to(path: &std::path::Path, tier: Tier, outcome: &str, name: &str, reason: &str) {
    let line = format!(
        "{tier}\t{outcome}\t{name}\t{}\n",
        reason.replace(['\t', '\n'], " ")
    );
    // One write of one short line to an O_APPEND file: lines from parallel
    // tests never interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Opens a [`Tier::Host`] case named `$name` in a test returning `()`, or
/// returns from the test with the case skipped when not root.
#[macro_export]
macro_rules! host_case {
    ($name:expr) => {{
        let case = $crate::case($crate::Tier::Host, $name);
        if let Err(why) = $crate::need_root() {
            return case.skip(why);
        }
        case
    }};
}

/// The workspace's root directory (`images/`, `e2e/scripts/` live there).
///
/// From the package `cargo test` runs (it sets `CARGO_MANIFEST_DIR` at run
/// time), not only from where this crate was compiled: `.ci/run` shares one
/// target directory between clones, and cargo reuses a build of this crate
/// made in another clone, whose baked path would point the tests at that
/// clone's scripts (or at one since removed).
pub fn workspace_root() -> std::path::PathBuf {
    let at_run = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from);
    let baked = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    at_run
        .iter()
        .flat_map(|d| d.ancestors())
        .chain(baked.ancestors())
        .find(|d| d.join("Cargo.lock").is_file())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("."))
}

/// `Err` with a reason unless the process runs as root.
pub fn need_root() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid == "0" {
        Ok(())
    } else {
        Err(format!("needs root (effective uid is {uid:?})"))
    }
}

/// `Err` with a reason unless `program` is found on `PATH` (or is an existing path).
pub fn need_program(program: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::Path::new(program);
    if p.is_absolute() {
        return if p.exists() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("needs {program}, which does not exist"))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|c| c.is_file())
        })
        .ok_or_else(|| format!("needs `{program}` on PATH"))
}

/// A name unique to this process and call, `<prefix>-<pid hex>-<n>`, short
/// enough for an interface name when `prefix` has at most 4 characters.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}-{n}", std::process::id() & 0xffff)
}

/// Polls `check` until it returns `Some`, or fails with the last state
/// described by `describe` once `timeout` has passed.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!("{what}: not true after {timeout:?}; last: {last}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `len` bytes of a fixed xorshift sequence: the same on every run, and
/// incompressible, so a transfer cannot pass by compressing it away.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A runtime of the node agent's shape on a 2-core node (two workers), for
/// tests and benches that set up synchronously before they go async.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test machine can start a runtime")
}

/// Field `field` (`VmRSS`, `VmHWM`, ...) of `/proc/<process>/status` in
/// KiB, where `process` is a pid or `self`; 0 when unreadable.
pub fn status_kib(process: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The state letter of process `pid` from `/proc/<pid>/stat` (`R`, `S`,
/// `T`, `Z`, ...), or `None` once it is gone. The letter follows the last
/// `)`, so a command name holding `) Z ` cannot fool it.
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether process `pid` runs; a zombie (exited, not yet reaped) does not.
pub fn process_alive(pid: i32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z')
}

/// [`wait_until`] for async tests: polls `check` every 5 ms on the tokio
/// timer (a thread sleep would stall the runtime the code under test runs
/// on) and panics naming `what` once `timeout` has passed.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`eventually`] with an async check (a call to the server under test).
pub async fn eventually_async<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `attempt` every 250 ms until it gives a value, and returns it;
/// panics naming `what` and the last error once `timeout` has passed.
pub async fn eventually_ok<T, F, Fut>(timeout: Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("{what}: not reached after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_fit_an_interface_name() {
        let a = unique_name("wt");
        let b = unique_name("wt");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a} is too long for IFNAMSIZ");
    }

    #[test]
    fn wait_until_reports_the_last_state_on_timeout() {
        let err = wait_until(Duration::from_millis(120), "never", || {
            Err::<(), _>("still no".into())
        })
        .unwrap_err();
        assert!(err.contains("never") && err.contains("still no"), "{err}");
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "third try", || {
            n += 1;
            if n == 3 { Ok(n) } else { Err(format!("{n}")) }
        });
        assert_eq!(v, Ok(3));
    }

    #[test]
    fn a_reaped_child_is_gone_and_a_zombie_is_not_alive() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        wait_until(
            Duration::from_secs(5),
            "the child exits",
            || match process_state(pid) {
                Some('Z') => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
        assert!(!process_alive(pid), "a zombie counts as alive");
        child.wait().unwrap();
        assert_eq!(process_state(pid), None);
    }

    #[tokio::test]
    async fn eventually_waits_for_a_late_truth_and_names_a_missing_one() {
        let mut n = 0;
        eventually(Duration::from_secs(5), "third try", || {
            n += 1;
            n == 3
        })
        .await;
        assert_eq!(n, 3);
        let never = tokio::spawn(eventually(Duration::from_millis(50), "never", || false));
        let panic = never.await.unwrap_err().into_panic();
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("never: not true after"), "{text}");
    }

    #[test]
    fn outcomes_are_one_tab_separated_line_each() {
        let dir = std::env::temp_dir().join(unique_name("tk"));
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("report");
        record_to(&report, Tier::Host, "skipped", "t", "needs\tthing\nnow");
        record_to(&report, Tier::Cluster, "ran", "u", "");
        let text = std::fs::read_to_string(&report).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "host\tskipped\tt\tneeds thing now\ncluster\tran\tu\t\n"
        );
    }
}
