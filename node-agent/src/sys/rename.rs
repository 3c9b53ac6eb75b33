//! Replacing a file by renaming another over it without the cost ext4
//! adds to a plain replace: a `rename(2)` over an existing file makes
//! ext4 allocate and start writing the new file's data at once
//! (`auto_da_alloc`, about 0.15 ms a file here), while `renameat2(2)` with
//! `RENAME_EXCHANGE` swaps the two names atomically and does not. Callers
//! that need durability fsync themselves; the journal's write-ahead log
//! covers the rest.

use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

/// Puts `from` in place of `to` atomically: a reader of `to` sees the old
/// file or the new one. When `to` existed, its old file is left at `from`
/// (remove or overwrite it with a fresh create, not a truncate, which
/// ext4 would flush the same way).
pub fn replace(from: &Path, to: &Path) -> std::io::Result<()> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        // Nothing at `to` yet (its first write), or a filesystem without
        // the exchange: a plain rename.
        Err(Errno::ENOENT | Errno::EINVAL | Errno::ENOSYS) => std::fs::rename(from, to),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_in_the_new_file_and_leaves_the_old_one_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("new"), dir.path().join("cur"));
        std::fs::write(&from, b"one").unwrap();
        replace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"one");
        assert!(!from.exists(), "a first write is a plain rename");
        std::fs::write(&from, b"two").unwrap();
        replace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"two");
        assert_eq!(std::fs::read(&from).unwrap(), b"one");
    }
}
