//! The QEMU backend of [`Machine`]: for nodes without usable hardware
//! virtualization (development clusters, CI), and KVM nodes that prefer it.
//!
//! One capsule is two supervised processes in the capsule's netns and
//! cgroup: `vhost-device-vsock` (the guest's vsock, exposed on the host with
//! the same `CONNECT <port>` handshake as Cloud Hypervisor) and
//! `qemu-system-x86_64` (q35, virtio-pci like CH; KVM when [`probe_accel`]
//! finds it really works, TCG otherwise). Lifecycle steps go over QMP
//! ([`qmp`]).
//!
//! Snapshots are migrations to a file, streamed through a socket the agent
//! serves ([`stream`]). QEMU 7.2 refuses to migrate a
//! vhost-user-vsock device, so the device sits on its own PCIe root port
//! and is hot-unplugged for the migration and plugged again afterwards (on
//! the source after a snapshot, on the destination before it resumes). The
//! guest sees its vsock transport reset, as on Cloud Hypervisor after a
//! restore; its listening socket survives, so the node agent redials.
//!
//! Networks (the TAP, opened here by name inside the netns) and disks come
//! from `network` and `storage`.

mod diagnose;
pub mod qmp;
mod stream;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use qmp::{Qmp, QmpError};

use super::Error;
use super::cgroup::{CgroupLimits, CgroupRoot};
use super::machine::{
    BackendInfo, BackendKind, DiskFormat, Machine, MachineHandle, MachineSpec, MachineState,
    NetCounters,
};
use super::process::{self, HostPaths, ProcessIdentity, SpawnRequest, VmmExit, VmmProcess};
use super::view;

/// QMP socket in the run dir.
const QMP_SOCKET: &str = "qmp.sock";
/// How the vsock helper is stopped: it keeps no state, and as init of its
/// own PID namespace it would ignore SIGTERM (it has no handler).
const HELPER_STOP: i32 = libc::SIGKILL;

/// vhost-user control socket between QEMU and the vsock helper.
const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// Guest serial console.
const CONSOLE_LOG: &str = super::logs::QEMU_CONSOLE_LOG;
/// Guest memory and device state in a snapshot directory.
const MEMORY_FILE: &str = "memory.qemu";
/// What the snapshot was taken with, checked on restore.
const MACHINE_FILE: &str = "machine.json";
/// The vsock helper running now: a respawn replaces the one the supervisor
/// journaled with the handle, so adoption reads this first.
const HELPER_FILE: &str = "helper.json";
/// How long a vsock helper gets to re-create its socket after an unplug.
const HELPER_RELISTEN: Duration = Duration::from_secs(2);
/// How long the vsock may take to answer a handshake after resume.
const VSOCK_PROBE: Duration = Duration::from_secs(2);
/// Pause between two looks at the vsock device while the guest sets it up.
const VSOCK_POLL: Duration = Duration::from_millis(50);
/// The root port the vsock device is hot-plugged on.
const VSOCK_PORT_ID: &str = "vsock-port";

/// Bounds on QEMU steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Process start until QMP (or the helper's socket) answers.
    pub start: Duration,
    /// One QMP command.
    pub command: Duration,
    /// vsock hot-unplug (the guest must acknowledge it).
    pub unplug: Duration,
    /// Migration to or from a file, per GiB of guest RAM.
    pub migrate_per_gib: Duration,
    /// SIGTERM to SIGKILL.
    pub stop_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(10),
            command: Duration::from_secs(5),
            unplug: Duration::from_secs(20),
            migrate_per_gib: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
        }
    }
}

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

async fn probe_kvm_start(qemu: &Path) -> Result<(), String> {
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let result = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("qemu exited with {status}"));
        }
        if let Ok(mut q) = Qmp::connect(&sock, Duration::from_secs(2)).await {
            break match q.execute(&qmp::QueryKvm).await {
                Ok(k) if k.enabled => Ok(()),
                Ok(_) => Err("query-kvm reports KVM disabled".into()),
                Err(e) => Err(e.to_string()),
            };
        }
        if tokio::time::Instant::now() > deadline {
            break Err("no QMP answer within 10s".into());
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

/// The files of one capsule's QEMU in its run dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// QMP socket.
    pub qmp: PathBuf,
    /// vhost-user control socket.
    pub vhost: PathBuf,
    /// Serial console log.
    pub console: PathBuf,
}

impl Layout {
    /// The layout under `spec.run_dir`.
    pub fn build(spec: &MachineSpec) -> Self {
        Self {
            qmp: spec.run_dir.join(QMP_SOCKET),
            vhost: spec.run_dir.join(VHOST_SOCKET),
            console: spec.run_dir.join(CONSOLE_LOG),
        }
    }
}

/// QEMU's own seccomp filter: besides its default deny list, no obsolete
/// syscalls, no setuid/setgid/capability changes, no fork or exec (the
/// migration stream goes through a socket, see [`stream`]), no scheduler or
/// resource-limit changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's command line for `spec`. With `incoming` the VM waits for
/// `migrate-incoming` and has no vsock device yet (it is plugged after
/// the state is loaded; see the module doc).
pub fn build_qemu_args(
    spec: &MachineSpec,
    accel: &Accel,
    layout: &Layout,
    incoming: bool,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    let mem_mib = spec.memory_bytes.div_ceil(1 << 20).max(64);
    let (accel_arg, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        // A bounded translation cache: QEMU's default (1 GiB) would not
        // fit the cgroup's VMM overhead.
        Accel::Tcg { .. } => ("tcg,tb-size=64", "max"),
    };
    push(&[
        "-machine",
        "q35,memory-backend=mem0",
        "-accel",
        accel_arg,
        "-cpu",
        cpu,
    ]);
    push(&[
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        &spec.vcpus.max(1).to_string(),
    ]);
    // vhost-user needs guest RAM in shared memory the helper can map.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem0,size={mem_mib}M,share=on"),
    ]);
    push(&[
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-no-reboot",
    ]);
    push(&["-sandbox", SANDBOX]);
    push(&["-serial", &format!("file:{}", layout.console.display())]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", layout.qmp.display()),
    ]);
    push(&["-kernel", &spec.kernel.display().to_string()]);
    if let Some(initrd) = &spec.initramfs {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    push(&["-append", &spec.cmdline]);
    let format = match spec.root_disk_format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    push(&[
        "-drive",
        &format!(
            "file={},format={format},if=none,id=root,discard=unmap",
            escape_opt(&spec.root_disk.display().to_string())
        ),
        "-device",
        "virtio-blk-pci,drive=root",
    ]);
    if let Some(tap) = &spec.tap {
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", tap.name),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", tap.mac),
        ]);
    }
    push(&[
        "-device",
        &format!("pcie-root-port,id={VSOCK_PORT_ID},bus=pcie.0,chassis=1"),
    ]);
    if incoming {
        push(&["-incoming", "defer", "-S"]);
    } else {
        push(&[
            "-chardev",
            &format!(
                "socket,id=vsock-chr0,path={}",
                escape_opt(&layout.vhost.display().to_string())
            ),
            "-device",
            &format!("vhost-user-vsock-pci,chardev=vsock-chr0,id=vsock0,bus={VSOCK_PORT_ID}"),
        ]);
    }
    a
}

/// QEMU option values escape a comma by doubling it.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// The helper's command line.
pub fn build_helper_args(spec: &MachineSpec, layout: &Layout) -> Vec<OsString> {
    helper_args(spec.vsock_cid, &spec.vsock_socket, &layout.vhost)
}

/// vhost-device-vsock serving guest `cid`: host connections on `uds`,
/// QEMU on `vhost`.
fn helper_args(cid: u32, uds: &Path, vhost: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        cid.to_string().into(),
        "--uds-path".into(),
        uds.as_os_str().to_owned(),
        "--socket".into(),
        vhost.as_os_str().to_owned(),
    ]
}

/// The machine's shape, written to the run dir at start (so it survives
/// an agent restart) and copied into each snapshot; restore refuses a
/// snapshot of another shape (QEMU needs identical devices).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Shape {
    format: u32,
    vcpus: u32,
    memory_bytes: u64,
    /// TAP name (the NIC's presence is part of the shape).
    tap: Option<String>,
}

impl Shape {
    /// Whether a snapshot of `self` can be restored as `wanted`. The TAP
    /// name is the host side only (another capsule restoring a snapshot
    /// has its own); the guest sees a NIC or none.
    fn restorable_as(&self, wanted: &Shape) -> bool {
        self.format == wanted.format
            && self.vcpus == wanted.vcpus
            && self.memory_bytes == wanted.memory_bytes
            && self.tap.is_some() == wanted.tap.is_some()
    }
}

fn shape_of(spec: &MachineSpec) -> Shape {
    Shape {
        format: 1,
        vcpus: spec.vcpus.max(1),
        memory_bytes: spec.memory_bytes,
        tap: spec.tap.as_ref().map(|t| t.name.clone()),
    }
}

fn read_shape(capsule: &str, path: &Path) -> Result<Shape, Error> {
    let text = std::fs::read(path).map_err(|source| Error::SnapshotFile {
        capsule: capsule.to_string(),
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| Error::Qemu {
        capsule: capsule.to_string(),
        what: "read machine shape",
        reason: format!("{} is unreadable: {e}", path.display()),
    })
}

fn write_shape(capsule: &str, path: &Path, shape: &Shape) -> Result<(), Error> {
    let body = serde_json::to_vec_pretty(shape).unwrap_or_default();
    std::fs::write(path, body).map_err(|source| Error::SnapshotFile {
        capsule: capsule.to_string(),
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// The run dir of a handle (where its QMP socket lives).
fn run_dir(vm: &MachineHandle) -> PathBuf {
    vm.control_socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Maps QEMU's run state onto [`MachineState`].
pub fn to_machine_state(status: &str) -> MachineState {
    match status {
        "running" => MachineState::Running,
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" => MachineState::Shutdown,
        // paused, postmigrate, prelaunch, inmigrate, finish-migrate,
        // suspended, save-vm, restore-vm, debug, watchdog, colo.
        _ => MachineState::Paused,
    }
}

#[derive(Debug)]
struct Procs {
    qemu: Arc<VmmProcess>,
    helpers: Vec<Arc<VmmProcess>>,
    /// Sequence for hot-plugged chardev/device ids.
    plugs: u32,
}

/// QEMU behind [`Machine`].
#[derive(Debug)]
pub struct QemuMachine {
    qemu: PathBuf,
    helper: PathBuf,
    version: String,
    accel: Accel,
    paths: HostPaths,
    cgroups: CgroupRoot,
    timeouts: Timeouts,
    procs: Mutex<HashMap<String, Procs>>,
}

impl QemuMachine {
    /// A backend running `qemu` with `helper` (vhost-device-vsock); the
    /// version is read once and the accelerator probed once.
    pub async fn new(
        qemu: &Path,
        helper: &Path,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Result<Self, Error> {
        let path_var = std::env::var_os("PATH");
        let qemu = &process::resolve_program(qemu, path_var.as_deref())?;
        let helper = &process::resolve_program(helper, path_var.as_deref())?;
        let version = detect_version(qemu).await?;
        let accel = probe_accel(qemu, &paths.proc_root, Path::new("/dev/kvm")).await;
        if let Accel::Tcg { reason } = &accel {
            tracing::warn!(%reason, "QEMU runs guests under TCG (slow)");
        }
        Ok(Self::with_accel(
            qemu, helper, version, accel, paths, cgroups,
        ))
    }

    /// A backend whose version and accelerator are already known.
    pub fn with_accel(
        qemu: &Path,
        helper: &Path,
        version: String,
        accel: Accel,
        paths: HostPaths,
        cgroups: CgroupRoot,
    ) -> Self {
        Self {
            qemu: qemu.to_path_buf(),
            helper: helper.to_path_buf(),
            version,
            accel,
            paths,
            cgroups,
            timeouts: Timeouts::default(),
            procs: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The accelerator in use.
    pub fn accel(&self) -> &Accel {
        &self.accel
    }

    async fn qmp(&self, vm: &MachineHandle, step: &'static str) -> Result<Qmp, Error> {
        Qmp::connect(&vm.control_socket, self.timeouts.command)
            .await
            .map_err(|source| Error::Qmp {
                capsule: vm.capsule.clone(),
                step,
                source,
            })
    }

    fn remember(&self, capsule: &str, procs: Procs) {
        if let Ok(mut m) = self.procs.lock() {
            m.insert(capsule.to_string(), procs);
        }
    }

    fn next_plug(&self, capsule: &str) -> u32 {
        self.procs
            .lock()
            .ok()
            .and_then(|mut m| {
                m.get_mut(capsule).map(|p| {
                    p.plugs += 1;
                    p.plugs
                })
            })
            .unwrap_or_else(|| {
                // Adopted after a restart: ids only need to be fresh.
                u32::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() % 100_000)
                        .unwrap_or(0),
                )
                .unwrap_or(0)
                    + 1000
            })
    }

    /// Starts the helper and QEMU; on error both are gone again.
    async fn start(
        &self,
        spec: &MachineSpec,
        incoming: bool,
    ) -> Result<(MachineHandle, Procs), Error> {
        let capsule = spec.capsule.as_str();
        let prep = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::PrepareSpawn {
                capsule: capsule.to_string(),
                what,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(prep("run dir", &spec.run_dir))?;
        let layout = Layout::build(spec);
        write_shape(capsule, &spec.run_dir.join(MACHINE_FILE), &shape_of(spec))?;
        let helper_record = spec.run_dir.join(HELPER_FILE);
        for stale in [
            &layout.qmp,
            &layout.vhost,
            &spec.vsock_socket,
            &helper_record,
        ] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(prep("stale socket", stale)(e)),
            }
        }

        // 1. The vsock helper first: QEMU connects to its socket at start.
        let helper = process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.helper,
                args: build_helper_args(spec, &layout),
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: Vec::new(),
                confine: view::build_helper_confine(),
            },
        )?;
        let helper = Arc::new(helper);
        if let Err(e) = self
            .wait_path(capsule, &helper, &layout.vhost, "vhost-device-vsock")
            .await
        {
            self.kill_all(capsule, &[], std::slice::from_ref(&helper))
                .await;
            return Err(e);
        }

        // 2. QEMU in the same netns and cgroup.
        let qemu = match process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.qemu,
                args: build_qemu_args(spec, &self.accel, &layout, incoming),
                netns: spec.netns.as_deref(),
                limits: spec.limits,
                inherit: Vec::new(),
                confine: view::build_confine(spec),
            },
        ) {
            Ok(q) => Arc::new(q),
            Err(e) => {
                self.kill_all(capsule, &[], std::slice::from_ref(&helper))
                    .await;
                return Err(e);
            }
        };
        let handle = MachineHandle {
            backend: BackendKind::Qemu,
            capsule: capsule.to_string(),
            process: qemu.identity(),
            helpers: vec![helper.identity()],
            control_socket: layout.qmp.clone(),
            vsock_socket: spec.vsock_socket.clone(),
            memory_bytes: spec.memory_bytes,
        };
        let procs = Procs {
            qemu,
            helpers: vec![helper],
            plugs: 0,
        };
        if let Err(e) = self.wait_qmp(&handle, &procs.qemu).await {
            self.kill_all(capsule, std::slice::from_ref(&procs.qemu), &procs.helpers)
                .await;
            return Err(e);
        }
        Ok((handle, procs))
    }

    async fn wait_path(
        &self,
        capsule: &str,
        proc: &VmmProcess,
        path: &Path,
        what: &'static str,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.timeouts.start;
        while !path.exists() {
            if let Some(status) = proc.try_wait()? {
                let log = process::capsule_dir(&self.paths, capsule).join(super::logs::VMM_LOG);
                let tail = tokio::task::spawn_blocking(move || {
                    super::logs::read_tail(&log, 2048).unwrap_or_default()
                })
                .await
                .unwrap_or_default();
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what,
                    reason: format!(
                        "exited during start-up ({status:?}); vmm.log ends: {}",
                        tail.trim()
                    ),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what,
                    reason: format!(
                        "{} did not appear within {:?}",
                        path.display(),
                        self.timeouts.start
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn wait_qmp(&self, vm: &MachineHandle, qemu: &VmmProcess) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.timeouts.start;
        loop {
            match Qmp::connect(&vm.control_socket, self.timeouts.command).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(status) = qemu.try_wait()? {
                        return Err(Error::ExitedEarly {
                            capsule: vm.capsule.clone(),
                            status,
                        });
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(Error::Qmp {
                            capsule: vm.capsule.clone(),
                            step: "start",
                            source: e,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Ends processes (QEMU first: the helper must outlive its frontend)
    /// and removes the shared cgroup once it is empty.
    /// Replaces the vsock helper of a running VM: same guest CID and
    /// sockets, QEMU's network namespace and cgroup. Records the new one in
    /// the run dir for adoption after an agent restart.
    async fn fresh_helper(&self, vm: &MachineHandle) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        let fail = |reason: String| Error::Qemu {
            capsule: capsule.to_string(),
            what: "restart the vsock helper",
            reason,
        };
        let (qemu, helpers) = self.procs_of(vm)?;
        let cid = helpers
            .iter()
            .find_map(|h| helper_cid(&self.paths.proc_root, h.identity().pid))
            .ok_or_else(|| fail("cannot read --guest-cid of the running helper".into()))?;
        let dir = run_dir(vm);
        let shape = read_shape(capsule, &dir.join(MACHINE_FILE))?;
        let netns = self
            .paths
            .proc_root
            .join(qemu.identity().pid.to_string())
            .join("ns/net");
        for h in &helpers {
            self.end(h, HELPER_STOP).await?;
        }
        let vhost = dir.join(VHOST_SOCKET);
        for stale in [&vhost, &vm.vsock_socket] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(format!("remove {}: {e}", stale.display()))),
            }
        }
        let helper = Arc::new(process::spawn_supervised(
            &self.paths,
            &self.cgroups,
            &SpawnRequest {
                capsule,
                program: &self.helper,
                args: helper_args(cid, &vm.vsock_socket, &vhost),
                netns: Some(&netns),
                limits: CgroupLimits::build_for_vm(shape.vcpus, shape.memory_bytes),
                inherit: Vec::new(),
                confine: view::build_helper_confine(),
            },
        )?);
        self.wait_path(capsule, &helper, &vhost, "vhost-device-vsock")
            .await?;
        let record = serde_json::to_vec(&[helper.identity()])
            .map_err(|e| fail(format!("encode the helper record: {e}")))?;
        // Rename over the old record, so adoption never reads half of it.
        let tmp = dir.join(format!(".{HELPER_FILE}.tmp"));
        std::fs::write(&tmp, &record)
            .and_then(|()| std::fs::rename(&tmp, dir.join(HELPER_FILE)))
            .map_err(|e| fail(format!("write {HELPER_FILE}: {e}")))?;
        if let Ok(mut m) = self.procs.lock()
            && let Some(p) = m.get_mut(capsule)
        {
            p.helpers = vec![helper];
        }
        Ok(())
    }

    async fn kill_all(&self, capsule: &str, qemu: &[Arc<VmmProcess>], helpers: &[Arc<VmmProcess>]) {
        for p in qemu {
            let _ = self.end(p, libc::SIGTERM).await;
        }
        for p in helpers {
            let _ = self.end(p, HELPER_STOP).await;
        }
        let _ = self.cgroups.open_capsule(capsule).remove();
    }

    /// Stops `p` with `first`, then SIGKILL after the grace time.
    async fn end(&self, p: &VmmProcess, first: i32) -> Result<(), Error> {
        p.mark_stop_requested();
        if p.try_wait()?.is_none() {
            let _ = p.signal(first);
            if tokio::time::timeout(self.timeouts.stop_grace, p.wait())
                .await
                .is_err()
            {
                let _ = p.signal(libc::SIGKILL);
                p.wait().await?;
            }
        }
        Ok(())
    }

    async fn run_state(
        &self,
        q: &mut Qmp,
        capsule: &str,
        step: &'static str,
    ) -> Result<String, Error> {
        q.execute(&qmp::QueryStatus)
            .await
            .map(|s| s.status)
            .map_err(|source| Error::Qmp {
                capsule: capsule.to_string(),
                step,
                source,
            })
    }

    /// Plugs a vsock device into the root port, retrying while the helper
    /// re-creates its socket after an unplug.
    async fn plug_vsock(&self, q: &mut Qmp, vm: &MachineHandle, vhost: &Path) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        // vhost-device-vsock 0.3 does not always listen again after a
        // session ends (seen after a second unplug): a socket that is not
        // back in a moment gets a fresh helper, which always listens.
        let back = tokio::time::Instant::now() + HELPER_RELISTEN;
        while !vhost.exists() && tokio::time::Instant::now() < back {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !vhost.exists() {
            tracing::info!(
                capsule,
                "vsock helper did not listen again; starting a fresh one"
            );
            self.fresh_helper(vm).await?;
        }
        let n = self.next_plug(capsule);
        let chardev = format!("vsock-chr{n}");
        let deadline = tokio::time::Instant::now() + self.timeouts.start;
        loop {
            let add = qmp::ChardevAdd::unix_client(&chardev, vhost);
            match q.execute(&add).await {
                Ok(_) => break,
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && matches!(e, QmpError::Command { .. }) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(Error::Qmp {
                        capsule: capsule.to_string(),
                        step: "plug vsock",
                        source,
                    });
                }
            }
        }
        q.execute(&qmp::DeviceAdd {
            driver: "vhost-user-vsock-pci".into(),
            id: format!("vsock{n}"),
            chardev,
            bus: VSOCK_PORT_ID.into(),
        })
        .await
        .map_err(|source| Error::Qmp {
            capsule: capsule.to_string(),
            step: "plug vsock",
            source,
        })?;
        Ok(())
    }

    /// Unplugs whatever vsock device is on the root port; the guest must
    /// run to acknowledge it.
    async fn unplug_vsock(&self, q: &mut Qmp, capsule: &str) -> Result<(), Error> {
        let err = |source| Error::Qmp {
            capsule: capsule.to_string(),
            step: "unplug vsock",
            source,
        };
        let Some((id, chardev)) = current_vsock(q).await.map_err(err)? else {
            return Ok(());
        };
        q.execute(&qmp::DeviceDel { id: id.clone() })
            .await
            .map_err(err)?;
        let deadline = tokio::time::Instant::now() + self.timeouts.unplug;
        while current_vsock(q).await.map_err(err)?.is_some() {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what: "unplug vsock",
                    reason: format!(
                        "guest did not release {id} within {:?}",
                        self.timeouts.unplug
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(chardev) = chardev {
            // The device is gone; its chardev may already be too.
            let _ = q.execute(&qmp::ChardevRemove { id: chardev }).await;
        }
        Ok(())
    }

    fn migrate_timeout(&self, memory_bytes: u64) -> Duration {
        let gib = memory_bytes.div_ceil(1 << 30).max(1);
        self.timeouts.migrate_per_gib * u32::try_from(gib).unwrap_or(u32::MAX)
    }

    async fn wait_migration(
        &self,
        q: &mut Qmp,
        capsule: &str,
        path: &Path,
        direction: &'static str,
        memory_bytes: u64,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.migrate_timeout(memory_bytes);
        loop {
            let info = q
                .execute(&qmp::QueryMigrate)
                .await
                .map_err(|source| Error::Qmp {
                    capsule: capsule.to_string(),
                    step: direction,
                    source,
                })?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(Error::Qemu {
                        capsule: capsule.to_string(),
                        what: direction,
                        reason: format!(
                            "migration {s} ({}): {}",
                            path.display(),
                            info.error_desc.unwrap_or_default()
                        ),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what: direction,
                    reason: format!("migration via {} did not finish in time", path.display()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn restore_inner(
        &self,
        spec: &MachineSpec,
        dir: &Path,
        vm: &MachineHandle,
    ) -> Result<(), Error> {
        let capsule = spec.capsule.as_str();
        let memory = dir.join(MEMORY_FILE);
        let stream_err = |e: std::io::Error| Error::Qemu {
            capsule: capsule.to_string(),
            what: "restore",
            reason: format!("stream {}: {e}", memory.display()),
        };
        let transfer =
            stream::load(&spec.run_dir, &memory, self.timeouts.start).map_err(stream_err)?;
        let mut q = self.qmp(vm, "restore").await?;
        q.execute(&qmp::MigrateIncoming {
            uri: transfer.uri(),
        })
        .await
        .map_err(|source| Error::Qmp {
            capsule: capsule.to_string(),
            step: "restore",
            source,
        })?;
        self.wait_migration(&mut q, capsule, &memory, "restore", spec.memory_bytes)
            .await?;
        transfer
            .finish(self.migrate_timeout(spec.memory_bytes))
            .await
            .map_err(stream_err)?;
        // The migration thread sets the run state just after "completed".
        let deadline = tokio::time::Instant::now() + self.timeouts.command;
        while self.run_state(&mut q, capsule, "restore").await? == "inmigrate" {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.plug_vsock(&mut q, vm, &Layout::build(spec).vhost)
            .await?;
        self.cont(&mut q, capsule, "restore").await
    }

    async fn cont(&self, q: &mut Qmp, capsule: &str, step: &'static str) -> Result<(), Error> {
        q.execute(&qmp::Cont).await.map_err(|source| Error::Qmp {
            capsule: capsule.to_string(),
            step,
            source,
        })?;
        let state = self.run_state(q, capsule, step).await?;
        if state != "running" {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: step,
                reason: format!("VM is {state} after cont"),
            });
        }
        Ok(())
    }

    fn procs_of(
        &self,
        vm: &MachineHandle,
    ) -> Result<(Arc<VmmProcess>, Vec<Arc<VmmProcess>>), Error> {
        if let Some(p) = self.procs.lock().ok().and_then(|m| {
            m.get(&vm.capsule)
                .map(|p| (p.qemu.clone(), p.helpers.clone()))
        }) {
            return Ok(p);
        }
        let qemu = Arc::new(VmmProcess::adopt(
            &self.paths,
            &self.cgroups,
            &vm.capsule,
            vm.process,
        )?);
        let mut helpers = Vec::new();
        for h in current_helpers(vm) {
            helpers.push(Arc::new(VmmProcess::adopt(
                &self.paths,
                &self.cgroups,
                &vm.capsule,
                h,
            )?));
        }
        Ok((qemu, helpers))
    }
}

/// The helpers of `vm`: those a respawn recorded, else those journaled.
fn current_helpers(vm: &MachineHandle) -> Vec<ProcessIdentity> {
    std::fs::read(run_dir(vm).join(HELPER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| vm.helpers.clone())
}

/// `--guest-cid` from a running helper's command line.
fn helper_cid(proc_root: &Path, pid: i32) -> Option<u32> {
    let cmdline = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"--guest-cid" {
            return std::str::from_utf8(args.next()?).ok()?.parse().ok();
        }
    }
    None
}

/// The id and chardev of the vsock device on its root port, if any.
async fn current_vsock(q: &mut Qmp) -> Result<Option<(String, Option<String>)>, QmpError> {
    let buses = q.execute(&qmp::QueryPci).await?;
    for bus in buses {
        for dev in bus.all_devices() {
            // `vsock<N>`, not the root port it sits on.
            if let Some(n) = dev.qdev_id.strip_prefix("vsock")
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
            {
                return Ok(Some((dev.qdev_id.clone(), Some(format!("vsock-chr{n}")))));
            }
        }
    }
    Ok(None)
}

async fn detect_version(qemu: &Path) -> Result<String, Error> {
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

/// Guest NIC counters from `/proc/<pid>/net/dev` of a process inside the
/// capsule's netns. The TAP receives what the guest sends.
pub fn parse_net_dev(text: &str, tap: &str) -> Option<NetCounters> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != tap {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes ...
        return Some(NetCounters {
            tx_bytes: *f.first()?,
            rx_bytes: *f.get(8)?,
        });
    }
    None
}

impl Machine for QemuMachine {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Qemu,
            version: self.version.clone(),
            accelerated: self.accel == Accel::Kvm,
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<MachineHandle, Error> {
        let (handle, procs) = self.start(spec, false).await?;
        self.remember(&spec.capsule, procs);
        Ok(handle)
    }

    async fn adopt(&self, vm: &MachineHandle) -> Result<(), Error> {
        let qemu = Arc::new(VmmProcess::adopt(
            &self.paths,
            &self.cgroups,
            &vm.capsule,
            vm.process,
        )?);
        let mut helpers = Vec::new();
        for h in current_helpers(vm) {
            helpers.push(Arc::new(VmmProcess::adopt(
                &self.paths,
                &self.cgroups,
                &vm.capsule,
                h,
            )?));
        }
        let mut q = self.qmp(vm, "adopt").await?;
        self.run_state(&mut q, &vm.capsule, "adopt").await?;
        // Later plugs must not reuse the id of the device plugged now.
        let plugs = current_vsock(&mut q)
            .await
            .map_err(|source| Error::Qmp {
                capsule: vm.capsule.clone(),
                step: "adopt",
                source,
            })?
            .and_then(|(id, _)| id.trim_start_matches("vsock").parse().ok())
            .unwrap_or(0);
        self.remember(
            &vm.capsule,
            Procs {
                qemu,
                helpers,
                plugs,
            },
        );
        Ok(())
    }

    async fn pause(&self, vm: &MachineHandle) -> Result<(), Error> {
        let mut q = self.qmp(vm, "pause").await?;
        q.execute(&qmp::Stop).await.map_err(|source| Error::Qmp {
            capsule: vm.capsule.clone(),
            step: "pause",
            source,
        })?;
        Ok(())
    }

    /// `cont`, then a vsock check: vhost-device-vsock 0.3 stops serving
    /// for good if host traffic reached it while the vCPUs were stopped (a
    /// dial or a keepalive during the pause), and a fresh device session
    /// heals it. So when the guest agent's port does not answer the
    /// handshake, the vsock device is plugged anew; the guest then sees a
    /// transport reset, as after a restore, and callers redial.
    async fn resume(&self, vm: &MachineHandle) -> Result<(), Error> {
        let mut q = self.qmp(vm, "resume").await?;
        self.cont(&mut q, &vm.capsule, "resume").await?;
        // The probe itself must not reach the device mid-restart; a device
        // that does not come back is plugged anew below.
        let _ = self.wait_vsock(vm, VSOCK_PROBE).await;
        let probe = crate::guest::dial_through_refusals(&vm.vsock_socket, crate::guest::AGENT_PORT);
        if matches!(tokio::time::timeout(VSOCK_PROBE, probe).await, Ok(Ok(_))) {
            return Ok(());
        }
        tracing::info!(capsule = %vm.capsule, "vsock silent after resume; plugging a fresh device");
        self.unplug_vsock(&mut q, &vm.capsule).await?;
        self.plug_vsock(&mut q, vm, &run_dir(vm).join(VHOST_SOCKET))
            .await
    }

    /// Runs the guest for the moment it takes to release its vsock device
    /// (QEMU cannot migrate one), pauses it again, writes memory and device
    /// state to `dir/memory.qemu`, and plugs a vsock device back so a later
    /// resume has one. Leaves the VM paused.
    async fn snapshot(&self, vm: &MachineHandle, dir: &Path) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        let memory = dir.join(MEMORY_FILE);
        let stream_err = |e: std::io::Error| Error::Qemu {
            capsule: capsule.to_string(),
            what: "snapshot",
            reason: format!("stream {}: {e}", memory.display()),
        };
        let qerr = |step| {
            move |source| Error::Qmp {
                capsule: capsule.to_string(),
                step,
                source,
            }
        };
        let mut q = self.qmp(vm, "snapshot").await?;
        q.execute(&qmp::Cont).await.map_err(qerr("snapshot"))?;
        let unplugged = self.unplug_vsock(&mut q, capsule).await;
        q.execute(&qmp::Stop).await.map_err(qerr("snapshot"))?;
        unplugged?;
        q.execute(&qmp::MigrateSetParameters {
            max_bandwidth: u64::MAX >> 1,
        })
        .await
        .map_err(qerr("snapshot"))?;
        let transfer = stream::save(&run_dir(vm), &memory).map_err(stream_err)?;
        q.execute(&qmp::Migrate {
            uri: transfer.uri(),
        })
        .await
        .map_err(qerr("snapshot"))?;
        let migrated = match self
            .wait_migration(&mut q, capsule, &memory, "snapshot", vm.memory_bytes)
            .await
        {
            Ok(()) => transfer
                .finish(self.migrate_timeout(vm.memory_bytes))
                .await
                .map(drop)
                .map_err(stream_err),
            Err(e) => Err(e),
        };
        // Whatever happened, the running VM gets its vsock back.
        let plugged = self
            .plug_vsock(&mut q, vm, &run_dir(vm).join(VHOST_SOCKET))
            .await;
        migrated?;
        plugged?;
        let shape = read_shape(capsule, &run_dir(vm).join(MACHINE_FILE))?;
        write_shape(capsule, &dir.join(MACHINE_FILE), &shape)
    }

    async fn restore(&self, spec: &MachineSpec, dir: &Path) -> Result<MachineHandle, Error> {
        let capsule = spec.capsule.as_str();
        let shape = read_shape(capsule, &dir.join(MACHINE_FILE))?;
        if !shape.restorable_as(&shape_of(spec)) {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: "restore",
                reason: format!(
                    "snapshot was taken with {shape:?}, spec asks for {:?}",
                    shape_of(spec)
                ),
            });
        }
        let (handle, procs) = self.start(spec, true).await?;
        if let Err(e) = self.restore_inner(spec, dir, &handle).await {
            self.kill_all(capsule, std::slice::from_ref(&procs.qemu), &procs.helpers)
                .await;
            return Err(e);
        }
        self.remember(capsule, procs);
        Ok(handle)
    }

    async fn state(&self, vm: &MachineHandle) -> Result<MachineState, Error> {
        let mut q = self.qmp(vm, "state").await?;
        let s = self.run_state(&mut q, &vm.capsule, "state").await?;
        Ok(to_machine_state(&s))
    }

    async fn counters(&self, vm: &MachineHandle) -> Result<NetCounters, Error> {
        let shape = read_shape(&vm.capsule, &run_dir(vm).join(MACHINE_FILE))?;
        let Some(tap) = shape.tap else {
            return Ok(NetCounters::default());
        };
        let path = self
            .paths
            .proc_root
            .join(vm.process.pid.to_string())
            .join("net/dev");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Process {
            capsule: vm.capsule.clone(),
            pid: vm.process.pid,
            what: "read net/dev of",
            source,
        })?;
        Ok(parse_net_dev(&text, &tap).unwrap_or_default())
    }

    async fn stop(&self, vm: &MachineHandle) -> Result<(), Error> {
        let procs = match self.procs_of(vm) {
            Ok(p) => Some(p),
            Err(Error::AdoptVmm { .. }) => None,
            Err(e) => return Err(e),
        };
        let (qemu, mut helpers) = match procs {
            Some((q, h)) => (vec![q], h),
            // QEMU is gone; a helper may still run.
            None => (
                Vec::new(),
                vm.helpers
                    .iter()
                    .filter_map(|h| {
                        VmmProcess::adopt(&self.paths, &self.cgroups, &vm.capsule, *h).ok()
                    })
                    .map(Arc::new)
                    .collect(),
            ),
        };
        if let Some(q) = qemu.first() {
            q.mark_stop_requested();
            // Ask first; a QEMU that does not answer gets signals.
            if let Ok(mut c) = Qmp::connect(&vm.control_socket, Duration::from_secs(1)).await {
                let _ = c.execute(&qmp::Quit).await;
            }
        }
        for p in qemu.iter() {
            self.end(p, libc::SIGTERM).await?;
        }
        for p in helpers.iter() {
            self.end(p, HELPER_STOP).await?;
        }
        helpers.clear();
        self.cgroups.open_capsule(&vm.capsule).remove()?;
        let dir = run_dir(vm);
        for f in [QMP_SOCKET, VHOST_SOCKET, MACHINE_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_file(&vm.vsock_socket);
        if let Ok(mut m) = self.procs.lock() {
            m.remove(&vm.capsule);
        }
        Ok(())
    }

    /// QEMU exits 0 both when the guest powers off (or reboots, with
    /// `-no-reboot`) and on `quit`; the agent's own stops are marked
    /// before they happen, so a 0 it did not ask for is the guest's.
    async fn wait_exit(&self, vm: &MachineHandle) -> Result<VmmExit, Error> {
        let (qemu, _) = self.procs_of(vm)?;
        let status = qemu.wait().await?;
        let requested = qemu.stop_was_requested();
        Ok(process::classify_exit(status, &[], requested))
    }

    /// vhost-device-vsock 0.3 stops serving for good when a host
    /// connection reaches it while the device's rings are not running
    /// (its worker thread ends on the first error, and the process stays):
    /// during the guest driver's setup of the device at boot or after a
    /// restore's hot-plug, and while the VM is stopped. So no dial until
    /// QEMU reports the vhost backend started. QMP answers under the lock
    /// the device setup holds, so "started" means the setup is done.
    async fn wait_vsock(&self, vm: &MachineHandle, within: Duration) -> Result<(), Error> {
        let capsule = vm.capsule.as_str();
        let until = tokio::time::Instant::now() + within;
        let qerr = |source| Error::Qmp {
            capsule: capsule.to_string(),
            step: "wait for vsock",
            source,
        };
        let mut q = self.qmp(vm, "wait for vsock").await?;
        loop {
            let devices = q.execute(&qmp::QueryVirtio).await.map_err(qerr)?;
            if let Some(dev) = devices.iter().find(|d| d.name == "vhost-vsock") {
                let status = q
                    .execute(&qmp::QueryVirtioStatus {
                        path: dev.path.clone(),
                    })
                    .await
                    .map_err(qerr)?;
                if status.vhost_started {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= until {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what: "wait for vsock",
                    reason: format!("the guest did not set up its vsock device within {within:?}"),
                });
            }
            tokio::time::sleep(VSOCK_POLL).await;
        }
    }

    async fn diagnose(&self, vm: &MachineHandle) -> String {
        self.report(vm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::TapSpec;
    use crate::vmm::cgroup::CgroupLimits;

    fn spec() -> MachineSpec {
        MachineSpec {
            capsule: "c1".into(),
            vcpus: 2,
            memory_bytes: 300 << 20,
            kernel: "/k/vmlinuz".into(),
            initramfs: None,
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            root_disk: "/d/a,b.qcow2".into(),
            root_disk_format: DiskFormat::Qcow2,
            netns: None,
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: "52:54:00:00:00:01".into(),
            }),
            vsock_cid: 7,
            vsock_socket: "/r/vm.vsock".into(),
            limits: CgroupLimits::build_for_vm(2, 300 << 20),
            run_dir: "/r".into(),
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn another_capsule_may_restore_a_snapshot_of_the_same_shape() {
        let taken = Shape {
            format: 1,
            vcpus: 1,
            memory_bytes: 256 << 20,
            tap: Some("wrenn-aaaa".into()),
        };
        let other_tap = Shape {
            tap: Some("wrenn-bbbb".into()),
            ..taken.clone()
        };
        assert!(taken.restorable_as(&other_tap));
        for wrong in [
            Shape {
                vcpus: 2,
                ..taken.clone()
            },
            Shape {
                memory_bytes: 512 << 20,
                ..taken.clone()
            },
            Shape {
                tap: None,
                ..taken.clone()
            },
        ] {
            assert!(!taken.restorable_as(&wrong), "{wrong:?}");
        }
    }

    #[test]
    fn command_line_carries_the_spec() {
        let s = spec();
        let tcg = Accel::Tcg { reason: "x".into() };
        let a = joined(&build_qemu_args(&s, &tcg, &Layout::build(&s), false));
        assert!(a.contains("-accel tcg,tb-size=64 -cpu max"), "{a}");
        assert!(a.contains("-m 300M -smp 2"), "{a}");
        assert!(
            a.contains("memory-backend-memfd,id=mem0,size=300M,share=on"),
            "{a}"
        );
        // A comma in a path is doubled, not taken as an option separator.
        assert!(a.contains("file=/d/a,,b.qcow2,format=qcow2"), "{a}");
        assert!(a.contains("tap,id=net0,ifname=tap0,script=no"), "{a}");
        assert!(a.contains("mac=52:54:00:00:00:01"), "{a}");
        assert!(
            a.contains("vhost-user-vsock-pci,chardev=vsock-chr0,id=vsock0,bus=vsock-port"),
            "{a}"
        );
        assert!(
            a.contains("-qmp unix:/r/qmp.sock,server=on,wait=off"),
            "{a}"
        );
        assert!(!a.contains("-initrd") && !a.contains("-incoming"), "{a}");

        // Restore: waits for the state, and has no vsock device yet.
        let a = joined(&build_qemu_args(&s, &Accel::Kvm, &Layout::build(&s), true));
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(a.contains("-incoming defer -S"), "{a}");
        assert!(!a.contains("vhost-user-vsock-pci"), "{a}");
        assert!(a.contains("pcie-root-port,id=vsock-port"), "{a}");

        let h = joined(&build_helper_args(&s, &Layout::build(&s)));
        assert_eq!(
            h,
            "--guest-cid 7 --uds-path /r/vm.vsock --socket /r/vhost-vsock.sock"
        );
    }

    #[test]
    fn states_versions_and_counters_parse() {
        assert_eq!(to_machine_state("running"), MachineState::Running);
        assert_eq!(to_machine_state("postmigrate"), MachineState::Paused);
        assert_eq!(to_machine_state("paused"), MachineState::Paused);
        assert_eq!(to_machine_state("guest-panicked"), MachineState::Shutdown);
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some("7.2.22".into())
        );
        assert_eq!(parse_version("qemu: unknown"), None);
        let dev = "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
             tap0:    1500      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(dev, "tap0"),
            Some(NetCounters {
                tx_bytes: 1500,
                rx_bytes: 9000
            })
        );
        assert_eq!(parse_net_dev(dev, "tap1"), None);
    }
}
