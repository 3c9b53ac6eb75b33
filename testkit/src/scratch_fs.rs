//! A fresh journaled ext4, loop-mounted over a sparse file, for benches
//! whose figures depend on the filesystem a node keeps its state on.
//!
//! This machine's root filesystem is ext4 without a journal. There the
//! inode allocator skips every inode freed in the last ~30 s
//! (`recently_deleted`), so each run's creates and deletes slow the next
//! run's file creation, a cost a journaled node filesystem does not have.
//! A filesystem made for the run starts empty and goes with it, so runs
//! do not carry each other's deletes; its writes and flushes still reach
//! the machine's disk through the loop device. The loop device does direct
//! I/O: through the page cache, each flush would also write back the
//! backing file, which made an `fdatasync` about 4 ms here instead of
//! about 0.7 ms.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted scratch ext4; unmounted (and its backing file removed) on
/// drop, also when the bench panics.
#[derive(Debug)]
pub struct ScratchExt4 {
    mount: PathBuf,
    device: String,
    // Holds the backing file and the mount point until after the unmount.
    _dir: tempfile::TempDir,
}

impl ScratchExt4 {
    /// Makes a `size_mib` MiB ext4 (with its journal, mkfs's default) in a
    /// sparse file under the machine's temp dir and mounts it. `Err`
    /// says why not (not root, no loop devices, no `mkfs.ext4`).
    pub fn new(size_mib: u64) -> Result<Self, String> {
        crate::need_root()?;
        crate::need_program("mkfs.ext4")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let image = dir.path().join("fs.img");
        let file = std::fs::File::create(&image).map_err(|e| format!("create image: {e}"))?;
        file.set_len(size_mib << 20)
            .map_err(|e| format!("size image: {e}"))?;
        drop(file);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| format!("mount point: {e}"))?;
        let device = run(Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(&image))?;
        if let Err(e) = run(Command::new("mount")
            .args(["-t", "ext4", &device])
            .arg(&mount))
        {
            let _ = Command::new("losetup").args(["-d", &device]).status();
            return Err(e);
        }
        Ok(Self {
            mount,
            device,
            _dir: dir,
        })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for ScratchExt4 {
    fn drop(&mut self) {
        // Lazy: a bench thread that still holds a file open must not keep
        // the mount (and its loop device) alive past the run.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        // On a device still busy this only marks it to go when released.
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Runs `cmd`; its standard output, trimmed.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
