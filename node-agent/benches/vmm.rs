//! Spawn-latency benchmark for the VMM spawn path (filled in below).
fn main() {}
