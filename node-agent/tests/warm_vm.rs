//! Warm templates with a real guest (Tier::Vm): the supervisor over QEMU
//! (TCG), `LinuxNet` with a real TAP in a test-made node namespace, qcow2
//! disks and cgroups, booting the image `images/build.sh` makes (built here
//! when its inputs changed, so the guest is this tree's `wrenn-guest`).
//!
//! `PrepareTemplate` boots a build VM, starts a server detached, waits for
//! it (a TCP connect from inside the capsule's namespace, or an exec
//! probe), snapshots it and removes the build VM; a capsule created from
//! the snapshot finds the server already running and the start command's
//! files in place. A readiness that never comes fails with
//! `ReadinessTimeout` and leaves no VMM, namespace, disk, cgroup or file.
//! Prints the build time and create-to-ready of a capsule from the warm
//! snapshot against a cold boot.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod guest_exec;
mod network_env;
mod qemu_bed;

use std::time::{Duration, Instant};

use network_env::Bed as NetBed;
use qemu_bed::{QemuBed, processes_mentioning, vm_bed};
use wrenn_crds::reason::Reason;
use wrenn_node_agent::capsule::{
    BootSource, CapsuleSpec, PrepareRequest, Readiness, Resources, State, TemplateDisk,
    TemplatePhase, TemplateSource, TemplateStatus, WarmSpec,
};
use wrenn_node_agent::guest::GuestClient;
use wrenn_node_agent::network::{CapsuleId as NetId, GUEST_ADDR};
use wrenn_testkit::{Tier, case};

/// The bed, and this file's capsule and template requests over it.
struct World(QemuBed);

impl std::ops::Deref for World {
    type Target = QemuBed;
    fn deref(&self) -> &QemuBed {
        &self.0
    }
}

impl World {
    fn resources() -> Resources {
        Resources {
            vcpus: 1,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
        }
    }

    fn spec(&self, name: &str, source: BootSource) -> CapsuleSpec {
        CapsuleSpec::new("default", name, source, Self::resources())
    }

    /// Capsule `name` restored from snapshot `id`.
    fn restored(&self, name: &str, id: &str) -> CapsuleSpec {
        let source = BootSource::Snapshot { id: id.into() };
        self.spec(name, source)
    }

    fn cold(&self, name: &str) -> CapsuleSpec {
        self.spec(
            name,
            BootSource::Template(TemplateDisk {
                key: "default/base@ci".into(),
                rootfs: self.image.rootfs.clone(),
                digest: String::new(),
            }),
        )
    }

    fn prepare(
        &self,
        snapshot_id: &str,
        start: &str,
        readiness: Readiness,
        secs: u64,
    ) -> PrepareRequest {
        PrepareRequest {
            key: "default/base@ci".into(),
            source: TemplateSource::Rootfs(self.image.rootfs.clone()),
            digest: "ci".into(),
            disk_bytes: 0,
            kernel: None,
            cmdline: String::new(),
            warm: Some(WarmSpec {
                snapshot_id: snapshot_id.into(),
                resources: Self::resources(),
                env: [("WARM_GREETING".to_string(), "hello-warm".to_string())].into(),
                start_command: vec!["/bin/sh".into(), "-c".into(), start.into()],
                readiness,
                timeout: Duration::from_secs(secs),
            }),
            retry: false,
            credentials: None,
        }
    }

    /// Calls PrepareTemplate until it settles; checks on the way that the
    /// build VM never shows as a capsule.
    async fn settle(&self, req: &PrepareRequest, limit: Duration) -> (TemplateStatus, Duration) {
        let t0 = Instant::now();
        let first = self.sup.prepare_template(req.clone()).await.unwrap();
        assert_eq!(first.phase, TemplatePhase::Preparing, "{first:?}");
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(self.sup.list().is_empty(), "the build VM is listed");
            let s = self.sup.prepare_template(req.clone()).await.unwrap();
            if s.phase != TemplatePhase::Preparing {
                return (s, t0.elapsed());
            }
            assert!(
                t0.elapsed() < limit,
                "still preparing after {limit:?}: {s:?}"
            );
        }
    }

    fn files(&self, dir: &str) -> Vec<String> {
        std::fs::read_dir(self.state.path().join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nothing of any VM left: VMM processes, namespaces and links, disks,
    /// cgroups, journals and runtime dirs.
    fn assert_clean(&self, baseline: &network_env::Leaks) {
        let procs = processes_mentioning(&self.state.path().display().to_string());
        assert!(procs.is_empty(), "VMM processes left: {procs:?}");
        assert_eq!(&self.net.snapshot(), baseline, "network leftovers");
        assert!(self.cgroups.list().unwrap().is_empty(), "cgroups left");
        for d in ["capsules", "vmm", "disks"] {
            assert!(self.files(d).is_empty(), "{d}: {:?}", self.files(d));
        }
    }
}

/// A readiness check that runs `script` under `/bin/sh`.
fn sh_check(script: &str) -> Readiness {
    Readiness::Exec(vec!["/bin/sh".into(), "-c".into(), script.into()])
}

async fn sh(g: &GuestClient, script: &str) -> (String, Option<i32>) {
    qemu_bed::sh_as(g, "", script, 30_000).await
}

/// Proves the guest has the address every guest has (the CI image's
/// initramfs applies `ip=` after it loads virtio-net).
const GUEST_NET: &str =
    "ip -4 addr show eth0 | grep -q 'inet 169.254.0.21/30' || { echo no address; exit 1; };";

/// Creates `uid` and returns how long until its guest answered.
async fn create(w: &World, uid: &str, spec: CapsuleSpec) -> Duration {
    let t0 = Instant::now();
    let v = w.sup.create(uid, spec, State::Running).await.unwrap();
    assert_eq!(v.state, State::Running);
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_templates_restore_a_running_server_and_a_failed_build_leaves_nothing() {
    let c = case(
        Tier::Vm,
        "warm_vm::warm_templates_restore_a_running_server_and_a_failed_build_leaves_nothing",
    );
    let (bed, turn) = match vm_bed(
        "warm_vm::warm_templates_restore_a_running_server_and_a_failed_build_leaves_nothing",
        &[],
        || NetBed::new(true),
        "wrenn-warm",
    )
    .await
    {
        Ok(b) => b,
        Err(reason) => return c.skip(reason),
    };
    // A build boots a guest and waits for its readiness; never less than
    // the 400 s this test always allowed.
    let build_wait = (turn.ready * 2).max(Duration::from_secs(400));
    let w = World(bed);
    let baseline = w.net.snapshot();

    // A cold boot, for comparison.
    let cold = create(&w, "cold", w.cold("cold")).await;
    assert!(w.sup.delete("cold").await.unwrap());

    // Warm, TCP readiness: the server is started detached, with the
    // template's env, and writes a marker first.
    let tcp = w.prepare(
        "warm-tcp",
        &format!(
            "{GUEST_NET} mkdir -p /www && echo \"$WARM_GREETING $$\" > /www/marker && exec httpd -f -p 8080 -h /www"
        ),
        Readiness::TcpPort(8080),
        240,
    );
    let (ready, build_tcp) = w.settle(&tcp, build_wait).await;
    assert_eq!(ready.phase, TemplatePhase::Ready, "{ready:?}");
    assert_eq!(
        (ready.snapshot_id.as_deref(), ready.digest.as_deref()),
        (Some("warm-tcp"), Some("ci"))
    );
    assert!(w.sup.snapshots().contains(&"warm-tcp".to_string()));
    assert_eq!(
        w.sup.templates().get("default/base@ci").map(String::as_str),
        Some("ci")
    );
    // The build VM is gone already.
    w.assert_clean(&baseline);
    // Idempotent: READY again without another build.
    assert_eq!(w.sup.prepare_template(tcp.clone()).await.unwrap(), ready);

    let from_tcp = create(&w, "fromtcp", w.restored("fromtcp", "warm-tcp")).await;
    let g = w.guest("fromtcp", Duration::from_secs(60)).await;
    let (marker, code) = sh(&g, "cat /www/marker").await;
    assert_eq!(code, Some(0), "{marker}");
    assert!(marker.starts_with("hello-warm "), "{marker}");
    // The server from the build answers at once: nobody started it here.
    let (served, code) = sh(&g, "wget -q -O - http://127.0.0.1:8080/marker").await;
    assert_eq!((served.as_str(), code), (marker.as_str(), Some(0)));
    // And from the node, inside the new capsule's own namespace.
    let netns = w
        .net
        .cfg
        .netns_dir
        .join(NetId::new("fromtcp").unwrap().resource_name());
    wrenn_node_agent::sys::net::tcp_connect_in_netns(
        &netns,
        (GUEST_ADDR, 8080).into(),
        Duration::from_secs(10),
    )
    .unwrap();
    let pid = marker.trim_start_matches("hello-warm ").to_string();
    let (comm, _) = sh(&g, &format!("cat /proc/{pid}/comm")).await;
    assert_eq!(
        comm, "httpd",
        "the start command's process is not the server"
    );
    drop(g);
    assert!(w.sup.delete("fromtcp").await.unwrap());

    // Warm, exec readiness.
    let exec = w.prepare(
        "warm-exec",
        "sleep 2; echo ready > /tmp/ready; exec sleep 100000",
        sh_check("test -f /tmp/ready"),
        240,
    );
    let (ready, build_exec) = w.settle(&exec, build_wait).await;
    assert_eq!(ready.phase, TemplatePhase::Ready, "{ready:?}");
    w.assert_clean(&baseline);
    let from_exec = create(&w, "fromexec", w.restored("fromexec", "warm-exec")).await;
    let g = w.guest("fromexec", Duration::from_secs(60)).await;
    let (out, code) = sh(&g, "cat /tmp/ready && pidof sleep").await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("ready"), "{out}");
    drop(g);
    assert!(w.sup.delete("fromexec").await.unwrap());

    // A readiness that never comes: FAILED with the probe's last word and
    // the start log, and nothing left of the build VM.
    let never = w.prepare(
        "warm-never",
        "echo starting-never; exec sleep 100000",
        sh_check("echo nope; exit 3"),
        20,
    );
    let (failed, _) = w.settle(&never, build_wait).await;
    assert_eq!(failed.phase, TemplatePhase::Failed, "{failed:?}");
    assert_eq!(failed.reason, Some(Reason::ReadinessTimeout));
    for part in ["code 3", "nope", "starting-never"] {
        assert!(
            failed.message.as_deref().unwrap_or_default().contains(part),
            "{part}: {:?}",
            failed.message
        );
    }
    assert!(!w.sup.snapshots().contains(&"warm-never".to_string()));
    w.assert_clean(&baseline);
    let snaps = w.files("snapshots");
    assert!(snaps.iter().all(|s| !s.contains("never")), "{snaps:?}");

    for id in ["warm-tcp", "warm-exec"] {
        assert!(w.sup.delete_snapshot(id).await.unwrap());
    }
    w.assert_clean(&baseline);
    eprintln!(
        "warm templates under QEMU TCG (load {}):\n  \
         warm build (boot, start, readiness, snapshot, remove): tcp {:.1} s, exec {:.1} s\n  \
         create -> guest ready: cold boot {:.2} s, from warm snapshot {:.2} s (tcp) {:.2} s (exec)",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        build_tcp.as_secs_f64(),
        build_exec.as_secs_f64(),
        cold.as_secs_f64(),
        from_tcp.as_secs_f64(),
        from_exec.as_secs_f64(),
    );
}
