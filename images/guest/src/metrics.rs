//! Guest metrics from `/proc/stat`, `/proc/meminfo`, `/proc/loadavg` and
//! `statvfs` on `/`. Parsers are pure; the sampler takes the proc root.

use std::io;
use std::path::{Path, PathBuf};

use wrenn_proto::guest::v1::GuestMetrics;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse {what}")]
    Parse { what: &'static str },
    #[error("statvfs {path:?}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::internal(crate::report::chain(&e))
    }
}

/// Cumulative CPU time `(busy, total)` in clock ticks from `/proc/stat`'s
/// aggregate line. Total is user..steal (guest time is already in user);
/// busy is total minus idle and iowait.
pub fn parse_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if v.len() < 4 {
        return None;
    }
    let total = v.iter().try_fold(0u64, |acc, &x| acc.checked_add(x))?;
    let idle = v[3].checked_add(v.get(4).copied().unwrap_or(0))?;
    Some((total.checked_sub(idle)?, total))
}

/// `(total, available)` bytes from `/proc/meminfo`.
pub fn parse_meminfo(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub fn parse_loadavg(loadavg: &str) -> Option<(f64, f64, f64)> {
    let mut it = loadavg.split_whitespace().map(str::parse::<f64>);
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

fn read(path: PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
}

/// Samples the guest: `proc` is normally `/proc`, `disk` normally `/`.
pub fn sample(proc: &Path, disk: &Path) -> Result<GuestMetrics, Error> {
    let (busy, total) =
        parse_cpu(&read(proc.join("stat"))?).ok_or(Error::Parse { what: "/proc/stat" })?;
    let (mem_total, mem_avail) =
        parse_meminfo(&read(proc.join("meminfo"))?).ok_or(Error::Parse {
            what: "/proc/meminfo",
        })?;
    let (l1, l5, l15) = parse_loadavg(&read(proc.join("loadavg"))?).ok_or(Error::Parse {
        what: "/proc/loadavg",
    })?;
    let vfs = nix::sys::statvfs::statvfs(disk).map_err(|source| Error::Statvfs {
        path: disk.to_path_buf(),
        source,
    })?;
    let frsize = vfs.fragment_size() as u64;
    let blocks = vfs.blocks() as u64;
    let free = vfs.blocks_free() as u64;
    let tick_ns = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => 1_000_000_000 / hz as u64,
        _ => 10_000_000,
    };
    Ok(GuestMetrics {
        cpu_busy_nanos: busy.saturating_mul(tick_ns),
        cpu_total_nanos: total.saturating_mul(tick_ns),
        memory_total_bytes: mem_total,
        memory_available_bytes: mem_avail,
        memory_used_bytes: mem_total.saturating_sub(mem_avail),
        disk_total_bytes: blocks.saturating_mul(frsize),
        disk_used_bytes: blocks.saturating_sub(free).saturating_mul(frsize),
        load1: l1,
        load5: l5,
        load15: l15,
        sampled_unix_nanos: wrenn_proto::unix_nanos_now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_counts_busy_without_idle_and_iowait() {
        let stat = "cpu  10 1 5 100 4 2 3 1 7 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_cpu(stat), Some((22, 126)));
        assert_eq!(parse_cpu("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_cpu("cpu  x\n"), None);
    }

    #[test]
    fn meminfo_in_bytes() {
        let m = "MemTotal:        2048 kB\nMemFree:  10 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_meminfo(m), Some((2048 * 1024, 1024 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn loadavg_three_numbers() {
        assert_eq!(
            parse_loadavg("0.50 0.25 0.10 1/100 42\n"),
            Some((0.5, 0.25, 0.1))
        );
        assert_eq!(parse_loadavg("bad"), None);
    }

    #[test]
    fn samples_this_machine() {
        let m = sample(Path::new("/proc"), Path::new("/")).unwrap();
        assert_eq!(
            m.memory_used_bytes,
            m.memory_total_bytes - m.memory_available_bytes
        );
        assert!(m.cpu_busy_nanos <= m.cpu_total_nanos);
        assert!(m.disk_used_bytes <= m.disk_total_bytes);
    }
}
