//! Tier 3 (vm): a real guest booted under QEMU TCG by a real node agent,
//! driven only through the agent's public gRPC API over mutual TLS — the
//! way the operator drives it. Exec, PTY, files, pause, suspend to disk and
//! back, and delete with a leak check.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wrenn_e2e::agent::{AgentClient, AgentOptions, GuestImage, NodeAgent, exec};
use wrenn_e2e::leaks::{capsule_namespaces, files_mentioning, processes_mentioning};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;
use wrenn_testkit::vm::Turn;
use wrenn_testkit::{Case, Tier, case, need_program, need_root};

type Client = AgentClient;

async fn connect(agent: &NodeAgent) -> Client {
    agent.connect().await.unwrap()
}

/// The test's vm-tier turn (a guest slot and the readiness budget), the
/// case back, the guest image and an agent on a new node whose veth subnet
/// is picked by the process id plus `offset`; `None` after skipping `c`
/// when the host cannot run VMs.
async fn start_node(c: Case, offset: u32) -> Option<(Turn, Case, GuestImage, NodeAgent)> {
    if let Err(why) = need_root()
        .and_then(|_| need_program("qemu-system-x86_64"))
        .and_then(|_| need_program("vhost-device-vsock"))
        .and_then(|_| need_program("openssl"))
    {
        c.skip(why);
        return None;
    }
    let image = match tokio::task::spawn_blocking(GuestImage::build)
        .await
        .unwrap()
    {
        Ok(i) => i,
        Err(e) => {
            c.skip(format!("no guest image: {e:#}"));
            return None;
        }
    };
    let who = format!("agent_vm offset {offset} (pid {})", std::process::id());
    let turn = tokio::task::spawn_blocking(move || wrenn_testkit::vm::turn(&who))
        .await
        .unwrap()
        .unwrap();
    let opts = AgentOptions {
        node_name: wrenn_testkit::unique_name("n"),
        index: 1 + ((std::process::id() + offset) % 250) as u8,
        image: image.clone(),
        pki: None,
        guest_ready: Some(turn.ready),
    };
    let agent = tokio::task::spawn_blocking(move || NodeAgent::start(&opts))
        .await
        .unwrap()
        .unwrap();
    Some((turn, c, image, agent))
}

/// Creates a capsule with a new UID and waits until it runs; the create
/// returns once the guest answered, within the agent's `ready` budget.
async fn create_running(cl: &mut Client, image: &GuestImage, ready: Duration) -> String {
    let uid = format!("e2e-{}", wrenn_testkit::unique_name("c"));
    cl.create_capsule(create_request(&uid, image))
        .await
        .unwrap();
    wait_state(cl, &uid, pb::CapsuleState::Running, ready).await;
    uid
}

fn create_request(uid: &str, _image: &GuestImage) -> pb::CreateCapsuleRequest {
    pb::CreateCapsuleRequest {
        uid: uid.into(),
        spec: Some(pb::CapsuleSpec {
            namespace: "default".into(),
            name: "vm-test".into(),
            source: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: "default/base@ci".into(),
                    disk: Some(pb::template_disk::Disk::RootfsPath(
                        GuestImage::ROOTFS.into(),
                    )),
                    digest: String::new(),
                    disk_bytes: 1 << 30,
                })),
            }),
            resources: Some(pb::Resources {
                vcpus: 1,
                memory_bytes: 512 << 20,
                disk_bytes: 1 << 30,
            }),
            kernel_path: String::new(),
            kernel_cmdline: String::new(),
            env: [("WRENN_TEST".to_string(), "yes".to_string())].into(),
            network: None,
        }),
        initial_state: 0,
    }
}

fn r(uid: &str) -> pb::CapsuleRef {
    pb::CapsuleRef { uid: uid.into() }
}

async fn wait_state(
    c: &mut Client,
    uid: &str,
    want: pb::CapsuleState,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let cap = c.get_capsule(r(uid)).await.unwrap().into_inner();
        let state = pb::CapsuleState::try_from(cap.state).unwrap_or_default();
        if state == want {
            return t0.elapsed();
        }
        assert_ne!(
            state,
            pb::CapsuleState::Failed,
            "capsule failed: {} {}",
            cap.reason,
            cap.message
        );
        assert!(
            t0.elapsed() < limit,
            "capsule still {state:?} after {limit:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn sh(c: &mut Client, uid: &str, script: &str) -> String {
    let ran = exec(c, uid, &["/bin/sh", "-c", script], b"").await.unwrap();
    assert_eq!(ran.code, Some(0), "{script}: stderr {}", ran.stderr);
    ran.stdout
}

/// A PTY session: resize, then `stty size` must report the new size.
async fn pty_size(c: &mut Client, uid: &str) -> String {
    let (tx, rx) = mpsc::channel(8);
    let send = |input| pb::PtyInput {
        uid: uid.into(),
        input: Some(gpb::PtyInput { input: Some(input) }),
    };
    tx.send(send(gpb::pty_input::Input::Start(gpb::PtyStart {
        argv: vec!["/bin/sh".into()],
        size: Some(gpb::PtySize { rows: 24, cols: 80 }),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut out = c.pty(ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(send(gpb::pty_input::Input::Resize(gpb::PtySize {
        rows: 40,
        cols: 100,
    })))
    .await
    .unwrap();
    tx.send(send(gpb::pty_input::Input::Data(
        b"stty size; exit\n".to_vec(),
    )))
    .await
    .unwrap();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(deadline, out.message()).await {
        match msg.output {
            Some(gpb::pty_output::Output::Data(b)) => text.push_str(&String::from_utf8_lossy(&b)),
            Some(gpb::pty_output::Output::Exit(_)) => break,
            _ => {}
        }
    }
    text
}

async fn write_file(c: &mut Client, uid: &str, path: &str, data: &[u8]) {
    let mut msgs = vec![pb::WriteFileInput {
        uid: uid.into(),
        input: Some(gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Start(gpb::WriteFileStart {
                path: path.into(),
                mode: 0o644,
                size: data.len() as u64,
                make_parents: true,
                ..Default::default()
            })),
        }),
    }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(pb::WriteFileInput {
            uid: String::new(),
            input: Some(gpb::WriteFileInput {
                input: Some(gpb::write_file_input::Input::Data(chunk.to_vec())),
            }),
        });
    }
    let info = c
        .write_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.size, data.len() as u64);
}

async fn read_file(c: &mut Client, uid: &str, path: &str) -> Vec<u8> {
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            uid: uid.into(),
            request: Some(gpb::ReadFileRequest {
                path: path.into(),
                max_bytes: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        data.extend_from_slice(&chunk.data);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_through_the_agents_grpc_api() {
    let c = case(
        Tier::Vm,
        "agent_vm::a_real_guest_through_the_agents_grpc_api",
    );
    let Some((turn, _case, image, agent)) = start_node(c, 0).await else {
        return;
    };
    let mut cl = connect(&agent).await;

    let info = cl
        .node_info(pb::NodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let vmm = info.vmm.clone().unwrap_or_default();
    assert_eq!(vmm.name, "qemu");
    if !info.kvm {
        assert!(
            vmm.note.contains("TCG"),
            "status must say TCG is slow: {vmm:?}"
        );
    }

    let t0 = Instant::now();
    let uid = create_running(&mut cl, &image, turn.ready).await;
    assert_eq!(
        capsule_namespaces(&agent.netns_dir).len(),
        1,
        "a running capsule has its namespace"
    );
    // Create returns once the guest agent answered Init.
    eprintln!(
        "create to Running (agent + boot under TCG): {:?}",
        t0.elapsed()
    );

    // Exec: the guest's kernel, and a pipeline fed on stdin.
    let uname = sh(&mut cl, &uid, "uname -r").await;
    assert_eq!(uname.trim(), image.kernel_release);
    let t0 = Instant::now();
    let piped = exec(
        &mut cl,
        &uid,
        &["/bin/sh", "-c", "tr a-z A-Z | rev"],
        b"hello wrenn\n",
    )
    .await
    .unwrap();
    eprintln!("exec round trip with stdin: {:?}", t0.elapsed());
    assert_eq!(piped.stdout.trim(), "NNERW OLLEH");
    assert_eq!(sh(&mut cl, &uid, "echo $WRENN_TEST").await.trim(), "yes");
    let failing = exec(&mut cl, &uid, &["/bin/sh", "-c", "exit 7"], b"")
        .await
        .unwrap();
    assert_eq!(failing.code, Some(7));

    // PTY with a resize.
    let tty = pty_size(&mut cl, &uid).await;
    assert!(tty.contains("40 100"), "stty size after resize: {tty:?}");

    // 10 MiB through the file RPCs.
    let data = wrenn_testkit::pattern(10 << 20);
    let t0 = Instant::now();
    write_file(&mut cl, &uid, "/root/big.bin", &data).await;
    let back = read_file(&mut cl, &uid, "/root/big.bin").await;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "10 MiB written and read back in {secs:.2} s ({:.1} MiB/s)",
        20.0 / secs
    );
    assert!(
        back == data,
        "file read back differs ({} bytes)",
        back.len()
    );

    // Guest metrics arrive: the sampler asks the guest agent every second.
    let t0 = Instant::now();
    let sample = loop {
        let got = cl
            .get_metrics(pb::GetMetricsRequest {
                uid: uid.clone(),
                from_unix_nanos: 0,
                to_unix_nanos: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(s) = got
            .samples
            .iter()
            .rev()
            .find(|s| s.guest_memory_used_bytes > 0)
        {
            break *s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no sample with guest memory in 30 s: {got:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        sample.guest_memory_used_bytes < 512 << 20,
        "guest memory used beyond the VM's 512 MiB: {sample:?}"
    );
    assert!(sample.host_rss_bytes > 0, "no host RSS: {sample:?}");
    assert!(
        sample.disk_allocated_bytes > 0,
        "no disk figure: {sample:?}"
    );
    eprintln!(
        "guest metrics: memory used {} MiB, host RSS {} MiB, disk {} MiB",
        sample.guest_memory_used_bytes >> 20,
        sample.host_rss_bytes >> 20,
        sample.disk_allocated_bytes >> 20
    );

    // Pause refuses exec with a clear error; resume brings it back.
    cl.pause_capsule(r(&uid)).await.unwrap();
    wait_state(
        &mut cl,
        &uid,
        pb::CapsuleState::Paused,
        Duration::from_secs(30),
    )
    .await;
    let refused = exec(&mut cl, &uid, &["true"], b"").await;
    let status = refused.expect_err("exec into a paused capsule must be refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("paused"), "{}", status.message());
    cl.resume_capsule(r(&uid)).await.unwrap();
    wait_state(
        &mut cl,
        &uid,
        pb::CapsuleState::Running,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(sh(&mut cl, &uid, "echo back").await.trim(), "back");

    // Suspend to disk: the VMM goes away; resume keeps files and processes.
    sh(
        &mut cl,
        &uid,
        "echo kept > /root/kept; sleep 100000 >/dev/null 2>&1 & echo $! > /root/sleeper",
    )
    .await;
    cl.suspend_capsule(r(&uid)).await.unwrap();
    wait_state(&mut cl, &uid, pb::CapsuleState::Suspended, turn.ready).await;
    wrenn_testkit::wait_until(Duration::from_secs(20), "VMM gone after suspend", || {
        let left = processes_mentioning(&uid);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .unwrap();
    let t0 = Instant::now();
    cl.resume_capsule(r(&uid)).await.unwrap();
    wait_state(&mut cl, &uid, pb::CapsuleState::Running, turn.ready).await;
    // Resume returns once the restored guest answered Init again.
    eprintln!("resume from Suspended to guest ready: {:?}", t0.elapsed());
    assert_eq!(sh(&mut cl, &uid, "cat /root/kept").await.trim(), "kept");
    sh(&mut cl, &uid, "kill -0 $(cat /root/sleeper)").await;

    // Delete leaves no process, namespace, disk or file behind.
    cl.delete_capsule(r(&uid)).await.unwrap();
    wrenn_testkit::wait_until(Duration::from_secs(60), "capsule gone", || {
        let procs = processes_mentioning(&uid);
        let files = files_mentioning(&agent.state_dir, &uid);
        if procs.is_empty() && files.is_empty() {
            Ok(())
        } else {
            Err(format!("processes {procs:?}, files {files:?}"))
        }
    })
    .unwrap();
    let listed = cl
        .list_capsules(pb::ListCapsulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.capsules.iter().all(|c| c.uid != uid));
    let netns = capsule_namespaces(&agent.netns_dir);
    assert!(netns.is_empty(), "capsule namespaces left: {netns:?}");
    drop(agent);
}

/// A test that fails before deleting its capsules drops its agent with a
/// VM still running: the harness must take the VM, its mounted namespace,
/// its cgroups and its files along, or every failed run leaks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_agent_takes_its_capsules_along() {
    let c = case(
        Tier::Vm,
        "agent_vm::a_dropped_agent_takes_its_capsules_along",
    );
    // Not the other test's subnet: both run at once.
    let Some((turn, _case, image, agent)) = start_node(c, 125).await else {
        return;
    };
    let node = agent.node_name.clone();
    let mut cl = connect(&agent).await;
    let uid = create_running(&mut cl, &image, turn.ready).await;
    let dir = agent.state_dir.parent().unwrap().to_path_buf();
    let netns_dir = agent.netns_dir.clone();
    assert!(!processes_mentioning(&uid).is_empty(), "the VM runs");
    assert_eq!(capsule_namespaces(&netns_dir).len(), 1);
    drop(cl);

    tokio::task::spawn_blocking(move || drop(agent))
        .await
        .unwrap();
    assert_eq!(
        processes_mentioning(&uid),
        Vec::<u32>::new(),
        "VM processes left"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let held: Vec<_> = mountinfo
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .collect();
    assert!(held.is_empty(), "mounts left: {held:?}");
    assert!(!dir.exists(), "{} left", dir.display());
    let parent = format!("wrenn-{node}");
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path().join(&parent))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}
