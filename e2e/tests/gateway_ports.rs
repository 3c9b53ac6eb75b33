//! Tier 2: a capsule's declared ports through the API server, over the
//! real parts of [`gateway_bed`]. `kubectl wrenn port-forward` as alice
//! carries 20 concurrent connections with half-close (each server reads to
//! end of input before it answers) to a server in the capsule's network
//! namespace (the agent's network route: the guest's address dialed from
//! inside the namespace, which the test makes where the fake network
//! says it is), and one to a server bound to 127.0.0.1 that only the guest
//! agent reaches (the loopback route); the open forward counts as
//! activity; Ctrl-C ends the plugin. `capsules/proxy` passes a GET with
//! its path and query and without the caller's identity headers, and a
//! WebSocket echo; nothing listening is a quick 502; an undeclared port
//! is refused naming the declared ones; bob (view only) is forbidden both.
#![allow(clippy::unwrap_used)]

mod gateway_bed;
mod plugin;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use gateway_bed::{Bed, NS, call, eventually, forward_request, json_of};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use wrenn_crds::Capsule;
use wrenn_node_agent::network::GUEST_ADDR;
use wrenn_proto::agent::v1 as pb;
use wrenn_testkit::{TestNetns, Tier, case};

/// The capsule's namespace, at the path the (fake) network gave it, with
/// the guest's address on its loopback; removed on drop.
fn capsule_netns(path: &Path) -> TestNetns {
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("wrenn-"), "{name}");
    let ns = TestNetns::named(name).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&["addr", "add", &format!("{GUEST_ADDR}/32"), "dev", "lo"])
        .unwrap();
    ns
}

/// A listener on the guest's address inside `ns`.
fn listen_in(ns: &TestNetns) -> TcpListener {
    let std = ns.listen_tcp(SocketAddr::from((GUEST_ADDR, 0))).unwrap();
    std.set_nonblocking(true).unwrap();
    TcpListener::from_std(std).unwrap()
}

/// Reads each connection to its end of input, then answers `TAG LEN\n`
/// and the bytes reversed, and closes: a reply proves the FIN arrived.
fn reverse_server(l: TcpListener, tag: &'static str) -> u16 {
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_err() {
                    return;
                }
                let mut reply = format!("{tag} {}\n", all.len()).into_bytes();
                all.reverse();
                reply.extend_from_slice(&all);
                let _ = s.write_all(&reply).await;
            });
        }
    });
    port
}

/// Answers every HTTP request with its request line and headers.
fn http_server(l: TcpListener) -> u16 {
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = String::from_utf8_lossy(&head).to_lowercase();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

/// Echoes WebSocket messages, choosing the first subprotocol offered.
// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
fn websocket_echo(l: TcpListener) -> u16 {
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let pick = |req: &Request, mut resp: Response| {
                    if let Some(first) = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(',').next())
                    {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", first.trim().parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, pick).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A port nothing listens on (just freed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy_path(port: u16, rest: &str) -> String {
    format!("/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/proxy/{port}{rest}")
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((j * 31 + i * 7) % 251) as u8).collect()
}

/// One connection through the forward: sends `data`, closes its write
/// side, and reads the whole answer.
async fn round_trip(local: u16, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = rd.read_to_end(&mut got);
    let ((), r) = tokio::join!(send, recv);
    r.unwrap();
    got
}

fn expected(tag: &str, data: &[u8]) -> Vec<u8> {
    let mut want = format!("{tag} {}\n", data.len()).into_bytes();
    want.extend(data.iter().rev());
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ports_are_forwarded_and_proxied_to_declared_ports_only() {
    let c = case(
        Tier::Cluster,
        "gateway_ports::ports_are_forwarded_and_proxied_to_declared_ports_only",
    );
    let plugin = match tokio::task::spawn_blocking(|| {
        wrenn_e2e::build::cargo_build("kubectl-wrenn", "kubectl-wrenn")
    })
    .await
    .unwrap()
    {
        Ok(p) => p,
        Err(e) => return c.skip(format!("no kubectl-wrenn build: {e:#}")),
    };
    let b = match Bed::start_tagged(4).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    let netns_path = b
        .supervisor()
        .get(b.box_uid())
        .unwrap()
        .netns
        .expect("the fake network names the capsule's namespace");
    let ns = capsule_netns(&netns_path);

    // Servers: in the capsule's namespace on the guest's address (network
    // route), and on 127.0.0.1 where only the guest agent dials (loopback
    // route; the guest agent here is a host process).
    let net_port = reverse_server(listen_in(&ns), "net");
    let http_port = http_server(listen_in(&ns));
    let lo_port = reverse_server(TcpListener::bind("127.0.0.1:0").await.unwrap(), "lo");
    let ws_port = websocket_echo(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let none_port = free_port();
    let undeclared = free_port();
    let declared = [net_port, http_port, lo_port, ws_port, none_port];
    let capsules: Api<Capsule> = Api::namespaced(b.admin.clone(), NS);
    capsules
        .patch(
            "box",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "network": { "ports":
                declared.iter().map(|p| json!({ "port": p })).collect::<Vec<_>>()
            } } })),
        )
        .await
        .unwrap();

    // kubectl wrenn port-forward as alice, two ports on free local ones.
    let (mut child, local) =
        plugin::port_forward(&plugin, &b.alice_kubeconfig, "box", &[net_port, lo_port]).await;

    // 20 concurrent connections, each with its own bytes, half-closed.
    let t = Instant::now();
    let runs = (0..20).map(|i| {
        let data = payload(i, 100_000 + i * 997);
        let port = local[&net_port];
        tokio::spawn(async move { (round_trip(port, &data).await, data) })
    });
    for r in futures::future::join_all(runs).await {
        let (got, data) = r.unwrap();
        let want = expected("net", &data);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes came back changed");
    }
    eprintln!("20 forwarded connections in {:?}", t.elapsed());
    // The loopback-only server, reached through the guest agent.
    let got = round_trip(local[&lo_port], b"only on loopback").await;
    assert_eq!(got, expected("lo", b"only on loopback"));

    // An open forward counts as activity for as long as it is open.
    let agent = b.agent_client().await;
    let idle = TcpStream::connect(("127.0.0.1", local[&net_port]))
        .await
        .unwrap();
    let opened = wrenn_proto::unix_nanos_now();
    eventually(
        Duration::from_secs(30),
        "activity while the forward is open",
        || {
            let mut agent = agent.clone();
            let uid = b.box_uid().to_string();
            async move {
                let cap = agent
                    .get_capsule(pb::CapsuleRef { uid })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let held = cap.last_activity_unix_nanos - opened;
                (held > 3_000_000_000)
                    .then_some(())
                    .ok_or_else(|| format!("{held} ns after the forward opened"))
            }
        },
    )
    .await;
    drop(idle);

    // Ctrl-C ends the plugin.
    let pid = child.id().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("Ctrl-C ends port-forward")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The proxy: path, query and method reach the server; who asked does not.
    let (code, body) = call(
        &b.alice,
        http::Method::GET,
        proxy_path(http_port, "/hello/world?x=1&y=two"),
        Vec::new(),
    )
    .await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("get /hello/world?x=1&y=two http/1.1"),
        "{body}"
    );
    assert!(
        body.contains(&format!("host: localhost:{http_port}")),
        "{body}"
    );
    for secret in ["x-remote-user", "x-remote-group", "authorization", "alice"] {
        assert!(!body.contains(secret), "{secret} reached the guest: {body}");
    }

    // A WebSocket through the proxy: upgraded end to end, echoed.
    let req = http::Request::get(proxy_path(ws_port, "/echo"))
        .body(Vec::new())
        .unwrap();
    let conn = b.alice.connect(req).await.unwrap();
    let mut ws = conn.into_stream();
    for i in 0..3 {
        let text = format!("ping {i} through the API server");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    let _ = ws.close(None).await;

    // Nothing listening: 502 at once, by both.
    let t = Instant::now();
    let (code, body) = call(
        &b.alice,
        http::Method::GET,
        proxy_path(none_port, "/"),
        Vec::new(),
    )
    .await;
    let s = json_of(&body);
    assert_eq!(code, 502, "{s}");
    assert!(
        s["message"].as_str().unwrap().contains("nothing listens"),
        "{s}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let pf = |client: &kube::Client, port: u16| {
        let req = forward_request(NS, "box", port);
        let client = client.clone();
        async move {
            match client.connect(req).await {
                Ok(_) => (101, String::new()),
                Err(kube::Error::Api(s)) => (s.code, s.message),
                Err(e) => (0, e.to_string()),
            }
        }
    };
    let (code, msg) = pf(&b.alice, none_port).await;
    assert_eq!(code, 502, "{msg}");

    // An undeclared port: refused, naming the declared ones.
    let (code, msg) = pf(&b.alice, undeclared).await;
    assert_eq!(code, 403, "{msg}");
    assert!(
        msg.contains("not declared") && msg.contains(&net_port.to_string()),
        "{msg}"
    );
    let (code, body) = call(
        &b.alice,
        http::Method::GET,
        proxy_path(undeclared, "/"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("not declared")
    );

    // bob may look at capsules, not into their ports.
    let (code, msg) = pf(&b.bob, net_port).await;
    assert_eq!(code, 403, "{msg}");
    let (code, body) = call(
        &b.bob,
        http::Method::GET,
        proxy_path(http_port, "/"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    drop(ns);
}
