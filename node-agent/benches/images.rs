//! OCI layout -> ext4 template time for a generated image of about 200 MB
//! of files in three gzip layers (one with whiteouts and an opaque
//! directory). Needs root (ownership) and mkfs.ext4.
//! Run: `cargo bench -p wrenn-node-agent --bench images`
//! (`WRENN_BENCH_IMAGE_MB` changes the size).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use wrenn_node_agent::images::{ImageCache, LocalImage, TemplateRequest, oci, unpack, write_ext4};

const MIB: u64 = 1 << 20;

/// Half-compressible content, like binaries and libraries.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
        out.extend_from_slice(b"wrenn-lib");
    }
    out.truncate(len);
    out
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, usize) {
    let d = format!("sha256:{:x}", Sha256::digest(bytes));
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    (d, bytes.len())
}

/// Layer `i` of `files` files of `file_size` bytes in 20 directories.
fn layer(i: u64, files: u64, file_size: usize, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    {
        let mut b = tar::Builder::new(&mut gz);
        for d in 0..20 {
            let mut h = header(tar::EntryType::Directory, 0, 0o755);
            b.append_data(&mut h, format!("usr/lib/pkg{d}"), &[][..])
                .unwrap();
        }
        for f in 0..files {
            let data = content(i * 1_000_003 + f, file_size);
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
            b.append_data(
                &mut h,
                format!("usr/lib/pkg{}/l{i}-f{f}.so", f % 20),
                &data[..],
            )
            .unwrap();
        }
        for (path, data) in extra {
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.finish().unwrap();
    }
    gz.finish().unwrap()
}

fn main() {
    if let Err(why) = wrenn_testkit::need_root() {
        println!("images bench skipped: {why}");
        return;
    }
    let total_mb: u64 = std::env::var("WRENN_BENCH_IMAGE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");

    // Three layers: 60 % small files, 30 % more files, 10 % a few big ones
    // plus whiteouts of the first layer.
    let t = Instant::now();
    let small = 64 * 1024;
    let n1 = total_mb * MIB * 6 / 10 / small as u64;
    let n2 = total_mb * MIB * 3 / 10 / small as u64;
    let big = (total_mb * MIB / 10 / 4) as usize;
    let wh = b"";
    let l1 = layer(1, n1, small, &[]);
    let l2 = layer(
        2,
        n2,
        small,
        &[
            ("usr/lib/pkg0/.wh.l1-f0.so", wh),
            ("usr/lib/pkg1/.wh..wh..opq", wh),
        ],
    );
    let l3 = layer(3, 4, big, &[]);
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#;
    let (config_digest, config_size) = put_blob(&layout, config);
    let layers: Vec<serde_json::Value> = [l1, l2, l3]
        .iter()
        .map(|l| {
            let (d, s) = put_blob(&layout, l);
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers,
    }))
    .unwrap();
    let (md, ms) = put_blob(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}
        ]}))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let compressed: u64 = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "generated layout: {} files, {compressed} bytes of blobs, in {:?}",
        n1 + n2 + 4,
        t.elapsed()
    );

    let guest = dir.path().join("wrenn-guest");
    let mut g = std::fs::File::create(&guest).unwrap();
    g.write_all(&content(7, 4 << 20)).unwrap();
    drop(g);
    let size_bytes = (total_mb * 2 + 256) * MIB;
    let req = TemplateRequest {
        image: LocalImage::Layout {
            dir: layout.clone(),
            tag: None,
        },
        guest_binary: guest,
        size_bytes,
    };

    let mut runs = Vec::new();
    let mut last = None;
    for i in 0..3 {
        let cache = ImageCache::open(dir.path().join(format!("cache{i}"))).unwrap();
        let t = Instant::now();
        let disk = cache.ensure_template(&req).unwrap();
        runs.push(t.elapsed());
        assert!(disk.built);
        if let Some(prev) = last.replace(disk.path.clone()) {
            std::fs::remove_dir_all(Path::new(&prev).parent().unwrap()).unwrap();
        }
    }
    let disk = last.unwrap();
    let meta = std::fs::metadata(&disk).unwrap();
    runs.sort();
    let t = Instant::now();
    let cache = ImageCache::open(dir.path().join("cache2")).unwrap();
    assert!(!cache.ensure_template(&req).unwrap().built);
    let hit = t.elapsed();

    // Phases, once: unpack (decompress + verify + write tree), mkfs.
    let root = dir.path().join("phase-root");
    std::fs::create_dir(&root).unwrap();
    let resolved = oci::resolve_layout(&layout, None).unwrap();
    let t = Instant::now();
    let mut unpacked = 0;
    let budget = unpack::Budget::new(unpack::Limits::default());
    for l in &resolved.layers {
        unpacked += oci::apply_blob(&root, l, &budget).unwrap().bytes;
    }
    let unpack = t.elapsed();
    let t = Instant::now();
    write_ext4(&root, &dir.path().join("phase.ext4"), size_bytes).unwrap();
    let mkfs = t.elapsed();

    println!(
        "OCI -> ext4 ({total_mb} MB of files requested, {unpacked} bytes unpacked, {compressed} bytes compressed): \
         median {:?} of 3 (min {:?}, max {:?}); cache hit {:?}",
        runs[1], runs[0], runs[2], hit
    );
    println!(
        "  phases: unpack {unpack:?}, mkfs.ext4 -d {mkfs:?}; image {} bytes apparent, {} bytes allocated",
        meta.len(),
        meta.blocks() * 512
    );
    let per_s = |bytes: u64| bytes as f64 / 1e6 / runs[1].as_secs_f64();
    println!(
        "  throughput (median run): {:.0} MB/s of files unpacked into the ext4 image, {:.0} MB/s of compressed layers",
        per_s(unpacked),
        per_s(compressed)
    );
}
