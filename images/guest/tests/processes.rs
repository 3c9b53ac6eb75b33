//! Detached processes of `wrenn-guest` as a host process, over a Unix
//! socket and the vsock handshake (tier 1): start with a tag, list, a
//! dropped caller that stops nothing, replay plus follow for several
//! attachers, signals by tag, the ring's dropped bytes, and the bounds.

// Helpers outside #[test] fns unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use tonic::Code;
use wrenn_proto::guest::v1::guest_agent_client::GuestAgentClient;
use wrenn_proto::guest::v1::{
    AttachProcessRequest, ExecExit, ListProcessesRequest, ProcessInfo, ProcessRef,
    SignalProcessRequest, StartProcessRequest, process_output,
};

use common::{authed, started};

type Client = GuestAgentClient<tonic::transport::Channel>;

async fn start(c: &mut Client, tag: &str, script: &str) -> Result<ProcessInfo, tonic::Status> {
    c.start_process(authed(StartProcessRequest {
        tag: tag.to_string(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }))
    .await
    .map(tonic::Response::into_inner)
}

async fn list(c: &mut Client) -> Vec<ProcessInfo> {
    c.list_processes(authed(ListProcessesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .processes
}

fn tag(t: &str) -> Option<ProcessRef> {
    Some(ProcessRef {
        pid: 0,
        tag: t.to_string(),
    })
}

#[derive(Debug, Default)]
struct Attached {
    dropped: Vec<u64>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExecExit>,
}

/// Attaches and reads until the stream ends.
async fn attach_all(c: &mut Client, t: &str, follow: bool) -> Attached {
    let mut s = c
        .attach_process(authed(AttachProcessRequest {
            process: tag(t),
            follow,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut a = Attached::default();
    while let Some(m) = s.message().await.unwrap() {
        match m.output.unwrap() {
            process_output::Output::Dropped(n) => a.dropped.push(n),
            process_output::Output::Stdout(b) => a.stdout.extend(b),
            process_output::Output::Stderr(b) => a.stderr.extend(b),
            process_output::Output::Exit(e) => a.exit = Some(e),
        }
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_process_outlives_its_caller_and_replays_then_follows() {
    let g = started(&[]).await;
    let dir = g.dir.path().to_path_buf();
    let go = dir.join("go");
    let mut c = g.client.clone();
    // It prints, then waits for the test's signal file, prints again and
    // exits 3.
    let script = format!(
        "echo before; echo err >&2; while [ ! -e {go} ]; do sleep 0.05; done; echo after; exit 3",
        go = go.display()
    );
    let info = start(&mut c, "job", &script).await.unwrap();
    assert!(info.running && info.pid > 1 && info.tag == "job");

    // The tag is taken while it runs.
    let again = start(&mut c, "job", "true").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert!(again.message().contains("\"job\""), "{}", again.message());

    // A new connection (the first one's calls are over) sees it running
    // and its output so far.
    drop(c);
    let mut c2 = GuestAgentClient::new(common::connect(&g.vsock).await);
    let ps = list(&mut c2).await;
    let p = ps.iter().find(|p| p.tag == "job").unwrap();
    assert!(p.running && p.exit.is_none(), "{p:?}");
    // Polled with a deadline: the pipes reach the ring on their own time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list(&mut c2)
        .await
        .iter()
        .any(|p| p.tag == "job" && p.output_bytes >= 11)
    {
        assert!(Instant::now() < deadline, "the first output never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let early = attach_all(&mut c2, "job", false).await;
    assert_eq!(early.stdout, b"before\n");
    assert_eq!(early.stderr, b"err\n");
    assert_eq!(early.dropped, vec![0]);
    assert!(early.exit.is_none(), "no follow: no exit while it runs");

    // Two followers at once, both get the replay, the rest and the exit.
    let (mut a, mut b) = (c2.clone(), c2.clone());
    let f1 = tokio::spawn(async move { attach_all(&mut a, "job", true).await });
    let f2 = tokio::spawn(async move { attach_all(&mut b, "job", true).await });
    std::fs::write(&go, b"").unwrap();
    for f in [f1, f2] {
        let got = f.await.unwrap();
        assert_eq!(got.stdout, b"before\nafter\n");
        assert_eq!(got.exit.unwrap().code, Some(3));
    }
    let ps = list(&mut c2).await;
    let p = ps.iter().find(|p| p.tag == "job").unwrap();
    assert!(!p.running);
    assert_eq!(p.exit.as_ref().and_then(|e| e.code), Some(3));
    // An exited process replays and ends with its status.
    let late = attach_all(&mut c2, "job", true).await;
    assert_eq!(late.stdout, b"before\nafter\n");
    assert_eq!(late.exit.unwrap().code, Some(3));
    // Its tag is free again.
    start(&mut c2, "job", "true").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_by_tag_reach_the_group_and_show_in_the_list() {
    let g = started(&[]).await;
    let mut c = g.client.clone();
    start(&mut c, "sleeper", "sleep 300").await.unwrap();
    let sent = c
        .signal_process(authed(SignalProcessRequest {
            process: tag("sleeper"),
            signal: 15,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.tag, "sleeper");
    let got = attach_all(&mut c, "sleeper", true).await;
    let exit = got.exit.unwrap();
    assert_eq!((exit.code, exit.signal), (None, Some(15)));
    // Signalling it again says it exited; an unknown tag is named.
    let again = c
        .signal_process(authed(SignalProcessRequest {
            process: tag("sleeper"),
            signal: 9,
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let unknown = c
        .attach_process(authed(AttachProcessRequest {
            process: tag("nope"),
            follow: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("\"nope\""),
        "{}",
        unknown.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_keeps_the_newest_bytes_and_says_how_many_it_dropped() {
    let g = started(&["--process-ring-bytes", "1000"]).await;
    let mut c = g.client.clone();
    // 5000 bytes: 50 lines of 99 'x' and a newline.
    start(
        &mut c,
        "loud",
        "i=0; while [ $i -lt 50 ]; do printf '%099d\\n' 0; i=$((i+1)); done",
    )
    .await
    .unwrap();
    // A follower that falls behind the writer is told each time it does:
    // every count adds up to what it did not get.
    let live = attach_all(&mut c, "loud", true).await;
    assert_eq!(live.exit.unwrap().code, Some(0));
    assert_eq!(
        live.dropped.iter().sum::<u64>() + live.stdout.len() as u64,
        5000
    );
    // Once it exited, a late attacher gets the newest 1000 bytes and the
    // count of the 4000 before them.
    let got = attach_all(&mut c, "loud", true).await;
    assert_eq!(got.exit.unwrap().code, Some(0));
    assert_eq!(got.dropped, vec![4000]);
    assert_eq!(got.stdout.len(), 1000);
    let ps = list(&mut c).await;
    let p = ps.iter().find(|p| p.tag == "loud").unwrap();
    assert_eq!((p.output_bytes, p.dropped_bytes), (5000, 4000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_processes_tags_and_exited_entries_are_bounded() {
    let g = started(&["--max-processes", "2"]).await;
    let mut c = g.client.clone();
    start(&mut c, "a", "sleep 300").await.unwrap();
    start(&mut c, "b", "sleep 300").await.unwrap();
    let full = start(&mut c, "c", "sleep 300").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    let bad = start(&mut c, "no spaces", "true").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let long = start(&mut c, &"x".repeat(64), "true").await.unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    for t in ["a", "b"] {
        c.signal_process(authed(SignalProcessRequest {
            process: tag(t),
            signal: 9,
        }))
        .await
        .unwrap();
        attach_all(&mut c, t, true).await;
    }
    // Three more that exit at once: only the newest two exited stay.
    for t in ["d", "e", "f"] {
        start(&mut c, t, "true").await.unwrap();
        attach_all(&mut c, t, true).await;
    }
    let tags: Vec<String> = list(&mut c).await.into_iter().map(|p| p.tag).collect();
    assert_eq!(tags, vec!["e", "f"]);
}
