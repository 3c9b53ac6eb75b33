//! Network setup/teardown timings (filled in below).
fn main() {}
