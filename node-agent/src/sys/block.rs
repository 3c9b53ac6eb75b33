//! Kernel calls for `storage`: loop devices (ioctls on `/dev/loop-control`
//! and `/dev/loopN`, state read back from sysfs) and device-mapper (through
//! the `devicemapper` crate, wrapped so `storage` never sees its types in
//! errors). Every `unsafe` block of the storage path lives in this file.
//!
//! Policy (which loop to reuse, when to detach, what a table should be)
//! stays in `storage`; this module only does what it is told and reports
//! what the kernel says. Host paths (`/dev`, `/sys`) are passed in.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

// <linux/loop.h>; the libc crate does not carry these.
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// Major number of loop block devices.
pub const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn new(backing: &Path, read_only: bool) -> Self {
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: if read_only { LO_FLAGS_READ_ONLY } else { 0 },
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        // Informational only (sysfs `backing_file` is what we read back);
        // truncated, always NUL-terminated.
        let name = backing.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// A loop device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    /// N of `/dev/loopN`.
    pub index: u32,
    /// Device node, under the `/dev` passed in.
    pub path: PathBuf,
    /// The file behind it; `None` when the kernel reports the file deleted.
    pub backing_file: Option<PathBuf>,
    /// Attached read-only.
    pub read_only: bool,
}

impl LoopDevice {
    /// `major:minor`, as device-mapper tables name it.
    pub fn devno(&self) -> (u32, u32) {
        (LOOP_MAJOR, self.index)
    }
}

/// Host paths the loop calls work under.
#[derive(Clone, Debug)]
pub struct LoopHost {
    /// Normally `/dev`.
    pub dev_dir: PathBuf,
    /// Normally `/sys`.
    pub sys_dir: PathBuf,
}

impl Default for LoopHost {
    fn default() -> Self {
        Self {
            dev_dir: PathBuf::from("/dev"),
            sys_dir: PathBuf::from("/sys"),
        }
    }
}

/// Attempts made when another process grabs the loop device we were
/// handed by `LOOP_CTL_GET_FREE` before we configure it.
const ATTACH_ATTEMPTS: usize = 10;
/// Detach retries on `EBUSY` (wrenn-go-notes §5.1: 5 × 200 ms).
const DETACH_ATTEMPTS: usize = 5;
const DETACH_DELAY: Duration = Duration::from_millis(200);

impl LoopHost {
    fn node(&self, index: u32) -> PathBuf {
        self.dev_dir.join(format!("loop{index}"))
    }

    /// Every configured loop device (one with a backing file).
    pub fn list(&self) -> io::Result<Vec<LoopDevice>> {
        let mut out = Vec::new();
        let block = self.sys_dir.join("block");
        for entry in std::fs::read_dir(&block)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(index) = name
                .to_str()
                .and_then(|n| n.strip_prefix("loop"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(dev) = self.read(index)? {
                out.push(dev);
            }
        }
        out.sort_by_key(|d| d.index);
        Ok(out)
    }

    /// The loop device `index` if it is configured.
    pub fn read(&self, index: u32) -> io::Result<Option<LoopDevice>> {
        let dir = self.sys_dir.join("block").join(format!("loop{index}"));
        let backing = match std::fs::read_to_string(dir.join("loop/backing_file")) {
            Ok(s) => s,
            // Unconfigured loops have no `loop/` directory; one being torn
            // down while we read answers ENXIO or ENODEV.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let backing = backing.trim_end_matches('\n');
        if backing.is_empty() {
            return Ok(None);
        }
        let backing_file = match backing.strip_suffix(" (deleted)") {
            Some(_) => None,
            None => Some(PathBuf::from(backing)),
        };
        let read_only = std::fs::read_to_string(dir.join("ro"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        Ok(Some(LoopDevice {
            index,
            path: self.node(index),
            backing_file,
            read_only,
        }))
    }

    /// Configured loop devices whose backing file is `file` (compared after
    /// canonicalising `file`; the kernel reports the path it was given).
    pub fn find_by_backing_file(&self, file: &Path) -> io::Result<Vec<LoopDevice>> {
        let canon = std::fs::canonicalize(file)?;
        Ok(self
            .list()?
            .into_iter()
            .filter(|d| d.backing_file.as_deref() == Some(canon.as_path()))
            .collect())
    }

    /// Attaches `file` to a free loop device. `file` should be canonical:
    /// the kernel reports back the path it resolves from the fd.
    pub fn attach(&self, file: &Path, read_only: bool) -> io::Result<LoopDevice> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.dev_dir.join("loop-control"))?;
        let mut last = io::Error::from_raw_os_error(libc::EBUSY);
        for _ in 0..ATTACH_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an
            // index or -1; `control` is an open fd for the call's duration.
            let index = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if index < 0 {
                return Err(io::Error::last_os_error());
            }
            let index = index as u32;
            let node = self.ensure_node(index)?;
            let dev = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&node)?;
            match configure(&dev, &backing, file, read_only) {
                Ok(()) => {
                    return Ok(LoopDevice {
                        index,
                        path: node,
                        backing_file: Some(file.to_path_buf()),
                        read_only,
                    });
                }
                // Someone else configured it between GET_FREE and now.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Detaches `loop_dev`, retrying while it is busy. A device that is
    /// already free counts as detached. When the device is still open
    /// elsewhere the kernel defers the detach to the last close (it sets
    /// autoclear), which is what we want for a device-mapper user that is
    /// going away.
    ///
    /// The fd names the device, not its binding: between retries the loop
    /// may be freed and bound again by someone else, so each attempt first
    /// checks it still serves `loop_dev`'s backing file.
    pub fn detach(&self, loop_dev: &LoopDevice) -> io::Result<()> {
        let index = loop_dev.index;
        let node = self.node(index);
        let dev = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&node)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut attempt = 0;
        loop {
            match self.read(index)? {
                None => return Ok(()),
                // A deleted backing file cannot be compared: the old
                // behaviour (detach) is the one that never leaks.
                Some(LoopDevice {
                    backing_file: Some(bound),
                    ..
                }) if loop_dev
                    .backing_file
                    .as_ref()
                    .is_some_and(|ours| *ours != bound) =>
                {
                    return Ok(());
                }
                Some(_) => {}
            }
            // SAFETY: LOOP_CLR_FD takes no argument; `dev` is open.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Not bound to a file: already detached.
                Some(libc::ENXIO) => return Ok(()),
                Some(libc::EBUSY) if attempt + 1 < DETACH_ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(DETACH_DELAY);
                }
                _ => return Err(err),
            }
        }
    }

    /// Creates `/dev/loopN` when the host's `/dev` is not devtmpfs.
    fn ensure_node(&self, index: u32) -> io::Result<PathBuf> {
        let node = self.node(index);
        match std::fs::metadata(&node) {
            Ok(m) if m.file_type().is_block_device() => Ok(node),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a block device", node.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                nix::sys::stat::mknod(
                    &node,
                    nix::sys::stat::SFlag::S_IFBLK,
                    nix::sys::stat::Mode::from_bits_truncate(0o660),
                    nix::sys::stat::makedev(u64::from(LOOP_MAJOR), u64::from(index)),
                )
                .map_err(io::Error::from)?;
                Ok(node)
            }
            Err(e) => Err(e),
        }
    }
}

/// Binds `backing` to the open loop device `dev`: LOOP_CONFIGURE where the
/// kernel has it (one atomic call), else LOOP_SET_FD + LOOP_SET_STATUS64.
fn configure(dev: &File, backing: &File, path: &Path, read_only: bool) -> io::Result<()> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64::new(path, read_only),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
    // `LoopConfig` mirrors (repr(C)); the pointer is valid for the call and
    // both fds are open.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOTTY) {
        return Err(err);
    }
    // Pre-5.8 kernel.
    // SAFETY: LOOP_SET_FD takes the backing fd as its integer argument.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let info = config.info;
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64`; the
    // pointer is valid for the call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_STATUS64,
            &info as *const LoopInfo64,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Undo the half-configured device.
        // SAFETY: as in `LoopHost::detach`.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
        return Err(err);
    }
    Ok(())
}

/// Device-mapper, as `storage` needs it: the `devicemapper` crate's `DM`
/// behind plain types, so `storage` never matches on the crate's errors.
pub mod dm {
    use devicemapper::{DM, DevId, DmError, DmFlags, DmName, DmOptions};

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// A device-mapper call failed: which call, the errno, and the crate's
    /// error (absent when a [`FakeDm`] made it up).
    #[derive(Debug, thiserror::Error)]
    #[error("device-mapper {action} (errno {errno:?})")]
    pub struct DmFailure {
        action: &'static str,
        errno: Option<i32>,
        #[source]
        source: Option<DmError>,
    }

    impl DmFailure {
        /// The kernel said `EBUSY` (device still open).
        pub fn is_busy(&self) -> bool {
            self.errno == Some(libc::EBUSY)
        }
    }

    /// The device-mapper calls `storage` makes; [`Dm`] does them, and
    /// [`FakeDm`] records them for tests on hosts without device-mapper.
    pub trait DmOps: Send + Sync + std::fmt::Debug {
        /// Names of every device.
        fn list(&self) -> Result<Vec<String>, DmFailure>;
        /// The live table of `dev`, or `None` if there is no such device.
        fn table(&self, dev: &str) -> Result<Option<Vec<RawLine>>, DmFailure>;
        /// Creates, loads and resumes `dev`; leaves nothing on failure.
        fn create(&self, dev: &str, table: &[RawLine]) -> Result<(), DmFailure>;
        /// Removes `dev`; a missing device counts as removed.
        fn remove(&self, dev: &str) -> Result<(), DmFailure>;
    }

    /// One call recorded by [`FakeDm`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum DmCall {
        /// `create(name, table)`.
        Create(String, Vec<RawLine>),
        /// `remove(name)`.
        Remove(String),
    }

    #[derive(Debug, Default)]
    struct FakeState {
        devices: BTreeMap<String, Vec<RawLine>>,
        calls: Vec<DmCall>,
        fail_create: bool,
        busy_removes: usize,
    }

    /// In-memory device-mapper: devices are names with tables.
    #[derive(Debug, Default)]
    pub struct FakeDm(Mutex<FakeState>);

    impl FakeDm {
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
        /// Puts a device in place as if an earlier process made it.
        pub fn insert(&self, dev: &str, table: Vec<RawLine>) {
            self.state().devices.insert(dev.to_string(), table);
        }
        /// Recorded create/remove calls.
        pub fn calls(&self) -> Vec<DmCall> {
            self.state().calls.clone()
        }
        /// Device names.
        pub fn devices(&self) -> Vec<String> {
            self.state().devices.keys().cloned().collect()
        }
        /// The next `create` fails (`EINVAL`, as a bad table would).
        pub fn fail_next_create(&self) {
            self.state().fail_create = true;
        }
        /// The next `n` removes fail with `EBUSY` (after the retries a
        /// real remove makes).
        pub fn busy_removes(&self, n: usize) {
            self.state().busy_removes = n;
        }
    }

    fn made_up(action: &'static str, errno: i32) -> DmFailure {
        DmFailure {
            action,
            errno: Some(errno),
            source: None,
        }
    }

    impl DmOps for FakeDm {
        fn list(&self) -> Result<Vec<String>, DmFailure> {
            Ok(self.devices())
        }
        fn table(&self, dev: &str) -> Result<Option<Vec<RawLine>>, DmFailure> {
            Ok(self.state().devices.get(dev).cloned())
        }
        fn create(&self, dev: &str, table: &[RawLine]) -> Result<(), DmFailure> {
            let mut s = self.state();
            s.calls
                .push(DmCall::Create(dev.to_string(), table.to_vec()));
            if std::mem::take(&mut s.fail_create) {
                return Err(made_up("load table", libc::EINVAL));
            }
            if s.devices.contains_key(dev) {
                return Err(made_up("create device", libc::EBUSY));
            }
            s.devices.insert(dev.to_string(), table.to_vec());
            Ok(())
        }
        fn remove(&self, dev: &str) -> Result<(), DmFailure> {
            let mut s = self.state();
            s.calls.push(DmCall::Remove(dev.to_string()));
            if s.busy_removes > 0 && s.devices.contains_key(dev) {
                s.busy_removes -= 1;
                return Err(made_up("remove device", libc::EBUSY));
            }
            s.devices.remove(dev);
            Ok(())
        }
    }

    /// The errno of a failed ioctl (the crate pins its own `nix`, so compare
    /// numbers rather than `Errno` values).
    fn errno_of(e: &DmError) -> Option<i32> {
        match e {
            DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
                Some(**errno as i32)
            }
            _ => None,
        }
    }

    fn fail(action: &'static str, source: DmError) -> DmFailure {
        DmFailure {
            action,
            errno: errno_of(&source),
            source: Some(source),
        }
    }

    fn name(n: &str) -> Result<&DmName, DmFailure> {
        DmName::new(n).map_err(|e| fail("device name", e))
    }

    /// One target line: start, length (sectors), type, parameters.
    pub type RawLine = (u64, u64, String, String);

    /// An open `/dev/mapper/control`.
    pub struct Dm(DM);

    impl std::fmt::Debug for Dm {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Dm")
        }
    }

    impl Dm {
        /// Opens the control device.
        pub fn open() -> Result<Self, DmFailure> {
            DM::new().map(Dm).map_err(|e| fail("open control", e))
        }
    }

    impl DmOps for Dm {
        fn list(&self) -> Result<Vec<String>, DmFailure> {
            Ok(self
                .0
                .list_devices()
                .map_err(|e| fail("list devices", e))?
                .into_iter()
                .map(|(n, _, _)| n.to_string())
                .collect())
        }

        fn table(&self, dev: &str) -> Result<Option<Vec<RawLine>>, DmFailure> {
            let id = DevId::Name(name(dev)?);
            match self.0.table_status(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            ) {
                Ok((_, table)) => Ok(Some(table)),
                Err(e) if errno_of(&e) == Some(libc::ENXIO) => Ok(None),
                Err(e) => Err(fail("table status", e)),
            }
        }

        /// Creates `dev`, loads `table` and resumes it. Removes the device
        /// again if any step after creation fails, so a failed call leaves
        /// nothing behind.
        fn create(&self, dev: &str, table: &[RawLine]) -> Result<(), DmFailure> {
            let n = name(dev)?;
            let id = DevId::Name(n);
            self.0
                .device_create(n, None, DmOptions::default())
                .map_err(|e| fail("create device", e))?;
            let loaded = self
                .0
                .table_load(&id, table, DmOptions::default())
                .map_err(|e| fail("load table", e))
                .and_then(|_| {
                    self.0
                        .device_suspend(&id, DmOptions::private())
                        .map_err(|e| fail("resume device", e))
                });
            if let Err(e) = loaded {
                let _ = self.0.device_remove(&id, DmOptions::default());
                return Err(e);
            }
            Ok(())
        }

        /// Removes `dev`. The crate retries `EBUSY` 5 × 200 ms, which is the
        /// busy-after-VMM-exit window of wrenn-go-notes §11.1. A missing
        /// device counts as removed.
        fn remove(&self, dev: &str) -> Result<(), DmFailure> {
            let id = DevId::Name(name(dev)?);
            match self.0.device_remove(&id, DmOptions::default()) {
                Ok(_) => Ok(()),
                Err(e) if errno_of(&e) == Some(libc::ENXIO) => Ok(()),
                Err(e) => Err(fail("remove device", e)),
            }
        }
    }
}

/// Whether the host has a usable device-mapper: the kernel registered the
/// `device-mapper` misc device (`<proc>/misc`) and `<dev>/mapper/control`
/// exists. Returns the reason when it is not.
pub fn device_mapper_available(proc_dir: &Path, dev_dir: &Path) -> Result<(), String> {
    let misc = proc_dir.join("misc");
    let listed = std::fs::read_to_string(&misc)
        .map_err(|e| format!("cannot read {}: {e}", misc.display()))?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"));
    if !listed {
        return Err(format!(
            "kernel has no device-mapper (not listed in {})",
            misc.display()
        ));
    }
    let control = dev_dir.join("mapper/control");
    if !control.exists() {
        return Err(format!(
            "device-mapper control node {} is missing",
            control.display()
        ));
    }
    Ok(())
}
