//! Boot-to-agent-ready time of the guest image under QEMU TCG: builds (or
//! reuses) `images/build.sh`'s artifacts, boots each machine
//! `WRENN_BOOT_RUNS` times (default 5) one after another, prints every time
//! and the median. Needs root and qemu-system-x86_64.
//!
//!   cargo bench -p wrenn-e2e --bench guest_boot

use std::time::Duration;

use anyhow::{Context, Result};
use wrenn_e2e::guest_vm::{Artifacts, Machine, boot_to_ready};

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
        for _ in 0..runs {
            let boot = boot_to_ready(&a, machine, Duration::from_secs(120))?;
            times.push(boot.ready_after.as_secs_f64());
        }
        let shown: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{:8} boot-to-ready (TCG, 1 vCPU, 256 MiB): median {:.2} s, min {:.2} s, max {:.2} s over {runs} [{}]",
            machine.name(),
            times[runs / 2],
            times[0],
            times[runs - 1],
            shown.join(", ")
        );
    }
    Ok(())
}
