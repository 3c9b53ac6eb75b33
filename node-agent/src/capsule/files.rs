//! File work of suspend images and snapshots: staging directories swapped
//! into place, sparse disk copies, secrets only root reads, sizes on disk.
//! All blocking: callers run it off the async workers where it may take
//! long (a disk copy), or accept a short stall (a rename, an fsync).

use std::path::Path;

use super::model::Error;

/// Runs blocking host work (netlink threads, loop ioctls, disk copies) off
/// the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    uid: &str,
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Aborted {
            what,
            uid: uid.to_string(),
        })?
}

/// Removes `path` and everything under it; absent is fine.
pub(crate) fn remove_dir(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Files {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Maps an I/O error of `action` on `path` to [`Error::Files`].
pub(crate) fn files(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Files {
        action,
        path,
        source,
    }
}

/// Puts a complete `staging` directory at `dest`: the old `dest` (if any) is
/// renamed aside first and removed only after the swap, so a crash leaves
/// one complete directory either way.
pub(crate) fn swap_into_place(staging: &Path, dest: &Path) -> Result<(), Error> {
    crate::state::sync_tree(staging).map_err(files("fsync", staging))?;
    let old = dest.with_extension("old");
    remove_dir(&old)?;
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(files("move aside", dest))?;
    }
    std::fs::rename(staging, dest).map_err(files("rename into place", dest))?;
    if let Some(parent) = dest.parent() {
        crate::state::sync_dir(parent).map_err(files("fsync", parent))?;
    }
    remove_dir(&old)
}

/// Writes `secret` to a new file only root can read.
pub(crate) fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())
}

/// Copies a disk (a file or a block device) keeping holes where the source
/// reads zeros, so a sparse CoW stays sparse.
pub(crate) fn copy_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len: u64 = 0;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
        len += n as u64;
    }
    dst.set_len(len)?;
    dst.sync_all()
}

pub(crate) fn dir_allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}
