//! What one capsule's VMM may see and keep: the files of its
//! [`MachineSpec`] shown through the node-wide hidden directories (see
//! `process::HostPaths::hidden`), and the capabilities each backend needs.
//! Pure apart from reading qcow2 headers for the backing chain.

use std::path::{Path, PathBuf};

use super::machine::{DiskFormat, MachineSpec};
use super::process::{Confine, ShowPath};

/// `CAP_NET_ADMIN`: opening a TAP by name (`TUNSETIFF` on a TAP the agent
/// made) and bringing it up. Only ever effective inside the capsule's own
/// network namespace, which holds no isolation rules (those live in the
/// node table, in the host namespace).
pub const CAP_NET_ADMIN: u32 = 12;

/// Longest qcow2 backing chain followed (ours are one deep).
const MAX_BACKING_DEPTH: usize = 8;

/// The confinement of the VMM of `spec`: its own PID namespace, the
/// kernel, initramfs and root-disk chain read-only apart from the top
/// disk, and `CAP_NET_ADMIN` only when it must open a TAP by name.
pub fn build_confine(spec: &MachineSpec) -> Confine {
    // The run dir is the capsule's own directory in production; tests may
    // put it elsewhere.
    let mut show = vec![
        ShowPath::writable(&spec.run_dir),
        ShowPath::read_only(&spec.kernel),
    ];
    if let Some(initrd) = &spec.initramfs {
        show.push(ShowPath::read_only(initrd));
    }
    show.push(ShowPath::writable(&spec.root_disk));
    if spec.root_disk_format == DiskFormat::Qcow2 {
        show.extend(
            qcow2_backing_chain(&spec.root_disk)
                .into_iter()
                .map(ShowPath::read_only),
        );
    }
    Confine {
        new_pid_ns: true,
        show,
        keep_caps: if spec.tap.is_some() {
            vec![CAP_NET_ADMIN]
        } else {
            Vec::new()
        },
    }
}

/// A helper process next to the VMM (QEMU's vhost-device-vsock): its own
/// directory only, no capabilities.
pub fn build_helper_confine() -> Confine {
    Confine {
        new_pid_ns: true,
        show: Vec::new(),
        keep_caps: Vec::new(),
    }
}

/// The backing files of the qcow2 image at `top`, nearest first. A file
/// that cannot be read or is not qcow2 ends the chain: the VMM then fails
/// to open it, with its own message, rather than the agent guessing.
pub fn qcow2_backing_chain(top: &Path) -> Vec<PathBuf> {
    let mut chain = Vec::new();
    let mut current = top.to_path_buf();
    while chain.len() < MAX_BACKING_DEPTH {
        let Some(next) = read_backing(&current) else {
            break;
        };
        if chain.contains(&next) || next == top {
            break;
        }
        chain.push(next.clone());
        current = next;
    }
    chain
}

fn read_backing(image: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).ok()?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).ok()?;
    if header[..4] != *b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?);
    // qcow2 caps the name at 1023 bytes.
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; size as usize];
    f.read_exact(&mut name).ok()?;
    let name =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
    // A relative name is relative to the image's directory.
    Some(match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::TapSpec;
    use crate::vmm::cgroup::CgroupLimits;

    fn qcow2_with_backing(path: &Path, backing: &str) {
        let mut h = vec![0u8; 72];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&72u64.to_be_bytes());
        h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        h.extend_from_slice(backing.as_bytes());
        std::fs::write(path, h).unwrap();
    }

    fn spec(dir: &Path) -> MachineSpec {
        MachineSpec {
            capsule: "c".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            kernel: dir.join("vmlinux"),
            initramfs: Some(dir.join("initrd")),
            cmdline: String::new(),
            root_disk: dir.join("top.qcow2"),
            root_disk_format: DiskFormat::Qcow2,
            netns: None,
            tap: None,
            vsock_cid: 3,
            vsock_socket: dir.join("vsock.sock"),
            limits: CgroupLimits::build_for_vm(1, 256 << 20),
            run_dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn the_view_holds_kernel_initrd_and_the_disk_chain_with_only_the_top_writable() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("bases/base.raw");
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        std::fs::write(&base, b"raw").unwrap();
        qcow2_with_backing(&dir.path().join("mid.qcow2"), base.to_str().unwrap());
        qcow2_with_backing(&dir.path().join("top.qcow2"), "mid.qcow2");
        let c = build_confine(&spec(dir.path()));
        assert!(c.new_pid_ns);
        assert!(c.keep_caps.is_empty(), "no TAP, no capability");
        assert_eq!(
            c.show,
            vec![
                ShowPath::writable(dir.path()),
                ShowPath::read_only(dir.path().join("vmlinux")),
                ShowPath::read_only(dir.path().join("initrd")),
                ShowPath::writable(dir.path().join("top.qcow2")),
                ShowPath::read_only(dir.path().join("mid.qcow2")),
                ShowPath::read_only(&base),
            ]
        );
    }

    #[test]
    fn a_backing_loop_or_a_raw_disk_ends_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        qcow2_with_backing(&dir.path().join("a.qcow2"), "b.qcow2");
        qcow2_with_backing(&dir.path().join("b.qcow2"), "a.qcow2");
        assert_eq!(
            qcow2_backing_chain(&dir.path().join("a.qcow2")),
            vec![dir.path().join("b.qcow2")]
        );
        std::fs::write(dir.path().join("raw"), b"not qcow2 at all....").unwrap();
        assert!(qcow2_backing_chain(&dir.path().join("raw")).is_empty());
    }

    #[test]
    fn a_tap_by_name_keeps_only_net_admin() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.root_disk_format = DiskFormat::Raw;
        s.tap = Some(TapSpec {
            name: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        assert_eq!(build_confine(&s).keep_caps, vec![CAP_NET_ADMIN]);
    }
}
