//! The guest image from `images/build.sh`, booted with plain QEMU (TCG, no
//! network, no vsock device, serial console to a file) for the boot smoke
//! test, the boot benchmark and the vm tier's calibration boot
//! ([`crate::vm`]). Capsules boot through the node agent's backends
//! instead; this is the image checked on its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// What `wrenn-guest` as PID 1 logs once its agent child is spawned
/// (images/guest/src/init.rs).
pub const PID1_LINE: &str = "agent started";
/// What the agent logs once it listens on vsock (images/guest/src/main.rs).
pub const READY_LINE: &str = "guest agent listening";
/// What the initramfs prints before giving up (images/initramfs/init).
const INITRAMFS_FAILURE: &str = "wrenn-initramfs:";

/// One build of `images/build.sh`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    /// The kernel command line to boot with.
    pub cmdline: String,
    /// `uname -r` of the kernel.
    pub release: String,
}

impl Artifacts {
    /// Runs `images/build.sh` (a no-op apart from hashing the inputs when
    /// they are cached) and reads the directory it prints last.
    pub fn build() -> Result<Self> {
        let script = workspace_root().join("images/build.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("run {}", script.display()))?;
        if !out.status.success() {
            bail!("{} failed: {}", script.display(), out.status);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .last()
            .context("images/build.sh printed no directory")?;
        Self::read(Path::new(dir))
    }

    /// Reads a built directory's manifest and checks its files exist.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let m: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let field = |ptr: &str| {
            m.pointer(ptr)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{} lacks {ptr}", path.display()))
        };
        let a = Artifacts {
            dir: dir.to_path_buf(),
            vmlinuz: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.img"),
            rootfs: dir.join("rootfs.ext4"),
            cmdline: field("/cmdline")?,
            release: field("/kernel/release")?,
        };
        for f in [&a.vmlinuz, &a.initramfs, &a.rootfs] {
            if !f.is_file() {
                bail!("{} is missing", f.display());
            }
        }
        Ok(a)
    }
}

/// The QEMU machine: q35 has virtio-pci like Cloud Hypervisor; microvm has
/// virtio-mmio and boots faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Q35,
    Microvm,
}

impl Machine {
    pub const ALL: [Machine; 2] = [Machine::Q35, Machine::Microvm];

    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

/// A finished boot.
#[derive(Debug)]
pub struct Boot {
    /// QEMU spawned → the agent's ready line on the console.
    pub ready_after: Duration,
    /// The serial console up to that point.
    pub console: String,
}

/// QEMU, killed and reaped when dropped, however the caller ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `a` on `machine` and waits for the agent's ready line. Fails with
/// the console when QEMU exits first, the initramfs reports a failure, or
/// `timeout` passes. The cached disk is never written (`snapshot=on`).
pub fn boot_to_ready(a: &Artifacts, machine: Machine, timeout: Duration) -> Result<Boot> {
    let tmp = tempfile::tempdir().context("create a temp dir")?;
    let serial = tmp.path().join("console.log");
    let (machine_arg, blk) = match machine {
        Machine::Q35 => ("q35", "virtio-blk-pci"),
        Machine::Microvm => ("microvm,rtc=on", "virtio-blk-device"),
    };
    let start = Instant::now();
    let mut qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(["-machine", machine_arg, "-accel", "tcg", "-cpu", "max"])
            .args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&a.vmlinuz)
            .arg("-initrd")
            .arg(&a.initramfs)
            .args(["-append", &a.cmdline])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=root,snapshot=on",
                a.rootfs.display()
            ))
            .args(["-device", &format!("{blk},drive=root")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn qemu-system-x86_64")?,
    );
    let name = machine.name();
    loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains(READY_LINE) {
            return Ok(Boot {
                ready_after: start.elapsed(),
                console,
            });
        }
        if console.contains(INITRAMFS_FAILURE) {
            bail!("{name}: the initramfs gave up; console:\n{console}");
        }
        if let Some(status) = qemu.0.try_wait().context("wait for qemu")? {
            bail!("{name}: qemu exited ({status}) before the agent was ready; console:\n{console}");
        }
        if start.elapsed() > timeout {
            bail!("{name}: no \"{READY_LINE}\" after {timeout:?}; console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
