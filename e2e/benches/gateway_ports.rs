//! Figures of port forwarding and the proxy for people, over the gateway
//! bed (`e2e/tests/gateway_bed`): each path through the API server, the
//! gateway, the node agent and the guest agent (the loopback route: the
//! bed's guest agent is a host process dialing 127.0.0.1) beside a direct
//! TCP connection to the same server, in the same run:
//!
//! - added latency: a 1-byte ping-pong on an open forward vs direct,
//!   p50/p99;
//! - throughput: 64 MiB up through one forward (until the server's reply
//!   to its end of input) vs direct, MB/s;
//! - proxy requests per second (GET, 16 in flight, 10 s).
//!
//! `cargo bench -p wrenn-e2e --bench gateway_ports` (as root; needs the
//! control plane binaries, like the cluster tier).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/gateway_bed/mod.rs"]
mod gateway_bed;

use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use gateway_bed::{Bed, NS, forward_request};
use kube::api::{Api, Patch, PatchParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wrenn_crds::Capsule;

const SIZE: usize = 64 << 20;
const PINGS: usize = 500;

/// Echoes every byte back; after end of input answers the count (8 bytes)
/// and closes.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            // Small reads are pings; big ones are counted only.
                            if k == 1 && s.write_all(&buf[..1]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(&n.to_le_bytes()).await;
            });
        }
    });
    port
}

/// Answers every request with a short body; keeps the connection open.
async fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

async fn forward(client: &kube::Client, port: u16) -> Ws {
    let req = forward_request(NS, "box", port);
    let mut ws = client.connect(req).await.unwrap().into_stream();
    // The port prefixes on channels 0 and 1.
    for _ in 0..2 {
        ws.next().await.unwrap().unwrap();
    }
    ws
}

/// The next data bytes from the forward.
async fn data(ws: &mut Ws) -> Vec<u8> {
    loop {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap()
            && b.first() == Some(&0)
            && b.len() > 1
        {
            return b[1..].to_vec();
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    run().await;
}

async fn run() {
    let bed = match Bed::start().await {
        Ok(b) => b,
        Err(why) => {
            eprintln!("gateway_ports bench: SKIPPED: {why}");
            return;
        }
    };
    let alice = bed.alice.clone();
    let echo = echo_server().await;
    let web = http_server().await;
    let capsules: Api<Capsule> = Api::namespaced(bed.admin.clone(), NS);
    capsules
        .patch(
            "box",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "network": { "ports": [
                { "port": echo }, { "port": web }
            ] } } })),
        )
        .await
        .unwrap();

    // Latency: ping-pong on one open connection each, interleaved.
    let mut ws = forward(&alice, echo).await;
    let mut direct = TcpStream::connect(("127.0.0.1", echo)).await.unwrap();
    direct.set_nodelay(true).unwrap();
    let (mut via, mut dir) = (Vec::new(), Vec::new());
    let mut one = [0u8; 1];
    for i in 0..PINGS + 20 {
        let t = Instant::now();
        ws.send(Message::binary(vec![0u8, b'p'])).await.unwrap();
        assert_eq!(data(&mut ws).await, b"p");
        let v = t.elapsed();
        let t = Instant::now();
        direct.write_all(b"p").await.unwrap();
        direct.read_exact(&mut one).await.unwrap();
        let d = t.elapsed();
        // The first ones warm the paths.
        if i >= 20 {
            via.push(v);
            dir.push(d);
        }
    }
    via.sort();
    dir.sort();
    let _ = ws.close(None).await;
    drop(direct);

    // Throughput: 64 MiB up, then end of input, until the count comes back.
    let chunk = vec![7u8; 256 << 10];
    let mbps = |t: Duration| SIZE as f64 / 1e6 / t.as_secs_f64();
    let mut ws = forward(&alice, echo).await;
    let t = Instant::now();
    for _ in 0..SIZE / chunk.len() {
        let mut m = Vec::with_capacity(chunk.len() + 1);
        m.push(0u8);
        m.extend_from_slice(&chunk);
        ws.send(Message::binary(m)).await.unwrap();
    }
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let count = data(&mut ws).await;
    assert_eq!(count, (SIZE as u64).to_le_bytes());
    let up_via = mbps(t.elapsed());
    let mut direct = TcpStream::connect(("127.0.0.1", echo)).await.unwrap();
    let t = Instant::now();
    for _ in 0..SIZE / chunk.len() {
        direct.write_all(&chunk).await.unwrap();
    }
    direct.shutdown().await.unwrap();
    let mut count = Vec::new();
    direct.read_to_end(&mut count).await.unwrap();
    assert_eq!(count, (SIZE as u64).to_le_bytes());
    let up_direct = mbps(t.elapsed());

    // Proxy GETs per second, 16 in flight for 10 s.
    let path =
        format!("/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/proxy/{web}/");
    let until = Instant::now() + Duration::from_secs(10);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (c, path) = (alice.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let req = http::Request::get(path.as_str()).body(Vec::new()).unwrap();
                let body = c.request_text(req).await.unwrap();
                assert_eq!(body, "ok");
                n += 1;
            }
            n
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    let per_s = calls as f64 / t.elapsed().as_secs_f64();

    println!("\nport-forward and proxy figures ({PINGS} pings, 64 MiB up)\n");
    println!(
        "| measure | through API server + gateway + agent + guest agent | direct TCP | added |"
    );
    println!("|---|---|---|---|");
    for (what, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (v, d) = (pct(&via, p), pct(&dir, p));
        println!(
            "| 1-byte round trip {what} | {v:.2} ms | {d:.3} ms | +{:.2} ms |",
            v - d
        );
    }
    println!(
        "| throughput up | {up_via:.0} MB/s | {up_direct:.0} MB/s | {:.0}% of direct |",
        up_via / up_direct * 100.0
    );
    println!("\n| proxy | value |\n|---|---|");
    println!("| GET requests/s (16 in flight, 10 s) | {per_s:.0} |");
}
