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

use serde_json::Value;

use super::Error;
use super::ch_machine::build_machine_config;
use super::machine::MachineSpec;

/// The staged directory's name inside the run dir.
const STAGED: &str = "restore-source";

/// `config` (a snapshot's `config.json`) with the per-capsule paths of
/// `spec`: root disk (path, format, backing files), serial log, vsock
/// socket and TAP name. Everything else, device ids included, is kept.
pub fn build_restore_config(mut config: Value, spec: &MachineSpec) -> Value {
    let fresh = serde_json::to_value(build_machine_config(spec)).unwrap_or(Value::Null);
    if let (Some(disk), Some(new)) = (
        config
            .pointer_mut("/disks/0")
            .and_then(Value::as_object_mut),
        fresh.pointer("/disks/0").and_then(Value::as_object),
    ) {
        for key in ["path", "image_type", "backing_files"] {
            match new.get(key) {
                Some(v) => disk.insert(key.into(), v.clone()),
                None => disk.remove(key),
            };
        }
    }
    if let (Some(serial), Some(file)) = (
        config.pointer_mut("/serial").and_then(Value::as_object_mut),
        fresh.pointer("/serial/file"),
    ) {
        serial.insert("file".into(), file.clone());
    }
    if let Some(vsock) = config.pointer_mut("/vsock").and_then(Value::as_object_mut) {
        vsock.insert(
            "socket".into(),
            Value::String(spec.vsock_socket.to_string_lossy().into_owned()),
        );
    }
    if let (Some(tap), Some(nets)) = (
        &spec.tap,
        config.pointer_mut("/net").and_then(Value::as_array_mut),
    ) {
        for net in nets.iter_mut().filter_map(Value::as_object_mut) {
            net.insert("tap".into(), Value::String(tap.name.clone()));
        }
    }
    config
}

/// Writes the staged copy of the snapshot in `dir` for `spec` and returns
/// its path. The caller removes it with [`remove_staged`] once the restore
/// returned (CH reads the memory image whole before it does).
pub fn stage_restore(spec: &MachineSpec, dir: &Path) -> Result<PathBuf, Error> {
    let err = |what: &'static str, path: &Path| {
        let capsule = spec.capsule.clone();
        let path = path.to_path_buf();
        move |source| Error::PrepareSpawn {
            capsule,
            what,
            path,
            source,
        }
    };
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
                let config: Value = serde_json::from_slice(&body).map_err(|e| {
                    err("snapshot config", &from)(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e,
                    ))
                })?;
                let out = serde_json::to_vec(&build_restore_config(config, spec))
                    .map_err(|e| err("restore config", &to)(std::io::Error::other(e)))?;
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
        let new = build_restore_config(old.clone(), &s);
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
}
