//! The Wrenn operator as a library, so tests drive the same controllers the
//! binary runs. `plan` and `placement` decide (pure); `agent` talks to node
//! agents; `status` writes status; `controller` ties them together per kind.
#![forbid(unsafe_code)]

pub mod agent;
pub mod args;
pub mod controller;
pub mod finalizer;
#[cfg(test)]
mod fixtures;
pub mod kube_client;
pub mod leader;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod plan;
pub mod pool;
pub mod publish;
pub mod pull_secret;
pub mod resources;
pub mod status;
pub mod templates;
