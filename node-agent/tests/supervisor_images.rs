//! Capsules from OCI images through the supervisor (Tier::Host): a layout
//! built in the test becomes a template disk in the agent's cache (real
//! `mkfs.ext4`), each capsule gets a real qcow2 overlay over it, and the
//! VMM and network are the recording fakes. Checks that the second
//! capsule hits the cache, that concurrent capsules of one image build it
//! once, that a hostile image fails with its cause and leaves nothing, and
//! that the cache keeps to its quota by dropping the least recently used
//! template no capsule uses, and refuses a build when only used ones are
//! left.
#![allow(clippy::unwrap_used)]

mod oci_layout;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_layout::{LayerTar, write_layout};
use wrenn_node_agent::capsule::{
    BootSource, CapsuleSpec, Egress, Error, Host, ImageTemplate, Resources, State, Supervisor,
    SupervisorConfig,
};
use wrenn_node_agent::images::{
    ImageCache, ImageDirs, LocalImage, PullOptions, TemplateBuilder, TemplateRequest,
    TemplateSettings, quota,
};
use wrenn_node_agent::network::FakeNet;
use wrenn_node_agent::storage::{Qcow2Store, StorageConfig, qcow2};
use wrenn_node_agent::vmm::{FakeMachine, Step};
use wrenn_testkit::{Case, Tier, case, need_program, need_root};

const MIB: u64 = 1 << 20;

struct Bed {
    dir: tempfile::TempDir,
    machine: Arc<FakeMachine>,
    sup: Supervisor<FakeMachine>,
}

impl Bed {
    fn new() -> Self {
        Self::with_quota(quota::DEFAULT_MAX_BYTES)
    }

    fn with_quota(cache_max_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("wrenn-guest");
        std::fs::write(&guest, b"#!/bin/sh\n").unwrap();
        let machine = Arc::new(FakeMachine::new());
        let store = Qcow2Store::open(StorageConfig::new(dir.path().join("disks"))).unwrap();
        let mut cfg = SupervisorConfig::new(&dir.path().join("agent"), Path::new("/k/vmlinux"));
        let layouts = dir.path().join("layouts");
        std::fs::create_dir(&layouts).unwrap();
        cfg.templates = Arc::new(TemplateBuilder::new(TemplateSettings {
            cache_dir: dir.path().join("images"),
            guest_binary: guest,
            pull: PullOptions::default(),
            cache_max_bytes,
            image_dirs: ImageDirs::new(&[layouts], &dir.path().join("agent")).unwrap(),
        }));
        let sup = Supervisor::new(
            Host {
                machine: machine.clone(),
                net: Arc::new(FakeNet::new()),
                store: Arc::new(store),
            },
            cfg,
        );
        Self { dir, machine, sup }
    }

    /// The node admin's image directory the layouts go in.
    fn layouts(&self) -> PathBuf {
        self.dir.path().join("layouts")
    }

    /// A capsule from `layout`, named relative to [`Bed::layouts`].
    fn spec(&self, layout: &Path) -> CapsuleSpec {
        let name = layout.strip_prefix(self.layouts()).unwrap();
        CapsuleSpec {
            namespace: "default".into(),
            name: "c".into(),
            source: BootSource::Image(ImageTemplate {
                key: "default/img".into(),
                reference: format!("oci:{}", name.display()),
                digest: String::new(),
            }),
            resources: Resources {
                vcpus: 1,
                memory_bytes: 64 * MIB,
                disk_bytes: 64 * MIB,
            },
            kernel: None,
            cmdline: String::new(),
            env: Default::default(),
            egress: Egress::Allow,
            names: Default::default(),
            ports: Vec::new(),
        }
    }

    fn overlay(&self, uid: &str) -> PathBuf {
        self.dir.path().join(format!("disks/wrenn-{uid}.qcow2"))
    }

    /// Template disks in the cache, and anything a build left behind.
    fn cache(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let (mut disks, mut scratch) = (Vec::new(), Vec::new());
        let mut stack = vec![self.dir.path().join("images")];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".build-") || name.starts_with(".archive-") {
                    scratch.push(e.path());
                } else if name.ends_with(".ext4") {
                    disks.push(e.path());
                }
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        disks.sort();
        (disks, scratch)
    }
}

fn ready(name: &str) -> Option<Case> {
    let c = case(Tier::Host, name);
    if let Err(why) = need_root() {
        c.skip(format!("{why}: ownership in the image needs root"));
        return None;
    }
    if let Err(why) = need_program("mkfs.ext4") {
        c.skip(why);
        return None;
    }
    Some(c)
}

fn layout(dir: &Path, name: &str, marker: &[u8]) -> PathBuf {
    let layout = dir.join(name);
    let layer = LayerTar::default()
        .dir("etc")
        .file("etc/hostname", marker, 0o644, 0)
        .finish();
    write_layout(&layout, &[(layer, true)]);
    layout
}

#[tokio::test]
async fn capsules_from_an_oci_layout_share_one_cached_template() {
    let Some(_case) = ready("capsules_from_an_oci_layout_share_one_cached_template") else {
        return;
    };
    let b = Bed::new();
    let img = layout(&b.layouts(), "layout", b"capsule\n");

    let v = b
        .sup
        .create("c1", b.spec(&img), State::Running)
        .await
        .unwrap();
    assert_eq!(v.state, State::Running);
    assert_eq!(b.machine.steps("c1"), vec![Step::Launch]);
    let (disks, scratch) = b.cache();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert!(scratch.is_empty(), "{scratch:?}");
    let template = &disks[0];
    let info = qcow2::read_info(&b.overlay("c1")).unwrap();
    assert_eq!(info.backing_file.as_deref(), template.to_str());
    assert_eq!(info.backing_format.as_deref(), Some("raw"));
    assert_eq!(std::fs::metadata(template).unwrap().len(), 64 * MIB);
    let built = std::fs::metadata(template).unwrap();

    // The second capsule of the image reuses the file: same inode, untouched.
    b.sup
        .create("c2", b.spec(&img), State::Running)
        .await
        .unwrap();
    let (again, _) = b.cache();
    assert_eq!(&again, &disks);
    let now = std::fs::metadata(template).unwrap();
    assert_eq!(
        (now.ino(), now.mtime(), now.mtime_nsec()),
        (built.ino(), built.mtime(), built.mtime_nsec())
    );
    let info = qcow2::read_info(&b.overlay("c2")).unwrap();
    assert_eq!(info.backing_file.as_deref(), template.to_str());

    // Deleting the capsules keeps the template for the next one.
    for uid in ["c1", "c2"] {
        assert!(b.sup.delete(uid).await.unwrap());
        assert!(!b.overlay(uid).exists());
    }
    assert!(template.exists());
}

#[tokio::test]
async fn concurrent_capsules_of_one_image_build_it_once() {
    let Some(_case) = ready("concurrent_capsules_of_one_image_build_it_once") else {
        return;
    };
    let b = Bed::new();
    let img = layout(&b.layouts(), "layout", b"shared\n");
    let uids = ["a1", "a2", "a3"];
    let creates = uids.map(|uid| {
        let sup = b.sup.clone();
        let spec = b.spec(&img);
        tokio::spawn(async move { sup.create(uid, spec, State::Running).await })
    });
    for c in creates {
        assert_eq!(c.await.unwrap().unwrap().state, State::Running);
    }
    let (disks, scratch) = b.cache();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert!(scratch.is_empty(), "{scratch:?}");
    for uid in uids {
        let info = qcow2::read_info(&b.overlay(uid)).unwrap();
        assert_eq!(info.backing_file.as_deref(), disks[0].to_str());
    }
}

#[tokio::test]
async fn a_hostile_image_fails_with_its_cause_and_leaves_nothing() {
    let Some(_case) = ready("a_hostile_image_fails_with_its_cause_and_leaves_nothing") else {
        return;
    };
    let b = Bed::new();
    let img = b.layouts().join("hostile");
    // A device node: a guest must not get the host's disk.
    let mut t = LayerTar::default();
    let mut h = oci_layout::hdr(tar::EntryType::Block, 0o600, 0);
    h.set_device_major(8).unwrap();
    h.set_device_minor(0).unwrap();
    t.builder().append_data(&mut h, "dev/sda", &[][..]).unwrap();
    let layer = t.finish();
    write_layout(&img, &[(layer, false)]);
    let err = b
        .sup
        .create("bad", b.spec(&img), State::Running)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    let chain = err.chain();
    assert!(
        chain.contains("build template disk of capsule bad"),
        "{chain}"
    );
    assert!(chain.contains("dev/sda"), "{chain}");
    assert!(b.sup.get("bad").is_err());
    assert!(b.machine.steps("bad").is_empty());
    assert!(!b.overlay("bad").exists());
    let (disks, scratch) = b.cache();
    assert!(
        disks.is_empty() && scratch.is_empty(),
        "{disks:?} {scratch:?}"
    );
    assert!(!b.dir.path().join("agent/capsules/bad").exists());
}

/// A layout whose one layer holds 8 MiB that do not compress.
fn sized_layout(dir: &Path, name: &str, seed: u32) -> PathBuf {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let data: Vec<u8> = (0..8 * MIB as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let layout = dir.join(name);
    let layer = LayerTar::default().file("data", &data, 0o644, 0).finish();
    write_layout(&layout, &[(layer, true)]);
    layout
}

fn age(path: &Path) {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::open(path)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_accessed(hour_ago))
        .unwrap();
}

#[tokio::test]
async fn the_cache_drops_unused_templates_first_and_refuses_when_all_are_used() {
    let Some(_case) = ready("the_cache_drops_unused_templates_first_and_refuses_when_all_are_used")
    else {
        return;
    };
    // What one such template costs in the cache, measured.
    let scratch = tempfile::tempdir().unwrap();
    let guest = scratch.path().join("g");
    std::fs::write(&guest, b"#!/bin/sh\n").unwrap();
    let cache_dir = scratch.path().join("cache");
    ImageCache::open(&cache_dir)
        .unwrap()
        .ensure_template(&TemplateRequest {
            image: LocalImage::Layout {
                dir: sized_layout(scratch.path(), "calibrate", 9),
                tag: None,
            },
            guest_binary: guest,
            size_bytes: 64 * MIB,
        })
        .unwrap();
    let one = quota::allocated(&cache_dir);
    // Room for two and a half.
    let b = Bed::with_quota(one * 5 / 2);
    let spec = |name: &str, seed| {
        let mut s = b.spec(&sized_layout(&b.layouts(), name, seed));
        s.name = name.into();
        s
    };

    let used = spec("used", 1);
    let unused = spec("unused", 2);
    b.sup.create("c-used", used, State::Running).await.unwrap();
    b.sup
        .create("c-unused", unused, State::Running)
        .await
        .unwrap();
    assert!(b.sup.delete("c-unused").await.unwrap());
    let (disks, _) = b.cache();
    assert_eq!(disks.len(), 2, "{disks:?}");
    let used_disk = PathBuf::from(
        qcow2::read_info(&b.overlay("c-used"))
            .unwrap()
            .backing_file
            .unwrap(),
    );
    let unused_disk = disks.iter().find(|d| **d != used_disk).unwrap().clone();
    // Both were last used an hour ago; only one still is.
    age(&used_disk);
    age(&unused_disk);

    // A third image: the unused template goes, the used one stays.
    b.sup
        .create("c-third", spec("third", 3), State::Running)
        .await
        .unwrap();
    let (disks, scratch_left) = b.cache();
    assert!(scratch_left.is_empty(), "{scratch_left:?}");
    assert!(disks.contains(&used_disk), "{disks:?}");
    assert!(!unused_disk.exists(), "the unused template stayed");
    assert_eq!(disks.len(), 2, "{disks:?}");

    // A fourth: every template left is in use, so it is refused and its
    // disk goes again.
    let err = b
        .sup
        .create("c-fourth", spec("fourth", 4), State::Running)
        .await
        .unwrap_err();
    let chain = err.chain();
    eprintln!("{chain}");
    assert!(chain.contains("--image-cache-max-bytes"), "{chain}");
    let (after, scratch_left) = b.cache();
    assert_eq!(after, disks, "the refused build left its disk");
    assert!(scratch_left.is_empty(), "{scratch_left:?}");
    assert!(b.sup.get("c-fourth").is_err());
    assert!(quota::allocated(&b.dir.path().join("images")) <= one * 5 / 2);
}

/// Issue 11, past the gRPC edge: a local image that leaves the image
/// directory (a symlink to a real layout elsewhere, a `..` name, a node
/// path) is refused by the builder itself, before it reads a byte.
#[tokio::test]
async fn a_local_image_outside_the_image_dirs_is_refused_by_the_builder() {
    let Some(_case) = ready("a_local_image_outside_the_image_dirs_is_refused_by_the_builder")
    else {
        return;
    };
    let b = Bed::new();
    // A perfectly good layout, but outside the image directory.
    let elsewhere = layout(b.dir.path(), "elsewhere", b"not for you\n");
    std::os::unix::fs::symlink(&elsewhere, b.layouts().join("linked")).unwrap();
    for (i, (reference, says)) in [
        ("oci:linked", "symlink"),
        ("oci:../elsewhere", "'.'"),
        (
            &*format!("oci:{}", elsewhere.display()),
            "absolute paths are not allowed",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let uid = format!("out{i}");
        let mut spec = b.spec(&b.layouts().join("linked"));
        if let BootSource::Image(image) = &mut spec.source {
            image.reference = reference.to_string();
        }
        let err = b.sup.create(&uid, spec, State::Running).await.unwrap_err();
        assert!(matches!(err, Error::Image { .. }), "{err}");
        let chain = err.chain();
        assert!(chain.contains(says), "{reference}: {chain}");
        assert!(b.machine.steps(&uid).is_empty());
        assert!(!b.overlay(&uid).exists());
        assert!(!b.dir.path().join("agent/capsules").join(&uid).exists());
    }
    let (disks, scratch) = b.cache();
    assert!(
        disks.is_empty() && scratch.is_empty(),
        "{disks:?} {scratch:?}"
    );
}
