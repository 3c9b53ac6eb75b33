//! Files a VMM writes without end: the guest's serial console (a guest can
//! print as fast as the VMM emulates a UART), the VMM's own log and Cloud
//! Hypervisor's event monitor. Each is capped in place: once it holds more
//! than its cap on disk, everything but its newest half is punched out
//! (`fallocate(PUNCH_HOLE)`), which frees the blocks without the writer
//! noticing: VMMs open these files themselves, without `O_APPEND`, so a
//! truncate would leave them writing at their old offset anyway. The agent
//! reads only a file's tail ([`read_tail`]).
//!
//! [`run`] sweeps every capsule's run directory on an interval; between two
//! sweeps a file can grow by what its writer manages in one interval.

use std::io::{self, Read, Seek};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Cloud Hypervisor's serial console file in a run directory.
pub const CH_SERIAL_LOG: &str = "serial.log";
/// QEMU's serial console file in a run directory.
pub const QEMU_CONSOLE_LOG: &str = "console.log";
/// The VMM's stdout and stderr.
pub const VMM_LOG: &str = "vmm.log";
/// Cloud Hypervisor's event monitor.
pub const EVENTS: &str = "events.json";

/// Every capped file of a run directory.
pub const CAPPED: [&str; 4] = [CH_SERIAL_LOG, QEMU_CONSOLE_LOG, VMM_LOG, EVENTS];

/// The default cap of each file.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;

/// How often [`run`] sweeps.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Punches out all but the newest half of `path` when it holds more than
/// `max_bytes` on disk. Returns the bytes freed. Blocking.
pub fn cap_file(path: &Path, max_bytes: u64) -> io::Result<u64> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let held = meta.blocks() * 512;
    if !meta.is_file() || held <= max_bytes {
        return Ok(0);
    }
    // Block-aligned, so the punched range frees whole blocks.
    let block = meta.blksize().max(512);
    let end = meta.len().saturating_sub(max_bytes / 2) / block * block;
    if end == 0 {
        return Ok(0);
    }
    nix::fcntl::fallocate(
        &file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        i64::try_from(end).unwrap_or(i64::MAX),
    )
    .map_err(io::Error::from)?;
    let after = file.metadata()?.blocks() * 512;
    Ok(held.saturating_sub(after))
}

/// Caps every [`CAPPED`] file of every run directory under `root`;
/// returns the bytes freed. Blocking.
pub fn sweep(root: &Path, max_bytes: u64) -> u64 {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut freed = 0;
    for dir in dirs.flatten() {
        for name in CAPPED {
            let path = dir.path().join(name);
            match cap_file(&path, max_bytes) {
                Ok(n) => freed += n,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "cap a VMM log");
                }
            }
        }
    }
    freed
}

/// Sweeps `root` every `every` (the agent: [`SWEEP_EVERY`]) until `stop`
/// resolves.
pub async fn run(
    root: PathBuf,
    max_bytes: u64,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let root = root.clone();
        match tokio::task::spawn_blocking(move || sweep(&root, max_bytes)).await {
            Ok(0) => {}
            Ok(freed) => tracing::debug!(freed, "capped VMM logs"),
            Err(e) => tracing::warn!(error = &e as &dyn std::error::Error, "VMM log sweep"),
        }
    }
}

/// At most the last `max_bytes` of `path`, as text, without the zeros
/// of a punched-out head. Blocking.
pub fn read_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(io::SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut bytes = Vec::new();
    f.take(max_bytes).read_to_end(&mut bytes)?;
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
}

/// The tail of the serial console in run directory `dir`, whichever VMM
/// wrote it; empty when there is none.
pub fn console_tail(dir: &Path, max_bytes: u64) -> String {
    [CH_SERIAL_LOG, QEMU_CONSOLE_LOG]
        .iter()
        .find_map(|n| read_tail(&dir.join(n), max_bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_over_its_cap_keeps_its_newest_half_and_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CH_SERIAL_LOG);
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..4096 {
            writeln!(f, "line {i:06} {}", "x".repeat(240)).unwrap();
        }
        f.sync_all().unwrap();
        let len = f.metadata().unwrap().len();
        assert!(cap_file(&path, 256 << 10).unwrap() > 0);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), len, "the writer's offset stays valid");
        assert!(meta.blocks() * 512 <= 256 << 10, "{}", meta.blocks());
        // Below the cap: nothing to do.
        assert_eq!(cap_file(&path, 256 << 10).unwrap(), 0);
        // The tail is intact, the punched head reads as nothing.
        let tail = read_tail(&path, 4096).unwrap();
        assert!(tail.ends_with(&format!("line 004095 {}\n", "x".repeat(240))));
        let all = read_tail(&path, len).unwrap();
        assert!(
            !all.starts_with('\0') && all.len() < (200 << 10),
            "{}",
            all.len()
        );
        assert!(all.contains("line 004095"));
    }
}
