//! Reading images from disk: an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) or an unpacked
//! `docker save` archive (which is an OCI layout since Docker 25, or the
//! legacy `manifest.json` format before). Blobs are checked against their
//! digests; digests are checked to be `sha256:<64 hex>` before they become
//! paths.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Error;

/// Media types of an image index (OCI and Docker manifest list).
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Annotation naming a tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI content descriptor (the fields we use).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform, in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// Platform of an index entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
}

/// An image index (`index.json` or a nested index blob).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Entries.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Media type, if present.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Config blob.
    pub config: Descriptor,
    /// Layers, lowest first.
    pub layers: Vec<Descriptor>,
}

/// One layer to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Digest (or, in a legacy archive, its path) for errors.
    pub id: String,
    /// The blob file.
    pub path: PathBuf,
    /// Digest to verify the blob against, when known.
    pub verify: Option<String>,
}

/// An image resolved to its layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The cache key: the manifest digest.
    pub manifest_digest: String,
    /// Lowest first.
    pub layers: Vec<Layer>,
}

/// The hex of a `sha256:` digest, refusing anything else.
pub fn digest_hex(digest: &str) -> Result<&str, Error> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    hex.ok_or_else(|| Error::BadDigest {
        digest: digest.to_string(),
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, Error> {
    Ok(dir.join("blobs/sha256").join(digest_hex(digest)?))
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadImage {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::ParseImage {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads blob `digest` and checks its content.
fn read_blob(dir: &Path, digest: &str) -> Result<Vec<u8>, Error> {
    let path = blob_path(dir, digest)?;
    let bytes = read_file(&path)?;
    let actual = sha256_digest(&bytes);
    if actual != digest {
        return Err(Error::DigestMismatch {
            digest: digest.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

/// The OCI architecture name of this host.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Picks the manifest from index entries: the one tagged `tag` when
/// given, else the one for `arch` on linux, else the only one.
pub fn plan_manifest<'a>(
    entries: &'a [Descriptor],
    tag: Option<&str>,
    arch: &str,
) -> Result<&'a Descriptor, String> {
    let tagged: Vec<&Descriptor> = match tag {
        Some(t) => entries
            .iter()
            .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .collect(),
        None => entries.iter().collect(),
    };
    if tagged.is_empty() {
        return Err(format!("no manifest tagged {tag:?}"));
    }
    if let [only] = tagged[..] {
        return Ok(only);
    }
    tagged
        .iter()
        .copied()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .ok_or_else(|| {
            format!(
                "{} manifests and none for linux/{arch}; name one with a tag",
                tagged.len()
            )
        })
}

/// Resolves an OCI image layout directory to its layers.
pub fn resolve_layout(dir: &Path, tag: Option<&str>) -> Result<ResolvedImage, Error> {
    let index_path = dir.join("index.json");
    let index: Index = parse(&index_path, &read_file(&index_path)?)?;
    let mut entries = index.manifests;
    let mut tag = tag;
    // Follow nested indexes (multi-platform images) down to a manifest.
    for _ in 0..4 {
        let chosen = plan_manifest(&entries, tag, host_architecture())
            .map_err(|why| Error::NoManifest {
                path: dir.to_path_buf(),
                why,
            })?
            .clone();
        let bytes = read_blob(dir, &chosen.digest)?;
        if INDEX_TYPES.contains(&chosen.media_type.as_str()) {
            let nested: Index = parse(&blob_path(dir, &chosen.digest)?, &bytes)?;
            entries = nested.manifests;
            tag = None;
            continue;
        }
        let manifest: Manifest = parse(&blob_path(dir, &chosen.digest)?, &bytes)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    id: l.digest.clone(),
                    path: blob_path(dir, &l.digest)?,
                    verify: Some(l.digest.clone()),
                })
            })
            .collect::<Result<_, Error>>()?;
        return Ok(ResolvedImage {
            manifest_digest: chosen.digest,
            layers,
        });
    }
    Err(Error::NoManifest {
        path: dir.to_path_buf(),
        why: "indexes nested too deep".into(),
    })
}

/// One image of a legacy `docker save` `manifest.json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct LegacyEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Resolves an unpacked `docker save` archive: its OCI layout when it has
/// one (Docker 25+), else the legacy `manifest.json`. `tag` picks an image
/// (`repo:tag`) when the archive holds several.
pub fn resolve_docker_dir(dir: &Path, tag: Option<&str>) -> Result<ResolvedImage, Error> {
    if dir.join("index.json").exists() && dir.join("blobs").is_dir() {
        // Docker tags index entries with the full `repo:tag` name.
        return resolve_layout(dir, tag);
    }
    let path = dir.join("manifest.json");
    let entries: Vec<LegacyEntry> = parse(&path, &read_file(&path)?)?;
    let entry = match tag {
        Some(t) => entries.iter().find(|e| {
            e.repo_tags
                .as_ref()
                .is_some_and(|tags| tags.iter().any(|x| x == t))
        }),
        None if entries.len() == 1 => entries.first(),
        None => None,
    }
    .ok_or_else(|| Error::NoManifest {
        path: path.clone(),
        why: format!("{} images and none chosen by tag {tag:?}", entries.len()),
    })?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let rel = super::unpack::plan_path(Path::new(l)).map_err(|why| Error::UnsafeEntry {
            layer: "manifest.json".into(),
            entry: l.clone(),
            why: why.to_string(),
        })?;
        // Docker 25+ legacy entries point into blobs/sha256/<hex>.
        let verify = rel
            .strip_prefix("blobs/sha256")
            .ok()
            .and_then(|h| h.to_str())
            .map(|h| format!("sha256:{h}"))
            .filter(|d| digest_hex(d).is_ok());
        layers.push(Layer {
            id: l.clone(),
            path: dir.join(rel),
            verify,
        });
    }
    // No manifest digest in this format: key the cache on the entry itself
    // (config file name is the image id, plus the layer list).
    let canonical = serde_json::to_vec(&(&entry.config, &entry.layers)).map_err(|source| {
        Error::ParseImage {
            path: path.clone(),
            source,
        }
    })?;
    Ok(ResolvedImage {
        manifest_digest: sha256_digest(&canonical),
        layers,
    })
}

/// Reads `inner` while hashing it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies `layer` onto `root`: detects gzip by its magic bytes (Docker
/// archives hold plain tars whatever their names say), refuses zstd, and
/// checks the blob's digest once it has been read to the end. Every byte,
/// trailing garbage included, is charged to `budget`.
pub fn apply_blob(
    root: &Path,
    layer: &Layer,
    budget: &super::unpack::Budget,
) -> Result<super::unpack::LayerStats, Error> {
    use super::unpack::Side;
    let file = File::open(&layer.path).map_err(|source| Error::ReadImage {
        path: layer.path.clone(),
        source,
    })?;
    let stored = file
        .metadata()
        .map_err(|source| Error::ReadImage {
            path: layer.path.clone(),
            source,
        })?
        .len();
    budget.start_layer(&layer.id, Some(stored))?;
    let read_err = |source| {
        budget.or_over(Error::ReadLayer {
            layer: layer.id.clone(),
            source,
        })
    };
    let mut hashed = BufReader::with_capacity(
        1 << 20,
        Hashing {
            inner: budget.meter(Side::Compressed, file),
            hash: Sha256::new(),
        },
    );
    let magic = hashed
        .fill_buf()
        .map_err(read_err)?
        .get(..4)
        .map(<[u8]>::to_vec);
    let stats = match magic.as_deref() {
        Some([0x1f, 0x8b, ..]) => {
            let mut gz = flate2::read::MultiGzDecoder::new(&mut hashed);
            let stats = super::unpack::apply_layer(root, &mut gz, &layer.id, budget)?;
            io::copy(&mut budget.meter(Side::Unpacked, &mut gz), &mut io::sink())
                .map_err(read_err)?;
            stats
        }
        Some([0x28, 0xb5, 0x2f, 0xfd]) => {
            return Err(Error::UnsupportedCompression {
                layer: layer.id.clone(),
                compression: "zstd",
            });
        }
        _ => super::unpack::apply_layer(root, &mut hashed, &layer.id, budget)?,
    };
    io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
    if let Some(want) = &layer.verify {
        let actual = format!("sha256:{:x}", hashed.into_inner().hash.finalize());
        if &actual != want {
            return Err(Error::DigestMismatch {
                digest: want.clone(),
                actual,
            });
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(digest: &str, arch: Option<&str>, tag: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest.into(),
            size: 1,
            annotations: tag
                .map(|t| BTreeMap::from([(REF_NAME.to_string(), t.to_string())]))
                .unwrap_or_default(),
            platform: arch.map(|a| Platform {
                architecture: a.into(),
                os: "linux".into(),
            }),
        }
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(digest_hex(&good).is_ok());
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:aa",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/x", "a".repeat(62)),
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_are_chosen_by_tag_then_platform() {
        let entries = vec![
            desc("sha256:1", Some("arm64"), Some("v1")),
            desc("sha256:2", Some("amd64"), Some("v1")),
            desc("sha256:3", None, Some("v2")),
        ];
        assert_eq!(
            plan_manifest(&entries, Some("v1"), "amd64").unwrap().digest,
            "sha256:2"
        );
        assert_eq!(
            plan_manifest(&entries, Some("v2"), "amd64").unwrap().digest,
            "sha256:3"
        );
        assert!(plan_manifest(&entries, Some("v3"), "amd64").is_err());
        assert_eq!(
            plan_manifest(&entries, None, "arm64").unwrap().digest,
            "sha256:1"
        );
        assert!(plan_manifest(&entries, None, "s390x").is_err());
    }
}
