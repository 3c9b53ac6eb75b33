//! A few capsule namespaces made ahead of need, so a create does not pay
//! for one. Making a namespace costs the kernel more than everything else
//! in a capsule's network (it registers hundreds of sysctl entries for
//! the namespace and each link, and the namespace and link locks are
//! shared node-wide), and nothing in [`super::prepare`] depends on the
//! capsule. A create takes a ready namespace, renames its node link and
//! mounts it under the capsule's name; only the addresses, routes and the
//! capsule's nftables table are left to do.
//!
//! The pool refills on a thread of its own, one namespace at a time and
//! only once creates have paused for [`QUIET`], so a burst of creates is
//! not slowed by the refill it causes.
//!
//! Nothing in the pool belongs to a capsule, so nothing of it is
//! journaled: a ready namespace is mounted at `<netns dir>/wrenn.<n>` (and
//! its emulated guest, in tests, likewise) with its node link named the
//! same, and the startup sweep removes every such name this pool does not
//! hold, as it does the reaper's retired links. A dropped pool removes
//! what it holds.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::config::{GuestLink, LinuxNetConfig};
use super::{CapsuleId, Error};
use crate::sys::net as sys;

/// How long creates must have paused before the pool makes another
/// namespace.
pub const QUIET: Duration = Duration::from_millis(20);

/// How long the pool waits after a namespace it could not make.
const RETRY: Duration = Duration::from_secs(1);

/// The name of pool entry `n`: its namespace's and its node link's.
pub fn pool_name(n: u32) -> String {
    super::serial_name('.', n)
}

/// Whether `name` has the shape of [`pool_name`].
pub fn is_pool_name(name: &str) -> bool {
    super::is_serial_name(name, '.')
}

/// A ready namespace: its mount, its emulated guest's (tests) and its
/// node link are all named `name`.
#[derive(Debug)]
pub struct Entry {
    /// Namespace file name and node link name.
    pub name: String,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Entry>,
    /// Names of entries ready, being made, or taken and not yet given up:
    /// the sweep leaves these alone.
    held: HashSet<String>,
    next: u32,
    last_take: Option<Instant>,
    started: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    cfg: LinuxNetConfig,
    size: usize,
    state: Mutex<State>,
    wake: Condvar,
}

/// The pool of [`LinuxNetConfig::pool`] ready namespaces.
#[derive(Debug)]
pub struct NetnsPool {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl NetnsPool {
    /// A pool for `cfg`, empty and idle until [`NetnsPool::start`].
    pub fn new(cfg: LinuxNetConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                size: cfg.pool,
                cfg,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
            worker: Mutex::new(None),
        }
    }

    /// Starts filling (once; a pool of size 0 never does). Called after
    /// the startup sweep, which would otherwise race the first entries.
    pub fn start(&self) {
        if self.shared.size == 0 {
            return;
        }
        {
            let mut st = self.shared.lock();
            if st.started {
                return;
            }
            st.started = true;
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("wrenn-netns-pool".into())
            .spawn(move || shared.fill())
        {
            Ok(h) => *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
            Err(e) => warn!(
                error = &e as &dyn std::error::Error,
                "start the namespace pool; every create makes its own namespace"
            ),
        }
    }

    /// A ready namespace, if there is one. The caller gives it up with
    /// [`NetnsPool::claimed`] once it carries the capsule's names, or
    /// [`NetnsPool::discard`] when it could not use it.
    pub fn take(&self) -> Option<Entry> {
        if self.shared.size == 0 {
            return None;
        }
        let mut st = self.shared.lock();
        st.last_take = Some(Instant::now());
        let entry = st.ready.pop_front();
        drop(st);
        self.shared.wake.notify_all();
        entry
    }

    /// `entry` now carries a capsule's names: nothing of the pool's is left.
    pub fn claimed(&self, entry: Entry) {
        self.shared.lock().held.remove(&entry.name);
    }

    /// Removes whatever is left of `entry` under the pool's names.
    pub fn discard(&self, entry: Entry) {
        destroy(&self.shared.cfg, &entry.name);
        self.shared.lock().held.remove(&entry.name);
    }

    /// Whether the name belongs to an entry of this pool.
    pub fn holds(&self, name: &str) -> bool {
        self.shared.lock().held.contains(name)
    }

    /// Where `entry`'s namespace is mounted.
    pub fn netns_path(&self, entry: &Entry) -> PathBuf {
        self.shared.cfg.netns_dir.join(&entry.name)
    }

    /// Where `entry`'s emulated guest namespace is mounted (tests).
    pub fn guest_path(&self, entry: &Entry) -> Option<PathBuf> {
        guest_path(&self.shared.cfg, &entry.name)
    }

    /// Entries ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }
}

impl Drop for NetnsPool {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let worker = self
            .worker
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = worker
            && h.join().is_err()
        {
            warn!("the namespace pool's thread panicked");
        }
        let ready: Vec<Entry> = self.shared.lock().ready.drain(..).collect();
        for e in ready {
            self.discard(e);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker: keeps `size` entries ready, one at a time, whenever
    /// creates have paused for [`QUIET`].
    fn fill(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let wait = if st.ready.len() >= self.size {
                None
            } else {
                match st.last_take.map(|t| t.elapsed()) {
                    Some(since) if since < QUIET => Some(QUIET - since),
                    _ => Some(Duration::ZERO),
                }
            };
            match wait {
                Some(d) if d.is_zero() => {
                    let n = st.next;
                    let name = pool_name(n);
                    st.next = n.wrapping_add(1);
                    st.held.insert(name.clone());
                    drop(st);
                    let made = make(&self.cfg, n, &name);
                    st = self.lock();
                    match made {
                        Ok(()) => st.ready.push_back(Entry { name }),
                        Err(e) => {
                            st.held.remove(&name);
                            drop(st);
                            destroy(&self.cfg, &name);
                            warn!(error = &e as &dyn std::error::Error, entry = %name, "make a pooled namespace; trying again in 1 s");
                            st = self.lock();
                            if !st.stop {
                                st = self
                                    .wake
                                    .wait_timeout(st, RETRY)
                                    .unwrap_or_else(|p| p.into_inner())
                                    .0;
                            }
                        }
                    }
                }
                Some(d) => {
                    st = self
                        .wake
                        .wait_timeout(st, d)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

fn guest_path(cfg: &LinuxNetConfig, name: &str) -> Option<PathBuf> {
    match &cfg.guest_link {
        GuestLink::Tap => None,
        GuestLink::EmulatedGuest { netns_dir } => Some(netns_dir.join(name)),
    }
}

/// Makes entry `n`, named `name` (its emulated guest first, which the
/// capsule side moves its guest end into).
fn make(cfg: &LinuxNetConfig, n: u32, name: &str) -> Result<(), Error> {
    let who = CapsuleId::new(&format!("pool-{n:x}"))?;
    let guest = guest_path(cfg, name);
    if let Some(g) = &guest {
        sys::run_in_new_netns(g, &cfg.proc_dir, |_| Ok::<(), Error>(())).map_err(|source| {
            Error::CreateNetns {
                capsule: who.clone(),
                path: g.clone(),
                source,
            }
        })??;
    }
    let netns = cfg.netns_dir.join(name);
    sys::run_in_new_netns(&netns, &cfg.proc_dir, |nl| {
        super::prepare::prepare(cfg, nl, &who, &netns, name, guest.as_deref(), &|_| Ok(()))
    })
    .map_err(|source| Error::CreateNetns {
        capsule: who.clone(),
        path: netns.clone(),
        source,
    })??;
    debug!(entry = name, "pooled namespace ready");
    Ok(())
}

/// Removes entry `name`'s node link and namespaces, whichever exist;
/// what fails is logged (the startup sweep removes it).
pub(super) fn destroy(cfg: &LinuxNetConfig, name: &str) {
    let deleted = sys::run_in_netns(&cfg.node_netns, |nl| nl.del_link(name));
    if let Err(e) = deleted.and_then(|r| r) {
        warn!(
            error = &e as &dyn std::error::Error,
            link = name,
            "delete a pooled namespace's node link"
        );
    }
    let paths = std::iter::once(cfg.netns_dir.join(name)).chain(guest_path(cfg, name));
    for path in paths {
        if let Err(e) = sys::remove_netns(&path) {
            warn!(error = &e as &dyn std::error::Error, path = %path.display(), "remove a pooled namespace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_fit_the_kernel_and_never_look_like_a_capsules_or_a_retired_link() {
        let longest = pool_name(u32::MAX);
        assert_eq!(longest, "wrenn.ffffffff");
        assert!(longest.len() <= 15);
        for n in [0, 0xabc, u32::MAX] {
            let name = pool_name(n);
            assert!(is_pool_name(&name), "{name}");
            assert!(!super::super::is_resource_name(&name), "{name}");
            assert!(!super::super::reaper::is_retired_name(&name), "{name}");
        }
        for other in [
            "wrenn.",
            "wrenn-0",
            "wrenn+1",
            "wrenn.xyz",
            "wrenn.123456789",
        ] {
            assert!(!is_pool_name(other), "{other}");
        }
    }
}
