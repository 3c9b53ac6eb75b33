//! The image cache's quota: what the cache holds on disk, and which
//! template disks and pulled layouts go first when it is over its quota
//! (least recently used first).
//!
//! A template disk's atime is its last use: [`stamp`] sets it each time a
//! build returns it (its mtime, the build, stays), so a disk handed to a capsule moments ago is never
//! taken before that capsule's journal names it ([`LEASE`]). Disks that a
//! capsule, snapshot or build names (the caller's keep set, compared by
//! inode so path spelling does not matter) are never candidates. Lock
//! files stay: removing a file another process may hold a `flock` on would
//! break the lock.
//!
//! [`plan_eviction`] is pure; [`list`], [`stamp`] and [`remove`] touch the
//! disk and are blocking.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a template disk handed out stays out of reach of eviction,
/// whatever the journals say: the capsule that asked journals it within
/// seconds, this leaves minutes.
pub const LEASE: Duration = Duration::from_secs(600);

/// The default quota of the image cache.
pub const DEFAULT_MAX_BYTES: u64 = 100 << 30;

/// What a candidate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A template disk (`sha256-<hex>/rootfs-*.ext4`).
    Template,
    /// A pulled layout (`pulls/<hash>/`), kept only to spare a re-download.
    Pull,
}

/// Something the cache may drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// File or directory.
    pub path: PathBuf,
    /// What it holds on disk.
    pub bytes: u64,
    /// Its last use.
    pub used_at: SystemTime,
    /// Device and inode, to compare with the keep set.
    pub id: (u64, u64),
    /// What it is.
    pub kind: Kind,
}

/// The candidates to drop, oldest use first, until `held` is at most
/// `target`: never one in `keep`, never a template used within [`LEASE`]
/// of `now`. Whether that was enough is the caller's question.
pub fn plan_eviction<'a>(
    candidates: &'a [Candidate],
    held: u64,
    target: u64,
    keep: &BTreeSet<(u64, u64)>,
    now: SystemTime,
) -> Vec<&'a Candidate> {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !keep.contains(&c.id))
        .filter(|c| {
            c.kind == Kind::Pull || now.duration_since(c.used_at).is_ok_and(|age| age >= LEASE)
        })
        .collect();
    eligible.sort_by_key(|c| c.used_at);
    let mut left = held;
    let mut out = Vec::new();
    for c in eligible {
        if left <= target {
            break;
        }
        left = left.saturating_sub(c.bytes);
        out.push(c);
    }
    out
}

/// Bytes allocated under `root` (not following symlinks; each inode once).
pub fn allocated(root: &Path) -> u64 {
    allocated_in(&[root.to_path_buf()])
}

/// Bytes allocated under all of `roots`, each inode counted once (hard
/// links between them, as snapshot bases are, cost nothing extra).
pub fn allocated_in(roots: &[PathBuf]) -> u64 {
    let mut seen = BTreeSet::new();
    let mut total = 0;
    let mut stack = roots.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    total
}

fn children(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn named(p: &Path, f: impl Fn(&str) -> bool) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(f)
}

/// What the cache in `dir` holds in all, and what it could drop.
pub fn list(dir: &Path) -> (u64, Vec<Candidate>) {
    let mut out = Vec::new();
    let candidate = |path: PathBuf, stamp: &Path, kind| {
        let meta = std::fs::symlink_metadata(&path).ok()?;
        let used_at = std::fs::symlink_metadata(stamp)
            .and_then(|m| match kind {
                Kind::Template => m.accessed(),
                // Rewritten by every pull of its reference.
                Kind::Pull => m.modified(),
            })
            .ok()?;
        let bytes = if meta.is_dir() {
            allocated(&path)
        } else {
            meta.blocks() * 512
        };
        Some(Candidate {
            id: (meta.dev(), meta.ino()),
            path,
            bytes,
            used_at,
            kind,
        })
    };
    for entry in children(dir) {
        if !named(&entry, |n| n.starts_with("sha256-")) || !entry.is_dir() {
            continue;
        }
        for file in children(&entry) {
            if named(&file, |n| n.starts_with("rootfs-") && n.ends_with(".ext4")) {
                out.extend(candidate(file.clone(), &file, Kind::Template));
            }
        }
    }
    for pull in children(&dir.join("pulls")) {
        out.extend(candidate(
            pull.clone(),
            &pull.join("index.json"),
            Kind::Pull,
        ));
    }
    (allocated(dir), out)
}

/// Marks the template disk at `path` as used now. `NotFound` when it was
/// dropped meanwhile.
pub fn stamp(path: &Path) -> io::Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_OMIT,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Drops `c`: a template's entry directory goes with its last disk.
pub fn remove(c: &Candidate) -> io::Result<()> {
    match c.kind {
        Kind::Pull => std::fs::remove_dir_all(&c.path),
        Kind::Template => {
            std::fs::remove_file(&c.path)?;
            if let Some(entry) = c.path.parent() {
                // Fails while other disks or a build are in it: fine.
                let _ = std::fs::remove_dir(entry);
            }
            Ok(())
        }
    }
}

/// Device and inode of each path that exists.
pub fn ids(paths: &[PathBuf]) -> BTreeSet<(u64, u64)> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, bytes: u64, age_secs: u64, ino: u64, kind: Kind) -> Candidate {
        Candidate {
            path: name.into(),
            bytes,
            used_at: SystemTime::UNIX_EPOCH + Duration::from_secs(100_000 - age_secs),
            id: (1, ino),
            kind,
        }
    }

    #[test]
    fn least_recently_used_go_first_and_kept_or_leased_never() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        let all = vec![
            c("old", 10, 9000, 1, Kind::Template),
            c("older-but-kept", 10, 9999, 2, Kind::Template),
            c("fresh", 10, 5, 3, Kind::Template),
            c("middle", 10, 3000, 4, Kind::Template),
            c("pull", 10, 1, 5, Kind::Pull),
        ];
        let keep = BTreeSet::from([(1, 2)]);
        let names = |v: Vec<&Candidate>| {
            v.iter()
                .map(|c| c.path.display().to_string())
                .collect::<Vec<_>>()
        };
        // 50 held, target 35: two must go, oldest first.
        assert_eq!(
            names(plan_eviction(&all, 50, 35, &keep, now)),
            ["old", "middle"]
        );
        // Everything evictable still leaves the kept and the fresh one.
        assert_eq!(
            names(plan_eviction(&all, 50, 0, &keep, now)),
            ["old", "middle", "pull"]
        );
        assert!(plan_eviction(&all, 50, 50, &keep, now).is_empty());
    }

    #[test]
    fn stamping_a_dropped_disk_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rootfs-1-g0.ext4");
        std::fs::write(&f, b"x").unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_accessed(old)
                    .set_modified(old),
            )
            .unwrap();
        stamp(&f).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert!(m.accessed().unwrap() > old);
        assert_eq!(m.modified().unwrap(), old, "the build time stays");
        std::fs::remove_file(&f).unwrap();
        assert_eq!(stamp(&f).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
