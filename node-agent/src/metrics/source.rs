//! Where one capsule's figures come from. [`SampleSource`] has one method
//! per figure so the supervisor can combine what it owns — the cgroup and
//! VMM pid ([`ProcSource`]), the disk (`BlockStore::allocated_bytes`), the
//! NIC counters (`Machine::counters`), the guest agent's memory report —
//! into one source per capsule. A figure a source cannot give is `Ok(None)`,
//! which is also the default of every method.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use super::Error;
use crate::vmm::NetCounters;
use crate::vmm::cgroup::CapsuleCgroup;
use crate::vmm::process::ProcessIdentity;

/// One reading of every figure, as the sources report them: CPU and
/// network are cumulative counters, the rest are gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// CPU time used by the capsule's cgroup since it was made, in ns.
    pub cpu_usage_ns: Option<u64>,
    /// Resident memory of the VMM process on the host.
    pub host_rss_bytes: Option<u64>,
    /// Bytes allocated by the capsule's writable disk.
    pub disk_allocated_bytes: Option<u64>,
    /// Guest NIC counters since the VMM started.
    pub net: Option<NetCounters>,
    /// Guest memory in use (total - available), from the guest agent.
    pub guest_memory_used_bytes: Option<u64>,
}

/// The future every [`SampleSource`] method returns.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<Option<T>, Error>> + Send + 'a>>;

fn none<'a, T: Send + 'a>() -> SourceFuture<'a, T> {
    Box::pin(std::future::ready(Ok(None)))
}

/// The figures of one capsule. Each method is called once per sampling
/// tick (1 s) under a deadline; an error drops that figure from that point
/// and is counted, it does not stop sampling.
pub trait SampleSource: Send + Sync + std::fmt::Debug {
    /// Cumulative CPU nanoseconds of the capsule's cgroup.
    fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
        none()
    }
    /// Resident bytes of the VMM process.
    fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
        none()
    }
    /// Allocated bytes of the writable disk.
    fn disk_allocated_bytes(&self) -> SourceFuture<'_, u64> {
        none()
    }
    /// Guest NIC counters.
    fn net_counters(&self) -> SourceFuture<'_, NetCounters> {
        none()
    }
    /// Guest memory in use; `None` until the guest agent is connected.
    fn guest_memory_used_bytes(&self) -> SourceFuture<'_, u64> {
        none()
    }
}

/// Reads every figure concurrently. Each figure's error is returned beside
/// the reading (which lacks that figure).
pub async fn read_all(source: &dyn SampleSource) -> (Reading, Vec<Error>) {
    let (cpu, rss, disk, net, guest) = futures::join!(
        source.cpu_usage_ns(),
        source.host_rss_bytes(),
        source.disk_allocated_bytes(),
        source.net_counters(),
        source.guest_memory_used_bytes(),
    );
    let mut errors = Vec::new();
    let mut keep = |r: Result<Option<u64>, Error>| match r {
        Ok(v) => v,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let mut reading = Reading {
        cpu_usage_ns: keep(cpu),
        host_rss_bytes: keep(rss),
        disk_allocated_bytes: keep(disk),
        net: None,
        guest_memory_used_bytes: keep(guest),
    };
    match net {
        Ok(n) => reading.net = n,
        Err(e) => errors.push(e),
    }
    (reading, errors)
}

/// CPU from the capsule's cgroup and host RSS of its VMM process, read
/// from cgroupfs and `<proc>/<pid>/status`. The process is named by pid
/// and start time, so a reused pid reports an error, not a stranger's RSS.
#[derive(Clone, Debug)]
pub struct ProcSource {
    cgroup: CapsuleCgroup,
    proc_root: PathBuf,
    process: ProcessIdentity,
}

impl ProcSource {
    /// Reads the cgroup `cgroup` and the process `process` under
    /// `proc_root` (normally `/proc`).
    pub fn new(proc_root: &Path, process: ProcessIdentity, cgroup: CapsuleCgroup) -> Self {
        Self {
            cgroup,
            proc_root: proc_root.to_path_buf(),
            process,
        }
    }

    /// Cumulative CPU nanoseconds of the cgroup (v1 `cpuacct.usage`, v2
    /// `cpu.stat`).
    pub fn read_cpu_usage_ns(&self) -> Result<u64, Error> {
        self.cgroup
            .cpu_usage_ns()
            .map_err(|source| Error::ReadCgroupCpu { source })
    }

    /// `VmRSS` of the process; see [`read_rss_bytes`].
    pub fn read_host_rss_bytes(&self) -> Result<u64, Error> {
        read_rss_bytes(&self.proc_root, self.process)
    }
}

/// `VmRSS` of `process` under `proc_root`. `status` is used rather than
/// `smaps_rollup`, which walks every mapping and costs far more on a VMM
/// with guest RAM mapped; the totals agree. A pid that now names another
/// process (other start time) is [`Error::ProcessGone`], not a stranger's
/// RSS.
pub fn read_rss_bytes(proc_root: &Path, process: ProcessIdentity) -> Result<u64, Error> {
    let dir = proc_root.join(process.pid.to_string());
    let status = dir.join("status");
    let text = std::fs::read_to_string(&status).map_err(|source| Error::ReadProc {
        path: status.clone(),
        source,
    })?;
    let rss = parse_vm_rss(&text).ok_or_else(|| Error::ReadProc {
        path: status.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no VmRSS line"),
    })?;
    // Checked after the read: if the pid still has the same start time
    // now, the status read before belonged to our process.
    let started =
        crate::sys::process::start_time_ticks(proc_root, process.pid).map_err(|source| {
            Error::ReadProc {
                path: dir.join("stat"),
                source,
            }
        })?;
    if started != process.start_time_ticks {
        return Err(Error::ProcessGone { pid: process.pid });
    }
    Ok(rss)
}

impl SampleSource for ProcSource {
    fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
        Box::pin(std::future::ready(self.read_cpu_usage_ns().map(Some)))
    }

    fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
        Box::pin(std::future::ready(self.read_host_rss_bytes().map(Some)))
    }
}

/// `VmRSS:   1234 kB` → bytes. A kernel thread or zombie has no such line.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_a_reused_pid_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let proc_dir = root.path().join("proc/42");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("status"), "Name:\tch\nVmRSS:\t 100 kB\n").unwrap();
        std::fs::write(
            proc_dir.join("stat"),
            format!("42 (c h) S {}555 0\n", "1 ".repeat(18)),
        )
        .unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let cg = crate::vmm::cgroup::CgroupRoot::detect(root.path(), "wrenn")
            .unwrap()
            .open_capsule("c");
        let ours = ProcSource::new(
            &root.path().join("proc"),
            ProcessIdentity {
                pid: 42,
                start_time_ticks: 555,
            },
            cg.clone(),
        );
        assert_eq!(ours.read_host_rss_bytes().unwrap(), 100 * 1024);
        let earlier = ProcSource::new(
            &root.path().join("proc"),
            ProcessIdentity {
                pid: 42,
                start_time_ticks: 554,
            },
            cg,
        );
        assert!(matches!(
            earlier.read_host_rss_bytes(),
            Err(Error::ProcessGone { pid: 42 })
        ));
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tcloud-hypervisor\nVmPeak:\t  99 kB\nVmRSS:\t  2048 kB\nThreads: 4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkworker\nThreads: 1\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }
}
