//! The vm tier's bed for the real supervisor, shared by the `*_vm.rs`
//! tests of this crate: what a test needs on the machine
//! ([`need_vm_tools`]), this tree's guest image, QEMU (TCG) confined as in
//! production, `LinuxNet` on a [`network_env::Bed`](super::network_env::Bed),
//! qcow2 disks and a uniquely named cgroup parent. Dropping it kills every
//! process that names its state dir and removes its cgroups, even when an
//! assertion failed. A test file using it also declares `mod network_env;`
//! and `mod guest_exec;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::guest_exec::{exec, sh_start};
use super::network_env::Bed as NetBed;
use wrenn_node_agent::capsule::OrphanSweep;
use wrenn_node_agent::capsule::{BootSource, CapsuleSpec, Egress, Resources, TemplateDisk};
use wrenn_node_agent::capsule::{GuestSettings, Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::guest::{GuestClient, Timeouts};
use wrenn_node_agent::storage::{Qcow2Store, StorageConfig};
use wrenn_node_agent::vmm::cgroup::CgroupRoot;
use wrenn_node_agent::vmm::process::HostPaths;
use wrenn_node_agent::vmm::qemu::QemuMachine;
use wrenn_testkit::{need_program, need_root, unique_name};

/// The guest image of this tree: `images/build.sh` builds it when any
/// input (the guest's sources included) changed, else prints the cache.
pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

pub fn build_image() -> Result<Image, String> {
    let script = wrenn_testkit::workspace_root().join("images/build.sh");
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("run images/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("images/build.sh failed ({})", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    Ok(Image {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        rootfs: dir.join("rootfs.ext4"),
    })
}

/// What a vm-tier test needs on this machine: root, QEMU, the vsock helper,
/// `qemu-img`, every program in `more`, and this tree's guest image.
pub struct VmTools {
    pub qemu: PathBuf,
    pub helper: PathBuf,
    pub image: Image,
}

/// [`VmTools`], or what is missing (the case's skip reason).
pub fn need_vm_tools(more: &[&str]) -> Result<VmTools, String> {
    need_root()?;
    let qemu = need_program("qemu-system-x86_64")?;
    let helper = need_program("vhost-device-vsock")?;
    need_program("qemu-img")?;
    for p in more {
        need_program(p)?;
    }
    Ok(VmTools {
        qemu,
        helper,
        image: build_image()?,
    })
}

/// What most vm-tier tests start with: the tools (`Err`: what is missing,
/// the case's skip reason), the test's turn on the machine, and a bed on
/// the network `net` makes (made only once the tools are there).
pub async fn vm_bed(
    name: &str,
    more: &[&str],
    net: impl FnOnce() -> NetBed,
    cgroup_prefix: &str,
) -> Result<(QemuBed, wrenn_testkit::vm::Turn), String> {
    let VmTools {
        qemu,
        helper,
        image,
    } = need_vm_tools(more)?;
    let turn = wrenn_testkit::vm::turn(name).expect("a turn on the vm tier");
    let bed = QemuBed::new(&qemu, &helper, image, turn.ready, net(), cgroup_prefix).await;
    Ok((bed, turn))
}

/// Processes whose command line contains `needle` (a test's state dir).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Kills every process that names the test's state dir and removes the
/// test's cgroups, even when an assertion failed.
struct Cleanup {
    state: PathBuf,
    cgroups: CgroupRoot,
    parent: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.state.display().to_string()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        super::cgroup_bed::remove_test_cgroups(&self.cgroups, &self.parent);
    }
}

/// A recovered supervisor over QEMU on `net`.
pub struct QemuBed {
    pub net: NetBed,
    pub state: tempfile::TempDir,
    pub cgroups: CgroupRoot,
    pub sup: Supervisor<QemuMachine>,
    pub image: Image,
    _cleanup: Cleanup,
}

impl QemuBed {
    /// `ready`: the vm tier's calibrated budget for one guest boot;
    /// `cgroup_prefix` names the test's cgroup parent (made unique here).
    pub async fn new(
        qemu: &Path,
        helper: &Path,
        image: Image,
        ready: Duration,
        net: NetBed,
        cgroup_prefix: &str,
    ) -> QemuBed {
        let state = tempfile::tempdir().unwrap();
        let parent = unique_name(cgroup_prefix);
        let cgroups = CgroupRoot::detect(Path::new("/sys/fs/cgroup"), &parent).unwrap();
        let cleanup = Cleanup {
            state: state.path().to_path_buf(),
            cgroups: cgroups.clone(),
            parent,
        };
        let mut cfg = SupervisorConfig::new(state.path(), &image.kernel);
        cfg.initramfs = Some(image.initramfs.clone());
        cfg.guest = Some(GuestSettings {
            timeouts: Timeouts {
                dial: Duration::from_secs(5),
                call: Duration::from_secs(60),
                probe: Duration::from_secs(3),
                retry: Duration::from_millis(100),
            },
            ready_within: ready,
            ..GuestSettings::default()
        });
        let machine = QemuMachine::new(
            qemu,
            helper,
            HostPaths::confined(
                "/proc".into(),
                wrenn_node_agent::capsule::Layout::new(state.path()).vmm_root(),
                state.path(),
            ),
            cgroups.clone(),
        )
        .await
        .unwrap();
        let store = Qcow2Store::open(StorageConfig::new(state.path().join("disks"))).unwrap();
        let sup = Supervisor::new(
            Host {
                machine: Arc::new(machine),
                net: Arc::new(net.net()),
                store: Arc::new(store),
            },
            cfg,
        );
        sup.recover(&OrphanSweep {
            cgroups: Some(cgroups.clone()),
        })
        .await
        .unwrap();
        QemuBed {
            net,
            state,
            cgroups,
            sup,
            image,
            _cleanup: cleanup,
        }
    }
}

impl QemuBed {
    /// A capsule `namespace/name` on this bed's guest image: 1 vCPU,
    /// 256 MiB, a 1 GiB disk, `egress`, default names and no ports.
    pub fn spec(&self, namespace: &str, name: &str, egress: Egress) -> CapsuleSpec {
        CapsuleSpec {
            egress,
            ..CapsuleSpec::new(
                namespace,
                name,
                BootSource::Template(TemplateDisk {
                    key: format!("{namespace}/base@ci"),
                    rootfs: self.image.rootfs.clone(),
                    digest: String::new(),
                }),
                Resources {
                    vcpus: 1,
                    memory_bytes: 256 << 20,
                    disk_bytes: 1 << 30,
                },
            )
        }
    }

    /// A client of capsule `uid`'s guest agent, each call bounded by
    /// `call` (a TCG guest is slow), with the capsule's current token (a
    /// restore re-keys the guest, so it is read again every time).
    pub async fn guest(&self, uid: &str, call: Duration) -> GuestClient {
        let view = self.sup.get(uid).unwrap();
        GuestClient::connect_with(
            uid,
            &view.vsock_socket.unwrap(),
            wrenn_node_agent::guest::AGENT_PORT,
            Timeouts {
                call,
                ..Timeouts::default()
            },
        )
        .await
        .unwrap()
        .with_token(view.guest_token.as_ref().map_or("", |t| t.expose()))
        .unwrap()
    }
}

/// Runs `script` under `/bin/sh` in the guest as `user` (empty: root), with
/// stdin closed and a kill after `timeout_ms`; returns its output (stdout
/// and stderr, trimmed) and exit code.
pub async fn sh_as(
    g: &wrenn_node_agent::guest::GuestClient,
    user: &str,
    script: &str,
    timeout_ms: u64,
) -> (String, Option<i32>) {
    let ran = exec(g, sh_start(script, user, timeout_ms), b"").await;
    let text = String::from_utf8_lossy(&ran.output).trim().to_string();
    (text, ran.exit.code)
}
