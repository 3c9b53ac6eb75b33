//! [`ImageSource`]: the syntax of `TemplateDisk.oci_reference`, parsed at
//! the gRPC edge so a malformed reference is refused before any work.
//!
//! The prefixes follow containers-transports(5), which users know from
//! skopeo and podman:
//! - `oci:<name>[:<tag>]`: an OCI image layout directory;
//! - `docker-archive:<name>[:<repo:tag>]`: a `docker save` tarball;
//! - `docker://<reference>` or a bare `<reference>`: a registry image
//!   (`registry/repo:tag` or `…@sha256:…`), pulled with `oci-client`.
//!
//! A local image's `<name>` is relative to the node admin's image
//! directories ([`ImageDirs`]), never a node path: an absolute path, bare
//! or after a prefix, is refused. The name ends at the first `:`; the rest
//! is the tag.

use std::path::PathBuf;

use super::dirs::{self, ImageDirs, Use};
use super::{Error, LocalImage};

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference, as given (without `docker://`).
    Registry(String),
    /// A layout or archive in an image directory, by its name there
    /// (resolve it with [`ImageSource::resolve_local`] before reading).
    Local(LocalImage),
}

fn local_name(use_: Use, rest: &str) -> Result<(PathBuf, Option<String>), Error> {
    let (name, tag) = match rest.split_once(':') {
        Some((n, t)) if !t.is_empty() => (n, Some(t.to_string())),
        Some((n, _)) => (n, None),
        None => (rest, None),
    };
    dirs::check_name(use_, name).map_err(|source| Error::NodeFile { source })?;
    Ok((PathBuf::from(name), tag))
}

impl ImageSource {
    /// Parses `reference` (see the module docs).
    pub fn parse(reference: &str) -> Result<Self, Error> {
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (dir, tag) = local_name(Use::OciLayout, rest)?;
            return Ok(Self::Local(LocalImage::Layout { dir, tag }));
        }
        if let Some(rest) = reference.strip_prefix("docker-archive:") {
            let (path, tag) = local_name(Use::DockerArchive, rest)?;
            return Ok(Self::Local(LocalImage::DockerArchive { path, tag }));
        }
        if reference.starts_with('/') {
            return Err(Error::LocalReference {
                reference: reference.to_string(),
                why: "a node path is not an image reference; name a local image as \
                      oci:<name> or docker-archive:<name>, relative to an image directory",
            });
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

    /// The local image `image` names, with its name replaced by its path in
    /// the first image directory that holds it (see [`ImageDirs::resolve`]).
    /// Blocking.
    pub fn resolve_local(image: &LocalImage, dirs: &ImageDirs) -> Result<LocalImage, Error> {
        let resolve = |use_, name: &PathBuf| {
            let name = name.to_str().unwrap_or_default();
            dirs.resolve(use_, name)
                .map_err(|source| Error::NodeFile { source })
        };
        Ok(match image {
            LocalImage::Layout { dir, tag } => LocalImage::Layout {
                dir: resolve(Use::OciLayout, dir)?,
                tag: tag.clone(),
            },
            LocalImage::DockerArchive { path, tag } => LocalImage::DockerArchive {
                path: resolve(Use::DockerArchive, path)?,
                tag: tag.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_pick_the_source() {
        assert_eq!(
            ImageSource::parse("oci:img:v1").unwrap(),
            ImageSource::Local(LocalImage::Layout {
                dir: "img".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            ImageSource::parse("docker-archive:team/a.tar:repo:tag").unwrap(),
            ImageSource::Local(LocalImage::DockerArchive {
                path: "team/a.tar".into(),
                tag: Some("repo:tag".into())
            })
        );
        assert_eq!(
            ImageSource::parse("oci:img").unwrap(),
            ImageSource::Local(LocalImage::Layout {
                dir: "img".into(),
                tag: None
            })
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
    fn refuses_node_paths_and_bad_references() {
        for bad in ["/srv/img", "Not A Ref", ""] {
            let err = ImageSource::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        for (bad, name) in [
            ("oci:/srv/img", "/srv/img"),
            ("docker-archive:/etc/shadow", "/etc/shadow"),
            ("oci:../state/capsules", "../state/capsules"),
            ("docker-archive:", ""),
        ] {
            let err = ImageSource::parse(bad).unwrap_err();
            let chain = format!("{}", std::error::Error::source(&err).unwrap());
            assert!(chain.contains(&format!("{name:?}")), "{bad}: {chain}");
        }
    }
}
