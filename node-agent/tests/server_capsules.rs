//! Capsule RPCs end to end through the real gRPC server with mutual TLS on
//! loopback, the real supervisor and journal, and the recording fakes for
//! the VMM, network and disks (no KVM here). Checks what an operator sees:
//! states, idempotency, conflicts, clear refusals, the event stream.
//!
//! Why this file is long: one gRPC bed and the capsule RPCs' scenarios as the
//! operator sees them.
#![allow(clippy::unwrap_used)]

mod agent_bed;

use std::sync::Arc;
use std::time::Duration;

use agent_bed::Ca;
use tonic::Code;
use tonic::transport::Channel;
use wrenn_crds::reason::Reason;
use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
use wrenn_node_agent::images::{ImageDirs, PullOptions, TemplateBuilder, TemplateSettings, quota};
use wrenn_node_agent::network::FakeNet;
use wrenn_node_agent::server::{AgentService, serve};
use wrenn_node_agent::storage::FakeBlockStore;
use wrenn_node_agent::tls::TlsFiles;
use wrenn_node_agent::vmm::FakeMachine;
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::agent::v1::node_agent_client::NodeAgentClient;
use wrenn_testkit::registry::{BAD_LOGIN, RATE_LIMITED, UNKNOWN};
use wrenn_testkit::{Tier, case};

struct Agent {
    client: NodeAgentClient<Channel>,
    service: AgentService,
    sup: Supervisor<FakeMachine>,
    machine: Arc<FakeMachine>,
    store: Arc<FakeBlockStore>,
    /// The node admin's image directory: `base.ext4` and `kernels/vmlinux`.
    images: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// An agent serving capsule RPCs from a supervisor over fakes and
/// GetMetrics from the supervisor's metrics, as `main` wires it.
async fn start() -> Agent {
    start_with(|_, _| {}).await
}

/// A unit case named `name` with its agent from [`start`] (the agent goes
/// first, so the case records the outcome of its shutdown too).
async fn unit_case(name: &str) -> (wrenn_testkit::Case, Agent) {
    (case(Tier::Unit, name), start().await)
}

/// [`start`], with `edit` changing the supervisor's config (given the
/// agent's temporary directory) before it starts.
async fn start_with(edit: impl FnOnce(&mut SupervisorConfig, &std::path::Path)) -> Agent {
    wrenn_node_agent::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("wrenn test CA");
    let (cert, key) = ca.server();
    let w = |n: &str, t: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, t).unwrap();
        p
    };
    let files = TlsFiles {
        cert: w("tls.crt", &cert),
        key: w("tls.key", &key),
        client_ca: w("ca.crt", &ca.pem()),
    };
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("kernels")).unwrap();
    std::fs::write(images.join("base.ext4"), b"ext4").unwrap();
    std::fs::write(images.join("kernels/vmlinux"), b"kernel").unwrap();
    let image_dirs =
        ImageDirs::new(std::slice::from_ref(&images), &dir.path().join("state")).unwrap();
    let machine = Arc::new(FakeMachine::new());
    let store = Arc::new(FakeBlockStore::new());
    let mut config = SupervisorConfig::new(
        &dir.path().join("state"),
        std::path::Path::new("/k/vmlinux"),
    );
    edit(&mut config, dir.path());
    let sup = Supervisor::new(
        Host {
            machine: machine.clone(),
            net: Arc::new(FakeNet::new()),
            store: store.clone(),
        },
        config,
    );
    let service = agent_bed::service(&sup, dir.path()).with_image_dirs(image_dirs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc = service.clone();
    tokio::spawn(async move {
        serve(listener, &files, svc, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = agent_bed::channel(addr, &ca.pem(), Some(ca.operator()))
        .await
        .unwrap();
    Agent {
        client: NodeAgentClient::new(channel),
        service,
        sup,
        machine,
        store,
        images,
        _dir: dir,
        _stop: stop,
    }
}

/// The calls the scenarios repeat, answered or unwrapped as they need.
impl Agent {
    async fn create(&mut self, uid: &str, vcpus: u32) -> Result<pb::Capsule, tonic::Status> {
        let req = create_request(uid, vcpus);
        let answer = self.client.create_capsule(req).await?;
        Ok(answer.into_inner())
    }

    async fn watch(&mut self, after: u64) -> tonic::Streaming<pb::Event> {
        let req = pb::WatchEventsRequest { after };
        self.client.watch_events(req).await.unwrap().into_inner()
    }

    async fn list(&mut self) -> pb::ListCapsulesResponse {
        let req = pb::ListCapsulesRequest::default();
        self.client.list_capsules(req).await.unwrap().into_inner()
    }

    async fn node_info(&mut self) -> pb::NodeInfoResponse {
        let req = pb::NodeInfoRequest {};
        self.client.node_info(req).await.unwrap().into_inner()
    }

    async fn prepare(&mut self, req: pb::PrepareTemplateRequest) -> pb::TemplateState {
        self.client
            .prepare_template(req)
            .await
            .unwrap()
            .into_inner()
    }
}

fn create_request(uid: &str, vcpus: u32) -> pb::CreateCapsuleRequest {
    pb::CreateCapsuleRequest {
        uid: uid.into(),
        spec: Some(pb::CapsuleSpec {
            namespace: "default".into(),
            name: "web".into(),
            source: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: "default/base@sha256:1".into(),
                    disk: Some(pb::template_disk::Disk::RootfsPath("base.ext4".into())),
                    digest: "sha256:1".into(),
                    disk_bytes: 1 << 30,
                })),
            }),
            resources: Some(pb::Resources {
                vcpus,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
            }),
            kernel_path: String::new(),
            kernel_cmdline: String::new(),
            env: Default::default(),
            network: None,
        }),
        initial_state: 0,
    }
}

fn r(uid: &str) -> pb::CapsuleRef {
    pb::CapsuleRef { uid: uid.into() }
}

fn state(c: &pb::Capsule) -> pb::CapsuleState {
    pb::CapsuleState::try_from(c.state).unwrap()
}

#[tokio::test]
async fn capsule_lifecycle_over_mtls() {
    let (_c, mut a) = unit_case("server_capsules::capsule_lifecycle_over_mtls").await;
    let mut events = a.watch(0).await;

    let c = a.create("c1", 1).await.unwrap();
    assert_eq!(state(&c), pb::CapsuleState::Running);
    assert_eq!(c.vmm.as_ref().unwrap().name, "cloud-hypervisor");
    assert!(!c.ip.is_empty());
    // Same UID, same spec: the same capsule, no second VM.
    let again = a.create("c1", 1).await.unwrap();
    assert_eq!(again, c);
    assert_eq!(a.machine.running(), vec!["c1".to_string()]);
    // Same UID, another spec: a conflict naming the field.
    let st = a.create("c1", 2).await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    assert!(st.message().contains("resources"), "{}", st.message());

    let paused = a.client.pause_capsule(r("c1")).await.unwrap().into_inner();
    assert_eq!(state(&paused), pb::CapsuleState::Paused);
    // The data plane refuses a paused capsule in words a user can act on.
    let st = a.service.guest_endpoint("c1").await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert_eq!(st.message(), "capsule c1 is paused; resume it first");
    let resumed = a.client.resume_capsule(r("c1")).await.unwrap().into_inner();
    assert_eq!(state(&resumed), pb::CapsuleState::Running);
    // No data-plane call yet: no activity (the refused one does not count).
    let got = a.client.get_capsule(r("c1")).await.unwrap().into_inner();
    assert_eq!(got.last_activity_unix_nanos, 0);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let ep = a.service.guest_endpoint("c1").await.unwrap();
    assert!(
        ep.vsock_socket.ends_with("vmm/c1/vsock.sock"),
        "{:?}",
        ep.vsock_socket
    );
    // A data-plane call is activity for as long as it is open (an exec,
    // an attach, a console follow): Get shows "now" each time, however
    // long the call has been quiet (idleTimeout counts from it).
    let open1 = a.client.get_capsule(r("c1")).await.unwrap().into_inner();
    assert!(open1.last_activity_unix_nanos >= before, "{open1:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let open2 = a.client.get_capsule(r("c1")).await.unwrap().into_inner();
    assert!(
        open2.last_activity_unix_nanos >= open1.last_activity_unix_nanos + 20_000_000,
        "an open call stopped counting: {open1:?} then {open2:?}"
    );
    // Closed: the activity stays at its end, and goes on ageing.
    drop(ep);
    let got = a.client.get_capsule(r("c1")).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let listed = a.list().await;
    assert_eq!(
        listed.capsules[0].last_activity_unix_nanos,
        got.last_activity_unix_nanos
    );

    let s = a
        .client
        .suspend_capsule(r("c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&s), pb::CapsuleState::Suspended);
    assert!(a.machine.running().is_empty());
    let snap = a
        .client
        .snapshot_capsule(pb::SnapshotCapsuleRequest {
            uid: "c1".into(),
            snapshot: Some(pb::SnapshotRef { id: "s1".into() }),
            memory: true,
        })
        .await
        .unwrap_err();
    assert_eq!(snap.code(), Code::FailedPrecondition);
    a.client.resume_capsule(r("c1")).await.unwrap();

    let list = a.list().await;
    assert_eq!(list.capsules.len(), 1);
    assert!(
        a.client
            .delete_capsule(r("c1"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !a.client
            .delete_capsule(r("c1"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert_eq!(
        a.client.get_capsule(r("c1")).await.unwrap_err().code(),
        Code::NotFound
    );

    // The watch saw the whole story in order, ending with the delete.
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let kind = pb::EventKind::try_from(ev.kind).unwrap();
        let st = ev.capsule.as_ref().map(state);
        seen.push((ev.sequence, kind, st));
        if kind == pb::EventKind::Deleted {
            break;
        }
    }
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    let states: Vec<pb::CapsuleState> = seen.iter().filter_map(|s| s.2).collect();
    for want in [
        pb::CapsuleState::Creating,
        pb::CapsuleState::Running,
        pb::CapsuleState::Paused,
        pb::CapsuleState::Suspending,
        pb::CapsuleState::Suspended,
        pb::CapsuleState::Resuming,
    ] {
        assert!(states.contains(&want), "{want:?} missing from {states:?}");
    }

    // A cursor from before this agent started gets RESET.
    let mut stale = a.watch(5).await;
    let ev = stale.message().await.unwrap().unwrap();
    assert_eq!(
        pb::EventKind::try_from(ev.kind).unwrap(),
        pb::EventKind::Reset
    );

    // An agent shutting down ends open watches, so its graceful stop does
    // not wait on them.
    a.sup.shutdown();
    let end = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("the watch ends on shutdown");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn bad_requests_are_refused_at_the_edge() {
    let (_c, mut a) = unit_case("server_capsules::bad_requests_are_refused_at_the_edge").await;
    let st = a.create("../etc", 1).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let mut no_res = create_request("c2", 1);
    no_res.spec.as_mut().unwrap().resources = None;
    let st = a.client.create_capsule(no_res).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("resources"));
    assert_eq!(
        a.client.pause_capsule(r("nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    // A snapshot this node does not hold: NOT_FOUND naming it, and the
    // capsule is not left behind.
    let mut from_snap = create_request("c3", 1);
    from_snap.spec.as_mut().unwrap().source = Some(pb::BootSource {
        source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
            id: "elsewhere".into(),
        })),
    });
    let st = a.client.create_capsule(from_snap).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert_eq!(st.message(), "snapshot elsewhere not found on this node");
    assert_eq!(
        a.client.get_capsule(r("c3")).await.unwrap_err().code(),
        Code::NotFound
    );
    let st = a
        .client
        .get_metrics(pb::GetMetricsRequest {
            uid: "c2".into(),
            from_unix_nanos: 0,
            to_unix_nanos: 0,
        })
        .await
        .unwrap_err();
    // Metrics are always served: a capsule never created has none.
    assert_eq!(st.code(), Code::NotFound);
    assert!(a.machine.calls().is_empty(), "nothing reached the VMM");
}

#[tokio::test]
async fn get_metrics_answers_for_a_capsule_until_it_is_deleted() {
    let (_c, mut a) =
        unit_case("server_capsules::get_metrics_answers_for_a_capsule_until_it_is_deleted").await;
    let req = || pb::GetMetricsRequest {
        uid: "c1".into(),
        from_unix_nanos: 0,
        to_unix_nanos: 0,
    };
    a.create("c1", 1).await.unwrap();
    wrenn_node_agent::metrics::sampler::tick(a.sup.metrics(), Duration::from_secs(1)).await;
    let resp = a.client.get_metrics(req()).await.unwrap().into_inner();
    assert_eq!(resp.resolution_seconds, 1);
    assert_eq!(resp.samples.len(), 1, "{resp:?}");
    a.client.delete_capsule(r("c1")).await.unwrap();
    let st = a.client.get_metrics(req()).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
}

#[tokio::test]
async fn the_console_is_served_from_the_supervisors_run_directory() {
    let (_c, mut a) =
        unit_case("server_capsules::the_console_is_served_from_the_supervisors_run_directory")
            .await;
    a.create("c1", 1).await.unwrap();
    // What the VMM would have written to its serial port.
    let dir = a.sup.layout().vmm_root().join("c1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(wrenn_node_agent::vmm::logs::CH_SERIAL_LOG),
        "booted\nlogin:\n",
    )
    .unwrap();
    let mut chunks = a
        .client
        .read_console(pb::ReadConsoleRequest {
            uid: "c1".into(),
            tail_lines: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(c) = chunks.message().await.unwrap() {
        text.extend_from_slice(&c.data);
    }
    assert_eq!(String::from_utf8_lossy(&text), "booted\nlogin:\n");
}

#[tokio::test]
async fn prepare_template_answers_preparing_then_ready_and_node_info_lists_it() {
    let (_c, mut a) = unit_case(
        "server_capsules::prepare_template_answers_preparing_then_ready_and_node_info_lists_it",
    )
    .await;
    let req = pb::PrepareTemplateRequest {
        disk: Some(pb::TemplateDisk {
            key: "default/base@sha256:1".into(),
            disk: Some(pb::template_disk::Disk::RootfsPath("base.ext4".into())),
            digest: "sha256:1".into(),
            disk_bytes: 1 << 30,
        }),
        warm: None,
        kernel_path: String::new(),
        kernel_cmdline: String::new(),
        retry: false,
        registry_credentials: None,
    };
    let first = a.prepare(req.clone()).await;
    assert_eq!(first.phase(), pb::TemplatePhase::Preparing);
    assert_eq!(first.key, "default/base@sha256:1");
    let ready = settle(&mut a, &req).await;
    assert_eq!(ready.phase(), pb::TemplatePhase::Ready, "{ready:?}");
    assert_eq!(ready.digest, "sha256:1");
    let info = a.node_info().await;
    assert_eq!(
        info.templates
            .get("default/base@sha256:1")
            .map(String::as_str),
        Some("sha256:1")
    );
    // A warm build without a readiness check is refused at the edge.
    let mut bad = req;
    bad.warm = Some(pb::WarmBuild {
        snapshot_id: "warm-1".into(),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
        }),
        start_command: vec!["/srv/app".into()],
        ..Default::default()
    });
    let err = a.client.prepare_template(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("readiness"), "{err:?}");
}

/// Issue 11: a template names node files. Each hostile name reaches the
/// agent over gRPC as the operator would send it, and must be refused
/// before the agent journals, attaches or starts anything.
#[tokio::test]
async fn hostile_node_paths_and_kernel_arguments_are_refused_and_touch_nothing() {
    let c = case(
        Tier::Host,
        "server_capsules::hostile_node_paths_and_kernel_arguments_are_refused_and_touch_nothing",
    );
    if let Err(why) = wrenn_testkit::need_root() {
        return c.skip(format!("mknod of device nodes: {why}"));
    }
    let mut a = start().await;
    // A victim: a running capsule whose disk files live in the state dir.
    a.create("victim", 1).await.unwrap();
    let capsules = a._dir.path().join("state/capsules");
    assert!(capsules.join("victim").is_dir());
    // What a hostile node file can be, placed where a careless admin or a
    // compromised image build could: in the image directory itself.
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let img = &a.images;
    let outside = a._dir.path().join("shadow");
    std::fs::write(&outside, b"root:$6$secret").unwrap();
    let node = |name: &str, kind: SFlag, dev: (u64, u64)| {
        let dev = makedev(dev.0, dev.1);
        mknod(&img.join(name), kind, Mode::from_bits_truncate(0o600), dev).unwrap()
    };
    node("loop.ext4", SFlag::S_IFBLK, (7, 0));
    node("null.ext4", SFlag::S_IFCHR, (1, 3));
    nix::unistd::mkfifo(&img.join("fifo.ext4"), Mode::from_bits_truncate(0o600)).unwrap();
    std::os::unix::fs::symlink(&outside, img.join("shadow.ext4")).unwrap();
    std::os::unix::fs::symlink(&capsules, img.join("capsules")).unwrap();
    std::os::unix::fs::symlink(a._dir.path(), img.join("layout")).unwrap();
    let before_store = a.store.calls();

    let disk = |d: pb::template_disk::Disk| {
        move |r: &mut pb::CreateCapsuleRequest| {
            let src = r.spec.as_mut().unwrap().source.as_mut().unwrap();
            if let Some(pb::boot_source::Source::Template(t)) = src.source.as_mut() {
                t.disk = Some(d.clone());
            }
        }
    };
    use pb::template_disk::Disk::{OciReference, RootfsPath};
    type Edit = Box<dyn Fn(&mut pb::CreateCapsuleRequest)>;
    let kernel = |k: &'static str| -> Edit {
        Box::new(move |r: &mut pb::CreateCapsuleRequest| {
            r.spec.as_mut().unwrap().kernel_path = k.into()
        })
    };
    let cmdline = |k: &'static str| -> Edit {
        Box::new(move |r: &mut pb::CreateCapsuleRequest| {
            r.spec.as_mut().unwrap().kernel_cmdline = k.into()
        })
    };
    let attacks: Vec<(&str, Edit, &str)> = vec![
        (
            "block device by path",
            Box::new(disk(RootfsPath("/dev/loop0".into()))),
            "absolute paths",
        ),
        (
            "block device node",
            Box::new(disk(RootfsPath("loop.ext4".into()))),
            "a block device",
        ),
        (
            "char device node",
            Box::new(disk(RootfsPath("null.ext4".into()))),
            "a character device",
        ),
        (
            "FIFO",
            Box::new(disk(RootfsPath("fifo.ext4".into()))),
            "a FIFO",
        ),
        (
            "symlink out",
            Box::new(disk(RootfsPath("shadow.ext4".into()))),
            "symlink",
        ),
        (
            "dotdot escape",
            Box::new(disk(RootfsPath("../state/capsules/victim/disk.img".into()))),
            "'.'",
        ),
        (
            "state dir via symlinked dir",
            Box::new(disk(RootfsPath("capsules/victim/journal.json".into()))),
            "symlink",
        ),
        (
            "a directory as disk",
            Box::new(disk(RootfsPath("kernels".into()))),
            "a directory",
        ),
        ("kernel by path", kernel("/boot/vmlinuz"), "absolute paths"),
        ("kernel via symlink", kernel("shadow.ext4"), "symlink"),
        ("kernel device", kernel("loop.ext4"), "a block device"),
        ("rdinit", cmdline("rdinit=/bin/sh"), "\"rdinit=/bin/sh\""),
        ("init", cmdline("quiet init=/tmp/x"), "\"init=/tmp/x\""),
        ("root", cmdline("root=/dev/vdb"), "\"root=/dev/vdb\""),
        ("init arguments", cmdline("quiet -- x"), "\"--\""),
        (
            "tab-joined init",
            cmdline("quiet\tinit=/bin/sh"),
            "init=/bin/sh",
        ),
        (
            "oci layout by path",
            Box::new(disk(OciReference("oci:/var/lib".into()))),
            "absolute paths",
        ),
        (
            "archive by path",
            Box::new(disk(OciReference("docker-archive:/etc/shadow".into()))),
            "absolute paths",
        ),
        (
            "bare node path",
            Box::new(disk(OciReference("/var/lib/wrenn".into()))),
            "node path",
        ),
        (
            "oci layout via symlink",
            Box::new(disk(OciReference("oci:layout".into()))),
            "symlink",
        ),
        (
            "archive FIFO",
            Box::new(disk(OciReference("docker-archive:fifo.ext4".into()))),
            "a FIFO",
        ),
        (
            "archive device",
            Box::new(disk(OciReference("docker-archive:loop.ext4:x:y".into()))),
            "a block device",
        ),
        (
            "oci escape",
            Box::new(disk(OciReference("oci:../state".into()))),
            "'.'",
        ),
    ];
    for (i, (what, edit, says)) in attacks.iter().enumerate() {
        let uid = format!("attack-{i}");
        let mut req = create_request(&uid, 1);
        edit(&mut req);
        let st = a.client.create_capsule(req).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{what}: {st:?}");
        assert!(st.message().contains(says), "{what}: {}", st.message());
        assert!(!capsules.join(&uid).exists(), "{what}: journaled");
        // The same through PrepareTemplate (the warm build path).
        let mut probe = create_request(&uid, 1);
        edit(&mut probe);
        let spec = probe.spec.unwrap();
        let Some(pb::boot_source::Source::Template(disk)) = spec.source.and_then(|s| s.source)
        else {
            unreachable!("create_request boots a template")
        };
        let st = a
            .client
            .prepare_template(pb::PrepareTemplateRequest {
                disk: Some(disk),
                warm: None,
                kernel_path: spec.kernel_path,
                kernel_cmdline: spec.kernel_cmdline,
                retry: false,
                registry_credentials: None,
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "prepare, {what}: {st:?}");
        assert!(
            st.message().contains(says),
            "prepare, {what}: {}",
            st.message()
        );
    }
    // Nothing changed on the node: no journal, no disk, no VMM, no
    // template, and the files named are as they were.
    let mut left: Vec<_> = std::fs::read_dir(&capsules)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["victim"]);
    let vmm_calls = a.machine.calls();
    assert!(
        vmm_calls.iter().all(|c| c.capsule == "victim"),
        "{vmm_calls:?}"
    );
    assert_eq!(a.store.calls(), before_store);
    assert_eq!(a.machine.running(), ["victim"]);
    let info = a.node_info().await;
    assert!(info.templates.is_empty(), "{:?}", info.templates);
    assert_eq!(std::fs::read(&outside).unwrap(), b"root:$6$secret");
    // A legitimate template still works: the kernel and disk by name.
    let mut ok = create_request("legit", 1);
    ok.spec.as_mut().unwrap().kernel_path = "kernels/vmlinux".into();
    ok.spec.as_mut().unwrap().kernel_cmdline = "quiet console=hvc0".into();
    let made = a.client.create_capsule(ok).await.unwrap().into_inner();
    assert_eq!(state(&made), pb::CapsuleState::Running);
}

// ---- image pulls with credentials (issue 13 point 6) ----

/// Everything under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let (p, t) = (e.path(), e.file_type().unwrap());
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file()
                && std::fs::read(&p)
                    .unwrap_or_default()
                    .windows(needle.len())
                    .any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

/// Log lines of this test, at debug level (a captured `tracing` default on
/// the test's thread, where the server's tasks run).
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        // Shown by the harness only when the test fails.
        print!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A create of capsule `uid` from template `ns/app@1`'s `image`, pinned
/// by `digest`, with a disk of `disk_bytes`.
fn image_create(uid: &str, image: &str, digest: &str, disk_bytes: u64) -> pb::CreateCapsuleRequest {
    let mut create = create_request(uid, 1);
    let spec = create.spec.as_mut().unwrap();
    spec.source = Some(pb::BootSource {
        source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
            key: "ns/app@1".into(),
            disk: Some(pb::template_disk::Disk::OciReference(image.into())),
            digest: digest.into(),
            disk_bytes,
        })),
    });
    spec.resources.as_mut().unwrap().disk_bytes = disk_bytes;
    create
}

/// PrepareTemplate (as `req` asks, retry included), then polls without
/// retrying until the build ends.
async fn settle(a: &mut Agent, req: &pb::PrepareTemplateRequest) -> pb::TemplateState {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut req = req.clone();
    loop {
        let s = a.prepare(req.clone()).await;
        req.retry = false;
        if s.phase() != pb::TemplatePhase::Preparing {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private image from a registry that asks for a bearer token: pulled
/// anonymously or with a wrong password it fails as `RegistryUnauthorized`
/// with the token service's words; with the credentials the request
/// carries it becomes Ready, and a capsule of it (pinned by digest, without
/// credentials) starts from the node's copy without asking the registry.
/// Unknown tags and a rate-limited repository fail with their own reasons
/// and the registry's message. The password is in no file under the
/// agent's directory and in no log line.
#[tokio::test]
async fn private_images_pull_with_the_requests_credentials_only() {
    let c = case(
        Tier::Host,
        "server_capsules::private_images_pull_with_the_requests_credentials_only",
    );
    if let Err(why) = wrenn_testkit::need_program("mkfs.ext4") {
        return c.skip(why);
    }
    let password = format!("pw-{}", wrenn_testkit::unique_name("secret"));
    let registry = wrenn_testkit::registry::Registry::start(Some(("robot", &password)))
        .await
        .unwrap();
    let addr = registry.addr().to_string();
    let digest = registry
        .push("team/app", "v1", &[("etc/hostname", b"private\n")])
        .unwrap();
    let log = Captured::default();
    let writer = log.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let insecure = addr.clone();
    let mut a = start_with(move |config, dir| {
        let guest = dir.join("wrenn-guest");
        std::fs::write(&guest, b"guest").unwrap();
        config.templates = Arc::new(TemplateBuilder::new(TemplateSettings {
            cache_dir: dir.join("state/images"),
            guest_binary: guest,
            pull: PullOptions {
                insecure_registries: vec![insecure],
                limits: Default::default(),
            },
            cache_max_bytes: quota::DEFAULT_MAX_BYTES,
            image_dirs: Default::default(),
        }));
    })
    .await;
    let prepare =
        |key: &str, reference: String, creds: Option<(&str, &str)>| pb::PrepareTemplateRequest {
            disk: Some(pb::TemplateDisk {
                key: key.into(),
                disk: Some(pb::template_disk::Disk::OciReference(reference)),
                digest: String::new(),
                disk_bytes: 32 << 20,
            }),
            warm: None,
            kernel_path: String::new(),
            kernel_cmdline: String::new(),
            retry: true,
            registry_credentials: creds.map(|(u, p)| pb::RegistryCredentials {
                username: u.into(),
                password: p.into(),
            }),
        };
    let image = format!("{addr}/team/app:v1");
    let failed = |s: &pb::TemplateState, reason: Reason, says: &str| {
        assert_eq!(s.phase(), pb::TemplatePhase::Failed, "{s:?}");
        assert_eq!(s.reason, reason.as_str(), "{s:?}");
        assert!(s.message.contains(says), "{s:?}");
    };

    let anonymous = settle(&mut a, &prepare("ns/app@1", image.clone(), None)).await;
    failed(&anonymous, Reason::RegistryUnauthorized, BAD_LOGIN);
    let wrong = prepare("ns/app@1", image.clone(), Some(("robot", "not-it")));
    failed(
        &settle(&mut a, &wrong).await,
        Reason::RegistryUnauthorized,
        BAD_LOGIN,
    );
    let right = prepare("ns/app@1", image.clone(), Some(("robot", &password)));
    let ready = settle(&mut a, &right).await;
    assert_eq!(ready.phase(), pb::TemplatePhase::Ready, "{ready:?}");
    assert_eq!(ready.digest, digest);

    // A capsule of the template: no credentials, pinned by the digest.
    let gets = registry.manifest_gets();
    // At the template's disk size (its disk), then bigger (built from the
    // manifest the template pulled): the registry is never asked.
    for (uid, disk) in [("private-1", 32 << 20), ("private-2", 48 << 20)] {
        let create = image_create(uid, &image, &digest, disk);
        let cap = a.client.create_capsule(create).await.unwrap().into_inner();
        assert_eq!(state(&cap), pb::CapsuleState::Running, "{cap:?}");
        assert_eq!(registry.manifest_gets(), gets, "{uid} asked the registry");
    }
    a.client.delete_capsule(r("private-2")).await.unwrap();

    let creds = Some(("robot", password.as_str()));
    let missing = prepare("ns/gone@1", format!("{addr}/team/app:v9"), creds);
    failed(
        &settle(&mut a, &missing).await,
        Reason::ImageNotFound,
        UNKNOWN,
    );
    let limited = prepare("ns/lim@1", format!("{addr}/limited/app:v1"), creds);
    failed(
        &settle(&mut a, &limited).await,
        Reason::RegistryRateLimited,
        RATE_LIMITED,
    );

    a.client.delete_capsule(r("private-1")).await.unwrap();
    let basic = wrenn_testkit::registry::base64(format!("robot:{password}").as_bytes());
    for secret in [password.as_bytes(), basic.as_bytes()] {
        let leaked = files_containing(a._dir.path(), secret);
        assert!(leaked.is_empty(), "credentials written to {leaked:?}");
    }
    let logged = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(logged.contains("template"), "nothing was logged: {logged}");
    assert!(
        !logged.contains(&password) && !logged.contains(&basic),
        "{logged}"
    );
}
