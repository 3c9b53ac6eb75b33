//! Runs a command in a guest through the node agent's guest link and keeps
//! what it printed and how it ended; shared by the host-tier guest link
//! tests and the vm tier (`qemu_bed`, `vmm_qemu`).
#![allow(dead_code)]

use wrenn_node_agent::guest::GuestClient;
use wrenn_proto::guest::v1 as gpb;

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stdout and stderr, in the order they arrived.
    pub output: Vec<u8>,
    pub exit: gpb::ExecExit,
}

/// An `ExecStart` of `script` under `/bin/sh` as `user` (empty: root),
/// killed after `timeout_ms` (0: never).
pub fn sh_start(script: &str, user: &str, timeout_ms: u64) -> gpb::ExecStart {
    gpb::ExecStart {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        user: user.into(),
        timeout_ms,
        ..Default::default()
    }
}

/// Runs `start` with `stdin` (then EOF) and collects it to its exit.
pub async fn exec(g: &GuestClient, start: gpb::ExecStart, stdin: &[u8]) -> Ran {
    use gpb::exec_input::Input;
    use gpb::exec_output::Output;
    let argv = start.argv.clone();
    let mut input = vec![gpb::ExecInput {
        input: Some(Input::Start(start)),
    }];
    if !stdin.is_empty() {
        input.push(gpb::ExecInput {
            input: Some(Input::Stdin(stdin.to_vec())),
        });
    }
    input.push(gpb::ExecInput {
        input: Some(Input::CloseStdin(true)),
    });
    let mut out = g.exec(tokio_stream::iter(input)).await.unwrap();
    let (mut stdout, mut output) = (Vec::new(), Vec::new());
    while let Some(m) = out.message().await.unwrap() {
        match m.output {
            Some(Output::Stdout(b)) => {
                stdout.extend_from_slice(&b);
                output.extend(b);
            }
            Some(Output::Stderr(b)) => output.extend(b),
            Some(Output::Exit(exit)) => {
                return Ran {
                    stdout,
                    output,
                    exit,
                };
            }
            Some(Output::StartedPid(_)) | None => {}
        }
    }
    panic!("exec of {argv:?} ended without an exit");
}
