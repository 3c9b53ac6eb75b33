//! Template disks from OCI images built in the test: a layout with
//! whiteouts, opaque directories, links and ownership becomes an ext4
//! image whose tree `debugfs` checks; hostile layers are refused by name
//! and leave nothing in the cache; concurrent builds of one digest build
//! once; a `docker save` tarball builds the same way. Disk bombs (a sparse
//! entry declaring terabytes, a gzip bomb, too many files, an image over
//! its size) are refused naming the limit, and leave nothing either.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod oci_layout;

use std::path::{Path, PathBuf};
use std::process::Command;

use oci_layout::{LayerTar, hdr, write_layout};
use wrenn_node_agent::images::unpack::{Limit, Limits};
use wrenn_node_agent::images::{
    Error, GUEST_PATH, ImageCache, LocalImage, TemplateDisk, TemplateRequest,
};
use wrenn_testkit::Tier;

const MIB: u64 = 1 << 20;

const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The base layer and the layer with whiteouts the tree checks expect.
fn good_layers() -> Vec<(Vec<u8>, bool)> {
    let base = LayerTar::default()
        .dir("etc")
        .file("etc/hostname", b"old\n", 0o644, 0)
        .file("etc/gone", b"remove me\n", 0o644, 0)
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/tool", b"#!/bin/sh\n", 0o4755, 1000)
        .link(tar::EntryType::Link, "usr/bin/tool-again", "usr/bin/tool")
        // cap_net_raw+ep, as iputils' ping ships (VFS_CAP_REVISION_2).
        .xattr("security.capability", &CAP_NET_RAW)
        .file("usr/bin/ping", b"ping", 0o755, 0)
        .link(tar::EntryType::Symlink, "bin", "usr/bin")
        .link(tar::EntryType::Symlink, "etc/abs", "/usr/bin/tool")
        .dir("var")
        .dir("var/cache")
        .file("var/cache/old", b"stale\n", 0o644, 0)
        .dir("var/cache/sub")
        .file("var/cache/sub/deep", b"stale\n", 0o644, 0)
        .finish();
    let top = LayerTar::default()
        .file("etc/.wh.gone", b"", 0o644, 0)
        .file("etc/hostname", b"capsule\n", 0o644, 0)
        .file("var/cache/.wh..wh..opq", b"", 0o644, 0)
        .file("var/cache/fresh", b"new\n", 0o600, 33)
        .finish();
    vec![(base, true), (top, false)]
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    // stderr first: it opens with debugfs's banner.
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

fn exists_in(image: &Path, path: &str) -> bool {
    !debugfs(image, &format!("stat {path}")).contains("File not found")
}

fn need_tools(case: wrenn_testkit::Case) -> Option<wrenn_testkit::Case> {
    if let Err(why) = wrenn_testkit::need_root() {
        case.skip(format!("{why}: ownership in the image needs root"));
        return None;
    }
    for prog in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if let Err(why) = wrenn_testkit::need_program(prog) {
            case.skip(why);
            return None;
        }
    }
    Some(case)
}

/// A host case named `name` that has what an image build needs, with a
/// temp dir; `None` once the case is recorded as skipped.
fn tools_case(name: &str) -> Option<(wrenn_testkit::Case, tempfile::TempDir)> {
    let case = need_tools(wrenn_testkit::case(Tier::Host, name))?;
    Some((case, tempfile::tempdir().unwrap()))
}

/// A build of the layout at `dir/layout` tagged `tag`, with a guest
/// binary in `dir`, into a disk of `size_bytes`.
fn layout_request(dir: &Path, tag: Option<&str>, size_bytes: u64) -> TemplateRequest {
    TemplateRequest {
        image: LocalImage::Layout {
            dir: dir.join("layout"),
            tag: tag.map(str::to_string),
        },
        guest_binary: guest_binary(dir),
        size_bytes,
    }
}

fn guest_binary(dir: &Path) -> PathBuf {
    let p = dir.join("wrenn-guest");
    std::fs::write(&p, b"#!/bin/sh\necho wrenn-guest\n").unwrap();
    p
}

fn leftovers(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".build-")
                || name.starts_with(".archive-")
                || name.ends_with(".ext4")
            {
                out.push(e.path().display().to_string());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn check_tree(disk: &TemplateDisk) {
    let img = &disk.path;
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        debugfs(img, "cat /etc/hostname").trim_end().lines().last(),
        Some("capsule")
    );
    assert!(!exists_in(img, "/etc/gone"), "whiteout ignored");
    assert!(exists_in(img, "/etc/hostname"));
    // Opaque directory: lower contents gone, this layer's kept.
    assert!(!exists_in(img, "/var/cache/old"));
    assert!(!exists_in(img, "/var/cache/sub"));
    assert!(exists_in(img, "/var/cache/fresh"));
    // Ownership and set-id bits survive.
    let tool = debugfs(img, "stat /usr/bin/tool");
    assert!(tool.contains("User:  1000"), "{tool}");
    assert!(tool.contains("Mode:  04755"), "{tool}");
    assert!(tool.contains("Links: 2"), "hardlink lost: {tool}");
    let fresh = debugfs(img, "stat /var/cache/fresh");
    assert!(
        fresh.contains("User:    33") || fresh.contains("User:  33"),
        "{fresh}"
    );
    assert!(fresh.contains("Mode:  0600"), "{fresh}");
    // File capabilities survive (set after chown, which clears them).
    let ea = debugfs(img, "ea_list /usr/bin/ping");
    assert!(ea.contains("security.capability"), "{ea}");
    // Symlinks are kept as written, absolute ones too.
    assert!(debugfs(img, "stat /bin").contains("Fast link dest: \"usr/bin\""));
    assert!(debugfs(img, "stat /etc/abs").contains("Fast link dest: \"/usr/bin/tool\""));
    // The guest agent is where the kernel command line expects it.
    let guest = debugfs(img, &format!("stat {GUEST_PATH}"));
    assert!(
        guest.contains("Mode:  0755") && guest.contains("User:     0"),
        "{guest}"
    );
    assert!(debugfs(img, &format!("cat {GUEST_PATH}")).contains("echo wrenn-guest"));
    // Sparse at the requested size.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(img).unwrap();
    assert_eq!(meta.len(), disk.size_bytes);
    assert!(
        meta.blocks() * 512 < disk.size_bytes / 4,
        "not sparse: {} blocks",
        meta.blocks()
    );
}

#[test]
fn oci_layout_becomes_a_checked_ext4_tree() {
    let Some((_case, dir)) = tools_case("oci_layout_becomes_a_checked_ext4_tree") else {
        return;
    };
    let layout = dir.path().join("layout");
    let manifest = write_layout(&layout, &good_layers());
    let cache = ImageCache::open(dir.path().join("cache")).unwrap();
    let req = layout_request(dir.path(), Some("latest"), 256 * MIB);
    let disk = cache.ensure_template(&req).unwrap();
    assert!(disk.built);
    assert_eq!(disk.manifest_digest, manifest);
    assert!(
        disk.path.starts_with(
            dir.path()
                .join("cache")
                .join(format!("sha256-{}", &manifest[7..]))
        )
    );
    check_tree(&disk);
    // Cached: same file, not rebuilt.
    let again = cache.ensure_template(&req).unwrap();
    assert!(!again.built);
    assert_eq!(again.path, disk.path);
    // A different size is a different template file.
    let bigger = cache
        .ensure_template(&TemplateRequest {
            size_bytes: 300 * MIB,
            ..req.clone()
        })
        .unwrap();
    assert!(bigger.built);
    assert_ne!(bigger.path, disk.path);
}

#[test]
fn hostile_layers_are_refused_by_name_and_leave_nothing() {
    let Some(_case) = need_tools(wrenn_testkit::case(
        Tier::Host,
        "hostile_layers_are_refused_by_name_and_leave_nothing",
    )) else {
        return;
    };
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "symlink out, then write through it",
            LayerTar::default()
                .link(tar::EntryType::Symlink, "hostroot", "/")
                .file("hostroot/tmp/wrenn-pwned", b"x", 0o644, 0)
                .finish(),
            "hostroot/tmp/wrenn-pwned",
        ),
        (
            "relative symlink climbing out",
            LayerTar::default()
                .link(tar::EntryType::Symlink, "etc/up", "../../../../../etc")
                .finish(),
            "etc/up",
        ),
        (
            "absolute symlink climbing out",
            LayerTar::default()
                .link(tar::EntryType::Symlink, "etc/abs-up", "/../../etc/shadow")
                .finish(),
            "etc/abs-up",
        ),
        (
            "hardlink out",
            LayerTar::default()
                .link(tar::EntryType::Link, "etc/shadow-copy", "../../etc/shadow")
                .finish(),
            "etc/shadow-copy",
        ),
        (
            "device node",
            {
                let mut t = LayerTar::default();
                let mut h = hdr(tar::EntryType::Block, 0o600, 0);
                h.set_device_major(8).unwrap();
                h.set_device_minor(0).unwrap();
                t.builder().append_data(&mut h, "dev/sda", &[][..]).unwrap();
                t.finish()
            },
            "dev/sda",
        ),
    ];
    for (what, layer, entry) in hostile {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let mut layers = good_layers();
        layers.push((layer, true));
        write_layout(&layout, &layers);
        let cache_dir = dir.path().join("cache");
        let cache = ImageCache::open(&cache_dir).unwrap();
        let err = cache
            .ensure_template(&layout_request(dir.path(), None, 64 * MIB))
            .unwrap_err();
        assert!(matches!(err, Error::UnsafeEntry { .. }), "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(entry) && text.contains("sha256:"),
            "{what}: {text}"
        );
        eprintln!("{what}: {text}");
        assert!(
            leftovers(&cache_dir).is_empty(),
            "{what}: {:?}",
            leftovers(&cache_dir)
        );
    }
    assert!(!Path::new("/tmp/wrenn-pwned").exists());
}

#[test]
fn concurrent_builds_of_one_digest_build_once() {
    let Some((_case, dir)) = tools_case("concurrent_builds_of_one_digest_build_once") else {
        return;
    };
    let layout = dir.path().join("layout");
    write_layout(&layout, &good_layers());
    let req = layout_request(dir.path(), None, 128 * MIB);
    let cache_dir = dir.path().join("cache");
    let results: Vec<TemplateDisk> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                // Separate caches on one directory, as separate agents
                // processes would have: the lock is the file, not a mutex.
                let cache = ImageCache::open(&cache_dir).unwrap();
                let req = req.clone();
                s.spawn(move || cache.ensure_template(&req).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|d| d.built).count(), 1, "{results:?}");
    assert!(results.iter().all(|d| d.path == results[0].path));
    check_tree(&results[0]);
}

#[test]
fn docker_save_tarball_builds_the_same_tree() {
    let Some((_case, dir)) = tools_case("docker_save_tarball_builds_the_same_tree") else {
        return;
    };
    // Legacy `docker save` format: manifest.json naming layer tars.
    let layers = good_layers();
    let mut archive = tar::Builder::new(Vec::new());
    let mut names = Vec::new();
    for (i, (bytes, _)) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        let mut h = hdr(tar::EntryType::Regular, 0o644, 0);
        h.set_size(bytes.len() as u64);
        archive.append_data(&mut h, &name, &bytes[..]).unwrap();
        names.push(name);
    }
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["example/app:1"],
        "Layers": names,
    }]))
    .unwrap();
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("config.json", &b"{}"[..]),
    ] {
        let mut h = hdr(tar::EntryType::Regular, 0o644, 0);
        h.set_size(data.len() as u64);
        archive.append_data(&mut h, name, data).unwrap();
    }
    let tarball = dir.path().join("image.tar");
    std::fs::write(&tarball, archive.into_inner().unwrap()).unwrap();

    let cache_dir = dir.path().join("cache");
    let cache = ImageCache::open(&cache_dir).unwrap();
    let disk = cache
        .ensure_template(&TemplateRequest {
            image: LocalImage::DockerArchive {
                path: tarball,
                tag: Some("example/app:1".into()),
            },
            guest_binary: guest_binary(dir.path()),
            size_bytes: 128 * MIB,
        })
        .unwrap();
    assert!(disk.built);
    check_tree(&disk);
    let left: Vec<_> = leftovers(&cache_dir)
        .into_iter()
        .filter(|p| !p.ends_with(".ext4"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn too_small_a_disk_is_a_clear_error() {
    let Some((_case, dir)) = tools_case("too_small_a_disk_is_a_clear_error") else {
        return;
    };
    let layout = dir.path().join("layout");
    let big = LayerTar::default()
        .file("big", &vec![7u8; 3 * MIB as usize], 0o644, 0)
        .finish();
    write_layout(&layout, &[(big, true)]);
    let cache_dir = dir.path().join("cache");
    let err = ImageCache::open(&cache_dir)
        .unwrap()
        .ensure_template(&layout_request(dir.path(), None, 2 * MIB))
        .unwrap_err();
    assert!(matches!(err, Error::Mkfs { .. }), "{err}");
    assert!(leftovers(&cache_dir).is_empty());
}

/// Builds `layers` as a layout under `dir` into a fresh cache with
/// `limits`; returns the error and the cache directory.
fn build_refused(
    dir: &Path,
    layers: &[(Vec<u8>, bool)],
    limits: Limits,
) -> (Error, PathBuf, std::time::Duration) {
    let layout = dir.join("layout");
    write_layout(&layout, layers);
    let cache_dir = dir.join("cache");
    let cache = ImageCache::open(&cache_dir).unwrap().with_limits(limits);
    let started = std::time::Instant::now();
    let err = cache
        .ensure_template(&layout_request(dir, None, 64 * MIB))
        .unwrap_err();
    (err, cache_dir, started.elapsed())
}

/// Everything under `cache` other than lock files: a refused build must
/// leave none of it.
fn anything_left(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            if !e.file_name().to_string_lossy().ends_with(".lock") {
                out.push(e.path());
            }
        }
    }
    out
}

/// `err` refuses the build for `limit`, its text names each of `says` (the
/// flag to raise, the limit), and the refused build left nothing in `cache`.
fn assert_over_limit(err: &Error, cache: &Path, limit: Limit, says: &[&str]) {
    let text = err.to_string();
    eprintln!("{text}");
    assert!(
        matches!(err, Error::OverLimit { limit: l, .. } if *l == limit),
        "{text}"
    );
    for s in says {
        assert!(text.contains(s), "no {s:?} in: {text}");
    }
    assert!(
        anything_left(cache).is_empty(),
        "{:?}",
        anything_left(cache)
    );
}

/// A GNU sparse entry storing one byte and declaring `real_size` bytes:
/// unpacked naively, it writes `real_size` bytes of zeros.
fn sparse_bomb(path: &str, real_size: u64) -> Vec<u8> {
    let data = [b'x'; 512];
    wrenn_testkit::registry::sparse_layer(path, real_size - 512, &data, real_size).unwrap()
}

/// Node filesystem space the test directory's filesystem has left.
fn free_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks_available() * s.fragment_size()
}

#[test]
fn a_sparse_tar_bomb_is_refused_before_a_byte_is_written() {
    let Some((_case, dir)) = tools_case("a_sparse_tar_bomb_is_refused_before_a_byte_is_written")
    else {
        return;
    };
    // 4 TiB declared, 512 bytes stored: a 2 KiB layer.
    let bomb = sparse_bomb("var/lib/bomb.img", 4 << 40);
    let free = free_bytes(dir.path());
    let (err, cache, took) = build_refused(
        dir.path(),
        &[(good_layers().remove(0).0, true), (bomb, true)],
        Limits::default(),
    );
    assert_over_limit(
        &err,
        &cache,
        Limit::LayerBytes,
        &["var/lib/bomb.img", "--image-max-layer-bytes", "4.0 TiB"],
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    // Not a block of zeros reached the disk (other tests write meanwhile:
    // a little slack).
    assert!(free_bytes(dir.path()) + (256 << 20) >= free);
}

#[test]
fn a_gzip_bomb_layer_is_stopped_by_the_ratio_limit() {
    let Some((_case, dir)) = tools_case("a_gzip_bomb_layer_is_stopped_by_the_ratio_limit") else {
        return;
    };
    // One 256 MiB file of zeros in a tar, gzipped to a few hundred KiB:
    // under every size limit, about 1000:1.
    let size: u64 = 256 << 20;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut t = tar::Builder::new(&mut gz);
        let mut h = hdr(tar::EntryType::Regular, 0o644, 0);
        h.set_size(size);
        t.append_data(
            &mut h,
            "zeros",
            std::io::Read::take(std::io::repeat(0), size),
        )
        .unwrap();
        t.finish().unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    // Marked a plain tar: gzip is recognised by its bytes, not its name.
    let (err, cache_dir, _) = build_refused(dir.path(), &[(bomb, false)], Limits::default());
    assert_over_limit(&err, &cache_dir, Limit::Ratio, &["--image-max-ratio"]);
}

#[test]
fn a_layer_with_too_many_files_is_refused() {
    let Some((_case, dir)) = tools_case("a_layer_with_too_many_files_is_refused") else {
        return;
    };
    let mut t = LayerTar::default().dir("many");
    for i in 0..2000 {
        t = t.file(&format!("many/f{i}"), b"", 0o644, 0);
    }
    let (err, cache, _) = build_refused(
        dir.path(),
        &[(t.finish(), true)],
        Limits {
            files: 1000,
            ..Limits::default()
        },
    );
    assert_over_limit(
        &err,
        &cache,
        Limit::Files,
        &["--image-max-files", "1000 entries"],
    );
    assert!(matches!(err, Error::OverLimit { value: 1001, .. }), "{err}");
}

#[test]
fn an_image_over_the_per_image_limit_is_refused_across_layers() {
    let Some((_case, dir)) =
        tools_case("an_image_over_the_per_image_limit_is_refused_across_layers")
    else {
        return;
    };
    // Each layer alone is within the per-layer limit; together they are not.
    let noise = |seed: u8| -> Vec<u8> {
        (0..3 * MIB as usize)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    };
    let layers = [1u8, 2, 3].map(|s| {
        (
            LayerTar::default()
                .file(&format!("blob{s}"), &noise(s), 0o644, 0)
                .finish(),
            true,
        )
    });
    let (err, cache, _) = build_refused(
        dir.path(),
        &layers,
        Limits {
            layer_bytes: 4 * MIB,
            image_bytes: 8 * MIB,
            ..Limits::default()
        },
    );
    assert_over_limit(
        &err,
        &cache,
        Limit::ImageBytes,
        &["--image-max-bytes", "8.0 MiB"],
    );
}
