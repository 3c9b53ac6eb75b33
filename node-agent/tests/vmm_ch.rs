//! API-level suite against a **real** cloud-hypervisor binary (Tier::Kvm),
//! named by `WRENN_TEST_CH_BIN`. No guest boots: the kernel path is bogus on
//! purpose, which also exercises the failed-boot path (notes §5). Runs CH
//! through the real spawn path, in a test netns and cgroup, and passes a TAP
//! fd (opened inside that netns) with `vm.add-net`.
//!
//! Skips, naming what is missing, when the variable is unset, when not
//! root, or without /dev/kvm.
// Test helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)] // only the TUNSETIFF ioctl in `tap` below

mod cgroup_bed;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use wrenn_node_agent::vmm::cgroup::{CgroupLimits, CgroupRoot};
use wrenn_node_agent::vmm::ch::ErrorKind;
use wrenn_node_agent::vmm::ch::api::{VmSpec, VmState, build_tap_fd_net, build_vm_config};
use wrenn_node_agent::vmm::process::{HostPaths, VmmExit};
use wrenn_node_agent::vmm::{ChVmm, StartSpec};
use wrenn_testkit::{TestNetns, Tier, unique_name};

/// Test-only TAP opener. The network module creates persistent TAPs by name
/// (CH opens them itself); until it also hands out fds, this opens one
/// queue of an existing TAP from a thread inside the capsule netns.
mod tap {
    use std::fs::{File, OpenOptions};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::Path;

    nix::ioctl_write_ptr_bad!(
        tunsetiff,
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
        libc::ifreq
    );

    pub fn open_in(netns: &Path, name: &str) -> std::io::Result<OwnedFd> {
        let netns = File::open(netns)?;
        let name = name.to_string();
        // setns affects only the calling thread: use a throwaway one.
        std::thread::spawn(move || -> std::io::Result<OwnedFd> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            // SAFETY: ifreq is plain data; all zeroes is valid.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req
                .ifr_name
                .iter_mut()
                .zip(name.bytes().take(libc::IFNAMSIZ - 1))
            {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
            // SAFETY: `f` is an open tun clone device; `req` is a valid,
            // initialised ifreq that outlives the call.
            unsafe { tunsetiff(f.as_raw_fd(), &req) }?;
            Ok(f.into())
        })
        .join()
        .map_err(|_| std::io::Error::other("tap thread panicked"))?
    }
}

fn kind<T>(r: Result<T, wrenn_node_agent::vmm::Error>) -> Option<ErrorKind> {
    r.err().and_then(|e| e.api_kind())
}

/// Removes the test's cgroups on drop (its netns goes with `TestNetns`).
struct Cleanup {
    cgroups: CgroupRoot,
    parent: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        cgroup_bed::remove_test_cgroups(&self.cgroups, &self.parent);
    }
}

#[test]
fn api_suite_against_real_cloud_hypervisor() {
    let case = wrenn_testkit::case(Tier::Kvm, "vmm_ch_api_suite");
    let Some(bin) = std::env::var_os("WRENN_TEST_CH_BIN").map(PathBuf::from) else {
        return case.skip("needs a cloud-hypervisor binary: set WRENN_TEST_CH_BIN (unset here)");
    };
    if let Err(why) = wrenn_testkit::need_program(&bin.to_string_lossy()) {
        return case.skip(format!("WRENN_TEST_CH_BIN: {why}"));
    }
    if let Err(why) = wrenn_testkit::need_root() {
        return case.skip(why);
    }
    if !Path::new("/dev/kvm").exists() {
        return case.skip("needs /dev/kvm");
    }

    let state = tempfile::tempdir().unwrap();
    let parent = unique_name("wrenn-chtest");
    let cgroups = CgroupRoot::detect(Path::new("/sys/fs/cgroup"), &parent).unwrap();
    let _cleanup = Cleanup {
        cgroups: cgroups.clone(),
        parent: parent.clone(),
    };
    let netns = TestNetns::new("wch").unwrap();
    netns
        .ip(&["tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"])
        .unwrap();
    let netns_path = netns.path();
    let tap: OwnedFd = tap::open_in(&netns_path, "tap0").unwrap();

    let rt = wrenn_testkit::runtime();
    rt.block_on(async {
        let paths = HostPaths {
            proc_root: "/proc".into(),
            state_dir: state.path().to_path_buf(),
            hidden: Vec::new(),
            devices: Vec::new(),
        };
        let vmm = ChVmm::new(&bin, paths, cgroups.clone()).await.unwrap();
        eprintln!("cloud-hypervisor {} ({})", vmm.version(), vmm.version().raw);
        let t0 = std::time::Instant::now();
        let vm = vmm
            .start(&StartSpec {
                capsule: "ch1".into(),
                netns: Some(netns_path.clone()),
                limits: CgroupLimits::build_for_vm(1, 256 << 20),
                memory_bytes: 256 << 20,
                confine: Default::default(),
            })
            .await
            .unwrap();
        eprintln!("spawn → API ready: {:?}", t0.elapsed());

        let ping = vmm.ping(&vm).await.unwrap();
        assert_eq!(ping.pid, Some(i64::from(vm.process.pid)));
        if let Some(bv) = &ping.build_version {
            let v = wrenn_node_agent::vmm::ch::ChVersion::parse_build_version(bv).unwrap();
            assert_eq!(v.major, vmm.version().major, "--version and vmm.ping agree");
        }

        assert_eq!(kind(vmm.info(&vm).await), Some(ErrorKind::NotCreated));

        let cfg = build_vm_config(&VmSpec::new(
            1,
            256 << 20,
            "/nonexistent/wrenn-test-vmlinux",
            "console=ttyS0",
            "/dev/null",
        ));
        vmm.create(&vm, &cfg).await.unwrap();
        assert_eq!(
            kind(vmm.create(&vm, &cfg).await),
            Some(ErrorKind::AlreadyExists)
        );

        let net = build_tap_fd_net("net0", "02:fc:00:00:00:05", 1);
        let cold = vmm.add_net(&vm, &net, &[tap.as_fd()]).await.unwrap();
        assert_eq!(cold, None, "cold add-net answers 204");
        assert_eq!(
            kind(vmm.add_net(&vm, &net, &[tap.as_fd()]).await),
            Some(ErrorKind::Conflict),
            "duplicate id"
        );

        let info = vmm.info(&vm).await.unwrap();
        assert_eq!(info.state, VmState::Created);
        let echoed = info.typed_config().unwrap();
        assert_eq!(echoed.net[0].id.as_deref(), Some("net0"));
        assert!(
            echoed.net[0].fds.as_ref().is_some_and(|f| f.len() == 1),
            "fd-backed NIC"
        );
        assert_eq!(echoed.memory.as_ref().and_then(|m| m.thp), Some(false));

        assert_eq!(kind(vmm.pause(&vm).await), Some(ErrorKind::InvalidState));
        assert_eq!(kind(vmm.resume(&vm).await), Some(ErrorKind::InvalidState));
        // Boot fails on the bogus kernel; the half-built VM must be deleted.
        assert_eq!(kind(vmm.boot(&vm).await), Some(ErrorKind::Failed));
        vmm.delete(&vm).await.unwrap();
        vmm.delete(&vm).await.unwrap();
        assert_eq!(kind(vmm.info(&vm).await), Some(ErrorKind::NotCreated));

        let (exit, stop) = tokio::join!(vmm.wait_exit(&vm), vmm.stop(&vm));
        stop.unwrap();
        assert_eq!(exit.unwrap(), VmmExit::Requested);
        assert!(cgroups.list().unwrap().is_empty());
    });
}
