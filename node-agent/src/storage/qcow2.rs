//! The qcow2-overlay backend, for hosts without device-mapper.
//!
//! Each capsule gets `wrenn-<capsule>.qcow2` in the state directory: an
//! empty qcow2 (version 3) image whose backing file is the template's raw
//! image, with the backing format recorded as `raw` in a header extension
//! so neither QEMU nor Cloud Hypervisor probes it. A capsule started from
//! a named snapshot taken on this backend is backed by the snapshot's copy
//! of an overlay instead (`*.qcow2`, backing format `qcow2`). Cloud
//! Hypervisor follows backing files only with `backing_files=on` on the
//! disk.
//!
//! We write the header ourselves rather than run `qemu-img create`: an
//! empty image with a backing file is four clusters of fixed layout
//! (header, refcount table, one refcount block, the L1 table) whose fields
//! are spelled out in QEMU's `docs/interop/qcow2.txt`; building it is a
//! pure function we unit-test, creation takes microseconds instead of a
//! fork and exec, and a node with only Cloud Hypervisor needs no
//! qemu-utils. Tests check the result with `qemu-img check` and write
//! through it with `qemu-io`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{
    Backend, BlockStore, CapsuleDisk, CapsuleId, DiskFormat, DiskRequest, Error, NAME_PREFIX,
    Result, Rollback, StorageConfig, SweepReport, ensure_dir, file_allocated_bytes, orphan_files,
    template_size,
};

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const VERSION: u32 = 3;
/// 64 KiB clusters, QEMU's default.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const HEADER_LEN: u32 = 104;
/// 16-bit refcounts (`refcount_order` 4), the only width every reader
/// supports.
const REFCOUNT_ORDER: u32 = 4;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_END: u32 = 0;
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: usize = 1023;

/// The fields of a qcow2 header this module writes and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Info {
    /// Format version (2 or 3).
    pub version: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
}

/// Why a buffer is not a qcow2 image we can use.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Too short, bad magic, or an offset outside the buffer.
    #[error("not a qcow2 image: {0}")]
    Invalid(&'static str),
    /// The backing file name cannot be stored.
    #[error("backing file name is {0} bytes; at most {MAX_BACKING_NAME} fit")]
    BackingNameTooLong(usize),
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// An empty qcow2 image of `virtual_size` bytes (rounded up to 512) over
/// `backing_file` of format `backing_format`. Returns the bytes to write
/// at offset 0 and the file length (the tail, the L1 table, is zeros and
/// left sparse).
///
/// Layout: cluster 0 header, extensions and backing name; cluster 1
/// refcount table; cluster 2 refcount block; clusters 3.. the L1 table.
/// Every one of those clusters has refcount 1.
pub fn build_image(
    virtual_size: u64,
    backing_file: &str,
    backing_format: &str,
) -> Result<(Vec<u8>, u64), FormatError> {
    if backing_file.len() > MAX_BACKING_NAME {
        return Err(FormatError::BackingNameTooLong(backing_file.len()));
    }
    let virtual_size = virtual_size.div_ceil(512) * 512;
    // Each L2 table maps CLUSTER/8 clusters.
    let bytes_per_l2 = CLUSTER * (CLUSTER / 8);
    let l1_size = virtual_size.div_ceil(bytes_per_l2).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
    let total_clusters = 3 + l1_clusters;
    // One refcount block holds CLUSTER/2 16-bit entries.
    if total_clusters > CLUSTER / 2 {
        return Err(FormatError::Invalid("virtual size too large"));
    }
    let l1_size = u32::try_from(l1_size).map_err(|_| FormatError::Invalid("l1 too large"))?;

    let mut buf = vec![0u8; 3 * CLUSTER as usize];
    let fmt_ext_len = backing_format.len();
    let ext_start = HEADER_LEN as usize;
    let end_ext = ext_start + 8 + pad8(fmt_ext_len);
    let backing_offset = end_ext + 8;

    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(&MAGIC.to_be_bytes());
    h.extend_from_slice(&VERSION.to_be_bytes());
    h.extend_from_slice(&(backing_offset as u64).to_be_bytes());
    h.extend_from_slice(&(backing_file.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&virtual_size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&l1_size.to_be_bytes());
    h.extend_from_slice(&(3 * CLUSTER).to_be_bytes()); // l1_table_offset
    h.extend_from_slice(&CLUSTER.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    buf[..h.len()].copy_from_slice(&h);

    buf[ext_start..ext_start + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    buf[ext_start + 4..ext_start + 8].copy_from_slice(&(fmt_ext_len as u32).to_be_bytes());
    buf[ext_start + 8..ext_start + 8 + fmt_ext_len].copy_from_slice(backing_format.as_bytes());
    buf[end_ext..end_ext + 4].copy_from_slice(&EXT_END.to_be_bytes());
    buf[backing_offset..backing_offset + backing_file.len()]
        .copy_from_slice(backing_file.as_bytes());

    // Refcount table: entry 0 -> the refcount block in cluster 2.
    let rt = CLUSTER as usize;
    buf[rt..rt + 8].copy_from_slice(&(2 * CLUSTER).to_be_bytes());
    // Refcount block: clusters 0..total_clusters are in use once.
    let rb = 2 * CLUSTER as usize;
    for i in 0..total_clusters as usize {
        buf[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok((buf, total_clusters * CLUSTER))
}

fn be32(b: &[u8], at: usize) -> Result<u32, FormatError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(FormatError::Invalid("truncated header"))
}

fn be64(b: &[u8], at: usize) -> Result<u64, FormatError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(FormatError::Invalid("truncated header"))
}

/// Reads the header fields we care about from the start of an image
/// (the first cluster is enough for images this module writes).
pub fn parse_header(b: &[u8]) -> Result<Qcow2Info, FormatError> {
    if be32(b, 0)? != MAGIC {
        return Err(FormatError::Invalid("bad magic"));
    }
    let version = be32(b, 4)?;
    if version != 2 && version != 3 {
        return Err(FormatError::Invalid("unknown version"));
    }
    let backing_offset = usize::try_from(be64(b, 8)?)
        .map_err(|_| FormatError::Invalid("backing offset out of range"))?;
    let backing_len = be32(b, 16)? as usize;
    let cluster_bits = be32(b, 20)?;
    let virtual_size = be64(b, 24)?;
    let backing_file = if backing_offset == 0 {
        None
    } else {
        let raw = b
            .get(backing_offset..backing_offset + backing_len)
            .ok_or(FormatError::Invalid("backing name outside buffer"))?;
        Some(
            std::str::from_utf8(raw)
                .map_err(|_| FormatError::Invalid("backing name not UTF-8"))?
                .to_string(),
        )
    };
    let mut backing_format = None;
    if version == 3 {
        let mut at = be32(b, 100)? as usize;
        loop {
            let kind = be32(b, at)?;
            let len = be32(b, at + 4)? as usize;
            if kind == EXT_END {
                break;
            }
            let data = b
                .get(at + 8..at + 8 + len)
                .ok_or(FormatError::Invalid("extension outside buffer"))?;
            if kind == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            at += 8 + pad8(len);
        }
    }
    Ok(Qcow2Info {
        version,
        virtual_size,
        cluster_bits,
        backing_file,
        backing_format,
    })
}

/// Writes an empty qcow2 overlay at `path` (atomically: a temporary file
/// renamed into place) over the image `backing` of `backing_format`
/// (`raw` or `qcow2`).
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: &str,
    virtual_size: u64,
) -> std::io::Result<()> {
    let name = backing.to_str().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "backing path is not UTF-8",
        )
    })?;
    let (bytes, len) = build_image(virtual_size, name, backing_format)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.set_len(len)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Format and guest-visible size of a base image. A template is raw; a
/// snapshot's disk taken on this backend is a copy of a qcow2 overlay
/// (still backed by its template) and is named `*.qcow2` by the snapshot.
/// The name decides, never the content: a raw disk's first sector is the
/// guest's to write, and a qcow2 header there could name any host file as
/// its backing file.
fn base_format(path: &Path) -> Result<(&'static str, u64)> {
    if path.extension().is_some_and(|e| e == "qcow2") {
        let info = read_info(path).map_err(|source| Error::ReadTemplate {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(("qcow2", info.virtual_size))
    } else {
        Ok(("raw", template_size(path)?))
    }
}

/// Reads the header of the image at `path`.
pub fn read_info(path: &Path) -> std::io::Result<Qcow2Info> {
    let mut buf = Vec::with_capacity(CLUSTER as usize);
    std::fs::File::open(path)?
        .take(CLUSTER)
        .read_to_end(&mut buf)?;
    parse_header(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// qcow2 overlays in a state directory. See the module docs.
#[derive(Debug)]
pub struct Qcow2Store {
    cfg: StorageConfig,
}

impl Qcow2Store {
    /// Uses `cfg.state_dir`, creating it if needed.
    pub fn open(cfg: StorageConfig) -> Result<Self> {
        ensure_dir(&cfg.state_dir)?;
        Ok(Self { cfg })
    }

    /// Where a capsule's overlay lives.
    pub fn overlay_path(&self, capsule: &CapsuleId) -> PathBuf {
        self.cfg
            .state_dir
            .join(format!("{NAME_PREFIX}{capsule}.qcow2"))
    }

    fn remove_file(&self, capsule: &CapsuleId, path: &Path) -> Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::RemoveFile {
                capsule: capsule.to_string(),
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

impl BlockStore for Qcow2Store {
    fn backend(&self) -> Backend {
        Backend::Qcow2
    }

    fn ensure_disk(&self, req: &DiskRequest) -> Result<CapsuleDisk> {
        let template =
            std::fs::canonicalize(&req.template).map_err(|source| Error::ReadTemplate {
                path: req.template.clone(),
                source,
            })?;
        let (format, base_size) = base_format(&template)?;
        let size = req.size_bytes.max(base_size).div_ceil(512) * 512;
        let path = self.overlay_path(&req.capsule);
        let disk = CapsuleDisk {
            capsule: req.capsule.clone(),
            path: path.clone(),
            format: DiskFormat::Qcow2,
            size_bytes: size,
        };
        let mismatch = |why: String| Error::Mismatch {
            capsule: req.capsule.to_string(),
            path: path.clone(),
            why,
        };
        match read_info(&path) {
            Ok(info) => {
                // Adopt only what we would have created.
                let want = Some(template.to_string_lossy().into_owned());
                if info.backing_file != want {
                    return Err(mismatch(format!(
                        "backing file is {:?}, want {want:?}",
                        info.backing_file
                    )));
                }
                if info.backing_format.as_deref() != Some(format) {
                    return Err(mismatch(format!(
                        "backing format is {:?}, want {format}",
                        info.backing_format
                    )));
                }
                if info.virtual_size != size {
                    return Err(mismatch(format!(
                        "size is {}, want {size}",
                        info.virtual_size
                    )));
                }
                tracing::debug!(capsule = %req.capsule, "adopting existing qcow2 overlay");
                return Ok(disk);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(mismatch(e.to_string()));
            }
            Err(source) => return Err(Error::Stat { path, source }),
        }
        let mut rollback = Rollback::new();
        let undo_path = path.clone();
        rollback.push("remove overlay", move || {
            let _ = std::fs::remove_file(&undo_path);
        });
        create_overlay(&path, &template, format, size).map_err(|source| Error::CreateCow {
            capsule: req.capsule.to_string(),
            path: path.clone(),
            source,
        })?;
        rollback.commit();
        Ok(disk)
    }

    fn remove_disk(&self, capsule: &CapsuleId) -> Result<()> {
        let path = self.overlay_path(capsule);
        self.remove_file(capsule, &tmp_path(&path))?;
        self.remove_file(capsule, &path)?;
        Ok(())
    }

    fn allocated_bytes(&self, capsule: &CapsuleId) -> Result<u64> {
        file_allocated_bytes(&self.overlay_path(capsule))
    }

    fn sweep(&self, keep: &[CapsuleId]) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        for (id, path) in orphan_files(&self.cfg.state_dir, &[".qcow2", ".qcow2.tmp"], keep)? {
            if self.remove_file(&id, &path)? {
                report.files.push(path);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let (bytes, len) = build_image(10 << 30, "/t/base.img", "raw").unwrap();
        let info = parse_header(&bytes).unwrap();
        assert_eq!(
            info,
            Qcow2Info {
                version: 3,
                virtual_size: 10 << 30,
                cluster_bits: 16,
                backing_file: Some("/t/base.img".into()),
                backing_format: Some("raw".into()),
            }
        );
        // header, refcount table, refcount block, one L1 cluster.
        assert_eq!(len, 4 * CLUSTER);
    }

    #[test]
    fn layout_fields_match_the_spec() {
        let (b, _) = build_image(1000, "/b", "raw").unwrap();
        // Size rounds up to a sector.
        assert_eq!(be64(&b, 24).unwrap(), 1024);
        // l1_size: one entry covers 512 MiB.
        assert_eq!(be32(&b, 36).unwrap(), 1);
        assert_eq!(be64(&b, 40).unwrap(), 3 * CLUSTER);
        assert_eq!(be64(&b, 48).unwrap(), CLUSTER);
        assert_eq!(be64(&b, CLUSTER as usize).unwrap(), 2 * CLUSTER);
        let rb = 2 * CLUSTER as usize;
        let refs: Vec<u16> = (0..5)
            .map(|i| u16::from_be_bytes([b[rb + 2 * i], b[rb + 2 * i + 1]]))
            .collect();
        assert_eq!(refs, vec![1, 1, 1, 1, 0]);
        let (b, len) = build_image((512 << 20) * 8193, "/b", "raw").unwrap();
        assert_eq!(be32(&b, 36).unwrap(), 8193);
        // 8193 L1 entries need two clusters.
        assert_eq!(len, 5 * CLUSTER);
    }

    #[test]
    fn refuses_overlong_backing_names_and_garbage() {
        assert_eq!(
            build_image(1 << 20, &"x".repeat(2000), "raw").unwrap_err(),
            FormatError::BackingNameTooLong(2000)
        );
        assert!(parse_header(b"not qcow").is_err());
        assert!(parse_header(&[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]).is_err());
    }
}
