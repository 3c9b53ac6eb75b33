//! Tier 3 (vm): the data plane for people through a real guest. The
//! Go-built kube-apiserver with its front-proxy flags, the real
//! `wrenn-gateway` behind an `APIService`, the real operator and a real
//! node agent booting the guest image under QEMU (KVM where the machine
//! has it, TCG otherwise); every step is the real `kubectl-wrenn` binary
//! run as alice, a static-token user bound to the chart's aggregated edit
//! role and nothing else.
//!
//! One capsule serves the whole file (a TCG boot costs a minute on a busy
//! machine), driven as a user would, top to bottom: exec exit codes and
//! separate outputs; a stdin pipeline; `exec -it` on a real pseudo-terminal
//! (resize, Ctrl-C); `cp` of 50 MiB both ways and a directory round trip;
//! `console`; port-forward and `capsules/proxy` to busybox httpd in the
//! guest (on all addresses and on 127.0.0.1; an undeclared port refused)
//! and a WebSocket echo (busybox `nc` and a shell script) through the proxy;
//! a name outside a live-changed `allowHosts` refused in the guest and
//! shown as a Warning Event;
//! a detached process surviving a client disconnect and a suspend/resume;
//! last, an open exec holding off `lifecycle.idleTimeout`, which then
//! deletes the capsule once the exec ends.
//!
//! Why this file is long: one booted guest serves every step of the
//! issue's vm-tier list, and splitting it would boot one guest per file.
#![allow(clippy::unwrap_used)]

mod gateway_bed;
mod plugin;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use gateway_bed::{RELEASE_NS, bind, call, install_chart_rbac, json_of, kubeconfig_in, sha256_hex};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use plugin::{Ran, finish, read_until, run, start};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use wrenn_crds::Capsule;
use wrenn_crds::capsule::CapsulePhase;
use wrenn_e2e::agent::{AgentOptions, GuestImage, NodeAgent, Pki};
use wrenn_e2e::helm::Helm;
use wrenn_e2e::local::{
    LocalGateway, OperatorOptions, OperatorProcess, apply, apply_once_admitted, register_agent,
    template_manifest,
};
use wrenn_e2e::{ControlPlane, Options, StaticToken};
use wrenn_testkit::vm::Turn;
use wrenn_testkit::{Tier, case, need_program, need_root};

const CAP: &str = "box";
const MANAGER: &str = "e2e";
/// The declared ports: httpd on every address, httpd on 127.0.0.1 only.
const WEB: u16 = 8080;
const LOOPBACK_WEB: u16 = 8081;
/// The WebSocket echo's declared port.
const WS_ECHO: u16 = 8082;
/// A WebSocket echo for busybox `nc -ll -e`: the guest image has no
/// WebSocket server of its own.
const WS_ECHO_SH: &str = include_str!("fixtures/ws-echo.sh");
/// A port the capsule does not declare.
const UNDECLARED: u16 = 9999;
const BIG: usize = 50 << 20;

/// Everything running. Fields drop in order: the gateway and the operator
/// before the agent, the control plane last.
struct Bed {
    gateway: LocalGateway,
    operator: OperatorProcess,
    agent: NodeAgent,
    admin: kube::Client,
    alice: kube::Client,
    /// alice's kubeconfig; its context names [`Bed::ns`].
    kubeconfig: PathBuf,
    plugin: PathBuf,
    ns: String,
    /// The guest kernel's release (`uname -r` there).
    release: String,
    dir: tempfile::TempDir,
    _cp: ControlPlane,
}

impl Bed {
    /// `kubectl wrenn ARGS` as alice, stdin closed at once.
    async fn wrenn(&self, args: &[&str]) -> Ran {
        run(&self.plugin, &self.kubeconfig, args).await
    }

    /// [`Bed::wrenn`] that must exit 0; answers its stdout.
    async fn wrenn_ok(&self, args: &[&str]) -> String {
        let ran = self.wrenn(args).await;
        assert_eq!(ran.code, Some(0), "kubectl wrenn {args:?}: {ran:?}");
        ran.stdout
    }

    /// A shell script in the capsule through `kubectl wrenn exec`.
    async fn sh(&self, script: &str) -> String {
        self.wrenn_ok(&["exec", CAP, "--", "sh", "-c", script])
            .await
    }

    fn caps(&self) -> Api<Capsule> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    fn logs(&self) -> String {
        format!(
            "--- operator ---\n{}\n--- agent ---\n{}\n--- gateway ---\n{}",
            self.operator.log_tail(),
            self.agent.log_tail(),
            self.gateway.process.log_tail()
        )
    }

    async fn phase(&self) -> Option<CapsulePhase> {
        self.caps()
            .get_opt(CAP)
            .await
            .unwrap()
            .and_then(|c| c.status.and_then(|s| s.phase))
    }

    async fn wait_phase(&self, phase: CapsulePhase, within: Duration) {
        let t0 = Instant::now();
        loop {
            let now = self.phase().await;
            if now == Some(phase) {
                eprintln!("{CAP}: {phase:?} after {:.1} s", t0.elapsed().as_secs_f64());
                return;
            }
            assert!(
                t0.elapsed() < within,
                "{CAP} not {phase:?} in {within:?} (is {now:?})\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// What this file needs, or why it skips; the guest image.
async fn prerequisites() -> Result<(GuestImage, Helm), String> {
    need_root()
        .and_then(|_| need_program("qemu-system-x86_64"))
        .and_then(|_| need_program("vhost-device-vsock"))
        .and_then(|_| need_program("openssl"))
        .and_then(|_| need_program("ip"))
        .and_then(|_| need_program("setsid"))?;
    let helm = Helm::find().map_err(|e| format!("no helm: {e:#}"))?;
    let image = tokio::task::spawn_blocking(GuestImage::build)
        .await
        .unwrap()
        .map_err(|e| format!("no guest image: {e:#}"))?;
    Ok((image, helm))
}

/// Starts everything and boots [`CAP`], Running, with [`WEB`] and
/// [`LOOPBACK_WEB`] declared.
async fn setup(image: &GuestImage, helm: &Helm, ready: Duration) -> Result<Bed, String> {
    let pid = std::process::id();
    let alice = StaticToken {
        token: format!("alice-{pid}"),
        user: "alice".into(),
        groups: vec!["devs".into()],
    };
    let opts = Options {
        front_proxy: true,
        tokens: vec![alice.clone()],
    };
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start_own(&opts))
        .await
        .unwrap()
        .map_err(|e| format!("control plane did not start: {e:#}"))?;
    let plugin = tokio::task::spawn_blocking(plugin::plugin).await.unwrap();
    let admin = cp.client().await.unwrap();
    install_chart_rbac(&cp, helm, &admin).await;
    let ns = wrenn_e2e::node_images_namespace(&admin, "gwvm")
        .await
        .unwrap();
    bind(&admin, &ns, "alice", "wrenn-edit").await;
    let kubeconfig = kubeconfig_in(&cp, "alice", &alice.token, Some(&ns));
    let alice = wrenn_e2e::client_from(&kubeconfig).await.unwrap();

    let dir = tempfile::Builder::new()
        .prefix("wrenn-gwvm-")
        .tempdir()
        .unwrap();
    // Subnets apart from operator_vm's (1..=241) and the local run's (250).
    let index = 242 + (pid % 7) as u8;
    let node_ip = Ipv4Addr::new(10, 251, index, 2);
    let pki = Pki::create(&dir.path().join("pki"), node_ip).unwrap();
    let agent = {
        let opts = AgentOptions {
            node_name: wrenn_testkit::unique_name("gv"),
            index,
            image: image.clone(),
            pki: Some(pki.clone()),
            guest_ready: Some(ready),
        };
        tokio::task::spawn_blocking(move || NodeAgent::start(&opts))
            .await
            .unwrap()
            .unwrap()
    };
    register_agent(&admin, RELEASE_NS, &agent).await.unwrap();
    let operator = {
        let opts = OperatorOptions {
            kubeconfig: cp.kubeconfig.clone(),
            agent_namespace: RELEASE_NS.into(),
            watch_namespace: Some(ns.clone()),
            pki: pki.clone(),
            log: dir.path().join("operator.log"),
            node_lost_timeout_secs: 60,
        };
        tokio::task::spawn_blocking(move || OperatorProcess::start(&opts))
            .await
            .unwrap()
            .unwrap()
    };
    let gateway = LocalGateway::start(
        &admin,
        &cp.kubeconfig,
        &pki,
        RELEASE_NS,
        (
            &format!("wgv{}", pid % 100_000),
            Ipv4Addr::new(10, 252, (pid % 200) as u8 + 20, 3),
        ),
        &dir.path().join("gateway.log"),
    )
    .await
    .unwrap();

    apply_once_admitted(
        &admin,
        &ns,
        &template_manifest("base", GuestImage::ROOTFS),
        MANAGER,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    apply(
        &admin,
        &ns,
        &json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": CAP },
            "spec": {
                "source": { "templateRef": { "name": "base" } },
                "network": { "ports": [
                    { "port": WEB }, { "port": LOOPBACK_WEB }, { "port": WS_ECHO },
                ] },
            },
        }),
        MANAGER,
    )
    .await
    .unwrap();
    let bed = Bed {
        gateway,
        operator,
        agent,
        admin,
        alice,
        kubeconfig,
        plugin,
        ns,
        release: image.kernel_release.clone(),
        dir,
        _cp: cp,
    };
    let boot = Instant::now();
    bed.wait_phase(
        CapsulePhase::Running,
        (ready * 2).max(Duration::from_secs(300)),
    )
    .await;
    eprintln!(
        "figure: {CAP} Running {:.1} s after apply",
        boot.elapsed().as_secs_f64()
    );
    Ok(bed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_wrenn_reaches_into_a_real_guest() {
    let c = case(
        Tier::Vm,
        "gateway_vm::kubectl_wrenn_reaches_into_a_real_guest",
    );
    let (image, helm) = match prerequisites().await {
        Ok(p) => p,
        Err(why) => return c.skip(why),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let who = format!("gateway_vm (pid {})", std::process::id());
    let turn: Turn = tokio::task::spawn_blocking(move || wrenn_testkit::vm::turn(&who))
        .await
        .unwrap()
        .unwrap();
    let t0 = Instant::now();
    let bed = match setup(&image, &helm, turn.ready).await {
        Ok(b) => b,
        Err(why) => return c.skip(why),
    };
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());

    step("exec: exit code, stdout and stderr apart");
    exit_code_and_outputs(&bed).await;
    step("figure: exec round trips, through the API server and direct");
    exec_round_trips(&bed).await;
    step("exec -i: a stdin pipeline, its end reaching the process");
    stdin_pipeline(&bed).await;
    step("console: the boot log");
    let console = bed.wrenn_ok(&["console", CAP]).await;
    assert!(
        console.contains(wrenn_testkit::guest_vm::READY_LINE),
        "no boot log on the console:\n{console}"
    );
    step("exec -it on a real terminal: resize, Ctrl-C");
    terminal_session(&bed).await;
    step("cp: 50 MiB up and down");
    big_files(&bed).await;
    step("cp: a directory round trip");
    directory_round_trip(&bed).await;
    step("port-forward and proxy");
    ports(&bed).await;
    step("a name outside allowHosts: NXDOMAIN in the guest, a Warning Event on the capsule");
    refused_name_event(&bed).await;
    step("a detached process through a disconnect and a suspend/resume");
    detached_process(&bed).await;
    step("an open exec holds off idleTimeout");
    open_exec_is_activity(&bed).await;
    step("done");
    drop(bed);
    drop(turn);
}

async fn exit_code_and_outputs(bed: &Bed) {
    let ran = bed
        .wrenn(&[
            "exec",
            CAP,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        ])
        .await;
    assert_eq!(ran.code, Some(7), "{ran:?}");
    assert_eq!(ran.stdout, "to-out\n", "{ran:?}");
    assert_eq!(ran.stderr, "to-err\n", "{ran:?}");
    let uname = bed.wrenn_ok(&["exec", CAP, "--", "uname", "-r"]).await;
    assert_eq!(uname.trim(), bed.release, "not the guest's kernel");
    let ran = bed.wrenn(&["exec", CAP, "--", "/no/such/program"]).await;
    assert_ne!(ran.code, Some(0), "{ran:?}");
}

/// Figures, not assertions: `true` in the guest through API server →
/// gateway → agent → guest beside the agent's own Exec (the call the
/// gateway makes), interleaved so both see the same load.
async fn exec_round_trips(bed: &Bed) {
    const SAMPLES: usize = 20;
    let uid = kube::ResourceExt::uid(&bed.caps().get(CAP).await.unwrap()).unwrap();
    let mut agent = bed.agent.connect().await.unwrap();
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let r = gateway_bed::exec(&bed.alice, &bed.ns, CAP, &["true"], None)
            .await
            .unwrap();
        via.push(t.elapsed());
        assert_eq!(r.status["status"], "Success", "{r:?}");
        let t = Instant::now();
        let r = wrenn_e2e::agent::exec(&mut agent, &uid, &["true"], b"")
            .await
            .unwrap();
        direct.push(t.elapsed());
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    via.sort();
    direct.sort();
    let ms = |d: &[Duration], q: f64| {
        d[((d.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
    };
    eprintln!(
        "figure: exec `true` in a QEMU guest ({SAMPLES} each): through the API server p50 {:.1} ms \
         p99 {:.1} ms; direct agent gRPC p50 {:.1} ms p99 {:.1} ms; ratio p50 {:.2}x",
        ms(&via, 0.5),
        ms(&via, 0.99),
        ms(&direct, 0.5),
        ms(&direct, 0.99),
        ms(&via, 0.5) / ms(&direct, 0.5)
    );
}

async fn stdin_pipeline(bed: &Bed) {
    let input = b"through a pipe to wc\n".repeat(1000);
    let child = start(
        &bed.plugin,
        &bed.kubeconfig,
        &["exec", "-i", CAP, "--", "wc", "-c"],
    );
    let ran = finish(child, &input).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // wc ends only once its stdin ends: the pipe's end reached it.
    assert_eq!(ran.stdout.trim(), input.len().to_string(), "{ran:?}");
    let child = start(
        &bed.plugin,
        &bed.kubeconfig,
        &["exec", "-i", CAP, "--", "sh", "-c", "cat; echo; echo eof"],
    );
    let ran = finish(child, b"").await;
    assert_eq!(ran.stdout, "\neof\n", "{ran:?}");
}

/// A pseudo-terminal: the controller the test drives and the terminal
/// `kubectl wrenn` gets as its stdin, stdout, stderr and controlling
/// terminal (`setsid -c`), so resizing it sends the plugin SIGWINCH.
struct Terminal {
    controller: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    child: std::process::Child,
}

impl Terminal {
    fn open(bed: &Bed, args: &[&str]) -> Terminal {
        let pty = nix::pty::openpty(None, None).unwrap();
        let controller = std::fs::File::from(pty.master);
        let tty = std::fs::File::from(pty.slave);
        set_size(&controller, 24, 80);
        let child = std::process::Command::new("setsid")
            .args(["--ctty", "--wait"])
            .arg(&bed.plugin)
            .arg("--kubeconfig")
            .arg(&bed.kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(tty.try_clone().unwrap())
            .stdout(tty.try_clone().unwrap())
            .stderr(tty)
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = controller.try_clone().unwrap();
        let sink = seen.clone();
        // Ends with EIO once every holder of the terminal is gone.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            controller,
            seen,
            child,
        }
    }

    fn type_in(&mut self, keys: &[u8]) {
        self.controller.write_all(keys).unwrap();
    }

    /// Waits until the output holds `want`; answers everything so far.
    async fn expect(&self, want: &str, within: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let text = String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned();
            if text.contains(want) {
                return text;
            }
            assert!(
                t0.elapsed() < within,
                "no {want:?} on the terminal in {within:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `line` in the remote shell, followed by an echo of a marker
    /// computed there (so the echoed keys never match it); answers the
    /// output between the command and the marker.
    async fn run(&mut self, line: &str, n: u32) -> String {
        let from = self.seen.lock().unwrap().len();
        let marker = format!("M{}Z", n * 7);
        self.type_in(format!("{line}; echo M$(({n}*7))Z\r").as_bytes());
        self.expect(&marker, Duration::from_secs(60)).await;
        let all = String::from_utf8_lossy(&self.seen.lock().unwrap()[from..]).into_owned();
        let end = all.find(&marker).unwrap();
        all[..end].to_string()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // A failed step leaves no plugin behind (a reaped one ignores it).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_size(controller: &std::fs::File, rows: u16, cols: u16) {
    rustix::termios::tcsetwinsize(
        controller,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
}

async fn terminal_session(bed: &Bed) {
    let mut t = Terminal::open(bed, &["exec", "-it", CAP, "--", "sh"]);
    let size = t.run("stty size", 1).await;
    assert!(size.contains("24 80"), "initial size: {size:?}");
    // The resize reaches the plugin as SIGWINCH; its resize message races
    // the next keys, so ask until the guest's terminal follows.
    set_size(&t.controller, 50, 132);
    let t0 = Instant::now();
    let mut n = 2;
    loop {
        let size = t.run("stty size", n).await;
        if size.contains("50 132") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the guest's terminal did not follow the resize: {size:?}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Ctrl-C interrupts the foreground command, not the session.
    t.type_in(b"echo sleep$((1+1)); sleep 1000\r");
    t.expect("sleep2\r\n", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let interrupted = Instant::now();
    t.type_in(&[0x03]);
    let rc = t.run("echo rc=$?", 100).await;
    assert!(rc.contains("rc=130"), "sleep not ended by ^C: {rc:?}");
    assert!(interrupted.elapsed() < Duration::from_secs(30));
    t.type_in(b"exit 3\r");
    let status = tokio::task::spawn_blocking(move || t.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3), "the shell's exit code");
}

/// `len` bytes of a fixed pseudo-random sequence.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn big_files(bed: &Bed) {
    let up = bed.dir.path().join("up.bin");
    let data = pseudo_random(BIG);
    let want = sha256_hex(&data);
    std::fs::write(&up, &data).unwrap();
    drop(data);
    let t = Instant::now();
    bed.wrenn_ok(&["cp", up.to_str().unwrap(), &format!("{CAP}:/root/up.bin")])
        .await;
    let took = t.elapsed();
    let sum = bed.sh("sha256sum /root/up.bin").await;
    assert_eq!(sum.split_whitespace().next(), Some(want.as_str()), "{sum}");
    eprintln!(
        "figure: cp of 50 MiB up through the API server into a QEMU guest: {:.1} s ({:.1} MB/s)",
        took.as_secs_f64(),
        BIG as f64 / 1e6 / took.as_secs_f64()
    );

    let sum = bed
        .sh("head -c 52428800 /dev/urandom > /root/down.bin && sha256sum /root/down.bin")
        .await;
    let guest_sum = sum.split_whitespace().next().unwrap().to_string();
    let down = bed.dir.path().join("down.bin");
    let t = Instant::now();
    bed.wrenn_ok(&[
        "cp",
        &format!("{CAP}:/root/down.bin"),
        down.to_str().unwrap(),
    ])
    .await;
    let took = t.elapsed();
    let got = std::fs::read(&down).unwrap();
    assert_eq!(got.len(), BIG);
    assert_eq!(sha256_hex(&got), guest_sum);
    eprintln!(
        "figure: cp of 50 MiB down: {:.1} s ({:.1} MB/s)",
        took.as_secs_f64(),
        BIG as f64 / 1e6 / took.as_secs_f64()
    );
    bed.sh("rm /root/up.bin /root/down.bin").await;
}

/// Every entry under `root`: relative path → (mode bits, content or link
/// target; directories empty).
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let to = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, to.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.insert(rel, (mode, Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

async fn directory_round_trip(bed: &Bed) {
    let src = bed.dir.path().join("tree");
    let file = |rel: &str, body: &[u8], mode: u32| {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    file("a/b/c.txt", b"deep\n", 0o644);
    file("run.sh", b"#!/bin/sh\necho ran\n", 0o755);
    file("secret", b"only me\n", 0o600);
    file("a/big.bin", &pseudo_random(300_000), 0o640);
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::set_permissions(src.join("a"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a/b/c.txt", src.join("link")).unwrap();

    bed.wrenn_ok(&["cp", src.to_str().unwrap(), &format!("{CAP}:/root/tree")])
        .await;
    let listing = bed
        .sh("cd /root/tree && stat -c '%a %n' run.sh secret a a/big.bin && ./run.sh && cat link")
        .await;
    assert_eq!(
        listing,
        "755 run.sh\n600 secret\n750 a\n640 a/big.bin\nran\ndeep\n"
    );
    let back = bed.dir.path().join("back");
    bed.wrenn_ok(&["cp", &format!("{CAP}:/root/tree"), back.to_str().unwrap()])
        .await;
    let (want, got) = (tree(&src), tree(&back));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (path, (mode, body)) in &want {
        let (gmode, gbody) = &got[path];
        assert_eq!((mode, body.len()), (gmode, gbody.len()), "{path}");
        assert!(body == gbody, "{path}: content changed");
    }
    bed.sh("rm -r /root/tree").await;
}

fn proxy_path(ns: &str, port: u16, rest: &str) -> String {
    format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{ns}/capsules/{CAP}/proxy/{port}{rest}"
    )
}

/// An HTTP/1.0 GET of `path` from 127.0.0.1:`port`; the whole answer.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer in 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn ports(bed: &Bed) {
    bed.sh(
        "mkdir -p /root/www /root/lo && echo served from the guest > /root/www/index.html \
         && echo only on loopback > /root/lo/index.html",
    )
    .await;
    bed.wrenn_ok(&[
        "exec",
        "-d",
        "--tag",
        "web",
        CAP,
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/root/www",
    ])
    .await;
    bed.wrenn_ok(&[
        "exec",
        "-d",
        "--tag",
        "lo",
        CAP,
        "--",
        "httpd",
        "-f",
        "-p",
        "127.0.0.1:8081",
        "-h",
        "/root/lo",
    ])
    .await;
    let ps = bed.wrenn_ok(&["ps", CAP]).await;
    assert!(ps.contains("web") && ps.contains("lo"), "{ps}");

    let (mut pf, local) =
        plugin::port_forward(&bed.plugin, &bed.kubeconfig, CAP, &[WEB, LOOPBACK_WEB]).await;
    // httpd may still be starting: ask until it answers.
    for (port, body) in [
        (WEB, "served from the guest"),
        (LOOPBACK_WEB, "only on loopback"),
    ] {
        let t0 = Instant::now();
        loop {
            match http_get(local[&port], "/index.html").await {
                Ok(a) if a.starts_with("HTTP/1.") && a.contains(body) => break,
                other => assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "port {port} through port-forward: {other:?}\n{}",
                    bed.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Several at once on one forward.
    let many = (0..8).map(|_| http_get(local[&WEB], "/index.html"));
    for a in futures::future::join_all(many).await {
        assert!(a.unwrap().contains("served from the guest"));
    }
    pf.kill().await.unwrap();

    // capsules/proxy through the API server, as alice.
    let (code, body) = call(
        &bed.alice,
        http::Method::GET,
        proxy_path(&bed.ns, WEB, "/index.html"),
        Vec::new(),
    )
    .await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{text}");
    assert_eq!(text, "served from the guest\n");
    // An undeclared port: 403 with the reason, by the proxy and by
    // port-forward alike.
    let (code, body) = call(
        &bed.alice,
        http::Method::GET,
        proxy_path(&bed.ns, UNDECLARED, "/"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    let msg = json_of(&body)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("not declared"), "{msg}");
    let req = http::Request::get(wrenn_gateway::portforward::build_request_path(
        &bed.ns,
        CAP,
        &[UNDECLARED],
    ))
    .body(Vec::new())
    .unwrap();
    match bed.alice.connect(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(s.message.contains("not declared"), "{s:?}");
        }
        Ok(_) => panic!("port-forward to an undeclared port was upgraded"),
        Err(e) => panic!("port-forward to an undeclared port: {e}"),
    }
    websocket_echo(bed).await;
    bed.wrenn_ok(&["kill", CAP, "web"]).await;
    bed.wrenn_ok(&["kill", CAP, "lo"]).await;
}

/// A WebSocket through `capsules/proxy` to a server in the guest: upgraded
/// by the API server, the gateway and the guest alike, messages echoed.
async fn websocket_echo(bed: &Bed) {
    bed.sh(&format!(
        "cat > /root/ws-echo.sh <<'EOF'\n{WS_ECHO_SH}EOF\nchmod +x /root/ws-echo.sh"
    ))
    .await;
    let port = WS_ECHO.to_string();
    bed.wrenn_ok(&[
        "exec",
        "-d",
        "--tag",
        "ws",
        CAP,
        "--",
        "nc",
        "-ll",
        "-p",
        &port,
        "-e",
        "/root/ws-echo.sh",
    ])
    .await;
    let t0 = Instant::now();
    let mut ws = loop {
        let req = http::Request::get(proxy_path(&bed.ns, WS_ECHO, "/echo"))
            .body(Vec::new())
            .unwrap();
        match bed.alice.connect(req).await {
            Ok(conn) => break conn.into_stream(),
            // nc may still be starting: 502 until it listens.
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(60),
                "WebSocket through the proxy: {e}\n{}",
                bed.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for i in 0..3 {
        let text = format!("ping {i} from alice to the guest");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no echo in 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    let _ = ws.close(None).await;
    bed.wrenn_ok(&["kill", CAP, "ws"]).await;
}

/// Egress closed to all but `example.org` on the running capsule; the
/// guest's lookup of another name fails at once, and the capsule's Events
/// say why. The policy is opened again after.
async fn refused_name_event(bed: &Bed) {
    let network = |v: serde_json::Value| {
        let caps = bed.caps();
        async move {
            let c = caps
                .patch(
                    CAP,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "network": v } })),
                )
                .await
                .unwrap();
            let want = c.metadata.generation;
            let t0 = Instant::now();
            while caps
                .get(CAP)
                .await
                .unwrap()
                .status
                .and_then(|s| s.observed_generation)
                < want
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "network change not applied"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    network(json!({ "egress": "Deny", "allowHosts": ["example.org"] })).await;
    let t0 = Instant::now();
    let out = bed.sh("nslookup evil.example 2>&1; true").await;
    assert!(out.contains("NXDOMAIN"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(bed.admin.clone(), &bed.ns);
    let t0 = Instant::now();
    let note = loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("NameNotAllowed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(CAP)
            });
        if let Some(e) = found {
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            break e.note.unwrap_or_default();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no NameNotAllowed Event in 30 s\n{}",
            bed.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        note.contains("\"evil.example\"") && note.contains("allowHosts"),
        "{note}"
    );
    println!("figure: lookup to NameNotAllowed Event {:?}", t0.elapsed());
    network(json!({ "egress": "Allow", "allowHosts": null })).await;
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .max()
}

async fn detached_process(bed: &Bed) {
    let script = "echo start; i=0; while [ ! -e /root/stop ]; do echo tick $i; \
                  i=$((i+1)); sleep 1; done; echo done; exit 5";
    bed.wrenn_ok(&[
        "exec", "-d", "--tag", "ticker", CAP, "--", "sh", "-c", script,
    ])
    .await;
    // A client attached, then gone without a word (SIGKILL).
    let mut attached = start(&bed.plugin, &bed.kubeconfig, &["attach", CAP, "ticker"]);
    let seen = read_until(&mut attached, "tick 2").await;
    assert!(seen.starts_with("start\n"), "{seen:?}");
    attached.kill().await.unwrap();
    drop(attached);
    let ps = bed.wrenn_ok(&["ps", CAP]).await;
    let row = ps
        .lines()
        .find(|l| l.contains("ticker"))
        .unwrap_or_default();
    assert!(row.to_lowercase().contains("running"), "{ps}");
    let before = last_tick(&bed.wrenn_ok(&["logs", CAP, "ticker"]).await).unwrap();

    let t = Instant::now();
    bed.wrenn_ok(&["suspend", CAP]).await;
    eprintln!(
        "figure: kubectl wrenn suspend {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    bed.wrenn_ok(&["resume", CAP]).await;
    eprintln!(
        "figure: kubectl wrenn resume {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // It ran on after the restore: ticks past the suspend, the output from
    // before kept.
    let t0 = Instant::now();
    let logs = loop {
        let ran = bed.wrenn(&["logs", CAP, "ticker"]).await;
        if ran.code == Some(0) && last_tick(&ran.stdout).is_some_and(|n| n > before + 2) {
            break ran.stdout;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no ticks after the resume (before: {before}): {ran:?}\n{}",
            bed.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(logs.starts_with("start\ntick 0\n"), "{logs}");
    bed.sh("touch /root/stop").await;
    let ran = bed.wrenn(&["attach", CAP, "ticker"]).await;
    assert_eq!(ran.code, Some(5), "attach passes the exit code: {ran:?}");
    assert!(
        ran.stdout.starts_with("start\ntick 0\n") && ran.stdout.ends_with("done\n"),
        "{ran:?}"
    );
}

async fn open_exec_is_activity(bed: &Bed) {
    bed.caps()
        .patch(
            CAP,
            &PatchParams::apply(MANAGER),
            &Patch::Merge(json!({ "spec": { "lifecycle": { "idleTimeout": "30s" } } })),
        )
        .await
        .unwrap();
    let opened = Instant::now();
    let exec = start(
        &bed.plugin,
        &bed.kubeconfig,
        &["exec", CAP, "--", "sleep", "75"],
    );
    while opened.elapsed() < Duration::from_secs(70) {
        let phase = bed.phase().await;
        assert_eq!(
            phase,
            Some(CapsulePhase::Running),
            "{:.0} s into an open exec under idleTimeout 30s\n{}",
            opened.elapsed().as_secs_f64(),
            bed.logs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let ran = finish(exec, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // Idle from here on: expiry (onExpiry: Delete) takes the capsule.
    let closed = Instant::now();
    while bed.caps().get_opt(CAP).await.unwrap().is_some() {
        assert!(
            closed.elapsed() < Duration::from_secs(180),
            "{CAP} still there {:.0} s after its last exec ended (idleTimeout 30s)\n{}",
            closed.elapsed().as_secs_f64(),
            bed.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "figure: deleted as idle {:.0} s after the exec ended (idleTimeout 30s)",
        closed.elapsed().as_secs_f64()
    );
    let _ = bed.caps().delete(CAP, &DeleteParams::default()).await;
}
