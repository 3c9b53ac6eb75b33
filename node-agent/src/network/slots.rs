//! Slot allocator with durable claims: one file per claimed slot under the
//! state directory, so a restarted agent knows which slots (and so which host
//! addresses) belong to capsules that still exist, running or suspended.
//!
//! A claim is a symlink named by the slot whose target is the owner's name
//! (never followed): `symlink(2)` fails with `EEXIST` if the slot is taken,
//! so two processes can never claim the same slot, and the name and its
//! owner appear in one step, so a crash never leaves a claim without its
//! owner. One directory fsync makes it durable, shared by the claims made
//! at the same time ([`DirSync`]), and no lock is held across it: a burst
//! of creates does not queue behind one fsync each. Claims that agents
//! before the symlinks wrote (a file holding the owner) still read.
//!
//! A capsule gone for good does not free its slot at once: its claim is
//! renamed `<slot>.drain` ([`SlotAllocator::begin_release`]) and the slot
//! stays out of use until the conntrack entries of its addresses are gone
//! ([`SlotAllocator::end_release`]), so no later tenant of the address
//! inherits NAT state. A drain a crash interrupted is finished by the
//! startup sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::CapsuleId;

/// Why a claim failed.
#[derive(Debug)]
pub(crate) enum ClaimError {
    /// Every slot is claimed.
    Exhausted,
    /// Another capsule's resources would have the same names.
    ShortIdTaken(CapsuleId),
    /// The claim file could not be written.
    Io(io::Error),
}

/// Slots `1..=max`, claimed by capsules through files in one directory.
#[derive(Debug)]
pub struct SlotAllocator {
    dir: PathBuf,
    max: u32,
    state: Mutex<State>,
    sync: DirSync,
}

/// One directory's entries made durable by fsyncs that callers arriving
/// together share: a caller whose change was made before a running fsync
/// began needs no fsync of its own.
#[derive(Debug, Default)]
struct DirSync {
    /// Changes made so far (each caller counts its own once it is made).
    changed: AtomicU64,
    /// Changes an fsync that completed covered.
    synced: Mutex<u64>,
}

impl DirSync {
    /// Returns once the change the caller just made in `dir` is durable.
    fn durable(&self, dir: &Path) -> io::Result<()> {
        let mine = self.changed.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= mine {
            return Ok(());
        }
        // Every change counted by now was made before this fsync starts.
        let covered = self.changed.load(Ordering::SeqCst);
        fs::File::open(dir)?.sync_all()?;
        *synced = covered;
        Ok(())
    }
}

/// Suffix of a claim whose capsule is gone and whose slot drains.
const DRAIN_SUFFIX: &str = ".drain";

#[derive(Debug, Default)]
struct State {
    claims: BTreeMap<u32, CapsuleId>,
    /// Slots whose claim is being written, and for whom.
    pending: BTreeMap<u32, CapsuleId>,
    /// Slots whose capsule is gone, held until their conntrack is flushed.
    draining: BTreeSet<u32>,
    /// Next slot to try: allocation goes round the ring rather than reusing
    /// the lowest free slot, so a just-released address rests as long as
    /// possible before it is handed out again.
    cursor: u32,
}

impl State {
    /// The slot `capsule` claims.
    fn slot_of(&self, capsule: &CapsuleId) -> Option<u32> {
        self.claims
            .iter()
            .find(|(_, c)| *c == capsule)
            .map(|(s, _)| *s)
    }
}

/// Reads a claim directory (creating it if needed): each file named by a
/// number, with its path and contents. Files starting with `.` are
/// unfinished claims of a crashed writer (they never became visible) and
/// are removed; other names are ignored. Shared by slot and host-port
/// claims.
pub(super) fn read_claim_files(dir: &Path) -> io::Result<Vec<(u32, PathBuf, Vec<u8>)>> {
    fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            fs::remove_file(entry.path())?;
            continue;
        }
        let Ok(n) = name.parse::<u32>() else {
            continue;
        };
        let path = entry.path();
        let body = claim_body(&path)?;
        out.push((n, path, body));
    }
    Ok(out)
}

/// Who a claim names: a symlink's target, read and never followed, or a
/// regular file's contents. The file is opened refusing a symlink, so no
/// claim swapped in between a check and the read is ever followed.
fn claim_body(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            let mut body = Vec::new();
            f.read_to_end(&mut body)?;
            Ok(body)
        }
        // ELOOP: the claim is a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            Ok(fs::read_link(path)?.into_os_string().into_vec())
        }
        Err(e) => Err(e),
    }
}

impl SlotAllocator {
    /// Opens (creating it if needed) the claim directory and loads every
    /// claim in it. Leftover temporary files from a crash are removed.
    pub fn open(dir: &Path, max: u32) -> io::Result<Self> {
        let mut claims = BTreeMap::new();
        for (slot, path, body) in read_claim_files(dir)? {
            let owner = String::from_utf8_lossy(&body);
            match CapsuleId::new(owner.trim()) {
                Ok(id) => {
                    claims.insert(slot, id);
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("claim {} names no valid capsule", path.display()),
                    ));
                }
            }
        }
        let mut draining = BTreeSet::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            if let Some(slot) = name
                .to_str()
                .and_then(|n| n.strip_suffix(DRAIN_SUFFIX))
                .and_then(|n| n.parse::<u32>().ok())
            {
                draining.insert(slot);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            max,
            state: Mutex::new(State {
                claims,
                pending: BTreeMap::new(),
                draining,
                cursor: 0,
            }),
            sync: DirSync::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated:
        // every mutation is a single insert or remove after the file I/O.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot claimed by `capsule`, if any.
    pub fn get(&self, capsule: &CapsuleId) -> Option<u32> {
        self.lock().slot_of(capsule)
    }

    /// Every claim, by slot.
    pub fn claims(&self) -> Vec<(u32, CapsuleId)> {
        self.lock()
            .claims
            .iter()
            .map(|(s, c)| (*s, c.clone()))
            .collect()
    }

    /// Claims a slot for `capsule`, or returns the one it already holds
    /// (a restored capsule keeps its address). The flag says whether the
    /// claim is new. The slot is held in memory while its claim is written,
    /// so claims of other capsules go on meanwhile.
    pub(crate) fn claim(&self, capsule: &CapsuleId) -> Result<(u32, bool), ClaimError> {
        // Slots another process claimed under us: skipped from then on, so
        // the search ends.
        let mut taken = BTreeSet::new();
        loop {
            let slot = {
                let mut st = self.lock();
                if let Some(slot) = st.slot_of(capsule) {
                    return Ok((slot, false));
                }
                if let Some(other) = st
                    .claims
                    .values()
                    .chain(st.pending.values())
                    .find(|c| c.short() == capsule.short())
                {
                    return Err(ClaimError::ShortIdTaken(other.clone()));
                }
                let free = (0..self.max)
                    .map(|step| (st.cursor + step) % self.max + 1)
                    .find(|slot| {
                        !st.claims.contains_key(slot)
                            && !st.pending.contains_key(slot)
                            && !st.draining.contains(slot)
                            && !taken.contains(slot)
                    });
                let Some(slot) = free else {
                    return Err(ClaimError::Exhausted);
                };
                st.pending.insert(slot, capsule.clone());
                st.cursor = slot % self.max;
                slot
            };
            let written = self.write_claim(slot, capsule);
            let mut st = self.lock();
            st.pending.remove(&slot);
            match written {
                Ok(()) => {
                    st.claims.insert(slot, capsule.clone());
                    return Ok((slot, true));
                }
                // Taken by another process sharing the directory.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    taken.insert(slot);
                }
                Err(e) => return Err(ClaimError::Io(e)),
            }
        }
    }

    fn write_claim(&self, slot: u32, capsule: &CapsuleId) -> io::Result<()> {
        let link = self.dir.join(slot.to_string());
        std::os::unix::fs::symlink(capsule.as_str(), &link)?;
        self.sync.durable(&self.dir).inspect_err(|_| {
            // Not known durable: not a claim. A crash may still leave it,
            // which the owner's journal then explains or the sweep frees.
            let _ = fs::remove_file(&link);
        })
    }

    /// Takes `capsule`'s claim away from it, durably, and keeps the slot
    /// out of use until [`SlotAllocator::end_release`]; returns the slot.
    /// The capsule may claim another slot meanwhile. Absent claims are not
    /// an error (teardown is idempotent).
    pub fn begin_release(&self, capsule: &CapsuleId) -> io::Result<Option<u32>> {
        let mut st = self.lock();
        let Some(slot) = st.slot_of(capsule) else {
            return Ok(None);
        };
        fs::rename(
            self.dir.join(slot.to_string()),
            self.dir.join(format!("{slot}{DRAIN_SUFFIX}")),
        )?;
        self.sync.durable(&self.dir)?;
        st.claims.remove(&slot);
        st.draining.insert(slot);
        Ok(Some(slot))
    }

    /// Slot `slot` drained: free for a new claim.
    pub fn end_release(&self, slot: u32) -> io::Result<()> {
        let mut st = self.lock();
        match fs::remove_file(self.dir.join(format!("{slot}{DRAIN_SUFFIX}"))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        st.draining.remove(&slot);
        Ok(())
    }

    /// Slots draining now.
    pub fn draining(&self) -> Vec<u32> {
        self.lock().draining.iter().copied().collect()
    }

    /// Drops `capsule`'s claim; returns the slot it held. Absent claims are
    /// not an error (teardown is idempotent).
    pub fn release(&self, capsule: &CapsuleId) -> io::Result<Option<u32>> {
        let mut st = self.lock();
        let Some(slot) = st.slot_of(capsule) else {
            return Ok(None);
        };
        match fs::remove_file(self.dir.join(slot.to_string())) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        st.claims.remove(&slot);
        Ok(Some(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CapsuleId {
        CapsuleId::new(s).unwrap()
    }

    #[test]
    fn a_draining_slot_stays_out_of_use_across_a_restart_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::open(dir.path(), 2).unwrap();
        let (s1, _) = a.claim(&id("aaaaaaaaa1")).unwrap();
        assert_eq!(a.begin_release(&id("aaaaaaaaa1")).unwrap(), Some(s1));
        assert_eq!(a.begin_release(&id("aaaaaaaaa1")).unwrap(), None);
        assert_eq!(a.get(&id("aaaaaaaaa1")), None);
        // The same capsule back at once (a create retried) takes another
        // slot; with that one taken too, nothing is left.
        let (s2, new) = a.claim(&id("aaaaaaaaa1")).unwrap();
        assert!(new && s2 != s1);
        assert!(matches!(
            a.claim(&id("bbbbbbbbb2")),
            Err(ClaimError::Exhausted)
        ));
        // A restarted agent still holds it back.
        drop(a);
        let a = SlotAllocator::open(dir.path(), 2).unwrap();
        assert_eq!(a.draining(), vec![s1]);
        assert_eq!(a.claims(), vec![(s2, id("aaaaaaaaa1"))]);
        assert!(matches!(
            a.claim(&id("bbbbbbbbb2")),
            Err(ClaimError::Exhausted)
        ));
        a.end_release(s1).unwrap();
        assert!(a.draining().is_empty());
        assert_eq!(a.claim(&id("bbbbbbbbb2")).unwrap(), (s1, true));
    }

    #[test]
    fn claims_survive_a_restart_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::open(dir.path(), 10).unwrap();
        let (s1, new1) = a.claim(&id("aaaaaaaaa1")).unwrap();
        let (s2, _) = a.claim(&id("bbbbbbbbb2")).unwrap();
        assert!(new1);
        assert_ne!(s1, s2);
        assert_eq!(a.claim(&id("aaaaaaaaa1")).unwrap(), (s1, false));
        drop(a);

        let b = SlotAllocator::open(dir.path(), 10).unwrap();
        assert_eq!(b.get(&id("aaaaaaaaa1")), Some(s1));
        assert_eq!(b.get(&id("bbbbbbbbb2")), Some(s2));
        assert_eq!(b.claim(&id("aaaaaaaaa1")).unwrap(), (s1, false));
        assert_eq!(b.release(&id("aaaaaaaaa1")).unwrap(), Some(s1));
        assert_eq!(b.release(&id("aaaaaaaaa1")).unwrap(), None);
        drop(b);
        let c = SlotAllocator::open(dir.path(), 10).unwrap();
        assert_eq!(c.claims(), vec![(s2, id("bbbbbbbbb2"))]);
    }

    #[test]
    fn slots_run_out_and_released_slots_rest_before_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::open(dir.path(), 3).unwrap();
        let s: Vec<u32> = ["c1", "c2", "c3"]
            .iter()
            .map(|c| a.claim(&id(c)).unwrap().0)
            .collect();
        assert_eq!(s, vec![1, 2, 3]);
        assert!(matches!(a.claim(&id("c4")), Err(ClaimError::Exhausted)));
        a.release(&id("c1")).unwrap();
        a.release(&id("c2")).unwrap();
        // The ring goes on from slot 3, so slot 1 comes back first, not 2.
        assert_eq!(a.claim(&id("c5")).unwrap().0, 1);
        assert_eq!(a.claim(&id("c6")).unwrap().0, 2);
    }

    #[test]
    fn a_slot_claimed_by_another_process_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::open(dir.path(), 5).unwrap();
        fs::write(dir.path().join("1"), "other").unwrap();
        assert_eq!(a.claim(&id("mine")).unwrap().0, 2);
    }

    #[test]
    fn names_that_would_collide_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::open(dir.path(), 5).unwrap();
        a.claim(&id("0123456789-a")).unwrap();
        match a.claim(&id("0123456789-b")) {
            Err(ClaimError::ShortIdTaken(other)) => assert_eq!(other, id("0123456789-a")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn claims_made_at_once_get_distinct_slots_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = std::sync::Arc::new(SlotAllocator::open(dir.path(), 64).unwrap());
        let claimed: Vec<(CapsuleId, u32)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..48)
                .map(|i| {
                    let a = a.clone();
                    s.spawn(move || {
                        let c = id(&format!("{i:02}capsule"));
                        let (slot, new) = a.claim(&c).unwrap();
                        assert!(new);
                        (c, slot)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let slots: BTreeSet<u32> = claimed.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            slots.len(),
            claimed.len(),
            "a slot claimed twice: {claimed:?}"
        );
        drop(a);
        let b = SlotAllocator::open(dir.path(), 64).unwrap();
        for (c, slot) in &claimed {
            assert_eq!(b.get(c), Some(*slot));
        }
        // Each claim on disk is a symlink naming its owner.
        let (c, slot) = &claimed[0];
        let target = fs::read_link(dir.path().join(slot.to_string())).unwrap();
        assert_eq!(target, Path::new(c.as_str()));
    }

    #[test]
    fn a_claim_is_read_never_followed_and_older_file_claims_still_read() {
        let dir = tempfile::tempdir().unwrap();
        // An agent before the symlinks wrote the owner into a file.
        fs::write(dir.path().join("3"), "olderagent1").unwrap();
        let a = SlotAllocator::open(dir.path(), 5).unwrap();
        assert_eq!(a.get(&id("olderagent1")), Some(3));
        drop(a);
        // A claim pointing at a node file names that path, which is no
        // capsule: refused, and the file's contents are never read.
        let secret = dir.path().join("secret");
        fs::write(&secret, "capsule0001").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("4")).unwrap();
        let err = SlotAllocator::open(dir.path(), 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn unfinished_claims_are_dropped_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".4.half"), "half").unwrap();
        let a = SlotAllocator::open(dir.path(), 5).unwrap();
        assert!(a.claims().is_empty());
        assert!(!dir.path().join(".4.half").exists());
        fs::write(dir.path().join("2"), "Not A Valid Id!").unwrap();
        assert!(SlotAllocator::open(dir.path(), 5).is_err());
    }
}
