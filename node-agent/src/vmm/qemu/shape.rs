//! The machine's shape file (`machine.json`): what a QEMU was started with,
//! kept in its run dir (it survives an agent restart) and copied into each
//! snapshot, so a restore can refuse a snapshot QEMU could not load.

use std::path::Path;

use super::error::QemuError;
use crate::vmm::Error;
use crate::vmm::machine::MachineSpec;

/// What the snapshot was taken with, checked on restore.
pub(super) const MACHINE_FILE: &str = "machine.json";

/// The machine's shape, written to the run dir at start (so it survives
/// an agent restart) and copied into each snapshot; restore refuses a
/// snapshot of another shape (QEMU needs identical devices).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Shape {
    pub(super) format: u32,
    pub(super) vcpus: u32,
    pub(super) memory_bytes: u64,
    /// TAP name (the NIC's presence is part of the shape).
    pub(super) tap: Option<String>,
}

impl Shape {
    /// Whether a snapshot of `self` can be restored as `wanted`. The TAP
    /// name is the host side only (another capsule restoring a snapshot
    /// has its own); the guest sees a NIC or none.
    pub(super) fn restorable_as(&self, wanted: &Shape) -> bool {
        self.format == wanted.format
            && self.vcpus == wanted.vcpus
            && self.memory_bytes == wanted.memory_bytes
            && self.tap.is_some() == wanted.tap.is_some()
    }
}

pub(super) fn shape_of(spec: &MachineSpec) -> Shape {
    Shape {
        format: 1,
        vcpus: spec.vcpus.max(1),
        memory_bytes: spec.memory_bytes,
        tap: spec.tap.as_ref().map(|t| t.name.clone()),
    }
}

pub(super) fn read_shape(capsule: &str, path: &Path) -> Result<Shape, Error> {
    let text = std::fs::read(path).map_err(|source| Error::SnapshotFile {
        capsule: capsule.to_string(),
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| Error::Qemu {
        capsule: capsule.to_string(),
        what: "read machine shape",
        source: QemuError::ReadShape {
            path: path.to_path_buf(),
            source,
        },
    })
}

pub(super) fn write_shape(capsule: &str, path: &Path, shape: &Shape) -> Result<(), Error> {
    let body = serde_json::to_vec_pretty(shape).map_err(|e| Error::Qemu {
        capsule: capsule.to_string(),
        what: "write machine shape",
        source: QemuError::EncodeShape(e),
    })?;
    std::fs::write(path, body).map_err(|source| Error::SnapshotFile {
        capsule: capsule.to_string(),
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_unreadable_shape_file_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MACHINE_FILE);
        std::fs::write(&path, "{").unwrap();
        let err = read_shape("c1", &path).unwrap_err();
        assert!(
            matches!(&err, Error::Qemu { source: QemuError::ReadShape { path: p, .. }, .. } if *p == path),
            "{err:?}"
        );
    }
}
