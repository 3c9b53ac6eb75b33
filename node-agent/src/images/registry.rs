//! Pulling an image from a registry into a local OCI layout with
//! `oci-client`, so that registry and offline builds share one path. The
//! manifest is chosen for this host's platform; every blob is checked
//! against its digest before it is renamed into the layout, and blobs
//! already present are not fetched again.
//!
//! Sizes are bounded before anything is written: every descriptor must be
//! within the node's compressed [`Limits`], and a download stops (and its
//! partial file goes) as soon as the registry sends more bytes than the
//! descriptor declares.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::credentials::Credentials;
use super::oci::{Descriptor, Index, REF_NAME, digest_hex, sha256_digest};
use super::unpack::{Limit, Limits};
use super::{Error, refusal};

/// How to reach registries (the node's settings; credentials come with
/// each pull).
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Registries spoken to over plain HTTP (tests, local mirrors).
    pub insecure_registries: Vec<String>,
    /// Bounds on what a pull may download (the compressed ones apply).
    pub limits: Limits,
}

fn over(layer: &str, limit: Limit, what: &str, value: u64, max: u64) -> Error {
    Error::OverLimit {
        layer: layer.to_string(),
        limit,
        what: what.to_string(),
        value,
        max,
    }
}

/// Refuses a manifest whose blobs are over `limits` by their descriptors,
/// before any of them is fetched.
pub fn check_descriptors(
    config: &oci_client::manifest::OciDescriptor,
    layers: &[oci_client::manifest::OciDescriptor],
    limits: &Limits,
) -> Result<(), Error> {
    let mut total: u64 = 0;
    for desc in std::iter::once(config).chain(layers) {
        // A negative size is as much a lie as a large one.
        let size = u64::try_from(desc.size).unwrap_or(u64::MAX);
        if size > limits.layer_compressed_bytes {
            return Err(over(
                &desc.digest,
                Limit::LayerCompressed,
                "its descriptor",
                size,
                limits.layer_compressed_bytes,
            ));
        }
        total = total.saturating_add(size);
        if total > limits.image_compressed_bytes {
            return Err(over(
                &desc.digest,
                Limit::ImageCompressed,
                "the image's descriptors",
                total,
                limits.image_compressed_bytes,
            ));
        }
    }
    Ok(())
}

/// A writer that takes at most `max` bytes and fails past them, so a
/// registry cannot send more than the descriptor it is fetched by.
struct Bounded<W> {
    inner: W,
    written: u64,
    max: u64,
    /// How many bytes were offered in all, once past `max`.
    over: Option<u64>,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let offered = this.written.saturating_add(buf.len() as u64);
        if offered > this.max {
            this.over = Some(offered);
            return Poll::Ready(Err(std::io::Error::other(
                "the registry sent more bytes than the descriptor declares",
            )));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.written += *n as u64;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn pull_err<'a>(
    reference: &'a str,
    creds: Option<&'a Credentials>,
) -> impl Fn(oci_client::errors::OciDistributionError) -> Error + 'a {
    move |source| Error::Pull {
        reference: reference.to_string(),
        refusal: refusal::classify(&source, creds),
    }
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::WriteLayout {
        path: path.to_path_buf(),
        source,
    }
}

/// Pulls `reference` into the OCI layout at `dir` (created if needed) and
/// returns the manifest digest. The layout's `index.json` then names that
/// manifest, tagged with `reference`. With `creds`, the registry gets them
/// as basic auth, or traded for a bearer token when it names a token
/// realm; the client holding them is dropped when this returns.
pub async fn pull_to_layout(
    reference: &str,
    dir: &Path,
    opts: &PullOptions,
    creds: Option<&Credentials>,
) -> Result<String, Error> {
    let image: Reference = reference
        .parse()
        .map_err(|source| Error::InvalidReference {
            reference: reference.to_string(),
            source,
        })?;
    crate::tls::install_crypto_provider();
    let client = Client::new(build_client_config(opts));
    let auth = creds.map_or(RegistryAuth::Anonymous, Credentials::to_auth);
    let pull = Pull {
        client: &client,
        auth: &auth,
        reference,
        creds,
    };
    let (manifest, digest, raw) = pull.manifest(&image).await?;
    check_descriptors(&manifest.config, &manifest.layers, &opts.limits)?;
    let blobs = dir.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(write_err(&blobs))?;
    let manifest_path = blobs.join(digest_hex(&digest)?);
    tokio::fs::write(&manifest_path, &raw)
        .await
        .map_err(write_err(&manifest_path))?;

    let pinned = image.clone_with_digest(digest.clone());
    for desc in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        pull.blob(&pinned, desc, &blobs).await?;
    }

    let index = build_index(&manifest, &digest, raw.len(), reference);
    write_layout(dir, &index).await?;
    Ok(digest)
}

/// The registry client's settings: HTTPS except to the node's insecure
/// registries.
fn build_client_config(opts: &PullOptions) -> ClientConfig {
    ClientConfig {
        protocol: if opts.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(opts.insecure_registries.clone())
        },
        ..Default::default()
    }
}

/// One pull's client, credentials and the reference its errors name.
struct Pull<'a> {
    client: &'a Client,
    auth: &'a RegistryAuth,
    reference: &'a str,
    creds: Option<&'a Credentials>,
}

impl Pull<'_> {
    fn err(&self) -> impl Fn(OciDistributionError) -> Error + '_ {
        pull_err(self.reference, self.creds)
    }

    /// This host's manifest of `image` (a multi-platform index resolved),
    /// its digest, and its raw bytes checked against that digest.
    async fn manifest(
        &self,
        image: &Reference,
    ) -> Result<(OciImageManifest, String, Vec<u8>), Error> {
        let (manifest, digest) = match self.client.pull_image_manifest(image, self.auth).await {
            Ok(pulled) => pulled,
            // oci-client drops a failed token exchange and reports only the
            // 401 that follows; asking the token service again gets its words.
            Err(OciDistributionError::UnauthorizedError { url }) => {
                let why = self
                    .client
                    .auth(image, self.auth, RegistryOperation::Pull)
                    .await
                    .err()
                    .filter(|e| matches!(e, OciDistributionError::AuthenticationFailure(_)))
                    .unwrap_or(OciDistributionError::UnauthorizedError { url });
                return Err(self.err()(why));
            }
            Err(e) => return Err(self.err()(e)),
        };
        let pinned = image.clone_with_digest(digest.clone());
        let (raw, _) = self
            .client
            .pull_manifest_raw(
                &pinned,
                self.auth,
                &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(self.err())?;
        if sha256_digest(&raw) != digest {
            return Err(Error::DigestMismatch {
                digest,
                actual: sha256_digest(&raw),
            });
        }
        Ok((manifest, digest, raw.to_vec()))
    }

    /// Fetches the blob `desc` into `blobs` unless it is there already:
    /// bounded by its declared size, checked against its digest on disk,
    /// then renamed into place (a failed fetch leaves no file).
    async fn blob(
        &self,
        pinned: &Reference,
        desc: &OciDescriptor,
        blobs: &Path,
    ) -> Result<(), Error> {
        let path = blobs.join(digest_hex(&desc.digest)?);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        let tmp = blobs.join(format!("{}.partial", digest_hex(&desc.digest)?));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(write_err(&tmp))?;
        let mut bounded = Bounded {
            inner: file,
            written: 0,
            max: u64::try_from(desc.size).unwrap_or(0),
            over: None,
        };
        let pulled = self
            .client
            .pull_blob(pinned, desc, &mut bounded)
            .await
            .map_err(self.err());
        let flushed = bounded.flush().await.map_err(write_err(&tmp));
        let Bounded {
            inner: file,
            over: sent,
            max,
            ..
        } = bounded;
        drop(file);
        let pulled = match sent {
            Some(n) => Err(over(
                &desc.digest,
                Limit::DescriptorSize,
                "what the registry sent",
                n,
                max,
            )),
            None => pulled,
        };
        if let Err(e) = pulled.and(flushed) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        // oci-client checks digests too; checking the bytes on disk is
        // what lets a later build trust the layout without re-hashing.
        let actual = hash_file(&tmp).await.map_err(write_err(&tmp))?;
        if actual != desc.digest {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::DigestMismatch {
                digest: desc.digest.clone(),
                actual,
            });
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(write_err(&path))
    }
}

/// The layout's index: one manifest, tagged with the reference it was
/// pulled by.
fn build_index(manifest: &OciImageManifest, digest: &str, size: usize, reference: &str) -> Index {
    Index {
        schema_version: 2,
        manifests: vec![Descriptor {
            media_type: manifest
                .media_type
                .clone()
                .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string()),
            digest: digest.to_string(),
            size: size as u64,
            annotations: [(REF_NAME.to_string(), reference.to_string())].into(),
            platform: None,
        }],
    }
}

/// Writes `oci-layout` and `index.json` into `dir`.
async fn write_layout(dir: &Path, index: &Index) -> Result<(), Error> {
    let index_bytes = serde_json::to_vec_pretty(index).map_err(|source| Error::ParseImage {
        path: dir.join("index.json"),
        source,
    })?;
    let layout = dir.join("oci-layout");
    tokio::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .await
        .map_err(write_err(&layout))?;
    let index_path = dir.join("index.json");
    tokio::fs::write(&index_path, index_bytes)
        .await
        .map_err(write_err(&index_path))
}

async fn hash_file(path: &Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}
