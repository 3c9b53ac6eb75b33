//! Per-capsule cgroups for VMM processes: CPU and memory limits, cgroup v2
//! where the host has it and v1 (separate `cpu` and `memory` hierarchies)
//! otherwise. The mount point is passed in, so tests run on a temp dir.
//!
//! Layout: `<mount>/wrenn/<capsule>` (v2) or
//! `<mount>/{cpu,memory,pids,blkio}/wrenn/<capsule>` (v1). Joining happens
//! in the spawned child itself (see `sys::process::spawn`), before it execs
//! the VMM, so no VMM allocation is ever charged elsewhere.
//!
//! The parent (`wrenn`) carries the cap on all VMMs together
//! ([`ParentLimits`]: CPU, memory, pids, and block I/O where the host has
//! the controller), sized by the chart against the node's allocatable, so
//! capsules together cannot starve the kubelet. Limits are hierarchical: a
//! capsule cgroup with a higher limit of its own is still held to the
//! parent's.
//!
//! Why this file is long: 649 lines of code and 221 of unit tests kept beside
//! the code they check.

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

/// The cap on every VMM of the node together, written to the parent
/// cgroup. `None` leaves a resource unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLimits {
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// Block I/O throttles on one device.
    pub io: Option<IoLimit>,
}

/// Throttles on one block device (`io.max` in v2, `blkio.throttle.*` in v1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoLimit {
    /// Major and minor number of a whole disk.
    pub device: (u32, u32),
    /// Read bytes per second.
    pub read_bps: Option<u64>,
    /// Write bytes per second.
    pub write_bps: Option<u64>,
    /// Read operations per second.
    pub read_iops: Option<u64>,
    /// Write operations per second.
    pub write_iops: Option<u64>,
}

/// What the node keeps for itself, and the other caps, as configured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VmmBudget {
    /// CPUs left to the kubelet, system daemons and the agent.
    pub reserved_cpus: f64,
    /// Memory left to them, in bytes.
    pub reserved_memory_bytes: u64,
    /// Processes and threads of all VMMs together; 0 is unlimited.
    pub pids_max: u64,
    /// Block I/O caps on the state directory's disk; 0 is unlimited.
    pub io_read_bps: u64,
    /// See `io_read_bps`.
    pub io_write_bps: u64,
    /// See `io_read_bps`.
    pub io_read_iops: u64,
    /// See `io_read_bps`.
    pub io_write_iops: u64,
}

/// The parent cgroup's cap for a node with `cpus` and `memory_bytes`:
/// everything but the reserve. `io_device` is the whole disk holding the
/// state directory, when there is one. Pure.
pub fn plan_parent_limits(
    cpus: u32,
    memory_bytes: u64,
    budget: &VmmBudget,
    io_device: Option<(u32, u32)>,
) -> ParentLimits {
    let nonzero = |v: u64| (v > 0).then_some(v);
    let cpu_us = (f64::from(cpus) - budget.reserved_cpus.max(0.0)) * CPU_PERIOD_US as f64;
    // At least one CPU's worth and one VMM's overhead: a cap of zero would
    // make every VMM fail to start instead of saying the node is full.
    let cpu_quota_us = (cpu_us.floor() as u64).max(CPU_PERIOD_US);
    let memory = memory_bytes
        .saturating_sub(budget.reserved_memory_bytes)
        .max(VMM_MEMORY_OVERHEAD_BYTES);
    let any_io =
        budget.io_read_bps | budget.io_write_bps | budget.io_read_iops | budget.io_write_iops != 0;
    ParentLimits {
        cpu_quota_us: Some(cpu_quota_us),
        memory_bytes: Some(memory),
        pids: nonzero(budget.pids_max),
        io: io_device.filter(|_| any_io).map(|device| IoLimit {
            device,
            read_bps: nonzero(budget.io_read_bps),
            write_bps: nonzero(budget.io_write_bps),
            read_iops: nonzero(budget.io_read_iops),
            write_iops: nonzero(budget.io_write_iops),
        }),
    }
}

/// The whole disk (major, minor) under the filesystem holding `path`, via
/// `<sys>/dev/block/M:m` (a partition's parent directory is its disk).
/// `None` for filesystems without a block device (tmpfs, overlay).
pub fn whole_disk_of(path: &Path, sys: &Path) -> Option<(u32, u32)> {
    let st = nix::sys::stat::stat(path).ok()?;
    let dev = st.st_dev;
    let (major, minor) = (
        nix::sys::stat::major(dev) as u32,
        nix::sys::stat::minor(dev) as u32,
    );
    if major == 0 {
        return None;
    }
    let node = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
    let disk = if node.join("partition").exists() {
        node.parent()?.to_path_buf()
    } else {
        node
    };
    let text = std::fs::read_to_string(disk.join("dev")).ok()?;
    let (ma, mi) = text.trim().split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// What [`CgroupRoot::ensure_parent`] could apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentApplied {
    /// Limits asked for whose controller the host does not have (`pids`,
    /// `io`): logged by the caller, never silently claimed.
    pub unsupported: Vec<&'static str>,
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

    /// The directories of capsule `name`, one per hierarchy: v1 `cpu`,
    /// `memory`, then `cpuacct`, `pids` and `blkio` where mounted on their
    /// own (a process outside a hierarchy's parent escapes its cap).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.hierarchy_dirs()
            .into_iter()
            .map(|d| d.join(name))
            .collect()
    }

    /// The parent cgroup's directory in each hierarchy, in [`Self::dirs`]
    /// order.
    fn hierarchy_dirs(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => {
                let mut dirs = vec![
                    self.mount.join("cpu").join(&self.parent),
                    self.mount.join("memory").join(&self.parent),
                ];
                if self.separate_cpuacct() {
                    dirs.push(self.mount.join("cpuacct").join(&self.parent));
                }
                for extra in ["pids", "blkio"] {
                    if self.has_v1(extra) {
                        dirs.push(self.mount.join(extra).join(&self.parent));
                    }
                }
                dirs
            }
            CgroupVersion::V2 => vec![self.mount.join(&self.parent)],
        }
    }

    fn has_v1(&self, controller: &str) -> bool {
        self.mount.join(controller).is_dir()
    }

    /// v2 controllers the host offers, of those we use.
    fn v2_controllers(&self) -> Result<Vec<&'static str>, Error> {
        let offered = read(&self.mount.join("cgroup.controllers"))?;
        Ok(["cpu", "memory", "pids", "io"]
            .into_iter()
            .filter(|c| offered.split_whitespace().any(|o| o == *c))
            .collect())
    }

    /// Creates (or adopts) the parent cgroup and writes the node-wide cap.
    /// Idempotent; run at agent start, before any capsule cgroup.
    pub fn ensure_parent(&self, limits: &ParentLimits) -> Result<ParentApplied, Error> {
        let mut applied = ParentApplied::default();
        match self.version {
            CgroupVersion::V1 => {
                for dir in self.hierarchy_dirs() {
                    create_dir(&dir)?;
                }
                let at = |c: &str| self.mount.join(c).join(&self.parent);
                write(
                    &at("cpu").join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(
                    &at("cpu").join("cpu.cfs_quota_us"),
                    &v1_value(limits.cpu_quota_us),
                )?;
                write(
                    &at("memory").join("memory.limit_in_bytes"),
                    &v1_value(limits.memory_bytes),
                )?;
                if self.has_v1("pids") {
                    write(&at("pids").join("pids.max"), &v2_value(limits.pids))?;
                } else if limits.pids.is_some() {
                    applied.unsupported.push("pids");
                }
                if let Some(io) = &limits.io {
                    if self.has_v1("blkio") {
                        let dev = format!("{}:{}", io.device.0, io.device.1);
                        for (file, value) in [
                            ("blkio.throttle.read_bps_device", io.read_bps),
                            ("blkio.throttle.write_bps_device", io.write_bps),
                            ("blkio.throttle.read_iops_device", io.read_iops),
                            ("blkio.throttle.write_iops_device", io.write_iops),
                        ] {
                            // 0 removes the rule in v1.
                            write(
                                &at("blkio").join(file),
                                &format!("{dev} {}", value.unwrap_or(0)),
                            )?;
                        }
                    } else {
                        applied.unsupported.push("io");
                    }
                }
            }
            CgroupVersion::V2 => {
                let controllers = self.v2_controllers()?;
                let dir = self.mount.join(&self.parent);
                create_dir(&dir)?;
                let enable = controllers
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                write(&self.mount.join("cgroup.subtree_control"), &enable)?;
                let quota = v2_value(limits.cpu_quota_us);
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("memory.max"), &v2_value(limits.memory_bytes))?;
                if controllers.contains(&"pids") {
                    write(&dir.join("pids.max"), &v2_value(limits.pids))?;
                } else if limits.pids.is_some() {
                    applied.unsupported.push("pids");
                }
                if let Some(io) = &limits.io {
                    if controllers.contains(&"io") {
                        write(
                            &dir.join("io.max"),
                            &format!(
                                "{}:{} rbps={} wbps={} riops={} wiops={}",
                                io.device.0,
                                io.device.1,
                                v2_value(io.read_bps),
                                v2_value(io.write_bps),
                                v2_value(io.read_iops),
                                v2_value(io.write_iops)
                            ),
                        )?;
                    } else {
                        applied.unsupported.push("io");
                    }
                }
            }
        }
        Ok(applied)
    }

    /// The parent's CPU and memory cap as written (`None`: unlimited or not
    /// readable), for the capacity the agent reports.
    pub fn parent_cap(&self) -> (Option<u64>, Option<u64>) {
        let (cpu, mem) = match self.version {
            CgroupVersion::V1 => (
                read(
                    &self
                        .mount
                        .join("cpu")
                        .join(&self.parent)
                        .join("cpu.cfs_quota_us"),
                )
                .ok()
                .and_then(|q| q.trim().parse::<i64>().ok())
                .and_then(|q| u64::try_from(q).ok()),
                read(
                    &self
                        .mount
                        .join("memory")
                        .join(&self.parent)
                        .join("memory.limit_in_bytes"),
                )
                .ok()
                .and_then(|m| m.trim().parse::<u64>().ok())
                // v1 reports "unlimited" as a page-rounded huge number.
                .filter(|m| *m < 1 << 62),
            ),
            CgroupVersion::V2 => {
                let dir = self.mount.join(&self.parent);
                (
                    read(&dir.join("cpu.max"))
                        .ok()
                        .and_then(|t| t.split_whitespace().next().and_then(|q| q.parse().ok())),
                    read(&dir.join("memory.max"))
                        .ok()
                        .and_then(|m| m.trim().parse().ok()),
                )
            }
        };
        (cpu, mem)
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
            let enable = self
                .v2_controllers()?
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            write(&self.mount.join("cgroup.subtree_control"), &enable)?;
            write(&parent.join("cgroup.subtree_control"), &enable)?;
        }
        for dir in &dirs {
            create_dir(dir)?;
        }
        let cg = self.open_capsule(name);
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
        let acct = match self.version {
            CgroupVersion::V1 if self.separate_cpuacct() => {
                self.mount.join("cpuacct").join(&self.parent).join(name)
            }
            CgroupVersion::V1 => self.mount.join("cpu").join(&self.parent).join(name),
            CgroupVersion::V2 => self.mount.join(&self.parent).join(name),
        };
        CapsuleCgroup {
            version: self.version,
            dirs: self.dirs(name),
            acct,
        }
    }
}

/// One capsule's cgroup (a directory per hierarchy).
#[derive(Clone, Debug)]
pub struct CapsuleCgroup {
    version: CgroupVersion,
    /// v1: `cpu`, `memory`, then the optional ones; v2: the one directory.
    dirs: Vec<PathBuf>,
    /// Where CPU usage is read.
    acct: PathBuf,
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
            CgroupVersion::V1 => read_u64(&self.acct.join("cpuacct.usage")),
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

/// v1 spells "unlimited" `-1`.
fn v1_value(v: Option<u64>) -> String {
    v.map_or("-1".to_string(), |v| v.to_string())
}

/// v2 spells "unlimited" `max`.
fn v2_value(v: Option<u64>) -> String {
    v.map_or("max".to_string(), |v| v.to_string())
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

    #[test]
    fn the_parent_cap_is_the_node_minus_its_reserve() {
        let budget = VmmBudget {
            reserved_cpus: 1.5,
            reserved_memory_bytes: 2 << 30,
            pids_max: 4096,
            io_write_bps: 100 << 20,
            ..VmmBudget::default()
        };
        let p = plan_parent_limits(8, 16 << 30, &budget, Some((8, 0)));
        assert_eq!(p.cpu_quota_us, Some(650_000));
        assert_eq!(p.memory_bytes, Some(14 << 30));
        assert_eq!(p.pids, Some(4096));
        assert_eq!(
            p.io,
            Some(IoLimit {
                device: (8, 0),
                write_bps: Some(100 << 20),
                ..IoLimit::default()
            })
        );
        // A reserve larger than the node still leaves one VMM's worth, and
        // no I/O figures mean no io rule.
        let tiny = plan_parent_limits(
            1,
            1 << 20,
            &VmmBudget {
                reserved_cpus: 4.0,
                reserved_memory_bytes: 1 << 30,
                ..VmmBudget::default()
            },
            Some((8, 0)),
        );
        assert_eq!(tiny.cpu_quota_us, Some(CPU_PERIOD_US));
        assert_eq!(tiny.memory_bytes, Some(VMM_MEMORY_OVERHEAD_BYTES));
        assert_eq!((tiny.pids, tiny.io), (None, None));
    }

    #[test]
    fn v1_parent_caps_go_to_each_hierarchy_and_capsules_join_pids_and_blkio() {
        let root = tempfile::tempdir().unwrap();
        for c in ["cpu", "memory", "pids", "blkio"] {
            std::fs::create_dir_all(root.path().join(c)).unwrap();
        }
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        let limits = ParentLimits {
            cpu_quota_us: Some(300_000),
            memory_bytes: Some(4 << 30),
            pids: Some(1000),
            io: Some(IoLimit {
                device: (8, 0),
                read_iops: Some(500),
                ..IoLimit::default()
            }),
        };
        assert!(cg.ensure_parent(&limits).unwrap().unsupported.is_empty());
        let at = |p: &str| read(root.path().join(p));
        assert_eq!(at("cpu/wrenn/cpu.cfs_quota_us"), "300000");
        assert_eq!(
            at("memory/wrenn/memory.limit_in_bytes"),
            (4u64 << 30).to_string()
        );
        assert_eq!(at("pids/wrenn/pids.max"), "1000");
        assert_eq!(at("blkio/wrenn/blkio.throttle.read_iops_device"), "8:0 500");
        assert_eq!(at("blkio/wrenn/blkio.throttle.write_bps_device"), "8:0 0");
        assert_eq!(cg.parent_cap(), (Some(300_000), Some(4 << 30)));
        let capsule = cg
            .ensure_capsule("c1", &CgroupLimits::build_for_vm(1, 0))
            .unwrap();
        let dirs: Vec<String> = capsule
            .dirs()
            .iter()
            .map(|d| d.strip_prefix(root.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "cpu/wrenn/c1",
                "memory/wrenn/c1",
                "pids/wrenn/c1",
                "blkio/wrenn/c1"
            ]
        );
    }

    #[test]
    fn v2_parent_caps_enable_only_the_controllers_the_host_has() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu memory pids",
        )
        .unwrap();
        let cg = CgroupRoot::detect(root.path(), "wrenn").unwrap();
        let applied = cg
            .ensure_parent(&ParentLimits {
                cpu_quota_us: Some(200_000),
                memory_bytes: None,
                pids: Some(64),
                io: Some(IoLimit {
                    device: (259, 0),
                    write_bps: Some(1 << 20),
                    ..IoLimit::default()
                }),
            })
            .unwrap();
        // No io controller on this host: said so, not written.
        assert_eq!(applied.unsupported, vec!["io"]);
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(read(root.path().join("wrenn/cpu.max")), "200000 100000");
        assert_eq!(read(root.path().join("wrenn/memory.max")), "max");
        assert_eq!(read(root.path().join("wrenn/pids.max")), "64");
        assert!(!root.path().join("wrenn/io.max").exists());
    }
}
