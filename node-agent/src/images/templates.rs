//! [`TemplateBuilder`]: from an [`ImageSource`] to a template disk in the
//! cache, for the capsule supervisor. A registry image is first pulled into
//! an OCI layout under the cache (`pulls/<hash of the reference>`), which
//! also keeps its blobs for the next pull; the build is
//! [`ImageCache::ensure_template`], whose `flock` makes concurrent capsules
//! of one image (in this process or another) build it once.
//!
//! Builds run on blocking threads and hold no capsule lock but the one of
//! the capsule that asked, so a long build delays only that capsule.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::{
    Error, ImageCache, ImageSource, LocalImage, PullOptions, TemplateDisk, TemplateRequest,
    pull_to_layout,
};

/// Where templates are built and what goes into them.
#[derive(Clone, Debug)]
pub struct TemplateSettings {
    /// The cache directory (`<state>/images`).
    pub cache_dir: PathBuf,
    /// `wrenn-guest`, injected into every template.
    pub guest_binary: PathBuf,
    /// How to reach registries.
    pub pull: PullOptions,
    /// Where local images (`oci:`, `docker-archive:`) may come from.
    pub image_dirs: super::ImageDirs,
}

/// Builds (or finds) template disks. See the module docs.
#[derive(Debug)]
pub struct TemplateBuilder {
    settings: TemplateSettings,
    /// One pull-and-build at a time per pulled layout: `pull_to_layout`
    /// rewrites the layout's `index.json`, which a build reads.
    pulls: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
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
            pulls: Mutex::new(HashMap::new()),
        }
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
        let mut map = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(dir.to_path_buf()).or_default().clone()
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
        match source {
            ImageSource::Registry(reference) => {
                let dir = self.pull_dir(reference);
                let lock = self.pull_lock(&dir);
                let _held = lock.lock().await;
                let had_layout = dir.join("index.json").exists();
                if let Err(e) = pull_to_layout(reference, &dir, &self.settings.pull).await {
                    if !had_layout {
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                    }
                    return Err(e);
                }
                let image = LocalImage::Layout {
                    dir,
                    tag: Some(reference.clone()),
                };
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
        tokio::task::spawn_blocking(move || ImageCache::open(&dir)?.ensure_template(&req))
            .await
            .map_err(|_| thread_lost(&self.settings.cache_dir))?
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
