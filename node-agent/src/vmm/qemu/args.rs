//! The command lines of a capsule's two processes, QEMU and its vsock
//! helper (`vhost-device-vsock`), and the run-dir layout they name: pure
//! builders from a [`MachineSpec`], nothing is started here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::probe::Accel;
use crate::vmm::logs::QEMU_CONSOLE_LOG;
use crate::vmm::machine::{DiskFormat, MachineHandle, MachineSpec};

/// QMP socket in the run dir.
pub(super) const QMP_SOCKET: &str = "qmp.sock";
/// vhost-user control socket between QEMU and the vsock helper.
pub(super) const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// The root port the vsock device is hot-plugged on.
pub(super) const VSOCK_PORT_ID: &str = "vsock-port";

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
            console: spec.run_dir.join(QEMU_CONSOLE_LOG),
        }
    }
}

/// QEMU's own seccomp filter: besides its default deny list, no obsolete
/// syscalls, no setuid/setgid/capability changes, no fork or exec (the
/// migration stream goes through a socket, see `stream`), no scheduler or
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
    // At least MIN_MEMORY_BYTES: `procs::start` refuses less.
    let mem_mib = spec.memory_bytes.div_ceil(1 << 20);
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
pub(super) fn helper_args(cid: u32, uds: &Path, vhost: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        cid.to_string().into(),
        "--uds-path".into(),
        uds.as_os_str().to_owned(),
        "--socket".into(),
        vhost.as_os_str().to_owned(),
    ]
}

/// The run dir of a handle (where its QMP socket lives).
pub(super) fn run_dir(vm: &MachineHandle) -> PathBuf {
    vm.control_socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
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
}
