//! Guest agent figures over the host path the node agent uses: Unix socket
//! plus the `CONNECT <port>` handshake shim, tonic on top.
//! - exec round trip of `true` (start, exit), median and p99 over 200;
//! - file throughput: write then read 64 MiB.
//!
//! `cargo bench -p wrenn-guest --bench agent` (prints figures; not a test).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::authed;
use tokio_stream::StreamExt as _;
use wrenn_proto::guest::v1::{
    ExecInput, ExecStart, ReadFileRequest, WriteFileInput, WriteFileStart, exec_input, exec_output,
    write_file_input,
};

const RUNS: usize = 200;
const FILE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

fn main() {
    let rt = wrenn_testkit::runtime();
    rt.block_on(run());
}

async fn run() {
    // Initialised with the access token every call then carries.
    let mut g = common::started(&[]).await;

    let mut times = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 10 {
        let start = ExecInput {
            input: Some(exec_input::Input::Start(ExecStart {
                argv: vec!["true".into()],
                ..Default::default()
            })),
        };
        let t0 = Instant::now();
        let mut out = g
            .client
            .exec(authed(tokio_stream::iter([start])))
            .await
            .unwrap()
            .into_inner();
        let mut code = None;
        while let Some(m) = out.message().await.unwrap() {
            if let Some(exec_output::Output::Exit(e)) = m.output {
                code = e.code;
            }
        }
        assert_eq!(code, Some(0));
        if i >= 10 {
            times.push(t0.elapsed());
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "exec `true` round trip over {RUNS}: median {:.2} ms, p99 {:.2} ms",
        ms(pct(0.5)),
        ms(pct(0.99))
    );

    let data: Vec<u8> = (0..FILE).map(|i| (i * 31 % 251) as u8).collect();
    let path = g.dir.path().join("bench.bin").to_str().unwrap().to_string();
    let mut msgs = vec![WriteFileInput {
        input: Some(write_file_input::Input::Start(WriteFileStart {
            path: path.clone(),
            mode: 0o644,
            size: FILE as u64,
            make_parents: false,
            ..Default::default()
        })),
    }];
    msgs.extend(data.chunks(CHUNK).map(|c| WriteFileInput {
        input: Some(write_file_input::Input::Data(c.to_vec())),
    }));
    let t0 = Instant::now();
    g.client
        .write_file(authed(tokio_stream::iter(msgs)))
        .await
        .unwrap();
    let write = t0.elapsed();

    let t0 = Instant::now();
    let mut stream = g
        .client
        .read_file(authed(ReadFileRequest {
            path: path.clone(),
            max_bytes: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0usize;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().data.len();
    }
    let read = t0.elapsed();
    assert_eq!(got, FILE);
    let mib = (FILE >> 20) as f64;
    println!(
        "file 64 MiB: write {:.0} MiB/s ({:.0} ms, fsync included), read {:.0} MiB/s ({:.0} ms)",
        mib / write.as_secs_f64(),
        ms(write),
        mib / read.as_secs_f64(),
        ms(read)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
