//! Tier 3 (vm): the guest image from `images/build.sh` boots under plain
//! QEMU with TCG on q35 (virtio-pci, the transport Cloud Hypervisor uses):
//! the initramfs loads the modules, mounts the disk and hands over, and
//! `wrenn-guest` runs as PID 1 and starts its agent on vsock. Prints the
//! boot-to-ready time (medians, and microvm, are in
//! `cargo bench -p wrenn-e2e --bench guest_boot`). microvm is not asserted
//! here: under TCG on a loaded host its kernel sometimes hangs calibrating
//! the TSC (microvm has no HPET or ACPI PM timer to fall back on).

use wrenn_testkit::guest_vm::{Artifacts, Machine, PID1_LINE, boot_to_ready};
use wrenn_testkit::{Tier, case, need_program, need_root};

#[test]
fn guest_image_boots_to_agent_ready_under_tcg() {
    let c = case(
        Tier::Vm,
        "guest_boot::guest_image_boots_to_agent_ready_under_tcg",
    );
    // build.sh needs root so the disk's files are root-owned.
    if let Err(why) = need_program("qemu-system-x86_64").and_then(|_| need_root()) {
        return c.skip(why);
    }
    let a = Artifacts::build().expect("images/build.sh");
    println!(
        "guest artifacts in {} (kernel {})",
        a.dir.display(),
        a.release
    );
    let machine = Machine::Q35;
    // A boot normally takes a few seconds; the budget is the vm tier's,
    // measured on this machine.
    let turn = wrenn_testkit::vm::turn("guest_boot::guest_image_boots_to_agent_ready_under_tcg")
        .expect("vm tier turn");
    let boot = boot_to_ready(&a, machine, turn.ready).expect("boot to agent ready");
    assert!(
        boot.console.contains(PID1_LINE),
        "{}: the agent listens but wrenn-guest did not log as PID 1:\n{}",
        machine.name(),
        boot.console
    );
    assert!(
        !boot.console.contains("agent failed"),
        "{}: the agent failed before listening:\n{}",
        machine.name(),
        boot.console
    );
    println!(
        "boot-to-ready under TCG, {}: {:.2} s",
        machine.name(),
        boot.ready_after.as_secs_f64()
    );
}
