//! Tier 2: exec into a capsule with nothing but a kubeconfig, through the
//! real parts of [`gateway_bed`]: stdout, stderr, stdin and the exit code
//! over `v5.channel.k8s.io`, clear refusals for unknown and paused
//! capsules, an oversized message that ends only its own stream, and a
//! TTY (resize, stdin, ^C).
#![allow(clippy::unwrap_used)]

mod gateway_bed;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use gateway_bed::{Bed, BedOptions, NS, api_code, exec, exec_path};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use wrenn_gateway::channel::exit_code_of;
use wrenn_gateway::exec::{ExecOptions, build_request_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_streams_output_stdin_and_exit_codes_and_refuses_clearly() {
    let Some((_c, b)) = Bed::for_case(
        "gateway_exec::exec_streams_output_stdin_and_exit_codes_and_refuses_clearly",
        BedOptions::tagged(2),
    )
    .await
    else {
        return;
    };
    let alice_c = &b.alice;
    let ns_a = NS;
    // alice runs a command in A: stdout, stderr and the exit code arrive.
    let ran = exec(
        alice_c,
        ns_a,
        "box",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(ran.stdout, "out\n", "{ran:?}");
    assert_eq!(ran.stderr, "err\n", "{ran:?}");
    assert_eq!(ran.status["reason"], "NonZeroExitCode", "{ran:?}");
    assert_eq!(exit_code_of(&ran.status), Some(3), "{ran:?}");
    // A closed stdin reaches the process: `cat` ends.
    let ran = exec(
        alice_c,
        ns_a,
        "box",
        &["cat"],
        Some(b"hello through the front door"),
    )
    .await
    .unwrap();
    assert_eq!(ran.stdout, "hello through the front door", "{ran:?}");
    assert_eq!(ran.status["status"], "Success", "{ran:?}");

    // Clear refusals: an unknown capsule names itself, a paused one its phase.
    let (code, msg) = api_code(exec(alice_c, ns_a, "nosuch", &["true"], None).await);
    assert_eq!(code, 404, "{msg}");
    assert!(msg.contains("\"nosuch\""), "{msg}");
    let (code, msg) = api_code(exec(alice_c, ns_a, "nap", &["true"], None).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("Paused"), "{msg}");

    // An oversized WebSocket message ends that stream cleanly (a close or
    // a cut connection, no hang); the gateway goes on serving.
    let req = http::Request::get(exec_path(ns_a, "box", &["cat"], true))
        .body(Vec::new())
        .unwrap();
    let mut ws = alice_c.connect(req).await.unwrap().into_stream();
    let _ = ws.send(Message::binary(vec![0u8; 2 << 20])).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an oversized message left the stream open");
    let ran = exec(alice_c, ns_a, "box", &["echo", "still here"], None)
        .await
        .unwrap();
    assert_eq!(ran.stdout, "still here\n", "{ran:?}");
    drop(b);
}

/// A TTY exec: the WebSocket, after the stream-up message.
async fn tty(
    client: &kube::Client,
    argv: &[&str],
) -> impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
+ futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
+ Unpin
+ use<> {
    let path = build_request_path(
        NS,
        "box",
        &ExecOptions {
            command: argv.iter().map(|a| a.to_string()).collect(),
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
            ..Default::default()
        },
    );
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    client.connect(req).await.unwrap().into_stream()
}

/// Reads terminal output until the error channel's `Status`; returns the
/// output and the status. With `ctrl_c_after`, once the output shows that
/// text, sends ^C each second until the output shows `until`.
async fn read_tty<S>(ws: &mut S, ctrl_c_after: Option<(&str, &str)>) -> (String, Value)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message>
        + Unpin,
{
    let mut out = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout_at(deadline, ws.next()) => m
                .unwrap_or_else(|_| panic!("no exit status in 60 s; output so far: {out:?}")),
            _ = tick.tick() => {
                if let Some((after, until)) = ctrl_c_after
                    && out.contains(after)
                    && !out.contains(until)
                {
                    let _ = ws.send(Message::binary(vec![0u8, 0x03])).await;
                }
                continue;
            }
        };
        let Some(Ok(Message::Binary(b))) = msg else {
            assert!(msg.is_some(), "stream ended without a status: {out:?}");
            continue;
        };
        match b.split_first() {
            Some((1, data)) => out.push_str(&String::from_utf8_lossy(data)),
            Some((3, data)) => return (out, serde_json::from_slice(data).unwrap()),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tty_exec_resizes_reads_stdin_and_interrupts_with_ctrl_c() {
    let Some((_c, b)) = Bed::for_case(
        "gateway_exec::tty_exec_resizes_reads_stdin_and_interrupts_with_ctrl_c",
        BedOptions::tagged(3),
    )
    .await
    else {
        return;
    };
    // The size reaches the PTY before the line the shell waits for: both
    // travel the one stream in order.
    let mut ws = tty(
        &b.alice,
        &[
            "sh",
            "-c",
            "read line; echo \"got $line\"; stty size; exit 7",
        ],
    )
    .await;
    ws.send(Message::binary(
        b"\x04{\"Width\":100,\"Height\":40}".to_vec(),
    ))
    .await
    .unwrap();
    ws.send(Message::binary(b"\x00hello\n".to_vec()))
        .await
        .unwrap();
    let (out, status) = read_tty(&mut ws, None).await;
    assert!(out.contains("got hello"), "{out:?}");
    assert!(
        out.contains("40 100"),
        "stty size after the resize: {out:?}"
    );
    assert_eq!(exit_code_of(&status), Some(7), "{status}");

    // ^C on the terminal interrupts the foreground command (the shell
    // traps it and goes on). Sent again each second until it lands while
    // `sleep` runs: one sent before `sleep` started only runs the trap.
    let started = Instant::now();
    let mut ws = tty(
        &b.alice,
        &[
            "sh",
            "-c",
            "trap 'echo trapped' INT; echo ready; sleep 100; echo \"slept $?\"; exit 5",
        ],
    )
    .await;
    let (out, status) = read_tty(&mut ws, Some(("ready", "slept"))).await;
    assert!(
        out.contains("slept 130"),
        "sleep was not interrupted: {out:?}"
    );
    assert_eq!(exit_code_of(&status), Some(5), "{status}");
    assert!(started.elapsed() < Duration::from_secs(60));
    drop(b);
}
