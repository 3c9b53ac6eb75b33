//! Building OCI image layouts in tests: layer tarballs with any entry
//! (whiteouts, links, xattrs, hostile paths) and a layout tagged `latest`.
//! Shared by the image and supervisor tests.
#![allow(dead_code)] // each test crate uses its own subset

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

pub fn hdr(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h
}

/// Builds one layer tar.
pub struct LayerTar(tar::Builder<Vec<u8>>);

impl Default for LayerTar {
    fn default() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
}

impl LayerTar {
    pub fn builder(&mut self) -> &mut tar::Builder<Vec<u8>> {
        &mut self.0
    }
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = hdr(tar::EntryType::Directory, 0o755, 0);
        self.builder().append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    pub fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64) -> Self {
        let mut h = hdr(tar::EntryType::Regular, mode, uid);
        h.set_size(data.len() as u64);
        self.builder().append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = hdr(kind, 0o777, 0);
        self.builder().append_link(&mut h, path, target).unwrap();
        self
    }
    /// PAX xattrs for the next entry.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.builder()
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

pub fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = digest(bytes);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    d
}

/// Writes an OCI layout of `layers` (each `(bytes, gzipped)`) tagged
/// `latest`; returns the manifest digest.
pub fn write_layout(dir: &Path, layers: &[(Vec<u8>, bool)]) -> String {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let config_digest = put_blob(dir, config);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|(bytes, gz)| {
            let blob = if *gz { gzip(bytes) } else { bytes.clone() };
            let d = put_blob(dir, &blob);
            serde_json::json!({
                "mediaType": if *gz {
                    "application/vnd.oci.image.layer.v1.tar+gzip"
                } else {
                    "application/vnd.oci.image.layer.v1.tar"
                },
                "digest": d,
                "size": blob.len(),
            })
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest
}
