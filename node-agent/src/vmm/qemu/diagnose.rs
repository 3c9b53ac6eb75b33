//! What the host sees of a QEMU guest whose agent did not answer in time,
//! gathered before the rollback removes it: whether QEMU and the vsock
//! helper still run and how much CPU each thread got (a starved boot and a
//! guest spinning look alike from the vsock side), QEMU's run state over
//! QMP, one fresh handshake on the vsock socket (refused: nothing listens
//! in the guest; no answer: the helper is wedged), the cgroup's throttling
//! and memory events, and the tails of the serial console and `vmm.log`
//! (QEMU's and the helper's output).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::run_dir;
use super::qmp;
use super::vsock::current_helpers;
use crate::vmm::cgroup::CgroupRoot;
use crate::vmm::logs::QEMU_CONSOLE_LOG;
use crate::vmm::machine::MachineHandle;
use crate::vmm::process::{HostPaths, ProcessIdentity, capsule_dir};

/// Lines of the console and of `vmm.log` kept.
const TAIL_LINES: usize = 30;
/// Bound on the QMP query and the fresh handshake each.
const PROBE: Duration = Duration::from_secs(2);
/// `/proc/<pid>/stat` times are in USER_HZ, which is 100 on Linux for
/// every architecture userspace sees.
const USER_HZ: f64 = 100.0;

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcStat {
    /// `comm` (a thread's name: QEMU names vCPU threads `CPU 0/TCG`).
    pub comm: String,
    /// R, S, D, Z, ...
    pub state: char,
    /// User plus system CPU seconds.
    pub cpu_secs: f64,
    /// Start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`; `comm` may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15, starttime 22.
    let state = rest.first()?.chars().next()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    let start_ticks: u64 = rest.get(19)?.parse().ok()?;
    Some(ProcStat {
        comm,
        state,
        cpu_secs: (utime + stime) as f64 / USER_HZ,
        start_ticks,
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One process and its threads, or why it cannot be seen.
fn describe_process(proc_root: &Path, role: &str, id: ProcessIdentity) -> String {
    let dir = proc_root.join(id.pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|t| parse_stat(&t));
    let Some(stat) = stat else {
        return format!("{role} pid {}: gone", id.pid);
    };
    if stat.start_ticks != id.start_time_ticks {
        return format!("{role} pid {}: gone (pid reused)", id.pid);
    }
    let mut out = format!(
        "{role} pid {}: state {}, {:.1} s CPU",
        id.pid, stat.state, stat.cpu_secs
    );
    let mut threads: Vec<ProcStat> = std::fs::read_dir(dir.join("task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .collect();
    threads.sort_by(|a, b| b.cpu_secs.total_cmp(&a.cpu_secs));
    let busiest: Vec<String> = threads
        .iter()
        .take(4)
        .map(|t| format!("{} {} {:.1} s", t.comm, t.state, t.cpu_secs))
        .collect();
    if !busiest.is_empty() {
        let _ = write!(out, " (threads: {})", busiest.join(", "));
    }
    out
}

/// Throttling and memory events of the capsule's cgroup (v2 names; v1
/// hierarchies show what they have).
fn describe_cgroup(dirs: &[PathBuf]) -> String {
    let mut parts = Vec::new();
    for dir in dirs {
        for (file, keys) in [
            (
                "cpu.stat",
                &["usage_usec", "nr_periods", "nr_throttled", "throttled_usec"][..],
            ),
            ("memory.events", &["max", "oom", "oom_kill"][..]),
        ] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                for l in text.lines() {
                    if keys.iter().any(|k| l.split_whitespace().next() == Some(*k)) {
                        parts.push(format!("{file}:{}", l.replace(' ', "=")));
                    }
                }
            }
        }
        for file in ["cpu.max", "memory.current", "memory.max", "memory.peak"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                parts.push(format!("{file}={}", text.trim()));
            }
        }
    }
    if parts.is_empty() {
        "cgroup: gone".into()
    } else {
        format!("cgroup: {}", parts.join(" "))
    }
}

fn read_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => tail(&String::from_utf8_lossy(&b), TAIL_LINES),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The report of the module doc, one fact per line. Best effort: what
/// cannot be read says so and the rest is still gathered.
pub(super) async fn report(paths: &HostPaths, cgroups: &CgroupRoot, vm: &MachineHandle) -> String {
    let state = match qmp::Qmp::connect(&vm.control_socket, PROBE).await {
        Ok(mut q) => match tokio::time::timeout(PROBE, q.execute(&qmp::QueryStatus)).await {
            Ok(Ok(s)) => s.status,
            Ok(Err(e)) => format!("query-status failed: {e}"),
            Err(_) => format!("no query-status reply within {PROBE:?}"),
        },
        Err(e) => format!("no QMP: {e}"),
    };
    let handshake = match tokio::time::timeout(
        PROBE,
        crate::guest::dial(&vm.vsock_socket, crate::guest::AGENT_PORT),
    )
    .await
    {
        Ok(Ok(_)) => "answered (the guest agent listens now)".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no reply within {PROBE:?} (the helper does not answer)"),
    };
    let proc_root = paths.proc_root.clone();
    let cgroup_dirs = cgroups.open_capsule(&vm.capsule).dirs().to_vec();
    let console = run_dir(vm).join(QEMU_CONSOLE_LOG);
    let vmm_log = capsule_dir(paths, &vm.capsule).join("vmm.log");
    let qemu = vm.process;
    let helpers = current_helpers(vm);
    let files = tokio::task::spawn_blocking(move || {
        let mut out = describe_process(&proc_root, "qemu", qemu);
        for h in helpers {
            out.push('\n');
            out.push_str(&describe_process(&proc_root, "vsock helper", h));
        }
        let _ = write!(
            out,
            "\n{}\nserial console tail:\n{}\nvmm.log tail:\n{}",
            describe_cgroup(&cgroup_dirs),
            read_tail(&console),
            read_tail(&vmm_log)
        );
        out
    })
    .await
    .unwrap_or_else(|e| format!("(reading the host's view failed: {e})"));
    format!("QMP run state: {state}\nfresh vsock handshake: {handshake}\n{files}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_name_with_spaces_and_parentheses_parses() {
        let line = "4242 (CPU 0/TCG) (x)) R 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1234 56 0 0 20 0 3 0 987654 1000000 500 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "CPU 0/TCG) (x)");
        assert_eq!(s.state, 'R');
        assert!((s.cpu_secs - 12.90).abs() < 1e-9, "{}", s.cpu_secs);
        assert_eq!(s.start_ticks, 987_654);
        assert_eq!(parse_stat("4242 (qemu"), None);
    }

    #[test]
    fn this_process_is_described_and_a_dead_pid_is_gone() {
        let me = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        let start = parse_stat(&text).unwrap().start_ticks;
        let id = |pid, start_time_ticks| ProcessIdentity {
            pid,
            start_time_ticks,
        };
        let pid = i32::try_from(me).unwrap();
        let seen = describe_process(Path::new("/proc"), "qemu", id(pid, start));
        assert!(
            seen.contains("state ") && seen.contains("threads:"),
            "{seen}"
        );
        let reused = describe_process(Path::new("/proc"), "qemu", id(pid, start + 1));
        assert!(reused.ends_with("gone (pid reused)"), "{reused}");
        let gone = describe_process(Path::new("/nonexistent"), "helper", id(pid, start));
        assert_eq!(gone, format!("helper pid {pid}: gone"));
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
