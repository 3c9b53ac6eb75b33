//! Directories as tar streams: `ReadTar` packs one (symlinks stored as
//! symlinks, never followed, so nothing outside it leaks), `WriteTar`
//! extracts one as its bytes arrive. Every entry of an upload is checked
//! before it is written ([`check_entry`]): an absolute path, a `..`, a
//! symlink or hard link leading out of the directory, or a path through a
//! symlink that leaves it (the tar crate's own check at unpack) fails the
//! call. Entries before the bad one stay extracted: the stream is not
//! buffered.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use wrenn_proto::guest::v1::{FileChunk, WriteTarInput, WriteTarResponse, write_tar_input};

use crate::files;

/// Bytes per chunk sent while packing.
const CHUNK: usize = 256 * 1024;
/// Upload chunks queued towards the unpacking thread.
const QUEUE: usize = 8;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Files(#[from] files::Error),
    #[error("the first WriteTar message must be WriteTarStart")]
    NoStart,
    #[error("tar entry {entry:?} is refused: {why}")]
    Escape { entry: String, why: &'static str },
    #[error("{op} tar entry {entry:?} in {dir:?}")]
    Unpack {
        op: &'static str,
        entry: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read the tar stream for {dir:?}")]
    Read {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pack {dir:?} as tar")]
    Pack {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = crate::report::chain(&e);
        match e {
            Error::Files(f) => f.into(),
            Error::NoStart | Error::Escape { .. } | Error::Read { .. } => {
                Status::invalid_argument(msg)
            }
            Error::Unpack { source, .. } | Error::Pack { source, .. } => match source.kind() {
                io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                io::ErrorKind::NotFound => Status::not_found(msg),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                    Status::resource_exhausted(msg)
                }
                // The tar crate refuses a path through a symlink leaving
                // the directory with an `Other` error naming it.
                io::ErrorKind::Other | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                    Status::invalid_argument(msg)
                }
                _ => Status::internal(msg),
            },
        }
    }
}

/// What kind of entry [`check_entry`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A symlink whose target is the link name.
    Symlink,
    /// A hard link to the link name (relative to the directory).
    HardLink,
    /// Anything else.
    Other,
}

/// How many directories deep `path` stays below the directory, checking
/// each step (pure); `None` when it starts at `/` or climbs out.
fn depth_inside(start: usize, path: &Path) -> Result<usize, &'static str> {
    let mut depth = start;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("it leads out of the directory")?;
            }
            Component::RootDir | Component::Prefix(_) => return Err("it is absolute"),
        }
    }
    Ok(depth)
}

/// Whether an entry named `path` (of `kind`, linking to `link`) stays in
/// the directory it is extracted into (pure).
pub fn check_entry(path: &Path, kind: EntryKind, link: Option<&Path>) -> Result<(), &'static str> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("its path contains \"..\"");
    }
    let depth = depth_inside(0, path)?;
    match (kind, link) {
        (EntryKind::Symlink, Some(target)) => {
            // Resolved from the symlink's own directory.
            depth_inside(depth.saturating_sub(1), target)
                .map_err(|_| "it is a symlink leading out of the directory")?;
        }
        (EntryKind::HardLink, Some(target)) => {
            if target.components().any(|c| c == Component::ParentDir) {
                return Err("it is a hard link leading out of the directory");
            }
            depth_inside(0, target)
                .map_err(|_| "it is a hard link leading out of the directory")?;
        }
        (EntryKind::Symlink | EntryKind::HardLink, None) => {
            return Err("it is a link without a target");
        }
        (EntryKind::Other, _) => {}
    }
    Ok(())
}

/// Sends what is written as `FileChunk`s, `CHUNK` bytes at a time.
struct ChunkWriter {
    tx: mpsc::Sender<Result<FileChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(FileChunk { data: data.into() }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Streams `dir` as a tar archive (entries relative to it).
pub fn read(dir: PathBuf) -> ReceiverStream<Result<FileChunk, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let err = tx.clone();
        let packed = (|| {
            let meta = std::fs::metadata(&dir).map_err(|source| files::Error::Io {
                op: "stat",
                path: dir.clone(),
                source,
            })?;
            if !meta.is_dir() {
                return Err(Error::Pack {
                    dir: dir.clone(),
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                });
            }
            let pack = |source| Error::Pack {
                dir: dir.clone(),
                source,
            };
            let mut b = tar::Builder::new(ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            });
            b.follow_symlinks(false);
            b.append_dir_all("", &dir).map_err(pack)?;
            let mut w = b.into_inner().map_err(pack)?;
            w.flush().map_err(pack)
        })();
        if let Err(e) = packed {
            let _ = err.blocking_send(Err(e.into()));
        }
    });
    ReceiverStream::new(rx)
}

/// Reads the upload's data messages as one byte stream (blocking).
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(next)) => {
                    self.cur = next;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Extracts an uploaded tar stream into the directory its first message
/// names (created if absent).
pub async fn write(mut input: Streaming<WriteTarInput>) -> Result<WriteTarResponse, Error> {
    let dir = match input.message().await {
        Ok(Some(WriteTarInput {
            input: Some(write_tar_input::Input::Start(s)),
        })) => files::to_path(&s.dir)?,
        _ => return Err(Error::NoStart),
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let item = match input.message().await {
                Ok(Some(WriteTarInput {
                    input: Some(write_tar_input::Input::Data(d)),
                })) => Ok(d),
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(s) => Err(io::Error::other(s.message().to_string())),
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    let reader = ChunkReader {
        rx,
        cur: Vec::new(),
        pos: 0,
    };
    tokio::task::spawn_blocking(move || unpack(&dir, reader))
        .await
        .unwrap_or_else(|e| {
            Err(Error::Read {
                dir: PathBuf::new(),
                source: io::Error::other(e.to_string()),
            })
        })
}

fn unpack(dir: &Path, reader: impl Read) -> Result<WriteTarResponse, Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| files::Error::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
    let read = |source| Error::Read {
        dir: dir.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_overwrite(true);
    let mut entries = 0u64;
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        let path = entry.path().map_err(read)?.into_owned();
        let name = path.display().to_string();
        let kind = match entry.header().entry_type() {
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::HardLink,
            _ => EntryKind::Other,
        };
        let link = entry.link_name().map_err(read)?.map(|l| l.into_owned());
        check_entry(&path, kind, link.as_deref()).map_err(|why| Error::Escape {
            entry: name.clone(),
            why,
        })?;
        let unpacked = entry.unpack_in(dir).map_err(|source| Error::Unpack {
            op: "extract",
            entry: name.clone(),
            dir: dir.to_path_buf(),
            source,
        })?;
        if !unpacked {
            return Err(Error::Escape {
                entry: name,
                why: "it would land outside the directory",
            });
        }
        entries += 1;
    }
    Ok(WriteTarResponse { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_that_leave_the_directory_are_refused() {
        let ok = |p: &str, k, l: Option<&str>| check_entry(Path::new(p), k, l.map(Path::new));
        assert!(ok("a/b.txt", EntryKind::Other, None).is_ok());
        assert!(ok("./a/", EntryKind::Other, None).is_ok());
        assert!(ok("a/link", EntryKind::Symlink, Some("../b.txt")).is_ok());
        assert!(ok("a/link", EntryKind::Symlink, Some("c/d")).is_ok());
        assert!(ok("h", EntryKind::HardLink, Some("a/b.txt")).is_ok());
        assert!(ok("/etc/passwd", EntryKind::Other, None).is_err());
        assert!(ok("../x", EntryKind::Other, None).is_err());
        assert!(ok("a/../../x", EntryKind::Other, None).is_err());
        assert!(ok("link", EntryKind::Symlink, Some("/etc")).is_err());
        assert!(ok("a/link", EntryKind::Symlink, Some("../../etc")).is_err());
        assert!(ok("h", EntryKind::HardLink, Some("/etc/shadow")).is_err());
        assert!(ok("h", EntryKind::HardLink, Some("../x")).is_err());
    }

    #[test]
    fn a_symlinked_parent_leaving_the_directory_is_refused_at_unpack() {
        let root = tempfile::tempdir().unwrap();
        let (dir, outside) = (root.path().join("in"), root.path().join("out"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        // Made before the upload, as a user in the capsule could.
        std::os::unix::fs::symlink(&outside, dir.join("sneaky")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "sneaky/owned", &b"hi"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let e = unpack(&dir, &bytes[..]).unwrap_err();
        assert!(!outside.join("owned").exists(), "{e}");
    }

    #[test]
    fn a_directory_round_trips() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"data").unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("l")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all("", &src).unwrap();
        let bytes = b.into_inner().unwrap();
        let dst = root.path().join("dst");
        let n = unpack(&dst, &bytes[..]).unwrap().entries;
        assert_eq!(n, 3);
        assert_eq!(std::fs::read(dst.join("sub/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::read_link(dst.join("l")).unwrap(),
            Path::new("sub/f")
        );
    }
}
