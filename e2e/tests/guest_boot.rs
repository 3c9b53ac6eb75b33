//! Tier 3 (vm): the guest image from `images/build.sh` boots under plain
//! QEMU with TCG, on both transports the node agent's backends use (q35 with
//! virtio-pci like Cloud Hypervisor, microvm with virtio-mmio), and
//! `wrenn-guest` comes up as PID 1 and starts its agent on vsock.
//!
//! The boot-to-ready wall time (QEMU spawned → the agent's "listening" line
//! on the serial console) is printed for each machine.
// Helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrenn_testkit::{Tier, case, need_program, need_root, wait_until};

/// What PID 1 logs once the agent child is spawned (images/guest/src/init.rs).
const PID1_LINE: &str = "agent started";
/// What the agent logs once it listens (images/guest/src/main.rs).
const READY_LINE: &str = "guest agent listening";
/// TCG on 2 busy cores: a boot normally takes a few seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the repository")
        .to_path_buf()
}

/// Runs images/build.sh (cached after the first run) and returns the
/// artifact directory it prints last.
fn build_artifacts() -> PathBuf {
    let out = Command::new(repo().join("images/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run images/build.sh");
    assert!(
        out.status.success(),
        "images/build.sh failed: {}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 from build.sh");
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build.sh prints the directory"),
    );
    for f in ["vmlinuz", "initramfs.img", "rootfs.ext4", "manifest.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    dir
}

/// `"key": "value"` from the flat manifest, without a JSON dependency.
fn manifest_str(manifest: &str, key: &str) -> String {
    let needle = format!("\"{key}\": \"");
    let start = manifest.find(&needle).expect("key in manifest") + needle.len();
    let len = manifest[start..].find('"').expect("closing quote");
    manifest[start..start + len].to_string()
}

/// QEMU that is killed and reaped when the test ends, even on a panic.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(dir: &Path, machine: &str, serial: &Path) -> Vm {
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).expect("read manifest.json");
    let cmdline = manifest_str(&manifest, "cmdline");
    let (machine_arg, blk) = match machine {
        "q35" => ("q35", "virtio-blk-pci"),
        "microvm" => ("microvm,rtc=on", "virtio-blk-device"),
        other => panic!("unknown machine {other}"),
    };
    let rootfs = dir.join("rootfs.ext4");
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", machine_arg, "-accel", "tcg", "-cpu", "max"])
        .args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("initramfs.img"))
        .args(["-append", &cmdline])
        // snapshot=on: the cached disk is never written.
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=root,snapshot=on",
            rootfs.display()
        ))
        .args(["-device", &format!("{blk},drive=root")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    Vm(child)
}

fn boot_to_ready(dir: &Path, machine: &str) -> Duration {
    let tmp = tempfile::tempdir().expect("temp dir");
    let serial = tmp.path().join("serial.log");
    let start = Instant::now();
    let mut vm = boot(dir, machine, &serial);
    let waited = wait_until(BOOT_TIMEOUT, "the agent's ready line", || {
        if let Ok(Some(status)) = vm.0.try_wait() {
            return Ok(Err(format!("qemu exited early: {status}")));
        }
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains(READY_LINE) {
            Ok(Ok(start.elapsed()))
        } else {
            Err(log.lines().last().unwrap_or("").to_string())
        }
    });
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let elapsed = match waited {
        Ok(Ok(t)) => t,
        Ok(Err(why)) | Err(why) => {
            let _ = vm.0.kill();
            let mut stderr = String::new();
            if let Some(mut e) = vm.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            panic!("{machine}: {why}\nqemu stderr:\n{stderr}\nconsole:\n{console}");
        }
    };
    assert!(
        !console.contains("wrenn-initramfs:"),
        "{machine}: the initramfs reported a failure:\n{console}"
    );
    assert!(
        console.contains(PID1_LINE),
        "{machine}: wrenn-guest did not run as PID 1:\n{console}"
    );
    assert!(
        !console.contains("agent failed"),
        "{machine}: the agent failed to start:\n{console}"
    );
    drop(vm);
    elapsed
}

#[test]
fn guest_image_boots_to_agent_ready_under_tcg() {
    let c = case(
        Tier::Vm,
        "guest_boot::guest_image_boots_to_agent_ready_under_tcg",
    );
    if let Err(why) = need_program("qemu-system-x86_64").and_then(|_| need_root()) {
        return c.skip(why);
    }
    let dir = build_artifacts();
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).expect("read manifest.json");
    println!(
        "guest artifacts in {} (kernel {})",
        dir.display(),
        manifest_str(&manifest, "release")
    );
    for machine in ["q35", "microvm"] {
        let t = boot_to_ready(&dir, machine);
        println!(
            "boot-to-ready under TCG, {machine}: {:.2} s",
            t.as_secs_f64()
        );
    }
}
