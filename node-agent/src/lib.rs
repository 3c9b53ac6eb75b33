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

/// An error and its sources on one line (`a: b: c`), for messages that
/// reach a Capsule or a log once.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
