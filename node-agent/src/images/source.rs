//! [`ImageSource`]: the syntax of `TemplateDisk.oci_reference`, parsed at
//! the gRPC edge so a malformed reference is refused before any work.
//!
//! The prefixes follow containers-transports(5), which users know from
//! skopeo and podman:
//! - `oci:<absolute dir>[:<tag>]`: an OCI image layout on the node;
//! - `docker-archive:<absolute file>[:<repo:tag>]`: a `docker save` tarball;
//! - `<absolute path>`: either of the two, told apart by whether it is a
//!   directory when the template is built;
//! - `docker://<reference>` or a bare `<reference>`: a registry image
//!   (`registry/repo:tag` or `…@sha256:…`), pulled with `oci-client`.
//!
//! A local path ends at the first `:`, so paths containing `:` cannot be
//! named; the rest is the tag.

use std::path::{Path, PathBuf};

use super::{Error, LocalImage};

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference, as given (without `docker://`).
    Registry(String),
    /// A layout or archive on the node.
    Local(LocalImage),
    /// An absolute path whose kind (layout directory or archive file) is
    /// looked up when the template is built.
    Path(PathBuf),
}

fn local_path(reference: &str, rest: &str) -> Result<(PathBuf, Option<String>), Error> {
    let (path, tag) = match rest.split_once(':') {
        Some((p, t)) if !t.is_empty() => (p, Some(t.to_string())),
        Some((p, _)) => (p, None),
        None => (rest, None),
    };
    if !path.starts_with('/') {
        return Err(Error::LocalReference {
            reference: reference.to_string(),
            why: "the path must be absolute",
        });
    }
    Ok((PathBuf::from(path), tag))
}

impl ImageSource {
    /// Parses `reference` (see the module docs).
    pub fn parse(reference: &str) -> Result<Self, Error> {
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (dir, tag) = local_path(reference, rest)?;
            return Ok(Self::Local(LocalImage::Layout { dir, tag }));
        }
        if let Some(rest) = reference.strip_prefix("docker-archive:") {
            let (path, tag) = local_path(reference, rest)?;
            return Ok(Self::Local(LocalImage::DockerArchive { path, tag }));
        }
        if reference.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(reference)));
        }
        let remote = reference.strip_prefix("docker://").unwrap_or(reference);
        remote
            .parse::<oci_client::Reference>()
            .map_err(|source| Error::InvalidReference {
                reference: reference.to_string(),
                source,
            })?;
        Ok(Self::Registry(remote.to_string()))
    }

    /// The local image a [`Path`](Self::Path) names: a directory is a
    /// layout, anything else an archive. Blocking (one `stat`).
    pub fn to_local(path: &Path) -> Result<LocalImage, Error> {
        let meta = std::fs::metadata(path).map_err(|source| Error::ReadImage {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(if meta.is_dir() {
            LocalImage::Layout {
                dir: path.to_path_buf(),
                tag: None,
            }
        } else {
            LocalImage::DockerArchive {
                path: path.to_path_buf(),
                tag: None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_pick_the_source() {
        assert_eq!(
            ImageSource::parse("oci:/srv/img:v1").unwrap(),
            ImageSource::Local(LocalImage::Layout {
                dir: "/srv/img".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            ImageSource::parse("docker-archive:/srv/a.tar:repo:tag").unwrap(),
            ImageSource::Local(LocalImage::DockerArchive {
                path: "/srv/a.tar".into(),
                tag: Some("repo:tag".into())
            })
        );
        assert_eq!(
            ImageSource::parse("oci:/srv/img").unwrap(),
            ImageSource::Local(LocalImage::Layout {
                dir: "/srv/img".into(),
                tag: None
            })
        );
        assert_eq!(
            ImageSource::parse("/srv/img").unwrap(),
            ImageSource::Path("/srv/img".into())
        );
        assert_eq!(
            ImageSource::parse("docker://ghcr.io/wrenn/base:1").unwrap(),
            ImageSource::Registry("ghcr.io/wrenn/base:1".into())
        );
        assert!(ImageSource::parse("localhost:5000/base@sha256:").is_err());
        assert_eq!(
            ImageSource::parse("alpine:3.20").unwrap(),
            ImageSource::Registry("alpine:3.20".into())
        );
    }

    #[test]
    fn refuses_relative_paths_and_bad_references() {
        for bad in ["oci:img", "docker-archive:a.tar", "Not A Ref", ""] {
            let err = ImageSource::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
