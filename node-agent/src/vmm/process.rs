//! VMM process supervision: start a VMM inside a capsule's network
//! namespace, with its own mount namespace (fresh `/sys`) and its own
//! cgroup, in a new session so it outlives the agent; adopt it again after
//! an agent restart (guarding against pid reuse); watch it and tell a guest
//! poweroff from a crash.
//!
//! Every VMM is confined ([`Confine`]): no capabilities beyond what its
//! backend names, `no_new_privs`, and a mount namespace in which the
//! node-wide hidden directories ([`HostPaths::hidden`]: the agent's state
//! directory, `/dev`, the cgroup mount) show only this capsule's own
//! directory and the files its backend lists. Optionally (the backends ask
//! for it) its own PID namespace, so no other process's `/proc/<pid>`
//! reaches another capsule's files or memory.
//!
//! The syscalls are in `sys::process`; this file decides the order and the
//! paths. Host paths come in through [`HostPaths`], so tests use temp dirs.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Error;
use super::cgroup::{CapsuleCgroup, CgroupLimits, CgroupRoot};
use crate::sys::process::{self as sys, ExitStatus, Pidfd};

/// Host locations, passed in.
#[derive(Clone, Debug)]
pub struct HostPaths {
    /// `/proc`.
    pub proc_root: PathBuf,
    /// Per-capsule state; the VMM's files go to `<state_dir>/<capsule>/`.
    pub state_dir: PathBuf,
    /// Directories every VMM sees empty (a read-only tmpfs), apart from
    /// what is shown again: its own `<state_dir>/<capsule>/`,
    /// [`HostPaths::devices`] and the request's [`Confine::show`]. Empty in
    /// tests of the plain spawn path.
    pub hidden: Vec<PathBuf>,
    /// Device nodes every VMM may open (`/dev/kvm`, `/dev/net/tun`,
    /// `/dev/null`, `/dev/urandom`, ...), shown when `/dev` is hidden.
    pub devices: Vec<PathBuf>,
}

impl HostPaths {
    /// The production view: `/dev` and the agent's whole state directory
    /// (`state_root`, which holds every capsule's disks, journals, sockets
    /// and snapshots) hidden, and the cgroup mount too (a root process that
    /// sees it could move itself out of its cgroup in v1), the usual device
    /// nodes shown where they exist.
    pub fn confined(proc_root: PathBuf, state_dir: PathBuf, state_root: &Path) -> Self {
        let devices = [
            "/dev/kvm",
            "/dev/net/tun",
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
        Self {
            proc_root,
            state_dir,
            hidden: vec![
                state_root.to_path_buf(),
                PathBuf::from("/dev"),
                PathBuf::from("/sys/fs/cgroup"),
            ],
            devices,
        }
    }
}

/// One path a VMM may see inside the hidden directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShowPath {
    /// Absolute path (the same inside as outside).
    pub path: PathBuf,
    /// Writable, or read-only.
    pub writable: bool,
}

impl ShowPath {
    /// Read-only.
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
        }
    }

    /// Writable.
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
        }
    }
}

/// Least privilege for one VMM process, beyond the node-wide view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confine {
    /// Its own PID namespace and `/proc`. It is then init there: signals
    /// without a handler of its own, SIGTERM included, are ignored, so
    /// stopping falls back to SIGKILL after the grace time.
    pub new_pid_ns: bool,
    /// Files it needs inside the hidden directories (kernel, disks,
    /// snapshot being restored), beyond its own state directory.
    pub show: Vec<ShowPath>,
    /// Capabilities it keeps (`CAP_*` numbers); all others are dropped
    /// from every set before `execve`.
    pub keep_caps: Vec<u32>,
}

/// What to start.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    /// Capsule name (also the cgroup and state directory name).
    pub capsule: &'a str,
    /// Absolute program path.
    pub program: &'a Path,
    /// Arguments.
    pub args: Vec<OsString>,
    /// Network namespace to enter: a bind-mounted netns file
    /// (`/run/netns/wrenn-<id>`) or `/proc/<pid>/ns/net`. `None` stays in
    /// the agent's (tests only).
    pub netns: Option<&'a Path>,
    /// cgroup limits.
    pub limits: CgroupLimits,
    /// Descriptors the program inherits under their numbers (e.g. the API
    /// listener for `--api-socket fd=N`).
    pub inherit: Vec<BorrowedFd<'a>>,
    /// Privileges and view.
    pub confine: Confine,
}

/// The identity of a VMM process that survives agent restarts (for the
/// capsule journal): pid plus start time guards against pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessIdentity {
    /// Pid.
    pub pid: i32,
    /// Start time in clock ticks since boot.
    pub start_time_ticks: u64,
}

/// A running (or exited, not yet reaped) VMM.
#[derive(Debug)]
pub struct VmmProcess {
    capsule: String,
    identity: ProcessIdentity,
    pidfd: Pidfd,
    cgroup: CapsuleCgroup,
    /// Set before we ask it to stop, so its exit is not read as a crash.
    stop_requested: Arc<AtomicBool>,
}

/// The capsule's state directory for VMM files.
pub fn capsule_dir(paths: &HostPaths, capsule: &str) -> PathBuf {
    paths.state_dir.join(capsule)
}

/// Turns a configured program into the absolute path `execve` needs: a
/// bare name is looked up in `PATH` (as a shell would), a path is checked
/// for being an executable file. Done once at start, so a missing binary
/// stops the agent with its name rather than failing every capsule.
pub fn resolve_program(program: &Path, path_var: Option<&OsStr>) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let not_found = |why: String| Error::ProgramNotFound {
        program: program.to_path_buf(),
        why,
    };
    if program.components().count() > 1 || program.is_absolute() {
        let abs = std::path::absolute(program).map_err(|e| not_found(e.to_string()))?;
        return if executable(&abs) {
            Ok(abs)
        } else {
            Err(not_found(format!(
                "{} is not an executable file",
                abs.display()
            )))
        };
    }
    let dirs = path_var.unwrap_or_default();
    std::env::split_paths(dirs)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| not_found(format!("not in PATH ({})", dirs.to_string_lossy())))
}

/// Starts `req.program` in the capsule's namespaces and cgroup.
///
/// Order matters:
/// 1. the state dir and log file exist before the child needs them;
/// 2. the cgroup exists with its limits *before* the child joins it, and
///    the child joins before `execve`, so no VMM page is charged elsewhere;
/// 3. the child enters the netns before it mounts sysfs (sysfs shows the
///    netns of its mounter; CH reads `/sys/class/net/<tap>/tun_flags`);
/// 4. `setsid`, so the agent's process group and terminal signals never
///    reach it and it outlives the agent;
/// 5. the view and privileges of [`Confine`] last, since every step above
///    needs the agent's privileges.
pub fn spawn_supervised(
    paths: &HostPaths,
    cgroups: &CgroupRoot,
    req: &SpawnRequest<'_>,
) -> Result<VmmProcess, Error> {
    let capsule = req.capsule;
    let prep = |what: &'static str, path: &Path| Error::prepare(capsule, what, path);

    // 1. State dir and log.
    let dir = capsule_dir(paths, capsule);
    std::fs::create_dir_all(&dir).map_err(prep("state dir", &dir))?;
    let log_path = dir.join("vmm.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(prep("log file", &log_path))?;

    // 2. cgroup with limits, and the files the child writes to join it.
    let cgroup = cgroups.ensure_capsule(capsule, &req.limits)?;
    let mut procs: Vec<OwnedFd> = Vec::new();
    for path in cgroup.procs_files() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(prep("cgroup.procs", &path))?;
        procs.push(f.into());
    }
    let procs_fds: Vec<BorrowedFd<'_>> = procs.iter().map(AsFd::as_fd).collect();

    // 3. The network namespace.
    let netns = match req.netns {
        Some(p) => Some(OwnedFd::from(
            std::fs::File::open(p).map_err(prep("netns", p))?,
        )),
        None => None,
    };

    // 4. The view: own directory writable, then devices, then the files
    //    the backend names.
    let mut show = vec![sys::Shown {
        path: &dir,
        writable: true,
    }];
    show.extend(paths.devices.iter().map(|d| sys::Shown {
        path: d,
        writable: true,
    }));
    show.extend(req.confine.show.iter().map(|s| sys::Shown {
        path: &s.path,
        writable: s.writable,
    }));
    let hide: Vec<&Path> = paths.hidden.iter().map(PathBuf::as_path).collect();
    let confine = sys::Confinement {
        new_pid_ns: req.confine.new_pid_ns,
        hide: &hide,
        show: &show,
        keep_caps: &req.confine.keep_caps,
    };

    let args: Vec<&OsStr> = req.args.iter().map(OsString::as_os_str).collect();
    let env = [(
        OsStr::new("PATH"),
        OsStr::new("/usr/sbin:/usr/bin:/sbin:/bin"),
    )];
    let plan = sys::SpawnPlan {
        program: req.program,
        args: &args,
        env: &env,
        new_session: true,
        netns: netns.as_ref().map(AsFd::as_fd),
        new_mount_ns_with_sysfs: req.netns.is_some(),
        cgroup_procs: &procs_fds,
        stdio: [None, Some(log.as_fd()), Some(log.as_fd())],
        inherit: &req.inherit,
        confine: Some(&confine),
    };
    let pid = match sys::spawn(&plan) {
        Ok(pid) => pid,
        Err(source) => {
            // Undo the cgroup made for it; the child never ran in it.
            let _ = cgroup.remove();
            return Err(Error::SpawnVmm {
                capsule: capsule.to_string(),
                program: req.program.to_path_buf(),
                source,
            });
        }
    };
    // Our child, not reaped: the pid cannot have been reused yet.
    let pidfd = Pidfd::open(pid).map_err(|source| Error::Process {
        capsule: capsule.to_string(),
        pid,
        what: "open pidfd for",
        source,
    })?;
    let start_time_ticks =
        sys::start_time_ticks(&paths.proc_root, pid).map_err(|source| Error::Process {
            capsule: capsule.to_string(),
            pid,
            what: "read start time of",
            source,
        })?;
    Ok(VmmProcess {
        capsule: capsule.to_string(),
        identity: ProcessIdentity {
            pid,
            start_time_ticks,
        },
        pidfd,
        cgroup,
        stop_requested: Arc::new(AtomicBool::new(false)),
    })
}

impl VmmProcess {
    /// Adopts a VMM recorded before an agent restart. Fails if `identity`'s
    /// pid is gone or now belongs to another process.
    pub fn adopt(
        paths: &HostPaths,
        cgroups: &CgroupRoot,
        capsule: &str,
        identity: ProcessIdentity,
    ) -> Result<Self, Error> {
        let gone = |reason: String| Error::AdoptVmm {
            capsule: capsule.to_string(),
            pid: identity.pid,
            reason,
        };
        // Open first, check second: once the pidfd exists it pins the
        // process, so a matching start time cannot go stale.
        let pidfd = Pidfd::open(identity.pid).map_err(|e| gone(format!("pidfd_open: {e}")))?;
        let now = sys::start_time_ticks(&paths.proc_root, identity.pid)
            .map_err(|e| gone(format!("stat: {e}")))?;
        if now != identity.start_time_ticks {
            return Err(gone(format!(
                "start time {now} differs from recorded {}",
                identity.start_time_ticks
            )));
        }
        Ok(Self {
            capsule: capsule.to_string(),
            identity,
            pidfd,
            cgroup: cgroups.open_capsule(capsule),
            stop_requested: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Pid and start time, for the journal.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    /// The capsule's cgroup.
    pub fn cgroup(&self) -> &CapsuleCgroup {
        &self.cgroup
    }

    /// Marks the coming exit as requested (before `vmm.shutdown` or a
    /// signal), so the watcher does not report a crash.
    pub fn mark_stop_requested(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    /// Whether [`mark_stop_requested`](Self::mark_stop_requested) was
    /// called.
    pub fn stop_was_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Sends `signal` through the pidfd (never to a recycled pid).
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        self.pidfd.signal(signal).map_err(|source| Error::Process {
            capsule: self.capsule.clone(),
            pid: self.identity.pid,
            what: "signal",
            source,
        })
    }

    /// Status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, Error> {
        self.pidfd
            .try_wait()
            .map_err(|source| self.wait_err(source))
    }

    /// Waits for the exit without blocking a runtime thread (the pidfd turns
    /// readable when the process exits).
    pub async fn wait(&self) -> Result<ExitStatus, Error> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            self.pidfd
                .exited()
                .await
                .map_err(|source| self.wait_err(source))?;
        }
    }

    /// The capsule this VMM runs.
    pub fn capsule(&self) -> &str {
        &self.capsule
    }

    /// Stops the VMM: SIGTERM, then SIGKILL after `grace`; waits for it and
    /// removes its cgroup. Idempotent on an exited process.
    pub async fn stop(&self, grace: std::time::Duration) -> Result<ExitStatus, Error> {
        self.mark_stop_requested();
        if self.try_wait()?.is_none() {
            // ESRCH here means it exited meanwhile; wait() reports it.
            let _ = self.pidfd.signal(libc::SIGTERM);
        }
        let status = match tokio::time::timeout(grace, self.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                let _ = self.pidfd.signal(libc::SIGKILL);
                self.wait().await?
            }
        };
        self.cgroup.remove()?;
        Ok(status)
    }

    fn wait_err(&self, source: std::io::Error) -> Error {
        Error::Process {
            capsule: self.capsule.clone(),
            pid: self.identity.pid,
            what: "wait for",
            source,
        }
    }
}

/// Why a VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// The agent asked for it (`vmm.shutdown`, delete, suspend).
    Requested,
    /// The guest powered off: CH shuts itself down in order (event
    /// `vmm/shutdown`, exit code 0).
    GuestPoweroff,
    /// Anything else: a non-zero exit, a signal (SIGSYS from seccomp,
    /// SIGKILL from the OOM killer), or an adopted process that vanished
    /// without the `vmm/shutdown` event.
    Crashed(ExitStatus),
}

/// Classifies an exit from its status, whether the VMM reported an orderly
/// shutdown (Cloud Hypervisor's `vmm/shutdown` event, read by
/// `ch::events::watch_exit`) and whether the agent requested it. Exit code
/// 0 is the orderly path; the event confirms it when the status is unknown
/// (adopted process, not our child).
pub fn classify_exit(status: ExitStatus, orderly: bool, requested: bool) -> VmmExit {
    match status {
        _ if requested
            && !matches!(
                status,
                ExitStatus::Signaled {
                    core_dumped: true,
                    ..
                }
            ) =>
        {
            VmmExit::Requested
        }
        ExitStatus::Exited(0) => VmmExit::GuestPoweroff,
        ExitStatus::Unknown if orderly => VmmExit::GuestPoweroff,
        other => VmmExit::Crashed(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_through_path_or_fail_with_their_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("vmm-bin");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("not-exec");
        std::fs::write(&plain, "").unwrap();
        let path_var =
            std::env::join_paths(["relative/dir".into(), dir.path().to_path_buf()]).unwrap();

        let found = resolve_program(Path::new("vmm-bin"), Some(&path_var)).unwrap();
        assert_eq!(found, exe);
        assert_eq!(resolve_program(&exe, None).unwrap(), exe);

        let missing = resolve_program(Path::new("no-such-vmm"), Some(&path_var)).unwrap_err();
        assert!(missing.to_string().contains("no-such-vmm"), "{missing}");
        assert!(missing.to_string().contains("not in PATH"), "{missing}");
        let plain_err = resolve_program(&plain, Some(&path_var)).unwrap_err();
        assert!(
            plain_err.to_string().contains("not an executable"),
            "{plain_err}"
        );
        assert!(resolve_program(Path::new("not-exec"), Some(&path_var)).is_err());
    }

    #[test]
    fn poweroff_versus_crash() {
        // `orderly`: the VMM reported its own shutdown.
        assert_eq!(
            classify_exit(ExitStatus::Exited(0), true, false),
            VmmExit::GuestPoweroff
        );
        assert_eq!(
            classify_exit(ExitStatus::Exited(1), false, false),
            VmmExit::Crashed(ExitStatus::Exited(1))
        );
        let sigsys = ExitStatus::Signaled {
            signal: libc::SIGSYS,
            core_dumped: false,
        };
        assert_eq!(
            classify_exit(sigsys, false, false),
            VmmExit::Crashed(sigsys)
        );
        assert_eq!(
            classify_exit(ExitStatus::Unknown, true, false),
            VmmExit::GuestPoweroff
        );
        assert_eq!(
            classify_exit(ExitStatus::Unknown, false, false),
            VmmExit::Crashed(ExitStatus::Unknown)
        );
        let term = ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false,
        };
        assert_eq!(classify_exit(term, false, true), VmmExit::Requested);
    }
}
