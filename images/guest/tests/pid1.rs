//! `wrenn-guest` as PID 1, in fresh PID, mount and UTS namespaces
//! (`unshare --pid --fork --mount --uts`), with its filesystems mounted under
//! a temp root so nothing touches the host's. Power-off inside a PID
//! namespace ends the namespace's init with SIGINT instead of stopping the
//! machine, which is what this test observes.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use wrenn_proto::guest::v1::guest_agent_client::GuestAgentClient;
use wrenn_proto::guest::v1::{
    ExecInput, ExecStart, HealthRequest, InitRequest, exec_input, exec_output,
};
use wrenn_testkit::{Tier, case};

const TOKEN: &str = "pid1-token-for-tests";

/// The `unshare` process; on drop (a failed test) its PID 1 is killed,
/// which ends every process of the namespace, and it is waited for.
struct Namespace(Option<std::process::Child>);

impl Drop for Namespace {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let path = format!("/proc/{0}/task/{0}/children", child.id());
        if let Ok(children) = std::fs::read_to_string(path) {
            for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", TOKEN.parse().unwrap());
    r
}

async fn sh(
    client: &mut GuestAgentClient<tonic::transport::Channel>,
    script: &str,
) -> (String, Option<i32>) {
    let (tx, rx) = mpsc::channel(2);
    tx.send(ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let mut out = client
        .exec(authed(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut code) = (String::new(), None);
    while let Some(m) = out.message().await.unwrap() {
        match m.output.unwrap() {
            exec_output::Output::Stdout(b) | exec_output::Output::Stderr(b) => {
                text.push_str(&String::from_utf8_lossy(&b));
            }
            exec_output::Output::Exit(e) => code = e.code,
            exec_output::Output::StartedPid(_) => {}
        }
    }
    (text, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_mounts_reaps_restarts_the_agent_and_powers_off() {
    let case = case(Tier::Host, "guest_pid1_in_namespaces");
    if let Err(reason) = wrenn_testkit::need_root() {
        return case.skip(reason);
    }
    let unshare = match wrenn_testkit::need_program("unshare") {
        Ok(p) => p,
        Err(reason) => return case.skip(reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let vsock = dir.path().join("vm.vsock");
    let ns = Command::new(unshare)
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--mount-proc",
        ])
        .arg(env!("CARGO_BIN_EXE_wrenn-guest"))
        .arg("--init")
        .arg("--root")
        .arg(&root)
        .args(["--hostname", "capsule-boot", "--listen"])
        .arg(format!("unix:{}", agent_sock.display()))
        .env("WRENN_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Namespace(Some(ns));
    let ns = guard.0.as_mut().unwrap();
    common::wait_for(&agent_sock).await;
    let shim = common::shim(&vsock, agent_sock.clone());
    let mut client = GuestAgentClient::new(common::connect(&vsock).await);

    client
        .init(InitRequest {
            // Never a wall time here: CLOCK_REALTIME is not namespaced.
            unix_time_nanos: 0,
            entropy: vec![0x5a; 32],
            hostname: "capsule-7".into(),
            access_token: TOKEN.into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // PID 1 is us, the hostname is Init's (in the UTS namespace only).
    let (out, _) = sh(&mut client, "cat /proc/1/comm; hostname").await;
    assert_eq!(out, "wrenn-guest\ncapsule-7\n");

    // Every pseudo filesystem is mounted under the root, with its type.
    let (mountinfo, _) = sh(&mut client, "cat /proc/self/mountinfo").await;
    let r = root.to_str().unwrap();
    for (target, fstype) in [
        ("proc", "proc"),
        ("sys", "sysfs"),
        ("dev", "devtmpfs"),
        ("dev/pts", "devpts"),
        ("dev/shm", "tmpfs"),
        ("run", "tmpfs"),
        ("tmp", "tmpfs"),
        ("sys/fs/cgroup", "cgroup2"),
    ] {
        let want = format!("{r}/{target}");
        let found = mountinfo.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-");
            f.get(4) == Some(&want.as_str()) && sep.and_then(|i| f.get(i + 1)) == Some(&fstype)
        });
        assert!(found, "{fstype} not mounted on {want}:\n{mountinfo}");
    }

    // Nothing PID 1 blocks for its sigwait reaches the agent or what it
    // starts: a shell's `wait` returns and its `kill` works.
    let (out, _) = sh(
        &mut client,
        "grep SigBlk /proc/self/status; \
         for p in $(cat /proc/1/task/1/children); do grep SigBlk /proc/$p/status; done; \
         sleep 30 & kill $!; wait $!; echo \"waited $?\"",
    )
    .await;
    assert!(
        out.starts_with("SigBlk:\t0000000000000000\nSigBlk:\t0000000000000000\n")
            && out.lines().any(|l| l == "waited 143"),
        "guest processes start with signals blocked: {out:?}"
    );

    // An orphan is re-parented to PID 1 and reaped, never left a zombie.
    let (pid, _) = sh(&mut client, "sleep 0.3 & echo $!").await;
    let pid = pid.trim().to_string();
    let (out, _) = sh(
        &mut client,
        &format!("sleep 1; if [ -e /proc/{pid} ]; then cat /proc/{pid}/stat; else echo reaped; fi"),
    )
    .await;
    assert_eq!(out.trim(), "reaped");

    // The agent dies: PID 1 starts a new one (it waits for a fresh Init).
    let (tx, rx) = mpsc::channel(1);
    tx.send(ExecInput {
        input: Some(exec_input::Input::Start(ExecStart {
            argv: vec!["sh".into(), "-c".into(), "kill -KILL $PPID".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    drop(tx);
    // The call breaks with the agent; how it breaks does not matter.
    if let Ok(out) = client.exec(authed(ReceiverStream::new(rx))).await {
        let mut out = out.into_inner();
        while let Ok(Some(_)) = out.message().await {}
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        if let Ok(channel) = common::try_connect(&vsock).await
            && let Ok(h) = GuestAgentClient::new(channel)
                .health(HealthRequest {})
                .await
        {
            break h.into_inner();
        }
        assert!(Instant::now() < deadline, "the agent was not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!health.initialized);

    // SIGTERM to PID 1: children stopped, sync, power off, which in a PID
    // namespace ends the init with SIGINT.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", ns.id())).unwrap();
    let init_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = ns.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "PID 1 did not power off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.signal() == Some(libc::SIGINT) || status.code() == Some(128 + libc::SIGINT),
        "unshare ended with {status:?}, not the power-off SIGINT"
    );
    guard.0 = None;
    shim.stop();
    // The mounts went with the namespace: the root is plain directories.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(r), "mounts leaked to the host: {mounts}");
}
