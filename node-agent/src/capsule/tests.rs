//! Supervisor unit tests over the recording fakes: each asserts the state a
//! user would see and the calls made to the host (what exists afterwards).
//! One file over ~700 lines on purpose: the lifecycle scenarios share one
//! bed and read as one spec; topic files live beside it in `tests/`.

use std::sync::Arc;
use std::time::Duration;

use super::model::testing::spec;
use super::record::VmHeld;
use super::*;
use crate::network::{CapsuleId as NetId, FakeNet, NetCall, NetOps, Teardown};
use wrenn_crds::reason::Reason;

use crate::storage::{BlockStore, CapsuleId as DiskId, FakeBlockStore};
use crate::vmm::{FAKE_IMAGE, FakeMachine, Machine, Step};

/// Adjusts a bed's supervisor settings, given the bed's temp dir; applied
/// again on every restart.
type Tune = fn(&mut SupervisorConfig, &std::path::Path);

/// The settings every bed starts from: state in `dir`, a fake kernel.
fn config(dir: &std::path::Path) -> SupervisorConfig {
    SupervisorConfig::new(dir, std::path::Path::new("/k/vmlinux"))
}

/// A supervisor over the fake machine and network and `store`.
fn supervisor_over(
    machine: &Arc<FakeMachine>,
    net: &Arc<FakeNet>,
    store: Arc<dyn BlockStore>,
    cfg: SupervisorConfig,
) -> Supervisor<FakeMachine> {
    let host = Host {
        machine: machine.clone(),
        net: net.clone(),
        store,
    };
    Supervisor::new(host, cfg)
}

struct Bed {
    dir: tempfile::TempDir,
    machine: Arc<FakeMachine>,
    net: Arc<FakeNet>,
    store: Arc<FakeBlockStore>,
    sup: Supervisor<FakeMachine>,
    tune: Tune,
}

impl Bed {
    fn new() -> Self {
        Self::with(|_, _| {})
    }

    fn with(tune: Tune) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let machine = Arc::new(FakeMachine::new());
        let net = Arc::new(FakeNet::new());
        let store = Arc::new(FakeBlockStore::new());
        let sup = Self::supervisor(&dir, &machine, &net, &store, tune);
        Self {
            dir,
            machine,
            net,
            store,
            sup,
            tune,
        }
    }

    fn supervisor(
        dir: &tempfile::TempDir,
        machine: &Arc<FakeMachine>,
        net: &Arc<FakeNet>,
        store: &Arc<FakeBlockStore>,
        tune: Tune,
    ) -> Supervisor<FakeMachine> {
        let mut cfg = config(dir.path());
        tune(&mut cfg, dir.path());
        supervisor_over(machine, net, store.clone(), cfg)
    }

    /// Drops every in-memory state and starts a new supervisor on the same
    /// host and state dir: an agent restart.
    fn restart(&mut self) {
        self.sup.shutdown();
        self.sup = Self::supervisor(&self.dir, &self.machine, &self.net, &self.store, self.tune);
    }

    fn journal_exists(&self, uid: &str) -> bool {
        self.dir
            .path()
            .join("capsules")
            .join(uid)
            .join(crate::state::JOURNAL_FILE)
            .exists()
    }

    /// Nothing of `uid` left on the host.
    fn assert_gone(&self, uid: &str) {
        assert!(
            !self.machine.running().contains(&uid.to_string()),
            "VM of {uid} left"
        );
        let id = NetId::new(uid).unwrap();
        assert!(!self.net.built().contains(&id), "network of {uid} left");
        assert_eq!(self.net.slot(&id), None, "slot of {uid} left");
        assert!(
            !self.store.disks().contains(&DiskId::new(uid).unwrap()),
            "disk of {uid} left"
        );
        assert!(
            !self.dir.path().join("capsules").join(uid).exists(),
            "files of {uid} left"
        );
        assert!(self.sup.get(uid).is_err());
    }
}

async fn create(b: &Bed, uid: &str) -> CapsuleView {
    b.sup.create(uid, spec(uid), State::Running).await.unwrap()
}

#[tokio::test]
async fn create_is_idempotent_by_uid_and_refuses_another_spec() {
    let b = Bed::new();
    let v = create(&b, "c1").await;
    assert_eq!(v.state, State::Running);
    assert!(v.ip.is_some());
    assert!(b.journal_exists("c1"));
    let again = create(&b, "c1").await;
    assert_eq!(again, b.sup.get("c1").unwrap());
    assert_eq!(b.machine.steps("c1"), vec![Step::Launch], "launched once");
    let mut other = spec("c1");
    other.resources.vcpus = 8;
    let err = b.sup.create("c1", other, State::Running).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::AlreadyExists {
                field: "resources",
                ..
            }
        ),
        "{err}"
    );
    // Disk and network were made before the VM, each once.
    let id = NetId::new("c1").unwrap();
    assert_eq!(
        b.net.calls(),
        vec![
            NetCall::Setup(id.clone(), crate::network::EgressPolicy::Allow),
            NetCall::SetNames(id, Default::default()),
        ]
    );
    assert_eq!(b.store.calls().len(), 1);
}

/// Creates `c1`, which must fail with `cause` in its error and leave
/// nothing behind.
async fn failed_create(b: &Bed, cause: &str) {
    let err = b
        .sup
        .create("c1", spec("c1"), State::Running)
        .await
        .unwrap_err();
    assert!(err.chain().contains(cause), "{}", err.chain());
    b.assert_gone("c1");
}

#[tokio::test]
async fn a_failed_launch_leaves_nothing() {
    let b = Bed::new();
    b.machine.fail_next(Step::Launch, "no kvm");
    failed_create(&b, "no kvm").await;
    // And the UID can be created again.
    create(&b, "c1").await;
}

/// The disk and the network are claimed in one journal write before the
/// disk is made: a disk that cannot be made takes the claimed, never made
/// network down with it.
#[tokio::test]
async fn a_failed_disk_leaves_nothing_though_the_network_was_claimed_with_it() {
    let b = Bed::new();
    b.store.fail_next("ensure_disk");
    failed_create(&b, "ensure_disk").await;
    assert!(
        !b.net
            .calls()
            .iter()
            .any(|c| matches!(c, crate::network::NetCall::Setup(..))),
        "a network was made after the disk failed: {:?}",
        b.net.calls()
    );
    create(&b, "c1").await;
}

#[tokio::test]
async fn pause_and_resume_with_failure_semantics() {
    let b = Bed::new();
    create(&b, "c1").await;
    b.machine.fail_next(Step::Pause, "timeout");
    let err = b.sup.pause("c1").await.unwrap_err();
    assert!(err.chain().contains("timeout"));
    let v = b.sup.get("c1").unwrap();
    assert_eq!(v.state, State::Running, "a failed pause returns to Running");
    assert!(v.message.as_deref().unwrap_or_default().contains("timeout"));
    assert_eq!(b.machine.paused("c1"), Some(false));

    assert_eq!(b.sup.pause("c1").await.unwrap().state, State::Paused);
    assert_eq!(
        b.sup.pause("c1").await.unwrap().state,
        State::Paused,
        "no-op"
    );
    b.machine.fail_next(Step::Resume, "busy");
    b.sup.resume("c1").await.unwrap_err();
    assert_eq!(b.sup.get("c1").unwrap().state, State::Paused, "retryable");
    assert_eq!(b.sup.resume("c1").await.unwrap().state, State::Running);
    assert_eq!(b.machine.paused("c1"), Some(false));
    assert_eq!(b.sup.get("c1").unwrap().message, None);
}

#[tokio::test]
async fn suspend_releases_the_vm_keeps_the_slot_and_resume_restores() {
    let b = Bed::new();
    let v = create(&b, "c1").await;
    let id = NetId::new("c1").unwrap();
    let slot = b.net.slot(&id);
    let s = b.sup.suspend("c1").await.unwrap();
    assert_eq!(s.state, State::Suspended);
    assert!(b.machine.running().is_empty(), "RAM released: no VMM");
    assert_eq!(b.net.slot(&id), slot, "slot kept");
    assert!(!b.net.built().contains(&id));
    assert!(b.sup.layout().suspend_dir("c1").join(FAKE_IMAGE).exists());
    assert_eq!(
        b.machine.steps("c1"),
        vec![Step::Launch, Step::Pause, Step::Snapshot, Step::Stop]
    );
    assert!(
        b.net
            .calls()
            .contains(&NetCall::Teardown(id.clone(), Teardown::KeepSlot))
    );

    // A failed restore leaves it Suspended and retryable.
    b.machine.fail_next(Step::Restore, "cpuid mismatch");
    b.sup.resume("c1").await.unwrap_err();
    let after = b.sup.get("c1").unwrap();
    assert_eq!(after.state, State::Suspended);
    assert!(
        after
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("cpuid mismatch")
    );
    assert!(b.machine.running().is_empty());
    assert!(!b.net.built().contains(&id), "network undone");

    let r = b.sup.resume("c1").await.unwrap();
    assert_eq!(r.state, State::Running);
    assert_eq!(r.ip, v.ip, "same address after resume");
    assert_eq!(b.machine.running(), vec!["c1".to_string()]);
    let calls = b.machine.calls();
    let restore = calls
        .iter()
        .rev()
        .find(|c| c.step == Step::Restore)
        .unwrap();
    assert_eq!(
        restore.dir.as_deref(),
        Some(b.sup.layout().suspend_dir("c1").as_path())
    );
    // The network set up again before the restore (which recreates the
    // TAP by name), and the DNS proxy back.
    assert!(b.net.calls().ends_with(&[
        NetCall::Setup(id.clone(), crate::network::EgressPolicy::Allow),
        NetCall::SetNames(id, Default::default()),
    ]));
}

#[tokio::test]
async fn a_failed_suspend_snapshot_returns_to_running() {
    let b = Bed::new();
    create(&b, "c1").await;
    b.machine.fail_next(Step::Snapshot, "disk full");
    b.sup.suspend("c1").await.unwrap_err();
    assert_eq!(b.sup.get("c1").unwrap().state, State::Running);
    assert_eq!(b.machine.paused("c1"), Some(false), "thawed");
    assert!(
        !b.sup
            .layout()
            .suspend_dir("c1")
            .with_extension("tmp")
            .exists()
    );
}

/// Waits until the fake VMM has started `step` for `capsule` (it records a
/// call before its injected delay), so a test acts inside that window
/// instead of guessing it with a sleep.
async fn entered(b: &Bed, capsule: &str, step: Step) {
    wrenn_testkit::eventually(
        Duration::from_secs(10),
        &format!("{step:?} never started for {capsule}"),
        || b.machine.steps(capsule).contains(&step),
    )
    .await;
}

#[tokio::test]
async fn delete_during_create_cancels_it_and_leaks_nothing() {
    let b = Bed::new();
    b.machine.delay(Step::Launch, Duration::from_secs(2));
    let sup = b.sup.clone();
    let creating = tokio::spawn(async move { sup.create("c1", spec("c1"), State::Running).await });
    entered(&b, "c1", Step::Launch).await;
    assert_eq!(b.sup.get("c1").unwrap().state, State::Creating);
    assert!(b.sup.delete("c1").await.unwrap());
    let err = creating.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    b.assert_gone("c1");
    assert!(
        b.machine.steps("c1").contains(&Step::Stop),
        "the launched VM was stopped"
    );
    assert!(
        !b.sup.delete("c1").await.unwrap(),
        "second delete: nothing there"
    );
}

#[tokio::test]
async fn concurrent_pause_and_delete_end_with_nothing() {
    let b = Bed::new();
    for i in 0..10 {
        let uid = format!("c{i}");
        create(&b, &uid).await;
        b.machine.delay(Step::Pause, Duration::from_millis(20));
        let (s1, s2) = (b.sup.clone(), b.sup.clone());
        let (u1, u2) = (uid.clone(), uid.clone());
        let pause = tokio::spawn(async move { s1.pause(&u1).await });
        let delete = tokio::spawn(async move { s2.delete(&u2).await });
        let _ = pause.await.unwrap();
        assert!(delete.await.unwrap().unwrap());
        b.assert_gone(&uid);
    }
}

#[tokio::test]
async fn wrong_states_are_refused_with_a_hint() {
    let b = Bed::new();
    create(&b, "c1").await;
    b.sup.suspend("c1").await.unwrap();
    let err = b.sup.pause("c1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "capsule c1 is suspended; only a running capsule can be paused"
    );
    let err = b.sup.snapshot("c1", "s1", true).await.unwrap_err();
    assert_eq!(err.to_string(), "capsule c1 is suspended; resume it first");
    assert!(matches!(
        b.sup.pause("nope").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn crash_fails_the_capsule_and_poweroff_stops_it() {
    let b = Bed::new();
    create(&b, "c1").await;
    create(&b, "c2").await;
    let mut w = b.sup.watch(b.sup.events_head());
    b.machine.crash("c1");
    b.machine.poweroff("c2");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.live.recv())
            .await
            .unwrap()
            .unwrap();
        let c = ev.capsule.unwrap();
        if matches!(c.state, State::Failed | State::Stopped) {
            seen.push((c.uid, c.state, c.reason));
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("c1".into(), State::Failed, Some(Reason::VmCrashed)),
            ("c2".into(), State::Stopped, Some(Reason::GuestPoweroff))
        ]
    );
    // Runtime released, slot kept until delete.
    assert!(!b.net.built().contains(&NetId::new("c1").unwrap()));
    assert!(b.net.slot(&NetId::new("c1").unwrap()).is_some());
    assert!(b.sup.delete("c1").await.unwrap());
    b.assert_gone("c1");
}

#[tokio::test]
async fn snapshot_returns_to_the_prior_mode() {
    // A real qcow2 store (plain files), so the disk copy is real too.
    let (b, template) = Bed::with_qcow2();
    b.sup
        .create("c1", from_template("c1", &template), State::Running)
        .await
        .unwrap();
    let info = b.sup.snapshot("c1", "s1", true).await.unwrap();
    assert_eq!((info.capsule_uid.as_str(), info.memory), ("c1", true));
    assert_eq!(b.sup.get("c1").unwrap().state, State::Running);
    assert_eq!(b.machine.paused("c1"), Some(false));
    let dir = b.sup.layout().snapshot_dir("s1");
    assert!(dir.join("memory").join(FAKE_IMAGE).exists());
    assert!(dir.join("snapshot.json").exists());
    // A qcow2 overlay is copied as such and named for its format.
    let disk = dir.join("disk.qcow2");
    let overlay = b.dir.path().join("disks/wrenn-c1.qcow2");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        std::fs::read(&overlay).unwrap()
    );
    assert!(matches!(
        b.sup.snapshot("c1", "s1", true).await,
        Err(Error::SnapshotExists { .. })
    ));
    b.sup.pause("c1").await.unwrap();
    b.sup.snapshot("c1", "s2", false).await.unwrap();
    assert_eq!(b.sup.get("c1").unwrap().state, State::Paused);
    assert_eq!(b.sup.snapshots(), vec!["s1".to_string(), "s2".to_string()]);
    assert!(b.sup.delete_snapshot("s1").await.unwrap());
    assert!(!b.sup.delete_snapshot("s1").await.unwrap());
}

#[tokio::test]
async fn events_resume_from_a_cursor_in_order() {
    let b = Bed::new();
    let start = b.sup.events_head();
    create(&b, "c1").await;
    b.sup.pause("c1").await.unwrap();
    b.sup.delete("c1").await.unwrap();
    let w = b.sup.watch(start);
    let states: Vec<(EventKind, State)> = w
        .backlog
        .iter()
        .map(|e| (e.kind, e.capsule.as_ref().unwrap().state))
        .collect();
    assert_eq!(
        states.first(),
        Some(&(EventKind::StateChanged, State::Creating))
    );
    assert!(states.contains(&(EventKind::StateChanged, State::Running)));
    assert!(states.contains(&(EventKind::StateChanged, State::Paused)));
    assert_eq!(states.last(), Some(&(EventKind::Deleted, State::Deleting)));
    let seqs: Vec<u64> = w.backlog.iter().map(|e| e.sequence).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");
}

#[tokio::test]
async fn a_refused_name_becomes_an_event_about_its_capsule() {
    let b = Bed::new();
    create(&b, "c1").await;
    let start = b.sup.events_head();
    let reports = tokio::spawn(b.sup.report_name_refusals());
    let refused = |uid: &str, name: &str| crate::network::dns::NameRefused {
        capsule: NetId::new(uid).unwrap(),
        name: name.into(),
        reason: Reason::NameNotAllowed,
        queries: 2,
    };
    // A report about a capsule the agent no longer knows is dropped.
    assert!(b.net.refuse_name(refused("gone", "a.example")));
    assert!(b.net.refuse_name(refused("c1", "evil.example")));
    wrenn_testkit::eventually(Duration::from_secs(5), "an event", || {
        !b.sup.watch(start).backlog.is_empty()
    })
    .await;
    let event = b.sup.watch(start).backlog.into_iter().next().unwrap();
    assert_eq!(event.kind, EventKind::NameRefused);
    assert_eq!(
        event.capsule.map(|c| (c.uid, c.state)),
        Some(("c1".into(), State::Running))
    );
    assert_eq!(event.name_refused, Some(refused("c1", "evil.example")));
    assert_eq!(b.sup.watch(start).backlog.len(), 1);
    reports.abort();
}

#[tokio::test]
async fn recovery_adopts_restores_and_rolls_back() {
    let mut b = Bed::new();
    create(&b, "run").await;
    create(&b, "paused").await;
    b.sup.pause("paused").await.unwrap();
    create(&b, "susp").await;
    b.sup.suspend("susp").await.unwrap();
    create(&b, "dead").await;
    // An interrupted create: journaled with a disk and a network made.
    let mut rec = Record::new("half", &spec("half"));
    rec.claim_disk();
    rec.claim_net();
    b.store
        .ensure_disk(&crate::storage::DiskRequest {
            capsule: DiskId::new("half").unwrap(),
            template: "/t".into(),
            size_bytes: 1,
        })
        .unwrap();
    b.net
        .setup(
            &NetId::new("half").unwrap(),
            &crate::network::EgressPolicy::Allow,
        )
        .unwrap();
    crate::state::Journal::new(b.dir.path())
        .write("half", &rec)
        .unwrap();
    b.leave_orphans();

    b.restart();
    // The VM of "dead" died while the agent was down.
    b.machine.vanish("dead");
    let report = b.sup.recover(&OrphanSweep::default()).await.unwrap();

    let mut adopted = report.adopted.clone();
    adopted.sort();
    assert_eq!(adopted, vec!["paused".to_string(), "run".to_string()]);
    assert_eq!(report.suspended, vec!["susp".to_string()]);
    assert_eq!(report.lost, vec!["dead".to_string()]);
    assert_eq!(report.orphans.journals, 1);
    assert_eq!(report.orphans.rolled_back, 1);
    assert_eq!(
        report.orphans.storage.files.len(),
        1,
        "{:?}",
        report.orphans
    );
    assert!(report.orphans.total() >= 3);

    let state = |u: &str| b.sup.get(u).unwrap().state;
    assert_eq!(state("run"), State::Running);
    assert_eq!(state("paused"), State::Paused);
    assert_eq!(state("susp"), State::Suspended);
    assert_eq!(state("dead"), State::Failed);
    b.assert_gone("half");
    assert!(!b.dir.path().join("capsules/stray").exists());
    assert!(b.machine.steps("run").contains(&Step::Adopt));

    // Adopted capsules work as before the restart.
    b.sup.resume("paused").await.unwrap();
    b.sup.resume("susp").await.unwrap();
    assert_eq!(state("susp"), State::Running);
    // The re-armed crash watcher still reports a crash.
    b.machine.crash("run");
    wrenn_testkit::eventually(Duration::from_secs(5), "crash not seen", || {
        state("run") == State::Failed
    })
    .await;
}

#[tokio::test]
async fn recovery_finishes_an_interrupted_suspend_and_undoes_a_snapshot() {
    let mut b = Bed::new();
    create(&b, "a").await;
    create(&b, "s").await;
    // "a": its suspend image was complete when the agent died.
    b.sup.pause("a").await.unwrap();
    let mut rec: Record = crate::state::Journal::new(b.dir.path())
        .read("a")
        .unwrap()
        .unwrap();
    let dir = b.sup.layout().suspend_dir("a");
    std::fs::create_dir_all(&dir).unwrap();
    let vm = rec.vm().cloned().unwrap();
    b.machine.snapshot(&vm, &dir).await.unwrap();
    rec.back_to(State::Running);
    rec.begin_suspend().unwrap();
    rec.suspend_image_written().unwrap();
    crate::state::Journal::new(b.dir.path())
        .write("a", &rec)
        .unwrap();
    // "s": snapshotting, paused by the step, staging half written.
    let vm_s: Record = crate::state::Journal::new(b.dir.path())
        .read("s")
        .unwrap()
        .unwrap();
    b.machine.pause(vm_s.vm().unwrap()).await.unwrap();
    let mut rec = vm_s.clone();
    rec.begin_snapshot("snap").unwrap();
    crate::state::Journal::new(b.dir.path())
        .write("s", &rec)
        .unwrap();
    let staging = b.sup.layout().snapshot_staging("snap");
    std::fs::create_dir_all(&staging).unwrap();

    b.restart();
    b.sup.recover(&OrphanSweep::default()).await.unwrap();
    assert_eq!(b.sup.get("a").unwrap().state, State::Suspended);
    assert!(!b.machine.running().contains(&"a".to_string()));
    assert_eq!(b.sup.get("s").unwrap().state, State::Running);
    assert_eq!(
        b.machine.paused("s"),
        Some(false),
        "thawed after the snapshot"
    );
    assert!(!staging.exists());
    b.sup.resume("a").await.unwrap();
}

#[tokio::test]
async fn the_journal_is_written_before_each_side_effect() {
    let b = Bed::new();
    let journal = crate::state::Journal::new(b.dir.path());
    // Read the journal while the VMM step is in flight.
    b.machine.delay(Step::Launch, Duration::from_secs(2));
    let sup = b.sup.clone();
    let creating = tokio::spawn(async move { sup.create("c1", spec("c1"), State::Running).await });
    entered(&b, "c1", Step::Launch).await;
    let rec: Record = journal.read("c1").unwrap().unwrap();
    assert_eq!(rec.state(), State::Creating);
    assert!(rec.held.disk.is_some() && rec.held.net.is_some(), "{rec:?}");
    assert_eq!(rec.held.vm, VmHeld::Starting);
    creating.await.unwrap().unwrap();
    let rec: Record = journal.read("c1").unwrap().unwrap();
    assert_eq!(rec.state(), State::Running);
    assert!(rec.vm().is_some());

    b.machine.delay(Step::Snapshot, Duration::from_secs(2));
    let sup = b.sup.clone();
    let suspending = tokio::spawn(async move { sup.suspend("c1").await });
    entered(&b, "c1", Step::Snapshot).await;
    let rec: Record = journal.read("c1").unwrap().unwrap();
    assert_eq!(
        (rec.state(), rec.prior()),
        (State::Suspending, Some(State::Running))
    );
    assert!(!rec.suspend_image_complete());
    suspending.await.unwrap().unwrap();
    let rec: Record = journal.read("c1").unwrap().unwrap();
    assert_eq!(rec.state(), State::Suspended);
    assert!(rec.in_flight().is_none() && rec.vm().is_none() && rec.held.net.is_some());
    // Resumed, the old image no longer counts: a crash during the next
    // suspend must not finish it with stale memory.
    b.sup.resume("c1").await.unwrap();
    let rec: Record = journal.read("c1").unwrap().unwrap();
    assert!(!rec.suspend_image_complete() && rec.in_flight().is_none());
}

// ---- capsules from snapshots and images ---------------------------------------

impl Bed {
    /// A bed whose disks are real qcow2 overlays over a 1 MiB template, so
    /// snapshot disks and bases are real files.
    fn with_qcow2() -> (Self, std::path::PathBuf) {
        let b = Bed::new();
        let template = b.dir.path().join("base.ext4");
        std::fs::write(&template, vec![7u8; 1 << 20]).unwrap();
        let sup = b.qcow2_supervisor();
        (Bed { sup, ..b }, template)
    }

    /// What a crash can leave for recovery's sweep: a capsule directory
    /// without a journal (`stray`) and a disk nobody journaled
    /// (`lost-disk`).
    fn leave_orphans(&self) {
        std::fs::create_dir_all(self.dir.path().join("capsules/stray")).unwrap();
        self.store
            .ensure_disk(&crate::storage::DiskRequest {
                capsule: DiskId::new("lost-disk").unwrap(),
                template: "/t".into(),
                size_bytes: 1,
            })
            .unwrap();
    }

    fn qcow2_supervisor(&self) -> Supervisor<FakeMachine> {
        let store = crate::storage::Qcow2Store::open(crate::storage::StorageConfig::new(
            self.dir.path().join("disks"),
        ))
        .unwrap();
        supervisor_over(
            &self.machine,
            &self.net,
            Arc::new(store),
            config(self.dir.path()),
        )
    }

    /// A [`Bed::with_qcow2`] where capsule `src` runs from the template
    /// and snapshot `id` of it was taken (`memory`: with its memory).
    async fn with_snapshot(id: &str, memory: bool) -> (Self, std::path::PathBuf) {
        let (b, template) = Bed::with_qcow2();
        b.sup
            .create("src", from_template("src", &template), State::Running)
            .await
            .unwrap();
        b.sup.snapshot("src", id, memory).await.unwrap();
        (b, template)
    }

    /// [`Bed::restart`] of a bed made by [`Bed::with_qcow2`].
    fn restart_qcow2(&mut self) {
        self.sup.shutdown();
        self.sup = self.qcow2_supervisor();
    }

    fn overlay(&self, uid: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("disks/wrenn-{uid}.qcow2"))
    }

    /// The link capsules from snapshot `id` are made over.
    fn base(&self, id: &str) -> std::path::PathBuf {
        self.bases()
            .into_iter()
            .find(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{id}.")))
            })
            .unwrap_or_else(|| panic!("no base of {id}: {:?}", self.bases()))
            .join("disk.qcow2")
    }

    /// Every base directory on the node.
    fn bases(&self) -> Vec<std::path::PathBuf> {
        let mut all: Vec<_> = std::fs::read_dir(self.sup.layout().bases_root())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        all.sort();
        all
    }
}

fn from_template(uid: &str, template: &std::path::Path) -> CapsuleSpec {
    let mut s = spec(uid);
    s.source = BootSource::Template(TemplateDisk {
        key: "t".into(),
        rootfs: template.to_path_buf(),
        digest: String::new(),
    });
    s
}

fn from_snapshot(uid: &str, id: &str) -> CapsuleSpec {
    let mut s = spec(uid);
    s.source = BootSource::Snapshot { id: id.into() };
    s
}

/// Every file of `dir` with its content, to show nothing was written.
fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_capsule_from_a_snapshot_restores_its_memory_over_its_own_disk() {
    let (b, _) = Bed::with_snapshot("s1", true).await;
    let snap = b.sup.layout().snapshot_dir("s1");
    let before = tree(&snap);

    let v = b
        .sup
        .create("new", from_snapshot("new", "s1"), State::Running)
        .await
        .unwrap();
    assert_eq!(v.state, State::Running);
    // Restored (not booted) from the snapshot's memory, as itself.
    let restore: Vec<_> = b
        .machine
        .calls()
        .into_iter()
        .filter(|c| c.capsule == "new")
        .collect();
    assert_eq!(restore.len(), 1, "{restore:?}");
    assert_eq!(restore[0].step, Step::Restore);
    assert_eq!(
        restore[0].dir.as_deref(),
        Some(snap.join("memory").as_path())
    );
    // Its own overlay, based on the snapshot's disk (a qcow2 copy here)
    // through its own hard link to it.
    let info = crate::storage::qcow2::read_info(&b.overlay("new")).unwrap();
    let pinned = b.base("s1");
    assert_eq!(
        info.backing_file.as_deref(),
        Some(pinned.to_str().unwrap()),
        "{info:?}"
    );
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&pinned).unwrap().ino(),
        std::fs::metadata(snap.join("disk.qcow2")).unwrap().ino(),
        "a link, not a copy"
    );
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    assert_ne!(b.overlay("new"), b.overlay("src"));

    // The source goes; the snapshot stays whole and starts more capsules.
    assert!(b.sup.delete("src").await.unwrap());
    b.assert_gone("src");
    b.sup
        .create("again", from_snapshot("again", "s1"), State::Running)
        .await
        .unwrap();
    assert_eq!(b.machine.steps("again"), vec![Step::Restore]);
    assert_eq!(tree(&snap), before, "the snapshot was written");

    // Deleting the snapshot leaves its capsules their disks: "new" still
    // suspends and resumes (its disk reopened), and its base is still there.
    assert!(b.sup.delete_snapshot("s1").await.unwrap());
    assert!(!snap.exists());
    b.sup.suspend("new").await.unwrap();
    assert_eq!(b.sup.resume("new").await.unwrap().state, State::Running);
    assert!(
        pinned.is_file(),
        "the capsule's base went with the snapshot"
    );
    for uid in ["new", "again"] {
        assert!(b.sup.delete(uid).await.unwrap());
        b.assert_gone(uid);
        assert!(!b.overlay(uid).exists(), "overlay of {uid} left");
    }
    assert_eq!(b.bases(), Vec::<std::path::PathBuf>::new(), "base left");
}

#[tokio::test]
async fn a_disk_only_snapshot_boots_cold_from_its_disk() {
    let (b, _) = Bed::with_snapshot("cold", false).await;
    let mut s = from_snapshot("new", "cold");
    // Without memory the shape may change.
    s.resources.vcpus = 4;
    b.sup.create("new", s, State::Running).await.unwrap();
    assert_eq!(b.machine.steps("new"), vec![Step::Launch]);
    let info = crate::storage::qcow2::read_info(&b.overlay("new")).unwrap();
    let base = b.base("cold");
    assert_eq!(info.backing_file.as_deref(), Some(base.to_str().unwrap()));
}

#[tokio::test]
async fn a_missing_or_mismatched_snapshot_is_refused_and_leaves_nothing() {
    let (b, template) = Bed::with_qcow2();
    let err = b
        .sup
        .create("new", from_snapshot("new", "nope"), State::Running)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SnapshotNotFound { ref id } if id == "nope"),
        "{err}"
    );
    assert_eq!(err.to_string(), "snapshot nope not found on this node");
    b.assert_gone("new");
    assert!(!b.overlay("new").exists());

    b.sup
        .create("src", from_template("src", &template), State::Running)
        .await
        .unwrap();
    b.sup.snapshot("src", "s1", true).await.unwrap();
    let mut s = from_snapshot("big", "s1");
    s.resources.memory_bytes *= 2;
    let err = b.sup.create("big", s, State::Running).await.unwrap_err();
    assert!(matches!(err, Error::SnapshotUnusable { .. }), "{err}");
    assert!(err.chain().contains("RAM"), "{}", err.chain());
    b.assert_gone("big");
    assert!(!b.overlay("big").exists());
}

#[tokio::test]
async fn a_failed_restore_from_a_snapshot_leaves_nothing_and_keeps_the_snapshot() {
    let (b, _) = Bed::with_snapshot("s1", true).await;
    let before = tree(&b.sup.layout().snapshot_dir("s1"));
    b.machine.fail_next(Step::Restore, "cpuid mismatch");
    let err = b
        .sup
        .create("new", from_snapshot("new", "s1"), State::Running)
        .await
        .unwrap_err();
    assert!(err.chain().contains("cpuid mismatch"), "{}", err.chain());
    b.assert_gone("new");
    assert!(!b.overlay("new").exists());
    assert_eq!(tree(&b.sup.layout().snapshot_dir("s1")), before);
}

#[tokio::test]
async fn an_image_that_cannot_be_read_fails_with_its_cause_and_leaves_nothing() {
    let b = Bed::new();
    let mut s = spec("c1");
    s.source = BootSource::Image(ImageTemplate {
        key: "k".into(),
        reference: "oci:no-such-layout".into(),
        digest: String::new(),
    });
    let err = b.sup.create("c1", s, State::Running).await.unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    let chain = err.chain();
    assert!(
        chain.contains("build template disk of capsule c1"),
        "{chain}"
    );
    assert!(chain.contains("no-such-layout"), "{chain}");
    b.assert_gone("c1");
    assert!(b.store.calls().is_empty(), "a disk was made");
}

mod bases;
mod prepare;
mod telemetry;

#[tokio::test]
async fn a_journal_log_it_cannot_read_stops_recovery_before_anything_is_touched() {
    let mut b = Bed::new();
    create(&b, "c1").await;
    // The old writer's idle checkpoint first, so nothing replaces the log
    // written below.
    let log = b.dir.path().join("journal.wal");
    wrenn_testkit::eventually(Duration::from_secs(10), "an empty log", || {
        std::fs::metadata(&log).is_ok_and(|m| m.len() == 8)
    })
    .await;
    std::fs::write(&log, b"another agent's log format").unwrap();
    b.restart();
    let err = b.sup.recover(&OrphanSweep::default()).await.unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.contains("journal.wal"), "{chain}");
    assert_eq!(
        b.machine.running(),
        vec!["c1".to_string()],
        "the VM is left alone"
    );
    assert!(b.journal_exists("c1"));
    assert_eq!(std::fs::read(&log).unwrap(), b"another agent's log format");
}
