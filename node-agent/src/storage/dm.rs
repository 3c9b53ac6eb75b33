//! The dm-snapshot backend (DESIGN §4, wrenn-go-notes §5.1 and §11.1–5).
//!
//! Per template: its raw image on one read-only loop device, shared and
//! refcounted. Per capsule: `wrenn-<capsule>.cow` in the state directory, a
//! sparse file at least as large as the template (a smaller CoW invalidates
//! the snapshot and the guest sees EIO), on its own read-write loop device;
//! and the device `wrenn-<capsule>` with one target
//! `0 <template sectors> snapshot <origin> <cow> P 8` (persistent, 4 KiB
//! chunks). A persistent CoW outlives a host reboot: recreating the device
//! over the same file brings the capsule's writes back.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use devicemapper::{Device, Sectors, TargetLine, TargetParams, TargetTable, TargetTypeBuf};

use super::loops::LoopRegistry;
use super::{
    Backend, BlockStore, CapsuleDisk, CapsuleId, DiskFormat, DiskRequest, Error, NAME_PREFIX,
    Result, Rollback, StorageConfig, SweepReport, ensure_dir, file_allocated_bytes, orphan_files,
    template_size,
};
use crate::sys::block::dm::{Dm, DmOps};
use crate::sys::block::{LOOP_MAJOR, LoopDevice};

/// Chunk size of every snapshot: 8 sectors = 4 KiB.
pub const CHUNK_SECTORS: u64 = 8;

/// Parameters of a `snapshot` target line: `<origin> <cow> <P|N> <chunk>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotParams {
    /// Origin device.
    pub origin: Device,
    /// Exception store device.
    pub cow: Device,
    /// `P`: the exception store survives the device.
    pub persistent: bool,
    /// Chunk size in sectors.
    pub chunk_sectors: u64,
}

impl fmt::Display for SnapshotParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snapshot {}", self.param_str())
    }
}

impl FromStr for SnapshotParams {
    type Err = Error;

    /// Parses `snapshot <origin> <cow> <P|N> <chunk>` (the target type may
    /// be left off). Devices must be `major:minor`, as the kernel reports.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::ParseTable {
            table: s.to_string(),
            why: why.to_string(),
        };
        let mut fields: Vec<&str> = s.split_whitespace().collect();
        if fields.first() == Some(&"snapshot") {
            fields.remove(0);
        }
        let [origin, cow, mode, chunk] = fields[..] else {
            return Err(bad("want 4 parameters"));
        };
        let dev = |v: &str| Device::from_str(v).map_err(|_| bad("device is not major:minor"));
        // The kernel reports `P`, or `PO` when overflow is enabled.
        let persistent = match mode {
            "P" | "PO" => true,
            "N" => false,
            _ => return Err(bad("persistence must be P or N")),
        };
        let chunk_sectors = chunk
            .parse::<u64>()
            .map_err(|_| bad("chunk size is not a number"))?;
        Ok(Self {
            origin: dev(origin)?,
            cow: dev(cow)?,
            persistent,
            chunk_sectors,
        })
    }
}

impl TargetParams for SnapshotParams {
    fn param_str(&self) -> String {
        format!(
            "{} {} {} {}",
            self.origin,
            self.cow,
            if self.persistent { "P" } else { "N" },
            self.chunk_sectors
        )
    }

    fn target_type(&self) -> TargetTypeBuf {
        TargetTypeBuf::new("snapshot".into()).expect("\"snapshot\" is a valid target type")
    }
}

/// A one-line `snapshot` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The line.
    pub table: TargetLine<SnapshotParams>,
}

impl SnapshotTable {
    /// The table Wrenn wants: whole origin, persistent, 8-sector chunks.
    pub fn build(origin_sectors: u64, origin: Device, cow: Device) -> Self {
        Self {
            table: TargetLine::new(
                Sectors(0),
                Sectors(origin_sectors),
                SnapshotParams {
                    origin,
                    cow,
                    persistent: true,
                    chunk_sectors: CHUNK_SECTORS,
                },
            ),
        }
    }

    /// Parses one raw line as the kernel returns it.
    pub fn from_raw(raw: &[(u64, u64, String, String)]) -> Result<Self> {
        let text = || {
            raw.iter()
                .map(|(s, l, t, p)| format!("{s} {l} {t} {p}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let [(start, len, kind, params)] = raw else {
            return Err(Error::ParseTable {
                table: text(),
                why: "want exactly one line".into(),
            });
        };
        if kind != "snapshot" {
            return Err(Error::ParseTable {
                table: text(),
                why: format!("target type is {kind}, want snapshot"),
            });
        }
        Ok(Self {
            table: TargetLine::new(Sectors(*start), Sectors(*len), params.parse()?),
        })
    }

    /// The line as `DM::table_load` takes it.
    pub fn to_raw(&self) -> Vec<(u64, u64, String, String)> {
        vec![(
            *self.table.start,
            *self.table.length,
            "snapshot".to_string(),
            self.table.params.param_str(),
        )]
    }
}

impl fmt::Display for SnapshotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            *self.table.start, *self.table.length, self.table.params
        )
    }
}

impl FromStr for SnapshotTable {
    type Err = Error;

    /// Parses `dmsetup table` text: `<start> <length> snapshot <params>`.
    fn from_str(s: &str) -> Result<Self> {
        let mut it = s.splitn(4, char::is_whitespace);
        let (Some(start), Some(len), Some(kind), Some(params)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(Error::ParseTable {
                table: s.into(),
                why: "want <start> <length> <type> <params>".into(),
            });
        };
        let num = |v: &str| {
            v.parse::<u64>().map_err(|_| Error::ParseTable {
                table: s.into(),
                why: format!("{v:?} is not a sector count"),
            })
        };
        Self::from_raw(&[(num(start)?, num(len)?, kind.into(), params.trim().into())])
    }
}

impl TargetTable for SnapshotTable {
    fn from_raw_table(
        table: &[(u64, u64, String, String)],
    ) -> devicemapper::DmResult<SnapshotTable> {
        Self::from_raw(table)
            .map_err(|e| devicemapper::DmError::Dm(devicemapper::ErrorEnum::Invalid, e.to_string()))
    }

    fn to_raw_table(&self) -> Vec<(u64, u64, String, String)> {
        self.to_raw()
    }
}

fn loop_dev(d: &LoopDevice) -> Device {
    let (major, minor) = d.devno();
    Device { major, minor }
}

/// dm-snapshot capsule disks. See the module docs.
#[derive(Debug)]
pub struct DmSnapshotStore {
    cfg: StorageConfig,
    dm: Arc<dyn DmOps>,
    loops: Arc<LoopRegistry>,
    /// Capsules holding a reference on their template's loop, and which.
    held: Mutex<HashMap<CapsuleId, PathBuf>>,
}

fn dm_err(
    action: &'static str,
    device: &str,
) -> impl FnOnce(crate::sys::block::dm::DmFailure) -> Error {
    let device = device.to_string();
    move |source| Error::DeviceMapper {
        action,
        device,
        source,
    }
}

impl DmSnapshotStore {
    /// Opens device-mapper and adopts the `wrenn-*` snapshots already in
    /// the kernel (agent restart): their template loops get one reference
    /// each.
    pub fn open(cfg: StorageConfig) -> Result<Self> {
        let dm = Dm::open().map_err(dm_err("open", "control"))?;
        Self::with_dm(cfg, Arc::new(dm))
    }

    /// As [`open`](Self::open), over any [`DmOps`] (tests pass a
    /// `FakeDm` and real loop devices).
    pub fn with_dm(cfg: StorageConfig, dm: Arc<dyn DmOps>) -> Result<Self> {
        ensure_dir(&cfg.state_dir)?;
        let store = Self {
            loops: Arc::new(LoopRegistry::new(cfg.loop_host())),
            cfg,
            dm,
            held: Mutex::new(HashMap::new()),
        };
        store.recover()?;
        Ok(store)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<CapsuleId, PathBuf>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `wrenn-<capsule>`.
    pub fn device_name(capsule: &CapsuleId) -> String {
        format!("{NAME_PREFIX}{capsule}")
    }

    /// The capsule's CoW file.
    pub fn cow_path(&self, capsule: &CapsuleId) -> PathBuf {
        self.cfg
            .state_dir
            .join(format!("{NAME_PREFIX}{capsule}.cow"))
    }

    fn node(&self, name: &str) -> PathBuf {
        self.cfg.dev_dir.join("mapper").join(name)
    }

    fn loop_by_devno(&self, dev: Device) -> Result<Option<LoopDevice>> {
        if dev.major != LOOP_MAJOR {
            return Ok(None);
        }
        self.loops
            .host()
            .read(dev.minor)
            .map_err(|source| Error::ListLoops {
                sys_dir: self.cfg.sys_dir.clone(),
                source,
            })
    }

    /// The live table of `name`, parsed, if the device exists.
    fn live_table(&self, name: &str) -> Result<Option<SnapshotTable>> {
        match self.dm.table(name).map_err(dm_err("read table of", name))? {
            Some(raw) => SnapshotTable::from_raw(&raw).map(Some),
            None => Ok(None),
        }
    }

    fn recover(&self) -> Result<()> {
        let names = self.dm.list().map_err(dm_err("list", "*"))?;
        for name in names {
            let Some(id) = name
                .strip_prefix(NAME_PREFIX)
                .and_then(|n| CapsuleId::new(n).ok())
            else {
                continue;
            };
            let Ok(Some(table)) = self.live_table(&name) else {
                continue;
            };
            if let Some(origin) = self.loop_by_devno(table.table.params.origin)?
                && let Some(file) = origin.backing_file.clone()
            {
                self.loops.adopt(&file, origin, 1);
                self.held().insert(id.clone(), file);
            }
            if let Some(cow) = self.loop_by_devno(table.table.params.cow)?
                && let Some(file) = cow.backing_file.clone()
            {
                self.loops.adopt(&file, cow, 1);
            }
            tracing::info!(device = %name, "adopted existing snapshot device");
        }
        Ok(())
    }

    /// Why the live table differs from what `req` needs, if it does.
    fn plan_mismatch(
        &self,
        live: &SnapshotTable,
        template: &Path,
        cow: &Path,
        sectors: u64,
    ) -> Result<Option<String>> {
        let p = live.table.params;
        if *live.table.length != sectors || !p.persistent || p.chunk_sectors != CHUNK_SECTORS {
            return Ok(Some(format!("table is {live}")));
        }
        let origin = self.loop_by_devno(p.origin)?;
        if origin.and_then(|d| d.backing_file).as_deref() != Some(template) {
            return Ok(Some(format!(
                "origin {} is not on {}",
                p.origin,
                template.display()
            )));
        }
        let cow_dev = self.loop_by_devno(p.cow)?;
        let cow = std::fs::canonicalize(cow).unwrap_or_else(|_| cow.to_path_buf());
        if cow_dev.and_then(|d| d.backing_file).as_deref() != Some(cow.as_path()) {
            return Ok(Some(format!("cow {} is not on {}", p.cow, cow.display())));
        }
        Ok(None)
    }
}

impl BlockStore for DmSnapshotStore {
    fn backend(&self) -> Backend {
        Backend::DmSnapshot
    }

    fn ensure_disk(&self, req: &DiskRequest) -> Result<CapsuleDisk> {
        let name = Self::device_name(&req.capsule);
        let template =
            std::fs::canonicalize(&req.template).map_err(|source| Error::ReadTemplate {
                path: req.template.clone(),
                source,
            })?;
        let origin_bytes = template_size(&template)?;
        let sectors = origin_bytes / 512;
        let cow_path = self.cow_path(&req.capsule);
        let disk = CapsuleDisk {
            capsule: req.capsule.clone(),
            path: self.node(&name),
            format: DiskFormat::Raw,
            size_bytes: sectors * 512,
        };

        // 1. Adopt a device whose table is exactly ours; remove a stale
        //    one (a failed pause left one behind, wrenn-go-notes §11.2).
        if let Some(live) = self.live_table(&name)? {
            match self.plan_mismatch(&live, &template, &cow_path, sectors)? {
                None => {
                    if !self.held().contains_key(&req.capsule) {
                        self.loops.acquire(&template, true)?;
                        self.loops.acquire(&cow_path, false)?;
                        self.held().insert(req.capsule.clone(), template);
                    }
                    return Ok(disk);
                }
                Some(why) => {
                    tracing::warn!(device = %name, %why, "removing stale snapshot device");
                    self.remove_disk_keeping_cow(&req.capsule)?;
                }
            }
        }

        let mut rollback = Rollback::new();
        // 2. The template on its shared read-only loop.
        let origin = self.loops.acquire(&template, true)?;
        let (loops, t) = (self.loops.clone(), template.clone());
        rollback.push("release origin loop", move || {
            let _ = loops.release(&t);
        });

        // 3. The CoW file: kept if it exists (a persistent store holding
        //    the capsule's writes), else a new sparse file. Never smaller
        //    than the origin (wrenn-go-notes §11.3).
        let cow_size = req.size_bytes.max(origin_bytes);
        let created = !cow_path.exists();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cow_path)
            .map_err(|source| Error::CreateCow {
                capsule: req.capsule.to_string(),
                path: cow_path.clone(),
                source,
            })?;
        if created {
            let p = cow_path.clone();
            rollback.push("remove cow file", move || {
                let _ = std::fs::remove_file(&p);
            });
        }
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < cow_size {
            f.set_len(cow_size).map_err(|source| Error::CreateCow {
                capsule: req.capsule.to_string(),
                path: cow_path.clone(),
                source,
            })?;
        }
        drop(f);

        // 4. The CoW on its own read-write loop.
        let cow = self.loops.acquire(&cow_path, false)?;
        let (loops, p) = (self.loops.clone(), cow_path.clone());
        rollback.push("detach cow loop", move || {
            let _ = loops.detach_all(&p);
        });

        // 5. The snapshot device (Dm::create removes it if loading fails).
        let table = SnapshotTable::build(sectors, loop_dev(&origin), loop_dev(&cow));
        self.dm
            .create(&name, &table.to_raw())
            .map_err(dm_err("create", &name))?;
        rollback.commit();
        self.held().insert(req.capsule.clone(), template);
        tracing::info!(capsule = %req.capsule, %table, "created snapshot device");
        Ok(disk)
    }

    fn remove_disk(&self, capsule: &CapsuleId) -> Result<()> {
        self.remove_disk_keeping_cow(capsule)?;
        let cow = self.cow_path(capsule);
        match std::fs::remove_file(&cow) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::RemoveFile {
                capsule: capsule.to_string(),
                path: cow,
                source,
            }),
        }
    }

    fn allocated_bytes(&self, capsule: &CapsuleId) -> Result<u64> {
        file_allocated_bytes(&self.cow_path(capsule))
    }

    fn sweep(&self, keep: &[CapsuleId]) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        for name in self.dm.list().map_err(dm_err("list", "*"))? {
            let Some(id) = name
                .strip_prefix(NAME_PREFIX)
                .and_then(|n| CapsuleId::new(n).ok())
            else {
                continue;
            };
            if keep.contains(&id) {
                continue;
            }
            self.remove_disk(&id)?;
            report.dm_devices.push(name);
        }
        // CoW files (and their loops) of capsules with no device.
        for (id, path) in orphan_files(&self.cfg.state_dir, &[".cow"], keep)? {
            report.loop_devices.extend(self.loops.detach_all(&path)?);
            std::fs::remove_file(&path).map_err(|source| Error::RemoveFile {
                capsule: id.to_string(),
                path: path.clone(),
                source,
            })?;
            report.files.push(path);
        }
        Ok(report)
    }
}

impl DmSnapshotStore {
    /// Removes the device, its CoW loop and the template reference, but
    /// not the CoW file. The CoW loop is detached even when the device
    /// cannot be removed: once the file is deleted such a loop would be
    /// orphaned for good (wrenn-go-notes §11.4).
    fn remove_disk_keeping_cow(&self, capsule: &CapsuleId) -> Result<()> {
        let name = Self::device_name(capsule);
        // Learn the template from the live table when we do not hold it
        // (a device this process did not create or adopt).
        let template = match self.held().remove(capsule) {
            Some(t) => Some(t),
            None => match self.live_table(&name) {
                Ok(Some(t)) => self
                    .loop_by_devno(t.table.params.origin)?
                    .and_then(|d| d.backing_file)
                    .filter(|f| self.loops.refs(f) > 0),
                _ => None,
            },
        };
        let removed = self.dm.remove(&name).map_err(dm_err("remove", &name));
        let cow = self.loops.detach_all(&self.cow_path(capsule));
        if let Some(t) = template {
            self.loops.release(&t)?;
        }
        removed?;
        cow.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_text_round_trips() {
        let t = SnapshotTable::build(
            2_097_152,
            Device { major: 7, minor: 0 },
            Device { major: 7, minor: 3 },
        );
        let text = t.to_string();
        assert_eq!(text, "0 2097152 snapshot 7:0 7:3 P 8");
        assert_eq!(text.parse::<SnapshotTable>().unwrap(), t);
        assert_eq!(SnapshotTable::from_raw(&t.to_raw()).unwrap(), t);
        assert_eq!(SnapshotTable::from_raw_table(&t.to_raw_table()).unwrap(), t);
    }

    #[test]
    fn kernel_variants_parse() {
        // Overflow-capable persistent stores report `PO`.
        let t: SnapshotTable = "0 8 snapshot 7:1 7:2 PO 8".parse().unwrap();
        assert!(t.table.params.persistent);
        let t: SnapshotTable = "0 8 snapshot 253:1 7:2 N 16".parse().unwrap();
        assert!(!t.table.params.persistent);
        assert_eq!(t.table.params.chunk_sectors, 16);
    }

    #[test]
    fn bad_tables_are_refused_with_the_text() {
        for bad in [
            "0 8 linear 7:1 0",
            "0 8 snapshot 7:1 7:2 P",
            "0 8 snapshot /dev/loop1 7:2 P 8",
            "0 8 snapshot 7:1 7:2 X 8",
            "x 8 snapshot 7:1 7:2 P 8",
        ] {
            let err = bad.parse::<SnapshotTable>().unwrap_err();
            assert!(matches!(err, Error::ParseTable { .. }), "{bad}: {err}");
        }
        let two = vec![
            (0, 8, "snapshot".to_string(), "7:1 7:2 P 8".to_string()),
            (8, 8, "snapshot".to_string(), "7:1 7:2 P 8".to_string()),
        ];
        assert!(SnapshotTable::from_raw(&two).is_err());
    }
}
