//! Refcounted loop devices keyed by backing file.
//!
//! One registry per store. A file is attached once and shared: `acquire`
//! reuses the registry's device, else adopts a device the kernel already
//! has on that file (left by an earlier agent; `losetup --find` always
//! allocating a new one leaked loops in the Go agent, wrenn-go-notes §11.4),
//! else attaches a new one. `release` detaches at refcount zero.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Error, Result};
use crate::sys::block::{LoopDevice, LoopHost};

#[derive(Debug)]
struct Entry {
    dev: LoopDevice,
    refs: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct LoopRegistry {
    host: LoopHost,
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

fn canonical(file: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(file).map_err(|source| Error::AttachLoop {
        file: file.to_path_buf(),
        source,
    })
}

impl LoopRegistry {
    /// An empty registry working under `host`'s `/dev` and `/sys`.
    pub fn new(host: LoopHost) -> Self {
        Self {
            host,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Entry>> {
        // A panic while holding the lock leaves counts that are still
        // the best information we have.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn list_error(&self, source: std::io::Error) -> Error {
        Error::ListLoops {
            sys_dir: self.host.sys_dir.clone(),
            source,
        }
    }

    /// A loop device on `file` with one more reference.
    pub fn acquire(&self, file: &Path, read_only: bool) -> Result<LoopDevice> {
        let file = canonical(file)?;
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(&file)
            && e.dev.read_only == read_only
        {
            e.refs += 1;
            return Ok(e.dev.clone());
        }
        let existing = self
            .host
            .find_by_backing_file(&file)
            .map_err(|e| self.list_error(e))?
            .into_iter()
            .find(|d| d.read_only == read_only);
        let dev = match existing {
            Some(dev) => {
                tracing::debug!(device = %dev.path.display(), file = %file.display(), "reusing loop device");
                dev
            }
            None => self
                .host
                .attach(&file, read_only)
                .map_err(|source| Error::AttachLoop {
                    file: file.clone(),
                    source,
                })?,
        };
        entries.insert(
            file,
            Entry {
                dev: dev.clone(),
                refs: 1,
            },
        );
        Ok(dev)
    }

    /// Drops one reference to `file`'s device, detaching it at zero.
    /// Releasing a file the registry does not hold is a no-op.
    pub fn release(&self, file: &Path) -> Result<()> {
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(&file) else {
            return Ok(());
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return Ok(());
        }
        let dev = e.dev.clone();
        entries.remove(&file);
        drop(entries);
        self.host.detach(&dev).map_err(|source| Error::DetachLoop {
            device: dev.path.clone(),
            source,
        })
    }

    /// References held on `file`'s device.
    pub fn refs(&self, file: &Path) -> usize {
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        self.lock().get(&file).map_or(0, |e| e.refs)
    }

    /// Records `refs` more references to `dev` on `file` (restart recovery:
    /// the kernel already has the device, the counts come from dm tables).
    pub fn adopt(&self, file: &Path, dev: LoopDevice, refs: usize) {
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        self.lock()
            .entry(file)
            .and_modify(|e| e.refs += refs)
            .or_insert(Entry { dev, refs });
    }

    /// Detaches every loop device on `file`, whatever the counts say, and
    /// forgets it: the safety net before a backing file is deleted.
    pub fn detach_all(&self, file: &Path) -> Result<Vec<PathBuf>> {
        let mut detached = Vec::new();
        let canon = match std::fs::canonicalize(file) {
            Ok(p) => p,
            // No file, so nothing can be attached to it under this name.
            Err(_) => {
                self.lock().remove(file);
                return Ok(detached);
            }
        };
        self.lock().remove(&canon);
        for dev in self
            .host
            .find_by_backing_file(&canon)
            .map_err(|e| self.list_error(e))?
        {
            self.host.detach(&dev).map_err(|source| Error::DetachLoop {
                device: dev.path.clone(),
                source,
            })?;
            detached.push(dev.path);
        }
        Ok(detached)
    }

    /// The host this registry works on.
    pub fn host(&self) -> &LoopHost {
        &self.host
    }
}
