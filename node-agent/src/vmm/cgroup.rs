//! Per-capsule cgroups for VMM processes: CPU and memory limits, cgroup v2
//! where the host has it and v1 (separate `cpu` and `memory` hierarchies)
//! otherwise. The mount point is passed in, so tests run on a temp dir.
//!
//! Layout: `<mount>/wrenn/<capsule>` (v2) or
//! `<mount>/{cpu,memory}/wrenn/<capsule>` (v1). Joining happens in the
//! spawned child itself (see `sys::process::spawn`), before it execs the
//! VMM, so no VMM allocation is ever charged elsewhere.

use std::path::{Path, PathBuf};

use super::Error;

/// CFS period used for CPU limits, in microseconds (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Memory the VMM needs beyond guest RAM: its own heap, device buffers and
/// the page cache it keeps charged to the cgroup (cloud-hypervisor#4536).
pub const VMM_MEMORY_OVERHEAD_BYTES: u64 = 256 << 20;

/// Which cgroup interface the host mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Limits for one capsule's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupLimits {
    /// CPU time allowed per [`CPU_PERIOD_US`], in microseconds; `None` is
    /// unlimited.
    pub cpu_quota_us: Option<u64>,
    /// Memory limit in bytes; `None` is unlimited.
    pub memory_bytes: Option<u64>,
}

impl CgroupLimits {
    /// Limits for a VM with `vcpus` and `guest_memory_bytes`: one full CPU
    /// per vCPU, guest RAM plus [`VMM_MEMORY_OVERHEAD_BYTES`].
    pub fn build_for_vm(vcpus: u32, guest_memory_bytes: u64) -> Self {
        Self {
            cpu_quota_us: Some(u64::from(vcpus.max(1)) * CPU_PERIOD_US),
            memory_bytes: Some(guest_memory_bytes.saturating_add(VMM_MEMORY_OVERHEAD_BYTES)),
        }
    }
}

/// The host's cgroup mount and its version.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    mount: PathBuf,
    version: CgroupVersion,
    parent: String,
}

impl CgroupRoot {
    /// Detects the version mounted at `mount` (normally `/sys/fs/cgroup`).
    /// Capsule cgroups go under `<parent>` (normally `wrenn`).
    pub fn detect(mount: &Path, parent: &str) -> Result<Self, Error> {
        let version = if mount.join("cpu").is_dir() && mount.join("memory").is_dir() {
            // Hybrid hosts also have `unified`; limits live in v1 there.
            CgroupVersion::V1
        } else if mount.join("cgroup.controllers").is_file() {
            CgroupVersion::V2
        } else {
            return Err(Error::DetectCgroup {
                mount: mount.to_path_buf(),
            });
        };
        Ok(Self {
            mount: mount.to_path_buf(),
            version,
            parent: parent.to_string(),
        })
    }

    /// The detected version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directories of capsule `name`, one per hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => {
                let mut dirs: Vec<PathBuf> = ["cpu", "memory"]
                    .iter()
                    .map(|c| self.mount.join(c).join(&self.parent).join(name))
                    .collect();
                if self.separate_cpuacct() {
                    dirs.push(self.mount.join("cpuacct").join(&self.parent).join(name));
                }
                dirs
            }
            CgroupVersion::V2 => vec![self.mount.join(&self.parent).join(name)],
        }
    }

    /// Whether v1 `cpuacct` (CPU usage) is a hierarchy of its own rather
    /// than co-mounted with `cpu` (`cpu,cpuacct` with symlinks).
    fn separate_cpuacct(&self) -> bool {
        let acct = self.mount.join("cpuacct");
        acct.is_dir()
            && std::fs::canonicalize(&acct).ok()
                != std::fs::canonicalize(self.mount.join("cpu")).ok()
    }

    /// Creates (or adopts) capsule `name`'s cgroup and writes `limits`.
    /// Idempotent.
    pub fn ensure_capsule(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<CapsuleCgroup, Error> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::InvalidCgroupName {
                name: name.to_string(),
            });
        }
        let dirs = self.dirs(name);
        if self.version == CgroupVersion::V2 {
            // Controllers must be enabled on every ancestor's subtree.
            let parent = self.mount.join(&self.parent);
            create_dir(&parent)?;
            write(&self.mount.join("cgroup.subtree_control"), "+cpu +memory")?;
            write(&parent.join("cgroup.subtree_control"), "+cpu +memory")?;
        }
        for dir in &dirs {
            create_dir(dir)?;
        }
        let cg = CapsuleCgroup {
            version: self.version,
            dirs,
        };
        cg.write_limits(limits)?;
        Ok(cg)
    }

    /// Names of the capsule cgroups present (for orphan sweeps).
    pub fn list(&self) -> Result<Vec<String>, Error> {
        let base = match self.version {
            CgroupVersion::V1 => self.mount.join("memory").join(&self.parent),
            CgroupVersion::V2 => self.mount.join(&self.parent),
        };
        let entries = match std::fs::read_dir(&base) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(Error::CgroupIo { path: base, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::CgroupIo {
                path: base.clone(),
                source,
            })?;
            if entry.path().is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The cgroup of capsule `name` as it stands, without creating it.
    pub fn open_capsule(&self, name: &str) -> CapsuleCgroup {
        CapsuleCgroup {
            version: self.version,
            dirs: self.dirs(name),
        }
    }
}

/// One capsule's cgroup (a directory per hierarchy).
#[derive(Clone, Debug)]
pub struct CapsuleCgroup {
    version: CgroupVersion,
    dirs: Vec<PathBuf>,
}

impl CapsuleCgroup {
    /// The directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process must write to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Writes `limits`.
    pub fn write_limits(&self, limits: &CgroupLimits) -> Result<(), Error> {
        match self.version {
            CgroupVersion::V1 => {
                let (cpu, mem) = (&self.dirs[0], &self.dirs[1]);
                // Period before quota: a quota is checked against the
                // current period.
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = limits
                    .cpu_quota_us
                    .map_or("-1".to_string(), |q| q.to_string());
                write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                let mem_limit = limits
                    .memory_bytes
                    .map_or("-1".to_string(), |m| m.to_string());
                write(&mem.join("memory.limit_in_bytes"), &mem_limit)?;
            }
            CgroupVersion::V2 => {
                let dir = &self.dirs[0];
                let quota = limits
                    .cpu_quota_us
                    .map_or("max".to_string(), |q| q.to_string());
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                let mem = limits
                    .memory_bytes
                    .map_or("max".to_string(), |m| m.to_string());
                write(&dir.join("memory.max"), &mem)?;
            }
        }
        Ok(())
    }

    /// Pids in the cgroup (from the memory hierarchy on v1).
    pub fn pids(&self) -> Result<Vec<i32>, Error> {
        let dir = match self.version {
            CgroupVersion::V1 => self.dirs.get(1),
            CgroupVersion::V2 => self.dirs.first(),
        };
        let path = dir
            .map(|d| d.join("cgroup.procs"))
            .ok_or_else(|| Error::CgroupIo {
                path: PathBuf::new(),
                source: std::io::Error::other("cgroup has no directories"),
            })?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(Error::CgroupIo { path, source }),
        };
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// CPU time used by the cgroup in nanoseconds: v1 `cpuacct.usage` (from
    /// the `cpuacct` hierarchy, or the co-mounted `cpu` one), v2
    /// `cpu.stat` `usage_usec`.
    pub fn cpu_usage_ns(&self) -> Result<u64, Error> {
        match self.version {
            CgroupVersion::V1 => {
                let dir = self.dirs.get(2).unwrap_or(&self.dirs[0]);
                read_u64(&dir.join("cpuacct.usage"))
            }
            CgroupVersion::V2 => {
                let path = self.dirs[0].join("cpu.stat");
                let text = read(&path)?;
                text.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us.saturating_mul(1000))
                    .ok_or_else(|| Error::CgroupIo {
                        path,
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "no usage_usec",
                        ),
                    })
            }
        }
    }

    /// Memory charged to the cgroup in bytes (RSS plus page cache): v1
    /// `memory.usage_in_bytes`, v2 `memory.current`.
    pub fn memory_bytes(&self) -> Result<u64, Error> {
        match self.version {
            CgroupVersion::V1 => read_u64(&self.dirs[1].join("memory.usage_in_bytes")),
            CgroupVersion::V2 => read_u64(&self.dirs[0].join("memory.current")),
        }
    }

    /// Removes the directories; the cgroup must be empty. Missing ones are
    /// fine (idempotent).
    pub fn remove(&self) -> Result<(), Error> {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A temp-dir tree (tests) has real files inside.
                Err(e)
                    if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && !is_cgroupfs(dir) =>
                {
                    std::fs::remove_dir_all(dir).map_err(|source| Error::RemoveCgroup {
                        path: dir.clone(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(Error::RemoveCgroup {
                        path: dir.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

fn is_cgroupfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| {
            s.filesystem_type() == nix::sys::statfs::CGROUP_SUPER_MAGIC
                || s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC
        })
        .unwrap_or(false)
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::CgroupIo {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, Error> {
    read(path)?.trim().parse().map_err(|_| Error::CgroupIo {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an integer"),
    })
}

fn create_dir(path: &Path) -> Result<(), Error> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(Error::CreateCgroup {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(|source| Error::WriteCgroup {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn v1_limits_go_to_the_cpu_and_memory_hierarchies() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("cpu")).unwrap();
        std::fs::create_dir_all(root.path().join("memory")).unwrap();
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        let capsule = cg
            .ensure_capsule("c1", &CgroupLimits::build_for_vm(2, 1 << 30))
            .unwrap();
        let cpu = root.path().join("cpu/wrenn/c1");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "200000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(
            read(root.path().join("memory/wrenn/c1/memory.limit_in_bytes")),
            ((1u64 << 30) + VMM_MEMORY_OVERHEAD_BYTES).to_string()
        );
        assert_eq!(capsule.procs_files().len(), 2);
        assert_eq!(cg.list().unwrap(), vec!["c1".to_string()]);
        capsule.remove().unwrap();
        capsule.remove().unwrap();
        assert!(cg.list().unwrap().is_empty());
    }

    #[test]
    fn v1_with_separate_cpuacct_reads_usage_there() {
        let root = tempfile::tempdir().unwrap();
        for c in ["cpu", "memory", "cpuacct"] {
            std::fs::create_dir_all(root.path().join(c)).unwrap();
        }
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        let capsule = cg
            .ensure_capsule("c1", &CgroupLimits::build_for_vm(1, 0))
            .unwrap();
        assert_eq!(capsule.dirs().len(), 3);
        std::fs::write(
            root.path().join("cpuacct/wrenn/c1/cpuacct.usage"),
            "123456\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("memory/wrenn/c1/memory.usage_in_bytes"),
            "4096\n",
        )
        .unwrap();
        assert_eq!(capsule.cpu_usage_ns().unwrap(), 123456);
        assert_eq!(capsule.memory_bytes().unwrap(), 4096);
    }

    #[test]
    fn v2_limits_and_controllers() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        let limits = CgroupLimits {
            cpu_quota_us: Some(150_000),
            memory_bytes: None,
        };
        cg.ensure_capsule("c2", &limits).unwrap();
        let dir = root.path().join("wrenn/c2");
        assert_eq!(read(dir.join("cpu.max")), "150000 100000");
        assert_eq!(read(dir.join("memory.max")), "max");
        assert_eq!(
            read(root.path().join("wrenn/cgroup.subtree_control")),
            "+cpu +memory"
        );
        std::fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        let capsule = cg.open_capsule("c2");
        assert_eq!(capsule.cpu_usage_ns().unwrap(), 1_500_000);
    }

    #[test]
    fn names_cannot_escape_the_parent() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        let limits = CgroupLimits::build_for_vm(1, 0);
        for bad in ["", "../x", "a/b", ".."] {
            assert!(matches!(
                cg.ensure_capsule(bad, &limits),
                Err(Error::InvalidCgroupName { .. })
            ));
        }
    }

    #[test]
    fn detect_fails_without_a_cgroup_mount() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupRoot::detect(root.path(), "wrenn"),
            Err(Error::DetectCgroup { .. })
        ));
    }
}
