//! [`TemplateBuilder`]: from an [`ImageSource`] to a template disk in the
//! cache, for the capsule supervisor. A registry image is first pulled into
//! an OCI layout under the cache (`pulls/<hash of the reference>`), which
//! also keeps its blobs for the next pull; the build is
//! [`ImageCache::ensure_template`], whose `flock` makes concurrent capsules
//! of one image (in this process or another) build it once.
//!
//! Builds run on blocking threads and hold no capsule lock but the one of
//! the capsule that asked, so a long build delays only that capsule.
//!
//! The cache keeps to `cache_max_bytes` ([`super::quota`]): before a pull
//! and before a build it drops the least recently used template disks no
//! capsule or snapshot uses ([`CacheUsers`]) and pulled layouts no pull
//! holds; a build that cannot get under the quota is refused
//! ([`Error::CacheFull`]), and one that went over it is removed again.
//! Without a [`CacheUsers`] (no supervisor) no template disk is ever
//! dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest as _, Sha256};

use super::{
    Credentials, Error, ImageCache, ImageSource, LocalImage, PullOptions, TemplateDisk,
    TemplateRequest, pull_to_layout, quota,
};

/// What one build may use besides the node's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pull {
    /// Credentials for the image's registry, for this pull only: they are
    /// never stored (see [`Credentials`]).
    pub credentials: Option<Credentials>,
    /// The manifest digest the caller pins (`sha256:…`). When the cache
    /// holds the disk built from it at the asked size, that disk is used
    /// without asking the registry: a capsule of a private template starts
    /// from what the template's own pull (with its credentials) built.
    pub pinned: Option<String>,
}

/// Where templates are built and what goes into them.
#[derive(Clone, Debug)]
pub struct TemplateSettings {
    /// The cache directory (`<state>/images`).
    pub cache_dir: PathBuf,
    /// `wrenn-guest`, injected into every template.
    pub guest_binary: PathBuf,
    /// How to reach registries, and the [`Limits`](super::unpack::Limits)
    /// every image is pulled and unpacked under.
    pub pull: PullOptions,
    /// Quota of the whole cache (templates, pulled layouts, builds).
    pub cache_max_bytes: u64,
    /// Where local images (`oci:`, `docker-archive:`) may come from.
    pub image_dirs: super::ImageDirs,
}

/// Who tells the cache which template disks are in use: every disk a
/// capsule record, a snapshot or a running build names, directly or
/// through a chain of backing files. `None` when that cannot be known (a
/// journal is unreadable): then nothing is dropped.
pub trait CacheUsers: Send + Sync {
    /// Paths in use.
    fn in_use(&self) -> Option<Vec<PathBuf>>;
}

/// Builds (or finds) template disks. See the module docs.
pub struct TemplateBuilder {
    settings: TemplateSettings,
    state: Arc<CacheState>,
}

impl std::fmt::Debug for TemplateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct CacheState {
    /// One pull-and-build at a time per pulled layout: `pull_to_layout`
    /// rewrites the layout's `index.json`, which a build reads.
    pulls: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Stamping a disk handed out and dropping one take turns, so a disk
    /// is never dropped between the two.
    handing: Mutex<()>,
    users: Mutex<Option<Weak<dyn CacheUsers>>>,
}

/// What the cache must get to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Room {
    /// Under the quota, before a pull or build (best effort: the image may
    /// be cached already). A build in progress may take the cache over the
    /// quota by at most one image's [`Limits`](super::unpack::Limits).
    Before,
    /// At most at the quota, with a finished build in it; else the build
    /// is removed and refused.
    After,
}

fn thread_lost(path: &std::path::Path) -> Error {
    Error::Scratch {
        path: path.to_path_buf(),
        source: std::io::Error::other("the build thread ended without a result"),
    }
}

impl TemplateBuilder {
    /// A builder over `settings`; nothing is touched until the first build.
    pub fn new(settings: TemplateSettings) -> Self {
        Self {
            settings,
            state: Arc::new(CacheState::default()),
        }
    }

    /// Names who keeps template disks in use; until then none is dropped.
    pub fn set_users(&self, users: Weak<dyn CacheUsers>) {
        *self.state.users.lock().unwrap_or_else(|p| p.into_inner()) = Some(users);
    }

    /// Its settings.
    pub fn settings(&self) -> &TemplateSettings {
        &self.settings
    }

    /// Where a registry reference is pulled to.
    pub fn pull_dir(&self, reference: &str) -> PathBuf {
        let hash = format!("{:x}", Sha256::digest(reference.as_bytes()));
        self.settings.cache_dir.join("pulls").join(&hash[..32])
    }

    fn pull_lock(&self, dir: &std::path::Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.state.pulls.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(dir.to_path_buf()).or_default().clone()
    }

    /// [`make_room`] off the async runtime.
    async fn room(&self, room: Room) -> Result<(), Error> {
        let state = self.state.clone();
        let dir = self.settings.cache_dir.clone();
        let max = self.settings.cache_max_bytes;
        tokio::task::spawn_blocking(move || make_room(&state, &dir, max, room))
            .await
            .map_err(|_| thread_lost(&self.settings.cache_dir))?
    }

    /// Makes the template disk of `source` at `size_bytes` exist and
    /// returns it. A failed build leaves no file behind (the cache only
    /// ever receives complete images); a failed first pull removes its
    /// layout directory.
    pub async fn ensure(
        &self,
        source: &ImageSource,
        size_bytes: u64,
    ) -> Result<TemplateDisk, Error> {
        self.ensure_with(source, size_bytes, &Pull::default()).await
    }

    /// [`ensure`](Self::ensure), pulling with `pull`'s credentials, and
    /// first looking for the disk of its pinned digest in the cache.
    pub async fn ensure_with(
        &self,
        source: &ImageSource,
        size_bytes: u64,
        pull: &Pull,
    ) -> Result<TemplateDisk, Error> {
        match source {
            ImageSource::Registry(reference) => {
                if let Some(digest) = pull.pinned.as_deref().filter(|d| !d.is_empty())
                    && let Some(disk) = self.cached(digest, size_bytes).await?
                {
                    return Ok(disk);
                }
                let dir = self.pull_dir(reference);
                let lock = self.pull_lock(&dir);
                let _held = lock.lock().await;
                let had_layout = dir.join("index.json").exists();
                // Best effort: a pull of a cached image needs no room.
                if let Err(e) = self.room(Room::Before).await {
                    tracing::debug!(
                        error = &e as &dyn std::error::Error,
                        "no room before a pull"
                    );
                }
                let image = LocalImage::Layout {
                    dir: dir.clone(),
                    tag: Some(reference.clone()),
                };
                // The pinned manifest already pulled (another disk size of
                // the same template): build from it, the registry unasked.
                if had_layout && self.layout_holds(&image, pull.pinned.as_deref()).await {
                    return self.build(image, size_bytes).await;
                }
                let creds = pull.credentials.as_ref();
                if let Err(e) = pull_to_layout(reference, &dir, &self.settings.pull, creds).await {
                    if !had_layout {
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                    }
                    return Err(e);
                }
                self.build(image, size_bytes).await
            }
            ImageSource::Local(image) => {
                // Resolved here, right before the build reads it, whatever
                // the gRPC edge checked earlier.
                let (named, dirs) = (image.clone(), self.settings.image_dirs.clone());
                let image =
                    tokio::task::spawn_blocking(move || ImageSource::resolve_local(&named, &dirs))
                        .await
                        .map_err(|_| thread_lost(&self.settings.cache_dir))??;
                self.build(image, size_bytes).await
            }
        }
    }

    /// Whether the pulled layout `image` names manifest `pinned` (its
    /// blobs are checked against their digests when a build reads them).
    async fn layout_holds(&self, image: &LocalImage, pinned: Option<&str>) -> bool {
        let (LocalImage::Layout { dir, tag }, Some(pinned)) = (image.clone(), pinned) else {
            return false;
        };
        let pinned = pinned.to_string();
        tokio::task::spawn_blocking(move || {
            super::oci::resolve_layout(&dir, tag.as_deref())
                .is_ok_and(|r| !pinned.is_empty() && r.manifest_digest == pinned)
        })
        .await
        .unwrap_or(false)
    }

    /// The cached disk of manifest `digest` at `size_bytes`, stamped as
    /// handed out; `None` when the cache does not hold it.
    async fn cached(&self, digest: &str, size_bytes: u64) -> Result<Option<TemplateDisk>, Error> {
        let state = self.state.clone();
        let settings = self.settings.clone();
        let digest = digest.to_string();
        tokio::task::spawn_blocking(move || {
            let cache = ImageCache::open(&settings.cache_dir)?;
            let Some(disk) = cache.cached(&digest, size_bytes, &settings.guest_binary)? else {
                return Ok(None);
            };
            match handed_out(&state, &disk.path) {
                Ok(()) => Ok(Some(disk)),
                // Dropped from the cache meanwhile: pull and build it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Scratch {
                    path: disk.path,
                    source,
                }),
            }
        })
        .await
        .map_err(|_| thread_lost(&self.settings.cache_dir))?
    }

    /// Removes what builds and pulls interrupted by an agent crash left in
    /// the cache (scratch trees, partial blobs) and returns it. Complete
    /// template disks and pulled blobs stay. Blocking; call it at start,
    /// before any build runs.
    pub fn sweep(&self) -> Vec<PathBuf> {
        let root = &self.settings.cache_dir;
        let mut found = Vec::new();
        let children = |dir: &std::path::Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let named = |p: &std::path::Path, f: &dyn Fn(&str) -> bool| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(f)
        };
        for p in children(root) {
            if named(&p, &|n| n.starts_with(".archive-")) {
                found.push(p);
            } else if named(&p, &|n| n.starts_with("sha256-")) && p.is_dir() {
                found.extend(
                    children(&p)
                        .into_iter()
                        .filter(|c| named(c, &|n| n.starts_with(".build-"))),
                );
            }
        }
        for pull in children(&root.join("pulls")) {
            found.extend(
                children(&pull.join("blobs/sha256"))
                    .into_iter()
                    .filter(|c| named(c, &|n| n.ends_with(".partial"))),
            );
        }
        found.retain(|p| {
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match removed {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = &e as &dyn std::error::Error, "remove an interrupted image build");
                    false
                }
            }
        });
        found
    }

    async fn build(&self, image: LocalImage, size_bytes: u64) -> Result<TemplateDisk, Error> {
        let req = TemplateRequest {
            image,
            guest_binary: self.settings.guest_binary.clone(),
            size_bytes,
        };
        let dir = self.settings.cache_dir.clone();
        let limits = self.settings.pull.limits;
        let max = self.settings.cache_max_bytes;
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let cache = ImageCache::open(&dir)?.with_limits(limits);
            build_within(&state, &cache, &dir, max, &req)
        })
        .await
        .map_err(|_| thread_lost(&self.settings.cache_dir))?
    }
}

/// Builds (or finds) `req` in `cache` under the quota `max`, and stamps
/// the disk it hands out. Blocking.
fn build_within(
    state: &CacheState,
    cache: &ImageCache,
    dir: &Path,
    max: u64,
    req: &TemplateRequest,
) -> Result<TemplateDisk, Error> {
    // Room for the build, if it comes to one; a cached disk needs none.
    if let Err(e) = make_room(state, dir, max, Room::Before) {
        tracing::debug!(
            error = &e as &dyn std::error::Error,
            "no room before a build"
        );
    }
    // A cached disk dropped between the lookup and the stamp is built
    // again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let disk = cache.ensure_template(req)?;
        if disk.built {
            // A new disk: the cache must still fit it, or it goes again.
            if let Err(e) = make_room(state, dir, max, Room::After) {
                let _ = std::fs::remove_file(&disk.path);
                if let Some(entry) = disk.path.parent() {
                    let _ = std::fs::remove_dir(entry);
                }
                return Err(e);
            }
            return Ok(disk);
        }
        match handed_out(state, &disk.path) {
            Ok(()) => return Ok(disk),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => continue,
            Err(source) => {
                return Err(Error::Scratch {
                    path: disk.path,
                    source,
                });
            }
        }
    }
}

fn handed_out(state: &CacheState, path: &Path) -> std::io::Result<()> {
    let _turn = state.handing.lock().unwrap_or_else(|p| p.into_inner());
    quota::stamp(path)
}

/// Drops least recently used disks and layouts until the cache in `dir`
/// is under (`Before`) or at most at (`After`) `max`; refuses when what
/// is left in use is still too much. Blocking.
fn make_room(state: &CacheState, dir: &Path, max: u64, room: Room) -> Result<(), Error> {
    let fits = |held: u64| match room {
        Room::Before => held < max,
        Room::After => held <= max,
    };
    let (held, candidates) = quota::list(dir);
    if fits(held) {
        return Ok(());
    }
    let users = state
        .users
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // No users known: only pulled layouts may go.
    let keep = users
        .and_then(|w| w.upgrade())
        .and_then(|u| u.in_use())
        .map(|paths| (quota::ids(&paths), true))
        .unwrap_or_default();
    let candidates: Vec<quota::Candidate> = candidates
        .into_iter()
        .filter(|c| keep.1 || c.kind == quota::Kind::Pull)
        .collect();
    let target = match room {
        Room::Before => max.saturating_sub(1),
        Room::After => max,
    };
    let now = std::time::SystemTime::now();
    for c in quota::plan_eviction(&candidates, held, target, &keep.0, now) {
        let removed = match c.kind {
            quota::Kind::Pull => {
                // The same lock a pull of that reference takes: held, the
                // layout is in use; taken here, no pull starts meanwhile.
                let lock = state
                    .pulls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(c.path.clone())
                    .or_default()
                    .clone();
                let Ok(_held) = lock.try_lock() else {
                    continue;
                };
                quota::remove(c)
            }
            quota::Kind::Template => {
                let _turn = state.handing.lock().unwrap_or_else(|p| p.into_inner());
                // Handed out since it was listed: it stays.
                let fresh = std::fs::metadata(&c.path)
                    .and_then(|m| m.accessed())
                    .is_ok_and(|m| m > c.used_at);
                if fresh {
                    continue;
                }
                quota::remove(c)
            }
        };
        match removed {
            Ok(()) => tracing::info!(
                path = %c.path.display(),
                bytes = c.bytes,
                "dropped a least recently used image from the cache"
            ),
            Err(e) => tracing::warn!(
                path = %c.path.display(),
                error = &e as &dyn std::error::Error,
                "drop an image from the cache"
            ),
        }
    }
    let held = quota::allocated(dir);
    if fits(held) {
        Ok(())
    } else {
        Err(Error::CacheFull {
            dir: dir.to_path_buf(),
            used: held,
            quota: max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_interrupted_work() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let make = |rel: &str, is_dir: bool| {
            let p = root.join(rel);
            std::fs::create_dir_all(if is_dir { &p } else { p.parent().unwrap() }).unwrap();
            if !is_dir {
                std::fs::write(&p, b"x").unwrap();
            }
            p
        };
        let scratch = [
            make(".archive-1-0", true),
            make("sha256-ab/.build-1-1", true),
            make("pulls/p1/blobs/sha256/cd.partial", false),
        ];
        let kept = [
            make("sha256-ab/rootfs-4096-g0.ext4", false),
            make("sha256-ab.lock", false),
            make("pulls/p1/blobs/sha256/cd", false),
            make("pulls/p1/index.json", false),
        ];
        let b = TemplateBuilder::new(TemplateSettings {
            cache_dir: root.to_path_buf(),
            guest_binary: "/g".into(),
            pull: PullOptions::default(),
            cache_max_bytes: quota::DEFAULT_MAX_BYTES,
            image_dirs: Default::default(),
        });
        let mut removed = b.sweep();
        removed.sort();
        let mut want = scratch.to_vec();
        want.sort();
        assert_eq!(removed, want);
        assert!(scratch.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()));
        assert!(b.sweep().is_empty());
    }
}
