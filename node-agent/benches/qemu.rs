//! A real guest under the QEMU backend, reached over vhost-user-vsock by
//! the guest link. Prints, in one run:
//! - boot through Wrenn (`QemuMachine::launch`) next to plain QEMU started
//!   by hand with the same kernel, initramfs, disk, machine, accelerator,
//!   vCPUs and memory (no vsock, QMP or sandbox), boots interleaved, 5 of
//!   each: to the guest agent's ready line on the serial console for both
//!   (the same measure), and for Wrenn also to `Health` answered over
//!   vsock (what a caller waits for); Wrenn's overhead as a ratio;
//! - exec round trip (`/bin/true`: start, exit, stream end), median of 20;
//! - file throughput over vsock: a 64 MiB write and read back;
//! - snapshot (migration to a file) and restore to agent ready, and restore
//!   against the cold boot (ratio); how the backend restores memory.
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
/// The guest agent's line on the console once it listens (the guest image's
/// test kit looks for the same).
const READY_LINE: &str = wrenn_testkit::guest_vm::READY_LINE;
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

/// Waits up to 120 s for [`READY_LINE`] in `console` (`who` booted it);
/// the time since `t`.
async fn console_ready(console: &Path, t: Instant, who: &str) -> Duration {
    let what = format!("{who}: the guest agent's ready line on the console");
    // A small read, polled every 5 ms to keep the boot timing fine; the
    // worker says it blocks, so the runtime's other tasks move elsewhere.
    wrenn_testkit::eventually(Duration::from_secs(120), &what, || {
        tokio::task::block_in_place(|| {
            std::fs::read_to_string(console).is_ok_and(|c| c.contains(READY_LINE))
        })
    })
    .await;
    t.elapsed()
}

/// Boots `spec`'s kernel and disk with `qemu` started by hand, as someone
/// without Wrenn would, with the machine flags Wrenn uses under TCG; the
/// time to the agent's ready line.
async fn plain_boot(qemu: &Path, spec: &MachineSpec, dir: &Path) -> Duration {
    let console = dir.join("plain-console.log");
    let _ = std::fs::remove_file(&console);
    let mem = format!("{}M", spec.memory_bytes >> 20);
    let t = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(["-machine", "q35", "-accel", "tcg,tb-size=64", "-cpu", "max"])
        .args(["-m", &mem, "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(spec.initramfs.as_ref().expect("initramfs"))
        .args(["-append", &spec.cmdline])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=root,discard=unmap",
            spec.root_disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=root"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu");
    let took = console_ready(&console, t, "plain QEMU").await;
    let _ = child.kill().await;
    took
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
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

    let (mut plain, mut line, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    let mut restore = None;
    for n in 0..BOOTS {
        let spec = spec_for(n);
        // A disk of its own (a killed boot leaves its file system to
        // recover), and every other round first, so neither side always
        // boots on a warmer page cache.
        let own = spec_for(BOOTS + n);
        if n % 2 == 0 {
            plain.push(plain_boot(&qemu, &own, work.path()).await);
        }
        let t = Instant::now();
        let vm = machine.launch(&spec).await.expect("launch");
        let console = spec
            .run_dir
            .join(wrenn_node_agent::vmm::logs::QEMU_CONSOLE_LOG);
        let (seen, answered) = tokio::join!(console_ready(&console, t, "Wrenn"), async {
            let r = ready(&spec, "", Duration::from_secs(120)).await;
            (r, t.elapsed())
        });
        let (answered, took) = answered;
        if n + 1 < BOOTS {
            machine.stop(&vm).await.expect("stop");
        }
        answered.expect("agent ready");
        line.push(seen);
        boots.push(took);
        if n % 2 == 1 {
            plain.push(plain_boot(&qemu, &own, work.path()).await);
        }
        if n + 1 == BOOTS {
            restore = Some(measure(&machine, &spec, &vm, work.path()).await);
        }
    }
    let (plain_m, line_m, boot_m) = (
        median(plain.clone()),
        median(line.clone()),
        median(boots.clone()),
    );
    println!("boot (TCG, 1 vCPU, 256 MiB, {BOOTS} of each, interleaved), medians:");
    println!(
        "  plain QEMU, to the ready line on the console:      {} (all: {})",
        ms(plain_m),
        plain.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  through Wrenn, to the ready line on the console:   {} (all: {})",
        ms(line_m),
        line.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  through Wrenn, to Health answered over vsock:      {} (all: {})",
        ms(boot_m),
        boots.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  Wrenn's overhead: {:+.1}% to the same ready line, {:+.1}% to the agent answering",
        (line_m.as_secs_f64() / plain_m.as_secs_f64() - 1.0) * 100.0,
        (boot_m.as_secs_f64() / plain_m.as_secs_f64() - 1.0) * 100.0
    );
    if let Some(r) = restore {
        println!(
            "restore vs cold boot (to Health answered): {} vs {}, {:.1}x faster",
            ms(r),
            ms(boot_m),
            boot_m.as_secs_f64() / r.as_secs_f64()
        );
    }
    println!(
        "memory on restore: eager. QEMU reads the whole migration stream before the VM runs (this backend uses neither postcopy nor mapped-ram); Cloud Hypervisor restores in copy mode (memory_restore_mode OnDemand, v52+, is not used)"
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
) -> Duration {
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
    let restored = t.elapsed();
    println!("restore to agent ready: {:?}", restored);
    machine.stop(&vm2).await.expect("stop");
    restored
}
