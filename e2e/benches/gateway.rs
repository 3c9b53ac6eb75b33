//! Figures of the data plane for people, over the gateway bed
//! (`e2e/tests/gateway_bed`): the Go-built kube-apiserver with its front
//! proxy, the real `wrenn-gateway` behind an APIService, a real node agent
//! (fake VMM) and the real guest agent as a host process. Each path
//! through the API server is measured beside the direct node-agent gRPC
//! call the gateway makes, in the same run:
//!
//! - exec round trip (`true`): API server → gateway → agent → guest vs
//!   agent → guest, p50/p99 and the ratio;
//! - file upload and download (64 MiB, the WebSocket form) vs the agent's
//!   `WriteFile`/`ReadFile`, MB/s;
//! - gateway RSS idle and with 100 open streams (console follows), and
//!   its CPU time per MB moved through it;
//! - exec calls per second one gateway sustains (16 in flight).
//!
//! `cargo bench -p wrenn-e2e --bench gateway` (as root; needs the control
//! plane binaries, like the cluster tier). `WRENN_BENCH_EXECS` sets the
//! exec samples (default 200), `WRENN_BENCH_TRANSFER_ROUNDS` the transfer
//! rounds whose medians are reported (default 5); `WRENN_E2E_RELEASE=1`
//! runs the gateway and guest agent built as they ship (release).
//! `WRENN_BENCH_ONLY=transfers` skips everything but the transfers, and
//! `WRENN_BENCH_PROFILE_SECS=N` first downloads through the gateway for N
//! seconds after printing its pid, for a profiler to attach to
//! (`perf record -p PID`).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/gateway_bed/mod.rs"]
mod gateway_bed;

use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use gateway_bed::{Bed, NS};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

fn path(sub: &str, query: &str) -> String {
    format!("/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/{sub}?{query}")
}

async fn ws(client: &kube::Client, sub: &str, query: &str) -> Ws {
    let req = http::Request::get(path(sub, query))
        .body(Vec::new())
        .unwrap();
    client.connect(req).await.unwrap().into_stream()
}

/// Reads until the final status; returns the stdout bytes received.
async fn drain(ws: &mut Ws) -> usize {
    let mut n = 0;
    while let Some(m) = ws.next().await {
        let Message::Binary(b) = m.unwrap() else {
            continue;
        };
        match b.first() {
            Some(1) => n += b.len() - 1,
            Some(3) => {
                let s: serde_json::Value = serde_json::from_slice(&b[1..]).unwrap();
                assert_eq!(s["status"], "Success", "{s}");
                return n;
            }
            _ => {}
        }
    }
    panic!("stream ended without a status");
}

/// One exec of `true` through the API server; answers when the upgrade
/// was answered, the exit status came and the connection closed, each
/// since the start.
async fn exec_via_api(client: &kube::Client) -> [Duration; 3] {
    let t = Instant::now();
    let mut s = ws(client, "exec", "command=true&stdout=true&stderr=true").await;
    let upgraded = t.elapsed();
    drain(&mut s).await;
    let status = t.elapsed();
    while let Some(Ok(_)) = s.next().await {}
    [upgraded, status, t.elapsed()]
}

/// A client of `kubeconfig` as kube builds it by default
/// (`kube::Client::try_from`), whose connections leave Nagle's algorithm
/// on: the comparison that shows what `wrenn_e2e::client_from` (and
/// `kubectl wrenn`, through `wrenn_operator::kube_client`) gain.
async fn stock_client(kubeconfig: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    wrenn_testkit::status_kib(&pid.to_string(), "VmRSS")
}

/// Bytes per transfer.
const SIZE: usize = 64 << 20;

/// One round of transfers: MB/s, and the gateway's CPU per MB moved
/// through it (ms).
struct Rates {
    up_via: f64,
    up_direct: f64,
    down_via: f64,
    down_direct: f64,
    gateway_up_cpu: f64,
    gateway_down_cpu: f64,
    /// CPU per MB of each of [`Procs`] on a download, through and direct.
    down_cpu_via: [f64; 4],
    down_cpu_direct: [f64; 4],
}

/// The processes a download spends CPU in: this one (the client and the
/// node agent), the guest agent, the API server and the gateway.
struct Procs([(&'static str, u32); 4]);

impl Procs {
    fn find(gateway: u32) -> Self {
        let me = std::process::id();
        // A read of every /proc/<pid>/stat: off the runtime, as `cpu`.
        let all = tokio::task::block_in_place(processes);
        let child = |comm: &str| {
            let mut tree = vec![me];
            let mut i = 0;
            while let Some(&parent) = tree.get(i) {
                tree.extend(all.iter().filter(|p| p.1 == parent).map(|p| p.0));
                i += 1;
            }
            all.iter()
                .find(|p| p.2 == comm && tree.contains(&p.0))
                .map_or(0, |p| p.0)
        };
        Self([
            ("bench (client + node agent)", me),
            ("guest agent", child("wrenn-guest")),
            ("kube-apiserver", child("kube-apiserver")),
            ("wrenn-gateway", gateway),
        ])
    }

    fn cpu(&self) -> [Duration; 4] {
        // Small procfs reads, but file reads all the same: off the runtime.
        tokio::task::block_in_place(|| std::array::from_fn(|i| cpu_time(self.0[i].1)))
    }
}

/// Every process: pid, parent's pid, command name.
fn processes() -> Vec<(u32, u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let (comm, rest) = stat(pid)?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        Some((pid, ppid, comm))
    })
    .collect()
}

/// `/proc/<pid>/stat` split at its command name (which may hold spaces
/// and parentheses): the name, and the fields after it (state first).
fn stat(pid: u32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    Some((head.split_once('(')?.1.to_string(), rest.to_string()))
}

/// CPU time (user + system) process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    // After the command name: state, then utime and stime as the 12th and
    // 13th fields.
    let rest = stat(pid).map(|(_, rest)| rest).unwrap_or_default();
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_s)
}

/// Uploads and downloads `data` through the API server and straight
/// through the agent, back to back.
async fn transfer_round(
    procs: &Procs,
    alice: &kube::Client,
    agent: &mut Agent,
    uid: &str,
    d: &str,
    data: &[u8],
) -> Rates {
    use wrenn_proto::agent::v1 as pb;
    use wrenn_proto::guest::v1 as gpb;
    let mbps = |t: Duration| SIZE as f64 / 1e6 / t.as_secs_f64();
    let cpu_per_mb = |t: Duration| t.as_secs_f64() * 1e3 / (SIZE as f64 / 1e6);
    let spent = |before: [Duration; 4]| {
        let now = procs.cpu();
        std::array::from_fn(|i| cpu_per_mb(now[i] - before[i]))
    };
    let gateway = procs.0[3].1;
    let cpu = cpu_time(gateway);
    let t = Instant::now();
    let mut up = ws(
        alice,
        "files",
        &format!("path={d}/via.bin&upload=true&size={SIZE}"),
    )
    .await;
    for c in data.chunks(1 << 20) {
        let mut m = Vec::with_capacity(c.len() + 1);
        m.push(0u8);
        m.extend_from_slice(c);
        up.send(Message::binary(m)).await.unwrap();
    }
    up.send(Message::binary(vec![255u8, 0])).await.unwrap();
    drain(&mut up).await;
    let up_via = mbps(t.elapsed());
    let gateway_up_cpu = cpu_per_mb(cpu_time(gateway) - cpu);
    let (down_via, down_cpu_via) =
        download_via(alice, &format!("{d}/via.bin"), procs, &spent).await;
    let gateway_down_cpu = down_cpu_via[3];

    let t = Instant::now();
    let wrap = |i| pb::WriteFileInput {
        uid: uid.to_string(),
        input: Some(gpb::WriteFileInput { input: Some(i) }),
    };
    let mut msgs = vec![wrap(gpb::write_file_input::Input::Start(
        gpb::WriteFileStart {
            path: format!("{d}/direct.bin"),
            size: SIZE as u64,
            ..Default::default()
        },
    ))];
    msgs.extend(
        data.chunks(1 << 20)
            .map(|c| wrap(gpb::write_file_input::Input::Data(c.to_vec()))),
    );
    agent.write_file(futures::stream::iter(msgs)).await.unwrap();
    let up_direct = mbps(t.elapsed());
    let cpu = procs.cpu();
    let t = Instant::now();
    let mut s = agent
        .read_file(pb::ReadFileRequest {
            uid: uid.to_string(),
            request: Some(gpb::ReadFileRequest {
                path: format!("{d}/direct.bin"),
                max_bytes: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(c) = s.message().await.unwrap() {
        n += c.data.len();
    }
    assert_eq!(n, SIZE);
    let down_direct = mbps(t.elapsed());
    Rates {
        up_via,
        up_direct,
        down_via,
        down_direct,
        gateway_up_cpu,
        gateway_down_cpu,
        down_cpu_via,
        down_cpu_direct: spent(cpu),
    }
}

/// Downloads `file` through the API server: MB/s, and each of `procs`'
/// CPU per MB as `spent` counts it from the CPU times given.
async fn download_via(
    alice: &kube::Client,
    file: &str,
    procs: &Procs,
    spent: &impl Fn([Duration; 4]) -> [f64; 4],
) -> (f64, [f64; 4]) {
    let cpu = procs.cpu();
    let t = Instant::now();
    let mut down = ws(alice, "files", &format!("path={file}")).await;
    assert_eq!(drain(&mut down).await, SIZE);
    let rate = SIZE as f64 / 1e6 / t.elapsed().as_secs_f64();
    (rate, spent(cpu))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

/// A row of the exec table: `via` against the aim of 1.5x `direct` + 5 ms.
fn exec_row(what: &str, via: Duration, direct: Duration) {
    let aim = ms(direct) * 1.5 + 5.0;
    println!(
        "| exec round trip {what} | {:.1} ms | {:.1} ms | {:.2}x | <= 1.5x + 5 ms ({aim:.1} ms): {} |",
        ms(via),
        ms(direct),
        ms(via) / ms(direct),
        verdict(ms(via) <= aim)
    );
}

/// A row of the transfer table: medians, and the median ratio of the rounds.
fn transfer_row(what: &str, via: f64, direct: f64, ratio: f64) {
    println!(
        "| {what} | {via:.0} MB/s | {direct:.0} MB/s | {:.0}% | >= 80%: {} |",
        ratio * 100.0,
        verdict(ratio >= 0.8)
    );
}

/// Exec figures: p50/p99 through and direct, when the upgrade was
/// answered and the status came, and the same from kube's stock client.
struct Execs {
    via: Vec<Duration>,
    direct: Vec<Duration>,
    upgraded: Vec<Duration>,
    status: Vec<Duration>,
    via_stock: Vec<Duration>,
}

async fn exec_figures(
    bed: &Bed,
    alice: &kube::Client,
    agent: &mut Agent,
    uid: &str,
    samples: usize,
) -> Execs {
    // Exec round trips, interleaved so both see the same load.
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    let (mut upgraded, mut status) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let [u, s, end] = exec_via_api(alice).await;
        via.push(end);
        upgraded.push(u);
        status.push(s);
        let t = Instant::now();
        let r = wrenn_e2e::agent::exec(agent, uid, &["true"], b"")
            .await
            .unwrap();
        direct.push(t.elapsed());
        assert_eq!(r.code, Some(0));
    }
    // The same through kube's default client (Nagle on).
    let stock = stock_client(&bed.alice_kubeconfig).await;
    let mut via_stock = Vec::new();
    for i in 0..samples + 10 {
        let [_, _, end] = exec_via_api(&stock).await;
        if i >= 10 {
            via_stock.push(end);
        }
    }
    for v in [
        &mut via,
        &mut direct,
        &mut upgraded,
        &mut status,
        &mut via_stock,
    ] {
        v.sort();
    }
    Execs {
        via,
        direct,
        upgraded,
        status,
        via_stock,
    }
}

/// Exec calls per second one gateway answers, 16 in flight for 10 s.
async fn exec_rate(alice: &kube::Client) -> f64 {
    let until = Instant::now() + Duration::from_secs(10);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = alice.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                exec_via_api(&c).await;
                n += 1;
            }
            n
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    calls as f64 / t.elapsed().as_secs_f64()
}

type Agent = wrenn_proto::agent::v1::node_agent_client::NodeAgentClient<tonic::transport::Channel>;

/// Throughput, 64 MiB each way, in `rounds` of both paths: one transfer
/// is half a second, so a burst of load on this shared machine can halve
/// either column; the median of several rounds is what holds.
async fn transfer_figures(
    procs: &Procs,
    alice: &kube::Client,
    agent: &mut Agent,
    uid: &str,
    rounds: usize,
) -> Vec<Rates> {
    let dir = tempfile::Builder::new()
        .prefix("wrenn-bench-")
        .tempdir()
        .unwrap();
    let d = dir.path().display().to_string();
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    if let Some(secs) = env_number("WRENN_BENCH_PROFILE_SECS") {
        profile_downloads(procs, alice, agent, uid, &d, &data, secs).await;
    }
    let mut runs = Vec::new();
    for _ in 0..rounds {
        runs.push(transfer_round(procs, alice, agent, uid, &d, &data).await);
    }
    runs
}

/// Downloads through the gateway for `secs` seconds, its pid printed
/// first, for a profiler to attach to.
async fn profile_downloads(
    procs: &Procs,
    alice: &kube::Client,
    agent: &mut Agent,
    uid: &str,
    d: &str,
    data: &[u8],
    secs: usize,
) {
    transfer_round(procs, alice, agent, uid, d, data).await;
    println!(
        "profile: downloading through wrenn-gateway pid {} for {secs} s",
        procs.0[3].1
    );
    let until = Instant::now() + Duration::from_secs(secs as u64);
    let spent = |_: [Duration; 4]| [0.0; 4];
    let (cpu, mut n) = (procs.cpu(), 0);
    while Instant::now() < until {
        download_via(alice, &format!("{d}/via.bin"), procs, &spent).await;
        n += 1;
    }
    let mb = (n * SIZE) as f64 / 1e6;
    let now = procs.cpu();
    let per_mb: Vec<String> = (0..4)
        .map(|i| {
            let ms = (now[i] - cpu[i]).as_secs_f64() * 1e3 / mb;
            format!("{} {ms:.3} ms", procs.0[i].0)
        })
        .collect();
    println!(
        "profile: done, {mb:.0} MB; CPU per MB: {}",
        per_mb.join(", ")
    );
}

fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    run().await;
}

async fn run() {
    let samples = env_number("WRENN_BENCH_EXECS").unwrap_or(200);
    let rounds = env_number("WRENN_BENCH_TRANSFER_ROUNDS").unwrap_or(5);
    let only_transfers = std::env::var("WRENN_BENCH_ONLY").is_ok_and(|v| v == "transfers");
    let bed = match Bed::start().await {
        Ok(b) => b,
        Err(why) => {
            eprintln!("gateway bench: SKIPPED: {why}");
            return;
        }
    };
    let alice = wrenn_e2e::client_from(&bed.alice_kubeconfig).await.unwrap();
    let mut agent = bed.agent_client().await;
    let uid = bed.box_uid().to_string();
    let pid = bed.gateway_pid().unwrap();

    // Warm both paths (connections, SAR cache).
    for _ in 0..10 {
        exec_via_api(&alice).await;
        wrenn_e2e::agent::exec(&mut agent, &uid, &["true"], b"")
            .await
            .unwrap();
    }
    let rss_idle = rss_kib(pid);
    let execs = if only_transfers {
        None
    } else {
        Some(exec_figures(&bed, &alice, &mut agent, &uid, samples).await)
    };
    let procs = Procs::find(pid);
    let runs = transfer_figures(&procs, &alice, &mut agent, &uid, rounds).await;
    let rate = |pick: &dyn Fn(&Rates) -> f64| median(runs.iter().map(pick).collect());
    println!(
        "\ngateway figures ({samples} exec samples; 64 MiB transfers, median of {rounds} rounds; \
         gateway and guest agent built {})\n",
        if wrenn_e2e::build::release_binaries() {
            "release"
        } else {
            "debug"
        }
    );
    println!("| measure | through API server + gateway | direct agent gRPC | ratio | aim |");
    println!("|---|---|---|---|---|");
    if let Some(e) = &execs {
        exec_row("p50", pct(&e.via, 0.5), pct(&e.direct, 0.5));
        exec_row("p99", pct(&e.via, 0.99), pct(&e.direct, 0.99));
    }
    transfer_row(
        "upload",
        rate(&|r| r.up_via),
        rate(&|r| r.up_direct),
        rate(&|r| r.up_via / r.up_direct),
    );
    transfer_row(
        "download",
        rate(&|r| r.down_via),
        rate(&|r| r.down_direct),
        rate(&|r| r.down_via / r.down_direct),
    );
    println!("\n| CPU per MB downloaded (median) | through | direct |\n|---|---|---|");
    let (mut via, mut direct) = (0.0, 0.0);
    for (i, (name, _)) in procs.0.iter().enumerate() {
        let (v, d) = (
            rate(&|r| r.down_cpu_via[i]),
            rate(&|r| r.down_cpu_direct[i]),
        );
        println!("| {name} | {v:.2} ms | {d:.2} ms |");
        (via, direct) = (via + v, direct + d);
    }
    println!("| total | {via:.2} ms | {direct:.2} ms |");
    let Some(e) = execs else {
        return;
    };
    println!(
        "\nexec through the API server, p50 since the start: upgrade answered {:.1} ms, \
         exit status received {:.1} ms, connection closed {:.1} ms",
        ms(pct(&e.upgraded, 0.5)),
        ms(pct(&e.status, 0.5)),
        ms(pct(&e.via, 0.5))
    );
    println!(
        "exec through the API server from kube's default client (Nagle on): p50 {:.1} ms, p99 {:.1} ms",
        ms(pct(&e.via_stock, 0.5)),
        ms(pct(&e.via_stock, 0.99))
    );
    // 100 open streams.
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(ws(&alice, "console", "follow=true").await);
    }
    let rss_100 = rss_kib(pid);
    drop(open);
    let per_s = exec_rate(&alice).await;
    println!("\n| gateway | value |\n|---|---|");
    println!("| RSS idle | {:.1} MiB |", rss_idle as f64 / 1024.0);
    println!(
        "| RSS with 100 open streams | {:.1} MiB |",
        rss_100 as f64 / 1024.0
    );
    println!(
        "| CPU per MB through it (median): upload / download | {:.2} / {:.2} ms |",
        rate(&|r| r.gateway_up_cpu),
        rate(&|r| r.gateway_down_cpu)
    );
    println!("| exec calls/s (16 in flight, 10 s) | {per_s:.0} |");
}
