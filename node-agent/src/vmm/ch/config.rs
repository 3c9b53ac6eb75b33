//! The `vm.create` and `vm.add-net` bodies Cloud Hypervisor gets for a
//! [`MachineSpec`]: pure builders shared by a launch
//! ([`ChMachine`](super::machine::ChMachine)) and a restore, which rewrites
//! a snapshot's config with the same per-capsule paths
//! (`restore`).

use std::path::Path;

use super::api::{ImageType, LandlockConfig, NetConfig, VmConfig, VmSpec, build_vm_config};
use crate::vmm::machine::{DiskFormat, MachineSpec};
use crate::vmm::view::qcow2_backing_chain;

/// Queues of the guest NIC: one RX/TX pair (CH's default; a single-queue
/// TAP needs exactly 2).
const NET_QUEUES: u32 = 2;

/// The `vm.create` body for `spec`: the shared builder
/// ([`build_vm_config`]) plus the
/// initramfs and the disk format. The NIC is added separately, see
/// [`build_net_config`].
pub fn build_machine_config(spec: &MachineSpec) -> VmConfig {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut config = build_vm_config(&VmSpec {
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
        kernel: path(&spec.kernel),
        cmdline: spec.cmdline.clone(),
        root_disk: path(&spec.root_disk),
        serial_file: Some(path(&spec.run_dir.join("serial.log"))),
        vsock: Some((u64::from(spec.vsock_cid), path(&spec.vsock_socket))),
        system_uuid: None,
    });
    config.payload.initramfs = spec.initramfs.as_deref().map(path);
    if spec.root_disk_format == DiskFormat::Qcow2
        && let Some(root) = config.disks.first_mut()
    {
        root.image_type = Some(ImageType::Qcow2);
        // The template is the overlay's backing file (off by default
        // since v51).
        root.backing_files = Some(true);
    }
    // Landlock covers the paths of this config by itself (disks, kernel,
    // serial file, vsock socket). Beyond them: the run dir (snapshots are
    // written there, see `ChMachine::snapshot`), the TAP device for the NIC added
    // after `vm.create`, and the qcow2 backing chain.
    let rule = |path: &Path, access: &str| LandlockConfig {
        path: path.to_string_lossy().into_owned(),
        access: access.to_string(),
    };
    config.landlock_enable = Some(true);
    config.landlock_rules.push(rule(&spec.run_dir, "rw"));
    if spec.tap.is_some() {
        config
            .landlock_rules
            .push(rule(Path::new("/dev/net/tun"), "rw"));
    }
    if spec.root_disk_format == DiskFormat::Qcow2 {
        for backing in qcow2_backing_chain(&spec.root_disk) {
            config.landlock_rules.push(rule(&backing, "r"));
        }
    }
    config
}

/// The `vm.add-net` body: the TAP by name, in CH's netns.
pub fn build_net_config(spec: &MachineSpec) -> Option<NetConfig> {
    spec.tap.as_ref().map(|tap| NetConfig {
        id: Some("net0".into()),
        tap: Some(tap.name.clone()),
        mac: Some(tap.mac.clone()),
        num_queues: Some(NET_QUEUES),
        ..NetConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::TapSpec;
    use crate::vmm::cgroup::CgroupLimits;

    fn spec(format: DiskFormat) -> MachineSpec {
        MachineSpec {
            capsule: "c1".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            kernel: "/k/vmlinux".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            root_disk: "/dev/mapper/wrenn-c1".into(),
            root_disk_format: format,
            netns: Some("/run/netns/wrenn-c1".into()),
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: "02:fc:00:00:00:05".into(),
            }),
            vsock_cid: 3,
            vsock_socket: "/s/vmm/c1/vsock.sock".into(),
            limits: CgroupLimits::build_for_vm(2, 512 << 20),
            run_dir: "/s/vmm/c1".into(),
        }
    }

    #[test]
    fn vm_config_sets_what_ch_defaults_wrong() {
        let c = build_machine_config(&spec(DiskFormat::Raw));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["memory"]["thp"], false);
        assert_eq!(json["cpus"]["nested"], false);
        assert_eq!(json["console"]["mode"], "Off");
        assert_eq!(json["disks"][0]["image_type"], "Raw");
        assert!(json["disks"][0].get("backing_files").is_none());
        assert!(json.get("net").is_none(), "the NIC goes through vm.add-net");
        let q = serde_json::to_value(build_machine_config(&spec(DiskFormat::Qcow2))).unwrap();
        assert_eq!(q["disks"][0]["backing_files"], true);
        let net = serde_json::to_value(build_net_config(&spec(DiskFormat::Raw))).unwrap();
        assert_eq!(net["tap"], "tap0");
        assert_eq!(net["num_queues"], 2);
    }
}
