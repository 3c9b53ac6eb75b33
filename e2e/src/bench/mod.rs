//! The comparative benchmark (`e2e/scripts/bench.sh`, the `compare` bench):
//! Wrenn's operator on fake-VMM agents against agent-sandbox's controller
//! on kwok nodes, on one API server, in one run.
//!
//! - [`driver`] applies objects with a fixed number in flight and times
//!   create → Ready from a watch, counting API writes;
//! - [`peer`] builds, installs and starts agent-sandbox and kwok nodes;
//! - [`figures`] holds what a run measured (the JSON file) and the ratios;
//! - [`report`] and [`svg`] turn figures into `docs/benchmarks.md` and plots;
//! - [`gate`] compares a short run's ratios with the committed ones.
//!
//! Wrenn's own side (operator and fake agents in process) lives with the
//! bench targets, which alone may depend on the operator crate.

pub mod driver;
pub mod figures;
pub mod gate;
pub mod peer;
pub mod report;
pub mod svg;
