//! `cp SRC DST`: a file or a directory between this machine and a capsule,
//! either way (`CAP:/path` names the capsule's side). Files are streamed
//! with their SHA-256: up, the guest checks the sum it was told; down, the
//! sum the guest reports is checked against what arrived. Directories go
//! as tar. Every transfer is a WebSocket ([`crate::transfer`]), so the API
//! server's request timeout does not cut a long one. Local file work runs
//! on blocking threads.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::cluster::Target;
use crate::transfer::{self, Session, encode, request_json};

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither or both sides name a capsule.
    #[error(
        "cp copies between this machine and a capsule: name exactly one side as CAPSULE:/path (got {src:?} and {dst:?})"
    )]
    Sides {
        /// First argument.
        src: String,
        /// Second argument.
        dst: String,
    },
    /// The gateway or the guest refused, or the stream broke.
    #[error("copy {what}")]
    Transfer {
        /// What was being copied.
        what: String,
        /// Why.
        #[source]
        source: transfer::Error,
    },
    /// A local file could not be read or written.
    #[error("{action} {}", path.display())]
    Local {
        /// What we did.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// What arrived is not what the guest holds.
    #[error("{}: SHA-256 {got} differs from the capsule's {want}; the partial file was removed", path.display())]
    Checksum {
        /// The local file.
        path: PathBuf,
        /// Of what arrived.
        got: String,
        /// The guest's.
        want: String,
    },
    /// A blocking task died.
    #[error("a local file task ended early")]
    Task(#[source] tokio::task::JoinError),
}

/// One side of a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// A path on this machine.
    Local(PathBuf),
    /// `CAPSULE:/absolute/path`.
    Remote {
        /// The capsule.
        capsule: String,
        /// Absolute path in it.
        path: String,
    },
}

/// Reads `CAP:/path` as the capsule's side, anything else as a local path
/// (pure). A capsule name is a DNS-1123 subdomain and the path absolute,
/// so `./a:b` and `/tmp/x:/y` stay local.
pub fn parse_side(arg: &str) -> Side {
    if let Some((cap, path)) = arg.split_once(':')
        && path.starts_with('/')
        && !cap.is_empty()
        && cap.len() <= 253
        && cap
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && cap
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && cap
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return Side::Remote {
            capsule: cap.to_string(),
            path: path.to_string(),
        };
    }
    Side::Local(PathBuf::from(arg))
}

/// Where a file lands when the target names a directory by a trailing
/// `/` (pure): inside it, under the source's name.
pub fn plan_target(target: &str, source_name: Option<&str>) -> String {
    match source_name {
        Some(name) if target.ends_with('/') => format!("{target}{name}"),
        _ => target.to_string(),
    }
}

/// Bytes per upload message (the gateway takes up to 1 MiB).
const CHUNK: usize = 256 << 10;

/// Copies `src` to `dst`; returns what it did, for the user.
pub async fn copy(target: &Target, src: &str, dst: &str) -> Result<String, Error> {
    match (parse_side(src), parse_side(dst)) {
        (Side::Local(from), Side::Remote { capsule, path }) => {
            upload(target, &from, &capsule, &path).await
        }
        (Side::Remote { capsule, path }, Side::Local(to)) => {
            download(target, &capsule, &path, &to).await
        }
        _ => Err(Error::Sides {
            src: src.into(),
            dst: dst.into(),
        }),
    }
}

fn local(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Local {
        action,
        path,
        source,
    }
}

fn remote(what: &str) -> impl FnOnce(transfer::Error) -> Error {
    let what = what.to_string();
    move |source| Error::Transfer { what, source }
}

async fn upload(target: &Target, from: &Path, capsule: &str, path: &str) -> Result<String, Error> {
    let meta = tokio::fs::metadata(from)
        .await
        .map_err(local("read", from))?;
    let what = format!("{} to {capsule}:{path}", from.display());
    if meta.is_dir() {
        // The directory's contents go into `path`, made if missing.
        request_json(
            target,
            capsule,
            http::Method::POST,
            "files",
            &format!("path={}&op=mkdir&recursive=true", encode(path)),
        )
        .await
        .map_err(remote(&what))?;
        let query = format!("path={}&op=tar&upload=true", encode(path));
        let mut s = Session::open(target, capsule, "files", &query)
            .await
            .map_err(remote(&what))?;
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let dir = from.to_path_buf();
        let packer = tokio::task::spawn_blocking(move || pack(&dir, tx));
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(local("pack", from))?;
            s.send(&chunk).await.map_err(remote(&what))?;
        }
        packer.await.map_err(Error::Task)?;
        s.finish().await.map_err(remote(&what))?;
        while s.next().await.map_err(remote(&what))?.is_some() {}
        return Ok(format!("copied directory {what}"));
    }
    let name = from.file_name().and_then(|n| n.to_str());
    let path = plan_target(path, name);
    let what = format!("{} to {capsule}:{path}", from.display());
    let sum = {
        let f = from.to_path_buf();
        tokio::task::spawn_blocking(move || sha256_of(&f))
            .await
            .map_err(Error::Task)?
            .map_err(local("read", from))?
    };
    let query = format!(
        "path={}&upload=true&size={}&sha256={sum}",
        encode(&path),
        meta.len()
    );
    let mut s = Session::open(target, capsule, "files", &query)
        .await
        .map_err(remote(&what))?;
    let mut file = tokio::fs::File::open(from)
        .await
        .map_err(local("open", from))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(local("read", from))?;
        if n == 0 {
            break;
        }
        s.send(&buf[..n]).await.map_err(remote(&what))?;
    }
    s.finish().await.map_err(remote(&what))?;
    while s.next().await.map_err(remote(&what))?.is_some() {}
    Ok(format!(
        "copied {what} ({} bytes, sha256 {sum})",
        meta.len()
    ))
}

async fn download(target: &Target, capsule: &str, path: &str, to: &Path) -> Result<String, Error> {
    let what = format!("{capsule}:{path} to {}", to.display());
    let stat = request_json(
        target,
        capsule,
        http::Method::GET,
        "files",
        &format!("path={}&op=stat&sha256=true", encode(path)),
    )
    .await
    .map_err(remote(&what))?;
    if stat["isDir"] == true {
        tokio::fs::create_dir_all(to)
            .await
            .map_err(local("create", to))?;
        let query = format!("path={}&op=tar", encode(path));
        let mut s = Session::open(target, capsule, "files", &query)
            .await
            .map_err(remote(&what))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(4);
        let dir = to.to_path_buf();
        let unpacker = tokio::task::spawn_blocking(move || unpack(rx, &dir));
        let mut received = Ok(());
        loop {
            match s.next().await {
                Ok(Some(b)) => {
                    if tx.send(b).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    received = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = unpacker.await.map_err(Error::Task)?;
        received.map_err(remote(&what))?;
        unpacked.map_err(local("unpack into", to))?;
        return Ok(format!("copied directory {what}"));
    }
    let to = if tokio::fs::metadata(to).await.is_ok_and(|m| m.is_dir()) {
        to.join(Path::new(path).file_name().unwrap_or_default())
    } else {
        to.to_path_buf()
    };
    let what = format!("{capsule}:{path} to {}", to.display());
    let want = stat["sha256"].as_str().unwrap_or_default().to_string();
    let mut s = Session::open(target, capsule, "files", &format!("path={}", encode(path)))
        .await
        .map_err(remote(&what))?;
    let mut file = tokio::fs::File::create(&to)
        .await
        .map_err(local("create", &to))?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    let outcome = async {
        while let Some(b) = s.next().await.map_err(remote(&what))? {
            hash.update(&b);
            bytes += b.len() as u64;
            file.write_all(&b).await.map_err(local("write", &to))?;
        }
        file.flush().await.map_err(local("write", &to))
    }
    .await;
    let got = hex(&hash.finalize());
    let outcome = outcome.and_then(|()| {
        if want.is_empty() || got == want {
            Ok(())
        } else {
            Err(Error::Checksum {
                path: to.clone(),
                got: got.clone(),
                want,
            })
        }
    });
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(&to).await;
    }
    outcome.map(|()| format!("copied {what} ({bytes} bytes, sha256 {got})"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of a local file (blocking).
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

/// Writes go to a channel in chunks, for [`pack`].
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }
}

/// Tars the contents of `dir` (blocking) into `tx`; symlinks stay links.
fn pack(dir: &Path, tx: mpsc::Sender<std::io::Result<Vec<u8>>>) {
    let mut b = tar::Builder::new(ChannelWriter {
        tx: tx.clone(),
        buf: Vec::new(),
    });
    b.follow_symlinks(false);
    let done = b
        .append_dir_all(".", dir)
        .and_then(|()| b.into_inner())
        .and_then(|mut w| std::io::Write::flush(&mut w));
    if let Err(e) = done {
        let _ = tx.blocking_send(Err(e));
    }
}

/// Reads chunks from a channel, for [`unpack`].
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Extracts a tar from `rx` into `dir` (blocking). The tar crate keeps
/// every entry inside `dir` (no `..`, no absolute paths, no writes
/// through a link): the capsule's side is not trusted.
fn unpack(rx: std::sync::mpsc::Receiver<bytes::Bytes>, dir: &Path) -> std::io::Result<()> {
    let mut a = tar::Archive::new(ChannelReader {
        rx,
        cur: bytes::Bytes::new(),
    });
    a.set_preserve_permissions(true);
    a.unpack(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_capsule_side_is_name_colon_absolute_path() {
        assert_eq!(
            parse_side("box:/tmp/a"),
            Side::Remote {
                capsule: "box".into(),
                path: "/tmp/a".into()
            }
        );
        for local in ["./box:/a", "/tmp/x:/y", "box:rel", "Box:/a", "a.txt", ":/a"] {
            assert_eq!(parse_side(local), Side::Local(local.into()), "{local}");
        }
    }

    #[test]
    fn a_trailing_slash_puts_the_file_inside() {
        assert_eq!(plan_target("/tmp/", Some("a.txt")), "/tmp/a.txt");
        assert_eq!(plan_target("/tmp/b", Some("a.txt")), "/tmp/b");
    }

    #[test]
    fn a_directory_packs_and_unpacks_with_its_links() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/f"), b"hi").unwrap();
        std::os::unix::fs::symlink("b/f", src.path().join("a/l")).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        pack(src.path(), tx);
        let (stx, srx) = std::sync::mpsc::sync_channel(64);
        while let Ok(c) = rx.try_recv() {
            stx.send(bytes::Bytes::from(c.unwrap())).unwrap();
        }
        drop(stx);
        let dst = tempfile::tempdir().unwrap();
        unpack(srx, dst.path()).unwrap();
        assert_eq!(std::fs::read(dst.path().join("a/b/f")).unwrap(), b"hi");
        assert_eq!(
            std::fs::read_link(dst.path().join("a/l")).unwrap(),
            Path::new("b/f")
        );
    }
}
