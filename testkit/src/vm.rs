//! What every vm-tier test shares across test binaries: a turn to boot
//! TCG guests and a readiness budget measured on this machine.
//!
//! - **Guest slots.** Under TCG each booting vCPU keeps one host thread busy,
//!   so guests of different tests (threads of one binary, or binaries run
//!   side by side) only slow each other down until one misses its budget.
//!   A test takes one of `WRENN_VM_SLOTS` (default max(1, cores / 2)) slots
//!   for as long as its guests run; a slot is an `flock` on a file in
//!   [`slot_dir`], one directory for the whole machine, so it is shared by
//!   every process and freed by the kernel when its holder dies, however it
//!   dies.
//! - **Boot budget.** A calibration boot (the guest image under plain QEMU,
//!   [`crate::guest_vm::boot_to_ready`]) at the tier's start measures what a
//!   boot costs here and now, under whatever else the machine is doing; the
//!   budgets of the tier's waits are multiples of it instead of constants.
//!   The figure is kept in a file for the run: in `WRENN_VM_RUN_DIR` (set
//!   per run by `e2e/scripts/test.sh` and the soak script), else in
//!   [`slot_dir`], where it is trusted for [`CACHE_FRESH_FOR`].

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::guest_vm::{Artifacts, Machine, boot_to_ready};

/// How long a calibration in the shared cache directory is trusted when no
/// run directory is set (one developer's series of test runs).
pub const CACHE_FRESH_FOR: Duration = Duration::from_secs(30 * 60);
/// The most a calibration boot may take before the tier gives up: a boot
/// this slow means the machine cannot run the tier at all.
const CALIBRATION_LIMIT: Duration = Duration::from_secs(600);
/// Readiness budget per second of calibration boot. A capsule's boot does
/// more than the calibration (vsock device, twice the memory, a qcow2
/// overlay, a 1-CPU cgroup quota) and the load may rise after calibrating;
/// measured on 2 busy cores a capsule is ready in 2–4 calibration boots.
pub const READY_PER_BOOT: u32 = 12;
/// Floor of the readiness budget, for a calibration taken on a quiet
/// machine that gets busy later.
pub const READY_FLOOR: Duration = Duration::from_secs(90);
const CALIBRATION_FILE: &str = "boot-calibration";

/// Where the slots live (and the calibration, when no run directory is
/// set): `${WRENN_CACHE:-${XDG_CACHE_HOME:-~/.cache}/wrenn}/vm-tier`.
pub fn slot_dir() -> PathBuf {
    let cache = std::env::var_os("WRENN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("wrenn")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/wrenn")))
        .unwrap_or_else(|| std::env::temp_dir().join("wrenn"));
    cache.join("vm-tier")
}

/// How many tests may run guests at once: `WRENN_VM_SLOTS`, else half the
/// cores (at least one).
pub fn slots() -> usize {
    std::env::var("WRENN_VM_SLOTS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
        })
        .max(1)
}

/// A held slot; dropping it (or the process ending) frees it.
#[derive(Debug)]
pub struct GuestSlot {
    _file: File,
    /// Which slot.
    pub index: usize,
    /// How long the holder waited for it.
    pub waited: Duration,
}

/// Waits for a free guest slot, saying once on stderr who holds them.
pub fn guest_slot(who: &str) -> Result<GuestSlot, String> {
    guest_slot_in(&slot_dir(), slots(), who)
}

fn guest_slot_in(dir: &Path, n: usize, who: &str) -> Result<GuestSlot, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let started = Instant::now();
    let mut said = false;
    loop {
        for index in 0..n {
            let path = dir.join(format!("slot-{index}.lock"));
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {
                    // Who holds it, for the message of the next one waiting.
                    let _ = file.set_len(0);
                    let _ = write!(file, "pid {} {who}", std::process::id());
                    let waited = started.elapsed();
                    if said {
                        eprintln!("[vm tier] {who} got guest slot {index} after {waited:.1?}");
                    }
                    return Ok(GuestSlot {
                        _file: file,
                        index,
                        waited,
                    });
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    return Err(format!("lock {}: {e}", path.display()));
                }
            }
        }
        if !said {
            said = true;
            let holders: Vec<String> = (0..n)
                .filter_map(|i| std::fs::read_to_string(dir.join(format!("slot-{i}.lock"))).ok())
                .collect();
            eprintln!(
                "[vm tier] {who} waits for one of {n} guest slots (held by: {})",
                holders.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A vm-tier test's turn: its readiness budget and a guest slot, held
/// until dropped (drop it after the test's guests are gone).
#[derive(Debug)]
pub struct Turn {
    /// How long one guest boot (or restore) may take until its agent
    /// answers: [`ready_budget`].
    pub ready: Duration,
    /// The slot.
    pub slot: GuestSlot,
}

/// Takes a turn: the budget first, so a calibration never waits for a slot
/// this process already holds, then a slot.
pub fn turn(who: &str) -> Result<Turn, String> {
    let ready = ready_budget()?;
    let slot = guest_slot(who)?;
    Ok(Turn { ready, slot })
}

/// The calibration boot's time, measured once per run (or read from the
/// file another test process wrote) and kept for this process.
pub fn calibration_boot() -> Result<Duration, String> {
    static CALIBRATED: OnceLock<Result<Duration, String>> = OnceLock::new();
    CALIBRATED.get_or_init(calibrate_or_read).clone()
}

/// The readiness budget of one guest boot in the tier: a capsule boot
/// until its agent answers. `WRENN_VM_READY_SECS` overrides it.
pub fn ready_budget() -> Result<Duration, String> {
    if let Some(secs) = std::env::var("WRENN_VM_READY_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Ok(Duration::from_secs(secs));
    }
    calibration_boot().map(budget_for)
}

/// [`READY_PER_BOOT`] calibration boots, at least [`READY_FLOOR`].
pub fn budget_for(boot: Duration) -> Duration {
    (boot * READY_PER_BOOT).max(READY_FLOOR)
}

fn calibrate_or_read() -> Result<Duration, String> {
    let run_dir = std::env::var_os("WRENN_VM_RUN_DIR").map(PathBuf::from);
    let per_run = run_dir.is_some();
    let dir = run_dir.unwrap_or_else(slot_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock_path = dir.join("calibration.lock");
    let lock =
        File::create(&lock_path).map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    // One process calibrates; the others wait here and read its figure.
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let file = dir.join(CALIBRATION_FILE);
    let fresh = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| per_run || age < CACHE_FRESH_FOR);
    if fresh
        && let Some(secs) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
    {
        return Ok(Duration::from_secs_f64(secs));
    }
    // Alone on the machine as far as guests go, so the figure is the
    // machine's (and its other load's), not another test's guest's.
    let slot = guest_slot("calibration boot")?;
    let artifacts = Artifacts::build().map_err(|e| format!("guest image: {e:#}"))?;
    let boot = boot_to_ready(&artifacts, Machine::Q35, CALIBRATION_LIMIT)
        .map_err(|e| format!("calibration boot: {e:#}"))?;
    drop(slot);
    let took = boot.ready_after;
    let tmp = dir.join(format!(".{CALIBRATION_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, format!("{:.3}\n", took.as_secs_f64()))
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| format!("write {}: {e}", file.display()))?;
    eprintln!(
        "[vm tier] calibration boot: {:.1} s to agent ready; readiness budget {:.0} s ({})",
        took.as_secs_f64(),
        budget_for(took).as_secs_f64(),
        file.display()
    );
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_scale_with_the_calibration_and_keep_a_floor() {
        assert_eq!(budget_for(Duration::from_secs(2)), READY_FLOOR);
        assert_eq!(
            budget_for(Duration::from_secs(20)),
            Duration::from_secs(20 * u64::from(READY_PER_BOOT))
        );
    }

    /// With one slot a second taker (another thread: another open file,
    /// as another process has) waits until the first lets go; with two,
    /// both go at once on different slots.
    #[test]
    fn takers_beyond_the_slots_wait_for_a_release() {
        let dir = std::env::temp_dir().join(crate::unique_name("slots"));
        let first = guest_slot_in(&dir, 1, "first").unwrap();
        assert_eq!(first.index, 0);
        let held_by = std::fs::read_to_string(dir.join("slot-0.lock")).unwrap();
        assert!(held_by.ends_with(" first"), "{held_by}");
        let d = dir.clone();
        let second = std::thread::spawn(move || guest_slot_in(&d, 1, "second").unwrap());
        std::thread::sleep(Duration::from_millis(600));
        assert!(!second.is_finished(), "took a slot that was held");
        drop(first);
        let second = second.join().unwrap();
        assert!(second.waited >= Duration::from_millis(500), "{second:?}");
        drop(second);

        let a = guest_slot_in(&dir, 2, "a").unwrap();
        let b = guest_slot_in(&dir, 2, "b").unwrap();
        assert_ne!(a.index, b.index);
        assert!(b.waited < Duration::from_millis(150), "{b:?}");
        drop((a, b));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
