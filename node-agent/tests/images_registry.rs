//! The registry path: `pull_to_layout` against a minimal in-process
//! registry (OCI distribution API over plain HTTP on 127.0.0.1), then the
//! pulled layout builds a template like any local one. A blob served with
//! the wrong content is refused; so is a registry that sends more bytes
//! than a descriptor declares, or a manifest whose descriptors are over the
//! node's limits (before any blob is fetched), and the pull leaves nothing.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use wrenn_node_agent::images::unpack::{Limit, Limits};
use wrenn_node_agent::images::{
    Error, ImageCache, ImageSource, LocalImage, PullOptions, TemplateBuilder, TemplateRequest,
    TemplateSettings, pull_to_layout, quota,
};
use wrenn_testkit::Tier;
use wrenn_testkit::registry::{IMAGE_CONFIG, digest, image_manifest};

fn layer() -> Vec<u8> {
    let tar = wrenn_testkit::registry::tar_layer(&[
        ("etc/hostname", &b"pulled\n"[..]),
        ("bin/app", b"#!/bin/sh\n"),
    ])
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// Content served by path; `corrupt` names a blob served with other bytes.
struct Registry {
    manifest: Vec<u8>,
    blobs: HashMap<String, Vec<u8>>,
    /// Blob requests answered.
    blob_gets: AtomicUsize,
}

/// How the test registry lies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Served {
    /// As the manifest says.
    Honest,
    /// The layer with a flipped byte.
    Corrupt,
    /// The layer followed by this many more bytes than its descriptor says.
    Longer(usize),
}

fn image(corrupt_layer: bool) -> (Registry, String) {
    image_with(
        layer(),
        if corrupt_layer {
            Served::Corrupt
        } else {
            Served::Honest
        },
    )
}

fn image_with(layer: Vec<u8>, served: Served) -> (Registry, String) {
    let config = IMAGE_CONFIG.to_vec();
    let manifest = image_manifest(
        &config,
        &layer,
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let md = digest(&manifest);
    let mut blobs = HashMap::new();
    blobs.insert(digest(&config), config);
    let bytes = match served {
        Served::Honest => layer.clone(),
        Served::Corrupt => {
            let mut l = layer.clone();
            let n = l.len();
            l[n - 9] ^= 0xff;
            l
        }
        Served::Longer(extra) => {
            let mut l = layer.clone();
            l.resize(l.len() + extra, b'!');
            l
        }
    };
    blobs.insert(digest(&layer), bytes);
    (
        Registry {
            manifest,
            blobs,
            blob_gets: AtomicUsize::new(0),
        },
        md,
    )
}

async fn serve(listener: TcpListener, reg: Arc<Registry>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let reg = reg.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let md = digest(&reg.manifest);
            let (status, ctype, body, dig): (&str, &str, Vec<u8>, String) = if path == "/v2/" {
                ("200 OK", "application/json", b"{}".to_vec(), String::new())
            } else if path.contains("/manifests/") {
                (
                    "200 OK",
                    "application/vnd.oci.image.manifest.v1+json",
                    reg.manifest.clone(),
                    md,
                )
            } else if let Some(d) = path.split("/blobs/").nth(1) {
                reg.blob_gets.fetch_add(1, Ordering::Relaxed);
                match reg.blobs.get(d) {
                    Some(b) => (
                        "200 OK",
                        "application/octet-stream",
                        b.clone(),
                        String::new(),
                    ),
                    None => ("404 Not Found", "text/plain", Vec::new(), String::new()),
                }
            } else {
                ("404 Not Found", "text/plain", Vec::new(), String::new())
            };
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if !dig.is_empty() {
                head.push_str(&format!("Docker-Content-Digest: {dig}\r\n"));
            }
            head.push_str("\r\n");
            let _ = w.write_all(head.as_bytes()).await;
            if method != "HEAD" {
                let _ = w.write_all(&body).await;
            }
            let _ = w.shutdown().await;
        });
    }
}

async fn start(reg: Registry) -> (String, tokio::task::JoinHandle<()>) {
    let (addr, task, _) = start_shared(reg).await;
    (addr, task)
}

async fn start_shared(reg: Registry) -> (String, tokio::task::JoinHandle<()>, Arc<Registry>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let reg = Arc::new(reg);
    let task = tokio::spawn(serve(listener, reg.clone()));
    (addr, task, reg)
}

#[tokio::test]
async fn registry_pull_builds_a_template() {
    let case = wrenn_testkit::case(Tier::Host, "registry_pull_builds_a_template");
    for prog in ["mkfs.ext4", "debugfs"] {
        if let Err(why) = wrenn_testkit::need_program(prog) {
            return case.skip(why);
        }
    }
    let (reg, manifest_digest) = image(false);
    let (addr, server) = start(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let opts = plain_http(&addr, Limits::default());
    let reference = format!("{addr}/wrenn/test:latest");
    let got = pull_to_layout(&reference, &layout, &opts, None)
        .await
        .unwrap();
    assert_eq!(got, manifest_digest);
    // Pulling again fetches only the manifest (blobs are present).
    pull_to_layout(&reference, &layout, &opts, None)
        .await
        .unwrap();
    server.abort();

    let guest = dir.path().join("wrenn-guest");
    std::fs::write(&guest, b"guest").unwrap();
    let cache = ImageCache::open(dir.path().join("cache")).unwrap();
    let req = TemplateRequest {
        image: LocalImage::Layout {
            dir: layout,
            tag: Some(reference),
        },
        guest_binary: guest,
        size_bytes: 32 << 20,
    };
    let disk = tokio::task::spawn_blocking(move || cache.ensure_template(&req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(disk.manifest_digest, manifest_digest);
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/hostname"])
        .arg(&disk.path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pulled\n");
}

#[tokio::test]
async fn registry_blob_with_wrong_content_is_refused() {
    let _case = wrenn_testkit::case(Tier::Host, "registry_blob_with_wrong_content_is_refused");
    let (reg, _) = image(true);
    let (addr, server) = start(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let opts = plain_http(&addr, Limits::default());
    let err = pull_to_layout(&format!("{addr}/wrenn/test:latest"), &layout, &opts, None)
        .await
        .unwrap_err();
    server.abort();
    assert!(
        matches!(err, Error::Pull { .. } | Error::DigestMismatch { .. }),
        "{err}"
    );
    // Nothing half-written stays in the layout.
    let blobs = layout.join("blobs/sha256");
    let partial: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partial.is_empty());
    assert!(!Path::new(&layout.join("index.json")).exists());
}

/// Everything under `dir` (files and directories), to show a refused pull
/// left nothing.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Pulls from the test registry at `addr` (plain HTTP) within `limits`.
fn plain_http(addr: &str, limits: Limits) -> PullOptions {
    PullOptions {
        insecure_registries: vec![addr.to_string()],
        limits,
    }
}

/// The build of `reference` into `dir`'s cache, which must fail: its error
/// and the error's text (printed, for the log of a failed run).
async fn refused(dir: &Path, addr: &str, limits: Limits, reference: &str) -> (Error, String) {
    let b = builder(dir, addr, limits);
    let source = ImageSource::parse(&format!("{addr}/{reference}")).unwrap();
    let err = b.ensure(&source, 32 << 20).await.unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    (err, text)
}

/// Asserts the refused pull left nothing in `dir`'s cache but the (empty)
/// pulls directory: no layout, no partial blob, no cache entry.
#[track_caller]
fn assert_nothing_left(dir: &Path) {
    let left = tree(&dir.join("images"));
    assert!(left.iter().all(|p| p.ends_with("/pulls")), "{left:?}");
}

fn builder(dir: &Path, addr: &str, limits: Limits) -> TemplateBuilder {
    let guest = dir.join("wrenn-guest");
    std::fs::write(&guest, b"guest").unwrap();
    TemplateBuilder::new(TemplateSettings {
        cache_dir: dir.join("images"),
        guest_binary: guest,
        pull: plain_http(addr, limits),
        cache_max_bytes: quota::DEFAULT_MAX_BYTES,
        image_dirs: Default::default(),
    })
}

#[tokio::test]
async fn a_registry_sending_more_than_the_descriptor_is_cut_off() {
    let _case = wrenn_testkit::case(
        Tier::Host,
        "a_registry_sending_more_than_the_descriptor_is_cut_off",
    );
    // 64 MiB more than the descriptor's size: a registry that would fill
    // the node's disk with a "layer".
    let (reg, _) = image_with(layer(), Served::Longer(64 << 20));
    let (addr, server, _) = start_shared(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let (err, text) = refused(dir.path(), &addr, Limits::default(), "wrenn/liar:latest").await;
    server.abort();
    assert!(
        matches!(
            err,
            Error::OverLimit {
                limit: Limit::DescriptorSize,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("descriptor declares"), "{text}");
    assert_nothing_left(dir.path());
}

#[tokio::test]
async fn descriptors_over_the_limits_are_refused_before_any_blob_is_fetched() {
    let _case = wrenn_testkit::case(
        Tier::Host,
        "descriptors_over_the_limits_are_refused_before_any_blob_is_fetched",
    );
    let big = {
        let mut b = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i * 7 % 251) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", &data[..]).unwrap();
        b.into_inner().unwrap()
    };
    let (reg, _) = image_with(big, Served::Honest);
    let (addr, server, reg) = start_shared(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        layer_compressed_bytes: 1 << 20,
        ..Limits::default()
    };
    let (err, text) = refused(dir.path(), &addr, limits, "wrenn/big:latest").await;
    server.abort();
    assert!(
        matches!(
            err,
            Error::OverLimit {
                limit: Limit::LayerCompressed,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("--image-max-layer-compressed-bytes"),
        "{text}"
    );
    assert_eq!(reg.blob_gets.load(Ordering::Relaxed), 0);
    assert_nothing_left(dir.path());
}
