//! The record's transitions, one test each and one per refused
//! combination, and the reading of format-1 journals.

use super::super::model::testing::spec;
use super::*;
use crate::vmm::BackendKind;
use crate::vmm::process::ProcessIdentity;

fn handle(uid: &str) -> MachineHandle {
    MachineHandle {
        backend: BackendKind::CloudHypervisor,
        capsule: uid.into(),
        process: ProcessIdentity {
            pid: 4242,
            start_time_ticks: 1,
        },
        helpers: vec![],
        control_socket: "/run/api.sock".into(),
        vsock_socket: "/run/vsock.sock".into(),
        memory_bytes: 1 << 28,
    }
}

fn running() -> Record {
    let mut r = Record::new("c1", &spec("a"));
    r.state = State::Running;
    r.vm_starting().unwrap();
    r.vm_started(handle("c1")).unwrap();
    r
}

fn addr() -> NetAddr {
    NetAddr {
        ip: "10.0.0.2".into(),
        slot: 1,
        netns: Some("/run/netns/wrenn-c1".into()),
    }
}

#[test]
fn a_disk_is_claimed_once_then_made_then_removed() {
    let mut r = Record::new("c1", &spec("a"));
    assert!(r.claim_disk());
    assert!(!r.claim_disk(), "a second claim journals nothing");
    assert_eq!(r.disk_path(), None);
    r.disk_made("/d".into()).unwrap();
    assert_eq!(r.disk_path(), Some(&PathBuf::from("/d")));
    r.disk_removed();
    assert_eq!(r.held.disk, None);
}

#[test]
fn a_disk_is_not_made_unclaimed() {
    let mut r = Record::new("c1", &spec("a"));
    assert!(r.disk_made("/d".into()).is_err());
    assert_eq!(r.held.disk, None);
}

#[test]
fn a_network_is_claimed_once_then_made_then_released() {
    let mut r = Record::new("c1", &spec("a"));
    assert!(r.claim_net());
    assert!(!r.claim_net());
    r.net_made(addr()).unwrap();
    assert_eq!(r.view(&info()).ip.as_deref(), Some("10.0.0.2"));
    r.net_released();
    assert_eq!((r.held.net.clone(), r.view(&info()).ip), (None, None));
}

#[test]
fn a_network_is_not_made_unclaimed() {
    let mut r = Record::new("c1", &spec("a"));
    assert!(r.net_made(addr()).is_err());
    assert_eq!(r.net_addr(), None);
}

#[test]
fn a_vm_starts_then_runs_then_goes() {
    let mut r = Record::new("c1", &spec("a"));
    r.vm_starting().unwrap();
    assert_eq!((r.held.vm.clone(), r.vm()), (VmHeld::Starting, None));
    r.vm_started(handle("c1")).unwrap();
    assert_eq!(r.vm(), Some(&handle("c1")));
    r.vm_start_over();
    assert!(r.vm().is_some(), "a running VM is not a start given up");
    r.vm_gone();
    assert_eq!(r.held.vm, VmHeld::None);
}

#[test]
fn a_start_given_up_leaves_no_vm() {
    let mut r = Record::new("c1", &spec("a"));
    r.vm_starting().unwrap();
    r.vm_start_over();
    assert_eq!(r.held.vm, VmHeld::None);
}

#[test]
fn a_second_vm_never_starts_and_none_runs_unstarted() {
    let mut r = running();
    assert!(r.vm_starting().is_err());
    assert!(r.vm_started(handle("c1")).is_err());
    let mut fresh = Record::new("c1", &spec("a"));
    assert!(fresh.vm_started(handle("c1")).is_err());
    assert_eq!(fresh.held.vm, VmHeld::None);
}

#[test]
fn a_suspend_returns_to_the_mode_it_started_from() {
    let mut r = running();
    r.state = State::Paused;
    assert_eq!(r.begin_suspend().unwrap(), State::Paused);
    assert_eq!((r.state, r.prior), (State::Suspending, Some(State::Paused)));
    assert!(!r.suspend_image_complete(), "an earlier image is stale");
    r.back_to(State::Paused);
    assert_eq!((r.state, r.prior, r.in_flight), (State::Paused, None, None));
}

#[test]
fn a_written_suspend_image_is_journaled_until_the_suspend_settles() {
    let mut r = running();
    r.explain(Reason::VmFailed, "pause VM of capsule c1");
    r.begin_suspend().unwrap();
    r.suspend_image_written().unwrap();
    assert!(r.suspend_image_complete());
    r.settle(State::Suspended);
    assert_eq!(
        (r.state, r.prior, r.in_flight.clone()),
        (State::Suspended, None, None)
    );
    assert_eq!(
        (r.reason, r.message),
        (None, None),
        "a finished step clears the error"
    );
}

#[test]
fn a_suspend_image_is_not_written_outside_a_suspend() {
    let mut r = running();
    assert!(r.suspend_image_written().is_err());
    r.begin_snapshot("s1").unwrap();
    assert!(r.suspend_image_written().is_err());
}

#[test]
fn a_snapshot_names_its_staging_dir_until_it_ends() {
    let mut r = running();
    assert_eq!(r.begin_snapshot("s1").unwrap(), State::Running);
    assert_eq!(r.in_flight, Some(InFlight::Snapshot { id: "s1".into() }));
    r.end_snapshot().unwrap();
    r.back_to(State::Running);
    assert_eq!(
        (r.state, r.prior, r.in_flight),
        (State::Running, None, None)
    );
}

#[test]
fn steps_in_flight_never_overlap() {
    let mut r = running();
    r.begin_snapshot("s1").unwrap();
    assert!(r.begin_suspend().is_err());
    assert!(r.begin_snapshot("s2").is_err());
    assert_eq!(r.in_flight, Some(InFlight::Snapshot { id: "s1".into() }));
    let mut s = running();
    s.begin_suspend().unwrap();
    assert!(s.begin_snapshot("s1").is_err());
    assert!(
        s.end_snapshot().is_err(),
        "a suspend is not ended as a snapshot"
    );
}

#[test]
fn recovery_takes_the_snapshot_in_flight_and_nothing_else() {
    let mut r = running();
    r.begin_suspend().unwrap();
    assert_eq!(r.take_snapshot_in_flight(), None);
    assert!(r.in_flight.is_some(), "the suspend stays");
    let mut s = running();
    s.begin_snapshot("s1").unwrap();
    assert_eq!(s.take_snapshot_in_flight().as_deref(), Some("s1"));
    assert_eq!(s.in_flight, None);
}

#[test]
fn a_resume_starts_only_from_suspended_and_spends_the_image() {
    let mut r = Record::new("c1", &spec("a"));
    r.state = State::Suspended;
    r.explain(Reason::ResumeInterrupted, "resume again");
    r.begin_resume().unwrap();
    assert_eq!(
        (r.state, r.prior),
        (State::Resuming, Some(State::Suspended))
    );
    r.vm_starting().unwrap();
    r.restored(handle("c1"), 7).unwrap();
    assert_eq!(
        (r.state, r.prior, r.started_unix_nanos),
        (State::Running, None, 7)
    );
    assert_eq!(r.reason, None);
    assert!(running().begin_resume().is_err());
}

#[test]
fn a_refusal_is_a_wrong_state_error_naming_the_capsule() {
    let mut r = running();
    let e = r.vm_starting().unwrap_err().on(&r);
    assert_eq!(e.reason(), Reason::WrongState);
    assert!(e.to_string().contains("c1"), "{e}");
}

#[test]
fn record_round_trips_through_json() {
    let mut r = running();
    r.claim_disk();
    r.disk_made("/d".into()).unwrap();
    r.claim_net();
    r.net_made(addr()).unwrap();
    r.begin_snapshot("s1").unwrap();
    r.explain(Reason::VmCrashed, "boom");
    let text = serde_json::to_string(&r).unwrap();
    assert!(text.contains("\"reason\":\"VmCrashed\""), "{text}");
    let back = Record::decode(text.as_bytes()).unwrap();
    assert_eq!(back, r);
}

#[test]
fn an_unknown_reason_in_a_current_journal_does_not_decode() {
    let mut v = serde_json::to_value(running()).unwrap();
    v["reason"] = "NoSuchReason".into();
    assert!(Record::decode(v.to_string().as_bytes()).is_err());
}

/// A journal a format-1 agent wrote mid-suspend (image complete, paused
/// before it): everything it says may exist is still known.
#[test]
fn a_version_1_journal_loads_with_the_same_meaning() {
    let bytes = include_bytes!("fixtures/v1_suspending.json");
    let r = Record::decode(bytes).unwrap();
    assert_eq!(r.version, RECORD_VERSION);
    assert_eq!(
        (r.uid.as_str(), r.state, r.prior),
        ("7f3c2a10-uid", State::Suspending, Some(State::Paused))
    );
    assert_eq!(
        r.disk_path(),
        Some(&PathBuf::from("/var/lib/wrenn/disks/7f3c2a10-uid.qcow2"))
    );
    assert_eq!(
        r.base_image.as_deref(),
        Some(std::path::Path::new("/var/lib/wrenn/images/t/rootfs.ext4"))
    );
    assert_eq!(
        r.net_addr(),
        Some(&NetAddr {
            ip: "10.200.0.6".into(),
            slot: 3,
            netns: Some("/run/netns/wrenn-7f3c2a10".into()),
        })
    );
    let vm = r.vm().unwrap();
    assert_eq!(
        (vm.process.pid, vm.process.start_time_ticks),
        (4242, 123456)
    );
    assert!(r.suspend_image_complete(), "recovery finishes this suspend");
    assert_eq!(r.reason, Some(Reason::VmFailed));
    assert_eq!(
        r.message.as_deref(),
        Some("pause VM of capsule 7f3c2a10-uid: timed out")
    );
    assert_eq!(r.started_unix_nanos, 1764700000000000000);
    assert!(r.guest_token.is_some() && !r.internal);
    // Written back, it is a current journal meaning the same.
    let again = Record::decode(&serde_json::to_vec(&r).unwrap()).unwrap();
    assert_eq!(again, r);
}

#[test]
fn version_1_flags_map_to_what_they_meant() {
    let fixture: serde_json::Value =
        serde_json::from_slice(include_bytes!("fixtures/v1_suspending.json")).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = fixture.clone();
        edit(&mut v);
        Record::decode(v.to_string().as_bytes()).unwrap()
    };
    // A released network: its stale namespace and address mean nothing.
    let r = with(&|v| v["network"] = false.into());
    assert_eq!(r.held.net, None);
    // A claimed network not made yet.
    let r = with(&|v| {
        v["ip"] = serde_json::Value::Null;
        v["slot"] = serde_json::Value::Null;
    });
    assert_eq!(r.held.net, Some(NetHeld::default()));
    // A VMM starting, none named yet.
    let r = with(&|v| {
        v["vm"] = serde_json::Value::Null;
        v["vm_starting"] = true.into();
    });
    assert_eq!(r.held.vm, VmHeld::Starting);
    // A snapshot being written.
    let r = with(&|v| {
        v["state"] = "Snapshotting".into();
        v["snapshot_in_progress"] = "s1".into();
    });
    assert_eq!(r.in_flight, Some(InFlight::Snapshot { id: "s1".into() }));
    // A settled suspend: the old flag no longer meant a step in flight.
    let r = with(&|v| v["state"] = "Suspended".into());
    assert_eq!(r.in_flight, None);
    // Empty strings were "none"; older spellings read as today's.
    let r = with(&|v| {
        v["reason"] = "".into();
        v["message"] = "".into();
    });
    assert_eq!((r.reason, r.message), (None, None));
    let r = with(&|v| v["reason"] = "VmmCrashed".into());
    assert_eq!(r.reason, Some(Reason::VmCrashed));
    let r = with(&|v| v["reason"] = "Gone".into());
    assert_eq!(r.reason, Some(Reason::NodeError));
    assert_eq!(
        r.message.as_deref(),
        Some("Gone: pause VM of capsule 7f3c2a10-uid: timed out"),
        "the old text is kept"
    );
}

fn info() -> BackendInfo {
    BackendInfo {
        kind: BackendKind::CloudHypervisor,
        version: "v53.0".into(),
        accelerated: true,
    }
}
