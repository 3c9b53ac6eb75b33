//! The Cloud Hypervisor client against a **scripted fake CH API server**
//! over a real Unix socket (not CH itself: that is `vmm_ch.rs`). The fake
//! speaks HTTP/1.1 the way CH's micro_http does (no reason phrase, 204
//! without Content-Length, keep-alive), replays recorded bodies from
//! `tests/data/ch/`, and receives SCM_RIGHTS fds so we can check they are
//! the files we sent. It exercises the transport, timeouts, error mapping
//! and fd passing; it says nothing about CH's own behaviour.
//!
//! Why this file is long: sixteen tests over one scripted fake Cloud Hypervisor
//! server and its recorded bodies.
// Test helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use wrenn_node_agent::sys::fd_passing::recv_with_fds;
use wrenn_node_agent::vmm::Error;
use wrenn_node_agent::vmm::ch::api::{
    Action, MemoryRestoreMode, RestoreConfig, RestoredNetFds, VmSpec, VmState, build_tap_fd_net,
    build_vm_config, endpoint,
};
use wrenn_node_agent::vmm::ch::{ApiError, ChClient, ChVersion, ErrorKind, EventParser, Timeouts};

fn fixture(name: &str) -> Vec<u8> {
    let p = wrenn_testkit::workspace_root()
        .join("node-agent/tests/data/ch")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One request as the fake received it.
#[derive(Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What the fake answers.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    delay: Duration,
    /// Write the response one byte at a time.
    trickle: bool,
}

impl Reply {
    fn ok(status: u16, body: &[u8]) -> Self {
        Self {
            status,
            body: body.to_vec(),
            delay: Duration::ZERO,
            trickle: false,
        }
    }
    fn no_content() -> Self {
        Self::ok(204, b"")
    }
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct FakeCh {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

impl FakeCh {
    fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, seen) = (script.clone(), seen2.clone());
                tokio::spawn(async move { serve(stream, script, seen).await });
            }
        });
        Self {
            socket,
            seen,
            _dir: dir,
        }
    }

    fn client(&self) -> ChClient {
        ChClient::new(&self.socket, "capsule-a")
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Reads what the stream has (bytes and passed fds) onto `buf` and `fds`;
/// false once the client closed or the read failed.
async fn recv_more(stream: &UnixStream, buf: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> bool {
    let mut chunk = [0u8; 4096];
    let got = stream
        .async_io(Interest::READABLE, || {
            recv_with_fds(stream.as_fd(), &mut chunk)
        })
        .await;
    match got {
        Ok((0, _)) | Err(_) => false,
        Ok((n, more)) => {
            buf.extend_from_slice(&chunk[..n]);
            fds.extend(more);
            true
        }
    }
}

async fn serve(mut stream: UnixStream, script: Script, seen: Arc<Mutex<Vec<Seen>>>) {
    // Several requests per connection, as micro_http allows.
    loop {
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        let (head_len, content_length) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let cl = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                break (end + 4, cl);
            }
            if !recv_more(&stream, &mut buf, &mut fds).await {
                return;
            }
        };
        while buf.len() < head_len + content_length {
            if !recv_more(&stream, &mut buf, &mut fds).await {
                return;
            }
        }
        let request = Seen {
            head: String::from_utf8_lossy(&buf[..head_len]).to_string(),
            body: buf[head_len..head_len + content_length].to_vec(),
            fds,
        };
        let reply = script(&request);
        seen.lock().unwrap().push(request);
        tokio::time::sleep(reply.delay).await;
        let mut out = format!(
            "HTTP/1.1 {} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n",
            reply.status
        );
        if reply.status != 204 {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                reply.body.len()
            ));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&reply.body);
        if reply.trickle {
            for b in bytes {
                if stream.write_all(&[b]).await.is_err() {
                    return;
                }
                stream.flush().await.ok();
                tokio::task::yield_now().await;
            }
        } else if stream.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

fn path_of(seen: &Seen) -> &str {
    seen.head.split(' ').nth(1).unwrap_or_default()
}

/// Asserts that `seen` is a `method` request for `path` over HTTP/1.1.
#[track_caller]
fn assert_request(seen: &Seen, method: &str, path: &str) {
    let line = format!("{method} {path} HTTP/1.1\r\n");
    assert!(seen.head.starts_with(&line), "{:?}", seen.head);
}

/// A fake CH that answers `status` with `body` at the endpoint whose path
/// ends with `action`, and 204 everywhere else.
fn answering_at(action: &'static str, status: u16, body: Vec<u8>) -> FakeCh {
    FakeCh::start(move |s| {
        if path_of(s).ends_with(action) {
            Reply::ok(status, &body)
        } else {
            Reply::no_content()
        }
    })
}

#[tokio::test]
async fn ping_info_counters_parse_recorded_bodies() {
    let ch = FakeCh::start(|s| match path_of(s) {
        "/api/v1/vmm.ping" => Reply::ok(200, &fixture("vmm_ping.json")),
        "/api/v1/vm.info" => Reply::ok(200, &fixture("vm_info_running.json")),
        "/api/v1/vm.counters" => Reply::ok(200, &fixture("vm_counters.json")),
        _ => Reply::ok(404, br#"["Not Found"]"#),
    });
    let c = ch.client();
    let ping = c.call::<endpoint::VmmPing>(&()).await.unwrap();
    assert_eq!(ping.version, "54.0.0");
    let v = ChVersion::parse_build_version(ping.build_version.as_deref().unwrap()).unwrap();
    assert_eq!(v.major, 53);
    let info = c.call::<endpoint::VmInfo>(&()).await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(
        info.device_tree["net0"].parent.as_deref(),
        Some("__pci_bus0")
    );
    let cfg = info.typed_config().unwrap();
    assert_eq!(
        cfg.net[0].fds,
        Some(vec![3]),
        "fds echoed by vm.info are read"
    );
    assert_eq!(cfg.memory.unwrap().thp, Some(false));
    let counters = c.call::<endpoint::VmCounters>(&()).await.unwrap();
    assert_eq!(counters["_net0"]["rx_bytes"], 1280);
    assert_eq!(counters["_disk0"]["write_latency_avg"], 90);

    let seen = ch.take();
    assert_request(&seen[0], "GET", "/api/v1/vmm.ping");
    assert!(
        !seen[0].head.to_ascii_lowercase().contains("content-length"),
        "GET without body"
    );
}

#[test]
fn other_recorded_bodies_parse() {
    use wrenn_node_agent::vmm::ch::api::{ResponseBody, VmCounters, VmInfo, VmmPingResponse};
    let old = VmmPingResponse::from_body(&fixture("vmm_ping_v31.json")).unwrap();
    assert_eq!(
        (old.version.as_str(), old.build_version, old.pid),
        ("31.0.0", None, None)
    );
    let sparse = VmInfo::from_body(&fixture("vm_info_created_v53_sparse.json")).unwrap();
    assert_eq!(sparse.state, VmState::Created);
    assert!(sparse.device_tree.is_empty() && sparse.memory_actual_size.is_none());
    assert!(
        VmCounters::from_body(&fixture("vm_counters_empty.json"))
            .unwrap()
            .is_empty()
    );
    let mut p = EventParser::default();
    let events: Vec<_> = p
        .push(&fixture("events_boot_poweroff.txt"))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(events.len(), 6);
    assert_eq!(
        events.last().map(|e| e.kind()),
        Some(wrenn_node_agent::vmm::ch::EventKind::VmmShutdown)
    );
}

#[tokio::test]
async fn create_sends_json_with_content_length_and_boot_sends_no_body() {
    let ch = FakeCh::start(|_| Reply::no_content());
    let c = ch.client();
    let cfg = build_vm_config(&VmSpec::new(
        1,
        256 << 20,
        "/k",
        "console=ttyS0",
        "/dev/mapper/wrenn-x",
    ));
    c.call::<endpoint::VmCreate>(&cfg).await.unwrap();
    c.call::<endpoint::VmBoot>(&()).await.unwrap();
    let seen = ch.take();
    assert_request(&seen[0], "PUT", "/api/v1/vm.create");
    assert!(
        seen[0]
            .head
            .contains(&format!("Content-Length: {}\r\n", seen[0].body.len()))
    );
    let sent: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(sent["memory"]["size"], 256u64 << 20);
    assert_request(&seen[1], "PUT", "/api/v1/vm.boot");
    assert!(seen[1].body.is_empty() && !seen[1].head.contains("Content-Length"));
}

#[tokio::test]
async fn vmm_shutdown_accepts_200_with_empty_body() {
    let ch = FakeCh::start(|_| Reply::ok(200, b""));
    ch.client()
        .call::<endpoint::VmmShutdown>(&())
        .await
        .unwrap();
}

fn same_file(a: impl AsFd, b: impl AsFd) -> bool {
    let a = nix::sys::stat::fstat(a.as_fd()).unwrap();
    let b = nix::sys::stat::fstat(b.as_fd()).unwrap();
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

#[tokio::test]
async fn add_net_passes_fds_with_scm_rights_cold_and_hot() {
    let hot = fixture("vm_add_net_hot.json");
    let calls = Arc::new(Mutex::new(0));
    let calls2 = calls.clone();
    let ch = FakeCh::start(move |_| {
        let mut n = calls2.lock().unwrap();
        *n += 1;
        if *n == 1 {
            Reply::no_content()
        } else {
            Reply::ok(200, &hot)
        }
    });
    let c = ch.client();
    // Stand-ins for two multiqueue TAP fds: the transport cannot tell.
    let q0 = tempfile::tempfile().unwrap();
    let q1 = tempfile::tempfile().unwrap();
    let net = build_tap_fd_net("net0", "02:fc:00:00:00:05", 2);
    let cold = c
        .call_with_fds::<endpoint::VmAddNet>(&net, &[q0.as_fd(), q1.as_fd()])
        .await
        .unwrap();
    assert_eq!(cold, None, "204 on a cold VM");
    let hot = c
        .call_with_fds::<endpoint::VmAddNet>(&net, &[q0.as_fd(), q1.as_fd()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (hot.id.as_str(), hot.bdf.as_str()),
        ("net9", "0000:00:04.0")
    );

    let seen = ch.take();
    for s in &seen {
        assert_eq!(s.fds.len(), 2);
        assert!(
            same_file(&s.fds[0], &q0) && same_file(&s.fds[1], &q1),
            "fds arrive in order"
        );
        let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(body["num_queues"], 4);
        assert!(body.get("fds").is_none());
    }
}

#[tokio::test]
async fn restore_passes_net_fds_and_lists_them() {
    let ch = FakeCh::start(|_| Reply::no_content());
    let tap = tempfile::tempfile().unwrap();
    let cfg = RestoreConfig {
        source_url: "file:///var/lib/wrenn/snapshots/s1".into(),
        prefault: None,
        memory_restore_mode: Some(MemoryRestoreMode::OnDemand),
        resume: Some(false),
        net_fds: vec![RestoredNetFds {
            id: "net0".into(),
            num_fds: 1,
        }],
    };
    ch.client()
        .call_with_fds::<endpoint::VmRestore>(&cfg, &[tap.as_fd()])
        .await
        .unwrap();
    let seen = ch.take();
    assert_eq!(seen[0].fds.len(), 1);
    assert!(same_file(&seen[0].fds[0], &tap));
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body["memory_restore_mode"], "OnDemand");
    assert_eq!(body["net_fds"][0]["num_fds"], 1);
}

#[tokio::test]
async fn error_bodies_map_to_kinds_across_versions() {
    // (fixture, status, action, CH major, expected)
    let table: &[(&str, u16, Action, u32, ErrorKind)] = &[
        (
            "error_boot_kernel.json",
            500,
            Action::VmBoot,
            53,
            ErrorKind::Failed,
        ),
        (
            "error_pause_paused.json",
            500,
            Action::VmPause,
            53,
            ErrorKind::InvalidState,
        ),
        (
            "error_resume_not_running.json",
            500,
            Action::VmResume,
            52,
            ErrorKind::InvalidState,
        ),
        (
            "error_snapshot_running.json",
            500,
            Action::VmSnapshot,
            53,
            ErrorKind::InvalidState,
        ),
        (
            "error_not_created.json",
            500,
            Action::VmInfo,
            52,
            ErrorKind::NotCreated,
        ),
        (
            "error_not_created.json",
            404,
            Action::VmInfo,
            53,
            ErrorKind::NotCreated,
        ),
        (
            "error_already_created.json",
            500,
            Action::VmCreate,
            53,
            ErrorKind::AlreadyExists,
        ),
        (
            "error_route_not_found.json",
            404,
            Action::VmReboot,
            53,
            ErrorKind::UnsupportedEndpoint,
        ),
        (
            "error_bad_request.json",
            400,
            Action::VmRestore,
            53,
            ErrorKind::InvalidRequest,
        ),
        (
            "error_validation_queues.json",
            400,
            Action::VmAddNet,
            54,
            ErrorKind::InvalidRequest,
        ),
        (
            "error_not_unique.json",
            409,
            Action::VmAddNet,
            54,
            ErrorKind::Conflict,
        ),
        (
            "error_not_unique.json",
            500,
            Action::VmAddNet,
            52,
            ErrorKind::Conflict,
        ),
        (
            "error_nested_state.json",
            500,
            Action::VmSnapshot,
            53,
            ErrorKind::Failed,
        ),
        (
            "error_pre_v47_debug.txt",
            500,
            Action::VmBoot,
            43,
            ErrorKind::Failed,
        ),
    ];
    for &(file, status, action, major, expected) in table {
        let body = fixture(file);
        let ch = FakeCh::start(move |_| Reply::ok(status, &body));
        let c = ch.client().with_version(ChVersion {
            major,
            minor: 0,
            raw: format!("v{major}.0"),
        });
        let err = match action {
            Action::VmBoot => c.call::<endpoint::VmBoot>(&()).await.unwrap_err(),
            Action::VmPause => c.call::<endpoint::VmPause>(&()).await.unwrap_err(),
            Action::VmResume => c.call::<endpoint::VmResume>(&()).await.unwrap_err(),
            Action::VmInfo => c.call::<endpoint::VmInfo>(&()).await.unwrap_err(),
            Action::VmReboot => c.call::<endpoint::VmReboot>(&()).await.unwrap_err(),
            Action::VmCreate => c
                .call::<endpoint::VmCreate>(&Default::default())
                .await
                .unwrap_err(),
            Action::VmSnapshot => c
                .call::<endpoint::VmSnapshot>(&wrenn_node_agent::vmm::ch::api::VmSnapshotConfig {
                    destination_url: "file:///s".into(),
                })
                .await
                .unwrap_err(),
            Action::VmRestore => c
                .call::<endpoint::VmRestore>(&RestoreConfig {
                    source_url: "file:///s".into(),
                    prefault: None,
                    memory_restore_mode: None,
                    resume: None,
                    net_fds: vec![],
                })
                .await
                .unwrap_err(),
            Action::VmAddNet => c
                .call::<endpoint::VmAddNet>(&build_tap_fd_net("net1", "02:00:00:00:00:01", 1))
                .await
                .unwrap_err(),
            other => unreachable!("{other}"),
        };
        assert_eq!(
            err.api_kind(),
            Some(expected),
            "{file} ({status}, {action}, v{major}): {err:?}"
        );
        let Error::Api {
            action: a,
            capsule,
            source,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*a, capsule.as_str()), (action, "capsule-a"));
        if let ApiError::Status { chain, .. } = source {
            assert!(!chain.is_empty(), "{file}: chain kept");
        }
    }
}

#[tokio::test]
async fn error_display_names_action_and_capsule_and_keeps_chain_in_source() {
    let body = fixture("error_boot_kernel.json");
    let ch = FakeCh::start(move |_| Reply::ok(500, &body));
    let err = ch.client().call::<endpoint::VmBoot>(&()).await.unwrap_err();
    let top = err.to_string();
    assert!(
        top.starts_with("vm.boot for capsule capsule-a on "),
        "{top}"
    );
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert_eq!(
        source,
        "status 500: Error from API: The VM could not boot: Cannot open kernel file: No such file or directory (os error 2)"
    );
}

#[tokio::test]
async fn responses_trickled_byte_by_byte_are_reassembled() {
    let info = fixture("vm_info_running.json");
    let ch = FakeCh::start(move |_| Reply {
        trickle: true,
        ..Reply::ok(200, &info)
    });
    let info = ch.client().call::<endpoint::VmInfo>(&()).await.unwrap();
    assert_eq!(info.memory_actual_size, Some(268_435_456));
}

#[tokio::test]
async fn each_class_has_its_own_timeout() {
    let ch = FakeCh::start(|s| Reply {
        delay: if path_of(s).ends_with("vm.info") {
            Duration::from_millis(400)
        } else {
            Duration::from_millis(150)
        },
        ..Reply::ok(200, &fixture("vm_info_running.json"))
    });
    let timeouts = Timeouts {
        query: Duration::from_millis(100),
        control: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let c = ch.client().with_timeouts(timeouts);
    let err = c.call::<endpoint::VmInfo>(&()).await.unwrap_err();
    assert_eq!(err.api_kind(), Some(ErrorKind::Unreachable));
    assert!(
        matches!(err, Error::Api { source: ApiError::Timeout(t), .. } if t == Duration::from_millis(100))
    );
    // A control call tolerates 150 ms.
    c.call::<endpoint::VmPause>(&()).await.unwrap();
}

#[tokio::test]
async fn a_missing_socket_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChClient::new(&dir.path().join("nope.sock"), "capsule-b");
    let err = c.call::<endpoint::VmmPing>(&()).await.unwrap_err();
    assert_eq!(err.api_kind(), Some(ErrorKind::Unreachable));
    assert!(matches!(
        err,
        Error::Api {
            source: ApiError::Connect(_),
            ..
        }
    ));
}

#[tokio::test]
async fn a_success_with_a_bad_body_is_a_decode_error() {
    let ch = FakeCh::start(|_| Reply::ok(200, b"{not json"));
    let err = ch.client().call::<endpoint::VmInfo>(&()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Api {
                source: ApiError::Decode(_),
                ..
            }
        ),
        "{err:?}"
    );
}

mod chvmm {
    //! `ChVmm`'s own rules on top of single calls, against the fake server.
    use super::*;
    use wrenn_node_agent::vmm::cgroup::CgroupRoot;
    use wrenn_node_agent::vmm::process::{HostPaths, ProcessIdentity};
    use wrenn_node_agent::vmm::{ChVmm, VmmHandle};

    fn vmm(major: u32, dir: &Path) -> ChVmm {
        std::fs::write(dir.join("cgroup.controllers"), "cpu memory").unwrap();
        ChVmm::with_version(
            Path::new("/nonexistent/cloud-hypervisor"),
            ChVersion {
                major,
                minor: 0,
                raw: format!("v{major}.0"),
            },
            HostPaths {
                proc_root: "/proc".into(),
                state_dir: dir.to_path_buf(),
                hidden: Vec::new(),
                devices: Vec::new(),
            },
            CgroupRoot::detect(dir, "wrenn").unwrap(),
        )
    }

    fn handle(ch: &FakeCh) -> VmmHandle {
        VmmHandle {
            capsule: "capsule-a".into(),
            api_socket: ch.socket.clone(),
            event_file: ch.socket.with_file_name("events.json"),
            process: ProcessIdentity {
                pid: 0,
                start_time_ticks: 0,
            },
            memory_bytes: 256 << 20,
        }
    }

    fn paths(seen: &[Seen]) -> Vec<String> {
        seen.iter().map(|s| path_of(s).to_string()).collect()
    }

    fn restore_cfg() -> RestoreConfig {
        RestoreConfig {
            source_url: "file:///s".into(),
            prefault: None,
            memory_restore_mode: None,
            resume: None,
            net_fds: vec![],
        }
    }

    #[tokio::test]
    async fn a_failed_boot_is_followed_by_delete() {
        let body = fixture("error_boot_kernel.json");
        let ch = answering_at("vm.boot", 500, body);
        let dir = tempfile::tempdir().unwrap();
        let err = vmm(53, dir.path()).boot(&handle(&ch)).await.unwrap_err();
        assert_eq!(err.api_kind(), Some(ErrorKind::Failed));
        assert_eq!(paths(&ch.take()), ["/api/v1/vm.boot", "/api/v1/vm.delete"]);
    }

    #[tokio::test]
    async fn a_restore_that_does_not_end_paused_is_refused_and_deleted() {
        let running = fixture("vm_info_running.json");
        let ch = answering_at("vm.info", 200, running);
        let dir = tempfile::tempdir().unwrap();
        let err = vmm(53, dir.path())
            .restore(&handle(&ch), &restore_cfg(), &[])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnexpectedState {
                    expected: VmState::Paused,
                    found: VmState::Running,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            paths(&ch.take()),
            ["/api/v1/vm.restore", "/api/v1/vm.info", "/api/v1/vm.delete"]
        );
    }

    #[tokio::test]
    async fn a_failed_restore_is_deleted_only_before_v44() {
        for (major, expect_delete) in [(43, true), (53, false)] {
            let body = fixture("error_bad_request.json");
            let ch = answering_at("vm.restore", 400, body);
            let dir = tempfile::tempdir().unwrap();
            let err = vmm(major, dir.path())
                .restore(&handle(&ch), &restore_cfg(), &[])
                .await
                .unwrap_err();
            assert_eq!(err.api_kind(), Some(ErrorKind::InvalidRequest));
            let seen = paths(&ch.take());
            assert_eq!(
                seen.contains(&"/api/v1/vm.delete".to_string()),
                expect_delete,
                "v{major}: {seen:?}"
            );
        }
    }
}
