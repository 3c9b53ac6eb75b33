//! Opening a name strictly beneath a directory with `openat2(2)`: no
//! symlink (or `/proc` magic link) is followed, no `..` or absolute path
//! leaves the directory. `images::dirs` decides which directories and what
//! kind of file is acceptable; this module only asks the kernel.

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::{Mode, fstat};

/// What a name opened beneath a directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A block device node.
    BlockDevice,
    /// A character device node.
    CharDevice,
    /// A FIFO.
    Fifo,
    /// A Unix socket.
    Socket,
    /// Anything else (never a symlink: those are refused while resolving).
    Other,
}

/// Opens `name` beneath `dir` as an `O_PATH` descriptor and says what it
/// is. `O_PATH` opens nothing behind the name: a FIFO does not block, a
/// device's driver is not called. Errors are the kernel's: `ELOOP` for a
/// symlink anywhere in `name`, `EXDEV` for a name that would leave `dir`,
/// `ENOENT`, `ENOTDIR`, `ENOSYS` before Linux 5.6. Blocking.
pub fn open_beneath(dir: &Path, name: &Path) -> Result<(OwnedFd, FileKind), Errno> {
    // The directory itself comes from the node admin's flags and may be
    // reached through symlinks; only what is beneath it is constrained.
    let dirfd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let how = OpenHow::new()
        // No O_NOFOLLOW: with O_PATH it would open a trailing symlink
        // itself; without it RESOLVE_NO_SYMLINKS refuses it (ELOOP).
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = openat2(&dirfd, name, how)?;
    // O_PATH descriptors can be fstat'ed (Linux 3.6+).
    let st = fstat(&fd)?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFBLK => FileKind::BlockDevice,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        _ => FileKind::Other,
    };
    Ok((fd, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_refuses_every_way_out_of_the_directory() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("images");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(outer.path().join("secret"), b"key").unwrap();
        std::fs::write(dir.join("disk.ext4"), b"ext4").unwrap();
        std::fs::create_dir(dir.join("kernels")).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("link")).unwrap();
        std::os::unix::fs::symlink(outer.path(), dir.join("up")).unwrap();

        let kind = |n: &str| open_beneath(&dir, Path::new(n)).map(|(_, k)| k);
        assert_eq!(kind("disk.ext4"), Ok(FileKind::Regular));
        assert_eq!(kind("kernels"), Ok(FileKind::Directory));
        assert_eq!(kind("../secret"), Err(Errno::EXDEV));
        assert_eq!(kind("kernels/../../secret"), Err(Errno::EXDEV));
        assert_eq!(
            kind(outer.path().join("secret").to_str().unwrap()),
            Err(Errno::EXDEV)
        );
        assert_eq!(kind("link"), Err(Errno::ELOOP));
        assert_eq!(kind("up/secret"), Err(Errno::ELOOP));
        assert_eq!(kind("missing"), Err(Errno::ENOENT));
        assert_eq!(kind("disk.ext4/x"), Err(Errno::ENOTDIR));
        assert_eq!(kind("/proc/self/root/etc/passwd"), Err(Errno::EXDEV));
    }
}
