//! `Dial` of `wrenn-guest` as a host process (tier 1): a connection to a
//! server on 127.0.0.1 carries bytes both ways, the caller's close_write
//! reaches the server as end of input while its reply still comes back,
//! nothing listening is refused at once naming the port, and a caller
//! going away closes the connection.

// Helpers outside #[test] fns unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};
use wrenn_proto::guest::v1::{DialInput, DialOutput, DialStart, dial_input, dial_output};

use common::{Guest, authed, started};

fn msg(i: dial_input::Input) -> DialInput {
    DialInput { input: Some(i) }
}

/// Opens a Dial to `port`: the input sender and the output stream.
async fn dial(
    g: &mut Guest,
    port: u16,
) -> Result<(mpsc::Sender<DialInput>, tonic::Streaming<DialOutput>), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(msg(dial_input::Input::Start(DialStart {
        port: u32::from(port),
    })))
    .await
    .unwrap();
    let out = g
        .client
        .dial(authed(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    Ok((tx, out))
}

/// A server on 127.0.0.1 that reads to end of input, then answers
/// `got N bytes` and what it read reversed, then closes.
async fn reverse_server() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                let mut reply = format!("got {} bytes\n", all.len()).into_bytes();
                all.reverse();
                reply.extend_from_slice(&all);
                s.write_all(&reply).await.unwrap();
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn close_write_reaches_the_server_and_its_reply_comes_back() {
    let mut g = started(&[]).await;
    let (port, _server) = reverse_server().await;
    let (tx, mut out) = dial(&mut g, port).await.unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(first.output, Some(dial_output::Output::Connected(true)));
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for c in payload.chunks(50_000) {
        tx.send(msg(dial_input::Input::Data(c.to_vec())))
            .await
            .unwrap();
    }
    // The server answers only after end of input: a reply proves the FIN.
    tx.send(msg(dial_input::Input::CloseWrite(true)))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut closed = false;
    while let Some(m) = out.message().await.unwrap() {
        match m.output {
            Some(dial_output::Output::Data(b)) => got.extend_from_slice(&b),
            Some(dial_output::Output::ClosedWrite(true)) => closed = true,
            other => panic!("unexpected {other:?}"),
        }
        if closed {
            break;
        }
    }
    assert!(closed, "the server's end of output is reported");
    let mut want = b"got 300000 bytes\n".to_vec();
    let mut rev = payload.clone();
    rev.reverse();
    want.extend_from_slice(&rev);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes differ");
    drop(tx);
    // Both directions done: the stream ends.
    assert!(out.message().await.unwrap().is_none());
}

#[tokio::test]
async fn nothing_listening_is_refused_at_once_naming_the_port() {
    let mut g = started(&[]).await;
    // A port just freed: nothing listens on it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = Instant::now();
    let e = match dial(&mut g, port).await {
        Err(e) => e,
        Ok((_tx, mut out)) => out.message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("127.0.0.1:{port}")), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_caller_going_away_closes_the_connection() {
    let mut g = started(&[]).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, mut out) = dial(&mut g, port).await.unwrap();
    let (mut s, _) = l.accept().await.unwrap();
    assert!(out.message().await.unwrap().is_some());
    drop(tx);
    drop(out);
    // The server sees the connection end (EOF), within a deadline.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the connection closes")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn dial_needs_the_token() {
    let mut g = started(&[]).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(dial_input::Input::Start(DialStart { port: 80 })))
        .await
        .unwrap();
    let e = g
        .client
        .dial(Request::new(ReceiverStream::new(rx)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}
