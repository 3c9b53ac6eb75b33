//! The admin server over real loopback HTTP (Tier::Host): scrape
//! `/metrics`, parse the text format, check metric names, labels and
//! values; a removed capsule's series disappear; `/healthz`, `/readyz`
//! before and after recovery; the server stops on shutdown. Attacked as an
//! anonymous caller: by default nothing it answers names a capsule; a
//! client that never finishes its request is dropped; connections beyond
//! the cap are closed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wrenn_node_agent::metrics::admin::{AdminLimits, AdminState, serve};
use wrenn_node_agent::metrics::{Metrics, Outcome, SampleSource, SourceFuture, Step, sampler};
use wrenn_node_agent::vmm::NetCounters;
use wrenn_testkit::Tier;

/// Fixed figures for one capsule.
#[derive(Debug)]
struct Figures {
    cpu_ns: u64,
    rss: u64,
}

impl SampleSource for Figures {
    fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(Some(self.cpu_ns))))
    }
    fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(Some(self.rss))))
    }
    fn disk_allocated_bytes(&self) -> SourceFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(Some(3 << 20))))
    }
    fn net_counters(&self) -> SourceFuture<'_, NetCounters> {
        Box::pin(std::future::ready(Ok(Some(NetCounters {
            rx_bytes: 1500,
            tx_bytes: 700,
        }))))
    }
}

/// One HTTP/1.1 GET with `Connection: close`: (status, content type, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the text exposition format into (name, labels, value), checking
/// that every sample belongs to a declared family and the text ends in EOF.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "no EOF marker");
    let mut families = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split_whitespace().next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        let labels: BTreeMap<String, String> = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{name} has no TYPE line"
        );
        samples.push((name.to_string(), labels, value.parse().unwrap()));
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

#[tokio::test]
async fn scrape_health_readiness_and_removed_capsules() {
    let _case = wrenn_testkit::case(Tier::Host, "metrics_admin_loopback_http");
    let metrics = Metrics::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        // The admin opted in to per-capsule series.
        AdminState {
            capsule_labels: true,
            ..AdminState::new(metrics.clone())
        },
        async move {
            let _ = stopped.await;
        },
    ));

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "recovering\n"));
    metrics.orphans_removed("tap", 2);
    metrics.set_ready(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/nope").await.0, 404);

    let a: Arc<dyn SampleSource> = Arc::new(Figures {
        cpu_ns: 1_250_000_000,
        rss: 300 << 20,
    });
    let b: Arc<dyn SampleSource> = Arc::new(Figures {
        cpu_ns: 7,
        rss: 100 << 20,
    });
    metrics.attach("uid-a", a);
    metrics.attach("uid-b", b);
    sampler::tick(&metrics, Duration::from_secs(1)).await;
    metrics.observe_step(Step::Boot, Duration::from_millis(1200), Outcome::Ok);
    metrics.observe_step(Step::Boot, Duration::from_millis(30), Outcome::Error);

    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let s = parse(&body);
    let a = [("capsule", "uid-a")];
    assert_eq!(
        value(&s, "wrenn_agent_capsule_cpu_seconds_total", &a),
        Some(1.25)
    );
    assert_eq!(
        value(&s, "wrenn_agent_capsule_memory_bytes", &a),
        Some((300 << 20) as f64)
    );
    assert_eq!(
        value(&s, "wrenn_agent_capsule_disk_allocated_bytes", &a),
        Some((3 << 20) as f64)
    );
    assert_eq!(
        value(&s, "wrenn_agent_capsule_network_receive_bytes_total", &a),
        Some(1500.0)
    );
    assert_eq!(
        value(&s, "wrenn_agent_capsule_network_transmit_bytes_total", &a),
        Some(700.0)
    );
    assert_eq!(
        value(
            &s,
            "wrenn_agent_capsule_memory_bytes",
            &[("capsule", "uid-b")]
        ),
        Some((100 << 20) as f64)
    );
    // Not reported by this source: no series rather than a made-up zero.
    assert_eq!(
        value(&s, "wrenn_agent_capsule_guest_memory_used_bytes", &a),
        None
    );
    assert_eq!(
        value(&s, "wrenn_agent_boot_seconds_count", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "wrenn_agent_boot_seconds_bucket",
            &[("outcome", "ok"), ("le", "1.0")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "wrenn_agent_boot_seconds_bucket",
            &[("outcome", "ok"), ("le", "2.5")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "wrenn_agent_boot_seconds_count",
            &[("outcome", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "wrenn_agent_orphans_removed_total", &[("kind", "tap")]),
        Some(2.0)
    );
    assert_eq!(value(&s, "wrenn_agent_capsules_sampled", &[]), Some(2.0));

    metrics.remove("uid-a");
    let s = parse(&get(addr, "/metrics").await.2);
    assert!(
        s.iter()
            .all(|(_, l, _)| l.get("capsule").map(String::as_str) != Some("uid-a")),
        "series of a removed capsule remain"
    );
    assert!(
        value(
            &s,
            "wrenn_agent_capsule_memory_bytes",
            &[("capsule", "uid-b")]
        )
        .is_some()
    );
    assert_eq!(value(&s, "wrenn_agent_capsules_sampled", &[]), Some(1.0));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

/// A capsule made by the supervisor (over the recording fakes) shows up in
/// the scrape once sampled, with its create timed, and goes with delete.
#[tokio::test]
async fn a_supervised_capsule_is_scraped_until_deleted() {
    use wrenn_node_agent::capsule::{
        BootSource, CapsuleSpec, Host, Resources, State, Supervisor, SupervisorConfig, TemplateDisk,
    };
    use wrenn_node_agent::storage::{CapsuleId, FakeBlockStore};

    let _case = wrenn_testkit::case(Tier::Host, "metrics_admin_supervised_capsule");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeBlockStore::new());
    let cfg = SupervisorConfig::new(dir.path(), std::path::Path::new("/k/vmlinux"));
    let metrics = cfg.metrics.clone();
    let sup = Supervisor::new(
        Host {
            machine: Arc::new(wrenn_node_agent::vmm::FakeMachine::new()),
            net: Arc::new(wrenn_node_agent::network::FakeNet::new()),
            store: store.clone(),
        },
        cfg,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(
        listener,
        // The admin opted in to per-capsule series.
        AdminState {
            capsule_labels: true,
            ..AdminState::new(metrics.clone())
        },
        std::future::pending(),
    ));

    let spec = CapsuleSpec::new(
        "default",
        "c",
        BootSource::Template(TemplateDisk {
            key: "t".into(),
            rootfs: "/t/base.ext4".into(),
            digest: String::new(),
        }),
        Resources {
            vcpus: 1,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
        },
    );
    sup.create("uid-c", spec, State::Running).await.unwrap();
    store.set_allocated(&CapsuleId::new("uid-c").unwrap(), 5 << 20);
    sampler::tick(&metrics, Duration::from_secs(1)).await;

    let s = parse(&get(addr, "/metrics").await.2);
    let c = [("capsule", "uid-c")];
    assert_eq!(
        value(&s, "wrenn_agent_capsule_disk_allocated_bytes", &c),
        Some((5 << 20) as f64)
    );
    assert_eq!(
        value(&s, "wrenn_agent_capsule_network_receive_bytes_total", &c),
        Some(0.0)
    );
    assert_eq!(value(&s, "wrenn_agent_capsules_sampled", &[]), Some(1.0));
    assert_eq!(
        value(&s, "wrenn_agent_create_seconds_count", &[("outcome", "ok")]),
        Some(1.0)
    );

    assert!(sup.delete("uid-c").await.unwrap());
    let s = parse(&get(addr, "/metrics").await.2);
    assert!(
        s.iter()
            .all(|(_, l, _)| l.get("capsule").map(String::as_str) != Some("uid-c")),
        "series of a deleted capsule remain"
    );
    assert_eq!(
        value(&s, "wrenn_agent_delete_seconds_count", &[("outcome", "ok")]),
        Some(1.0)
    );
    server.abort();
}

/// Serves `metrics` on loopback with `state`'s settings.
async fn start(state: AdminState) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    addr
}

/// Reads until the server closes; `true` if it did within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn by_default_no_answer_names_a_capsule() {
    let _case = wrenn_testkit::case(Tier::Host, "metrics_admin_no_capsule_uids_by_default");
    // What the agent binary does without flags.
    let args = <wrenn_node_agent::args::Args as clap::Parser>::try_parse_from([
        "wrenn-node-agent",
        "--node-name",
        "n",
    ])
    .unwrap();
    assert!(!args.admin.metrics_capsule_labels);
    assert_eq!(args.admin_listen.to_string(), "127.0.0.1:9090");

    let metrics = Metrics::new();
    metrics.set_ready(true);
    let uids = [
        "0f6b2c1e-aaaa-4bbb-8ccc-000000000001",
        "0f6b2c1e-aaaa-4bbb-8ccc-000000000002",
    ];
    for uid in uids {
        let src: Arc<dyn SampleSource> = Arc::new(Figures {
            cpu_ns: 5,
            rss: 1 << 20,
        });
        metrics.attach(uid, src);
    }
    sampler::tick(&metrics, Duration::from_secs(1)).await;
    metrics.observe_step(Step::Boot, Duration::from_millis(10), Outcome::Ok);
    assert!(
        metrics.encode().contains(uids[0]),
        "the test's capsules are not sampled"
    );

    let addr = start(AdminState::new(metrics.clone())).await;
    let (status, _, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let s = parse(&body);
    // The node-level figures are there; nothing names a capsule.
    assert_eq!(value(&s, "wrenn_agent_capsules_sampled", &[]), Some(2.0));
    assert_eq!(
        value(&s, "wrenn_agent_boot_seconds_count", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert!(
        s.iter().all(|(_, l, _)| !l.contains_key("capsule")),
        "{body}"
    );
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/capsules",
        "/metrics?capsule=1",
    ] {
        let (_, _, body) = get(addr, path).await;
        for uid in uids {
            assert!(!body.contains(uid), "{path} names capsule {uid}:\n{body}");
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_dropped() {
    let _case = wrenn_testkit::case(Tier::Host, "metrics_admin_slow_request_dropped");
    let metrics = Metrics::new();
    let limit = Duration::from_millis(500);
    let addr = start(AdminState {
        limits: AdminLimits {
            header_timeout: limit,
            ..AdminLimits::default()
        },
        ..AdminState::new(metrics)
    })
    .await;
    let opened = std::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Others are served meanwhile.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    for (what, s) in [("silent", &mut silent), ("partial", &mut partial)] {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "{what} client still connected after 5 s"
        );
        assert!(
            opened.elapsed() + Duration::from_millis(100) >= limit,
            "{what} closed early"
        );
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    let _case = wrenn_testkit::case(Tier::Host, "metrics_admin_connection_cap");
    let addr = start(AdminState {
        limits: AdminLimits {
            max_connections: 2,
            header_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(60),
        },
        ..AdminState::new(Metrics::new())
    })
    .await;
    let held: Vec<TcpStream> = vec![
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    // Let the server take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a connection beyond the cap was kept"
    );
    // A freed slot serves the next scrape.
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut raw)).await;
        if raw.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the slots of closed connections were not freed");
}
