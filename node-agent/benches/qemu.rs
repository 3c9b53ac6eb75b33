//! A real guest under the QEMU backend, reached over vhost-user-vsock by
//! the guest link. Prints:
//! - boot to agent ready (`QemuMachine::launch` until `Health` answers),
//!   median of 5 boots;
//! - exec round trip (`/bin/true`: start, exit, stream end), median of 20;
//! - file throughput over vsock: a 64 MiB write and read back;
//! - snapshot (migration to a file) and restore to agent ready.
//!
//! Measured on the 2-CPU CI machine class (TCG, PVM host without vmx/svm,
//! other builds running alongside), release build:
//! - boot to agent ready: median 9.1 s of 5 (7.3–11.2 s);
//! - exec round trip: median 30 ms;
//! - 64 MiB over vsock: write 7.7 MiB/s, read 9.1 MiB/s;
//! - snapshot of a 256 MiB guest: 0.45 s (142 MiB file); restore to agent
//!   ready: 0.95 s.
//!
//! Needs root, `qemu-system-x86_64`, `vhost-device-vsock`, `qemu-img` and
//! the guest image from `images/build.sh` (`WRENN_GUEST_IMAGE` or the
//! newest under `${WRENN_CACHE:-~/.cache/wrenn}/guest/`); prints why it
//! skipped otherwise. Run with
//! `cargo bench -p wrenn-node-agent --bench qemu`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wrenn_node_agent::guest::{GuestClient, InitParams, Timeouts};
use wrenn_node_agent::vmm::cgroup::{CgroupLimits, CgroupRoot};
use wrenn_node_agent::vmm::process::HostPaths;
use wrenn_node_agent::vmm::qemu::QemuMachine;
use wrenn_node_agent::vmm::{DiskFormat, Machine, MachineSpec};
use wrenn_proto::guest::v1 as gpb;

const BOOTS: usize = 5;
const EXECS: usize = 20;
const FILE_BYTES: usize = 64 << 20;

fn image_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("WRENN_GUEST_IMAGE") {
        return Some(PathBuf::from(d));
    }
    let cache = std::env::var_os("WRENN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/wrenn")))?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(cache.join("guest")).ok()?.flatten() {
        if let Ok(t) = std::fs::metadata(e.path().join("manifest.json")).and_then(|m| m.modified())
            && best.as_ref().is_none_or(|(b, _)| t > *b)
        {
            best = Some((t, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The access token the bench's `Init` gives the guest agent.
const TOKEN: &str = "bench-guest-token-0001";

/// Waits up to `within` for the guest agent of `spec`'s VM to answer, with
/// `token` (empty before `Init`).
async fn ready(
    spec: &MachineSpec,
    token: &str,
    within: Duration,
) -> Result<(GuestClient, gpb::HealthResponse), wrenn_node_agent::guest::Error> {
    let timeouts = Timeouts {
        dial: Duration::from_secs(5),
        call: Duration::from_secs(60),
        probe: Duration::from_secs(3),
        retry: Duration::from_millis(20),
    };
    GuestClient::wait_ready(
        &spec.capsule,
        &spec.vsock_socket,
        1024,
        token,
        timeouts,
        within,
    )
    .await
}

#[tokio::main]
async fn main() {
    let which = |p: &str| wrenn_testkit::need_program(p);
    let found = wrenn_testkit::need_root()
        .and_then(|()| {
            Ok((
                which("qemu-system-x86_64")?,
                which("vhost-device-vsock")?,
                which("qemu-img")?,
            ))
        })
        .and_then(|t| {
            Ok((
                t,
                image_dir().ok_or("no guest image (run images/build.sh)")?,
            ))
        });
    let ((qemu, helper, qemu_img), dir) = match found {
        Ok(f) => f,
        Err(why) => {
            println!("qemu bench skipped: {why}");
            return;
        }
    };
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest json");
    let work = tempfile::tempdir().expect("tempdir");
    let parent = format!("wrenn-bench-{}", std::process::id());
    let cgroups = CgroupRoot::detect(Path::new("/sys/fs/cgroup"), &parent).expect("cgroups");
    let paths = HostPaths {
        proc_root: "/proc".into(),
        state_dir: work.path().join("state"),
        hidden: Vec::new(),
        devices: Vec::new(),
    };
    let machine = QemuMachine::new(&qemu, &helper, paths, cgroups.clone())
        .await
        .expect("backend");
    println!("backend: {:?}, accel {:?}", machine.info(), machine.accel());

    let spec_for = |n: usize| {
        let disk = work.path().join(format!("disk{n}.qcow2"));
        let ok = Command::new(&qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(dir.join("rootfs.ext4"))
            .arg(&disk)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img create");
        let run_dir = work.path().join(format!("run{n}"));
        MachineSpec {
            capsule: format!("bench{n}"),
            vcpus: 1,
            memory_bytes: 256 << 20,
            kernel: dir.join("vmlinuz"),
            initramfs: Some(dir.join("initramfs.img")),
            cmdline: m["cmdline"].as_str().expect("cmdline").to_string(),
            root_disk: disk,
            root_disk_format: DiskFormat::Qcow2,
            netns: None,
            tap: None,
            vsock_cid: 3,
            vsock_socket: run_dir.join("vm.vsock"),
            limits: CgroupLimits::build_for_vm(1, 256 << 20),
            run_dir,
        }
    };

    let mut boots = Vec::new();
    for n in 0..BOOTS {
        let spec = spec_for(n);
        let t = Instant::now();
        let vm = machine.launch(&spec).await.expect("launch");
        let answered = ready(&spec, "", Duration::from_secs(120)).await;
        let took = t.elapsed();
        if n + 1 < BOOTS {
            machine.stop(&vm).await.expect("stop");
        }
        answered.expect("agent ready");
        boots.push(took);
        if n + 1 == BOOTS {
            measure(&machine, &spec, &vm, work.path()).await;
        }
    }
    println!(
        "boot to agent ready (TCG, 1 vCPU, 256 MiB): median {:?} of {BOOTS} {:?}",
        median(boots.clone()),
        boots
    );
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/memory").join(&parent));
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/cpu").join(&parent));
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
}

async fn exec_true(g: &GuestClient) {
    let input = vec![
        gpb::ExecInput {
            input: Some(gpb::exec_input::Input::Start(gpb::ExecStart {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            })),
        },
        gpb::ExecInput {
            input: Some(gpb::exec_input::Input::CloseStdin(true)),
        },
    ];
    let mut out = g.exec(tokio_stream::iter(input)).await.expect("exec");
    while out.message().await.expect("exec output").is_some() {}
}

async fn measure(
    machine: &QemuMachine,
    spec: &MachineSpec,
    vm: &wrenn_node_agent::vmm::MachineHandle,
    work: &Path,
) {
    let (mut g, _) = ready(spec, "", Duration::from_secs(60))
        .await
        .expect("ready");
    g.init(&InitParams {
        access_token: TOKEN.into(),
        send_wall_time: true,
        ..Default::default()
    })
    .await
    .expect("init");
    exec_true(&g).await;
    let mut rts = Vec::new();
    for _ in 0..EXECS {
        let t = Instant::now();
        exec_true(&g).await;
        rts.push(t.elapsed());
    }
    println!(
        "exec round trip (/bin/true): median {:?} of {EXECS}",
        median(rts)
    );

    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i % 251) as u8).collect();
    let mut input = vec![gpb::WriteFileInput {
        input: Some(gpb::write_file_input::Input::Start(gpb::WriteFileStart {
            path: "/tmp/bench.bin".into(),
            mode: 0o644,
            size: FILE_BYTES as u64,
            make_parents: false,
            ..Default::default()
        })),
    }];
    for c in data.chunks(256 << 10) {
        input.push(gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Data(c.to_vec())),
        });
    }
    let t = Instant::now();
    g.write_file(tokio_stream::iter(input))
        .await
        .expect("write");
    let w = t.elapsed();
    let t = Instant::now();
    let mut s = g
        .read_file(gpb::ReadFileRequest {
            path: "/tmp/bench.bin".into(),
            max_bytes: 0,
        })
        .await
        .expect("read");
    let mut n = 0usize;
    while let Some(c) = s.message().await.expect("chunk") {
        n += c.data.len();
    }
    let r = t.elapsed();
    assert_eq!(n, FILE_BYTES);
    let mib = (FILE_BYTES >> 20) as f64;
    println!(
        "file over vsock, {} MiB to guest tmpfs: write {:.1} MiB/s, read {:.1} MiB/s",
        FILE_BYTES >> 20,
        mib / w.as_secs_f64(),
        mib / r.as_secs_f64()
    );
    g.remove(gpb::RemoveRequest {
        path: "/tmp/bench.bin".into(),
        recursive: false,
    })
    .await
    .expect("remove");

    machine.pause(vm).await.expect("pause");
    let snap = work.join("snap");
    std::fs::create_dir(&snap).expect("snap dir");
    let t = Instant::now();
    machine.snapshot(vm, &snap).await.expect("snapshot");
    let size = std::fs::metadata(snap.join("memory.qemu"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("snapshot to file: {:?} ({} MiB)", t.elapsed(), size >> 20);
    machine.stop(vm).await.expect("stop");
    let t = Instant::now();
    let vm2 = machine.restore(spec, &snap).await.expect("restore");
    ready(spec, TOKEN, Duration::from_secs(60))
        .await
        .expect("ready after restore");
    println!("restore to agent ready: {:?}", t.elapsed());
    machine.stop(&vm2).await.expect("stop");
}
