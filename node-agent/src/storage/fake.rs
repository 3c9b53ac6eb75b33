//! `FakeBlockStore`: a `BlockStore` with no side effects that records its
//! calls, for other modules' unit tests (youki's `TestHelperSyscall`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{
    Backend, BlockStore, CapsuleDisk, CapsuleId, DiskFormat, DiskRequest, Error, Result,
    SweepReport,
};

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    /// `ensure_disk(req)`.
    EnsureDisk(DiskRequest),
    /// `remove_disk(capsule)`.
    RemoveDisk(CapsuleId),
    /// `allocated_bytes(capsule)`.
    AllocatedBytes(CapsuleId),
    /// `sweep(keep)`.
    Sweep(Vec<CapsuleId>),
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<FakeCall>,
    disks: BTreeMap<CapsuleId, CapsuleDisk>,
    allocated: BTreeMap<CapsuleId, u64>,
    fail: Option<&'static str>,
}

/// Records calls; disks are paths under `/fake/disks` that do not exist.
#[derive(Debug, Default)]
pub struct FakeBlockStore {
    state: Mutex<State>,
}

impl FakeBlockStore {
    /// An empty fake.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.state().calls.clone()
    }

    /// Capsules that currently have a disk.
    pub fn disks(&self) -> Vec<CapsuleId> {
        self.state().disks.keys().cloned().collect()
    }

    /// Makes the next call of the named method (`ensure_disk`,
    /// `remove_disk`, `allocated_bytes`, `sweep`) fail with
    /// [`Error::Fake`]; the call is still recorded.
    pub fn fail_next(&self, method: &'static str) {
        self.state().fail = Some(method);
    }

    /// What `allocated_bytes` reports for `capsule`.
    pub fn set_allocated(&self, capsule: &CapsuleId, bytes: u64) {
        self.state().allocated.insert(capsule.clone(), bytes);
    }

    fn record(
        &self,
        call: FakeCall,
        method: &'static str,
    ) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state();
        s.calls.push(call);
        if s.fail == Some(method) {
            s.fail = None;
            return Err(Error::Fake(method));
        }
        Ok(s)
    }
}

impl BlockStore for FakeBlockStore {
    fn backend(&self) -> Backend {
        Backend::Qcow2
    }

    fn ensure_disk(&self, req: &DiskRequest) -> Result<CapsuleDisk> {
        let mut s = self.record(FakeCall::EnsureDisk(req.clone()), "ensure_disk")?;
        let disk = s
            .disks
            .entry(req.capsule.clone())
            .or_insert_with(|| CapsuleDisk {
                capsule: req.capsule.clone(),
                path: PathBuf::from(format!("/fake/disks/{}.qcow2", req.capsule)),
                format: DiskFormat::Qcow2,
                size_bytes: req.size_bytes,
            });
        Ok(disk.clone())
    }

    fn remove_disk(&self, capsule: &CapsuleId) -> Result<()> {
        let mut s = self.record(FakeCall::RemoveDisk(capsule.clone()), "remove_disk")?;
        s.disks.remove(capsule);
        Ok(())
    }

    fn allocated_bytes(&self, capsule: &CapsuleId) -> Result<u64> {
        let s = self.record(FakeCall::AllocatedBytes(capsule.clone()), "allocated_bytes")?;
        Ok(s.allocated.get(capsule).copied().unwrap_or(0))
    }

    fn sweep(&self, keep: &[CapsuleId]) -> Result<SweepReport> {
        let mut s = self.record(FakeCall::Sweep(keep.to_vec()), "sweep")?;
        let gone: Vec<CapsuleId> = s
            .disks
            .keys()
            .filter(|c| !keep.contains(c))
            .cloned()
            .collect();
        let mut report = SweepReport::default();
        for c in gone {
            if let Some(d) = s.disks.remove(&c) {
                report.files.push(d.path);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_and_injects_failures() {
        let fake = FakeBlockStore::new();
        let c = CapsuleId::new("c1").unwrap();
        let req = DiskRequest {
            capsule: c.clone(),
            template: "/t.img".into(),
            size_bytes: 1 << 30,
        };
        let d1 = fake.ensure_disk(&req).unwrap();
        assert_eq!(fake.ensure_disk(&req).unwrap(), d1);
        fake.fail_next("remove_disk");
        assert!(matches!(
            fake.remove_disk(&c),
            Err(Error::Fake("remove_disk"))
        ));
        assert_eq!(fake.disks(), vec![c.clone()]);
        let report = fake.sweep(&[]).unwrap();
        assert_eq!(report.files, vec![d1.path]);
        assert_eq!(
            fake.calls(),
            vec![
                FakeCall::EnsureDisk(req.clone()),
                FakeCall::EnsureDisk(req),
                FakeCall::RemoveDisk(c),
                FakeCall::Sweep(vec![]),
            ]
        );
    }
}
