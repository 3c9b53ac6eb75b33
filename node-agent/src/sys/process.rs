//! Kernel calls for `vmm`: starting a VMM inside a capsule's namespaces and
//! cgroup without copying the agent's address space, watching it through a
//! pidfd. Passing file descriptors over Unix sockets is `sys::fd_passing`.
//!
//! Policy (which namespace, which cgroup, which arguments) belongs to
//! `vmm::process`; this file only performs the steps it is handed.
//!
//! It is longer than our other files on purpose: the parent's preparation
//! and the child's raw-syscall path share one invariant (the child never
//! allocates nor locks), which is easiest to check when both read together.
//!
//! # The spawn path
//!
//! `fork()` of the agent copies its page tables; with a large resident set
//! that costs tens of milliseconds per VMM. Instead [`spawn`] uses
//! `clone(CLONE_VM | CLONE_VFORK)`, the way glibc's `posix_spawn` does: the
//! child runs on a small private stack inside the agent's memory while the
//! calling thread is suspended, performs a fixed list of raw syscalls
//! (`setsid`, `setns`, `unshare`, mounts, cgroup joins, `dup2`) and
//! `execve`s. Everything it needs is prepared by the parent beforehand, so
//! the child never allocates, never takes a lock and never touches Rust
//! runtime state. A failing step is reported back through memory shared
//! with the parent, which is safe to read once `clone` returns because
//! `CLONE_VFORK` resumes the parent only after the child has exec'd or
//! exited.
//!
//! Why this file is long: the spawn sequence (namespaces, cgroup, descriptors,
//! exec) reads top to bottom in one place, each `unsafe` step with its SAFETY
//! note; its tests are the last tenth.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// What [`spawn`] does in the child, in this order, before `execve`.
#[derive(Debug)]
pub struct SpawnPlan<'a> {
    /// Absolute path of the program.
    pub program: &'a std::path::Path,
    /// `argv[1..]`; `argv[0]` is the program path.
    pub args: &'a [&'a OsStr],
    /// The complete environment of the child.
    pub env: &'a [(&'a OsStr, &'a OsStr)],
    /// Start a new session (`setsid`), so that the child does not share
    /// the agent's process group or terminal and outlives it.
    pub new_session: bool,
    /// Enter this network namespace (an open `/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`).
    pub netns: Option<BorrowedFd<'a>>,
    /// Unshare the mount namespace, make `/` private and mount a fresh
    /// sysfs on `/sys`, so that `/sys/class/net` shows the entered network
    /// namespace (what `ip netns exec` does).
    pub new_mount_ns_with_sysfs: bool,
    /// Open `cgroup.procs` files (write-only); the child writes `0` to each,
    /// which moves the writer itself, before `execve`.
    pub cgroup_procs: &'a [BorrowedFd<'a>],
    /// Descriptors for fd 0, 1 and 2; `None` means `/dev/null`.
    pub stdio: [Option<BorrowedFd<'a>>; 3],
    /// Descriptors the program inherits under their current numbers (all
    /// must be > 2); everything else stays close-on-exec.
    pub inherit: &'a [BorrowedFd<'a>],
    /// Least privilege for the program; `None` leaves it as privileged as
    /// the agent (tests of the plain spawn path only).
    pub confine: Option<&'a Confinement<'a>>,
}

/// What a confined child may see and do. Applied after the namespace and
/// cgroup steps (which need the agent's privileges) and before `execve`.
///
/// The view: every `hide` directory is covered by an empty read-only tmpfs,
/// then every `show` path under one of them is bind-mounted back at its
/// own path (the source is opened before `clone`, so it stays reachable
/// once covered). A shown path outside every hidden directory is visible
/// anyway and needs no mount.
#[derive(Debug, Default)]
pub struct Confinement<'a> {
    /// Start the child as init of a new PID namespace with a fresh `/proc`
    /// (needs a new mount namespace): it sees no other process, so no
    /// `/proc/<pid>/root` or `/proc/<pid>/mem` of another VMM.
    pub new_pid_ns: bool,
    /// Directories covered by an empty tmpfs in the child's mount namespace
    /// (needs a new mount namespace).
    pub hide: &'a [&'a std::path::Path],
    /// Paths bound back over the hidden directories.
    pub show: &'a [Shown<'a>],
    /// Capabilities (numbers, `CAP_*`) left in the bounding and inheritable
    /// sets; every other one is dropped, so a root VMM execs with
    /// effective = permitted = `keep_caps`. Ambient capabilities are
    /// cleared and `no_new_privs` is set, so no setuid or file-capability
    /// binary gives any back.
    pub keep_caps: &'a [u32],
}

/// One path of [`Confinement::show`].
#[derive(Clone, Copy, Debug)]
pub struct Shown<'a> {
    /// Absolute path, the same outside and inside.
    pub path: &'a std::path::Path,
    /// Writable (e.g. the capsule's own directory, device nodes) or read-only.
    pub writable: bool,
}

/// Declares [`SpawnStep`] and its decoding from one list, so a step added
/// to the child is never reported as an unknown number.
macro_rules! spawn_steps {
    ($($(#[$doc:meta])* $name:ident $(= $value:literal)?,)*) => {
        /// The child step that failed.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(i32)]
        pub enum SpawnStep {
            $($(#[$doc])* $name $(= $value)?,)*
        }

        impl SpawnStep {
            fn from_raw(v: i32) -> Option<Self> {
                [$(SpawnStep::$name),*].into_iter().find(|s| *s as i32 == v)
            }
        }
    };
}

spawn_steps! {
    /// Resetting signal dispositions.
    Signals = 1,
    /// `setsid`.
    Setsid,
    /// `setns(CLONE_NEWNET)`.
    EnterNetns,
    /// `unshare(CLONE_NEWNS)`.
    UnshareMountNs,
    /// `mount --make-rprivate /`.
    MakeRootPrivate,
    /// Mounting sysfs on `/sys`.
    MountSysfs,
    /// Writing to a `cgroup.procs`.
    JoinCgroup,
    /// Covering a hidden directory with a tmpfs.
    HidePath,
    /// Creating a mount point for, or bind-mounting, a shown path.
    ShowPath,
    /// Mounting a fresh `/proc` for the new PID namespace.
    MountProc,
    /// Dropping capabilities or setting `no_new_privs`.
    DropPrivileges,
    /// `dup2` onto fd 0-2.
    Stdio,
    /// Clearing close-on-exec on an inherited fd.
    Inherit,
    /// `execve`.
    Exec,
}

/// A spawn that failed, in the parent (`step == None`) or in the child.
#[derive(Debug)]
pub struct SpawnError {
    /// The child step that failed, `None` for preparation in the parent.
    pub step: Option<SpawnStep>,
    /// The OS error.
    pub source: io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(step) => write!(f, "child step {step:?} failed"),
            None => f.write_str("preparing the child failed"),
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn parent_err(source: io::Error) -> SpawnError {
    SpawnError { step: None, source }
}

/// Everything the child reads, as raw pointers and numbers only.
#[repr(C)]
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    new_session: bool,
    netns: RawFd,
    new_mount_ns: bool,
    mount_sysfs: bool,
    cgroup_procs: *const RawFd,
    n_cgroup_procs: usize,
    stdio: [RawFd; 3],
    inherit: *const RawFd,
    n_inherit: usize,
    hide: *const *const libc::c_char,
    n_hide: usize,
    mkdirs: *const *const libc::c_char,
    n_mkdirs: usize,
    touch: *const *const libc::c_char,
    n_touch: usize,
    binds: *mut ChildBind,
    n_binds: usize,
    mount_proc: bool,
    drop_privileges: bool,
    /// Bit `n` set: keep capability `n`.
    keep_caps: u64,
    // Written by the child on failure, read by the parent after `clone`.
    failed_step: i32,
    failed_errno: i32,
}

/// One bind mount of a shown path, prepared by the parent.
#[repr(C)]
struct ChildBind {
    /// The path, bound at the same place once its surroundings are hidden.
    path: *const libc::c_char,
    read_only: bool,
    /// The detached copy (`open_tree`), made by the child before hiding.
    tree: RawFd,
}

/// `open_tree(2)`: a detached copy of the mount at a path.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount(2)`: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

const ROOT: &CStr = c"/";
const PROC: &CStr = c"/proc";
const PROCFS: &CStr = c"proc";
const TMPFS: &CStr = c"tmpfs";
/// Only mount points live on a hiding tmpfs; it is read-only once they do.
const HIDE_OPTS: &CStr = c"mode=0755,size=64k,nr_inodes=4096";
/// Highest capability number the loop below tries to drop (the kernel
/// answers EINVAL past its own last one).
const MAX_CAP: u32 = 63;
const SYS: &CStr = c"/sys";
const SYSFS: &CStr = c"sysfs";

/// Signals are numbered 1..NSIG on Linux.
const NSIG: libc::c_int = 65;

/// Records the failed step and errno for the parent and exits.
///
/// # Safety
/// Only from `child_main`, with its `plan`.
unsafe fn child_fail(plan: *mut ChildPlan, step: SpawnStep) -> ! {
    // SAFETY: see `child_main`; `plan` is valid until the child exits.
    unsafe {
        (*plan).failed_errno = *libc::__errno_location();
        (*plan).failed_step = step as i32;
        libc::_exit(127)
    }
}

/// The child side. Runs in the parent's address space on its own stack
/// while the parent thread is suspended: raw syscalls only. The steps run
/// in this order; each comment at a call says why it sits where it does.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    let plan = arg.cast::<ChildPlan>();
    // SAFETY: `arg` points at the `ChildPlan` that `spawn` keeps alive until
    // `clone` returns, which is after this function has exec'd or exited.
    // Every pointer in it refers to memory `spawn` owns for that long. Only
    // async-signal-safe libc calls are made by the steps below, each of
    // which is called from here alone.
    unsafe {
        // 1. The agent's handlers must not run in the child.
        reset_signal_handlers();
        // 2. Session, network and mount namespaces; sysfs inside them.
        enter_namespaces(plan);
        // 3. Resource limits, before anything the limits should count.
        join_cgroups(plan);
        // 4. The view of the file system; needs CAP_SYS_ADMIN.
        build_view(plan);
        // 5. Last privileged step: everything above needed CAP_SYS_ADMIN.
        if (*plan).drop_privileges && drop_privileges((*plan).keep_caps).is_err() {
            child_fail(plan, SpawnStep::DropPrivileges);
        }
        // 6. Descriptors the program gets, and none other.
        set_descriptors(plan);
        // 7. Signals unblocked only now: no handler of the agent's is left.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve((*plan).program, (*plan).argv, (*plan).envp);
        child_fail(plan, SpawnStep::Exec)
    }
}

/// Handlers installed by the agent must not run in the child: they would
/// run on the agent's memory. Signals are blocked (by the parent) until
/// the mask is cleared just before exec.
///
/// # Safety
/// Only from `child_main`.
unsafe fn reset_signal_handlers() {
    for sig in 1..NSIG {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed `sigaction` with `SIG_DFL` is a valid argument.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_DFL;
            // EINVAL for the few signals glibc reserves: harmless.
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// A new session, the capsule's network namespace, a private mount
/// namespace and a sysfs of that network namespace, as `plan` asks.
///
/// # Safety
/// Only from `child_main`, with its `plan`.
unsafe fn enter_namespaces(plan: *mut ChildPlan) {
    // SAFETY: see `child_main`.
    unsafe {
        if (*plan).new_session && libc::setsid() < 0 {
            child_fail(plan, SpawnStep::Setsid);
        }
        // The network namespace first: sysfs shows the namespace of whoever
        // mounts it, so the mount below must happen inside it.
        if (*plan).netns >= 0 && libc::setns((*plan).netns, libc::CLONE_NEWNET) < 0 {
            child_fail(plan, SpawnStep::EnterNetns);
        }
        if (*plan).new_mount_ns {
            if libc::unshare(libc::CLONE_NEWNS) < 0 {
                child_fail(plan, SpawnStep::UnshareMountNs);
            }
            // Private propagation, so the sysfs mount stays in this namespace.
            if libc::mount(
                std::ptr::null(),
                ROOT.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) < 0
            {
                child_fail(plan, SpawnStep::MakeRootPrivate);
            }
        }
        if (*plan).mount_sysfs {
            mount_fresh(plan, SYSFS, SYS, SpawnStep::MountSysfs);
        }
    }
}

/// Mounts a fresh `fs` at `target` in place of the host's (and its
/// submounts), detached from this view first; it may not be mounted at
/// all, hence no check on the unmount.
///
/// # Safety
/// Only from the child, with its `plan`.
unsafe fn mount_fresh(plan: *mut ChildPlan, fs: &CStr, target: &CStr, step: SpawnStep) {
    // SAFETY: see `child_main`; `fs` and `target` are NUL-terminated
    // constants.
    unsafe {
        libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        if libc::mount(
            fs.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) < 0
        {
            child_fail(plan, step);
        }
    }
}

/// Moves the child into each cgroup whose `cgroup.procs` the parent opened.
///
/// # Safety
/// Only from `child_main`, with its `plan`.
unsafe fn join_cgroups(plan: *mut ChildPlan) {
    // SAFETY: see `child_main`.
    unsafe {
        for i in 0..(*plan).n_cgroup_procs {
            let fd = *(*plan).cgroup_procs.add(i);
            // "0" means the writing process, in cgroup v1 and v2 alike.
            if libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                child_fail(plan, SpawnStep::JoinCgroup);
            }
        }
    }
}

/// The view: hide, make mount points on the hiding tmpfs, bind the shown
/// paths back, then freeze the tmpfs read-only; last a fresh procfs. Needs
/// the new mount namespace (asked for by the parent whenever hiding).
///
/// # Safety
/// Only from `child_main`, with its `plan`.
unsafe fn build_view(plan: *mut ChildPlan) {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: see `child_main`.
    unsafe {
        // Copies of the shown paths first, while they are still visible:
        // a bind needs its source in this mount namespace, so descriptors
        // opened by the parent (in the agent's namespace) would not do.
        for i in 0..(*plan).n_binds {
            let bind = &mut *(*plan).binds.add(i);
            let fd = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                bind.path,
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            );
            if fd < 0 {
                child_fail(plan, SpawnStep::ShowPath);
            }
            bind.tree = fd as RawFd;
        }
        for i in 0..(*plan).n_hide {
            let dir = *(*plan).hide.add(i);
            if libc::mount(
                TMPFS.as_ptr(),
                dir,
                TMPFS.as_ptr(),
                nosuid,
                HIDE_OPTS.as_ptr().cast(),
            ) < 0
            {
                child_fail(plan, SpawnStep::HidePath);
            }
        }
        make_mount_points(plan);
        bind_shown_paths(plan);
        for i in 0..(*plan).n_hide {
            let dir = *(*plan).hide.add(i);
            if libc::mount(
                std::ptr::null(),
                dir,
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
                std::ptr::null(),
            ) < 0
            {
                child_fail(plan, SpawnStep::HidePath);
            }
        }
        // The fresh procfs shows only the new PID namespace.
        if (*plan).mount_proc {
            mount_fresh(plan, PROCFS, PROC, SpawnStep::MountProc);
        }
    }
}

/// The directories and files the shown paths are bound onto, made on the
/// hiding tmpfs.
///
/// # Safety
/// Only from `build_view`, with its `plan`.
unsafe fn make_mount_points(plan: *mut ChildPlan) {
    // SAFETY: see `child_main`.
    unsafe {
        for i in 0..(*plan).n_mkdirs {
            let dir = *(*plan).mkdirs.add(i);
            if libc::mkdir(dir, 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                child_fail(plan, SpawnStep::ShowPath);
            }
        }
        for i in 0..(*plan).n_touch {
            let file = *(*plan).touch.add(i);
            let fd = libc::open(
                file,
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                child_fail(plan, SpawnStep::ShowPath);
            }
            libc::close(fd);
        }
    }
}

/// Moves each copy made before hiding back onto its path.
///
/// # Safety
/// Only from `build_view`, after the copies were made, with its `plan`.
unsafe fn bind_shown_paths(plan: *mut ChildPlan) {
    // SAFETY: see `child_main`.
    unsafe {
        for i in 0..(*plan).n_binds {
            let bind = &*(*plan).binds.add(i);
            if libc::syscall(
                libc::SYS_move_mount,
                bind.tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                bind.path,
                MOVE_MOUNT_F_EMPTY_PATH,
            ) < 0
            {
                child_fail(plan, SpawnStep::ShowPath);
            }
            libc::close(bind.tree);
            // A bind keeps its source's flags; read-only needs a remount of
            // this mount alone.
            if bind.read_only
                && libc::mount(
                    std::ptr::null(),
                    bind.path,
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                ) < 0
            {
                child_fail(plan, SpawnStep::ShowPath);
            }
        }
    }
}

/// Stdio from the plan, and the inherited descriptors open across exec;
/// every other descriptor closes on exec.
///
/// # Safety
/// Only from `child_main`, with its `plan`.
unsafe fn set_descriptors(plan: *mut ChildPlan) {
    // SAFETY: see `child_main`.
    unsafe {
        for (target, src) in (*plan).stdio.iter().enumerate() {
            // The parent moved every source above 2, so no dup2 here
            // clobbers a later source.
            if libc::dup2(*src, target as RawFd) < 0 {
                child_fail(plan, SpawnStep::Stdio);
            }
        }
        // Any descriptor the agent (or a library in it) opened without
        // O_CLOEXEC must not leak into the VMM: mark everything above
        // stdio close-on-exec (Linux 5.11+; older kernels keep the
        // per-fd flags), then clear it again on the inherited ones.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        for i in 0..(*plan).n_inherit {
            let fd = *(*plan).inherit.add(i);
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                child_fail(plan, SpawnStep::Inherit);
            }
        }
    }
}

/// Leaves only `keep` (bit per capability) in the inheritable and bounding
/// sets, clears the ambient set and sets `no_new_privs`. As root, `execve`
/// then grants exactly the bounding set, so permitted and effective become
/// `keep`; without clearing the inheritable set an agent started with a
/// full one (older container runtimes) would pass everything on.
///
/// # Safety
/// Raw syscalls only, for the vfork child.
unsafe fn drop_privileges(keep: u64) -> Result<(), ()> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_V3: u32 = 0x2008_0522;
    // SAFETY: plain syscalls on stack memory that outlives them.
    unsafe {
        let mut header = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        let mut data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) < 0 {
            return Err(());
        }
        data[0].inheritable &= keep as u32;
        data[1].inheritable &= (keep >> 32) as u32;
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) < 0 {
            return Err(());
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) < 0
        {
            return Err(());
        }
        for cap in 0..=MAX_CAP {
            if keep & (1 << cap) != 0 {
                continue;
            }
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(());
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(());
        }
    }
    Ok(())
}

/// The parent's preparation of a [`Confinement`]: C strings for every
/// path, and the mount points each shown path needs (a directory or a file,
/// as it is now).
#[derive(Default)]
struct View {
    hide: Vec<CString>,
    /// Parents of mount points, outermost first.
    mkdirs: Vec<CString>,
    /// Mount points of shown files.
    touch: Vec<CString>,
    binds: Vec<PreparedBind>,
}

struct PreparedBind {
    path: CString,
    read_only: bool,
}

impl View {
    fn build(c: &Confinement<'_>) -> Result<Self, SpawnError> {
        use std::path::Path;
        let invalid = |what: String| parent_err(io::Error::new(io::ErrorKind::InvalidInput, what));
        let mut view = View::default();
        for dir in c.hide {
            if !dir.is_absolute() || dir.parent().is_none() {
                return Err(invalid(format!("cannot hide {}", dir.display())));
            }
            view.hide.push(cstring(dir.as_os_str())?);
        }
        let mut made: Vec<&Path> = Vec::new();
        let mut bound: Vec<&Path> = Vec::new();
        for shown in c.show {
            let path = shown.path;
            if bound.contains(&path) {
                continue; // listed twice (e.g. the run dir by two parties)
            }
            if c.hide.contains(&path) {
                return Err(invalid(format!(
                    "{} is both hidden and shown",
                    path.display()
                )));
            }
            let Some(root) = c
                .hide
                .iter()
                .filter(|h| path.starts_with(h) && path != **h)
                .max_by_key(|h| h.as_os_str().len())
            else {
                continue; // visible anyway
            };
            if c.show
                .iter()
                .any(|o| path.starts_with(o.path) && path != o.path)
            {
                continue; // visible through the enclosing shown directory
            }
            if path.components().any(|p| {
                matches!(
                    p,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            }) {
                return Err(invalid(format!("cannot show {}", path.display())));
            }
            // Follows symlinks (`/dev/mapper/x` -> `/dev/dm-3`), as the
            // child's `open_tree` does: the target is bound at the path the
            // VMM is told.
            let fd = nix::fcntl::open(
                path,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| {
                parent_err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("open {}: {e}", path.display()),
                ))
            })?;
            let is_dir = nix::sys::stat::fstat(&fd)
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .map_err(|e| parent_err(e.into()))?;
            let mut parents: Vec<&Path> = path
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(root) && a != root)
                .collect();
            parents.reverse();
            for dir in parents {
                if !made.contains(&dir) {
                    made.push(dir);
                    view.mkdirs.push(cstring(dir.as_os_str())?);
                }
            }
            if is_dir {
                if !made.contains(&path) {
                    made.push(path);
                    view.mkdirs.push(cstring(path.as_os_str())?);
                }
            } else {
                view.touch.push(cstring(path.as_os_str())?);
            }
            bound.push(path);
            view.binds.push(PreparedBind {
                path: cstring(path.as_os_str())?,
                read_only: !shown.writable,
            });
        }
        Ok(view)
    }
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| {
        parent_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        ))
    })
}

/// Duplicates `fd` to a number above 2 (close-on-exec), so that the child's
/// `dup2` onto 0-2 cannot overwrite another source.
fn dup_above_stdio(fd: BorrowedFd<'_>) -> Result<OwnedFd, SpawnError> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map(|raw| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that only we
            // hold.
            unsafe { OwnedFd::from_raw_fd(raw) }
        })
        .map_err(|e| parent_err(e.into()))
}

/// Size of the child's stack. The child makes a few dozen syscalls through
/// libc wrappers and nothing else.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The program, argument and environment strings of an `execve`, with the
/// NULL-terminated pointer arrays into them. Moving this value moves no
/// string, so the pointers stay valid for as long as it lives.
struct ExecStrings {
    program: CString,
    _args: Vec<CString>,
    _env: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecStrings {
    fn build(plan: &SpawnPlan<'_>) -> Result<Self, SpawnError> {
        let program = cstring(plan.program.as_os_str())?;
        let mut args = vec![program.clone()];
        for a in plan.args {
            args.push(cstring(a)?);
        }
        let mut env = Vec::with_capacity(plan.env.len());
        for (k, v) in plan.env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(cstring(OsStr::from_bytes(&kv))?);
        }
        let nul_terminated = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Ok(Self {
            argv: nul_terminated(&args),
            envp: nul_terminated(&env),
            program,
            _args: args,
            _env: env,
        })
    }
}

/// The child's fd 0-2, each duplicated above stdio (see
/// [`dup_above_stdio`]); `/dev/null` where the plan names none.
fn child_stdio(plan: &SpawnPlan<'_>) -> Result<[OwnedFd; 3], SpawnError> {
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(parent_err)?;
    let dup = |src: Option<BorrowedFd<'_>>| {
        dup_above_stdio(src.unwrap_or_else(|| std::os::fd::AsFd::as_fd(&dev_null)))
    };
    Ok([
        dup(plan.stdio[0])?,
        dup(plan.stdio[1])?,
        dup(plan.stdio[2])?,
    ])
}

/// Starts `plan.program` as described by `plan` and returns its pid once it
/// has exec'd. The child is ours: reap it with [`Pidfd::try_wait`] (or
/// `waitpid`) once it exits.
pub fn spawn(plan: &SpawnPlan<'_>) -> Result<i32, SpawnError> {
    if let Some(fd) = plan.inherit.iter().find(|fd| fd.as_raw_fd() <= 2) {
        return Err(parent_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inherited fd {} would collide with stdio", fd.as_raw_fd()),
        )));
    }
    // Everything the child touches is built here, before `clone`, and
    // lives until `clone_child` has returned.
    let exec = ExecStrings::build(plan)?;
    let stdio_owned = child_stdio(plan)?;
    let stdio = [
        stdio_owned[0].as_raw_fd(),
        stdio_owned[1].as_raw_fd(),
        stdio_owned[2].as_raw_fd(),
    ];
    let cgroup_procs: Vec<RawFd> = plan.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
    let inherit: Vec<RawFd> = plan.inherit.iter().map(AsRawFd::as_raw_fd).collect();
    let view = match plan.confine {
        Some(c) => View::build(c)?,
        None => View::default(),
    };
    let ptrs =
        |v: &[CString]| -> Vec<*const libc::c_char> { v.iter().map(|c| c.as_ptr()).collect() };
    let hide = ptrs(&view.hide);
    let mkdirs = ptrs(&view.mkdirs);
    let touch = ptrs(&view.touch);
    let mut binds: Vec<ChildBind> = view
        .binds
        .iter()
        .map(|b| ChildBind {
            path: b.path.as_ptr(),
            read_only: b.read_only,
            tree: -1,
        })
        .collect();
    let new_pid_ns = plan.confine.is_some_and(|c| c.new_pid_ns);
    let keep_caps = plan.confine.map_or(0, |c| {
        c.keep_caps
            .iter()
            .filter(|&&n| n <= MAX_CAP)
            .fold(0u64, |m, &n| m | (1 << n))
    });

    let mut child = ChildPlan {
        program: exec.program.as_ptr(),
        argv: exec.argv.as_ptr(),
        envp: exec.envp.as_ptr(),
        new_session: plan.new_session,
        netns: plan.netns.map_or(-1, |fd| fd.as_raw_fd()),
        new_mount_ns: plan.new_mount_ns_with_sysfs || !hide.is_empty() || new_pid_ns,
        mount_sysfs: plan.new_mount_ns_with_sysfs,
        cgroup_procs: cgroup_procs.as_ptr(),
        n_cgroup_procs: cgroup_procs.len(),
        stdio,
        inherit: inherit.as_ptr(),
        n_inherit: inherit.len(),
        hide: hide.as_ptr(),
        n_hide: hide.len(),
        mkdirs: mkdirs.as_ptr(),
        n_mkdirs: mkdirs.len(),
        touch: touch.as_ptr(),
        n_touch: touch.len(),
        binds: binds.as_mut_ptr(),
        n_binds: binds.len(),
        mount_proc: new_pid_ns,
        drop_privileges: plan.confine.is_some(),
        keep_caps,
        failed_step: 0,
        failed_errno: 0,
    };
    let res = clone_child(&mut child, new_pid_ns);
    // The paths stay allocated until the child has mounted them.
    drop(view);
    drop(binds);
    res
}

/// Runs [`child_main`] on `child` in a `CLONE_VM | CLONE_VFORK` child and
/// returns its pid once it has exec'd, or the step that failed in it.
/// Every buffer `child` points into must outlive this call.
fn clone_child(child: &mut ChildPlan, new_pid_ns: bool) -> Result<i32, SpawnError> {
    // u128 elements keep the stack 16-byte aligned, as the ABI requires.
    let mut stack = vec![0u128; CHILD_STACK_BYTES / 16];

    // Block every signal across clone: a handler must not run in the child
    // on the agent's memory before the child has reset it.
    let mut all: libc::sigset_t;
    let mut old: libc::sigset_t;
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask initialise
    // and read only the sets we pass.
    unsafe {
        all = std::mem::zeroed();
        old = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the stack pointer is one past the end of `stack`, which lives
    // until after `clone` returns; with CLONE_VFORK this thread is suspended
    // until the child has exec'd or exited, so the child's use of `child`,
    // `stack` and every buffer `child` points into (kept alive by the
    // caller) cannot race with us or outlive them. `child_main` follows the
    // rules of a vfork child (see its comment).
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()).cast::<libc::c_void>();
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM
                | libc::CLONE_VFORK
                | libc::SIGCHLD
                | if new_pid_ns { libc::CLONE_NEWPID } else { 0 },
            std::ptr::from_mut(child).cast::<libc::c_void>(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(parent_err(clone_err));
    }
    // SAFETY: the child wrote these fields (if at all) before exiting, and
    // CLONE_VFORK orders that before our resumption. Volatile, because the
    // compiler cannot see the write.
    let (step, errno) = unsafe {
        (
            std::ptr::read_volatile(&raw const child.failed_step),
            std::ptr::read_volatile(&raw const child.failed_errno),
        )
    };
    drop(stack);
    if step != 0 {
        // The child has exited with 127; reap it so no zombie is left.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(SpawnError {
            step: SpawnStep::from_raw(step),
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(pid)
}

/// How a process ended, as `waitpid` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
    /// Not our child (adopted after an agent restart): it is gone, but the
    /// kernel reports its status only to its parent.
    Unknown,
}

/// A process descriptor (`pidfd_open`): signals and waits that cannot hit a
/// recycled pid.
#[derive(Debug)]
pub struct Pidfd {
    pid: i32,
    fd: OwnedFd,
}

impl Pidfd {
    /// Opens a pidfd for `pid`. For a child not yet reaped, the pid cannot
    /// have been reused. For an adopted process, check its identity (e.g.
    /// start time) *after* this call: from then on the pidfd pins it.
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(raw).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the syscall returned a new descriptor that only we hold.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { pid, fd })
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The descriptor; it becomes readable when the process exits.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Sends `signal` to the process (`pidfd_send_signal`).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: the fd is a valid pidfd; a null siginfo is allowed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Resolves once the process has exited (the pidfd polls readable).
    /// Call [`Pidfd::try_wait`] afterwards for the status.
    pub async fn exited(&self) -> io::Result<()> {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;
        // A private duplicate: several waiters may watch one process, and
        // epoll refuses the same fd twice.
        let fd = self.fd.try_clone()?;
        // SAFETY: the `AsyncFd` owns `fd`, so it stays open and refers to
        // the same pidfd for as long as it is registered.
        let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let _ready = afd.readable().await?;
        Ok(())
    }

    /// `Some(status)` once the process has exited (reaping it if it is our
    /// child), `None` while it runs.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        match waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::Exited(code))),
            Ok(WaitStatus::Signaled(_, sig, core_dumped)) => Ok(Some(ExitStatus::Signaled {
                signal: sig as i32,
                core_dumped,
            })),
            Ok(_) => Ok(None),
            Err(nix::errno::Errno::ECHILD) => {
                // Not our child: the pidfd tells whether it is gone.
                let mut pfd = [nix::poll::PollFd::new(
                    self.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO)
                    .map_err(io::Error::from)?;
                Ok((n > 0).then_some(ExitStatus::Unknown))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Process start time in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), read from `proc_root` (normally `/proc`). Together
/// with the pid it identifies a process across pid reuse.
pub fn start_time_ticks(proc_root: &std::path::Path, pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after it start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// `program` with `args` and nothing else: no namespaces, cgroups,
    /// stdio or inherited descriptors.
    fn bare<'a>(program: &'a str, args: &'a [&'a OsStr]) -> SpawnPlan<'a> {
        SpawnPlan {
            program: std::path::Path::new(program),
            args,
            env: &[],
            new_session: false,
            netns: None,
            new_mount_ns_with_sysfs: false,
            cgroup_procs: &[],
            stdio: [None, None, None],
            inherit: &[],
            confine: None,
        }
    }

    /// Waits (5 s at most) for child `pid` to exit, through its pidfd.
    fn wait_exit(pid: i32) -> ExitStatus {
        let pidfd = Pidfd::open(pid).unwrap();
        wrenn_testkit::wait_until(std::time::Duration::from_secs(5), "exit", || {
            pidfd
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or("running".to_string())
        })
        .unwrap()
    }

    #[test]
    fn spawn_reports_exec_failure_with_its_step() {
        let err = spawn(&bare("/nonexistent/wrenn-no-such-program", &[])).unwrap_err();
        assert_eq!(err.step, Some(SpawnStep::Exec));
        assert_eq!(err.source.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn spawned_child_exit_code_is_seen_through_the_pidfd() {
        let args = [OsStr::new("-c"), OsStr::new("exit 7")];
        let pid = spawn(&SpawnPlan {
            new_session: true,
            ..bare("/bin/sh", &args)
        })
        .unwrap();
        assert_eq!(wait_exit(pid), ExitStatus::Exited(7));
    }

    #[test]
    fn only_listed_fds_are_inherited() {
        let dir = tempfile::tempdir().unwrap();
        // A descriptor without O_CLOEXEC, as a careless library might open.
        let leaky = nix::fcntl::open(
            &dir.path().join("leaky"),
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CREAT,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let kept = std::fs::File::create(dir.path().join("kept")).unwrap();
        let out = dir.path().join("fds");
        // The shell lists its own descriptors with their targets.
        let script = format!(
            "for f in /proc/$$/fd/*; do echo \"${{f##*/}} $(readlink $f)\"; done > {}",
            out.display()
        );
        let args = [OsStr::new("-c"), OsStr::new(&script)];
        let inherit = [kept.as_fd()];
        let pid = spawn(&SpawnPlan {
            inherit: &inherit,
            ..bare("/bin/sh", &args)
        })
        .unwrap();
        wait_exit(pid);
        let listing = std::fs::read_to_string(&out).unwrap();
        let expect = format!("{} {}", kept.as_raw_fd(), dir.path().join("kept").display());
        assert!(listing.lines().any(|l| l == expect), "{listing}");
        assert!(
            !listing.lines().any(|l| l.ends_with("/leaky")),
            "fd {} leaked: {listing}",
            leaky.as_raw_fd()
        );
    }

    #[test]
    fn start_time_parses_names_with_parentheses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("42")).unwrap();
        std::fs::write(
            dir.path().join("42/stat"),
            "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10\n",
        )
        .unwrap();
        assert_eq!(start_time_ticks(dir.path(), 42).unwrap(), 987654);
    }
}
