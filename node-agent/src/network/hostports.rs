//! Host ports: a node port per published capsule port, so Pods reach a
//! capsule's declared TCP port at `node address:host port`.
//!
//! This module owns the range, the durable claims and the pure plan of a
//! change; `linux.rs` orders the side effects and `portrules.rs` builds the
//! nftables table from the claims. A claim is one file per host port under
//! the state directory holding the capsule, the guest port and the sources
//! allowed (`from`), written before any rule uses it. The table is a pure
//! function of the claims and the slot claims, so a restarted agent rebuilds
//! exactly the table it had (same host ports) from disk alone.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::CapsuleId;
use super::addr::Cidr;

/// The node ports host ports are taken from, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPortRange {
    first: u16,
    last: u16,
}

impl HostPortRange {
    /// `first..=last`; `None` when empty or starting at 0.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first > 0 && first <= last).then_some(Self { first, last })
    }

    /// First port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// Last port.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Default for HostPortRange {
    /// Below the kernel's default ephemeral range (32768-60999) and the
    /// Kubernetes NodePort range (30000-32767), so neither collides.
    fn default() -> Self {
        Self {
            first: 29000,
            last: 29999,
        }
    }
}

impl fmt::Display for HostPortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for HostPortRange {
    type Err = String;

    /// `FIRST-LAST`, e.g. `29000-29999`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|e| format!("{t:?} in {s:?}: {e}"))
        };
        Self::new(port(a)?, port(b)?).ok_or_else(|| format!("{s:?} is empty or starts at 0"))
    }
}

/// A declared TCP port the cluster may reach, and from where. Journaled in
/// the capsule's record as part of its spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRule {
    /// Guest port.
    pub port: u16,
    /// Sources allowed; never empty (a port nobody may reach is not
    /// published at all).
    pub from: Vec<Cidr>,
}

/// A published port: which host port reaches which guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostPort {
    /// Guest port.
    pub port: u16,
    /// Node port that DNATs to it.
    pub host_port: u16,
}

/// What a claim file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Owner.
    pub capsule: CapsuleId,
    /// Guest port.
    pub port: u16,
    /// Sources allowed.
    pub from: Vec<Cidr>,
}

/// One file change of a [`Change`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Write (create or replace) the claim of this host port.
    Put(u16, Claim),
    /// Remove the claim of this host port.
    Remove(u16),
}

/// What making a capsule's ports equal to a list takes: the claim writes
/// and the claims that result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// File changes, additions first.
    pub writes: Vec<Write>,
    /// Every claim on the node afterwards, by host port.
    pub after: BTreeMap<u16, Claim>,
}

/// Why a change cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The range has fewer free ports than the new ports need.
    Exhausted {
        /// New ports asked for.
        needed: usize,
        /// Free ports left.
        free: usize,
    },
}

/// Plans making `capsule`'s claims match `rules`: a port already published
/// keeps its host port (only its sources may change); a new one takes the
/// next free port going round the range from `cursor` (a released port
/// rests as long as possible before reuse); a port no longer listed is
/// released. Pure.
pub fn plan_change(
    claims: &BTreeMap<u16, Claim>,
    range: HostPortRange,
    cursor: u16,
    capsule: &CapsuleId,
    rules: &[PortRule],
) -> Result<Change, PlanError> {
    let mut after = claims.clone();
    let mut puts = Vec::new();
    let mut removes = Vec::new();
    let mine: BTreeMap<u16, u16> = claims
        .iter()
        .filter(|(_, c)| &c.capsule == capsule)
        .map(|(h, c)| (c.port, *h))
        .collect();
    for (port, host) in &mine {
        if !rules.iter().any(|r| r.port == *port) {
            after.remove(host);
            removes.push(Write::Remove(*host));
        }
    }
    let fresh: Vec<&PortRule> = rules
        .iter()
        .filter(|r| !mine.contains_key(&r.port))
        .collect();
    let free: Vec<u16> = (0..range.len())
        .filter_map(|i| {
            let offset = (usize::from(cursor.saturating_sub(range.first)) + i) % range.len();
            u16::try_from(usize::from(range.first) + offset).ok()
        })
        .filter(|p| !after.contains_key(p))
        .collect();
    if free.len() < fresh.len() {
        return Err(PlanError::Exhausted {
            needed: fresh.len(),
            free: free.len(),
        });
    }
    for r in rules {
        let claim = Claim {
            capsule: capsule.clone(),
            port: r.port,
            from: r.from.clone(),
        };
        match mine.get(&r.port) {
            Some(host) if claims.get(host) == Some(&claim) => {}
            Some(host) => {
                after.insert(*host, claim.clone());
                puts.push(Write::Put(*host, claim));
            }
            None => {}
        }
    }
    for (r, host) in fresh.into_iter().zip(free) {
        let claim = Claim {
            capsule: capsule.clone(),
            port: r.port,
            from: r.from.clone(),
        };
        after.insert(host, claim.clone());
        puts.push(Write::Put(host, claim));
    }
    puts.extend(removes);
    Ok(Change {
        writes: puts,
        after,
    })
}

/// The port after `p` in `range`, wrapping.
fn next_in(range: HostPortRange, p: u16) -> u16 {
    if p >= range.last { range.first } else { p + 1 }
}

/// The claims on disk and in memory.
#[derive(Debug)]
pub struct HostPortAllocator {
    dir: PathBuf,
    range: HostPortRange,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    claims: BTreeMap<u16, Claim>,
    cursor: u16,
}

impl HostPortAllocator {
    /// Opens (creating it if needed) the claim directory and loads every
    /// claim, including claims outside `range` (from an agent run with
    /// another range: adopted unchanged, never moved). Unfinished writes
    /// from a crash are removed.
    pub fn open(dir: &Path, range: HostPortRange) -> io::Result<Self> {
        let mut claims = BTreeMap::new();
        for (port, path, body) in super::slots::read_claim_files(dir)? {
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            let claim: Claim = serde_json::from_slice(&body).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("host port claim {}: {e}", path.display()),
                )
            })?;
            claims.insert(port, claim);
        }
        // Go on round the ring after the last port handed out, as if the
        // agent had never stopped.
        let cursor = claims
            .keys()
            .rev()
            .find(|p| range.contains(**p))
            .map_or(range.first, |p| next_in(range, *p));
        Ok(Self {
            dir: dir.to_path_buf(),
            range,
            state: Mutex::new(State { claims, cursor }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation is one map update after its file I/O.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The range new ports come from.
    pub fn range(&self) -> HostPortRange {
        self.range
    }

    /// Every claim, by host port.
    pub fn claims(&self) -> BTreeMap<u16, Claim> {
        self.lock().claims.clone()
    }

    /// `capsule`'s published ports, by guest port.
    pub fn of(&self, capsule: &CapsuleId) -> Vec<HostPort> {
        let mut v: Vec<HostPort> = self
            .lock()
            .claims
            .iter()
            .filter(|(_, c)| &c.capsule == capsule)
            .map(|(h, c)| HostPort {
                port: c.port,
                host_port: *h,
            })
            .collect();
        v.sort_by_key(|h| h.port);
        v
    }

    /// Plans a change against the current claims.
    pub fn plan(&self, capsule: &CapsuleId, rules: &[PortRule]) -> Result<Change, PlanError> {
        let st = self.lock();
        plan_change(&st.claims, self.range, st.cursor, capsule, rules)
    }

    /// Makes one write durable and visible: a put goes to a temporary file,
    /// is synced and renamed over the claim; a remove tolerates absence.
    pub fn apply(&self, w: &Write) -> io::Result<()> {
        let mut st = self.lock();
        match w {
            Write::Put(host, claim) => {
                let tmp = self.dir.join(format!(".{host}"));
                let body = serde_json::to_vec(claim).map_err(io::Error::other)?;
                let mut f = fs::File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                fs::rename(&tmp, self.dir.join(host.to_string()))?;
                fs::File::open(&self.dir)?.sync_all()?;
                st.claims.insert(*host, claim.clone());
                if self.range.contains(*host) {
                    st.cursor = next_in(self.range, *host);
                }
            }
            Write::Remove(host) => {
                match fs::remove_file(self.dir.join(host.to_string())) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                st.claims.remove(host);
            }
        }
        Ok(())
    }

    /// The write that undoes `w`, given the claims before it.
    pub fn inverse(&self, w: &Write) -> Write {
        let host = match w {
            Write::Put(h, _) | Write::Remove(h) => *h,
        };
        match self.lock().claims.get(&host) {
            Some(old) => Write::Put(host, old.clone()),
            None => Write::Remove(host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CapsuleId {
        CapsuleId::new(s).unwrap()
    }

    fn rule(port: u16, from: &str) -> PortRule {
        PortRule {
            port,
            from: vec![from.parse().unwrap()],
        }
    }

    fn range(a: u16, b: u16) -> HostPortRange {
        HostPortRange::new(a, b).unwrap()
    }

    fn apply_all(a: &HostPortAllocator, c: &Change) {
        for w in &c.writes {
            a.apply(w).unwrap();
        }
    }

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!("29000-29999".parse::<HostPortRange>().unwrap().len(), 1000);
        for bad in ["", "5", "10-5", "0-10", "a-b", "1-70000"] {
            assert!(bad.parse::<HostPortRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_kept_port_keeps_its_host_port_and_only_its_sources_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostPortAllocator::open(dir.path(), range(100, 109)).unwrap();
        let c = id("c1");
        apply_all(
            &a,
            &a.plan(&c, &[rule(80, "10.0.0.0/8"), rule(22, "10.0.0.0/8")])
                .unwrap(),
        );
        let before = a.of(&c);
        assert_eq!(
            before,
            vec![
                HostPort {
                    port: 22,
                    host_port: 101
                },
                HostPort {
                    port: 80,
                    host_port: 100
                }
            ]
        );
        let change = a.plan(&c, &[rule(80, "192.168.0.0/16")]).unwrap();
        assert_eq!(
            change.writes,
            vec![
                Write::Put(
                    100,
                    Claim {
                        capsule: c.clone(),
                        port: 80,
                        from: vec!["192.168.0.0/16".parse().unwrap()]
                    }
                ),
                Write::Remove(101),
            ]
        );
        apply_all(&a, &change);
        // Unchanged rules plan no write at all.
        assert!(
            a.plan(&c, &[rule(80, "192.168.0.0/16")])
                .unwrap()
                .writes
                .is_empty()
        );
    }

    #[test]
    fn claims_survive_a_restart_and_released_ports_rest_before_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostPortAllocator::open(dir.path(), range(100, 102)).unwrap();
        let (c1, c2) = (id("c1"), id("c2"));
        apply_all(&a, &a.plan(&c1, &[rule(80, "10.0.0.0/8")]).unwrap());
        apply_all(&a, &a.plan(&c2, &[rule(80, "10.0.0.0/8")]).unwrap());
        drop(a);
        let b = HostPortAllocator::open(dir.path(), range(100, 102)).unwrap();
        assert_eq!(b.of(&c1)[0].host_port, 100);
        assert_eq!(b.of(&c2)[0].host_port, 101);
        apply_all(&b, &b.plan(&c1, &[]).unwrap());
        assert!(b.of(&c1).is_empty());
        let c3 = id("c3");
        // 102 is free and next round the ring; 100 rests.
        apply_all(&b, &b.plan(&c3, &[rule(1, "10.0.0.0/8")]).unwrap());
        assert_eq!(b.of(&c3)[0].host_port, 102);
        // Full: the next capsule gets 100, the one released first.
        let c4 = id("c4");
        apply_all(&b, &b.plan(&c4, &[rule(1, "10.0.0.0/8")]).unwrap());
        assert_eq!(b.of(&c4)[0].host_port, 100);
        assert_eq!(
            b.plan(&id("c5"), &[rule(1, "10.0.0.0/8")]),
            Err(PlanError::Exhausted { needed: 1, free: 0 })
        );
    }

    #[test]
    fn exhaustion_is_decided_before_any_write() {
        let claims = BTreeMap::new();
        let r = range(100, 101);
        let c = id("c1");
        let rules = [
            rule(1, "10.0.0.0/8"),
            rule(2, "10.0.0.0/8"),
            rule(3, "10.0.0.0/8"),
        ];
        assert_eq!(
            plan_change(&claims, r, 100, &c, &rules),
            Err(PlanError::Exhausted { needed: 3, free: 2 })
        );
    }

    #[test]
    fn inverse_restores_the_previous_claim() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostPortAllocator::open(dir.path(), range(100, 109)).unwrap();
        let c = id("c1");
        let put = a.plan(&c, &[rule(80, "10.0.0.0/8")]).unwrap().writes[0].clone();
        assert_eq!(a.inverse(&put), Write::Remove(100));
        a.apply(&put).unwrap();
        assert_eq!(
            a.inverse(&Write::Remove(100)),
            Write::Put(
                100,
                Claim {
                    capsule: c,
                    port: 80,
                    from: vec!["10.0.0.0/8".parse().unwrap()]
                }
            )
        );
    }
}
