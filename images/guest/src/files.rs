//! File RPCs: stat, list, streamed reads of regular files, atomic streamed
//! writes (temp file in the same directory, checksum, fsync, rename),
//! mkdir, remove, rename, chmod/chown, SHA-256. Paths must be absolute;
//! sizes are bounded. Directories as tar streams live in `archive`.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::{
    FileChunk, FileInfo, FileType, WriteFileInput, WriteFileStart, write_file_input,
};

/// Read chunk size.
const CHUNK: usize = 256 * 1024;
/// Bytes per `FileChunk` a file read sends: larger messages mean fewer
/// wake-ups at every hop a download passes (the node agent, the gateway);
/// well under gRPC's default 4 MiB decoding limit.
const SEND_CHUNK: usize = 1 << 20;
/// Most entries one ListDir returns: keeps the reply under gRPC's default
/// 4 MiB message limit.
pub const MAX_LIST_ENTRIES: usize = 20_000;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path:?} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path:?} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("write of {path:?} sent more than the declared {declared} bytes")]
    MoreThanDeclared { path: PathBuf, declared: u64 },
    #[error("write of {path:?} ended after {got} of the declared {declared} bytes")]
    LessThanDeclared {
        path: PathBuf,
        got: u64,
        declared: u64,
    },
    #[error("the first WriteFile message must be WriteFileStart")]
    NoStart,
    #[error("{path:?} has more than {MAX_LIST_ENTRIES} entries")]
    TooManyEntries { path: PathBuf },
    #[error("refusing to remove /")]
    RemoveRoot,
    #[error("write of {path:?}: the bytes have SHA-256 {got}, not the expected {expected}")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("expected SHA-256 {0:?} is not 64 hex digits")]
    BadChecksum(String),
    #[error("set attributes of {path:?}: nothing to set")]
    NoAttributes { path: PathBuf },
    #[error("write stream of {path:?} broke")]
    Stream {
        path: PathBuf,
        #[source]
        source: Status,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = crate::report::chain(&e);
        match &e {
            Error::NotAbsolute(_)
            | Error::MoreThanDeclared { .. }
            | Error::LessThanDeclared { .. }
            | Error::NoStart
            | Error::RemoveRoot
            | Error::BadChecksum(_)
            | Error::NoAttributes { .. } => Status::invalid_argument(msg),
            Error::ChecksumMismatch { .. } => Status::data_loss(msg),
            Error::NotRegular { .. } => Status::failed_precondition(msg),
            Error::TooLarge { .. } | Error::TooManyEntries { .. } => {
                Status::resource_exhausted(msg)
            }
            Error::Stream { source, .. } => Status::new(source.code(), msg),
            Error::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Status::not_found(msg),
                io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => {
                    Status::invalid_argument(msg)
                }
                io::ErrorKind::AlreadyExists
                | io::ErrorKind::IsADirectory
                | io::ErrorKind::NotADirectory
                | io::ErrorKind::DirectoryNotEmpty
                | io::ErrorKind::ReadOnlyFilesystem
                | io::ErrorKind::CrossesDevices => Status::failed_precondition(msg),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                    Status::resource_exhausted(msg)
                }
                _ => Status::internal(msg),
            },
        }
    }
}

/// `path` as an absolute path, or an error.
pub fn to_path(path: &str) -> Result<PathBuf, Error> {
    let p = Path::new(path);
    if p.is_absolute() && !path.contains('\0') {
        Ok(p.to_path_buf())
    } else {
        Err(Error::NotAbsolute(path.to_string()))
    }
}

fn kind_name(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "regular file"
    }
}

/// Wire form of `meta` for `path` (not following a final symlink).
pub fn to_file_info(path: &Path, meta: &fs::Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileType::Regular
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    };
    let link_target = if ft.is_symlink() {
        fs::read_link(path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        r#type: kind as i32,
        size: meta.size(),
        mode: meta.mode(),
        modified_unix_nanos: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        uid: meta.uid(),
        gid: meta.gid(),
        link_target,
    }
}

pub fn stat(path: &Path) -> Result<FileInfo, Error> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    Ok(to_file_info(path, &meta))
}

pub fn list_dir(path: &Path) -> Result<Vec<FileInfo>, Error> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(io_err("list", path))? {
        let entry = entry.map_err(io_err("list", path))?;
        if entries.len() == MAX_LIST_ENTRIES {
            return Err(Error::TooManyEntries {
                path: path.to_path_buf(),
            });
        }
        let p = entry.path();
        // An entry removed while listing is simply not listed.
        if let Ok(meta) = fs::symlink_metadata(&p) {
            entries.push(to_file_info(&p, &meta));
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Opens `path` for a streamed read: a regular file of at most `limit` bytes.
/// O_NONBLOCK keeps a FIFO from blocking the open; it is refused right after.
pub fn open_for_read(path: &Path, limit: u64) -> Result<fs::File, Error> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(Error::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(meta.file_type()),
        });
    }
    if meta.len() > limit {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            limit,
        });
    }
    Ok(file)
}

/// Streams an opened file, stopping with an error if it grows past `limit`.
pub fn read_stream(
    path: PathBuf,
    mut file: fs::File,
    limit: u64,
) -> ReceiverStream<Result<FileChunk, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut sent = 0u64;
        let mut buf = vec![0u8; SEND_CHUNK];
        loop {
            let msg = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    sent += n as u64;
                    if sent > limit {
                        Err(Error::TooLarge {
                            path: path.clone(),
                            size: sent,
                            limit,
                        }
                        .into())
                    } else {
                        Ok(FileChunk {
                            data: buf[..n].to_vec().into(),
                        })
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => Err(Error::Io {
                    op: "read",
                    path: path.clone(),
                    source,
                }
                .into()),
            };
            let stop = msg.is_err();
            if tx.blocking_send(msg).is_err() || stop {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A temp file removed on drop unless renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn temp_path(target: &Path) -> Result<PathBuf, Error> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .ok_or_else(|| Error::NotAbsolute(target.display().to_string()))?;
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".wrenn-{}-{n}.tmp", std::process::id()));
    Ok(target.with_file_name(tmp))
}

/// Receives a WriteFile stream and makes the file appear atomically. Refuses
/// declared sizes over `limit`, and more or fewer bytes than declared; then
/// no file (partial or temp) is left behind.
pub async fn write(mut input: Streaming<WriteFileInput>, limit: u64) -> Result<FileInfo, Error> {
    let start = match input.message().await {
        Ok(Some(WriteFileInput {
            input: Some(write_file_input::Input::Start(start)),
        })) => start,
        _ => return Err(Error::NoStart),
    };
    let WriteFileStart {
        path,
        mode,
        size,
        make_parents,
        sha256: expected,
    } = start;
    let path = to_path(&path)?;
    let expected = match expected.as_str() {
        "" => None,
        e if e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(e.to_ascii_lowercase())
        }
        e => return Err(Error::BadChecksum(e.to_string())),
    };
    if size > limit {
        return Err(Error::TooLarge { path, size, limit });
    }
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    let (file, temp) = {
        let path = path.clone();
        blocking(move || {
            if make_parents && let Some(parent) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io_err("create parent of", &path))?;
            }
            let temp = TempFile {
                path: temp_path(&path)?,
                keep: false,
            };
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp.path)
                .map_err(io_err("create", &temp.path))?;
            Ok((file, temp))
        })
        .await?
    };
    let mut file = Some((file, Sha256::new()));
    let mut got = 0u64;
    loop {
        let data = match input.message().await {
            Ok(Some(WriteFileInput {
                input: Some(write_file_input::Input::Data(data)),
            })) => data,
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(source) => return Err(Error::Stream { path, source }),
        };
        got += data.len() as u64;
        if got > size {
            return Err(Error::MoreThanDeclared {
                path,
                declared: size,
            });
        }
        let (mut f, mut hash) = file.take().ok_or(Error::NoStart)?;
        let temp_path = temp.path.clone();
        file = Some(
            blocking(move || {
                f.write_all(&data).map_err(io_err("write", &temp_path))?;
                hash.update(&data);
                Ok((f, hash))
            })
            .await?,
        );
    }
    if got < size {
        return Err(Error::LessThanDeclared {
            path,
            got,
            declared: size,
        });
    }
    let (f, hash) = file.take().ok_or(Error::NoStart)?;
    if let Some(expected) = expected {
        let got = to_hex(&hash.finalize());
        if got != expected {
            // `temp` is dropped on return: no file is left behind.
            return Err(Error::ChecksumMismatch {
                path,
                expected,
                got,
            });
        }
    }
    blocking(move || {
        let mut temp = temp;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &temp.path))?;
        f.sync_all().map_err(io_err("sync", &temp.path))?;
        fs::rename(&temp.path, &path).map_err(io_err("rename into place", &path))?;
        temp.keep = true;
        stat(&path)
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::Io {
            op: "run blocking file task",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })
    })
}

pub fn make_dir(path: &Path, mode: u32, parents: bool) -> Result<FileInfo, Error> {
    let mode = if mode == 0 { 0o755 } else { mode & 0o7777 };
    fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode)
        .create(path)
        .map_err(io_err("create directory", path))?;
    stat(path)
}

pub fn remove(path: &Path, recursive: bool) -> Result<(), Error> {
    if path.parent().is_none() {
        return Err(Error::RemoveRoot);
    }
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path).map_err(io_err("remove directory tree", path))
        } else {
            fs::remove_dir(path).map_err(io_err("remove directory", path))
        }
    } else {
        fs::remove_file(path).map_err(io_err("remove", path))
    }
}

pub fn rename(from: &Path, to: &Path) -> Result<FileInfo, Error> {
    fs::rename(from, to).map_err(io_err("rename", from))?;
    stat(to)
}

/// chmod (`mode`, 07777) and/or chown (`uid`, `gid`) of `path`; chown does
/// not follow a final symlink.
pub fn set_attr(
    path: &Path,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<FileInfo, Error> {
    if mode.is_none() && uid.is_none() && gid.is_none() {
        return Err(Error::NoAttributes {
            path: path.to_path_buf(),
        });
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(path, uid, gid).map_err(io_err("chown", path))?;
    }
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io_err("chmod", path))?;
    }
    stat(path)
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (lowercase hex) and size of the regular file `path`.
pub fn checksum(path: &Path) -> Result<(String, u64), Error> {
    let mut file = open_for_read(path, u64::MAX)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok((to_hex(&hash.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_refused() {
        assert!(to_path("etc/passwd").is_err());
        assert!(to_path("").is_err());
        assert!(to_path("/etc/passwd").is_ok());
    }

    #[test]
    fn reads_refuse_dirs_devices_and_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_for_read(dir.path(), 10).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );
        let e = open_for_read(Path::new("/dev/null"), 10).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{e}"
        );
        let f = dir.path().join("f");
        fs::write(&f, b"0123456789ab").unwrap();
        assert!(matches!(
            open_for_read(&f, 10).unwrap_err(),
            Error::TooLarge { .. }
        ));
        assert!(open_for_read(&f, 12).is_ok());
    }

    #[test]
    fn checksum_chmod_and_chown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(
            checksum(&f).unwrap(),
            (
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_string(),
                3
            )
        );
        let info = set_attr(&f, Some(0o600), None, None).unwrap();
        assert_eq!(info.mode & 0o7777, 0o600);
        let me = fs::metadata(&f).unwrap();
        let info = set_attr(&f, None, Some(me.uid()), Some(me.gid())).unwrap();
        assert_eq!((info.uid, info.gid), (me.uid(), me.gid()));
        assert!(matches!(
            set_attr(&f, None, None, None),
            Err(Error::NoAttributes { .. })
        ));
        assert!(matches!(
            checksum(dir.path()),
            Err(Error::NotRegular { .. })
        ));
    }

    #[test]
    fn temp_files_sit_next_to_the_target_and_are_hidden() {
        let t = temp_path(Path::new("/a/b/file.txt")).unwrap();
        assert_eq!(t.parent(), Some(Path::new("/a/b")));
        assert!(
            t.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".file.txt.wrenn-")
        );
        assert!(matches!(
            remove(Path::new("/"), true),
            Err(Error::RemoveRoot)
        ));
    }
}
