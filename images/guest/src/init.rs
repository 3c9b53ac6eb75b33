//! PID-1 duties: mount the pseudo filesystems, set the hostname, start the
//! agent (restarting it if it dies), reap every orphan, forward SIGTERM and
//! SIGINT, and power off cleanly.
//!
//! Everything takes its root path so tests can plan against a temp dir; the
//! sequence itself only runs when the process really is PID 1 (in a VM, or
//! in a fresh PID namespace under `unshare --pid --fork --mount --uts`).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::sys;

/// How long children get between SIGTERM and SIGKILL at power-off.
pub const GRACE: Duration = Duration::from_secs(5);
/// Pause before restarting an agent that died.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--init needs to run as PID 1 (pid is {0})")]
    NotPid1(i32),
    #[error("create mount point {path:?}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount {fstype} on {path:?}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("set the hostname to {name:?}")]
    Hostname {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("set up signals")]
    Signals(#[source] Errno),
    #[error("start the agent")]
    SpawnAgent(#[source] io::Error),
}

/// One filesystem PID 1 mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: &'static str,
    pub target: PathBuf,
    pub flags: MsFlags,
    pub data: &'static str,
}

/// The mounts of a capsule's PID 1 under `root`, in order: each target
/// lives on a filesystem mounted before it.
pub fn plan_mounts(root: &Path) -> Vec<Mount> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let m = |fstype, target: &str, flags, data| Mount {
        fstype,
        target: root.join(target),
        flags,
        data,
    };
    vec![
        m("proc", "proc", nosuid_nodev | MsFlags::MS_NOEXEC, ""),
        m("sysfs", "sys", nosuid_nodev | MsFlags::MS_NOEXEC, ""),
        m("devtmpfs", "dev", MsFlags::MS_NOSUID, "mode=0755"),
        m(
            "devpts",
            "dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        m("tmpfs", "dev/shm", nosuid_nodev, "mode=1777"),
        m("tmpfs", "run", nosuid_nodev, "mode=0755"),
        m("tmpfs", "tmp", nosuid_nodev, "mode=1777"),
        m(
            "cgroup2",
            "sys/fs/cgroup",
            nosuid_nodev | MsFlags::MS_NOEXEC,
            "nsdelegate",
        ),
    ]
}

/// The kernel calls PID 1 needs, so the sequence can run against a fake.
pub trait InitOps {
    fn create_dir(&mut self, path: &Path) -> io::Result<()>;
    fn mount(&mut self, m: &Mount) -> Result<(), Errno>;
}

/// The real kernel.
#[derive(Debug)]
pub struct LinuxInit;

impl InitOps for LinuxInit {
    fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount(&mut self, m: &Mount) -> Result<(), Errno> {
        let data = (!m.data.is_empty()).then_some(m.data);
        nix::mount::mount(Some(m.fstype), &m.target, Some(m.fstype), m.flags, data)
    }
}

/// Mounts `plan` in order. A target that is already a mount point (EBUSY,
/// e.g. /dev from CONFIG_DEVTMPFS_MOUNT) is kept as it is.
pub fn ensure_mounts(ops: &mut dyn InitOps, plan: &[Mount]) -> Result<(), Error> {
    for m in plan {
        ops.create_dir(&m.target)
            .map_err(|source| Error::MountPoint {
                path: m.target.clone(),
                source,
            })?;
        match ops.mount(m) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(Error::Mount {
                    fstype: m.fstype,
                    path: m.target.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// What PID 1 was told on its command line.
#[derive(Debug, Clone)]
pub struct InitConfig {
    /// Where to mount (`/` in a VM).
    pub root: PathBuf,
    pub hostname: String,
    /// Arguments for the agent child (run as `/proc/self/exe ARGS`).
    pub agent_args: Vec<OsString>,
}

/// Reaps every exited child without blocking; returns the pids reaped.
pub fn reap_all() -> Vec<(Pid, WaitStatus)> {
    let mut reaped = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    reaped.push((pid, status));
                }
            }
        }
    }
}

fn spawn_agent(config: &InitConfig) -> Result<Pid, Error> {
    // The handlers reset at exec; the mask (blocked for sigwait) does not.
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(&config.agent_args);
    sys::unblock_signals_on_std_spawn(&mut cmd);
    let child = cmd.spawn().map_err(Error::SpawnAgent)?;
    let pid = i32::try_from(child.id())
        .map_err(|_| Error::SpawnAgent(io::Error::other("pid out of range")))?;
    // The child is reaped by `reap_all`, not through this handle.
    drop(child);
    Ok(Pid::from_raw(pid))
}

/// Runs PID 1. Returns only on a setup error; otherwise it powers off.
pub fn run(config: &InitConfig) -> Result<std::convert::Infallible, Error> {
    let pid = nix::unistd::getpid().as_raw();
    if pid != 1 {
        return Err(Error::NotPid1(pid));
    }
    // 1. Filesystems: /proc first, everything else depends on it.
    ensure_mounts(&mut LinuxInit, &plan_mounts(&config.root))?;
    // 2. Identity.
    nix::unistd::sethostname(&config.hostname).map_err(|source| Error::Hostname {
        name: config.hostname.clone(),
        source,
    })?;
    // 3. Signals: handlers that are not SIG_DFL (the kernel drops default
    //    signals to PID 1), all blocked and taken with sigwait below.
    let signals = [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ];
    sys::install_noop_handlers(&signals).map_err(Error::Signals)?;
    let mut set = SigSet::empty();
    for s in signals {
        set.add(s);
    }
    set.thread_block().map_err(Error::Signals)?;
    // 4. The agent, restarted whenever it dies.
    let mut agent = spawn_agent(config)?;
    tracing::info!(pid = agent.as_raw(), "agent started");
    loop {
        let sig = match set.wait() {
            Ok(sig) => sig,
            Err(_) => continue,
        };
        match sig {
            Signal::SIGCHLD => {
                for (pid, status) in reap_all() {
                    if pid == agent {
                        tracing::error!(?status, "agent exited; restarting it");
                        std::thread::sleep(RESTART_DELAY);
                        match spawn_agent(config) {
                            Ok(p) => agent = p,
                            Err(e) => {
                                tracing::error!(error = %crate::report::chain(&e), "agent restart failed; powering off");
                                power_off();
                            }
                        }
                    }
                }
            }
            other => {
                tracing::info!(signal = %other, "powering off");
                power_off();
            }
        }
    }
}

/// SIGTERM to every process, SIGKILL to what is left after [`GRACE`], sync,
/// power off. Only PID 1 calls this.
fn power_off() -> ! {
    use nix::sys::signal::kill;
    let all = Pid::from_raw(-1);
    // kill(-1) from PID 1 reaches every process but itself.
    let _ = kill(all, Signal::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        reap_all();
        if matches!(waitpid(all, Some(WaitPidFlag::WNOHANG)), Err(Errno::ECHILD)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(all, Signal::SIGKILL);
    reap_all();
    nix::unistd::sync();
    // In a VM this stops the machine; in a PID namespace the kernel ends
    // the namespace's init (us) with SIGINT.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeInit {
        calls: Vec<String>,
        busy: Vec<&'static str>,
    }

    impl InitOps for FakeInit {
        fn create_dir(&mut self, path: &Path) -> io::Result<()> {
            self.calls.push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn mount(&mut self, m: &Mount) -> Result<(), Errno> {
            self.calls
                .push(format!("mount {} {}", m.fstype, m.target.display()));
            if self.busy.contains(&m.fstype) {
                Err(Errno::EBUSY)
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn mounts_in_order_under_the_root_and_keeps_existing_ones() {
        let plan = plan_mounts(Path::new("/r"));
        let mut fake = FakeInit {
            busy: vec!["devtmpfs"],
            ..Default::default()
        };
        ensure_mounts(&mut fake, &plan).unwrap();
        let mounts: Vec<_> = fake
            .calls
            .iter()
            .filter(|c| c.starts_with("mount"))
            .collect();
        assert_eq!(
            mounts,
            [
                "mount proc /r/proc",
                "mount sysfs /r/sys",
                "mount devtmpfs /r/dev",
                "mount devpts /r/dev/pts",
                "mount tmpfs /r/dev/shm",
                "mount tmpfs /r/run",
                "mount tmpfs /r/tmp",
                "mount cgroup2 /r/sys/fs/cgroup",
            ]
        );
        assert_eq!(fake.calls[0], "mkdir /r/proc");
    }

    #[test]
    fn a_failed_mount_names_the_target() {
        struct Failing;
        impl InitOps for Failing {
            fn create_dir(&mut self, _: &Path) -> io::Result<()> {
                Ok(())
            }
            fn mount(&mut self, _: &Mount) -> Result<(), Errno> {
                Err(Errno::EPERM)
            }
        }
        let e = ensure_mounts(&mut Failing, &plan_mounts(Path::new("/r"))).unwrap_err();
        assert_eq!(
            crate::report::chain(&e),
            "mount proc on \"/r/proc\": EPERM: Operation not permitted"
        );
    }

    #[test]
    fn refuses_to_run_unless_pid_1() {
        let config = InitConfig {
            root: PathBuf::from("/nonexistent"),
            hostname: "x".into(),
            agent_args: vec![],
        };
        assert!(matches!(run(&config), Err(Error::NotPid1(_))));
    }
}
