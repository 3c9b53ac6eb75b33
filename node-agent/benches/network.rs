//! Capsule network setup and teardown timings: 200 cycles of the production
//! path (TAP, nftables table, node route, conntrack flush) inside a node
//! namespace made for the run, so the machine's own network is untouched,
//! each followed by the same steps through the `ip`, `nft` and `conntrack`
//! tools (`support/net_cli.rs`). Prints median and p99 of each phase and
//! the tools' median over ours. `teardown` is until the call returns;
//! `drained` until the work it leaves to the reaper (conntrack flush, slot
//! freed) is done too, which the tools do inline. `setup-pooled` is the
//! same setup taking a namespace the pool made ahead (`network::pool`),
//! the pool refilled before each. Needs root; says so otherwise.
//!
//! Run: `cargo bench -p wrenn-node-agent --bench network`

#[path = "support/net_cli.rs"]
mod net_cli;
#[path = "../tests/network_env/mod.rs"]
mod network_env;

use std::time::{Duration, Instant};

use network_env::Bed;
use wrenn_node_agent::network::{CapsuleId, EgressPolicy, LinuxNet, NetOps, Teardown};

const CYCLES: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    percentile(&s, 50.0)
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "network {what:<12} n={} median={:.2} ms p99={:.2} ms min={:.2} ms max={:.2} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
    );
}

/// Waits until the reaper has drained and freed every released slot.
fn wait_drained(net: &LinuxNet) {
    while !net.slots().draining().is_empty() {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn main() {
    if let Err(why) = wrenn_testkit::need_root() {
        println!("network bench skipped: {why}");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("network bench skipped: needs /dev/net/tun");
        return;
    }
    let mut bed = Bed::new(true);
    let net = bed.net();
    net.ensure_node().expect("ensure node");
    let before = bed.snapshot();
    let policies = [
        EgressPolicy::Allow,
        EgressPolicy::Deny,
        EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().expect("cidr")]),
    ];
    let cli = match net_cli::available() {
        Ok(()) => true,
        Err(why) => {
            println!("network cli baseline skipped: {why}");
            false
        }
    };
    // The tools work on the highest slot's addresses; ours claim the lowest.
    let cli_addrs = bed
        .cfg
        .plan
        .slot_addrs(bed.cfg.plan.max_slots)
        .expect("top slot");
    let run = std::process::id();
    let (mut setup, mut teardown, mut drained) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cli_setup, mut cli_teardown) = (Vec::new(), Vec::new());
    for i in 0..CYCLES {
        let policy = &policies[i % policies.len()];
        let c = CapsuleId::new(&format!("bench{i:04}")).expect("id");
        let t = Instant::now();
        net.setup(&c, policy).expect("setup");
        setup.push(t.elapsed());
        let t = Instant::now();
        net.teardown(&c, Teardown::ReleaseSlot).expect("teardown");
        teardown.push(t.elapsed());
        // What the reaper does behind it (conntrack flush, slot freed):
        // the whole cost, for the comparison with the tools.
        wait_drained(&net);
        drained.push(t.elapsed());
        if cli {
            let c = net_cli::CliCapsule::new(run, i, cli_addrs);
            let t = Instant::now();
            let made = net_cli::setup(&bed.node, &c, policy);
            cli_setup.push(t.elapsed());
            let t = Instant::now();
            let gone = made.and_then(|()| net_cli::teardown(&bed.node, &c));
            cli_teardown.push(t.elapsed());
            if let Err(e) = gone {
                net_cli::cleanup(&bed.node, &c);
                panic!("cli cycle {i}: {e}");
            }
        }
    }
    let ratios = (!cli_setup.is_empty()).then(|| {
        let r = |cli: &[Duration], ours: &[Duration]| {
            median(cli).as_secs_f64() / median(ours).as_secs_f64()
        };
        (
            r(&cli_setup, &setup),
            r(&cli_teardown, &teardown),
            r(&cli_teardown, &drained),
        )
    });
    // Setups from the pool, with the same policies; its namespace made
    // again before each (a pool of one, refilled once creates pause).
    drop(net);
    bed.cfg.pool = 1;
    let net = bed.net();
    net.start_pool();
    let mut pooled = Vec::new();
    for i in 0..CYCLES {
        while net.pooled() < 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let policy = &policies[i % policies.len()];
        let c = CapsuleId::new(&format!("pool{i:04}")).expect("id");
        let t = Instant::now();
        net.setup(&c, policy).expect("setup from the pool");
        pooled.push(t.elapsed());
        net.teardown(&c, Teardown::ReleaseSlot).expect("teardown");
        wait_drained(&net);
    }
    drop(net);
    let pooled_ratio = median(&setup).as_secs_f64() / median(&pooled).as_secs_f64();
    let cli_pooled = (!cli_setup.is_empty())
        .then(|| median(&cli_setup).as_secs_f64() / median(&pooled).as_secs_f64());
    report("setup", setup);
    report("setup-pooled", pooled);
    println!(
        "network setup from the pool: {pooled_ratio:.1}x faster than making the namespace (medians){}",
        cli_pooled.map_or(String::new(), |r| format!(", {r:.1}x the tools"))
    );
    report("teardown", teardown);
    report("drained", drained);
    if let Some((s, t, d)) = ratios {
        report("cli-setup", cli_setup);
        report("cli-teardown", cli_teardown);
        println!(
            "network vs ip/nft/conntrack tools (their median / ours, same run): setup {s:.1}x, teardown {t:.1}x (until the slot is drained and free: {d:.1}x)"
        );
    }
    let after = bed.snapshot();
    assert_eq!(after, before, "the bench leaked");
    println!("network leaks after {CYCLES} cycles: none");
}
