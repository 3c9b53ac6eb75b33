//! The node agent's guest link (`wrenn_node_agent::guest`) against the real
//! `wrenn-guest` binary run as a host process on a Unix socket, behind a
//! shim that speaks the VMM's hybrid-vsock handshake (tier 1). The shim can
//! drop every connection, as a VMM does on restore.

#![allow(clippy::unwrap_used)]

mod guest_exec;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrenn_node_agent::guest::{self, GuestClient, InitParams, Timeouts};
use wrenn_proto::guest::v1 as gpb;
use wrenn_testkit::{Case, Tier, VsockShim, case};

/// `wrenn-guest` next to this test's binary (`cargo test --workspace` or
/// `cargo build -p wrenn-guest` puts it there), or `WRENN_GUEST_BIN`.
/// Host case `name` and the guest agent binary, or the case recorded as
/// skipped when there is no binary.
fn guest_case(name: &str) -> Option<(Case, PathBuf)> {
    let c = case(Tier::Host, name);
    match guest_binary() {
        Ok(bin) => Some((c, bin)),
        Err(reason) => {
            c.skip(reason);
            None
        }
    }
}

fn guest_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("WRENN_GUEST_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("wrenn-guest"))
        .ok_or("no target dir")?;
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "needs the wrenn-guest binary at {} (cargo build -p wrenn-guest)",
            bin.display()
        ))
    }
}

struct Agent {
    dir: tempfile::TempDir,
    child: Child,
    vsock: PathBuf,
    /// Resettable: drops every live connection, as a VMM does on restore.
    _shim: VsockShim,
}

impl Agent {
    /// The shim listens at once; the agent starts `delay` later, so a
    /// caller that dials early meets refused handshakes first.
    fn start(bin: &Path, delay: Duration) -> Agent {
        Self::start_logging(bin, delay, None)
    }

    /// [`start`](Self::start), with the agent's debug log written to `log`.
    fn start_logging(bin: &Path, delay: Duration, log: Option<&Path>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vsock = dir.path().join("vm.vsock");
        let shim = VsockShim::start(&vsock, 1024, agent_sock.clone()).unwrap();
        std::thread::sleep(delay);
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg(format!("unix:{}", agent_sock.display()))
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.env("WRENN_LOG", "debug")
                .stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        Agent {
            dir,
            child,
            vsock,
            _shim: shim,
        }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        if sig == "-STOP" {
            // `kill` returns once the signal is queued; the agent's threads
            // stop when they next leave the kernel. A call made before that
            // could still be answered, so wait for the state the kernel
            // reports for a stopped process.
            let pid = self.child.id() as i32;
            wrenn_testkit::wait_until(Duration::from_secs(5), "the agent stopped", || {
                match wrenn_testkit::process_state(pid) {
                    Some('T') => Ok(()),
                    other => Err(format!("state {other:?}")),
                }
            })
            .unwrap();
        }
    }
}

impl Agent {
    /// `wait_ready` on this agent with the test timeouts, presenting
    /// `token` (empty before the first Init).
    async fn ready(&self, capsule: &str, token: &str) -> (GuestClient, gpb::HealthResponse) {
        let deadline = Duration::from_secs(10);
        GuestClient::wait_ready(capsule, &self.vsock, 1024, token, quick(), deadline)
            .await
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quick() -> Timeouts {
    Timeouts {
        dial: Duration::from_secs(2),
        call: Duration::from_secs(5),
        probe: Duration::from_millis(500),
        retry: Duration::from_millis(20),
    }
}

/// A host-process guest agent, started at once, reached and sent `Init`
/// with `token`.
async fn initialized(bin: &Path, capsule: &str, token: &str) -> (Agent, GuestClient) {
    let agent = Agent::start(bin, Duration::ZERO);
    let (mut g, _) = agent.ready(capsule, "").await;
    g.init(&params(token)).await.unwrap();
    (agent, g)
}

fn params(token: &str) -> InitParams {
    InitParams {
        env: [("WRENN_FROM_INIT".to_string(), "hello".to_string())].into(),
        hostname: String::new(),
        access_token: token.to_string(),
        // A host test must never step the host's clock.
        send_wall_time: false,
    }
}

async fn run(c: &GuestClient, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, gpb::ExecExit) {
    let start = gpb::ExecStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let ran = guest_exec::exec(c, start, stdin).await;
    (ran.stdout, ran.exit)
}

#[tokio::test]
async fn ready_init_exec_and_files_through_the_handshake() {
    let Some((_c, bin)) = guest_case("guest::ready_init_exec_and_files_through_the_handshake")
    else {
        return;
    };
    let agent = Agent::start(&bin, Duration::from_millis(300));
    // The agent is not up yet: wait_ready must retry through refused
    // handshakes rather than fail.
    let (mut g, health) = agent.ready("c1", "").await;
    assert!(!health.initialized);

    // Before Init the agent refuses work.
    let err = g.stat("/").await.unwrap_err();
    assert_eq!(
        err.status().unwrap().code(),
        tonic::Code::FailedPrecondition
    );

    g.init(&params("s3cret-guest-token")).await.unwrap();
    assert!(g.health().await.unwrap().initialized);

    // The token Init set is required from now on: a fresh client without it
    // is refused, the initialized one is not.
    let stranger = GuestClient::connect_with("c1", &agent.vsock, 1024, quick())
        .await
        .unwrap();
    let refused = stranger.stat("/").await.unwrap_err();
    assert_eq!(
        refused.status().unwrap().code(),
        tonic::Code::Unauthenticated
    );

    // Exec: env from Init, stdin in, exit code out.
    let (out, exit) = run(
        &g,
        &["sh", "-c", "echo $WRENN_FROM_INIT; tr a-z A-Z; exit 3"],
        b"piped",
    )
    .await;
    assert_eq!(String::from_utf8(out).unwrap(), "hello\nPIPED");
    assert_eq!(exit.code, Some(3));

    // Files: write, stat, read back, list.
    let path = agent.dir.path().join("f.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut input = vec![gpb::WriteFileInput {
        input: Some(gpb::write_file_input::Input::Start(gpb::WriteFileStart {
            path: path.display().to_string(),
            mode: 0o640,
            size: data.len() as u64,
            make_parents: false,
            ..Default::default()
        })),
    }];
    for chunk in data.chunks(64 << 10) {
        input.push(gpb::WriteFileInput {
            input: Some(gpb::write_file_input::Input::Data(chunk.to_vec())),
        });
    }
    let info = g.write_file(tokio_stream::iter(input)).await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(
        g.stat(&path.display().to_string()).await.unwrap().mode & 0o777,
        0o640
    );
    let mut read = g
        .read_file(gpb::ReadFileRequest {
            path: path.display().to_string(),
            max_bytes: 0,
        })
        .await
        .unwrap();
    let mut back = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        back.extend(chunk.data);
    }
    assert_eq!(back, data);
    let listing = g
        .list_dir(&agent.dir.path().display().to_string())
        .await
        .unwrap();
    assert!(listing.entries.iter().any(|e| e.path.ends_with("f.bin")));

    // Metrics: memory used is total minus available.
    let m = g.metrics().await.unwrap();
    assert!(m.memory_total_bytes > 0);
    assert_eq!(
        m.memory_used_bytes,
        m.memory_total_bytes - m.memory_available_bytes
    );
    g.quiesce().await.unwrap();
}

#[tokio::test]
async fn a_reset_link_is_redialed() {
    let Some((_c, bin)) = guest_case("guest::a_reset_link_is_redialed") else {
        return;
    };
    let (agent, mut g) = initialized(&bin, "c2", "reset-link-guest-token").await;
    // The VMM drops every vsock connection (restore): the old channel's
    // next call fails as a link failure, a redial brings it back, and the
    // guest kept its state (still initialized).
    agent._shim.reset();
    let err = g.health().await;
    if let Err(e) = &err {
        assert!(e.is_link_failure(), "{e}: {:?}", e.status());
    }
    g.redial().await.unwrap();
    assert!(g.health().await.unwrap().initialized);
}

#[tokio::test]
async fn handshake_refusal_and_deadlines_are_reported() {
    let Some((_c, bin)) = guest_case("guest::handshake_refusal_and_deadlines_are_reported") else {
        return;
    };
    let agent = Agent::start(&bin, Duration::ZERO);
    agent.ready("c3", "").await;

    // A port nothing listens on: the VMM closes without OK.
    let err = guest::dial(&agent.vsock, 5000).await.unwrap_err();
    assert!(
        matches!(err, guest::Error::Handshake { port: 5000, .. }),
        "{err}"
    );

    // A stopped guest (as when the VM is paused) makes calls time out at
    // the bound instead of hanging.
    let g = GuestClient::connect_with("c3", &agent.vsock, 1024, quick())
        .await
        .unwrap();
    agent.signal("-STOP");
    let t = Instant::now();
    let err = g.health().await.unwrap_err();
    assert!(
        matches!(err, guest::Error::Timeout { rpc: "Health", .. }),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(8));
    agent.signal("-CONT");

    // Nothing listening at all: wait_ready gives up at its deadline and
    // says why.
    let missing = agent.dir.path().join("nothing.vsock");
    let t = Instant::now();
    let err = GuestClient::wait_ready(
        "c3",
        &missing,
        1024,
        "",
        quick(),
        Duration::from_millis(700),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, guest::Error::NotReady { .. }), "{err}");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

fn code(e: &guest::Error) -> tonic::Code {
    e.status().map_or(tonic::Code::Ok, tonic::Status::code)
}

/// `client` is refused as unauthenticated everywhere: a read, a file call
/// and a take-over by re-Init.
async fn assert_all_refused(client: &GuestClient) {
    for e in [
        client.health().await.unwrap_err(),
        client.stat("/").await.unwrap_err(),
        client
            .clone()
            .init(&params("attacker-chosen-token"))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(code(&e), tonic::Code::Unauthenticated, "{e}");
    }
}

/// What a boot and a later restore do to the guest's token, attacked: an
/// Init without or with a wrong token cannot take the guest over, a
/// restore re-keys it (Init authorized by the token in the restored
/// memory), after which the old token is refused everywhere; and neither
/// token shows in the guest agent's log or in our Debug output.
#[tokio::test]
async fn a_restore_rekeys_the_guest_and_the_old_token_is_refused() {
    let Some((_c, bin)) =
        guest_case("guest::a_restore_rekeys_the_guest_and_the_old_token_is_refused")
    else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("guest.log");
    let agent = Agent::start_logging(&bin, Duration::ZERO, Some(&log));
    let old = guest::GuestToken::generate().unwrap();
    let new = guest::GuestToken::generate().unwrap();
    assert_ne!(old, new);
    assert_eq!(old.expose().len(), 64);
    let connect = || GuestClient::connect_with("c4", &agent.vsock, 1024, quick());

    // Boot: an Init without a token is refused; the bootstrap Init sets one.
    let (mut g, _) = agent.ready("c4", "").await;
    let e = g.init(&params("")).await.unwrap_err();
    assert_eq!(code(&e), tonic::Code::InvalidArgument, "{e}");
    assert!(!g.health().await.unwrap().initialized);
    g.init(&params(old.expose())).await.unwrap();

    // Someone without the token cannot re-Init (take over) the guest, nor
    // call anything; a wrong token fares no better.
    let stranger = connect().await.unwrap();
    let e = stranger
        .clone()
        .init(&params("attacker-chosen-token"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), tonic::Code::Unauthenticated, "{e}");
    let wrong = stranger
        .with_token(guest::GuestToken::generate().unwrap().expose())
        .unwrap();
    assert_all_refused(&wrong).await;
    // The guest still answers its real owner.
    assert!(g.stat("/").await.is_ok());

    // Restore: the VMM drops vsock; the node agent redials with the token
    // the restored memory holds and sends the capsule's new one.
    agent._shim.reset();
    let (mut r, health) = agent.ready("c4", old.expose()).await;
    assert!(health.initialized);
    r.init(&params(new.expose())).await.unwrap();

    let with_old = connect().await.unwrap().with_token(old.expose()).unwrap();
    assert_all_refused(&with_old).await;
    let (out, exit) = run(&r, &["sh", "-c", "echo $WRENN_FROM_INIT"], b"").await;
    assert_eq!(
        (out.as_slice(), exit.code),
        (b"hello\n".as_slice(), Some(0))
    );
    let with_new = connect().await.unwrap().with_token(new.expose()).unwrap();
    assert!(with_new.health().await.unwrap().initialized);

    // Neither token is in the guest's debug log (which did record the
    // refusals) nor in what our types print.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("wrong access token"), "log:\n{text}");
    for t in [&old, &new] {
        assert!(!text.contains(t.expose()), "token in the guest log");
        for printed in [
            format!("{t:?}"),
            format!("{r:?}"),
            format!("{with_new:?}"),
            format!("{:?}", params(t.expose())),
        ] {
            assert!(!printed.contains(t.expose()), "token printed: {printed}");
        }
    }
}

#[tokio::test]
async fn the_resolver_file_reaches_the_guest_agent_and_replaces_a_stale_one() {
    let Some((_c, bin)) =
        guest_case("guest::the_resolver_file_reaches_the_guest_agent_and_replaces_a_stale_one")
    else {
        return;
    };
    let (agent, g) = initialized(&bin, "c1", "resolver-guest-token-0123").await;
    // A restored guest carries the file of the capsule it was snapshotted
    // from; the agent's write replaces it whole. (A host-process guest
    // writes under its temp dir, never the host's /etc.)
    let etc = agent.dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let path = etc.join("resolv.conf");
    std::fs::write(
        &path,
        "nameserver 192.0.2.53\nsearch old.svc.cluster.local\n",
    )
    .unwrap();
    let cluster = wrenn_node_agent::network::dns::ClusterDns {
        server: Some(std::net::Ipv4Addr::new(10, 96, 0, 10)),
        domain: "cluster.local".into(),
    };
    let text = wrenn_node_agent::network::dns::DnsConfig::default().render("team-a", &cluster);
    let info = g
        .put_file(
            &path.display().to_string(),
            0o644,
            text.clone().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(info.size, text.len() as u64);
    let back = std::fs::read_to_string(&path).unwrap();
    assert_eq!(back, text);
    assert!(back.contains("nameserver 169.254.0.22\n"), "{back}");
    assert!(
        back.contains("search team-a.svc.cluster.local svc.cluster.local cluster.local\n"),
        "{back}"
    );
}
