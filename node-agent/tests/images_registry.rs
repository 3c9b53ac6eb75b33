//! The registry path: `pull_to_layout` against a minimal in-process
//! registry (OCI distribution API over plain HTTP on 127.0.0.1), then the
//! pulled layout builds a template like any local one. A blob served with
//! the wrong content is refused.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use wrenn_node_agent::images::{
    Error, ImageCache, LocalImage, PullOptions, TemplateRequest, pull_to_layout,
};
use wrenn_testkit::Tier;

fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("etc/hostname", &b"pulled\n"[..]),
        ("bin/app", b"#!/bin/sh\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// Content served by path; `corrupt` names a blob served with other bytes.
struct Registry {
    manifest: Vec<u8>,
    blobs: HashMap<String, Vec<u8>>,
}

fn image(corrupt_layer: bool) -> (Registry, String) {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#.to_vec();
    let layer = layer();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let md = digest(&manifest);
    let mut blobs = HashMap::new();
    blobs.insert(digest(&config), config);
    let served = if corrupt_layer {
        let mut l = layer.clone();
        let n = l.len();
        l[n - 9] ^= 0xff;
        l
    } else {
        layer.clone()
    };
    blobs.insert(digest(&layer), served);
    (Registry { manifest, blobs }, md)
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(serve(listener, Arc::new(reg)));
    (addr, task)
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
    let opts = PullOptions {
        auth: None,
        insecure_registries: vec![addr.clone()],
    };
    let reference = format!("{addr}/wrenn/test:latest");
    let got = pull_to_layout(&reference, &layout, &opts).await.unwrap();
    assert_eq!(got, manifest_digest);
    // Pulling again fetches only the manifest (blobs are present).
    pull_to_layout(&reference, &layout, &opts).await.unwrap();
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
    let opts = PullOptions {
        auth: None,
        insecure_registries: vec![addr.clone()],
    };
    let err = pull_to_layout(&format!("{addr}/wrenn/test:latest"), &layout, &opts)
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
