//! Boot-to-agent-ready time of the guest image under QEMU TCG: builds (or
//! reuses) `images/build.sh`'s artifacts, boots each machine
//! `WRENN_BOOT_RUNS` times (default 5) one after another, prints every time
//! and the median. Needs root and qemu-system-x86_64.
//!
//!   cargo bench -p wrenn-e2e --bench guest_boot

use std::time::Duration;

use anyhow::{Context, Result};
use wrenn_testkit::guest_vm::{Artifacts, Machine, boot_to_ready};

fn main() -> Result<()> {
    let runs: usize = std::env::var("WRENN_BOOT_RUNS")
        .ok()
        .map(|v| v.parse().context("WRENN_BOOT_RUNS is not a number"))
        .transpose()?
        .unwrap_or(5)
        .max(1);
    let a = Artifacts::build()?;
    println!("kernel {} from {}", a.release, a.dir.display());
    for machine in Machine::ALL {
        let mut times = Vec::with_capacity(runs);
        let mut hung = 0;
        for _ in 0..runs {
            // A boot that never gets ready is counted, not fatal: microvm
            // under TCG sometimes hangs calibrating the TSC.
            match boot_to_ready(&a, machine, Duration::from_secs(60)) {
                Ok(boot) => times.push(boot.ready_after.as_secs_f64()),
                Err(e) => {
                    hung += 1;
                    eprintln!(
                        "{}: {}",
                        machine.name(),
                        e.to_string().lines().next().unwrap_or("")
                    );
                }
            }
        }
        let shown: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        times.sort_by(f64::total_cmp);
        match (times.first(), times.last()) {
            (Some(min), Some(max)) => println!(
                "{:8} boot-to-ready (TCG, 1 vCPU, 256 MiB): median {:.2} s, min {min:.2} s, max {max:.2} s; {} of {runs} ready [{}]",
                machine.name(),
                times[times.len() / 2],
                times.len(),
                shown.join(", ")
            ),
            _ => println!(
                "{:8} boot-to-ready: none of {runs} boots got ready",
                machine.name()
            ),
        }
        if hung > 0 {
            println!(
                "{:8} {hung} of {runs} boots not ready within 60 s",
                machine.name()
            );
        }
    }
    Ok(())
}
