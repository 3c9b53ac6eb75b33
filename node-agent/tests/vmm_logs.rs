//! A guest flooding its serial console (Tier::Host): a fake guest process
//! writes to a run directory's `serial.log` the way Cloud Hypervisor does
//! (opened once, no `O_APPEND`, written as fast as it can), while the
//! agent's log sweep runs. The file's blocks on disk stay near the cap
//! whatever the guest wrote, the writer never notices, and the agent reads
//! only the tail.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wrenn_node_agent::vmm::logs;
use wrenn_testkit::Tier;

const CAP: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_stays_within_the_cap_and_only_the_tail_is_read() {
    let case = wrenn_testkit::case(
        Tier::Host,
        "a_console_flood_stays_within_the_cap_and_only_the_tail_is_read",
    );
    if let Err(why) = wrenn_testkit::need_program("sh") {
        return case.skip(why);
    }
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("capsule-1");
    std::fs::create_dir(&run_dir).unwrap();
    let serial = run_dir.join(logs::CH_SERIAL_LOG);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sweeper = tokio::spawn(logs::run(
        root.path().to_path_buf(),
        CAP,
        Duration::from_millis(50),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // `>` opens O_WRONLY|O_CREAT|O_TRUNC, as CH opens its serial file.
    let line = "x".repeat(200);
    let mut guest = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while :; do echo \"guest $i {line}\"; i=$((i+1)); done > '{}'",
            serial.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    // Flood until the guest has written 32 times the cap (or 60 s pass on
    // a slow machine), sampling what the file holds on disk.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut most_held = 0;
    let mut written = 0;
    while Instant::now() < deadline && written < 32 * CAP {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Ok(m) = std::fs::metadata(&serial) {
            most_held = most_held.max(m.blocks() * 512);
            written = m.len();
        }
    }
    // The guest is still writing: the sweep never stopped it.
    assert!(guest.try_wait().unwrap().is_none(), "the guest stopped");
    guest.kill().unwrap();
    guest.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    sweeper.await.unwrap();

    let meta = std::fs::metadata(&serial).unwrap();
    eprintln!(
        "guest wrote {} bytes; the file held at most {most_held}, holds {} now",
        meta.len(),
        meta.blocks() * 512
    );
    if written < 32 * CAP {
        return case.skip(format!("the fake guest wrote only {written} bytes in 60 s"));
    }
    assert!(
        meta.blocks() * 512 <= CAP,
        "{} bytes held",
        meta.blocks() * 512
    );
    // Between two sweeps the guest adds what it writes meanwhile (50 ms, or
    // longer when the sweeper waits for a busy core): far from what it
    // wrote in all, which an unswept file would hold.
    assert!(most_held < written / 2, "held {most_held} of {written}");

    // The agent's read: the tail only, whole guest lines up to its last
    // newline. What follows that may be half a line: the guest was killed
    // at any point of a write (a write across a page boundary can stop
    // between its pages on SIGKILL; seen once in CI).
    let tail = logs::console_tail(&run_dir, 16 << 10);
    assert!(tail.len() <= 16 << 10, "{}", tail.len());
    let whole = &tail[..tail.rfind('\n').map_or(0, |i| i + 1)];
    let last = whole.lines().last().unwrap();
    assert!(
        last.starts_with("guest ") && last.ends_with(&line),
        "{last}"
    );
}
