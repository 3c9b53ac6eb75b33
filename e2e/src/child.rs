//! Child processes the harness starts (node agents, the operator, the
//! gateway): stopping them with a grace period and showing the end of
//! their logs. Apart from `local` and `agent` so neither imports the other
//! for them.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Sends `signal` and waits up to `grace`, then SIGKILL.
pub(crate) fn stop_child(child: Option<Child>, signal: &str, grace: Duration) {
    let Some(mut child) = child else {
        return;
    };
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
