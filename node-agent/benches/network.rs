//! Capsule network setup and teardown timings: 200 cycles of the production
//! path (TAP, nftables table, node route, conntrack flush) inside a node
//! namespace made for the run, so the machine's own network is untouched.
//! Prints median and p99 of each phase. Needs root; says so otherwise.
//!
//! Run: `cargo bench -p wrenn-node-agent --bench network`

#[path = "../tests/network_env/mod.rs"]
mod network_env;

use std::time::{Duration, Instant};

use network_env::Bed;
use wrenn_node_agent::network::{CapsuleId, EgressPolicy, NetOps, Teardown};

const CYCLES: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "network {what:<9} n={} median={:.2} ms p99={:.2} ms min={:.2} ms max={:.2} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
    );
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
    let bed = Bed::new(true);
    let net = bed.net();
    net.ensure_node().expect("ensure node");
    let before = bed.snapshot();
    let policies = [
        EgressPolicy::Allow,
        EgressPolicy::Deny,
        EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().expect("cidr")]),
    ];
    let (mut setup, mut teardown) = (Vec::new(), Vec::new());
    for i in 0..CYCLES {
        let c = CapsuleId::new(&format!("bench{i:04}")).expect("id");
        let t = Instant::now();
        net.setup(&c, &policies[i % policies.len()]).expect("setup");
        setup.push(t.elapsed());
        let t = Instant::now();
        net.teardown(&c, Teardown::ReleaseSlot).expect("teardown");
        teardown.push(t.elapsed());
    }
    report("setup", setup);
    report("teardown", teardown);
    let after = bed.snapshot();
    assert_eq!(after, before, "the bench leaked");
    println!("network leaks after {CYCLES} cycles: none");
}
