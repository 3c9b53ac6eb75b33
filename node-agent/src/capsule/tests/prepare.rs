//! `PrepareTemplate` over the recording fakes and a real qcow2 store: the
//! phases a caller sees, idempotency, retries after a failure, the build VM
//! never showing through the capsule API, and nothing left on the host after
//! a success, a failure or an agent restart in the middle of a build.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::*;
use crate::capsule::templates::{self as warm, BuildGuest, BuildVm, GuestFuture, START_LOG};
use crate::storage::Qcow2Store;
use wrenn_crds::reason::Reason;

/// A guest whose readiness the test controls: probes wait while held, then
/// succeed from the `ready_after`-th on.
#[derive(Debug)]
struct FakeGuest {
    ready_after: AtomicU32,
    fail_start: AtomicBool,
    release: tokio::sync::watch::Sender<bool>,
    starts: Mutex<Vec<(BuildVm, Vec<String>, String)>>,
    /// Probes begun (counted before waiting on the hold).
    probing: AtomicU32,
    /// Probes answered.
    probes: AtomicU32,
}

impl FakeGuest {
    fn new(ready_after: u32) -> Arc<Self> {
        Arc::new(Self {
            ready_after: AtomicU32::new(ready_after),
            fail_start: AtomicBool::new(false),
            release: tokio::sync::watch::channel(true).0,
            starts: Mutex::new(Vec::new()),
            probing: AtomicU32::new(0),
            probes: AtomicU32::new(0),
        })
    }

    fn hold(&self, held: bool) {
        self.release.send_replace(!held);
    }

    fn starts(&self) -> Vec<(BuildVm, Vec<String>, String)> {
        self.starts.lock().unwrap().clone()
    }
}

impl BuildGuest for FakeGuest {
    fn start<'a>(
        &'a self,
        vm: &'a BuildVm,
        argv: &'a [String],
        log_path: &'a str,
    ) -> GuestFuture<'a, Result<u32, warm::GuestError>> {
        Box::pin(async move {
            self.starts
                .lock()
                .unwrap()
                .push((vm.clone(), argv.to_vec(), log_path.to_string()));
            if self.fail_start.load(Ordering::SeqCst) {
                return Err(warm::GuestError::Guest {
                    action: "start the start command",
                    uid: vm.uid.clone(),
                    source: Box::new(crate::guest::Error::Call {
                        capsule: vm.uid.clone(),
                        rpc: "Exec",
                        source: tonic::Status::not_found("spawn \"/srv/app\": no such file"),
                    }),
                });
            }
            Ok(42)
        })
    }

    fn probe<'a>(
        &'a self,
        _vm: &'a BuildVm,
        _readiness: &'a Readiness,
        _within: Duration,
    ) -> GuestFuture<'a, Result<(), warm::GuestError>> {
        Box::pin(async move {
            self.probing.fetch_add(1, Ordering::SeqCst);
            let mut rx = self.release.subscribe();
            let _ = rx.wait_for(|released| *released).await;
            let n = self.probes.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.ready_after.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(warm::GuestError::ProbeExit {
                    argv: vec!["check".into()],
                    how: "code 7".into(),
                    tail: format!("attempt {n}: not yet"),
                })
            }
        })
    }

    fn log_tail<'a>(
        &'a self,
        _vm: &'a BuildVm,
        _log_path: &'a str,
    ) -> GuestFuture<'a, Option<String>> {
        Box::pin(async { Some("server: listening soon".to_string()) })
    }
}

/// Asserts the build failed for `reason` with a message naming `says`.
#[track_caller]
fn assert_failed(status: &TemplateStatus, reason: Reason, says: &str) {
    assert_eq!(status.phase, TemplatePhase::Failed, "{status:?}");
    assert_eq!(status.reason, Some(reason), "{status:?}");
    let message = status.message.as_deref().unwrap_or_default();
    assert!(message.contains(says), "{message:?}");
}

struct WarmBed {
    dir: tempfile::TempDir,
    machine: Arc<FakeMachine>,
    net: Arc<FakeNet>,
    store: Arc<Qcow2Store>,
    guest: Arc<FakeGuest>,
    sup: Supervisor<FakeMachine>,
    template: std::path::PathBuf,
}

impl WarmBed {
    fn new(guest: Arc<FakeGuest>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("base.ext4");
        std::fs::write(&template, vec![7u8; 1 << 20]).unwrap();
        let store = Arc::new(
            Qcow2Store::open(crate::storage::StorageConfig::new(dir.path().join("disks"))).unwrap(),
        );
        let machine = Arc::new(FakeMachine::new());
        let net = Arc::new(FakeNet::new());
        let sup = Self::supervisor(&dir, &machine, &net, &store, &guest);
        Self {
            dir,
            machine,
            net,
            store,
            guest,
            sup,
            template,
        }
    }

    fn supervisor(
        dir: &tempfile::TempDir,
        machine: &Arc<FakeMachine>,
        net: &Arc<FakeNet>,
        store: &Arc<Qcow2Store>,
        guest: &Arc<FakeGuest>,
    ) -> Supervisor<FakeMachine> {
        let mut cfg = config(dir.path());
        cfg.warm_probe_every = Duration::from_millis(10);
        cfg.build_guest = Some(guest.clone());
        supervisor_over(machine, net, store.clone(), cfg)
    }

    /// Every in-memory state dropped, a new supervisor on the same host.
    fn restart(&mut self) {
        self.sup.shutdown();
        self.sup = Self::supervisor(
            &self.dir,
            &self.machine,
            &self.net,
            &self.store,
            &self.guest,
        );
    }

    fn disk_request(&self) -> PrepareRequest {
        PrepareRequest {
            key: "default/web@sha256:aa".into(),
            source: TemplateSource::Rootfs(self.template.clone()),
            digest: "sha256:aa".into(),
            disk_bytes: 0,
            kernel: None,
            cmdline: String::new(),
            warm: None,
            retry: false,
            credentials: None,
        }
    }

    fn warm_request(&self, snapshot_id: &str) -> PrepareRequest {
        PrepareRequest {
            warm: Some(WarmSpec {
                snapshot_id: snapshot_id.into(),
                resources: spec("x").resources,
                env: [("MODE".to_string(), "warm".to_string())].into(),
                start_command: vec!["/srv/app".into(), "--port".into(), "8080".into()],
                readiness: Readiness::TcpPort(8080),
                timeout: Duration::from_secs(5),
            }),
            ..self.disk_request()
        }
    }

    /// Calls until the phase is no longer `Preparing`.
    /// Asks (retrying a failed build) and polls until the build ends.
    async fn settle(&self, req: &PrepareRequest) -> TemplateStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut ask = req.clone();
        ask.retry = true;
        loop {
            let s = self.sup.prepare_template(ask.clone()).await.unwrap();
            ask.retry = false;
            if s.phase != TemplatePhase::Preparing {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "still {s:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Nothing of build VM `uid` on the host: VMM, network, slot, disk,
    /// journal, runtime dir.
    fn assert_gone(&self, uid: &str) {
        assert!(
            !self.machine.running().contains(&uid.to_string()),
            "VM of {uid} left"
        );
        let id = crate::network::CapsuleId::new(uid).unwrap();
        assert!(!self.net.built().contains(&id), "network of {uid} left");
        assert_eq!(self.net.slot(&id), None, "slot of {uid} left");
        let disks: Vec<_> = std::fs::read_dir(self.dir.path().join("disks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(uid))
            .collect();
        assert!(disks.is_empty(), "disk of {uid} left: {disks:?}");
        for d in ["capsules", "vmm"] {
            assert!(
                !self.dir.path().join(d).join(uid).exists(),
                "{d}/{uid} left"
            );
        }
        assert!(self.sup.entry(uid, true).is_none(), "{uid} still known");
    }

    /// Snapshot directories, staging ones included.
    fn snapshot_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.sup.layout().snapshots_root())
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[tokio::test]
async fn a_root_disk_template_is_prepared_listed_and_retried_after_a_failure() {
    let b = WarmBed::new(FakeGuest::new(1));
    let mut req = b.disk_request();
    let missing = b.dir.path().join("later.ext4");
    req.source = TemplateSource::Rootfs(missing.clone());
    let first = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(first.phase, TemplatePhase::Preparing);
    assert_eq!(first.key, "default/web@sha256:aa");
    let failed = b.settle(&req).await;
    assert_failed(&failed, Reason::RootDiskFailed, "later.ext4");
    assert!(b.sup.templates().is_empty());
    // Failed stays failed for a poller, even once the file is there...
    std::fs::write(&missing, b"ext4").unwrap();
    let polled = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(polled.phase, TemplatePhase::Failed);
    // ...until a call asks to retry.
    let mut retry = req.clone();
    retry.retry = true;
    let again = b.sup.prepare_template(retry).await.unwrap();
    assert_eq!(again.phase, TemplatePhase::Preparing);
    let ready = b.settle(&req).await;
    assert_eq!(ready.phase, TemplatePhase::Ready, "{ready:?}");
    assert_eq!(
        (ready.digest.as_deref(), ready.snapshot_id.as_deref()),
        (Some("sha256:aa"), None)
    );
    assert_eq!(
        b.sup.templates(),
        [("default/web@sha256:aa".to_string(), "sha256:aa".to_string())].into()
    );
    // Idempotent, and no VM was ever involved.
    assert_eq!(b.sup.prepare_template(req).await.unwrap(), ready);
    assert!(b.machine.calls().is_empty());
    assert!(b.guest.starts().is_empty());
}

#[tokio::test]
async fn a_warm_build_snapshots_a_hidden_build_vm_then_removes_it() {
    let b = WarmBed::new(FakeGuest::new(3));
    b.guest.hold(true);
    let req = b.warm_request("warm-web-1");
    let build = warm::build_uid("warm-web-1");
    let mut watch = b.sup.watch(0);
    let first = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(first.phase, TemplatePhase::Preparing);

    // Mid-build: the VM runs, the start command was started detached with
    // its log, and nothing of it shows through the capsule API.
    wrenn_testkit::eventually(Duration::from_secs(10), "a readiness probe", || {
        b.guest.probing.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(b.machine.running(), vec![build.clone()]);
    let starts = b.guest.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].0.uid, build);
    assert!(starts[0].0.netns.is_some());
    assert_eq!(starts[0].1, vec!["/srv/app", "--port", "8080"]);
    assert_eq!(starts[0].2, START_LOG);
    let mid = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(mid.phase, TemplatePhase::Preparing);
    assert_eq!(mid.message.as_deref(), Some("waiting for readiness"));
    assert!(b.sup.list().is_empty());
    assert!(b.sup.get(&build).is_err());
    assert!(b.sup.pause(&build).await.is_err());
    assert!(!b.sup.delete(&build).await.unwrap());
    assert!(b.sup.watch(0).backlog.is_empty());
    assert!(b.sup.templates().is_empty());

    b.guest.hold(false);
    let ready = b.settle(&req).await;
    assert_eq!(ready.phase, TemplatePhase::Ready, "{ready:?}");
    assert_eq!(ready.snapshot_id.as_deref(), Some("warm-web-1"));
    assert_eq!(ready.digest.as_deref(), Some("sha256:aa"));
    assert!(b.guest.probes.load(Ordering::SeqCst) >= 3);
    assert_eq!(b.sup.snapshots(), vec!["warm-web-1".to_string()]);
    assert_eq!(
        b.sup.templates(),
        [("default/web@sha256:aa".to_string(), "sha256:aa".to_string())].into()
    );
    b.assert_gone(&build);
    assert_eq!(
        b.machine.steps(&build),
        vec![
            Step::Launch,
            Step::Pause,
            Step::Snapshot,
            Step::Resume,
            Step::Stop
        ]
    );
    assert!(
        watch.live.try_recv().is_err(),
        "the build VM published an event"
    );

    // Idempotent: answered from what exists, nothing built again.
    assert_eq!(b.sup.prepare_template(req.clone()).await.unwrap(), ready);
    assert_eq!(b.machine.steps(&build).len(), 5);

    // A capsule restores from the snapshot with the build's shape.
    let mut s = spec("fromwarm");
    s.source = BootSource::Snapshot {
        id: "warm-web-1".into(),
    };
    let v = b.sup.create("fromwarm", s, State::Running).await.unwrap();
    assert_eq!(v.state, State::Running);
    assert_eq!(b.machine.steps("fromwarm"), vec![Step::Restore]);

    // The snapshot deleted: the next call builds it again.
    assert!(b.sup.delete_snapshot("warm-web-1").await.unwrap());
    assert!(b.sup.templates().is_empty());
    let again = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(again.phase, TemplatePhase::Preparing);
    assert_eq!(b.settle(&req).await.phase, TemplatePhase::Ready);
    assert_eq!(b.machine.steps(&build).len(), 10);
    b.assert_gone(&build);
}

#[tokio::test]
async fn failed_builds_say_why_leave_nothing_and_are_retried() {
    let b = WarmBed::new(FakeGuest::new(u32::MAX));
    let mut req = b.warm_request("warm-web-2");
    if let Some(w) = req.warm.as_mut() {
        w.timeout = Duration::from_millis(300);
    }
    let build = warm::build_uid("warm-web-2");

    // Readiness never comes.
    let failed = b.settle(&req).await;
    assert_eq!(failed.phase, TemplatePhase::Failed);
    assert_eq!(failed.reason, Some(Reason::ReadinessTimeout));
    for part in ["code 7", "not yet", START_LOG, "listening soon"] {
        assert!(
            failed.message.as_deref().unwrap_or_default().contains(part),
            "{part}: {:?}",
            failed.message
        );
    }
    b.assert_gone(&build);
    assert!(b.snapshot_dirs().is_empty(), "{:?}", b.snapshot_dirs());
    // FAILED stays FAILED for pollers, without another build VM...
    b.guest.ready_after.store(0, Ordering::SeqCst);
    let launches = b.machine.steps(&build).len();
    for _ in 0..3 {
        let polled = b.sup.prepare_template(req.clone()).await.unwrap();
        assert_eq!(polled.reason, Some(Reason::ReadinessTimeout));
    }
    assert_eq!(
        b.machine.steps(&build).len(),
        launches,
        "built while polled"
    );
    // ...until a call asks to retry.
    let mut retry = req.clone();
    retry.retry = true;
    let retry = b.sup.prepare_template(retry).await.unwrap();
    assert_eq!(retry.phase, TemplatePhase::Preparing);
    assert_eq!(b.settle(&req).await.phase, TemplatePhase::Ready);
    assert!(b.sup.delete_snapshot("warm-web-2").await.unwrap());

    // The start command cannot start.
    b.guest.fail_start.store(true, Ordering::SeqCst);
    let failed = b.settle(&req).await;
    assert_failed(&failed, Reason::StartFailed, "/srv/app");
    b.assert_gone(&build);
    b.guest.fail_start.store(false, Ordering::SeqCst);

    // The VM does not boot.
    b.machine.fail_next(Step::Launch, "no kvm today");
    let failed = b.settle(&req).await;
    assert_failed(&failed, Reason::BootFailed, "no kvm today");
    b.assert_gone(&build);

    // The snapshot cannot be written.
    b.machine.fail_next(Step::Snapshot, "disk full");
    let failed = b.settle(&req).await;
    assert_failed(&failed, Reason::SnapshotFailed, "disk full");
    b.assert_gone(&build);
    assert!(b.snapshot_dirs().is_empty(), "{:?}", b.snapshot_dirs());
    assert!(b.sup.templates().is_empty());

    // A snapshot id some capsule already used is not overwritten.
    let s = from_template("user", &b.template);
    b.sup.create("user", s, State::Running).await.unwrap();
    b.sup.snapshot("user", "warm-web-2", true).await.unwrap();
    let launches = b.machine.steps(&build).len();
    let failed = b.settle(&req).await;
    assert_failed(&failed, Reason::SnapshotExists, "user");
    assert_eq!(b.machine.steps(&build).len(), launches, "a build VM booted");
}

#[tokio::test]
async fn a_restart_mid_build_removes_the_build_vm_and_the_next_call_builds_again() {
    let mut b = WarmBed::new(FakeGuest::new(1));
    b.guest.hold(true);
    let req = b.warm_request("warm-web-3");
    let build = warm::build_uid("warm-web-3");
    b.sup.prepare_template(req.clone()).await.unwrap();
    wrenn_testkit::eventually(Duration::from_secs(10), "a readiness probe", || {
        b.guest.probing.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(b.machine.running(), vec![build.clone()]);

    b.restart();
    let report = b.sup.recover(&OrphanSweep::default()).await.unwrap();
    assert_eq!(report.orphans.rolled_back, 1, "{report:?}");
    assert!(report.adopted.is_empty() && report.lost.is_empty());
    b.assert_gone(&build);
    assert!(b.sup.list().is_empty());

    // Nothing remembered: the next call builds from scratch.
    b.guest.hold(false);
    let first = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(first.phase, TemplatePhase::Preparing);
    let ready = b.settle(&req).await;
    assert_eq!(ready.phase, TemplatePhase::Ready, "{ready:?}");
    let launches = b.machine.steps(&build).len();

    // A finished template survives a restart: READY at once, no rebuild.
    b.restart();
    b.sup.recover(&OrphanSweep::default()).await.unwrap();
    let after = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(after, ready);
    assert_eq!(b.machine.steps(&build).len(), launches);
    assert_eq!(
        b.sup.templates(),
        [("default/web@sha256:aa".to_string(), "sha256:aa".to_string())].into()
    );
}

#[tokio::test]
async fn a_restart_after_the_snapshot_keeps_it_without_building_again() {
    let mut b = WarmBed::new(FakeGuest::new(1));
    let req = b.warm_request("warm-web-4");
    let build = warm::build_uid("warm-web-4");
    assert_eq!(b.settle(&req).await.phase, TemplatePhase::Ready);
    // As if the agent died after the snapshot and before the answer was
    // recorded: the record is gone, the snapshot is whole.
    std::fs::remove_dir_all(b.dir.path().join("templates")).unwrap();
    b.restart();
    b.sup.recover(&OrphanSweep::default()).await.unwrap();
    let launches = b.machine.steps(&build).len();
    let first = b.sup.prepare_template(req.clone()).await.unwrap();
    assert_eq!(first.phase, TemplatePhase::Preparing);
    let ready = b.settle(&req).await;
    assert_eq!(
        (ready.phase, ready.snapshot_id.as_deref()),
        (TemplatePhase::Ready, Some("warm-web-4"))
    );
    assert_eq!(b.machine.steps(&build).len(), launches, "built again");
}

#[tokio::test]
async fn warm_builds_run_one_at_a_time() {
    let b = WarmBed::new(FakeGuest::new(1));
    b.guest.hold(true);
    let one = b.warm_request("warm-a");
    let two = b.warm_request("warm-b");
    b.sup.prepare_template(one.clone()).await.unwrap();
    wrenn_testkit::eventually(Duration::from_secs(10), "the first build probing", || {
        b.guest.probing.load(Ordering::SeqCst) > 0
    })
    .await;
    let second = b.sup.prepare_template(two.clone()).await.unwrap();
    assert_eq!(second.phase, TemplatePhase::Preparing);
    // The second build's own task says why it waits, once it ran.
    wrenn_testkit::eventually_async(
        Duration::from_secs(10),
        "the second build waiting for the first",
        || async {
            b.sup
                .prepare_template(two.clone())
                .await
                .unwrap()
                .message
                .as_deref()
                == Some("waiting for another warm build to finish")
        },
    )
    .await;
    assert_eq!(b.machine.running(), vec![warm::build_uid("warm-a")]);
    b.guest.hold(false);
    assert_eq!(b.settle(&one).await.phase, TemplatePhase::Ready);
    assert_eq!(b.settle(&two).await.phase, TemplatePhase::Ready);
    assert_eq!(
        b.sup.snapshots(),
        vec!["warm-a".to_string(), "warm-b".to_string()]
    );
    assert!(b.machine.running().is_empty());
}
