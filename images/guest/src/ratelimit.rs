//! Rate limits for log lines a caller can trigger (firecracker's
//! `rate_limited.rs`): at most `burst` lines per second per call site, and a
//! count of what was dropped once the next second lets a line through.

use std::sync::Mutex;
use std::time::Instant;

/// One call site's budget.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl RateLimit {
    /// At most `burst` lines per second.
    pub const fn new(burst: u32) -> Self {
        Self {
            burst,
            state: Mutex::new(None),
        }
    }

    /// `Some(dropped since the last allowed line)` when a line may be logged now.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count, dropped) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start).as_secs() >= 1 {
            *start = now;
            *count = 0;
        }
        if *count < self.burst {
            *count += 1;
            Some(std::mem::take(dropped))
        } else {
            *dropped += 1;
            None
        }
    }
}

/// `tracing::warn!` through a per-call-site [`RateLimit`] of 10 lines a second.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new(10);
        if let Some(dropped) = LIMIT.allow(::std::time::Instant::now()) {
            ::tracing::warn!(dropped, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn drops_past_the_burst_and_counts_them() {
        let limit = RateLimit::new(2);
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0), None);
        assert_eq!(limit.allow(t0), None);
        assert_eq!(limit.allow(t0 + Duration::from_millis(1100)), Some(2));
    }
}
