//! The bench process's own resident memory (shared by `supervisor` and
//! `vmm`).

/// `VmRSS` of this process in KiB, 0 when unreadable.
pub fn rss_kib() -> u64 {
    wrenn_testkit::status_kib("self", "VmRSS")
}
