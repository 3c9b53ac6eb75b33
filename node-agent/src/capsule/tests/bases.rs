//! Snapshot chains: a snapshot of a capsule that was itself made from a
//! snapshot keeps working when the capsule and the first snapshot go, and
//! the disks they shared go once nothing uses them.

use std::path::{Path, PathBuf};

use super::*;

/// Every file a disk reaches through its backing names, itself first.
fn chain(disk: &Path) -> Vec<PathBuf> {
    let mut out = vec![disk.to_path_buf()];
    while let Ok(info) = crate::storage::qcow2::read_info(out.last().unwrap()) {
        match info.backing_file {
            Some(next) => out.push(next.into()),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn a_second_generation_snapshot_outlives_its_source_capsule_and_snapshot() {
    let (b, template) = Bed::with_snapshot("s1", true).await;
    b.sup
        .create("mid", from_snapshot("mid", "s1"), State::Running)
        .await
        .unwrap();
    b.sup.snapshot("mid", "s2", true).await.unwrap();
    let s2 = b.sup.layout().snapshot_dir("s2").join("disk.qcow2");
    let links = chain(&s2);
    // s2 → the base of s1 → the template.
    assert_eq!(links.len(), 3, "{links:?}");
    assert_eq!(links[1], b.base("s1"));
    assert_eq!(links[2], template);

    // Everything s2 was made from goes.
    assert!(b.sup.delete("mid").await.unwrap());
    assert!(b.sup.delete_snapshot("s1").await.unwrap());
    assert!(b.sup.delete("src").await.unwrap());
    for link in chain(&s2) {
        assert!(link.is_file(), "{} went with its capsule", link.display());
    }
    assert_eq!(chain(&s2), links);

    // A capsule from s2 starts, and is made over s2's own base.
    let leaf = b
        .sup
        .create("leaf", from_snapshot("leaf", "s2"), State::Running)
        .await
        .unwrap();
    assert_eq!(leaf.state, State::Running);
    let made = chain(&b.overlay("leaf"));
    assert_eq!(made[1], b.base("s2"));
    assert_eq!(&made[2..], &links[1..]);

    // A restarted agent collects nothing still in use.
    let mut b = b;
    b.restart_qcow2();
    b.sup.recover(&OrphanSweep::default()).await.unwrap();
    assert_eq!(b.bases().len(), 2, "{:?}", b.bases());

    // Once the last user goes, so do the bases; the template stays.
    assert!(b.sup.delete_snapshot("s2").await.unwrap());
    assert_eq!(b.bases().len(), 2, "the capsule still uses both");
    assert!(b.sup.delete("leaf").await.unwrap());
    assert_eq!(b.bases(), Vec::<PathBuf>::new());
    assert!(template.is_file());
}

#[tokio::test]
async fn recovery_collects_bases_that_a_crash_left() {
    let (mut b, _) = Bed::with_snapshot("s1", false).await;
    b.sup
        .create("c", from_snapshot("c", "s1"), State::Running)
        .await
        .unwrap();
    let kept = b.base("s1");
    // A base no record names: a delete that stopped before collecting.
    let stray = b.sup.layout().bases_root().join("gone.1");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("disk.qcow2"), b"x").unwrap();
    b.restart_qcow2();
    let report = b.sup.recover(&OrphanSweep::default()).await.unwrap();
    assert!(!stray.exists(), "stray base kept");
    assert!(kept.is_file(), "a used base was collected");
    assert!(report.orphans.dirs >= 1, "{report:?}");
}
