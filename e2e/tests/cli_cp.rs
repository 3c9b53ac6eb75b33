//! Tier 2: `kubectl wrenn cp` and `console`, and long transfers through the
//! API server, against the real parts of [`gateway_bed`]: the Go-built
//! kube-apiserver with its front proxy, the chart's RBAC, the real
//! gateway, a real node agent (fake VMM) and the real guest agent (a host
//! process, so its files are this host's: each test works in a directory
//! of its own).
//!
//! The API server cuts requests that are not long-running at
//! `--request-timeout`; `files`, `console` and `processes` are not
//! long-running by name, so their plain HTTP form is cut and the WebSocket
//! form (`docs/gateway-api.md`, "Long transfers") must not be. The second
//! test runs an API server whose timeout is 5 s and holds each stream
//! (a download, an upload, `console -f`, `logs -f`) open longer than that.
#![allow(clippy::unwrap_used)]

mod gateway_bed;
mod plugin;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::Message;

use gateway_bed::{BedOptions, NS, big_data, sha256_hex};
use plugin::{finish, plugin_bed, read_until, run, start};

/// A directory of the host (the guest agent's files) for one test.
fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cp_copies_files_and_directories_both_ways_and_console_prints_the_log() {
    let Some((_c, bin, bed)) = plugin_bed(
        "cli_cp::cp_copies_files_and_directories_both_ways_and_console_prints_the_log",
        BedOptions::default(),
    )
    .await
    else {
        return;
    };
    let (alice, bob) = (&bed.alice_kubeconfig, &bed.bob_kubeconfig);
    let guest = scratch("wrenn-cp-guest-");
    let g = guest.path().display().to_string();
    let local = scratch("wrenn-cp-local-");
    let l = local.path();

    // 50 MiB up: the guest holds the same bytes.
    let data = big_data();
    let sum = sha256_hex(&data);
    std::fs::write(l.join("big.bin"), &data).unwrap();
    let up = l.join("big.bin").display().to_string();
    let ran = run(&bin, alice, &["cp", &up, &format!("box:{g}/big.bin")]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains(&sum), "{ran:?}");
    assert_eq!(
        sha256_hex(&std::fs::read(guest.path().join("big.bin")).unwrap()),
        sum
    );
    // ... and down again into a directory named by the target.
    std::fs::create_dir(l.join("down")).unwrap();
    let down = l.join("down").display().to_string();
    let ran = run(&bin, alice, &["cp", &format!("box:{g}/big.bin"), &down]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(
        sha256_hex(&std::fs::read(l.join("down/big.bin")).unwrap()),
        sum
    );
    // A trailing slash puts a file inside the capsule's directory.
    std::fs::write(l.join("note.txt"), b"hello\n").unwrap();
    let note = l.join("note.txt").display().to_string();
    let ran = run(&bin, alice, &["-n", NS, "cp", &note, &format!("box:{g}/")]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(
        std::fs::read(guest.path().join("note.txt")).unwrap(),
        b"hello\n"
    );

    // A directory round trip: nested, with a symlink inside kept a link.
    let tree = l.join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/c.txt"), b"deep\n").unwrap();
    std::fs::write(tree.join("top.txt"), b"top\n").unwrap();
    std::os::unix::fs::symlink("b/c.txt", tree.join("a/link")).unwrap();
    let ran = run(
        &bin,
        alice,
        &["cp", &tree.display().to_string(), &format!("box:{g}/tree")],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let there = guest.path().join("tree");
    assert_eq!(std::fs::read(there.join("a/b/c.txt")).unwrap(), b"deep\n");
    assert_eq!(std::fs::read(there.join("top.txt")).unwrap(), b"top\n");
    assert_eq!(
        std::fs::read_link(there.join("a/link")).unwrap(),
        Path::new("b/c.txt")
    );
    let back = l.join("back");
    let ran = run(
        &bin,
        alice,
        &["cp", &format!("box:{g}/tree"), &back.display().to_string()],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(std::fs::read(back.join("a/b/c.txt")).unwrap(), b"deep\n");
    assert_eq!(std::fs::read(back.join("top.txt")).unwrap(), b"top\n");
    assert_eq!(
        std::fs::read_link(back.join("a/link")).unwrap(),
        Path::new("b/c.txt")
    );

    // A missing remote path: the guest's error, exit code 1, no file left.
    let ran = run(
        &bin,
        alice,
        &[
            "cp",
            &format!("box:{g}/nosuch"),
            &l.join("x").display().to_string(),
        ],
    )
    .await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("No such file or directory"), "{ran:?}");
    assert!(ran.stderr.contains(&format!("{g}/nosuch")), "{ran:?}");
    assert!(!l.join("x").exists());
    // Both sides local (or both remote): refused before any request.
    let ran = run(&bin, alice, &["cp", &up, &down]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("CAPSULE:/path"), "{ran:?}");
    // view only: Forbidden both ways, in the API server's words.
    for args in [
        ["-n", NS, "cp", &note, &format!("box:{g}/bob.txt")],
        [
            "-n",
            NS,
            "cp",
            &format!("box:{g}/note.txt"),
            &l.join("bob.txt").display().to_string(),
        ],
    ] {
        let ran = run(&bin, bob, &args).await;
        assert_eq!(ran.code, Some(1), "{ran:?}");
        assert!(ran.stderr.contains("forbidden"), "{ran:?}");
    }
    assert!(!guest.path().join("bob.txt").exists());

    // console: the log's tail, in full without --tail.
    std::fs::write(bed.console_log(), "boot 1\nboot 2\nlogin:\n").unwrap();
    let ran = run(&bin, alice, &["console", "box", "--tail=1"]).await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (Some(0), "login:\n"),
        "{ran:?}"
    );
    let ran = run(&bin, alice, &["console", "box"]).await;
    assert_eq!(ran.stdout, "boot 1\nboot 2\nlogin:\n", "{ran:?}");
    let ran = run(&bin, bob, &["-n", NS, "console", "box"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("forbidden"), "{ran:?}");
    let ran = run(&bin, alice, &["console", "nap"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("Paused"), "{ran:?}");
}

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

fn sub_path(sub: &str, query: &str) -> String {
    format!("/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/{sub}?{query}")
}

async fn websocket(client: &kube::Client, sub: &str, query: &str) -> Ws {
    let req = http::Request::get(sub_path(sub, query))
        .body(Vec::new())
        .unwrap();
    client.connect(req).await.unwrap().into_stream()
}

/// Reads stdout data until the final status; returns both.
async fn drain(ws: &mut Ws, data: &mut Vec<u8>) -> serde_json::Value {
    while let Some(m) = ws.next().await {
        let Message::Binary(b) = m.unwrap() else {
            continue;
        };
        match b.first() {
            Some(1) => data.extend_from_slice(&b[1..]),
            Some(3) => return serde_json::from_slice(&b[1..]).unwrap(),
            _ => {}
        }
    }
    panic!("the stream ended without a status");
}

/// How long a plain HTTP body lasted before it ended, and whether it ended
/// broken; `None` if it was still open after `within`.
async fn plain_body_lasts(
    client: &kube::Client,
    sub: &str,
    query: &str,
    read_pause: Duration,
    within: Duration,
) -> Option<(Duration, bool)> {
    let req = http::Request::get(sub_path(sub, query))
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let t0 = Instant::now();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut first = true;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = tokio::time::timeout_at(deadline, http_body_util::BodyExt::frame(&mut body))
            .await
            .ok()?;
        match frame {
            None => return Some((t0.elapsed(), false)),
            Some(Err(_)) => return Some((t0.elapsed(), true)),
            Some(Ok(_)) if first => {
                // A slow reader: the rest waits in the connection.
                first = false;
                tokio::time::sleep(read_pause).await;
            }
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_transfers_and_console_follow_outlive_the_api_servers_request_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(5);
    // Held open past the timeout, with a margin.
    const PAST: Duration = Duration::from_secs(8);
    // Beside the other test of this file, which holds the untagged bed.
    let Some((_c, bin, bed)) = plugin_bed(
        "cli_cp::long_transfers_and_console_follow_outlive_the_api_servers_request_timeout",
        BedOptions {
            request_timeout: Some(TIMEOUT),
            tag: Some(1),
        },
    )
    .await
    else {
        return;
    };
    let alice = wrenn_e2e::client_from(&bed.alice_kubeconfig).await.unwrap();
    let guest = scratch("wrenn-cp-long-");
    let g = guest.path().display().to_string();
    let data = big_data();
    let sum = sha256_hex(&data);
    std::fs::write(guest.path().join("big.bin"), &data).unwrap();
    std::fs::write(bed.console_log(), "login:\n").unwrap();

    // The problem: plain HTTP is cut by the API server at its timeout, a
    // slow download and a console follow alike.
    let (lasted, broken) = plain_body_lasts(
        &alice,
        "files",
        &format!("path={g}/big.bin"),
        PAST,
        Duration::from_secs(60),
    )
    .await
    .expect("a plain download is cut by the API server");
    assert!(broken, "the cut download looks complete after {lasted:?}");
    assert!(lasted >= TIMEOUT - Duration::from_secs(1), "{lasted:?}");
    let cut = plain_body_lasts(
        &alice,
        "console",
        "follow=true",
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await
    .expect("a plain console follow is cut by the API server");
    assert!(cut.0 >= TIMEOUT - Duration::from_secs(1), "{cut:?}");

    // The WebSocket form: a slow download runs to the end and its bytes
    // are the file's.
    let t0 = Instant::now();
    let mut ws = websocket(&alice, "files", &format!("path={g}/big.bin")).await;
    let mut got = Vec::new();
    let Some(Ok(Message::Binary(first))) = ws.next().await else {
        panic!("no first message");
    };
    assert_eq!(&first[..], &[1u8]);
    tokio::time::sleep(PAST).await;
    let status = drain(&mut ws, &mut got).await;
    assert_eq!(status["status"], "Success", "{status}");
    assert!(t0.elapsed() > PAST);
    assert_eq!(sha256_hex(&got), sum);

    // An upload that pauses past the timeout, then ends: the guest checks
    // the checksum and answers with the file's info.
    let mut ws = websocket(
        &alice,
        "files",
        &format!(
            "path={g}/up.bin&upload=true&size={}&sha256={sum}",
            data.len()
        ),
    )
    .await;
    let half = data.len() / 2;
    for part in data[..half].chunks(256 << 10) {
        let mut m = vec![0u8];
        m.extend_from_slice(part);
        ws.send(Message::binary(m)).await.unwrap();
    }
    tokio::time::sleep(PAST).await;
    for part in data[half..].chunks(256 << 10) {
        let mut m = vec![0u8];
        m.extend_from_slice(part);
        ws.send(Message::binary(m)).await.unwrap();
    }
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let mut answer = Vec::new();
    let status = drain(&mut ws, &mut answer).await;
    assert_eq!(status["status"], "Success", "{status}");
    let info: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(info["size"], data.len());
    assert_eq!(
        sha256_hex(&std::fs::read(guest.path().join("up.bin")).unwrap()),
        sum
    );

    // `kubectl wrenn console -f` still prints what the guest writes after
    // the timeout passed.
    let mut follower = tokio::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&bed.alice_kubeconfig)
        .args(["console", "-f", "box"])
        .env_remove("KUBECONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = follower.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("login:") {
        let n = tokio::time::timeout(Duration::from_secs(30), out.read(&mut buf))
            .await
            .expect("the follower prints the log")
            .unwrap();
        assert!(
            n > 0,
            "the follower ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    tokio::time::sleep(PAST).await;
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(bed.console_log())
            .unwrap();
        f.write_all(b"late line\n").unwrap();
    }
    while !String::from_utf8_lossy(&seen).contains("late line") {
        let n = tokio::time::timeout(Duration::from_secs(30), out.read(&mut buf))
            .await
            .expect("the follower prints the late line")
            .unwrap();
        assert!(
            n > 0,
            "the follower was cut: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&seen), "login:\nlate line\n");
    follower.kill().await.unwrap();

    // A detached process's output: plain `logs` with follow=true is cut at
    // the timeout too; `kubectl wrenn logs -f` (a WebSocket) prints what
    // the process writes after it, then ends with the process.
    let go = format!("{g}/go");
    let script = format!("echo first; while [ ! -e {go} ]; do sleep 0.2; done; echo late");
    let ran = run(
        &bin,
        &bed.alice_kubeconfig,
        &[
            "exec", "-d", "--tag", "ticker", "box", "--", "sh", "-c", &script,
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let cut = plain_body_lasts(
        &alice,
        "processes",
        "op=logs&tag=ticker&follow=true",
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await
    .expect("a plain logs follow is cut by the API server");
    assert!(cut.0 >= TIMEOUT - Duration::from_secs(1), "{cut:?}");
    let mut follower = start(
        &bin,
        &bed.alice_kubeconfig,
        &["logs", "-f", "box", "ticker"],
    );
    read_until(&mut follower, "first\n").await;
    tokio::time::sleep(PAST).await;
    std::fs::write(&go, b"").unwrap();
    let seen = read_until(&mut follower, "late\n").await;
    assert_eq!(seen, "late\n");
    let ran = finish(follower, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
}
