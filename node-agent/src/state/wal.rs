//! The journal's write-ahead log, `<state>/journal.wal`: what makes a
//! batch of journal changes durable with one `fdatasync` of one file,
//! where writing each capsule's journal file durably costs a file and a
//! directory fsync per capsule (about 0.3 ms each here, and ext4 merges
//! concurrent ones only partly).
//!
//! The log is a header and a sequence of frames, each
//! `[payload length u32][crc32 of payload u32][payload]` with the payload
//! `[kind u8][uid length u16][uid][record]`, little-endian. A crash can
//! tear only the frames being appended, which were never acknowledged, so
//! reading stops at the first frame that is short or fails its checksum.
//! A log is never truncated in place (a shrink that did not reach the
//! disk would bring old frames back behind new ones): it is replaced by a
//! fresh file renamed over it.

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// First bytes of every log; another value is refused, never guessed at.
const MAGIC: &[u8; 8] = b"WRNWAL01";
const KIND_RECORD: u8 = 1;
const KIND_REMOVED: u8 = 2;
/// Frame header: payload length and checksum.
const HEADER: usize = 8;
/// Largest payload reading accepts (a record is a few KiB): a length
/// beyond it is a torn frame, not an allocation to make.
const MAX_PAYLOAD: usize = 64 << 20;

/// A change to one capsule's journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The capsule's whole new record.
    Record(Vec<u8>),
    /// The capsule's directory is gone.
    Removed,
}

/// An open log, appended to by the journal's one writer.
#[derive(Debug)]
pub struct Wal {
    file: File,
    /// Bytes known good: appends go here, a failed one is cut back to it.
    len: u64,
}

impl Wal {
    /// A new empty log at `path`, replacing any there durably: written
    /// and fsynced as a temp file, renamed over, the directory fsynced.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let tmp = temp_path(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = File::create(&tmp)?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self {
            file,
            len: MAGIC.len() as u64,
        })
    }

    /// Bytes in the log.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends `changes` and makes them durable with one `fdatasync`. On
    /// failure the log is cut back to what it held before, so a later
    /// append never follows a torn frame; when even that fails the error
    /// says so and the log must be replaced before it is used again.
    pub fn append<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (&'a str, &'a Change)>,
    ) -> Result<(), AppendError> {
        let mut buf = Vec::new();
        for (uid, change) in changes {
            encode_frame(&mut buf, uid, change)?;
        }
        let written = self
            .file
            .write_all_at(&buf, self.len)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(source) => match self.file.set_len(self.len) {
                Ok(()) => Err(AppendError::Failed(source)),
                Err(_) => Err(AppendError::Torn(source)),
            },
        }
    }
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Nothing was appended; the log can take the next batch.
    #[error("append to the journal log")]
    Failed(#[source] std::io::Error),
    /// The append failed and the log could not be cut back: it may end in
    /// a torn frame.
    #[error("append to the journal log, which could not be cut back")]
    Torn(#[source] std::io::Error),
}

impl From<std::io::Error> for AppendError {
    fn from(e: std::io::Error) -> Self {
        AppendError::Failed(e)
    }
}

/// Appends one change to the log at `path` from outside its writer (a
/// tool or a test standing in for an agent that stopped): a later replay
/// then ends with it. No log there is nothing to do (`false`).
pub fn append_outside(path: &Path, uid: &str, change: &Change) -> std::io::Result<bool> {
    let mut file = match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    encode_frame(&mut buf, uid, change)?;
    file.write_all(&buf)?;
    file.sync_data()?;
    Ok(true)
}

/// The changes the log at `path` holds, oldest first: every whole frame
/// up to the first torn one. No file is an empty log.
pub fn read(path: &Path) -> std::io::Result<Vec<(String, Change)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // A crash while a fresh log's temp file was written leaves the old
    // one in place, so a short or foreign header is not a log of ours.
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("{} is not a journal log of this agent", path.display()),
        ));
    };
    let mut out = Vec::new();
    while let Some((frame, after)) = next_frame(rest) {
        out.push(frame);
        rest = after;
    }
    Ok(out)
}

/// Where [`Wal::create`] writes a log before renaming it.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn encode_frame(buf: &mut Vec<u8>, uid: &str, change: &Change) -> std::io::Result<()> {
    let too_long = |what| std::io::Error::new(ErrorKind::InvalidInput, format!("{what} too long"));
    let uid_len = u16::try_from(uid.len()).map_err(|_| too_long("capsule uid"))?;
    let (kind, body): (u8, &[u8]) = match change {
        Change::Record(b) => (KIND_RECORD, b),
        Change::Removed => (KIND_REMOVED, &[]),
    };
    let len = 3 + uid.len() + body.len();
    if len > MAX_PAYLOAD {
        return Err(too_long("journal record"));
    }
    let len = u32::try_from(len).map_err(|_| too_long("journal record"))?;
    // Written in place; the checksum, over the payload, filled in last.
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    buf.extend_from_slice(&uid_len.to_le_bytes());
    buf.extend_from_slice(uid.as_bytes());
    buf.extend_from_slice(body);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The frame at the start of `bytes` and what follows it; `None` at the
/// end or at a torn frame.
fn next_frame(bytes: &[u8]) -> Option<((String, Change), &[u8])> {
    let (head, rest) = bytes.split_at_checked(HEADER)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let (payload, rest) = rest.split_at_checked(len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let (&kind, payload) = payload.split_first()?;
    let (uid_len, payload) = payload.split_at_checked(2)?;
    let uid_len = u16::from_le_bytes(uid_len.try_into().ok()?) as usize;
    let (uid, body) = payload.split_at_checked(uid_len)?;
    let uid = String::from_utf8(uid.to_vec()).ok()?;
    let change = match kind {
        KIND_RECORD => Change::Record(body.to_vec()),
        KIND_REMOVED if body.is_empty() => Change::Removed,
        _ => return None,
    };
    Some(((uid, change), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &str) -> Change {
        Change::Record(s.as_bytes().to_vec())
    }

    #[test]
    fn appended_changes_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.wal");
        assert_eq!(read(&path).unwrap(), vec![]);
        let mut wal = Wal::create(&path).unwrap();
        let (a, b, gone) = (rec("{\"n\":1}"), rec("{\"n\":2}"), Change::Removed);
        wal.append([("c1", &a), ("c2", &b)]).unwrap();
        wal.append([("c1", &gone)]).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            vec![("c1".into(), a), ("c2".into(), b), ("c1".into(), gone)]
        );
        assert_eq!(wal.bytes(), std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn reading_stops_at_a_torn_or_corrupt_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.wal");
        let mut wal = Wal::create(&path).unwrap();
        let (a, b) = (rec("{\"n\":1}"), rec("{\"n\":2}"));
        wal.append([("c1", &a)]).unwrap();
        let good = wal.bytes() as usize;
        wal.append([("c2", &b)]).unwrap();
        let whole = std::fs::read(&path).unwrap();

        // Every cut inside the second frame: what a crash mid-append leaves.
        for cut in good..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            assert_eq!(
                read(&path).unwrap(),
                vec![("c1".into(), a.clone())],
                "cut {cut}"
            );
        }
        // A flipped bit in the second frame's record.
        let mut bad = whole.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(read(&path).unwrap(), vec![("c1".into(), a.clone())]);
        // Zeros where the disk had not written the frame yet.
        let mut zeros = whole[..good].to_vec();
        zeros.extend(std::iter::repeat_n(0u8, 64));
        std::fs::write(&path, &zeros).unwrap();
        assert_eq!(read(&path).unwrap(), vec![("c1".into(), a)]);
    }

    #[test]
    fn a_foreign_file_is_refused_and_create_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.wal");
        std::fs::write(&path, b"not a log").unwrap();
        assert_eq!(read(&path).unwrap_err().kind(), ErrorKind::InvalidData);
        let mut wal = Wal::create(&path).unwrap();
        assert_eq!(read(&path).unwrap(), vec![]);
        wal.append([("c1", &Change::Removed)]).unwrap();
        // A new log holds nothing of the old one, whatever its length.
        Wal::create(&path).unwrap();
        assert_eq!(read(&path).unwrap(), vec![]);
        assert!(!temp_path(&path).exists());
    }
}
