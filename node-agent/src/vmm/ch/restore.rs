//! Staging a Cloud Hypervisor snapshot for a restore into one capsule.
//!
//! CH restores the `config.json` of a snapshot verbatim, and that file
//! names the source capsule's disk, serial log, vsock socket and TAP. A
//! capsule started from a named snapshot (another capsule's memory) must
//! open its own, and must not write into the snapshot, which other
//! capsules may start from too. So the restore reads a staged copy under
//! the capsule's run dir: `config.json` with this spec's paths, every other
//! file hard-linked (copied across filesystems), which costs nothing for a
//! memory image of gigabytes. Device ids stay as they were, since
//! `state.json` refers to devices by id. For a capsule resuming its own
//! suspend image the rewrite changes nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::api::ImageType;
use super::config::build_machine_config;
use crate::vmm::Error;
use crate::vmm::machine::MachineSpec;

/// The staged directory's name inside the run dir.
const STAGED: &str = "restore-source";

/// A snapshot's `config.json` (CH's `VmConfig`) as far as a restore edits
/// it. Every field not named here, at any level, rides in `other` and is
/// written back as it was: CH adds fields between versions, and a restore
/// must hand back what CH wrote. CH reads an absent optional section as
/// `null`, so a `null` one is written back absent.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disks: Option<Vec<SnapshotDisk>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<SnapshotConsole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock: Option<SnapshotVsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<Vec<SnapshotNet>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// A disk of [`SnapshotConfig`]: the fields the root disk's path and
/// format live in.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_type: Option<ImageType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing_files: Option<bool>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// The serial console of [`SnapshotConfig`].
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotConsole {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// The vsock device of [`SnapshotConfig`]; its CID is device state and
/// stays in `other`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotVsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// A NIC of [`SnapshotConfig`]; its MAC is the guest's and stays in
/// `other`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotNet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// `config` (a snapshot's `config.json`) with the per-capsule paths of
/// `spec`: root disk (path, format, backing files), serial log, vsock
/// socket and TAP name. Everything else, device ids included, is kept.
pub fn build_restore_config(mut config: SnapshotConfig, spec: &MachineSpec) -> SnapshotConfig {
    let fresh = build_machine_config(spec);
    if let (Some(disk), Some(new)) = (
        config.disks.as_mut().and_then(|d| d.first_mut()),
        fresh.disks.first(),
    ) {
        disk.path = Some(new.path.clone());
        disk.image_type = new.image_type;
        disk.backing_files = new.backing_files;
    }
    if let (Some(serial), Some(file)) = (config.serial.as_mut(), fresh.serial.and_then(|s| s.file))
    {
        serial.file = Some(file);
    }
    if let Some(vsock) = config.vsock.as_mut() {
        vsock.socket = Some(spec.vsock_socket.to_string_lossy().into_owned());
    }
    if let (Some(tap), Some(nets)) = (&spec.tap, config.net.as_mut()) {
        for net in nets {
            net.tap = Some(tap.name.clone());
        }
    }
    config
}

/// The bytes of a snapshot's `config.json` as `spec`'s restore reads them.
fn rewrite_config(body: &[u8], spec: &MachineSpec) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&build_restore_config(serde_json::from_slice(body)?, spec))
}

/// Writes the staged copy of the snapshot in `dir` for `spec` and returns
/// its path. The caller removes it with [`remove_staged`] once the restore
/// returned (CH reads the memory image whole before it does).
pub fn stage_restore(spec: &MachineSpec, dir: &Path) -> Result<PathBuf, Error> {
    let err = |what: &'static str, path: &Path| Error::prepare(&spec.capsule, what, path);
    let staged = spec.run_dir.join(STAGED);
    remove_staged(spec)?;
    std::fs::create_dir_all(&staged).map_err(err("restore staging dir", &staged))?;
    let staged_ok = (|| {
        let entries = std::fs::read_dir(dir).map_err(err("snapshot dir", dir))?;
        for entry in entries {
            let entry = entry.map_err(err("snapshot dir", dir))?;
            let from = entry.path();
            let to = staged.join(entry.file_name());
            if entry.file_name() == "config.json" {
                let body = std::fs::read(&from).map_err(err("snapshot config", &from))?;
                let out = rewrite_config(&body, spec).map_err(|source| Error::SnapshotConfig {
                    capsule: spec.capsule.clone(),
                    path: from.clone(),
                    source,
                })?;
                std::fs::write(&to, out).map_err(err("restore config", &to))?;
            } else if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(err("snapshot file", &from))?;
            }
        }
        Ok(())
    })();
    match staged_ok {
        Ok(()) => Ok(staged),
        Err(e) => {
            let _ = remove_staged(spec);
            Err(e)
        }
    }
}

/// Removes the staged copy of `spec`'s restore, if any.
pub fn remove_staged(spec: &MachineSpec) -> Result<(), Error> {
    let staged = spec.run_dir.join(STAGED);
    match std::fs::remove_dir_all(&staged) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PrepareSpawn {
            capsule: spec.capsule.clone(),
            what: "restore staging dir",
            path: staged,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::cgroup::CgroupLimits;
    use crate::vmm::{DiskFormat, TapSpec};

    fn spec(run_dir: &Path) -> MachineSpec {
        MachineSpec {
            capsule: "new".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            kernel: "/k/vmlinux".into(),
            initramfs: None,
            cmdline: String::new(),
            root_disk: "/d/wrenn-new.qcow2".into(),
            root_disk_format: DiskFormat::Qcow2,
            netns: None,
            tap: Some(TapSpec {
                name: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            vsock_cid: 3,
            vsock_socket: run_dir.join("vsock.sock"),
            limits: CgroupLimits::build_for_vm(1, 256 << 20),
            run_dir: run_dir.to_path_buf(),
        }
    }

    #[test]
    fn paths_are_the_new_capsules_and_ids_are_kept() {
        let old = serde_json::json!({
            "disks": [{"path": "/dev/mapper/wrenn-old", "id": "rootfs", "image_type": "Raw"}],
            "serial": {"mode": "File", "file": "/s/vmm/old/serial.log"},
            "vsock": {"cid": 4, "socket": "/s/vmm/old/vsock.sock", "id": "vsock0"},
            "net": [{"tap": "oldtap", "id": "net0", "mac": "02:00:00:00:00:09"}],
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1}
        });
        let s = spec(Path::new("/s/vmm/new"));
        let config = serde_json::from_value(old.clone()).unwrap();
        let new = serde_json::to_value(build_restore_config(config, &s)).unwrap();
        assert_eq!(new["disks"][0]["path"], "/d/wrenn-new.qcow2");
        assert_eq!(new["disks"][0]["image_type"], "Qcow2");
        assert_eq!(new["disks"][0]["backing_files"], true);
        assert_eq!(new["disks"][0]["id"], "rootfs");
        assert_eq!(new["serial"]["file"], "/s/vmm/new/serial.log");
        assert_eq!(new["vsock"]["socket"], "/s/vmm/new/vsock.sock");
        assert_eq!(new["vsock"]["cid"], 4, "device state keeps its CID");
        assert_eq!(new["net"][0]["tap"], "tap0");
        assert_eq!(new["net"][0]["mac"], "02:00:00:00:00:09");
        assert_eq!(new["cpus"], old["cpus"]);
    }

    #[test]
    fn staging_never_writes_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let config = serde_json::json!({"disks": [{"path": "/old", "id": "rootfs"}]});
        std::fs::write(snap.join("config.json"), config.to_string()).unwrap();
        std::fs::write(snap.join("memory-ranges"), b"ram").unwrap();
        let s = spec(&tmp.path().join("run"));
        let staged = stage_restore(&s, &snap).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&snap.join("config.json")), config.to_string());
        assert!(read(&staged.join("config.json")).contains("/d/wrenn-new.qcow2"));
        assert_eq!(read(&staged.join("memory-ranges")), "ram");
        remove_staged(&s).unwrap();
        assert!(!staged.exists());
        assert_eq!(read(&snap.join("memory-ranges")), "ram");
    }

    #[test]
    fn a_config_that_is_not_chs_fails_the_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), r#"{"disks": [{"path": 7}]}"#).unwrap();
        let s = spec(&tmp.path().join("run"));
        let err = stage_restore(&s, &snap).unwrap_err();
        assert!(matches!(err, Error::SnapshotConfig { .. }), "{err:?}");
        assert!(!s.run_dir.join(STAGED).exists());
    }
}
