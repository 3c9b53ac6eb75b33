//! Library half of the Wrenn node agent; `main.rs` only parses flags and
//! starts the server. Each module owns one part of the host (DESIGN.md §4):
//! policy lives in `network`, `storage`, `images` and `vmm`; every syscall,
//! ioctl and `unsafe` block lives in `sys`.

pub mod args;
pub mod capsule;
pub mod guest;
pub mod images;
pub mod metrics;
pub mod network;
pub mod node;
pub mod server;
pub mod state;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod vmm;
