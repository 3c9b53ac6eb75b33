//! A detached process in a real guest (Tier::Vm) survives its caller and a
//! suspend/resume of its capsule: the supervisor boots this tree's guest
//! image under QEMU (TCG), the test starts a tagged process through the
//! guest agent, drops that connection, suspends and resumes the capsule,
//! then finds the process still running, tells it to finish and attaches:
//! the output since its start comes back, then its exit code.
#![allow(clippy::unwrap_used)]

mod cgroup_bed;
mod guest_exec;
mod network_env;
mod qemu_bed;

use std::time::Duration;

use network_env::Bed as NetBed;
use qemu_bed::{sh_as, vm_bed};
use wrenn_node_agent::capsule::{Egress, State};
use wrenn_proto::guest::v1 as gpb;
use wrenn_testkit::{Tier, case};

const NAME: &str =
    "processes_vm::a_detached_process_survives_suspend_and_resume_then_attach_shows_its_output";

fn tag() -> Option<gpb::ProcessRef> {
    Some(gpb::ProcessRef {
        pid: 0,
        tag: "job".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_process_survives_suspend_and_resume_then_attach_shows_its_output() {
    let c = case(Tier::Vm, NAME);
    let (bed, _turn) = match vm_bed(NAME, &[], || NetBed::new(true), "wrenn-procs").await {
        Ok(b) => b,
        Err(reason) => return c.skip(reason),
    };
    let spec = bed.spec("default", "procs", Egress::Allow);
    let v = bed.sup.create("procs", spec, State::Running).await.unwrap();
    assert_eq!(v.state, State::Running);

    // Started through one connection, which then goes away.
    let g = bed.guest("procs", Duration::from_secs(60)).await;
    let started = g
        .start_process(gpb::StartProcessRequest {
            tag: "job".into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo before; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo after; exit 5"
                    .into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(started.running, "{started:?}");
    drop(g);

    let s = bed.sup.suspend("procs").await.unwrap();
    assert_eq!(s.state, State::Suspended);
    let r = bed.sup.resume("procs").await.unwrap();
    assert_eq!(r.state, State::Running);

    let g = bed.guest("procs", Duration::from_secs(60)).await;
    let ps = g.list_processes().await.unwrap().processes;
    let job = ps.iter().find(|p| p.tag == "job").unwrap();
    assert!(job.running && job.pid == started.pid, "{ps:?}");
    let (_, code) = sh_as(&g, "", "touch /tmp/go", 30_000).await;
    assert_eq!(code, Some(0));
    let mut out = g
        .attach_process(gpb::AttachProcessRequest {
            process: tag(),
            follow: true,
        })
        .await
        .unwrap();
    let (mut text, mut exit) = (Vec::new(), None);
    while let Some(m) = tokio::time::timeout(Duration::from_secs(60), out.message())
        .await
        .expect("the attach ends within 60 s")
        .unwrap()
    {
        match m.output {
            Some(gpb::process_output::Output::Stdout(b)) => text.extend(b),
            Some(gpb::process_output::Output::Exit(e)) => exit = Some(e),
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&text), "before\nafter\n");
    assert_eq!(exit.and_then(|e| e.code), Some(5));
    bed.sup.delete("procs").await.unwrap();
}
