//! TLS files laid out as the kubelet mounts a Secret volume: `tls.crt` ->
//! `..data/tls.crt`, `..data` -> a timestamped directory, so a rotation is
//! one rename. Certificate reloaders must see either the old set or the
//! new one, never a mix; tests of them rotate through this.

use std::path::{Path, PathBuf};

/// A Secret volume with `tls.crt`, `tls.key` and `ca.crt`.
#[derive(Debug)]
pub struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    /// A volume in the existing, empty `dir` holding these three files.
    pub fn new(dir: &Path, cert: &str, key: &str, ca: &str) -> Self {
        let mut v = Self {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        v.rotate(cert, key, ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))
                .expect("link a Secret volume file");
        }
        v
    }

    /// Writes a new directory of files and swaps `..data` to it in one
    /// rename, as the kubelet does.
    pub fn rotate(&mut self, cert: &str, key: &str, ca: &str) {
        self.generation += 1;
        let data = format!("..gen_{}", self.generation);
        let d = self.dir.join(&data);
        std::fs::create_dir(&d).expect("create a Secret volume generation");
        for (name, content) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)] {
            std::fs::write(d.join(name), content).expect("write a Secret volume file");
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp).expect("link the next ..data");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    /// The path a reader opens for file `name` (`tls.crt`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
