//! Storage on the real host: qcow2 overlays checked and written with
//! QEMU's own tools, loop devices reused and cleaned up, and dm-snapshot
//! where the kernel has device-mapper. Everything a test creates is undone
//! by guards, also when an assertion fails.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use wrenn_node_agent::storage::loops::LoopRegistry;
use wrenn_node_agent::storage::{
    BlockStore, CapsuleId, DiskFormat, DiskRequest, DmSnapshotStore, Error, Qcow2Store,
    StorageConfig, detect_device_mapper,
};
use wrenn_node_agent::sys::block::LoopHost;
use wrenn_testkit::Tier;

const MIB: u64 = 1 << 20;

/// A raw "template" of `size` bytes filled with `fill`.
fn write_base(path: &Path, size: u64, fill: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![fill; MIB as usize];
    for _ in 0..size / MIB {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Detaches every loop device still on any file under `dir` when dropped.
struct LoopGuard {
    dir: PathBuf,
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let host = LoopHost::default();
        let Ok(dir) = std::fs::canonicalize(&self.dir) else {
            return;
        };
        for dev in host.list().unwrap_or_default() {
            if dev
                .backing_file
                .as_deref()
                .is_some_and(|f| f.starts_with(&dir))
            {
                let _ = host.detach(&dev);
            }
        }
    }
}

/// A host case named `name` with root and the loop driver, a temp dir and
/// its [`LoopGuard`]; `None` once the case is recorded as skipped.
fn loop_case(name: &str) -> Option<(wrenn_testkit::Case, tempfile::TempDir, LoopGuard)> {
    let case = wrenn_testkit::case(Tier::Host, name);
    if let Err(why) = wrenn_testkit::need_root() {
        case.skip(why);
        return None;
    }
    if !Path::new("/dev/loop-control").exists() {
        case.skip("needs /dev/loop-control (loop driver)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let guard = LoopGuard {
        dir: dir.path().to_path_buf(),
    };
    Some((case, dir, guard))
}

/// A disk for `capsule` of `size_bytes` over `template`.
fn disk_request(capsule: &CapsuleId, template: &Path, size_bytes: u64) -> DiskRequest {
    DiskRequest {
        capsule: capsule.clone(),
        template: template.to_path_buf(),
        size_bytes,
    }
}

/// `req` for another capsule.
fn for_capsule(req: &DiskRequest, capsule: &CapsuleId) -> DiskRequest {
    DiskRequest {
        capsule: capsule.clone(),
        ..req.clone()
    }
}

#[track_caller]
fn assert_no_loops_on(dir: &Path) {
    let left = loops_on(dir);
    assert!(left.is_empty(), "loops left behind: {left:?}");
}

fn loops_on(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap();
    LoopHost::default()
        .list()
        .unwrap()
        .into_iter()
        .filter(|d| {
            d.backing_file
                .as_deref()
                .is_some_and(|f| f.starts_with(&dir))
        })
        .map(|d| d.path)
        .collect()
}

/// The kernel clears a detached loop's backing file asynchronously.
fn wait_no_loops_on(dir: &Path) {
    wrenn_testkit::wait_until(std::time::Duration::from_secs(5), "loops detached", || {
        let left = loops_on(dir);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .unwrap();
}

#[test]
fn qcow2_overlay_writes_never_change_the_base() {
    let case = wrenn_testkit::case(Tier::Host, "qcow2_overlay_writes_never_change_the_base");
    for prog in ["qemu-img", "qemu-io"] {
        if let Err(why) = wrenn_testkit::need_program(prog) {
            return case.skip(why);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("template.raw");
    write_base(&base, 64 * MIB, 0x5a);
    let before = sha256_file(&base);

    let store = Qcow2Store::open(StorageConfig::new(dir.path().join("disks"))).unwrap();
    let capsule = CapsuleId::new("qc-1").unwrap();
    let req = disk_request(&capsule, &base, 128 * MIB);
    let disk = store.ensure_disk(&req).unwrap();
    assert_eq!(disk.format, DiskFormat::Qcow2);
    assert_eq!(disk.size_bytes, 128 * MIB);

    // QEMU agrees it is a clean qcow2 over a raw backing file.
    run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&disk.path));
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(&disk.path));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 128 * MIB);
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(
        info["full-backing-filename"],
        std::fs::canonicalize(&base).unwrap().to_str().unwrap()
    );

    let allocated_before = store.allocated_bytes(&capsule).unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0xab 0 4M", "-c", "write -P 0xcd 32M 1M"])
        .args(["-c", "write -P 0xee 96M 1M"])
        .arg(&disk.path));
    // Reads see the writes, the base where nothing was written, and zeros
    // past the end of the base.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-r"])
        .args(["-c", "read -P 0xab 0 4M", "-c", "read -P 0xcd 32M 1M"])
        .args(["-c", "read -P 0x5a 8M 1M", "-c", "read -P 0xee 96M 1M"])
        .args(["-c", "read -P 0 100M 1M"])
        .arg(&disk.path));
    run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&disk.path));

    assert_eq!(sha256_file(&base), before, "base changed under the overlay");
    let allocated_after = store.allocated_bytes(&capsule).unwrap();
    assert!(
        allocated_after >= allocated_before + 6 * MIB,
        "allocated {allocated_before} -> {allocated_after}"
    );

    // Idempotent: the same request adopts; a different one is refused
    // without touching the disk.
    assert_eq!(store.ensure_disk(&req).unwrap(), disk);
    let other = DiskRequest {
        size_bytes: 256 * MIB,
        ..req.clone()
    };
    let err = store.ensure_disk(&other).unwrap_err();
    assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("qc-1"), "{err}");
    assert_eq!(store.allocated_bytes(&capsule).unwrap(), allocated_after);

    store.remove_disk(&capsule).unwrap();
    assert!(!disk.path.exists());
    store.remove_disk(&capsule).unwrap();
    assert_eq!(sha256_file(&base), before);
}

#[test]
fn qcow2_sweep_removes_only_orphans() {
    let _case = wrenn_testkit::case(Tier::Host, "qcow2_sweep_removes_only_orphans");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("template.raw");
    write_base(&base, 4 * MIB, 0);
    let state = dir.path().join("disks");
    let store = Qcow2Store::open(StorageConfig::new(&state)).unwrap();
    let ids: Vec<CapsuleId> = ["a", "b", "c"]
        .iter()
        .map(|i| CapsuleId::new(i).unwrap())
        .collect();
    for id in &ids {
        store.ensure_disk(&disk_request(id, &base, 0)).unwrap();
    }
    std::fs::write(state.join("unrelated.qcow2"), b"x").unwrap();
    std::fs::write(state.join("wrenn-d.qcow2.tmp"), b"half").unwrap();
    let report = store.sweep(&ids[..1]).unwrap();
    let mut removed: Vec<String> = report
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        vec!["wrenn-b.qcow2", "wrenn-c.qcow2", "wrenn-d.qcow2.tmp"]
    );
    assert!(store.overlay_path(&ids[0]).exists());
    assert!(state.join("unrelated.qcow2").exists());
}

#[test]
fn loop_devices_are_reused_and_leave_nothing_behind() {
    let Some((_case, dir, _guard)) = loop_case("loop_devices_are_reused_and_leave_nothing_behind")
    else {
        return;
    };
    let base = dir.path().join("base.raw");
    write_base(&base, 8 * MIB, 0x11);
    let cow = dir.path().join("cow");
    write_base(&cow, 8 * MIB, 0);

    let reg = LoopRegistry::new(LoopHost::default());
    let a = reg.acquire(&base, true).unwrap();
    let b = reg.acquire(&base, true).unwrap();
    assert_eq!(a, b, "second acquire must share the device");
    assert!(a.read_only);
    assert_eq!(reg.refs(&base), 2);
    let c = reg.acquire(&cow, false).unwrap();
    assert_ne!(a.index, c.index);
    assert!(!c.read_only);

    // The kernel reports what we attached.
    let seen = LoopHost::default().read(a.index).unwrap().unwrap();
    assert_eq!(
        seen.backing_file.as_deref(),
        Some(std::fs::canonicalize(&base).unwrap().as_path())
    );
    assert!(seen.read_only);
    // Read-only really is read-only.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&a.path)
        .and_then(|mut f| f.write_all(&[0u8; 512]).and_then(|_| f.sync_all()));
    assert!(err.is_err(), "wrote to a read-only loop device");

    // A registry that starts later (agent restart) adopts the existing
    // device instead of allocating another one.
    let restarted = LoopRegistry::new(LoopHost::default());
    let again = restarted.acquire(&base, true).unwrap();
    assert_eq!(again.index, a.index);
    // Only one device per file.
    assert_eq!(loops_on(dir.path()).len(), 2);

    // The cow device is readable through the loop.
    let mut f = std::fs::File::open(&c.path).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    let mut buf = [1u8; 16];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0u8; 16]);
    drop(f);

    reg.release(&base).unwrap();
    assert!(
        LoopHost::default().read(a.index).unwrap().is_some(),
        "detached while still referenced"
    );
    reg.release(&base).unwrap();
    reg.release(&cow).unwrap();
    // `restarted` still counts one reference, but the device is gone: the
    // release is harmless, and releasing an unknown file is a no-op.
    wait_no_loops_on(dir.path());
    restarted.release(&base).unwrap();
    reg.release(&dir.path().join("never-attached")).unwrap();

    // detach_all is the safety net before deleting a file.
    let d = reg.acquire(&cow, false).unwrap();
    let e = LoopHost::default()
        .attach(&std::fs::canonicalize(&cow).unwrap(), false)
        .unwrap();
    assert_ne!(d.index, e.index);
    let mut gone = reg.detach_all(&cow).unwrap();
    gone.sort();
    assert_eq!(gone.len(), 2);
    wait_no_loops_on(dir.path());
}

/// Skips unless this host has device-mapper; names what is missing.
fn need_device_mapper(cfg: &StorageConfig) -> Result<(), String> {
    detect_device_mapper(cfg).map_err(|why| format!("needs device-mapper: {why}"))
}

#[test]
fn dm_snapshot_writes_never_change_the_base() {
    let case = wrenn_testkit::case(Tier::Kvm, "dm_snapshot_writes_never_change_the_base");
    if let Err(why) = wrenn_testkit::need_root() {
        return case.skip(why);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig::new(dir.path().join("disks"));
    if let Err(why) = need_device_mapper(&cfg) {
        return case.skip(why);
    }
    let _guard = LoopGuard {
        dir: dir.path().to_path_buf(),
    };
    let base = dir.path().join("template.raw");
    write_base(&base, 64 * MIB, 0x5a);
    let before = sha256_file(&base);
    let capsule = CapsuleId::new(&wrenn_testkit::unique_name("dmt")).unwrap();
    let store = DmSnapshotStore::open(cfg.clone()).unwrap();
    /// Removes the test's dm device even if the test fails.
    struct DmGuard<'a>(&'a DmSnapshotStore, CapsuleId);
    impl Drop for DmGuard<'_> {
        fn drop(&mut self) {
            let _ = self.0.remove_disk(&self.1);
        }
    }
    let _dm_guard = DmGuard(&store, capsule.clone());
    let req = disk_request(&capsule, &base, 32 * MIB);
    let disk = store.ensure_disk(&req).unwrap();
    assert_eq!(disk.format, DiskFormat::Raw);
    assert_eq!(disk.size_bytes, 64 * MIB);
    // CoW is never smaller than the origin.
    assert!(std::fs::metadata(store.cow_path(&capsule)).unwrap().len() >= 64 * MIB);
    let allocated_before = store.allocated_bytes(&capsule).unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.path)
            .unwrap();
        f.write_all(&vec![0xab; 4 * MIB as usize]).unwrap();
        f.sync_all().unwrap();
        f.seek(SeekFrom::Start(8 * MIB)).unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x5a));
    }
    assert_eq!(
        sha256_file(&base),
        before,
        "base changed under the snapshot"
    );
    assert!(store.allocated_bytes(&capsule).unwrap() > allocated_before);
    // Idempotent, and a second capsule shares the origin loop.
    assert_eq!(store.ensure_disk(&req).unwrap(), disk);
    let second = CapsuleId::new(&wrenn_testkit::unique_name("dmt")).unwrap();
    let _dm_guard2 = DmGuard(&store, second.clone());
    store.ensure_disk(&for_capsule(&req, &second)).unwrap();
    assert_eq!(
        loops_on(dir.path()).len(),
        3,
        "one origin loop, two cow loops"
    );
    store.remove_disk(&second).unwrap();
    store.remove_disk(&capsule).unwrap();
    assert!(!disk.path.exists());
    assert_no_loops_on(dir.path());
    assert_eq!(sha256_file(&base), before);
}

#[test]
fn auto_detection_picks_what_the_host_has() {
    let _case = wrenn_testkit::case(Tier::Host, "auto_detection_picks_what_the_host_has");
    use wrenn_node_agent::storage::{Backend, BackendChoice, open_store};
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig::new(dir.path().join("disks"));
    let dm = detect_device_mapper(&cfg);
    if dm.is_ok() && wrenn_testkit::need_root().is_err() {
        // Opening device-mapper needs root; nothing more to check here.
        return;
    }
    let store = open_store(BackendChoice::Auto, cfg.clone()).unwrap();
    let want = if dm.is_ok() {
        Backend::DmSnapshot
    } else {
        Backend::Qcow2
    };
    assert_eq!(store.backend(), want);
    if let Err(why) = dm {
        let err = open_store(BackendChoice::Fixed(Backend::DmSnapshot), cfg).unwrap_err();
        assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
        assert!(err.to_string().contains(&why), "{err}");
    }
}

/// The dm-snapshot store's own logic (adopt, replace stale, roll back,
/// detach the CoW loop even when the device stays busy) on real loop
/// devices, with device-mapper itself faked: it runs where the kernel has
/// no device-mapper.
#[test]
fn dm_store_logic_over_real_loops_and_fake_dm() {
    use std::sync::Arc;
    use wrenn_node_agent::storage::SnapshotTable;
    use wrenn_node_agent::sys::block::dm::{DmCall, FakeDm};

    let Some((_case, dir, _guard)) = loop_case("dm_store_logic_over_real_loops_and_fake_dm") else {
        return;
    };
    let base = dir.path().join("template.raw");
    write_base(&base, 16 * MIB, 0x5a);
    let cfg = StorageConfig::new(dir.path().join("disks"));
    let fake = Arc::new(FakeDm::default());
    let store = DmSnapshotStore::with_dm(cfg.clone(), fake.clone()).unwrap();
    let a = CapsuleId::new("cap-a").unwrap();
    let req = disk_request(&a, &base, 4 * MIB);

    // Create: one origin loop (read-only), one CoW loop, table as DESIGN §4.
    let disk = store.ensure_disk(&req).unwrap();
    assert_eq!(disk.path, cfg.dev_dir.join("mapper/wrenn-cap-a"));
    assert_eq!(disk.size_bytes, 16 * MIB);
    let cow = store.cow_path(&a);
    assert_eq!(
        std::fs::metadata(&cow).unwrap().len(),
        16 * MIB,
        "CoW smaller than origin"
    );
    let host = LoopHost::default();
    let base_loop = host.find_by_backing_file(&base).unwrap();
    let cow_loop = host.find_by_backing_file(&cow).unwrap();
    assert_eq!((base_loop.len(), cow_loop.len()), (1, 1));
    assert!(base_loop[0].read_only && !cow_loop[0].read_only);
    let table = SnapshotTable::from_raw(&fake_table(&fake, "wrenn-cap-a")).unwrap();
    assert_eq!(
        table.to_string(),
        format!(
            "0 32768 snapshot 7:{} 7:{} P 8",
            base_loop[0].index, cow_loop[0].index
        )
    );

    // Idempotent; a second capsule shares the origin loop.
    assert_eq!(store.ensure_disk(&req).unwrap(), disk);
    let b = CapsuleId::new("cap-b").unwrap();
    store.ensure_disk(&for_capsule(&req, &b)).unwrap();
    assert_eq!(host.find_by_backing_file(&base).unwrap().len(), 1);
    assert_eq!(loops_on(dir.path()).len(), 3);
    let creates = |f: &FakeDm| {
        f.calls()
            .iter()
            .filter(|c| matches!(c, DmCall::Create(..)))
            .count()
    };
    assert_eq!(creates(&fake), 2);

    // Restart: a new store adopts both devices and their loops.
    drop(store);
    let store = DmSnapshotStore::with_dm(cfg.clone(), fake.clone()).unwrap();
    assert_eq!(store.ensure_disk(&req).unwrap(), disk);
    assert_eq!(creates(&fake), 2, "adopted device was recreated");
    assert_eq!(loops_on(dir.path()).len(), 3);

    // Removing one capsule keeps the shared origin for the other.
    store.remove_disk(&b).unwrap();
    assert!(!store.cow_path(&b).exists());
    assert_eq!(host.find_by_backing_file(&base).unwrap().len(), 1);
    assert_eq!(loops_on(dir.path()).len(), 2);

    // A device that stays busy: the error says so, the CoW loop is
    // detached anyway and the CoW file (the capsule's data) is kept.
    fake.busy_removes(1);
    let err = store.remove_disk(&a).unwrap_err();
    assert!(
        matches!(err, Error::DeviceMapper { .. }) && err.to_string().contains("wrenn-cap-a"),
        "{err}"
    );
    assert!(host.find_by_backing_file(&cow).unwrap().is_empty());
    assert!(cow.exists());
    // The retry finishes the job and releases the origin.
    store.remove_disk(&a).unwrap();
    assert!(fake.devices().is_empty());
    assert!(!cow.exists());
    assert_no_loops_on(dir.path());

    // A stale device of another shape is replaced, not adopted.
    fake.insert(
        "wrenn-cap-a",
        vec![(0, 8, "snapshot".into(), "7:250 7:251 P 8".into())],
    );
    store.ensure_disk(&req).unwrap();
    let now = SnapshotTable::from_raw(&fake_table(&fake, "wrenn-cap-a")).unwrap();
    assert_eq!(*now.table.length, 32768);
    store.remove_disk(&a).unwrap();

    // A failed create leaves no loop, no CoW file and no device.
    fake.fail_next_create();
    let err = store.ensure_disk(&req).unwrap_err();
    assert!(err.to_string().contains("create"), "{err}");
    assert!(fake.devices().is_empty());
    assert!(!cow.exists());
    assert_no_loops_on(dir.path());

    // Sweep: devices and CoW files of capsules not kept go.
    store.ensure_disk(&req).unwrap();
    store.ensure_disk(&for_capsule(&req, &b)).unwrap();
    let report = store.sweep(std::slice::from_ref(&a)).unwrap();
    assert_eq!(report.dm_devices, vec!["wrenn-cap-b".to_string()]);
    assert_eq!(fake.devices(), vec!["wrenn-cap-a".to_string()]);
    store.remove_disk(&a).unwrap();
    assert_no_loops_on(dir.path());

    // 50 create/remove cycles of two capsules leak no loop device or file.
    for _ in 0..50 {
        for c in [&a, &b] {
            store.ensure_disk(&for_capsule(&req, c)).unwrap();
        }
        store.remove_disk(&a).unwrap();
        store.remove_disk(&b).unwrap();
    }
    assert_no_loops_on(dir.path());
    assert!(fake.devices().is_empty());
    assert_eq!(std::fs::read_dir(&cfg.state_dir).unwrap().count(), 0);
}

fn fake_table(
    fake: &wrenn_node_agent::sys::block::dm::FakeDm,
    name: &str,
) -> Vec<(u64, u64, String, String)> {
    use wrenn_node_agent::sys::block::dm::DmOps;
    fake.table(name).unwrap().unwrap()
}
