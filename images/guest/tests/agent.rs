//! `wrenn-guest` as a host process, over a Unix socket and the vsock
//! handshake (tier 1).
//!
//! Why this file is long: thirteen scenarios (token, exec, pty, detached
//! processes, files, metrics) share one way of starting the agent and
//! driving its streams; one test binary links the client once.

// Helpers outside #[test] fns unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};
use wrenn_proto::guest::v1::guest_agent_client::GuestAgentClient;
use wrenn_proto::guest::v1::{
    ExecExit, ExecInput, ExecOutput, ExecStart, FileInfo, FileType, HealthRequest, HealthResponse,
    InitRequest, MakeDirRequest, MetricsRequest, PathRequest, PtyInput, PtySize, PtyStart,
    ReadFileRequest, RemoveRequest, RenameRequest, WriteFileInput, WriteFileStart, exec_input,
    exec_output, pty_input, pty_output, write_file_input,
};
use wrenn_testkit::{Tier, case, pattern};

use common::{Guest, TOKEN, authed};

type Client = GuestAgentClient<tonic::transport::Channel>;

/// Health as `req` asks it, with the token or without.
async fn health(
    client: &mut Client,
    req: impl tonic::IntoRequest<HealthRequest>,
) -> HealthResponse {
    client.health(req).await.unwrap().into_inner()
}

/// The refusal of a call that must fail with `code`.
#[track_caller]
fn refused<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    let e = answer.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    e
}

/// An authorised Exec of `msgs`: its output stream, or the refusal.
async fn exec(
    client: &mut Client,
    msgs: impl tokio_stream::Stream<Item = ExecInput> + Send + 'static,
) -> Result<tonic::Streaming<ExecOutput>, tonic::Status> {
    client
        .exec(authed(msgs))
        .await
        .map(tonic::Response::into_inner)
}

/// An authorised Exec of `msgs`, collected to its end.
async fn exec_all(client: &mut Client, msgs: impl IntoIterator<Item = ExecInput>) -> Ran {
    let msgs: Vec<ExecInput> = msgs.into_iter().collect();
    collect(exec(client, tokio_stream::iter(msgs)).await.unwrap()).await
}

/// Runs `script` under `sh -c` with `stdin` (then EOF), no timeout.
async fn sh(client: &mut Client, script: &str, stdin: &[u8]) -> Ran {
    run(client, &["sh", "-c", script], stdin, 0).await
}

/// An authorised WriteFile of `data` to `path`, declaring `declared` bytes.
async fn write(
    client: &mut Client,
    path: &str,
    declared: u64,
    data: &[u8],
) -> Result<FileInfo, tonic::Status> {
    let msgs = tokio_stream::iter(write_msgs(path, declared, data));
    client
        .write_file(authed(msgs))
        .await
        .map(tonic::Response::into_inner)
}

fn init_request() -> InitRequest {
    InitRequest {
        // No wall time: a host test must never step the host's clock.
        unix_time_nanos: 0,
        entropy: (0..64u8).collect(),
        env: [("WRENN_TEST".to_string(), "yes".to_string())].into(),
        hostname: String::new(),
        access_token: TOKEN.to_string(),
    }
}

async fn started() -> Guest {
    let mut g = Guest::start(&[]).await;
    g.client.init(init_request()).await.unwrap();
    g
}

fn host_uname_r() -> String {
    let out = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[derive(Debug, Default)]
struct Ran {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExecExit>,
}

impl Ran {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn start_msg(argv: &[&str], timeout_ms: u64) -> ExecInput {
    ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            ..Default::default()
        })),
    }
}

/// Runs `argv` with `stdin` (then EOF) and collects everything.
async fn run(client: &mut Client, argv: &[&str], stdin: &[u8], timeout_ms: u64) -> Ran {
    let mut msgs = vec![start_msg(argv, timeout_ms)];
    if !stdin.is_empty() {
        msgs.push(ExecInput {
            input: Some(exec_input::Input::Stdin(stdin.to_vec())),
        });
    }
    msgs.push(ExecInput {
        input: Some(exec_input::Input::CloseStdin(true)),
    });
    let (tx, rx) = mpsc::channel(8);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    // Keep the request stream open (like an interactive caller) until the
    // exit arrives.
    let stream = exec(client, ReceiverStream::new(rx)).await.unwrap();
    let ran = collect(stream).await;
    drop(tx);
    ran
}

async fn collect(mut stream: tonic::Streaming<wrenn_proto::guest::v1::ExecOutput>) -> Ran {
    let mut ran = Ran::default();
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.output.unwrap() {
            exec_output::Output::StartedPid(p) => ran.pid = p,
            exec_output::Output::Stdout(b) => ran.stdout.extend(b),
            exec_output::Output::Stderr(b) => ran.stderr.extend(b),
            exec_output::Output::Exit(e) => ran.exit = Some(e),
        }
    }
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_every_call_needs_the_token() {
    let _case = case(Tier::Host, "guest_init_then_token");
    let mut g = Guest::start(&[]).await;
    let h = health(&mut g.client, HealthRequest {}).await;
    assert!(!h.initialized);
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    refused(
        g.client.metrics(MetricsRequest {}).await,
        Code::FailedPrecondition,
    );
    // Init must set a token an attacker cannot guess: none or a short one
    // is refused, and the agent stays uninitialized.
    for weak in ["", "guessable"] {
        let mut req = init_request();
        req.access_token = weak.into();
        let e = g.client.init(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{weak:?}: {e:?}");
    }
    let h = health(&mut g.client, HealthRequest {}).await;
    assert!(!h.initialized);

    let r = g.client.init(init_request()).await.unwrap().into_inner();
    assert_eq!(r.kernel_release, host_uname_r());

    refused(
        g.client.health(HealthRequest {}).await,
        Code::Unauthenticated,
    );
    let mut wrong = Request::new(HealthRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "nope".parse().unwrap());
    refused(g.client.health(wrong).await, Code::Unauthenticated);
    let e = g.client.init(init_request()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a second Init needs the token too"
    );
    refused(
        g.client
            .exec(tokio_stream::iter([start_msg(&["true"], 0)]))
            .await,
        Code::Unauthenticated,
    );

    let h = health(&mut g.client, authed(HealthRequest {})).await;
    assert!(h.initialized);
    // A restore sends Init again, with the token.
    g.client.init(authed(init_request())).await.unwrap();
    // Too little entropy is refused.
    let mut short = init_request();
    short.entropy = vec![1; 8];
    refused(g.client.init(authed(short)).await, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_uname_matches_the_host_and_sees_init_env() {
    let _case = case(Tier::Host, "guest_exec_uname");
    let mut g = started().await;
    let ran = run(&mut g.client, &["uname", "-r"], b"", 0).await;
    assert_eq!(ran.out().trim(), host_uname_r());
    assert_eq!(ran.exit.unwrap().code, Some(0));
    assert!(ran.pid > 0);
    let ran = sh(&mut g.client, "echo $WRENN_TEST; pwd", b"").await;
    assert_eq!(ran.out(), "yes\n/\n");
    // As another user, in another directory, with the request's env.
    let cwd = g.dir.path().to_str().unwrap().to_string();
    let start = ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: vec!["sh".into(), "-c".into(), "id -u; pwd; echo $A".into()],
            env: [("A".to_string(), "b".to_string())].into(),
            cwd: cwd.clone(),
            user: "65534".into(),
            timeout_ms: 0,
            ..Default::default()
        })),
    };
    let ran = exec_all(&mut g.client, [start]).await;
    assert_eq!(ran.out(), format!("65534\n{cwd}\nb\n"));
    let mut unknown = start_msg(&["true"], 0);
    if let Some(exec_input::Input::Start(s)) = &mut unknown.input {
        s.user = "no-such-user-here".into();
    }
    refused(
        exec(&mut g.client, tokio_stream::iter([unknown])).await,
        Code::InvalidArgument,
    );
    let missing = start_msg(&["/no/such/program"], 0);
    refused(
        exec(&mut g.client, tokio_stream::iter([missing])).await,
        Code::NotFound,
    );
    let empty = start_msg(&[], 0);
    refused(
        exec(&mut g.client, tokio_stream::iter([empty])).await,
        Code::InvalidArgument,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_pipeline_reads_stdin() {
    let _case = case(Tier::Host, "guest_exec_pipeline");
    let mut g = started().await;
    let ran = sh(&mut g.client, "tr a-z A-Z | wc -c", b"hello world\n").await;
    assert_eq!(ran.out().trim(), "12");
    let ran = run(&mut g.client, &["tr", "a-z", "A-Z"], b"hello world\n", 0).await;
    assert_eq!(ran.out(), "HELLO WORLD\n");
    assert_eq!(ran.exit.unwrap().code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_exit_codes_signals_and_stderr() {
    let _case = case(Tier::Host, "guest_exec_exit");
    let mut g = started().await;
    let ran = sh(&mut g.client, "echo oops >&2; exit 3", b"").await;
    assert_eq!(ran.stderr, b"oops\n");
    let exit = ran.exit.unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.timed_out),
        (Some(3), None, false)
    );
    let ran = sh(&mut g.client, "kill -TERM $$", b"").await;
    assert_eq!(ran.exit.unwrap().signal, Some(libc::SIGTERM));

    // A signal sent through the stream reaches the process group.
    let (tx, rx) = mpsc::channel(4);
    tx.send(start_msg(&["sleep", "30"], 0)).await.unwrap();
    let mut out = exec(&mut g.client, ReceiverStream::new(rx)).await.unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert!(matches!(
        first.output,
        Some(exec_output::Output::StartedPid(_))
    ));
    let t0 = Instant::now();
    tx.send(ExecInput {
        input: Some(exec_input::Input::Signal(libc::SIGKILL)),
    })
    .await
    .unwrap();
    let ran = collect(out).await;
    assert_eq!(ran.exit.unwrap().signal, Some(libc::SIGKILL));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_the_process_group() {
    let _case = case(Tier::Host, "guest_exec_timeout");
    let mut g = started().await;
    let t0 = Instant::now();
    let ran = run(
        &mut g.client,
        &["sh", "-c", "sleep 30 & sleep 30"],
        b"",
        300,
    )
    .await;
    let exit = ran.exit.unwrap();
    assert!(exit.timed_out);
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The background sleep went with the group.
    let pgid = nix::unistd::Pid::from_raw(-(ran.pid as i32));
    wrenn_testkit::wait_until(Duration::from_secs(2), "process group gone", || {
        match nix::sys::signal::kill(pgid, None) {
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
}

/// Kills the process group of `pid` when dropped, so a failed assertion
/// leaves no detached process behind.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_exec_outlives_the_call_and_writes_its_log() {
    let _case = case(Tier::Host, "guest_exec_detached");
    let mut g = started().await;
    let log = g.dir.path().join("logs/nested/start.log");
    let start = ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: [
                "/bin/sh",
                "-c",
                "echo out; echo err >&2; echo $WRENN_TEST; exec sleep 60",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            detach: true,
            log_path: log.display().to_string(),
            ..Default::default()
        })),
    };
    let t0 = Instant::now();
    let out = exec(&mut g.client, tokio_stream::iter([start]))
        .await
        .unwrap();
    let ran = collect(out).await;
    // The call ends at once, with no exit code: the process runs on.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let exit = ran.exit.unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.timed_out),
        (None, None, false)
    );
    assert!(ran.stdout.is_empty() && ran.stderr.is_empty());
    let pid = i32::try_from(ran.pid).unwrap();
    assert!(pid > 1);
    let _kill = KillGroup(pid);
    // Its own session (so no terminal or group of the agent's reaches it),
    // not a child of the agent.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(sid.as_raw(), pid);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, g.agent_pid(), "the agent is its parent");
    // stdout and stderr were appended to the log (parents created).
    wrenn_testkit::wait_until(Duration::from_secs(5), "log written", || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        if text.contains("out\n") && text.contains("err\n") && text.contains("yes\n") {
            Ok(())
        } else {
            Err(format!("log so far: {text:?}"))
        }
    })
    .unwrap();
    // Still running after the stream ended and after other calls.
    run(&mut g.client, &["true"], b"", 5_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        wrenn_testkit::process_alive(pid),
        "the detached process died with its call"
    );
    // A second start appends to the same log.
    let again = ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo second".into()],
            detach: true,
            log_path: log.display().to_string(),
            ..Default::default()
        })),
    };
    let ran = exec_all(&mut g.client, [again]).await;
    let _kill2 = KillGroup(i32::try_from(ran.pid).unwrap());
    wrenn_testkit::wait_until(Duration::from_secs(5), "second line", || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        if text.starts_with("out\n") && text.contains("second\n") {
            Ok(())
        } else {
            Err(format!("log so far: {text:?}"))
        }
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_exec_refuses_a_missing_program_and_a_relative_log() {
    let _case = case(Tier::Host, "guest_exec_detached_refusals");
    let mut g = started().await;
    let call = |argv: &[&str], log_path: &str| ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            detach: true,
            log_path: log_path.to_string(),
            ..Default::default()
        })),
    };
    let missing = call(&["/no/such/program"], "");
    let missing = refused(
        exec(&mut g.client, tokio_stream::iter([missing])).await,
        Code::NotFound,
    );
    assert!(
        missing.message().contains("/no/such/program"),
        "{missing:?}"
    );
    let relative = call(&["true"], "start.log");
    refused(
        exec(&mut g.client, tokio_stream::iter([relative])).await,
        Code::InvalidArgument,
    );
}

async fn pty_until(
    out: &mut tonic::Streaming<wrenn_proto::guest::v1::PtyOutput>,
    seen: &mut String,
    want: &str,
) -> Option<wrenn_proto::guest::v1::ExecExit> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, out.message())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in pty output {seen:?}"))
            .unwrap();
        match msg.and_then(|m| m.output) {
            Some(pty_output::Output::Data(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            Some(pty_output::Output::Exit(e)) => return Some(e),
            Some(pty_output::Output::StartedPid(_)) => {}
            None => panic!("pty stream ended before {want:?}: {seen:?}"),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_round_trip_with_resize() {
    let _case = case(Tier::Host, "guest_pty_resize");
    let mut g = started().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(PtyInput {
        input: Some(pty_input::Input::Start(PtyStart {
            argv: vec!["sh".into()],
            env: [("PS1".to_string(), "$ ".to_string())].into(),
            size: Some(PtySize { rows: 24, cols: 80 }),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut out = g
        .client
        .pty(authed(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    let data = |s: &str| PtyInput {
        input: Some(pty_input::Input::Data(s.as_bytes().to_vec())),
    };
    let mut seen = String::new();
    tx.send(data("stty size; tty\n")).await.unwrap();
    pty_until(&mut out, &mut seen, "24 80\r\n/dev/pts/").await;
    tx.send(PtyInput {
        input: Some(pty_input::Input::Resize(PtySize {
            rows: 40,
            cols: 100,
        })),
    })
    .await
    .unwrap();
    tx.send(data("stty size\n")).await.unwrap();
    pty_until(&mut out, &mut seen, "40 100\r\n").await;
    tx.send(data("exit 7\n")).await.unwrap();
    let exit = pty_until(&mut out, &mut seen, "never printed")
        .await
        .unwrap();
    assert_eq!(exit.code, Some(7));
}

fn write_msgs(path: &str, declared: u64, data: &[u8]) -> Vec<WriteFileInput> {
    let mut msgs = vec![WriteFileInput {
        input: Some(write_file_input::Input::Start(WriteFileStart {
            path: path.to_string(),
            mode: 0o640,
            size: declared,
            make_parents: true,
            ..Default::default()
        })),
    }];
    msgs.extend(data.chunks(256 * 1024).map(|c| WriteFileInput {
        input: Some(write_file_input::Input::Data(c.to_vec())),
    }));
    msgs
}

async fn read_all(client: &mut Client, path: &str, max: u64) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .read_file(authed(ReadFileRequest {
            path: path.to_string(),
            max_bytes: max,
        }))
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend(chunk.data);
    }
    Ok(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_of_10_mib_round_trips_with_the_same_sha256() {
    let _case = case(Tier::Host, "guest_file_10mib");
    let mut g = started().await;
    let data = pattern(10 << 20);
    let path = g.dir.path().join("sub/dir/big.bin");
    let path_s = path.to_str().unwrap().to_string();
    let info = write(&mut g.client, &path_s, data.len() as u64, &data)
        .await
        .unwrap();
    assert_eq!(info.size, 10 << 20);
    assert_eq!(info.r#type, FileType::Regular as i32);
    assert_eq!(info.mode & 0o7777, 0o640);
    let back = read_all(&mut g.client, &path_s, 0).await.unwrap();
    assert_eq!(Sha256::digest(&back), Sha256::digest(&data));
    // A read limit below the size is refused.
    refused(
        read_all(&mut g.client, &path_s, 1 << 20).await,
        Code::ResourceExhausted,
    );
    // Nothing but the file is left in its directory (no temp files).
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["big.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_directory_or_a_device_is_refused() {
    let _case = case(Tier::Host, "guest_read_refusals");
    let mut g = started().await;
    let dir = g.dir.path().to_str().unwrap().to_string();
    let e = refused(
        read_all(&mut g.client, &dir, 0).await,
        Code::FailedPrecondition,
    );
    assert!(
        e.message().contains("is a directory, not a regular file"),
        "{}",
        e.message()
    );
    let e = refused(
        read_all(&mut g.client, "/dev/null", 0).await,
        Code::FailedPrecondition,
    );
    assert!(e.message().contains("character device"), "{}", e.message());
    let fifo = g.dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = read_all(&mut g.client, fifo.to_str().unwrap(), 0)
        .await
        .unwrap_err();
    assert!(e.message().contains("FIFO"), "{}", e.message());
    refused(
        read_all(&mut g.client, &format!("{dir}/missing"), 0).await,
        Code::NotFound,
    );
    refused(
        read_all(&mut g.client, "relative/path", 0).await,
        Code::InvalidArgument,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_off_their_declared_size_are_refused_and_leave_nothing() {
    let _case = case(Tier::Host, "guest_write_refusals");
    let mut g = Guest::start(&["--max-file-bytes", "1048576"]).await;
    g.client.init(init_request()).await.unwrap();
    let out = g.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let target = out.join("f").to_str().unwrap().to_string();

    refused(
        write(&mut g.client, &target, 10, &[7; 20]).await,
        Code::InvalidArgument,
    );
    refused(
        write(&mut g.client, &target, 30, &[7; 20]).await,
        Code::InvalidArgument,
    );
    refused(
        write(&mut g.client, &target, 2 << 20, &[]).await,
        Code::ResourceExhausted,
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "a partial or temp file was left"
    );

    // An existing file is replaced whole, never truncated in place.
    std::fs::write(&target, b"old").unwrap();
    refused(
        write(&mut g.client, &target, 5, &[1; 9]).await,
        Code::InvalidArgument,
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    write(&mut g.client, &target, 3, b"new").await.unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_stat_list_rename_remove() {
    let _case = case(Tier::Host, "guest_dir_ops");
    let mut g = started().await;
    let root = g.dir.path().join("tree");
    let p = |s: &str| root.join(s).to_str().unwrap().to_string();
    let info = g
        .client
        .make_dir(authed(MakeDirRequest {
            path: p("a/b"),
            mode: 0o750,
            parents: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, FileType::Directory as i32);
    refused(
        g.client
            .make_dir(authed(MakeDirRequest {
                path: p("x/y"),
                mode: 0,
                parents: false,
            }))
            .await,
        Code::NotFound,
    );
    std::os::unix::fs::symlink("a", root.join("link")).unwrap();
    let list = g
        .client
        .list_dir(authed(PathRequest { path: p("") }))
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<_> = list
        .entries
        .iter()
        .map(|e| (e.path.clone(), e.r#type))
        .collect();
    assert_eq!(
        kinds,
        [
            (p("a"), FileType::Directory as i32),
            (p("link"), FileType::Symlink as i32)
        ]
    );
    assert_eq!(list.entries[1].link_target, "a");
    let moved = g
        .client
        .rename(authed(RenameRequest {
            from: p("a"),
            to: p("c"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.path, p("c"));
    refused(
        g.client
            .remove(authed(RemoveRequest {
                path: p("c"),
                recursive: false,
            }))
            .await,
        Code::FailedPrecondition,
    );
    g.client
        .remove(authed(RemoveRequest {
            path: p("c"),
            recursive: true,
        }))
        .await
        .unwrap();
    refused(
        g.client.stat(authed(PathRequest { path: p("c") })).await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_sane() {
    let _case = case(Tier::Host, "guest_metrics_health");
    let mut g = started().await;
    let m = g
        .client
        .metrics(authed(MetricsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(m.memory_total_bytes > 0);
    assert_eq!(
        m.memory_used_bytes,
        m.memory_total_bytes - m.memory_available_bytes
    );
    assert!(m.cpu_total_nanos > 0 && m.cpu_busy_nanos <= m.cpu_total_nanos);
    assert!(m.disk_total_bytes > 0 && m.disk_used_bytes <= m.disk_total_bytes);
    assert!(m.load1 >= 0.0 && m.load15 >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!((now - m.sampled_unix_nanos).abs() < 10_000_000_000);
    let h = health(&mut g.client, authed(HealthRequest {})).await;
    assert!(h.initialized);
    assert!(h.uptime_ms < 60_000);
    g.client
        .quiesce(authed(wrenn_proto::guest::v1::QuiesceRequest {}))
        .await
        .unwrap();
}

/// The attack of an unprivileged local process: it dials the agent's own
/// listener (here the Unix socket, world-writable so only the agent's
/// admission check stands in the way) and sends an HTTP/2 preface. Root is
/// served; `nobody` is closed unread, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_local_process_is_closed_unserved() {
    let case = case(Tier::Host, "guest_unprivileged_dial_refused");
    if !nix::unistd::Uid::effective().is_root() {
        return case.skip("needs root to dial as another user");
    }
    let mut g = started().await;
    let sock = g.dir.path().join("agent.sock");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(g.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy `nobody` may execute: the build dir can sit under a 0700 home.
    let bin = g.dir.path().join("wrenn-guest");
    std::fs::copy(env!("CARGO_BIN_EXE_wrenn-guest"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = |uid: Option<u32>| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--probe").arg(format!("unix:{}", sock.display()));
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            out.status.code(),
        )
    };
    assert_eq!(probe(None), ("served".to_string(), Some(0)));
    assert_eq!(probe(Some(65534)), ("closed".to_string(), Some(1)));
    // The refused dial left the agent serving its real client.
    let ran = run(&mut g.client, &["true"], b"", 0).await;
    assert_eq!(ran.exit.unwrap().code, Some(0));
}
